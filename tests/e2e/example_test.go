package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestRuntimeAuthorExample builds the worked example of docs/
// runtime-authors.md (examples/launcher, which reads what snapview wrote
// through package params) and runs it inside a layered block-mode
// container with two volumes: from the params file alone it must build a
// qemu command line and a firecracker configuration that give the guest
// every disk, in order, the read-only ones read-only.
func TestRuntimeAuthorExample(t *testing.T) {
	d := layeredDaemon(t, false)
	ctx := setup(t, d)
	importVolumeImages(ctx, t, d, "erofs")
	bin := filepath.Join(t.TempDir(), "launcher")
	build := exec.Command("go", "build", "-o", bin, "./examples/launcher")
	build.Dir = "../.."
	build.Env = append(build.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the example: %v\n%s", err, out)
	}
	r, err := start(ctx, t, d, "example-launcher", runOpts{
		runtime: snapviewRT, runtimeOpts: &runtimeoptions.Options{ConfigBody: []byte(volumeAllow)}, snapshotter: "erofs", annotations: withVolumes(blockAnn),
		args:     []string{"/snapview-launcher"},
		specOpts: []oci.SpecOpts{oci.WithMounts([]specs.Mount{{Destination: "/snapview-launcher", Type: "bind", Source: bin, Options: []string{"bind", "ro"}}})},
	})
	if err != nil {
		t.Fatal(err)
	}
	if code, err := r.wait(t); err != nil || code != 0 {
		t.Fatalf("the example exited %d: %v\n%s%s", code, err, r.stdout.String(), r.stderr.String())
	}
	r.task.IO().Wait()
	out := r.stdout.String()
	t.Logf("the example's output:\n%s", out)
	qemu, _, _ := strings.Cut(out, "\n")
	want := []string{
		"-kernel /.snapview/boot/kernel",
		"-append console=ttyS0 snapview.layers=2 snapview.upperdir=/upper snapview.workdir=/work",
		"-drive file=/dev/snapview/rootfs,format=raw,if=virtio,cache=none -drive file=/dev/snapview/layers/0,format=raw,if=virtio,cache=none,readonly=on" +
			" -drive file=/dev/snapview/layers/1,format=raw,if=virtio,cache=none,readonly=on" +
			" -drive file=/dev/snapview/volumes/models/0,format=raw,if=virtio,cache=none,readonly=on" +
			" -drive file=/dev/snapview/volumes/tools/0,format=raw,if=virtio,cache=none,readonly=on" +
			" -drive file=/dev/snapview/volumes/tools/1,format=raw,if=virtio,cache=none,readonly=on",
	}
	for _, w := range want {
		if !strings.Contains(qemu, w) {
			t.Errorf("qemu command line lacks %q:\n%s", w, qemu)
		}
	}
	for i, w := range []string{`"path_on_host": "/dev/snapview/rootfs"`, `"path_on_host": "/dev/snapview/layers/1"`, `"path_on_host": "/dev/snapview/volumes/tools/1"`, `"boot_args": "console=ttyS0 snapview.layers=2"`} {
		if !strings.Contains(out, w) {
			t.Errorf("firecracker configuration lacks %q (%d):\n%s", w, i, out)
		}
	}
	if n := strings.Count(out, `"is_read_only": true`); n != 5 {
		t.Errorf("%d read-only drives in the firecracker configuration, want 5", n)
	}
}
