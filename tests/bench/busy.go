package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
)

var busy = flag.Int("busy", 100, "containers of each runtime kept running for the busy-node comparison (0 skips it)")

// sweepSettle is how long after a ramp's last start its shims are left, so
// that the sweep a shim makes 2 s after it starts is in the ramp's figures.
const sweepSettle = 4 * time.Second

// busyNode compares runc and snapview on a node that already runs many
// containers. First each runtime's ramp from an empty node to *busy running
// containers, one at a time, with containerd's CPU time over it (which
// includes the sweeps the shims make 2 s after they start), for snapview
// with each view source; then, with *busy containers of runc and *busy of
// snapview running, the task lifecycle and `ctr run --rm`, each with both
// view sources, alternated with runc as in the comparison. emptyRatio is
// the lifecycle row's ratio on the empty node, printed beside it.
func (b *bench) busyNode(ctx context.Context, emptyRatio float64) error {
	if *busy <= 0 {
		return nil
	}
	type ramp struct {
		wall, cpu time.Duration
		gc        gcStats
	}
	ramps := map[string]ramp{}
	rampOf := []variant{{rt: runc}, {rt: snapview}, {rt: snapview, layers: true}}
	for _, v := range rampOf {
		cpu0, err := procCPU(b.d.Pid())
		if err != nil {
			return err
		}
		gc0, err := b.gc(ctx)
		if err != nil {
			return err
		}
		t0 := time.Now()
		running, err := b.runMany(ctx, v, "ramp")
		wall := time.Since(t0)
		if err == nil {
			time.Sleep(sweepSettle)
			var (
				cpu1 time.Duration
				gc1  gcStats
			)
			cpu1, err = procCPU(b.d.Pid())
			if err == nil {
				gc1, err = b.gc(ctx)
			}
			ramps[v.tag()+short(v.rt)] = ramp{wall: wall, cpu: cpu1 - cpu0, gc: gc1.minus(gc0)}
		}
		removeAll(ctx, running)
		if err != nil {
			return err
		}
	}
	// The busy node: *busy containers of runc, *busy of snapview with
	// leased views; the rows then run each source of snapview's view
	// against runc beside them.
	var running []client.Container
	defer func() { removeAll(ctx, running) }()
	for _, v := range []variant{{rt: runc}, {rt: snapview}} {
		r, err := b.runMany(ctx, v, "busy")
		running = append(running, r...)
		if err != nil {
			return err
		}
	}
	time.Sleep(sweepSettle)
	logStart := len(b.d.Log())
	type busyRow struct {
		name    string
		layers  bool
		measure func(v variant, i int) (time.Duration, error)
	}
	lifecycle := func(v variant, i int) (time.Duration, error) {
		r, err := b.lifecycle(ctx, v, small, fmt.Sprintf("lcbusy-%s-%s-%d", short(v.rt), v.tag(), i), "overlayfs", nil)
		return r.total, err
	}
	ctrRun := func(v variant, i int) (time.Duration, error) {
		return b.ctrRun(ctx, v, small, fmt.Sprintf("ctrbusy-%s-%s-%d", short(v.rt), v.tag(), i))
	}
	var out, gcOut [][]string
	for _, r := range []busyRow{
		{"task create→start→wait→delete, views on", false, lifecycle},
		{"task create→start→wait→delete, views on, from layers", true, lifecycle},
		{"ctr run --rm (whole command), views on", false, ctrRun},
		{"ctr run --rm (whole command), views on, from layers", true, ctrRun},
	} {
		got := samples{}
		gc0, err := b.gc(ctx)
		if err != nil {
			return err
		}
		for i := range *iterations {
			for _, rt := range order(i) {
				d, err := r.measure(variant{rt: rt, layers: r.layers}, i)
				if err != nil {
					return fmt.Errorf("busy node, %s: %w", r.name, err)
				}
				got.add(rt, d)
			}
		}
		gc1, err := b.gc(ctx)
		if err != nil {
			return err
		}
		g := gc1.minus(gc0)
		gcOut = append(gcOut, []string{r.name, fmt.Sprint(g.count), ms(g.time), ms(g.mean())})
		empty := "-"
		if r.name == "task create→start→wait→delete, views on" {
			empty = ratioOrDash(emptyRatio)
		}
		out = append(out, []string{r.name, ms(median(got[runc])), ms(median(got[snapview])), fmt.Sprintf("%.3f", got.ratio()), empty})
	}
	fmt.Printf("\n%d containers of each runtime already running on the node (%d in all; snapview's with leased views)\n", *busy, 2**busy)
	table([]string{"", "runc median", "snapview median", "ratio", "empty node ratio"}, out)
	fmt.Printf("containerd's garbage collections during each row's %d runs of each runtime (from its metrics)\n", *iterations)
	table([]string{"", "collections", "GC time", "per collection"}, gcOut)
	fmt.Println("where snapview's time goes there (median per container, from the shim log)")
	breakdown(b.d.Log()[logStart:])
	fmt.Printf("\nramp from an empty node to %d running containers, one at a time (containerd's CPU time from the first create to %s after the last start)\n", *busy, sweepSettle)
	rr, rs, rl := ramps["on"+short(runc)], ramps["on"+short(snapview)], ramps["layers"+short(snapview)]
	table([]string{"", "runc", "snapview", "ratio", "snapview, from layers", "ratio"}, [][]string{
		{"wall", ms(rr.wall), ms(rs.wall), fmt.Sprintf("%.3f", float64(rs.wall)/float64(rr.wall)), ms(rl.wall), fmt.Sprintf("%.3f", float64(rl.wall)/float64(rr.wall))},
		{"containerd CPU", ms(rr.cpu), ms(rs.cpu), fmt.Sprintf("%.3f", float64(rs.cpu)/float64(rr.cpu)), ms(rl.cpu), fmt.Sprintf("%.3f", float64(rl.cpu)/float64(rr.cpu))},
		{"garbage collections", fmt.Sprint(rr.gc.count), fmt.Sprint(rs.gc.count), "", fmt.Sprint(rl.gc.count), ""},
		{"GC time", ms(rr.gc.time), ms(rs.gc.time), "", ms(rl.gc.time), ""},
	})
	return nil
}

// runMany starts *busy containers of v running `sleep`, one at a time,
// and returns those it made, also on an error.
func (b *bench) runMany(ctx context.Context, v variant, tag string) ([]client.Container, error) {
	img, err := b.d.Client().GetImage(ctx, small)
	if err != nil {
		return nil, err
	}
	var made []client.Container
	for i := range *busy {
		id := fmt.Sprintf("%s-%s-%s-%d", tag, short(v.rt), v.tag(), i)
		ctr, err := b.d.Client().NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter("overlayfs"),
			client.WithNewSnapshot(id, img), client.WithRuntime(v.rt, v.runtimeOpts()),
			client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("sleep", "3600")))
		if err != nil {
			return made, err
		}
		made = append(made, ctr)
		t, err := ctr.NewTask(ctx, cio.NullIO)
		if err != nil {
			return made, err
		}
		if err := t.Start(ctx); err != nil {
			return made, err
		}
	}
	return made, nil
}

// removeAll kills and deletes the containers, newest first.
func removeAll(ctx context.Context, ctrs []client.Container) {
	for _, ctr := range slices.Backward(ctrs) {
		if t, err := ctr.Task(ctx, nil); err == nil {
			_, _ = t.Delete(ctx, client.WithProcessKill)
		}
		_ = ctr.Delete(ctx, client.WithSnapshotCleanup)
	}
}

// procCPU returns the user and system CPU time process pid has used.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may hold
	// spaces: state is the first; utime and stime are fields 14 and 15.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, s)
	}
	var ticks int64
	for _, v := range f[11:13] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	// USER_HZ is 100 on Linux.
	return time.Duration(ticks) * 10 * time.Millisecond, nil
}

func ratioOrDash(r float64) string {
	if r == 0 {
		return "-"
	}
	return fmt.Sprintf("%.3f", r)
}

// gcStats are containerd's garbage collections so far: how many, and the
// time they took, from its metrics.
type gcStats struct {
	count int64
	time  time.Duration
}

func (g gcStats) minus(o gcStats) gcStats {
	return gcStats{count: g.count - o.count, time: g.time - o.time}
}

func (g gcStats) mean() time.Duration {
	if g.count == 0 {
		return 0
	}
	return g.time / time.Duration(g.count)
}

// gc reads containerd's garbage collection metrics (the histogram of its
// GC scheduler's collections) from its metrics endpoint on loopback.
func (b *bench) gc(ctx context.Context) (gcStats, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+b.d.MetricsAddress+"/v1/metrics", nil)
	if err != nil {
		return gcStats{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return gcStats{}, fmt.Errorf("containerd's metrics: %w", err)
	}
	defer resp.Body.Close()
	var (
		g          gcStats
		found      bool
		sc         = bufio.NewScanner(resp.Body)
		sumName    = "containerd_gc_gc_seconds_sum"
		countName  = "containerd_gc_gc_seconds_count"
		parseValue = func(line string) float64 {
			f := strings.Fields(line)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			return v
		}
	)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, sumName):
			g.time += time.Duration(parseValue(line) * float64(time.Second))
			found = true
		case strings.HasPrefix(line, countName):
			g.count += int64(parseValue(line))
		}
	}
	if err := sc.Err(); err != nil {
		return gcStats{}, err
	}
	if !found {
		return gcStats{}, fmt.Errorf("containerd's metrics at %s have no %s", b.d.MetricsAddress, sumName)
	}
	return g, nil
}
