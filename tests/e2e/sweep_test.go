package e2e

import (
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/image-spec/identity"

	"github.com/snapview/snapview/pkg/sweep"
	"github.com/snapview/snapview/tests/e2e/harness"
)

// makeOrphan creates what a container id would leave if every cleanup path
// had failed: its lease and view and, if mounted, the view mounted on its
// mountpoint under the namespace's bundle directory.
func makeOrphan(ctx context.Context, t *testing.T, d *harness.Daemon, id string, mounted bool) string {
	t.Helper()
	c := d.Client()
	orphanNS, _ := namespaces.Namespace(ctx)
	img, err := c.GetImage(ctx, testImageID)
	if err != nil {
		t.Fatal(err)
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"snapview.io/container": id, "snapview.io/created": time.Now().UTC().Format(time.RFC3339)}
	l, err := c.LeasesService().Create(ctx, leases.WithID("snapview/"+id), leases.WithLabels(labels))
	if err != nil {
		t.Fatal(err)
	}
	viewLabels := map[string]string{"containerd.io/gc.bref.container": id}
	maps.Copy(viewLabels, labels)
	mounts, err := c.SnapshotService("overlayfs").View(leases.WithLease(ctx, l.ID), "snapview/"+id,
		identity.ChainID(diffIDs).String(), snapshots.WithLabels(viewLabels))
	if err != nil {
		t.Fatal(err)
	}
	mp := filepath.Join(bundleDir(d, id), "snapview", "view")
	if mounted {
		if err := os.MkdirAll(mp, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := mount.All(mounts, mp); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		// Only if the test failed: then remove the orphan, so that later
		// tests start clean. A passing test leaves the leak check (which
		// runs after this) to find whatever the sweep did not remove.
		if !t.Failed() {
			return
		}
		_ = mount.UnmountAll(mp, 0)
		_ = os.RemoveAll(bundleDir(d, id))
		cctx := harness.Context(context.Background(), orphanNS)
		_ = c.SnapshotService("overlayfs").Remove(cctx, "snapview/"+id)
		_ = c.LeasesService().Delete(cctx, l, leases.SynchronousDelete)
	})
	return mp
}

// checkOrphanGone checks that the orphan of id is gone: lease, view, mount.
func checkOrphanGone(ctx context.Context, t *testing.T, d *harness.Daemon, id, mp string) {
	t.Helper()
	if leaseExists(ctx, t, d, id) {
		t.Errorf("the orphan's lease survived the sweep")
	}
	if _, err := d.Client().SnapshotService("overlayfs").Stat(ctx, "snapview/"+id); err == nil {
		t.Error("the orphan's view survived the sweep")
	}
	if mp != "" {
		if m, _ := mountinfo.Mounted(mp); m {
			t.Errorf("the orphan's view is still mounted at %s", mp)
		}
	}
}

func leaseExists(ctx context.Context, t *testing.T, d *harness.Daemon, id string) bool {
	t.Helper()
	ls, err := d.Client().LeasesService().List(ctx, `id=="snapview/`+id+`"`)
	if err != nil {
		t.Fatal(err)
	}
	return len(ls) == 1
}

// TestSnapviewctlGC sweeps an orphan with `snapviewctl gc`, first as a dry
// run, and checks that a live container's lease is left alone.
func TestSnapviewctlGC(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	ctl := os.Getenv("SNAPVIEW_CTL")
	if ctl == "" {
		t.Fatal("SNAPVIEW_CTL is not set: run through `make e2e`")
	}
	mp := makeOrphan(ctx, t, d, "ghost", true)

	// A container that exists, with a lease of snapview's name: not an orphan.
	alive, err := newContainer(ctx, t, d, "alive", runOpts{runtime: snapviewRT, args: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	aliveLease, err := d.Client().LeasesService().Create(ctx, leases.WithID("snapview/alive"),
		leases.WithLabels(map[string]string{"snapview.io/container": "alive"}))
	if err != nil {
		t.Fatal(err)
	}

	gc := func(args ...string) string {
		full := append([]string{"--address", d.Address, "--state", d.State, "--namespace", ns, "gc"}, args...)
		out, err := exec.Command(ctl, full...).CombinedOutput()
		if err != nil {
			t.Fatalf("snapviewctl %v: %v\n%s", full, err, out)
		}
		return string(out)
	}
	out := gc("--dry-run")
	if !strings.Contains(out, "would remove orphan "+ns+"/ghost") || !leaseExists(ctx, t, d, "ghost") {
		t.Fatalf("dry run:\n%s", out)
	}
	out = gc()
	for _, want := range []string{"removed orphan " + ns + "/ghost", "overlayfs/snapview/ghost", "mount " + mp, "1 orphan(s) removed"} {
		if !strings.Contains(out, want) {
			t.Errorf("snapviewctl gc output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "alive") || !leaseExists(ctx, t, d, "alive") {
		t.Errorf("the live container's lease was swept:\n%s", out)
	}
	if err := d.Client().LeasesService().Delete(ctx, aliveLease); err != nil {
		t.Fatal(err)
	}
	if err := alive.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	checkOrphanGone(ctx, t, d, "ghost", mp)
}

// TestSweepOnShimStart checks that a starting shim, when the node's sweep is
// due, sweeps every namespace of the node: here an orphan in a namespace
// other than its own.
func TestSweepOnShimStart(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	other := harness.Context(ctx, "snapview-e2e-other")
	if _, err := d.Import(other, "snapview-e2e-other", suite.image, "overlayfs"); err != nil {
		t.Fatal(err)
	}
	makeOrphan(other, t, d, "ghost-2", false)
	logStart := len(d.Log())
	sweepDue(t, d, time.Time{})
	r, err := start(ctx, t, d, "sweeper", runOpts{runtime: snapviewRT, args: []string{"sleep", "300"}})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for leaseExists(other, t, d, "ghost-2") {
		if time.Now().After(deadline) {
			t.Fatal("the shim did not sweep the orphan within 15s")
		}
		time.Sleep(200 * time.Millisecond)
	}
	checkOrphanGone(other, t, d, "ghost-2", "")
	if !strings.Contains(d.Log()[logStart:], "snapview: node swept") {
		t.Error(`no "snapview: node swept" in the shim log`)
	}
	if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
}

// TestSweepOncePerInterval checks that shims starting within the interval
// of the node's last sweep leave the sweep to the next turn: the orphan
// stays, and it goes only once the sweep is due again.
func TestSweepOncePerInterval(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	makeOrphan(ctx, t, d, "ghost-3", false)
	sweepDue(t, d, time.Now())
	for i := range 2 {
		if _, err := start(ctx, t, d, fmt.Sprintf("late-%d", i), runOpts{runtime: snapviewRT, args: []string{"sleep", "300"}}); err != nil {
			t.Fatal(err)
		}
	}
	// Twice the start-up delay, and more.
	time.Sleep(5 * time.Second)
	if !leaseExists(ctx, t, d, "ghost-3") {
		t.Fatal("a shim swept within the interval of the last sweep")
	}
	if got := sweepOutput(t, d); !strings.HasSuffix(got, "1 orphan(s) removed") {
		t.Fatalf("snapviewctl gc, which keeps no turn: %s", got)
	}
	checkOrphanGone(ctx, t, d, "ghost-3", "")
}

// sweepDue records, as a shim would after a sweep, that the node was last
// swept at last (the zero time: never, so that the next starting shim
// sweeps), taking the turn as a shim does, from whichever shim has it.
func sweepDue(t *testing.T, d *harness.Daemon, last time.Time) {
	t.Helper()
	root := filepath.Join(d.State, "io.containerd.runtime.v2.task")
	deadline := time.Now().Add(30 * time.Second)
	for {
		turn, why, err := sweep.TakeTurn(root, 0)
		if err != nil {
			t.Fatal(err)
		}
		if turn != nil {
			if err := turn.Finish(last); err != nil {
				t.Fatal(err)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the sweep's turn: %s", why)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
