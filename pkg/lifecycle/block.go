package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/rootfs"
)

// Block mode's steps: the writable disk (made if new, for a layered
// rootfs), the read-only layer disks of a layered rootfs, and the monitor
// rootfs the container runs from. Nothing here mounts a disk.

// formatImage creates and formats a layered rootfs's writable image when
// it does not exist yet, as containerd's mkfs transformer would, but
// without mounting it: the overlay's upper and work directories are put
// in by mkfs. An existing image must hold an ext filesystem.
func (s *setupRun) formatImage(ctx context.Context) error {
	l := s.p.layered
	img := l.Writable.Source
	if s.v.State.Restore != nil {
		return nil // the saved disk, restored: never parsed on the host
	}
	if l.Mkfs == nil {
		if err := blockdev.CheckImage(img); err != nil {
			return fmt.Errorf("snapview: the container's writable disk: %w", err)
		}
		return nil
	}
	spec := blockdev.ImageSpec{FSType: l.FSType, Size: l.Mkfs.Size, UUID: l.Mkfs.UUID}
	for _, d := range l.Dirs {
		spec.Dirs = append(spec.Dirs, blockdev.Dir{Path: d.Path, Mode: d.Mode, UID: d.UID, GID: d.GID})
	}
	created, err := blockdev.CreateImage(ctx, img, spec)
	if err != nil {
		return fmt.Errorf("snapview: the container's writable disk: %w", err)
	}
	if !created {
		if err := blockdev.CheckImage(img); err != nil {
			return fmt.Errorf("snapview: the container's writable disk: %w", err)
		}
	}
	s.logger.WithFields(log.Fields{"image": img, "fstype": l.FSType, "size": l.Mkfs.Size, "created": created}).
		Info("snapview: writable disk image ready, never mounted on the host")
	return nil
}

// attachDevice gets block mode's writable disk and records it.
func (s *setupRun) attachDevice(context.Context) error {
	st := s.v.State
	if err := s.v.attach(s.p, s.p.req.Config.Block.Device); err != nil {
		return err
	}
	s.logger.WithFields(log.Fields{"device": st.Block.Device, "major": st.Block.Major, "minor": st.Block.Minor, "source": st.Block.Rootfs.Source}).
		Info("snapview: block device ready for the container")
	return nil
}

// attach gets the writable disk of a block-mode container: the
// device-mapper node as it is, or a loop device attached to the blockfile
// image or the layered rootfs's writable image, held open by this process.
// It records the device in the state as the container will see it.
func (v *View) attach(p *Plan, containerPath string) error {
	m, loop := p.writableMount()
	var (
		d   *blockdev.Device
		err error
	)
	if loop {
		// From here on the guest may write it: no host mount of it, ever.
		if err := blockdev.MarkGuestWritten(m.Source, p.req.ID); err != nil {
			log.L.WithError(err).WithField("id", p.req.ID).Warn("snapview: the writable disk cannot be marked as a guest's; a later task of the container in view or off mode would not be refused")
		}
		d, err = blockdev.Attach(m.Source, false)
	} else {
		d, err = blockdev.Resolve(m.Source)
	}
	if err != nil {
		return fmt.Errorf("snapview: block device of the rootfs (%s): %w", m.Source, err)
	}
	v.device = d
	st := v.State
	st.Block = &bundle.Block{
		Rootfs:        bundle.MountOf(m),
		Device:        d.Path,
		Major:         d.Major,
		Minor:         d.Minor,
		MonitorRootfs: p.monitor,
	}
	if d.Backing != nil {
		st.Block.Loop = &bundle.Loop{BackingFile: d.Backing.Path, BackingDev: d.Backing.Dev, BackingIno: d.Backing.Ino}
	}
	st.Rootfs = rootfs.BlockParams(m, d.Path, containerPath)
	return nil
}

// writableMount returns the mount of block mode's writable disk, and
// whether it needs a loop device.
func (p *Plan) writableMount() (rootfs.Mount, bool) {
	if p.layered != nil {
		return p.layered.Writable, true
	}
	return p.block.Mount, p.block.Loop
}

// attachLayers attaches each read-only disk of a layered rootfs (its erofs
// layer files, then the blob files of a merged bottom layer) to a
// read-only loop device, held open by this process, and records each as it
// is attached. The rootfs params then describe every disk for the guest.
func (s *setupRun) attachLayers(context.Context) error {
	l, st := s.p.layered, s.v.State
	st.Block.Layers = []bundle.Disk{}
	if err := attachDisks(l.Disks(), rootfs.LayerDevice, &st.Block.Layers, &s.v.layers); err != nil {
		return fmt.Errorf("snapview: the rootfs's layers: %w", err)
	}
	st.Rootfs = l.Params([2]string{st.Block.Device, s.p.req.Config.Block.Device}, diskPlaces(st.Block.Layers))
	s.logger.WithFields(log.Fields{"layers": len(st.Block.Layers), "upperdir": l.UpperDir, "workdir": l.WorkDir}).Info("snapview: layer disks ready for the container")
	return nil
}

// prepareMonitor prepares block mode's monitor rootfs, which runc mounts
// as the container's root.
func (s *setupRun) prepareMonitor(context.Context) error {
	b := s.v.Bundle
	var err error
	if s.v.Rootfs, err = monitorRootfs(b, s.v.State.Mountpoint, s.p.monitor, s.p.monitorFrom); err != nil {
		return err
	}
	s.logger.WithFields(log.Fields{"monitor": s.p.monitor, "overlay": s.v.Rootfs[0].Options}).Info("snapview: monitor rootfs ready for runc")
	return nil
}

// monitorRootfs prepares the block-mode container's root: an overlay whose
// lower layer is the view (monitor "view") or the host directory monitor
// (from the setting monitorFrom, named in errors), and whose upper and work
// directories live in the task's working directory, on containerd's root
// filesystem (bundle.MonitorDir). runc mounts it in place of the
// container's own rootfs; runc can create its mount targets in it, and its
// source is never written.
func monitorRootfs(bundlePath, viewMount, monitor, monitorFrom string) ([]rootfs.Mount, error) {
	lower := viewMount
	if monitor != config.MonitorRootfsView {
		fi, err := os.Stat(monitor)
		if err != nil {
			return nil, fmt.Errorf("snapview: %s: %w", monitorFrom, err)
		}
		if !fi.IsDir() {
			return nil, fmt.Errorf("snapview: %s is not a directory", monitorFrom)
		}
		lower = monitor
	}
	upper, work, err := bundle.MonitorDirs(bundlePath)
	if err != nil {
		return nil, fmt.Errorf("snapview: the monitor rootfs: %w", err)
	}
	if err := os.Mkdir(filepath.Dir(upper), 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("snapview: create the monitor rootfs's directory: %w", err)
	}
	// The upper directory is the root directory the container sees.
	if err := os.Mkdir(upper, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("snapview: create the monitor rootfs upper dir: %w", err)
	}
	if err := os.Mkdir(work, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("snapview: create the monitor rootfs work dir: %w", err)
	}
	return []rootfs.Mount{{
		Type:    "overlay",
		Source:  "overlay",
		Options: []string{"lowerdir=" + lower, "upperdir=" + upper, "workdir=" + work},
	}}, nil
}
