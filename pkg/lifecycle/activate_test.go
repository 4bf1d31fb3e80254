package lifecycle

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/view"
)

// activations is a mount manager holding activations by name.
type activations struct {
	byName      map[string]mount.ActivationInfo
	deactivated []string
}

func (a *activations) Activate(_ context.Context, name string, mounts []mount.Mount, opts ...mount.ActivateOpt) (mount.ActivationInfo, error) {
	if _, ok := a.byName[name]; ok {
		return mount.ActivationInfo{}, errdefs.ErrAlreadyExists
	}
	var o mount.ActivateOptions
	for _, opt := range opts {
		opt(&o)
	}
	ai := mount.ActivationInfo{Name: name, System: []mount.Mount{{Type: "bind", Source: "/activated"}}, Labels: o.Labels}
	a.byName[name] = ai
	return ai, nil
}

func (a *activations) Deactivate(_ context.Context, name string) error {
	if _, ok := a.byName[name]; !ok {
		return errdefs.ErrNotFound
	}
	delete(a.byName, name)
	a.deactivated = append(a.deactivated, name)
	return nil
}

func (a *activations) Info(_ context.Context, name string) (mount.ActivationInfo, error) {
	ai, ok := a.byName[name]
	if !ok {
		return mount.ActivationInfo{}, errdefs.ErrNotFound
	}
	return ai, nil
}

func (a *activations) Update(context.Context, mount.ActivationInfo, ...string) (mount.ActivationInfo, error) {
	return mount.ActivationInfo{}, errdefs.ErrNotImplemented
}

func (a *activations) List(context.Context, ...string) ([]mount.ActivationInfo, error) {
	return nil, nil
}

// mountsOnly is a Backend with a mount manager and nothing else.
type mountsOnly struct{ mm mount.Manager }

func (b mountsOnly) Container(context.Context, string) (string, string, error) {
	return "", "", errdefs.ErrNotImplemented
}
func (b mountsOnly) ContainerImage(context.Context, string) (string, error) {
	return "", errdefs.ErrNotImplemented
}
func (b mountsOnly) Snapshotter(string) (snapshots.Snapshotter, error) {
	return nil, errdefs.ErrNotImplemented
}
func (b mountsOnly) Leases() (leases.Manager, error) { return nil, errdefs.ErrNotImplemented }
func (b mountsOnly) Mounts() (mount.Manager, error)  { return b.mm, nil }
func (b mountsOnly) Image(context.Context, string) (images.Image, error) {
	return images.Image{}, errdefs.ErrNotImplemented
}
func (b mountsOnly) Content() (content.Provider, error) { return nil, errdefs.ErrNotImplemented }
func (b mountsOnly) SnapshotterRoot(context.Context, string) (string, error) {
	return "", errdefs.ErrNotImplemented
}

// TestActivateReplacesLeftover checks that a mount-manager activation of the
// container's name left by a crash is replaced when it is the container's
// own, and refused when it is not snapview's.
func TestActivateReplacesLeftover(t *testing.T) {
	ctx := context.Background()
	owner := lease.NewOwner("c1", time.Now())
	earlier := lease.NewOwner("c1", time.Now().Add(-time.Hour))
	mounts := []mount.Mount{{Type: "format/mkdir/overlay", Source: "overlay"}}

	a := &activations{byName: map[string]mount.ActivationInfo{view.Key("c1"): {Name: view.Key("c1"), Labels: view.Labels(earlier)}}}
	l := New(mountsOnly{mm: a})
	sys, err := l.activate(ctx, owner, viewActivation("c1", lease.ID("c1")), mounts)
	if err != nil {
		t.Fatalf("activate over a leftover of the same container: %v", err)
	}
	if len(sys) != 1 || len(a.deactivated) != 1 || !owner.Owns(a.byName[view.Key("c1")].Labels) {
		t.Fatalf("leftover not replaced: system %v, deactivated %v, now %v", sys, a.deactivated, a.byName)
	}

	foreign := &activations{byName: map[string]mount.ActivationInfo{view.Key("c1"): {Name: view.Key("c1"), Labels: map[string]string{"owner": "someone"}}}}
	if _, err := New(mountsOnly{mm: foreign}).activate(ctx, owner, viewActivation("c1", lease.ID("c1")), mounts); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("activate over a foreign activation: %v, want AlreadyExists", err)
	}
	if len(foreign.deactivated) != 0 {
		t.Fatal("a foreign activation was deactivated")
	}
}
