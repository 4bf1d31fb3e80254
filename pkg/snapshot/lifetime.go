package snapshot

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/snapshot/record"
)

// List returns the snapshots of namespace ns, oldest first. An image record
// that carries snapview's label but is not a well-formed snapshot record is
// left out, with a warning.
func (n *Node) List(ctx context.Context, ns string) ([]Snapshot, error) {
	ctx = namespaces.WithNamespace(ctx, ns)
	imgs, err := n.Client.ImageService().List(ctx, record.Filter)
	if err != nil {
		return nil, fmt.Errorf("snapview: list the snapshots of namespace %s: %w", ns, err)
	}
	var out []Snapshot
	for _, img := range imgs {
		r, err := record.FromImage(img)
		if err != nil {
			log.G(ctx).WithError(err).WithField("image", img.Name).Warn("snapview: not a snapshot record; left out")
			continue
		}
		out = append(out, Snapshot{Record: r})
	}
	slices.SortFunc(out, func(a, b Snapshot) int { return a.Created.Compare(b.Created) })
	return out, nil
}

// Inspect returns snapshot id of namespace ns.
func (n *Node) Inspect(ctx context.Context, ns, id string) (*Snapshot, error) {
	ctx = namespaces.WithNamespace(ctx, ns)
	r, err := record.Lookup(ctx, n.Client.ImageService().Get, ns, id)
	if err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	return &Snapshot{Record: r}, nil
}

// Remove removes snapshots ids of namespace ns: their records, and with a
// synchronous garbage collection what only they held. A container restored
// from one, or using one as a volume, keeps running: its own lease holds
// what it uses. Every id is attempted; the errors are joined.
func (n *Node) Remove(ctx context.Context, ns string, ids ...string) error {
	ctx = namespaces.WithNamespace(ctx, ns)
	var errs []error
	for _, id := range ids {
		r, err := record.Lookup(ctx, n.Client.ImageService().Get, ns, id)
		if err != nil {
			errs = append(errs, fmt.Errorf("snapview: %w", err))
			continue
		}
		if err := n.Client.ImageService().Delete(ctx, record.ImageName(r.ID), images.SynchronousDelete()); err != nil {
			errs = append(errs, fmt.Errorf("snapview: remove snapshot %s: %w", id, err))
			continue
		}
		log.G(ctx).WithFields(log.Fields{"snapshot": r.ID, "kind": r.Kind, "form": r.Form, "source": r.Source, "size": r.Size, "dir": r.Dir, "namespace": ns}).
			Info("snapview: snapshot removed")
	}
	return errors.Join(errs...)
}

// OldAge is the age past which `snapshot ls` marks a snapshot as old (and
// workerd warns of a stale snapshot).
const OldAge = 30 * 24 * time.Hour
