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

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"github.com/snapview/snapview/pkg/config"
)

// service wraps runc's task service. Methods not defined here are runc's,
// forwarded through the embedded interface on purpose.
type service struct {
	taskAPI.TTRPCTaskService

	// grpcAddress is containerd's gRPC socket, for calls back into containerd.
	grpcAddress string
}

func newService(inner taskAPI.TTRPCTaskService, grpcAddress string) *service {
	return &service{
		TTRPCTaskService: inner,
		grpcAddress:      grpcAddress,
	}
}

// RegisterTTRPC registers the wrapper, not the inner service, so that every
// RPC enters through snapview.
func (s *service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	return nil
}

// Create normalises the runtime options into snapview's configuration, hands
// runc's service only runc options (or none), and creates the task.
func (s *service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	cfg, err := normaliseOptions(r)
	if err != nil {
		log.G(ctx).WithError(err).WithField("id", r.ID).Error("snapview: rejected runtime options")
		return nil, errgrpc.ToGRPC(err)
	}
	log.G(ctx).WithFields(log.Fields{"id": r.ID, "config": cfg.Source}).Debug("snapview: configuration loaded")
	return s.TTRPCTaskService.Create(ctx, r)
}

// Delete forwards to runc's service.
func (s *service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	return s.TTRPCTaskService.Delete(ctx, r)
}

// Shutdown forwards to runc's service, which exits the shim once it serves no
// container.
func (s *service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
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
