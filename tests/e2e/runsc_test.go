package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// gVisor (Debian's runsc, gVisor 2022-12) as the OCI runtime under
// snapview, set as runc's BinaryName through a one-line wrapper. Its
// platform here is ptrace, its default: this kind of machine has no usable
// KVM (the kvm platform hangs at the sandbox's start). Outside CRI a
// container has no network namespace of its own, where runsc refuses to
// start unless told --network=none; a CRI pod has one (here with only its
// loopback interface), where runsc's own network stack runs.

const runscPath = "/usr/bin/runsc"

// runscWrapper writes the wrapper snapview runs gVisor through, with
// flags, and returns its path.
func runscWrapper(t *testing.T, flags ...string) string {
	t.Helper()
	if _, err := os.Stat(runscPath); err != nil {
		t.Skip("gVisor's runsc is not installed (Debian package runsc, installed by hack/install-deps.sh)")
	}
	bin := filepath.Join(t.TempDir(), "runsc-wrapper")
	script := fmt.Sprintf("#!/bin/sh\nexec %s %s \"$@\"\n", runscPath, strings.Join(flags, " "))
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// runscScript reads a boot artifact, the whole view and both volumes, and
// exits 42 on SIGTERM.
const runscScript = `echo "kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)"
echo "view $(sha256sum < /image` + harness.KernelPath + ` | cut -c1-64)"
` + volumeScript + `trap 'exit 42' TERM
echo ready
while true; do sleep 0.1; done
`

// TestRunsc runs gVisor under snapview through containerd's client, on
// both containerd versions: view mode with a boot artifact, the whole view
// and two volumes, exec, a signal delivered to the container; a SIGKILLed
// shim cleaned up by containerd's delete path; and block mode, which gVisor
// cannot serve, refused with what to do.
func TestRunsc(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		bin := runscWrapper(t, "--network=none")
		opts := &runtimeoptions.Options{ConfigBody: fmt.Appendf(nil, "BinaryName = %q\n%s", bin, volumeAllow)}
		ann := withVolumes(map[string]string{"io.snapview.boot.kernel": harness.KernelPath, "io.snapview.view-target": "/image"})

		t.Run("view", func(t *testing.T) {
			ctx := setup(t, d)
			importVolumeImages(ctx, t, d, "overlayfs")
			r, err := start(ctx, t, d, "runsc-view", runOpts{runtime: snapviewRT, runtimeOpts: opts, annotations: ann, args: []string{"sh", "-c", runscScript}})
			if err != nil {
				t.Fatal(err)
			}
			if err := r.waitOutput("ready"); err != nil {
				t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
			}
			imgs := volumeImages(t)
			out := r.stdout.String()
			kernel := suite.image.Files[harness.KernelPath]
			for _, w := range []string{"kernel " + kernel, "view " + kernel, "weights " + imgs[0].Files["/weights/model.bin"], "tool " + imgs[1].Files["/usr/bin/tool"]} {
				if !strings.Contains(out, w) {
					t.Errorf("container output lacks %q:\n%s", w, out)
				}
			}
			if strings.Contains(out, "volume written") {
				t.Errorf("a volume is writable under gVisor:\n%s", out)
			}
			if code, got, _, err := r.exec(ctx, "probe", "cat", "/models/README"); err != nil || code != 0 || got != "models v1\n" {
				t.Errorf("exec: %d %q %v", code, got, err)
			}
			if err := r.task.Kill(ctx, syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if code, err := r.wait(t); err != nil || code != 42 {
				t.Errorf("after SIGTERM the container exited %d (%v), want 42", code, err)
			}
			if _, err := r.task.Delete(ctx); err != nil {
				t.Fatal(err)
			}
		})

		t.Run("shim killed", func(t *testing.T) {
			ctx := setup(t, d)
			importVolumeImages(ctx, t, d, "overlayfs")
			r, err := start(ctx, t, d, "runsc-killed", runOpts{runtime: snapviewRT, runtimeOpts: opts, annotations: ann, args: []string{"sleep", "300"}})
			if err != nil {
				t.Fatal(err)
			}
			readVolumeState(t, d, "runsc-killed")
			r.killShimAndDelete(ctx, t, d, "runsc-killed")
			if err := r.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
				t.Fatal(err)
			}
		})

		t.Run("block mode refused", func(t *testing.T) {
			ctx := setup(t, d)
			_, err := start(ctx, t, d, "runsc-block", runOpts{runtime: snapviewRT, runtimeOpts: opts, snapshotter: "blockfile", annotations: blockAnn, args: []string{"true"}})
			want := fmt.Sprintf(`snapview: block mode (annotation io.snapview.mode) needs an OCI runtime that creates the container's block devices (linux.devices), but BinaryName %q is gVisor ("runsc version`, bin)
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("create: %v, want %q", err, want)
			}
		})
	})
}
