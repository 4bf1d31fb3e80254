package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"

	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/fault"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/view"
)

// Teardown removes what v records, in reverse order of setup: on this host
// the block device (closed, and a loop device still bound to the recorded
// backing inode detached), the monitor rootfs's upper and work directories,
// the params file and the view's mount; in containerd the mount-manager
// activation, the view snapshot and the lease. The lease is deleted with a
// synchronous garbage collection only when the view could not be removed,
// so that the collector takes what the lease alone held. The state file and
// snapview's directory go last, and only when everything else is gone, so
// that a later attempt (the dead-shim `delete` action, the sweep) can
// finish a teardown that failed.
//
// Every step runs; an object already gone is success; the errors are
// joined. The caller must make sure the container no longer runs: runc's
// delete comes first.
func (l *Lifecycle) Teardown(ctx context.Context, v *View) (retErr error) {
	defer recoverTo(ctx, &retErr, "teardown", v.State.ContainerID)
	st := v.State
	logger := log.G(ctx).WithFields(log.Fields{"id": st.ContainerID, "bundle": v.Bundle})
	sw := newStopwatch()
	var errs []error
	fail := func(step string, err error) {
		if errors.Is(err, lease.ErrNotOwner) {
			logger.WithError(err).WithField("step", step).Warn("snapview: a newer incarnation of the container holds it; left alone")
			v.superseded = true
			return
		}
		if err != nil {
			logger.WithError(err).WithField("step", step).Error("snapview: teardown step failed")
			errs = append(errs, fmt.Errorf("%s: %w", step, err))
		}
	}

	// On this host (a view rebuilt without its bundle has nothing here).
	fail("close block device", v.device.Close())
	for _, d := range append(slices.Clone(v.layers), v.volumeDisks...) {
		fail("close disk", d.Close())
	}
	if v.Bundle != "" {
		v.teardownLocal(logger, fail)
	}
	sw.lap("unmount")
	fault.Point(PointTeardownUnmounted, st.ContainerID)

	// In containerd.
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	owner := v.owner()
	if st.RootfsActivation != "" {
		var mine func(map[string]string) bool // owned: known to be ours
		switch {
		case v.owned:
		case st.Created.IsZero(): // rebuilt from the names alone
			mine = owner.IsContainer
		default:
			mine = owner.Owns
		}
		fail("deactivate rootfs mounts", l.deactivate(cctx, st.RootfsActivation, st.ContainerID, mine))
	}
	if st.Activation != "" {
		if mm, err := l.backend.Mounts(); err != nil {
			fail("deactivate", err)
		} else if err := mm.Deactivate(cctx, st.Activation); err != nil && !errdefs.IsNotFound(err) && !errdefs.IsNotImplemented(err) {
			fail("deactivate", fmt.Errorf("deactivate %s: %w", st.Activation, err))
		}
	}
	viewRemoved := l.removeVolumes(cctx, v, fail)
	if st.ViewKey != "" {
		sn, err := l.backend.Snapshotter(st.Snapshotter)
		if err == nil {
			if v.owned {
				err = view.Remove(cctx, sn, st.ContainerID)
			} else {
				err = view.RemoveOwned(cctx, sn, owner)
			}
		}
		viewRemoved = viewRemoved && (err == nil || errors.Is(err, lease.ErrNotOwner))
		fail("remove view", err)
		sw.lap("remove")
		fault.Point(PointTeardownRemoved, st.ContainerID)
	}
	if st.LeaseID != "" {
		// After the view's explicit removal nothing else is under the
		// lease, and a collection would only add latency.
		syncGC := !viewRemoved
		lm, err := l.backend.Leases()
		if err == nil {
			if v.owned {
				err = lease.Remove(cctx, lm, st.ContainerID, syncGC)
			} else {
				err = lease.Delete(cctx, lm, owner, syncGC)
			}
		}
		fail("delete lease", err)
		sw.lap("lease")
	}

	// The records of what was done go last.
	if len(errs) > 0 {
		return fmt.Errorf("snapview: teardown of %s: %w", st.ContainerID, errors.Join(errs...))
	}
	if v.partial {
		logger.Warn("snapview: view partly removed; containerd's part is left to a later teardown or the sweep")
		return nil
	}
	if v.Bundle != "" {
		if err := bundle.RemoveState(v.Bundle); err != nil {
			return fmt.Errorf("snapview: teardown of %s: remove state: %w", st.ContainerID, err)
		}
		if err := os.Remove(bundle.Dir(v.Bundle)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("snapview: teardown of %s: remove %s: %w", st.ContainerID, bundle.Dir(v.Bundle), err)
		}
	}
	logger.WithFields(sw.fields).WithFields(log.Fields{"key": st.ViewKey, "lease": st.LeaseID}).Info("snapview: view removed")
	return nil
}

// teardownLocal undoes what setup did on this host, in reverse order: the
// loop device (if still bound to the recorded backing inode), the monitor
// rootfs's directories, the params file, the view's mount.
func (v *View) teardownLocal(logger *log.Entry, fail func(string, error)) {
	st := v.State
	if err := bundle.CheckDir(v.Bundle); err != nil {
		fail("check snapview's directory", err)
		return
	}
	detach := func(what, dev string, l bundle.Loop) {
		err := blockdev.Detach(dev, blockdev.Backing{Path: l.BackingFile, Dev: l.BackingDev, Ino: l.BackingIno})
		if errors.Is(err, blockdev.ErrOtherBacking) {
			logger.WithError(err).Warn("snapview: loop device was reused by another file; left alone")
			err = nil
		}
		fail(what, err)
	}
	v.teardownVolumes(fail, detach)
	if b := st.Block; b != nil {
		for _, d := range slices.Backward(b.Layers) {
			detach("detach layer disk", d.Device, d.Loop)
		}
		if b.Loop != nil {
			detach("detach loop device", b.Device, *b.Loop)
		}
	}
	fail("remove monitor rootfs", removeMonitorDirs(v.Bundle))
	fail("remove params file", removeFile(bundle.ParamsFile(v.Bundle)))
	if st.Mountpoint == "" {
		return
	}
	fail("unmount view", view.Unmount(st.Mountpoint))
	fail("detach view loop devices", view.DetachLoops(st.LoopDevices, func(backing string) bool {
		for _, m := range st.Mounts {
			if m.Source == backing {
				return true
			}
		}
		return false
	}))
	logger.WithField("target", st.Mountpoint).Debug("snapview: view unmounted")
}

// deactivate removes the mount-manager activation of container id's rootfs
// that snapview made: as it is when mine is nil (this process made it),
// else only if mine says its labels are snapview's for this container, so
// that an activation containerd made under the same name is containerd's
// to remove. An activation already gone is success.
func (l *Lifecycle) deactivate(ctx context.Context, name, id string, mine func(labels map[string]string) bool) error {
	mm, err := l.backend.Mounts()
	if err != nil {
		return err
	}
	if mine != nil {
		info, err := mm.Info(ctx, name)
		if errdefs.IsNotFound(err) || errdefs.IsNotImplemented(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("inspect mount activation %s: %w", name, err)
		}
		if !mine(info.Labels) {
			log.G(ctx).WithFields(log.Fields{"id": id, "activation": name, "labels": info.Labels}).
				Debug("snapview: the rootfs mount activation is not snapview's; left to containerd")
			return nil
		}
	}
	if err := mm.Deactivate(ctx, name); err != nil && !errdefs.IsNotFound(err) && !errdefs.IsNotImplemented(err) {
		return fmt.Errorf("deactivate %s: %w", name, err)
	}
	log.G(ctx).WithFields(log.Fields{"id": id, "activation": name}).Debug("snapview: rootfs mounts deactivated")
	return nil
}

// removeMonitorDirs removes the block-mode monitor rootfs's upper and work
// directories, unless the overlay still looks mounted: removing an upper
// directory under a live overlay would pull files from under a container.
func removeMonitorDirs(bundlePath string) error {
	upper, work := bundle.UpperDir(bundlePath), bundle.WorkDir(bundlePath)
	if _, err := os.Lstat(upper); errors.Is(err, fs.ErrNotExist) {
		if _, err := os.Lstat(work); errors.Is(err, fs.ErrNotExist) {
			return nil
		}
	}
	root := filepath.Join(bundlePath, "rootfs")
	if mounted, err := mountinfo.Mounted(root); err == nil && mounted {
		return fmt.Errorf("the monitor rootfs is still mounted at %s", root)
	}
	var errs []error
	for _, d := range []string{upper, work} {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func removeFile(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
