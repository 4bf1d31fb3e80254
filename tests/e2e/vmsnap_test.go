package e2e

import (
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/oci"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// TestVMDiskSnapshot proves disk snapshots with a real guest, on both
// containerd versions: qemu in a block-mode container boots the image's
// kernel on the container's disk, the guest writes a marker (its boot id)
// and syncs it; snapview takes a disk snapshot; a new block-mode container
// is restored from it, and its guest, before it mounts its disk, checks
// the filesystem (e2fsck -p, which replays a journal, then e2fsck -fn,
// which must find nothing), then reads the first guest's marker back.
//
// "powered off": the first guest shuts down cleanly and the stopped
// container is snapshotted. "running": the first guest stays up writing
// files it never syncs, and is snapshotted while it runs (frozen for the
// copy, running after it), then killed: a crash-consistent disk, whose
// journal the restored guest's check replays. On the erofs snapshotter
// (layered: the writable disk under the guest's overlay) and blockfile (one
// disk). No host mount of any of the disks, ever.
func TestVMDiskSnapshot(t *testing.T) {
	k, err := harness.GuestKernelFromEnv()
	if err != nil {
		t.Skip(err)
	}
	kvm, accel := harness.KVM(k)
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		for _, tc := range []struct {
			sn      string
			running bool
		}{{"erofs", false}, {"erofs", true}, {"blockfile", true}} {
			name := tc.sn + "/powered-off"
			if tc.running {
				name = tc.sn + "/running"
			}
			t.Run(name, func(t *testing.T) {
				ctx := setup(t, d)
				id := fmt.Sprintf("vmsnap-%s-%t", tc.sn, tc.running)
				ref := "docker.io/snapview/" + id + ":1"
				if err := importVMImage(ctx, d, ref, k, true, tc.sn); err != nil {
					t.Fatal(err)
				}
				args := func(stay bool) []string {
					a := harness.QemuArgs(kvm)
					if stay {
						a = harness.WithGuestStay(a)
					}
					if tc.sn == "erofs" {
						return []string{"sh", "-c", harness.QemuLayeredScriptOf(a)}
					}
					return a
				}
				var specOpts []oci.SpecOpts
				if kvm {
					specOpts = append(specOpts, oci.WithLinuxDevice("/dev/kvm", "rwm"))
				}
				opts := &runtimeoptions.Options{ConfigBody: []byte("[block]\nmonitor_rootfs = \"view\"\n")}
				vm := func(id string, ann map[string]string, stay bool) *running {
					t.Helper()
					r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, runtimeOpts: opts, snapshotter: tc.sn, image: ref,
						annotations: ann, args: args(stay), specOpts: specOpts})
					if err != nil {
						t.Fatal(err)
					}
					return r
				}

				src := vm(id+"-src", harness.VMAnnotations(), tc.running)
				srcState := readBlockState(t, d, id+"-src")
				watchSrc := watchNeverMounted(srcState)
				if tc.running {
					if err := src.waitOutputWithin(harness.GuestStayLine, vmBootTimeout); err != nil {
						t.Fatalf("%v (%s)\nqemu's stderr: %s", err, accel, src.stderr.String())
					}
				} else if code, err := src.wait(t); err != nil || code != 0 {
					t.Fatalf("qemu exited %d (%v, %s); console:\n%s\nstderr: %s", code, err, accel, src.stdout.String(), src.stderr.String())
				}
				marker, ok := consoleField(src.stdout.String(), harness.GuestWroteLine)
				if !ok || !strings.Contains(marker, "boot=") {
					t.Fatalf("the first guest printed no marker:\n%s", src.stdout.String())
				}
				watchCap := watchCapture(srcState.Block.Rootfs.Source, srcState.Block.Device)
				s := takeSnapshot(t, d, id+"-src")
				for _, v := range watchCap() {
					t.Errorf("during the capture: %s", v)
				}
				if s.Form != "disk" {
					t.Fatalf("snapshot %+v, want form disk", s)
				}
				if tc.running {
					if st, err := src.task.Status(ctx); err != nil || st.Status != client.Running {
						t.Fatalf("the guest's container is %v after the capture (%v)", st.Status, err)
					}
					if _, err := src.task.Delete(ctx, client.WithProcessKill); err != nil {
						t.Fatal(err)
					}
				} else if _, err := src.task.Delete(ctx); err != nil {
					t.Fatal(err)
				}
				for _, v := range watchSrc() {
					t.Errorf("the first guest's disk: %s", v)
				}

				ann := maps.Clone(harness.VMAnnotations())
				ann["io.snapview.restore"] = s.ID
				dst := vm(id+"-restored", ann, false)
				watchDst := watchNeverMounted(readBlockState(t, d, id+"-restored"))
				code, err := dst.wait(t)
				for _, v := range watchDst() {
					t.Errorf("the restored guest's disk: %s", v)
				}
				out := dst.stdout.String()
				if err != nil || code != 0 {
					t.Fatalf("the restored guest's qemu exited %d (%v); console:\n%s\nstderr: %s", code, err, out, dst.stderr.String())
				}
				t.Logf("the restored guest's console (%s):\n%s", accel, out)
				if found, _ := consoleField(out, harness.GuestFoundLine); found != marker {
					t.Errorf("the restored guest found %q on its disk, want the first guest's %q", found, marker)
				}
				fsck, _ := consoleField(out, harness.GuestFsckLine)
				want := "clean, preen exit 0, check exit 0"
				if tc.running {
					// The guest had its disk mounted: the saved disk needs
					// its journal replayed, and nothing else.
					want = "journal recovered, preen exit 0, check exit 0"
				}
				if fsck != want {
					t.Errorf("the restored guest's filesystem check: %q, want %q", fsck, want)
				}
				if _, err := dst.task.Delete(ctx); err != nil {
					t.Fatal(err)
				}
				removeSnapshot(ctx, t, d, s.ID)
			})
		}
	})
}

// vmBootTimeout bounds a guest's boot under TCG.
const vmBootTimeout = 90 * time.Second

// consoleField returns the rest of the first console line that starts
// with prefix, without its line end.
func consoleField(console, prefix string) (string, bool) {
	for l := range strings.Lines(console) {
		if _, after, ok := strings.Cut(l, prefix); ok {
			return strings.TrimRight(after, "\r\n "), true
		}
	}
	return "", false
}

// TestVMDiskSnapshotBetweenNodes moves a guest's disk between nodes: a
// guest on containerd 2.4 (layered erofs) writes its marker and powers off,
// its disk snapshot is pushed to a registry with its base image and pulled
// on containerd 2.2, where a guest restored from it finds the marker.
func TestVMDiskSnapshotBetweenNodes(t *testing.T) {
	k, err := harness.GuestKernelFromEnv()
	if err != nil {
		t.Skip(err)
	}
	kvm, accel := harness.KVM(k)
	a, b, reg, ctx := twoNodes(t)
	const ref = "docker.io/snapview/vmsnap-travel:1"
	for _, d := range []*harness.Daemon{a, b} {
		if err := importVMImage(ctx, d, ref, k, true, "erofs"); err != nil {
			t.Fatal(err)
		}
	}
	var specOpts []oci.SpecOpts
	if kvm {
		specOpts = append(specOpts, oci.WithLinuxDevice("/dev/kvm", "rwm"))
	}
	opts := &runtimeoptions.Options{ConfigBody: []byte("[block]\nmonitor_rootfs = \"view\"\n")}
	guest := func(d *harness.Daemon, id string, ann map[string]string) string {
		t.Helper()
		r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, runtimeOpts: opts, snapshotter: "erofs", image: ref,
			annotations: ann, args: []string{"sh", "-c", harness.QemuLayeredScript(kvm)}, specOpts: specOpts})
		if err != nil {
			t.Fatal(err)
		}
		watch := watchNeverMounted(readBlockState(t, d, id))
		code, err := r.wait(t)
		for _, v := range watch() {
			t.Errorf("%s's disk: %s", id, v)
		}
		if err != nil || code != 0 {
			t.Fatalf("%s: qemu exited %d (%v, %s); console:\n%s\nstderr: %s", id, code, err, accel, r.stdout.String(), r.stderr.String())
		}
		if _, err := r.task.Delete(ctx); err != nil {
			t.Fatal(err)
		}
		return r.stdout.String()
	}
	first := guest(a, "vmsnap-travel-src", harness.VMAnnotations())
	marker, ok := consoleField(first, harness.GuestWroteLine)
	if !ok {
		t.Fatalf("the first guest printed no marker:\n%s", first)
	}
	s := takeSnapshot(t, a, "vmsnap-travel-src")
	regRef := reg.Addr + "/snapview/vm-disk:1"
	if out, errOut, code := ctlRun(t, a, nil, "snapshot", "push", "--plain-http", s.ID, regRef); code != 0 {
		t.Fatalf("push: exit %d\n%s%s", code, out, errOut)
	}
	if p := pulled(t, b, "--plain-http", regRef); p.ID != s.ID || p.Form != "disk" || p.Base != s.Base {
		t.Fatalf("pulled %+v, pushed %+v", p, s)
	}
	ann := maps.Clone(harness.VMAnnotations())
	ann["io.snapview.restore"] = s.ID
	second := guest(b, "vmsnap-travel-restored", ann)
	t.Logf("the guest restored on containerd %s (%s):\n%s", b.Version, accel, second)
	if found, _ := consoleField(second, harness.GuestFoundLine); found != marker {
		t.Errorf("the guest restored on the other node found %q, want %q", found, marker)
	}
	if fsck, _ := consoleField(second, harness.GuestFsckLine); fsck != "clean, preen exit 0, check exit 0" {
		t.Errorf("the restored guest's filesystem check: %q", fsck)
	}
	removeSnapshot(ctx, t, b, s.ID)
	removeSnapshot(ctx, t, a, s.ID)
}
