package lifecycle_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/lifecycle/lifecycletest"
	"github.com/snapview/snapview/pkg/rootfs"
	"github.com/snapview/snapview/pkg/view"
)

// layeredRootfs returns the rootfs mounts the erofs snapshotter in block
// mode sends for a container of n layers (files standing in for the
// layers' erofs images) and a writable image that does not exist yet.
func layeredRootfs(t *testing.T, n int) []rootfs.Mount {
	t.Helper()
	dir := t.TempDir()
	ms := []rootfs.Mount{{Type: "mkfs/ext4", Source: filepath.Join(dir, "rwlayer.img"),
		Options: []string{"X-containerd.mkfs.fs=ext4", "X-containerd.mkfs.size=16777216", "rw", "loop"}}}
	for i := range n {
		f := filepath.Join(dir, fmt.Sprintf("layer-%d.erofs", i))
		if err := os.WriteFile(f, []byte(strings.Repeat(fmt.Sprintf("layer %d ", i), 4096)), 0o644); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, rootfs.Mount{Type: "erofs", Source: f, Options: []string{"ro", "loop"}})
	}
	return append(ms, rootfs.Mount{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{
		"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
		"workdir={{ mount 0 }}/work", "upperdir={{ mount 0 }}/upper", fmt.Sprintf("lowerdir={{ overlay 1 %d }}", n)}})
}

// layeredSteps are the setup steps of a layered block-mode container, in
// order.
var layeredSteps = []string{lifecycle.StepDir, lifecycle.StepLease, lifecycle.StepView, lifecycle.StepMount, lifecycle.StepFormat,
	lifecycle.StepDevice, lifecycle.StepLayers, lifecycle.StepArtifacts, lifecycle.StepMonitor, lifecycle.StepState, lifecycle.StepParams, lifecycle.StepConfig}

// TestLayered runs block mode on a layered rootfs: the writable image is
// created and formatted (never mounted), each layer gets a read-only loop
// device held by this process, config.json hands the container every disk
// with its cgroup rule, the params describe the stack for a guest, and
// teardown frees every loop device.
func TestLayered(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "layered", blockAnn)
	r.Rootfs = layeredRootfs(t, 2)
	var steps []string
	lifecycle.SetAfterStep(l, func(s string) error { steps = append(steps, s); return nil })
	v := e.SetUp(t, l, r)
	if !reflect.DeepEqual(steps, layeredSteps) {
		t.Fatalf("steps %v, want %v", steps, layeredSteps)
	}

	img := r.Rootfs[0].Source
	if err := blockdev.CheckImage(img); err != nil {
		t.Fatalf("the writable image: %v", err)
	}
	b := v.State.Block
	if b == nil || b.Loop == nil || b.Loop.BackingFile != img || b.Rootfs.Type != "mkfs/ext4" || len(b.Layers) != 2 {
		t.Fatalf("block state %+v", b)
	}
	for i, d := range b.Layers {
		if d.Loop.BackingFile != r.Rootfs[1+i].Source || d.Path != fmt.Sprintf("/dev/snapview/layers/%d", i) {
			t.Fatalf("layer disk %d %+v", i, d)
		}
		if ro, err := os.ReadFile("/sys/block/" + filepath.Base(d.Device) + "/ro"); err != nil || strings.TrimSpace(string(ro)) != "1" {
			t.Fatalf("layer disk %s is not read-only: %q %v", d.Device, ro, err)
		}
	}

	spec := readSpec(t, r.Bundle)
	devs := map[string]specs.LinuxDevice{}
	for _, d := range spec.Linux.Devices {
		devs[d.Path] = d
	}
	rules := spec.Linux.Resources.Devices
	if len(rules) != 4 || rules[0].Allow {
		t.Fatalf("device rules %+v, want deny-all then one per disk", rules)
	}
	for i, want := range []struct {
		path         string
		major, minor uint32
		access       string
		mode         os.FileMode
	}{
		{"/dev/snapview/rootfs", b.Major, b.Minor, "rw", 0o660},
		{b.Layers[0].Path, b.Layers[0].Major, b.Layers[0].Minor, "r", 0o440},
		{b.Layers[1].Path, b.Layers[1].Major, b.Layers[1].Minor, "r", 0o440},
	} {
		d, ok := devs[want.path]
		if !ok || d.Major != int64(want.major) || d.Minor != int64(want.minor) || *d.FileMode != want.mode {
			t.Errorf("linux.devices %+v, want %s %d:%d mode %v", spec.Linux.Devices, want.path, want.major, want.minor, want.mode)
		}
		rule := rules[1+i]
		if !rule.Allow || rule.Type != "b" || *rule.Major != int64(want.major) || *rule.Minor != int64(want.minor) || rule.Access != want.access {
			t.Errorf("device rule %d %+v, want allow b %d:%d %s", 1+i, rule, want.major, want.minor, want.access)
		}
	}

	doc := lifecycletest.CheckParams(t, bundle.ParamsFile(r.Bundle))
	want := rootfs.Params{Kind: "layered", FSType: "ext4", Source: b.Device, Options: []string{"rw"}, Device: "/dev/snapview/rootfs",
		Layers: []rootfs.DiskParams{
			{Device: "/dev/snapview/layers/0", FSType: "erofs", Source: b.Layers[0].Device, Options: []string{"ro"}},
			{Device: "/dev/snapview/layers/1", FSType: "erofs", Source: b.Layers[1].Device, Options: []string{"ro"}},
		},
		UpperDir: "/upper", WorkDir: "/work"}
	if !reflect.DeepEqual(doc.Rootfs, want) {
		t.Fatalf("params %+v\nwant %+v", doc.Rootfs, want)
	}
	var ann rootfs.Params
	if err := json.Unmarshal([]byte(spec.Annotations[annotations.RootfsParams]), &ann); err != nil || !reflect.DeepEqual(ann, want) {
		t.Fatalf("params annotation %+v %v", ann, err)
	}
	if v.Rootfs[0].Type != "overlay" || v.Rootfs[0].Options[0] != "lowerdir="+v.State.Mountpoint {
		t.Fatalf("rootfs for runc %+v, want the monitor rootfs over the view", v.Rootfs)
	}

	if err := l.Teardown(e.Ctx, v); err != nil {
		t.Fatal(err)
	}
	e.CheckNothingLeft(t, r, nil)
	for _, m := range r.Rootfs[:3] {
		if loops := boundTo(t, m.Source); len(loops) > 0 {
			t.Errorf("loop devices left on %s: %v", m.Source, loops)
		}
	}
}

// TestLayeredExistingImage reuses a writable image that exists already (a
// container started again on the same snapshot): it is not formatted
// again, and one that holds no ext filesystem is refused.
func TestLayeredExistingImage(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "layered-again", blockAnn)
	r.Rootfs = layeredRootfs(t, 2)
	img := r.Rootfs[0].Source
	lifecycletest.Ext4Image(t, img, 8<<20)
	before := lifecycletest.ReadFile(t, img)
	v := e.SetUp(t, l, r)
	if err := l.Teardown(e.Ctx, v); err != nil {
		t.Fatal(err)
	}
	if string(lifecycletest.ReadFile(t, img)) != string(before) {
		t.Fatal("an existing writable image was changed by the setup")
	}

	if err := os.WriteFile(img, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := l.Decide(e.Ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Setup(e.Ctx, p); err == nil || !strings.Contains(err.Error(), "snapview: the container's writable disk: "+img+": not an ext2/3/4 filesystem image") {
		t.Fatalf("setup with a writable image that is not ext4: %v", err)
	}
	e.CheckNothingLeft(t, r, nil)
}

// TestLayeredSetupFailsAtEachStep fails a layered setup right after each
// step and checks that nothing is left, no loop device on any disk.
func TestLayeredSetupFailsAtEachStep(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	for _, step := range layeredSteps[1:] {
		t.Run(step, func(t *testing.T) {
			r := e.Container(t, "layered-fail-"+step, blockAnn)
			r.Rootfs = layeredRootfs(t, 2)
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
			for _, m := range r.Rootfs[:3] {
				if loops := boundTo(t, m.Source); len(loops) > 0 {
					t.Errorf("loop devices left on %s: %v", m.Source, loops)
				}
			}
		})
	}
}

// TestLayeredRecovered tears a layered view down in another "process"
// that has only the bundle: every loop device, layers included, is found
// from the state file and freed.
func TestLayeredRecovered(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "layered-rec", blockAnn)
	r.Rootfs = layeredRootfs(t, 3)
	v := e.SetUp(t, l, r)
	// The container's monitor still holds the top layer open when the
	// shim dies; the teardown detaches it anyway (lazily).
	holder, err := os.Open(v.State.Block.Layers[0].Device)
	if err != nil {
		t.Fatal(err)
	}
	if err := lifecycle.CloseDevice(v); err != nil {
		t.Fatal(err)
	}
	if err := l.TeardownBundle(e.Ctx, lifecycletest.NS, r.ID, r.Bundle); err != nil {
		t.Fatal(err)
	}
	holder.Close()
	e.CheckNothingLeft(t, r, nil)
	for _, m := range r.Rootfs[:4] {
		if loops := boundTo(t, m.Source); len(loops) > 0 {
			t.Errorf("loop devices left on %s: %v", m.Source, loops)
		}
	}
}

// TestLayeredRefused checks the refusals of a layered rootfs: each fails
// with a snapview: error that names what was wrong, and leaves nothing.
func TestLayeredRefused(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	for _, tc := range []struct {
		name    string
		rootfs  func(t *testing.T) []rootfs.Mount
		specOpt func(*specs.Spec)
		want    string
	}{
		{"user namespace", func(t *testing.T) []rootfs.Mount { return layeredRootfs(t, 2) },
			func(s *specs.Spec) { s.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.UserNamespace}} }, "user namespace"},
		{"too many layers", func(t *testing.T) []rootfs.Mount { return layeredRootfs(t, rootfs.MaxReadOnlyDisks+1) }, nil,
			"129 read-only layer disks, more than the 128"},
		{"a layer gone", func(t *testing.T) []rootfs.Mount {
			ms := layeredRootfs(t, 2)
			ms[2].Source += ".gone"
			return ms
		}, nil, "layer 1 (mount 2)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var opts []func(*specs.Spec)
			if tc.specOpt != nil {
				opts = append(opts, tc.specOpt)
			}
			r := e.Container(t, "layered-refused-"+strings.ReplaceAll(tc.name, " ", "-"), blockAnn, opts...)
			r.Rootfs = tc.rootfs(t)
			orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
			v, _, err := l.Prepare(e.Ctx, r)
			if err == nil || v != nil || !strings.HasPrefix(err.Error(), "snapview: block mode") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v %v, want a snapview: error saying %q", v, err, tc.want)
			}
			e.CheckNothingLeft(t, r, orig)
			if _, err := os.Lstat(r.Rootfs[0].Source); !errors.Is(err, os.ErrNotExist) {
				t.Error("a refused container's writable image was created")
			}
		})
	}
}

// claimedRootfs returns a rootfs of mounts snapview claims from containerd
// (the format transform), as containerd hands them to the shim: a bind of
// a directory, and a format/bind of it that only the mount manager can
// perform.
func claimedRootfs(t *testing.T) []rootfs.Mount {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "marker"), []byte("rootfs"), 0o644); err != nil {
		t.Fatal(err)
	}
	return []rootfs.Mount{
		{Type: "bind", Source: dir, Options: []string{"rbind", "rw"}},
		{Type: "format/bind", Source: "{{ mount 0 }}", Options: []string{"rbind", "rw"}},
	}
}

// TestRootfsActivation checks that snapview has containerd's mount manager
// perform the claimed rootfs mounts of a container that does not hand them
// to a guest, under the container's id as containerd would, and removes
// the activation at teardown: with a view, and without one (mode off),
// when only the activation is recorded.
func TestRootfsActivation(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	for _, tc := range []struct {
		name     string
		ann      map[string]string
		wantSkip bool
		slow     bool
	}{
		{"view mode", bindAnn, false, false},
		{"mode off", map[string]string{annotations.Mode: "off"}, true, false},
		// An activation (mkfs, many layers) may take longer than a call
		// into containerd is given, as it may under containerd itself.
		{"slow activation", bindAnn, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "claimed-" + strings.ReplaceAll(tc.name, " ", "-")
			r := e.Container(t, id, tc.ann)
			r.Rootfs = claimedRootfs(t)
			if tc.slow {
				lifecycle.SetCallTimeout(t, 200*time.Millisecond)
				e.Backend.ActivateDelay = 500 * time.Millisecond
				defer func() { e.Backend.ActivateDelay = 0 }()
			}
			v, skip, err := l.Prepare(e.Ctx, r)
			if err != nil || v == nil || (skip != "") != tc.wantSkip {
				t.Fatalf("prepare: %v %q %v", v, skip, err)
			}
			ai, err := e.Mounts.Info(e.Ctx, id)
			if err != nil || ai.Labels[view.LabelGCBackRef] != id || ai.Labels["snapview.io/container"] != id {
				t.Fatalf("activation %s: %+v %v", id, ai, err)
			}
			if len(v.Rootfs) != 1 || v.Rootfs[0].Type != "bind" || v.Rootfs[0].Source != ai.Active[0].MountPoint {
				t.Fatalf("rootfs for runc %+v, want a bind of the activated mount %+v", v.Rootfs, ai.Active)
			}
			if got := lifecycletest.ReadFile(t, filepath.Join(v.Rootfs[0].Source, "marker")); string(got) != "rootfs" {
				t.Fatalf("the activated rootfs holds %q", got)
			}
			st, err := bundle.ReadState(r.Bundle)
			if err != nil || st.RootfsActivation != id {
				t.Fatalf("state %+v %v", st, err)
			}
			if tc.wantSkip && (st.Mode != bundle.ModeNone || st.LeaseID != "" || st.ViewKey != "") {
				t.Fatalf("a container without a view recorded %+v", st)
			}
			if !tc.wantSkip && st.Rootfs.FSType != "bind" {
				t.Fatalf("params of a view-mode container %+v, want the mounts runc mounts", st.Rootfs)
			}
			// The dead-shim path, with only the bundle.
			if err := lifecycle.CloseDevice(v); err != nil {
				t.Fatal(err)
			}
			if err := l.TeardownBundle(e.Ctx, lifecycletest.NS, id, r.Bundle); err != nil {
				t.Fatal(err)
			}
			if _, err := e.Mounts.Info(e.Ctx, id); !errdefs.IsNotFound(err) {
				t.Fatalf("activation left: %v", err)
			}
			e.CheckNothingLeft(t, r, nil)
		})
	}

	t.Run("an activation containerd made is containerd's", func(t *testing.T) {
		id := "claimed-foreign"
		r := e.Container(t, id, nil)
		if _, err := e.Mounts.Activate(e.Ctx, id, claimedRootfs(t), mount.WithLabels(map[string]string{view.LabelGCBackRef: id})); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = e.Mounts.Deactivate(e.Ctx, id) })
		r.Rootfs = claimedRootfs(t)
		if _, _, err := l.Prepare(e.Ctx, r); err == nil || !strings.Contains(err.Error(), "mount activation "+id+" exists and is not snapview's") {
			t.Fatalf("prepare over containerd's activation: %v", err)
		}
		// A state file naming it, as from a crashed shim: left alone.
		if err := bundle.MakeDir(r.Bundle); err != nil {
			t.Fatal(err)
		}
		if err := l.TeardownBundle(e.Ctx, lifecycletest.NS, id, r.Bundle); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Mounts.Info(e.Ctx, id); err != nil {
			t.Fatalf("containerd's activation was removed: %v", err)
		}
	})
}

// TestBlockRefusesGVisor refuses block mode under an OCI runtime that says
// it is gVisor's runsc, which would start the container without its
// disks, and accepts one that says it is runc.
func TestBlockRefusesGVisor(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	dir := t.TempDir()
	for name, version := range map[string]string{"runsc-wrapper": "runsc version 0.0~20221219.0\nspec: 1.0.2-dev", "runc": "runc version 1.5.2\ncommit: x"} {
		bin := filepath.Join(dir, name)
		if err := os.WriteFile(bin, []byte("#!/bin/sh\nprintf '"+strings.ReplaceAll(version, "\n", `\n`)+"\\n'\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		r := e.Container(t, "gvisor-"+strings.TrimSuffix(name, "-wrapper"), blockAnn)
		r.Rootfs = layeredRootfs(t, 2)
		r.Config.BinaryName = bin
		_, err := l.Decide(e.Ctx, r)
		if name == "runc" {
			if err != nil {
				t.Fatalf("runc: %v", err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), `snapview: block mode (annotation io.snapview.mode) needs an OCI runtime that creates the container's block devices (linux.devices), but BinaryName "`+bin+`" is gVisor ("runsc version 0.0~20221219.0")`) {
			t.Fatalf("runsc: %v", err)
		}
	}
}

// TestGuestDiskNeverMountedOnHost sets a layered rootfs up in block mode,
// where its writable disk goes to a guest, tears it down, and then asks for
// the same container in view mode and in mode off, each of which would
// mount that disk on the host: refused, before anything is done.
func TestGuestDiskNeverMountedOnHost(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "guest-disk", blockAnn)
	r.Rootfs = layeredRootfs(t, 2)
	v := e.SetUp(t, l, r)
	if err := l.Teardown(e.Ctx, v); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"view", "off"} {
		r.Config.View.Mode = mode
		if err := os.WriteFile(filepath.Join(r.Bundle, "config.json"), []byte(`{"ociVersion":"1.2.0"}`), 0o644); err != nil {
			t.Fatal(err)
		}
		_, _, err := l.Prepare(e.Ctx, r)
		if err == nil || !strings.Contains(err.Error(), "was handed to a guest (container guest-disk in block mode)") || !strings.HasPrefix(err.Error(), "snapview: ") {
			t.Fatalf("mode %s: %v, want a refusal", mode, err)
		}
		e.CheckNothingLeft(t, r, nil)
	}
}

// TestBlockDisksConfined refuses a block-mode rootfs whose disk images
// (the writable image snapview would create, format and attach, the layers
// it would attach, a blockfile image) lie outside the container's
// snapshotter's root, or are symlinks, as containerd confines its own mkfs
// to its snapshotters' roots; nothing is left.
func TestBlockDisksConfined(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	e.Backend.Roots = map[string]string{"native": filepath.Join(e.Dir, "native")}
	defer func() { e.Backend.Roots = nil }()
	link := func(t *testing.T) []rootfs.Mount {
		ms := layeredRootfs(t, 1)
		dir, err := os.MkdirTemp(filepath.Join(e.Dir, "native"), "snapshot-") //nolint:usetesting // a directory inside the snapshotter's root, which t.TempDir is not
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		img := filepath.Join(dir, "planted.img")
		if err := os.Symlink(ms[1].Source, img); err != nil {
			t.Fatal(err)
		}
		ms[0].Source, ms[1].Source = filepath.Join(dir, "rwlayer.img"), img
		return ms
	}
	for _, tc := range []struct {
		name   string
		rootfs func(t *testing.T) []rootfs.Mount
		want   string
	}{
		{"layered rootfs elsewhere", func(t *testing.T) []rootfs.Mount { return layeredRootfs(t, 2) }, "rwlayer.img, which is outside it"},
		{"blockfile image elsewhere", func(t *testing.T) []rootfs.Mount { return []rootfs.Mount{blockfileRootfs(t)} }, "snapshot.ext4, which is outside it"},
		{"a layer linked from inside", link, "planted.img, which is a symlink"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.Container(t, "confined-"+strings.ReplaceAll(tc.name, " ", "-"), blockAnn)
			r.Rootfs = tc.rootfs(t)
			_, _, err := l.Prepare(e.Ctx, r)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "inside snapshotter native's root") {
				t.Fatalf("prepare: %v, want %q", err, tc.want)
			}
			e.CheckNothingLeft(t, r, nil)
		})
	}
}
