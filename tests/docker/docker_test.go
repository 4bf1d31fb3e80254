package docker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moby/moby/api/pkg/stdcopy"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// ctrSpec is a Docker container of the test image running script with sh.
type ctrSpec struct {
	name        string
	runtime     string
	annotations map[string]string
	script      string
}

// create creates the container as `docker create --runtime … --annotation
// … --network none --entrypoint sh IMAGE -c SCRIPT` does.
func create(ctx context.Context, t *testing.T, s ctrSpec) string {
	t.Helper()
	res, err := suite.api.ContainerCreate(ctx, client.ContainerCreateOptions{
		Name:   s.name,
		Config: &container.Config{Image: testImage, Entrypoint: []string{"sh", "-c", s.script}},
		HostConfig: &container.HostConfig{
			Runtime:     s.runtime,
			Annotations: s.annotations,
			// No network but the container's own loopback: with no
			// bridge, "none" is what keeps it off the host's namespace.
			NetworkMode: "none",
		},
	})
	if err != nil {
		t.Fatalf("create %s: %v", s.name, err)
	}
	return res.ID
}

func startCtr(ctx context.Context, id string) error {
	_, err := suite.api.ContainerStart(ctx, id, client.ContainerStartOptions{})
	return err
}

func remove(ctx context.Context, t *testing.T, id string) {
	t.Helper()
	if _, err := suite.api.ContainerRemove(ctx, id, client.ContainerRemoveOptions{}); err != nil {
		t.Fatalf("remove %s: %v", id, err)
	}
}

// logs returns the container's stdout and stderr, as `docker logs` shows them.
func logs(ctx context.Context, t *testing.T, id string) (string, string) {
	t.Helper()
	rc, err := suite.api.ContainerLogs(ctx, id, client.ContainerLogsOptions{ShowStdout: true, ShowStderr: true})
	if err != nil {
		t.Fatalf("logs %s: %v", id, err)
	}
	defer rc.Close()
	var stdout, stderr bytes.Buffer
	if _, err := stdcopy.StdCopy(&stdout, &stderr, rc); err != nil {
		t.Fatalf("logs %s: %v", id, err)
	}
	return stdout.String(), stderr.String()
}

// waitLogs waits until the container's stdout holds want.
func waitLogs(ctx context.Context, t *testing.T, id, want string) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, errOut := logs(ctx, t, id)
		if strings.Contains(out, want) {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("the logs of %s lack %q within 20s:\n%s\nstderr:\n%s", id, want, out, errOut)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitExit waits for the container to exit and returns its exit code.
func waitExit(ctx context.Context, t *testing.T, id string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	w := suite.api.ContainerWait(ctx, id, client.ContainerWaitOptions{Condition: container.WaitConditionNotRunning})
	select {
	case r := <-w.Result:
		return r.StatusCode
	case err := <-w.Error:
		t.Fatalf("wait %s: %v", id, err)
	}
	return -1
}

// execIn runs cmd in the running container, as `docker exec` does, and
// returns its stdout and exit code.
func execIn(ctx context.Context, t *testing.T, id string, cmd ...string) (string, int) {
	t.Helper()
	ex, err := suite.api.ExecCreate(ctx, id, client.ExecCreateOptions{Cmd: cmd, AttachStdout: true, AttachStderr: true})
	if err != nil {
		t.Fatalf("exec create: %v", err)
	}
	att, err := suite.api.ExecAttach(ctx, ex.ID, client.ExecAttachOptions{})
	if err != nil {
		t.Fatalf("exec attach: %v", err)
	}
	defer att.Close()
	var stdout, stderr bytes.Buffer
	if _, err := stdcopy.StdCopy(&stdout, &stderr, att.Reader); err != nil {
		t.Fatalf("exec output: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		ins, err := suite.api.ExecInspect(ctx, ex.ID, client.ExecInspectOptions{})
		if err != nil {
			t.Fatalf("exec inspect: %v", err)
		}
		if !ins.Running {
			return stdout.String(), ins.ExitCode
		}
		if time.Now().After(deadline) {
			t.Fatalf("exec %v still runs", cmd)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// withRuntimeConfig writes body as the file the daemon.json runtime
// "snapview" names (options.ConfigPath) for the rest of the test. snapview
// reads it at each container's create, so dockerd needs no restart.
func withRuntimeConfig(t *testing.T, body string) {
	t.Helper()
	if err := os.WriteFile(suite.config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(suite.config) })
}

const runScript = `trap 'echo stopping; exit 0' TERM
echo "hello from docker"
echo "to-stderr" >&2
echo ready
sleep 300 & wait
`

// TestDockerRun runs a container with `--runtime io.containerd.snapview.v2`
// (the shim by name, which dockerd passes to containerd as it is): its
// task is served by snapview's shim, as runc would serve it, since Docker
// records no image snapshot on the containerd container; logs, exec (its
// exit code), stop (SIGTERM reaches the container), rm; nothing is left.
func TestDockerRun(t *testing.T) {
	ctx := setup(t)
	id := create(ctx, t, ctrSpec{name: "docker-run", runtime: snapviewRT, script: runScript})
	if err := startCtr(ctx, id); err != nil {
		t.Fatal(err)
	}
	waitLogs(ctx, t, id, "ready")
	out, errOut := logs(ctx, t, id)
	if !strings.Contains(out, "hello from docker") || !strings.Contains(errOut, "to-stderr") {
		t.Errorf("logs: stdout %q, stderr %q", out, errOut)
	}

	cctx := harness.Context(ctx, ns)
	info, err := suite.daemon.Client().ContainerService().Get(cctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if info.Runtime.Name != snapviewRT || info.Image != testImage || info.SnapshotKey != "" || info.Snapshotter != "" {
		t.Errorf("containerd's record of Docker's container: runtime %q image %q snapshot %q in %q; want snapview's runtime, the image, and no snapshot (Docker mounts the rootfs itself)",
			info.Runtime.Name, info.Image, info.SnapshotKey, info.Snapshotter)
	}
	pids := harness.ShimPids(suite.daemon.Address, id)
	if len(pids) != 1 {
		t.Fatalf("shims of %s: %v", id, pids)
	}
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pids[0])); err != nil || exe != suite.tools.Shim {
		t.Errorf("the task's shim is %q (%v), want %s", exe, err, suite.tools.Shim)
	}

	out, code := execIn(ctx, t, id, "sh", "-c", "echo from-exec; exit 3")
	if strings.TrimSpace(out) != "from-exec" || code != 3 {
		t.Errorf("exec: %q, exit %d; want from-exec, exit 3", out, code)
	}

	timeout := 10
	if _, err := suite.api.ContainerStop(ctx, id, client.ContainerStopOptions{Timeout: &timeout}); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(ctx, t, id); code != 0 {
		t.Errorf("exit code after stop %d, want 0 (the container's TERM trap)", code)
	}
	if out, _ := logs(ctx, t, id); !strings.Contains(out, "stopping") {
		t.Errorf("SIGTERM did not reach the container; logs:\n%s", out)
	}
	remove(ctx, t, id)
}

// TestDockerRuntimeByPath checks what dockerd says to a container that
// names the shim by path: Docker accepts only a runtime's name (or one of
// daemon.json's runtimes), and refuses it at create.
func TestDockerRuntimeByPath(t *testing.T) {
	ctx := setup(t)
	_, err := suite.api.ContainerCreate(ctx, client.ContainerCreateOptions{
		Config:     &container.Config{Image: testImage, Entrypoint: []string{"true"}},
		HostConfig: &container.HostConfig{Runtime: suite.tools.Shim, NetworkMode: "none"},
	})
	if err == nil || !strings.Contains(err.Error(), "unknown or invalid runtime name: "+suite.tools.Shim) {
		t.Fatalf("create with the shim's path: %v", err)
	}
	t.Logf("create with --runtime %s: %v", suite.tools.Shim, err)
}

// TestDockerDaemonJSONRuntime runs containers of the daemon.json runtime
// {"runtimeType": "io.containerd.snapview.v2", "options": {"ConfigPath":
// FILE}}: dockerd hands the options to containerd as runtime options, and
// snapview reads FILE: its BinaryName runs the container (a runc wrapper
// that logs each call), and an unknown key in it fails the start with
// snapview's message naming the file.
func TestDockerDaemonJSONRuntime(t *testing.T) {
	t.Run("honoured", func(t *testing.T) {
		ctx := setup(t)
		dir := t.TempDir()
		spy, calls := filepath.Join(dir, "runc-spy"), filepath.Join(dir, "calls.log")
		if err := os.WriteFile(spy, fmt.Appendf(nil, "#!/bin/sh\necho \"$*\" >> %s\nexec %s \"$@\"\n", calls, suite.tools.Runc), 0o755); err != nil {
			t.Fatal(err)
		}
		withRuntimeConfig(t, fmt.Sprintf("BinaryName = %q\n", spy))
		id := create(ctx, t, ctrSpec{name: "docker-named", runtime: snapviewNamed, script: "echo named-runtime"})
		if err := startCtr(ctx, id); err != nil {
			t.Fatal(err)
		}
		if code := waitExit(ctx, t, id); code != 0 {
			t.Errorf("exit code %d", code)
		}
		if out, _ := logs(ctx, t, id); !strings.Contains(out, "named-runtime") {
			t.Errorf("logs: %q", out)
		}
		b, err := os.ReadFile(calls)
		if err != nil || !strings.Contains(string(b), "create") || !strings.Contains(string(b), id) {
			t.Errorf("the BinaryName of %s did not run the container: %q %v", suite.config, b, err)
		}
		remove(ctx, t, id)
	})
	t.Run("unknown key", func(t *testing.T) {
		ctx := setup(t)
		withRuntimeConfig(t, "[view]\nmod = \"view\"\n")
		id := create(ctx, t, ctrSpec{name: "docker-named-bad", runtime: snapviewNamed, script: "true"})
		err := startCtr(ctx, id)
		if w := `snapview: unknown configuration key "view.mod" in ` + suite.config; err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("start with an unknown key in %s: %v; want %q", suite.config, err, w)
		}
		remove(ctx, t, id)
	})
}

// TestDockerAnnotations asks snapview, through Docker's --annotation
// (HostConfig.Annotations, API 1.43+), for what needs the container's view
// of its image. Docker's containers have no image snapshot (dockerd mounts
// the rootfs itself), but their record names their image, unpacked in
// containerd's overlayfs by Docker's containerd image store: snapview's view
// is of that image. A boot artifact, view-target and an image volume run
// and show the image's bytes, read-only; block mode is refused, because
// dockerd mounts the rootfs on the host itself.
func TestDockerAnnotations(t *testing.T) {
	kernel := suite.image
	if kernel == nil { // no root or no dockerd: setup skips
		kernel = &harness.Image{}
	}
	for _, tc := range []struct {
		name    string
		runtime string
		config  string // the daemon.json runtime's file, for the named runtime
		ann     map[string]string
		script  string
		want    []string
		refused []string // today's refusal; empty: the container must run
	}{
		{
			name: "boot artifact", runtime: snapviewRT,
			ann:    map[string]string{"io.snapview.boot.kernel": harness.KernelPath},
			script: `echo "kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)"`,
			want:   []string{"kernel " + kernel.Files[harness.KernelPath]},
		},
		{
			name: "view target", runtime: snapviewRT,
			ann:    map[string]string{"io.snapview.view-target": "/image"},
			script: `echo "view $(sha256sum < /image/boot/vmlinux | cut -c1-64)"; if touch /image/x 2>/dev/null; then echo view-written; fi`,
			want:   []string{"view " + kernel.Files[harness.KernelPath]},
		},
		{
			name: "volume", runtime: snapviewNamed, config: "[volumes]\nallow = [\"docker.io/snapview/vol-*\"]\n",
			ann:    map[string]string{"io.snapview.volume.models": `{"image":"` + modelsImage + `","target":"/models"}`},
			script: `echo "weights $(sha256sum < /models/weights/model.bin | cut -c1-64)"`,
			want:   []string{"weights " + modelsSum()},
		},
		{
			name: "block mode", runtime: snapviewRT,
			ann: map[string]string{"io.snapview.mode": "block"},
			// Block mode never runs under Docker: dockerd mounts the
			// rootfs on the host itself.
			refused: []string{"snapview: block mode (annotation io.snapview.mode) needs a block-backed rootfs", "its client mounted the rootfs on the host itself (as Docker does)"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := setup(t)
			if tc.config != "" {
				withRuntimeConfig(t, tc.config)
			}
			script := tc.script
			if script == "" {
				script = "true"
			}
			id := create(ctx, t, ctrSpec{name: "docker-ann-" + strings.ReplaceAll(tc.name, " ", "-"), runtime: tc.runtime, annotations: tc.ann, script: script})
			err := startCtr(ctx, id)
			if len(tc.refused) > 0 {
				if err == nil {
					t.Fatalf("start succeeded; want a refusal saying %q", tc.refused)
				}
				for _, w := range tc.refused {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("refusal %q lacks %q", err, w)
					}
				}
				remove(ctx, t, id)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if code := waitExit(ctx, t, id); code != 0 {
				t.Errorf("exit code %d", code)
			}
			out, _ := logs(ctx, t, id)
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("logs lack %q:\n%s", w, out)
				}
			}
			if strings.Contains(out, "written") {
				t.Errorf("the view is writable:\n%s", out)
			}
			remove(ctx, t, id)
		})
	}
}

// modelsSum is the sha256 of the models volume's weights.
func modelsSum() string {
	if suite.models == nil {
		return ""
	}
	return suite.models.Files["/weights/model.bin"]
}

// TestDockerSnapshotRefused: snapviewctl snapshot create of a Docker
// container is refused with a message that says why (dockerd mounts the
// rootfs itself: containerd holds no snapshot of the container's writes)
// and what to use instead, and leaves the container running.
func TestDockerSnapshotRefused(t *testing.T) {
	ctx := setup(t)
	ctl := os.Getenv("SNAPVIEW_CTL")
	if ctl == "" {
		t.Fatal("SNAPVIEW_CTL is not set: run through `make docker-e2e`")
	}
	id := create(ctx, t, ctrSpec{name: "docker-snap-refused", runtime: snapviewRT, script: "echo ready; exec sleep 300"})
	if err := startCtr(ctx, id); err != nil {
		t.Fatal(err)
	}
	waitLogs(ctx, t, id, "ready")
	cmd := exec.Command(ctl, "--address", suite.daemon.Address, "--state", suite.daemon.State, "--namespace", ns, "snapshot", "create", id)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || stdout.Len() != 0 ||
		!strings.Contains(stderr.String(), "snapview: container "+id+" has no image snapshot (its client mounted its rootfs itself, as Docker does") ||
		!strings.Contains(stderr.String(), "docker commit") {
		t.Errorf("snapshot create of a Docker container: %v\nstdout: %s\nstderr: %s", err, stdout.String(), stderr.String())
	}
	if out, code := execIn(ctx, t, id, "echo", "still running"); code != 0 || !strings.Contains(out, "still running") {
		t.Errorf("the container after the refusal: exit %d, %q", code, out)
	}
	timeout := 1
	if _, err := suite.api.ContainerStop(ctx, id, client.ContainerStopOptions{Timeout: &timeout}); err != nil {
		t.Fatal(err)
	}
	remove(ctx, t, id)
}
