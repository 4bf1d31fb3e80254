package e2e

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// crashPoints are the fault points of the shim's fault build (package
// fault): after each setup step that leaves something behind, after runc's
// create, and in teardown after the unmount and after the view's removal;
// each with the modes whose setup has that step.
var crashPoints = []struct {
	point    string
	modes    string // space separated; "" for every mode
	teardown bool
}{
	{point: "dir"},
	{point: "rootfs", modes: "erofs erofs-off derived-erofs"},
	{point: "derive", modes: "derived derived-erofs derived-volumes"},
	{point: "lease", modes: "view block erofs layered volumes restore-block restore-layered derived-volumes"},
	{point: "view", modes: "view block erofs layered volumes restore-block restore-layered"},
	{point: "activate", modes: "erofs layered"},
	{point: "mount", modes: "erofs layered volumes derived derived-erofs derived-volumes"},
	{point: "restore-written", modes: "restore-block restore-layered"},
	{point: "format", modes: "layered restore-layered"},
	{point: "device", modes: "block layered restore-block restore-layered"},
	{point: "layers", modes: "layered restore-layered"},
	{point: "volume-views", modes: "volumes volumes-block derived-volumes"},
	{point: "volumes", modes: "volumes volumes-block derived-volumes"},
	{point: "monitor", modes: "block layered restore-block restore-layered"},
	{point: "state", modes: "view block erofs erofs-off layered volumes restore-block restore-layered derived derived-erofs derived-volumes"},
	{point: "config", modes: "view block erofs layered volumes restore-block restore-layered derived derived-erofs derived-volumes"},
	{point: "runc-created"},
	{point: "teardown-unmounted", teardown: true},
	{point: "teardown-removed", modes: "view block erofs layered volumes volumes-block restore-block restore-layered derived derived-erofs derived-volumes", teardown: true},
}

// TestCrashMatrix kills the shim (SIGKILL, from inside, as a crash would)
// at every fault point, in view mode and in block mode, and then lets
// containerd's own delete path run as a user would (task delete, which runs
// the manager's Stop, then container delete), followed by at most one
// sweep: nothing may be left, no lease, snapshot, mount, loop device, state
// file or shim, and a new container with the same id must then run.
func TestCrashMatrix(t *testing.T) {
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	faultShim := os.Getenv("SNAPVIEW_FAULT_SHIM")
	if faultShim == "" {
		t.Fatal("SNAPVIEW_FAULT_SHIM is not set: run through `make e2e`")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	faultFile := filepath.Join(suite.dir, "fault")
	tools := suite.tools
	tools.Shim = faultShim
	d, err := harness.StartDaemon(ctx, suite.dir, tools, harness.WithEnv("SNAPVIEW_FAULT_FILE="+faultFile), harness.WithErofsBlock(erofsBlockSize))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Stop(); err != nil {
			t.Errorf("stop the fault daemon: %v", err)
		}
	})
	if _, err := d.Import(ctx, ns, suite.image, "overlayfs", "blockfile", "erofs"); err != nil {
		t.Fatal(err)
	}
	for _, img := range volumeImages(t) {
		if _, err := d.Import(ctx, ns, img, "overlayfs", "erofs"); err != nil {
			t.Fatal(err)
		}
	}
	// Disk snapshots to restore from (io.snapview.restore), one per
	// snapshotter, taken of a block-mode container that is gone before the
	// matrix runs.
	restoreFrom := map[string]map[string]string{}
	for _, sn := range []string{"blockfile", "erofs"} {
		src := "crash-restore-src-" + sn
		nctx := harness.Context(ctx, ns)
		r, err := start(nctx, t, d, src, runOpts{runtime: snapviewRT, snapshotter: sn, annotations: blockAnn,
			args: []string{"sh", "-c", diskWriteScript}, specOpts: []oci.SpecOpts{oci.WithEnv([]string{"MARKER=crash-" + sn})}})
		if err != nil {
			t.Fatal(err)
		}
		if err := r.waitOutput("ready"); err != nil {
			t.Fatal(err)
		}
		s := takeSnapshot(t, d, src)
		if _, err := r.task.Delete(nctx, client.WithProcessKill); err != nil {
			t.Fatal(err)
		}
		if err := r.ctr.Delete(nctx, client.WithSnapshotCleanup); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { removeSnapshot(harness.Context(context.Background(), ns), t, d, s.ID) })
		restoreFrom[sn] = restoreAnn(s.ID)
	}
	for _, mode := range []struct {
		name, snapshotter string
		ann               map[string]string
		// config is added to the runtime options' configuration.
		config string
	}{
		{"view", "overlayfs", map[string]string{"io.snapview.boot.kernel": harness.KernelPath}, ""},
		{"block", "blockfile", blockAnn, ""},
		// The erofs snapshotter in block mode: view mode, whose rootfs
		// mounts snapview has the mount manager perform; no view (mode off),
		// with only that; and layered block mode.
		{"erofs", "erofs", map[string]string{"io.snapview.boot.kernel": harness.KernelPath}, ""},
		{"erofs-off", "erofs", map[string]string{"io.snapview.mode": "off"}, ""},
		{"layered", "erofs", blockAnn, ""},
		// Volumes, mounted (view mode) and as disks (layered block mode).
		{"volumes", "overlayfs", volumeAnn, ""},
		{"volumes-block", "erofs", withVolumes(blockAnn), ""},
		// Block mode restored from a disk snapshot: one disk and layered.
		{"restore-block", "blockfile", restoreFrom["blockfile"], ""},
		{"restore-layered", "erofs", restoreFrom["erofs"], ""},
		// Views derived from the rootfs's layers (view.source "layers"):
		// overlayfs; the erofs snapshotter's layers, which snapview's
		// activation of the rootfs mounted; and with volumes, whose views
		// alone are under a lease.
		{"derived", "overlayfs", map[string]string{"io.snapview.boot.kernel": harness.KernelPath}, derivedConfig},
		{"derived-erofs", "erofs", map[string]string{"io.snapview.boot.kernel": harness.KernelPath}, derivedConfig},
		{"derived-volumes", "overlayfs", volumeAnn, derivedConfig},
	} {
		for _, cp := range crashPoints {
			if cp.modes != "" && !slices.Contains(strings.Fields(cp.modes), mode.name) {
				continue
			}
			t.Run(mode.name+"/"+cp.point, func(t *testing.T) {
				ctx := setup(t, d)
				id := "crash-" + mode.name + "-" + cp.point
				if err := os.WriteFile(faultFile, []byte(cp.point+" "+id), 0o644); err != nil {
					t.Fatal(err)
				}
				defer os.Remove(faultFile + ".fired")
				opts := runOpts{runtime: snapviewRT, snapshotter: mode.snapshotter, annotations: mode.ann, args: []string{"sleep", "300"},
					runtimeOpts: &runtimeoptions.Options{ConfigBody: []byte(volumeAllow + mode.config)}}
				r, err := start(ctx, t, d, id, opts)
				switch {
				case cp.teardown && err != nil:
					t.Fatalf("create: %v", err)
				case !cp.teardown && err == nil:
					t.Fatalf("create succeeded: the shim did not crash at %s", cp.point)
				}
				ctr, lerr := d.Client().LoadContainer(ctx, id)
				if lerr != nil {
					t.Fatal(lerr)
				}
				if cp.teardown {
					// The shim dies while it tears the view down: the delete
					// fails, and containerd's next delete finds it dead.
					_, _ = r.task.Delete(ctx, client.WithProcessKill)
				}
				if _, err := os.Stat(faultFile + ".fired"); err != nil {
					t.Fatalf("the shim never reached %s: %v", cp.point, err)
				}
				deleteTaskAsUser(ctx, t, ctr)
				// Before the container record goes (whose delete lets
				// containerd's GC take what carries its back-reference) and
				// before any sweep: the dead-shim `delete` action alone must
				// have removed snapview's lease, views and activations.
				if left := d.SnapviewObjectsOf(ctx, ns, id); len(left) > 0 {
					t.Fatalf("after the task delete, before GC or sweep, snapview left: %s", strings.Join(left, ", "))
				}
				if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
					t.Fatalf("container delete: %v", err)
				}
				if s := sweepOutput(t, d); !strings.HasSuffix(s, "0 orphan(s) removed") {
					t.Fatalf("the sweep had work after containerd's delete path: %s", s)
				}
				if err := d.CheckLeaks(ctx); err != nil {
					t.Fatalf("after containerd's delete path: %v", err)
				}

				// The same id runs normally afterwards.
				again := opts
				again.args = []string{"true"}
				r2, err := start(ctx, t, d, id, again)
				if err != nil {
					t.Fatalf("a new container with the same id: %v", err)
				}
				if code, err := r2.wait(t); err != nil || code != 0 {
					t.Fatalf("a new container with the same id exited %d: %v", code, err)
				}
				if _, err := r2.task.Delete(ctx); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
	// A shim that dies with the node's sweep turn (after taking it, before
	// sweeping) has recorded nothing and holds no lock: the next shim to
	// start sweeps at once.
	t.Run("sweep-turn", func(t *testing.T) {
		ctx := setup(t, d)
		makeOrphan(ctx, t, d, "ghost-turn", false)
		id := "crash-sweep-turn"
		if err := os.WriteFile(faultFile, []byte("sweep-turn "+id), 0o644); err != nil {
			t.Fatal(err)
		}
		defer os.Remove(faultFile + ".fired")
		sweepDue(t, d, time.Time{})
		opts := runOpts{runtime: snapviewRT, args: []string{"sleep", "300"}}
		r, err := start(ctx, t, d, id, opts)
		if err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(15 * time.Second)
		for {
			if _, err := os.Stat(faultFile + ".fired"); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the shim never took the sweep's turn")
			}
			time.Sleep(100 * time.Millisecond)
		}
		if !leaseExists(ctx, t, d, "ghost-turn") {
			t.Fatal("the orphan went before the sweeper died")
		}
		deleteTaskAsUser(ctx, t, r.ctr)
		if err := r.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
			t.Fatalf("container delete: %v", err)
		}
		next, err := start(ctx, t, d, id+"-next", opts)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _, _ = next.task.Delete(ctx, client.WithProcessKill) }()
		deadline = time.Now().Add(15 * time.Second)
		for leaseExists(ctx, t, d, "ghost-turn") {
			if time.Now().After(deadline) {
				t.Fatal("the next shim did not take the turn the dead one left")
			}
			time.Sleep(200 * time.Millisecond)
		}
		checkOrphanGone(ctx, t, d, "ghost-turn", "")
	})
}

// deleteTaskAsUser deletes the container's task as a user would after its
// shim died: containerd runs the shim's `delete` action; a second delete
// finds nothing.
func deleteTaskAsUser(ctx context.Context, t *testing.T, ctr client.Container) {
	t.Helper()
	for range 3 {
		task, err := ctr.Task(ctx, nil)
		if errdefs.IsNotFound(err) {
			return
		}
		if err == nil {
			_, err = task.Delete(ctx, client.WithProcessKill)
		}
		if err == nil || errdefs.IsNotFound(err) {
			continue
		}
		if !strings.Contains(err.Error(), "ttrpc: closed") && !errors.Is(err, os.ErrNotExist) {
			t.Logf("task delete: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if _, err := ctr.Task(ctx, nil); !errdefs.IsNotFound(err) {
		t.Fatalf("the task is still there after three deletes: %v", err)
	}
}

// sweepOutput runs snapviewctl gc once for the test namespace and returns
// what it printed.
func sweepOutput(t *testing.T, d *harness.Daemon) string {
	t.Helper()
	out, err := exec.Command(os.Getenv("SNAPVIEW_CTL"), "--address", d.Address, "--state", d.State, "--namespace", ns, "gc").CombinedOutput()
	if err != nil {
		t.Fatalf("snapviewctl gc: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out))
}
