package shim

import (
	"context"
	"flag"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/snapview/snapview/pkg/backend"
	"github.com/snapview/snapview/pkg/lifecycle"
)

// stopBudget bounds the whole `delete` action, runc's part included, from
// the moment Stop is entered: containerd kills the action after 5 seconds
// (io.containerd.timeout.shim.cleanup), and a teardown cut short there
// leaves more behind than one that gave up on containerd in time.
const stopBudget = 4 * time.Second

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

// stopView tears down the view of container id after its shim is gone,
// from what the bundle holds. A bundle that shows no view costs nothing:
// containerd is not called.
func stopView(ctx context.Context, bundlePath, id string) error {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return err
	}
	b := backend.New(grpcAddress())
	defer func() { _ = b.Close() }()
	return lifecycle.New(b).TeardownBundle(namespaces.WithNamespace(ctx, ns), ns, id, bundlePath)
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
