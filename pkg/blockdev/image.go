package blockdev

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/child"
)

// Dir is a directory a new disk image's filesystem holds from the start.
type Dir struct {
	Path     string // absolute, inside the filesystem
	Mode     os.FileMode
	UID, GID int
}

// ImageSpec describes a disk image to create: its filesystem (ext2, ext3
// or ext4), size, optional UUID, and the directories it holds.
type ImageSpec struct {
	FSType string
	Size   int64
	UUID   string
	Dirs   []Dir
}

// ErrNotExt is returned by CheckImage for a file that holds no ext2/3/4
// filesystem.
var ErrNotExt = errors.New("not an ext2/3/4 filesystem image")

// CreateImage creates the disk image at path, as containerd's mkfs
// transformer would (a sparse file of spec.Size formatted with
// mkfs.<fstype>), except that it is never mounted: the directories the
// filesystem must hold (an overlay's upper and work directories, say) are
// put in by mkfs itself (-d), from a directory tree made for the purpose.
// The image is formatted under a temporary name beside path and renamed
// into place, so that a crash leaves either no image or a whole one. It
// returns false, and changes nothing, when path exists already.
func CreateImage(ctx context.Context, path string, spec ImageSpec) (created bool, retErr error) {
	if _, err := os.Lstat(path); err == nil {
		return false, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return false, err
	}
	switch spec.FSType {
	case "ext2", "ext3", "ext4":
	default:
		return false, fmt.Errorf("cannot create a %q image: only ext2, ext3 and ext4", spec.FSType)
	}
	if spec.Size <= 0 {
		return false, fmt.Errorf("cannot create %s: no size", path)
	}
	mkfs, err := exec.LookPath("mkfs." + spec.FSType)
	if err != nil {
		return false, fmt.Errorf("create %s: mkfs.%s (e2fsprogs) is needed to format it: %w", path, spec.FSType, err)
	}
	tree, err := os.MkdirTemp("", "snapview-image-")
	if err != nil {
		return false, err
	}
	defer os.RemoveAll(tree)
	if err := os.Chmod(tree, 0o755); err != nil {
		return false, err
	}
	for _, d := range spec.Dirs {
		rel := strings.TrimPrefix(filepath.Clean("/"+d.Path), "/")
		if rel == "" || strings.HasPrefix(rel, "..") {
			return false, fmt.Errorf("directory %q is not inside the image", d.Path)
		}
		p := filepath.Join(tree, rel)
		if err := os.MkdirAll(p, 0o755); err != nil {
			return false, err
		}
		if err := os.Chmod(p, d.Mode.Perm()); err != nil {
			return false, err
		}
		if err := os.Lchown(p, d.UID, d.GID); err != nil {
			return false, err
		}
	}

	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".snapview-new")
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, err // a half-made image of an earlier attempt that died
	}
	defer func() {
		if retErr != nil {
			os.Remove(tmp)
		}
	}()
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return false, err
	}
	err = f.Truncate(spec.Size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return false, err
	}
	args := []string{"-q", "-F", "-d", tree}
	if spec.UUID != "" {
		args = append(args, "-U", spec.UUID)
	}
	out, err := child.CombinedOutput(exec.CommandContext(ctx, mkfs, append(args, tmp)...))
	if err != nil {
		return false, fmt.Errorf("format %s: %s: %w", path, strings.TrimSpace(string(out)), err)
	}
	if err := syncFile(tmp); err != nil {
		return false, err
	}
	if err := os.Rename(tmp, path); err != nil {
		return false, err
	}
	return true, syncFile(filepath.Dir(path))
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// CheckImage checks that the file at path holds an ext2/3/4 filesystem
// (its superblock's magic number), without mounting it. A file that does
// not is ErrNotExt.
func CheckImage(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	magic := make([]byte, 2)
	if _, err := f.ReadAt(magic, 1024+0x38); err != nil || magic[0] != 0x53 || magic[1] != 0xef {
		return fmt.Errorf("%s: %w", path, ErrNotExt)
	}
	return nil
}

// guestXattr marks a disk image that a guest got to write. It is in the
// trusted namespace: only a process with CAP_SYS_ADMIN in the host's user
// namespace reads or writes it, so a container cannot forge or remove it.
const guestXattr = "trusted.snapview.guest"

// MarkGuestWritten records on the disk image at path that container id's
// guest may write it, before it gets it: a filesystem a guest wrote is never
// to be mounted on the host (GuestWritten). A filesystem without extended
// attributes for the file cannot hold the mark: that is an error wrapping
// unix.ENOTSUP, for the caller to judge.
func MarkGuestWritten(path, id string) error {
	if err := unix.Setxattr(path, guestXattr, []byte(id), 0); err != nil {
		return fmt.Errorf("mark %s as a guest's disk: %w", path, err)
	}
	return nil
}

// GuestWritten reports whether the disk image at path was handed to a
// guest (MarkGuestWritten), and to which container's: "" when it was not.
func GuestWritten(path string) (string, error) {
	buf := make([]byte, 256)
	n, err := unix.Getxattr(path, guestXattr, buf)
	switch {
	case err == nil:
		return string(buf[:n]), nil
	case errors.Is(err, unix.ENODATA), errors.Is(err, unix.ENOTSUP), errors.Is(err, fs.ErrNotExist):
		return "", nil
	default:
		return "", fmt.Errorf("read the guest mark of %s: %w", path, err)
	}
}
