// Package rootfs derives a container's rootfs parameters from the mounts
// containerd hands the shim in CreateTaskRequest.Rootfs, before anything is
// mounted: whether the rootfs is a filesystem tree (overlay, bind) or a block
// device (a devmapper device, or a blockfile image attached through a loop
// device), its type, source and options. A guest runtime reads them from the
// io.snapview.rootfs.params annotation or from /.snapview/params.json.
package rootfs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"

	"github.com/snapview/snapview/params"
)

// Kinds of rootfs.
const (
	KindFS      = params.KindFS
	KindBlock   = params.KindBlock
	KindLayered = params.KindLayered
)

// Mount is one rootfs mount as containerd sends it: containerd's own mount
// type (Target, when set, is where under the rootfs the mount goes, as
// containerd's mount manager may hand one back).
type Mount = mount.Mount

// Params describe a container's rootfs, as the OCI runtime and a guest see
// it: the type runtime authors read (package params), which the shim
// writes.
type Params = params.Rootfs

// DiskParams describe a read-only disk a guest mounts.
type DiskParams = params.Disk

// ErrNotBlock is returned by DetectBlock for a rootfs that is not block-backed.
var ErrNotBlock = errors.New("rootfs is not block-backed")

// FromMounts describes the rootfs that runc mounts from mounts, as the
// container sees it: a filesystem (kind fs) of the last mount's type.
func FromMounts(mounts []Mount) (Params, error) {
	if len(mounts) == 0 {
		return Params{}, errors.New("no rootfs mounts")
	}
	last := mounts[len(mounts)-1]
	return Params{Kind: KindFS, FSType: last.Type, Source: last.Source, Options: nonNil(last.Options)}, nil
}

// BlockSource is a block-backed rootfs, found before anything was mounted.
type BlockSource struct {
	// Mount is the single rootfs mount.
	Mount Mount
	// Loop is true for a regular file mounted with the loop option
	// (blockfile), which needs a loop device; false for a block device
	// (devmapper), which is used as it is.
	Loop bool
}

// DetectBlock checks that mounts are a block-backed rootfs: exactly one
// mount, whose source is a block device (symlinks followed, as for
// /dev/mapper/<name>) or a regular file with the loop option, and which is
// writable. The error wraps ErrNotBlock and says what the rootfs is instead.
// It only stats the source: nothing is mounted or opened.
func DetectBlock(mounts []Mount) (BlockSource, error) {
	if len(mounts) != 1 {
		return BlockSource{}, fmt.Errorf("%w: it is %s, not one block-backed mount", ErrNotBlock, describe(mounts))
	}
	m := mounts[0]
	if !filepath.IsAbs(m.Source) {
		return BlockSource{}, fmt.Errorf("%w: it is %s, a filesystem tree, not a disk", ErrNotBlock, describe(mounts))
	}
	fi, err := os.Stat(m.Source)
	if err != nil {
		return BlockSource{}, fmt.Errorf("%w: it is %s, whose source cannot be read: %w", ErrNotBlock, describe(mounts), err)
	}
	var src BlockSource
	switch {
	case fi.Mode()&fs.ModeDevice != 0 && fi.Mode()&fs.ModeCharDevice == 0:
		src = BlockSource{Mount: m}
	case fi.Mode().IsRegular() && slices.Contains(m.Options, "loop"):
		src = BlockSource{Mount: m, Loop: true}
	default:
		return BlockSource{}, fmt.Errorf("%w: it is %s (%s), not a block device or a file mounted with the loop option",
			ErrNotBlock, describe(mounts), kind(fi.Mode(), m.Options))
	}
	if ReadOnly(mounts) {
		// A read-only rootfs is a view of the image: a blockfile view's
		// source is the image layer's own file, which a guest must not write.
		return BlockSource{}, fmt.Errorf("%w: it is %s, which is read-only (a view of the image); block mode hands the container a writable disk", ErrNotBlock, describe(mounts))
	}
	return src, nil
}

// BlockParams describes a block-backed rootfs for the container: the host
// block device it is on and the path it has inside the container.
func BlockParams(m Mount, hostDevice, device string) Params {
	return Params{Kind: KindBlock, FSType: m.Type, Source: hostDevice, Options: withoutLoop(m.Options), Device: device}
}

// ReadOnly reports whether mounts give a read-only rootfs: a mount with the
// ro option, an overlay without an upper directory (the shape of a view of
// several layers), or erofs.
func ReadOnly(mounts []Mount) bool {
	if len(mounts) == 0 {
		return false
	}
	m := mounts[len(mounts)-1]
	if slices.Contains(m.Options, "ro") || m.Type == "erofs" {
		return true
	}
	if m.Type == "overlay" || strings.HasSuffix(m.Type, "/overlay") {
		return !slices.ContainsFunc(m.Options, func(o string) bool { return strings.HasPrefix(o, "upperdir=") })
	}
	return false
}

// describe names what mounts are, for errors: "an overlay mount",
// "2 mounts (erofs, overlay)", "an ext4 mount of /x".
func describe(mounts []Mount) string {
	switch len(mounts) {
	case 0:
		return "no mount at all (no image snapshot)"
	case 1:
		m := mounts[0]
		article := "a"
		if strings.ContainsAny(m.Type[:min(1, len(m.Type))], "aeiou") {
			article = "an"
		}
		if m.Source == "" || m.Source == m.Type {
			return fmt.Sprintf("%s %s mount", article, m.Type)
		}
		return fmt.Sprintf("%s %s mount of %s", article, m.Type, m.Source)
	default:
		types := make([]string, len(mounts))
		for i, m := range mounts {
			types[i] = m.Type
		}
		return fmt.Sprintf("%d mounts (%s)", len(mounts), strings.Join(types, ", "))
	}
}

func kind(mode fs.FileMode, opts []string) string {
	switch {
	case mode.IsDir():
		return "a directory"
	case mode.IsRegular() && !slices.Contains(opts, "loop"):
		return "a regular file without the loop option"
	case mode&fs.ModeCharDevice != 0:
		return "a character device"
	case mode&fs.ModeNamedPipe != 0:
		return "a fifo"
	case mode&fs.ModeSocket != 0:
		return "a socket"
	default:
		return "a special file"
	}
}

func withoutLoop(opts []string) []string {
	out := []string{}
	for _, o := range opts {
		if o != "loop" {
			out = append(out, o)
		}
	}
	return out
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
