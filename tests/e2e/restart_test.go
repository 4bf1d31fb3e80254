package e2e

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// restartDaemon starts a private daemon of the test's own, which it may
// stop and start, with the test image imported.
func restartDaemon(t *testing.T) *harness.Daemon {
	t.Helper()
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d, err := harness.StartDaemon(ctx, suite.dir, suite.tools)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Stop(); err != nil {
			t.Errorf("stop the daemon: %v", err)
		}
	})
	if _, err := d.Import(ctx, ns, suite.image, "overlayfs", "blockfile"); err != nil {
		t.Fatal(err)
	}
	return d
}

var restartModes = []struct {
	name, snapshotter string
	ann               map[string]string
	// config is the runtime options' configuration body, if any.
	config string
}{
	{"view", "overlayfs", map[string]string{"io.snapview.boot.kernel": harness.KernelPath}, ""},
	{"block", "blockfile", blockAnn, ""},
	// A view derived from the layers: nothing of it is in containerd.
	{"derived", "overlayfs", map[string]string{"io.snapview.boot.kernel": harness.KernelPath}, derivedConfig},
}

// restartOpts returns the run options of a restart mode's container.
func restartOpts(snapshotter string, ann map[string]string, config string) runOpts {
	o := runOpts{runtime: snapviewRT, snapshotter: snapshotter, annotations: ann, args: []string{"sleep", "300"}}
	if config != "" {
		o.runtimeOpts = &runtimeoptions.Options{ConfigBody: []byte(config)}
	}
	return o
}

// TestContainerdRestart restarts containerd while containers run in view
// mode and in block mode: afterwards each task is still manageable through
// the restarted daemon (exec, kill, wait, delete), its teardown is complete,
// and nothing leaks.
func TestContainerdRestart(t *testing.T) {
	d := restartDaemon(t)
	ctx := setup(t, d)
	for _, m := range restartModes {
		if _, err := start(ctx, t, d, "restart-"+m.name, restartOpts(m.snapshotter, m.ann, m.config)); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	for _, m := range restartModes {
		id := "restart-" + m.name
		ctr, err := d.Client().LoadContainer(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		task, err := ctr.Task(ctx, nil)
		if err != nil {
			t.Fatalf("%s: load the task after the restart: %v", id, err)
		}
		r := &running{ctr: ctr, task: task, stdout: &harness.SafeBuffer{}, stderr: &harness.SafeBuffer{}}
		if code, out, _, err := r.exec(ctx, "alive", "echo", "alive"); err != nil || code != 0 || out != "alive\n" {
			t.Fatalf("%s: exec after the restart: %d %q %v", id, code, out, err)
		}
		exit, err := task.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := task.Kill(ctx, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		select {
		case st := <-exit:
			if st.ExitCode() != 137 {
				t.Errorf("%s: exit %d after SIGKILL", id, st.ExitCode())
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("%s: no exit after SIGKILL", id)
		}
		if _, err := task.Delete(ctx); err != nil {
			t.Fatalf("%s: delete after the restart: %v", id, err)
		}
		if _, err := os.Stat(filepath.Join(d.State, "io.containerd.runtime.v2.task", ns, id, "snapview.json")); !errorsIsNotExist(err) {
			t.Errorf("%s: the view's state survived its delete: %v", id, err)
		}
	}
}

// TestContainerdDownAtDeadShimDelete kills the shims of running containers
// and restarts containerd: the restarted daemon cleans up after the dead
// shims while it starts, before its API serves, so snapview's `delete`
// action cannot reach it. What is on the host (the view's mount, the loop
// device) goes at once; what is in containerd (lease, view) must be
// reclaimed by the next sweep.
func TestContainerdDownAtDeadShimDelete(t *testing.T) {
	d := restartDaemon(t)
	ctx := setup(t, d)
	var ctrs []client.Container
	for _, m := range restartModes {
		id := "down-" + m.name
		r, err := start(ctx, t, d, id, restartOpts(m.snapshotter, m.ann, m.config))
		if err != nil {
			t.Fatal(err)
		}
		ctrs = append(ctrs, r.ctr)
	}
	d.StopProcess()
	for _, c := range ctrs {
		for _, pid := range harness.ShimPids(d.Address, c.ID()) {
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := d.StartProcess(ctx); err != nil {
		t.Fatal(err)
	}
	for _, c := range ctrs {
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			_, err := c.Task(ctx, nil)
			if errdefs.IsNotFound(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the dead shim's task is still there: %v", c.ID(), err)
			}
		}
		if err := c.Delete(ctx, client.WithSnapshotCleanup); err != nil {
			t.Fatal(err)
		}
	}
	// A derived view has nothing in containerd: the `delete` action,
	// which could not reach containerd, removed all of it (its mount) from
	// the state file, before any sweep.
	if ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Dir(bundleDir(d, "down-derived")))); err != nil {
		t.Fatal(err)
	} else {
		for _, m := range ms {
			if strings.Contains(m.Mountpoint, "down-derived") {
				t.Errorf("a derived view's dead-shim delete, containerd down, left the mount %s", m.Mountpoint)
			}
		}
	}
	out := sweepOutput(t, d)
	t.Logf("the sweep after the restart:\n%s", out)
	for _, c := range ctrs {
		if !strings.Contains(out, "removed orphan "+ns+"/"+c.ID()) {
			t.Logf("the sweep did not need to remove %s (containerd's cleanup reached it):\n%s", c.ID(), out)
		}
	}
	if strings.Contains(out, "/down-derived") {
		t.Errorf("the sweep had work for the derived view:\n%s", out)
	}
	// The leak check, registered by setup, now finds nothing.
}

func errorsIsNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }

// TestSocketGoneAtCreate removes containerd's gRPC socket from under the
// shim (established connections, such as the test's own, live on): a new
// shim cannot call back into containerd, and its Create must fail with a
// snapview: error that says so, leaving nothing; once the socket is back,
// the same container id runs.
func TestSocketGoneAtCreate(t *testing.T) {
	d := restartDaemon(t)
	ctx := setup(t, d)
	moved := d.Address + ".moved"
	if err := os.Rename(d.Address, moved); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			if err := os.Rename(moved, d.Address); err != nil {
				t.Fatal(err)
			}
		}
	}
	defer restore()
	_, err := start(ctx, t, d, "socket-gone", runOpts{runtime: snapviewRT, args: []string{"true"}})
	if err == nil || !strings.Contains(err.Error(), "snapview: look up container socket-gone") {
		t.Fatalf("create without containerd's socket: %v, want snapview's error", err)
	}
	restore()
	r, err := start(ctx, t, d, "socket-back", runOpts{runtime: snapviewRT, args: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	if code, err := r.wait(t); err != nil || code != 0 {
		t.Fatalf("exit %d: %v", code, err)
	}
	if _, err := r.task.Delete(ctx); err != nil {
		t.Fatal(err)
	}
}
