package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// bundleDir returns the bundle containerd made for container id.
func bundleDir(d *harness.Daemon, id string) string {
	return filepath.Join(d.State, "io.containerd.runtime.v2.task", ns, id)
}

// viewState is the part of snapview.json the tests check.
type viewState struct {
	Version     int    `json:"version"`
	Namespace   string `json:"namespace"`
	ContainerID string `json:"container_id"`
	Snapshotter string `json:"snapshotter"`
	ViewKey     string `json:"view_key"`
	Parent      string `json:"parent"`
	Lease       string `json:"lease"`
	Mountpoint  string `json:"mountpoint"`
	Activation  string `json:"activation"`
	// RootfsActivation is the mount-manager activation of the container's
	// own rootfs, when snapview claimed its mounts (erofs).
	RootfsActivation string `json:"rootfs_activation"`
	Rootfs           struct {
		Kind   string `json:"kind"`
		FSType string `json:"fstype"`
	} `json:"rootfs"`
	Created time.Time `json:"created"`
}

// checkView checks, while container id runs on snapshotter sn, that its
// lease, view snapshot, mount, state file and the config.json runc was given
// exist and name each other, and returns the state.
func checkView(ctx context.Context, t *testing.T, d *harness.Daemon, id, sn, runcConfig string) viewState {
	t.Helper()
	c := d.Client()
	b := bundleDir(d, id)

	// State file: mode 0600, naming everything, of the lowest version that
	// holds it (2 for the rootfs activation on erofs, 1 otherwise).
	fi, err := os.Stat(filepath.Join(b, "snapview.json"))
	if err != nil {
		t.Fatalf("state file: %v", err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %v, want 0600", fi.Mode().Perm())
	}
	raw, err := os.ReadFile(filepath.Join(b, "snapview.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st viewState
	if err := json.Unmarshal(raw, &st); err != nil {
		t.Fatalf("state file: %v\n%s", err, raw)
	}
	want := viewState{Version: map[bool]int{true: 2, false: 1}[sn == "erofs"], Namespace: ns, ContainerID: id, Snapshotter: sn, ViewKey: "snapview/" + id, Lease: "snapview/" + id,
		Mountpoint: filepath.Join(b, "snapview", "view")}
	if st.Version != want.Version || st.Namespace != want.Namespace || st.ContainerID != id || st.Snapshotter != sn ||
		st.ViewKey != want.ViewKey || st.Lease != want.Lease || st.Mountpoint != want.Mountpoint {
		t.Fatalf("state file %s\nwant the names of %+v", raw, want)
	}
	if st.Rootfs.Kind != "fs" || st.Rootfs.FSType == "" {
		t.Errorf("rootfs params %+v", st.Rootfs)
	}
	// A view of the two-layer test image on erofs is N erofs layers plus a
	// templated overlay, which only containerd's mount manager can perform.
	if wantActivation := sn == "erofs"; (st.Activation != "") != wantActivation {
		t.Errorf("%s view: mount-manager activation %q, want one: %v", sn, st.Activation, wantActivation)
	}
	// The container's own erofs rootfs too, which snapview claimed from
	// containerd and had the mount manager perform under the task's id.
	if wantRootfs := map[bool]string{true: id}[sn == "erofs"]; st.RootfsActivation != wantRootfs {
		t.Errorf("%s rootfs activation %q, want %q", sn, st.RootfsActivation, wantRootfs)
	}

	// Lease: labelled, holding the view.
	ls, err := c.LeasesService().List(ctx, fmt.Sprintf("id==%q", st.Lease))
	if err != nil || len(ls) != 1 {
		t.Fatalf("lease %s: %v %v", st.Lease, ls, err)
	}
	if ls[0].Labels["snapview.io/container"] != id {
		t.Errorf("lease labels %v", ls[0].Labels)
	}
	if _, err := time.Parse(time.RFC3339, ls[0].Labels["snapview.io/created"]); err != nil {
		t.Errorf("lease created label: %v", err)
	}
	res, err := c.LeasesService().ListResources(ctx, ls[0])
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 1 || res[0] != (leases.Resource{ID: st.ViewKey, Type: "snapshots/" + sn}) {
		t.Errorf("lease resources %v, want the view %s in %s", res, st.ViewKey, sn)
	}

	// View: a View of the parent of the container's own snapshot.
	ctr, err := c.LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	info, err := ctr.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	own, err := c.SnapshotService(sn).Stat(ctx, info.SnapshotKey)
	if err != nil {
		t.Fatal(err)
	}
	vi, err := c.SnapshotService(sn).Stat(ctx, st.ViewKey)
	if err != nil {
		t.Fatalf("view snapshot: %v", err)
	}
	if vi.Kind != snapshots.KindView || vi.Parent != own.Parent || st.Parent != own.Parent {
		t.Errorf("view %+v, state parent %s, want a view of %s", vi, st.Parent, own.Parent)
	}
	for k, v := range map[string]string{"containerd.io/gc.bref.container": id, "snapview.io/container": id} {
		if vi.Labels[k] != v {
			t.Errorf("view label %s=%q, want %q", k, vi.Labels[k], v)
		}
	}

	// Mount: read-only, on the mountpoint.
	mounts, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(st.Mountpoint))
	if err != nil || len(mounts) == 0 {
		t.Fatalf("view not mounted on %s: %v", st.Mountpoint, err)
	}
	top := mounts[len(mounts)-1]
	if !strings.Contains(","+top.Options+",", ",ro,") {
		t.Errorf("view mounted with %q, want ro", top.Options)
	}

	// config.json as runc read it carries the annotations.
	cfgRaw, err := os.ReadFile(runcConfig)
	if err != nil {
		t.Fatalf("config.json given to runc: %v", err)
	}
	var spec struct {
		Annotations map[string]string `json:"annotations"`
	}
	if err := json.Unmarshal(cfgRaw, &spec); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]string{
		"io.snapview.view.snapshotter": sn,
		"io.snapview.view.key":         st.ViewKey,
		"io.snapview.view.lease":       st.Lease,
		"io.snapview.view.mountpoint":  st.Mountpoint,
	} {
		if spec.Annotations[k] != v {
			t.Errorf("runc's config.json: %s=%q, want %q", k, spec.Annotations[k], v)
		}
	}
	var params map[string]any
	if err := json.Unmarshal([]byte(spec.Annotations["io.snapview.rootfs.params"]), &params); err != nil {
		t.Errorf("runc's config.json: rootfs params %q: %v", spec.Annotations["io.snapview.rootfs.params"], err)
	} else if params["kind"] != "fs" || params["fstype"] == "" || params["source"] == nil || params["options"] == nil {
		t.Errorf("rootfs params %v", params)
	}
	return st
}

// checkPristine checks that every file of the test image reads the same
// through the view as in the image.
func checkPristine(t *testing.T, mountpoint string) {
	t.Helper()
	for path, sum := range suite.image.Files {
		data, err := os.ReadFile(filepath.Join(mountpoint, path))
		if err != nil {
			t.Errorf("view: %v", err)
			continue
		}
		got := sha256.Sum256(data)
		if hex.EncodeToString(got[:]) != sum {
			t.Errorf("view: %s differs from the image", path)
		}
	}
}

// TestView runs a container on each snapshotter and checks its view while
// it runs; the leak check then checks that nothing is left after delete.
func TestView(t *testing.T) {
	d := suite.daemon
	eachSnapshotter(t, d, func(ctx context.Context, t *testing.T, sn string, spy runcSpy) {
		id := "view-" + sn
		r, err := start(ctx, t, d, id, runOpts{
			runtime:     snapviewRT,
			runtimeOpts: spy.opts(),
			snapshotter: sn,
			// The container changes its own copy of the image.
			args: []string{"sh", "-c", "echo changed > " + harness.KernelPath + "; rm " + harness.ConfigPath + "; echo ready; sleep 300"},
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := r.waitOutput("ready"); err != nil {
			t.Fatal(err)
		}
		if !spy.created(t, id) {
			t.Fatal("runc wrapper not used")
		}
		st := checkView(ctx, t, d, id, sn, spy.config(id))
		checkPristine(t, st.Mountpoint)
		if err := os.WriteFile(filepath.Join(st.Mountpoint, "written-by-host"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
			t.Errorf("writing into the view: %v, want EROFS", err)
		}
		if err := os.Remove(filepath.Join(st.Mountpoint, harness.KernelPath)); err == nil {
			t.Errorf("removing a file of the view succeeded")
		}
		// The container sees its own change, the view does not.
		if code, out, _, err := r.exec(ctx, "cat", "cat", harness.KernelPath); err != nil || code != 0 || out != "changed\n" {
			t.Errorf("container rootfs: %q %d %v", out, code, err)
		}
	})
}

// TestViewShimKilled kills the shim with SIGKILL while the container runs,
// then deletes task and container as a user would: containerd's `delete`
// action must remove the view.
func TestViewShimKilled(t *testing.T) {
	d := suite.daemon
	for _, sn := range d.Snapshotters {
		t.Run(sn, func(t *testing.T) {
			ctx := setup(t, d)
			id := "killed-" + sn
			r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: sn, args: []string{"sleep", "300"}})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(filepath.Join(bundleDir(d, id), "snapview.json")); err != nil {
				t.Fatalf("no view state before the kill: %v", err)
			}
			r.killShimAndDelete(ctx, t, d, id)
			if err := r.ctr.Delete(ctx); err != nil {
				t.Fatalf("container delete: %v", err)
			}
		})
	}
}

// TestViewRuncCreateFails checks that a create failing inside runc leaves
// nothing behind.
func TestViewRuncCreateFails(t *testing.T) {
	d := suite.daemon
	for _, tc := range []struct {
		name, snapshotter string
		ann               map[string]string
	}{
		{"view", "overlayfs", nil},
		// The rollback then also releases the loop device the shim held.
		{"block", "blockfile", blockAnn},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := setup(t, d)
			id := "runc-fails-" + tc.name
			_, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: tc.snapshotter, annotations: tc.ann, args: []string{"/no/such/command"}})
			if err == nil {
				t.Fatal("create of a missing command succeeded")
			}
			if !strings.Contains(err.Error(), "snapview: create "+id) {
				t.Errorf("error %q does not say snapview failed the create", err)
			}
		})
	}
}

// TestViewPod runs two containers of one pod, created concurrently in one
// shim process (grouped by io.kubernetes.cri.sandbox-id), and deletes them
// one after the other: each has its own view, and deleting one leaves the
// other's intact.
func TestViewPod(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	pod := map[string]string{"io.kubernetes.cri.sandbox-id": "pod-1"}
	ids := []string{"pod-a", "pod-b"}
	runs := make([]*running, len(ids))
	errs := make(chan error, len(ids))
	for i, id := range ids {
		go func() {
			var err error
			runs[i], err = start(ctx, t, d, id, runOpts{runtime: snapviewRT, annotations: pod, args: []string{"sleep", "300"}})
			errs <- err
		}()
	}
	for range ids {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if all := harness.ShimPids(d.Address, ""); len(all) != 1 {
		t.Fatalf("want one shim process for the pod, got %v", all)
	}
	states := map[string]viewState{}
	for _, id := range ids {
		raw, err := os.ReadFile(filepath.Join(bundleDir(d, id), "snapview.json"))
		if err != nil {
			t.Fatal(err)
		}
		var st viewState
		if err := json.Unmarshal(raw, &st); err != nil {
			t.Fatal(err)
		}
		states[id] = st
	}
	if _, err := runs[0].task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(states["pod-a"].Mountpoint); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pod-a view still there after its delete: %v", err)
	}
	checkPristine(t, states["pod-b"].Mountpoint)
	if _, err := d.Client().SnapshotService("overlayfs").Stat(ctx, "snapview/pod-b"); err != nil {
		t.Errorf("pod-b view gone after pod-a's delete: %v", err)
	}
}

// killShimAndDelete kills the shim of container id with SIGKILL, waits for
// the task's exit and deletes the task as a user would: containerd then runs
// the shim's `delete` action, which must clean up.
func (r *running) killShimAndDelete(ctx context.Context, t *testing.T, d *harness.Daemon, id string) {
	t.Helper()
	pids := harness.ShimPids(d.Address, id)
	if len(pids) != 1 {
		t.Fatalf("shim processes for %s: %v", id, pids)
	}
	if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The exit is reported with the shim's connection error.
	if _, err := r.wait(t); err != nil && !strings.Contains(err.Error(), "ttrpc: closed") {
		t.Fatal(err)
	}
	if _, err := r.task.Delete(ctx); err != nil && !errdefs.IsNotFound(err) {
		t.Fatalf("task delete after the shim died: %v", err)
	}
}

// TestPodChurn deletes one container of a pod while the next is created in
// the same shim process, in a loop. A container without a view keeps the
// shim serving, as a pause container does, so containerd's Shutdown after
// each task delete reaches a shim that has other work in flight: neither
// the Create nor the teardown may lose the shim's connection to containerd,
// and every view must be set up and removed completely.
func TestPodChurn(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	pod := map[string]string{"io.kubernetes.cri.sandbox-id": "pod-churn"}
	keeperAnn := map[string]string{"io.kubernetes.cri.sandbox-id": "pod-churn", "io.snapview.mode": "off"}
	if _, err := start(ctx, t, d, "churn-keeper", runOpts{runtime: snapviewRT, annotations: keeperAnn, args: []string{"sleep", "300"}}); err != nil {
		t.Fatal(err)
	}
	prev, err := start(ctx, t, d, "churn-0", runOpts{runtime: snapviewRT, annotations: pod, args: []string{"sleep", "300"}})
	if err != nil {
		t.Fatal(err)
	}
	const rounds = 12
	for i := 1; i <= rounds; i++ {
		id := fmt.Sprintf("churn-%d", i)
		var next *running
		errs := make(chan error, 2)
		go func() {
			_, err := prev.task.Delete(ctx, client.WithProcessKill)
			errs <- err
		}()
		go func() {
			var err error
			next, err = start(ctx, t, d, id, runOpts{runtime: snapviewRT, annotations: pod, args: []string{"sleep", "300"}})
			errs <- err
		}()
		for range 2 {
			if err := <-errs; err != nil {
				t.Fatalf("round %d: %v", i, err)
			}
		}
		prevID := prev.ctr.ID()
		if _, err := os.Stat(filepath.Join(bundleDir(d, id), "snapview.json")); err != nil {
			t.Fatalf("round %d: %s has no view: %v", i, id, err)
		}
		if _, err := d.Client().SnapshotService("overlayfs").Stat(ctx, "snapview/"+prevID); err == nil {
			t.Fatalf("round %d: the view of %s survived its delete", i, prevID)
		}
		if err := prev.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
			t.Fatal(err)
		}
		prev = next
	}
	if shims := harness.ShimPids(d.Address, ""); len(shims) != 1 {
		t.Fatalf("want one shim process for the pod, got %v", shims)
	}
	if n := strings.Count(d.Log(), "client connection is closing"); n > 0 {
		t.Fatalf("the shim lost its containerd connection %d times", n)
	}
}
