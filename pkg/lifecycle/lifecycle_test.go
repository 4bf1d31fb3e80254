package lifecycle

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/view"
)

// TestSetupTeardown sets a view up and checks what every path relies on:
// lease and view labelled with one owner, the view mounted read-only with
// the image's content, the state file naming them, config.json patched;
// then Teardown leaves nothing.
func TestSetupTeardown(t *testing.T) {
	e := newEnv(t)
	l := New(e.b)
	r := e.container(t, "c1", map[string]string{annotations.BootPrefix + "kernel": kernelPath})

	p, err := l.Decide(e.ctx, r)
	if err != nil || p.Skip != "" {
		t.Fatalf("decide: %+v %v", p, err)
	}
	v, err := l.Setup(e.ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	st := v.State
	o := lease.NewOwner("c1", st.Created)
	ls, err := lease.Get(e.ctx, e.lm, "c1")
	if err != nil || !o.Owns(ls.Labels) {
		t.Fatalf("lease %+v %v, want owner %+v", ls, err, o)
	}
	info, err := e.sn.Stat(e.ctx, view.Key("c1"))
	if err != nil || !o.Owns(info.Labels) || info.Parent != e.parent {
		t.Fatalf("view %+v %v", info, err)
	}
	if got := readFile(t, filepath.Join(st.Mountpoint, kernelPath)); string(got) != kernelContent {
		t.Fatalf("view content %q", got)
	}
	if err := os.WriteFile(filepath.Join(st.Mountpoint, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Fatalf("write into the view: %v, want EROFS", err)
	}
	saved, err := bundle.ReadState(r.Bundle)
	if err != nil || saved.Mountpoint != bundle.Mountpoint(r.Bundle) || !saved.Created.Equal(st.Created) || saved.Mode != "view" {
		t.Fatalf("state %+v %v", saved, err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(readFile(t, filepath.Join(r.Bundle, "config.json")), &spec); err != nil {
		t.Fatal(err)
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

	if err := l.Teardown(e.ctx, v); err != nil {
		t.Fatal(err)
	}
	// config.json is not restored after a real run: the bundle goes.
	e.checkNothingLeft(t, r, nil)
	if err := l.Teardown(e.ctx, v); err != nil {
		t.Fatalf("second teardown: %v", err)
	}
}

// TestNothingAskedNothingBound checks that a container that asks nothing of
// snapview gets nothing in its rootfs: no bind, not even params.json.
func TestNothingAskedNothingBound(t *testing.T) {
	e := newEnv(t)
	l := New(e.b)
	r := e.container(t, "plain", nil)
	p, err := l.Decide(e.ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	v, err := l.Setup(e.ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Teardown(e.ctx, v)
	var spec specs.Spec
	if err := json.Unmarshal(readFile(t, filepath.Join(r.Bundle, "config.json")), &spec); err != nil {
		t.Fatal(err)
	}
	if len(spec.Mounts) != 0 || spec.Annotations[annotations.ViewKey] == "" {
		t.Fatalf("mounts %v, annotations %v", spec.Mounts, spec.Annotations)
	}
	if _, err := os.Stat(bundle.ParamsFile(r.Bundle)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("params file written: %v", err)
	}
}

// TestSetupFailsAtEachStep fails the setup right after each step took
// effect, and checks that the rollback leaves nothing and restores
// config.json.
func TestSetupFailsAtEachStep(t *testing.T) {
	e := newEnv(t)
	ann := map[string]string{annotations.BootPrefix + "kernel": kernelPath, annotations.ViewTarget: "/image"}
	for i, step := range []string{StepDir, StepLease, StepView, StepMount, StepArtifacts, StepState, StepParams, StepConfig} {
		t.Run(step, func(t *testing.T) {
			r := e.container(t, "fail-"+step, ann)
			orig := readFile(t, filepath.Join(r.Bundle, "config.json"))
			l := New(e.b)
			injected := errors.New("injected failure after " + step)
			var seen []string
			l.afterStep = func(s string) error {
				seen = append(seen, s)
				if s == step {
					return injected
				}
				return nil
			}
			p, err := l.Decide(e.ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := l.Setup(e.ctx, p); !errors.Is(err, injected) {
				t.Fatalf("setup: %v, want the injected failure", err)
			}
			if len(seen) != i+1 {
				t.Fatalf("steps run %v", seen)
			}
			e.checkNothingLeft(t, r, orig)
		})
	}
}

// TestSetupCallsThatTimeOutLate checks that a lease or view whose call
// reported a failure after it took effect (a timeout on the client, say) is
// still removed by the rollback: each side effect is recorded before its
// call.
func TestSetupCallsThatTimeOutLate(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		name string
		set  func(b *dbBackend, on bool)
	}{
		{"lease", func(b *dbBackend, on bool) { b.lateLease = on }},
		{"view", func(b *dbBackend, on bool) { b.lateView = on }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.container(t, "late-"+tc.name, nil)
			orig := readFile(t, filepath.Join(r.Bundle, "config.json"))
			l := New(e.b)
			p, err := l.Decide(e.ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			tc.set(e.b, true)
			defer tc.set(e.b, false)
			if _, err := l.Setup(e.ctx, p); err == nil {
				t.Fatal("setup succeeded")
			}
			e.checkNothingLeft(t, r, orig)
		})
	}
}

// TestSetupLeavesForeignObjects checks that a lease or view of snapview's
// name that is not this container's fails the setup and survives its
// rollback.
func TestSetupLeavesForeignObjects(t *testing.T) {
	e := newEnv(t)
	l := New(e.b)
	r := e.container(t, "c2", nil)
	if _, err := e.lm.Create(e.ctx, leases.WithID(lease.ID("c2")), leases.WithLabels(map[string]string{"owner": "someone else"})); err != nil {
		t.Fatal(err)
	}
	p, err := l.Decide(e.ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Setup(e.ctx, p); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("setup over a foreign lease: %v", err)
	}
	ls, err := lease.Get(e.ctx, e.lm, "c2")
	if err != nil || ls.Labels["owner"] != "someone else" {
		t.Fatalf("the foreign lease was touched: %+v %v", ls, err)
	}
}

// TestDecide covers the decisions that need no view.
func TestDecide(t *testing.T) {
	e := newEnv(t)
	l := New(e.b)
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		mutate  func(*Request)
		skip    string
		wantErr string
	}{
		{name: "sandbox", ann: map[string]string{"io.kubernetes.cri.container-type": "sandbox", annotations.BootPrefix + "k": "bad path"}, skip: "CRI sandbox"},
		{name: "mode off", ann: map[string]string{annotations.Mode: "off"}, skip: "mode off (annotation io.snapview.mode)"},
		{name: "mode off from the config", mutate: func(r *Request) { r.Config.View.Mode = "off" }, skip: "mode off (view.mode in built-in defaults)"},
		{name: "binds with mode off", ann: map[string]string{annotations.Mode: "off", annotations.BootPrefix + "k": kernelPath}, wantErr: "but the mode is off"},
		{name: "no rootfs", mutate: func(r *Request) { r.Rootfs = nil }, skip: "no rootfs mounts"},
		{name: "binds without rootfs", ann: map[string]string{annotations.BootPrefix + "k": kernelPath}, mutate: func(r *Request) { r.Rootfs = nil }, wantErr: "asks for binds from the image"},
		{name: "block mode from the config names the config", mutate: func(r *Request) { r.Config.View.Mode = "block" }, wantErr: "block mode (view.mode in built-in defaults) needs a block-backed rootfs"},
		{name: "block mode from an annotation names it", ann: map[string]string{annotations.Mode: "block"}, wantErr: "block mode (annotation io.snapview.mode) needs a block-backed rootfs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.container(t, "decide-"+strings.ReplaceAll(tc.name, " ", "-"), tc.ann)
			if tc.mutate != nil {
				tc.mutate(&r)
			}
			before := e.b.calls
			p, err := l.Decide(e.ctx, r)
			if tc.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), "snapview: ") || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %+v %v, want an error saying %q", p, err, tc.wantErr)
				}
				return
			}
			if err != nil || !strings.Contains(p.Skip, tc.skip) {
				t.Fatalf("got %+v %v, want a skip saying %q", p, err, tc.skip)
			}
			if e.b.calls != before && tc.name != "binds without rootfs" {
				t.Errorf("a local decision called containerd %d times", e.b.calls-before)
			}
		})
	}
}

// TestReadOnlyRootfs checks a container whose rootfs is itself a view of
// the image: without binds it gets its view and nothing in its rootfs; with
// a bind whose target the image lacks it gets a clear error, since runc
// could not create the target; a target the image has is fine.
func TestReadOnlyRootfs(t *testing.T) {
	e := newEnv(t)
	l := New(e.b)
	ro := func(r *Request) {
		r.Rootfs[0].Options = []string{"ro", "rbind"}
	}
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		wantErr string
	}{
		{name: "nothing asked"},
		{name: "missing target", ann: map[string]string{annotations.BootPrefix + "kernel": kernelPath}, wantErr: "rootfs is read-only"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.container(t, "ro-"+strings.ReplaceAll(tc.name, " ", "-"), tc.ann)
			ro(&r)
			orig := readFile(t, filepath.Join(r.Bundle, "config.json"))
			p, err := l.Decide(e.ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			v, err := l.Setup(e.ctx, p)
			if tc.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), "snapview: ") || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "/.snapview/boot/kernel") {
					t.Fatalf("setup: %v, want an error saying %q and naming the target", err, tc.wantErr)
				}
				e.checkNothingLeft(t, r, orig)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := l.Teardown(e.ctx, v); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestRecover covers the dead-shim path's view of a bundle.
func TestRecover(t *testing.T) {
	e := newEnv(t)

	t.Run("a bundle without a view costs no call", func(t *testing.T) {
		r := e.container(t, "never", nil)
		before := e.b.calls
		v, err := New(e.b).Recover(e.ctx, testNS, "never", r.Bundle)
		if v != nil || err != nil || e.b.calls != before {
			t.Fatalf("got %+v %v after %d calls", v, err, e.b.calls-before)
		}
	})

	setUp := func(t *testing.T, id string) (*Lifecycle, Request, *View) {
		l := New(e.b)
		r := e.container(t, id, nil)
		p, err := l.Decide(e.ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		v, err := l.Setup(e.ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		return l, r, v
	}

	t.Run("from the state file", func(t *testing.T) {
		l, r, v := setUp(t, "rec1")
		got, err := l.Recover(e.ctx, testNS, "rec1", r.Bundle)
		if err != nil || got.State.ViewKey != v.State.ViewKey || !got.State.Created.Equal(v.State.Created) || got.owned {
			t.Fatalf("recovered %+v %v", got, err)
		}
		if err := l.Teardown(e.ctx, got); err != nil {
			t.Fatal(err)
		}
		e.checkNothingLeft(t, r, nil)
	})

	t.Run("from the names when the state file is missing", func(t *testing.T) {
		l, r, _ := setUp(t, "rec2")
		if err := os.Remove(bundle.StatePath(r.Bundle)); err != nil {
			t.Fatal(err)
		}
		got, err := l.Recover(e.ctx, testNS, "rec2", r.Bundle)
		if err != nil || got.State.LeaseID != lease.ID("rec2") || got.State.ViewKey != view.Key("rec2") || got.State.Snapshotter != "native" {
			t.Fatalf("recovered %+v %v", got.State, err)
		}
		if err := l.Teardown(e.ctx, got); err != nil {
			t.Fatal(err)
		}
		e.checkNothingLeft(t, r, nil)
	})

	t.Run("a state file naming another container or a host path is not trusted", func(t *testing.T) {
		l, other, otherView := setUp(t, "victim")
		defer l.Teardown(e.ctx, otherView)
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
		got, err := l.Recover(e.ctx, testNS, "rec3", r.Bundle)
		if err != nil || got.State.ContainerID != "rec3" || got.State.Mountpoint != bundle.Mountpoint(r.Bundle) {
			t.Fatalf("recovered %+v %v", got.State, err)
		}
		if err := l.Teardown(e.ctx, got); err != nil {
			t.Fatal(err)
		}
		e.checkNothingLeft(t, r, nil)
		if _, err := lease.Get(e.ctx, e.lm, "victim"); err != nil {
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
		e.b.down = true
		got, err := l.Recover(e.ctx, testNS, "rec4", r.Bundle)
		if !errors.Is(err, errDown) || got == nil || got.State.Mountpoint != bundle.Mountpoint(r.Bundle) {
			t.Fatalf("recovered %+v %v", got, err)
		}
		terr := l.Teardown(e.ctx, got)
		e.b.down = false
		if terr != nil {
			t.Fatalf("teardown of what is known: %v", terr)
		}
		if m, _ := mountinfo.Mounted(bundle.Mountpoint(r.Bundle)); m {
			t.Fatal("the view is still mounted")
		}
		// The lease and view wait for containerd: the state file was
		// corrupt, so only a later recovery by name (or the sweep) finds them.
		got, err = l.Recover(e.ctx, testNS, "rec4", r.Bundle)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Teardown(e.ctx, got); err != nil {
			t.Fatal(err)
		}
		e.checkNothingLeft(t, r, nil)
	})
}
