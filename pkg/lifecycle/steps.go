package lifecycle

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/snapview/snapview/params"
	"github.com/snapview/snapview/pkg/boot"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/rootfs"
	"github.com/snapview/snapview/pkg/view"
)

// setupStep is one side effect of a setup (see setup) and its undo.
type setupStep struct {
	name string
	// applies reports whether the step has work in this setup; nil: always.
	applies func(s *setupRun) bool
	// do records in s.v.State what it is about to do, then does it.
	do func(s *setupRun, ctx context.Context) error
	// undo takes back what do did, from what the state records (a
	// process that did not set the view up has nothing else) and what
	// this process still holds; it does nothing when the state records
	// nothing of the step. Teardown runs the undos in reverse order of the
	// steps; nil: nothing to undo, or undone with the records (the state
	// file and snapview's directory, which go last).
	undo func(t *teardownRun, ctx context.Context) error
	// point, when set, is a crash point of the fault build right after
	// the undo.
	point string
}

// setupSteps are the steps of every setup, in order. A new capability (a
// disk, a volume) is a new step here, with what its undo needs recorded in
// the state before it acts: Teardown is this list run backwards.
var setupSteps = []setupStep{
	{name: StepDir, do: (*setupRun).makeDir},
	{name: StepRootfs, applies: (*setupRun).claimRootfs, do: (*setupRun).activateRootfs, undo: (*teardownRun).deactivateRootfs},
	{name: StepDerive, applies: (*setupRun).fromLayers, do: (*setupRun).deriveView},
	{name: StepLease, applies: (*setupRun).needsLease, do: (*setupRun).acquireLease, undo: (*teardownRun).removeLease},
	{name: StepView, applies: (*setupRun).leasedView, do: (*setupRun).createView, undo: (*teardownRun).removeView, point: PointTeardownRemoved},
	{name: StepActivate, applies: (*setupRun).viewNeedsManager, do: (*setupRun).activateView, undo: (*teardownRun).deactivateView},
	{name: StepMount, applies: (*setupRun).withView, do: (*setupRun).mountView, undo: (*teardownRun).unmountView, point: PointTeardownUnmounted},
	{name: StepRestore, applies: (*setupRun).restoring, do: (*setupRun).restoreDisk, undo: (*teardownRun).undoRestore},
	{name: StepFormat, applies: (*setupRun).layered, do: (*setupRun).formatImage},
	{name: StepDevice, applies: (*setupRun).blockMode, do: (*setupRun).attachDevice, undo: (*teardownRun).releaseDevice},
	{name: StepLayers, applies: (*setupRun).layered, do: (*setupRun).attachLayers, undo: (*teardownRun).releaseLayers},
	{name: StepVolumeViews, applies: (*setupRun).withVolumes, do: (*setupRun).createVolumeViews, undo: (*teardownRun).removeVolumeViews},
	{name: StepVolumes, applies: (*setupRun).withVolumes, do: (*setupRun).prepareVolumes, undo: (*teardownRun).releaseVolumes},
	{name: StepArtifacts, applies: (*setupRun).withView, do: (*setupRun).resolveArtifacts},
	{name: StepMonitor, applies: (*setupRun).blockMode, do: (*setupRun).prepareMonitor, undo: (*teardownRun).removeMonitor},
	{name: StepState, do: (*setupRun).writeState},
	{name: StepParams, applies: (*setupRun).withParams, do: (*setupRun).writeParams, undo: (*teardownRun).removeParams},
	{name: StepConfig, applies: (*setupRun).withView, do: (*setupRun).patchConfig},
}

// setupRun is one setup in progress: the plan, the view it builds, and
// what one step hands the next.
type setupRun struct {
	l      *Lifecycle
	p      *Plan
	v      *View
	lookup func(context.Context) (*Plan, error)
	logger *log.Entry
	sw     *stopwatch
	owner  lease.Owner

	// mounts are the view's mounts: as the snapshotter returned them, then
	// as left to mount after the mount manager's activation.
	mounts []mount.Mount
	// binds are the OCI mounts of the container's binds.
	binds []specs.Mount
	// paramsSource is the host file bound at /.snapview/params.json, or ""
	// when the container gets none.
	paramsSource string
	// volumeMounts are each volume's view mounts; volumeLayers, in block
	// mode, each volume's disks as found in them.
	volumeMounts [][]mount.Mount
	volumeLayers [][]rootfs.Layer
	// writable describes, by volume name, the writable part of each
	// writable clone, for the params.
	writable map[string]*params.WritableDisk
	// derived: the view's mounts were taken from the rootfs's layers
	// (StepDerive), and no view snapshot is made.
	derived bool
}

func (s *setupRun) withView() bool         { return s.p.Skip == "" }
func (s *setupRun) blockMode() bool        { return s.p.blockMode() }
func (s *setupRun) layered() bool          { return s.p.layered != nil }
func (s *setupRun) claimRootfs() bool      { return s.p.claimRootfs }
func (s *setupRun) viewNeedsManager() bool { return view.NeedsManager(s.mounts) }
func (s *setupRun) withParams() bool       { return s.paramsSource != "" }
func (s *setupRun) withVolumes() bool      { return len(s.p.volumes) > 0 }
func (s *setupRun) fromLayers() bool       { return s.p.source == params.SourceLayers }
func (s *setupRun) leasedView() bool       { return s.withView() && !s.derived }

// needsLease: a leased view, or the volumes' views (a derived view has
// neither snapshot nor lease of its own).
func (s *setupRun) needsLease() bool { return s.leasedView() || s.withView() && s.withVolumes() }

// callContext bounds one call into containerd. A mount-manager activation
// is not bounded by it: it mounts (and for a layered rootfs formats) as
// much as the layers ask, as containerd's own activation of a task's
// rootfs does within the task's create, which no bound of its own limits.
func callContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, callTimeout)
}

// makeDir creates snapview's directory in the bundle: from here on the
// bundle shows that a view was started.
func (s *setupRun) makeDir(context.Context) error {
	if err := bundle.MakeDir(s.v.Bundle); err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	return nil
}

// acquireLease creates the lease the view is created under. With a lookup
// still to do, the two overlap, and each is timed on its own too.
func (s *setupRun) acquireLease(ctx context.Context) error {
	st, id := s.v.State, s.p.req.ID
	lm, err := s.l.backend.Leases()
	if err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	st.LeaseID = lease.ID(id)
	acquire := func() error {
		cctx, cancel := callContext(ctx)
		defer cancel()
		if _, err := lease.Acquire(cctx, lm, s.owner); err != nil {
			return fmt.Errorf("snapview: %w", err)
		}
		return nil
	}
	if s.lookup == nil {
		return acquire()
	}
	leased := make(chan error, 1)
	var leaseTook time.Duration
	go func() {
		var err error
		defer func() { leased <- err }()
		defer recoverTo(ctx, &err, "lease", id)
		t0 := time.Now()
		err = acquire()
		leaseTook = time.Since(t0)
	}()
	t0 := time.Now()
	q, lerr := s.lookup(ctx)
	s.sw.fields["lookup_only_us"] = time.Since(t0).Microseconds()
	aerr := <-leased
	s.sw.fields["lease_only_us"] = leaseTook.Microseconds()
	switch {
	case lerr != nil:
		return lerr
	case q.Skip != "":
		return skipped{reason: q.Skip}
	case aerr != nil:
		return aerr
	}
	s.p = q
	st.Snapshotter, st.Parent = q.snapshotter, q.parent
	return nil
}

// deriveView takes the view's mounts from the layers the container's
// rootfs mounts name (view.source "layers"): the rootfs as runc will mount
// it, after snapview's own activation of it if it made one. Where the
// rootfs does not name them, the leased View of the snapshotter is made
// instead, and the log says why.
func (s *setupRun) deriveView(context.Context) error {
	rootfsMounts := s.p.req.Rootfs
	if s.v.Rootfs != nil {
		rootfsMounts = s.v.Rootfs
	}
	mounts, err := view.Derive(rootfsMounts)
	if err != nil {
		s.logger.WithError(err).Info("snapview: view.source is layers, but the rootfs does not name the image's layers: the view is a leased View of the snapshotter")
		return nil
	}
	st := s.v.State
	s.derived, s.mounts = true, mounts
	st.Source, st.Snapshotter = params.SourceLayers, view.SnapshotterOf(s.p.req.Rootfs)
	return nil
}

// createView creates the read-only view of the container's image under
// the lease.
func (s *setupRun) createView(ctx context.Context) error {
	st := s.v.State
	sn, err := s.l.backend.Snapshotter(s.p.snapshotter)
	if err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	st.ViewKey = view.Key(st.ContainerID)
	cctx, cancel := callContext(ctx)
	defer cancel()
	if s.mounts, err = view.Create(cctx, sn, s.owner, s.p.parent, st.LeaseID); err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	s.logger.WithFields(log.Fields{"key": st.ViewKey, "parent": s.p.parent, "lease": st.LeaseID, "snapshotter": s.p.snapshotter}).Info("snapview: view created")
	return nil
}

// activateView has containerd's mount manager perform the view's mounts
// that mount.All cannot (a multi-layer erofs view).
func (s *setupRun) activateView(ctx context.Context) error {
	st := s.v.State
	st.Activation = view.Key(st.ContainerID)
	var err error
	s.mounts, err = s.l.activate(ctx, s.owner, viewActivation(st.ContainerID, st.LeaseID), s.mounts)
	return err
}

// mountView mounts the view read-only on its mountpoint in the bundle. The
// mountpoint is recorded only once it is known not to be a mount of someone
// else's, which stays, rollback included.
func (s *setupRun) mountView(context.Context) error {
	st := s.v.State
	mp := bundle.Mountpoint(s.v.Bundle)
	loops, mounts, err := mountAt(s.mounts, mp, false, func() { st.Mountpoint = mp })
	st.LoopDevices, st.Mounts = loops, mounts
	if err != nil {
		return fmt.Errorf("snapview: the view: %w", err)
	}
	s.logger.WithFields(log.Fields{"key": st.ViewKey, "target": st.Mountpoint, "loop": loops, "source": s.viewSource()}).Info("snapview: view mounted")
	return nil
}

// mountAt mounts the given mounts read-only (writable: as they are) on mountpoint,
// which must not be a mount point already (a mount not made by this setup
// stays, rollback included); record runs once it is known not to be,
// before the mount. It returns the loop devices the mount attached and the
// mounts as recorded.
func mountAt(mounts []mount.Mount, mountpoint string, writable bool, record func()) ([]string, []bundle.Mount, error) {
	if m, err := mountinfo.Mounted(mountpoint); err == nil && m {
		return nil, nil, fmt.Errorf("its mountpoint %s is already a mount point, not made by this setup", mountpoint)
	}
	record()
	mountFn := view.Mount
	if writable {
		mountFn = view.MountWritable
	}
	loops, err := mountFn(mounts, mountpoint)
	if err != nil {
		return loops, nil, err
	}
	recorded := make([]bundle.Mount, 0, len(mounts))
	for _, m := range mounts {
		recorded = append(recorded, bundle.MountOf(m))
	}
	return loops, recorded, nil
}

// resolveArtifacts resolves the boot artifacts inside the mounted view and
// makes the container's binds: the artifacts, the whole view if asked, and
// the params file for a container that asks for a bind or runs in block
// mode.
func (s *setupRun) resolveArtifacts(context.Context) error {
	st, p := s.v.State, s.p
	arts, err := boot.Resolve(st.Mountpoint, p.ann.Artifacts)
	if err != nil {
		return err
	}
	st.Artifacts = arts
	for _, a := range arts {
		s.logger.WithFields(log.Fields{"artifact": a.Name, "path": a.Path, "target": a.Target}).Info("snapview: boot artifact resolved in the view")
	}
	if p.ann.HasBinds() || p.blockMode() {
		s.paramsSource = bundle.ParamsFile(s.v.Bundle)
	}
	s.binds = append(boot.Mounts(arts, st.Mountpoint, p.ann.ViewTarget, s.paramsSource), volumeBinds(st)...)
	if p.readOnlyRootfs {
		return checkReadOnlyTargets(st.Mountpoint, s.binds)
	}
	return nil
}

// writeState persists the state, before anything the OCI runtime reads.
func (s *setupRun) writeState(context.Context) error {
	if err := bundle.WriteState(s.v.Bundle, s.v.State); err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	return nil
}

// writeParams writes the params file bound into the container.
func (s *setupRun) writeParams(context.Context) error {
	return writeParams(s.paramsSource, s.paramsDoc())
}

// patchConfig adds snapview's annotations, binds and devices to
// config.json, last: the OCI runtime reads it after Create returns.
func (s *setupRun) patchConfig(context.Context) error {
	patch, err := s.p.configPatch(s.v.State, s.binds, s.p.req.Config, s.paramsDoc())
	if err != nil {
		return err
	}
	s.v.patched = true
	return s.p.spec.Apply(patch)
}

// viewSource names where the view came from, as the params and
// annotations say it.
func (s *setupRun) viewSource() string {
	if s.derived {
		return params.SourceLayers
	}
	return params.SourceSnapshotter
}
