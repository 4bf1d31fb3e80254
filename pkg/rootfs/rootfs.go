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
	"slices"
)

// Kinds of rootfs.
const (
	KindFS    = "fs"
	KindBlock = "block"
)

// Mount is one rootfs mount as containerd sends it.
type Mount struct {
	Type    string
	Source  string
	Options []string
}

// Params describe a container's rootfs.
type Params struct {
	Kind    string   `json:"kind"`
	FSType  string   `json:"fstype"`
	Source  string   `json:"source"`
	Options []string `json:"options"`
	// Device is where the block device appears inside the container (block mode only).
	Device string `json:"device,omitempty"`
}

// ErrNotBlock is returned by Block for a rootfs that is not block-backed.
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

// Block checks that mounts are a block-backed rootfs and describes it for
// block mode, with device the path it gets inside the container. The error
// says why a rootfs is not block-backed, wrapping ErrNotBlock.
func Block(mounts []Mount, device string) (Params, error) {
	if _, err := blockKind(mounts); err != nil {
		return Params{}, err
	}
	m := mounts[0]
	return Params{Kind: KindBlock, FSType: m.Type, Source: m.Source, Options: withoutLoop(m.Options), Device: device}, nil
}

// blockKind returns "device" or "loop" for a block-backed rootfs: a single
// mount of a block device (devmapper) or of a regular file with the loop
// option (blockfile).
func blockKind(mounts []Mount) (string, error) {
	if len(mounts) != 1 {
		return "", fmt.Errorf("%w: %d mounts, want one", ErrNotBlock, len(mounts))
	}
	m := mounts[0]
	fi, err := os.Stat(m.Source)
	if err != nil {
		return "", fmt.Errorf("%w: source %q of %s mount: %w", ErrNotBlock, m.Source, m.Type, err)
	}
	switch {
	case fi.Mode()&fs.ModeDevice != 0 && fi.Mode()&fs.ModeCharDevice == 0:
		return "device", nil
	case fi.Mode().IsRegular() && slices.Contains(m.Options, "loop"):
		return "loop", nil
	default:
		return "", fmt.Errorf("%w: %s mount of %q is neither a block device nor a file mounted with loop", ErrNotBlock, m.Type, m.Source)
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
