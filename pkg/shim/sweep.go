package shim

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/backend"
	"github.com/snapview/snapview/pkg/fault"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/sweep"
)

const (
	// sweepDelay keeps the start-up sweep off the path of the shim's first
	// Create; a shim that exits sooner simply does not sweep.
	sweepDelay = 2 * time.Second
	// defaultSweepInterval is how long the shims of a node leave between
	// two sweeps of it.
	defaultSweepInterval = time.Minute
	// SweepIntervalEnv overrides it (a Go duration; "0" sweeps at every
	// shim start). containerd passes its environment to the shims.
	SweepIntervalEnv = "SNAPVIEW_SWEEP_INTERVAL"
	// PointSweepTurn is the crash point of the fault build right after a
	// shim took the sweep's turn, for the shim's own id.
	PointSweepTurn = "sweep-turn"
	// taskStateDir is the base name of containerd's task state directory:
	// the shim runs in <it>/<namespace>/<id>.
	taskStateDir = "io.containerd.runtime.v2.task"
)

// sweepInterval returns the node's sweep interval, from the environment.
func sweepInterval(ctx context.Context) time.Duration {
	v := os.Getenv(SweepIntervalEnv)
	if v == "" {
		return defaultSweepInterval
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		log.G(ctx).WithField(SweepIntervalEnv, v).Warnf("snapview: not a duration; the sweep interval stays %s", defaultSweepInterval)
		return defaultSweepInterval
	}
	return d
}

// sweepOnStart sweeps the node's orphaned views, in the background, shortly
// after the shim started, if it is this shim's turn: one shim of the node
// sweeps every namespace once per interval (sweep.TurnFile), so that a
// node's sweeps do not grow with the shims it starts. bundle is the shim's
// working directory, the bundle of the container that started it.
func sweepOnStart(ctx context.Context, b *backend.Backend, bundle string) {
	select {
	case <-time.After(sweepDelay):
	case <-ctx.Done():
		return
	}
	root := filepath.Dir(filepath.Dir(bundle))
	if filepath.Base(root) != taskStateDir {
		log.G(ctx).WithField("bundle", bundle).Warn("snapview: the bundle is not in containerd's task state directory; no sweep")
		return
	}
	interval := sweepInterval(ctx)
	turn, why, err := sweep.TakeTurn(root, interval)
	if err != nil {
		log.G(ctx).WithError(err).Warn("snapview: orphan sweep skipped")
		return
	}
	if turn == nil {
		log.G(ctx).WithField("reason", why).Debug("snapview: not this shim's turn to sweep")
		return
	}
	fault.Point(PointSweepTurn, filepath.Base(bundle))
	ctx, cancel := context.WithTimeout(ctx, lifecycle.CleanupTimeout)
	defer cancel()
	t0 := time.Now()
	n, err := sweepNode(ctx, b, root)
	if err != nil {
		log.G(ctx).WithError(err).Warn("snapview: orphan sweep incomplete")
	}
	// Recorded even when incomplete: the next turn retries, one interval on.
	if ferr := turn.Finish(time.Now()); ferr != nil {
		log.G(ctx).WithError(ferr).Warn("snapview: the sweep's turn file")
	}
	log.G(ctx).WithFields(log.Fields{"orphans": n, "took_us": time.Since(t0).Microseconds(), "interval": interval}).Info("snapview: node swept")
}

// sweepNode sweeps every namespace of the containerd b talks to, whose task
// state directory is root, and returns how many orphans it removed.
func sweepNode(ctx context.Context, b *backend.Backend, root string) (int, error) {
	nss, err := b.Namespaces(ctx)
	if err != nil {
		return 0, err
	}
	var (
		n    int
		errs []error
	)
	for _, ns := range nss {
		orphans, err := sweep.Namespace(namespaces.WithNamespace(ctx, ns), b, ns, sweep.Options{BundleRoot: filepath.Join(root, ns)})
		n += len(orphans)
		if err != nil {
			errs = append(errs, fmt.Errorf("namespace %s: %w", ns, err))
		}
	}
	return n, errors.Join(errs...)
}
