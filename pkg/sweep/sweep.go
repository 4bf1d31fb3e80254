// Package sweep removes orphaned views: a snapview lease whose container no
// longer exists, with the view it holds and, when the bundle directory is
// known, a mount left on its mountpoint.
//
// Orphans exist only when every other cleanup path failed: task Delete, and
// the dead-shim `delete` action (for example because containerd was
// unreachable at that moment). The sweep runs in the background when a shim
// starts, for its namespace, and on demand with `snapviewctl gc`.
//
// A lease is an orphan only if its snapview.io/container label names a
// container that containerd does not know: snapview creates a lease after the
// container record and deletes it before the record can be deleted, so a
// live container's lease is never taken.
package sweep

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	containersapi "github.com/containerd/containerd/api/services/containers/v1"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/backend"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/view"
)

// Orphan is a view that was removed, or would be in a dry run.
type Orphan struct {
	Namespace   string
	ContainerID string
	Lease       string
	// Views are the snapshots the lease held, as "snapshotter/key".
	Views []string
	// Mountpoint is the leftover mountpoint that was unmounted, if any.
	Mountpoint string
}

// Options of a sweep.
type Options struct {
	// BundleRoot is the directory of the namespace's bundles
	// (<containerd state>/io.containerd.runtime.v2.task/<namespace>), where
	// a leftover view mountpoint would be; empty skips mounts.
	BundleRoot string
	// DryRun reports orphans without removing them.
	DryRun bool
}

// Namespace sweeps the namespace of ctx and returns the orphans it found.
// Every orphan is attempted; the first error is returned.
func Namespace(ctx context.Context, b *backend.Backend, opts Options) ([]Orphan, error) {
	lm, err := b.Leases()
	if err != nil {
		return nil, err
	}
	cc, err := b.Containers()
	if err != nil {
		return nil, err
	}
	ls, err := lm.List(ctx, fmt.Sprintf("labels.%q", lease.LabelContainer))
	if err != nil {
		return nil, fmt.Errorf("list snapview leases: %w", err)
	}
	var (
		orphans []Orphan
		errs    []error
	)
	for _, l := range ls {
		id := l.Labels[lease.LabelContainer]
		if l.ID != lease.ID(id) {
			continue // not a lease snapview made
		}
		if _, err := cc.Get(ctx, &containersapi.GetContainerRequest{ID: id}); err == nil {
			continue
		} else if !errdefs.IsNotFound(errgrpc.ToNative(err)) {
			errs = append(errs, fmt.Errorf("look up container %s: %w", id, err))
			continue
		}
		o := Orphan{ContainerID: id, Lease: l.ID}
		res, err := lm.ListResources(ctx, l)
		if err != nil {
			errs = append(errs, fmt.Errorf("list resources of lease %s: %w", l.ID, err))
			continue
		}
		if err := remove(ctx, b, opts, &o, res); err != nil {
			errs = append(errs, err)
		}
		orphans = append(orphans, o)
	}
	return orphans, errors.Join(errs...)
}

// remove removes one orphan: its mount, its views, then its lease.
func remove(ctx context.Context, b *backend.Backend, opts Options, o *Orphan, res []leases.Resource) error {
	logger := log.G(ctx).WithFields(log.Fields{"id": o.ContainerID, "lease": o.Lease})
	if opts.BundleRoot != "" {
		mp := filepath.Join(opts.BundleRoot, o.ContainerID, "snapview", "view")
		if _, err := os.Stat(mp); err == nil {
			o.Mountpoint = mp
			if !opts.DryRun {
				if err := view.Unmount(mp); err != nil {
					return err
				}
			}
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	for _, r := range res {
		sn, ok := strings.CutPrefix(r.Type, "snapshots/")
		if !ok || r.ID != view.Key(o.ContainerID) {
			continue
		}
		o.Views = append(o.Views, sn+"/"+r.ID)
		if opts.DryRun {
			continue
		}
		s, err := b.Snapshotter(sn)
		if err != nil {
			return err
		}
		if err := view.Remove(ctx, s, o.ContainerID); err != nil {
			return err
		}
	}
	if opts.DryRun {
		return nil
	}
	lm, err := b.Leases()
	if err != nil {
		return err
	}
	if err := lease.Release(ctx, lm, o.ContainerID); err != nil {
		return err
	}
	logger.WithFields(log.Fields{"views": o.Views, "target": o.Mountpoint}).Warn("snapview: orphaned view removed")
	return nil
}
