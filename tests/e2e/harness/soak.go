package harness

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
)

// SoakConfig sizes a soak (Daemon.Soak).
type SoakConfig struct {
	Runtime string
	Image   string
	// Cycles of create→start→wait→delete, run one after the other, and
	// again spread over Streams parallel streams.
	Cycles  int
	Streams int
	// PodContainers run in turn in one pod-grouped shim, whose memory,
	// open files and goroutines are sampled every SampleEvery containers.
	PodContainers int
	SampleEvery   int
	// Parallel containers are created at once.
	Parallel int
	// Progress, if set, gets a line per phase.
	Progress io.Writer
}

// ShimSample is the pod shim's state after Cycle containers.
type ShimSample struct {
	Cycle      int
	RSSKiB     int
	FDs        int
	Goroutines int
}

// SoakReport is what a soak measured.
type SoakReport struct {
	Sequential, Streams time.Duration // wall time of each phase
	Pod                 []ShimSample
	// Creates are the latencies of the Parallel creates.
	Creates  []time.Duration
	Failures []string
}

// Soak runs cfg against the daemon in the namespace of ctx and reports;
// every failed cycle is in the report, not an error. The error is for a
// soak that could not run.
func (d *Daemon) Soak(ctx context.Context, cfg SoakConfig) (*SoakReport, error) {
	img, err := d.client.GetImage(ctx, cfg.Image)
	if err != nil {
		return nil, err
	}
	rep := &SoakReport{}
	var mu sync.Mutex
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		rep.Failures = append(rep.Failures, fmt.Sprintf(format, args...))
	}
	progress := func(format string, args ...any) {
		if cfg.Progress != nil {
			fmt.Fprintf(cfg.Progress, format+"\n", args...)
		}
	}

	progress("soak: %d create→start→wait→delete cycles, one after the other", cfg.Cycles)
	start := time.Now()
	for i := range cfg.Cycles {
		if err := d.cycle(ctx, img, cfg.Runtime, fmt.Sprintf("soak-seq-%d", i), nil); err != nil {
			fail("sequential cycle %d: %v", i, err)
		}
	}
	rep.Sequential = time.Since(start)

	progress("soak: %d cycles in %d parallel streams", cfg.Cycles, cfg.Streams)
	start = time.Now()
	var wg sync.WaitGroup
	for s := range cfg.Streams {
		wg.Go(func() {
			for i := s; i < cfg.Cycles; i += cfg.Streams {
				if err := d.cycle(ctx, img, cfg.Runtime, fmt.Sprintf("soak-par-%d", i), nil); err != nil {
					fail("stream %d cycle %d: %v", s, i, err)
				}
			}
		})
	}
	wg.Wait()
	rep.Streams = time.Since(start)

	progress("soak: %d containers in turn in one pod-grouped shim, sampled every %d", cfg.PodContainers, cfg.SampleEvery)
	if err := d.soakPod(ctx, img, cfg, rep, fail); err != nil {
		return nil, err
	}

	progress("soak: %d creates at once", cfg.Parallel)
	d.soakParallel(ctx, img, cfg, rep, fail)
	return rep, nil
}

// cycle runs `true` in a new container (and snapshot) and removes both.
func (d *Daemon) cycle(ctx context.Context, img client.Image, rt, id string, ann map[string]string) error {
	ctr, err := d.client.NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter("overlayfs"),
		client.WithNewSnapshot(id, img), client.WithRuntime(rt, nil),
		client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("true"), oci.WithAnnotations(ann)))
	if err != nil {
		return err
	}
	defer ctr.Delete(context.WithoutCancel(ctx), client.WithSnapshotCleanup)
	var out bytes.Buffer
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(bytes.NewReader(nil), &out, &out)))
	if err != nil {
		return err
	}
	exit, err := task.Wait(ctx)
	if err != nil {
		return err
	}
	if err := task.Start(ctx); err != nil {
		return err
	}
	st := <-exit
	if _, err := task.Delete(ctx); err != nil {
		return err
	}
	if st.ExitCode() != 0 {
		return fmt.Errorf("exit %d: %s", st.ExitCode(), out.String())
	}
	return nil
}

var goroutinesField = regexp.MustCompile(`msg="snapview: container created with its view".* goroutines=(\d+)`)

func (d *Daemon) soakPod(ctx context.Context, img client.Image, cfg SoakConfig, rep *SoakReport, fail func(string, ...any)) error {
	pod := map[string]string{"io.kubernetes.cri.sandbox-id": "soak-pod"}
	keeperAnn := map[string]string{"io.kubernetes.cri.sandbox-id": "soak-pod", "io.snapview.mode": "off"}
	// A container without a view keeps the shim serving, as a pause
	// container does.
	keeper, err := d.client.NewContainer(ctx, "soak-keeper", client.WithImage(img), client.WithSnapshotter("overlayfs"),
		client.WithNewSnapshot("soak-keeper", img), client.WithRuntime(cfg.Runtime, nil),
		client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("sleep", "86400"), oci.WithAnnotations(keeperAnn)))
	if err != nil {
		return err
	}
	defer keeper.Delete(context.WithoutCancel(ctx), client.WithSnapshotCleanup)
	task, err := keeper.NewTask(ctx, cio.NullIO)
	if err != nil {
		return err
	}
	defer task.Delete(context.WithoutCancel(ctx), client.WithProcessKill)
	if err := task.Start(ctx); err != nil {
		return err
	}
	pids := ShimPids(d.Address, "soak-keeper")
	if len(pids) != 1 {
		return fmt.Errorf("pod shim: %v", pids)
	}
	sample := func(cycle int) {
		s := ShimSample{Cycle: cycle, RSSKiB: vmRSS(pids[0]), FDs: openFDs(pids[0])}
		if m := goroutinesField.FindAllStringSubmatch(d.Log(), -1); len(m) > 0 {
			s.Goroutines, _ = strconv.Atoi(m[len(m)-1][1])
		}
		rep.Pod = append(rep.Pod, s)
	}
	for i := range cfg.PodContainers {
		if err := d.cycle(ctx, img, cfg.Runtime, fmt.Sprintf("soak-pod-%d", i), pod); err != nil {
			fail("pod container %d: %v", i, err)
		}
		if (i+1)%cfg.SampleEvery == 0 {
			sample(i + 1)
		}
	}
	if all := ShimPids(d.Address, ""); len(all) != 1 {
		fail("the pod's containers ran in %d shims, want 1", len(all))
	}
	return nil
}

func (d *Daemon) soakParallel(ctx context.Context, img client.Image, cfg SoakConfig, rep *SoakReport, fail func(string, ...any)) {
	var (
		wg  sync.WaitGroup
		mu  sync.Mutex
		all []client.Container
	)
	for i := range cfg.Parallel {
		wg.Go(func() {
			id := fmt.Sprintf("soak-burst-%d", i)
			ctr, err := d.client.NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter("overlayfs"),
				client.WithNewSnapshot(id, img), client.WithRuntime(cfg.Runtime, nil),
				client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("sleep", "60")))
			if err != nil {
				fail("burst %d: %v", i, err)
				return
			}
			mu.Lock()
			all = append(all, ctr)
			mu.Unlock()
			t0 := time.Now()
			if _, err := ctr.NewTask(ctx, cio.NullIO); err != nil {
				fail("burst %d: %v", i, err)
				return
			}
			mu.Lock()
			rep.Creates = append(rep.Creates, time.Since(t0))
			mu.Unlock()
		})
	}
	wg.Wait()
	for _, ctr := range all {
		wg.Go(func() {
			if task, err := ctr.Task(ctx, nil); err == nil {
				if _, err := task.Delete(ctx, client.WithProcessKill); err != nil {
					fail("burst delete %s: %v", ctr.ID(), err)
				}
			}
			if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
				fail("burst delete %s: %v", ctr.ID(), err)
			}
		})
	}
	wg.Wait()
}

// Flat reports whether the pod shim's open files and goroutines stayed
// level, and says how they moved: the floor of the later half of the
// samples against the floor of the earlier half. A few come and go with
// the containers in flight (under load, the events a shim has yet to
// deliver), which lifts a single sample but not the floor; a leak of one
// per container, or even one per fifty, raises the floor past the bound.
// RSS moves with the garbage collector and is reported, not judged.
func (r *SoakReport) Flat() (bool, string) {
	if len(r.Pod) < 2 {
		return true, "too few samples"
	}
	half := len(r.Pod) / 2
	floor := func(ss []ShimSample) ShimSample {
		m := ss[0]
		for _, s := range ss[1:] {
			m.FDs, m.Goroutines = min(m.FDs, s.FDs), min(m.Goroutines, s.Goroutines)
		}
		return m
	}
	early, late := floor(r.Pod[:half]), floor(r.Pod[half:])
	slack := 4 + r.Pod[len(r.Pod)-1].Cycle/50
	ok := late.FDs <= early.FDs+slack && late.Goroutines <= early.Goroutines+slack
	first, last := r.Pod[0], r.Pod[len(r.Pod)-1]
	return ok, fmt.Sprintf("floor of fds %d → %d, of goroutines %d → %d (first and last sample: fds %d → %d, goroutines %d → %d), RSS %d → %d KiB",
		early.FDs, late.FDs, early.Goroutines, late.Goroutines, first.FDs, last.FDs, first.Goroutines, last.Goroutines, first.RSSKiB, last.RSSKiB)
}

// Print writes the report.
func (r *SoakReport) Print(w io.Writer, cfg SoakConfig) {
	fmt.Fprintf(w, "\n%d sequential cycles: %s (%.1f per second)\n", cfg.Cycles, r.Sequential.Round(time.Millisecond), float64(cfg.Cycles)/r.Sequential.Seconds())
	fmt.Fprintf(w, "%d cycles in %d parallel streams: %s (%.1f per second)\n", cfg.Cycles, cfg.Streams, r.Streams.Round(time.Millisecond), float64(cfg.Cycles)/r.Streams.Seconds())
	fmt.Fprintf(w, "\npod-grouped shim over %d containers:\n  %8s %10s %6s %11s\n", cfg.PodContainers, "after", "RSS KiB", "fds", "goroutines")
	for _, s := range r.Pod {
		fmt.Fprintf(w, "  %8d %10d %6d %11d\n", s.Cycle, s.RSSKiB, s.FDs, s.Goroutines)
	}
	var rss, fds, gs []int
	for _, s := range r.Pod {
		rss, fds, gs = append(rss, s.RSSKiB), append(fds, s.FDs), append(gs, s.Goroutines)
	}
	if len(r.Pod) > 0 {
		fmt.Fprintf(w, "  first/last/max: RSS %d/%d/%d KiB, fds %d/%d/%d, goroutines %d/%d/%d\n",
			rss[0], rss[len(rss)-1], slices.Max(rss), fds[0], fds[len(fds)-1], slices.Max(fds), gs[0], gs[len(gs)-1], slices.Max(gs))
	}
	if c := slices.Sorted(slices.Values(r.Creates)); len(c) > 0 {
		fmt.Fprintf(w, "\n%d creates at once: p50 %s, p95 %s, max %s\n", cfg.Parallel,
			c[len(c)/2].Round(time.Millisecond), c[len(c)*95/100].Round(time.Millisecond), c[len(c)-1].Round(time.Millisecond))
	}
	fmt.Fprintf(w, "\nfailures: %d\n", len(r.Failures))
	for _, f := range r.Failures {
		fmt.Fprintf(w, "  %s\n", f)
	}
}

func vmRSS(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

func openFDs(pid int) int {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0
	}
	return len(entries)
}
