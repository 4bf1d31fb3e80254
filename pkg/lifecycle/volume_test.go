package lifecycle_test

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/lifecycle/lifecycletest"
	"github.com/snapview/snapview/pkg/view"
)

// volumeImages makes two images to mount as volumes, and returns the
// annotations that ask for both, and a configuration body allowing them.
func volumeImages(t *testing.T, e *lifecycletest.Env) map[string]string {
	t.Helper()
	e.Image(t, lifecycletest.NS, "docker.io/acme/models:v3", map[string]string{"/weights/model.bin": "weights", "/README": "models"}, true)
	e.Image(t, lifecycletest.NS, "docker.io/acme/tools:1", map[string]string{"/usr/bin/tool": "tool", "/usr/escape": "->/etc"}, true)
	return map[string]string{
		annotations.VolumePrefix + "models": `{"image":"docker.io/acme/models:v3","target":"/models"}`,
		annotations.VolumePrefix + "tools":  `{"image":"docker.io/acme/tools:1","target":"/opt/tools","subpath":"usr/bin"}`,
	}
}

func allowAcme(r *lifecycle.Request) { r.Config.Volumes.Allow = []string{"docker.io/acme/*"} }

// TestVolumes mounts two volumes of two images into a view-mode container:
// each a read-only view of its image under the container's lease, mounted
// under the bundle and bound read-only at its target (the subpath of one),
// described in the params and the annotation; teardown removes them.
func TestVolumes(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "vols", volumeImages(t, e))
	allowAcme(&r)
	v, _, err := l.Prepare(e.Ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	st := v.State
	if len(st.Volumes) != 2 || st.Volumes[0].Name != "models" || st.Volumes[1].Name != "tools" {
		t.Fatalf("volumes %+v", st.Volumes)
	}
	for _, vol := range st.Volumes {
		info, err := e.Snapshotter.Stat(e.Ctx, view.VolumeKey("vols", vol.Name))
		if err != nil || info.Parent != vol.Parent || info.Labels["snapview.io/container"] != "vols" || info.Labels[view.LabelGCBackRef] != "vols" {
			t.Fatalf("volume view %s: %+v %v", vol.Name, info, err)
		}
	}
	if got := lifecycletest.ReadFile(t, filepath.Join(st.Volumes[0].Source, "weights/model.bin")); string(got) != "weights" {
		t.Fatalf("models volume holds %q", got)
	}
	if st.Volumes[1].Source != filepath.Join(st.Volumes[1].Mountpoint, "usr/bin") {
		t.Fatalf("tools volume bound from %s", st.Volumes[1].Source)
	}
	if err := os.WriteFile(filepath.Join(st.Volumes[0].Source, "x"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("write into a volume: %v, want EROFS", err)
	}

	spec := readSpec(t, r.Bundle)
	binds := map[string]specs.Mount{}
	for _, m := range spec.Mounts {
		binds[m.Destination] = m
	}
	for target, src := range map[string]string{"/models": st.Volumes[0].Source, "/opt/tools": st.Volumes[1].Source} {
		m, ok := binds[target]
		if !ok || m.Source != src || strings.Join(m.Options, ",") != "rbind,ro,nosuid,nodev" {
			t.Errorf("bind at %s: %+v, want %s read-only, nosuid, nodev", target, m, src)
		}
	}
	var vols map[string]struct {
		Image, Target, Subpath string
	}
	if err := json.Unmarshal([]byte(spec.Annotations[annotations.Volumes]), &vols); err != nil ||
		vols["models"].Image != "docker.io/acme/models:v3" || vols["tools"].Subpath != "/usr/bin" || vols["tools"].Target != "/opt/tools" {
		t.Fatalf("annotation %s = %q: %v", annotations.Volumes, spec.Annotations[annotations.Volumes], err)
	}
	if doc := lifecycletest.CheckParams(t, bundle.ParamsFile(r.Bundle)); doc.Volumes["models"].Target != "/models" || doc.Volumes["tools"].Subpath != "/usr/bin" {
		t.Fatalf("params.json volumes %+v", doc.Volumes)
	}

	if err := l.Teardown(e.Ctx, v); err != nil {
		t.Fatal(err)
	}
	e.CheckNothingLeft(t, r, nil)
}

// TestVolumesRecovered removes a container's volumes from its bundle alone
// (the dead-shim path), and from the deterministic names when its state
// file is gone (a crash before it was written).
func TestVolumesRecovered(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	ann := volumeImages(t, e)
	for _, withState := range []bool{true, false} {
		id := map[bool]string{true: "vols-state", false: "vols-names"}[withState]
		r := e.Container(t, id, ann)
		allowAcme(&r)
		if _, _, err := l.Prepare(e.Ctx, r); err != nil {
			t.Fatal(err)
		}
		if !withState {
			if err := os.Remove(bundle.StatePath(r.Bundle)); err != nil {
				t.Fatal(err)
			}
		}
		if err := l.TeardownBundle(e.Ctx, lifecycletest.NS, id, r.Bundle); err != nil {
			t.Fatal(err)
		}
		e.CheckNothingLeft(t, r, nil)
	}
}

// TestVolumeSetupFailsAtEachStep fails a setup with volumes right after
// each step, the volume steps included: nothing is left. With managed views
// (their mounts need containerd's mount manager, as an erofs view's do),
// the view's and the volumes' activations are undone too.
func TestVolumeSetupFailsAtEachStep(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	ann := volumeImages(t, e)
	for _, managed := range []bool{false, true} {
		steps := []string{lifecycle.StepLease, lifecycle.StepView, lifecycle.StepMount, lifecycle.StepVolumeViews, lifecycle.StepVolumes,
			lifecycle.StepArtifacts, lifecycle.StepState, lifecycle.StepParams, lifecycle.StepConfig}
		prefix := "vols-fail-"
		if managed {
			steps = append([]string{lifecycle.StepActivate}, steps...)
			prefix = "vols-managed-fail-"
		}
		for _, step := range steps {
			t.Run(prefix+step, func(t *testing.T) {
				e.Backend.ManagedViews = managed
				defer func() { e.Backend.ManagedViews = false }()
				r := e.Container(t, prefix+step, ann)
				allowAcme(&r)
				orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
				l := lifecycle.New(e.Backend)
				seen, injected := failAfter(l, step)
				if _, _, err := l.Prepare(e.Ctx, r); !errors.Is(err, injected) {
					t.Fatalf("prepare: %v, want the injected failure (steps %v)", err, *seen)
				}
				e.CheckNothingLeft(t, r, orig)
			})
		}
	}
}

// TestVolumesManaged mounts volumes whose views need containerd's mount
// manager: each volume's activation is named after its view, labelled as
// the container's, and removed at teardown, and so are they when the shim
// is gone (the dead-shim path, from the state file).
func TestVolumesManaged(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	e.Backend.ManagedViews = true
	ann := volumeImages(t, e)
	for _, path := range []string{"teardown", "dead shim"} {
		t.Run(path, func(t *testing.T) {
			id := "vols-managed-" + strings.ReplaceAll(path, " ", "-")
			r := e.Container(t, id, ann)
			allowAcme(&r)
			l := lifecycle.New(e.Backend)
			v, _, err := l.Prepare(e.Ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			for _, vol := range v.State.Volumes {
				ai, err := e.Mounts.Info(e.Ctx, view.VolumeKey(id, vol.Name))
				if err != nil || vol.Activation != ai.Name || ai.Labels["snapview.io/container"] != id || len(ai.Active) == 0 {
					t.Fatalf("volume %s's activation %+v %v (recorded %q)", vol.Name, ai, err, vol.Activation)
				}
			}
			if path == "teardown" {
				err = l.Teardown(e.Ctx, v)
			} else {
				err = l.TeardownBundle(e.Ctx, lifecycletest.NS, id, r.Bundle)
			}
			if err != nil {
				t.Fatal(err)
			}
			e.CheckNothingLeft(t, r, nil)
		})
	}
}

// TestVolumesRefused checks every way a volume's source can be refused: a
// snapview: error that names the image and what to do, and nothing left.
func TestVolumesRefused(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	volumeImages(t, e)
	e.Image(t, lifecycletest.NS, "docker.io/acme/packed:1", nil, false)
	e.Image(t, "other", "docker.io/acme/theirs:1", map[string]string{"/secret": "x"}, true)
	l := lifecycle.New(e.Backend)
	for _, tc := range []struct {
		name, value string
		allow       []string
		want        []string
		noCalls     bool
	}{
		{"no image allowed, the default", `{"image":"docker.io/acme/models:v3","target":"/m"}`, nil,
			[]string{"io.snapview.volume.v", "image docker.io/acme/models:v3 is not allowed as a volume by [volumes] allow in built-in defaults (none: it is empty, the default)"}, true},
		{"image not allowed", `{"image":"docker.io/library/busybox","target":"/m"}`, []string{"docker.io/acme/*"},
			[]string{"docker.io/library/busybox:latest is not allowed", `["docker.io/acme/*"]`}, true},
		{"missing image", `{"image":"docker.io/acme/nothing:1","target":"/m"}`, []string{"docker.io/acme/*"},
			[]string{"image docker.io/acme/nothing:1: no such image in namespace test", "ctr -n test images pull --snapshotter native docker.io/acme/nothing:1"}, false},
		{"image of another namespace", `{"image":"docker.io/acme/theirs:1","target":"/m"}`, []string{"docker.io/acme/*"},
			[]string{"no such image in namespace test"}, false},
		{"image not unpacked", `{"image":"docker.io/acme/packed:1","target":"/m"}`, []string{"docker.io/acme/*"},
			[]string{"not unpacked in snapshotter native", "unpack it there"}, false},
		{"subpath through a symlink out of the image", `{"image":"docker.io/acme/tools:1","target":"/m","subpath":"usr/escape/cron.d"}`, []string{"docker.io/acme/*"},
			[]string{`subpath "/usr/escape/cron.d" in image docker.io/acme/tools:1`, "symlinks are resolved inside the image"}, false},
		{"subpath not a directory", `{"image":"docker.io/acme/tools:1","target":"/m","subpath":"usr/bin/tool"}`, []string{"docker.io/acme/*"},
			[]string{`subpath "/usr/bin/tool"`, "not a directory"}, false},
		{"mode off", `{"image":"docker.io/acme/models:v3","target":"/m"}`, []string{"docker.io/acme/*"},
			[]string{"io.snapview.volume.v asks for binds from the view, but the mode is off"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ann := map[string]string{annotations.VolumePrefix + "v": tc.value}
			if tc.name == "mode off" {
				ann[annotations.Mode] = "off"
			}
			r := e.Container(t, "vol-refused-"+strings.NewReplacer(" ", "-", ",", "").Replace(tc.name), ann)
			r.Config.Volumes.Allow = tc.allow
			orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
			calls := e.Backend.Calls()
			v, _, err := l.Prepare(e.Ctx, r)
			if err == nil || v != nil {
				t.Fatalf("prepare: %+v %v", v, err)
			}
			for _, w := range append([]string{"snapview: "}, tc.want...) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if tc.noCalls && e.Backend.Calls() != calls {
				t.Errorf("a refused image cost %d calls into containerd", e.Backend.Calls()-calls)
			}
			e.CheckNothingLeft(t, r, orig)
		})
	}
}

// TestVolumeLookupsConcurrent checks that the volumes' images are looked up
// at once, not one after another: each lookup's first call into containerd
// waits (up to 10 s) for the other's to arrive, which it can only if both
// are in flight together.
func TestVolumeLookupsConcurrent(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "vols", volumeImages(t, e))
	allowAcme(&r)
	var (
		mu       sync.Mutex
		arrived  int
		together = make(chan struct{})
		apart    bool
	)
	e.Backend.OnCall = func(name string) {
		if name != "Image" {
			return
		}
		mu.Lock()
		arrived++
		if arrived == 2 {
			close(together)
		}
		mu.Unlock()
		select {
		case <-together:
		case <-time.After(10 * time.Second):
			mu.Lock()
			apart = true
			mu.Unlock()
		}
	}
	v, _, err := l.Prepare(e.Ctx, r)
	e.Backend.OnCall = nil
	if err != nil {
		t.Fatal(err)
	}
	defer l.Teardown(e.Ctx, v)
	if apart || arrived != 2 {
		t.Fatalf("the two volumes' image lookups ran one after the other (%d arrived)", arrived)
	}
}
