package lifecycle

import (
	"context"
	"fmt"
	"strings"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/rootfs"
	"github.com/snapview/snapview/pkg/view"
)

// activation is a containerd mount-manager activation snapview makes: of
// its view's mounts (named after the view, under its lease), or of the
// container's own rootfs mounts (named after the container, as containerd
// names the activation it makes for a task).
type activation struct {
	name    string
	what    string // for logs and errors
	leaseID string // "" for none
}

func viewActivation(id, leaseID string) activation {
	return activation{name: view.Key(id), what: "view mounts", leaseID: leaseID}
}

func rootfsActivation(id string) activation {
	return activation{name: id, what: "rootfs mounts"}
}

// activate hands mounts that mount.All cannot perform to containerd's
// mount manager as a, tied to o's container (and labelled as o's), and
// returns the system mounts left to perform. A leftover activation of the
// same container, from a crash, is replaced; one that is not snapview's is
// an error. An error wraps errdefs.ErrNotImplemented when nothing in
// mounts needed the manager, or there is none.
func (l *Lifecycle) activate(ctx context.Context, o lease.Owner, a activation, mounts []mount.Mount) ([]mount.Mount, error) {
	mm, err := l.backend.Mounts()
	if err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	actx := ctx
	if a.leaseID != "" {
		actx = leases.WithLease(ctx, a.leaseID)
	}
	activate := func() (mount.ActivationInfo, error) {
		return mm.Activate(actx, a.name, mounts, mount.WithLabels(view.Labels(o)))
	}
	ai, err := activate()
	if errdefs.IsAlreadyExists(err) {
		old, ierr := mm.Info(ctx, a.name)
		if ierr != nil {
			return nil, fmt.Errorf("snapview: inspect the existing mount activation %s: %w", a.name, ierr)
		}
		if !o.IsContainer(old.Labels) {
			return nil, fmt.Errorf("snapview: mount activation %s exists and is not snapview's (label %s=%q): %w",
				a.name, lease.LabelContainer, old.Labels[lease.LabelContainer], errdefs.ErrAlreadyExists)
		}
		log.G(ctx).WithFields(log.Fields{"id": o.Container, "activation": a.name, "created": old.Labels[lease.LabelCreated]}).
			Warn("snapview: replacing a leftover mount activation of an earlier run")
		if err := mm.Deactivate(ctx, a.name); err != nil && !errdefs.IsNotFound(err) {
			return nil, fmt.Errorf("snapview: deactivate the leftover mount activation %s: %w", a.name, err)
		}
		ai, err = activate()
	}
	if err != nil {
		if errdefs.IsNotImplemented(err) {
			return nil, fmt.Errorf("snapview: the %s of %s (mount types %s) need containerd's mount manager, which did not take them: %w", a.what, o.Container, mountTypes(mounts), err)
		}
		return nil, fmt.Errorf("snapview: activate the %s of %s: %w", a.what, o.Container, err)
	}
	log.G(ctx).WithFields(log.Fields{"id": o.Container, "activation": ai.Name, "active": len(ai.Active)}).Info("snapview: " + a.what + " activated by containerd's mount manager")
	return ai.System, nil
}

func mountTypes(mounts []mount.Mount) string {
	t := make([]string, len(mounts))
	for i, m := range mounts {
		t[i] = m.Type
	}
	return strings.Join(t, ",")
}

// activateRootfs has containerd's mount manager perform the container's
// rootfs mounts that snapview claimed from containerd (see
// rootfs.Claimed), for a container that does not hand them to a guest:
// exactly as containerd would have without the claim, under the task's id
// and tied to the container, so that runc mounts what is left, as it would
// under io.containerd.runc.v2, and containerd's own deactivation of the
// task's mounts at delete finds it too. The activation also carries
// snapview's owner labels, by which a teardown that did not make it tells
// it from one containerd made.
func (s *setupRun) activateRootfs(ctx context.Context) error {
	st, r := s.v.State, s.p.req
	st.RootfsActivation = r.ID
	system, err := s.l.activate(ctx, s.owner, rootfsActivation(r.ID), r.Rootfs)
	if errdefs.IsNotImplemented(err) {
		// Nothing needed the manager after all: runc mounts them as sent.
		st.RootfsActivation = ""
		s.logger.WithError(err).Warn("snapview: the rootfs mounts go to runc as containerd sent them")
		return nil
	}
	if err != nil {
		return err
	}
	s.v.Rootfs = system
	if s.withView() {
		if st.Rootfs, err = rootfs.FromMounts(s.v.Rootfs); err != nil {
			return fmt.Errorf("snapview: rootfs of %s: %w", r.ID, err)
		}
	}
	return nil
}
