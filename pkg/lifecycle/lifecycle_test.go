package lifecycle_test

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/params"
	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/lifecycle/lifecycletest"
	"github.com/snapview/snapview/pkg/view"
)

// TestSetupTeardown sets a view up and checks what every path relies on:
// lease and view labelled with one owner, the view mounted read-only with
// the image's content, the state file naming them, config.json patched;
// then Teardown leaves nothing.
func TestSetupTeardown(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "c1", map[string]string{annotations.BootPrefix + "kernel": lifecycletest.KernelPath})

	p, err := l.Decide(e.Ctx, r)
	if err != nil || p.Skip != "" {
		t.Fatalf("decide: %+v %v", p, err)
	}
	v, err := l.Setup(e.Ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	st := v.State
	o := lease.NewOwner("c1", st.Created)
	ls, err := lease.Get(e.Ctx, e.Leases, "c1")
	if err != nil || !o.Owns(ls.Labels) {
		t.Fatalf("lease %+v %v, want owner %+v", ls, err, o)
	}
	info, err := e.Snapshotter.Stat(e.Ctx, view.Key("c1"))
	if err != nil || !o.Owns(info.Labels) || info.Parent != e.Parent {
		t.Fatalf("view %+v %v", info, err)
	}
	if got := lifecycletest.ReadFile(t, filepath.Join(st.Mountpoint, lifecycletest.KernelPath)); string(got) != lifecycletest.KernelContent {
		t.Fatalf("view content %q", got)
	}
	if err := os.WriteFile(filepath.Join(st.Mountpoint, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Fatalf("write into the view: %v, want EROFS", err)
	}
	saved, err := bundle.ReadState(r.Bundle)
	if err != nil || saved.Mountpoint != bundle.Mountpoint(r.Bundle) || !saved.Created.Equal(st.Created) || saved.Mode != "view" {
		t.Fatalf("state %+v %v", saved, err)
	}
	// What a runtime author reads: the params file, and the same document
	// in config.json, through package params.
	doc := lifecycletest.CheckParams(t, bundle.ParamsFile(r.Bundle))
	var spec specs.Spec
	if err := json.Unmarshal(lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json")), &spec); err != nil {
		t.Fatal(err)
	}
	fromSpec, err := params.FromSpec(&spec)
	if err != nil || !reflect.DeepEqual(fromSpec, doc) || doc.Artifacts["kernel"] != "/.snapview/boot/kernel" || doc.Rootfs.Kind != params.KindFS {
		t.Fatalf("params from config.json %+v %v, want the file's %+v", fromSpec, err, doc)
	}
	if spec.Annotations[annotations.ViewKey] != "snapview/c1" || spec.Annotations[annotations.BoundPrefix+"kernel"] != "/.snapview/boot/kernel" {
		t.Fatalf("annotations %v", spec.Annotations)
	}
	var targets []string
	for _, m := range spec.Mounts {
		targets = append(targets, m.Destination)
	}
	if strings.Join(targets, ",") != "/.snapview/boot/kernel,"+annotations.ParamsTarget {
		t.Fatalf("binds %v", targets)
	}
	if v.Rootfs != nil {
		t.Fatalf("view mode replaced the rootfs: %+v", v.Rootfs)
	}

	if err := l.Teardown(e.Ctx, v); err != nil {
		t.Fatal(err)
	}
	// config.json is not restored after a real run: the bundle goes.
	e.CheckNothingLeft(t, r, nil)
	if err := l.Teardown(e.Ctx, v); err != nil {
		t.Fatalf("second teardown: %v", err)
	}
}

// TestNothingAskedNothingBound checks that a container that asks nothing of
// snapview gets nothing in its rootfs: no bind, not even params.json.
func TestNothingAskedNothingBound(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "plain", nil)
	v := e.SetUp(t, l, r)
	defer l.Teardown(e.Ctx, v)
	var spec specs.Spec
	if err := json.Unmarshal(lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json")), &spec); err != nil {
		t.Fatal(err)
	}
	if len(spec.Mounts) != 0 || spec.Annotations[annotations.ViewKey] == "" {
		t.Fatalf("mounts %v, annotations %v", spec.Mounts, spec.Annotations)
	}
	if _, err := os.Stat(bundle.ParamsFile(r.Bundle)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("params file written: %v", err)
	}
}

// viewSteps are the setup steps of a view-mode container that asks for
// binds (bindAnn), in order: the points where the step tests fail or panic.
var viewSteps = []string{lifecycle.StepDir, lifecycle.StepLease, lifecycle.StepView, lifecycle.StepMount, lifecycle.StepArtifacts, lifecycle.StepState, lifecycle.StepParams, lifecycle.StepConfig}

// bindAnn asks for a boot artifact and the whole view, so that every
// view-mode setup step has something to do.
var bindAnn = map[string]string{annotations.BootPrefix + "kernel": lifecycletest.KernelPath, annotations.ViewTarget: "/image"}

// TestSetupFailsAtEachStep fails the setup right after each step took
// effect, and checks that the rollback leaves nothing and restores
// config.json.
func TestSetupFailsAtEachStep(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	for i, step := range viewSteps {
		t.Run(step, func(t *testing.T) {
			r := e.Container(t, "fail-"+step, bindAnn)
			orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
			l := lifecycle.New(e.Backend)
			seen, injected := failAfter(l, step)
			p, err := l.Decide(e.Ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := l.Setup(e.Ctx, p); !errors.Is(err, injected) {
				t.Fatalf("setup: %v, want the injected failure", err)
			}
			if len(*seen) != i+1 {
				t.Fatalf("steps run %v", *seen)
			}
			e.CheckNothingLeft(t, r, orig)
		})
	}
}

// TestSetupPanicsAtEachStep makes snapview's own code panic right after
// each setup step, through Prepare as the shim calls it: the shim must not
// die (it serves a whole pod), Create must fail with a snapview: error, and
// the rollback must still leave nothing. It also panics in teardown, whose
// records then stay for the next attempt.
func TestSetupPanicsAtEachStep(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	for _, step := range viewSteps {
		t.Run(step, func(t *testing.T) {
			r := e.Container(t, "panic-"+step, bindAnn)
			orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
			l := lifecycle.New(e.Backend)
			lifecycle.SetAfterStep(l, func(s string) error {
				if s == step {
					panic("injected panic after " + s)
				}
				return nil
			})
			v, skip, err := l.Prepare(e.Ctx, r)
			want := "snapview: internal error in the setup of panic-" + step + ": injected panic after " + step
			if err == nil || err.Error() != want || v != nil || skip != "" {
				t.Fatalf("prepare: %+v %q %v, want %q", v, skip, err, want)
			}
			e.CheckNothingLeft(t, r, orig)
		})
	}

	t.Run("teardown", func(t *testing.T) {
		r := e.Container(t, "panic-teardown", nil)
		l := lifecycle.New(e.Backend)
		v := e.SetUp(t, l, r)
		e.Backend.OnCall = func(call string) {
			if call == "Snapshotter" {
				panic("injected panic in " + call)
			}
		}
		err := l.Teardown(e.Ctx, v)
		e.Backend.OnCall = nil
		if err == nil || !strings.HasPrefix(err.Error(), "snapview: internal error in the teardown of panic-teardown") {
			t.Fatalf("teardown: %v", err)
		}
		if !bundle.Started(r.Bundle) {
			t.Fatal("the records went with a teardown that did not finish")
		}
		if err := l.Teardown(e.Ctx, v); err != nil {
			t.Fatalf("the next teardown: %v", err)
		}
		e.CheckNothingLeft(t, r, nil)
	})
}

// TestSetupCallsThatTimeOutLate checks that a lease or view whose call
// reported a failure after it took effect (a timeout on the client, say) is
// still removed by the rollback: each side effect is recorded before its
// call.
func TestSetupCallsThatTimeOutLate(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	for _, tc := range []struct {
		name string
		set  func(b *lifecycletest.Backend, on bool)
	}{
		{"lease", func(b *lifecycletest.Backend, on bool) { b.LateLease = on }},
		{"view", func(b *lifecycletest.Backend, on bool) { b.LateView = on }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.Container(t, "late-"+tc.name, nil)
			orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
			l := lifecycle.New(e.Backend)
			p, err := l.Decide(e.Ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			tc.set(e.Backend, true)
			defer tc.set(e.Backend, false)
			if _, err := l.Setup(e.Ctx, p); err == nil {
				t.Fatal("setup succeeded")
			}
			e.CheckNothingLeft(t, r, orig)
		})
	}
}

// TestSetupLeavesForeignObjects checks that a lease or view of snapview's
// name that is not this container's fails the setup and survives its
// rollback.
func TestSetupLeavesForeignObjects(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	r := e.Container(t, "c2", nil)
	if _, err := e.Leases.Create(e.Ctx, leases.WithID(lease.ID("c2")), leases.WithLabels(map[string]string{"owner": "someone else"})); err != nil {
		t.Fatal(err)
	}
	p, err := l.Decide(e.Ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Setup(e.Ctx, p); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("setup over a foreign lease: %v", err)
	}
	ls, err := lease.Get(e.Ctx, e.Leases, "c2")
	if err != nil || ls.Labels["owner"] != "someone else" {
		t.Fatalf("the foreign lease was touched: %+v %v", ls, err)
	}
}

// TestDecide covers the decisions that need no view.
func TestDecide(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		mutate  func(*lifecycle.Request)
		skip    string
		wantErr string
	}{
		{name: "sandbox", ann: map[string]string{"io.kubernetes.cri.container-type": "sandbox", annotations.BootPrefix + "k": "bad path"}, skip: "CRI sandbox"},
		{name: "mode off", ann: map[string]string{annotations.Mode: "off"}, skip: "mode off (annotation io.snapview.mode)"},
		{name: "mode off from the config", mutate: func(r *lifecycle.Request) { r.Config.View.Mode = "off" }, skip: "mode off (view.mode in built-in defaults)"},
		{name: "binds with mode off", ann: map[string]string{annotations.Mode: "off", annotations.BootPrefix + "k": lifecycletest.KernelPath}, wantErr: "but the mode is off"},
		{name: "no rootfs", mutate: func(r *lifecycle.Request) { r.Rootfs = nil }, skip: "no rootfs mounts"},
		{name: "binds without rootfs", ann: map[string]string{annotations.BootPrefix + "k": lifecycletest.KernelPath}, mutate: func(r *lifecycle.Request) { r.Rootfs = nil }, wantErr: "asks for binds from the image"},
		{name: "block mode from the config names the config", mutate: func(r *lifecycle.Request) { r.Config.View.Mode = "block" }, wantErr: "block mode (view.mode in built-in defaults) needs a block-backed rootfs"},
		{name: "block mode from an annotation names it", ann: map[string]string{annotations.Mode: "block"}, wantErr: "block mode (annotation io.snapview.mode) needs a block-backed rootfs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.Container(t, "decide-"+strings.ReplaceAll(tc.name, " ", "-"), tc.ann)
			if tc.mutate != nil {
				tc.mutate(&r)
			}
			before := e.Backend.Calls()
			p, err := l.Decide(e.Ctx, r)
			if tc.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), "snapview: ") || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %+v %v, want an error saying %q", p, err, tc.wantErr)
				}
				return
			}
			if err != nil || !strings.Contains(p.Skip, tc.skip) {
				t.Fatalf("got %+v %v, want a skip saying %q", p, err, tc.skip)
			}
			// Without rootfs mounts, the container's record decides (a
			// client that mounted the rootfs itself, as Docker does).
			if e.Backend.Calls() != before && tc.name != "binds without rootfs" && tc.name != "no rootfs" {
				t.Errorf("a local decision called containerd %d times", e.Backend.Calls()-before)
			}
		})
	}
}

// TestReadOnlyRootfs checks a container whose rootfs is itself a view of
// the image: without binds it gets its view and nothing in its rootfs; with
// a bind whose target the image lacks it gets a clear error, since runc
// could not create the target; a target the image has is fine.
func TestReadOnlyRootfs(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)
	ro := func(r *lifecycle.Request) {
		r.Rootfs[0].Options = []string{"ro", "rbind"}
	}
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		wantErr string
	}{
		{name: "nothing asked"},
		{name: "missing target", ann: map[string]string{annotations.BootPrefix + "kernel": lifecycletest.KernelPath}, wantErr: "rootfs is read-only"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.Container(t, "ro-"+strings.ReplaceAll(tc.name, " ", "-"), tc.ann)
			ro(&r)
			orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
			p, err := l.Decide(e.Ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			v, err := l.Setup(e.Ctx, p)
			if tc.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), "snapview: ") || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "/.snapview/boot/kernel") {
					t.Fatalf("setup: %v, want an error saying %q and naming the target", err, tc.wantErr)
				}
				e.CheckNothingLeft(t, r, orig)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := l.Teardown(e.Ctx, v); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestRecover covers the dead-shim path's view of a bundle.
func TestRecover(t *testing.T) {
	e := lifecycletest.NewEnv(t)

	t.Run("a bundle without a view costs no call", func(t *testing.T) {
		r := e.Container(t, "never", nil)
		before := e.Backend.Calls()
		v, err := lifecycle.New(e.Backend).Recover(e.Ctx, lifecycletest.NS, "never", r.Bundle)
		if v != nil || err != nil || e.Backend.Calls() != before {
			t.Fatalf("got %+v %v after %d calls", v, err, e.Backend.Calls()-before)
		}
	})

	setUp := func(t *testing.T, id string) (*lifecycle.Lifecycle, lifecycle.Request, *lifecycle.View) {
		l := lifecycle.New(e.Backend)
		r := e.Container(t, id, nil)
		v := e.SetUp(t, l, r)
		return l, r, v
	}

	t.Run("from the state file", func(t *testing.T) {
		l, r, v := setUp(t, "rec1")
		got, err := l.Recover(e.Ctx, lifecycletest.NS, "rec1", r.Bundle)
		if err != nil || got.State.ViewKey != v.State.ViewKey || !got.State.Created.Equal(v.State.Created) || lifecycle.Owned(got) {
			t.Fatalf("recovered %+v %v", got, err)
		}
		if err := l.Teardown(e.Ctx, got); err != nil {
			t.Fatal(err)
		}
		e.CheckNothingLeft(t, r, nil)
	})

	t.Run("from the names when the state file is missing", func(t *testing.T) {
		l, r, _ := setUp(t, "rec2")
		if err := os.Remove(bundle.StatePath(r.Bundle)); err != nil {
			t.Fatal(err)
		}
		got, err := l.Recover(e.Ctx, lifecycletest.NS, "rec2", r.Bundle)
		if err != nil || got.State.LeaseID != lease.ID("rec2") || got.State.ViewKey != view.Key("rec2") || got.State.Snapshotter != "native" {
			t.Fatalf("recovered %+v %v", got.State, err)
		}
		if err := l.Teardown(e.Ctx, got); err != nil {
			t.Fatal(err)
		}
		e.CheckNothingLeft(t, r, nil)
	})

	t.Run("a state file naming another container or a host path is not trusted", func(t *testing.T) {
		l, other, otherView := setUp(t, "victim")
		defer l.Teardown(e.Ctx, otherView)
		_, r, _ := setUp(t, "rec3")
		hostDir := t.TempDir()
		if err := unix.Mount("tmpfs", hostDir, "tmpfs", 0, ""); err != nil {
			t.Fatal(err)
		}
		defer unix.Unmount(hostDir, unix.MNT_DETACH)
		st, err := bundle.ReadState(r.Bundle)
		if err != nil {
			t.Fatal(err)
		}
		// What a corrupted or planted state file could say.
		st.ContainerID, st.LeaseID, st.ViewKey, st.Mountpoint = "victim", lease.ID("victim"), view.Key("victim"), bundle.Mountpoint(other.Bundle)
		if err := bundle.WriteState(r.Bundle, st); err != nil {
			t.Fatal(err)
		}
		got, err := l.Recover(e.Ctx, lifecycletest.NS, "rec3", r.Bundle)
		if err != nil || got.State.ContainerID != "rec3" || got.State.Mountpoint != bundle.Mountpoint(r.Bundle) {
			t.Fatalf("recovered %+v %v", got.State, err)
		}
		if err := l.Teardown(e.Ctx, got); err != nil {
			t.Fatal(err)
		}
		e.CheckNothingLeft(t, r, nil)
		if _, err := lease.Get(e.Ctx, e.Leases, "victim"); err != nil {
			t.Errorf("the other container's lease was removed: %v", err)
		}
		if m, err := mountinfo.Mounted(otherView.State.Mountpoint); err != nil || !m {
			t.Errorf("the other container's view was unmounted: %v", err)
		}
		if m, err := mountinfo.Mounted(hostDir); err != nil || !m {
			t.Errorf("a host mount was unmounted: %v", err)
		}
	})

	t.Run("containerd down: what is on this host still goes", func(t *testing.T) {
		l, r, _ := setUp(t, "rec4")
		if err := os.WriteFile(bundle.StatePath(r.Bundle), []byte("{"), 0o600); err != nil {
			t.Fatal(err)
		}
		e.Backend.Down = true
		err := l.TeardownBundle(e.Ctx, lifecycletest.NS, "rec4", r.Bundle)
		e.Backend.Down = false
		if !errors.Is(err, lifecycletest.ErrDown) {
			t.Fatalf("teardown with containerd down: %v, want its error", err)
		}
		if m, _ := mountinfo.Mounted(bundle.Mountpoint(r.Bundle)); m {
			t.Fatal("the view is still mounted")
		}
		// The lease and view wait for containerd: the records stay, so
		// that the next attempt finds them by name.
		if !bundle.Started(r.Bundle) {
			t.Fatal("the records of a partial teardown were removed")
		}
		if err := l.TeardownBundle(e.Ctx, lifecycletest.NS, "rec4", r.Bundle); err != nil {
			t.Fatal(err)
		}
		e.CheckNothingLeft(t, r, nil)
	})
}

// failAfter makes l's setup fail right after step took effect, with the
// returned error; seen collects the steps that ran.
func failAfter(l *lifecycle.Lifecycle, step string) (seen *[]string, injected error) {
	injected = errors.New("injected failure after " + step)
	seen = new([]string)
	lifecycle.SetAfterStep(l, func(s string) error {
		*seen = append(*seen, s)
		if s == step {
			return injected
		}
		return nil
	})
	return seen, injected
}

// TestHostileBundle plants what an attacker with write access to the
// bundle could: snapview's directory as a symlink out of the bundle, a
// mount already on the view's mountpoint, and state files that are
// symlinks, truncated or from a future version. Each ends in a snapview:
// error or a safe cleanup, and nothing outside the bundle (or not made by
// snapview) is removed or unmounted.
func TestHostileBundle(t *testing.T) {
	e := lifecycletest.NewEnv(t)

	t.Run("snapview directory is a symlink out of the bundle", func(t *testing.T) {
		r := e.Container(t, "hostile-link", nil)
		outside := t.TempDir()
		for _, f := range []string{"params.json", "upper/keep", "view/keep"} {
			if err := os.MkdirAll(filepath.Join(outside, filepath.Dir(f)), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(outside, f), []byte("outside"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Symlink(outside, bundle.Dir(r.Bundle)); err != nil {
			t.Fatal(err)
		}
		l := lifecycle.New(e.Backend)
		p, err := l.Decide(e.Ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := l.Setup(e.Ctx, p); err == nil || !strings.Contains(err.Error(), "not a directory") {
			t.Fatalf("setup: %v, want a refusal of the symlink", err)
		}
		if err := l.TeardownBundle(e.Ctx, lifecycletest.NS, "hostile-link", r.Bundle); err == nil {
			t.Error("the dead-shim teardown went through a symlinked snapview directory silently")
		}
		for _, f := range []string{"params.json", "upper/keep", "view/keep"} {
			if _, err := os.Stat(filepath.Join(outside, f)); err != nil {
				t.Errorf("%s outside the bundle was removed: %v", f, err)
			}
		}
	})

	// A mount snapview did not make at the view's mountpoint stays, whether
	// the setup fails at the mount step's check or at an earlier step.
	for _, failAt := range []string{"", lifecycle.StepLease, lifecycle.StepView} {
		t.Run("the view's mountpoint is already mounted/"+cmp.Or(failAt, "mount"), func(t *testing.T) {
			id := "hostile-mount-" + cmp.Or(failAt, "mount")
			r := e.Container(t, id, nil)
			mp := bundle.Mountpoint(r.Bundle)
			if err := os.MkdirAll(mp, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := unix.Mount("tmpfs", mp, "tmpfs", 0, ""); err != nil {
				t.Fatal(err)
			}
			defer unix.Unmount(mp, unix.MNT_DETACH)
			l := lifecycle.New(e.Backend)
			want := "already a mount point"
			if failAt != "" {
				_, injected := failAfter(l, failAt)
				want = injected.Error()
			}
			p, err := l.Decide(e.Ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := l.Setup(e.Ctx, p); err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("setup: %v, want %q", err, want)
			}
			if m, _ := mountinfo.Mounted(mp); !m {
				t.Error("the rollback unmounted a mount snapview did not make")
			}
			if _, err := lease.Get(e.Ctx, e.Leases, id); !errdefs.IsNotFound(err) {
				t.Errorf("lease left by the rollback: %v", err)
			}
		})
	}

	for _, tc := range []struct {
		name  string
		plant func(t *testing.T, path, other string)
	}{
		{"state file is a symlink to another containers", func(t *testing.T, path, other string) {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(other, path); err != nil {
				t.Fatal(err)
			}
		}},
		{"state file is truncated", func(t *testing.T, path, _ string) {
			if err := os.WriteFile(path, []byte(`{"version":1,"namespace":"te`), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"state file is from a future version", func(t *testing.T, path, _ string) {
			if err := os.WriteFile(path, []byte(`{"version":2,"namespace":"test","container_id":"x"}`), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := lifecycle.New(e.Backend)
			other := e.Container(t, "other-"+strings.ReplaceAll(tc.name, " ", "-"), nil)
			otherView := e.SetUp(t, l, other)
			defer l.Teardown(e.Ctx, otherView)
			id := "planted-" + strings.ReplaceAll(tc.name, " ", "-")
			r := e.Container(t, id, nil)
			e.SetUp(t, l, r)
			tc.plant(t, bundle.StatePath(r.Bundle), bundle.StatePath(other.Bundle))
			if err := l.TeardownBundle(e.Ctx, lifecycletest.NS, id, r.Bundle); err != nil {
				t.Fatal(err)
			}
			e.CheckNothingLeft(t, r, nil)
			if _, err := lease.Get(e.Ctx, e.Leases, other.ID); err != nil {
				t.Errorf("the other container's lease was removed: %v", err)
			}
			if m, _ := mountinfo.Mounted(otherView.State.Mountpoint); !m {
				t.Error("the other container's view was unmounted")
			}
		})
	}
}

// TestPrepare covers Prepare, which creates the lease while the container
// is looked up: the same view as Decide then Setup; and when the lookup
// fails, or finds no image snapshot after all, the lease made meanwhile is
// removed again.
func TestPrepare(t *testing.T) {
	e := lifecycletest.NewEnv(t)
	l := lifecycle.New(e.Backend)

	t.Run("view", func(t *testing.T) {
		r := e.Container(t, "prep", map[string]string{annotations.BootPrefix + "kernel": lifecycletest.KernelPath})
		v, skip, err := l.Prepare(e.Ctx, r)
		if err != nil || skip != "" {
			t.Fatalf("prepare: %q %v", skip, err)
		}
		if v.State.Parent != e.Parent || v.State.Snapshotter != "native" || v.State.ViewKey != view.Key("prep") {
			t.Fatalf("state %+v", v.State)
		}
		if got := lifecycletest.ReadFile(t, filepath.Join(v.State.Mountpoint, lifecycletest.KernelPath)); string(got) != lifecycletest.KernelContent {
			t.Fatalf("view content %q", got)
		}
		if err := l.Teardown(e.Ctx, v); err != nil {
			t.Fatal(err)
		}
		e.CheckNothingLeft(t, r, nil)
	})

	t.Run("the lookup fails", func(t *testing.T) {
		r := e.Container(t, "prep-fails", nil)
		orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
		e.Backend.ContainerErr = errors.New("lookup failed")
		_, _, err := l.Prepare(e.Ctx, r)
		e.Backend.ContainerErr = nil
		if err == nil || !strings.Contains(err.Error(), "snapview: look up container prep-fails: lookup failed") {
			t.Fatalf("prepare: %v", err)
		}
		e.CheckNothingLeft(t, r, orig)
	})

	// Input refused before anything is looked up: the error comes back
	// as it is (the shim once dereferenced the plan that was not made).
	for i, tc := range []struct{ name, key, value, want string }{
		{"unknown mode", annotations.Mode, "fast", "io.snapview.mode"},
		{"relative boot path", annotations.BootPrefix + "kernel", "boot/vmlinux", "io.snapview.boot.kernel"},
		{"boot with mode off", annotations.Mode, "off", "mode is off"},
		{"monitor rootfs in view mode", annotations.MonitorRootfs, "view", "io.snapview.monitor-rootfs=\"view\" applies only in block mode, but the mode is view (view.mode in "},
	} {
		t.Run("refused: "+tc.name, func(t *testing.T) {
			ann := map[string]string{tc.key: tc.value}
			if tc.value == "off" {
				ann[annotations.BootPrefix+"kernel"] = lifecycletest.KernelPath
			}
			r := e.Container(t, fmt.Sprintf("prep-refused-%d", i), ann)
			orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
			v, skip, err := l.Prepare(e.Ctx, r)
			if err == nil || v != nil || skip != "" || !strings.HasPrefix(err.Error(), "snapview: ") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("prepare: %+v %q %v, want a snapview: error naming %q", v, skip, err, tc.want)
			}
			e.CheckNothingLeft(t, r, orig)
		})
	}

	// Docker with containerd's image store: no rootfs mounts, no snapshot
	// key, and the image the container record names, unpacked in the
	// [view] image_snapshotter: the view is of that image.
	t.Run("a rootfs its client mounted", func(t *testing.T) {
		const ref = "docker.io/acme/client-mounted:1"
		chain := e.Image(t, lifecycletest.NS, ref, map[string]string{"/boot/vmlinuz": "the image's own kernel"}, true)
		for _, tc := range []struct {
			name, image, sn, want, skip string
		}{
			{"viewed", ref, "native", "", ""},
			{"image missing", "docker.io/acme/absent:1", "native", "no such image in namespace", ""},
			{"another snapshotter", ref, "overlayfs", "snapshotter overlayfs ([view] image_snapshotter", ""},
			// Asking nothing of the view, it runs without one.
			{"image missing without binds", "docker.io/acme/absent:1", "native", "", "is not viewable in snapshotter native"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				id := "prep-client-" + strings.ReplaceAll(tc.name, " ", "-")
				ann := map[string]string{annotations.BootPrefix + "kernel": "/boot/vmlinuz"}
				if tc.skip != "" {
					ann = nil
				}
				r := e.ContainerWithImage(t, id, tc.image, ann)
				r.Rootfs = nil
				r.Config.View.ImageSnapshotter = tc.sn
				orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
				v, skip, err := l.Prepare(e.Ctx, r)
				if tc.want != "" {
					if err == nil || !strings.HasPrefix(err.Error(), "snapview: the image ") || !strings.Contains(err.Error(), tc.want) {
						t.Fatalf("prepare: %+v %q %v, want an error saying %q", v, skip, err, tc.want)
					}
					e.CheckNothingLeft(t, r, orig)
					return
				}
				if tc.skip != "" {
					if err != nil || v != nil || !strings.Contains(skip, tc.skip) {
						t.Fatalf("prepare: %+v %q %v, want a skip saying %q", v, skip, err, tc.skip)
					}
					e.CheckNothingLeft(t, r, orig)
					return
				}
				if err != nil || skip != "" {
					t.Fatalf("prepare: %q %v", skip, err)
				}
				if v.State.Parent != chain || v.State.Snapshotter != "native" || v.State.Rootfs.FSType != "bind" || v.State.Rootfs.Source != filepath.Join(r.Bundle, "rootfs") {
					t.Fatalf("state %+v", v.State)
				}
				if got := lifecycletest.ReadFile(t, filepath.Join(v.State.Mountpoint, "boot/vmlinuz")); string(got) != "the image's own kernel" {
					t.Fatalf("view content %q", got)
				}
				if err := l.Teardown(e.Ctx, v); err != nil {
					t.Fatal(err)
				}
				e.CheckNothingLeft(t, r, nil)
			})
		}
	})

	t.Run("no image snapshot after all", func(t *testing.T) {
		r := e.ContainerWithoutSnapshot(t, "prep-nosnap")
		orig := lifecycletest.ReadFile(t, filepath.Join(r.Bundle, "config.json"))
		v, skip, err := l.Prepare(e.Ctx, r)
		if err != nil || v != nil || !strings.Contains(skip, "no image snapshot") {
			t.Fatalf("prepare: %+v %q %v", v, skip, err)
		}
		e.CheckNothingLeft(t, r, orig)
	})
}
