package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// snapviewctl runs snapviewctl against daemon d and returns its output and
// exit code.
func snapviewctl(t *testing.T, d *harness.Daemon, args ...string) (string, int) {
	t.Helper()
	full := append([]string{"--address", d.Address, "--state", d.State, "--namespace", ns}, args...)
	out, err := exec.Command(os.Getenv("SNAPVIEW_CTL"), full...).CombinedOutput()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &exit):
		return string(out), exit.ExitCode()
	default:
		t.Fatalf("snapviewctl %v: %v", args, err)
		return "", -1
	}
}

// TestSnapviewctlLs lists the views of running containers in both modes, a
// planted orphan and a view whose mount went missing, and inspects one.
func TestSnapviewctlLs(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	for _, c := range []struct {
		id, snapshotter string
		ann             map[string]string
	}{
		{"ls-view", "overlayfs", nil},
		{"ls-block", "blockfile", blockAnn},
		{"ls-broken", "overlayfs", nil},
	} {
		if _, err := start(ctx, t, d, c.id, runOpts{runtime: snapviewRT, snapshotter: c.snapshotter, annotations: c.ann, args: []string{"sleep", "300"}}); err != nil {
			t.Fatal(err)
		}
	}
	broken := filepath.Join(bundleDir(d, "ls-broken"), "snapview", "view")
	if err := unix.Unmount(broken, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	// The shims just started sweep the node shortly after their start;
	// that sweep is made not due (as if it had just run) before the orphan
	// is planted, so that the orphan is still there for ls and gc (a
	// shim's sweep once took it first).
	sweepDue(t, d, time.Now())
	makeOrphan(ctx, t, d, "ls-ghost", true)

	out, code := snapviewctl(t, d, "ls", "--json")
	if code != 0 {
		t.Fatalf("ls --json exit %d:\n%s", code, out)
	}
	var entries []struct {
		Container, Mode, Snapshotter, Device, Health, Mountpoint string
		Lease                                                    string `json:"lease"`
		ViewKey                                                  string `json:"view_key"`
	}
	if err := json.Unmarshal([]byte(out), &entries); err != nil {
		t.Fatalf("ls --json: %v\n%s", err, out)
	}
	got := map[string]string{}
	for _, e := range entries {
		got[e.Container] = e.Health
		switch e.Container {
		case "ls-view":
			if e.Mode != "view" || e.Snapshotter != "overlayfs" || e.ViewKey != "snapview/ls-view" || e.Lease != "snapview/ls-view" || e.Mountpoint == "" {
				t.Errorf("ls-view %+v", e)
			}
		case "ls-block":
			if e.Mode != "block" || e.Snapshotter != "blockfile" || !strings.HasPrefix(e.Device, "/dev/loop") {
				t.Errorf("ls-block %+v", e)
			}
		}
	}
	for id, want := range map[string]string{"ls-view": "ok", "ls-block": "ok", "ls-broken": "broken: view without mount", "ls-ghost": "orphan: container gone"} {
		if got[id] != want {
			t.Errorf("%s: health %q, want %q", id, got[id], want)
		}
	}
	table, code := snapviewctl(t, d, "ls")
	if code != 0 || !strings.Contains(table, "NAMESPACE") || !strings.Contains(table, "orphan: container gone") {
		t.Errorf("ls exit %d:\n%s", code, table)
	}

	info, code := snapviewctl(t, d, "inspect", "ls-block")
	for _, want := range []string{"health      ok", "mode        block", `"mode": "block"`, "lease       snapview/ls-block", "view        blockfile/snapview/ls-block", "device      /dev/loop", " bound to ", "; monitor rootfs view"} {
		if code != 0 || !strings.Contains(info, want) {
			t.Errorf("inspect ls-block (exit %d) lacks %q:\n%s", code, want, info)
		}
	}
	if out, code := snapviewctl(t, d, "inspect", "no-such-container"); code != 1 {
		t.Errorf("inspect of an unknown container: exit %d:\n%s", code, out)
	}
	if out, code := snapviewctl(t, d, "gc"); code != 0 || !strings.Contains(out, "removed orphan "+ns+"/ls-ghost") {
		t.Errorf("gc exit %d:\n%s", code, out)
	}
}

// TestSnapviewctlInstallConfigs installs into roots holding containerd
// configurations of versions 2 and 3, twice (the second run changes
// nothing), and uninstalls: the configuration is back byte for byte.
func TestSnapviewctlInstallConfigs(t *testing.T) {
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	for _, tc := range []struct{ name, config string }{
		{"version 2", "# A containerd 1.7-style configuration.\nversion = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.10\" # pinned\n"},
		{"version 3", "version = 3\nroot = \"/var/lib/containerd\"\n\n# Images.\n[plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"overlayfs\"\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			cfg := filepath.Join(root, "etc/containerd/config.toml")
			if err := os.MkdirAll(filepath.Dir(cfg), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(cfg, []byte(tc.config), 0o644); err != nil {
				t.Fatal(err)
			}
			ctl := os.Getenv("SNAPVIEW_CTL")
			run := func(args ...string) string {
				t.Helper()
				out, err := exec.Command(ctl, append(args, "--root", root, "--shim", suite.tools.Shim, "--ctl", ctl)...).CombinedOutput()
				if err != nil {
					t.Fatalf("snapviewctl %v: %v\n%s", args, err, out)
				}
				return string(out)
			}
			dry := run("install", "--dry-run")
			if !strings.Contains(dry, "would write /etc/containerd/conf.d/snapview.toml") {
				t.Errorf("dry run:\n%s", dry)
			}
			if data, _ := os.ReadFile(cfg); string(data) != tc.config {
				t.Fatal("the dry run changed the configuration")
			}
			out := run("install")
			for _, want := range []string{"/usr/local/bin/containerd-shim-snapview-v2", "/etc/containerd/conf.d/snapview.toml", "import /etc/containerd/conf.d/snapview.toml", "restart containerd"} {
				if !strings.Contains(out, want) {
					t.Errorf("install output lacks %q:\n%s", want, out)
				}
			}
			if again := run("install"); !strings.Contains(again, "nothing to change") {
				t.Errorf("second install:\n%s", again)
			}
			data, _ := os.ReadFile(cfg)
			if !strings.Contains(string(data), tc.config[:20]) || !strings.Contains(string(data), "# pinned") && tc.name == "version 2" {
				t.Errorf("the operator's configuration lost something:\n%s", data)
			}
			run("uninstall")
			if data, _ := os.ReadFile(cfg); string(data) != tc.config {
				t.Fatalf("after uninstall:\n%s\nwant:\n%s", data, tc.config)
			}
			if again := run("uninstall"); !strings.Contains(again, "nothing to change") {
				t.Errorf("second uninstall:\n%s", again)
			}
		})
	}
}

// TestSnapviewctlInstallDaemon installs snapview into a private containerd's
// own configuration under a handler of its own, restarts the daemon, and
// runs a CRI pod through the installed handler with a boot artifact; then
// uninstalls, restarts, and the handler is gone.
func TestSnapviewctlInstallDaemon(t *testing.T) {
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pause, err := harness.BuildImage(suite.dir, harness.ImageSpec{Ref: pauseImage, KernelSize: 1 << 10, Cmd: []string{"sleep", "86400"}})
	if err != nil {
		t.Fatal(err)
	}
	d, err := harness.StartDaemon(ctx, suite.dir, suite.tools, harness.WithCRI(harness.CRIConfig{SandboxImage: pauseImage}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Stop(); err != nil {
			t.Errorf("stop the daemon: %v", err)
		}
	})
	setup(t, d)
	for _, img := range []*harness.Image{pause, suite.image} {
		if _, err := d.Import(ctx, criNamespace, img, "overlayfs"); err != nil {
			t.Fatal(err)
		}
	}
	cfg := filepath.Join(d.Dir, "config.toml")
	orig, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctl := os.Getenv("SNAPVIEW_CTL")
	args := []string{"--root", "/", "--config", cfg, "--dropin", filepath.Join(d.Dir, "conf.d", "snapview.toml"),
		"--snapview-config", filepath.Join(d.Dir, "snapview-installed.toml"), "--prefix", filepath.Join(d.Dir, "prefix"),
		"--handler", "snapview-installed", "--shim", suite.tools.Shim, "--ctl", ctl}
	if out, err := exec.Command(ctl, append([]string{"install"}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("install: %v\n%s", err, out)
	}
	if err := d.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+d.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	// Closed after the pod's own cleanup (t.Cleanup runs last-registered
	// first), which still needs the connection.
	t.Cleanup(func() { conn.Close() })
	rs := runtime.NewRuntimeServiceClient(conn)
	func() {
		pctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		podID, podConfig, logDir := runPod(pctx, t, rs, "snapview-installed", map[string]string{"io.snapview.boot.kernel": harness.KernelPath})
		c, err := rs.CreateContainer(pctx, containerRequest(podID, podConfig, "app", nil,
			"sh", "-c", "echo \"kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)\""))
		if err != nil {
			t.Fatalf("CreateContainer through the installed handler: %v", err)
		}
		if _, err := rs.StartContainer(pctx, &runtime.StartContainerRequest{ContainerId: c.ContainerId}); err != nil {
			t.Fatalf("StartContainer: %v", err)
		}
		waitLog(t, filepath.Join(logDir, "app.log"), "kernel "+suite.image.Files[harness.KernelPath])
		if _, err := rs.StopPodSandbox(pctx, &runtime.StopPodSandboxRequest{PodSandboxId: podID}); err != nil {
			t.Fatal(err)
		}
		if _, err := rs.RemovePodSandbox(pctx, &runtime.RemovePodSandboxRequest{PodSandboxId: podID}); err != nil {
			t.Fatal(err)
		}
	}()

	if out, err := exec.Command(ctl, append([]string{"uninstall"}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	if data, _ := os.ReadFile(cfg); string(data) != string(orig) {
		t.Fatalf("the daemon's configuration after uninstall:\n%s\nwant:\n%s", data, orig)
	}
	if err := d.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	_, err = rs.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: &runtime.PodSandboxConfig{
		Metadata: &runtime.PodSandboxMetadata{Name: "gone", Namespace: "default", Uid: "gone"}}, RuntimeHandler: "snapview-installed"})
	if err == nil || !strings.Contains(err.Error(), "snapview-installed") {
		t.Fatalf("a pod through the uninstalled handler: %v, want an error naming it", err)
	}
}

// TestSnapviewctlLsLayered lists and inspects what snapview holds on the
// erofs snapshotter in block mode: a layered block-mode container with its
// layer disks, and a container without a view whose rootfs activation is
// all snapview holds for it.
func TestSnapviewctlLsLayered(t *testing.T) {
	d := layeredDaemon(t, false)
	ctx := setup(t, d)
	for _, c := range []struct {
		id  string
		ann map[string]string
	}{
		{"ls-layered", blockAnn},
		{"ls-none", map[string]string{"io.snapview.mode": "off"}},
	} {
		if _, err := start(ctx, t, d, c.id, runOpts{runtime: snapviewRT, snapshotter: "erofs", annotations: c.ann, args: []string{"sleep", "300"}}); err != nil {
			t.Fatal(err)
		}
	}
	out, code := snapviewctl(t, d, "ls", "--json")
	if code != 0 {
		t.Fatalf("ls --json exit %d:\n%s", code, out)
	}
	var entries []struct {
		Container, Mode, Device, Health string
		Layers                          int
		RootfsActivation                string `json:"rootfs_activation"`
	}
	if err := json.Unmarshal([]byte(out), &entries); err != nil {
		t.Fatalf("ls --json: %v\n%s", err, out)
	}
	seen := 0
	for _, e := range entries {
		switch e.Container {
		case "ls-layered":
			seen++
			if e.Mode != "block" || e.Layers != 2 || !strings.HasPrefix(e.Device, "/dev/loop") || e.Health != "ok" {
				t.Errorf("ls-layered %+v", e)
			}
		case "ls-none":
			seen++
			if e.Mode != "none" || e.RootfsActivation != "ls-none" || e.Health != "ok" {
				t.Errorf("ls-none %+v", e)
			}
		}
	}
	if seen != 2 {
		t.Errorf("ls lists %d of the 2 containers:\n%s", seen, out)
	}
	info, code := snapviewctl(t, d, "inspect", "ls-layered")
	for _, want := range []string{"health      ok", "layer       /dev/snapview/layers/0: /dev/loop", "layer       /dev/snapview/layers/1: /dev/loop", "read-only", " bound to "} {
		if code != 0 || !strings.Contains(info, want) {
			t.Errorf("inspect ls-layered (exit %d) lacks %q:\n%s", code, want, info)
		}
	}
	info, code = snapviewctl(t, d, "inspect", "ls-none")
	for _, want := range []string{"mode        none", "rootfs      mount activation ls-none: 3 mounts performed"} {
		if code != 0 || !strings.Contains(info, want) {
			t.Errorf("inspect ls-none (exit %d) lacks %q:\n%s", code, want, info)
		}
	}
}
