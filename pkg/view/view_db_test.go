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
	created := time.Now()

	l, err := lease.Acquire(ctx, lm, "c1", created)
	if err != nil {
		t.Fatal(err)
	}
	mounts, err := Create(ctx, sn, "c1", parent, l.ID, lease.Labels("c1", created))
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
	if err != nil || info.Kind != snapshots.KindView || info.Labels[LabelGCBackRef] != "c1" || info.Labels[lease.LabelContainer] != "c1" {
		t.Fatalf("view %+v %v", info, err)
	}

	t.Run("leftover lease and view of ours are replaced", func(t *testing.T) {
		later := created.Add(time.Hour)
		l2, err := lease.Acquire(ctx, lm, "c1", later)
		if err != nil {
			t.Fatal(err)
		}
		if l2.Labels[lease.LabelCreated] != later.UTC().Format(time.RFC3339) {
			t.Fatalf("lease not replaced: %v", l2.Labels)
		}
		if _, err := Create(ctx, sn, "c1", parent, l2.ID, lease.Labels("c1", later)); err != nil {
			t.Fatal(err)
		}
		info, err := sn.Stat(ctx, Key("c1"))
		if err != nil || info.Labels[lease.LabelCreated] != later.UTC().Format(time.RFC3339) {
			t.Fatalf("view not replaced: %+v %v", info, err)
		}
	})

	t.Run("a lease or view of the same name that is not ours is refused", func(t *testing.T) {
		if _, err := lm.Create(ctx, leases.WithID(lease.ID("c2")), leases.WithLabels(map[string]string{"owner": "someone"})); err != nil {
			t.Fatal(err)
		}
		if _, err := lease.Acquire(ctx, lm, "c2", created); !errdefs.IsAlreadyExists(err) {
			t.Fatalf("foreign lease: %v", err)
		}
		if _, err := sn.View(leases.WithLease(ctx, "test-image"), Key("c3"), parent); err != nil {
			t.Fatal(err)
		}
		l3, err := lease.Acquire(ctx, lm, "c3", created)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Create(ctx, sn, "c3", parent, l3.ID, lease.Labels("c3", created)); !errdefs.IsAlreadyExists(err) {
			t.Fatalf("foreign view: %v", err)
		}
		if _, err := sn.Stat(ctx, Key("c3")); err != nil {
			t.Fatalf("the foreign view was touched: %v", err)
		}
	})

	t.Run("teardown is idempotent and GC takes nothing else", func(t *testing.T) {
		for i := 0; i < 2; i++ {
			if err := Remove(ctx, sn, "c1"); err != nil {
				t.Fatalf("remove %d: %v", i, err)
			}
			if err := lease.Release(ctx, lm, "c1"); err != nil {
				t.Fatalf("release %d: %v", i, err)
			}
		}
		if _, err := db.GarbageCollect(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := sn.Stat(ctx, Key("c1")); !errdefs.IsNotFound(err) {
			t.Fatalf("view after teardown: %v", err)
		}
		if _, err := sn.Stat(ctx, parent); err != nil {
			t.Fatalf("the image went with the view: %v", err)
		}
	})

	t.Run("without its lease a view is collected", func(t *testing.T) {
		l4, err := lease.Acquire(ctx, lm, "c4", created)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Create(ctx, sn, "c4", parent, l4.ID, lease.Labels("c4", created)); err != nil {
			t.Fatal(err)
		}
		if _, err := db.GarbageCollect(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := sn.Stat(ctx, Key("c4")); err != nil {
			t.Fatalf("GC took a leased view: %v", err)
		}
		if err := lease.Release(ctx, lm, "c4"); err != nil {
			t.Fatal(err)
		}
		if _, err := db.GarbageCollect(ctx); err != nil {
			t.Fatal(err)
		}
		// No container record c4 exists, so gc.bref.container holds nothing.
		if _, err := sn.Stat(ctx, Key("c4")); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("view survived its lease without a container: %v", err)
		}
	})
}
