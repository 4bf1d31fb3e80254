package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/view"
)

// Recover rebuilds the view of container id in namespace ns from its
// bundle, in a process that did not set it up (the dead-shim `delete`
// action). It returns nil, nil when the bundle shows no view was ever
// started, without calling containerd.
//
// A valid state file is used as it is. A state file that is missing,
// unreadable, or that names another bundle, container or namespace is not
// trusted: the view is rebuilt from the deterministic names instead,
// keeping only the lease and view whose labels say they are this
// container's. When containerd cannot be asked, the returned view still
// holds what is known on this host (the mountpoint) together with the
// error, so that the caller can tear that down.
func (l *Lifecycle) Recover(ctx context.Context, ns, id, bundlePath string) (*View, error) {
	if !bundle.Started(bundlePath) {
		return nil, nil
	}
	logger := log.G(ctx).WithFields(log.Fields{"id": id, "bundle": bundlePath})
	st, err := bundle.ReadState(bundlePath)
	if err == nil {
		if err = validate(st, ns, id, bundlePath); err == nil {
			return &View{Bundle: bundlePath, State: st, origin: fromBundle}, nil
		}
		err = fmt.Errorf("state file %s: %w", bundle.StatePath(bundlePath), err)
	}
	if errors.Is(err, bundle.ErrNoState) {
		logger.Info("snapview: no state file; checking the deterministic names for a view left by a crash")
	} else {
		logger.WithError(err).Warn("snapview: state file not trusted; falling back to the deterministic names")
	}
	v, err := l.fromNames(ctx, ns, id, bundlePath)
	if err != nil {
		v.partial = true
	}
	return v, err
}

// TeardownBundle tears down the view of container id from what its bundle
// holds, in a process that did not set it up: the dead-shim `delete` action.
// It recovers the view (Recover) and tears down whatever is known, even
// when containerd could not be asked, since the mount at least is on this
// host; the errors of both are joined. A bundle that shows no view costs
// nothing and calls nothing.
func (l *Lifecycle) TeardownBundle(ctx context.Context, ns, id, bundlePath string) (retErr error) {
	defer recoverTo(ctx, &retErr, "teardown", id)
	v, err := l.Recover(ctx, ns, id, bundlePath)
	if v == nil {
		return err
	}
	log.G(ctx).WithFields(log.Fields{"id": id, "key": v.State.ViewKey, "lease": v.State.LeaseID, "mode": v.State.Mode}).
		Info("snapview: removing the view of a container whose shim is gone")
	return errors.Join(err, l.Teardown(ctx, v))
}

// validate checks that a state file describes container id of namespace ns
// in bundlePath, and nothing else: a state file is never trusted to name a
// mountpoint, lease or view of another container.
func validate(st *bundle.State, ns, id, bundlePath string) error {
	want := map[string][2]string{
		"namespace":    {st.Namespace, ns},
		"container id": {st.ContainerID, id},
		"mountpoint":   {st.Mountpoint, bundle.Mountpoint(bundlePath)},
		"lease":        {st.LeaseID, lease.ID(id)},
		"view key":     {st.ViewKey, view.Key(id)},
	}
	if st.Derived() {
		// No view snapshot; a lease only for the volumes' views.
		want["view key"] = [2]string{st.ViewKey, ""}
		if st.LeaseID == "" {
			want["lease"] = [2]string{"", ""}
		}
	}
	if st.Mode == bundle.ModeNone {
		// Only the rootfs activation; the state file reader checked that
		// it records no view.
		want["mountpoint"], want["lease"], want["view key"] = [2]string{st.Mountpoint, ""}, [2]string{st.LeaseID, ""}, [2]string{st.ViewKey, ""}
	}
	for what, pair := range want {
		if pair[0] != pair[1] {
			return fmt.Errorf("%s %q does not match %q", what, pair[0], pair[1])
		}
	}
	if st.Activation != "" && st.Activation != view.Key(id) {
		return fmt.Errorf("activation %q does not match %q", st.Activation, view.Key(id))
	}
	if st.RootfsActivation != "" && st.RootfsActivation != id {
		return fmt.Errorf("rootfs activation %q does not match %q", st.RootfsActivation, id)
	}
	seen := map[string]bool{}
	for _, v := range st.Volumes {
		switch {
		case seen[v.Name]:
			return fmt.Errorf("volume %q recorded twice", v.Name)
		case v.ViewKey != view.VolumeKey(id, v.Name):
			return fmt.Errorf("volume %q: view key %q does not match %q", v.Name, v.ViewKey, view.VolumeKey(id, v.Name))
		case v.Activation != "" && v.Activation != v.ViewKey:
			return fmt.Errorf("volume %q: activation %q does not match %q", v.Name, v.Activation, v.ViewKey)
		case v.Mountpoint != "" && v.Mountpoint != bundle.VolumeMountpoint(bundlePath, v.Name):
			return fmt.Errorf("volume %q: mountpoint %q does not match %q", v.Name, v.Mountpoint, bundle.VolumeMountpoint(bundlePath, v.Name))
		}
		seen[v.Name] = true
	}
	if st.Block != nil && st.Block.Loop != nil && st.Block.Loop.BackingFile != st.Block.Rootfs.Source {
		return fmt.Errorf("loop backing file %q is not the rootfs source %q", st.Block.Loop.BackingFile, st.Block.Rootfs.Source)
	}
	return nil
}

// fromNames rebuilds a view from the deterministic names: the mountpoint in
// the bundle, the lease snapview/<id> if its labels name the container, and
// the view it holds.
func (l *Lifecycle) fromNames(ctx context.Context, ns, id, bundlePath string) (*View, error) {
	// A rootfs activation is named after the container; one that is not
	// snapview's (labels) is left alone.
	v := &View{Bundle: bundlePath, State: &bundle.State{Namespace: ns, ContainerID: id, Mountpoint: bundle.Mountpoint(bundlePath), RootfsActivation: id}, origin: fromBundle}
	lm, err := l.backend.Leases()
	if err != nil {
		return v, err
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	ls, err := lease.Get(cctx, lm, id)
	if err != nil {
		if errdefs.IsNotFound(err) {
			// The view is created under the lease: no lease, no view.
			return v, nil
		}
		return v, err
	}
	return v, l.adoptLease(cctx, v, ls)
}

// FromLease rebuilds the view that lease ls holds for container id, whose
// bundle was bundlePath ("" when unknown: nothing on this host is then
// touched), for the orphan sweep. It fails if the lease is not snapview's
// lease of the container.
func (l *Lifecycle) FromLease(ctx context.Context, ns, id, bundlePath string, ls leases.Lease) (*View, error) {
	v := &View{Bundle: bundlePath, State: &bundle.State{Namespace: ns, ContainerID: id}, origin: fromLease}
	if bundlePath != "" {
		v.State.Mountpoint = bundle.Mountpoint(bundlePath)
	}
	if ls.ID != lease.ID(id) || !lease.NewOwner(id, time.Time{}).IsContainer(ls.Labels) {
		return nil, fmt.Errorf("lease %s is not snapview's lease of container %s", ls.ID, id)
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	return v, l.adoptLease(cctx, v, ls)
}

// adoptLease records lease ls in v if its labels name v's container, with
// its creation time as the owner, and the view it holds.
func (l *Lifecycle) adoptLease(ctx context.Context, v *View, ls leases.Lease) error {
	st := v.State
	o := lease.OwnerOf(ls.Labels)
	if o.Container != st.ContainerID {
		log.G(ctx).WithFields(log.Fields{"id": st.ContainerID, "lease": ls.ID, "labels": ls.Labels}).
			Warn("snapview: a lease of snapview's name is not this container's; left alone")
		return nil
	}
	created, err := time.Parse(time.RFC3339Nano, o.Created)
	if err != nil {
		return fmt.Errorf("lease %s: label %s=%q: %w", ls.ID, lease.LabelCreated, o.Created, err)
	}
	st.LeaseID, st.Created = ls.ID, created
	// The mount manager names an activation after the view; deactivating
	// one that does not exist is success.
	st.Activation = view.Key(st.ContainerID)
	lm, err := l.backend.Leases()
	if err != nil {
		return err
	}
	res, err := lm.ListResources(ctx, ls)
	if err != nil {
		return fmt.Errorf("list resources of lease %s: %w", ls.ID, err)
	}
	held := view.HeldBy(st.ContainerID, res)
	st.Snapshotter, st.ViewKey = held.Snapshotter, held.Key
	// A volume's view, its activation and its mountpoint are named after
	// it; deactivating or unmounting what is not there is success.
	for _, name := range slices.Sorted(maps.Keys(held.Volumes)) {
		vol := bundle.Volume{Name: name, ViewKey: held.Volumes[name], Activation: held.Volumes[name]}
		if v.Bundle != "" {
			vol.Mountpoint = bundle.VolumeMountpoint(v.Bundle, name)
		}
		st.Volumes = append(st.Volumes, vol)
	}
	return nil
}
