package view

import (
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
)

// Derive returns the mounts of a read-only view of the container's image
// taken from rootfs, the container's own rootfs mounts as the OCI runtime
// will mount them (after any mount-manager activation): the read-only
// lower directories of its overlay, which are the image's layers, as a
// read-only overlay of just those (or a read-only bind of the one layer),
// exactly what the snapshotter's View of the image returns for overlayfs.
// A read-only bind rootfs is the image itself and is returned as it is.
// Nothing is mounted or called. The error says why the rootfs does not
// name the layers (one disk, a directory of the container's own, a mount
// that needs the mount manager, an idmapped overlay), for the log of the
// fallback to the leased View.
func Derive(rootfs []mount.Mount) ([]mount.Mount, error) {
	if len(rootfs) != 1 {
		return nil, fmt.Errorf("the rootfs is %d mounts, not one overlay", len(rootfs))
	}
	m := rootfs[0]
	if NeedsManager(rootfs) {
		return nil, fmt.Errorf("the rootfs mount (%s) is left for containerd's mount manager", m.Type)
	}
	switch m.Type {
	case "overlay":
	case "bind", "rbind":
		if !slices.Contains(m.Options, "ro") {
			return nil, fmt.Errorf("the rootfs is a writable bind of %s, the container's own directory, not the image's layers", m.Source)
		}
		return []mount.Mount{{Type: m.Type, Source: m.Source, Options: slices.Clone(m.Options)}}, nil
	default:
		return nil, fmt.Errorf("the rootfs is a %s mount of %s, not an overlay of the image's layers", m.Type, m.Source)
	}
	var (
		lower string
		opts  []string
	)
	for _, o := range m.Options {
		k, v, _ := strings.Cut(o, "=")
		switch k {
		case "lowerdir":
			lower = v
		case "upperdir", "workdir", "rw", "ro", "volatile":
			// the container's own writable layer, or its mode
		case "uidmap", "gidmap":
			// containerd maps the layers' ids for the container's user
			// namespace; a View of the image is not mapped.
			return nil, fmt.Errorf("the rootfs overlay maps ids (%s), which a view of the image does not", k)
		default:
			if strings.HasPrefix(k, "X-containerd.") {
				continue
			}
			opts = append(opts, o)
		}
	}
	if lower == "" {
		return nil, fmt.Errorf("the rootfs overlay names no lower directory")
	}
	lowers := strings.Split(lower, ":")
	for _, l := range lowers {
		if !strings.HasPrefix(l, "/") {
			return nil, fmt.Errorf("the rootfs overlay's lower directory %q is not an absolute path", l)
		}
	}
	if len(lowers) == 1 {
		// overlayfs needs two lower directories without an upper one;
		// the view of one layer is that layer, as containerd's overlay
		// snapshotter returns it.
		return []mount.Mount{{Type: "bind", Source: lowers[0], Options: []string{"ro", "rbind"}}}, nil
	}
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: append(append(opts, "ro"), "lowerdir="+lower)}}, nil
}

// snapshotterDir finds a snapshotter's name in a path below containerd's
// root: <root>/io.containerd.snapshotter.v1.<name>/...
var snapshotterDir = regexp.MustCompile(`/io\.containerd\.snapshotter\.v1\.([A-Za-z0-9_.-]+)/`)

// SnapshotterOf returns the snapshotter whose directory the mounts' sources
// or lower directories lie in, or "": for the logs and `snapviewctl ls` of
// a view derived from the rootfs, which never asks containerd.
func SnapshotterOf(mounts []mount.Mount) string {
	for _, m := range mounts {
		for _, s := range append([]string{m.Source}, m.Options...) {
			if sm := snapshotterDir.FindStringSubmatch(s); sm != nil {
				return sm[1]
			}
		}
	}
	return ""
}
