package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/snapview/snapview/params"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	securejoin "github.com/cyphar/filepath-securejoin"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/image"
	"github.com/snapview/snapview/pkg/rootfs"
	"github.com/snapview/snapview/pkg/snapshot/record"
	"github.com/snapview/snapview/pkg/view"
)

// Volumes: a volume is a read-only view of another image's root
// filesystem, under the container's lease, in the container's
// snapshotter. Only its name and image come from the annotation; its
// source, the image's top snapshot, is looked up in containerd (the image
// in the container's namespace, its manifest for this platform, the chain
// id of its layers, the snapshot of that id), and must exist: a volume is
// never created empty.

// volumePlan is one volume of a plan: what the annotation asks, and the
// snapshot it is a view of, found by the lookup.
type volumePlan struct {
	annotations.Volume
	parent string
}

// checkVolumes refuses, before any call into containerd, a volume whose
// image the configuration does not allow: whether such an image exists on
// the node is not the container's business.
func (p *Plan) checkVolumes() error {
	cfg := p.req.Config
	for _, v := range p.ann.Volumes {
		if v.Snapshot != "" {
			if err := p.checkSnapshotVolume(v); err != nil {
				return err
			}
			p.volumes = append(p.volumes, volumePlan{Volume: v})
			continue
		}
		if !cfg.AllowsVolume(v.Ref) {
			allowed := "none: it is empty, the default"
			if len(cfg.Volumes.Allow) > 0 {
				allowed = fmt.Sprintf("%q", cfg.Volumes.Allow)
			}
			return fmt.Errorf("snapview: annotation %s%s: image %s is not allowed as a volume by [volumes] allow in %s (%s); an operator adds a pattern that matches it",
				annotations.VolumePrefix, v.Name, v.Ref, cfg.Source, allowed)
		}
		p.volumes = append(p.volumes, volumePlan{Volume: v})
	}
	return nil
}

// resolveVolumes finds each volume's snapshot: the chain id of its image's
// layers for this platform, which must be unpacked in snapshotter sn. It
// changes nothing.
func (l *Lifecycle) resolveVolumes(ctx context.Context, p *Plan) error {
	if len(p.volumes) == 0 {
		return nil
	}
	sn, err := l.backend.Snapshotter(p.snapshotter)
	if err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	cs, err := l.backend.Content()
	if err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	// One lookup per volume, all at once: each is a few calls into
	// containerd that do not depend on the others. The first error in
	// the annotations' order is the one returned.
	return eachConcurrently(ctx, p.req.ID, len(p.volumes), func(i int) error {
		v := &p.volumes[i]
		var err error
		if v.Snapshot != "" {
			if v.parent, err = l.snapshotSource(ctx, cs, sn, p, v.Volume); err != nil {
				return fmt.Errorf("snapview: annotation %s%s: %w", annotations.VolumePrefix, v.Name, err)
			}
			return nil
		}
		if v.parent, err = l.volumeSource(ctx, cs, sn, p, v.Volume); err != nil {
			return fmt.Errorf("snapview: annotation %s%s: image %s: %w", annotations.VolumePrefix, v.Name, v.Ref, err)
		}
		return nil
	})
}

// eachConcurrently runs f(0) … f(n-1) at once (one alone runs in the
// caller's goroutine) and returns the first error in index order; a panic
// in one is its error.
func eachConcurrently(ctx context.Context, id string, n int, f func(i int) error) error {
	if n == 1 {
		return f(0)
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			defer recoverTo(ctx, &errs[i], "volumes", id)
			errs[i] = f(i)
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// volumeSource returns the snapshot volume v views: its image's top
// snapshot in sn. Each way it can fail says what to do.
func (l *Lifecycle) volumeSource(ctx context.Context, cs content.Provider, sn snapshots.Snapshotter, p *Plan, v annotations.Volume) (string, error) {
	r := p.req
	cctx, cancel := callContext(ctx)
	defer cancel()
	img, err := l.backend.Image(cctx, v.Ref)
	if errdefs.IsNotFound(err) {
		return "", fmt.Errorf("no such image in namespace %s; pull or import it there first (ctr -n %s images pull --snapshotter %s %s)", r.Namespace, r.Namespace, p.snapshotter, v.Ref)
	}
	if err != nil {
		return "", fmt.Errorf("look up the image: %w", err)
	}
	ri, err := image.Resolve(cctx, cs, img.Target, nil)
	if err != nil {
		return "", fmt.Errorf("read it for this platform (%s): %w", platforms.DefaultString(), err)
	}
	if ri.ChainID == "" {
		return "", fmt.Errorf("it has no layers for this platform (%s): nothing to mount", platforms.DefaultString())
	}
	chain := ri.ChainID
	if _, err := sn.Stat(cctx, chain); err != nil {
		if errdefs.IsNotFound(err) {
			return "", fmt.Errorf("not unpacked in snapshotter %s, the container's (no snapshot %s); unpack it there (ctr -n %s images pull --snapshotter %s %s, or ctr images import --snapshotter %s, or a CRI pull for a runtime handler of that snapshotter)",
				p.snapshotter, chain, r.Namespace, p.snapshotter, v.Ref, p.snapshotter)
		}
		return "", fmt.Errorf("stat snapshot %s in %s: %w", chain, p.snapshotter, err)
	}
	return chain, nil
}

// createVolumeViews creates each volume's read-only view, keyed
// snapview/<id>/volumes/<name>, under the container's lease and with the
// view's labels, recording each before it is created.
func (s *setupRun) createVolumeViews(ctx context.Context) error {
	st, id := s.v.State, s.p.req.ID
	sn, err := s.l.backend.Snapshotter(s.p.snapshotter)
	if err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	// Every view is recorded before any is created, then all are created
	// at once: the teardown of a failed setup removes what the state
	// records, a view never created included (not found is success).
	for _, vp := range s.p.volumes {
		ref := vp.Ref
		if vp.Snapshot != "" {
			ref = record.ImageName(vp.Snapshot)
		}
		st.Volumes = append(st.Volumes, bundle.Volume{Name: vp.Name, Image: ref, Parent: vp.parent, ViewKey: view.VolumeKey(id, vp.Name), Target: vp.Target, Subpath: vp.Subpath,
			Snapshot: vp.Snapshot, Writable: vp.Writable})
	}
	s.volumeMounts = make([][]mount.Mount, len(s.p.volumes))
	return eachConcurrently(ctx, id, len(s.p.volumes), func(i int) error {
		vp, key := s.p.volumes[i], st.Volumes[i].ViewKey
		make := view.CreateKey
		if vp.Writable {
			make = view.PrepareKey
		}
		cctx, cancel := callContext(ctx)
		defer cancel()
		ms, err := make(cctx, sn, s.owner, key, vp.parent, st.LeaseID)
		if err != nil {
			return fmt.Errorf("snapview: volume %s: %w", vp.Name, err)
		}
		s.volumeMounts[i] = ms
		s.logger.WithFields(log.Fields{"volume": vp.Name, "image": vp.Ref, "key": key, "parent": vp.parent, "target": vp.Target}).Info("snapview: volume created")
		return nil
	})
}

// prepareVolumes readies each volume for the container: in view mode it is
// mounted read-only under the bundle (through the mount manager if its
// mounts need it) and its subpath resolved inside it, for a bind; in block
// mode it is never mounted, and each of its disks is attached read-only.
func (s *setupRun) prepareVolumes(ctx context.Context) error {
	if err := s.countDisks(); err != nil {
		return err
	}
	s.writable = map[string]*params.WritableDisk{}
	for i, vol := range s.v.State.Volumes {
		var err error
		switch {
		case s.blockMode() && vol.Writable:
			err = s.attachWritableVolume(ctx, i)
		case s.blockMode():
			err = s.attachVolume(i)
		default:
			err = s.mountVolume(ctx, i)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// mountVolume mounts volume i read-only on its mountpoint and resolves its
// subpath inside it, without leaving it: the source of its bind.
func (s *setupRun) mountVolume(ctx context.Context, i int) error {
	st := s.v.State
	vol := &st.Volumes[i]
	ms := s.volumeMounts[i]
	if view.NeedsManager(ms) {
		vol.Activation = vol.ViewKey
		var err error
		ms, err = s.l.activate(ctx, s.owner, activation{name: vol.ViewKey, what: "mounts of volume " + vol.Name, leaseID: st.LeaseID}, ms)
		if err != nil {
			return err
		}
	}
	mp := bundle.VolumeMountpoint(s.v.Bundle, vol.Name)
	loops, mounts, err := mountAt(ms, mp, vol.Writable, func() { vol.Mountpoint = mp })
	vol.LoopDevices, vol.Mounts = loops, mounts
	if err != nil {
		return fmt.Errorf("snapview: volume %s: %w", vol.Name, err)
	}
	src, err := securejoin.SecureJoin(mp, vol.Subpath)
	if err == nil {
		var fi os.FileInfo
		if fi, err = os.Lstat(src); err == nil && !fi.IsDir() {
			err = errors.New("not a directory")
		}
	}
	if err != nil {
		return fmt.Errorf("snapview: annotation %s%s: subpath %q in image %s: %w (symlinks are resolved inside the image)", annotations.VolumePrefix, vol.Name, vol.Subpath, vol.Image, err)
	}
	vol.Source = src
	if vol.Writable {
		s.writable[vol.Name] = &params.WritableDisk{}
	}
	s.logger.WithFields(log.Fields{"volume": vol.Name, "target": mp, "source": src, "loop": loops, "writable": vol.Writable}).Info("snapview: volume mounted")
	return nil
}

// countDisks finds each volume's disks (a volume whose view is a directory
// tree has none; in block mode every volume must have some) and refuses,
// before any volume is mounted or attached, a container whose read-only
// disks, its layered rootfs's and its volumes' together, are more than
// rootfs.MaxReadOnlyDisks: each is a loop device, a node-wide resource, in
// block mode held by the shim and in view mode by containerd's mount
// manager for the volume's mount.
func (s *setupRun) countDisks() error {
	st := s.v.State
	n, counts := 0, make([]string, 0, len(st.Volumes)+1)
	if s.layered() {
		n = s.p.layered.DiskCount()
		counts = append(counts, fmt.Sprintf("rootfs %d", n))
	}
	s.volumeLayers = make([][]rootfs.Layer, len(st.Volumes))
	for i, vol := range st.Volumes {
		if vol.Writable {
			if d := writableDiskCount(s.volumeMounts[i]); d > 0 {
				n += d
				counts = append(counts, fmt.Sprintf("volume %s %d", vol.Name, d))
			}
			continue
		}
		layers, err := rootfs.ReadOnlyDisks(s.volumeMounts[i])
		if err != nil && s.blockMode() {
			return fmt.Errorf("snapview: volume %s: block mode hands a volume to the guest as disks, but its view in snapshotter %s %w (use the blockfile, devmapper or erofs snapshotter)", vol.Name, s.p.snapshotter, err)
		}
		s.volumeLayers[i] = layers
		if d := rootfs.DiskCount(layers); d > 0 {
			n += d
			counts = append(counts, fmt.Sprintf("volume %s %d", vol.Name, d))
		}
	}
	if n > rootfs.MaxReadOnlyDisks {
		return fmt.Errorf("snapview: the container would have %d read-only disks (%s), more than the %d one container may have: each is a loop device of the node; use fewer volumes, or images with fewer layers",
			n, strings.Join(counts, ", "), rootfs.MaxReadOnlyDisks)
	}
	return nil
}

// attachVolume attaches each disk of volume i read-only: the file of a
// blockfile view or of each erofs layer to a read-only loop device held by
// this process, a devmapper view's device as it is; the guest gets them
// at /dev/snapview/volumes/<name>/<j>.
func (s *setupRun) attachVolume(i int) error {
	vol := &s.v.State.Volumes[i]
	vol.Disks = []bundle.Disk{}
	err := attachDisks(rootfs.DiskFiles(s.volumeLayers[i]), func(j int) string { return rootfs.VolumeDevice(vol.Name, j) }, &vol.Disks, &s.v.volumeDisks)
	if err != nil {
		return fmt.Errorf("snapview: volume %s: %w", vol.Name, err)
	}
	s.logger.WithFields(log.Fields{"volume": vol.Name, "disks": len(vol.Disks)}).Info("snapview: volume disks ready for the container")
	return nil
}

// attachDisks attaches each of files read-only (attachReadOnly), in order,
// as the container's disk at pathOf(i), and records each in *recorded as it
// is attached, and the devices this process holds open in *held, so that a
// rollback undoes those attached before a failure.
func attachDisks(files []string, pathOf func(int) string, recorded *[]bundle.Disk, held *[]*blockdev.Device) error {
	for i, f := range files {
		d, err := attachReadOnly(f)
		if err != nil {
			return fmt.Errorf("disk %d (%s): %w", i, f, err)
		}
		disk := bundle.Disk{Path: pathOf(i), Device: d.Path, Major: d.Major, Minor: d.Minor}
		if d.Backing != nil {
			*held = append(*held, d)
			disk.Loop = bundle.Loop{BackingFile: d.Backing.Path, BackingDev: d.Backing.Dev, BackingIno: d.Backing.Ino}
		}
		*recorded = append(*recorded, disk)
	}
	return nil
}

// attachReadOnly attaches a regular file to a read-only loop device, or
// resolves a block device (a devmapper view, which containerd activates
// writable) and makes it read-only at the block layer: a disk is read-only
// whatever the container's cgroup rules (a privileged container's allow-all
// rule comes before snapview's).
func attachReadOnly(path string) (*blockdev.Device, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode().IsRegular() {
		return blockdev.Attach(path, true)
	}
	d, err := blockdev.Resolve(path)
	if err != nil {
		return nil, err
	}
	if err := d.SetReadOnly(); err != nil {
		return nil, err
	}
	return d, nil
}

// volumeBinds are the binds of the volumes of a view-mode container: each
// read-only (a writable clone read-write), nosuid, nodev at its target.
func volumeBinds(st *bundle.State) []specs.Mount {
	var ms []specs.Mount
	for _, v := range st.Volumes {
		if v.Source != "" {
			access := "ro"
			if v.Writable {
				access = "rw"
			}
			ms = append(ms, specs.Mount{Destination: v.Target, Type: "bind", Source: v.Source, Options: []string{"rbind", access, "nosuid", "nodev"}})
		}
	}
	return ms
}

// volumeDocs describes the volumes of the setup for the container, by
// name, and nil for none: the image, where it is (view mode) or where the
// guest should mount it (block mode), and in block mode its disks,
// top-most layer first.
func (s *setupRun) volumeDocs() map[string]params.Volume {
	st := s.v.State
	if len(st.Volumes) == 0 {
		return nil
	}
	out := map[string]params.Volume{}
	for i, v := range st.Volumes {
		vp := params.Volume{Image: v.Image, Target: v.Target, Snapshot: v.Snapshot, Writable: s.writable[v.Name]}
		if v.Subpath != "/" {
			vp.Subpath = v.Subpath
		}
		if s.blockMode() && i < len(s.volumeLayers) {
			vp.Layers = rootfs.LayerParams(s.volumeLayers[i], diskPlaces(v.Disks))
		}
		out[v.Name] = vp
	}
	return out
}

// diskPlaces are where disks are: {host device, container path}.
func diskPlaces(disks []bundle.Disk) [][2]string {
	out := make([][2]string, len(disks))
	for i, d := range disks {
		out[i] = [2]string{d.Device, d.Path}
	}
	return out
}

// releaseVolumes undoes what the volume step did, volume by volume in
// reverse: on this host each volume's disks (loop devices still bound to
// the recorded backing inode) or its mount (and the loop devices it
// attached), then its mount-manager activation in containerd.
func (t *teardownRun) releaseVolumes(ctx context.Context) error {
	st := t.v.State
	var errs []error
	for _, d := range t.v.volumeDisks {
		errs = append(errs, d.Close())
	}
	for _, vol := range slices.Backward(st.Volumes) {
		if t.host {
			for _, d := range slices.Backward(vol.Disks) {
				if d.Loop.BackingFile != "" {
					errs = append(errs, t.detach(d.Device, d.Loop))
				}
			}
			if d := vol.WritableDisk; d != nil && d.Loop.BackingFile != "" {
				errs = append(errs, t.detach(d.Device, d.Loop))
			}
			if vol.Mountpoint != "" {
				errs = append(errs, unmountAt(vol.Mountpoint, vol.LoopDevices, vol.Mounts))
			}
		}
		errs = append(errs, t.deactivate(ctx, vol.Activation))
	}
	if t.host {
		if err := os.Remove(bundle.VolumesDir(t.v.Bundle)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeVolumeViews removes each volume's view in containerd.
func (t *teardownRun) removeVolumeViews(ctx context.Context) error {
	st := t.v.State
	var errs []error
	for _, vol := range slices.Backward(st.Volumes) {
		err := t.removeViewKey(ctx, vol.ViewKey)
		if err == nil {
			t.logger.WithFields(log.Fields{"volume": vol.Name, "key": vol.ViewKey}).Info("snapview: volume removed")
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
