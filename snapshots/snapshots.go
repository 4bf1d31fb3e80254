// Package snapshots is the Go API for orchestrators of snapview's snapshots
// (the workerd model): take a snapshot of a container, whole or one of its
// directories, list, inspect and remove snapshots, and move them between
// nodes through an OCI registry. snapviewctl's snapshot commands are a thin
// layer over it.
//
//	c, err := snapshots.New("/run/containerd/containerd.sock", snapshots.WithNamespace("k8s.io"))
//	s, err := c.Create(ctx, containerID, snapshots.CreateOptions{Dir: "/data"})
//	// restore s.ID: a volume {"snapshot": s.ID, "target": "/data"} of another container
//
// A snapshot is restored by its id alone: a container snapshot in image
// form runs as the image named by ImageName(id); a directory snapshot is a
// volume of another container (annotation io.snapview.volume.<name> =
// {"snapshot":"<id>","target":"<path>"}); a disk snapshot is a block-mode
// container's writable disk (annotation io.snapview.restore=<id>).
//
// The compatibility promise is params': within this module's major
// version, fields and options are only added; Snapshot's JSON (what
// `snapviewctl snapshot create` prints) keeps its field names and meaning.
package snapshots

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/client"

	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/snapshot"
	"github.com/snapview/snapview/pkg/snapshot/record"
)

// Kinds and forms of snapshots.
const (
	KindContainer = record.KindContainer
	KindDirectory = record.KindDirectory
	FormImage     = record.FormImage
	FormDisk      = record.FormDisk
)

// Snapshot is a snapshot as snapview recorded it.
type Snapshot struct {
	// ID is the snapshot's id, a UUID: all that restoring it takes.
	ID string `json:"id"`
	// Kind is "container" or "directory"; Form "image" or "disk".
	Kind string `json:"kind"`
	Form string `json:"form"`
	// Size is the bytes the snapshot's own blobs take in the content store
	// (its base image's are not counted), measured by snapview.
	Size int64 `json:"size"`
	// Name is the name given at its creation, for people.
	Name string `json:"name,omitempty"`
	// Created is when it was taken.
	Created time.Time `json:"created"`
	// Source is the container it was taken of.
	Source string `json:"source"`
	// Base is the manifest digest of the image that container ran (a
	// container snapshot).
	Base string `json:"base,omitempty"`
	// Dir is the directory a directory snapshot holds.
	Dir string `json:"dir,omitempty"`
	// Skipped counts the device nodes, FIFOs and sockets a directory
	// snapshot left out.
	Skipped int `json:"skipped,omitempty"`
	// Expires is when containerd may collect it (--ttl), if ever.
	Expires *time.Time `json:"expires,omitempty"`
	// Image is the image record that holds it: for a container snapshot in
	// image form, the image a new container runs to restore it.
	Image string `json:"image"`
}

// Old reports whether the snapshot is older than 30 days, the age at which
// `snapshot ls` marks it.
func (s Snapshot) Old(now time.Time) bool { return now.Sub(s.Created) > snapshot.OldAge }

// ImageName returns the name of snapshot id's image record.
func ImageName(id string) string { return record.ImageName(id) }

// ParseID accepts id only in the canonical form snapview printed.
func ParseID(id string) (string, error) { return record.ParseID(id) }

// Client takes and manages the snapshots of one containerd's namespace.
type Client struct {
	node *snapshot.Node
	ns   string
	own  bool
}

type options struct {
	ns, state, configPath string
	client                *client.Client
}

// Option configures a Client.
type Option func(*options)

// WithNamespace works in namespace ns (default "default", as ctr).
func WithNamespace(ns string) Option { return func(o *options) { o.ns = ns } }

// WithStateDir names containerd's state directory (default /run/containerd):
// where a container's bundle says its mode, and where a capture holds the
// lock that keeps its lease.
func WithStateDir(dir string) Option { return func(o *options) { o.state = dir } }

// WithConfig reads snapview's configuration from path (default: the file
// the shim reads, $SNAPVIEW_CONFIG or /etc/containerd/snapview.toml).
func WithConfig(path string) Option { return func(o *options) { o.configPath = path } }

// WithClient uses an existing containerd client, which Close leaves open.
func WithClient(c *client.Client) Option { return func(o *options) { o.client = c } }

// New returns a Client of the containerd at address.
func New(address string, opts ...Option) (*Client, error) {
	o := options{ns: "default", state: "/run/containerd"}
	for _, opt := range opts {
		opt(&o)
	}
	var cfg *config.Config
	var err error
	if o.configPath != "" {
		cfg, err = config.ReadFile(o.configPath)
	} else {
		cfg, err = config.LoadDefault()
	}
	if err != nil {
		return nil, err
	}
	c, own := o.client, false
	if c == nil {
		if c, err = client.New(address); err != nil {
			return nil, fmt.Errorf("snapview: connect to containerd at %s: %w", address, err)
		}
		own = true
	}
	return &Client{node: &snapshot.Node{Client: c, StateDir: o.state, Config: cfg}, ns: o.ns, own: own}, nil
}

// Close closes the connection to containerd, unless it was given.
func (c *Client) Close() error {
	if !c.own {
		return nil
	}
	return c.node.Client.Close()
}

// CreateOptions says what snapshot to take.
type CreateOptions struct {
	// Dir, when set, takes a directory snapshot of this absolute path in
	// the container.
	Dir string
	// Name is a name for people ([A-Za-z0-9][A-Za-z0-9._-]{0,62}).
	Name string
	// TTL, when set, lets containerd collect the snapshot that long after it
	// was taken.
	TTL time.Duration
	// NoPause leaves a running container running during the capture.
	NoPause bool
}

// Create takes a snapshot of container and returns it once it exists.
func (c *Client) Create(ctx context.Context, container string, o CreateOptions) (*Snapshot, error) {
	s, err := c.node.Create(ctx, c.ns, container, snapshot.CreateOptions(o))
	if err != nil {
		return nil, err
	}
	return public(s.Record), nil
}

// List returns the namespace's snapshots, oldest first.
func (c *Client) List(ctx context.Context) ([]Snapshot, error) {
	ss, err := c.node.List(ctx, c.ns)
	if err != nil {
		return nil, err
	}
	out := make([]Snapshot, 0, len(ss))
	for _, s := range ss {
		out = append(out, *public(s.Record))
	}
	return out, nil
}

// Inspect returns snapshot id.
func (c *Client) Inspect(ctx context.Context, id string) (*Snapshot, error) {
	s, err := c.node.Inspect(ctx, c.ns, id)
	if err != nil {
		return nil, err
	}
	return public(s.Record), nil
}

// Remove removes snapshots ids; every one is attempted.
func (c *Client) Remove(ctx context.Context, ids ...string) error {
	if len(ids) == 0 {
		return errors.New("snapview: no snapshot to remove")
	}
	return c.node.Remove(ctx, c.ns, ids...)
}

func public(r record.Record) *Snapshot {
	s := &Snapshot{ID: r.ID, Kind: r.Kind, Form: r.Form, Size: r.Size, Name: r.Name, Created: r.Created, Source: r.Source,
		Base: r.Base, Dir: r.Dir, Skipped: r.Skipped, Image: record.ImageName(r.ID)}
	if !r.Expires.IsZero() {
		e := r.Expires
		s.Expires = &e
	}
	return s
}

// Registry says how to reach an OCI registry, as ctr is told.
type Registry struct {
	// HostsDir holds hosts.toml files by registry host, containerd's
	// certs.d layout (default /etc/containerd/certs.d).
	HostsDir string
	// PlainHTTP talks HTTP, not HTTPS, to a registry no hosts.toml
	// configures (containerd talks HTTP to localhost without being told).
	PlainHTTP bool
	// User is USER[:PASSWORD] for the registry.
	User string
}

// Push pushes snapshot id to ref (a tag) in a registry and returns the
// digest of the manifest pushed. Blobs the registry has already, such as
// the base image's layers pushed before, are not sent again.
func (c *Client) Push(ctx context.Context, id, ref string, reg Registry) (string, error) {
	d, err := c.node.Push(ctx, c.ns, id, ref, snapshot.Registry(reg))
	if err != nil {
		return "", err
	}
	return d.Digest.String(), nil
}

// PullOptions says how to pull a snapshot and where it goes.
type PullOptions struct {
	Registry
	// Snapshotter is where an image-form snapshot is unpacked (default:
	// the name of the one it was taken in).
	Snapshotter string
}

// Pull pulls the snapshot at ref into the namespace and returns it, with
// the id, kind, form, name and source it had on the node it was taken on
// and its size measured here. Blobs the content store has already are not
// fetched.
func (c *Client) Pull(ctx context.Context, ref string, o PullOptions) (*Snapshot, error) {
	s, err := c.node.Pull(ctx, c.ns, ref, snapshot.PullOptions{Registry: snapshot.Registry(o.Registry), Snapshotter: o.Snapshotter})
	if err != nil {
		return nil, err
	}
	return public(s.Record), nil
}
