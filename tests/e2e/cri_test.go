package e2e

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

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
			t.Errorf("stop CRI daemon: %v", err)
		}
	})
	for _, img := range []*harness.Image{pause, suite.image} {
		if _, err := d.Import(ctx, criNamespace, img, "overlayfs"); err != nil {
			t.Fatal(err)
		}
	}
	conn, err := grpc.NewClient("unix://"+d.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rs := runtime.NewRuntimeServiceClient(conn)

	for _, handler := range []string{"snapview", "snapview-runc-path"} {
		t.Run(handler, func(t *testing.T) {
			setup(t, d)
			criPod(t, d, rs, handler)
		})
	}
}

func criPod(t *testing.T, d *harness.Daemon, rs runtime.RuntimeServiceClient, handler string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	logDir := t.TempDir()
	podConfig := &runtime.PodSandboxConfig{
		Metadata:     &runtime.PodSandboxMetadata{Name: "pod-" + handler, Namespace: "default", Uid: "uid-" + handler},
		LogDirectory: logDir,
		Annotations:  map[string]string{"io.snapview.boot.kernel": harness.KernelPath},
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
		if _, err := rs.StopPodSandbox(cctx, &runtime.StopPodSandboxRequest{PodSandboxId: podID}); err != nil {
			t.Errorf("StopPodSandbox: %v", err)
		}
		if _, err := rs.RemovePodSandbox(cctx, &runtime.RemovePodSandboxRequest{PodSandboxId: podID}); err != nil {
			t.Errorf("RemovePodSandbox: %v", err)
		}
	})
	sandboxBundle := filepath.Join(d.State, "io.containerd.runtime.v2.task", criNamespace, podID)
	if _, err := os.Stat(filepath.Join(sandboxBundle, "config.json")); err != nil {
		t.Fatalf("sandbox bundle: %v", err)
	}
	if _, err := os.Stat(filepath.Join(sandboxBundle, "snapview.json")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the sandbox container got a view: %v", err)
	}

	ctr, err := rs.CreateContainer(ctx, &runtime.CreateContainerRequest{
		PodSandboxId: podID,
		Config: &runtime.ContainerConfig{
			Metadata: &runtime.ContainerMetadata{Name: "app"},
			Image:    &runtime.ImageSpec{Image: testImageID},
			Command:  []string{"sh", "-c", "echo \"kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)\"; exec sleep 300"},
			LogPath:  "app.log",
		},
		SandboxConfig: podConfig,
	})
	if err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	if _, err := rs.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: ctr.ContainerId}); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	want := "kernel " + suite.image.Files[harness.KernelPath]
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, _ := os.ReadFile(filepath.Join(logDir, "app.log"))
		if strings.Contains(string(b), want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("container log lacks %q:\n%s", want, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
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
	bad, err := rs.CreateContainer(ctx, &runtime.CreateContainerRequest{
		PodSandboxId: podID,
		Config: &runtime.ContainerConfig{
			Metadata:    &runtime.ContainerMetadata{Name: "bad"},
			Image:       &runtime.ImageSpec{Image: testImageID},
			Command:     []string{"true"},
			Annotations: map[string]string{"io.snapview.boot.escape": "/boot/abs-escape"},
		},
		SandboxConfig: podConfig,
	})
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
