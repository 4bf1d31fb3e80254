package sweep_test

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/lifecycle/lifecycletest"
	"github.com/snapview/snapview/pkg/sweep"
	"github.com/snapview/snapview/pkg/view"
)

// orphan sets up the view of container id and then deletes the container
// record, as if every cleanup path had failed; it returns the bundle root.
func orphan(t *testing.T, e *lifecycletest.Env, id string) string {
	t.Helper()
	r := e.Container(t, id, nil)
	e.SetUp(t, lifecycle.New(e.Backend), r)
	if err := e.Containers.Delete(e.Ctx, id); err != nil {
		t.Fatal(err)
	}
	return filepath.Dir(r.Bundle)
}

func leaseExists(t *testing.T, e *lifecycletest.Env, id string) bool {
	t.Helper()
	_, err := lease.Get(e.Ctx, e.Leases, id)
	if err != nil && !errdefs.IsNotFound(err) {
		t.Fatal(err)
	}
	return err == nil
}

func TestSweep(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	root := orphan(t, e, "ghost")
	live := e.Container(t, "alive", nil)
	l := lifecycle.New(e.Backend)
	v := e.SetUp(t, l, live)
	defer l.Teardown(e.Ctx, v)

	dry, err := sweep.Namespace(e.Ctx, e.Backend, lifecycletest.NS, sweep.Options{BundleRoot: root, DryRun: true})
	if err != nil || len(dry) != 1 || dry[0].ContainerID != "ghost" || !leaseExists(t, e, "ghost") {
		t.Fatalf("dry run: %+v %v", dry, err)
	}
	got, err := sweep.Namespace(e.Ctx, e.Backend, lifecycletest.NS, sweep.Options{BundleRoot: root})
	if err != nil || len(got) != 1 {
		t.Fatalf("sweep: %+v %v", got, err)
	}
	want := sweep.Orphan{ContainerID: "ghost", Lease: lease.ID("ghost"), Views: []string{"native/" + view.Key("ghost")}, Mountpoints: []string{bundle.Mountpoint(filepath.Join(root, "ghost"))}}
	if got[0].ContainerID != want.ContainerID || got[0].Lease != want.Lease || !slices.Equal(got[0].Views, want.Views) || !slices.Equal(got[0].Mountpoints, want.Mountpoints) {
		t.Fatalf("orphan %+v, want %+v", got[0], want)
	}
	if leaseExists(t, e, "ghost") {
		t.Error("the orphan's lease survived")
	}
	if _, err := e.Snapshotter.Stat(e.Ctx, view.Key("ghost")); !errdefs.IsNotFound(err) {
		t.Errorf("the orphan's view survived: %v", err)
	}
	if m, _ := mountinfo.Mounted(want.Mountpoints[0]); m {
		t.Error("the orphan's view is still mounted")
	}
	if bundle.Started(filepath.Join(root, "ghost")) {
		t.Error("the orphan's records survived")
	}
	if !leaseExists(t, e, "alive") {
		t.Error("the live container's lease was swept")
	}
}

// TestSweepLeavesANewIncarnation recreates a container of the orphan's id
// between the sweep's listing and its removal: the new lease and view stay.
func TestSweepLeavesANewIncarnation(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	root := orphan(t, e, "reborn")
	e.Backend.OnContainer = func(id string) {
		if id != "reborn" {
			return
		}
		e.Backend.OnContainer = nil
		// What a new Create of the same id does: replace lease and view.
		o := lease.NewOwner("reborn", time.Now().Add(time.Second))
		if _, err := lease.Acquire(e.Ctx, e.Leases, o); err != nil {
			t.Error(err)
		}
		if _, err := view.Create(e.Ctx, e.Snapshotter, o, e.Parent, lease.ID("reborn")); err != nil {
			t.Error(err)
		}
	}
	got, err := sweep.Namespace(e.Ctx, e.Backend, lifecycletest.NS, sweep.Options{BundleRoot: root})
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range got {
		if o.Lease != "" {
			t.Errorf("reported as removed: %+v", o)
		}
	}
	if !leaseExists(t, e, "reborn") {
		t.Error("the new incarnation's lease was removed")
	}
	if _, err := e.Snapshotter.Stat(e.Ctx, view.Key("reborn")); err != nil {
		t.Errorf("the new incarnation's view was removed: %v", err)
	}
}

// TestSweepReportsOnlyWhatItRemoved makes containerd fail after the sweep
// listed the orphans: nothing is reported as removed, and the error says why.
func TestSweepReportsOnlyWhatItRemoved(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	orphan(t, e, "stuck")
	e.Backend.OnContainer = func(string) { e.Backend.Down = true }
	got, err := sweep.Namespace(e.Ctx, e.Backend, lifecycletest.NS, sweep.Options{})
	e.Backend.Down = false
	e.Backend.OnContainer = nil
	if !errors.Is(err, lifecycletest.ErrDown) || len(got) != 0 {
		t.Fatalf("got %+v %v, want nothing reported and containerd's error", got, err)
	}
	if !leaseExists(t, e, "stuck") {
		t.Fatal("the lease is gone after all")
	}
}

// TestSweepDeletedBundles finds a view or a volume still mounted in a
// bundle containerd renamed to .<id> to delete it, unmounts it and finishes
// the deletion; a live container's mounts in its own bundle are left alone.
func TestSweepDeletedBundles(t *testing.T) {
	for _, tc := range []struct {
		name       string
		mountpoint func(bundle string) string
	}{
		{"view", bundle.Mountpoint},
		{"volume", func(b string) string { return bundle.VolumeMountpoint(b, "models") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := lifecycletest.NewEnv(t)
			live := e.Container(t, "alive", nil)
			root := filepath.Dir(live.Bundle)
			mountTmpfs := func(dir string) {
				t.Helper()
				if err := os.MkdirAll(dir, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := unix.Mount("tmpfs", dir, "tmpfs", 0, ""); err != nil {
					t.Fatal(err)
				}
			}
			gone := filepath.Join(root, ".gone")
			mountTmpfs(tc.mountpoint(gone))
			mountTmpfs(tc.mountpoint(live.Bundle))
			defer unix.Unmount(tc.mountpoint(live.Bundle), unix.MNT_DETACH)

			got, err := sweep.Namespace(e.Ctx, e.Backend, lifecycletest.NS, sweep.Options{BundleRoot: root})
			if err != nil || len(got) != 1 || got[0].ContainerID != "gone" || !slices.Equal(got[0].Mountpoints, []string{tc.mountpoint(gone)}) {
				t.Fatalf("got %+v %v", got, err)
			}
			if _, err := os.Stat(gone); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the deleted bundle is still there: %v", err)
			}
			if m, _ := mountinfo.Mounted(tc.mountpoint(live.Bundle)); !m {
				t.Error("the live container's mount was removed")
			}
		})
	}
}

// TestSweepLeavesANewIncarnationsBundle recreates a container of the
// orphan's id, bundle and view included, after the sweep found the orphan
// and before it tears it down (containerd had already deleted the old
// bundle, as it does): the new container's view stays mounted, and its
// state and params files stay.
func TestSweepLeavesANewIncarnationsBundle(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	root := orphan(t, e, "reborn")
	old := filepath.Join(root, "reborn")
	// What containerd's bundle deletion leaves: nothing of the bundle, and
	// the container's own snapshot removed with the container.
	if err := view.Unmount(bundle.Mountpoint(old)); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(old); err != nil {
		t.Fatal(err)
	}
	if err := e.Snapshotter.Remove(e.Ctx, "reborn-snapshot"); err != nil {
		t.Fatal(err)
	}
	var found bool
	var v *lifecycle.View
	e.Backend.OnContainer = func(id string) { found = found || id == "reborn" }
	e.Backend.OnCall = func(name string) {
		if !found || name != "Leases" {
			return
		}
		found = false
		e.Backend.OnCall, e.Backend.OnContainer = nil, nil
		// A CI loop's next `ctr run --rm ... reborn`.
		r := e.Container(t, "reborn", map[string]string{"io.snapview.boot.kernel": lifecycletest.KernelPath})
		v = e.SetUp(t, lifecycle.New(e.Backend), r)
		// And an activation of its view's name (a multi-layer erofs view
		// has one), which the sweep's view names too.
		dir := filepath.Join(e.Dir, "activation-source")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		o := lease.NewOwner("reborn", v.State.Created)
		if _, err := e.Mounts.Activate(e.Ctx, view.Key("reborn"), []mount.Mount{{Type: "format/bind", Source: dir, Options: []string{"rbind", "ro"}}}, mount.WithLabels(view.Labels(o))); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := sweep.Namespace(e.Ctx, e.Backend, lifecycletest.NS, sweep.Options{BundleRoot: root}); err != nil {
		t.Fatal(err)
	}
	if v == nil {
		t.Fatal("the new incarnation was never created")
	}
	defer func() { _ = lifecycle.New(e.Backend).Teardown(e.Ctx, v) }()
	if m, _ := mountinfo.Mounted(bundle.Mountpoint(old)); !m {
		t.Error("the new incarnation's view was unmounted")
	}
	for _, f := range []string{bundle.StatePath(old), bundle.ParamsFile(old)} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("the new incarnation's %s: %v", filepath.Base(f), err)
		}
	}
	if !leaseExists(t, e, "reborn") {
		t.Error("the new incarnation's lease was removed")
	}
	if _, err := e.Snapshotter.Stat(e.Ctx, view.Key("reborn")); err != nil {
		t.Errorf("the new incarnation's view was removed: %v", err)
	}
	if _, err := e.Mounts.Info(e.Ctx, view.Key("reborn")); err != nil {
		t.Errorf("the new incarnation's view activation was removed: %v", err)
	}
	_ = e.Mounts.Deactivate(e.Ctx, view.Key("reborn"))
}
