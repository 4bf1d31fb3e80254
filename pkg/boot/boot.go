// Package boot resolves boot artifacts inside a mounted view and turns them
// into the read-only binds of a container's spec.
//
// The image is untrusted: an artifact path is resolved with
// github.com/cyphar/filepath-securejoin against the view's mountpoint, so
// that every symlink, absolute or relative, is followed as if the view were
// the root and nothing resolves outside it. The result must be a regular
// file. The view is mounted read-only, so what was checked cannot change
// before runc binds it.
package boot

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	securejoin "github.com/cyphar/filepath-securejoin"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/bundle"
)

// BindOptions returns the options of every file bind snapview adds, a new
// slice each time.
func BindOptions() []string { return []string{"bind", "ro", "nosuid", "nodev"} }

// Resolve resolves each artifact inside the view mounted at root (a clean
// absolute host path) and returns where each is on the host. The error names
// the annotation and the path.
func Resolve(root string, arts []annotations.Artifact) ([]bundle.Artifact, error) {
	out := make([]bundle.Artifact, 0, len(arts))
	for _, a := range arts {
		src, err := resolve(root, a.Path)
		if err != nil {
			return nil, fmt.Errorf("snapview: annotation %s%s=%q: %w", annotations.BootPrefix, a.Name, a.Path, err)
		}
		out = append(out, bundle.Artifact{Name: a.Name, Path: a.Path, Source: src, Target: a.Target})
	}
	return out, nil
}

func resolve(root, p string) (string, error) {
	host, err := securejoin.SecureJoin(root, p)
	if err != nil {
		return "", fmt.Errorf("cannot be resolved inside the image: %w", err)
	}
	fi, err := os.Lstat(host)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", errors.New("no such file in the image (symlinks are resolved inside the image)")
		}
		return "", fmt.Errorf("cannot be read in the image: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("is a %s in the image, not a regular file", kind(fi.Mode()))
	}
	return host, nil
}

func kind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m&fs.ModeSymlink != 0:
		return "symlink"
	case m&fs.ModeNamedPipe != 0:
		return "fifo"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeCharDevice != 0:
		return "character device"
	case m&fs.ModeDevice != 0:
		return "block device"
	default:
		return "special file"
	}
}

// Mounts returns the OCI mounts that bind arts, the whole view (when
// viewTarget is set) and the params file (when paramsSource is set) into
// the container, all read-only, nosuid and nodev, with absolute host
// sources.
func Mounts(arts []bundle.Artifact, viewSource, viewTarget, paramsSource string) []specs.Mount {
	var ms []specs.Mount
	if viewTarget != "" {
		ms = append(ms, specs.Mount{Destination: viewTarget, Type: "bind", Source: viewSource,
			Options: []string{"rbind", "ro", "nosuid", "nodev"}})
	}
	for _, a := range arts {
		ms = append(ms, specs.Mount{Destination: a.Target, Type: "bind", Source: a.Source, Options: BindOptions()})
	}
	if paramsSource != "" {
		ms = append(ms, specs.Mount{Destination: annotations.ParamsTarget, Type: "bind", Source: paramsSource, Options: BindOptions()})
	}
	return ms
}
