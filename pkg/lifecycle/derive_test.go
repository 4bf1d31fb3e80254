package lifecycle_test

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/params"
	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/lifecycle/lifecycletest"
	"github.com/snapview/snapview/pkg/rootfs"
	"github.com/snapview/snapview/pkg/view"
)

// layerDirs makes n layer directories, top-most first, as an overlayfs
// snapshotter keeps an image's layers: layer i holds /layer<i> and its own
// /boot/vmlinux, so that the top-most one's shows through.
func layerDirs(t *testing.T, n int) []string {
	t.Helper()
	var dirs []string
	for i := range n {
		d := filepath.Join(t.TempDir(), "io.containerd.snapshotter.v1.overlayfs", "snapshots", string(rune('1'+i)), "fs")
		if err := os.MkdirAll(filepath.Join(d, "boot"), 0o755); err != nil {
			t.Fatal(err)
		}
		for p, data := range map[string]string{"/layer" + string(rune('0'+i)): "x", lifecycletest.KernelPath: "kernel of layer " + string(rune('0'+i))} {
			if err := os.WriteFile(filepath.Join(d, p), []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		dirs = append(dirs, d)
	}
	return dirs
}

// overlayRootfs is the rootfs mount containerd's overlayfs snapshotter
// hands Create for a container over layers.
func overlayRootfs(t *testing.T, layers []string) []rootfs.Mount {
	up := t.TempDir()
	lower := layers[0]
	for _, l := range layers[1:] {
		lower += ":" + l
	}
	return []rootfs.Mount{{Type: "overlay", Source: "overlay", Options: []string{"index=off", "workdir=" + up + "/work", "upperdir=" + up + "/fs", "lowerdir=" + lower}}}
}

// TestDerivedView sets up a view with view.source "layers" over a rootfs
// that names the image's layers: the view is the read-only overlay of
// those layers alone, made without one call into containerd (no lease, no
// view snapshot), recorded as derived in the state, the params and the
// annotations (no view key, no lease), and its teardown, from the state
// alone too, leaves nothing.
func TestDerivedView(t *testing.T) {
	for _, n := range []int{1, 3} {
		t.Run(string(rune('0'+n))+" layers", func(t *testing.T) {
			e := lifecycletest.NewEnv(t)
			l := lifecycle.New(e.Backend)
			r := e.Container(t, "c1", map[string]string{annotations.BootPrefix + "kernel": lifecycletest.KernelPath})
			r.Config = config.Default()
			r.Config.View.Source = params.SourceLayers
			r.Rootfs = overlayRootfs(t, layerDirs(t, n))
			before := e.Backend.Calls()
			v, skip, err := l.Prepare(e.Ctx, r)
			if err != nil || v == nil {
				t.Fatalf("prepare: %v (%s)", err, skip)
			}
			if calls := e.Backend.Calls() - before; calls != 0 {
				t.Errorf("%d calls into containerd, want none", calls)
			}
			st := v.State
			if !st.Derived() || st.ViewKey != "" || st.LeaseID != "" || st.Snapshotter != "overlayfs" {
				t.Fatalf("state %+v", st)
			}
			if _, err := lease.Get(e.Ctx, e.Leases, "c1"); !errdefs.IsNotFound(err) {
				t.Fatalf("a lease for a derived view: %v", err)
			}
			if got := string(lifecycletest.ReadFile(t, filepath.Join(st.Mountpoint, lifecycletest.KernelPath))); got != "kernel of layer 0" {
				t.Fatalf("the view shows %q, want the top-most layer's file", got)
			}
			for i := range n {
				if _, err := os.Stat(filepath.Join(st.Mountpoint, "layer"+string(rune('0'+i)))); err != nil {
					t.Errorf("layer %d not in the view: %v", i, err)
				}
			}
			if err := os.WriteFile(filepath.Join(st.Mountpoint, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
				t.Fatalf("write into the view: %v, want EROFS", err)
			}
			saved, err := bundle.ReadState(r.Bundle)
			if err != nil || !saved.Derived() || saved.Version != 5 {
				t.Fatalf("state file %+v %v", saved, err)
			}
			doc := lifecycletest.CheckParams(t, bundle.ParamsFile(r.Bundle))
			if doc.ViewSource != params.SourceLayers {
				t.Fatalf("params view_source %q", doc.ViewSource)
			}
			var spec specs.Spec
			if err := json.Unmarshal(lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json")), &spec); err != nil {
				t.Fatal(err)
			}
			_, hasKey := spec.Annotations[annotations.ViewKey]
			_, hasLease := spec.Annotations[annotations.ViewLease]
			if hasKey || hasLease || spec.Annotations[annotations.ViewSource] != params.SourceLayers || spec.Annotations[annotations.ViewMountpoint] != st.Mountpoint {
				t.Fatalf("annotations %v", spec.Annotations)
			}

			// The dead-shim path: the view rebuilt from the bundle alone.
			before = e.Backend.Calls()
			if err := l.TeardownBundle(e.Ctx, lifecycletest.NS, "c1", r.Bundle); err != nil {
				t.Fatal(err)
			}
			if calls := e.Backend.Calls() - before; calls != 0 {
				t.Errorf("%d calls into containerd to tear a derived view down, want none", calls)
			}
			e.CheckNothingLeft(t, r, nil)
		})
	}
}

// TestDerivedViewFallsBack checks that a rootfs that does not name the
// image's layers (the native snapshotter's writable directory) gets the
// leased View with view.source "layers", as with the default.
func TestDerivedViewFallsBack(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "c1", map[string]string{annotations.BootPrefix + "kernel": lifecycletest.KernelPath})
	r.Config = config.Default()
	r.Config.View.Source = params.SourceLayers
	v, _, err := l.Prepare(e.Ctx, r)
	if err != nil || v == nil {
		t.Fatalf("prepare: %v", err)
	}
	if st := v.State; st.Derived() || st.ViewKey != view.Key("c1") || st.LeaseID != lease.ID("c1") {
		t.Fatalf("state %+v, want a leased view", st)
	}
	if got := string(lifecycletest.ReadFile(t, filepath.Join(v.State.Mountpoint, lifecycletest.KernelPath))); got != lifecycletest.KernelContent {
		t.Fatalf("view content %q", got)
	}
	if err := l.Teardown(e.Ctx, v); err != nil {
		t.Fatal(err)
	}
	e.CheckNothingLeft(t, r, nil)
}
