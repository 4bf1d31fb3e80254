package shim

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types"
	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/containerd/v2/pkg/shim"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/lifecycle"
	"github.com/snapview/snapview/pkg/lifecycle/lifecycletest"
)

// fakeRunc stands in for runc's task service: Create and Delete succeed,
// Shutdown records that it was forwarded.
type fakeRunc struct {
	taskAPI.TTRPCTaskService

	mu        sync.Mutex
	shutdowns int
}

func (f *fakeRunc) Create(context.Context, *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	return &taskAPI.CreateTaskResponse{Pid: 1}, nil
}

func (f *fakeRunc) Delete(context.Context, *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	return &taskAPI.DeleteResponse{}, nil
}

func (f *fakeRunc) Shutdown(context.Context, *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.shutdowns++
	return &ptypes.Empty{}, nil
}

func (f *fakeRunc) forwarded() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.shutdowns
}

// gate holds the backend call named name until released.
type gate struct {
	name     string
	reached  chan struct{}
	released chan struct{}
	once     sync.Once
}

func newGate(name string) *gate {
	return &gate{name: name, reached: make(chan struct{}), released: make(chan struct{})}
}

func (g *gate) hold(name string) {
	if name != g.name {
		return
	}
	g.once.Do(func() {
		close(g.reached)
		<-g.released
	})
}

// TestShutdownWaitsForViews checks that Shutdown is not forwarded to runc's
// service (which would exit the shim) while a Create runc does not know of
// yet, or a view's teardown, is in progress in the same shim, and that it
// is forwarded once nothing is left.
func TestShutdownWaitsForViews(t *testing.T) {
	t.Setenv("SNAPVIEW_CONFIG", filepath.Join(t.TempDir(), "none.toml"))
	e := lifecycletest.NewEnv(t)
	runc := &fakeRunc{}
	s := newService(runc, lifecycle.New(e.Backend))
	ctx := namespaces.WithNamespace(context.Background(), lifecycletest.NS)
	r := e.Container(t, "c1", nil)
	req := &taskAPI.CreateTaskRequest{ID: r.ID, Bundle: r.Bundle}
	for _, m := range r.Rootfs {
		req.Rootfs = append(req.Rootfs, &types.Mount{Type: m.Type, Source: m.Source, Options: m.Options})
	}
	shutdown := func() { _, _ = s.Shutdown(ctx, &taskAPI.ShutdownRequest{ID: r.ID}) }

	// A Create that is still deciding.
	g := newGate("Container")
	e.Backend.OnCall = g.hold
	done := make(chan error, 1)
	go func() {
		_, err := s.Create(ctx, req)
		done <- err
	}()
	<-g.reached
	shutdown()
	if runc.forwarded() != 0 {
		t.Fatal("shutdown forwarded during a Create")
	}
	close(g.released)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bundle.Started(r.Bundle) {
		t.Fatal("no view was set up")
	}
	shutdown()
	if runc.forwarded() != 0 {
		t.Fatal("shutdown forwarded with a view in use")
	}

	// A Delete whose teardown is still running.
	g = newGate("Snapshotter")
	e.Backend.OnCall = g.hold
	go func() {
		_, err := s.Delete(ctx, &taskAPI.DeleteRequest{ID: r.ID})
		done <- err
	}()
	<-g.reached
	shutdown()
	if runc.forwarded() != 0 {
		t.Fatal("shutdown forwarded during a teardown")
	}
	close(g.released)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	e.Backend.OnCall = nil
	if bundle.Started(r.Bundle) {
		t.Fatal("the view was not torn down")
	}
	shutdown()
	if runc.forwarded() != 1 {
		t.Fatalf("shutdown forwarded %d times once idle, want 1", runc.forwarded())
	}
}

// slowRunc is runc's shim manager taking its time in Stop.
type slowRunc struct {
	shim.Manager
	delay time.Duration
}

func (m slowRunc) Stop(context.Context, string) (shim.StopStatus, error) {
	time.Sleep(m.delay)
	return shim.StopStatus{}, nil
}

// TestStopBudgetFromEntry checks that the view cleanup of the `delete`
// action is bounded from the moment Stop was entered, runc's part included,
// so the whole action stays inside containerd's cleanup timeout.
func TestStopBudgetFromEntry(t *testing.T) {
	bundlePath := filepath.Join(t.TempDir(), "c1")
	if err := os.Mkdir(bundlePath, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Chdir(bundlePath)
	var deadline time.Time
	m := &shimManager{Manager: slowRunc{delay: 300 * time.Millisecond}, stopView: func(ctx context.Context, _, _ string) error {
		deadline, _ = ctx.Deadline()
		return nil
	}}
	entered := time.Now()
	if _, err := m.Stop(namespaces.WithNamespace(context.Background(), "default"), "c1"); err != nil {
		t.Fatal(err)
	}
	// runc's part took 300ms; the deadline must not move by as much.
	if slack := 50 * time.Millisecond; deadline.IsZero() || deadline.After(entered.Add(stopBudget+slack)) {
		t.Fatalf("view cleanup deadline %v after entry, want at most %v", deadline.Sub(entered), stopBudget+slack)
	}
}

// TestBootstrapOptions checks that the runtime options inside a containerd
// 2.3+ bootstrap message are found, and that old-protocol options, or a
// message for another shim, are not taken for one.
func TestBootstrapOptions(t *testing.T) {
	opts, err := anypb.New(&runcoptions.Options{ShimCgroup: "/snapview-test", BinaryName: "runc"})
	if err != nil {
		t.Fatal(err)
	}
	ext := protowire.AppendTag(nil, extensionValue, protowire.BytesType)
	raw, _ := proto.Marshal(opts)
	ext = protowire.AppendBytes(ext, raw)
	msg := func(id, ns string) []byte {
		var b []byte
		b = protowire.AppendTag(b, bootstrapInstanceID, protowire.BytesType)
		b = protowire.AppendString(b, id)
		b = protowire.AppendTag(b, bootstrapNamespace, protowire.BytesType)
		b = protowire.AppendString(b, ns)
		b = protowire.AppendTag(b, 4, protowire.BytesType) // containerd_version, unknown to us
		b = protowire.AppendString(b, "2.4.2")
		b = protowire.AppendTag(b, bootstrapExtensions, protowire.BytesType)
		return protowire.AppendBytes(b, ext)
	}
	exts, ok := parseBootstrap(msg("c1", "default"), "c1", "default")
	if !ok || len(exts) != 1 || !proto.Equal(exts[0], opts) {
		t.Fatalf("bootstrap message: %v %v", exts, ok)
	}
	if _, ok := parseBootstrap(msg("c2", "default"), "c1", "default"); ok {
		t.Fatal("a message for another shim was taken")
	}
	if _, ok := parseBootstrap(raw, "c1", "default"); ok {
		t.Fatal("old-protocol options were taken for a bootstrap message")
	}
	if _, ok := parseBootstrap([]byte{0xff, 0xff}, "c1", "default"); ok {
		t.Fatal("garbage was taken for a bootstrap message")
	}
}
