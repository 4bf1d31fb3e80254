package snapshot

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/fault"
	"github.com/snapview/snapview/pkg/snapshot/record"
	"github.com/snapview/snapview/pkg/view"
)

// writeLayer writes the tar stream that write produces as a gzip layer of
// mediaType into the content store, once, under the capture's lease, and
// returns it with its diff id (the digest of the uncompressed tar). More
// than limit bytes of tar (0: no limit) fail with errTooBig.
func (n *Node) writeLayer(ctx context.Context, rec *record.Record, mediaType string, limit int64, write func(io.Writer) error) (ocispec.Descriptor, digest.Digest, error) {
	cs := n.Client.ContentStore()
	w, err := content.OpenWriter(ctx, cs, content.WithRef("snapview-snapshot-"+rec.ID+"-layer"))
	if err != nil {
		return ocispec.Descriptor{}, "", fmt.Errorf("snapview: write the snapshot's layer: %w", err)
	}
	defer func() { _ = w.Close() }()
	if err := w.Truncate(0); err != nil {
		return ocispec.Descriptor{}, "", fmt.Errorf("snapview: write the snapshot's layer: %w", err)
	}
	compressed := digest.SHA256.Digester()
	bw := contentBuffer(w)
	cw := &countingWriter{w: io.MultiWriter(bw, compressed.Hash())}
	zw := gzip.NewWriter(cw)
	uncompressed := digest.SHA256.Digester()
	tw := io.MultiWriter(zw, uncompressed.Hash())
	if limit > 0 {
		tw = &cappedWriter{w: tw, limit: limit}
	}
	if err := write(tw); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	if err := zw.Close(); err != nil {
		return ocispec.Descriptor{}, "", fmt.Errorf("snapview: write the snapshot's layer: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return ocispec.Descriptor{}, "", fmt.Errorf("snapview: write the snapshot's layer: %w", err)
	}
	diffID := uncompressed.Digest()
	layer := ocispec.Descriptor{MediaType: mediaType, Digest: compressed.Digest(), Size: cw.n}
	if err := w.Commit(ctx, layer.Size, layer.Digest, content.WithLabels(map[string]string{"containerd.io/uncompressed": diffID.String()})); err != nil && !errdefs.IsAlreadyExists(err) {
		return ocispec.Descriptor{}, "", fmt.Errorf("snapview: write the snapshot's layer: %w", err)
	}
	return layer, diffID, nil
}

// contentBufferSize is how much of a blob goes to containerd's content
// store in one request: its client sends every Write as a request and
// waits for the answer, and a compressor writes a few hundred bytes at a
// time.
const contentBufferSize = 4 << 20

// contentBuffer buffers writes to a content writer (flushed by the caller
// before the commit).
func contentBuffer(w io.Writer) *bufio.Writer { return bufio.NewWriterSize(w, contentBufferSize) }

// writeChanges writes, as a tar stream to w, the changes of the container's
// active snapshot key in snapshotter sn against its parent. The parent is
// seen through a read-only view, made under the capture's lease. An
// overlay's changes are read from its upper directory alone (whiteouts and
// opaque directories turned into the tar's), not by walking both trees; any
// other snapshot is mounted read-only and compared with the parent file by
// file. Mounts that need containerd's mount manager go through it.
func (n *Node) writeChanges(ctx context.Context, rec *record.Record, sn, key string, w io.Writer) error {
	s := n.Client.SnapshotService(sn)
	info, err := s.Stat(ctx, key)
	if err != nil {
		return fmt.Errorf("snapview: the container's snapshot %s: %w", key, err)
	}
	lowerKey := record.LeasePrefix + rec.ID + "/parent"
	lower, err := s.View(ctx, lowerKey, info.Parent)
	if err != nil {
		return fmt.Errorf("snapview: a view of the container's image: %w", err)
	}
	defer func() {
		cctx, cancel := cleanupContext(ctx)
		defer cancel()
		_ = s.Remove(cctx, lowerKey)
	}()
	return n.withReadOnly(ctx, rec, "parent", lower, func(lowerRoot string) error {
		upper, err := s.Mounts(ctx, key)
		if err != nil {
			return fmt.Errorf("snapview: the container's snapshot %s: %w", key, err)
		}
		if dir := upperDir(upper); dir != "" {
			cw := archive.NewChangeWriter(w, dir)
			if err := fs.DiffDirChanges(ctx, lowerRoot, dir, fs.DiffSourceOverlayFS, cw.HandleChange); err != nil {
				return fmt.Errorf("snapview: the changes in %s: %w", dir, err)
			}
			return cw.Close()
		}
		return n.withReadOnly(ctx, rec, "rootfs", upper, func(upperRoot string) error {
			return archive.WriteDiff(ctx, w, lowerRoot, upperRoot)
		})
	})
}

// upperDir returns the upper directory on the host of an overlay among
// mounts, or "".
func upperDir(mounts []mount.Mount) string {
	if len(mounts) == 0 {
		return ""
	}
	m := mounts[len(mounts)-1]
	if m.Type != "overlay" && !strings.HasSuffix(m.Type, "/overlay") {
		return ""
	}
	for _, o := range m.Options {
		if dir, ok := strings.CutPrefix(o, "upperdir="); ok && !strings.Contains(dir, "{{") {
			return dir
		}
	}
	return ""
}

// withReadOnly mounts the given mounts read-only (through containerd's mount
// manager, as activation <lease>/<part>, when they need it) at
// record.CaptureMounts(<state>, id)/<part>, runs f on it, and unmounts. The
// mountpoint is where the sweep finds it if the command dies before that.
// A disk image a guest wrote is never mounted.
func (n *Node) withReadOnly(ctx context.Context, rec *record.Record, part string, mounts []mount.Mount, f func(root string) error) error {
	for _, m := range mounts {
		if who, err := guestWritten(m); err != nil || who != "" {
			return fmt.Errorf("snapview: %s was handed to a guest (container %s), and snapview never mounts a filesystem a guest wrote on the host: %w", m.Source, who, err)
		}
	}
	if view.NeedsManager(mounts) {
		mm := n.Client.MountManager()
		name := record.LeasePrefix + rec.ID + "/" + part
		ai, err := mm.Activate(ctx, name, mounts, mount.WithLabels(map[string]string{record.LabelSnapshot: rec.ID}))
		if err != nil {
			return fmt.Errorf("snapview: activate the mounts of %s: %w", name, err)
		}
		defer func() {
			cctx, cancel := cleanupContext(ctx)
			defer cancel()
			_ = mm.Deactivate(leases.WithLease(cctx, ""), name)
		}()
		mounts = ai.System
	}
	mp := filepath.Join(record.CaptureMounts(n.StateDir, rec.ID), part)
	if _, err := view.Mount(mounts, mp); err != nil {
		return fmt.Errorf("snapview: mount the %s read-only: %w", part, err)
	}
	defer func() {
		_ = view.Unmount(mp)
		_ = os.Remove(filepath.Dir(mp))
	}()
	fault.Point(PointMounted, rec.Source)
	return f(mp)
}

// syncRoot flushes the filesystem a running container's root is on to its
// disk, so that a disk image read through another mount sees its writes.
func syncRoot(pid uint32) error {
	f, err := os.Open(fmt.Sprintf("/proc/%d/root", pid))
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

// guestWritten says whose guest wrote the disk image m mounts, if any.
func guestWritten(m mount.Mount) (string, error) {
	if !diskImage(m) {
		return "", nil
	}
	return blockdev.GuestWritten(m.Source)
}

// diskImage reports whether m mounts a disk image (a file with the loop
// option, or one a transform makes).
func diskImage(m mount.Mount) bool {
	return slices.Contains(m.Options, "loop") || strings.HasPrefix(m.Type, "mkfs/")
}
