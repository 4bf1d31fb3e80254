package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	cri "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// bench runs the scenarios against one daemon.
type bench struct {
	d   *harness.Daemon
	dir string
	rs  cri.RuntimeServiceClient
	// viewsOff is a snapview configuration file with views off; layers
	// one with views derived from the rootfs's layers (view.source).
	viewsOff, layers string
}

// layersConfig derives views from the layers the rootfs names.
const layersConfig = "[view]\nsource = \"layers\"\n"

// variant is a runtime as a scenario runs it: its name (runc or snapview),
// and for snapview whether views are on.
type variant struct {
	rt       string
	viewsOff bool
	// layers, for snapview, derives the view from the rootfs's layers
	// (view.source "layers") instead of a leased View.
	layers bool
	// config, for snapview, is a configuration body for its options.
	config string
}

// runtimeOpts returns the runtime options of v for the client.
func (v variant) runtimeOpts() any {
	switch {
	case v.rt == snapview && v.viewsOff:
		return &runtimeoptions.Options{ConfigBody: []byte("[view]\nmode = \"off\"\n")}
	case v.rt == snapview && v.layers:
		return &runtimeoptions.Options{ConfigBody: []byte(layersConfig + v.config)}
	case v.rt == snapview && v.config != "":
		return &runtimeoptions.Options{ConfigBody: []byte(v.config)}
	}
	return nil
}

type result struct {
	create, start, exit, delete, total time.Duration
}

// lifecycle runs `true` in a new container of ref on snapshotter sn and
// times the task's create and its whole create→start→wait→delete; the
// container and its snapshot are made and removed outside the timing.
func (b *bench) lifecycle(ctx context.Context, v variant, ref, id, sn string, ann map[string]string) (result, error) {
	c := b.d.Client()
	img, err := c.GetImage(ctx, ref)
	if err != nil {
		return result{}, err
	}
	ctr, err := c.NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter(sn),
		client.WithNewSnapshot(id, img), client.WithRuntime(v.rt, v.runtimeOpts()),
		client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("true"), oci.WithAnnotations(ann)))
	if err != nil {
		return result{}, err
	}
	defer ctr.Delete(ctx, client.WithSnapshotCleanup)

	var out bytes.Buffer
	t0 := time.Now()
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(bytes.NewReader(nil), &out, &out)))
	if err != nil {
		return result{}, err
	}
	create := time.Since(t0)
	exit, err := task.Wait(ctx)
	if err != nil {
		return result{}, err
	}
	t1 := time.Now()
	if err := task.Start(ctx); err != nil {
		return result{}, err
	}
	t2 := time.Now()
	st := <-exit
	t3 := time.Now()
	if _, err := task.Delete(ctx); err != nil {
		return result{}, err
	}
	total := time.Since(t0)
	if st.ExitCode() != 0 {
		return result{}, fmt.Errorf("%s exited %d: %s", id, st.ExitCode(), out.String())
	}
	return result{create: create, start: t2.Sub(t1), exit: t3.Sub(t2), delete: time.Since(t3), total: total}, nil
}

// ctrRun times a whole `ctr run --rm` of `true`, from ctr's start to its
// exit: the container, its snapshot and the task, as a user runs one.
func (b *bench) ctrRun(ctx context.Context, v variant, ref, id string) (time.Duration, error) {
	args := []string{"--address", b.d.Address, "--namespace", ns, "run", "--rm", "--snapshotter", "overlayfs", "--runtime", v.rt}
	if v.rt == snapview && v.viewsOff {
		args = append(args, "--runtime-config-path", b.viewsOff)
	}
	if v.rt == snapview && v.layers {
		args = append(args, "--runtime-config-path", b.layers)
	}
	args = append(args, ref, id, "true")
	cmd := exec.CommandContext(ctx, b.d.Tools.Ctr(), args...)
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	d := time.Since(t0)
	if err != nil {
		return 0, fmt.Errorf("ctr run %s: %w: %s", id, err, out)
	}
	return d, nil
}

// criRun times, through containerd's CRI API as the kubelet drives it,
// RunPodSandbox, CreateContainer and StartContainer until the container's
// first output is in its log; the pod is removed outside the timing.
func (b *bench) criRun(ctx context.Context, handler string, i int) (time.Duration, error) {
	return b.podToOutput(ctx, handler, fmt.Sprintf("%s-%d", handler, i), nil, nil, []string{"echo", "first-output"}, "first-output")
}

// podToOutput runs pod name of handler, with pod annotations ann, whose
// container runs cmd with mounts, and times it until want is in the
// container's log.
func (b *bench) podToOutput(ctx context.Context, handler, name string, ann map[string]string, mounts []*cri.Mount, cmd []string, want string) (time.Duration, error) {
	logDir, err := os.MkdirTemp(b.dir, "cri-logs-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(logDir)
	pod := &cri.PodSandboxConfig{
		Metadata:     &cri.PodSandboxMetadata{Name: name, Namespace: "bench", Uid: name},
		LogDirectory: logDir,
		Annotations:  ann,
		Linux: &cri.LinuxPodSandboxConfig{SecurityContext: &cri.LinuxSandboxSecurityContext{
			NamespaceOptions: &cri.NamespaceOption{Network: cri.NamespaceMode_NODE},
		}},
	}
	t0 := time.Now()
	p, err := b.rs.RunPodSandbox(ctx, &cri.RunPodSandboxRequest{Config: pod, RuntimeHandler: handler})
	if err != nil {
		return 0, fmt.Errorf("RunPodSandbox %s: %w", name, err)
	}
	defer func() {
		cctx := context.WithoutCancel(ctx)
		_, _ = b.rs.StopPodSandbox(cctx, &cri.StopPodSandboxRequest{PodSandboxId: p.PodSandboxId})
		_, _ = b.rs.RemovePodSandbox(cctx, &cri.RemovePodSandboxRequest{PodSandboxId: p.PodSandboxId})
	}()
	c, err := b.rs.CreateContainer(ctx, &cri.CreateContainerRequest{
		PodSandboxId: p.PodSandboxId,
		Config: &cri.ContainerConfig{
			Metadata: &cri.ContainerMetadata{Name: "app"},
			Image:    &cri.ImageSpec{Image: small},
			Command:  cmd,
			Mounts:   mounts,
			LogPath:  "app.log",
		},
		SandboxConfig: pod,
	})
	if err != nil {
		return 0, fmt.Errorf("CreateContainer %s: %w", name, err)
	}
	if _, err := b.rs.StartContainer(ctx, &cri.StartContainerRequest{ContainerId: c.ContainerId}); err != nil {
		return 0, fmt.Errorf("StartContainer %s: %w", name, err)
	}
	logFile := filepath.Join(logDir, "app.log")
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Millisecond) {
		if data, _ := os.ReadFile(logFile); bytes.Contains(data, []byte(want)) {
			return time.Since(t0), nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("no output from %s", name)
		}
	}
}

// deleteAction times the shim's `delete` action, which containerd runs
// (and waits for) after every task delete, on a bundle that had a task but
// no view: what it costs every container.
func (b *bench) deleteAction(ctx context.Context, shim, id string) (time.Duration, error) {
	bundle := filepath.Join(b.dir, "delete-action", ns, id)
	if err := os.MkdirAll(bundle, 0o711); err != nil {
		return 0, err
	}
	defer os.RemoveAll(bundle)
	cmd := exec.CommandContext(ctx, shim, "-namespace", ns, "-address", b.d.Address, "-publish-binary", b.d.Tools.Containerd, "-id", id, "delete")
	cmd.Dir = bundle
	cmd.Env = append(os.Environ(),
		"PATH="+filepath.Dir(b.d.Tools.Runc)+":"+os.Getenv("PATH"),
		"GRPC_ADDRESS="+b.d.Address, "TTRPC_ADDRESS="+b.d.Address+".ttrpc", "NAMESPACE="+ns, "MAX_SHIM_VERSION=2")
	t0 := time.Now()
	out, err := cmd.Output()
	d := time.Since(t0)
	if err != nil {
		return 0, fmt.Errorf("%s delete: %w: %s", shim, err, out)
	}
	return d, nil
}

// shimRSS starts a sleeping container on rt and returns its shim's VmRSS in KiB.
func (b *bench) shimRSS(ctx context.Context, rt, id string) (int64, error) {
	c := b.d.Client()
	img, err := c.GetImage(ctx, small)
	if err != nil {
		return 0, err
	}
	ctr, err := c.NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter("overlayfs"),
		client.WithNewSnapshot(id, img), client.WithRuntime(rt, nil),
		client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("sleep", "60")))
	if err != nil {
		return 0, err
	}
	defer ctr.Delete(ctx, client.WithSnapshotCleanup)
	task, err := ctr.NewTask(ctx, cio.NullIO)
	if err != nil {
		return 0, err
	}
	defer task.Delete(ctx, client.WithProcessKill)
	if err := task.Start(ctx); err != nil {
		return 0, err
	}
	time.Sleep(300 * time.Millisecond)
	pids := harness.ShimPids(b.d.Address, id)
	if len(pids) != 1 {
		return 0, fmt.Errorf("shim of %s: %v", id, pids)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pids[0]))
	if err != nil {
		return 0, err
	}
	for l := range strings.SplitSeq(string(status), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			return strconv.ParseInt(f[1], 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS for shim %d", pids[0])
}

// parallelRuns runs n containers on v at once and returns the wall time.
func (b *bench) parallelRuns(ctx context.Context, v variant, n int, tag string) (time.Duration, error) {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	t0 := time.Now()
	for i := range n {
		wg.Go(func() {
			if _, err := b.lifecycle(ctx, v, small, fmt.Sprintf("%s-%s-%d", tag, short(v.rt), i), "overlayfs", nil); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return 0, err
	}
	return time.Since(t0), nil
}

// podSize is how many containers share the pod-grouped shim of podCreates.
const podSize = 8

// podCreates times what a pod-grouped shim does when a pod's containers
// are created at once: podSize containers share one shim
// (io.kubernetes.cri.sandbox-id, as containerd's CRI groups a pod); the
// first task starts the shim, and the other podSize-1 task creates, made
// concurrently, are timed from the first call to the last answer. Creates
// that the shim serialises show here and nowhere else.
func (b *bench) podCreates(ctx context.Context, v variant, tag string) (time.Duration, error) {
	c := b.d.Client()
	img, err := c.GetImage(ctx, small)
	if err != nil {
		return 0, err
	}
	ann := map[string]string{"io.kubernetes.cri.sandbox-id": tag}
	ctrs := make([]client.Container, 0, podSize)
	tasks := make([]client.Task, podSize)
	defer func() {
		for i, ctr := range slices.Backward(ctrs) {
			if tasks[i] != nil {
				_, _ = tasks[i].Delete(ctx, client.WithProcessKill)
			}
			_ = ctr.Delete(ctx, client.WithSnapshotCleanup)
		}
	}()
	for i := range podSize {
		id := fmt.Sprintf("%s-%d", tag, i)
		ctr, err := c.NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter("overlayfs"),
			client.WithNewSnapshot(id, img), client.WithRuntime(v.rt, v.runtimeOpts()),
			client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("sleep", "300"), oci.WithAnnotations(ann)))
		if err != nil {
			return 0, err
		}
		ctrs = append(ctrs, ctr)
	}
	if tasks[0], err = ctrs[0].NewTask(ctx, cio.NullIO); err != nil {
		return 0, err
	}
	var wg sync.WaitGroup
	errs := make(chan error, podSize)
	t0 := time.Now()
	for i := 1; i < podSize; i++ {
		wg.Go(func() {
			t, err := ctrs[i].NewTask(ctx, cio.NullIO)
			if err != nil {
				errs <- err
				return
			}
			tasks[i] = t
		})
	}
	wg.Wait()
	took := time.Since(t0)
	close(errs)
	for err := range errs {
		return 0, err
	}
	return took, nil
}

var (
	createdRe = regexp.MustCompile(`msg="snapview: container created with its view".*`)
	removedRe = regexp.MustCompile(`msg="snapview: view removed".*`)
	fieldRe   = regexp.MustCompile(`(\w+)_us=(\d+)`)
	// leasedRe tells a leased View's lines (its key) from a derived one's.
	leasedRe = regexp.MustCompile(` key=snapview/`)
	// podRe matches the containers of podCreates, which the breakdown of
	// one container's steps leaves out.
	podRe = regexp.MustCompile(` id=pod-`)
)

// sinceStartRe matches the first Create of a shim, which logs how long
// after the shim's server came up it arrived, and the container's id.
var (
	sinceStartRe = regexp.MustCompile(`id=(\S+) .*since_shim_start_us=(\d+)|since_shim_start_us=(\d+) .*id=(\S+)`)
	sandboxIDRe  = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// shimStartToCreate prints, from the shim log, how long containerd took
// from starting a shim to creating its task (connecting, reading the
// bootstrap result, activating the rootfs mounts, validating runtime
// features): time a view's calls could use, for the client's task
// lifecycle, `ctr run --rm`, and CRI (a pod sandbox's shim; a pod's later
// containers arrive on a shim already running).
func shimStartToCreate(log string) {
	groups := map[string][]time.Duration{}
	for _, m := range sinceStartRe.FindAllStringSubmatch(log, -1) {
		id, us := m[1], m[2]
		if id == "" {
			id, us = m[4], m[3]
		}
		n, _ := strconv.ParseInt(us, 10, 64)
		var group string
		switch {
		case strings.HasPrefix(id, "lc-"):
			group = "task create (client)"
		case strings.HasPrefix(id, "ctr-"):
			group = "ctr run --rm"
		case sandboxIDRe.MatchString(id):
			group = "CRI pod sandbox"
		default:
			continue
		}
		groups[group] = append(groups[group], time.Duration(n)*time.Microsecond)
	}
	if len(groups) == 0 {
		return
	}
	fmt.Println("\nfrom a shim's start to its first Create (median, from the shim log):")
	for _, g := range []string{"task create (client)", "ctr run --rm", "CRI pod sandbox"} {
		if d := groups[g]; len(d) > 0 {
			fmt.Printf("  %-22s %s over %d shims\n", g, ms(median(d)), len(d))
		}
	}
}

// breakdown prints the median of each step the shim timed in log, over the
// containers created one at a time.
func breakdown(log string) {
	for _, source := range []struct {
		name   string
		leased bool
	}{{"leased View", true}, {"from layers", false}} {
		for _, part := range []struct {
			title string
			re    *regexp.Regexp
			steps []string
		}{
			{"create", createdRe, []string{"dir", "rootfs", "derive", "lookup_only", "lease_only", "lease", "view", "activate", "mount", "device", "artifacts", "monitor", "state", "params", "config", "runc_create"}},
			{"delete", removedRe, []string{"params", "mount", "activate", "view", "lease", "rootfs"}},
		} {
			steps := map[string][]time.Duration{}
			n := 0
			for _, line := range part.re.FindAllString(log, -1) {
				if podRe.MatchString(line) {
					continue // created concurrently: not one container's cost
				}
				if leasedRe.MatchString(line) != source.leased {
					continue
				}
				n++
				for _, m := range fieldRe.FindAllStringSubmatch(line, -1) {
					us, _ := strconv.ParseInt(m[2], 10, 64)
					steps[m[1]] = append(steps[m[1]], time.Duration(us)*time.Microsecond)
				}
			}
			if n == 0 {
				continue
			}
			fmt.Printf("  %s, %s (%d containers):", part.title, source.name, n)
			for _, s := range part.steps {
				if len(steps[s]) > 0 {
					fmt.Printf("  %s %s", s, ms(median(steps[s])))
				}
			}
			fmt.Println()
		}
	}
}
