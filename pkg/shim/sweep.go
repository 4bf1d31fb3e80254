package shim

import (
	"context"
	"time"

	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/backend"
	"github.com/snapview/snapview/pkg/sweep"
)

// sweepDelay keeps the start-up sweep off the path of the shim's first
// Create; a shim that exits sooner simply does not sweep.
const sweepDelay = 2 * time.Second

// sweepOnStart removes orphaned views of the shim's namespace once, in the
// background, shortly after the shim started. ctx carries the namespace.
func sweepOnStart(ctx context.Context, b *backend.Backend, bundleRoot string) {
	select {
	case <-time.After(sweepDelay):
	case <-ctx.Done():
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	orphans, err := sweep.Namespace(ctx, b, sweep.Options{BundleRoot: bundleRoot})
	if err != nil {
		log.G(ctx).WithError(err).Warn("snapview: orphan sweep incomplete")
	}
	if len(orphans) > 0 {
		log.G(ctx).WithField("orphans", len(orphans)).Info("snapview: orphan sweep done")
	}
}
