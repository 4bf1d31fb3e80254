package main

import (
	"context"
	"flag"
	"fmt"
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
// includes the sweeps the shims make 2 s after they start); then, with
// *busy containers of each runtime running, the task lifecycle, alternated
// as in the comparison. emptyRatio is that row's ratio on the empty node,
// printed beside it.
func (b *bench) busyNode(ctx context.Context, emptyRatio float64) error {
	if *busy <= 0 {
		return nil
	}
	type ramp struct{ wall, cpu time.Duration }
	ramps := map[string]ramp{}
	for _, rt := range []string{runc, snapview} {
		cpu0, err := procCPU(b.d.Pid())
		if err != nil {
			return err
		}
		t0 := time.Now()
		running, err := b.runMany(ctx, rt, "ramp")
		wall := time.Since(t0)
		if err == nil {
			time.Sleep(sweepSettle)
			var cpu1 time.Duration
			cpu1, err = procCPU(b.d.Pid())
			ramps[rt] = ramp{wall: wall, cpu: cpu1 - cpu0}
		}
		removeAll(ctx, running)
		if err != nil {
			return err
		}
	}
	var running []client.Container
	defer func() { removeAll(ctx, running) }()
	for _, rt := range []string{runc, snapview} {
		r, err := b.runMany(ctx, rt, "busy")
		running = append(running, r...)
		if err != nil {
			return err
		}
	}
	time.Sleep(sweepSettle)
	logStart := len(b.d.Log())
	got := samples{}
	for i := range *iterations {
		for _, rt := range order(i) {
			r, err := b.lifecycle(ctx, variant{rt: rt}, small, fmt.Sprintf("lcbusy-%s-%d", short(rt), i), "overlayfs", nil)
			if err != nil {
				return err
			}
			got.add(rt, r.total)
		}
	}
	fmt.Printf("\n%d containers of each runtime already running on the node (%d in all)\n", *busy, 2**busy)
	table([]string{"", "runc median", "snapview median", "ratio", "empty node ratio"}, [][]string{
		{"task create→start→wait→delete, views on", ms(median(got[runc])), ms(median(got[snapview])), fmt.Sprintf("%.3f", got.ratio()), ratioOrDash(emptyRatio)},
	})
	fmt.Println("where snapview's time goes there (median per container, from the shim log)")
	breakdown(b.d.Log()[logStart:])
	fmt.Printf("\nramp from an empty node to %d running containers, one at a time (containerd's CPU time from the first create to %s after the last start)\n", *busy, sweepSettle)
	table([]string{"", "runc", "snapview", "ratio"}, [][]string{
		{"wall", ms(ramps[runc].wall), ms(ramps[snapview].wall), fmt.Sprintf("%.3f", float64(ramps[snapview].wall)/float64(ramps[runc].wall))},
		{"containerd CPU", ms(ramps[runc].cpu), ms(ramps[snapview].cpu), fmt.Sprintf("%.3f", float64(ramps[snapview].cpu)/float64(ramps[runc].cpu))},
	})
	return nil
}

// runMany starts *busy containers of rt running `sleep`, one at a time,
// and returns those it made, also on an error.
func (b *bench) runMany(ctx context.Context, rt, tag string) ([]client.Container, error) {
	img, err := b.d.Client().GetImage(ctx, small)
	if err != nil {
		return nil, err
	}
	var made []client.Container
	for i := range *busy {
		id := fmt.Sprintf("%s-%s-%d", tag, short(rt), i)
		ctr, err := b.d.Client().NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter("overlayfs"),
			client.WithNewSnapshot(id, img), client.WithRuntime(rt, nil),
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
