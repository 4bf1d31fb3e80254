// Command bench is `make bench`: snapview against runc on the same private
// containerd and image, measured the way users feel it, side by side in one
// run: the task lifecycle, a whole `ctr run --rm`, a CRI pod to the
// container's first output, block mode on blockfile, a pod's containers
// created at once in one pod-grouped shim, and the `delete` action
// containerd runs after every task delete; with views on and with views
// off; on the newest and the oldest supported containerd, each also with
// 100 containers of each runtime running (busy.go); nerdctl's and
// Docker's run --rm (clients.go). Then block mode's
// two shapes by image size, both under snapview: blockfile against the
// erofs snapshotter's layers. Runs of the
// two runtimes alternate. -runs N repeats the whole comparison and prints
// each ratio's minimum, median and maximum, because this kind of machine
// moves by several percent from one run to the next. It never fails on
// timing; it fails only if a run fails or something leaks.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	cri "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

const (
	ns       = "snapview-bench"
	criNS    = "k8s.io"
	snapview = "io.containerd.snapview.v2"
	runc     = "io.containerd.runc.v2"
	small    = "docker.io/snapview/bench-4m:latest"
	large    = "docker.io/snapview/bench-256m:latest"
	pause    = "docker.io/snapview/bench-pause:latest"
)

var (
	iterations = flag.Int("n", 30, "runs per runtime of each scenario, per comparison")
	runs       = flag.Int("runs", 1, "repeat the whole comparison this many times and report each ratio's spread")
	daemons    = flag.String("daemons", "newest,compat", "containerd builds to compare on: newest, compat, both, or none (empty)")
	parallel   = flag.Int("parallel", 32, "containers run at once in the parallel test")
	logLevel   = flag.String("log-level", "info", "containerd's log level (production runs info; debug logs every request)")
	rowFilter  = flag.String("rows", "", "run only the rows whose name matches this regular expression")
	extras     = flag.Bool("extras", true, "also measure image size, shim memory, parallel runs and the per-step breakdown (first run, newest containerd)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench failed:", err)
		os.Exit(1)
	}
}

// row is one line of the comparison: a scenario in a variant.
type row struct {
	name     string
	viewsOff bool
	// layers: snapview's view derived from the rootfs's layers.
	layers  bool
	measure func(ctx context.Context, b *bench, v variant, i int) (time.Duration, error)
}

// rows returns the comparison's rows that -rows selects.
func rows() []row {
	all := allRows()
	if *rowFilter == "" {
		return all
	}
	re := regexp.MustCompile(*rowFilter)
	var out []row
	for _, r := range all {
		if re.MatchString(r.name) {
			out = append(out, r)
		}
	}
	return out
}

func allRows() []row {
	lifecycle := func(ctx context.Context, b *bench, v variant, i int) (time.Duration, error) {
		r, err := b.lifecycle(ctx, v, small, fmt.Sprintf("lc-%s-%s-%d", short(v.rt), v.tag(), i), "overlayfs", nil)
		if err == nil {
			k := v.tag() + " " + short(v.rt)
			lifecyclePhases[k] = append(lifecyclePhases[k], r)
		}
		return r.total, err
	}
	ctrRun := func(ctx context.Context, b *bench, v variant, i int) (time.Duration, error) {
		return b.ctrRun(ctx, v, small, fmt.Sprintf("ctr-%s-%s-%d", short(v.rt), v.tag(), i))
	}
	criRun := func(ctx context.Context, b *bench, v variant, i int) (time.Duration, error) {
		handler := "runc"
		if v.rt == snapview {
			handler = "snapview"
			if v.viewsOff {
				handler = "snapview-off"
			}
			if v.layers {
				handler = "snapview-layers"
			}
		}
		return b.criRun(harness.Context(ctx, criNS), handler, i)
	}
	block := func(ctx context.Context, b *bench, v variant, i int) (time.Duration, error) {
		var ann map[string]string
		if v.rt == snapview {
			ann = map[string]string{"io.snapview.mode": "block"}
		}
		r, err := b.lifecycle(ctx, v, small, fmt.Sprintf("blk-%s-%d", short(v.rt), i), "blockfile", ann)
		return r.total, err
	}
	podCreates := func(ctx context.Context, b *bench, v variant, i int) (time.Duration, error) {
		return b.podCreates(ctx, v, fmt.Sprintf("pod-%s-%s-%d", short(v.rt), v.tag(), i))
	}
	deleteAction := func(ctx context.Context, b *bench, v variant, i int) (time.Duration, error) {
		shim := b.d.Tools.Shim
		if v.rt == runc {
			shim = b.d.Tools.RuncShim()
		}
		return b.deleteAction(ctx, shim, fmt.Sprintf("del-%s-%d", short(v.rt), i))
	}
	return []row{
		{"task create→start→wait→delete, views on", false, false, lifecycle},
		{"task create→start→wait→delete, views on, from layers", false, true, lifecycle},
		{"task create→start→wait→delete, views off", true, false, lifecycle},
		{"ctr run --rm (whole command), views on", false, false, ctrRun},
		{"ctr run --rm (whole command), views on, from layers", false, true, ctrRun},
		{"ctr run --rm (whole command), views off", true, false, ctrRun},
		{"CRI pod to first output, views on", false, false, criRun},
		{"CRI pod to first output, views on, from layers", false, true, criRun},
		{"CRI pod to first output, views off", true, false, criRun},
		{"blockfile: runc mounts, snapview block mode", false, false, block},
		{"7 task creates at once in one pod shim, views on", false, false, podCreates},
		{"7 task creates at once in one pod shim, views on, from layers", false, true, podCreates},
		{"`delete` action after a task delete", false, false, deleteAction},
	}
}

func run() error {
	if _, err := regexp.Compile(*rowFilter); err != nil {
		return fmt.Errorf("-rows: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Hour)
	defer cancel()
	ratios := map[string]map[string][]float64{} // daemon → row → ratio per run
	for which := range strings.SplitSeq(*daemons, ",") {
		if which == "" {
			continue // -daemons= runs only the block-mode comparison
		}
		s, err := harness.NewSession(ctx, "the benchmark (run 'sudo make bench')", "snapview-bench-", which == "compat",
			harness.WithLogLevel(*logLevel), harness.WithCRI(harness.CRIConfig{SandboxImage: pause}), harness.WithMetrics())
		if err != nil {
			return err
		}
		err = onDaemon(ctx, s, which, ratios)
		if cerr := s.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	if err := blockBySize(ctx); err != nil {
		return fmt.Errorf("block mode by image size: %w", err)
	}
	if err := diskSnapshots(ctx); err != nil {
		return fmt.Errorf("disk snapshots: %w", err)
	}
	if *runs > 1 {
		fmt.Printf("\nsnapview/runc ratio of the medians over %d runs (min / median / max)\n", *runs)
		for which := range strings.SplitSeq(*daemons, ",") {
			var out [][]string
			for _, r := range rows() {
				out = append(out, []string{r.name, spread(ratios[which][r.name])})
			}
			fmt.Printf("\ncontainerd %s\n", which)
			table([]string{"", "ratio"}, out)
		}
	}
	return nil
}

// onDaemon runs every comparison -runs times on one daemon, then the extras.
func onDaemon(ctx context.Context, s *harness.Session, which string, ratios map[string]map[string][]float64) error {
	d := s.Daemon
	b := &bench{d: d, dir: s.Dir, viewsOff: s.Dir + "/views-off.toml", layers: s.Dir + "/views-layers.toml"}
	if err := os.WriteFile(b.viewsOff, []byte("[view]\nmode = \"off\"\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(b.layers, []byte(layersConfig), 0o644); err != nil {
		return err
	}
	fmt.Println("\nbuilding images and importing them (4 MiB and 256 MiB kernel artifacts)...")
	imgSmall, err := harness.BuildImage(s.Dir, harness.ImageSpec{Ref: small, KernelSize: 4 << 20})
	if err != nil {
		return err
	}
	imgLarge, err := harness.BuildImage(s.Dir, harness.ImageSpec{Ref: large, KernelSize: 256 << 20})
	if err != nil {
		return err
	}
	imgPause, err := harness.BuildImage(s.Dir, harness.ImageSpec{Ref: pause, KernelSize: 1 << 10, Cmd: []string{"sleep", "86400"}})
	if err != nil {
		return err
	}
	if _, err := d.Import(ctx, ns, imgSmall, "overlayfs", "blockfile"); err != nil {
		return err
	}
	if _, err := d.Import(ctx, ns, imgLarge, "overlayfs"); err != nil {
		return err
	}
	for _, img := range []*harness.Image{imgSmall, imgPause} {
		if _, err := d.Import(ctx, criNS, img, "overlayfs"); err != nil {
			return err
		}
	}
	conn, err := grpc.NewClient("unix://"+d.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	b.rs = cri.NewRuntimeServiceClient(conn)
	ctx = harness.Context(ctx, ns)

	fmt.Printf("\nmachine: %s, %d CPUs; containerd %s (log level %s); %d runs per runtime and scenario, alternated\n",
		kernel(), cpus(), d.Version, d.LogLevel, *iterations)
	ratios[which] = map[string][]float64{}
	logStart := len(d.Log())
	for run := range *runs {
		// Warm up both runtimes (page cache, binaries).
		for _, rt := range []string{runc, snapview} {
			if _, err := b.lifecycle(ctx, variant{rt: rt}, small, fmt.Sprintf("warmup-%d-%s", run, short(rt)), "overlayfs", nil); err != nil {
				return err
			}
		}
		var out [][]string
		for _, r := range rows() {
			got := samples{}
			for i := range *iterations {
				for _, rt := range order(i) {
					dur, err := r.measure(ctx, b, variant{rt: rt, viewsOff: r.viewsOff, layers: r.layers}, run*(*iterations)+i)
					if err != nil {
						return fmt.Errorf("%s: %w", r.name, err)
					}
					got.add(rt, dur)
				}
			}
			ratios[which][r.name] = append(ratios[which][r.name], got.ratio())
			out = append(out, []string{r.name, ms(median(got[runc])), ms(median(got[snapview])), fmt.Sprintf("%.3f", got.ratio()),
				ms(percentile(got[runc], 95)), ms(percentile(got[snapview], 95))})
		}
		fmt.Printf("\nrun %d/%d on containerd %s\n", run+1, *runs, d.Version)
		table([]string{"", "runc median", "snapview median", "ratio", "runc p95", "snapview p95"}, out)
		printPhases()
	}
	seqLog := d.Log()[logStart:]
	shimStartToCreate(seqLog)
	if rs := ratios[which]["task create→start→wait→delete, views on"]; *busy > 0 {
		empty := 0.0
		if len(rs) > 0 {
			empty = rs[len(rs)-1]
		}
		if err := b.busyNode(ctx, empty); err != nil {
			return fmt.Errorf("busy node: %w", err)
		}
	}
	if *extras && which == strings.Split(*daemons, ",")[0] {
		if err := b.extras(ctx, seqLog); err != nil {
			return err
		}
	}
	if *volumeRows && which == strings.Split(*daemons, ",")[0] {
		if err := b.volumes(ctx); err != nil {
			return fmt.Errorf("volumes: %w", err)
		}
	}
	if *clientRows && which == strings.Split(*daemons, ",")[0] {
		if err := b.clients(ctx, imgSmall); err != nil {
			return fmt.Errorf("clients: %w", err)
		}
	}
	if *snapshotRows && which == strings.Split(*daemons, ",")[0] {
		if err := b.snapshots(ctx, imgSmall); err != nil {
			return fmt.Errorf("snapshots: %w", err)
		}
	}
	return d.CheckLeaks(ctx)
}

// extras measures what does not need repeating: task create by image size,
// shim memory, parallel runs, and where snapview's time goes.
func (b *bench) extras(ctx context.Context, seqLog string) error {
	createBy := map[string]samples{"4 MiB kernel": {}, "256 MiB kernel": {}}
	for i := range *iterations / 2 {
		for _, rt := range order(i) {
			for name, ref := range map[string]string{"4 MiB kernel": small, "256 MiB kernel": large} {
				r, err := b.lifecycle(ctx, variant{rt: rt}, ref, fmt.Sprintf("size-%s-%d-%d", short(rt), len(name), i), "overlayfs", nil)
				if err != nil {
					return err
				}
				createBy[name].add(rt, r.create)
			}
		}
	}
	fmt.Println("\ntask create latency by image size (median)")
	var out [][]string
	for _, name := range []string{"4 MiB kernel", "256 MiB kernel"} {
		s := createBy[name]
		out = append(out, []string{name, ms(median(s[runc])), ms(median(s[snapview])), fmt.Sprintf("%.3f", s.ratio())})
	}
	table([]string{"image", "runc", "snapview", "ratio"}, out)

	rss := samples{}
	for i := range 5 {
		for _, rt := range order(i) {
			kb, err := b.shimRSS(ctx, rt, fmt.Sprintf("rss-%s-%d", short(rt), i))
			if err != nil {
				return err
			}
			rss.add(rt, time.Duration(kb))
		}
	}
	r0, r1 := median(rss[runc]), median(rss[snapview])
	fmt.Println("\nshim resident memory with one running container (median of 5)")
	table([]string{"", "runc", "snapview", "difference"},
		[][]string{{"VmRSS", fmt.Sprintf("%.1f MiB", float64(r0)/1024), fmt.Sprintf("%.1f MiB", float64(r1)/1024), fmt.Sprintf("%+.1f MiB", float64(r1-r0)/1024)}})

	wall, wallLayers := samples{}, samples{}
	for i := range 3 {
		for _, v := range []variant{{rt: runc}, {rt: snapview}, {rt: snapview, layers: true}} {
			w, err := b.parallelRuns(ctx, v, *parallel, fmt.Sprintf("par%d%s", i, v.tag()))
			if err != nil {
				return err
			}
			if v.layers {
				wallLayers.add(snapview, w)
				continue
			}
			wall.add(v.rt, w)
		}
	}
	fmt.Printf("\n%d containers at once, create→start→wait→delete (wall time, median of 3)\n", *parallel)
	table([]string{"", "runc", "snapview", "ratio", "snapview, from layers", "ratio"}, [][]string{{"wall", ms(median(wall[runc])), ms(median(wall[snapview])), fmt.Sprintf("%.3f", wall.ratio()),
		ms(median(wallLayers[snapview])), fmt.Sprintf("%.3f", float64(median(wallLayers[snapview]))/float64(median(wall[runc])))}})

	fmt.Println("\nwhere snapview's time goes (median per container over the comparison runs, from the shim log)")
	breakdown(seqLog)
	return nil
}

// lifecyclePhases are the task lifecycle rows' runs, by variant, for the
// phase table: where a difference of the whole lies.
var lifecyclePhases = map[string][]result{}

// printPhases prints the median of each phase of the task lifecycle rows
// of this run, by variant, and forgets them.
func printPhases() {
	if len(lifecyclePhases) == 0 {
		return
	}
	fmt.Println("\ntask lifecycle by phase (median): the task's create, start, start to exit, delete")
	var out [][]string
	for _, k := range []string{"on runc", "on snapview", "layers runc", "layers snapview", "off runc", "off snapview"} {
		rs := lifecyclePhases[k]
		if len(rs) == 0 {
			continue
		}
		phase := func(f func(result) time.Duration) string {
			var d []time.Duration
			for _, r := range rs {
				d = append(d, f(r))
			}
			return ms(median(d))
		}
		out = append(out, []string{k, phase(func(r result) time.Duration { return r.create }), phase(func(r result) time.Duration { return r.start }),
			phase(func(r result) time.Duration { return r.exit }), phase(func(r result) time.Duration { return r.delete })})
	}
	table([]string{"views, runtime", "create", "start", "exit", "delete"}, out)
	clear(lifecyclePhases)
}

// order alternates which runtime goes first.
func order(i int) []string {
	if i%2 == 0 {
		return []string{runc, snapview}
	}
	return []string{snapview, runc}
}

// tag names a variant in container ids.
func (v variant) tag() string {
	switch {
	case v.viewsOff:
		return "off"
	case v.layers:
		return "layers"
	}
	return "on"
}

func short(rt string) string {
	if rt == runc {
		return "runc"
	}
	return "snapview"
}

func kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return "Linux " + strings.TrimSpace(string(b))
}

func cpus() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(b), "processor\t:")
}
