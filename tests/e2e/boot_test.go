package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// bootScript runs inside the container. It first damages the container's
// own copy of the artifacts, then reports each bound artifact's sha256,
// whether writing or removing it fails, and the params file.
const bootScript = `
echo overwritten > /boot/vmlinux; rm -f /etc/snapview/config.json /boot/initrd.img
for f in /.snapview/boot/*; do
	n=$(basename $f)
	echo "sum $n $(sha256sum < $f | cut -c1-64)"
	if (echo x > $f) 2>/dev/null; then echo "write $n ok"; else echo "write $n refused"; fi
	if rm -f $f 2>/dev/null && ! test -e $f; then echo "rm $n ok"; else echo "rm $n refused"; fi
done
echo "view $(sha256sum < /image/boot/vmlinux | cut -c1-64)"
if touch /image/new 2>/dev/null; then echo "view-write ok"; else echo "view-write refused"; fi
echo "params $(cat /.snapview/params.json | tr -d '\n ')"
`

var bootArtifacts = map[string]string{
	"kernel": harness.KernelPath,
	"initrd": harness.InitrdPath,
	"config": harness.ConfigPath,
	"passwd": "/boot/abs-link", // an absolute symlink, resolved inside the image
}

func bootAnnotations() map[string]string {
	ann := map[string]string{"io.snapview.view-target": "/image"}
	for name, p := range bootArtifacts {
		ann["io.snapview.boot."+name] = p
	}
	return ann
}

// TestBootArtifacts runs, on each snapshotter, a container whose process
// reads each bound artifact and checks it byte for byte against the image
// after damaging its own copy, fails to write it, and reads params.json.
func TestBootArtifacts(t *testing.T) {
	d := suite.daemon
	eachSnapshotter(t, d, func(ctx context.Context, t *testing.T, sn string, spy runcSpy) {
		id := "boot-" + sn
		r, err := start(ctx, t, d, id, runOpts{
			runtime: snapviewRT, runtimeOpts: spy.opts(),
			snapshotter: sn, annotations: bootAnnotations(), args: []string{"sh", "-c", bootScript},
		})
		if err != nil {
			t.Fatal(err)
		}
		if code, err := r.wait(t); err != nil || code != 0 {
			t.Fatalf("exit %d %v: %s %s", code, err, r.stdout.String(), r.stderr.String())
		}
		r.task.IO().Wait()
		out := r.stdout.String()
		for name, p := range bootArtifacts {
			want := suite.image.Files[p]
			if name == "passwd" {
				want = suite.image.Files["/etc/passwd"]
			}
			for _, line := range []string{"sum " + name + " " + want, "write " + name + " refused", "rm " + name + " refused"} {
				if !strings.Contains(out, line+"\n") {
					t.Errorf("container output lacks %q:\n%s", line, out)
				}
			}
		}
		for _, line := range []string{"view " + suite.image.Files[harness.KernelPath], "view-write refused"} {
			if !strings.Contains(out, line+"\n") {
				t.Errorf("container output lacks %q:\n%s", line, out)
			}
		}
		checkParams(t, out)
		checkBindsInConfig(t, spy.config(id))
	})
}

func checkParams(t *testing.T, out string) {
	t.Helper()
	i := strings.Index(out, "params ")
	if i < 0 {
		t.Fatalf("no params in output:\n%s", out)
	}
	var p struct {
		Rootfs struct {
			Kind, FSType string
		} `json:"rootfs"`
		Artifacts  map[string]string `json:"artifacts"`
		ViewTarget string            `json:"view_target"`
	}
	if err := json.Unmarshal([]byte(strings.TrimSpace(out[i+len("params "):])), &p); err != nil {
		t.Fatalf("params.json: %v\n%s", err, out[i:])
	}
	if p.Rootfs.Kind != "fs" || p.ViewTarget != "/image" || len(p.Artifacts) != len(bootArtifacts) || p.Artifacts["kernel"] != "/.snapview/boot/kernel" {
		t.Errorf("params.json %+v", p)
	}
}

// checkBindsInConfig checks the config.json runc was given: each artifact
// bound read-only, nosuid, nodev from inside the view, with its
// io.snapview.bound.<name> annotation.
func checkBindsInConfig(t *testing.T, path string) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		t.Fatal(err)
	}
	mp := spec.Annotations["io.snapview.view.mountpoint"]
	binds := map[string]specs.Mount{}
	for _, m := range spec.Mounts {
		binds[m.Destination] = m
	}
	for name := range bootArtifacts {
		target := "/.snapview/boot/" + name
		if spec.Annotations["io.snapview.bound."+name] != target {
			t.Errorf("annotation io.snapview.bound.%s = %q", name, spec.Annotations["io.snapview.bound."+name])
		}
		m, ok := binds[target]
		if !ok {
			t.Errorf("no bind at %s", target)
			continue
		}
		if !strings.HasPrefix(m.Source, mp+"/") {
			t.Errorf("bind %s from %s, outside the view %s", target, m.Source, mp)
		}
		opts := "," + strings.Join(m.Options, ",") + ","
		for _, o := range []string{"ro", "nosuid", "nodev"} {
			if !strings.Contains(opts, ","+o+",") {
				t.Errorf("bind %s options %v lack %s", target, m.Options, o)
			}
		}
	}
	if m, ok := binds["/image"]; !ok || m.Source != mp {
		t.Errorf("view bind %+v", m)
	}
	if _, ok := binds["/.snapview/params.json"]; !ok {
		t.Error("no params.json bind")
	}
}

// TestBootHostile checks that every bad or hostile annotation fails the
// create with a snapview: error naming what was wrong, and leaves nothing.
func TestBootHostile(t *testing.T) {
	d := suite.daemon
	many := map[string]string{}
	for i := range 17 {
		many[fmt.Sprintf("io.snapview.boot.a%02d", i)] = harness.KernelPath
	}
	for _, tc := range []struct {
		name         string
		ann          map[string]string
		want         []string
		viewSnapshot bool
	}{
		{"absolute symlink escape", map[string]string{"io.snapview.boot.k": "/boot/abs-escape"}, []string{"io.snapview.boot.k", "/boot/abs-escape", "no such file in the image"}, false},
		{"relative symlink escape", map[string]string{"io.snapview.boot.k": "/boot/rel-escape"}, []string{"io.snapview.boot.k", "no such file in the image"}, false},
		{"proc self root symlink", map[string]string{"io.snapview.boot.k": "/boot/proc-escape"}, []string{"io.snapview.boot.k", "no such file in the image"}, false},
		{"symlink loop", map[string]string{"io.snapview.boot.k": "/boot/loop"}, []string{"io.snapview.boot.k", "/boot/loop"}, false},
		{"directory", map[string]string{"io.snapview.boot.k": "/boot"}, []string{"io.snapview.boot.k", "is a directory"}, false},
		{"fifo", map[string]string{"io.snapview.boot.k": "/boot/fifo"}, []string{"io.snapview.boot.k", "is a fifo"}, false},
		{"device", map[string]string{"io.snapview.boot.k": "/boot/null"}, []string{"io.snapview.boot.k", "is a character device"}, false},
		{"missing file", map[string]string{"io.snapview.boot.k": "/boot/nope"}, []string{"io.snapview.boot.k", "/boot/nope", "no such file"}, false},
		{"relative path", map[string]string{"io.snapview.boot.k": "boot/vmlinux"}, []string{"io.snapview.boot.k", "absolute"}, false},
		{"dot-dot in path", map[string]string{"io.snapview.boot.k": "/boot/../etc/passwd"}, []string{"io.snapview.boot.k", `".."`}, false},
		{"upper-case name", map[string]string{"io.snapview.boot.Kernel": harness.KernelPath}, []string{"io.snapview.boot.Kernel", "must match"}, false},
		{"over-long name", map[string]string{"io.snapview.boot." + strings.Repeat("k", 64): harness.KernelPath}, []string{"io.snapview.boot.kkkk", "must match"}, false},
		{"17 artifacts", many, []string{"17 boot artifacts", "at most 16"}, false},
		{"unknown mode", map[string]string{"io.snapview.mode": "fast"}, []string{"io.snapview.mode", `"fast"`}, false},
		{"relative boot-dir", map[string]string{"io.snapview.boot-dir": "boot", "io.snapview.boot.k": harness.KernelPath}, []string{"io.snapview.boot-dir", "absolute"}, false},
		{"relative view-target", map[string]string{"io.snapview.view-target": "image"}, []string{"io.snapview.view-target", "absolute"}, false},
		{"boot-dir under /proc", map[string]string{"io.snapview.boot-dir": "/proc/boot", "io.snapview.boot.k": harness.KernelPath}, []string{"io.snapview.boot-dir", "under /proc"}, false},
		{"view-target under /sys", map[string]string{"io.snapview.view-target": "/sys/image"}, []string{"io.snapview.view-target", "under /sys"}, false},
		{"boot-dir under /dev", map[string]string{"io.snapview.boot-dir": "/dev/boot", "io.snapview.boot.k": harness.KernelPath}, []string{"io.snapview.boot-dir", "under /dev"}, false},
		{"boot with mode off", map[string]string{"io.snapview.mode": "off", "io.snapview.boot.k": harness.KernelPath}, []string{"io.snapview.boot.k", "mode is off"}, false},
		{"view-target over the params file", map[string]string{"io.snapview.view-target": "/.snapview"}, []string{"overlap", "/.snapview"}, false},
		{"unknown annotation", map[string]string{"io.snapview.bootdir": "/boot"}, []string{"unknown annotation io.snapview.bootdir"}, false},
		{"bind on a read-only rootfs", map[string]string{"io.snapview.boot.k": harness.KernelPath}, []string{"rootfs is read-only", "/.snapview/boot/k"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := setup(t, d)
			id := "hostile-" + strings.NewReplacer(" ", "-", "/", "").Replace(tc.name)
			_, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, annotations: tc.ann, args: []string{"true"}, viewSnapshot: tc.viewSnapshot})
			if err == nil {
				t.Fatal("create succeeded")
			}
			msg := err.Error()
			if !strings.Contains(msg, "snapview: ") {
				t.Fatalf("error %q has no snapview: prefix", msg)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q does not contain %q", msg, w)
				}
			}
			if _, err := os.Stat(bundleDir(d, id)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("bundle left behind: %v", err)
			}
		})
	}
}

// TestBootWithoutSnapshot checks that a container without an image
// snapshot (a rootfs path, as with ctr run --rootfs) runs without a view,
// and that asking it for boot artifacts is a clear error.
func TestBootWithoutSnapshot(t *testing.T) {
	d := suite.daemon
	rootfsDir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(rootfsDir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	bb, err := os.ReadFile(harness.BusyboxPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfsDir, "bin", "busybox"), bb, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("busybox", filepath.Join(rootfsDir, "bin", "sh")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		wantErr string
	}{
		{"no annotations", nil, ""},
		{"boot annotation", map[string]string{"io.snapview.boot.k": harness.KernelPath}, "no image snapshot"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := setup(t, d)
			id := "rootfs-path-" + strings.ReplaceAll(tc.name, " ", "-")
			opts := []oci.SpecOpts{oci.WithDefaultSpec(), oci.WithRootFSPath(rootfsDir), oci.WithProcessArgs("/bin/sh", "-c", "true")}
			if tc.ann != nil {
				opts = append(opts, oci.WithAnnotations(tc.ann))
			}
			ctr, err := d.Client().NewContainer(ctx, id, client.WithRuntime(snapviewRT, nil), client.WithNewSpec(opts...))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { deleteContainer(t, ctr) })
			task, err := ctr.NewTask(ctx, cio.NullIO)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), "snapview: annotation io.snapview.boot.k") || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("want an error about io.snapview.boot.k and %q, got %v", tc.wantErr, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			ch, _ := task.Wait(ctx)
			if err := task.Start(ctx); err != nil {
				t.Fatal(err)
			}
			if st := <-ch; st.ExitCode() != 0 {
				t.Fatalf("exit %d", st.ExitCode())
			}
			if _, err := task.Delete(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestSandboxIgnoresAnnotations checks that a CRI sandbox container gets no
// view and ignores snapview annotations, even bad ones: pod annotations
// reach it too.
func TestSandboxIgnoresAnnotations(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	id := "sandbox"
	ann := map[string]string{"io.kubernetes.cri.container-type": "sandbox", "io.snapview.boot.k": "/boot/nope", "io.snapview.mode": "nonsense"}
	r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, annotations: ann, args: []string{"sleep", "300"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(bundleDir(d, id), "snapview.json")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("sandbox container got a view: %v", err)
	}
	if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
}

// TestCorruptState corrupts snapview.json while the container runs: a normal
// delete and the dead-shim path (which reads it) must both leave nothing.
func TestCorruptState(t *testing.T) {
	d := suite.daemon
	for _, killShim := range []bool{false, true} {
		name := "delete"
		if killShim {
			name = "dead shim"
		}
		t.Run(name, func(t *testing.T) {
			ctx := setup(t, d)
			id := "corrupt-" + strings.ReplaceAll(name, " ", "-")
			r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, annotations: map[string]string{"io.snapview.boot.kernel": harness.KernelPath}, args: []string{"sleep", "300"}})
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(bundleDir(d, id), "snapview.json"), []byte(`{"version":1,"namespace":`), 0o600); err != nil {
				t.Fatal(err)
			}
			if killShim {
				r.killShimAndDelete(ctx, t, d, id)
			} else if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
				t.Fatal(err)
			}
			if err := r.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestPlantedState rewrites a running container's snapview.json to name
// another running container (its id, lease, view and mountpoint), kills the
// shim and deletes the task: the dead-shim path must tear down the right
// view and leave the other container's alone.
func TestPlantedState(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	victim, err := start(ctx, t, d, "planted-victim", runOpts{runtime: snapviewRT, args: []string{"sleep", "300"}})
	if err != nil {
		t.Fatal(err)
	}
	r, err := start(ctx, t, d, "planted", runOpts{runtime: snapviewRT, args: []string{"sleep", "300"}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(bundleDir(d, "planted"), "snapview.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var st map[string]any
	if err := json.Unmarshal(raw, &st); err != nil {
		t.Fatal(err)
	}
	st["container_id"], st["lease"], st["view_key"] = "planted-victim", "snapview/planted-victim", "snapview/planted-victim"
	st["mountpoint"] = filepath.Join(bundleDir(d, "planted-victim"), "snapview", "view")
	if raw, err = json.Marshal(st); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	r.killShimAndDelete(ctx, t, d, "planted")
	if err := r.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
		t.Fatal(err)
	}
	// containerd runs the dead-shim `delete` action when it sees the
	// shim's connection close, concurrently with the task delete.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := d.Client().SnapshotService("overlayfs").Stat(ctx, "snapview/planted"); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the container's own view survived")
		}
	}
	if _, err := d.Client().SnapshotService("overlayfs").Stat(ctx, "snapview/planted-victim"); err != nil {
		t.Fatalf("the other container's view was removed: %v", err)
	}
	if m, err := mountinfo.Mounted(filepath.Join(bundleDir(d, "planted-victim"), "snapview", "view")); err != nil || !m {
		t.Fatalf("the other container's view was unmounted: %v", err)
	}
	if _, err := victim.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
}
