// Package shim is snapview's containerd shim: runc's task service and shim
// manager, wrapped in-process, adapting containerd's task API to the view
// lifecycle (package lifecycle).
//
// The task service wrapper changes Create, Delete and Shutdown and forwards
// every other RPC to runc's service unchanged, so that exec, kill, wait,
// pause, resume, pids, stats, update, checkpoint, close-io, resize-pty and
// connect, and every event, behave exactly as with io.containerd.runc.v2.
package shim

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/fault"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/rootfs"
)

// PointRuncCreated is the crash point right after runc's create, for the
// fault build (see package fault).
const PointRuncCreated = "runc-created"

// service wraps runc's task service. Methods not defined here are runc's,
// forwarded through the embedded interface on purpose.
type service struct {
	taskAPI.TTRPCTaskService

	lc *lifecycle.Lifecycle

	mu sync.Mutex
	// views holds each container's view, keyed by namespace and container
	// id (one shim process can serve a whole pod). An entry stays until
	// its teardown has ended.
	views map[string]*entry
	// creating counts Creates in progress, which runc does not know of
	// until its own Create.
	creating int

	// started is when the shim's server came up; firstCreate is set by
	// the first Create, which logs how long after that it arrived (what
	// containerd does between starting a shim and creating its task).
	started     time.Time
	firstCreate atomic.Bool
}

type entry struct {
	view     *lifecycle.View
	deleting bool
}

func newService(inner taskAPI.TTRPCTaskService, lc *lifecycle.Lifecycle) *service {
	return &service{TTRPCTaskService: inner, lc: lc, views: map[string]*entry{}, started: time.Now()}
}

func key(ns, id string) string { return ns + "/" + id }

// RegisterTTRPC registers the wrapper, not the inner service, so that every
// RPC enters through snapview, and ClaimsService, by which a shim manager's
// Start learns which mounts this process performs.
func (s *service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	registerClaims(server)
	return nil
}

// Create decides the container's view, sets it up (state, params and
// config.json written) and only then calls runc's Create, which is when
// runc reads config.json. In block mode runc is handed the monitor rootfs
// instead of the container's block-backed rootfs, which is never mounted. If
// anything fails, runc's Create included, the view is undone and Create
// fails with a snapview: error.
func (s *service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	s.mu.Lock()
	s.creating++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.creating--
		s.mu.Unlock()
	}()

	logger := log.G(ctx).WithField("id", r.ID)
	if !s.firstCreate.Swap(true) {
		logger = logger.WithField("since_shim_start_us", time.Since(s.started).Microseconds())
	}
	cfg, err := normaliseOptions(r)
	if err != nil {
		logger.WithError(err).Error("snapview: rejected runtime options")
		return nil, errgrpc.ToGRPC(err)
	}
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	ctx = namespaces.WithNamespace(ctx, ns)

	v, skip, err := s.lc.Prepare(ctx, lifecycle.Request{Namespace: ns, ID: r.ID, Bundle: r.Bundle, Rootfs: fromTypes(r.Rootfs), Config: cfg})
	if err != nil {
		logger.WithError(err).Error("snapview: create refused")
		return nil, errgrpc.ToGRPC(err)
	}
	if v == nil {
		resp, err := s.TTRPCTaskService.Create(ctx, r)
		logger.WithFields(log.Fields{"reason": skip, "config": cfg.Source}).Info("snapview: no view for this container")
		return resp, err
	}
	if v.Rootfs != nil {
		r.Rootfs = toTypes(v.Rootfs)
	}
	start := time.Now()
	resp, err := s.TTRPCTaskService.Create(ctx, r)
	fault.Point(PointRuncCreated, r.ID)
	if err != nil {
		cctx, cancel := lifecycle.CleanupContext(ctx)
		defer cancel()
		if uerr := s.lc.Undo(cctx, v); uerr != nil {
			logger.WithError(uerr).Error("snapview: rollback after a failed runc create left something behind")
		}
		return nil, errgrpc.ToGRPC(fmt.Errorf("snapview: create %s: %w", r.ID, errgrpc.ToNative(err)))
	}
	s.mu.Lock()
	s.views[key(ns, r.ID)] = &entry{view: v}
	s.mu.Unlock()
	st := v.State
	if skip != "" {
		logger.WithFields(log.Fields{"reason": skip, "config": cfg.Source, "activation": st.RootfsActivation}).
			Info("snapview: no view for this container; its rootfs mounts performed through containerd's mount manager")
		return resp, nil
	}
	logger.WithFields(v.Timings()).
		WithFields(log.Fields{"runc_create_us": time.Since(start).Microseconds(), "goroutines": runtime.NumGoroutine(), "mode": v.State.Mode, "key": st.ViewKey, "lease": st.LeaseID, "target": st.Mountpoint}).
		Info("snapview: container created with its view")
	return resp, nil
}

// Delete calls runc's Delete, then, for an init process with a view, tears
// the view down: only once runc's container is gone is nothing using it.
func (s *service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	resp, err := s.TTRPCTaskService.Delete(ctx, r)
	if r.ExecID != "" {
		return resp, err
	}
	if err != nil && !errdefs.IsNotFound(errgrpc.ToNative(err)) {
		return resp, err
	}
	ns, nerr := namespaces.NamespaceRequired(ctx)
	if nerr != nil {
		return resp, err
	}
	k := key(ns, r.ID)
	s.mu.Lock()
	e := s.views[k]
	if e == nil || e.deleting {
		s.mu.Unlock()
		return resp, err
	}
	e.deleting = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.views, k)
		s.mu.Unlock()
	}()

	tctx, cancel := lifecycle.CleanupContext(namespaces.WithNamespace(ctx, ns))
	defer cancel()
	if terr := s.lc.Teardown(tctx, e.view); terr != nil {
		// The task is gone either way; the state file stays, and the
		// `delete` action that containerd runs next, or the sweep,
		// finishes the teardown.
		log.G(ctx).WithError(terr).WithField("id", r.ID).Error("snapview: view teardown incomplete")
	}
	return resp, err
}

// Shutdown forwards to runc's service, which exits the shim once it serves
// no container, unless snapview still has work in this process: a Create
// runc does not know of yet, or a view not yet torn down. containerd asks
// again after the next task delete. The connection to containerd is closed
// by a shutdown callback, once the shim really exits.
func (s *service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.creating > 0 || len(s.views) > 0 {
		log.G(ctx).WithFields(log.Fields{"creating": s.creating, "views": len(s.views)}).Debug("snapview: shutdown deferred: views in use")
		return &ptypes.Empty{}, nil
	}
	return s.TTRPCTaskService.Shutdown(ctx, r)
}

// normaliseOptions reads snapview's configuration from r.Options and replaces
// them with what runc's service accepts: its own options or nothing. runc's
// service type-asserts *options.Options unchecked, so anything else reaching
// it would fail the create or panic the shim.
func normaliseOptions(r *taskAPI.CreateTaskRequest) (*config.Config, error) {
	cfg, err := config.FromOptions(r.Options)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	r.Options, err = cfg.RuncAny()
	if err != nil {
		return nil, err
	}
	return cfg, nil
}

func fromTypes(mounts []*types.Mount) []rootfs.Mount {
	out := make([]rootfs.Mount, 0, len(mounts))
	for _, m := range mounts {
		out = append(out, rootfs.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	return out
}

func toTypes(mounts []rootfs.Mount) []*types.Mount {
	out := make([]*types.Mount, 0, len(mounts))
	for _, m := range mounts {
		out = append(out, &types.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	return out
}
