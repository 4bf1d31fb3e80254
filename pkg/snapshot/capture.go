package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/snapshot/record"
)

// capture is a capture in progress: its lease and the lock that says its
// command is alive.
type capture struct {
	n     *Node
	lease leases.Lease
	lock  *os.File
	path  string
}

// startCapture locks a file that says this command is alive, then creates
// the capture's lease (no expiry: a long capture must not outlive it),
// labelled with the lock's name and, if the capture will pause it, the
// container's. It returns ctx with the lease, under which everything the
// capture makes is created.
func (n *Node) startCapture(ctx context.Context, id, container string, pause bool) (_ *capture, _ context.Context, retErr error) {
	dir := record.CaptureDir(n.StateDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, ctx, fmt.Errorf("snapview: the captures' lock directory: %w", err)
	}
	path := filepath.Join(dir, id+".lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, ctx, fmt.Errorf("snapview: the capture's lock: %w", err)
	}
	defer func() {
		if retErr != nil {
			f.Close()
			os.Remove(path)
		}
	}()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return nil, ctx, fmt.Errorf("snapview: lock %s: %w", path, err)
	}
	labels := map[string]string{record.LabelSnapshot: id, record.LabelCapture: filepath.Base(path)}
	if pause {
		labels[record.LabelPaused] = container
	}
	l, err := n.Client.LeasesService().Create(ctx, leases.WithID(record.LeasePrefix+id), leases.WithLabels(labels))
	if err != nil {
		return nil, ctx, fmt.Errorf("snapview: the capture's lease: %w", err)
	}
	return &capture{n: n, lease: l, lock: f, path: path}, leases.WithLease(ctx, l.ID), nil
}

// end ends the capture: its lease goes (with a synchronous garbage
// collection when it failed, so that what it made goes with it), then its
// lock.
func (c *capture) end(ctx context.Context, failed error) error {
	cctx, cancel := cleanupContext(ctx)
	defer cancel()
	var opts []leases.DeleteOpt
	if failed != nil {
		opts = append(opts, leases.SynchronousDelete)
	}
	err := c.n.Client.LeasesService().Delete(leases.WithLease(cctx, ""), c.lease, opts...)
	if errdefs.IsNotFound(err) {
		err = nil
	}
	if err != nil {
		log.G(ctx).WithError(err).WithField("lease", c.lease.ID).Warn("snapview: the capture's lease is left to the sweep")
		c.lock.Close() // the sweep finds the lock free
		return nil
	}
	os.Remove(c.path)
	c.lock.Close()
	return nil
}

func cleanupContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
}

// pauseNeeded returns the container's task, if it has one, and whether the
// capture must pause it: a running task is paused (cgroup freezer, through
// the task API) unless noPause; a paused one stays paused; a created or
// stopped one, or none, needs no pause.
func (n *Node) pauseNeeded(ctx context.Context, ctr client.Container, noPause bool) (client.Task, bool, error) {
	task, err := ctr.Task(ctx, nil)
	if errdefs.IsNotFound(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("snapview: container %s: its task: %w", ctr.ID(), err)
	}
	st, err := task.Status(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("snapview: container %s: its task's status: %w", ctr.ID(), err)
	}
	return task, st.Status == client.Running && !noPause, nil
}

// pause pauses task and returns what resumes it, whatever happened since.
func (n *Node) pause(ctx context.Context, task client.Task, id string) (func(), error) {
	if err := task.Pause(ctx); err != nil {
		return nil, fmt.Errorf("snapview: pause container %s for the capture: %w", id, err)
	}
	log.G(ctx).WithField("id", id).Debug("snapview: container paused for a snapshot")
	return func() {
		cctx, cancel := cleanupContext(ctx)
		defer cancel()
		if err := task.Resume(cctx); err != nil {
			log.G(ctx).WithError(err).WithField("id", id).Error("snapview: resume the container after the capture")
			return
		}
		log.G(ctx).WithField("id", id).Debug("snapview: container resumed after the snapshot")
	}, nil
}

// imageRecord is the image record of snapshot rec.
func imageRecord(rec record.Record) images.Image {
	return images.Image{Name: record.ImageName(rec.ID), Target: rec.Target, Labels: rec.Labels()}
}

// containerSpec reads a container's OCI spec.
func containerSpec(info containers.Container) (*specs.Spec, error) {
	if info.Spec == nil {
		return nil, errors.New("no spec")
	}
	var s specs.Spec
	if err := typeurl.UnmarshalTo(info.Spec, &s); err != nil {
		return nil, err
	}
	return &s, nil
}
