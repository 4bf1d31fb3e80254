package e2e

import (
	"context"
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
	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/image-spec/identity"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// makeOrphan creates what a container id would leave if every cleanup path
// had failed: its lease and view and, if mounted, the view mounted on its
// mountpoint under the namespace's bundle directory.
func makeOrphan(ctx context.Context, t *testing.T, d *harness.Daemon, id string, mounted bool) string {
	t.Helper()
	c := d.Client()
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
		cctx := harness.Context(context.Background(), ns)
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

// TestSweepOnShimStart checks that a starting shim sweeps its namespace.
func TestSweepOnShimStart(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	makeOrphan(ctx, t, d, "ghost-2", false)
	r, err := start(ctx, t, d, "sweeper", runOpts{runtime: snapviewRT, args: []string{"sleep", "300"}})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for leaseExists(ctx, t, d, "ghost-2") {
		if time.Now().After(deadline) {
			t.Fatal("the shim did not sweep the orphan within 15s")
		}
		time.Sleep(200 * time.Millisecond)
	}
	checkOrphanGone(ctx, t, d, "ghost-2", "")
	if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
}
