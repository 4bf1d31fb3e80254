package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/rootfs"
)

// Annotations of CRI's that snapview reads.
const (
	annotationContainerType = "io.kubernetes.cri.container-type"
	containerTypeSandbox    = "sandbox"
)

// Request is what Decide needs to know about a task being created.
type Request struct {
	Namespace string
	ID        string
	Bundle    string
	// Rootfs are the rootfs mounts containerd sent, not yet mounted.
	Rootfs []rootfs.Mount
	Config *config.Config
}

// Plan is what Decide decided for a container, before any side effect.
type Plan struct {
	// Skip, when set, says why the container gets no view; the rest of
	// the plan is then empty.
	Skip string

	req         Request
	mode        string
	snapshotter string
	parent      string
	spec        *bundle.Config
	ann         *annotations.Request
	// params describe the rootfs in view mode; block mode fills them in
	// once the device is known.
	params rootfs.Params
	// block is the block-backed rootfs of one disk, in block mode; layered
	// the layered one (the erofs snapshotter in block mode).
	block   *rootfs.BlockSource
	layered *rootfs.Layered
	// claimRootfs: the rootfs holds mounts snapview claims from
	// containerd's mount manager, and this container does not hand them
	// to a guest, so the shim has the mount manager perform them, as
	// containerd would have.
	claimRootfs bool
	// volumes are the container's volumes; lookup finds their snapshots.
	volumes []volumePlan
	// monitor is block mode's monitor rootfs: "view" or a host directory
	// of the configuration; monitorFrom names the setting it came from,
	// for errors.
	monitor, monitorFrom string
	// readOnlyRootfs: runc cannot create bind targets in the rootfs.
	readOnlyRootfs bool
	// restore is the disk snapshot the writable disk starts as, if any.
	restore *restorePlan
	// clientRootfs: the container has no rootfs mounts, its client mounted
	// the rootfs itself (Docker); the view is then of the image the
	// container record names, found in [view] image_snapshotter.
	clientRootfs bool
	// source is view.source for a view-mode container whose rootfs
	// mounts containerd sent: "layers" has setup try to derive the view
	// from them (StepDerive) before it makes a leased one.
	source string
}

// Mode returns the planned mode: view or block ("" when skipped).
func (p *Plan) Mode() string { return p.mode }

// blockMode reports whether the plan hands the container disks.
func (p *Plan) blockMode() bool { return p.block != nil || p.layered != nil }

// skip returns the plan of a container that gets no view, for reason: it
// keeps only what a view-less setup needs, the rootfs mounts to perform.
func skip(r Request, reason string) *Plan {
	return &Plan{Skip: reason, req: r, claimRootfs: rootfs.Claimed(r.Rootfs)}
}

// Decide reads the bundle's config.json, the container's annotations and
// the configuration, checks the rootfs and looks up the container's
// snapshot, and returns the plan. It changes nothing. A request that
// snapview must refuse is an error that starts with "snapview:" and names
// the annotation, setting or rootfs at fault.
func (l *Lifecycle) Decide(ctx context.Context, r Request) (*Plan, error) {
	p, err := decideLocal(ctx, r)
	if err != nil || p.Skip != "" {
		return p, err
	}
	return l.lookup(ctx, p)
}

// decideLocal is the part of Decide that needs no call into containerd:
// the bundle's config.json, the annotations, the configuration and the
// rootfs mounts.
func decideLocal(ctx context.Context, r Request) (*Plan, error) {
	spec, err := bundle.ReadConfig(r.Bundle)
	if err != nil {
		return nil, err
	}
	cfg := r.Config
	if spec.Annotations[annotationContainerType] == containerTypeSandbox && !cfg.View.Sandbox {
		// Pod annotations reach the sandbox too: they are not for it.
		return skip(r, "CRI sandbox container (view.sandbox is off)"), nil
	}
	ann, err := annotations.Parse(spec.Annotations, cfg.View.BootDir)
	if err != nil {
		return nil, err
	}
	mode, modeFrom := cfg.View.Mode, fmt.Sprintf("view.mode in %s", cfg.Source)
	if ann.Mode != "" {
		mode, modeFrom = ann.Mode, fmt.Sprintf("annotation %s", annotations.Mode)
	}
	p := &Plan{req: r, mode: mode, spec: spec, ann: ann, claimRootfs: rootfs.Claimed(r.Rootfs)}
	if ann.MonitorRootfs != "" && mode != config.ModeBlock {
		return nil, fmt.Errorf("snapview: annotation %s=%q applies only in block mode, but the mode is %s (%s)", annotations.MonitorRootfs, ann.MonitorRootfs, mode, modeFrom)
	}
	if err := p.checkVolumes(); err != nil {
		return nil, err
	}
	if err := p.checkRestore(mode, modeFrom); err != nil {
		return nil, err
	}
	if mode != config.ModeBlock {
		if err := checkNoGuestDisk(r, mode, modeFrom); err != nil {
			return nil, err
		}
	}
	switch mode {
	case config.ModeOff:
		if ann.HasBinds() {
			return nil, fmt.Errorf("snapview: %s asks for binds from the view, but the mode is off (%s)", bindAnnotations(ann), modeFrom)
		}
		return skip(r, "mode off ("+modeFrom+")"), nil
	case config.ModeBlock:
		if err := p.checkBlock(ctx, modeFrom); err != nil {
			return nil, err
		}
		p.claimRootfs = false // the rootfs becomes the guest's disks
		if err := p.chooseMonitor(); err != nil {
			return nil, err
		}
	case config.ModeView:
		if len(r.Rootfs) == 0 {
			if spec.RootPath == "" {
				return p.noView("the container has no rootfs mounts (no image snapshot)")
			}
			// A rootfs its client mounted (Docker): lookup looks for the
			// container's image.
			p.clientRootfs = true
			p.params = rootfs.Params{Kind: rootfs.KindFS, FSType: "bind", Source: spec.RootPath, Options: []string{"rbind"}}
			return p, nil
		}
		if p.params, err = rootfs.FromMounts(r.Rootfs); err != nil {
			return nil, fmt.Errorf("snapview: rootfs of %s: %w", r.ID, err)
		}
		p.readOnlyRootfs = rootfs.ReadOnly(r.Rootfs)
		p.source = cfg.View.Source
	}
	return p, nil
}

// checkNoGuestDisk refuses a container whose rootfs would be mounted on the
// host (any mode but block) although its disk image was handed to a guest
// by an earlier task of the container in block mode: a filesystem a guest
// wrote is never mounted on the host (a crafted or concurrently written
// ext4 is a host kernel hazard).
func checkNoGuestDisk(r Request, mode, modeFrom string) error {
	for _, m := range r.Rootfs {
		if !slices.Contains(m.Options, "loop") && !strings.HasPrefix(m.Type, "mkfs/") {
			continue
		}
		who, err := blockdev.GuestWritten(m.Source)
		if err != nil {
			return fmt.Errorf("snapview: %w", err)
		}
		if who != "" {
			return fmt.Errorf("snapview: the container's writable disk %s was handed to a guest (container %s in block mode), and snapview never mounts on the host a filesystem a guest wrote; mode %s (%s) would mount it: run the container in block mode", m.Source, who, mode, modeFrom)
		}
	}
	return nil
}

// lookup completes plan p from containerd: the container's snapshotter
// and snapshot, and the snapshot's parent, which the view is a view of. It
// returns a plan that skips the view if there is no image snapshot.
func (l *Lifecycle) lookup(ctx context.Context, p *Plan) (*Plan, error) {
	r := p.req
	sn, key, err := l.backend.Container(ctx, r.ID)
	if err != nil {
		return nil, fmt.Errorf("snapview: look up container %s: %w", r.ID, err)
	}
	if key == "" || sn == "" {
		if p.clientRootfs {
			return l.lookupImage(ctx, p)
		}
		return p.noView("the container has no image snapshot (e.g. ctr run --rootfs)")
	}
	if p.clientRootfs {
		// A snapshot, but not its mounts: not a shape containerd makes.
		return p.noView("the container has no rootfs mounts (no image snapshot)")
	}
	s, err := l.backend.Snapshotter(sn)
	if err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	info, err := s.Stat(cctx, key)
	if err != nil {
		return nil, fmt.Errorf("snapview: stat snapshot %s of container %s in %s: %w", key, r.ID, sn, err)
	}
	if info.Parent == "" {
		return p.noView("the container's snapshot has no parent image")
	}
	p.snapshotter, p.parent = sn, info.Parent
	return l.resolveRest(ctx, p)
}

// resolveRest completes a plan whose view's parent is known: the block
// mode files' confinement, the volumes and the restore.
func (l *Lifecycle) resolveRest(ctx context.Context, p *Plan) (*Plan, error) {
	if err := l.confine(ctx, p); err != nil {
		return nil, err
	}
	if err := l.resolveVolumes(ctx, p); err != nil {
		return nil, err
	}
	if err := l.resolveRestore(ctx, p); err != nil {
		return nil, err
	}
	return p, nil
}

// lookupImage completes the plan of a container whose client mounted its
// rootfs itself (Docker with containerd's image store): no snapshot key,
// but the image the container record names, whose layers are unpacked in
// the configured [view] image_snapshotter. Its top snapshot is the view's
// parent, as a container snapshot's parent would be. A container that
// names no image gets no view.
func (l *Lifecycle) lookupImage(ctx context.Context, p *Plan) (*Plan, error) {
	r := p.req
	ref, err := l.backend.ContainerImage(ctx, r.ID)
	if err != nil {
		return nil, fmt.Errorf("snapview: look up container %s: %w", r.ID, err)
	}
	if ref == "" {
		return p.noView("the container has no image snapshot: no rootfs mounts, and it names no image (its client gave a rootfs of its own, as ctr run --rootfs does)")
	}
	sn := r.Config.View.ImageSnapshotter
	fail := func(err error) error {
		return fmt.Errorf("snapview: the image %s of container %s, whose client mounted its rootfs itself (as Docker does), viewed in snapshotter %s ([view] image_snapshotter in %s): %w", ref, r.ID, sn, r.Config.Source, err)
	}
	// A container that asks for nothing of the view runs without one when
	// its image cannot be viewed (another store, another snapshotter), as
	// such a container did before snapview viewed client-mounted rootfs.
	unviewable := func(err error) (*Plan, error) {
		if p.ann.HasBinds() {
			return nil, fail(err)
		}
		log.G(ctx).WithError(err).WithFields(log.Fields{"id": r.ID, "image": ref, "snapshotter": sn}).
			Info("snapview: the container's client mounted its rootfs, and its image cannot be viewed: no view")
		return p.noView(fmt.Sprintf("its client mounted its rootfs, and its image %s is not viewable in snapshotter %s", ref, sn))
	}
	s, err := l.backend.Snapshotter(sn)
	if err != nil {
		return unviewable(err)
	}
	cs, err := l.backend.Content()
	if err != nil {
		return nil, fmt.Errorf("snapview: %w", err)
	}
	p.snapshotter = sn
	chain, err := l.volumeSource(ctx, cs, s, p, annotations.Volume{Ref: ref})
	if err != nil {
		return unviewable(err)
	}
	p.parent = chain
	log.G(ctx).WithFields(log.Fields{"id": r.ID, "image": ref, "snapshotter": sn, "parent": chain}).
		Debug("snapview: the container's client mounted its rootfs: the view is of its image")
	return l.resolveRest(ctx, p)
}

// confine checks that every file block mode will create, format or attach
// (a layered rootfs's writable image and layer files, a blockfile image)
// lies inside the root directory of the container's snapshotter, as
// containerd confines its own mkfs to its snapshotters' roots: a Create
// request cannot make the shim format or hand a guest any other file. A
// block device (devmapper) is not a file, and is not checked here.
func (l *Lifecycle) confine(ctx context.Context, p *Plan) error {
	var files []string
	switch {
	case p.layered != nil:
		files = append([]string{p.layered.Writable.Source}, p.layered.Disks()...)
	case p.block != nil && p.block.Loop:
		files = []string{p.block.Mount.Source}
	default:
		return nil
	}
	root, err := l.snapshotterRoot(ctx, p.snapshotter)
	if err != nil {
		return fmt.Errorf("snapview: block mode: the root directory of snapshotter %s: %w", p.snapshotter, err)
	}
	if root == "" {
		return fmt.Errorf("snapview: block mode: containerd does not say where snapshotter %s keeps its files (a proxy snapshotter has no root), and snapview creates and attaches disk images only there", p.snapshotter)
	}
	for _, f := range files {
		if err := within(root, f); err != nil {
			return fmt.Errorf("snapview: block mode: the rootfs names the disk image %s, which %w; snapview creates and attaches disk images only inside snapshotter %s's root %s", f, err, p.snapshotter, root)
		}
	}
	return nil
}

// snapshotterRoot returns snapshotter name's root directory, asked once.
func (l *Lifecycle) snapshotterRoot(ctx context.Context, name string) (string, error) {
	if r, ok := l.roots.Load(name); ok {
		return r.(string), nil
	}
	r, err := l.backend.SnapshotterRoot(ctx, name)
	if err != nil {
		return "", err
	}
	l.roots.Store(name, r)
	return r, nil
}

// within checks that file, not a symlink, lies inside directory root, their
// symlinks resolved.
func within(root, file string) error {
	if fi, err := os.Lstat(file); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		return errors.New("is a symlink")
	}
	r, err := filepath.EvalSymlinks(root)
	if err != nil {
		return fmt.Errorf("cannot be checked: %w", err)
	}
	d, err := filepath.EvalSymlinks(filepath.Dir(file))
	if err != nil {
		return fmt.Errorf("cannot be checked: %w", err)
	}
	if rel, err := filepath.Rel(r, d); err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return errors.New("is outside it")
	}
	return nil
}

// checkBlock refuses block mode for a container it cannot serve, before
// anything is mounted: the rootfs must be one writable block-backed mount
// (a devmapper device, or a blockfile image with the loop option) or a
// layered one (the erofs snapshotter in block mode), and the spec must not
// ask for a user namespace (runc would bind the host's device node, which a
// remapped root cannot open).
func (p *Plan) checkBlock(ctx context.Context, modeFrom string) error {
	const want = "a block-backed rootfs (the blockfile or devmapper snapshotter, or erofs in block mode)"
	mounts := p.req.Rootfs
	if len(mounts) == 0 {
		return fmt.Errorf("snapview: block mode (%s) needs %s, but the container has no rootfs mounts: its client mounted the rootfs on the host itself (as Docker does) or gave a directory (ctr run --rootfs), and a guest's disk must never be mounted on the host; run it through ctr, nerdctl or CRI", modeFrom, want)
	}
	if rootfs.IsLayered(mounts) {
		l, err := rootfs.DetectLayered(mounts)
		if err != nil {
			return fmt.Errorf("snapview: block mode (%s) needs %s: %w", modeFrom, want, err)
		}
		p.layered = &l
	} else {
		src, err := rootfs.DetectBlock(mounts)
		if err != nil {
			return fmt.Errorf("snapview: block mode (%s) needs %s: %w", modeFrom, want, err)
		}
		p.block = &src
	}
	if p.spec.UserNamespace {
		return fmt.Errorf("snapview: block mode (%s) is refused for a container with a user namespace: runc would bind the host's device node, which the remapped root cannot open", modeFrom)
	}
	if err := checkDeviceRuntime(ctx, p.req.Config.BinaryName); err != nil {
		return fmt.Errorf("snapview: block mode (%s) %w", modeFrom, err)
	}
	return nil
}

// chooseMonitor settles block mode's monitor rootfs: the configuration's
// block.monitor_rootfs, unless the container chose another by name among
// those the configuration offers (annotation io.snapview.monitor-rootfs).
func (p *Plan) chooseMonitor() error {
	cfg := p.req.Config
	name := p.ann.MonitorRootfs
	if name == "" {
		p.monitor = cfg.Block.MonitorRootfs
		p.monitorFrom = fmt.Sprintf("block.monitor_rootfs %q in %s", p.monitor, cfg.Source)
		return nil
	}
	dir, ok := cfg.Monitor(name)
	if !ok {
		return fmt.Errorf("snapview: annotation %s=%q: the configuration (%s) offers no monitor rootfs of that name; choose one of %s",
			annotations.MonitorRootfs, name, cfg.Source, strings.Join(cfg.MonitorChoices(), ", "))
	}
	p.monitor = dir
	p.monitorFrom = fmt.Sprintf("block.monitors.%s %q in %s, chosen by annotation %s", name, dir, cfg.Source, annotations.MonitorRootfs)
	return nil
}

// noView skips the view with reason, or fails if the annotations ask for
// binds that need it.
func (p *Plan) noView(reason string) (*Plan, error) {
	if p.mode == config.ModeBlock {
		return nil, fmt.Errorf("snapview: block mode needs the container's image view, but %s", reason)
	}
	if p.ann.HasBinds() {
		return nil, fmt.Errorf("snapview: %s asks for binds from the image, but %s", bindAnnotations(p.ann), reason)
	}
	return skip(p.req, reason), nil
}

// bindAnnotations names the annotations of req that ask for binds.
func bindAnnotations(req *annotations.Request) string {
	var names []string
	for _, a := range req.Artifacts {
		names = append(names, annotations.BootPrefix+a.Name)
	}
	if req.ViewTarget != "" {
		names = append(names, annotations.ViewTarget)
	}
	for _, v := range req.Volumes {
		names = append(names, annotations.VolumePrefix+v.Name)
	}
	return "annotation " + strings.Join(names, ", ")
}
