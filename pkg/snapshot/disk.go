package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"unsafe"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/diskstream"
	"github.com/snapview/snapview/pkg/fault"
	"github.com/snapview/snapview/pkg/rootfs"
	"github.com/snapview/snapview/pkg/snapshot/record"
)

// The disk form's names, defined with the record for the shim's restore.
const (
	ArtifactTypeDisk     = record.ArtifactTypeDisk
	MediaTypeDisk        = record.MediaTypeDisk
	AnnotationDiskSize   = record.AnnotationDiskSize
	AnnotationDiskLayout = record.AnnotationDiskLayout
	LayoutLayered        = record.LayoutLayered
	LayoutDisk           = record.LayoutDisk
)

// diskOf finds the writable disk of a block-mode container's rootfs from
// its snapshot's mounts, as the shim does: a layered rootfs's writable
// image, or a one-disk rootfs's image file or block device. Nothing is
// mounted, attached or parsed.
func (n *Node) diskOf(ctx context.Context, info containers.Container) (path, layout string, err error) {
	ms, err := n.Client.SnapshotService(info.Snapshotter).Mounts(ctx, info.SnapshotKey)
	if err != nil {
		return "", "", fmt.Errorf("snapview: container %s: the mounts of its snapshot %s: %w", info.ID, info.SnapshotKey, err)
	}
	if rootfs.IsLayered(ms) {
		l, err := rootfs.DetectLayered(ms)
		if err != nil {
			return "", "", fmt.Errorf("snapview: container %s: %w", info.ID, err)
		}
		return l.Writable.Source, LayoutLayered, nil
	}
	b, err := rootfs.DetectBlock(ms)
	if err != nil {
		return "", "", fmt.Errorf("snapview: container %s: %w", info.ID, err)
	}
	return b.Mount.Source, LayoutDisk, nil
}

// captureDisk takes a disk-form container snapshot of a block-mode
// container: its writable disk read as bytes (its holes and zero blocks
// left out), compressed and written once into the content store, and an
// artifact manifest whose subject is the container's image. The disk is
// never mounted, attached to a loop device of snapview's own, or parsed:
// a guest wrote it. A running container's task is paused (Create), and
// the loop device its guest writes through is flushed into the file first.
func (n *Node) captureDisk(ctx context.Context, rec *record.Record, info containers.Container, ns string) (int64, error) {
	path, layout, err := n.diskOf(ctx, info)
	if err != nil {
		return 0, err
	}
	base, err := n.base(ctx, info)
	if err != nil {
		return 0, err
	}
	rec.Base = base.Manifest.Digest.String()
	n.flushDevice(ctx, ns, info.ID)
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("snapview: container %s has no writable disk yet (%s): its guest never ran; there is nothing but its image to save", info.ID, path)
	}
	if err != nil {
		return 0, fmt.Errorf("snapview: container %s's writable disk: %w", info.ID, err)
	}
	defer f.Close()
	size, err := diskSize(f)
	if err != nil {
		return 0, fmt.Errorf("snapview: container %s's writable disk %s: %w", info.ID, path, err)
	}

	cs := n.Client.ContentStore()
	w, err := content.OpenWriter(ctx, cs, content.WithRef("snapview-snapshot-"+rec.ID+"-disk"))
	if err != nil {
		return 0, fmt.Errorf("snapview: write the snapshot's disk: %w", err)
	}
	defer func() { _ = w.Close() }()
	if err := w.Truncate(0); err != nil {
		return 0, fmt.Errorf("snapview: write the snapshot's disk: %w", err)
	}
	dg := digest.SHA256.Digester()
	bw := contentBuffer(w)
	cw := &countingWriter{w: io.MultiWriter(bw, dg.Hash())}
	zw, err := zstd.NewWriter(cw, zstd.WithEncoderConcurrency(min(runtime.GOMAXPROCS(0), 4)), zstd.WithEncoderLevel(zstd.SpeedDefault))
	if err != nil {
		return 0, err
	}
	st, err := diskstream.Write(zw, f, size)
	if err == nil {
		err = zw.Close()
	}
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		return 0, fmt.Errorf("snapview: read container %s's writable disk %s: %w", info.ID, path, err)
	}
	blob := ocispec.Descriptor{MediaType: MediaTypeDisk, Digest: dg.Digest(), Size: cw.n,
		Annotations: map[string]string{AnnotationDiskSize: strconv.FormatInt(size, 10), AnnotationDiskLayout: layout}}
	if err := w.Commit(ctx, blob.Size, blob.Digest); err != nil && !errdefs.IsAlreadyExists(err) {
		return 0, fmt.Errorf("snapview: write the snapshot's disk: %w", err)
	}
	fault.Point(PointLayer, rec.Source)

	config, err := n.writeJSON(ctx, rec, "config", ocispec.MediaTypeEmptyJSON, struct{}{}, nil)
	if err != nil {
		return 0, err
	}
	fault.Point(PointConfig, rec.Source)
	ann := annotations(*rec)
	ann[AnnotationDiskSize], ann[AnnotationDiskLayout] = blob.Annotations[AnnotationDiskSize], layout
	subject := base.Manifest
	subject.Platform, subject.Annotations = nil, nil
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: ArtifactTypeDisk, Config: config,
		Layers: []ocispec.Descriptor{blob}, Subject: &subject, Annotations: ann}
	m.SchemaVersion = 2
	man, err := n.writeJSON(ctx, rec, "manifest", ocispec.MediaTypeImageManifest, m, map[string]string{
		"containerd.io/gc.ref.content.config":  config.Digest.String(),
		"containerd.io/gc.ref.content.l.0":     blob.Digest.String(),
		"containerd.io/gc.ref.content.subject": subject.Digest.String(),
	})
	if err != nil {
		return 0, err
	}
	fault.Point(PointManifest, rec.Source)
	rec.Target = man
	log.G(ctx).WithFields(log.Fields{"snapshot": rec.ID, "source": info.ID, "disk": path, "layout": layout, "disk_size": size,
		"data": st.Data, "extents": st.Extents, "blob": blob.Size}).Info("snapview: writable disk saved, never mounted")
	return blob.Size + config.Size + man.Size, nil
}

// diskSize is the size of a disk image file or block device.
func diskSize(f *os.File) (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	switch {
	case fi.Mode().IsRegular():
		return fi.Size(), nil
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		var n uint64
		if err := ioctlGetSize(f, &n); err != nil {
			return 0, fmt.Errorf("its size: %w", err)
		}
		return int64(n), nil
	}
	return 0, fmt.Errorf("it is a %s, not a disk image or a block device", fi.Mode().Type())
}

// flushDevice writes what the guest of container id has written through
// its loop device, and is still in that device's page cache, into the
// disk image the capture reads: fsync of the device (the one the shim
// attached, as its state file names it). A container without a task has
// no device, and nothing to flush.
func (n *Node) flushDevice(ctx context.Context, ns, id string) {
	st, err := bundle.ReadState(filepath.Join(n.StateDir, "io.containerd.runtime.v2.task", ns, id))
	if err != nil || st.Block == nil || st.Block.Device == "" {
		return
	}
	f, err := os.OpenFile(st.Block.Device, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err == nil {
		err = f.Sync()
		f.Close()
	}
	if err != nil {
		log.G(ctx).WithError(err).WithField("device", st.Block.Device).Warn("snapview: flush the container's disk device before the capture")
	}
}

// ioctlGetSize reads a block device's size (BLKGETSIZE64).
func ioctlGetSize(f *os.File, n *uint64) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(n))) //nolint:gosec // G103: the ioctl writes a u64 the caller owns
	if errno != 0 {
		return errno
	}
	return nil
}
