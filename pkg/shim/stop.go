package shim

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	containersapi "github.com/containerd/containerd/api/services/containers/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/backend"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/view"
)

// stopBudget bounds the view cleanup of the dead-shim path: containerd gives
// the whole `delete` action 5 seconds, and runc's part comes first.
const stopBudget = 3 * time.Second

// grpcAddress returns containerd's gRPC address in the `delete` action, where
// no plugin properties exist: $GRPC_ADDRESS, else the -address flag.
func grpcAddress() string {
	if a := os.Getenv("GRPC_ADDRESS"); a != "" {
		return a
	}
	if f := flag.Lookup("address"); f != nil {
		return f.Value.String()
	}
	return ""
}

// stopView removes the view of container id after its shim died, from the
// bundle's state file alone. A missing or unreadable state file falls back to
// the deterministic names (mountpoint, view key, lease id), touching only a
// lease and a view whose labels say they are this container's.
func stopView(ctx context.Context, bundlePath, id string) error {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, ns), stopBudget)
	defer cancel()
	logger := log.G(ctx).WithFields(log.Fields{"id": id, "bundle": bundlePath})

	b := backend.New(grpcAddress())
	defer b.Close()

	st, err := bundle.ReadState(bundlePath)
	if err == nil {
		logger.WithFields(log.Fields{"key": st.ViewKey, "lease": st.LeaseID}).Info("snapview: removing the view of a dead shim's container")
		return teardown(ctx, b, bundlePath, st, newStopwatch())
	}
	if errors.Is(err, bundle.ErrNoState) {
		logger.Info("snapview: no state file; checking the deterministic names for a view left by a crash")
	} else {
		logger.WithError(err).Warn("snapview: unreadable state file; falling back to the deterministic names")
	}
	st, err = fallbackState(ctx, b, bundlePath, id, ns)
	if err != nil {
		return err
	}
	return teardown(ctx, b, bundlePath, st, newStopwatch())
}

// fallbackState builds the state of a view from its deterministic names,
// keeping only the objects that exist and carry this container's labels.
func fallbackState(ctx context.Context, b *backend.Backend, bundlePath, id, ns string) (*bundle.State, error) {
	st := &bundle.State{Namespace: ns, ContainerID: id, Mountpoint: mountpoint(bundlePath)}
	lm, err := b.Leases()
	if err != nil {
		return st, err
	}
	ls, err := lm.List(ctx, fmt.Sprintf("id==%q", lease.ID(id)))
	if err != nil {
		return st, fmt.Errorf("snapview: list lease %s: %w", lease.ID(id), err)
	}
	if len(ls) == 1 && lease.IsOwned(ls[0].Labels, id) {
		st.LeaseID = ls[0].ID
	}
	cc, err := b.Containers()
	if err != nil {
		return st, err
	}
	resp, err := cc.Get(ctx, &containersapi.GetContainerRequest{ID: id})
	if err != nil {
		if errdefs.IsNotFound(errgrpc.ToNative(err)) {
			// The view's gc.bref.container label lets containerd's GC take
			// it once the lease is gone.
			return st, nil
		}
		return st, fmt.Errorf("snapview: look up container %s: %w", id, err)
	}
	sn, err := b.Snapshotter(resp.Container.Snapshotter)
	if err != nil {
		return st, err
	}
	info, err := sn.Stat(ctx, view.Key(id))
	if err == nil && lease.IsOwned(info.Labels, id) {
		st.Snapshotter = resp.Container.Snapshotter
		st.ViewKey = info.Name
		st.Activation = view.Key(id)
	}
	return st, nil
}

// bundleOf returns the bundle of container id in the `delete` action, which
// containerd runs with the working directory set to a bundle of the same
// namespace (runc's manager does the same).
func bundleOf(id string) (string, error) {
	cwd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	return filepath.Join(filepath.Dir(cwd), id), nil
}
