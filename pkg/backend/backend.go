// Package backend is the connection back to containerd's gRPC API used by
// the shim and snapviewctl: the raw containers, images, content, snapshots,
// leases, mounts and namespaces clients, which are much lighter than the
// full containerd client.
package backend

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	containersapi "github.com/containerd/containerd/api/services/containers/v1"
	contentapi "github.com/containerd/containerd/api/services/content/v1"
	imagesapi "github.com/containerd/containerd/api/services/images/v1"
	introspectionapi "github.com/containerd/containerd/api/services/introspection/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	mountsapi "github.com/containerd/containerd/api/services/mounts/v1"
	namespacesapi "github.com/containerd/containerd/api/services/namespaces/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	tasksapi "github.com/containerd/containerd/api/services/tasks/v1"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/content"
	contentproxy "github.com/containerd/containerd/v2/core/content/proxy"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	leasesproxy "github.com/containerd/containerd/v2/core/leases/proxy"
	"github.com/containerd/containerd/v2/core/mount"
	mountproxy "github.com/containerd/containerd/v2/core/mount/proxy"
	"github.com/containerd/containerd/v2/core/snapshots"
	snproxy "github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/dialer"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Backend is a connection to containerd's gRPC API. It is dialled once, on
// first use (or Preconnect); grpc.NewClient does not block, and callers bound
// each call with WithTimeout.
type Backend struct {
	address string

	mu   sync.Mutex
	conn *grpc.ClientConn
}

// CallTimeout bounds each call back into containerd.
const CallTimeout = 10 * time.Second

// New returns a Backend for containerd's gRPC socket at address.
func New(address string) *Backend {
	return &Backend{address: address}
}

func (b *Backend) client() (*grpc.ClientConn, error) {
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
		grpc.WithContextDialer(dialUnix),
	)
	if err != nil {
		return nil, fmt.Errorf("connect to containerd at %s: %w", b.address, err)
	}
	b.conn = conn
	return conn, nil
}

// dialUnix dials containerd's socket once. containerd's own dialer keeps
// retrying a socket that does not exist until the call's deadline, which
// suits a client waiting for a daemon to start; for the shim a missing
// socket means containerd is not there (its `delete` action runs while a
// restarting containerd is not serving yet), and waiting would only hold
// that containerd up.
func dialUnix(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", strings.TrimPrefix(addr, "unix://"))
}

// Container returns the snapshotter and snapshot key of container id; a
// container containerd does not know is an error wrapping
// errdefs.ErrNotFound.
func (b *Backend) Container(ctx context.Context, id string) (snapshotter, snapshotKey string, err error) {
	c, err := b.client()
	if err != nil {
		return "", "", err
	}
	cctx, cancel := WithTimeout(ctx)
	defer cancel()
	resp, err := containersapi.NewContainersClient(c).Get(cctx, &containersapi.GetContainerRequest{ID: id})
	if err != nil {
		return "", "", errgrpc.ToNative(err)
	}
	return resp.Container.Snapshotter, resp.Container.SnapshotKey, nil
}

// ContainerImage returns the image container id names ("" for none).
func (b *Backend) ContainerImage(ctx context.Context, id string) (string, error) {
	c, err := b.client()
	if err != nil {
		return "", err
	}
	cctx, cancel := WithTimeout(ctx)
	defer cancel()
	resp, err := containersapi.NewContainersClient(c).Get(cctx, &containersapi.GetContainerRequest{ID: id})
	if err != nil {
		return "", errgrpc.ToNative(err)
	}
	return resp.Container.Image, nil
}

// SnapshotterRoot returns the root directory of the snapshotter called
// name, as its plugin exports it ("" when it exports none, as a proxy
// snapshotter does).
func (b *Backend) SnapshotterRoot(ctx context.Context, name string) (string, error) {
	c, err := b.client()
	if err != nil {
		return "", err
	}
	cctx, cancel := WithTimeout(ctx)
	defer cancel()
	resp, err := introspectionapi.NewIntrospectionClient(c).Plugins(cctx, &introspectionapi.PluginsRequest{
		Filters: []string{fmt.Sprintf("type==io.containerd.snapshotter.v1,id==%s", name)},
	})
	if err != nil {
		return "", errgrpc.ToNative(err)
	}
	for _, p := range resp.Plugins {
		if p.GetID() == name {
			return p.GetExports()["root"], nil
		}
	}
	return "", nil
}

// ResumePaused resumes the task of container id if it is paused; a
// container without a task is an error wrapping errdefs.ErrNotFound.
func (b *Backend) ResumePaused(ctx context.Context, id string) error {
	c, err := b.client()
	if err != nil {
		return err
	}
	cctx, cancel := WithTimeout(ctx)
	defer cancel()
	tc := tasksapi.NewTasksClient(c)
	resp, err := tc.Get(cctx, &tasksapi.GetRequest{ContainerID: id})
	if err != nil {
		return errgrpc.ToNative(err)
	}
	if resp.GetProcess().GetStatus() != task.Status_PAUSED {
		return nil
	}
	if _, err := tc.Resume(cctx, &tasksapi.ResumeTaskRequest{ContainerID: id}); err != nil {
		return errgrpc.ToNative(err)
	}
	return nil
}

// Snapshotter returns the snapshotter called name.
func (b *Backend) Snapshotter(name string) (snapshots.Snapshotter, error) {
	c, err := b.client()
	if err != nil {
		return nil, err
	}
	return snproxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(c), name), nil
}

// Leases returns the lease manager.
func (b *Backend) Leases() (leases.Manager, error) {
	c, err := b.client()
	if err != nil {
		return nil, err
	}
	return leasesproxy.NewLeaseManager(leasesapi.NewLeasesClient(c)), nil
}

// Image returns the image record called name in ctx's namespace (its
// target and labels); an image containerd does not know is an error
// wrapping errdefs.ErrNotFound.
func (b *Backend) Image(ctx context.Context, name string) (images.Image, error) {
	c, err := b.client()
	if err != nil {
		return images.Image{}, err
	}
	cctx, cancel := WithTimeout(ctx)
	defer cancel()
	resp, err := imagesapi.NewImagesClient(c).Get(cctx, &imagesapi.GetImageRequest{Name: name})
	if err != nil {
		return images.Image{}, errgrpc.ToNative(err)
	}
	i := resp.Image
	t := i.GetTarget()
	return images.Image{
		Name:   i.GetName(),
		Labels: i.GetLabels(),
		Target: ocispec.Descriptor{MediaType: t.GetMediaType(), Digest: digest.Digest(t.GetDigest()), Size: t.GetSize(), Annotations: t.GetAnnotations()},
	}, nil
}

// Content returns containerd's content store.
func (b *Backend) Content() (content.Provider, error) {
	c, err := b.client()
	if err != nil {
		return nil, err
	}
	return contentproxy.NewContentStore(contentapi.NewContentClient(c)), nil
}

// Mounts returns the mount manager.
func (b *Backend) Mounts() (mount.Manager, error) {
	c, err := b.client()
	if err != nil {
		return nil, err
	}
	return mountproxy.NewMountManager(mountsapi.NewMountsClient(c)), nil
}

// Preconnect starts connecting to containerd in the background, so that the
// first call does not wait for the dial and handshake.
func (b *Backend) Preconnect() {
	if c, err := b.client(); err == nil {
		c.Connect()
	}
}

// Close closes the connection, if one was made; a later call dials again.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn == nil {
		return nil
	}
	err := b.conn.Close()
	b.conn = nil
	return err
}

// WithTimeout bounds one call back into containerd.
func WithTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, CallTimeout)
}

// Namespaces lists containerd's namespaces.
func (b *Backend) Namespaces(ctx context.Context) ([]string, error) {
	c, err := b.client()
	if err != nil {
		return nil, err
	}
	resp, err := namespacesapi.NewNamespacesClient(c).List(ctx, &namespacesapi.ListNamespacesRequest{})
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(resp.Namespaces))
	for _, n := range resp.Namespaces {
		names = append(names, n.Name)
	}
	return names, nil
}
