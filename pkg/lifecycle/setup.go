package lifecycle

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	securejoin "github.com/cyphar/filepath-securejoin"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/rootfs"
	"github.com/snapview/snapview/pkg/view"
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

	// device is the block device this process attached and holds open.
	device *blockdev.Device
	// owned: this process set the view up completely, so the lease and
	// the view are known to be its own and are removed without re-reading
	// their labels. A recovered or partial view is always re-checked.
	owned bool
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
func (l *Lifecycle) Setup(ctx context.Context, p *Plan) (*View, error) {
	if p.Skip != "" {
		return nil, fmt.Errorf("snapview: setup of a container that gets no view (%s)", p.Skip)
	}
	return l.setup(ctx, p, nil)
}

// Prepare decides and sets up the view of r: Decide then Setup, except that
// the lease, which does not depend on the container's snapshot, is created
// while the snapshot is looked up. It returns the view, or the reason the
// container gets none. If the lookup finds no image snapshot after all,
// the lease is removed again (rarely: a container with rootfs mounts but no
// snapshot).
func (l *Lifecycle) Prepare(ctx context.Context, r Request) (_ *View, _ string, retErr error) {
	defer recoverTo(ctx, &retErr, "setup", r.ID)
	p, err := decideLocal(r)
	if err != nil {
		return nil, "", err
	}
	if p.Skip != "" {
		return nil, p.Skip, nil
	}
	v, err := l.setup(ctx, p, func(ctx context.Context) (*Plan, error) { return l.lookup(ctx, p) })
	if skip, ok := errors.AsType[skipped](err); ok {
		return nil, skip.reason, nil
	}
	return v, "", err
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
		Mountpoint:  bundle.Mountpoint(r.Bundle),
		Rootfs:      p.params,
		Created:     time.Now().UTC(),
		Mode:        p.mode,
	}
	v := &View{Bundle: r.Bundle, State: st, spec: p.spec}
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
	v.owned = true
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
	v.owned = false
	if err := l.Teardown(ctx, v); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// activate hands mounts that mount.All cannot perform to containerd's mount
// manager, under the view's lease and tied to the container, and returns the
// system mounts left to perform. A leftover activation of the same
// container, from a crash, is replaced.
func (l *Lifecycle) activate(ctx context.Context, o lease.Owner, leaseID string, mounts []mount.Mount) ([]mount.Mount, error) {
	mm, err := l.backend.Mounts()
	if err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	name := view.Key(o.Container)
	activate := func() (mount.ActivationInfo, error) {
		return mm.Activate(leases.WithLease(ctx, leaseID), name, mounts, mount.WithLabels(view.Labels(o)))
	}
	ai, err := activate()
	if errdefs.IsAlreadyExists(err) {
		old, ierr := mm.Info(ctx, name)
		if ierr != nil {
			return nil, fmt.Errorf("snapview: inspect the existing mount activation %s: %w", name, ierr)
		}
		if !o.IsContainer(old.Labels) {
			return nil, fmt.Errorf("snapview: mount activation %s exists and is not snapview's (label %s=%q): %w",
				name, lease.LabelContainer, old.Labels[lease.LabelContainer], errdefs.ErrAlreadyExists)
		}
		log.G(ctx).WithFields(log.Fields{"id": o.Container, "activation": name, "created": old.Labels[lease.LabelCreated]}).
			Warn("snapview: replacing a leftover mount activation of an earlier run")
		if err := mm.Deactivate(ctx, name); err != nil && !errdefs.IsNotFound(err) {
			return nil, fmt.Errorf("snapview: deactivate the leftover mount activation %s: %w", name, err)
		}
		ai, err = activate()
	}
	if err != nil {
		if errdefs.IsNotImplemented(err) {
			return nil, fmt.Errorf("snapview: the view of %s needs containerd's mount manager (mount types %s), which this containerd does not provide: %w", o.Container, mountTypes(mounts), err)
		}
		return nil, fmt.Errorf("snapview: activate view mounts of %s: %w", o.Container, err)
	}
	log.G(ctx).WithFields(log.Fields{"id": o.Container, "activation": ai.Name, "active": len(ai.Active)}).Info("snapview: view mounts activated by containerd's mount manager")
	return ai.System, nil
}

func mountTypes(mounts []mount.Mount) string {
	t := make([]string, len(mounts))
	for i, m := range mounts {
		t[i] = m.Type
	}
	return strings.Join(t, ",")
}

// attach gets the block device of a block-mode container: the
// device-mapper node as it is, or a loop device attached to the blockfile
// image, held open by this process. It records the device in the state as
// the container will see it.
func (v *View) attach(p *Plan, containerPath string) error {
	m := p.block.Mount
	var (
		d   *blockdev.Device
		err error
	)
	if p.block.Loop {
		d, err = blockdev.Attach(m.Source)
	} else {
		d, err = blockdev.Resolve(m.Source)
	}
	if err != nil {
		return fmt.Errorf("snapview: block device of the rootfs (%s): %w", m.Source, err)
	}
	v.device = d
	st := v.State
	st.Block = &bundle.Block{
		Rootfs:        bundle.Mount{Type: m.Type, Source: m.Source, Options: m.Options},
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

// monitorRootfs prepares the block-mode container's root: an overlay whose
// lower layer is the view (monitor "view") or the host directory monitor
// (from the setting monitorFrom, named in errors), and whose upper and work
// directories live in the bundle. runc mounts it in place of the
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
	upper, work := bundle.UpperDir(bundlePath), bundle.WorkDir(bundlePath)
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

// checkReadOnlyTargets checks, for a container whose rootfs is read-only
// (itself a view of the image), that runc will not need to create any bind
// target: each must already exist in the image, as a regular file for a
// file bind and a directory for the view. The container's rootfs and the
// view show the same image, so the view answers.
func checkReadOnlyTargets(viewRoot string, binds []specs.Mount) error {
	for _, b := range binds {
		wantDir := b.Source == viewRoot
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

// configPatch is what Setup adds to config.json: the annotations for every
// container with a view, the binds it asked for, and in block mode the
// device and the cgroup rule that lets the container open it.
func (p *Plan) configPatch(st *bundle.State, binds []specs.Mount, cfg *config.Config) (bundle.ConfigPatch, error) {
	params, err := json.Marshal(st.Rootfs)
	if err != nil {
		return bundle.ConfigPatch{}, err
	}
	patch := bundle.ConfigPatch{
		Annotations: map[string]string{
			annotations.ViewSnapshotter: st.Snapshotter,
			annotations.ViewKey:         st.ViewKey,
			annotations.ViewLease:       st.LeaseID,
			annotations.ViewMountpoint:  st.Mountpoint,
			annotations.RootfsParams:    string(params),
		},
		Mounts: binds,
	}
	for _, a := range st.Artifacts {
		patch.Annotations[annotations.BoundPrefix+a.Name] = a.Target
	}
	if b := st.Block; b != nil {
		mode := os.FileMode(0o660)
		uid, gid := p.spec.UID, p.spec.GID
		patch.Devices = []specs.LinuxDevice{{
			Path: cfg.Block.Device, Type: "b", Major: int64(b.Major), Minor: int64(b.Minor),
			FileMode: &mode, UID: &uid, GID: &gid,
		}}
		major, minor := int64(b.Major), int64(b.Minor)
		patch.DeviceRules = []specs.LinuxDeviceCgroup{{Allow: true, Type: "b", Major: &major, Minor: &minor, Access: "rw"}}
	}
	return patch, nil
}

// paramsDoc is the content of /.snapview/params.json.
type paramsDoc struct {
	Rootfs     rootfs.Params     `json:"rootfs"`
	Artifacts  map[string]string `json:"artifacts"`
	ViewTarget string            `json:"view_target,omitempty"`
}

// writeParams writes the params file bound read-only into the container.
func writeParams(path string, st *bundle.State, viewTarget string) error {
	doc := paramsDoc{Rootfs: st.Rootfs, Artifacts: map[string]string{}, ViewTarget: viewTarget}
	for _, a := range st.Artifacts {
		doc.Artifacts[a.Name] = a.Target
	}
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	if err := bundle.WriteFile(path, append(data, '\n'), 0o444); err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	return nil
}
