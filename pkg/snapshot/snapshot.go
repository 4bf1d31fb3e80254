// Package snapshot takes, lists, moves and removes snapview's snapshots of
// containers (the workerd model): a container snapshot, the whole state of a
// container's filesystem (image form: an OCI image, the container's image
// plus one layer with its changes; disk form: a block-mode container's
// writable disk as an OCI artifact), and a directory snapshot, one
// directory of a container as a one-layer image, restored into other
// containers as a volume.
//
// Everything a capture makes lives under one lease, with no expiry, until
// the snapshot's image record exists (package record); the lease is held
// alive by a lock its command holds, so that a capture that fails or is
// killed leaves nothing once the sweep finds the lock free (Sweep). The
// record's manifest and labels keep its content and snapshots from
// containerd's garbage collector; nothing else does.
//
// snapviewctl's snapshot commands and the public Go package
// github.com/snapview/snapview/snapshots are thin layers over Node.
package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/fault"
	"github.com/snapview/snapview/pkg/snapshot/record"
)

// Node is one containerd, whose containers snapshots are taken of and whose
// namespaces hold them.
type Node struct {
	Client *client.Client
	// StateDir is containerd's state directory: the bundles (their state
	// files say a container's mode) and the captures' locks.
	StateDir string
	// Config is snapview's configuration (the directory snapshot's cap).
	Config *config.Config
}

// CreateOptions says what snapshot to take.
type CreateOptions struct {
	// Dir, when set, takes a directory snapshot of this absolute path in
	// the container.
	Dir string
	// Name is a name for people.
	Name string
	// TTL, when set, lets containerd collect the snapshot that long after
	// it was taken.
	TTL time.Duration
	// NoPause leaves a running container running during the capture.
	NoPause bool
}

// Snapshot is a snapshot as snapview recorded it. Its Size is the bytes its
// own blobs take in the content store (the base image's are not counted).
type Snapshot struct {
	record.Record
}

// Crash points of a capture, for the fault build of snapviewctl (package
// fault), after each step that leaves something behind, for the source
// container's id.
const (
	PointLease    = "capture-lease"
	PointPaused   = "capture-paused"
	PointMounted  = "capture-mounted"
	PointLayer    = "capture-layer"
	PointConfig   = "capture-config"
	PointManifest = "capture-manifest"
	PointUnpacked = "capture-unpacked"
	PointRecord   = "capture-record"
)

// Create takes a snapshot of container id of namespace ns, as o says, and
// returns it once its record exists. On error nothing of it is left: its
// lease is deleted with a synchronous garbage collection.
func (n *Node) Create(ctx context.Context, ns, id string, o CreateOptions) (_ *Snapshot, retErr error) {
	ctx = namespaces.WithNamespace(ctx, ns)
	if o.Name != "" {
		if err := record.CheckName(o.Name); err != nil {
			return nil, fmt.Errorf("snapview: %w", err)
		}
	}
	if o.TTL < 0 {
		return nil, fmt.Errorf("snapview: a negative --ttl %s", o.TTL)
	}
	ctr, err := n.Client.LoadContainer(ctx, id)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return nil, fmt.Errorf("snapview: container %s: not found in namespace %s", id, ns)
		}
		return nil, fmt.Errorf("snapview: container %s: %w", id, err)
	}
	info, err := ctr.Info(ctx, client.WithoutRefreshedMetadata)
	if err != nil {
		return nil, fmt.Errorf("snapview: container %s: %w", id, err)
	}
	if info.SnapshotKey == "" || info.Snapshotter == "" {
		return nil, fmt.Errorf("snapview: container %s has no image snapshot (its client mounted its rootfs itself, as Docker does, or gave a directory, as `ctr run --rootfs` does): there is no snapshot of containerd's to take; its writes live where its client put them (for a Docker container: docker commit)", id)
	}
	block, err := n.blockMode(ctx, ns, info)
	if err != nil {
		return nil, err
	}
	sid, err := record.NewID()
	if err != nil {
		return nil, fmt.Errorf("snapview: new snapshot id: %w", err)
	}
	rec := record.Record{ID: sid, Name: o.Name, Source: id, Snapshotter: info.Snapshotter, Created: time.Now().UTC(), Kind: record.KindContainer, Form: record.FormImage}
	if o.TTL > 0 {
		rec.Expires = rec.Created.Add(o.TTL)
	}
	logger := log.G(ctx).WithFields(log.Fields{"snapshot": sid, "source": id, "namespace": ns})

	task, pause, err := n.pauseNeeded(ctx, ctr, o.NoPause)
	if err != nil {
		return nil, err
	}
	c, ctx, err := n.startCapture(ctx, sid, id, pause)
	if err != nil {
		return nil, err
	}
	defer func() { retErr = errors.Join(retErr, c.end(ctx, retErr)) }()
	fault.Point(PointLease, id)
	if pause {
		resume, err := n.pause(ctx, task, id)
		if err != nil {
			return nil, err
		}
		defer resume()
		fault.Point(PointPaused, id)
	}

	var err2 error
	switch {
	case o.Dir != "" && block:
		return nil, fmt.Errorf("snapview: container %s runs its rootfs in a guest (block mode): directory %s lives in the guest's filesystem, which snapview never reads on the host; take a disk snapshot of the container instead (without --dir)", id, o.Dir)
	case o.Dir != "":
		rec.Kind, rec.Dir = record.KindDirectory, o.Dir
		rec.Size, err2 = n.captureDir(ctx, &rec, info, task, o.Dir)
	case block:
		rec.Form = record.FormDisk
		rec.Size, err2 = n.captureDisk(ctx, &rec, info, ns)
	default:
		rec.Size, err2 = n.captureContainer(ctx, &rec, info, task)
	}
	if err2 != nil {
		return nil, err2
	}
	img, err := n.Client.ImageService().Create(ctx, imageRecord(rec))
	if err != nil {
		return nil, fmt.Errorf("snapview: record snapshot %s: %w", sid, err)
	}
	fault.Point(PointRecord, id)
	rec.Target = img.Target
	logger.WithFields(log.Fields{"kind": rec.Kind, "form": rec.Form, "size": rec.Size, "dir": rec.Dir, "base": rec.Base, "name": rec.Name}).Info("snapview: snapshot taken")
	return &Snapshot{Record: rec}, nil
}

// blockMode reports whether container info hands its rootfs to a guest, or
// did: its task's state file says block mode, or, with no task, its spec
// asks for it, or its writable disk carries the mark of a guest's.
func (n *Node) blockMode(ctx context.Context, ns string, info containers.Container) (bool, error) {
	st, err := bundle.ReadState(filepath.Join(n.StateDir, "io.containerd.runtime.v2.task", ns, info.ID))
	switch {
	case err == nil:
		if st.Mode == bundle.ModeBlock {
			return true, nil
		}
	case !errors.Is(err, bundle.ErrNoState) && !errors.Is(err, os.ErrNotExist):
		return false, fmt.Errorf("snapview: container %s: %w", info.ID, err)
	}
	if spec, err := containerSpec(info); err == nil && spec.Annotations["io.snapview.mode"] == config.ModeBlock {
		return true, nil
	}
	ms, err := n.Client.SnapshotService(info.Snapshotter).Mounts(ctx, info.SnapshotKey)
	if err != nil {
		return false, fmt.Errorf("snapview: container %s: the mounts of its snapshot %s: %w", info.ID, info.SnapshotKey, err)
	}
	for _, m := range ms {
		if who, err := blockdev.GuestWritten(m.Source); err == nil && who != "" {
			return true, nil
		}
	}
	return false, nil
}
