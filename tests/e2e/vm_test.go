package e2e

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// TestVM boots a real guest under snapview: a container in block mode on the
// blockfile snapshotter whose process is qemu, booting the guest kernel and
// initrd bound from the image, with the container's own snapshot as the
// guest's virtio disk. The guest mounts that disk read-write, writes a
// marker and powers off; qemu exits 0. Afterwards the marker is read from
// the container's snapshot file (mounted read-only only once the task is
// gone), and throughout the run no host mount of the disk may exist.
//
// The first case is the project's VM image as both the monitor's root and
// the guest's disk; the second runs qemu from a host directory (the
// host-directory monitor rootfs) with an image that holds no monitor. The
// third is the same image on the erofs snapshotter in block mode: qemu
// gets the container's writable disk and every layer of the image as a
// read-only disk, and the guest's initrd stacks the layers under an overlay
// whose upper directory is on the writable disk, where the marker lands;
// the image's layer files stay byte for byte what they were.
func TestVM(t *testing.T) {
	if os.Getenv("SNAPVIEW_GUEST_KERNEL") == "" {
		t.Skip("SNAPVIEW_GUEST_KERNEL is not set: run through `make e2e`")
	}
	k, err := harness.GuestKernelFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		withQemu bool
		layered  bool
	}{
		{"image is the monitor", true, false},
		{"host monitor", false, false},
		{"layered", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, snapshotter := suite.daemon, "blockfile"
			if tc.layered {
				d, snapshotter = layeredDaemon(t, false), "erofs"
			}
			ctx := setup(t, d)
			monitor := "view"
			if !tc.withQemu {
				monitor = t.TempDir()
				if err := harness.WriteMonitorTree(monitor); err != nil {
					t.Fatal(err)
				}
			}
			id := "vm-" + strings.ReplaceAll(tc.name, " ", "-")
			ref := "docker.io/snapview/" + id + ":latest"
			if err := importVMImage(ctx, d, ref, k, tc.withQemu, snapshotter); err != nil {
				t.Fatal(err)
			}
			kvm, accel := harness.KVM(k)
			var specOpts []oci.SpecOpts
			if kvm {
				specOpts = append(specOpts, oci.WithLinuxDevice("/dev/kvm", "rwm"))
			}
			opts := &runtimeoptions.Options{ConfigBody: fmt.Appendf(nil, "[block]\nmonitor_rootfs = %q\n", monitor)}
			args, markerPath, wantRoot := harness.QemuArgs(kvm), harness.GuestMarkerPath, " from root=/dev/vda "
			if tc.layered {
				args = []string{"sh", "-c", harness.QemuLayeredScript(kvm)}
				markerPath, wantRoot = "/upper"+harness.GuestMarkerPath, " from root=/dev/vda snapview.layers=3 "
			}
			started := time.Now()
			r, err := start(ctx, t, d, id, runOpts{
				runtime: snapviewRT, runtimeOpts: opts, snapshotter: snapshotter, image: ref,
				annotations: harness.VMAnnotations(), args: args, specOpts: specOpts,
			})
			if err != nil {
				t.Fatal(err)
			}
			var st blockState
			var layers map[string]string
			if tc.layered {
				ls := readLayeredState(t, d, id)
				st, layers = ls.blockState, layerFiles(t, ls)
			} else {
				st = readBlockState(t, d, id)
			}
			watch := watchNeverMounted(st)
			code, err := r.wait(t)
			violations := watch()
			if err != nil {
				t.Fatalf("%v (%s); the guest console so far:\n%s\nqemu's stderr:\n%s", err, accel, r.stdout.String(), r.stderr.String())
			}
			r.task.IO().Wait()
			out := r.stdout.String()
			t.Logf("guest console (%s, %s from start to power-off):\n%s", accel, time.Since(started).Round(time.Millisecond), out)
			if code != 0 {
				t.Fatalf("qemu exited %d; stderr:\n%s", code, r.stderr.String())
			}
			if !strings.Contains(out, harness.GuestBootedLine+k.Version+wantRoot) {
				t.Errorf("the guest did not report booting kernel %s%s", k.Version, wantRoot)
			}
			if fsck, _ := consoleField(out, harness.GuestFsckLine); fsck != "clean, preen exit 0, check exit 0" {
				t.Errorf("the guest's check of its new disk: %q", fsck)
			}
			for _, v := range violations {
				t.Errorf("during the run: %s", v)
			}
			if _, err := r.task.Delete(ctx); err != nil {
				t.Fatal(err)
			}
			marker := readGuestMarker(t, st.Block.Rootfs.Source, markerPath)
			if !strings.Contains(marker, "kernel="+k.Version) {
				t.Errorf("marker on the container's disk %q, want kernel=%s", marker, k.Version)
			}
			if tc.layered {
				after := hashFiles(t, slices.Collect(maps.Keys(layers)))
				if !maps.Equal(layers, after) {
					t.Errorf("the image's layer files changed: %v, then %v", layers, after)
				}
			}
		})
	}
}

// importVMImage builds the VM image and imports it for snapshotter.
func importVMImage(ctx context.Context, d *harness.Daemon, ref string, k *harness.GuestKernel, withQemu bool, snapshotter string) error {
	img, err := harness.VMImage(ref, k, withQemu)
	if err != nil {
		return err
	}
	archive, err := img.WriteArchiveFile(suite.dir)
	if err != nil {
		return err
	}
	defer os.Remove(archive)
	_, err = d.Import(ctx, ns, &harness.Image{Ref: ref, Archive: archive, Files: img.Files}, snapshotter)
	return err
}

// watchNeverMounted watches, until the returned function is called, the
// mount tables of this process and of containerd for a mount of the
// container's disk (its snapshot file or any loop device bound to it), and
// returns what it saw.
func watchNeverMounted(st blockState) func() []string {
	file := st.Block.Rootfs.Source
	stop := make(chan struct{})
	var (
		mu   sync.Mutex
		seen []string
		wg   sync.WaitGroup
		once = map[string]bool{}
	)
	wg.Go(func() {
		for {
			backed := map[string]bool{file: true, st.Block.Device: true}
			for _, l := range harness.LoopDevices(filepath.Dir(file)) {
				if loop, ok := strings.CutSuffix(l, " -> "+file); ok {
					backed[loop] = true
				}
			}
			infos, _ := mountinfo.GetMounts(func(m *mountinfo.Info) (bool, bool) { return !backed[m.Source], false })
			mu.Lock()
			for _, m := range infos {
				if v := fmt.Sprintf("%s mounted on %s (%s)", m.Source, m.Mountpoint, m.FSType); !once[v] {
					once[v] = true
					seen = append(seen, v)
				}
			}
			mu.Unlock()
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	})
	return func() []string {
		close(stop)
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		return seen
	}
}

// readGuestMarker reads the guest's marker at path from a snapshot file,
// mounting it read-only (and without replaying its journal) in a temporary
// directory: only once the task is gone, never while a guest could write
// it.
func readGuestMarker(t *testing.T, file, path string) string {
	t.Helper()
	dir := t.TempDir()
	if err := mount.All([]mount.Mount{{Type: "ext4", Source: file, Options: []string{"loop", "ro", "noload"}}}, dir); err != nil {
		t.Fatalf("mount the container's disk after the run: %v", err)
	}
	defer func() {
		if err := mount.UnmountAll(dir, unix.MNT_DETACH); err != nil {
			t.Error(err)
		}
	}()
	b, err := os.ReadFile(filepath.Join(dir, path))
	if err != nil {
		t.Fatalf("the guest's marker is not on the container's disk: %v", err)
	}
	return string(b)
}
