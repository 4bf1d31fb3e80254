// Package shim is snapview's containerd shim: runc's task service and shim
// manager, wrapped in-process.
//
// The task service wrapper changes Create, Delete and Shutdown and forwards
// every other RPC to runc's service unchanged, so that exec, kill, wait,
// pause, resume, pids, stats, update, checkpoint, close-io, resize-pty and
// connect, and every event, behave exactly as with io.containerd.runc.v2.
package shim

import (
	"context"
	"fmt"
	"sync"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"github.com/snapview/snapview/pkg/backend"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
)

// service wraps runc's task service. Methods not defined here are runc's,
// forwarded through the embedded interface on purpose.
type service struct {
	taskAPI.TTRPCTaskService

	backend *backend.Backend

	mu sync.Mutex
	// views holds the state of each container with a view, keyed by
	// namespace and container id: one shim process can serve a whole pod.
	views map[string]*viewEntry
}

type viewEntry struct {
	bundle string
	state  *bundle.State
}

func newService(inner taskAPI.TTRPCTaskService, grpcAddress string) *service {
	return &service{
		TTRPCTaskService: inner,
		backend:          backend.New(grpcAddress),
		views:            map[string]*viewEntry{},
	}
}

func viewKey(ns, id string) string { return ns + "/" + id }

// RegisterTTRPC registers the wrapper, not the inner service, so that every
// RPC enters through snapview.
func (s *service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	return nil
}

// Create prepares the container's view (when it gets one), persists its state
// and patches config.json, and only then calls runc's Create, which is when
// runc reads config.json. If anything fails, runc's Create included, every
// step is undone and Create fails with a snapview: error.
func (s *service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	logger := log.G(ctx).WithField("id", r.ID)
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

	sw := newStopwatch()
	p, reason, err := s.decide(ctx, ns, newCreateRequest(r.ID, r.Bundle, r.Rootfs), cfg, sw)
	if err != nil {
		logger.WithError(err).Error("snapview: create rejected")
		return nil, errgrpc.ToGRPC(err)
	}
	if p == nil {
		resp, err := s.TTRPCTaskService.Create(ctx, r)
		sw.lap("runc_create")
		logger.WithFields(sw.fields).WithFields(log.Fields{"reason": reason, "config": cfg.Source}).Info("snapview: no view for this container")
		return resp, err
	}
	sw.lap("stat")
	st, err := s.setup(ctx, p, sw)
	if err != nil {
		logger.WithError(err).Error("snapview: view setup failed")
		return nil, errgrpc.ToGRPC(err)
	}
	resp, err := s.TTRPCTaskService.Create(ctx, r)
	if err != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if terr := s.teardown(cctx, r.Bundle, st, newStopwatch()); terr != nil {
			logger.WithError(terr).Error("snapview: rollback after a failed runc create left something behind")
		}
		if rerr := p.spec.Restore(); rerr != nil {
			logger.WithError(rerr).Error("snapview: restore config.json")
		}
		return nil, errgrpc.ToGRPC(fmt.Errorf("snapview: create %s: %w", r.ID, errgrpc.ToNative(err)))
	}
	sw.lap("runc_create")
	s.mu.Lock()
	s.views[viewKey(ns, r.ID)] = &viewEntry{bundle: r.Bundle, state: st}
	s.mu.Unlock()
	logger.WithFields(sw.fields).WithFields(log.Fields{"key": st.ViewKey, "lease": st.LeaseID, "target": st.Mountpoint}).Info("snapview: container created with its view")
	return resp, nil
}

// Delete calls runc's Delete, then, for an init process with a view, removes
// the view: only once runc's container is gone is nothing using it.
func (s *service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	sw := newStopwatch()
	resp, err := s.TTRPCTaskService.Delete(ctx, r)
	sw.lap("runc_delete")
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
	s.mu.Lock()
	e := s.views[viewKey(ns, r.ID)]
	delete(s.views, viewKey(ns, r.ID))
	s.mu.Unlock()
	if e == nil {
		return resp, err
	}
	tctx, cancel := context.WithTimeout(context.WithoutCancel(namespaces.WithNamespace(ctx, ns)), 30*time.Second)
	defer cancel()
	if terr := s.teardown(tctx, e.bundle, e.state, sw); terr != nil {
		// The task is gone either way; what is left is reclaimed by
		// containerd's GC (the view's gc.bref.container label) or the sweep.
		log.G(ctx).WithError(terr).WithField("id", r.ID).Error("snapview: view teardown incomplete")
	}
	return resp, err
}

// Shutdown forwards to runc's service, which exits the shim once it serves no
// container. The connection to containerd is then closed off the reply path:
// containerd waits for this reply on every task delete.
func (s *service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
	resp, err := s.TTRPCTaskService.Shutdown(ctx, r)
	s.mu.Lock()
	idle := len(s.views) == 0
	s.mu.Unlock()
	if idle {
		go func() {
			if cerr := s.backend.Close(); cerr != nil {
				log.G(ctx).WithError(cerr).Debug("snapview: close containerd connection")
			}
		}()
	}
	return resp, err
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
