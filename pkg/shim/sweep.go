package shim

import (
	"context"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/sweep"
)

// sweepDelay keeps the start-up sweep off the path of the shim's first
// Create; a shim that exits sooner simply does not sweep.
const sweepDelay = 2 * time.Second

// sweepOnStart removes orphaned views of the shim's namespace once, in the
// background, shortly after the shim started. ctx carries the namespace.
func sweepOnStart(ctx context.Context, b lifecycle.Backend, bundleRoot string) {
	select {
	case <-time.After(sweepDelay):
	case <-ctx.Done():
		return
	}
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, ns), lifecycle.CleanupTimeout)
	defer cancel()
	orphans, err := sweep.Namespace(ctx, b, ns, sweep.Options{BundleRoot: bundleRoot})
	if err != nil {
		log.G(ctx).WithError(err).Warn("snapview: orphan sweep incomplete")
	}
	if len(orphans) > 0 {
		log.G(ctx).WithField("orphans", len(orphans)).Info("snapview: orphan sweep done")
	}
}
