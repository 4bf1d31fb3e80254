package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// nerdctlNS is nerdctl's containerd namespace in the tests, unique per test
// process like ns.
var nerdctlNS = fmt.Sprintf("snapview-nerdctl-%d", os.Getpid())

// nerdctlCLI runs nerdctl (built by hack/install-clients.sh) as a user
// types it, against daemon d, with a namespace, a data root and a CNI
// configuration directory of its own and no nerdctl.toml, so that nothing
// of the host's is read or written. Every run gets --pull never: the
// images are loaded, and nothing may reach a registry on the network.
type nerdctlCLI struct {
	d        *harness.Daemon
	dataRoot string
	global   []string
	env      []string
}

// newNerdctl returns nerdctl for daemon d, or skips the test if
// SNAPVIEW_NERDCTL is not set. It registers the test's forced cleanup (every
// container of nerdctl's namespace removed with rm -f): call it before
// setup, so that the leak check runs first and sees what the test left.
func newNerdctl(t *testing.T, d *harness.Daemon) *nerdctlCLI {
	t.Helper()
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	if why := harness.NeedClient("SNAPVIEW_NERDCTL", suite.tools.Nerdctl); why != "" {
		t.Skip(why)
	}
	dir := t.TempDir()
	n := &nerdctlCLI{d: d, dataRoot: filepath.Join(dir, "data")}
	n.global = []string{
		"--address", d.Address, "--namespace", nerdctlNS, "--data-root", n.dataRoot,
		"--cni-netconfpath", filepath.Join(dir, "cni", "net.d"), "--cni-path", filepath.Join(dir, "cni", "bin"),
		// nerdctl's default is systemd on a systemd host; snapview's runc
		// is told SystemdCgroup = false (docs/clients.md).
		"--cgroup-manager", "cgroupfs",
	}
	n.env = append(os.Environ(), "NERDCTL_TOML="+filepath.Join(dir, "nerdctl.toml"))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		ids, _, err := n.run(ctx, "ps", "-a", "-q", "--no-trunc")
		if err != nil {
			t.Logf("cleanup: nerdctl ps: %v", err)
			return
		}
		if f := strings.Fields(ids); len(f) > 0 {
			if _, _, err := n.run(ctx, append([]string{"rm", "-f"}, f...)...); err != nil {
				t.Errorf("cleanup: nerdctl rm -f: %v", err)
			}
		}
	})
	return n
}

// run runs nerdctl with args after the global flags and returns its
// stdout and stderr; the error, if any, carries both.
func (n *nerdctlCLI) run(ctx context.Context, args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, suite.tools.Nerdctl, append(slices.Clone(n.global), args...)...)
	cmd.Env = n.env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("nerdctl %s: %w\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), stderr.String(), err
}

// must runs nerdctl and fails the test if it fails.
func (n *nerdctlCLI) must(ctx context.Context, t *testing.T, args ...string) string {
	t.Helper()
	out, _, err := n.run(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// runArgs are the arguments of a `nerdctl run` of the test image with
// snapview, each annotation as --annotation, the network and entrypoint
// given (arguments after the image are appended to the image's
// ENTRYPOINT, as in Docker), and script run by sh -c.
func runArgs(flags []string, ann map[string]string, script string) []string {
	args := append([]string{"run", "--pull", "never", "--runtime", snapviewRT}, flags...)
	for _, k := range slices.Sorted(maps.Keys(ann)) {
		args = append(args, "--annotation", k+"="+ann[k])
	}
	if !slices.Contains(flags, "--network") && !slices.ContainsFunc(flags, func(f string) bool { return strings.HasPrefix(f, "--network=") }) {
		args = append(args, "--network", "none")
	}
	return append(args, "--entrypoint", "sh", testImageID, "-c", script)
}

// nerdctlLoaded records the daemons whose nerdctl namespace has the test
// image.
var nerdctlLoaded struct {
	mu sync.Mutex
	d  map[*harness.Daemon]bool
}

// loadImage loads the test image's OCI archive into nerdctl's namespace
// with `nerdctl load`, once per daemon; it is unpacked for overlayfs, and
// nerdctl unpacks it for another snapshotter when a run names one.
func (n *nerdctlCLI) loadImage(ctx context.Context, t *testing.T) {
	t.Helper()
	nerdctlLoaded.mu.Lock()
	defer nerdctlLoaded.mu.Unlock()
	if nerdctlLoaded.d[n.d] {
		return
	}
	out := n.must(ctx, t, "load", "-i", suite.image.Archive)
	if !strings.Contains(out, "Loaded image: "+testImageID) {
		t.Fatalf("nerdctl load: %s", out)
	}
	if nerdctlLoaded.d == nil {
		nerdctlLoaded.d = map[*harness.Daemon]bool{}
	}
	nerdctlLoaded.d[n.d] = true
}

// withDefaultConfig writes body as snapview's default configuration file,
// the one $SNAPVIEW_CONFIG names in the daemon's environment, for the rest
// of the test: nerdctl passes no runtime options to a runtime other than
// runc's, so this file is how snapview's configuration reaches the shim.
func withDefaultConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(suite.dir, "snapview.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(p) })
	return p
}

// checkNerdctlEmpty checks that nerdctl lists no container and that its
// data root keeps nothing of one: no state directory, /etc/hosts entry or
// name (what its OCI hooks and rm manage).
func (n *nerdctlCLI) checkEmpty(ctx context.Context, t *testing.T) {
	t.Helper()
	if out := n.must(ctx, t, "ps", "-a", "-q"); strings.TrimSpace(out) != "" {
		t.Errorf("nerdctl ps -a lists containers: %q", out)
	}
	for _, kind := range []string{"containers", "etchosts", "names"} {
		dirs, _ := filepath.Glob(filepath.Join(n.dataRoot, "*", kind, nerdctlNS, "*"))
		if len(dirs) > 0 {
			t.Errorf("nerdctl's data root keeps %s: %v", kind, dirs)
		}
	}
}

const bootAndVolumeScript = `
echo "kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)"
echo "initrd $(sha256sum < /.snapview/boot/initrd | cut -c1-64)"
` + volumeScript

// TestNerdctlRunRm runs `nerdctl run --rm --runtime io.containerd.snapview.v2`
// on both containerd versions, as a user types it: boot artifacts and two
// volumes asked for with --annotation reach the container from snapview's
// view (the volumes allowed by snapview's default configuration file, since
// nerdctl sends no runtime options); a --label of the same name reaches
// nothing (nerdctl ≥2.0 keeps labels from the runtime); nothing is left.
func TestNerdctlRunRm(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		n := newNerdctl(t, d)
		ctx := setup(t, d)
		n.loadImage(ctx, t)
		withDefaultConfig(t, volumeAllow)
		for _, img := range volumeImages(t) {
			if _, err := d.Import(ctx, nerdctlNS, img, "overlayfs"); err != nil {
				t.Fatal(err)
			}
		}

		ann := map[string]string{"io.snapview.boot.kernel": harness.KernelPath, "io.snapview.boot.initrd": harness.InitrdPath}
		out := n.must(ctx, t, runArgs([]string{"--rm"}, withVolumes(ann), bootAndVolumeScript)...)
		imgs := volumeImages(t)
		for _, w := range []string{
			"kernel " + suite.image.Files[harness.KernelPath], "initrd " + suite.image.Files[harness.InitrdPath],
			"weights " + imgs[0].Files["/weights/model.bin"], "readme models v1", "tool " + imgs[1].Files["/usr/bin/tool"],
			`"artifacts":{"initrd":"/.snapview/boot/initrd","kernel":"/.snapview/boot/kernel"}`,
			`"volumes":{"models":{"image":"` + modelsImage + `","target":"/models"}`,
		} {
			if !strings.Contains(out, w) {
				t.Errorf("nerdctl run output lacks %q:\n%s", w, out)
			}
		}
		if strings.Contains(out, "volume written") || strings.Count(out, "volume write refused") != 2 {
			t.Errorf("a volume is writable:\n%s", out)
		}

		out = n.must(ctx, t, "run", "--rm", "--pull", "never", "--runtime", snapviewRT, "--network", "none",
			"--label", "io.snapview.boot.kernel="+harness.KernelPath, "--entrypoint", "sh", testImageID, "-c",
			"if [ -e /.snapview ]; then echo bound; else echo not-bound; fi")
		if strings.TrimSpace(out) != "not-bound" {
			t.Errorf("with --label instead of --annotation: %q, want not-bound (labels do not reach the runtime)", out)
		}
		n.checkEmpty(ctx, t)
	})
}

// detachedScript reports a boot artifact, writes to stderr, and waits for
// SIGTERM, which it answers by exiting 0.
const detachedScript = `trap 'echo stopping; exit 0' TERM
echo "kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)"
echo "to-stderr" >&2
echo ready
sleep 300 & wait
`

// TestNerdctlDetached runs `nerdctl run -d` with snapview, on both
// containerd versions, in a network namespace the test made
// (--network ns:<path>): logs (nerdctl's binary:// log driver, spawned by
// the shim), exec, stop (SIGTERM reaches the container), start (a new
// task: the old one's postStop hook runs at its delete, the new one's
// createRuntime hook at its create, both inside the shim's runc), stop and
// rm; snapview's view exists while a task does and nothing is left after rm.
func TestNerdctlDetached(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		n := newNerdctl(t, d)
		ctx := setup(t, d)
		n.loadImage(ctx, t)
		netns := newTestNetNS(t)

		name := "nerdctl-detached"
		ann := map[string]string{"io.snapview.boot.kernel": harness.KernelPath}
		id := strings.TrimSpace(n.must(ctx, t, runArgs([]string{"-d", "--name", name, "--network", "ns:" + netns}, ann, detachedScript)...))
		if len(id) != 64 {
			t.Fatalf("nerdctl run -d printed %q, not a container id", id)
		}
		logs := func() (string, string) {
			stdout, stderr, err := n.run(ctx, "logs", name)
			if err != nil {
				t.Fatal(err)
			}
			return stdout, stderr
		}
		waitFor := func(what string, cond func() bool) {
			t.Helper()
			deadline := time.Now().Add(20 * time.Second)
			for !cond() {
				if time.Now().After(deadline) {
					stdout, stderr := logs()
					t.Fatalf("%s within 20s; logs:\n%s\nstderr:\n%s", what, stdout, stderr)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		waitFor("no ready in the logs", func() bool { s, _ := logs(); return strings.Contains(s, "ready") })
		stdout, stderr := logs()
		if !strings.Contains(stdout, "kernel "+suite.image.Files[harness.KernelPath]) || !strings.Contains(stderr, "to-stderr") {
			t.Errorf("nerdctl logs: stdout %q, stderr %q", stdout, stderr)
		}
		hasLease := func() bool {
			return slices.ContainsFunc(d.ViewLeaks(ctx, nerdctlNS), func(l string) bool { return strings.HasPrefix(l, "lease "+nerdctlNS+"/") })
		}
		if !hasLease() {
			t.Errorf("no snapview lease for nerdctl's running container: %v", d.ViewLeaks(ctx, nerdctlNS))
		}

		out := n.must(ctx, t, "exec", name, "sh", "-c", `echo "exec-kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)"; echo "netns $(readlink /proc/1/ns/net)"`)
		var st syscall.Stat_t
		if err := syscall.Stat(netns, &st); err != nil {
			t.Fatal(err)
		}
		for _, w := range []string{"exec-kernel " + suite.image.Files[harness.KernelPath], fmt.Sprintf("netns net:[%d]", st.Ino)} {
			if !strings.Contains(out, w) {
				t.Errorf("nerdctl exec output lacks %q:\n%s", w, out)
			}
		}

		// nerdctl's hooks write into the container's state directory.
		stateDir := func() string {
			dirs, _ := filepath.Glob(filepath.Join(n.dataRoot, "*", "containers", nerdctlNS, id))
			if len(dirs) != 1 {
				t.Fatalf("nerdctl's state directory of %s: %v", id, dirs)
			}
			return dirs[0]
		}
		var lifecycle struct {
			StartedAt time.Time `json:"started_at"`
		}
		raw, err := os.ReadFile(filepath.Join(stateDir(), "lifecycle.json"))
		if err != nil || json.Unmarshal(raw, &lifecycle) != nil || lifecycle.StartedAt.IsZero() {
			t.Errorf("the createRuntime hook did not record the start (lifecycle.json %q, %v)", raw, err)
		}
		if _, err := os.Stat(filepath.Join(stateDir(), "oci-hook.createRuntime.log")); err != nil {
			t.Errorf("the createRuntime hook did not run: %v", err)
		}

		n.must(ctx, t, "stop", "-t", "10", name)
		if s, _ := logs(); !strings.Contains(s, "stopping") {
			t.Errorf("SIGTERM did not reach the container; logs:\n%s", s)
		}
		if out := n.must(ctx, t, "ps", "-a", "--format", "{{.Status}}"); !strings.Contains(out, "Exited (0)") {
			t.Errorf("nerdctl ps after stop: %q, want Exited (0)", out)
		}
		if _, err := os.Stat(filepath.Join(stateDir(), "oci-hook.postStop.log")); err == nil {
			t.Error("the postStop hook ran before the task's delete")
		}
		if !hasLease() {
			t.Error("the view went with the stop; it belongs to the task, which nerdctl deletes only at start or rm")
		}

		first := lifecycle.StartedAt
		n.must(ctx, t, "start", name)
		waitFor("the second start's output", func() bool { s, _ := logs(); return strings.Count(s, "ready") == 2 })
		if _, err := os.Stat(filepath.Join(stateDir(), "oci-hook.postStop.log")); err != nil {
			t.Errorf("the first task's postStop hook did not run at its delete: %v", err)
		}
		raw, _ = os.ReadFile(filepath.Join(stateDir(), "lifecycle.json"))
		if json.Unmarshal(raw, &lifecycle) != nil || !lifecycle.StartedAt.After(first) {
			t.Errorf("the second task's createRuntime hook did not record its start: %s", raw)
		}

		n.must(ctx, t, "stop", "-t", "10", name)
		n.must(ctx, t, "rm", name)
		n.checkEmpty(ctx, t)
	})
}

// newTestNetNS makes a network namespace for the test, with loopback up,
// and returns the path of its file; it is removed when the test ends.
func newTestNetNS(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("snapview-e2e-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip -n %s link set lo up: %v: %s", name, err, out)
	}
	return "/run/netns/" + name
}

// blockProbe reports, in a block-mode container, the rootfs disk and its
// ext4 magic, each layer disk and each volume disk with the erofs magic,
// and the params.
const blockProbe = `
echo "node /dev/snapview/rootfs $(stat -c '%F' /dev/snapview/rootfs)"
echo "rootfs-magic $(dd if=/dev/snapview/rootfs bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')"
for d in /dev/snapview/layers/* /dev/snapview/volumes/*/*; do
  [ -b "$d" ] && echo "erofs-magic $d $(dd if=$d bs=1 skip=1024 count=4 2>/dev/null | od -An -tx1 | tr -d ' \n')"
done
echo "kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)"
echo "params $(tr -d '\n ' < /.snapview/params.json)"
`

// TestNerdctlBlock runs block mode through nerdctl's --snapshotter, on both
// containerd versions: on blockfile the container gets its own snapshot as
// /dev/snapview/rootfs; on the erofs snapshotter in block mode its
// writable disk, each layer of the image and each layer of two volumes as
// read-only erofs disks.
func TestNerdctlBlock(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		for _, tc := range []struct {
			sn   string
			ann  map[string]string
			want []string
		}{
			{"blockfile", blockAnn, []string{`"kind":"block"`}},
			{"erofs", withVolumes(blockAnn), []string{
				`"kind":"layered"`, "erofs-magic /dev/snapview/layers/0 e2e1f5e0", "erofs-magic /dev/snapview/layers/1 e2e1f5e0",
				"erofs-magic /dev/snapview/volumes/models/0 e2e1f5e0", "erofs-magic /dev/snapview/volumes/tools/1 e2e1f5e0",
			}},
		} {
			t.Run(tc.sn, func(t *testing.T) {
				n := newNerdctl(t, d)
				ctx := setup(t, d)
				n.loadImage(ctx, t)
				withDefaultConfig(t, volumeAllow)
				if tc.sn == "erofs" {
					for _, img := range volumeImages(t) {
						if _, err := d.Import(ctx, nerdctlNS, img, "erofs"); err != nil {
							t.Fatal(err)
						}
					}
				}
				out := n.must(ctx, t, append([]string{"--snapshotter", tc.sn}, runArgs([]string{"--rm"}, tc.ann, blockProbe)...)...)
				for _, w := range append([]string{
					"node /dev/snapview/rootfs block special file", "rootfs-magic 53ef",
					"kernel " + suite.image.Files[harness.KernelPath], `"device":"/dev/snapview/rootfs"`,
				}, tc.want...) {
					if !strings.Contains(out, w) {
						t.Errorf("nerdctl run output lacks %q:\n%s", w, out)
					}
				}
				if tc.sn == "blockfile" && strings.Contains(out, "/dev/snapview/layers/") {
					t.Errorf("layer disks on blockfile:\n%s", out)
				}
				n.checkEmpty(ctx, t)
			})
		}
	})
}

// TestNerdctlRuntimeByPath checks what a user sees who gives nerdctl the
// shim's path instead of its name: nerdctl takes any path for a runc binary
// and runs containerd's runc shim with it as BinaryName, which then calls
// the snapview shim as if it were runc. The shim recognises runc's command
// line and says, where runc's shim reads an OCI runtime's error, to pass
// the runtime by name; the run fails and leaves nothing.
func TestNerdctlRuntimeByPath(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		n := newNerdctl(t, d)
		ctx := setup(t, d)
		n.loadImage(ctx, t)
		_, stderr, err := n.run(ctx, "run", "--rm", "--pull", "never", "--network", "none", "--runtime", suite.tools.Shim,
			"--entrypoint", "true", testImageID)
		if err == nil {
			t.Fatal("nerdctl run with the shim's path succeeded")
		}
		t.Logf("nerdctl run --runtime %s: %s", suite.tools.Shim, strings.TrimSpace(stderr))
		for _, w := range []string{"OCI runtime create failed", "snapview: containerd-shim-snapview-v2 is a containerd shim, not an OCI runtime: pass the runtime by name, --runtime io.containerd.snapview.v2"} {
			if !strings.Contains(stderr, w) {
				t.Errorf("nerdctl's error lacks %q:\n%s", w, stderr)
			}
		}
		n.checkEmpty(ctx, t)
	})
}

// TestNerdctlConfigFile shows that snapview's default configuration file
// reaches the shim under nerdctl, which sends no runtime options: an
// unknown key in it fails the run with snapview's message naming the file.
func TestNerdctlConfigFile(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		n := newNerdctl(t, d)
		ctx := setup(t, d)
		n.loadImage(ctx, t)
		cfg := withDefaultConfig(t, "[view]\nmod = \"view\"\n")
		_, stderr, err := n.run(ctx, runArgs([]string{"--rm"}, nil, "true")...)
		if err == nil {
			t.Fatal("nerdctl run succeeded with an unknown key in snapview's configuration")
		}
		if w := `snapview: unknown configuration key \"view.mod\" in ` + cfg; !strings.Contains(stderr, w) {
			t.Errorf("nerdctl's error lacks %q:\n%s", w, stderr)
		}
		n.checkEmpty(ctx, t)
	})
}

// TestNerdctlSnapshots takes snapshots of a container nerdctl runs and
// restores them through nerdctl, on both containerd versions: the container
// snapshot runs as its image with `nerdctl run`, and the directory snapshot
// is a volume (--annotation io.snapview.volume.<name>) of a container of
// the test image; both snapshots are then removed and nothing is left.
func TestNerdctlSnapshots(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		n := newNerdctl(t, d)
		ctx := setup(t, d)
		n.loadImage(ctx, t)
		marker := fmt.Sprintf("nerdctl-state-%d", time.Now().UnixNano())
		n.must(ctx, t, runArgs([]string{"-d", "--name", "snap-src"}, nil,
			"echo "+marker+" > /state && mkdir -p /data && echo "+marker+" > /data/kept && echo ready && exec sleep 300")...)
		for i := 0; ; i++ {
			if out, _, _ := n.run(ctx, "logs", "snap-src"); strings.Contains(out, "ready") {
				break
			}
			if i > 200 {
				t.Fatal("the source container did not start")
			}
			time.Sleep(50 * time.Millisecond)
		}
		id := strings.TrimSpace(n.must(ctx, t, "inspect", "--format", "{{.ID}}", "snap-src"))
		take := func(args ...string) snapshotJSON {
			t.Helper()
			out, errOut, code := ctlRunIn(t, d, nerdctlNS, nil, append([]string{"snapshot", "create"}, append(args, id)...)...)
			if code != 0 {
				t.Fatalf("snapshot create %v: exit %d\n%s%s", args, code, out, errOut)
			}
			var s snapshotJSON
			if err := json.Unmarshal([]byte(out), &s); err != nil {
				t.Fatalf("snapshot create printed %q: %v", out, err)
			}
			return s
		}
		whole, dir := take(), take("--dir", "/data")
		n.must(ctx, t, "rm", "-f", "snap-src")

		out := n.must(ctx, t, "run", "--rm", "--pull", "never", "--runtime", snapviewRT, "--network", "none", "--entrypoint", "cat", whole.Image, "/state")
		if strings.TrimSpace(out) != marker {
			t.Errorf("nerdctl run of the container snapshot printed %q, want %q", out, marker)
		}
		ann := map[string]string{"io.snapview.volume.data": `{"snapshot":"` + dir.ID + `","target":"/restored"}`}
		out = n.must(ctx, t, runArgs([]string{"--rm"}, ann, "cat /restored/kept; if touch /restored/x 2>/dev/null; then echo written; fi")...)
		if strings.TrimSpace(out) != marker {
			t.Errorf("the directory snapshot as a volume: %q, want %q, read-only", out, marker)
		}
		for _, s := range []snapshotJSON{whole, dir} {
			if out, errOut, code := ctlRunIn(t, d, nerdctlNS, nil, "snapshot", "rm", s.ID); code != 0 {
				t.Fatalf("snapshot rm: exit %d\n%s%s", code, out, errOut)
			}
		}
		n.checkEmpty(ctx, t)
	})
}
