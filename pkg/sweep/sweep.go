// Package sweep removes orphaned views: a snapview lease whose container no
// longer exists, with the view it holds and what is left of it on this host,
// and view mounts left in bundles that containerd already deleted.
//
// Orphans exist only when every other cleanup path failed: task Delete, and
// the dead-shim `delete` action (for example because containerd was
// unreachable at that moment). The sweep runs in the background when a shim
// starts, over every namespace, if it is that shim's turn (TakeTurn), and on
// demand with `snapviewctl gc`.
//
// A lease is an orphan only if its snapview.io/container label names a
// container that containerd does not know: snapview creates a lease after the
// container record and deletes it before the record can be deleted, so a
// live container's lease is never taken. Removal goes through the same
// teardown as every other path (lifecycle.Teardown), which re-reads the
// lease's and the view's labels and removes them only if they still carry
// the owner the sweep found, so that a container of the same id created in
// the meantime keeps its new view.
package sweep

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"

	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/view"
)

// Orphan is what the sweep removed (or, in a dry run, would remove) for
// one container.
type Orphan struct {
	// ContainerID is the orphaned view's container (for a dead capture,
	// the container it had paused and the sweep resumed, if any).
	ContainerID string
	// Snapshot is the snapshot of a dead capture.
	Snapshot string
	// Lease is the orphaned lease, or "" for a leftover mount alone.
	Lease string
	// Views are the snapshots the lease held, as "snapshotter/key".
	Views []string
	// Mountpoints are the leftover mounts (the view's, the volumes') that
	// were unmounted.
	Mountpoints []string
}

// Options of a sweep.
type Options struct {
	// BundleRoot is the directory of the namespace's bundles
	// (<containerd state>/io.containerd.runtime.v2.task/<namespace>), where
	// leftover view mounts are looked for; empty skips mounts.
	BundleRoot string
	// DryRun reports orphans without removing them.
	DryRun bool
}

// Namespace sweeps namespace ns and returns the orphans it removed, or would
// remove in a dry run. Every orphan is attempted; the errors of those that
// could not be removed are joined, and they are not in the result.
func Namespace(ctx context.Context, b Backend, ns string, opts Options) ([]Orphan, error) {
	lc := lifecycle.New(b)
	lm, err := b.Leases()
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
		if _, _, err := b.Container(ctx, id); err == nil {
			continue
		} else if !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("look up container %s: %w", id, err))
			continue
		}
		bundlePath := ""
		if opts.BundleRoot != "" {
			bundlePath = filepath.Join(opts.BundleRoot, id)
		}
		v, err := lc.FromLease(ctx, ns, id, bundlePath, l)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		o := Orphan{ContainerID: id, Lease: l.ID}
		if v.State.ViewKey != "" {
			o.Views = []string{v.State.Snapshotter + "/" + v.State.ViewKey}
		}
		mp := v.State.Mountpoint
		wasMounted := bundlePath != "" && mounted(mp)
		if opts.DryRun {
			if wasMounted {
				o.Mountpoints = []string{mp}
			}
			orphans = append(orphans, o)
			continue
		}
		if err := lc.Teardown(ctx, v); err != nil {
			errs = append(errs, err)
			continue
		}
		if v.Superseded() {
			continue // a container of the same id was created meanwhile: not an orphan
		}
		if wasMounted && !mounted(mp) {
			// Only what the teardown took down: a mount it left (the
			// bundle is not the orphan's) is not reported, and stays for
			// the leftover-mount pass to judge.
			o.Mountpoints = []string{mp}
		}
		log.G(ctx).WithFields(log.Fields{"id": id, "lease": l.ID, "views": o.Views, "target": o.Mountpoints}).Warn("snapview: orphaned view removed")
		orphans = append(orphans, o)
	}
	if opts.BundleRoot != "" {
		dead, err := captures(ctx, b, captureDir(opts.BundleRoot), opts.DryRun)
		orphans = append(orphans, dead...)
		errs = append(errs, err)
	}
	if opts.BundleRoot != "" {
		seen := map[string]bool{}
		for _, o := range orphans {
			for _, mp := range o.Mountpoints {
				seen[mp] = true
			}
		}
		left, err := leftoverMounts(ctx, b, opts, seen)
		orphans = merge(orphans, left)
		errs = append(errs, err)
	}
	return orphans, errors.Join(errs...)
}

// merge adds the leftover mounts to the orphan of their container, or as
// an orphan of their own: one entry per container.
func merge(orphans, left []Orphan) []Orphan {
	for _, o := range left {
		i := slices.IndexFunc(orphans, func(p Orphan) bool { return p.ContainerID == o.ContainerID })
		if i < 0 {
			orphans = append(orphans, o)
			continue
		}
		orphans[i].Mountpoints = append(orphans[i].Mountpoints, o.Mountpoints...)
	}
	return orphans
}

// leftoverMounts unmounts the mounts snapview makes in a bundle (a view, a
// volume) under the bundle root that no container owns any more: in a
// bundle containerd renamed to .<id> to delete it (it could not, with them
// still mounted there), or in the bundle of a container containerd does not
// know. A .<id> bundle left with nothing mounted under it is then removed,
// as containerd would have done.
func leftoverMounts(ctx context.Context, b lifecycle.Backend, opts Options, seen map[string]bool) ([]Orphan, error) {
	root := filepath.Clean(opts.BundleRoot)
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(root))
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	var (
		found []Orphan
		errs  []error
	)
	// Deepest first, so that a mount inside another goes before it.
	slices.SortFunc(infos, func(a, b *mountinfo.Info) int { return strings.Compare(b.Mountpoint, a.Mountpoint) })
	known := map[string]bool{}   // bundle name → its container exists
	deleted := map[string]bool{} // .<id> bundles to finish removing
	for _, mi := range infos {
		rel, err := filepath.Rel(root, mi.Mountpoint)
		if err != nil || seen[mi.Mountpoint] {
			continue
		}
		name, _, ok := strings.Cut(rel, string(filepath.Separator))
		if !ok || !isSnapviewMount(filepath.Join(root, name), mi.Mountpoint) {
			continue
		}
		id, isDeleted := strings.CutPrefix(name, ".")
		if !isDeleted {
			live, checked := known[name]
			if !checked {
				if _, _, err := b.Container(ctx, id); err == nil {
					live = true
				} else if !errdefs.IsNotFound(err) {
					errs = append(errs, fmt.Errorf("look up container %s: %w", id, err))
					live = true // unknown: left alone
				}
				known[name] = live
			}
			if live {
				continue
			}
		}
		o := Orphan{ContainerID: id, Mountpoints: []string{mi.Mountpoint}}
		if !opts.DryRun {
			if err := view.Unmount(mi.Mountpoint); err != nil {
				errs = append(errs, err)
				continue
			}
			if isDeleted {
				deleted[filepath.Join(root, name)] = true
			}
			log.G(ctx).WithFields(log.Fields{"id": id, "target": mi.Mountpoint}).Warn("snapview: leftover mount removed")
		}
		found = append(found, o)
	}
	for _, dir := range slices.Sorted(maps.Keys(deleted)) {
		if err := removeDeletedBundle(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return found, errors.Join(errs...)
}

// isSnapviewMount reports whether mountpoint is one snapview makes in
// bundle: the view's, or a volume's.
func isSnapviewMount(bundlePath, mountpoint string) bool {
	if mountpoint == bundle.Mountpoint(bundlePath) {
		return true
	}
	name, ok := strings.CutPrefix(mountpoint, bundle.VolumesDir(bundlePath)+string(filepath.Separator))
	return ok && name != "" && !strings.Contains(name, string(filepath.Separator)) && bundle.VolumeMountpoint(bundlePath, name) == mountpoint
}

// removeDeletedBundle removes a bundle containerd had renamed for deletion,
// unless something is still mounted under it.
func removeDeletedBundle(dir string) error {
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("read mountinfo: %w", err)
	}
	if len(infos) > 0 {
		return fmt.Errorf("%s still has %d mounts; left for a later sweep", dir, len(infos))
	}
	return os.RemoveAll(dir)
}

func mounted(path string) bool {
	m, err := mountinfo.Mounted(path)
	return err == nil && m
}
