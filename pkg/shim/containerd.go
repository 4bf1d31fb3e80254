package shim

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	containersapi "github.com/containerd/containerd/api/services/containers/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	mountsapi "github.com/containerd/containerd/api/services/mounts/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/leases"
	leasesproxy "github.com/containerd/containerd/v2/core/leases/proxy"
	"github.com/containerd/containerd/v2/core/mount"
	mountproxy "github.com/containerd/containerd/v2/core/mount/proxy"
	"github.com/containerd/containerd/v2/core/snapshots"
	snproxy "github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/dialer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// backend is the shim's connection back to containerd's gRPC API: the raw
// containers, snapshots, leases and mounts clients, which are much lighter
// than the full containerd client. It is dialled once per process, on first
// use; grpc.NewClient does not block, and every call carries its own timeout.
type backend struct {
	address string

	mu   sync.Mutex
	conn *grpc.ClientConn
}

// callTimeout bounds each call back into containerd.
const callTimeout = 10 * time.Second

func newBackend(address string) *backend {
	return &backend{address: address}
}

func (b *backend) client() (*grpc.ClientConn, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn != nil {
		return b.conn, nil
	}
	if b.address == "" {
		return nil, errors.New("containerd's gRPC address is unknown (no -address flag or GRPC_ADDRESS)")
	}
	conn, err := grpc.NewClient(dialer.DialAddress(b.address),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(dialer.ContextDialer),
	)
	if err != nil {
		return nil, fmt.Errorf("connect to containerd at %s: %w", b.address, err)
	}
	b.conn = conn
	return conn, nil
}

func (b *backend) containers() (containersapi.ContainersClient, error) {
	c, err := b.client()
	if err != nil {
		return nil, err
	}
	return containersapi.NewContainersClient(c), nil
}

func (b *backend) snapshotter(name string) (snapshots.Snapshotter, error) {
	c, err := b.client()
	if err != nil {
		return nil, err
	}
	return snproxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(c), name), nil
}

func (b *backend) leases() (leases.Manager, error) {
	c, err := b.client()
	if err != nil {
		return nil, err
	}
	return leasesproxy.NewLeaseManager(leasesapi.NewLeasesClient(c)), nil
}

func (b *backend) mounts() (mount.Manager, error) {
	c, err := b.client()
	if err != nil {
		return nil, err
	}
	return mountproxy.NewMountManager(mountsapi.NewMountsClient(c)), nil
}

// preconnect starts connecting to containerd in the background, so that the
// first call of a Create does not wait for the dial and handshake.
func (b *backend) preconnect() {
	if c, err := b.client(); err == nil {
		c.Connect()
	}
}

// close closes the connection, if one was made.
func (b *backend) close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn == nil {
		return nil
	}
	err := b.conn.Close()
	b.conn = nil
	return err
}

// withTimeout bounds one call back into containerd.
func withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, callTimeout)
}
