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

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/moby/sys/mountinfo"

	"github.com/snapview/snapview/tests/e2e/harness"
)

const (
	criNamespace = "k8s.io"
	pauseImage   = "docker.io/snapview/pause:latest"
)

// TestCRI runs a pod through containerd's own CRI plugin, as the kubelet
// would, with each way of configuring snapview for CRI: its own runtime type
// (CRI sends the inline options table as runtimeoptions ConfigBody) and runc's
// runtime type with runtime_path (CRI sends runc options). The pod annotation
// asks for a boot artifact: the sandbox (pause) container must ignore it and
// get no view; the app container gets its view and reads the artifact. Both
// run in one shim process, grouped by the sandbox id.
func TestCRI(t *testing.T) {
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	d, rs := startCRIDaemon(t, suite.tools, nil, []*harness.Image{suite.image}, "overlayfs", "blockfile")

	for _, handler := range []string{"snapview", "snapview-runc-path"} {
		t.Run(handler, func(t *testing.T) {
			setup(t, d)
			criPod(t, d, rs, handler)
		})
	}
	t.Run("snapview-block", func(t *testing.T) {
		setup(t, d)
		criBlockPod(t, d, rs)
	})
}

// startCRIDaemon starts a daemon of tools with containerd's CRI plugin and
// opts, imports the pause image and imgs into CRI's namespace for
// snapshotters, and returns it with a CRI client. Both are closed when the
// test ends, after the test's own cleanups (the pods') have run.
func startCRIDaemon(t *testing.T, tools harness.Tools, opts []harness.Option, imgs []*harness.Image, snapshotters ...string) (*harness.Daemon, runtime.RuntimeServiceClient) {
	t.Helper()
	return startCRIDaemonWith(t, tools, harness.CRIConfig{SandboxImage: pauseImage}, opts, imgs, snapshotters...)
}

// startCRIDaemonWith is startCRIDaemon with CRI configured as cri says.
func startCRIDaemonWith(t *testing.T, tools harness.Tools, cri harness.CRIConfig, opts []harness.Option, imgs []*harness.Image, snapshotters ...string) (*harness.Daemon, runtime.RuntimeServiceClient) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pause, err := harness.BuildImage(suite.dir, harness.ImageSpec{Ref: pauseImage, KernelSize: 1 << 10, Cmd: []string{"sleep", "86400"}})
	if err != nil {
		t.Fatal(err)
	}
	d, err := harness.StartDaemon(ctx, suite.dir, tools, append([]harness.Option{harness.WithCRI(cri)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Stop(); err != nil {
			t.Errorf("stop CRI daemon: %v", err)
		}
	})
	for _, img := range append([]*harness.Image{pause}, imgs...) {
		if _, err := d.Import(ctx, criNamespace, img, snapshotters...); err != nil {
			t.Fatal(err)
		}
	}
	conn, err := grpc.NewClient("unix://"+d.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return d, runtime.NewRuntimeServiceClient(conn)
}

// runPod runs a pod sandbox with handler and pod annotations ann, on the
// host network (no CNI here), and removes it when the test ends. It
// returns the pod's id, its config and its log directory.
func runPod(ctx context.Context, t *testing.T, rs runtime.RuntimeServiceClient, handler string, ann map[string]string) (string, *runtime.PodSandboxConfig, string) {
	t.Helper()
	return runPodWith(ctx, t, rs, handler, ann, &runtime.PodSandboxMetadata{Name: "pod-" + handler, Namespace: "default", Uid: "uid-" + handler})
}

// runPodWith is runPod for a pod of metadata md.
func runPodWith(ctx context.Context, t *testing.T, rs runtime.RuntimeServiceClient, handler string, ann map[string]string, md *runtime.PodSandboxMetadata) (string, *runtime.PodSandboxConfig, string) {
	t.Helper()
	logDir := t.TempDir()
	podConfig := &runtime.PodSandboxConfig{
		Metadata:     md,
		LogDirectory: logDir,
		Annotations:  ann,
		Linux: &runtime.LinuxPodSandboxConfig{SecurityContext: &runtime.LinuxSandboxSecurityContext{
			NamespaceOptions: &runtime.NamespaceOption{Network: runtime.NamespaceMode_NODE},
		}},
	}
	pod, err := rs.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: podConfig, RuntimeHandler: handler})
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	podID := pod.PodSandboxId
	t.Cleanup(func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		// A test may have removed the pod itself already.
		if _, err := rs.StopPodSandbox(cctx, &runtime.StopPodSandboxRequest{PodSandboxId: podID}); err != nil && status.Code(err) != codes.NotFound {
			t.Errorf("StopPodSandbox: %v", err)
		}
		if _, err := rs.RemovePodSandbox(cctx, &runtime.RemovePodSandboxRequest{PodSandboxId: podID}); err != nil && status.Code(err) != codes.NotFound {
			t.Errorf("RemovePodSandbox: %v", err)
		}
	})
	return podID, podConfig, logDir
}

// criBlockPod runs a pod through the block-mode handler (snapview on the
// blockfile snapshotter) whose container asks for block mode: it reads the
// ext4 superblock through /dev/snapview/rootfs and the bound kernel, while
// no host mount is backed by its disk.
func criBlockPod(t *testing.T, d *harness.Daemon, rs runtime.RuntimeServiceClient) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	podID, podConfig, logDir := runPod(ctx, t, rs, "snapview-block", nil)
	ctr, err := rs.CreateContainer(ctx, containerRequest(podID, podConfig, "monitor", blockAnn, "sh", "-c", blockScript))
	if err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	if _, err := rs.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: ctr.ContainerId}); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	out := waitLog(t, filepath.Join(logDir, "monitor.log"), "ready")
	bundle := filepath.Join(d.State, "io.containerd.runtime.v2.task", criNamespace, ctr.ContainerId)
	raw, err := os.ReadFile(filepath.Join(bundle, "snapview.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st blockState
	if err := json.Unmarshal(raw, &st); err != nil || st.Mode != "block" {
		t.Fatalf("state %s: %v", raw, err)
	}
	for _, want := range []string{
		fmt.Sprintf("node block special file %x:%x", st.Block.Major, st.Block.Minor),
		"magic 53ef", "kernel " + suite.image.Files[harness.KernelPath], `"kind":"block"`, "root writable",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("container log lacks %q:\n%s", want, out)
		}
	}
	mounts, err := mountinfo.GetMounts(func(m *mountinfo.Info) (bool, bool) {
		return m.Source != st.Block.Device && m.Source != st.Block.Rootfs.Source, false
	})
	if err != nil || len(mounts) > 0 {
		t.Errorf("the pod's disk is mounted on the host: %v %v", mounts, err)
	}
	if _, err := rs.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: ctr.ContainerId, Timeout: 1}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	if _, err := rs.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: ctr.ContainerId}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}
}

func criPod(t *testing.T, d *harness.Daemon, rs runtime.RuntimeServiceClient, handler string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	podID, podConfig, logDir := runPod(ctx, t, rs, handler, map[string]string{"io.snapview.boot.kernel": harness.KernelPath})
	sandboxBundle := filepath.Join(d.State, "io.containerd.runtime.v2.task", criNamespace, podID)
	if _, err := os.Stat(filepath.Join(sandboxBundle, "config.json")); err != nil {
		t.Fatalf("sandbox bundle: %v", err)
	}
	if _, err := os.Stat(filepath.Join(sandboxBundle, "snapview.json")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the sandbox container got a view: %v", err)
	}

	ctr, err := rs.CreateContainer(ctx, containerRequest(podID, podConfig, "app", nil,
		"sh", "-c", "echo \"kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)\"; exec sleep 300"))
	if err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	if _, err := rs.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: ctr.ContainerId}); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	waitLog(t, filepath.Join(logDir, "app.log"), "kernel "+suite.image.Files[harness.KernelPath])
	appBundle := filepath.Join(d.State, "io.containerd.runtime.v2.task", criNamespace, ctr.ContainerId)
	if _, err := os.Stat(filepath.Join(appBundle, "snapview.json")); err != nil {
		t.Errorf("the app container has no view: %v", err)
	}
	if shims := harness.ShimPids(d.Address, ""); len(shims) != 1 {
		t.Errorf("want one shim process for the pod, got %v", shims)
	}
	if _, err := rs.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: ctr.ContainerId, Timeout: 1}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	if _, err := rs.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: ctr.ContainerId}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}

	// A bad container annotation fails the start with snapview's error.
	bad, err := rs.CreateContainer(ctx, containerRequest(podID, podConfig, "bad", map[string]string{"io.snapview.boot.escape": "/boot/abs-escape"}, "true"))
	if err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	_, err = rs.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: bad.ContainerId})
	if err == nil || !strings.Contains(err.Error(), "snapview: annotation io.snapview.boot.escape") {
		t.Errorf("StartContainer of a hostile annotation: %v", err)
	}
	if _, err := rs.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: bad.ContainerId}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}
}

// containerRequest is a CreateContainer request for a container of the test
// image in pod podID, logging to <name>.log.
func containerRequest(podID string, pod *runtime.PodSandboxConfig, name string, ann map[string]string, cmd ...string) *runtime.CreateContainerRequest {
	return &runtime.CreateContainerRequest{
		PodSandboxId: podID,
		Config: &runtime.ContainerConfig{
			Metadata:    &runtime.ContainerMetadata{Name: name},
			Image:       &runtime.ImageSpec{Image: testImageID},
			Command:     cmd,
			Annotations: ann,
			LogPath:     name + ".log",
		},
		SandboxConfig: pod,
	}
}

// waitLog waits until the container log at path holds every one of want.
func waitLog(t *testing.T, path string, want ...string) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		missing := ""
		for _, w := range want {
			if !strings.Contains(string(b), w) {
				missing = w
			}
		}
		if missing == "" {
			return string(b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("container log lacks %q:\n%s", missing, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
