// Package blockdev hands a host block device to a container: the
// device-mapper node of a devmapper rootfs, or a loop device attached to the
// image file of a blockfile rootfs.
//
// Lifecycle of a loop device: Attach binds a free loop device (read-write,
// or read-only for a disk a guest must not write) to the file with
// LO_FLAGS_AUTOCLEAR and keeps the device open, so that it
// stays bound for as long as the returned Device is open, and is freed by
// the kernel when its last opener (the shim, or the container's monitor)
// closes it, even if the shim dies. Close drops the shim's reference.
// Detach is the explicit release for a device that is still bound after
// that: it detaches only while the device still points at the recorded
// backing inode, since loop numbers are reused.
//
// Nothing here mounts anything: in block mode the rootfs must never be
// mounted on the host (a second mount of a journaled filesystem that a guest
// writes corrupts it).
package blockdev

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"
)

// Device is a host block device.
type Device struct {
	// Path is the device node on the host, symlinks resolved.
	Path         string
	Major, Minor uint32
	// Backing identifies the file a loop device is bound to; nil for a
	// device that snapview did not attach.
	Backing *Backing

	file *os.File
}

// Backing identifies a loop device's backing file by device and inode.
type Backing struct {
	Path string
	Dev  uint64
	Ino  uint64
}

// Resolve returns the block device at path, following symlinks (as
// /dev/mapper/<name> is a symlink to ../dm-<n>). Anything other than a block
// device is an error that says what it is.
func Resolve(path string) (*Device, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(real, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", real, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return nil, fmt.Errorf("%s is a %s, not a block device", real, fileKind(st.Mode))
	}
	return &Device{Path: real, Major: unix.Major(st.Rdev), Minor: unix.Minor(st.Rdev)}, nil
}

// Attach binds a free loop device, with autoclear, to the regular file at
// path and keeps it open; readOnly binds it with LO_FLAGS_READ_ONLY, so
// that no opener of the device, the container's included, can write the
// file through it. The caller must Close the device.
func Attach(path string, readOnly bool) (_ *Device, retErr error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("%s is a %s, not a regular file", path, fileKind(st.Mode))
	}
	f, err := mount.SetupLoop(path, mount.LoopParams{Readonly: readOnly, Autoclear: true})
	if err != nil {
		return nil, fmt.Errorf("attach a loop device to %s: %w", path, err)
	}
	defer func() {
		if retErr != nil {
			f.Close() // autoclear: closing the only opener frees the device
		}
	}()
	var dst unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &dst); err != nil {
		return nil, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	d := &Device{
		Path:    f.Name(),
		Major:   unix.Major(dst.Rdev),
		Minor:   unix.Minor(dst.Rdev),
		Backing: &Backing{Path: path, Dev: st.Dev, Ino: st.Ino},
		file:    f,
	}
	// A reused number could only be bound to our file here, but check what
	// the kernel recorded anyway: it is what Detach will compare with.
	if err := d.check(f); err != nil {
		return nil, err
	}
	return d, nil
}

// Close releases the shim's reference to a device it attached. With
// autoclear, the kernel frees the device once no one else holds it open.
// Closing twice, or a device not attached here, is a no-op.
func (d *Device) Close() error {
	if d == nil || d.file == nil {
		return nil
	}
	err := d.file.Close()
	d.file = nil
	return err
}

// ErrOtherBacking reports a loop device that is now bound to another file
// than the one recorded: its number was reused, and it is left alone.
var ErrOtherBacking = errors.New("loop device is bound to another file")

// Detach detaches loop device path if it is still bound to b. A device that
// is free already, or gone, is success; one bound to another file is left
// alone and reported with ErrOtherBacking. On a device that is still open,
// the kernel detaches it when its last opener closes it.
func Detach(path string, b Backing) error {
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENXIO) {
			return nil
		}
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	d := &Device{Path: path, Backing: &b}
	if err := d.check(f); err != nil {
		if errors.Is(err, unix.ENXIO) {
			return nil // not bound
		}
		return err
	}
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("detach %s: %w", path, err)
	}
	return nil
}

// Bound reports whether loop device path is bound to b.
func Bound(path string, b Backing) (bool, error) {
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENXIO) {
			return false, nil
		}
		return false, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	d := &Device{Path: path, Backing: &b}
	switch err := d.check(f); {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENXIO), errors.Is(err, ErrOtherBacking):
		return false, nil
	default:
		return false, err
	}
}

// check compares what the kernel says loop device f is bound to with
// d.Backing. An unbound device gives an error wrapping unix.ENXIO.
func (d *Device) check(f *os.File) error {
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		return fmt.Errorf("loop status of %s: %w", d.Path, err)
	}
	if info.Device != d.Backing.Dev || info.Inode != d.Backing.Ino {
		return fmt.Errorf("%s: %w (device %d inode %d, want %s: device %d inode %d)",
			d.Path, ErrOtherBacking, info.Device, info.Inode, d.Backing.Path, d.Backing.Dev, d.Backing.Ino)
	}
	return nil
}

func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "regular file"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFCHR:
		return "character device"
	case unix.S_IFBLK:
		return "block device"
	case unix.S_IFIFO:
		return "fifo"
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFLNK:
		return "symlink"
	default:
		return "special file"
	}
}

// SetReadOnly makes the block device d read-only at the block layer
// (BLKROSET), so that no opener can write it whatever its cgroup rule or
// privileges: a device snapview did not attach itself, such as a
// device-mapper view, which the snapshotter activates writable. It stays
// read-only until the device goes (a view's is deactivated with the view).
func (d *Device) SetReadOnly() error {
	f, err := os.OpenFile(d.Path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", d.Path, err)
	}
	defer f.Close()
	if err := unix.IoctlSetPointerInt(int(f.Fd()), unix.BLKROSET, 1); err != nil {
		return fmt.Errorf("make %s read-only: %w", d.Path, err)
	}
	ro, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKROGET)
	if err != nil {
		return fmt.Errorf("read-only state of %s: %w", d.Path, err)
	}
	if ro != 1 {
		return fmt.Errorf("%s is still writable after BLKROSET", d.Path)
	}
	return nil
}
