package shim

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/manager"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/rootfs"
)

// RuntimeName is the runtime type containerd knows snapview by.
const RuntimeName = "io.containerd.snapview.v2"

// NewManager returns snapview's shim manager: runc's, under snapview's name,
// with runtime options normalised for Start and Info and Stop extended to
// clean up after a shim that died.
func NewManager() shim.Shim {
	return &shimManager{Shim: manager.NewShimManager(RuntimeName), stopView: stopView, claimsInInfo: claimsInInfo}
}

// shimManager wraps runc's shim manager. Name is runc's, forwarded through the
// embedded interface on purpose; Start, Stop and Info are changed here.
type shimManager struct {
	shim.Shim
	// stopView tears down a view in the `delete` action (stopView; tests
	// replace it).
	stopView func(ctx context.Context, bundlePath, id string) error
	// claimsInInfo reports whether -info must carry the mount claims
	// (claimsInInfo, for the containerd that runs it); nil: always.
	claimsInInfo func() bool
}

// Start launches (or joins) the shim process. runc's manager takes the
// runtime options from the bootstrap message's extensions, to place the
// shim in ShimCgroup, and understands only its own options type; so the
// extension that is runtime options (snapview's forms, see package config)
// is replaced by the normalised runc options, and without one the default
// configuration file is read, as Create does. They are dropped when there
// are none or they cannot be read: a configuration error is reported by
// Create, with its source. Other extensions pass unchanged.
//
// The result carries the MountCapabilities of the process that serves the
// container, so that containerd 2.3 and later hand it a rootfs with those
// mounts unperformed: exactly what that process says it performs
// (servedClaims), and an explicit "none" for a process that says nothing.
// runc's manager does not always start a process: a container of a pod may
// join the process of its pod, which an earlier release may have started
// and which performs no claimed mount; claiming for it would make
// containerd hand it mounts it cannot perform. (containerd 2.4's CRI does
// not run Start for a container that joins a pod at all: the pod's claims
// are those of its sandbox's start, or, for a sandbox whose start said
// nothing, the -info claim; see Info.) Start must not log: containerd
// reads its output as the answer.
func (m *shimManager) Start(ctx context.Context, params *bootapi.BootstrapParams) (*bootapi.BootstrapResult, error) {
	p := proto.CloneOf(params)
	p.Extensions = nil
	var opts typeurl.Any // none: the default file
	for _, ext := range params.GetExtensions() {
		switch {
		case !config.IsOptions(ext.GetValue()):
			p.Extensions = append(p.Extensions, ext)
		case opts == nil:
			opts = ext.GetValue()
		}
	}
	if cfg, err := config.FromOptions(opts); err == nil {
		if a, err := cfg.RuncAny(); err == nil && a != nil {
			p.Extensions = append(p.Extensions, &bootapi.Extension{Value: a})
		}
	}
	res, err := m.Shim.Start(ctx, p)
	if err != nil {
		return nil, err
	}
	caps := servedClaims(ctx, res.GetAddress())
	if caps == nil {
		// Said explicitly: without the extension, containerd 2.3+ would
		// take the runtime's -info claim instead.
		caps = &types.MountCapabilities{}
	}
	if err := res.AddExtension(caps); err != nil {
		return nil, fmt.Errorf("snapview: advertise mount capabilities: %w", err)
	}
	return res, nil
}

// ClaimsService is the TTRPC service by which a shim process of snapview
// says which mounts it performs itself: method "Get" answers an empty
// request with its MountCapabilities. A process of a release before it
// answers that the service does not exist, and performs none.
const ClaimsService = "snapview.shim.v1.MountClaims"

// claimsTimeout bounds the question to the serving process; a process just
// launched answers once it serves, which containerd's first call would
// wait for anyway.
const claimsTimeout = 10 * time.Second

// servedClaims asks the process serving address which mounts it performs
// itself (ClaimsService), and returns nil when it performs none, does not
// say, or cannot be asked: containerd then performs every mount, as for
// runc.
func servedClaims(ctx context.Context, address string) *types.MountCapabilities {
	if address == "" {
		return nil
	}
	conn, err := shim.AnonDialer(address, claimsTimeout)
	if err != nil {
		return nil
	}
	c := ttrpc.NewClient(conn)
	defer func() { _ = c.Close() }()
	ctx, cancel := context.WithTimeout(ctx, claimsTimeout)
	defer cancel()
	var caps types.MountCapabilities
	if err := c.Call(ctx, ClaimsService, "Get", &emptypb.Empty{}, &caps); err != nil {
		return nil
	}
	if len(caps.Types) == 0 && len(caps.Transforms) == 0 {
		return nil
	}
	return &caps
}

// registerClaims registers ClaimsService on the shim's TTRPC server: this
// process performs MountCapabilities.
func registerClaims(server *ttrpc.Server) {
	server.RegisterService(ClaimsService, &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{
		"Get": func(_ context.Context, unmarshal func(any) error) (any, error) {
			var req emptypb.Empty
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return MountCapabilities(), nil
		},
	}})
}

// AllowMountsAnnotation is the -info annotation by which containerd 2.2
// (and 2.3+ as a fallback) learns which mount types and transforms a shim
// performs itself: comma separated, a transform as "<name>/*".
const AllowMountsAnnotation = "containerd.io/runtime-allow-mounts"

// MountCapabilities returns what snapview claims from containerd's mount
// manager (rootfs.ClaimedTypes and ClaimedTransforms), for the bootstrap
// result of containerd 2.3 and later.
func MountCapabilities() *types.MountCapabilities {
	return &types.MountCapabilities{Types: rootfs.ClaimedTypes, Transforms: rootfs.ClaimedTransforms}
}

// allowMounts is the same claim as MountCapabilities, in the annotation's
// form.
func allowMounts() string {
	entries := slices.Clone(rootfs.ClaimedTypes)
	for _, t := range rootfs.ClaimedTransforms {
		entries = append(entries, t+"/*")
	}
	return strings.Join(entries, ",")
}

// Stop is the `delete` action, which containerd runs after every task
// delete (and waits for), and after a shim died: runc's manager
// force-deletes the container and unmounts its rootfs, then snapview tears
// down the view from what the bundle holds. The whole action is bounded by
// stopBudget from here. A failed view cleanup is logged, not returned: the
// task must still be deleted, and what is left is reclaimed by containerd's
// GC (the view is tied to the container record) and by the sweep.
func (m *shimManager) Stop(ctx context.Context, id string) (shim.StopStatus, error) {
	deadline := time.Now().Add(stopBudget)
	ss, err := m.Shim.Stop(ctx, id)
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	bundlePath, berr := bundleOf(id)
	if berr != nil {
		log.G(ctx).WithError(berr).WithField("id", id).Error("snapview: cannot find the bundle; the view is left to the sweep")
		return ss, err
	}
	if verr := m.stopView(ctx, bundlePath, id); verr != nil {
		log.G(ctx).WithError(verr).WithField("id", id).Error("snapview: dead-shim view cleanup incomplete")
	}
	return ss, err
}

// Info reports the runtime's information: runc's, and, for a containerd that
// reads mount claims from it alone (2.2), the mount types and transforms
// snapview performs itself in the runtime-allow-mounts annotation. runc's
// manager is handed the normalised runc options, never runtimeoptions, which
// it would reject.
//
// containerd 2.3 and later read the claims of each shim process from its
// start (Start always says them), and fall back to this annotation only for
// a process whose start said nothing: one of a release before the claims,
// which performs none of the mounts. So Info claims only for a containerd
// older than 2.3, or one it cannot tell (claimsInInfo); a pod of an earlier
// release then keeps working after an upgrade on containerd 2.3+.
func (m *shimManager) Info(ctx context.Context, optionsR io.Reader) (*types.RuntimeInfo, error) {
	data, err := io.ReadAll(optionsR)
	if err != nil {
		return nil, fmt.Errorf("snapview: read runtime options: %w", err)
	}
	runc, err := runcOptionsBytes(data)
	if err != nil {
		return nil, err
	}
	info, err := m.Shim.Info(ctx, bytes.NewReader(runc))
	if err != nil {
		return nil, err
	}
	if m.claimsInInfo == nil || m.claimsInInfo() {
		if info.Annotations == nil {
			info.Annotations = map[string]string{}
		}
		info.Annotations[AllowMountsAnnotation] = allowMounts()
	}
	return info, nil
}

// runcOptionsBytes turns the runtime options containerd wrote on stdin into
// the marshalled runc options for runc's manager, or nil for none.
func runcOptionsBytes(data []byte) ([]byte, error) {
	cfg, err := config.ReadOptions(data)
	if err != nil {
		return nil, err
	}
	a, err := cfg.RuncAny()
	if err != nil || a == nil {
		return nil, err
	}
	return proto.Marshal(a)
}
