package k8s

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// criClient connects to the daemon's CRI service.
func (c *cluster) criClient() (runtime.RuntimeServiceClient, func(), error) {
	conn, err := grpc.NewClient("unix://"+c.d.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	return runtime.NewRuntimeServiceClient(conn), func() { conn.Close() }, nil
}

// handlers returns the runtime handlers containerd's CRI plugin serves.
func (c *cluster) handlers(ctx context.Context) (map[string]bool, error) {
	rs, done, err := c.criClient()
	if err != nil {
		return nil, err
	}
	defer done()
	st, err := rs.Status(ctx, &runtime.StatusRequest{})
	if err != nil {
		return nil, err
	}
	hs := map[string]bool{}
	for _, h := range st.RuntimeHandlers {
		hs[h.Name] = true
	}
	return hs, nil
}

// removePods stops and removes, through CRI, every pod sandbox the kubelet
// left behind (it collects dead ones in its own time), as an operator
// draining a node's runtime would.
func (c *cluster) removePods(ctx context.Context) error {
	rs, done, err := c.criClient()
	if err != nil {
		return err
	}
	defer done()
	pods, err := rs.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{})
	if err != nil {
		return err
	}
	for _, p := range pods.Items {
		if _, err := rs.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			return fmt.Errorf("stop pod %s: %w", p.Metadata.GetName(), err)
		}
		if _, err := rs.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			return fmt.Errorf("remove pod %s: %w", p.Metadata.GetName(), err)
		}
	}
	return nil
}

// stopKubelet stops the kubelet, so that it starts nothing again.
func (c *cluster) stopKubelet() {
	for _, p := range c.procs {
		if p.name == "kubelet" {
			p.stop()
		}
	}
}

// teardown stops the cluster and removes what it made: the kubelet first
// (so that it restarts nothing), the pods it left, the control plane, the
// daemon, the kubelet's cgroups, the namespace, the directory.
func (c *cluster) teardown() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c.stopKubelet()
	if c.d != nil {
		if err := c.removePods(ctx); err != nil {
			c.t.Logf("remove the pods the kubelet left: %v", err)
		}
	}
	for _, p := range slices.Backward(c.procs) {
		p.stop()
	}
	if c.stopSupervise != nil {
		c.stopSupervise()
	}
	if c.d != nil {
		if err := c.d.Stop(); err != nil {
			c.t.Errorf("stop containerd: %v", err)
		}
	}
	removeKubeletCgroups()
	_ = mount.UnmountRecursive(filepath.Join(c.dir, "kubelet"), syscall.MNT_DETACH)
	if c.ns != nil {
		c.ns.remove()
	}
	if !c.t.Failed() || os.Getenv("SNAPVIEW_K8S_KEEP") == "" {
		_ = os.RemoveAll(c.dir)
	} else {
		c.t.Logf("kept %s (SNAPVIEW_K8S_KEEP)", c.dir)
	}
}

// removeKubeletCgroups removes the kubepods hierarchy the kubelet made in
// every cgroup v1 controller (deepest first; only empty ones go).
func removeKubeletCgroups() {
	roots, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods")
	if u, err := os.Stat("/sys/fs/cgroup/unified/kubepods"); err == nil && u.IsDir() {
		roots = append(roots, "/sys/fs/cgroup/unified/kubepods")
	}
	for _, root := range roots {
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, e os.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for _, d := range slices.Backward(dirs) {
			_ = os.Remove(d)
		}
	}
}
