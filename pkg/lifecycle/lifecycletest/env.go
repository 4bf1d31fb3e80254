// Package lifecycletest is containerd's own metadata store, in process,
// behind the lifecycle's Backend, for the unit tests of the packages that
// drive the view lifecycle (lifecycle, shim, sweep). It can make a call take
// effect and then report a timeout, and make containerd stop answering.
package lifecycletest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/mount/manager"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/containerd/v2/plugins/snapshots/native"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	imagespecs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/santhosh-tekuri/jsonschema/v6"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/snapview/snapview/params"
	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/rootfs"
	"github.com/snapview/snapview/pkg/view"
)

// Env is containerd's own metadata store, in process, over a native
// snapshotter, with an image layer to take views of: the same lease,
// snapshot and container semantics as a daemon.
type Env struct {
	Ctx         context.Context
	Dir         string
	DB          *metadata.DB
	Snapshotter snapshots.Snapshotter
	Leases      leases.Manager
	Containers  containers.Store
	// Mounts is containerd's mount manager, over its own bolt database.
	Mounts mount.Manager
	// Parent is the committed image layer every container's snapshot has.
	Parent  string
	Backend *Backend
}

// Files of the test image layer.
const (
	KernelPath    = "/boot/vmlinux"
	KernelContent = "a guest kernel"
)

// NS is the namespace of the tests.
const NS = "test"

// NewEnv returns a fresh metadata store with one committed image layer,
// holding the files KernelPath and /etc/passwd and the symlink
// /boot/escape (to /etc/shadow). It needs root, since the lifecycle mounts
// views, and skips the test without it.
func NewEnv(t *testing.T) *Env {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root: the lifecycle mounts views")
	}
	dir := t.TempDir()
	// Only if a test failed halfway: nothing stays mounted in the
	// temporary directory (the tests' own checks ran before this).
	t.Cleanup(func() { _ = mount.UnmountRecursive(dir, unix.MNT_DETACH) })
	bdb, err := bolt.Open(filepath.Join(dir, "meta.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = bdb.Close() })
	cs, err := local.NewStore(filepath.Join(dir, "content"))
	if err != nil {
		t.Fatal(err)
	}
	nsn, err := native.NewSnapshotter(filepath.Join(dir, "native"))
	if err != nil {
		t.Fatal(err)
	}
	db := metadata.NewDB(bdb, cs, map[string]snapshots.Snapshotter{"native": nsn})
	ctx := namespaces.WithNamespace(context.Background(), NS)
	if err := db.Init(ctx); err != nil {
		t.Fatal(err)
	}
	mdb, err := bolt.Open(filepath.Join(dir, "mounts.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mdb.Close() })
	mm, err := manager.NewManager(mdb, filepath.Join(dir, "mount-targets"))
	if err != nil {
		t.Fatal(err)
	}
	e := &Env{Ctx: ctx, Dir: dir, DB: db, Snapshotter: db.Snapshotter("native"), Leases: metadata.NewLeaseManager(db), Containers: metadata.NewContainerStore(db), Mounts: mm}
	e.Backend = &Backend{env: e}

	// The image: one committed layer, held by a lease as an image would be.
	lctx := leases.WithLease(ctx, "image")
	if _, err := e.Leases.Create(ctx, leases.WithID("image")); err != nil {
		t.Fatal(err)
	}
	ms, err := e.Snapshotter.Prepare(lctx, "layer-active", "")
	if err != nil {
		t.Fatal(err)
	}
	layer := ms[0].Source // native: a bind of this directory
	for p, data := range map[string]string{KernelPath: KernelContent, "/etc/passwd": "root:x:0:0::/:/bin/sh\n"} {
		if err := os.MkdirAll(filepath.Join(layer, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(layer, p), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/etc/shadow", filepath.Join(layer, "boot", "escape")); err != nil {
		t.Fatal(err)
	}
	if err := e.Snapshotter.Commit(lctx, "layer", "layer-active"); err != nil {
		t.Fatal(err)
	}
	e.Parent = "layer"
	return e
}

// Image creates the image name in namespace ns, as an import would leave
// it: its manifest and config in the content store (for linux on this
// machine's architecture), and its one layer, holding files (path →
// content; a value starting with "->" is a symlink), unpacked in the native
// snapshotter as the committed snapshot of its chain id, which it returns.
// With unpacked false, the layer is left out of the snapshotter.
func (e *Env) Image(t *testing.T, ns, name string, files map[string]string, unpacked bool) string {
	t.Helper()
	ctx := leases.WithLease(namespaces.WithNamespace(context.Background(), ns), "image")
	if _, err := e.Leases.Create(ctx, leases.WithID("image")); err != nil && !errdefs.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	diffID := digest.FromString("layer of " + name)
	cfg, _ := json.Marshal(ocispec.Image{Platform: platforms.DefaultSpec(), RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{diffID}}})
	cs := e.DB.ContentStore()
	write := func(mediaType string, data []byte) ocispec.Descriptor {
		d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(data), Size: int64(len(data))}
		if err := content.WriteBlob(ctx, cs, d.Digest.String(), bytes.NewReader(data), d); err != nil {
			t.Fatal(err)
		}
		return d
	}
	config := write(ocispec.MediaTypeImageConfig, cfg)
	man, _ := json.Marshal(ocispec.Manifest{Versioned: specsVersioned(), MediaType: ocispec.MediaTypeImageManifest, Config: config,
		Layers: []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString("blob of " + name), Size: 1}}})
	target := write(ocispec.MediaTypeImageManifest, man)
	if _, err := metadata.NewImageStore(e.DB).Create(ctx, images.Image{Name: name, Target: target}); err != nil {
		t.Fatal(err)
	}
	if unpacked {
		ms, err := e.Snapshotter.Prepare(ctx, "unpack-"+name, "")
		if err != nil {
			t.Fatal(err)
		}
		for p, data := range files {
			host := filepath.Join(ms[0].Source, p)
			if err := os.MkdirAll(filepath.Dir(host), 0o755); err != nil {
				t.Fatal(err)
			}
			if link, ok := strings.CutPrefix(data, "->"); ok {
				err = os.Symlink(link, host)
			} else {
				err = os.WriteFile(host, []byte(data), 0o644)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		if err := e.Snapshotter.Commit(ctx, diffID.String(), "unpack-"+name); err != nil {
			t.Fatal(err)
		}
	}
	return diffID.String()
}

func specsVersioned() imagespecs.Versioned { return imagespecs.Versioned{SchemaVersion: 2} }

// ContainerWithoutSnapshot creates a container record that has no snapshot,
// and a bundle, as a container whose rootfs mounts come from elsewhere; it
// returns a create request with rootfs mounts.
func (e *Env) ContainerWithoutSnapshot(t *testing.T, id string) lifecycle.Request {
	t.Helper()
	return e.ContainerWithImage(t, id, "", nil)
}

// ContainerWithImage creates a container record that names image ("" for
// none) and has no snapshot, as Docker's containers do (it mounts their
// rootfs itself), and a bundle whose config.json carries ann; it returns a
// create request with rootfs mounts, which the caller may drop.
func (e *Env) ContainerWithImage(t *testing.T, id, image string, ann map[string]string) lifecycle.Request {
	t.Helper()
	r := e.Container(t, id+"-template", ann)
	if _, err := e.Containers.Create(e.Ctx, containers.Container{
		ID: id, Runtime: containers.RuntimeInfo{Name: "io.containerd.snapview.v2"}, Spec: &anypb.Any{}, Image: image,
	}); err != nil {
		t.Fatal(err)
	}
	bundlePath := filepath.Join(e.Dir, "bundles", id)
	if err := os.Rename(r.Bundle, bundlePath); err != nil {
		t.Fatal(err)
	}
	r.ID, r.Bundle = id, bundlePath
	return r
}

// Container creates a container record with its own snapshot of the layer
// and a bundle whose config.json carries ann, and returns its create request.
func (e *Env) Container(t *testing.T, id string, ann map[string]string, specOpts ...func(*specs.Spec)) lifecycle.Request {
	t.Helper()
	lctx := leases.WithLease(e.Ctx, "image")
	key := id + "-snapshot"
	ms, err := e.Snapshotter.Prepare(lctx, key, e.Parent)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Containers.Create(e.Ctx, containers.Container{
		ID: id, Runtime: containers.RuntimeInfo{Name: "io.containerd.snapview.v2"}, Spec: &anypb.Any{},
		Snapshotter: "native", SnapshotKey: key,
	}); err != nil {
		t.Fatal(err)
	}
	bundlePath := filepath.Join(e.Dir, "bundles", id)
	if err := os.MkdirAll(bundlePath, 0o711); err != nil {
		t.Fatal(err)
	}
	// The task's working directory, as containerd links it from the bundle
	// (on its root filesystem, here beside the bundles).
	work := filepath.Join(e.Dir, "work", id)
	if err := os.MkdirAll(work, 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(work, filepath.Join(bundlePath, "work")); err != nil {
		t.Fatal(err)
	}
	spec := specs.Spec{Version: "1.2.0", Process: &specs.Process{Args: []string{"sh"}, User: specs.User{UID: 1000, GID: 1000}},
		Root: &specs.Root{Path: "rootfs"}, Annotations: ann,
		Linux: &specs.Linux{Resources: &specs.LinuxResources{Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}}}}}
	for _, o := range specOpts {
		o(&spec)
	}
	data, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bundlePath, "config.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	var mounts []rootfs.Mount
	for _, m := range ms {
		mounts = append(mounts, rootfs.Mount{Type: m.Type, Source: m.Source, Options: m.Options})
	}
	return lifecycle.Request{Namespace: NS, ID: id, Bundle: bundlePath, Rootfs: mounts, Config: config.Default()}
}

// SetUp decides and sets up the view of r with l, failing the test on any
// error.
func (e *Env) SetUp(t *testing.T, l *lifecycle.Lifecycle, r lifecycle.Request) *lifecycle.View {
	t.Helper()
	p, err := l.Decide(e.Ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if p.Skip != "" {
		t.Fatalf("no view: %s", p.Skip)
	}
	v, err := l.Setup(e.Ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// CheckNothingLeft checks that nothing of container id's view is left:
// no lease, no view snapshot (after a garbage collection), no mount and no
// file of snapview's in the bundle, and config.json as it was.
func (e *Env) CheckNothingLeft(t *testing.T, r lifecycle.Request, config []byte) {
	t.Helper()
	if _, err := lease.Get(e.Ctx, e.Leases, r.ID); !errdefs.IsNotFound(err) {
		t.Errorf("lease left: %v", err)
	}
	if _, err := e.DB.GarbageCollect(e.Ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Snapshotter.Stat(e.Ctx, view.Key(r.ID)); !errdefs.IsNotFound(err) {
		t.Errorf("view left: %v", err)
	}
	if err := e.Snapshotter.Walk(e.Ctx, func(_ context.Context, info snapshots.Info) error {
		if strings.HasPrefix(info.Name, view.Key(r.ID)+"/") {
			t.Errorf("volume view left: %s", info.Name)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if mounts, _ := mountinfo.GetMounts(mountinfo.PrefixFilter(r.Bundle)); len(mounts) > 0 {
		t.Errorf("mounts left under the bundle: %v", mounts)
	}
	acts, err := e.Mounts.List(e.Ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range acts {
		if a.Name == r.ID || a.Name == view.Key(r.ID) || strings.HasPrefix(a.Name, view.Key(r.ID)+"/") {
			t.Errorf("mount activation left: %s %v", a.Name, a.Labels)
		}
	}
	entries, err := os.ReadDir(r.Bundle)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	if strings.Join(names, ",") != "config.json,work" {
		t.Errorf("bundle holds %v, want config.json and containerd's work link alone", names)
	}
	if entries, err := os.ReadDir(filepath.Join(r.Bundle, "work")); err != nil || len(entries) > 0 {
		t.Errorf("the task's working directory holds %v (%v), want nothing", entries, err)
	}
	if got, _ := os.ReadFile(filepath.Join(r.Bundle, "config.json")); config != nil && string(got) != string(config) {
		t.Errorf("config.json not restored:\n%s\nwant\n%s", got, config)
	}
}

// ReadFile returns the content of path.
func ReadFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Backend is lifecycle.Backend over Env's metadata store. It can simulate
// a call that takes effect but reports a timeout, and containerd being
// down. Set its fields only while no lifecycle call runs.
type Backend struct {
	env *Env

	// LateLease and LateView make lease Create and snapshot View take
	// effect, then fail as a call that timed out would.
	LateLease, LateView bool
	// Down makes every call fail with ErrDown, as when containerd does not
	// answer.
	Down bool
	// OnContainer, when set, runs before each Container lookup.
	OnContainer func(id string)
	// ContainerErr, when set, is what every Container lookup returns.
	ContainerErr error
	// OnCall, when set, runs before every call, with the call's name
	// (Container, Snapshotter, Leases, Mounts); a test can hold a call there.
	OnCall func(name string)
	// ActivateDelay makes every mount-manager activation take that long
	// more, as a slow mkfs or many layers do.
	ActivateDelay time.Duration
	// Roots are the snapshotters' root directories SnapshotterRoot
	// answers; a snapshotter not in it has "/".
	Roots map[string]string
	// ManagedViews makes every view's mounts need containerd's mount
	// manager (a bind of a templated bind), as an erofs view of several
	// layers does.
	ManagedViews bool

	mu    sync.Mutex
	calls int
}

// ErrDown is what every call returns while Backend.Down is set.
var ErrDown = errors.New("containerd is not answering")

// Calls returns how many calls reached the backend so far.
func (b *Backend) Calls() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.calls
}

func (b *Backend) call(name string) error {
	if b.OnCall != nil {
		b.OnCall(name)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls++
	if b.Down {
		return ErrDown
	}
	return nil
}

// Container implements lifecycle.Backend.
func (b *Backend) Container(ctx context.Context, id string) (string, string, error) {
	if b.OnContainer != nil {
		b.OnContainer(id)
	}
	if err := b.call("Container"); err != nil {
		return "", "", err
	}
	if b.ContainerErr != nil {
		return "", "", b.ContainerErr
	}
	c, err := b.env.Containers.Get(ctx, id)
	if err != nil {
		return "", "", err
	}
	return c.Snapshotter, c.SnapshotKey, nil
}

// ContainerImage implements lifecycle.Backend.
func (b *Backend) ContainerImage(ctx context.Context, id string) (string, error) {
	if err := b.call("ContainerImage"); err != nil {
		return "", err
	}
	c, err := b.env.Containers.Get(ctx, id)
	if err != nil {
		return "", err
	}
	return c.Image, nil
}

// Snapshotter implements lifecycle.Backend.
func (b *Backend) Snapshotter(name string) (snapshots.Snapshotter, error) {
	if err := b.call("Snapshotter"); err != nil {
		return nil, err
	}
	sn := b.env.DB.Snapshotter(name)
	if sn == nil {
		return nil, fmt.Errorf("snapshotter not loaded: %s: %w", name, errdefs.ErrInvalidArgument)
	}
	return &lateSnapshotter{Snapshotter: sn, b: b}, nil
}

// Leases implements lifecycle.Backend.
func (b *Backend) Leases() (leases.Manager, error) {
	if err := b.call("Leases"); err != nil {
		return nil, err
	}
	return &lateLeases{Manager: b.env.Leases, b: b}, nil
}

// Image implements lifecycle.Backend.
func (b *Backend) Image(ctx context.Context, name string) (images.Image, error) {
	if err := b.call("Image"); err != nil {
		return images.Image{}, err
	}
	return metadata.NewImageStore(b.env.DB).Get(ctx, name)
}

// Content implements lifecycle.Backend.
func (b *Backend) Content() (content.Provider, error) {
	if err := b.call("Content"); err != nil {
		return nil, err
	}
	return b.env.DB.ContentStore(), nil
}

// ResumePaused implements sweep.Backend: the unit tests have no tasks.
func (b *Backend) ResumePaused(context.Context, string) error {
	if err := b.call("ResumePaused"); err != nil {
		return err
	}
	return errdefs.ErrNotFound
}

// SnapshotterRoot implements lifecycle.Backend: Roots[name], else "/" (the
// tests' disk images are anywhere).
func (b *Backend) SnapshotterRoot(_ context.Context, name string) (string, error) {
	if err := b.call("SnapshotterRoot"); err != nil {
		return "", err
	}
	if r, ok := b.Roots[name]; ok {
		return r, nil
	}
	return "/", nil
}

// Mounts implements lifecycle.Backend.
func (b *Backend) Mounts() (mount.Manager, error) {
	if err := b.call("Mounts"); err != nil {
		return nil, err
	}
	if b.ActivateDelay > 0 {
		return &slowMounts{Manager: b.env.Mounts, delay: b.ActivateDelay}, nil
	}
	return b.env.Mounts, nil
}

// slowMounts is the mount manager, its activations delay longer.
type slowMounts struct {
	mount.Manager
	delay time.Duration
}

func (m *slowMounts) Activate(ctx context.Context, name string, mounts []mount.Mount, opts ...mount.ActivateOpt) (mount.ActivationInfo, error) {
	select {
	case <-time.After(m.delay):
	case <-ctx.Done():
		return mount.ActivationInfo{}, ctx.Err()
	}
	return m.Manager.Activate(ctx, name, mounts, opts...)
}

// lateLeases is the lease manager, with Create reporting a timeout after
// taking effect when lateLease is set.
type lateLeases struct {
	leases.Manager
	b *Backend
}

func (m *lateLeases) Create(ctx context.Context, opts ...leases.Opt) (leases.Lease, error) {
	l, err := m.Manager.Create(ctx, opts...)
	if err == nil && m.b.LateLease {
		return leases.Lease{}, context.DeadlineExceeded
	}
	return l, err
}

// lateSnapshotter is the snapshotter, with View reporting a timeout after
// taking effect when lateView is set.
type lateSnapshotter struct {
	snapshots.Snapshotter
	b *Backend
}

func (s *lateSnapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	ms, err := s.Snapshotter.View(ctx, key, parent, opts...)
	if err == nil && s.b.LateView {
		return nil, context.DeadlineExceeded
	}
	if err == nil && s.b.ManagedViews && len(ms) == 1 {
		ms = append(ms, mount.Mount{Type: "format/bind", Source: "{{ mount 0 }}", Options: ms[0].Options})
	}
	return ms, err
}

// Ext4Image makes an ext4 filesystem image of size bytes.
func Ext4Image(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", path).CombinedOutput(); err != nil {
		t.Skipf("mkfs.ext4 (e2fsprogs): %v: %s", err, out)
	}
}

// CheckParams checks the params file at path (the host side of
// /.snapview/params.json) as a runtime author's reader and the published
// JSON Schema (docs/params.schema.json) see it, and returns it.
func CheckParams(t *testing.T, path string) *params.Doc {
	t.Helper()
	data := ReadFile(t, path)
	doc, err := params.Parse(data)
	if err != nil {
		t.Fatalf("params file %s: %v", path, err)
	}
	schema, err := jsonschema.NewCompiler().Compile("../../docs/params.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	v, err := jsonschema.UnmarshalJSON(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if err := schema.Validate(v); err != nil {
		t.Fatalf("params file %s does not follow docs/params.schema.json:\n%s\n%v", path, data, err)
	}
	return doc
}
