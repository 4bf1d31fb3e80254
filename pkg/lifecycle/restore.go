package lifecycle

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"unsafe"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/log"
	"github.com/klauspost/compress/zstd"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/blockdev"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/diskstream"
	"github.com/snapview/snapview/pkg/fault"
	"github.com/snapview/snapview/pkg/image"
	"github.com/snapview/snapview/pkg/snapshot/record"
)

// Disk restore: io.snapview.restore=<id> starts a block-mode container's
// writable disk as a disk snapshot's saved disk, written as bytes (holes as
// holes) where the shim would have formatted a new one (a layered rootfs)
// or into the container's new disk before it is attached (a one-disk
// rootfs, same size only). Only the id is read from the container; the
// snapshot's kind, form, base, snapshotter and size come from snapview's
// record, and the disk is never mounted or parsed.

// MaxRestoreSize bounds the disk a restore writes: a record's size (which
// a pulled snapshot brings from a registry) cannot make the shim create a
// larger file.
const MaxRestoreSize = 1 << 40

// PointRestoreWritten is the crash point right after the saved disk was
// written into the container's.
const PointRestoreWritten = "restore-written"

// restorePlan is the disk snapshot a container restores, as checked.
type restorePlan struct {
	rec    record.Record
	blob   ocispec.Descriptor
	size   int64
	layout string
}

// checkRestore refuses io.snapview.restore where it cannot apply, before
// containerd is asked anything: outside block mode, or with restoring off.
func (p *Plan) checkRestore(mode, modeFrom string) error {
	id := p.ann.Restore
	if id == "" {
		return nil
	}
	if mode != config.ModeBlock {
		return fmt.Errorf("snapview: annotation %s=%s restores a block-mode container's writable disk, but the mode is %s (%s)", annotations.Restore, id, mode, modeFrom)
	}
	if cfg := p.req.Config; !cfg.Snapshots.Restore {
		return fmt.Errorf("snapview: annotation %s=%s: restoring snapshots is off ([snapshots] restore = false in %s)", annotations.Restore, id, cfg.Source)
	}
	return nil
}

// resolveRestore finds and checks the disk snapshot p's container
// restores: a container snapshot in disk form, taken of a container of the
// same image (its base's layers are the container's snapshot's parent)
// on the same snapshotter, of the same rootfs layout, whose saved disk
// fits. Every mismatch is a snapview: error naming the snapshot.
func (l *Lifecycle) resolveRestore(ctx context.Context, p *Plan) error {
	id := p.ann.Restore
	if id == "" {
		return nil
	}
	fail := func(format string, args ...any) error {
		return fmt.Errorf("snapview: annotation %s: snapshot %s "+format, append([]any{annotations.Restore, id}, args...)...)
	}
	cctx, cancel := callContext(ctx)
	defer cancel()
	rec, err := record.Lookup(cctx, l.backend.Image, p.req.Namespace, id)
	if err != nil {
		return fmt.Errorf("snapview: annotation %s: %w", annotations.Restore, err)
	}
	if rec.Kind != record.KindContainer || rec.Form != record.FormDisk {
		return fail("is a %s snapshot in %s form, not a container's disk (form disk, taken of a block-mode container)", rec.Kind, rec.Form)
	}
	if rec.Snapshotter != p.snapshotter {
		return fail("was taken on snapshotter %s, and the container is on %s", rec.Snapshotter, p.snapshotter)
	}
	cs, err := l.backend.Content()
	if err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	m, err := readDiskManifest(cctx, cs, rec.Target)
	if err != nil {
		return fail("%v", err)
	}
	if m.Subject == nil || m.Subject.Digest.String() != rec.Base {
		return fail("names no base image, or another than its record's")
	}
	base, err := image.Resolve(cctx, cs, *m.Subject, nil)
	if err != nil {
		return fail("its base image %s: %v", rec.Base, err)
	}
	if base.ChainID != p.parent {
		return fail("was taken of a container of image %s, whose layers are not this container's (its snapshot's parent is %s, not %s): run a container of the snapshot's base image", rec.Base, p.parent, base.ChainID)
	}
	blob := m.Layers[0]
	size, err := strconv.ParseInt(blob.Annotations[record.AnnotationDiskSize], 10, 64)
	if err != nil || size <= 0 || size > MaxRestoreSize {
		return fail("records a disk size of %q (at most %d bytes)", blob.Annotations[record.AnnotationDiskSize], int64(MaxRestoreSize))
	}
	layout := blob.Annotations[record.AnnotationDiskLayout]
	want := record.LayoutDisk
	if p.layered != nil {
		want = record.LayoutLayered
	}
	if layout != want {
		return fail("saved a %s rootfs's disk, and the container's rootfs is %s", layout, want)
	}
	p.restore = &restorePlan{rec: rec, blob: blob, size: size, layout: layout}
	return nil
}

// readDiskManifest reads a disk snapshot's artifact manifest and checks
// its shape: the artifact type, one blob of the disk's media type.
func readDiskManifest(ctx context.Context, cs content.Provider, d ocispec.Descriptor) (ocispec.Manifest, error) {
	var m ocispec.Manifest
	if d.MediaType != ocispec.MediaTypeImageManifest || d.Size > 1<<20 {
		return m, fmt.Errorf("has a %s of %d bytes, not a disk artifact's manifest", d.MediaType, d.Size)
	}
	b, err := content.ReadBlob(ctx, cs, d)
	if err != nil {
		return m, fmt.Errorf("its manifest: %w", err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("its manifest: %w", err)
	}
	if m.ArtifactType != record.ArtifactTypeDisk || len(m.Layers) != 1 || m.Layers[0].MediaType != record.MediaTypeDisk {
		return m, fmt.Errorf("is not a disk artifact (artifact type %q, %d blobs)", m.ArtifactType, len(m.Layers))
	}
	return m, nil
}

func (s *setupRun) restoring() bool { return s.p.restore != nil }

// restoreDisk writes the saved disk into the container's writable disk,
// recording first where: a layered rootfs's writable image (created here,
// or the one containerd just formatted, emptied), at least as large as the
// saved disk and as containerd asks, or a
// one-disk rootfs's image or device, which must be the saved disk's size.
// A disk that a guest already got (the container's earlier task) keeps
// what that guest wrote: it is not restored again.
func (s *setupRun) restoreDisk(ctx context.Context) error {
	r := s.p.restore
	m, _ := s.p.writableMount()
	disk := m.Source
	if who, err := blockdev.GuestWritten(disk); err != nil || who != "" {
		s.logger.WithFields(log.Fields{"snapshot": r.rec.ID, "disk": disk, "guest": who}).WithError(err).
			Info("snapview: the writable disk is a guest's already (an earlier task of the container): not restored again")
		return err
	}
	var (
		f       *os.File
		err     error
		created bool
		gap     func(off, n int64) error
	)
	switch l := s.p.layered; {
	case l != nil:
		size := r.size
		if l.Mkfs != nil && l.Mkfs.Size > size {
			size = l.Mkfs.Size
		}
		s.v.State.Restore = &bundle.Restore{Snapshot: r.rec.ID, Disk: disk, Created: true}
		f, err = os.OpenFile(disk, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err == nil {
			created = true
		} else if errors.Is(err, fs.ErrExist) {
			// containerd formatted it already (its mount manager runs
			// the snapshot's mkfs before the task reaches the shim) and
			// no guest has had it (the mark, above): its empty
			// filesystem is replaced, all of it.
			s.v.State.Restore.Created = false
			f, err = os.OpenFile(disk, os.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err == nil {
				err = regularFile(f)
			}
			if err == nil {
				size = max(size, fileSize(f))
				err = f.Truncate(0)
			}
		}
		if err == nil {
			err = f.Truncate(size)
		}
	default:
		s.v.State.Restore = &bundle.Restore{Snapshot: r.rec.ID, Disk: disk}
		f, err = os.OpenFile(disk, os.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		var size int64
		if err == nil {
			size, err = diskSize(f)
		}
		if err == nil && size != r.size {
			err = fmt.Errorf("the container's disk is %d bytes and the saved disk %d: a one-disk rootfs is restored only into a disk of its size (the snapshotter's configured size)", size, r.size)
		}
		if err == nil {
			if fi, _ := f.Stat(); fi.Mode().IsRegular() {
				// The container's own copy of its image: made all hole,
				// then the saved extents written.
				if err = f.Truncate(0); err == nil {
					err = f.Truncate(size)
				}
			} else {
				gap = func(off, n int64) error { return zeroOut(f, off, n) }
			}
		}
	}
	if err != nil {
		if f != nil {
			f.Close()
		}
		return fmt.Errorf("snapview: annotation %s: snapshot %s: the container's disk %s: %w", annotations.Restore, r.rec.ID, disk, err)
	}
	defer f.Close()
	st, err := s.writeSaved(ctx, f, gap)
	if err == nil {
		err = f.Sync()
	}
	if err != nil {
		return fmt.Errorf("snapview: annotation %s: snapshot %s: write the saved disk into %s: %w", annotations.Restore, r.rec.ID, disk, err)
	}
	fault.Point(PointRestoreWritten, s.p.req.ID)
	s.logger.WithFields(log.Fields{"snapshot": r.rec.ID, "source": r.rec.Source, "base": r.rec.Base, "disk": disk, "created": created,
		"disk_size": r.size, "data": st.Data, "extents": st.Extents}).Info("snapview: writable disk restored from a disk snapshot, never mounted")
	return nil
}

// writeSaved streams the snapshot's blob from the content store into f.
func (s *setupRun) writeSaved(ctx context.Context, f *os.File, gap func(off, n int64) error) (diskstream.Stats, error) {
	r := s.p.restore
	cs, err := s.l.backend.Content()
	if err != nil {
		return diskstream.Stats{}, err
	}
	ra, err := cs.ReaderAt(ctx, r.blob)
	if err != nil {
		return diskstream.Stats{}, err
	}
	defer func() { _ = ra.Close() }()
	// containerd's content client answers each ReadAt with a request: the
	// blob is read in large pieces.
	src := bufio.NewReaderSize(io.NewSectionReader(ra, 0, r.blob.Size), 4<<20)
	zr, err := zstd.NewReader(src, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(64<<20))
	if err != nil {
		return diskstream.Stats{}, err
	}
	defer zr.Close()
	size, err := diskstream.Header(zr, r.size)
	if err != nil {
		return diskstream.Stats{}, err
	}
	if size != r.size {
		return diskstream.Stats{}, fmt.Errorf("%w: a disk of %d bytes, and its record says %d", diskstream.ErrFormat, size, r.size)
	}
	return diskstream.Restore(zr, f, size, gap)
}

// undoRestore removes a writable image the restore created, when the
// setup is rolled back before any guest got it: a retried create restores
// it again. A disk a guest may have written (it carries the guest mark, or
// the view is not this process's rollback) is the container's, and stays
// with its snapshot.
func (t *teardownRun) undoRestore(ctx context.Context) error {
	r := t.v.State.Restore
	if r == nil || !r.Created || t.v.origin != rolledBack {
		return nil
	}
	if who, err := blockdev.GuestWritten(r.Disk); err != nil || who != "" {
		return err
	}
	if err := os.Remove(r.Disk); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove the restored disk %s: %w", r.Disk, err)
	}
	return nil
}

// regularFile refuses anything but a regular file: the layered rootfs's
// writable image is one.
func regularFile(f *os.File) error {
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("it is a %s, not a disk image file", fi.Mode().Type())
	}
	return nil
}

// fileSize is f's size, 0 if it cannot be read.
func fileSize(f *os.File) int64 {
	fi, err := f.Stat()
	if err != nil {
		return 0
	}
	return fi.Size()
}

// diskSize is the size of a disk image file or block device.
func diskSize(f *os.File) (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if fi.Mode().IsRegular() {
		return fi.Size(), nil
	}
	if fi.Mode()&os.ModeDevice == 0 || fi.Mode()&os.ModeCharDevice != 0 {
		return 0, fmt.Errorf("it is a %s, not a disk image or a block device", fi.Mode().Type())
	}
	var n uint64
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&n))); errno != 0 { //nolint:gosec // G103: the ioctl writes a u64 on the stack
		return 0, errno
	}
	return int64(n), nil
}

// zeroOut zeroes n bytes of block device f at off (BLKZEROOUT), where the
// saved disk has no data.
func zeroOut(f *os.File, off, n int64) error {
	r := [2]uint64{uint64(off), uint64(n)}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKZEROOUT, uintptr(unsafe.Pointer(&r))); errno != 0 { //nolint:gosec // G103: the ioctl reads the range on the stack
		return fmt.Errorf("zero %d bytes at %d: %w", n, off, errno)
	}
	return nil
}
