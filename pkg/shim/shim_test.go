package shim

import (
	"bytes"
	"cmp"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types"
	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
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
	shim.Shim
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
	m := &shimManager{Shim: slowRunc{delay: 300 * time.Millisecond}, stopView: func(ctx context.Context, _, _ string) error {
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

// recordingRunc is runc's shim manager recording the bootstrap message
// Start hands it, and answering address (a socket where nothing serves by
// default).
type recordingRunc struct {
	shim.Shim
	got     *bootapi.BootstrapParams
	address string
}

func (r *recordingRunc) Start(_ context.Context, p *bootapi.BootstrapParams) (*bootapi.BootstrapResult, error) {
	r.got = p
	return &bootapi.BootstrapResult{Version: 3, Address: cmp.Or(r.address, "unix:///run/s/x"), Protocol: "ttrpc"}, nil
}

func (r *recordingRunc) Info(context.Context, io.Reader) (*types.RuntimeInfo, error) {
	return &types.RuntimeInfo{Name: "io.containerd.runc.v2", Annotations: map[string]string{"kept": "yes"}}, nil
}

// serveTTRPC serves a shim's TTRPC server on a socket of its own, with
// snapview's ClaimsService when claims is set (a process of this release),
// without it otherwise (a process of an earlier release), and returns its
// address.
func serveTTRPC(t *testing.T, claims bool) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	if claims {
		registerClaims(srv)
	}
	go func() { _ = srv.Serve(context.Background(), l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return "unix://" + path
}

// TestAdvertisesMountCapabilities checks the claims containerd reads: the
// MountCapabilities extension of the bootstrap result (2.3+), which claims
// what the process serving the container says it performs, and says "none"
// explicitly for any other process (a pod's process of an earlier release,
// joined), so that containerd does not take -info's claim for it; and the
// runtime-allow-mounts annotation of -info (in the form 2.2 and 2.4's
// fallback both parse), only for a containerd that reads claims from -info
// alone (2.2), or one the shim cannot tell.
func TestAdvertisesMountCapabilities(t *testing.T) {
	for _, tc := range []struct {
		name    string
		address string
		claims  bool
	}{
		{"a process of this release", serveTTRPC(t, true), true},
		{"a pod's process of an earlier release, joined", serveTTRPC(t, false), false},
		{"no process answers", "unix://" + filepath.Join(t.TempDir(), "none"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := &shimManager{Shim: &recordingRunc{address: tc.address}}
			res, err := m.Start(context.Background(), &bootapi.BootstrapParams{InstanceID: "c1", Namespace: "default"})
			if err != nil {
				t.Fatal(err)
			}
			var caps types.MountCapabilities
			if found, err := res.FindExtension(&caps); err != nil || !found {
				t.Fatalf("no MountCapabilities in the bootstrap result (without it containerd 2.3+ takes -info's): %v %v", found, err)
			}
			if claimed := len(caps.Types)+len(caps.Transforms) > 0; claimed != tc.claims {
				t.Fatalf("claimed %v, want a claim: %v", &caps, tc.claims)
			}
			if tc.claims && (!slices.Equal(caps.Types, []string{"erofs"}) || !slices.Equal(caps.Transforms, []string{"format", "mkdir", "mkfs"})) {
				t.Fatalf("claimed %v", &caps)
			}
		})
	}
	for _, tc := range []struct {
		name   string
		claims func() bool
		want   string
	}{
		{"containerd 2.2", func() bool { return readsClaimsFromInfo(2, 2) }, "erofs,format/*,mkdir/*,mkfs/*"},
		{"containerd 2.4", func() bool { return readsClaimsFromInfo(2, 4) }, ""},
		{"a daemon it cannot tell", nil, "erofs,format/*,mkdir/*,mkfs/*"},
	} {
		t.Run("-info for "+tc.name, func(t *testing.T) {
			m := &shimManager{Shim: &recordingRunc{}, claimsInInfo: tc.claims}
			info, err := m.Info(context.Background(), bytes.NewReader(nil))
			if err != nil {
				t.Fatal(err)
			}
			if got := info.Annotations[AllowMountsAnnotation]; got != tc.want || info.Annotations["kept"] != "yes" {
				t.Fatalf("-info annotations %v, want the claim %q", info.Annotations, tc.want)
			}
		})
	}
}

// TestParseVersion reads the versions containerd binaries report.
func TestParseVersion(t *testing.T) {
	for v, want := range map[string][2]int{"v2.4.2": {2, 4}, "2.2.1": {2, 2}, "v2.3.0-beta.1": {2, 3}, "v1.7.27": {1, 7}, "v10.12": {10, 12}} {
		major, minor, err := parseVersion(v)
		if err != nil || major != want[0] || minor != want[1] {
			t.Errorf("%s: %d.%d %v, want %v", v, major, minor, err, want)
		}
	}
	for _, v := range []string{"(devel)", "", "v2", "x2.4"} {
		if _, _, err := parseVersion(v); err == nil {
			t.Errorf("%q read as a version", v)
		}
	}
}

// TestStartNormalisesOptions checks what runc's manager is handed at start:
// snapview's runtime options turned into runc's (ShimCgroup kept), options
// it cannot read or that carry no runc setting dropped, and any other
// extension passed unchanged.
func TestStartNormalisesOptions(t *testing.T) {
	other, err := anypb.New(&types.Mount{Type: "bind", Source: "/x"})
	if err != nil {
		t.Fatal(err)
	}
	ext := func(t *testing.T, m proto.Message) *bootapi.Extension {
		t.Helper()
		a, err := typeurl.MarshalAnyToProto(m)
		if err != nil {
			t.Fatal(err)
		}
		return &bootapi.Extension{Value: a}
	}
	defaultFile := filepath.Join(t.TempDir(), "snapview.toml")
	if err := os.WriteFile(defaultFile, []byte("ShimCgroup = '/from-the-default-file'\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv(config.PathEnv, defaultFile)
	for _, tc := range []struct {
		name string
		opts proto.Message
		want *runcoptions.Options // nil: no runc options reach runc
	}{
		{"runtimeoptions body", &runtimeoptions.Options{ConfigBody: []byte("ShimCgroup = '/snapview-test'\n[view]\nmode = 'off'\n")}, &runcoptions.Options{ShimCgroup: "/snapview-test"}},
		{"runc options", &runcoptions.Options{ShimCgroup: "/snapview-test", BinaryName: "runc"}, &runcoptions.Options{ShimCgroup: "/snapview-test", BinaryName: "runc"}},
		{"no runc setting", &runtimeoptions.Options{ConfigBody: []byte("[view]\nmode = 'off'\n")}, nil},
		{"unreadable configuration", &runtimeoptions.Options{ConfigBody: []byte("Bogus = 1\n")}, nil},
		{"no options: the default file", nil, &runcoptions.Options{ShimCgroup: "/from-the-default-file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			runc := &recordingRunc{}
			m := &shimManager{Shim: runc}
			in := &bootapi.BootstrapParams{InstanceID: "c1", Namespace: "default", Extensions: []*bootapi.Extension{{Value: other}}}
			if tc.opts != nil {
				in.Extensions = append([]*bootapi.Extension{ext(t, tc.opts)}, in.Extensions...)
			}
			given := proto.CloneOf(in)
			res, err := m.Start(context.Background(), in)
			if err != nil || res.GetAddress() == "" {
				t.Fatalf("start: %v %v", res, err)
			}
			var got runcoptions.Options
			found, err := runc.got.FindExtension(&got)
			if err != nil || found != (tc.want != nil) || (found && !proto.Equal(&got, tc.want)) {
				t.Fatalf("runc options handed to runc's manager: %v (found %v, %v), want %v", &got, found, err, tc.want)
			}
			var rest []*anypb.Any
			for _, e := range runc.got.GetExtensions() {
				if !config.IsOptions(e.GetValue()) {
					rest = append(rest, e.GetValue())
				}
			}
			if len(rest) != 1 || !proto.Equal(rest[0], other) {
				t.Fatalf("other extensions %v, want %v unchanged", rest, other)
			}
			if runc.got.GetInstanceID() != "c1" || !proto.Equal(in, given) {
				t.Fatalf("the caller's message was changed or its identity lost: %v", runc.got)
			}
		})
	}
}

// TestLegacyStart checks the translation of a start by containerd 2.2 or
// earlier: what counts as a bootstrap message, the message built from the
// old protocol's flags, environment and options, and the JSON answer.
func TestLegacyStart(t *testing.T) {
	opts, err := typeurl.MarshalAnyToProto(&runcoptions.Options{ShimCgroup: "/snapview-test"})
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := proto.Marshal(opts)
	msg, _ := proto.Marshal(&bootapi.BootstrapParams{InstanceID: "c1", Namespace: "default", ContainerdVersion: "2.4.2"})

	t.Run("what is a bootstrap message", func(t *testing.T) {
		for _, tc := range []struct {
			name  string
			input []byte
			want  bool
		}{
			{"for this shim", msg, true},
			{"for another shim", func() []byte {
				b, _ := proto.Marshal(&bootapi.BootstrapParams{InstanceID: "c2", Namespace: "default"})
				return b
			}(), false},
			{"old-protocol options", raw, false},
			{"nothing", nil, false},
			{"garbage", []byte{0xff, 0xff}, false},
		} {
			if got := isBootstrap(tc.input, "c1", "default"); got != tc.want {
				t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
			}
		}
	})

	t.Run("flags", func(t *testing.T) {
		f, ok := parseLegacyFlags([]string{"-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock", "-publish-binary", "/usr/bin/containerd", "-id", "c1", "-debug", "start"})
		if !ok || f.action != "start" || f.id != "c1" || f.namespace != "k8s.io" || f.address != "/run/containerd/containerd.sock" || !f.debug {
			t.Fatalf("flags %+v %v", f, ok)
		}
		if f, ok := parseLegacyFlags([]string{"-namespace", "default", "-id", "c1", "-bundle", "/b", "delete"}); !ok || f.action != "delete" {
			t.Fatalf("delete: %+v %v", f, ok)
		}
		if _, ok := parseLegacyFlags([]string{"-unknown-flag", "start"}); ok {
			t.Fatal("an unknown flag was accepted: shim.RunShim must report it")
		}
	})

	t.Run("bootstrap message from the old protocol", func(t *testing.T) {
		f := legacyFlags{namespace: "default", id: "c1", address: "/run/containerd/containerd.sock", action: "start"}
		p := legacyBootstrap(f, "/run/containerd/containerd.sock.ttrpc", raw)
		var got runcoptions.Options
		if found, err := p.FindExtension(&got); !found || err != nil || got.ShimCgroup != "/snapview-test" {
			t.Fatalf("options in the message: %v %v %v", &got, found, err)
		}
		if p.GetInstanceID() != "c1" || p.GetNamespace() != "default" || p.GetContainerdGrpcAddress() != f.address ||
			p.GetContainerdTtrpcAddress() != "/run/containerd/containerd.sock.ttrpc" || p.GetLogLevel() != bootapi.LogLevel_LOG_LEVEL_INFO {
			t.Fatalf("message %v", p)
		}
		if p := legacyBootstrap(f, "", nil); len(p.GetExtensions()) != 0 {
			t.Fatalf("no options gave extensions %v", p.GetExtensions())
		}
		f.debug = true
		if p := legacyBootstrap(f, "", []byte{0xff}); len(p.GetExtensions()) != 0 || p.GetLogLevel() != bootapi.LogLevel_LOG_LEVEL_DEBUG {
			t.Fatalf("unreadable options gave %v", p)
		}
	})

	t.Run("answer", func(t *testing.T) {
		res, _ := proto.Marshal(&bootapi.BootstrapResult{Version: 3, Address: "unix:///run/containerd/s/abc", Protocol: "ttrpc"})
		got, err := legacyAnswer(res)
		if err != nil || string(got) != `{"version":3,"address":"unix:///run/containerd/s/abc","protocol":"ttrpc"}` {
			t.Fatalf("answer %s %v", got, err)
		}
		if _, err := legacyAnswer(nil); err == nil {
			t.Fatal("an answer without an address was accepted")
		}
	})
}
