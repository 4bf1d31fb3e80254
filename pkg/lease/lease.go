// Package lease manages the containerd lease that holds a container's view.
//
// Lifecycle: Acquire creates the lease "snapview/<container-id>" before the
// view exists, so that the view is created under it (in the same metadata
// transaction) and garbage collection never sees it unreferenced. Release
// deletes it with synchronous GC, after the view was removed. A lease of the
// same id left by a crash is verified as snapview's by its labels and
// replaced, never reused blindly; a lease of that id without them is not
// touched and fails Acquire.
package lease

import (
	"context"
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

// Labels returns the labels of a container's lease and view.
func Labels(containerID string, created time.Time) map[string]string {
	return map[string]string{
		LabelContainer: containerID,
		LabelCreated:   created.UTC().Format(time.RFC3339),
	}
}

// IsOwned reports whether labels mark an object as snapview's for containerID.
func IsOwned(labels map[string]string, containerID string) bool {
	return labels[LabelContainer] == containerID
}

// Acquire creates the lease of containerID's view, replacing a leftover one
// of snapview's own.
func Acquire(ctx context.Context, m leases.Manager, containerID string, created time.Time) (leases.Lease, error) {
	id := ID(containerID)
	l, err := m.Create(ctx, leases.WithID(id), leases.WithLabels(Labels(containerID, created)))
	if err == nil {
		log.G(ctx).WithFields(log.Fields{"id": containerID, "lease": id}).Debug("snapview: lease created")
		return l, nil
	}
	if !errdefs.IsAlreadyExists(err) {
		return leases.Lease{}, fmt.Errorf("create lease %s: %w", id, err)
	}
	old, err := get(ctx, m, id)
	if err != nil {
		return leases.Lease{}, err
	}
	if !IsOwned(old.Labels, containerID) {
		return leases.Lease{}, fmt.Errorf("lease %s exists and is not snapview's (label %s=%q): %w",
			id, LabelContainer, old.Labels[LabelContainer], errdefs.ErrAlreadyExists)
	}
	log.G(ctx).WithFields(log.Fields{"id": containerID, "lease": id, "created": old.Labels[LabelCreated]}).
		Warn("snapview: replacing a leftover lease of an earlier run")
	if err := Release(ctx, m, containerID); err != nil {
		return leases.Lease{}, err
	}
	l, err = m.Create(ctx, leases.WithID(id), leases.WithLabels(Labels(containerID, created)))
	if err != nil {
		return leases.Lease{}, fmt.Errorf("create lease %s: %w", id, err)
	}
	return l, nil
}

// Release deletes containerID's lease with synchronous garbage collection. A
// lease already gone is success.
func Release(ctx context.Context, m leases.Manager, containerID string) error {
	id := ID(containerID)
	if err := m.Delete(ctx, leases.Lease{ID: id}, leases.SynchronousDelete); err != nil {
		if errdefs.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("delete lease %s: %w", id, err)
	}
	log.G(ctx).WithFields(log.Fields{"id": containerID, "lease": id}).Debug("snapview: lease deleted")
	return nil
}

func get(ctx context.Context, m leases.Manager, id string) (leases.Lease, error) {
	ls, err := m.List(ctx, fmt.Sprintf("id==%q", id))
	if err != nil {
		return leases.Lease{}, fmt.Errorf("list lease %s: %w", id, err)
	}
	if len(ls) == 0 {
		return leases.Lease{}, fmt.Errorf("lease %s: %w", id, errdefs.ErrNotFound)
	}
	return ls[0], nil
}
