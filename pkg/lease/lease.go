// Package lease manages the containerd lease that holds a container's view.
//
// Lifecycle: Acquire creates the lease "snapview/<container-id>" before the
// view exists, so that the view is created under it (in the same metadata
// transaction) and garbage collection never sees it unreferenced. Delete
// removes it after the view was removed. A lease of the same id left by a
// crash is verified as snapview's by its labels and replaced, never reused
// blindly; a lease of that id without them is not touched and fails Acquire.
//
// Ownership is an Owner: the container id and the creation time, both
// recorded as labels. Deleting with an Owner re-reads the lease and deletes
// it only if both labels still match, so that a rollback, the dead-shim path
// or the orphan sweep never deletes a lease that a newer container of the
// same id created in the meantime.
package lease

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Labels snapview puts on its leases and views.
const (
	LabelContainer = "snapview.io/container"
	LabelCreated   = "snapview.io/created"
)

// ID returns the lease id of a container's view.
func ID(containerID string) string { return "snapview/" + containerID }

// Owner identifies one incarnation of a container's view: the container id
// and when its setup began.
type Owner struct {
	Container string
	// Created is the snapview.io/created label value (RFC 3339 with
	// nanoseconds), unique per setup.
	Created string
}

// NewOwner returns the owner of a view set up at created.
func NewOwner(containerID string, created time.Time) Owner {
	return Owner{Container: containerID, Created: created.UTC().Format(time.RFC3339Nano)}
}

// OwnerOf reads the owner from an object's labels.
func OwnerOf(labels map[string]string) Owner {
	return Owner{Container: labels[LabelContainer], Created: labels[LabelCreated]}
}

// Labels returns the labels that mark an object as o's.
func (o Owner) Labels() map[string]string {
	return map[string]string{LabelContainer: o.Container, LabelCreated: o.Created}
}

// IsContainer reports whether labels mark an object as snapview's for o's
// container, whichever incarnation made it.
func (o Owner) IsContainer(labels map[string]string) bool {
	return o.Container != "" && labels[LabelContainer] == o.Container
}

// Owns reports whether labels mark an object as made by exactly o.
func (o Owner) Owns(labels map[string]string) bool {
	return o.IsContainer(labels) && o.Created != "" && labels[LabelCreated] == o.Created
}

// Acquire creates the lease of o's container, replacing a leftover lease of
// the same container made by an earlier setup.
func Acquire(ctx context.Context, m leases.Manager, o Owner) (leases.Lease, error) {
	id := ID(o.Container)
	l, err := m.Create(ctx, leases.WithID(id), leases.WithLabels(o.Labels()))
	if err == nil {
		log.G(ctx).WithFields(log.Fields{"id": o.Container, "lease": id}).Debug("snapview: lease created")
		return l, nil
	}
	if !errdefs.IsAlreadyExists(err) {
		return leases.Lease{}, fmt.Errorf("create lease %s: %w", id, err)
	}
	old, err := Get(ctx, m, o.Container)
	if err != nil {
		return leases.Lease{}, err
	}
	if !o.IsContainer(old.Labels) {
		return leases.Lease{}, fmt.Errorf("lease %s exists and is not snapview's (label %s=%q): %w",
			id, LabelContainer, old.Labels[LabelContainer], errdefs.ErrAlreadyExists)
	}
	log.G(ctx).WithFields(log.Fields{"id": o.Container, "lease": id, "created": old.Labels[LabelCreated]}).
		Warn("snapview: replacing a leftover lease of an earlier run")
	if err := Delete(ctx, m, OwnerOf(old.Labels), true); err != nil {
		return leases.Lease{}, err
	}
	l, err = m.Create(ctx, leases.WithID(id), leases.WithLabels(o.Labels()))
	if err != nil {
		return leases.Lease{}, fmt.Errorf("create lease %s: %w", id, err)
	}
	return l, nil
}

// ErrNotOwner reports an object of snapview's name that another owner (a
// newer incarnation of the container, or not snapview at all) holds now: it
// was left alone.
var ErrNotOwner = errors.New("held by another owner; left alone")

// Delete deletes o's lease if its labels still say it is exactly o's. A
// lease already gone is success; a lease of another owner is left alone and
// reported with ErrNotOwner. With syncGC the call returns only after
// containerd's garbage collector ran, so whatever the lease alone held is
// gone too.
func Delete(ctx context.Context, m leases.Manager, o Owner, syncGC bool) error {
	l, err := Get(ctx, m, o.Container)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return nil
		}
		return err
	}
	if !o.Owns(l.Labels) {
		return fmt.Errorf("lease %s (created %s, not %s): %w", l.ID, l.Labels[LabelCreated], o.Created, ErrNotOwner)
	}
	return Remove(ctx, m, o.Container, syncGC)
}

// Remove deletes containerID's lease without checking its owner, for a
// caller that created it itself and still holds it. A lease already gone is
// success.
func Remove(ctx context.Context, m leases.Manager, containerID string, syncGC bool) error {
	id := ID(containerID)
	var opts []leases.DeleteOpt
	if syncGC {
		opts = append(opts, leases.SynchronousDelete)
	}
	if err := m.Delete(ctx, leases.Lease{ID: id}, opts...); err != nil {
		if errdefs.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("delete lease %s: %w", id, err)
	}
	log.G(ctx).WithFields(log.Fields{"id": containerID, "lease": id, "sync_gc": syncGC}).Debug("snapview: lease deleted")
	return nil
}

// Get returns containerID's lease, or an error wrapping errdefs.ErrNotFound.
func Get(ctx context.Context, m leases.Manager, containerID string) (leases.Lease, error) {
	id := ID(containerID)
	ls, err := m.List(ctx, fmt.Sprintf("id==%q", id))
	if err != nil {
		return leases.Lease{}, fmt.Errorf("list lease %s: %w", id, err)
	}
	if len(ls) == 0 {
		return leases.Lease{}, fmt.Errorf("lease %s: %w", id, errdefs.ErrNotFound)
	}
	return ls[0], nil
}
