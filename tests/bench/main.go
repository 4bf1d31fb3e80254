// Command bench is `make bench`: it measures snapview against runc on the
// same private containerd and image, runs alternated, and prints the figures
// side by side. It never fails on timing; it fails only if a run fails.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
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

	"github.com/snapview/snapview/tests/e2e/harness"
)

const (
	ns       = "snapview-bench"
	snapview = "io.containerd.snapview.v2"
	runc     = "io.containerd.runc.v2"
	small    = "docker.io/snapview/bench-4m:latest"
	large    = "docker.io/snapview/bench-256m:latest"
)

var (
	iterations = flag.Int("n", 40, "sequential runs per runtime")
	parallel   = flag.Int("parallel", 32, "containers run at once in the parallel test")
	compat     = flag.Bool("compat", false, "run on the older containerd (SNAPVIEW_CONTAINERD_COMPAT), whose runc shim shares snapview's containerd libraries")
	logLevel   = flag.String("log-level", "info", "containerd's log level (production runs info; debug logs every request)")
	mode       = flag.String("mode", "view", "snapview's view.mode for the run (off measures the wrapper alone)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench failed:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	s, err := harness.NewSession(ctx, "the benchmark (run 'sudo make bench')", "snapview-bench-", *compat,
		harness.WithSnapviewConfig(fmt.Sprintf("[view]\nmode = %q\n", *mode)), harness.WithLogLevel(*logLevel))
	if err != nil {
		return err
	}
	defer s.Close()
	d, dir := s.Daemon, s.Dir

	fmt.Println("building images (4 MiB and 256 MiB kernel artifacts)...")
	imgSmall, err := harness.BuildImage(dir, harness.ImageSpec{Ref: small, KernelSize: 4 << 20})
	if err != nil {
		return err
	}
	imgLarge, err := harness.BuildImage(dir, harness.ImageSpec{Ref: large, KernelSize: 256 << 20})
	if err != nil {
		return err
	}
	if _, err := d.Import(ctx, ns, imgSmall, "overlayfs", "blockfile"); err != nil {
		return err
	}
	if _, err := d.Import(ctx, ns, imgLarge, "overlayfs"); err != nil {
		return err
	}
	ctx = harness.Context(ctx, ns)
	b := &bench{d: d}

	fmt.Printf("\nmachine: %s, %d CPUs; containerd %s (log level %s); snapshotter overlayfs; %d runs per runtime, alternated\n",
		kernel(), cpus(), d.Version, d.LogLevel, *iterations)

	// Warm up both runtimes (page cache, binaries).
	for _, rt := range []string{runc, snapview} {
		if _, err := b.once(ctx, rt, small, "warmup-"+short(rt)); err != nil {
			return err
		}
	}

	lat := map[string][]time.Duration{}
	phases := map[string]map[string][]time.Duration{"start": {}, "exit": {}, "delete": {}}
	createSmall := map[string][]time.Duration{}
	for i := 0; i < *iterations; i++ {
		for _, rt := range order(i) {
			r, err := b.once(ctx, rt, small, fmt.Sprintf("seq-%s-%d", short(rt), i))
			if err != nil {
				return err
			}
			lat[rt] = append(lat[rt], r.total)
			createSmall[rt] = append(createSmall[rt], r.create)
			phases["start"][rt] = append(phases["start"][rt], r.start)
			phases["exit"][rt] = append(phases["exit"][rt], r.exit)
			phases["delete"][rt] = append(phases["delete"][rt], r.delete)
		}
	}
	// The per-step breakdown below is taken from these sequential runs only.
	seqLog := d.Log()
	fmt.Println("\ntask create→start→wait→delete (ctr run --rm of `true`, container and snapshot excluded)")
	table([]string{"", "runc", "snapview", "ratio"},
		row("median", lat, 50),
		row("p95", lat, 95),
		row("  create", createSmall, 50),
		row("  start", phases["start"], 50),
		row("  run to exit", phases["exit"], 50),
		row("  delete", phases["delete"], 50),
	)

	createLarge := map[string][]time.Duration{}
	for i := 0; i < *iterations/2; i++ {
		for _, rt := range order(i) {
			r, err := b.once(ctx, rt, large, fmt.Sprintf("large-%s-%d", short(rt), i))
			if err != nil {
				return err
			}
			createLarge[rt] = append(createLarge[rt], r.create)
		}
	}
	fmt.Println("\ntask create latency by image size (median)")
	table([]string{"image", "runc", "snapview", "ratio"},
		append([]string{"4 MiB kernel"}, row("", createSmall, 50)[1:]...),
		append([]string{"256 MiB kernel"}, row("", createLarge, 50)[1:]...),
	)

	// Block mode on blockfile: runc mounts the container's ext4 image
	// (a loop device and a mount); snapview passes it in as a device and
	// mounts the image's view as the monitor rootfs instead.
	block := map[string][]time.Duration{}
	blockCreate := map[string][]time.Duration{}
	blockAnn := map[string]map[string]string{runc: nil, snapview: {"io.snapview.mode": "block"}}
	for i := 0; i < *iterations/2; i++ {
		for _, rt := range order(i) {
			r, err := b.onceOn(ctx, rt, small, fmt.Sprintf("block-%s-%d", short(rt), i), "blockfile", blockAnn[rt])
			if err != nil {
				return err
			}
			block[rt] = append(block[rt], r.total)
			blockCreate[rt] = append(blockCreate[rt], r.create)
		}
	}
	fmt.Println("\nblockfile snapshotter: runc mounts the rootfs, snapview passes it as a block device (io.snapview.mode=block)")
	table([]string{"", "runc", "snapview", "ratio"},
		row("median", block, 50),
		row("p95", block, 95),
		row("  create", blockCreate, 50),
	)

	rss := map[string][]time.Duration{}
	for i := range 5 {
		for _, rt := range order(i) {
			kb, err := b.shimRSS(ctx, rt, fmt.Sprintf("rss-%s-%d", short(rt), i))
			if err != nil {
				return err
			}
			rss[rt] = append(rss[rt], time.Duration(kb))
		}
	}
	r0, r1 := median(rss[runc]), median(rss[snapview])
	fmt.Println("\nshim resident memory with one running container (median of 5)")
	table([]string{"", "runc", "snapview", "difference"},
		[]string{"VmRSS", fmt.Sprintf("%.1f MiB", float64(r0)/1024), fmt.Sprintf("%.1f MiB", float64(r1)/1024), fmt.Sprintf("%+.1f MiB", float64(r1-r0)/1024)},
	)

	wall := map[string][]time.Duration{}
	for i := range 2 {
		for _, rt := range order(i) {
			w, err := b.parallelRuns(ctx, rt, fmt.Sprintf("par%d", i))
			if err != nil {
				return err
			}
			wall[rt] = append(wall[rt], w)
		}
	}
	fmt.Printf("\n%d containers at once, create→start→wait→delete (wall time, best of 2)\n", *parallel)
	table([]string{"", "runc", "snapview", "ratio"}, row("wall", map[string][]time.Duration{runc: {slices.Min(wall[runc])}, snapview: {slices.Min(wall[snapview])}}, 50))

	fmt.Println("\nwhere snapview's time goes (median per container of the sequential runs, from the shim log)")
	breakdown(seqLog)

	return d.CheckLeaks(ctx)
}

type bench struct {
	d *harness.Daemon
}

type result struct {
	create, start, exit, delete, total time.Duration
}

// once runs `true` in a new container on runtime rt and times the task's
// create and its whole create→start→wait→delete, on the overlayfs
// snapshotter.
func (b *bench) once(ctx context.Context, rt, ref, id string) (result, error) {
	return b.onceOn(ctx, rt, ref, id, "overlayfs", nil)
}

// onceOn is once on snapshotter sn, with annotations ann.
func (b *bench) onceOn(ctx context.Context, rt, ref, id, sn string, ann map[string]string) (result, error) {
	c := b.d.Client()
	img, err := c.GetImage(ctx, ref)
	if err != nil {
		return result{}, err
	}
	ctr, err := c.NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter(sn),
		client.WithNewSnapshot(id, img), client.WithRuntime(rt, nil),
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

// parallelRuns runs *parallel containers on rt at once and returns the wall time.
func (b *bench) parallelRuns(ctx context.Context, rt, tag string) (time.Duration, error) {
	var wg sync.WaitGroup
	errs := make(chan error, *parallel)
	t0 := time.Now()
	for i := 0; i < *parallel; i++ {
		wg.Go(func() {
			if _, err := b.once(ctx, rt, small, fmt.Sprintf("%s-%s-%d", tag, short(rt), i)); err != nil {
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

// order alternates which runtime goes first.
func order(i int) []string {
	if i%2 == 0 {
		return []string{runc, snapview}
	}
	return []string{snapview, runc}
}

func short(rt string) string {
	if rt == runc {
		return "runc"
	}
	return "snapview"
}

func percentile(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	if i > 0 {
		i--
	}
	return s[i]
}

func median(d []time.Duration) time.Duration { return percentile(d, 50) }

func row(name string, m map[string][]time.Duration, p int) []string {
	a, b := percentile(m[runc], p), percentile(m[snapview], p)
	return []string{name, ms(a), ms(b), fmt.Sprintf("%.3f", float64(b)/float64(a))}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }

func table(head []string, rows ...[]string) {
	fmt.Printf("  %-16s %12s %12s %12s\n", head[0], head[1], head[2], head[3])
	for _, r := range rows {
		fmt.Printf("  %-16s %12s %12s %12s\n", r[0], r[1], r[2], r[3])
	}
}

var (
	createdRe = regexp.MustCompile(`msg="snapview: container created with its view".*`)
	noViewRe  = regexp.MustCompile(`msg="snapview: no view for this container".*`)
	removedRe = regexp.MustCompile(`msg="snapview: view removed".*`)
	fieldRe   = regexp.MustCompile(`(\w+)_us=(\d+)`)
)

// breakdown prints the median of each step the shim timed.
func breakdown(log string) {
	for _, part := range []struct {
		title string
		re    *regexp.Regexp
		steps []string
	}{
		{"create", createdRe, []string{"local", "get", "stat", "lease", "view", "mount", "persist", "runc_create"}},
		{"delete", removedRe, []string{"runc_delete", "unmount", "remove", "lease"}},
		{"create without a view", noViewRe, []string{"runc_create"}},
	} {
		steps := map[string][]time.Duration{}
		n := 0
		for _, line := range part.re.FindAllString(log, -1) {
			n++
			for _, m := range fieldRe.FindAllStringSubmatch(line, -1) {
				us, _ := strconv.ParseInt(m[2], 10, 64)
				steps[m[1]] = append(steps[m[1]], time.Duration(us)*time.Microsecond)
			}
		}
		if n == 0 {
			continue
		}
		fmt.Printf("  %s (%d containers):", part.title, n)
		for _, s := range part.steps {
			if len(steps[s]) > 0 {
				fmt.Printf("  %s %s", s, ms(median(steps[s])))
			}
		}
		fmt.Println()
	}
}

func kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return "Linux " + strings.TrimSpace(string(b))
}

func cpus() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(b), "processor\t:")
}
