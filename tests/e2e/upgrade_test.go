package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// The containers of the upgrade test: each prints what it got from
// snapview, then "ready", and waits.
const (
	upgradeViewScript  = `echo "kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)"; echo ready; exec sleep 300`
	upgradeBlockScript = `echo "magic $(dd if=/dev/snapview/rootfs bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')"; echo ready; exec sleep 300`
)

// upgradePod is a pod of the upgrade test: its handler, what its containers
// ask for, and what they print.
type upgradePod struct {
	name, handler string
	ann           map[string]string
	script        string
	want          []string
}

func upgradePods() []upgradePod {
	kernel := "kernel " + suite.image.Files[harness.KernelPath]
	boot := map[string]string{"io.snapview.boot.kernel": harness.KernelPath}
	return []upgradePod{
		{"view", "snapview", boot, upgradeViewScript, []string{kernel, "ready"}},
		{"block", "snapview-block", blockAnn, upgradeBlockScript, []string{"magic 53ef", "ready"}},
		// View mode on the erofs snapshotter in block mode: its rootfs
		// mounts are of the kinds snapview claims from containerd.
		{"erofs", "snapview-layered", boot, upgradeViewScript, []string{kernel, "ready"}},
	}
}

// TestUpgradeUnderRunningPods upgrades snapview the way the installer does
// (the binary replaced by an atomic rename, containerd restarted) on a node
// whose pods run on the view, block and erofs handlers (and layered block
// mode, for a release that has it) with the shim of an earlier release:
// the release before this one, and the last release whose shim performs
// none of the mounts snapview claims from containerd. Their shim processes
// keep serving the pods. Then each old pod gets a new container, its old
// container takes an exec and is deleted, new pods of every handler run,
// and nothing is left.
//
// On containerd 2.4 every new container of an old pod runs: containerd
// reads a pod's claims from its sandbox's start, and a start of an earlier
// release's shim that said nothing no longer falls back to a claim of the
// new binary (its -info claims nothing on 2.3+). containerd 2.2 reads the
// claim per runtime (-info), so a pod of the release whose shim performs no
// claimed mount cannot start new containers on an erofs handler, as
// docs/kubernetes.md tells operators; the remedy it gives, recreating the
// pod, works.
func TestUpgradeUnderRunningPods(t *testing.T) {
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	releases := strings.Fields(os.Getenv("SNAPVIEW_PREVIOUS_SHIMS"))
	if len(releases) == 0 {
		t.Fatal("SNAPVIEW_PREVIOUS_SHIMS is not set: run through `make e2e`")
	}
	for _, r := range releases {
		rev, previous, ok := strings.Cut(r, "=")
		if !ok {
			t.Fatalf("SNAPVIEW_PREVIOUS_SHIMS: %q is not commit=path", r)
		}
		t.Run("from "+rev, func(t *testing.T) { upgradeFrom(t, previous) })
	}
}

// upgradeFrom is TestUpgradeUnderRunningPods from the shim binary previous.
func upgradeFrom(t *testing.T, previous string) {
	// Whether the earlier release performs the mounts snapview claims (and
	// so has layered block mode): its -info claims them.
	cmd := exec.Command(previous, "-info")
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(suite.tools.Runc)+string(os.PathListSeparator)+os.Getenv("PATH"))
	info, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s -info: %v", previous, err)
	}
	claims := bytes.Contains(info, []byte("containerd.io/runtime-allow-mounts"))
	eachVersion(t, func(t *testing.T, compat bool) {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		tools, err := harness.ToolsFromEnv(compat)
		if err != nil {
			t.Fatal(err)
		}
		// The node's shim, where containerd finds it: this daemon's own.
		bin := t.TempDir()
		installed := filepath.Join(bin, "containerd-shim-snapview-v2")
		install(t, previous, installed)
		current := tools.Shim
		tools.Shim = installed
		// The handlers' options as the earlier release reads them (it has
		// no [volumes]).
		d, rs := startCRIDaemonWith(t, tools, harness.CRIConfig{SandboxImage: pauseImage, NoVolumes: true},
			[]harness.Option{harness.WithErofsBlock(erofsBlockSize)}, []*harness.Image{suite.image}, "overlayfs", "blockfile", "erofs")
		setup(t, d)

		type oldPod struct {
			upgradePod
			id, ctr, logDir string
			config          *runtime.PodSandboxConfig
		}
		var olds []oldPod
		pods := upgradePods()
		if claims {
			pods = append(pods, upgradePod{"layered", "snapview-layered", blockAnn, upgradeBlockScript, []string{"magic 53ef", "ready"}})
		}
		for _, p := range pods {
			id, cfg, logDir := runPodNamed(ctx, t, rs, "old-"+p.name, p.handler, nil)
			ctr := runContainer(ctx, t, rs, id, cfg, logDir, "old", p.ann, p.script, p.want...)
			olds = append(olds, oldPod{p, id, ctr, logDir, cfg})
		}

		// The upgrade: the binary replaced as the installer replaces it,
		// containerd restarted; the pods' shims are the earlier release's.
		install(t, current, installed)
		if err := d.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		// containerd's socket serves before its CRI service has loaded
		// its state: wait, as the kubelet does, until CRI answers.
		waitCRI(ctx, t, rs)
		for _, o := range olds {
			pids := harness.ShimPids(d.Address, o.id)
			if len(pids) != 1 {
				t.Fatalf("pod %s: shim processes %v, want one", o.name, pids)
			}
			if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pids[0])); !strings.HasSuffix(exe, "(deleted)") {
				t.Fatalf("pod %s is served by %s, not the earlier release's replaced binary", o.name, exe)
			}
		}

		for _, o := range olds {
			t.Run("new container in old pod "+o.name, func(t *testing.T) {
				req := containerRequest(o.id, o.config, "new", o.ann, "sh", "-c", o.script)
				c, err := rs.CreateContainer(ctx, req)
				if err != nil {
					t.Fatalf("CreateContainer: %v", err)
				}
				_, err = rs.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: c.ContainerId})
				if compat && o.name == "erofs" && !claims {
					// containerd 2.2 hands the earlier release's shim mounts
					// it cannot perform: the documented limit.
					if err == nil {
						t.Fatal("the new container of a pod of the earlier release on an erofs handler started on containerd 2.2: docs/kubernetes.md says it cannot")
					}
					t.Logf("as documented for containerd 2.2: %v", err)
					removeContainer(ctx, t, rs, c.ContainerId)
					return
				}
				if err != nil {
					t.Fatalf("StartContainer: %v", err)
				}
				waitLog(t, filepath.Join(o.logDir, "new.log"), o.want...)
				removeContainer(ctx, t, rs, c.ContainerId)
			})
			t.Run("exec and delete in old pod "+o.name, func(t *testing.T) {
				res, err := rs.ExecSync(ctx, &runtime.ExecSyncRequest{ContainerId: o.ctr, Cmd: []string{"echo", "exec", o.name}, Timeout: 20})
				if err != nil || res.ExitCode != 0 || strings.TrimSpace(string(res.Stdout)) != "exec "+o.name {
					t.Fatalf("exec: %v %+v", err, res)
				}
				removeContainer(ctx, t, rs, o.ctr)
			})
		}
		if compat && !claims {
			// The remedy on containerd 2.2: recreate the pod.
			for _, o := range olds {
				if o.name != "erofs" {
					continue
				}
				if _, err := rs.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: o.id}); err != nil {
					t.Fatal(err)
				}
				if _, err := rs.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: o.id}); err != nil {
					t.Fatal(err)
				}
				id, cfg, logDir := runPodNamed(ctx, t, rs, "recreated-"+o.name, o.handler, nil)
				runContainer(ctx, t, rs, id, cfg, logDir, "app", o.ann, o.script, o.want...)
			}
		}

		pods = append(upgradePods(), upgradePod{"layered", "snapview-layered", blockAnn, upgradeBlockScript, []string{"magic 53ef", "ready"}})
		for _, p := range pods {
			t.Run("new pod "+p.name, func(t *testing.T) {
				id, cfg, logDir := runPodNamed(ctx, t, rs, "new-"+p.name, p.handler, nil)
				c := runContainer(ctx, t, rs, id, cfg, logDir, "app", p.ann, p.script, p.want...)
				removeContainer(ctx, t, rs, c)
			})
		}
	})
}

// install puts the shim binary src at dst the way `snapviewctl install`
// does: a temporary file beside it, synced, renamed over it, so that a
// running shim keeps its own (now unlinked) binary.
func install(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	tmp := dst + ".new"
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		t.Fatal(err)
	}
}

// runPodNamed is runPod for a pod named name, so that a test may run
// several pods of one handler.
func runPodNamed(ctx context.Context, t *testing.T, rs runtime.RuntimeServiceClient, name, handler string, ann map[string]string) (string, *runtime.PodSandboxConfig, string) {
	t.Helper()
	return runPodWith(ctx, t, rs, handler, ann, &runtime.PodSandboxMetadata{Name: name, Namespace: "default", Uid: "uid-" + name})
}

// runContainer creates and starts a container named name in pod id that
// runs script, waits until its log holds want, and returns its id.
func runContainer(ctx context.Context, t *testing.T, rs runtime.RuntimeServiceClient, id string, cfg *runtime.PodSandboxConfig, logDir, name string, ann map[string]string, script string, want ...string) string {
	t.Helper()
	c, err := rs.CreateContainer(ctx, containerRequest(id, cfg, name, ann, "sh", "-c", script))
	if err != nil {
		t.Fatalf("CreateContainer %s: %v", name, err)
	}
	if _, err := rs.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: c.ContainerId}); err != nil {
		t.Fatalf("StartContainer %s: %v", name, err)
	}
	waitLog(t, filepath.Join(logDir, name+".log"), want...)
	return c.ContainerId
}

// removeContainer stops and removes container id.
func removeContainer(ctx context.Context, t *testing.T, rs runtime.RuntimeServiceClient, id string) {
	t.Helper()
	if _, err := rs.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: id, Timeout: 1}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	if _, err := rs.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}
}

// waitCRI waits until containerd's CRI service answers (after a restart,
// it says "server is not initialized yet" until it has recovered its
// pods), for up to a minute.
func waitCRI(ctx context.Context, t *testing.T, rs runtime.RuntimeServiceClient) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := rs.Status(ctx, &runtime.StatusRequest{})
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("CRI did not answer within a minute of containerd's restart: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
