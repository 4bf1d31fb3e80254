package snapshot

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"

	"github.com/snapview/snapview/pkg/image"
	"github.com/snapview/snapview/pkg/snapshot/record"
)

// Registry says how to reach an OCI registry, as ctr is told.
type Registry struct {
	// HostsDir holds hosts.toml files by registry host (containerd's
	// certs.d layout); default /etc/containerd/certs.d.
	HostsDir string
	// PlainHTTP talks HTTP, not HTTPS, to a registry hosts.toml does not
	// configure.
	PlainHTTP bool
	// User is USER[:PASSWORD] for the registry's basic or token auth.
	User string
}

// resolver returns a resolver for r, configured as ctr configures one.
func (r Registry) resolver(ctx context.Context) remotes.Resolver {
	dir := r.HostsDir
	if dir == "" {
		dir = "/etc/containerd/certs.d"
	}
	opts := config.HostOptions{HostDir: config.HostDirFromRoot(dir)}
	if r.PlainHTTP {
		opts.DefaultScheme = "http"
	}
	if r.User != "" {
		user, secret, _ := strings.Cut(r.User, ":")
		opts.Credentials = func(string) (string, string, error) { return user, secret, nil }
	}
	return docker.NewResolver(docker.ResolverOptions{Hosts: config.ConfigureHosts(ctx, opts)})
}

// Push pushes snapshot id of namespace ns to ref in a registry: its
// manifest (annotated with its record) and every blob it names, which the
// content store holds (a capture checks that it does). A blob the registry
// has already (the base image's layers, pushed before) is not sent again:
// containerd's pusher asks first, and mounts it from the repository it was
// pulled from when the registry is the same.
func (n *Node) Push(ctx context.Context, ns, id, ref string, reg Registry) (ocispec.Descriptor, error) {
	ctx = namespaces.WithNamespace(ctx, ns)
	r, err := record.Lookup(ctx, n.Client.ImageService().Get, ns, id)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("snapview: %w", err)
	}
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("snapview: %q is not an image reference: %w", ref, err)
	}
	ref = reference.TagNameOnly(named).String()
	if named, ok := named.(reference.Digested); ok {
		return ocispec.Descriptor{}, fmt.Errorf("snapview: push to %s: a snapshot is pushed to a tag, not a digest (%s)", ref, named.Digest())
	}
	qctx := quiet(ctx)
	if err := n.pushSubject(qctx, r, ref, reg); err != nil {
		return ocispec.Descriptor{}, err
	}
	if err := n.Client.Push(qctx, ref, r.Target, client.WithResolver(reg.resolver(qctx)), client.WithPlatformMatcher(platforms.All),
		client.WithImageHandlerWrapper(n.mountSources(qctx, named))); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("snapview: push snapshot %s to %s: %w", id, ref, err)
	}
	log.G(ctx).WithFields(log.Fields{"snapshot": id, "kind": r.Kind, "form": r.Form, "ref": ref, "digest": r.Target.Digest, "size": r.Size}).Info("snapview: snapshot pushed")
	return r.Target, nil
}

// pushSubject pushes, before a disk snapshot's artifact, the base image it
// names as its subject, into the same repository, so that its pull brings
// the base along.
func (n *Node) pushSubject(ctx context.Context, r record.Record, ref string, reg Registry) error {
	if r.Form != record.FormDisk {
		return nil
	}
	m, err := readManifest(ctx, n.Client.ContentStore(), r.Target)
	if err != nil {
		return fmt.Errorf("snapview: snapshot %s: %w", r.ID, err)
	}
	if m.Subject == nil {
		return fmt.Errorf("snapview: snapshot %s: its artifact names no base image", r.ID)
	}
	named, _ := reference.ParseNormalizedNamed(ref)
	byDigest, err := reference.WithDigest(reference.TrimNamed(named), m.Subject.Digest)
	if err != nil {
		return err
	}
	if err := n.Client.Push(ctx, byDigest.String(), *m.Subject, client.WithResolver(reg.resolver(ctx)), client.WithPlatformMatcher(platforms.All),
		client.WithImageHandlerWrapper(n.mountSources(ctx, named))); err != nil {
		return fmt.Errorf("snapview: push the base image of snapshot %s: %w", r.ID, err)
	}
	return nil
}

// PullOptions says where a pulled snapshot goes.
type PullOptions struct {
	Registry
	// Snapshotter is where an image-form snapshot is unpacked (default:
	// the one it was taken in).
	Snapshotter string
}

// Pull fetches the snapshot at ref into namespace ns, makes its record
// (the same name and labels as on the node it was taken on, read strictly
// from its manifest's annotations) and, in image form, unpacks it into the
// snapshotter o names; a disk snapshot's base image comes with it. Blobs
// the content store has already (the base image's) are not fetched. A
// snapshot of that id already here is refused unless it is the same.
func (n *Node) Pull(ctx context.Context, ns, ref string, o PullOptions) (_ *Snapshot, retErr error) {
	ctx = namespaces.WithNamespace(ctx, ns)
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return nil, fmt.Errorf("snapview: %q is not an image reference: %w", ref, err)
	}
	ref = reference.TagNameOnly(named).String()
	// Everything fetched lives under a capture's lease (no expiry, kept by
	// this command's lock) until the record holds it: a pull that fails
	// takes what it fetched with it, and one that is killed leaves it to
	// the sweep, as a capture does. The lease is named by an id of its
	// own: the snapshot's is not known before its manifest is read.
	tid, err := record.NewID()
	if err != nil {
		return nil, fmt.Errorf("snapview: new transfer id: %w", err)
	}
	c, lctx, err := n.startCapture(ctx, tid, "", false)
	if err != nil {
		return nil, err
	}
	defer func() { retErr = errors.Join(retErr, c.end(ctx, retErr)) }()
	target, err := n.fetch(lctx, ref, o.Registry)
	if err != nil {
		return nil, err
	}
	cs := n.Client.ContentStore()
	m, err := readManifest(lctx, cs, target)
	if err != nil {
		return nil, fmt.Errorf("snapview: %s: %w", ref, err)
	}
	rec, err := fromAnnotations(m.Annotations)
	if err != nil {
		return nil, fmt.Errorf("snapview: %s is not a snapview snapshot: %w", ref, err)
	}
	rec.Target = target
	if o.Snapshotter != "" {
		rec.Snapshotter = o.Snapshotter
	}
	if rec.Size, err = n.ownSize(lctx, rec, m); err != nil {
		return nil, err
	}
	if rec.Form == record.FormDisk {
		if err := n.fetchSubject(lctx, rec, m, ref, o.Registry); err != nil {
			return nil, err
		}
		// The record keeps its base's content, as a capture's does.
		key := "containerd.io/gc.ref.content.subject"
		if _, err := cs.Update(lctx, content.Info{Digest: target.Digest, Labels: map[string]string{key: m.Subject.Digest.String()}}, "labels."+key); err != nil {
			return nil, fmt.Errorf("snapview: snapshot %s: label its base: %w", rec.ID, err)
		}
	}
	if existing, err := n.Client.ImageService().Get(ctx, record.ImageName(rec.ID)); err == nil {
		if existing.Target.Digest != rec.Target.Digest {
			return nil, fmt.Errorf("snapview: snapshot %s is here already, with other content (%s, not %s)", rec.ID, existing.Target.Digest, rec.Target.Digest)
		}
	} else if !errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("snapview: snapshot %s: %w", rec.ID, err)
	} else if _, err := n.Client.ImageService().Create(lctx, imageRecord(rec)); err != nil {
		return nil, fmt.Errorf("snapview: record snapshot %s: %w", rec.ID, err)
	}
	if rec.Form == record.FormImage {
		ci := client.NewImageWithPlatform(n.Client, imageRecord(rec), platforms.Default())
		if err := ci.Unpack(lctx, rec.Snapshotter); err != nil {
			return nil, fmt.Errorf("snapview: unpack snapshot %s in snapshotter %s: %w", rec.ID, rec.Snapshotter, err)
		}
	}
	log.G(ctx).WithFields(log.Fields{"snapshot": rec.ID, "kind": rec.Kind, "form": rec.Form, "ref": ref, "size": rec.Size, "snapshotter": rec.Snapshotter}).Info("snapview: snapshot pulled")
	return &Snapshot{Record: rec}, nil
}

// fromAnnotations reads a snapshot's record from its manifest's
// annotations, as strictly as a record's labels are read.
func fromAnnotations(a map[string]string) (record.Record, error) {
	id, err := record.ParseID(a[AnnotationID])
	if err != nil {
		return record.Record{}, err
	}
	created, err := time.Parse(time.RFC3339Nano, a[AnnotationCreated])
	if err != nil {
		return record.Record{}, fmt.Errorf("annotation %s: %w", AnnotationCreated, err)
	}
	r := record.Record{ID: id, Kind: a[AnnotationKind], Form: a[AnnotationForm], Source: a[AnnotationSource], Base: a[AnnotationBase],
		Name: a[AnnotationName], Dir: a[AnnotationDir], Snapshotter: a[AnnotationSnapshotter], Created: created}
	if v, ok := a[AnnotationSkipped]; ok {
		if r.Skipped, err = strconv.Atoi(v); err != nil || r.Skipped < 0 || strconv.Itoa(r.Skipped) != v {
			return record.Record{}, fmt.Errorf("annotation %s: %q is not a count", AnnotationSkipped, v)
		}
	}
	// The record's own reader checks the rest.
	if _, err := record.FromImage(images.Image{Name: record.ImageName(id), Labels: r.Labels()}); err != nil {
		return record.Record{}, err
	}
	return r, nil
}

// ownSize measures what a pulled snapshot's own blobs take: its manifest,
// its config and, of its layers, those it added to its base (the last, if
// its config's history says the snapshot added one; a directory
// snapshot's one; a disk snapshot's disk).
func (n *Node) ownSize(ctx context.Context, rec record.Record, m ocispec.Manifest) (int64, error) {
	size := rec.Target.Size + m.Config.Size
	switch {
	case rec.Form == record.FormDisk, rec.Kind == record.KindDirectory:
		for _, l := range m.Layers {
			size += l.Size
		}
	case len(m.Layers) > 0:
		ri, err := image.Resolve(ctx, n.Client.ContentStore(), rec.Target, nil)
		if err != nil {
			return 0, fmt.Errorf("snapview: snapshot %s: %w", rec.ID, err)
		}
		if h := ri.Config.History; len(h) > 0 && strings.HasPrefix(h[len(h)-1].Comment, "snapview snapshot "+rec.ID) && !h[len(h)-1].EmptyLayer {
			size += m.Layers[len(m.Layers)-1].Size
		}
	}
	return size, nil
}

// fetchSubject fetches a disk snapshot's base image, its subject, from the
// repository the snapshot came from.
func (n *Node) fetchSubject(ctx context.Context, rec record.Record, m ocispec.Manifest, ref string, reg Registry) error {
	if m.Subject == nil || m.Subject.Digest.String() != rec.Base {
		return fmt.Errorf("snapview: snapshot %s: its artifact's subject is not its base %s", rec.ID, rec.Base)
	}
	named, _ := reference.ParseNormalizedNamed(ref)
	byDigest, err := reference.WithDigest(reference.TrimNamed(named), m.Subject.Digest)
	if err != nil {
		return err
	}
	if _, err := n.fetch(ctx, byDigest.String(), reg); err != nil {
		return fmt.Errorf("snapview: the base image of snapshot %s: %w", rec.ID, err)
	}
	return nil
}

// readManifest reads an image manifest (or artifact manifest) from cs.
func readManifest(ctx context.Context, cs content.Provider, d ocispec.Descriptor) (ocispec.Manifest, error) {
	var m ocispec.Manifest
	if !images.IsManifestType(d.MediaType) {
		return m, fmt.Errorf("%s is a %s, not a manifest", d.Digest, d.MediaType)
	}
	b, err := content.ReadBlob(ctx, cs, d)
	if err != nil {
		return m, err
	}
	if digest.FromBytes(b) != d.Digest {
		return m, errors.New("the manifest does not match its digest")
	}
	return m, json.Unmarshal(b, &m)
}

// fetch fetches what ref names (for this platform: one manifest of an
// index) into the content store, as containerd's pull does but without
// making an image record (client.Fetch makes one named ref, which would
// outlive a refused pull and hold what it fetched). Blobs the store has
// already are not downloaded; each blob is labelled with the repository it
// came from, so that a later push to the same registry mounts it instead
// of uploading it.
func (n *Node) fetch(ctx context.Context, ref string, reg Registry) (ocispec.Descriptor, error) {
	qctx := quiet(ctx)
	resolver := reg.resolver(qctx)
	name, desc, err := resolver.Resolve(qctx, ref)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return ocispec.Descriptor{}, fmt.Errorf("snapview: %s: not found in the registry", ref)
		}
		return ocispec.Descriptor{}, fmt.Errorf("snapview: resolve %s: %w", ref, err)
	}
	fetcher, err := resolver.Fetcher(qctx, name)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("snapview: fetch %s: %w", ref, err)
	}
	cs := n.Client.ContentStore()
	children := images.SetChildrenMappedLabels(cs, images.ChildrenHandler(cs), images.ChildGCLabels)
	children = images.LimitManifests(images.FilterPlatforms(children, platforms.Default()), platforms.Default(), 1)
	source, err := docker.AppendDistributionSourceLabel(cs, name)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("snapview: %s: %w", ref, err)
	}
	if err := images.Dispatch(qctx, images.Handlers(remotes.FetchHandler(cs, fetcher), children, source), nil, desc); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("snapview: fetch %s: %w", ref, err)
	}
	return desc, nil
}

// mountSources returns a push's handler wrapper that tells containerd's
// pusher where on the target registry each blob of the snapshot is
// already: besides the repositories containerd recorded when it pulled a
// blob, those of the node's images named on that registry that hold it (a
// base image tagged and pushed there, or pulled when its blobs were
// already here, which containerd does not label). The pusher mounts such a
// blob from that repository instead of uploading it again; a registry that
// cannot mount it answers with an upload, as for any blob.
func (n *Node) mountSources(ctx context.Context, target reference.Named) func(images.Handler) images.Handler {
	host := reference.Domain(target)
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h // containerd's labels name the host without its port
	}
	key := labels.LabelDistributionSource + "." + host
	repos := map[digest.Digest][]string{}
	imgs, err := n.Client.ImageService().List(ctx)
	if err != nil {
		log.G(ctx).WithError(err).Warn("snapview: list images for the push's mount sources")
	}
	for _, img := range imgs {
		named, err := reference.ParseNormalizedNamed(img.Name)
		if err != nil || reference.Domain(named) != reference.Domain(target) || reference.Path(named) == reference.Path(target) {
			continue
		}
		ri, err := image.Resolve(ctx, n.Client.ContentStore(), img.Target, nil)
		if err != nil {
			continue
		}
		for _, d := range append([]ocispec.Descriptor{ri.ConfigDesc}, ri.Parsed.Layers...) {
			if !slices.Contains(repos[d.Digest], reference.Path(named)) {
				repos[d.Digest] = append(repos[d.Digest], reference.Path(named))
			}
		}
	}
	return func(h images.Handler) images.Handler {
		return images.HandlerFunc(func(ctx context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
			children, err := h.Handle(ctx, desc)
			for i, c := range children {
				rs := repos[c.Digest]
				if len(rs) == 0 {
					continue
				}
				if old := c.Annotations[key]; old != "" {
					rs = append(strings.Split(old, ","), rs...)
				}
				slices.Sort(rs)
				a := maps.Clone(c.Annotations)
				if a == nil {
					a = map[string]string{}
				}
				a[key] = strings.Join(slices.Compact(rs), ",")
				children[i].Annotations = a
			}
			return children, err
		})
	}
}

// quiet returns ctx with a logger that leaves out the registry client's
// info lines (a 404 while resolving is one), unless debug logging is on.
func quiet(ctx context.Context) context.Context {
	e := log.G(ctx)
	if e.Logger.IsLevelEnabled(log.DebugLevel) {
		return ctx
	}
	q := logrus.New()
	q.SetOutput(e.Logger.Out)
	q.SetFormatter(e.Logger.Formatter)
	q.SetLevel(logrus.WarnLevel)
	return log.WithLogger(ctx, logrus.NewEntry(q).WithFields(e.Data))
}
