// Package lifecycle owns the lifecycle of a container's view: every path
// that creates, finds or removes one goes through it.
//
//	Decide    reads the spec, annotations, configuration and rootfs and looks
//	          up the container's snapshot. No side effects. The plan says
//	          whether the container gets a view, in which mode, and why not.
//	Setup     carries out a plan as the list of steps setupSteps:
//	          snapview's bundle directory, lease, view, the view's
//	          mount-manager activation, mount, the rootfs mounts snapview
//	          claimed from containerd (when they do not go to a guest), in
//	          block mode the writable image (made if new), the writable disk
//	          and the read-only layer disks, boot artifacts, monitor rootfs,
//	          state file, params file, config.json patch, in that order; each
//	          applies or not to the plan. Each side effect is recorded
//	          before it is attempted, so a call that fails or times out
//	          after taking effect is still undone. On failure everything
//	          recorded is undone before Setup returns.
//	Teardown  undoes a View in reverse order. Every step runs; errors are
//	          joined; an object already gone is success; it can run any
//	          number of times. A View that was not set up by this process
//	          (recovered, or a rolled-back partial setup) is removed only
//	          where containerd's objects still carry its owner labels.
//	Recover   rebuilds a View in a process that did not set it up (the
//	          dead-shim `delete` action, the orphan sweep): from the state
//	          file when it is valid for the bundle, container and namespace,
//	          else from the deterministic names. A bundle without snapview's
//	          directory or state file never had a view: Recover answers that
//	          without calling containerd.
//
// The shim's task service (Create, Delete), its manager's Stop and the sweep
// are thin callers of these four. Dependencies point one way: lifecycle uses
// bundle, lease, view, blockdev, rootfs, boot, annotations and config, and
// reaches containerd only through Backend.
package lifecycle

import (
	"context"
	"fmt"
	"runtime/debug"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"

	"github.com/snapview/snapview/pkg/fault"
)

// Backend is the part of containerd the lifecycle calls: the shim and
// snapviewctl use containerd's gRPC API (package backend), the unit tests
// containerd's metadata store in process.
type Backend interface {
	// Container returns the snapshotter and snapshot key of container id;
	// a missing container is an error wrapping errdefs.ErrNotFound.
	Container(ctx context.Context, id string) (snapshotter, snapshotKey string, err error)
	// ContainerImage returns the image container id names ("" for none).
	ContainerImage(ctx context.Context, id string) (string, error)
	Snapshotter(name string) (snapshots.Snapshotter, error)
	Leases() (leases.Manager, error)
	Mounts() (mount.Manager, error)
	// Image returns the image record name (its target and labels) in the
	// namespace of ctx; a missing image is an error wrapping
	// errdefs.ErrNotFound.
	Image(ctx context.Context, name string) (images.Image, error)
	// Content reads containerd's content store (images' manifests and
	// configs).
	Content() (content.Provider, error)
	// SnapshotterRoot returns the root directory of snapshotter name, as
	// containerd knows it, or "" when it knows none.
	SnapshotterRoot(ctx context.Context, name string) (string, error)
}

// Lifecycle runs the lifecycle of views against one containerd.
type Lifecycle struct {
	backend Backend
	// roots caches each snapshotter's root directory, by name.
	roots sync.Map
	// afterStep, when set, runs after each setup step took effect; an error
	// fails the setup at that point. Unit tests use it to fail every step
	// in turn.
	afterStep func(step string) error
}

// New returns a Lifecycle that calls containerd through b.
func New(b Backend) *Lifecycle {
	return &Lifecycle{backend: b}
}

// Setup steps, in order; the names appear in logs and errors.
const (
	StepDir      = "dir"
	StepLease    = "lease"
	StepView     = "view"
	StepActivate = "activate"
	StepMount    = "mount"
	StepRootfs   = "rootfs"
	// StepDerive takes the view's mounts from the layers the rootfs names
	// (view.source "layers"), before the lease and view it then spares.
	StepDerive = "derive"
	StepFormat = "format"
	// StepRestore writes a disk snapshot into the writable disk.
	StepRestore = "restore"
	StepDevice  = "device"
	StepLayers  = "layers"
	// StepVolumeViews creates the volumes' views; StepVolumes mounts them
	// (view mode) or attaches their disks (block mode).
	StepVolumeViews = "volume-views"
	StepVolumes     = "volumes"
	StepArtifacts   = "artifacts"
	StepMonitor     = "monitor"
	StepState       = "state"
	StepParams      = "params"
	StepConfig      = "config"
)

// callTimeout bounds each call into containerd (a variable for the tests).
var callTimeout = 10 * time.Second

// CleanupTimeout bounds a rollback or teardown that runs after its
// caller's context ended.
const CleanupTimeout = 30 * time.Second

// CleanupContext returns a context for cleanup after ctx failed or was
// cancelled: not cancelled with ctx, bounded by CleanupTimeout.
func CleanupContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), CleanupTimeout)
}

// recoverTo turns a panic in snapview's own code, while it handles
// container id, into an error in *errp, logged with its stack. One shim
// process serves a whole pod, and containerd force-deletes every container
// of a shim that dies: a bug met by one container's input must fail that
// container's request, not the pod. Deferred directly, after any deferred
// rollback that reads *errp, so that the rollback runs.
func recoverTo(ctx context.Context, errp *error, what, id string) {
	r := recover()
	if r == nil {
		return
	}
	log.G(ctx).WithFields(log.Fields{"id": id, "panic": fmt.Sprint(r), "stack": string(debug.Stack())}).Error("snapview: internal error")
	*errp = fmt.Errorf("snapview: internal error in the %s of %s: %v", what, id, r)
}

// step runs after setup step name took effect for container id: the
// crash point of a fault build of the shim, and the unit tests' hook.
func (l *Lifecycle) step(name, id string) error {
	fault.Point(name, id)
	if l.afterStep == nil {
		return nil
	}
	return l.afterStep(name)
}

// Crash points of teardown, for the fault build (see package fault).
const (
	PointTeardownUnmounted = "teardown-unmounted"
	PointTeardownRemoved   = "teardown-removed"
)
