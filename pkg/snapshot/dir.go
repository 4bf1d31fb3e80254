package snapshot

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/fault"
	"github.com/snapview/snapview/pkg/snapshot/record"
)

// captureDir takes a directory snapshot of dir, an absolute path in
// container info, as the container sees it: through its init process's
// root while it has a task, else from its rootfs snapshot mounted
// read-only (filesystem-backed snapshotters only). The directory is
// resolved inside the container without ever leaving it, and read with
// every component opened relative to its parent and never following a
// symlink, which is kept as a symlink; device nodes, FIFOs and sockets are
// left out and counted. The result is a one-layer image whose root is the
// directory's content, unpacked in the container's snapshotter, where a
// volume of another container views it. It returns the bytes the
// snapshot's own blobs take.
func (n *Node) captureDir(ctx context.Context, rec *record.Record, info containers.Container, task client.Task, dir string) (int64, error) {
	if !path.IsAbs(dir) || path.Clean(dir) != dir {
		return 0, fmt.Errorf("snapview: --dir %q is not a clean absolute path in the container", dir)
	}
	var t *treeWriter
	layer, diffID, err := n.writeLayer(ctx, rec, ocispec.MediaTypeImageLayerGzip, n.Config.Snapshots.MaxDirectoryBytes(), func(w io.Writer) error {
		return n.withContainerRoot(ctx, rec, info, task, func(root *os.File) error {
			fd, err := unix.Openat2(int(root.Fd()), dir, &unix.OpenHow{
				Flags:   unix.O_RDONLY | unix.O_DIRECTORY | unix.O_CLOEXEC,
				Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
			})
			if err != nil {
				return fmt.Errorf("snapview: directory %s of container %s: %w", dir, info.ID, err)
			}
			d := os.NewFile(uintptr(fd), dir)
			defer d.Close()
			t = &treeWriter{tw: tar.NewWriter(w), links: map[[2]uint64]string{}}
			if err := t.tree(d, "."); err != nil {
				return err
			}
			return t.tw.Close()
		})
	})
	if errors.Is(err, errTooBig) {
		return 0, fmt.Errorf("snapview: directory %s of container %s is larger than the %s a directory snapshot may be ([snapshots] max_directory_size in %s)",
			dir, info.ID, n.Config.Snapshots.MaxDirectorySize, n.Config.Source)
	}
	if err != nil {
		return 0, fmt.Errorf("snapview: read directory %s of container %s: %w", dir, info.ID, err)
	}
	rec.Skipped = t.skipped
	fault.Point(PointLayer, rec.Source)

	p := platforms.DefaultSpec()
	cfg := ocispec.Image{
		Created:  &rec.Created,
		Platform: ocispec.Platform{Architecture: p.Architecture, OS: p.OS, Variant: p.Variant},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{diffID}},
		History: []ocispec.History{{Created: &rec.Created, CreatedBy: fmt.Sprintf("snapviewctl snapshot create --dir %s %s", dir, info.ID),
			Comment: "snapview snapshot " + rec.ID}},
	}
	config, err := n.writeJSON(ctx, rec, "config", ocispec.MediaTypeImageConfig, cfg, nil)
	if err != nil {
		return 0, err
	}
	fault.Point(PointConfig, rec.Source)
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Config: config, Layers: []ocispec.Descriptor{layer}, Annotations: annotations(*rec)}
	m.SchemaVersion = 2
	man, err := n.writeJSON(ctx, rec, "manifest", ocispec.MediaTypeImageManifest, m, map[string]string{
		"containerd.io/gc.ref.content.config": config.Digest.String(), "containerd.io/gc.ref.content.l.0": layer.Digest.String(),
	})
	if err != nil {
		return 0, err
	}
	fault.Point(PointManifest, rec.Source)
	rec.Target = man
	// Unpacked now, in the container's snapshotter: a volume views it there,
	// and the shim, which mounts volumes, does not unpack.
	img := client.NewImageWithPlatform(n.Client, imageRecord(*rec), platforms.Default())
	if err := img.Unpack(ctx, info.Snapshotter); err != nil {
		return 0, fmt.Errorf("snapview: unpack the directory snapshot in snapshotter %s: %w", info.Snapshotter, err)
	}
	fault.Point(PointUnpacked, rec.Source)
	return layer.Size + config.Size + man.Size, nil
}

// withContainerRoot runs f on the root directory of the container as it
// sees it: its init process's root while it has a live task, else its
// rootfs snapshot mounted read-only in a temporary directory (a snapshot
// that is a disk image is not mounted on the host).
func (n *Node) withContainerRoot(ctx context.Context, rec *record.Record, info containers.Container, task client.Task, f func(root *os.File) error) error {
	if task != nil {
		if root, err := os.OpenFile(fmt.Sprintf("/proc/%d/root", task.Pid()), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err == nil {
			defer root.Close()
			return f(root)
		}
	}
	ms, err := n.Client.SnapshotService(info.Snapshotter).Mounts(ctx, info.SnapshotKey)
	if err != nil {
		return fmt.Errorf("snapview: container %s: the mounts of its snapshot: %w", info.ID, err)
	}
	if slices.ContainsFunc(ms, diskImage) {
		return fmt.Errorf("snapview: container %s has no task, and its rootfs in snapshotter %s is a disk image, which snapview does not mount on the host to read a directory; take the snapshot while the container runs", info.ID, info.Snapshotter)
	}
	return n.withReadOnly(ctx, rec, "rootfs", ms, func(dir string) error {
		root, err := os.OpenFile(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer root.Close()
		return f(root)
	})
}

// treeWriter writes a directory tree as a tar stream, reading each entry
// relative to its parent, never following a symlink.
type treeWriter struct {
	tw      *tar.Writer
	skipped int
	// links maps a file with several links (device, inode) to the first
	// path it was written under.
	links map[[2]uint64]string
	depth int
}

var errTooBig = errors.New("the directory is too big")

// maxDepth bounds the depth of a tree (each level holds a descriptor).
const maxDepth = 256

// pseudo are the filesystems a directory snapshot does not enter: the
// kernel's views of itself, not a container's files.
var pseudo = map[int64]bool{
	unix.PROC_SUPER_MAGIC: true, unix.SYSFS_MAGIC: true, unix.CGROUP_SUPER_MAGIC: true, unix.CGROUP2_SUPER_MAGIC: true,
	unix.DEVPTS_SUPER_MAGIC: true, unix.DEBUGFS_MAGIC: true, unix.TRACEFS_MAGIC: true,
	unix.SECURITYFS_MAGIC: true, unix.BPF_FS_MAGIC: true, unix.PSTOREFS_MAGIC: true, unix.BINFMTFS_MAGIC: true,
}

// tree writes directory d, at name in the archive, and what it holds.
func (t *treeWriter) tree(d *os.File, name string) error {
	t.depth++
	defer func() { t.depth-- }()
	if t.depth > maxDepth {
		return fmt.Errorf("%s: directories nested more than %d deep", name, maxDepth)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(d.Fd()), &st); err != nil {
		return err
	}
	if err := t.header(name+"/", tar.TypeDir, &st, ""); err != nil {
		return err
	}
	names, err := d.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	slices.Sort(names)
	for _, n := range names {
		if err := t.entry(d, n, path.Join(name, n)); err != nil {
			return err
		}
	}
	return nil
}

// entry writes entry n of directory d, at name in the archive.
func (t *treeWriter) entry(d *os.File, n, name string) error {
	var st unix.Stat_t
	if err := unix.Fstatat(int(d.Fd()), n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil // gone while read (a container not paused)
		}
		return fmt.Errorf("%s: %w", name, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		fd, err := unix.Openat(int(d.Fd()), n, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		sub := os.NewFile(uintptr(fd), name)
		defer sub.Close()
		var fs unix.Statfs_t
		if err := unix.Fstatfs(fd, &fs); err == nil && pseudo[fs.Type] {
			return nil
		}
		return t.tree(sub, name)
	case unix.S_IFLNK:
		buf := make([]byte, unix.PathMax)
		l, err := unix.Readlinkat(int(d.Fd()), n, buf)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		return t.header(name, tar.TypeSymlink, &st, string(buf[:l]))
	case unix.S_IFREG:
		return t.file(d, n, name, &st)
	default:
		t.skipped++ // a device node, FIFO or socket
		return nil
	}
}

// file writes regular file n of directory d, at name in the archive, or a
// hard link to where the archive holds it already.
func (t *treeWriter) file(d *os.File, n, name string, st *unix.Stat_t) error {
	key := [2]uint64{st.Dev, st.Ino}
	if st.Nlink > 1 {
		if first, ok := t.links[key]; ok {
			return t.header(name, tar.TypeLink, st, first)
		}
		t.links[key] = name
	}
	fd, err := unix.Openat(int(d.Fd()), n, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	var now unix.Stat_t
	if err := unix.Fstat(fd, &now); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if now.Mode&unix.S_IFMT != unix.S_IFREG || now.Ino != st.Ino || now.Dev != st.Dev {
		return fmt.Errorf("%s: changed while it was read", name)
	}
	if err := t.header(name, tar.TypeReg, &now, ""); err != nil {
		return err
	}
	if _, err := io.CopyN(t.tw, f, now.Size); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// header writes the tar header of an entry of type typ with st's metadata.
func (t *treeWriter) header(name string, typ byte, st *unix.Stat_t, link string) error {
	h := &tar.Header{
		Typeflag: typ, Name: name, Linkname: link, Format: tar.FormatPAX,
		Mode: int64(st.Mode & 0o7777), Uid: int(st.Uid), Gid: int(st.Gid),
		ModTime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
	}
	if typ == tar.TypeReg {
		h.Size = st.Size
	}
	return t.tw.WriteHeader(h)
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// cappedWriter fails with errTooBig once more than limit bytes are
// written.
type cappedWriter struct {
	w     io.Writer
	n     int64
	limit int64
}

func (c *cappedWriter) Write(p []byte) (int, error) {
	if c.n+int64(len(p)) > c.limit {
		return 0, errTooBig
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
