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

// origin says where a View came from, which decides what its teardown may
// take as its own without asking (see teardownRun.gate).
type origin int

const (
	// fromLease: rebuilt from its lease by the sweep, which only knows
	// where the bundle was: a container of the same id may have a new
	// bundle there by now. The zero value: the most careful.
	fromLease origin = iota
	// fromBundle: rebuilt from the container's own bundle by a process that
	// did not set it up (the dead-shim `delete` action).
	fromBundle
	// rolledBack: this process set part of it up and is undoing that; what
	// is on this host is its own, what is in containerd is checked.
	rolledBack
	// setUpHere: this process set the view up completely and still holds
	// it; its lease, views and activations are its own by name.
	setUpHere
)

// Teardown removes what v records: it runs the undo of every setup step, in
// reverse order of setup (setupSteps), each from the state alone and
// whatever failed before it; an object already gone is success; the errors
// are joined. The records of what was done, the state file and snapview's
// directory, go last and only when everything else is gone, so that a
// later attempt (the dead-shim `delete` action, the sweep) can finish a
// teardown that failed.
//
// Ownership is settled in one place, before the first undo (gate): a view
// this process set up removes its objects by name; any other removes an
// object in containerd only while its labels carry the view's owner (the
// container id and creation time), and touches a bundle on this host only
// when the bundle is the view's own. The caller must make sure the
// container no longer runs: runc's delete comes first.
func (l *Lifecycle) Teardown(ctx context.Context, v *View) (retErr error) {
	defer recoverTo(ctx, &retErr, "teardown", v.State.ContainerID)
	t := &teardownRun{
		l: l, v: v, owner: v.owner(), sw: newStopwatch(),
		logger: log.G(ctx).WithFields(log.Fields{"id": v.State.ContainerID, "bundle": v.Bundle}),
	}
	t.gate()
	for _, step := range slices.Backward(setupSteps) {
		if step.undo == nil {
			continue
		}
		t.fail(step.name, step.undo(t, ctx))
		t.sw.lap(step.name)
		if step.point != "" {
			fault.Point(step.point, v.State.ContainerID)
		}
	}
	return t.finish()
}

// teardownRun is one teardown in progress.
type teardownRun struct {
	l      *Lifecycle
	v      *View
	owner  lease.Owner
	logger *log.Entry
	sw     *stopwatch
	errs   []error
	// host: the bundle on this host is the view's own, and its mounts,
	// devices and files may be undone.
	host bool
	// viewsRemoved: every view snapshot of the container (its own and its
	// volumes') was removed, so nothing else is under the lease.
	viewsRemoved bool
}

// gate decides, once, what this teardown may treat as the view's own. On
// this host: the bundle of a view rebuilt from its lease is touched only if
// its state file names exactly that owner; then that state, which records
// everything set up on the host, is the one torn down. In containerd: see
// mine.
func (t *teardownRun) gate() {
	v := t.v
	t.viewsRemoved = true
	switch {
	case v.Bundle == "":
		// Rebuilt without its bundle: nothing on this host is known.
	case v.origin != fromLease:
		t.host = true
	default:
		st, err := bundle.ReadState(v.Bundle)
		switch {
		case err == nil && validate(st, v.State.Namespace, v.State.ContainerID, v.Bundle) == nil && st.Created.Equal(v.State.Created):
			t.host = true
			v.State = st
		case errors.Is(err, bundle.ErrNoState):
			t.logger.Info("snapview: the bundle has no state file of the orphan; its mounts, if any, are left to the leftover-mount sweep")
		default:
			t.logger.WithError(err).Info("snapview: the bundle holds another incarnation of the container, or an unreadable state; left alone")
		}
	}
	if t.host {
		// Everything undone on this host lies below snapview's directory,
		// which must not lead out of the bundle.
		if err := bundle.CheckDir(v.Bundle); err != nil {
			t.fail("check snapview's directory", err)
			t.host = false
		}
	}
}

// mine reports whether an object of the view's names, labelled labels, is
// the view's. A view set up here owns its objects by name and is never
// asked; any other owns what carries its owner: the container id and
// creation time, or, for a view rebuilt from names alone, the container.
func (t *teardownRun) mine(labels map[string]string) bool {
	if t.v.State.Created.IsZero() {
		return t.owner.IsContainer(labels)
	}
	return t.owner.Owns(labels)
}

// checked reports whether the view's objects in containerd must be checked
// against its owner before they are removed.
func (t *teardownRun) checked() bool { return t.v.origin != setUpHere }

// fail records a step's error: an object a newer incarnation holds was
// left alone, which is not an error.
func (t *teardownRun) fail(step string, err error) {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			t.fail(step, e)
		}
		return
	}
	switch {
	case err == nil:
	case errors.Is(err, lease.ErrNotOwner):
		t.logger.WithError(err).WithField("step", step).Warn("snapview: a newer incarnation of the container holds it; left alone")
		t.v.superseded = true
	default:
		t.logger.WithError(err).WithField("step", step).Error("snapview: teardown step failed")
		t.errs = append(t.errs, fmt.Errorf("%s: %w", step, err))
	}
}

// finish removes the records once everything else is gone.
func (t *teardownRun) finish() error {
	v, st := t.v, t.v.State
	if len(t.errs) > 0 {
		return fmt.Errorf("snapview: teardown of %s: %w", st.ContainerID, errors.Join(t.errs...))
	}
	if v.partial {
		t.logger.Warn("snapview: view partly removed; containerd's part is left to a later teardown or the sweep")
		return nil
	}
	if t.host {
		if err := bundle.RemoveState(v.Bundle); err != nil {
			return fmt.Errorf("snapview: teardown of %s: remove state: %w", st.ContainerID, err)
		}
		if err := os.Remove(bundle.Dir(v.Bundle)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("snapview: teardown of %s: remove %s: %w", st.ContainerID, bundle.Dir(v.Bundle), err)
		}
	}
	t.logger.WithFields(t.sw.fields).WithFields(log.Fields{"key": st.ViewKey, "lease": st.LeaseID}).Info("snapview: view removed")
	return nil
}

// The undo of each setup step, in the order of setupSteps.

// removeLease deletes the lease, with a synchronous garbage collection only
// when a view could not be removed, so that the collector takes what the
// lease alone held; after the views' removal nothing else is under it.
func (t *teardownRun) removeLease(ctx context.Context) error {
	st := t.v.State
	if st.LeaseID == "" {
		return nil
	}
	lm, err := t.l.backend.Leases()
	if err != nil {
		return err
	}
	cctx, cancel := callContext(ctx)
	defer cancel()
	if t.checked() {
		return lease.Delete(cctx, lm, t.owner, !t.viewsRemoved)
	}
	return lease.Remove(cctx, lm, st.ContainerID, !t.viewsRemoved)
}

// removeView removes the view snapshot.
func (t *teardownRun) removeView(ctx context.Context) error {
	st := t.v.State
	if st.ViewKey == "" {
		return nil
	}
	return t.removeViewKey(ctx, st.ViewKey)
}

// removeViewKey removes view snapshot key of the view's snapshotter.
func (t *teardownRun) removeViewKey(ctx context.Context, key string) error {
	sn, err := t.l.backend.Snapshotter(t.v.State.Snapshotter)
	if err == nil {
		cctx, cancel := callContext(ctx)
		if t.checked() {
			err = view.RemoveOwnedKey(cctx, sn, t.owner, key)
		} else {
			err = view.RemoveKey(cctx, sn, key)
		}
		cancel()
	}
	t.viewsRemoved = t.viewsRemoved && (err == nil || errors.Is(err, lease.ErrNotOwner))
	return err
}

// deactivateView removes the mount-manager activation of the view.
func (t *teardownRun) deactivateView(ctx context.Context) error {
	return t.deactivate(ctx, t.v.State.Activation)
}

// deactivateRootfs removes the activation snapview made of the
// container's rootfs mounts. It has the task's name, which containerd gives
// the activation it makes itself: one without snapview's labels is
// containerd's, and left to it.
func (t *teardownRun) deactivateRootfs(ctx context.Context) error {
	return t.deactivate(ctx, t.v.State.RootfsActivation)
}

// deactivate removes mount-manager activation name ("" for none) if it is
// the view's (mine), else leaves it: one of another incarnation is
// reported with lease.ErrNotOwner, one that is not snapview's at all is
// containerd's. An activation already gone is success.
func (t *teardownRun) deactivate(ctx context.Context, name string) error {
	if name == "" {
		return nil
	}
	mm, err := t.l.backend.Mounts()
	if err != nil {
		return err
	}
	cctx, cancel := callContext(ctx)
	defer cancel()
	if t.checked() {
		info, err := mm.Info(cctx, name)
		if errdefs.IsNotFound(err) || errdefs.IsNotImplemented(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("inspect mount activation %s: %w", name, err)
		}
		if !t.mine(info.Labels) {
			if t.owner.IsContainer(info.Labels) {
				return fmt.Errorf("mount activation %s (created %s, not %s): %w", name, info.Labels[lease.LabelCreated], t.owner.Created, lease.ErrNotOwner)
			}
			t.logger.WithFields(log.Fields{"activation": name, "labels": info.Labels}).Debug("snapview: the mount activation is not snapview's; left to containerd")
			return nil
		}
	}
	if err := mm.Deactivate(cctx, name); err != nil && !errdefs.IsNotFound(err) && !errdefs.IsNotImplemented(err) {
		return fmt.Errorf("deactivate %s: %w", name, err)
	}
	t.logger.WithField("activation", name).Debug("snapview: mount activation removed")
	return nil
}

// unmountView unmounts the view and releases the loop devices its mount
// attached.
func (t *teardownRun) unmountView(context.Context) error {
	st := t.v.State
	if !t.host || st.Mountpoint == "" {
		return nil
	}
	if err := unmountAt(st.Mountpoint, st.LoopDevices, st.Mounts); err != nil {
		return err
	}
	t.logger.WithField("target", st.Mountpoint).Debug("snapview: view unmounted")
	return nil
}

// unmountAt unmounts what is mounted at target (removing the directory,
// never recursively) and detaches the loop devices the mount of mounts
// attached, while they are still bound to one of their sources.
func unmountAt(target string, loops []string, mounts []bundle.Mount) error {
	err := view.Unmount(target)
	return errors.Join(err, view.DetachLoops(loops, func(backing string) bool {
		return slices.ContainsFunc(mounts, func(m bundle.Mount) bool { return m.Source == backing })
	}))
}

// releaseDevice closes the shim's reference to the writable disk and
// detaches its loop device while it is still bound to the recorded file.
func (t *teardownRun) releaseDevice(context.Context) error {
	err := t.v.device.Close()
	if b := t.v.State.Block; t.host && b != nil && b.Loop != nil {
		err = errors.Join(err, t.detach(b.Device, *b.Loop))
	}
	return err
}

// releaseLayers does the same for each read-only layer disk.
func (t *teardownRun) releaseLayers(context.Context) error {
	var errs []error
	for _, d := range t.v.layers {
		errs = append(errs, d.Close())
	}
	if b := t.v.State.Block; t.host && b != nil {
		for _, d := range slices.Backward(b.Layers) {
			errs = append(errs, t.detach(d.Device, d.Loop))
		}
	}
	return errors.Join(errs...)
}

// detach detaches loop device dev if it is still bound to l's file; a
// device whose number was reused is left alone.
func (t *teardownRun) detach(dev string, l bundle.Loop) error {
	err := blockdev.Detach(dev, blockdev.Backing{Path: l.BackingFile, Dev: l.BackingDev, Ino: l.BackingIno})
	if errors.Is(err, blockdev.ErrOtherBacking) {
		t.logger.WithError(err).Warn("snapview: loop device was reused by another file; left alone")
		return nil
	}
	return err
}

// removeMonitor removes the block-mode monitor rootfs's upper and work
// directories (where a release before kept them too), unless the overlay
// still looks mounted: removing an upper directory under a live overlay
// would pull files from under a container.
func (t *teardownRun) removeMonitor(context.Context) error {
	if !t.host {
		return nil
	}
	upper, work, err := bundle.MonitorDirs(t.v.Bundle)
	if err != nil {
		return err
	}
	legacyUpper, legacyWork := bundle.LegacyMonitorDirs(t.v.Bundle)
	err = errors.Join(removeMonitorDirs(t.v.Bundle, upper, work), removeMonitorDirs(t.v.Bundle, legacyUpper, legacyWork))
	if dir := filepath.Dir(upper); err == nil && dir != bundle.Dir(t.v.Bundle) {
		err = removeFile(dir)
	}
	return err
}

func removeMonitorDirs(bundlePath, upper, work string) error {
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

// removeParams removes the params file.
func (t *teardownRun) removeParams(context.Context) error {
	if !t.host {
		return nil
	}
	return removeFile(bundle.ParamsFile(t.v.Bundle))
}

func removeFile(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
