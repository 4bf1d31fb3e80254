package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/containerd/containerd/api/events" // registers the event types for typeurl
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// runOpts describes a container for start.
type runOpts struct {
	runtime     string
	runtimeOpts any // passed to client.WithRuntime: nil, runc or runtimeoptions
	snapshotter string
	args        []string
	annotations map[string]string
	terminal    bool
	stdin       io.Reader
	specOpts    []oci.SpecOpts
	noStart     bool
	// viewSnapshot gives the container a read-only rootfs: a View of the
	// image (client.WithNewSnapshotView) instead of a writable snapshot.
	viewSnapshot bool
	// image is the container's image (default: the suite's test image).
	image string
}

// running is a container with its task.
type running struct {
	ctr    client.Container
	task   client.Task
	stdout *harness.SafeBuffer
	stderr *harness.SafeBuffer
	exit   <-chan client.ExitStatus
}

// newContainer creates a container from the test image.
func newContainer(ctx context.Context, t *testing.T, d *harness.Daemon, id string, o runOpts) (client.Container, error) {
	t.Helper()
	c := d.Client()
	if o.image == "" {
		o.image = testImageID
	}
	img, err := c.GetImage(ctx, o.image)
	if err != nil {
		return nil, err
	}
	if o.snapshotter == "" {
		o.snapshotter = d.DefaultSnapshotter
	}
	if o.snapshotter == "" {
		o.snapshotter = "overlayfs"
	}
	specOpts := []oci.SpecOpts{oci.WithImageConfig(img), oci.WithProcessArgs(o.args...)}
	if len(o.annotations) > 0 {
		specOpts = append(specOpts, oci.WithAnnotations(o.annotations))
	}
	if o.terminal {
		specOpts = append(specOpts, oci.WithTTY)
	}
	specOpts = append(specOpts, o.specOpts...)
	snapshot := client.WithNewSnapshot(id+"-snapshot", img)
	if o.viewSnapshot {
		snapshot = client.WithNewSnapshotView(id+"-snapshot", img)
	}
	ctr, err := c.NewContainer(ctx, id,
		client.WithImage(img),
		client.WithSnapshotter(o.snapshotter),
		snapshot,
		client.WithRuntime(o.runtime, o.runtimeOpts),
		client.WithNewSpec(specOpts...),
	)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { deleteContainer(t, ctr) })
	return ctr, nil
}

// start creates and (unless noStart) starts a container and its task; the
// test's cleanup kills and deletes both.
func start(ctx context.Context, t *testing.T, d *harness.Daemon, id string, o runOpts) (*running, error) {
	t.Helper()
	ctr, err := newContainer(ctx, t, d, id, o)
	if err != nil {
		return nil, err
	}
	r := &running{ctr: ctr, stdout: &harness.SafeBuffer{}, stderr: &harness.SafeBuffer{}}
	stdin := o.stdin
	if stdin == nil {
		stdin = bytes.NewReader(nil)
	}
	streams := []cio.Opt{cio.WithStreams(stdin, r.stdout, r.stderr)}
	if o.terminal {
		streams = append(streams, cio.WithTerminal)
	}
	task, err := ctr.NewTask(ctx, cio.NewCreator(streams...))
	if err != nil {
		return nil, err
	}
	r.task = task
	if r.exit, err = task.Wait(ctx); err != nil {
		return nil, err
	}
	if o.noStart {
		return r, nil
	}
	if err := task.Start(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

// refused creates a container that snapview must refuse, and checks that
// the create fails with a snapview: error that says each of want; the
// test's leak check then finds that nothing was left.
func refused(ctx context.Context, t *testing.T, d *harness.Daemon, id string, o runOpts, want ...string) {
	t.Helper()
	_, err := start(ctx, t, d, id, o)
	if err == nil {
		t.Fatal("create succeeded")
	}
	for _, w := range append([]string{"snapview: "}, want...) {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not say %q", err, w)
		}
	}
}

// wait waits for the task to exit and returns its exit code.
func (r *running) wait(t *testing.T) (uint32, error) {
	t.Helper()
	select {
	case st := <-r.exit:
		code, _, err := st.Result()
		return code, err
	case <-time.After(60 * time.Second):
		return 0, errors.New("task did not exit within 60s")
	}
}

// deleteContainer kills and deletes the task if there is one, then the
// container with its snapshot. It is the cleanup of every test container.
func deleteContainer(t *testing.T, ctr client.Container) {
	ctx, cancel := context.WithTimeout(harness.Context(context.Background(), ns), 30*time.Second)
	defer cancel()
	if task, err := ctr.Task(ctx, nil); err == nil {
		if _, err := task.Delete(ctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
			t.Errorf("cleanup: delete task %s: %v", ctr.ID(), err)
		}
	} else if !errdefs.IsNotFound(err) {
		t.Errorf("cleanup: load task %s: %v", ctr.ID(), err)
	}
	if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
		t.Errorf("cleanup: delete container %s: %v", ctr.ID(), err)
	}
}

// exec runs args in r's container and returns its exit code and output.
func (r *running) exec(ctx context.Context, id string, args ...string) (uint32, string, string, error) {
	spec, err := r.ctr.Spec(ctx)
	if err != nil {
		return 0, "", "", err
	}
	pspec := *spec.Process
	pspec.Args = args
	pspec.Terminal = false
	var stdout, stderr harness.SafeBuffer
	p, err := r.task.Exec(ctx, id, &pspec, cio.NewCreator(cio.WithStreams(bytes.NewReader(nil), &stdout, &stderr)))
	if err != nil {
		return 0, "", "", err
	}
	defer p.Delete(ctx)
	ch, err := p.Wait(ctx)
	if err != nil {
		return 0, "", "", err
	}
	if err := p.Start(ctx); err != nil {
		return 0, "", "", err
	}
	select {
	case st := <-ch:
		code, _, err := st.Result()
		p.IO().Wait()
		return code, stdout.String(), stderr.String(), err
	case <-time.After(30 * time.Second):
		return 0, "", "", fmt.Errorf("exec %v did not exit", args)
	}
}

// waitOutput waits until the container's stdout contains s.
func (r *running) waitOutput(s string) error { return r.waitOutputWithin(s, 20*time.Second) }

// waitOutputWithin waits up to timeout until the container's stdout holds s.
func (r *running) waitOutputWithin(s string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !strings.Contains(r.stdout.String(), s) {
		if time.Now().After(deadline) {
			return fmt.Errorf("stdout %q does not contain %q", r.stdout.String(), s)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// events records the task events of containers.
type events struct {
	mu     sync.Mutex
	topics map[string][]string
	cancel context.CancelFunc
}

// recordEvents subscribes to task events until the test ends.
func recordEvents(ctx context.Context, t *testing.T, d *harness.Daemon) *events {
	ctx, cancel := context.WithCancel(ctx)
	e := &events{topics: map[string][]string{}, cancel: cancel}
	ch, errs := d.Client().Subscribe(ctx, `topic~="/tasks/"`)
	go func() {
		for {
			select {
			case env := <-ch:
				if env == nil {
					return
				}
				v, err := typeurl.UnmarshalAny(env.Event)
				if err != nil {
					continue
				}
				id := containerIDOf(v)
				e.mu.Lock()
				e.topics[id] = append(e.topics[id], env.Topic)
				e.mu.Unlock()
			case <-errs:
				return
			case <-ctx.Done():
				return
			}
		}
	}()
	t.Cleanup(cancel)
	return e
}

// containerIDOf reads the ContainerID field every task event carries.
func containerIDOf(v any) string {
	if c, ok := v.(interface{ GetContainerID() string }); ok {
		return c.GetContainerID()
	}
	return ""
}

// waitFor waits until topic was seen for id and returns every topic seen for it.
func (e *events) waitFor(id, topic string) ([]string, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		e.mu.Lock()
		got := append([]string(nil), e.topics[id]...)
		e.mu.Unlock()
		if slices.Contains(got, topic) {
			return e.settle(id), nil
		}
		if time.Now().After(deadline) {
			return got, fmt.Errorf("no %s event for %s (got %v)", topic, id, got)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// settle waits until no new event arrived for id for 300ms, so that events
// still in flight are part of the result, and returns them.
func (e *events) settle(id string) []string {
	n := -1
	for {
		e.mu.Lock()
		got := append([]string(nil), e.topics[id]...)
		e.mu.Unlock()
		if len(got) == n {
			return got
		}
		n = len(got)
		time.Sleep(300 * time.Millisecond)
	}
}
