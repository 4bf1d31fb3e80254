package lifecycle

import (
	"context"
	"fmt"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/snapview/snapview/params"
	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/image"
	"github.com/snapview/snapview/pkg/rootfs"
	"github.com/snapview/snapview/pkg/snapshot/record"
)

// Snapshot volumes: a volume of a directory snapshot, {"snapshot":"<id>"},
// is found by its id alone in the container's namespace (its kind, its
// image and where it is unpacked come from snapview's own record), and is
// read-only like an image volume, or, with "writable": true, a writable
// clone: an active snapshot of it under the container's lease, bound
// read-write (view mode) or handed to the guest as a new writable disk over
// its read-only layer disks (block mode), discarded with the container.

// snapshotSource returns the snapshot a volume of directory snapshot
// v.Snapshot views or clones: its layers' top snapshot in sn. Each way it
// can fail says what to do; no wrong id gives an empty volume.
func (l *Lifecycle) snapshotSource(ctx context.Context, cs content.Provider, sn snapshots.Snapshotter, p *Plan, v annotations.Volume) (string, error) {
	r := p.req
	cctx, cancel := callContext(ctx)
	defer cancel()
	rec, err := record.Lookup(cctx, l.backend.Image, r.Namespace, v.Snapshot)
	if err != nil {
		return "", err
	}
	if rec.Kind != record.KindDirectory {
		return "", fmt.Errorf("snapshot %s is a %s snapshot, not a directory snapshot: a container snapshot restores as a container's image (%s), not as a volume", rec.ID, rec.Kind, record.ImageName(rec.ID))
	}
	ri, err := image.Resolve(cctx, cs, rec.Target, nil)
	if err != nil {
		return "", fmt.Errorf("snapshot %s: %w", rec.ID, err)
	}
	if _, err := sn.Stat(cctx, ri.ChainID); err != nil {
		if errdefs.IsNotFound(err) {
			return "", fmt.Errorf("snapshot %s is not unpacked in snapshotter %s, the container's (it was taken in %s): take it in a container of that snapshotter, or pull it there (snapviewctl snapshot pull --snapshotter %s)",
				rec.ID, p.snapshotter, rec.Snapshotter, p.snapshotter)
		}
		return "", fmt.Errorf("snapshot %s: stat %s in %s: %w", rec.ID, ri.ChainID, p.snapshotter, err)
	}
	log.G(ctx).WithFields(log.Fields{"id": r.ID, "volume": v.Name, "snapshot": rec.ID, "kind": rec.Kind, "form": rec.Form, "source": rec.Source, "dir": rec.Dir, "size": rec.Size, "writable": v.Writable}).
		Info("snapview: snapshot restored as a volume")
	return ri.ChainID, nil
}

// checkSnapshotVolume refuses a snapshot volume the configuration does not
// allow: [snapshots] restore = false refuses them all.
func (p *Plan) checkSnapshotVolume(v annotations.Volume) error {
	cfg := p.req.Config
	if !cfg.Snapshots.Restore {
		return fmt.Errorf("snapview: annotation %s%s: snapshot %s: restoring snapshots is off ([snapshots] restore = false in %s)", annotations.VolumePrefix, v.Name, v.Snapshot, cfg.Source)
	}
	return nil
}

// attachWritableVolume readies volume i, a writable clone, for a block-mode
// container: its writable disk (a layered clone's new image, created and
// formatted as a layered rootfs's is, never mounted; a blockfile clone's
// own image), marked as a guest's and attached read-write, and its
// read-only layer disks, if any.
func (s *setupRun) attachWritableVolume(ctx context.Context, i int) error {
	vol := &s.v.State.Volumes[i]
	ms := s.volumeMounts[i]
	var (
		file   string
		format *rootfs.Layered
		m      rootfs.Mount
	)
	if rootfs.IsLayered(ms) {
		l, err := rootfs.DetectLayered(ms)
		if err != nil {
			return fmt.Errorf("snapview: volume %s: a writable clone in block mode: %w", vol.Name, err)
		}
		format, file, m = &l, l.Writable.Source, l.Writable
	} else {
		src, err := rootfs.DetectBlock(ms)
		if err != nil {
			return fmt.Errorf("snapview: volume %s: block mode hands a writable clone to the guest as a disk, but its snapshot in snapshotter %s is not a disk image (%w); use the blockfile or erofs snapshotter", vol.Name, s.p.snapshotter, err)
		}
		if !src.Loop {
			return fmt.Errorf("snapview: volume %s: block mode hands a writable clone to the guest as a disk, but its snapshot in snapshotter %s is a block device, not a disk image file the shim can attach; use the blockfile or erofs snapshotter", vol.Name, s.p.snapshotter)
		}
		file, m = src.Mount.Source, src.Mount
	}
	root, err := s.l.snapshotterRoot(ctx, s.p.snapshotter)
	if err != nil {
		return fmt.Errorf("snapview: volume %s: the root of snapshotter %s: %w", vol.Name, s.p.snapshotter, err)
	}
	if root == "" {
		return fmt.Errorf("snapview: volume %s: snapshotter %s exports no root directory (a proxy snapshotter), and snapview attaches disk images only inside one", vol.Name, s.p.snapshotter)
	}
	if err := within(root, file); err != nil {
		return fmt.Errorf("snapview: volume %s: its writable disk image %s %w, outside snapshotter %s's root %s", vol.Name, file, err, s.p.snapshotter, root)
	}
	if format != nil && format.Mkfs != nil {
		spec := blockdev.ImageSpec{FSType: format.FSType, Size: format.Mkfs.Size, UUID: format.Mkfs.UUID}
		for _, d := range format.Dirs {
			spec.Dirs = append(spec.Dirs, blockdev.Dir{Path: d.Path, Mode: d.Mode, UID: d.UID, GID: d.GID})
		}
		if _, err := blockdev.CreateImage(ctx, file, spec); err != nil {
			return fmt.Errorf("snapview: volume %s: its writable disk: %w", vol.Name, err)
		}
	}
	if err := blockdev.MarkGuestWritten(file, s.p.req.ID); err != nil {
		s.logger.WithError(err).WithField("volume", vol.Name).Warn("snapview: the writable clone's disk cannot be marked as a guest's")
	}
	d, err := blockdev.Attach(file, false)
	if err != nil {
		return fmt.Errorf("snapview: volume %s: its writable disk: %w", vol.Name, err)
	}
	s.v.volumeDisks = append(s.v.volumeDisks, d)
	vol.WritableDisk = &bundle.Disk{Path: rootfs.VolumeWritableDevice(vol.Name), Device: d.Path, Major: d.Major, Minor: d.Minor,
		Loop: bundle.Loop{BackingFile: d.Backing.Path, BackingDev: d.Backing.Dev, BackingIno: d.Backing.Ino}}
	w := &params.WritableDisk{Device: vol.WritableDisk.Path, FSType: m.Type, Source: d.Path, Options: rootfs.GuestOptions(m.Options)}
	vol.Disks = []bundle.Disk{}
	if format != nil {
		w.FSType, w.UpperDir, w.WorkDir = format.FSType, format.UpperDir, format.WorkDir
		if err := attachDisks(format.Disks(), func(j int) string { return rootfs.VolumeDevice(vol.Name, j) }, &vol.Disks, &s.v.volumeDisks); err != nil {
			return fmt.Errorf("snapview: volume %s: %w", vol.Name, err)
		}
		s.volumeLayers[i] = format.Layers
	}
	s.writable[vol.Name] = w
	s.logger.WithFields(log.Fields{"volume": vol.Name, "snapshot": vol.Snapshot, "device": d.Path, "disks": len(vol.Disks)}).Info("snapview: writable clone's disks ready for the container")
	return nil
}

// writableDiskCount is how many read-only disks (loop devices) the mounts
// ms of a writable clone bring: its erofs layers, in block mode for the
// guest, in view mode for containerd's mount manager.
func writableDiskCount(ms []rootfs.Mount) int {
	if l, err := rootfs.DetectLayered(ms); err == nil {
		return l.DiskCount()
	}
	n := 0
	for _, m := range ms {
		if m.Type == "erofs" {
			n++
		}
	}
	return n
}
