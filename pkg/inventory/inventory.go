// Package inventory lists the views snapview holds on a node, for
// `snapviewctl ls` and `inspect`: from containerd (the leases labelled
// snapview.io/container, the views they hold, the container records) and
// from the host (the bundles' state files, the view mounts, the loop
// devices), with a health verdict for each, so that an operator can see
// which container holds what, and what is left over, without reading
// containerd's database.
package inventory

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"

	"github.com/snapview/snapview/params"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/view"
)

// Health verdicts.
const (
	HealthOK          = "ok"
	HealthOrphan      = "orphan: container gone"
	HealthNoView      = "broken: lease without view"
	HealthNoMount     = "broken: view without mount"
	HealthNoState     = "broken: state file missing"
	HealthNoLease     = "broken: state file without lease"
	HealthUnreadState = "broken: state file unreadable"
	HealthNoRootfs    = "broken: rootfs activation missing"
	HealthNoVolume    = "broken: volume without its view or mount"
)

// Entry is one container's view as found on the node.
type Entry struct {
	Namespace   string `json:"namespace"`
	Container   string `json:"container"`
	Mode        string `json:"mode,omitempty"`
	Snapshotter string `json:"snapshotter,omitempty"`
	// Source is "layers" for a view derived from the layers the
	// container's rootfs names (view.source): no view key, and a lease
	// only for its volumes' views; "" for a leased View.
	Source     string `json:"source,omitempty"`
	ViewKey    string `json:"view_key,omitempty"`
	Lease      string `json:"lease,omitempty"`
	Mountpoint string `json:"mountpoint,omitempty"`
	Device     string `json:"device,omitempty"`
	// Layers is how many read-only layer disks a layered rootfs has.
	Layers int `json:"layers,omitempty"`
	// RootfsActivation is the mount-manager activation snapview made for
	// the container's rootfs (mode none: all it holds).
	RootfsActivation string `json:"rootfs_activation,omitempty"`
	// Volumes are the container's volumes, by name.
	Volumes []string `json:"volumes,omitempty"`
	// SnapshotVolumes are those of its volumes that restore a directory
	// snapshot, with the snapshot's id.
	SnapshotVolumes []SnapshotVolume `json:"snapshot_volumes,omitempty"`
	Created         time.Time        `json:"created"`
	Health          string           `json:"health"`
	// Bundle is the container's bundle directory, if it still exists.
	Bundle string `json:"bundle,omitempty"`
	// State is the state file, when it could be read.
	State *bundle.State `json:"-"`
}

// SnapshotVolume is a volume that restores a directory snapshot.
type SnapshotVolume struct {
	Name     string `json:"name"`
	Snapshot string `json:"snapshot"`
	// Writable says it is a writable clone of the snapshot, discarded
	// with the container.
	Writable bool `json:"writable,omitempty"`
}

// Age is how long ago the view was set up.
func (e Entry) Age() time.Duration {
	if e.Created.IsZero() {
		return 0
	}
	return time.Since(e.Created)
}

// BundleRoot is where the bundles of namespace ns are, below containerd's
// state directory.
func BundleRoot(state, ns string) string {
	return filepath.Join(state, "io.containerd.runtime.v2.task", ns)
}

// List returns the views of namespace ns, sorted by container; ctx carries
// the namespace. state is containerd's state directory.
func List(ctx context.Context, b lifecycle.Backend, ns, state string) ([]Entry, error) {
	entries := map[string]*Entry{}
	get := func(id string) *Entry {
		if e := entries[id]; e != nil {
			return e
		}
		e := &Entry{Namespace: ns, Container: id}
		entries[id] = e
		return e
	}

	lm, err := b.Leases()
	if err != nil {
		return nil, err
	}
	ls, err := lm.List(ctx, fmt.Sprintf("labels.%q", lease.LabelContainer))
	if err != nil {
		return nil, fmt.Errorf("list snapview leases in %s: %w", ns, err)
	}
	for _, l := range ls {
		id := l.Labels[lease.LabelContainer]
		if l.ID != lease.ID(id) {
			continue
		}
		e := get(id)
		e.Lease = l.ID
		e.Created, _ = time.Parse(time.RFC3339Nano, l.Labels[lease.LabelCreated])
		res, err := lm.ListResources(ctx, l)
		if err != nil {
			return nil, fmt.Errorf("list resources of lease %s: %w", l.ID, err)
		}
		if held := view.HeldBy(id, res); held.Key != "" {
			e.Snapshotter, e.ViewKey = held.Snapshotter, held.Key
		}
	}

	root := BundleRoot(state, ns)
	dirs, err := os.ReadDir(root)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	for _, d := range dirs {
		if !d.IsDir() || strings.HasPrefix(d.Name(), ".") {
			continue
		}
		dir := filepath.Join(root, d.Name())
		if !bundle.Started(dir) {
			if e := entries[d.Name()]; e != nil {
				e.Bundle = dir
			}
			continue
		}
		e := get(d.Name())
		e.Bundle = dir
		e.Mountpoint = bundle.Mountpoint(dir)
		st, err := bundle.ReadState(dir)
		switch {
		case err == nil && st.ContainerID == e.Container:
			e.State = st
			e.Mode = st.Mode
			e.Mountpoint = st.Mountpoint
			e.RootfsActivation = st.RootfsActivation
			e.Source = st.Source
			if e.Mode == "" {
				e.Mode = bundle.ModeView
			}
			if e.Snapshotter == "" {
				e.Snapshotter = st.Snapshotter
			}
			if e.Created.IsZero() {
				e.Created = st.Created
			}
			if st.Block != nil {
				e.Device, e.Layers = st.Block.Device, len(st.Block.Layers)
			}
			for _, v := range st.Volumes {
				e.Volumes = append(e.Volumes, v.Name)
				if v.Snapshot != "" {
					e.SnapshotVolumes = append(e.SnapshotVolumes, SnapshotVolume{Name: v.Name, Snapshot: v.Snapshot, Writable: v.Writable})
				}
			}
		case errors.Is(err, bundle.ErrNoState):
			e.Health = HealthNoState
		default:
			e.Health = HealthUnreadState
		}
	}

	out := make([]Entry, 0, len(entries))
	for _, e := range entries {
		if err := e.judge(ctx, b); err != nil {
			return nil, err
		}
		out = append(out, *e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Container < out[j].Container })
	return out, nil
}

// judge sets e's health from what exists: the container record, the lease,
// the view, the mount; for a container that has no view (mode none), its
// rootfs activation.
func (e *Entry) judge(ctx context.Context, b lifecycle.Backend) error {
	_, _, err := b.Container(ctx, e.Container)
	gone := errdefs.IsNotFound(err)
	if err != nil && !gone {
		return fmt.Errorf("look up container %s: %w", e.Container, err)
	}
	if e.Mode == bundle.ModeNone {
		mm, err := b.Mounts()
		if err != nil {
			return err
		}
		_, err = mm.Info(ctx, e.RootfsActivation)
		switch {
		case gone:
			e.Health = HealthOrphan
		case errdefs.IsNotFound(err):
			e.Health = HealthNoRootfs
		case err != nil:
			return fmt.Errorf("look up mount activation %s: %w", e.RootfsActivation, err)
		default:
			e.Health = HealthOK
		}
		return nil
	}
	mounted := false
	if e.Mountpoint != "" {
		mounted, _ = mountinfo.Mounted(e.Mountpoint)
	}
	derived := e.Source == params.SourceLayers
	switch {
	case (e.Lease != "" || derived) && gone:
		e.Health = HealthOrphan
	case e.Health != "":
		// the state file's verdict stands
	case e.Lease == "" && (!derived || len(e.Volumes) > 0):
		e.Health = HealthNoLease
	case e.ViewKey == "" && !derived:
		e.Health = HealthNoView
	case e.Bundle != "" && !mounted:
		e.Health = HealthNoMount
	default:
		e.Health = HealthOK
		if ok, err := e.volumesHealthy(ctx, b); err != nil {
			return err
		} else if !ok {
			e.Health = HealthNoVolume
		}
	}
	return nil
}

// volumesHealthy reports whether each of e's volumes has its view and, in
// view mode, its mount.
func (e *Entry) volumesHealthy(ctx context.Context, b lifecycle.Backend) (bool, error) {
	if e.State == nil || len(e.State.Volumes) == 0 {
		return true, nil
	}
	sn, err := b.Snapshotter(e.Snapshotter)
	if err != nil {
		return false, err
	}
	for _, v := range e.State.Volumes {
		if _, err := sn.Stat(ctx, v.ViewKey); errdefs.IsNotFound(err) {
			return false, nil
		} else if err != nil {
			return false, fmt.Errorf("stat volume view %s: %w", v.ViewKey, err)
		}
		if v.Mountpoint != "" {
			if mounted, _ := mountinfo.Mounted(v.Mountpoint); !mounted {
				return false, nil
			}
		}
	}
	return true, nil
}

// Find returns container id's entry in namespace ns, or an error wrapping
// errdefs.ErrNotFound.
func Find(ctx context.Context, b lifecycle.Backend, ns, state, id string) (*Entry, error) {
	all, err := List(ctx, b, ns, state)
	if err != nil {
		return nil, err
	}
	for _, e := range all {
		if e.Container == id {
			return &e, nil
		}
	}
	return nil, fmt.Errorf("no view of container %s in namespace %s: %w", id, ns, errdefs.ErrNotFound)
}
