package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/containerd/log"
	securejoin "github.com/cyphar/filepath-securejoin"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/rootfs"
)

// View is one container's view: its persisted state, and what only the
// process that set it up holds.
type View struct {
	Bundle string
	State  *bundle.State
	// Rootfs, in block mode, is what runc must mount as the container's
	// root instead of the rootfs containerd sent (the monitor rootfs
	// overlay); nil in view mode.
	Rootfs []rootfs.Mount

	// device is the block device this process attached and holds open;
	// layers the read-only layer disks of a layered rootfs.
	device *blockdev.Device
	layers []*blockdev.Device
	// volumeDisks are the volumes' disks this process attached and holds.
	volumeDisks []*blockdev.Device
	// origin says who made the view, and so what its teardown may take as
	// its own without asking: only a view this process set up completely
	// removes its lease, views and activations by name; any other is
	// checked against its owner.
	origin origin
	// partial: containerd could not be asked what the view holds there, so
	// the records (state file, snapview's directory) must outlive this
	// teardown for a later one to find the rest.
	partial bool
	// superseded: teardown found the lease or the view held by a newer
	// incarnation of the container and left it alone.
	superseded bool
	// timings of the setup steps, for the log.
	timings log.Fields
	// spec is config.json as Setup read it; patched says Setup changed it.
	spec    *bundle.Config
	patched bool
}

// Superseded reports whether the last teardown left the lease or the view
// alone because a newer incarnation of the container holds it.
func (v *View) Superseded() bool { return v.superseded }

// Timings returns how long each setup step took, as <step>_us log fields.
func (v *View) Timings() log.Fields { return v.timings }

func (v *View) owner() lease.Owner { return lease.NewOwner(v.State.ContainerID, v.State.Created) }

// Setup carries out p and returns the view. It patches config.json last,
// so that the OCI runtime, which reads it later, sees everything. On error
// nothing is left: every recorded step is undone and config.json restored.
//
// A plan that skips the view (p.Skip) has a setup only when the rootfs
// holds mounts snapview claimed from containerd: the View then records
// nothing but their activation (mode none), and its Rootfs is what runc
// mounts.
func (l *Lifecycle) Setup(ctx context.Context, p *Plan) (*View, error) {
	if p.Skip != "" && !p.claimRootfs {
		return nil, fmt.Errorf("snapview: setup of a container that gets nothing from snapview (%s)", p.Skip)
	}
	return l.setup(ctx, p, nil)
}

// Prepare decides and sets up the view of r: Decide then Setup, except that
// the lease, which does not depend on the container's snapshot, is created
// while the snapshot is looked up. It returns the view, and the reason the
// container gets none when it gets none; a container without a view still
// gets a View when snapview performs its rootfs mounts (see Setup), and
// nil otherwise. If the lookup finds no image snapshot after all, the lease
// is removed again (rarely: a container with rootfs mounts but no
// snapshot).
func (l *Lifecycle) Prepare(ctx context.Context, r Request) (_ *View, _ string, retErr error) {
	defer recoverTo(ctx, &retErr, "setup", r.ID)
	p, err := decideLocal(ctx, r)
	if err != nil {
		return nil, "", err
	}
	if p.Skip == "" {
		v, err := l.setup(ctx, p, func(ctx context.Context) (*Plan, error) { return l.lookup(ctx, p) })
		sk, ok := errors.AsType[skipped](err)
		if !ok {
			return v, "", err
		}
		p = skip(r, sk.reason)
	}
	if !p.claimRootfs {
		return nil, p.Skip, nil
	}
	v, err := l.setup(ctx, p, nil)
	return v, p.Skip, err
}

// skipped ends a Prepare whose lookup decided that the container gets no
// view after all; its rollback has run.
type skipped struct{ reason string }

func (s skipped) Error() string { return "no view: " + s.reason }

// setup carries out p. With lookup, p is not yet complete: lookup
// completes it while the lease is being created.
//
// A setup is the list setupSteps, run in order: each step that applies to
// the plan runs, records in the view's state what it is about to do before
// it acts (so that Teardown, which undoes a View from its state alone,
// undoes it whatever happens next), and is then a crash point of the fault
// build and a lap of the stopwatch. The first error ends the setup, and the
// deferred rollback undoes what the state records.
func (l *Lifecycle) setup(ctx context.Context, p *Plan, lookup func(context.Context) (*Plan, error)) (_ *View, retErr error) {
	r := p.req
	st := &bundle.State{
		Namespace:   r.Namespace,
		ContainerID: r.ID,
		Snapshotter: p.snapshotter,
		Parent:      p.parent,
		Rootfs:      p.params,
		Created:     time.Now().UTC(),
		Mode:        p.mode,
	}
	if p.Skip != "" {
		st.Mode = bundle.ModeNone
	}
	v := &View{Bundle: r.Bundle, State: st, spec: p.spec, origin: rolledBack}
	s := &setupRun{l: l, p: p, v: v, lookup: lookup, logger: log.G(ctx).WithField("id", r.ID), sw: newStopwatch(), owner: v.owner()}
	defer func() {
		if retErr == nil {
			return
		}
		cctx, cancel := CleanupContext(ctx)
		defer cancel()
		if err := l.Undo(cctx, v); err != nil {
			s.logger.WithError(err).Error("snapview: rollback of a setup left something behind")
		}
	}()
	defer recoverTo(ctx, &retErr, "setup", r.ID) // before the rollback above

	for _, step := range setupSteps {
		if step.applies != nil && !step.applies(s) {
			continue
		}
		if err := step.do(s, ctx); err != nil {
			return nil, err
		}
		s.sw.lap(step.name)
		if err := l.step(step.name, r.ID); err != nil {
			return nil, err
		}
	}
	v.origin = setUpHere
	v.timings = s.sw.fields
	s.logger.WithField("state", bundle.StatePath(r.Bundle)).Debug("snapview: state persisted and config.json annotated")
	return v, nil
}

// Undo rolls back a view whose container was never created: config.json
// goes back to what it was (Setup's last step), then Teardown removes the
// rest. A view undone this way is not trusted to own its lease and view:
// their labels are checked again.
func (l *Lifecycle) Undo(ctx context.Context, v *View) error {
	var errs []error
	if v.patched {
		if err := v.spec.Restore(); err != nil {
			errs = append(errs, fmt.Errorf("restore config.json: %w", err))
		} else {
			v.patched = false
		}
	}
	v.origin = rolledBack
	if err := l.Teardown(ctx, v); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// checkReadOnlyTargets checks, for a container whose rootfs is read-only
// (itself a view of the image), that runc will not need to create any bind
// target: each must already exist in the image, as a regular file for a
// file bind and a directory for the view. The container's rootfs and the
// view show the same image, so the view answers.
func checkReadOnlyTargets(viewRoot string, binds []specs.Mount) error {
	for _, b := range binds {
		wantDir := slices.Contains(b.Options, "rbind") // the view, a volume
		p, err := securejoin.SecureJoin(viewRoot, b.Destination)
		if err == nil {
			var fi os.FileInfo
			if fi, err = os.Lstat(p); err == nil && fi.IsDir() == wantDir && (wantDir || fi.Mode().IsRegular()) {
				continue
			}
		}
		return fmt.Errorf("snapview: the container's rootfs is read-only (a view of the image), so runc cannot create the mount target %s; "+
			"bind only onto paths the image already has (%s, %s) or give the container a writable rootfs", b.Destination, annotations.BootDir, annotations.ViewTarget)
	}
	return nil
}
