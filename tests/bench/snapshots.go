package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

var (
	snapshotRows = flag.Bool("snapshots", true, "also measure snapshots: a container snapshot by how much the container wrote (1 MiB, 100 MiB, 1 GiB) against nerdctl commit of the same container, and a snapshot volume against an image volume (first daemon)")
	snapshotN    = flag.Int("snapshot-n", 3, "runs per size of the snapshot comparison")
)

const snapshotNS = "snapview-bench-snap"

// snapshotSizes are how much the source container writes.
var snapshotSizes = []struct {
	name string
	mib  int
}{{"1 MiB", 1}, {"100 MiB", 100}, {"1 GiB", 1024}}

// snapshots compares snapview's container snapshot with nerdctl commit,
// the command people use for it today, on the same running container (one
// nerdctl started on snapview, on overlayfs, which wrote N MiB of random
// data): the capture (snapviewctl snapshot create, whole command; nerdctl
// commit, whole command), the bytes stored, snapviewctl's peak memory, and
// the first run of a container of the result (snapview unpacks the
// snapshot's layer then; nerdctl's commit applied it already). Then a
// container with a directory snapshot as its volume against the same with
// an image volume of the same bytes.
func (b *bench) snapshots(ctx context.Context, img *harness.Image) error {
	ctl := os.Getenv("SNAPVIEW_CTL")
	if ctl == "" {
		fmt.Println("\nsnapshots: skipped (SNAPVIEW_CTL unset)")
		return nil
	}
	if b.d.Tools.Nerdctl == "" {
		fmt.Printf("\nsnapshots: skipped (%s)\n", harness.NeedClient("SNAPVIEW_NERDCTL", b.d.Tools.Nerdctl))
		return nil
	}
	dir, err := os.MkdirTemp(b.dir, "snapshots-")
	if err != nil {
		return err
	}
	n := &benchNerdctl{bin: b.d.Tools.Nerdctl, global: []string{
		"--address", b.d.Address, "--namespace", snapshotNS, "--data-root", filepath.Join(dir, "nerdctl"),
		"--cni-netconfpath", filepath.Join(dir, "cni"), "--cgroup-manager", "cgroupfs",
	}, env: append(os.Environ(), "NERDCTL_TOML="+filepath.Join(dir, "nerdctl.toml"))}
	if out, err := n.run(ctx, "load", "-i", img.Archive); err != nil {
		return fmt.Errorf("nerdctl load: %w: %s", err, out)
	}
	sctl := func(namespace string, args ...string) (string, int64, time.Duration, error) {
		return runCtl(ctx, ctl, b.d, namespace, args...)
	}

	type result struct{ capture, firstRun []time.Duration }
	var rows [][]string
	for _, size := range snapshotSizes {
		var sv, nc result
		var svSize, ncSize, rss int64
		for i := range *snapshotN {
			name := fmt.Sprintf("snap-src-%d-%d", size.mib, i)
			script := fmt.Sprintf("dd if=/dev/urandom of=/written bs=1M count=%d 2>/dev/null && sync && echo ready && exec sleep 3600", size.mib)
			if out, err := n.run(ctx, "run", "-d", "--name", name, "--pull", "never", "--network", "none", "--runtime", snapview,
				"--entrypoint", "sh", small, "-c", script); err != nil {
				return fmt.Errorf("nerdctl run: %w: %s", err, out)
			}
			if err := n.waitLogs(ctx, name, "ready"); err != nil {
				return err
			}
			id, err := n.run(ctx, "inspect", "--format", "{{.ID}}", name)
			if err != nil {
				return fmt.Errorf("nerdctl inspect: %w: %s", err, id)
			}
			cid := strings.TrimSpace(string(id))

			out, peak, took, err := sctl(snapshotNS, "snapshot", "create", cid)
			if err != nil {
				return err
			}
			var s struct {
				ID    string `json:"id"`
				Size  int64  `json:"size"`
				Image string `json:"image"`
			}
			if err := json.Unmarshal([]byte(out), &s); err != nil {
				return fmt.Errorf("snapshot create printed %q: %w", out, err)
			}
			sv.capture, svSize, rss = append(sv.capture, took), s.Size, max(rss, peak)

			commitRef := fmt.Sprintf("docker.io/snapview/bench-commit:%d-%d", size.mib, i)
			t0 := time.Now()
			if out, err := n.run(ctx, "commit", "--pause=true", cid, commitRef); err != nil {
				return fmt.Errorf("nerdctl commit: %w: %s", err, out)
			}
			nc.capture = append(nc.capture, time.Since(t0))
			if ncSize, err = b.topLayerSize(ctx, snapshotNS, commitRef); err != nil {
				return err
			}
			if out, err := n.run(ctx, "rm", "-f", name); err != nil {
				return fmt.Errorf("nerdctl rm: %w: %s", err, out)
			}

			for _, r := range []struct {
				ref string
				res *result
			}{{s.Image, &sv}, {commitRef, &nc}} {
				t0 := time.Now()
				if out, err := n.run(ctx, "run", "--rm", "--pull", "never", "--network", "none", "--runtime", snapview,
					"--entrypoint", "head", r.ref, "-c", "1", "/written"); err != nil {
					return fmt.Errorf("nerdctl run %s: %w: %s", r.ref, err, out)
				}
				r.res.firstRun = append(r.res.firstRun, time.Since(t0))
			}
			if _, _, _, err := sctl(snapshotNS, "snapshot", "rm", s.ID); err != nil {
				return err
			}
			if out, err := n.run(ctx, "rmi", commitRef); err != nil {
				return fmt.Errorf("nerdctl rmi: %w: %s", err, out)
			}
		}
		rows = append(rows,
			[]string{size.name, "snapviewctl snapshot create", ms(median(sv.capture)), mib(svSize), ms(median(sv.firstRun)), mib(rss)},
			[]string{"", "nerdctl commit", ms(median(nc.capture)), mib(ncSize), ms(median(nc.firstRun)), "-"})
	}
	fmt.Printf("\ncontainer snapshot of a running container on overlayfs that wrote N of random data, against nerdctl commit of the same container (median of %d)\n", *snapshotN)
	table([]string{"written", "", "capture (whole command)", "stored (its layer)", "first run of the result", "peak RSS"}, rows)
	return b.snapshotVolumes(ctx, sctl)
}

// snapshotVolumes times a container with a directory snapshot of 1 MiB as
// its volume against one with an image volume of the same 1 MiB, in the
// benchmark's namespace.
func (b *bench) snapshotVolumes(ctx context.Context, sctl func(namespace string, args ...string) (string, int64, time.Duration, error)) error {
	if err := b.importVolumeImages(ctx); err != nil {
		return err
	}
	nctx := namespaces.WithNamespace(ctx, ns)
	// The directory snapshot: /data of a running container that wrote the
	// same 1 MiB as the volume image's.
	c := b.d.Client()
	img, err := c.GetImage(nctx, small)
	if err != nil {
		return err
	}
	src := "snapvol-bench-src"
	ctr, err := c.NewContainer(nctx, src, client.WithImage(img), client.WithSnapshotter("overlayfs"), client.WithNewSnapshot(src, img),
		client.WithRuntime(snapview, nil), client.WithNewSpec(oci.WithImageConfig(img),
			oci.WithProcessArgs("sh", "-c", "mkdir -p /data && head -c 1048576 /dev/zero | tr '\\0' a > /data/blob && sync && touch /ready && exec sleep 600")))
	if err != nil {
		return err
	}
	defer ctr.Delete(nctx, client.WithSnapshotCleanup)
	task, err := ctr.NewTask(nctx, cio.NullIO)
	if err != nil {
		return err
	}
	if err := task.Start(nctx); err != nil {
		return err
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(filepath.Join(b.d.State, "io.containerd.runtime.v2.task", ns, src, "rootfs", "ready")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return errors.New("the directory snapshot's source container did not write its data")
		}
	}
	out, _, _, err := sctl(ns, "snapshot", "create", "--dir", "/data", src)
	if _, derr := task.Delete(nctx, client.WithProcessKill); err == nil {
		err = derr
	}
	if err != nil {
		return err
	}
	var s struct{ ID string }
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		return err
	}
	defer func() { _, _, _, _ = sctl(ns, "snapshot", "rm", s.ID) }()
	v := variant{rt: snapview, config: volumeAllow}
	got := samples{}
	for i := range *iterations {
		for _, kind := range []string{"image", "snapshot"} {
			ann := map[string]string{"io.snapview.volume.v": fmt.Sprintf(`{"image":%q,"target":"/v"}`, volumeImage(0))}
			if kind == "snapshot" {
				ann = map[string]string{"io.snapview.volume.v": fmt.Sprintf(`{"snapshot":%q,"target":"/v"}`, s.ID)}
			}
			res, err := b.lifecycle(nctx, v, small, fmt.Sprintf("snapvol-%s-%d", kind, i), "overlayfs", ann)
			if err != nil {
				return fmt.Errorf("%s volume: %w", kind, err)
			}
			got.add(kind, res.total)
		}
	}
	fmt.Printf("\na container with a 1 MiB volume, task create→start→wait→delete (median of %d): an image volume against a directory snapshot restored as a volume\n", *iterations)
	table([]string{"", "image volume", "snapshot volume", "ratio"},
		[][]string{{"one volume", ms(median(got["image"])), ms(median(got["snapshot"])), fmt.Sprintf("%.3f", float64(median(got["snapshot"]))/float64(median(got["image"])))}})
	return nil
}

// waitLogs waits until container name's output holds want.
func (n *benchNerdctl) waitLogs(ctx context.Context, name, want string) error {
	deadline := time.Now().Add(5 * time.Minute)
	for {
		out, err := n.run(ctx, "logs", name)
		if err == nil && strings.Contains(string(out), want) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("container %s did not print %q: %s: %w", name, want, out, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// topLayerSize returns the size of the last layer of image ref.
func (b *bench) topLayerSize(ctx context.Context, ns, ref string) (int64, error) {
	ctx = namespaces.WithNamespace(ctx, ns)
	img, err := b.d.Client().ImageService().Get(ctx, ref)
	if err != nil {
		return 0, err
	}
	raw, err := content.ReadBlob(ctx, b.d.Client().ContentStore(), img.Target)
	if err != nil {
		return 0, err
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return 0, err
	}
	if len(m.Layers) == 0 {
		return 0, errors.New(ref + " has no layers")
	}
	return m.Layers[len(m.Layers)-1].Size, nil
}

// runCtl runs snapviewctl ctl against daemon d in namespace with args, and
// returns its stdout, its peak RSS and how long it took.
func runCtl(ctx context.Context, ctl string, d *harness.Daemon, namespace string, args ...string) (string, int64, time.Duration, error) {
	cmd := exec.CommandContext(ctx, ctl, append([]string{"--address", d.Address, "--state", d.State, "--namespace", namespace}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return "", 0, 0, err
	}
	// The peak is read from the process's own VmHWM while it runs: the
	// rusage of a child reports the parent's (this benchmark's) RSS,
	// which Linux carries over the exec of a vfork'ed child.
	stop, peak := watchHWM(cmd.Process.Pid)
	err := cmd.Wait()
	took := time.Since(t0)
	close(stop)
	rss := <-peak
	if err != nil {
		return "", rss, took, fmt.Errorf("snapviewctl %v: %w: %s", args, err, stderr.String())
	}
	return stdout.String(), rss, took, nil
}

// watchHWM polls process pid's peak resident set (VmHWM, which only grows)
// until stop is closed, then sends the last value read.
func watchHWM(pid int) (chan<- struct{}, <-chan int64) {
	stop, peak := make(chan struct{}), make(chan int64, 1)
	go func() {
		var last int64
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			if raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
				for l := range strings.SplitSeq(string(raw), "\n") {
					if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
						var kb int64
						if _, err := fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb); err == nil && kb<<10 > last {
							last = kb << 10
						}
					}
				}
			}
			select {
			case <-stop:
				peak <- last
				return
			case <-tick.C:
			}
		}
	}()
	return stop, peak
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
