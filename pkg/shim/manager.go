package shim

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/manager"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/log"
	"google.golang.org/protobuf/proto"

	"github.com/snapview/snapview/pkg/config"
)

// RuntimeName is the runtime type containerd knows snapview by.
const RuntimeName = "io.containerd.snapview.v2"

// NewManager returns snapview's shim manager: runc's, under snapview's name,
// with runtime options normalised for Start and Info and Stop extended to
// clean up after a shim that died.
func NewManager() shim.Manager {
	return &shimManager{Manager: manager.NewShimManager(RuntimeName), stopView: stopView}
}

// shimManager wraps runc's shim manager. Name is runc's, forwarded through the
// embedded interface on purpose; Start, Stop and Info are changed here.
type shimManager struct {
	shim.Manager
	// stopView tears down a view in the `delete` action (stopView; tests
	// replace it).
	stopView func(ctx context.Context, bundlePath, id string) error
}

// Start launches (or joins) the shim process. runc's manager reads the runtime
// options from stdin to place the shim in ShimCgroup, and understands only its
// own options type, so stdin is replaced by the normalised runc options.
//
// containerd 2.3 and later send a bootstrap message instead, with the
// options inside it (see bootstrap.go): they are taken from there. Stdin
// that is not usable is passed on as nothing, which is what runc's manager
// makes of it too: a configuration error is reported by Create, with its
// source. Start must not log: containerd reads its combined output as the
// bootstrap answer.
func (m *shimManager) Start(ctx context.Context, id string, opts shim.StartOpts) (shim.BootstrapParams, error) {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		return shim.BootstrapParams{}, fmt.Errorf("snapview: read runtime options from stdin: %w", err)
	}
	ns, _ := namespaces.Namespace(ctx)
	if exts, ok := parseBootstrap(data, id, ns); ok {
		data = nil
		for _, a := range exts {
			if b, err := proto.Marshal(a); err == nil && a.GetTypeUrl() != "" {
				if _, err := config.ReadOptions(b); err == nil {
					data = b
					break
				}
			}
		}
	}
	runc, err := runcOptionsBytes(data)
	if err != nil {
		runc = nil
	}
	r, w, err := os.Pipe()
	if err != nil {
		return shim.BootstrapParams{}, fmt.Errorf("snapview: pipe runtime options: %w", err)
	}
	defer r.Close()
	if _, err := w.Write(runc); err != nil {
		w.Close()
		return shim.BootstrapParams{}, fmt.Errorf("snapview: pipe runtime options: %w", err)
	}
	w.Close()
	stdin := os.Stdin
	os.Stdin = r
	defer func() { os.Stdin = stdin }()
	return m.Manager.Start(ctx, id, opts)
}

// Stop is the `delete` action, which containerd runs after every task
// delete (and waits for), and after a shim died: runc's manager
// force-deletes the container and unmounts its rootfs, then snapview tears
// down the view from what the bundle holds. The whole action is bounded by
// stopBudget from here. A failed view cleanup is logged, not returned: the
// task must still be deleted, and what is left is reclaimed by containerd's
// GC (the view is tied to the container record) and by the sweep.
func (m *shimManager) Stop(ctx context.Context, id string) (shim.StopStatus, error) {
	deadline := time.Now().Add(stopBudget)
	ss, err := m.Manager.Stop(ctx, id)
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	bundlePath, berr := bundleOf(id)
	if berr != nil {
		log.G(ctx).WithError(berr).WithField("id", id).Error("snapview: cannot find the bundle; the view is left to the sweep")
		return ss, err
	}
	if verr := m.stopView(ctx, bundlePath, id); verr != nil {
		log.G(ctx).WithError(verr).WithField("id", id).Error("snapview: dead-shim view cleanup incomplete")
	}
	return ss, err
}

// Info reports the runtime's information; runc's manager is handed the
// normalised runc options, never runtimeoptions, which it would reject.
func (m *shimManager) Info(ctx context.Context, optionsR io.Reader) (*types.RuntimeInfo, error) {
	data, err := io.ReadAll(optionsR)
	if err != nil {
		return nil, fmt.Errorf("snapview: read runtime options: %w", err)
	}
	runc, err := runcOptionsBytes(data)
	if err != nil {
		return nil, err
	}
	return m.Manager.Info(ctx, bytes.NewReader(runc))
}

// runcOptionsBytes turns the runtime options containerd wrote on stdin into
// the marshalled runc options for runc's manager, or nil for none.
func runcOptionsBytes(data []byte) ([]byte, error) {
	cfg, err := config.ReadOptions(data)
	if err != nil {
		return nil, err
	}
	a, err := cfg.RuncAny()
	if err != nil || a == nil {
		return nil, err
	}
	return proto.Marshal(a)
}
