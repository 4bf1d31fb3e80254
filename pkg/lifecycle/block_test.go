package lifecycle_test

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/lifecycle/lifecycletest"
	"github.com/snapview/snapview/pkg/rootfs"
)

var blockAnn = map[string]string{annotations.Mode: "block", annotations.BootPrefix + "kernel": lifecycletest.KernelPath}

// blockfileRootfs makes an ext4 image standing in for a blockfile
// snapshot and returns the rootfs mount the snapshotter would send.
func blockfileRootfs(t *testing.T) rootfs.Mount {
	t.Helper()
	img := filepath.Join(t.TempDir(), "snapshot.ext4")
	lifecycletest.Ext4Image(t, img, 16<<20)
	return rootfs.Mount{Type: "ext4", Source: img, Options: []string{"loop", "rw"}}
}

// fakeMapper attaches a loop device to an ext4 image and links it the way
// /dev/mapper/<name> links a device-mapper node: a real block device behind
// a symlink, standing in for devmapper, which this machine lacks.
func fakeMapper(t *testing.T) (link string, dev *os.File) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "thin.ext4")
	lifecycletest.Ext4Image(t, img, 16<<20)
	f, err := mount.SetupLoop(img, mount.LoopParams{Autoclear: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	link = filepath.Join(t.TempDir(), "pool-snap-7")
	if err := os.Symlink(f.Name(), link); err != nil {
		t.Fatal(err)
	}
	return link, f
}

func readSpec(t *testing.T, bundlePath string) specs.Spec {
	t.Helper()
	var spec specs.Spec
	if err := json.Unmarshal(lifecycletest.ReadFile(t, filepath.Join(bundlePath, "config.json")), &spec); err != nil {
		t.Fatal(err)
	}
	return spec
}

// TestBlockDevmapper runs block mode on a block-device rootfs: the node is
// resolved behind its symlink and handed to the container in config.json
// with its cgroup rule, the params say so, runc is given the monitor rootfs,
// and teardown leaves the device (snapview did not attach it) alone.
func TestBlockDevmapper(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	link, dev := fakeMapper(t)
	var st unix.Stat_t
	if err := unix.Fstat(int(dev.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	major, minor := unix.Major(st.Rdev), unix.Minor(st.Rdev)

	r := e.Container(t, "dm", blockAnn)
	r.Rootfs = []rootfs.Mount{{Type: "ext4", Source: link, Options: []string{"rw"}}}
	p, err := l.Decide(e.Ctx, r)
	if err != nil || p.Mode() != config.ModeBlock {
		t.Fatalf("decide: %+v %v", p, err)
	}
	v, err := l.Setup(e.Ctx, p)
	if err != nil {
		t.Fatal(err)
	}

	b := v.State.Block
	if b == nil || b.Device != dev.Name() || b.Major != major || b.Minor != minor || b.Loop != nil || b.Rootfs.Source != link || b.MonitorRootfs != "view" {
		t.Fatalf("block state %+v, want %s (%d:%d), not attached by snapview", b, dev.Name(), major, minor)
	}
	spec := readSpec(t, r.Bundle)
	wantDev := specs.LinuxDevice{Path: "/dev/snapview/rootfs", Type: "b", Major: int64(major), Minor: int64(minor)}
	var got *specs.LinuxDevice
	for i, d := range spec.Linux.Devices {
		if d.Path == wantDev.Path {
			got = &spec.Linux.Devices[i]
		}
	}
	if got == nil || got.Type != "b" || got.Major != wantDev.Major || got.Minor != wantDev.Minor ||
		*got.FileMode != 0o660 || *got.UID != 1000 || *got.GID != 1000 {
		t.Fatalf("linux.devices %+v, want %+v owned by the process user", spec.Linux.Devices, wantDev)
	}
	rules := spec.Linux.Resources.Devices
	last := rules[len(rules)-1]
	if len(rules) != 2 || rules[0].Allow || !last.Allow || last.Type != "b" || *last.Major != int64(major) || *last.Minor != int64(minor) || last.Access != "rw" {
		t.Fatalf("linux.resources.devices %+v, want deny-all kept, then allow b %d:%d rw", rules, major, minor)
	}
	var params rootfs.Params
	if err := json.Unmarshal([]byte(spec.Annotations[annotations.RootfsParams]), &params); err != nil {
		t.Fatal(err)
	}
	want := rootfs.Params{Kind: "block", FSType: "ext4", Source: dev.Name(), Options: []string{"rw"}, Device: "/dev/snapview/rootfs"}
	if !reflect.DeepEqual(params, want) {
		t.Fatalf("rootfs params %+v, want %+v", params, want)
	}
	if doc := lifecycletest.CheckParams(t, bundle.ParamsFile(r.Bundle)); !reflect.DeepEqual(doc.Rootfs, want) {
		t.Fatalf("params.json rootfs %+v, want %+v", doc.Rootfs, want)
	}
	// The monitor rootfs's writable layer is in the task's working
	// directory (containerd's root filesystem), not in the bundle (its
	// state tmpfs).
	work := filepath.Join(r.Bundle, "work", "snapview")
	wantRootfs := []rootfs.Mount{{Type: "overlay", Source: "overlay", Options: []string{
		"lowerdir=" + bundle.Mountpoint(r.Bundle), "upperdir=" + filepath.Join(work, "upper"), "workdir=" + filepath.Join(work, "work")}}}
	if !reflect.DeepEqual(v.Rootfs, wantRootfs) {
		t.Fatalf("rootfs for runc %+v, want %+v", v.Rootfs, wantRootfs)
	}
	if fi, err := os.Stat(filepath.Join(work, "upper")); err != nil || !fi.IsDir() {
		t.Fatalf("the monitor rootfs's upper directory: %v", err)
	}

	if err := l.Teardown(e.Ctx, v); err != nil {
		t.Fatal(err)
	}
	e.CheckNothingLeft(t, r, nil)
	if _, err := blockdev.Resolve(link); err != nil {
		t.Fatalf("the device-mapper stand-in is gone: %v", err)
	}
	if _, err := unix.IoctlLoopGetStatus64(int(dev.Fd())); err != nil {
		t.Fatalf("the device-mapper stand-in was detached: %v", err)
	}
}

// TestBlockfile runs block mode on a blockfile rootfs: snapview attaches a
// loop device to the image, holds it for the container's life, and frees
// it at teardown; a host directory serves as the monitor rootfs.
func TestBlockfile(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "bf", blockAnn)
	r.Rootfs = []rootfs.Mount{blockfileRootfs(t)}
	monitor := t.TempDir()
	r.Config.Block.MonitorRootfs = monitor
	v := e.SetUp(t, l, r)
	b := v.State.Block
	if b == nil || b.Loop == nil || b.Loop.BackingFile != r.Rootfs[0].Source || b.Major != 7 || b.MonitorRootfs != monitor {
		t.Fatalf("block state %+v", b)
	}
	backing := blockdev.Backing{Path: b.Loop.BackingFile, Dev: b.Loop.BackingDev, Ino: b.Loop.BackingIno}
	if bound, err := blockdev.Bound(b.Device, backing); err != nil || !bound {
		t.Fatalf("%s not bound to the snapshot file: %v", b.Device, err)
	}
	if v.Rootfs[0].Options[0] != "lowerdir="+monitor {
		t.Fatalf("monitor rootfs %+v, want the host directory as its lower layer", v.Rootfs)
	}
	saved, err := bundle.ReadState(r.Bundle)
	if err != nil || !reflect.DeepEqual(saved.Block, b) {
		t.Fatalf("state file block %+v %v, want %+v", saved.Block, err, b)
	}
	if err := l.Teardown(e.Ctx, v); err != nil {
		t.Fatal(err)
	}
	e.CheckNothingLeft(t, r, nil)
	if bound, err := blockdev.Bound(b.Device, backing); err != nil || bound {
		t.Fatalf("%s still bound after teardown: %v", b.Device, err)
	}
}

// TestBlockMonitorChoice chooses the monitor rootfs per container, by name,
// among those the configuration offers: a named host directory, or "view"
// where the configuration's default is a host directory.
func TestBlockMonitorChoice(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	qemu, fallback := t.TempDir(), t.TempDir()
	for _, tc := range []struct {
		name, choice, wantLower, wantRecorded string
	}{
		{"named host directory", "qemu", qemu, qemu},
		{"the image view", "view", "", "view"},
		{"no choice gives the default", "", fallback, fallback},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ann := map[string]string{annotations.Mode: "block"}
			if tc.choice != "" {
				ann[annotations.MonitorRootfs] = tc.choice
			}
			r := e.Container(t, "monitor-"+strings.ReplaceAll(tc.name, " ", "-"), ann)
			r.Rootfs = []rootfs.Mount{blockfileRootfs(t)}
			r.Config.Block.MonitorRootfs = fallback
			r.Config.Block.Monitors = map[string]string{"qemu": qemu}
			v := e.SetUp(t, l, r)
			want := tc.wantLower
			if want == "" {
				want = v.State.Mountpoint
			}
			if v.Rootfs[0].Options[0] != "lowerdir="+want || v.State.Block.MonitorRootfs != tc.wantRecorded {
				t.Fatalf("monitor rootfs %+v, recorded %q; want lower layer %s, recorded %q", v.Rootfs, v.State.Block.MonitorRootfs, want, tc.wantRecorded)
			}
			if err := l.Teardown(e.Ctx, v); err != nil {
				t.Fatal(err)
			}
			e.CheckNothingLeft(t, r, nil)
		})
	}
}

// TestBlockfileRecovered tears a blockfile view down in another "process":
// the loop device is found from the state file and detached only while it
// is bound to the recorded inode.
func TestBlockfileRecovered(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "bf-rec", blockAnn)
	r.Rootfs = []rootfs.Mount{blockfileRootfs(t)}
	v := e.SetUp(t, l, r)
	b := v.State.Block
	// A second opener (the container's monitor, still running) keeps the
	// autoclear device bound after the shim's reference is gone.
	holder, err := os.OpenFile(b.Device, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	if err := lifecycle.CloseDevice(v); err != nil { // the shim died
		t.Fatal(err)
	}
	got, err := l.Recover(e.Ctx, lifecycletest.NS, "bf-rec", r.Bundle)
	if err != nil || !reflect.DeepEqual(got.State.Block, b) {
		t.Fatalf("recovered %+v %v", got, err)
	}
	if err := l.Teardown(e.Ctx, got); err != nil {
		t.Fatal(err)
	}
	e.CheckNothingLeft(t, r, nil)
	holder.Close()
	backing := blockdev.Backing{Path: b.Loop.BackingFile, Dev: b.Loop.BackingDev, Ino: b.Loop.BackingIno}
	if bound, err := blockdev.Bound(b.Device, backing); err != nil || bound {
		t.Fatalf("%s still bound after its last opener closed: %v", b.Device, err)
	}
}

// TestBlockRefused checks every refusal: each fails with a snapview: error
// that says what was wrong, and leaves nothing behind.
func TestBlockRefused(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	bf := blockfileRootfs(t)
	ro := bf
	ro.Options = []string{"loop", "ro"}
	for _, tc := range []struct {
		name     string
		rootfs   []rootfs.Mount
		specOpt  func(*specs.Spec)
		monitor  string
		choice   string
		wantErr  string
		atDecide bool
	}{
		{name: "directory rootfs", wantErr: "(a directory)", atDecide: true},
		{name: "overlay rootfs", rootfs: []rootfs.Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a", "upperdir=/u", "workdir=/w"}}}, wantErr: "an overlay mount", atDecide: true},
		{name: "several mounts", rootfs: []rootfs.Mount{bf, {Type: "overlay", Source: "overlay"}}, wantErr: "2 mounts (ext4, overlay)", atDecide: true},
		{name: "read-only image file", rootfs: []rootfs.Mount{ro}, wantErr: "read-only", atDecide: true},
		{name: "user namespace", rootfs: []rootfs.Mount{bf}, specOpt: func(s *specs.Spec) {
			s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.UserNamespace})
		}, wantErr: "user namespace", atDecide: true},
		{name: "missing monitor rootfs", rootfs: []rootfs.Mount{bf}, monitor: "/nonexistent/monitor", wantErr: `block.monitor_rootfs "/nonexistent/monitor"`},
		{name: "missing chosen monitor rootfs", rootfs: []rootfs.Mount{bf}, choice: "gone",
			wantErr: `block.monitors.gone "/nonexistent/gone" in built-in defaults, chosen by annotation io.snapview.monitor-rootfs: stat /nonexistent/gone`},
		{name: "monitor rootfs not offered", rootfs: []rootfs.Mount{bf}, choice: "firecracker",
			wantErr: `annotation io.snapview.monitor-rootfs="firecracker": the configuration (built-in defaults) offers no monitor rootfs of that name; choose one of view, gone`, atDecide: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var opts []func(*specs.Spec)
			if tc.specOpt != nil {
				opts = append(opts, tc.specOpt)
			}
			ann := blockAnn
			if tc.choice != "" {
				ann = map[string]string{annotations.Mode: "block", annotations.MonitorRootfs: tc.choice}
			}
			r := e.Container(t, "refused-"+strings.ReplaceAll(tc.name, " ", "-"), ann, opts...)
			r.Config.Block.Monitors = map[string]string{"gone": "/nonexistent/gone"}
			if tc.rootfs != nil {
				r.Rootfs = tc.rootfs
			}
			if tc.monitor != "" {
				r.Config.Block.MonitorRootfs = tc.monitor
			}
			orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
			p, err := l.Decide(e.Ctx, r)
			if err == nil && !tc.atDecide {
				_, err = l.Setup(e.Ctx, p)
			}
			if err == nil || !strings.HasPrefix(err.Error(), "snapview: ") || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want a snapview: error saying %q", err, tc.wantErr)
			}
			e.CheckNothingLeft(t, r, orig)
			if loops := boundTo(t, bf.Source); len(loops) > 0 {
				t.Fatalf("loop devices left on the image: %v", loops)
			}
		})
	}
}

// TestBlockSetupFailsAtEachStep fails a blockfile setup right after each
// step and checks that nothing is left, the loop device included.
func TestBlockSetupFailsAtEachStep(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	bf := blockfileRootfs(t)
	for _, step := range []string{lifecycle.StepLease, lifecycle.StepView, lifecycle.StepMount, lifecycle.StepDevice, lifecycle.StepArtifacts, lifecycle.StepMonitor, lifecycle.StepState, lifecycle.StepParams, lifecycle.StepConfig} {
		t.Run(step, func(t *testing.T) {
			r := e.Container(t, "block-fail-"+step, blockAnn)
			r.Rootfs = []rootfs.Mount{bf}
			orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
			l := lifecycle.New(e.Backend)
			_, injected := failAfter(l, step)
			p, err := l.Decide(e.Ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := l.Setup(e.Ctx, p); !errors.Is(err, injected) {
				t.Fatalf("setup: %v, want the injected failure", err)
			}
			e.CheckNothingLeft(t, r, orig)
			if loops := boundTo(t, bf.Source); len(loops) > 0 {
				t.Fatalf("loop devices left on the image: %v", loops)
			}
		})
	}
}

// boundTo lists the loop devices bound to file.
func boundTo(t *testing.T, file string) []string {
	t.Helper()
	var out []string
	matches, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err == nil && strings.TrimSpace(string(b)) == file {
			out = append(out, m)
		}
	}
	return out
}

// TestMonitorDirHostile refuses block mode when snapview's directory in the
// task's working directory, where the monitor rootfs's writable layer goes,
// is a symlink out of it, and its teardown touches nothing there.
func TestMonitorDirHostile(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "hostile-monitor", blockAnn)
	r.Rootfs = []rootfs.Mount{blockfileRootfs(t)}
	outside := t.TempDir()
	if err := os.MkdirAll(filepath.Join(outside, "upper"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "upper", "keep"), []byte("outside"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(r.Bundle, "work", "snapview")); err != nil {
		t.Fatal(err)
	}
	p, err := l.Decide(e.Ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Setup(e.Ctx, p); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Fatalf("setup: %v, want a refusal of the symlink", err)
	}
	if err := l.TeardownBundle(e.Ctx, lifecycletest.NS, "hostile-monitor", r.Bundle); err != nil {
		t.Logf("dead-shim teardown: %v", err)
	}
	if _, err := os.Stat(filepath.Join(outside, "upper", "keep")); err != nil {
		t.Errorf("a file outside the task's directory was removed: %v", err)
	}
}
