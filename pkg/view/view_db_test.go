package view

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/containerd/v2/plugins/snapshots/native"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"

	"github.com/snapview/snapview/pkg/lease"
)

// newDB returns containerd's own metadata store over a native snapshotter,
// in process: the same lease and snapshot semantics as a daemon.
func newDB(t *testing.T) (context.Context, snapshots.Snapshotter, leases.Manager, *metadata.DB) {
	t.Helper()
	dir := t.TempDir()
	bdb, err := bolt.Open(filepath.Join(dir, "meta.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bdb.Close() })
	cs, err := local.NewStore(filepath.Join(dir, "content"))
	if err != nil {
		t.Fatal(err)
	}
	sn, err := native.NewSnapshotter(filepath.Join(dir, "native"))
	if err != nil {
		t.Fatal(err)
	}
	db := metadata.NewDB(bdb, cs, map[string]snapshots.Snapshotter{"native": sn})
	ctx := namespaces.WithNamespace(context.Background(), "test")
	if err := db.Init(ctx); err != nil {
		t.Fatal(err)
	}
	return ctx, db.Snapshotter("native"), metadata.NewLeaseManager(db), db
}

// committedParent makes a committed snapshot to take views of.
func committedParent(ctx context.Context, t *testing.T, sn snapshots.Snapshotter) string {
	t.Helper()
	lctx := leases.WithLease(ctx, "test-image")
	if _, err := sn.Prepare(lctx, "layer-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(lctx, "layer", "layer-active"); err != nil {
		t.Fatal(err)
	}
	return "layer"
}

func TestCreateUnderLease(t *testing.T) {
	ctx, sn, lm, db := newDB(t)
	if _, err := lm.Create(ctx, leases.WithID("test-image")); err != nil {
		t.Fatal(err)
	}
	parent := committedParent(ctx, t, sn)
	first := lease.NewOwner("c1", time.Now())

	l, err := lease.Acquire(ctx, lm, first)
	if err != nil {
		t.Fatal(err)
	}
	mounts, err := Create(ctx, sn, first, parent, l.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) != 1 || mounts[0].Type != "bind" {
		t.Fatalf("native view mounts %+v", mounts)
	}
	res, err := lm.ListResources(ctx, l)
	if err != nil || len(res) != 1 || res[0].ID != Key("c1") || res[0].Type != "snapshots/native" {
		t.Fatalf("the view is not held by the lease: %v %v", res, err)
	}
	info, err := sn.Stat(ctx, Key("c1"))
	if err != nil || info.Kind != snapshots.KindView || info.Labels[LabelGCBackRef] != "c1" || !first.Owns(info.Labels) {
		t.Fatalf("view %+v %v", info, err)
	}

	later := lease.NewOwner("c1", time.Now().Add(time.Hour))
	t.Run("leftover lease and view of ours are replaced", func(t *testing.T) {
		l2, err := lease.Acquire(ctx, lm, later)
		if err != nil {
			t.Fatal(err)
		}
		if !later.Owns(l2.Labels) {
			t.Fatalf("lease not replaced: %v", l2.Labels)
		}
		if _, err := Create(ctx, sn, later, parent, l2.ID); err != nil {
			t.Fatal(err)
		}
		info, err := sn.Stat(ctx, Key("c1"))
		if err != nil || !later.Owns(info.Labels) {
			t.Fatalf("view not replaced: %+v %v", info, err)
		}
	})

	t.Run("an earlier incarnation's owner removes nothing of the newer one", func(t *testing.T) {
		if err := RemoveOwned(ctx, sn, first); !errors.Is(err, lease.ErrNotOwner) {
			t.Fatalf("remove with the old owner: %v, want ErrNotOwner", err)
		}
		if err := lease.Delete(ctx, lm, first, true); !errors.Is(err, lease.ErrNotOwner) {
			t.Fatalf("delete with the old owner: %v, want ErrNotOwner", err)
		}
		if _, err := sn.Stat(ctx, Key("c1")); err != nil {
			t.Fatalf("the newer view was removed: %v", err)
		}
		if _, err := lease.Get(ctx, lm, "c1"); err != nil {
			t.Fatalf("the newer lease was removed: %v", err)
		}
	})

	t.Run("a lease or view of the same name that is not ours is refused", func(t *testing.T) {
		if _, err := lm.Create(ctx, leases.WithID(lease.ID("c2")), leases.WithLabels(map[string]string{"owner": "someone"})); err != nil {
			t.Fatal(err)
		}
		if _, err := lease.Acquire(ctx, lm, lease.NewOwner("c2", time.Now())); !errdefs.IsAlreadyExists(err) {
			t.Fatalf("foreign lease: %v", err)
		}
		if _, err := sn.View(leases.WithLease(ctx, "test-image"), Key("c3"), parent); err != nil {
			t.Fatal(err)
		}
		c3 := lease.NewOwner("c3", time.Now())
		l3, err := lease.Acquire(ctx, lm, c3)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Create(ctx, sn, c3, parent, l3.ID); !errdefs.IsAlreadyExists(err) {
			t.Fatalf("foreign view: %v", err)
		}
		if err := RemoveOwned(ctx, sn, c3); !errors.Is(err, lease.ErrNotOwner) {
			t.Fatalf("remove of a foreign view: %v, want ErrNotOwner", err)
		}
		if _, err := sn.Stat(ctx, Key("c3")); err != nil {
			t.Fatalf("the foreign view was touched: %v", err)
		}
	})

	t.Run("teardown is idempotent and GC takes nothing else", func(t *testing.T) {
		for i := range 2 {
			if err := RemoveOwned(ctx, sn, later); err != nil {
				t.Fatalf("remove %d: %v", i, err)
			}
			if err := lease.Delete(ctx, lm, later, false); err != nil {
				t.Fatalf("release %d: %v", i, err)
			}
		}
		if _, err := db.GarbageCollect(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := sn.Stat(ctx, Key("c1")); !errdefs.IsNotFound(err) {
			t.Fatalf("view after teardown: %v", err)
		}
		if _, err := lease.Get(ctx, lm, "c1"); !errdefs.IsNotFound(err) {
			t.Fatalf("lease after teardown: %v", err)
		}
		if _, err := sn.Stat(ctx, parent); err != nil {
			t.Fatalf("the image went with the view: %v", err)
		}
	})

	t.Run("without its lease a view is collected", func(t *testing.T) {
		c4 := lease.NewOwner("c4", time.Now())
		l4, err := lease.Acquire(ctx, lm, c4)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Create(ctx, sn, c4, parent, l4.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := db.GarbageCollect(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := sn.Stat(ctx, Key("c4")); err != nil {
			t.Fatalf("GC took a leased view: %v", err)
		}
		if err := lease.Remove(ctx, lm, "c4", true); err != nil {
			t.Fatal(err)
		}
		// In a daemon, SynchronousDelete runs the collector; here, by hand.
		if _, err := db.GarbageCollect(ctx); err != nil {
			t.Fatal(err)
		}
		// No container record c4 exists, so gc.bref.container holds nothing.
		if _, err := sn.Stat(ctx, Key("c4")); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("view survived its lease without a container: %v", err)
		}
	})
}
