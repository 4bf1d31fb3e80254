package sweep

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/snapshot/record"
	"github.com/snapview/snapview/pkg/view"
)

// Backend is what the sweep calls in containerd: the lifecycle's, and a
// task's resume for the container a dead capture left paused.
type Backend interface {
	lifecycle.Backend
	// ResumePaused resumes the task of container id if it is paused.
	ResumePaused(ctx context.Context, id string) error
}

// captures removes the leases of snapshot captures whose command is gone,
// and with a synchronous garbage collection what each had made: a capture
// holds an exclusive lock on its file in captureDir for as long as its
// command runs, so a lock the sweep can take (or a lock file that is gone)
// is a dead capture's. A container such a capture paused is resumed first.
func captures(ctx context.Context, b Backend, captureDir string, dryRun bool) ([]Orphan, error) {
	lm, err := b.Leases()
	if err != nil {
		return nil, err
	}
	ls, err := lm.List(ctx, fmt.Sprintf("labels.%q", record.LabelCapture))
	if err != nil {
		return nil, fmt.Errorf("list snapview's capture leases: %w", err)
	}
	var (
		found []Orphan
		errs  []error
	)
	for _, l := range ls {
		id := l.Labels[record.LabelSnapshot]
		name := l.Labels[record.LabelCapture]
		if _, err := record.ParseID(id); err != nil || l.ID != record.LeasePrefix+id || name != id+".lock" {
			continue // not a lease snapview made
		}
		path := filepath.Join(captureDir, name)
		alive, unlock, err := locked(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("capture %s: %w", id, err))
			continue
		}
		if alive {
			continue
		}
		o := Orphan{Snapshot: id, Lease: l.ID, ContainerID: l.Labels[record.LabelPaused]}
		if dryRun {
			unlock()
			found = append(found, o)
			continue
		}
		err = unmountCapture(filepath.Join(captureDir, id+".d"))
		if err == nil {
			err = removeCapture(ctx, b, lm, l)
		}
		if err == nil {
			err = os.Remove(path)
			if errors.Is(err, fs.ErrNotExist) {
				err = nil
			}
		}
		unlock()
		if err != nil {
			errs = append(errs, fmt.Errorf("capture %s: %w", id, err))
			continue
		}
		log.G(ctx).WithFields(log.Fields{"snapshot": id, "lease": l.ID, "resumed": o.ContainerID}).Warn("snapview: a dead capture's lease removed, with what it made")
		found = append(found, o)
	}
	return found, errors.Join(errs...)
}

// unmountCapture unmounts what a dead capture left mounted in dir (a view
// of the container's image, its rootfs), deepest first, and removes dir.
func unmountCapture(dir string) error {
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("read mountinfo: %w", err)
	}
	slices.SortFunc(infos, func(a, b *mountinfo.Info) int { return strings.Compare(b.Mountpoint, a.Mountpoint) })
	for _, mi := range infos {
		if err := view.Unmount(mi.Mountpoint); err != nil {
			return err
		}
	}
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return os.Remove(dir)
}

// removeCapture resumes the container capture lease l paused, if any, and
// deletes l with a synchronous garbage collection.
func removeCapture(ctx context.Context, b Backend, lm leases.Manager, l leases.Lease) error {
	if c := l.Labels[record.LabelPaused]; c != "" {
		if err := b.ResumePaused(ctx, c); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("resume container %s, which the capture paused: %w", c, err)
		}
	}
	if err := lm.Delete(ctx, l, leases.SynchronousDelete); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("delete lease %s: %w", l.ID, err)
	}
	return nil
}

// locked reports whether a live process holds the lock file at path; when
// it does not, the sweep holds it until unlock, so that no capture of that
// name takes it meanwhile. A lock file that is gone is no one's.
func locked(path string) (alive bool, unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return false, func() {}, nil
	}
	if err != nil {
		return false, nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return true, nil, nil
		}
		return false, nil, err
	}
	return false, func() { f.Close() }, nil
}

// captureDir returns the captures' lock directory for a namespace's bundle
// root (<state>/io.containerd.runtime.v2.task/<namespace>).
func captureDir(bundleRoot string) string {
	return filepath.Join(filepath.Dir(strings.TrimSuffix(bundleRoot, "/")), ".snapview-captures")
}
