package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	containersapi "github.com/containerd/containerd/api/services/containers/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/backend"
	"github.com/snapview/snapview/pkg/boot"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/rootfs"
	"github.com/snapview/snapview/pkg/view"
)

// Annotations of CRI's that snapview reads.
const (
	annotationContainerType = "io.kubernetes.cri.container-type"
	containerTypeSandbox    = "sandbox"
)

// viewDir is the directory under the bundle that holds the view's mountpoint.
const viewDir = "snapview"

// mountpoint returns where a container's view is mounted on the host.
func mountpoint(bundlePath string) string {
	return filepath.Join(bundlePath, viewDir, "view")
}

// paramsFile returns the host file bound at /.snapview/params.json.
func paramsFile(bundlePath string) string {
	return filepath.Join(bundlePath, viewDir, "params.json")
}

// plan is what Create decided for a container before any side effect.
type plan struct {
	ns, id, bundle string
	snapshotter    string
	parent         string
	params         rootfs.Params
	spec           *bundle.Config
	req            *annotations.Request
}

// decide reads the spec and the container record and returns the plan of a
// container's view, or nil with the reason when it gets none. It has no side
// effects.
func (s *service) decide(ctx context.Context, ns string, r *createRequest, cfg *config.Config, sw *stopwatch) (*plan, string, error) {
	spec, err := bundle.ReadConfig(r.Bundle)
	if err != nil {
		return nil, "", err
	}
	ann := spec.Annotations
	if ann[annotationContainerType] == containerTypeSandbox && !cfg.View.Sandbox {
		// Pod annotations reach the sandbox too: they are not for it.
		return nil, "CRI sandbox container (view.sandbox is off)", nil
	}
	req, err := annotations.Parse(ann, cfg.View.BootDir)
	if err != nil {
		return nil, "", err
	}
	mode := cfg.View.Mode
	if req.Mode != "" {
		mode = req.Mode
	}
	switch mode {
	case config.ModeView:
	case config.ModeOff:
		if req.HasBinds() {
			return nil, "", fmt.Errorf("snapview: %s asks for binds from the view, but the mode is off (%s or view.mode in %s)", bindAnnotations(req), annotations.Mode, cfg.Source)
		}
		return nil, "mode off", nil
	case config.ModeBlock:
		return nil, "", fmt.Errorf("snapview: annotation %s=%q: block mode is not supported by this build yet", annotations.Mode, mode)
	}
	noView := func(reason string) (*plan, string, error) {
		if req.HasBinds() {
			return nil, "", fmt.Errorf("snapview: %s asks for binds from the image, but %s", bindAnnotations(req), reason)
		}
		return nil, reason, nil
	}
	if len(r.Rootfs) == 0 {
		return noView("the container has no rootfs mounts (no image snapshot)")
	}
	params, err := rootfs.FromMounts(r.Rootfs)
	if err != nil {
		return nil, "", fmt.Errorf("snapview: rootfs of %s: %w", r.ID, err)
	}

	sw.lap("local")
	cc, err := s.backend.Containers()
	if err != nil {
		return nil, "", fmt.Errorf("snapview: %w", err)
	}
	cctx, cancel := backend.WithTimeout(ctx)
	defer cancel()
	resp, err := cc.Get(cctx, &containersapi.GetContainerRequest{ID: r.ID})
	if err != nil {
		return nil, "", fmt.Errorf("snapview: look up container %s: %w", r.ID, errgrpc.ToNative(err))
	}
	c := resp.Container
	sw.lap("get")
	if c.SnapshotKey == "" || c.Snapshotter == "" {
		return noView("the container has no image snapshot (e.g. ctr run --rootfs)")
	}
	sn, err := s.backend.Snapshotter(c.Snapshotter)
	if err != nil {
		return nil, "", fmt.Errorf("snapview: %w", err)
	}
	info, err := sn.Stat(cctx, c.SnapshotKey)
	if err != nil {
		return nil, "", fmt.Errorf("snapview: stat snapshot %s of container %s in %s: %w", c.SnapshotKey, r.ID, c.Snapshotter, errgrpc.ToNative(err))
	}
	if info.Parent == "" {
		return noView("the container's snapshot has no parent image")
	}
	return &plan{ns: ns, id: r.ID, bundle: r.Bundle, snapshotter: c.Snapshotter, parent: info.Parent, params: params, spec: spec, req: req}, "", nil
}

// bindAnnotations names the annotations of req that ask for binds.
func bindAnnotations(req *annotations.Request) string {
	var names []string
	for _, a := range req.Artifacts {
		names = append(names, annotations.BootPrefix+a.Name)
	}
	if req.ViewTarget != "" {
		names = append(names, annotations.ViewTarget)
	}
	return "annotation " + strings.Join(names, ", ")
}

// setup creates, mounts and persists the view of p, and patches config.json,
// in that order. Every step is recorded in the returned state as soon as it
// succeeded; on failure the recorded steps are undone by teardown and
// config.json is restored, so nothing is left behind.
func (s *service) setup(ctx context.Context, p *plan, sw *stopwatch) (_ *bundle.State, retErr error) {
	logger := log.G(ctx).WithField("id", p.id)
	st := &bundle.State{
		Namespace:   p.ns,
		ContainerID: p.id,
		Snapshotter: p.snapshotter,
		Parent:      p.parent,
		Mountpoint:  mountpoint(p.bundle),
		Rootfs:      p.params,
		Created:     time.Now().UTC().Truncate(time.Second),
	}
	defer func() {
		if retErr != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if err := s.teardown(cctx, p.bundle, st, newStopwatch()); err != nil {
				logger.WithError(err).Error("snapview: rollback of a failed create left something behind")
			}
		}
	}()

	lm, err := s.backend.Leases()
	if err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	sn, err := s.backend.Snapshotter(p.snapshotter)
	if err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	labels := lease.Labels(p.id, st.Created)

	cctx, cancel := backend.WithTimeout(ctx)
	defer cancel()
	l, err := lease.Acquire(cctx, lm, p.id, st.Created)
	if err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	st.LeaseID = l.ID
	sw.lap("lease")

	mounts, err := view.Create(cctx, sn, p.id, p.parent, l.ID, labels)
	if err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	st.ViewKey = view.Key(p.id)
	sw.lap("view")
	logger.WithFields(log.Fields{"key": st.ViewKey, "parent": p.parent, "lease": l.ID, "snapshotter": p.snapshotter}).Info("snapview: view created")

	if view.NeedsManager(mounts) {
		mounts, err = s.activate(cctx, p.id, l.ID, mounts)
		if err != nil {
			return nil, err
		}
		st.Activation = view.Key(p.id)
	}

	loops, err := view.Mount(mounts, st.Mountpoint)
	st.LoopDevices = loops
	if err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	for _, m := range mounts {
		st.Mounts = append(st.Mounts, bundle.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	sw.lap("mount")
	logger.WithFields(log.Fields{"key": st.ViewKey, "target": st.Mountpoint, "loop": loops}).Info("snapview: view mounted")

	arts, err := boot.Resolve(st.Mountpoint, p.req.Artifacts)
	if err != nil {
		return nil, err
	}
	st.Artifacts = arts
	for _, a := range arts {
		logger.WithFields(log.Fields{"artifact": a.Name, "path": a.Path, "target": a.Target}).Info("snapview: boot artifact resolved in the view")
	}
	if err := bundle.WriteState(p.bundle, st); err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	if err := writeParams(paramsFile(p.bundle), st, p.req.ViewTarget); err != nil {
		return nil, err
	}
	params, err := json.Marshal(st.Rootfs)
	if err != nil {
		return nil, err
	}
	patch := bundle.ConfigPatch{
		Annotations: map[string]string{
			annotations.ViewSnapshotter: st.Snapshotter,
			annotations.ViewKey:         st.ViewKey,
			annotations.ViewLease:       st.LeaseID,
			annotations.ViewMountpoint:  st.Mountpoint,
			annotations.RootfsParams:    string(params),
		},
		Mounts: boot.Mounts(arts, st.Mountpoint, p.req.ViewTarget, paramsFile(p.bundle)),
	}
	for _, a := range arts {
		patch.Annotations[annotations.BoundPrefix+a.Name] = a.Target
	}
	if err := p.spec.Apply(patch); err != nil {
		return nil, err
	}
	sw.lap("persist")
	logger.WithField("state", bundle.StatePath(p.bundle)).Debug("snapview: state persisted and config.json annotated")
	return st, nil
}

// activate hands mounts that mount.All cannot perform to containerd's mount
// manager, under the view's lease and tied to the container, and returns the
// system mounts left to perform.
func (s *service) activate(ctx context.Context, id, leaseID string, mounts []mount.Mount) ([]mount.Mount, error) {
	mm, err := s.backend.Mounts()
	if err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	ai, err := mm.Activate(leases.WithLease(ctx, leaseID), view.Key(id), mounts,
		mount.WithLabels(map[string]string{view.LabelGCBackRef: id}))
	if err != nil {
		err = errgrpc.ToNative(err)
		if errdefs.IsNotImplemented(err) {
			return nil, fmt.Errorf("snapview: the view of %s needs containerd's mount manager (mount types %s), which this containerd does not provide: %w", id, mountTypes(mounts), err)
		}
		return nil, fmt.Errorf("snapview: activate view mounts of %s: %w", id, err)
	}
	log.G(ctx).WithFields(log.Fields{"id": id, "activation": ai.Name, "active": len(ai.Active)}).Info("snapview: view mounts activated by containerd's mount manager")
	return ai.System, nil
}

func mountTypes(mounts []mount.Mount) string {
	t := make([]string, len(mounts))
	for i, m := range mounts {
		t[i] = m.Type
	}
	return strings.Join(t, ",")
}

// teardown undoes what st records, in reverse order of setup: unmount the
// view (and detach its loop devices), deactivate its mount-manager
// activation, remove the view snapshot, delete the lease with synchronous GC,
// then remove the state file. Every step runs; the first error is returned
// and the others are logged. Steps whose object is already gone succeed, so
// teardown can run any number of times.
func (s *service) teardown(ctx context.Context, bundlePath string, st *bundle.State, sw *stopwatch) error {
	return teardown(ctx, s.backend, bundlePath, st, sw)
}

func teardown(ctx context.Context, b *backend.Backend, bundlePath string, st *bundle.State, sw *stopwatch) error {
	logger := log.G(ctx).WithField("id", st.ContainerID)
	var errs []error
	step := func(name string, err error) {
		if err != nil {
			logger.WithError(err).WithField("step", name).Error("snapview: teardown step failed")
			errs = append(errs, err)
		}
	}
	if st.Mountpoint != "" {
		step("unmount", view.Unmount(st.Mountpoint))
		step("detach loop devices", view.DetachLoops(st.LoopDevices, func(backing string) bool {
			for _, m := range st.Mounts {
				if m.Source == backing {
					return true
				}
			}
			return false
		}))
		if err := os.Remove(paramsFile(bundlePath)); err != nil && !errors.Is(err, os.ErrNotExist) {
			step("remove params file", err)
		}
		if err := os.Remove(filepath.Dir(st.Mountpoint)); err != nil && !errors.Is(err, os.ErrNotExist) {
			step("remove view directory", err)
		}
		logger.WithField("target", st.Mountpoint).Debug("snapview: view unmounted")
		sw.lap("unmount")
	}
	cctx, cancel := backend.WithTimeout(ctx)
	defer cancel()
	if st.Activation != "" {
		if mm, err := b.Mounts(); err != nil {
			step("deactivate", err)
		} else if err := mm.Deactivate(cctx, st.Activation); err != nil && !errdefs.IsNotFound(errgrpc.ToNative(err)) {
			step("deactivate", fmt.Errorf("deactivate %s: %w", st.Activation, err))
		}
	}
	if st.ViewKey != "" {
		if sn, err := b.Snapshotter(st.Snapshotter); err != nil {
			step("remove view", err)
		} else {
			step("remove view", view.Remove(cctx, sn, st.ContainerID))
		}
		sw.lap("remove")
	}
	if st.LeaseID != "" {
		if lm, err := b.Leases(); err != nil {
			step("delete lease", err)
		} else {
			step("delete lease", lease.Release(cctx, lm, st.ContainerID))
		}
		sw.lap("lease")
	}
	step("remove state", bundle.RemoveState(bundlePath))
	if len(errs) == 0 {
		logger.WithFields(sw.fields).WithFields(log.Fields{"key": st.ViewKey, "lease": st.LeaseID}).Info("snapview: view removed")
		return nil
	}
	return fmt.Errorf("snapview: teardown of %s: %w", st.ContainerID, errs[0])
}

// createRequest is the part of CreateTaskRequest decide needs.
type createRequest struct {
	ID     string
	Bundle string
	Rootfs []rootfs.Mount
}

func newCreateRequest(id, bundlePath string, mounts []*types.Mount) *createRequest {
	r := &createRequest{ID: id, Bundle: bundlePath}
	for _, m := range mounts {
		r.Rootfs = append(r.Rootfs, rootfs.Mount{Type: m.Type, Source: m.Source, Options: m.Options})
	}
	return r
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
