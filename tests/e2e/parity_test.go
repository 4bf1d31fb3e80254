package e2e

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/containerd/cgroups/v3/cgroup1/stats"
	v2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// observation is what a scenario saw, compared field by field between runc
// and snapview. Values must not depend on the runtime: no pids, no times.
type observation map[string]any

// scenario runs one behaviour on runtime rt and reports what it observed.
type scenario struct {
	name string
	run  func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error)
}

// errSkip makes a scenario skip on both runtimes, with its reason.
type errSkip struct{ reason string }

func (e errSkip) Error() string { return e.reason }

var parityScenarios = []scenario{
	{"run-and-wait", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, args: []string{"sh", "-c", "echo hello; echo oops >&2; exit 7"}})
		if err != nil {
			return nil, err
		}
		code, err := r.wait(t)
		if err != nil {
			return nil, err
		}
		st, err := r.task.Delete(ctx)
		if err != nil {
			return nil, err
		}
		topics, err := ev.waitFor(id, "/tasks/exit")
		return observation{"exit": code, "deleteExit": st.ExitCode(), "stdout": r.stdout.String(), "stderr": r.stderr.String(), "events": lifecycle(topics)}, err
	}},
	{"exec", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, args: []string{"sleep", "300"}})
		if err != nil {
			return nil, err
		}
		code, out, errOut, err := r.exec(ctx, "probe", "sh", "-c", "echo out; echo err >&2; exit 3")
		if err != nil {
			return nil, err
		}
		_, _, _, missingErr := r.exec(ctx, "missing", "/bin/no-such-command")
		topics, err := ev.waitFor(id, "/tasks/exec-started")
		return observation{"exit": code, "stdout": out, "stderr": errOut, "missingFails": missingErr != nil, "events": sorted(topics)}, err
	}},
	{"kill-signal", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, args: []string{"sh", "-c", "trap 'exit 42' TERM; echo ready; while true; do sleep 0.1; done"}})
		if err != nil {
			return nil, err
		}
		if err := r.waitOutput("ready"); err != nil {
			return nil, err
		}
		if err := r.task.Kill(ctx, syscall.SIGTERM); err != nil {
			return nil, err
		}
		term, err := r.wait(t)
		if err != nil {
			return nil, err
		}
		k, err := start(ctx, t, d, id+"-kill", runOpts{runtime: rt, args: []string{"sleep", "300"}})
		if err != nil {
			return nil, err
		}
		if err := k.task.Kill(ctx, syscall.SIGKILL, client.WithKillAll); err != nil {
			return nil, err
		}
		killed, err := k.wait(t)
		return observation{"sigterm": term, "sigkill": killed}, err
	}},
	{"readonly-view-rootfs", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		// The rootfs is itself a read-only view of the image: runc must
		// not be asked to create anything in it.
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, viewSnapshot: true, args: []string{"sh", "-c", "ls -a /; touch /x 2>/dev/null || echo read-only"}})
		if err != nil {
			return nil, err
		}
		code, err := r.wait(t)
		if err != nil {
			return nil, err
		}
		r.task.IO().Wait()
		return observation{"exit": code, "stdout": r.stdout.String()}, nil
	}},
	{"rootfs-unchanged", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		// What the container sees at / and what its run leaves in its own
		// snapshot (the rootfs diff a commit would take) are runc's.
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, args: []string{"sh", "-c", "ls -a /; echo data > /tmp/written"}})
		if err != nil {
			return nil, err
		}
		code, err := r.wait(t)
		if err != nil {
			return nil, err
		}
		r.task.IO().Wait()
		// Once the task is gone, nothing has the container's snapshot
		// mounted any more.
		if _, err := r.task.Delete(ctx); err != nil {
			return nil, err
		}
		upper, err := upperEntries(ctx, d, r.ctr)
		return observation{"exit": code, "stdout": r.stdout.String(), "upper": upper}, err
	}},
	{"pause-resume", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, args: []string{"sleep", "300"}})
		if err != nil {
			return nil, err
		}
		if err := r.task.Pause(ctx); err != nil {
			return nil, err
		}
		paused, err := r.task.Status(ctx)
		if err != nil {
			return nil, err
		}
		if err := r.task.Resume(ctx); err != nil {
			return nil, err
		}
		resumed, err := r.task.Status(ctx)
		if err != nil {
			return nil, err
		}
		topics, err := ev.waitFor(id, "/tasks/resumed")
		return observation{"paused": string(paused.Status), "resumed": string(resumed.Status), "events": sorted(topics)}, err
	}},
	{"pids", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, args: []string{"sh", "-c", "sleep 300 & sleep 300 & echo ready; wait"}})
		if err != nil {
			return nil, err
		}
		if err := r.waitOutput("ready"); err != nil {
			return nil, err
		}
		var n int
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			ps, err := r.task.Pids(ctx)
			if err != nil {
				return nil, err
			}
			if n = len(ps); n == 3 {
				break
			}
		}
		return observation{"pids": n}, nil
	}},
	{"stats", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, args: []string{"sleep", "300"}})
		if err != nil {
			return nil, err
		}
		// Right after Start, runc init's threads can still be in the
		// cgroup: sample until the container is its one process.
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			m, err := taskMetrics(ctx, r.task)
			if err != nil {
				return nil, err
			}
			if m.pids == 1 || time.Now().After(deadline) {
				return observation{"type": m.kind, "memory": m.memoryUsed, "pids": m.pids, "cpu": m.cpu}, nil
			}
		}
	}},
	{"update-resources", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, args: []string{"sleep", "300"}})
		if err != nil {
			return nil, err
		}
		limit := int64(96 << 20)
		if err := r.task.Update(ctx, client.WithResources(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}})); err != nil {
			return nil, err
		}
		m, err := taskMetrics(ctx, r.task)
		if err != nil {
			return nil, err
		}
		got := m.limit
		return observation{"limit": got}, nil
	}},
	{"stdin-close-io", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, args: []string{"sh", "-c", "cat; echo done"}, stdin: strings.NewReader("from stdin\n")})
		if err != nil {
			return nil, err
		}
		if err := r.waitOutput("from stdin"); err != nil {
			return nil, err
		}
		if err := r.task.CloseIO(ctx, client.WithStdinCloser); err != nil {
			return nil, err
		}
		code, err := r.wait(t)
		if err != nil {
			return nil, err
		}
		r.task.IO().Wait()
		return observation{"exit": code, "stdout": r.stdout.String()}, nil
	}},
	{"tty", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, terminal: true, args: []string{"sh", "-c", "tty; test -t 0 && echo interactive"}})
		if err != nil {
			return nil, err
		}
		if err := r.task.Resize(ctx, 100, 40); err != nil {
			return nil, err
		}
		code, err := r.wait(t)
		if err != nil {
			return nil, err
		}
		r.task.IO().Wait()
		return observation{"exit": code, "stdout": strings.ReplaceAll(r.stdout.String(), "\r\n", "\n")}, nil
	}},
	{"delete", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, args: []string{"sleep", "300"}})
		if err != nil {
			return nil, err
		}
		_, runningErr := r.task.Delete(ctx)
		if err := r.task.Kill(ctx, syscall.SIGKILL); err != nil {
			return nil, err
		}
		if _, err := r.wait(t); err != nil {
			return nil, err
		}
		st, err := r.task.Delete(ctx)
		if err != nil {
			return nil, err
		}
		_, loadErr := r.ctr.Task(ctx, nil)
		topics, err := ev.waitFor(id, "/tasks/exit")
		return observation{
			"deleteRunningFails": runningErr != nil,
			"exit":               st.ExitCode(),
			"taskGone":           errdefs.IsNotFound(loadErr),
			"events":             lifecycle(topics),
		}, err
	}},
	{"oom", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		r, err := start(ctx, t, d, id, runOpts{
			runtime:  rt,
			args:     []string{"sh", "-c", "head -c 512m /dev/zero | tail"},
			specOpts: []oci.SpecOpts{oci.WithMemoryLimit(32 << 20), oci.WithMemorySwap(32 << 20)},
		})
		if err != nil {
			return nil, err
		}
		code, err := r.wait(t)
		if err != nil {
			return nil, err
		}
		_, err = ev.waitFor(id, "/tasks/oom")
		return observation{"exit": code, "oomEvent": err == nil}, nil
	}},
	{"checkpoint", func(ctx context.Context, t *testing.T, d *harness.Daemon, ev *events, id, rt string) (observation, error) {
		if _, err := exec.LookPath("criu"); err != nil {
			return nil, errSkip{"criu is not installed"}
		}
		if out, err := exec.Command("criu", "check").CombinedOutput(); err != nil {
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			return nil, errSkip{fmt.Sprintf("`criu check` fails on this kernel, so runc cannot checkpoint: %s", lines[len(lines)-1])}
		}
		r, err := start(ctx, t, d, id, runOpts{runtime: rt, args: []string{"sleep", "300"}})
		if err != nil {
			return nil, err
		}
		img, err := r.task.Checkpoint(ctx)
		if err != nil {
			return nil, err
		}
		defer d.Client().ImageService().Delete(ctx, img.Name(), images.SynchronousDelete())
		st, err := r.task.Status(ctx)
		if err != nil {
			return nil, err
		}
		return observation{"checkpointed": img.Target().MediaType, "statusAfter": string(st.Status)}, nil
	}},
}

// metricsSummary is what the parity scenarios compare of a task's metrics,
// whichever cgroup version produced them.
type metricsSummary struct {
	kind       string
	memoryUsed bool
	limit      uint64
	pids       uint64
	cpu        bool
}

func taskMetrics(ctx context.Context, task client.Task) (metricsSummary, error) {
	m, err := task.Metrics(ctx)
	if err != nil {
		return metricsSummary{}, err
	}
	v, err := typeurl.UnmarshalAny(m.Data)
	if err != nil {
		return metricsSummary{}, err
	}
	sum := metricsSummary{kind: fmt.Sprintf("%T", v)}
	switch s := v.(type) {
	case *v1.Metrics:
		sum.memoryUsed = s.GetMemory().GetUsage().GetUsage() > 0
		sum.limit = s.GetMemory().GetUsage().GetLimit()
		sum.pids = s.GetPids().GetCurrent()
		sum.cpu = s.GetCPU() != nil
	case *v2.Metrics:
		sum.memoryUsed = s.GetMemory().GetUsage() > 0
		sum.limit = s.GetMemory().GetUsageLimit()
		sum.pids = s.GetPids().GetCurrent()
		sum.cpu = s.GetCPU() != nil
	}
	return sum, nil
}

// lifecycle returns the sorted topics without /tasks/delete. The shim
// publishes that event asynchronously and exits right after Shutdown, so
// under load runc's own shim sometimes loses it (containerd#4769): it is not
// a behaviour to compare. That the task is gone after Delete is checked
// through the API instead.
func lifecycle(topics []string) []string {
	var out []string
	for _, t := range topics {
		if t != "/tasks/delete" {
			out = append(out, t)
		}
	}
	return sorted(out)
}

// upperEntries lists, relative and sorted, what the container wrote into
// the upper directory of its overlayfs snapshot.
func upperEntries(ctx context.Context, d *harness.Daemon, ctr client.Container) ([]string, error) {
	info, err := ctr.Info(ctx)
	if err != nil {
		return nil, err
	}
	mounts, err := d.Client().SnapshotService(info.Snapshotter).Mounts(ctx, info.SnapshotKey)
	if err != nil {
		return nil, err
	}
	upper := ""
	for _, m := range mounts {
		for _, o := range m.Options {
			if v, ok := strings.CutPrefix(o, "upperdir="); ok {
				upper = v
			}
		}
	}
	if upper == "" {
		return nil, fmt.Errorf("no upperdir in %+v", mounts)
	}
	if disk, rest, ok := strings.Cut(upper, "}}"); ok {
		// The upper directory is inside the snapshot's writable image (the
		// erofs snapshotter in block mode): mounted read-only here, without
		// replaying its journal, once no task uses it.
		var i int
		if _, err := fmt.Sscanf(disk, "{{ mount %d", &i); err != nil || i >= len(mounts) {
			return nil, fmt.Errorf("upperdir %q", upper)
		}
		dir, err := os.MkdirTemp("", "snapview-upper-")
		if err != nil {
			return nil, err
		}
		defer os.Remove(dir)
		img := mount.Mount{Type: "ext4", Source: mounts[i].Source, Options: []string{"loop", "ro", "noload"}}
		if err := mount.All([]mount.Mount{img}, dir); err != nil {
			return nil, err
		}
		defer mount.UnmountAll(dir, unix.MNT_DETACH)
		upper = filepath.Join(dir, rest)
	}
	var entries []string
	err = filepath.WalkDir(upper, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if rel, _ := filepath.Rel(upper, p); rel != "." {
			entries = append(entries, rel)
		}
		return nil
	})
	return sorted(entries), err
}

func sorted(s []string) []string {
	s = append([]string(nil), s...)
	sort.Strings(s)
	return s
}

// TestParity runs every scenario on io.containerd.runc.v2 and on
// io.containerd.snapview.v2 against the same daemon and fails on any
// difference, first on the newest containerd, then on the oldest supported.
func TestParity(t *testing.T) {
	t.Run("containerd-newest", func(t *testing.T) {
		parity(t, suite.daemon)
	})
	t.Run("containerd-compat", func(t *testing.T) {
		if suite.skip != "" {
			t.Skip(suite.skip)
		}
		tools, err := harness.ToolsFromEnv(true)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		d, err := startDaemon(ctx, tools)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := d.Stop(); err != nil {
				t.Errorf("stop compat daemon: %v", err)
			}
		})
		parity(t, d)
	})
	// The erofs snapshotter in block mode: snapview claims its mounts from
	// containerd and has the mount manager perform them for a container
	// that does not hand them to a guest; runc's shim gets them performed
	// by containerd. Both must behave the same.
	t.Run("erofs-block", func(t *testing.T) {
		eachVersion(t, func(t *testing.T, compat bool) {
			d := layeredDaemon(t, compat)
			d.DefaultSnapshotter = "erofs"
			defer func() { d.DefaultSnapshotter = "" }()
			parity(t, d)
		})
	})
}

func parity(t *testing.T, d *harness.Daemon) {
	for _, sc := range parityScenarios {
		t.Run(sc.name, func(t *testing.T) {
			ctx := setup(t, d)
			ev := recordEvents(ctx, t, d)
			results := map[string]observation{}
			for _, rt := range []string{runcRT, snapviewRT} {
				short := rt[strings.LastIndex(rt[:len(rt)-3], ".")+1 : len(rt)-3]
				id := "parity-" + sc.name + "-" + short
				obs, err := sc.run(ctx, t, d, ev, id, rt)
				if skip, ok := errors.AsType[errSkip](err); ok {
					t.Skipf("%s: %s", rt, skip.reason)
				}
				if err != nil {
					t.Fatalf("%s: %v", rt, err)
				}
				results[rt] = obs
			}
			t.Logf("containerd %s: %v", d.Version, results[snapviewRT])
			if !reflect.DeepEqual(results[runcRT], results[snapviewRT]) {
				t.Fatalf("runc and snapview differ:\n  runc:     %v\n  snapview: %v", results[runcRT], results[snapviewRT])
			}
		})
	}
}
