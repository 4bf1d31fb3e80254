// Package view creates, mounts and removes the read-only view of a
// container's image.
//
// Lifecycle: Create makes the view snapshot "snapview/<container-id>" of the
// parent of the container's own snapshot, with the lease on the context so
// that it is referenced from the moment it exists, and labelled so that
// containerd's GC reclaims it once the container record is gone even if every
// snapview cleanup failed (containerd.io/gc.bref.container). Mount mounts it
// read-only on a host directory; Unmount undoes that; Remove deletes the
// snapshot. Each step's undo is idempotent: a view or mount already gone is
// success.
package view

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/lease"
)

// LabelGCBackRef ties the view's lifetime to the container record.
const LabelGCBackRef = "containerd.io/gc.bref.container"

// Key returns the view's snapshot key for a container.
func Key(containerID string) string { return "snapview/" + containerID }

// VolumeKey returns the snapshot key of a container's volume name: a view
// of another image, under the container's lease.
func VolumeKey(containerID, name string) string { return Key(containerID) + "/volumes/" + name }

// VolumeName returns the volume name of a container's volume view key, and
// whether key is one.
func VolumeName(containerID, key string) (string, bool) {
	name, ok := strings.CutPrefix(key, Key(containerID)+"/volumes/")
	return name, ok && name != "" && !strings.Contains(name, "/")
}

// Held is what a container's lease holds of snapview's: the view and the
// volumes' views, in snapshotter Snapshotter.
type Held struct {
	Snapshotter string
	// Key is the view's key ("" when the lease does not hold it).
	Key string
	// Volumes are the names of the volumes whose views it holds, with
	// their keys.
	Volumes map[string]string
}

// HeldBy reads the views of containerID among the resources of its lease.
func HeldBy(containerID string, res []leases.Resource) Held {
	var h Held
	for _, r := range res {
		sn, ok := strings.CutPrefix(r.Type, "snapshots/")
		if !ok {
			continue
		}
		if r.ID == Key(containerID) {
			h.Snapshotter, h.Key = sn, r.ID
		}
		if name, ok := VolumeName(containerID, r.ID); ok {
			h.Snapshotter = sn
			if h.Volumes == nil {
				h.Volumes = map[string]string{}
			}
			h.Volumes[name] = r.ID
		}
	}
	return h
}

// Labels returns the labels of o's view: o's ownership labels and the
// back-reference that lets containerd's GC take it with the container.
func Labels(o lease.Owner) map[string]string {
	l := o.Labels()
	l[LabelGCBackRef] = o.Container
	return l
}

// Create creates o's view of parent under leaseID. A leftover view of the
// same key is verified as snapview's, for the same container, by its labels
// and replaced.
func Create(ctx context.Context, sn snapshots.Snapshotter, o lease.Owner, parent, leaseID string) ([]mount.Mount, error) {
	return CreateKey(ctx, sn, o, Key(o.Container), parent, leaseID)
}

// CreateKey is Create for a view of o's under another key (a volume's).
func CreateKey(ctx context.Context, sn snapshots.Snapshotter, o lease.Owner, key, parent, leaseID string) ([]mount.Mount, error) {
	return create(ctx, sn.View, sn, o, key, parent, leaseID)
}

// PrepareKey is CreateKey for a writable clone of parent: an active
// snapshot of o's under key (a writable snapshot volume), under the same
// lease and labels, removed the same way.
func PrepareKey(ctx context.Context, sn snapshots.Snapshotter, o lease.Owner, key, parent, leaseID string) ([]mount.Mount, error) {
	return create(ctx, sn.Prepare, sn, o, key, parent, leaseID)
}

type makeFunc func(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error)

func create(ctx context.Context, make makeFunc, sn snapshots.Snapshotter, o lease.Owner, key, parent, leaseID string) ([]mount.Mount, error) {
	ctx = leases.WithLease(ctx, leaseID)
	opt := snapshots.WithLabels(Labels(o))
	mounts, err := make(ctx, key, parent, opt)
	if err == nil {
		return mounts, nil
	}
	if !errdefs.IsAlreadyExists(err) {
		return nil, fmt.Errorf("create view %s of %s: %w", key, parent, err)
	}
	info, err := sn.Stat(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("stat existing view %s: %w", key, err)
	}
	if !o.IsContainer(info.Labels) {
		return nil, fmt.Errorf("snapshot %s exists and is not snapview's (label %s=%q): %w",
			key, lease.LabelContainer, info.Labels[lease.LabelContainer], errdefs.ErrAlreadyExists)
	}
	log.G(ctx).WithFields(log.Fields{"id": o.Container, "key": key, "parent": info.Parent, "created": info.Labels[lease.LabelCreated]}).
		Warn("snapview: replacing a leftover view of an earlier run")
	if err := RemoveKey(ctx, sn, key); err != nil {
		return nil, err
	}
	mounts, err = make(ctx, key, parent, opt)
	if err != nil {
		return nil, fmt.Errorf("create view %s of %s: %w", key, parent, err)
	}
	return mounts, nil
}

// Remove removes containerID's view snapshot without checking its owner, for
// a caller that created it and still holds it; a view already gone is
// success.
func Remove(ctx context.Context, sn snapshots.Snapshotter, containerID string) error {
	return RemoveKey(ctx, sn, Key(containerID))
}

// RemoveKey is Remove for a view of another key (a volume's).
func RemoveKey(ctx context.Context, sn snapshots.Snapshotter, key string) error {
	if err := sn.Remove(ctx, key); err != nil {
		if errdefs.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("remove view %s: %w", key, err)
	}
	return nil
}

// RemoveOwned removes o's view only if its labels still say it is exactly
// o's: a view of another owner (a newer incarnation of the container) is
// left alone and reported with lease.ErrNotOwner. A view already gone is
// success.
func RemoveOwned(ctx context.Context, sn snapshots.Snapshotter, o lease.Owner) error {
	return RemoveOwnedKey(ctx, sn, o, Key(o.Container))
}

// RemoveOwnedKey is RemoveOwned for a view of another key (a volume's).
func RemoveOwnedKey(ctx context.Context, sn snapshots.Snapshotter, o lease.Owner, key string) error {
	info, err := sn.Stat(ctx, key)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("stat view %s: %w", key, err)
	}
	if !o.Owns(info.Labels) {
		return fmt.Errorf("view %s (created %s, not %s): %w", key, info.Labels[lease.LabelCreated], o.Created, lease.ErrNotOwner)
	}
	return RemoveKey(ctx, sn, key)
}

// NeedsManager reports whether mounts need containerd's mount manager:
// mount.All cannot perform "format/", "mkfs/" or "mkdir/" types or templated
// options, which the erofs snapshotter returns for a view of several layers.
func NeedsManager(mounts []mount.Mount) bool {
	for _, m := range mounts {
		if strings.Contains(m.Type, "/") {
			return true
		}
		for _, o := range m.Options {
			if strings.Contains(o, "{{") {
				return true
			}
		}
	}
	return false
}

// ReadOnly returns mounts with "ro" added to each and "rw" removed, so that
// a view is never mounted writable whatever the snapshotter returned. An
// ext4 view (blockfile, devmapper) also gets "noload": its journal is not
// replayed, so a dirty journal cannot block or change a read-only mount.
func ReadOnly(mounts []mount.Mount) []mount.Mount {
	out := make([]mount.Mount, len(mounts))
	for i, m := range mounts {
		opts := slices.DeleteFunc(slices.Clone(m.Options), func(o string) bool { return o == "rw" })
		if !slices.Contains(opts, "ro") {
			opts = append(opts, "ro")
		}
		if (m.Type == "ext4" || m.Type == "ext3") && !slices.Contains(opts, "noload") {
			opts = append(opts, "noload")
		}
		m.Options = opts
		out[i] = m
	}
	return out
}

// Mount mounts the view's mounts read-only on target, creating it, and returns the loop
// devices the mount attached (for blockfile and erofs layers). On error
// nothing stays mounted.
func Mount(mounts []mount.Mount, target string) ([]string, error) {
	return mountAll(ReadOnly(mounts), target)
}

// MountWritable mounts a writable clone's mounts as they are (writable) on
// target, as Mount does.
func MountWritable(mounts []mount.Mount, target string) ([]string, error) {
	return mountAll(mounts, target)
}

func mountAll(mounts []mount.Mount, target string) ([]string, error) {
	if err := os.MkdirAll(target, 0o700); err != nil {
		return nil, fmt.Errorf("create mountpoint %s: %w", target, err)
	}
	if err := mount.All(mounts, target); err != nil {
		_ = mount.UnmountAll(target, unix.MNT_DETACH)
		return nil, fmt.Errorf("mount view on %s: %w", target, err)
	}
	if !slices.ContainsFunc(mounts, attachesLoop) {
		// Nothing to find, and mountinfo is not read: reading it takes
		// time in proportion to the node's mounts (3 ms with 300).
		return nil, nil
	}
	return loopDevices(target)
}

// attachesLoop reports whether mount.All attaches a loop device for m: only
// its "loop" option does.
func attachesLoop(m mount.Mount) bool { return slices.Contains(m.Options, "loop") }

// loopDevices returns the loop devices mounted on target.
func loopDevices(target string) ([]string, error) {
	infos, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(target))
	if err != nil {
		return nil, fmt.Errorf("read mountinfo of %s: %w", target, err)
	}
	var loops []string
	for _, i := range infos {
		if strings.HasPrefix(i.Source, "/dev/loop") {
			loops = append(loops, i.Source)
		}
	}
	return loops, nil
}

// Unmount unmounts everything on target and removes the directory. A target
// already gone is success. The directory is removed with rmdir only, never
// recursively: if something is still mounted there, removal fails instead
// of deleting the view's content.
func Unmount(target string) error {
	if err := mount.UnmountAll(target, unix.MNT_DETACH); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("unmount view %s: %w", target, err)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove mountpoint %s: %w", target, err)
	}
	return nil
}

// DetachLoops detaches the loop devices of a view that are still attached
// to backing files of expected (autoclear normally detaches them on
// unmount). A device now attached to another file is left alone.
func DetachLoops(devices []string, expected func(backing string) bool) error {
	var errs []error
	for _, dev := range devices {
		name := strings.TrimPrefix(dev, "/dev/")
		b, err := os.ReadFile("/sys/block/" + name + "/loop/backing_file")
		if err != nil {
			continue // detached
		}
		if !expected(strings.TrimSpace(string(b))) {
			continue
		}
		if err := mount.DetachLoopDevice(dev); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", dev, err))
		}
	}
	return errors.Join(errs...)
}
