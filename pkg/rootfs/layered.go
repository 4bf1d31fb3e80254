package rootfs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/snapview/snapview/params"

	"github.com/docker/go-units"
)

// MaxReadOnlyDisks is the most read-only disks one container may bring,
// its layered rootfs's and its volumes' together: erofs layers, the blob
// files a merged layer names, a blockfile or devmapper volume's disk. Each
// is a loop device, a node-wide resource, held while the container runs
// (in block mode by the shim, in view mode by containerd's mount manager
// for a volume's mount). With the writable disk that is 129 disks, kata's
// limit for a layered rootfs (MAX_ROOTFS_LAYER_DEVICES); a container that
// needs more is refused: an image can be flattened, or merged into a
// fsmeta by the snapshotter.
const MaxReadOnlyDisks = 128

// Layered is a layered block-backed rootfs, the shape of containerd's erofs
// snapshotter in block mode (its default_size set): a writable disk image
// (the container's own upper layer, "mkfs/ext4"), the image's read-only
// erofs layer files, and the overlay that stacks them
// ("format/mkdir/overlay"), whose templates name the others by index. Found
// from the mounts alone, before anything is mounted, created or attached.
type Layered struct {
	// Writable is the mount of the writable disk image as containerd sent
	// it; Writable.Source is the image file.
	Writable Mount
	// FSType is the writable disk's filesystem (ext2, ext3 or ext4).
	FSType string
	// Mkfs says how to create and format the image when it does not
	// exist yet ("mkfs/<fs>" mounts); nil when the mount is of an existing
	// image.
	Mkfs *Mkfs
	// Layers are the read-only layers, top-most first (the order of
	// overlay's lowerdir).
	Layers []Layer
	// UpperDir and WorkDir are overlay's upper and work directories inside
	// the writable disk's filesystem, e.g. /upper.
	UpperDir, WorkDir string
	// Dirs are the directories the writable disk's filesystem must hold
	// for the overlay (its X-containerd.mkdir.path options).
	Dirs []Dir
	// OverlayOptions are the overlay's other options, for the guest.
	OverlayOptions []string
}

// Mkfs is how a new writable disk image is made (the X-containerd.mkfs.*
// options of an "mkfs/<fs>" mount).
type Mkfs struct {
	Size int64
	UUID string
}

// Layer is one read-only layer of a layered rootfs.
type Layer struct {
	// Mount is the layer's erofs mount; Mount.Source is the layer file.
	Mount Mount
	// Blobs are further files the layer's filesystem reads (a merged
	// fsmeta's device= options), in order.
	Blobs []string
}

// Dir is a directory the writable disk's filesystem must hold.
type Dir struct {
	Path     string // inside the filesystem, absolute
	Mode     os.FileMode
	UID, GID int
}

// DiskCount returns how many read-only disks the layers bring.
func (l *Layered) DiskCount() int { return DiskCount(l.Layers) }

// DiskCount returns how many read-only disks layers bring: one per layer,
// and one per blob file a layer reads.
func DiskCount(layers []Layer) int {
	n := 0
	for _, ly := range layers {
		n += 1 + len(ly.Blobs)
	}
	return n
}

// IsLayered reports whether mounts have the shape of a layered rootfs: more
// than one mount, the last an overlay that goes through the mount
// manager's transforms. DetectLayered then checks it in full.
func IsLayered(mounts []Mount) bool {
	if len(mounts) < 2 {
		return false
	}
	base, prefixes := splitType(mounts[len(mounts)-1].Type)
	return base == "overlay" && len(prefixes) > 0
}

// Options of the mount manager's transforms that a layered rootfs carries.
const (
	optMkfs  = "X-containerd.mkfs."
	optMkdir = "X-containerd.mkdir.path="
)

var (
	mountRef   = regexp.MustCompile(`^\{\{\s*mount\s+([0-9]+)\s*\}\}(.*)$`)
	overlayRef = regexp.MustCompile(`^\{\{\s*overlay\s+([0-9]+)\s+([0-9]+)\s*\}\}$`)
)

// DetectLayered checks that mounts are a layered rootfs and returns it. The
// error wraps ErrNotBlock and says what does not fit. It stats the files it
// names, nothing more: a missing writable image is fine if the mount says
// how to make it.
func DetectLayered(mounts []Mount) (Layered, error) {
	var l Layered
	fail := func(format string, args ...any) (Layered, error) {
		return Layered{}, fmt.Errorf("%w: it is %s, not a layered block rootfs (the erofs snapshotter in block mode): %s",
			ErrNotBlock, describe(mounts), fmt.Sprintf(format, args...))
	}
	if !IsLayered(mounts) {
		return fail("its last mount is not an overlay of the mount manager (format/mkdir/overlay)")
	}
	ov := mounts[len(mounts)-1]
	if _, prefixes := splitType(ov.Type); slices.ContainsFunc(prefixes, func(p string) bool { return p != "format" && p != "mkdir" }) {
		return fail("overlay mount type %q has a transform other than format and mkdir", ov.Type)
	}
	var upperRef, workRef, lowerRef string
	var mkdirs []string
	for _, o := range ov.Options {
		switch {
		case strings.HasPrefix(o, "upperdir="):
			upperRef = strings.TrimPrefix(o, "upperdir=")
		case strings.HasPrefix(o, "workdir="):
			workRef = strings.TrimPrefix(o, "workdir=")
		case strings.HasPrefix(o, "lowerdir="):
			lowerRef = strings.TrimPrefix(o, "lowerdir=")
		case strings.HasPrefix(o, optMkdir):
			mkdirs = append(mkdirs, strings.TrimPrefix(o, optMkdir))
		case strings.HasPrefix(o, "X-containerd."), strings.Contains(o, "{{"):
			return fail("overlay option %q is not one snapview can hand to a guest", o)
		default:
			l.OverlayOptions = append(l.OverlayOptions, o)
		}
	}
	if upperRef != "" && !strings.HasPrefix(upperRef, "{{") {
		return fail("the overlay's upper directory %s is a host directory, not on a writable disk image: the erofs snapshotter is not in block mode (its default_size is not set)", upperRef)
	}
	if upperRef == "" || workRef == "" {
		return fail("the overlay has no upper directory: the rootfs is read-only (a view of the image); block mode hands the container a writable disk")
	}
	w, upper, err := diskPath(upperRef)
	if err != nil {
		return fail("upperdir: %v", err)
	}
	w2, work, err := diskPath(workRef)
	if err != nil {
		return fail("workdir: %v", err)
	}
	if w != w2 || w >= len(mounts)-1 {
		return fail("upperdir and workdir must lie on one writable mount")
	}
	l.UpperDir, l.WorkDir = upper, work

	lowers, err := lowerIndexes(lowerRef)
	if err != nil {
		return fail("lowerdir: %v", err)
	}
	used := map[int]bool{w: true}
	for _, i := range lowers {
		if i >= len(mounts)-1 || used[i] {
			return fail("lowerdir names mount %d, which is not one of the layers", i)
		}
		used[i] = true
	}
	if len(used) != len(mounts)-1 {
		return fail("a mount is neither the writable image nor a layer")
	}

	if l.Writable, l.FSType, l.Mkfs, err = writable(mounts[w]); err != nil {
		return fail("writable mount %d: %v", w, err)
	}
	for _, d := range mkdirs {
		dir, err := mkdirOption(d, w)
		if err != nil {
			return fail("%s%s: %v", optMkdir, d, err)
		}
		l.Dirs = append(l.Dirs, dir)
	}
	for n, i := range lowers {
		ly, err := layer(mounts[i])
		if err != nil {
			return fail("layer %d (mount %d): %v", n, i, err)
		}
		if len(ly.Blobs) > 0 && n != len(lowers)-1 {
			return fail("layer %d (mount %d) names blob files but is not the bottom-most layer", n, i)
		}
		l.Layers = append(l.Layers, ly)
	}
	if n := l.DiskCount(); n > MaxReadOnlyDisks {
		return Layered{}, fmt.Errorf("%w: it has %d read-only layer disks, more than the %d snapview hands a container; flatten the image or merge its layers (the erofs snapshotter's fsmeta)",
			ErrNotBlock, n, MaxReadOnlyDisks)
	}
	return l, nil
}

// splitType splits a mount type into its base type and transform prefixes:
// "format/mkdir/overlay" is overlay with format and mkdir.
func splitType(t string) (string, []string) {
	parts := strings.Split(t, "/")
	return parts[len(parts)-1], parts[:len(parts)-1]
}

// diskPath reads "{{ mount N }}/path": a path inside the filesystem of
// mount N, returned absolute and clean; it may not climb out of it.
func diskPath(ref string) (int, string, error) {
	m := mountRef.FindStringSubmatch(ref)
	if m == nil {
		return 0, "", fmt.Errorf("%q is not a path in one of the mounts ({{ mount N }}/path)", ref)
	}
	i, err := strconv.Atoi(m[1])
	if err != nil {
		return 0, "", fmt.Errorf("%q: %w", ref, err)
	}
	rest := m[2]
	if rest != "" && !strings.HasPrefix(rest, "/") {
		return 0, "", fmt.Errorf("%q is not a path in one of the mounts ({{ mount N }}/path)", ref)
	}
	if slices.Contains(strings.Split(rest, "/"), "..") {
		return 0, "", fmt.Errorf("%q climbs out of mount %d", ref, i)
	}
	return i, path.Clean("/" + rest), nil
}

// lowerIndexes reads overlay's lowerdir template: "{{ overlay A B }}" (mounts
// A to B, in that order, either way round), or "{{ mount N }}" entries
// joined with ':'. The first is the top-most layer.
func lowerIndexes(ref string) ([]int, error) {
	if ref == "" {
		return nil, errors.New("no lowerdir")
	}
	if m := overlayRef.FindStringSubmatch(ref); m != nil {
		a, _ := strconv.Atoi(m[1])
		b, _ := strconv.Atoi(m[2])
		var out []int
		if a <= b {
			for i := a; i <= b; i++ {
				out = append(out, i)
			}
		} else {
			for i := a; i >= b; i-- {
				out = append(out, i)
			}
		}
		return out, nil
	}
	var out []int
	for part := range strings.SplitSeq(ref, ":") {
		i, rest, err := diskPath(part)
		if err != nil || rest != "/" {
			return nil, fmt.Errorf("%q is not a list of mounts ({{ overlay A B }} or {{ mount N }}:...)", ref)
		}
		out = append(out, i)
	}
	return out, nil
}

// writable checks the writable disk image's mount: "mkfs/<fs>" with the
// mkfs options (the file may not exist yet), or an ext2/3/4 mount with the
// loop option of an existing image; either writable, its file a regular one
// if it exists, in a directory that exists.
func writable(m Mount) (Mount, string, *Mkfs, error) {
	base, prefixes := splitType(m.Type)
	if base != "ext4" && base != "ext3" && base != "ext2" {
		return m, "", nil, fmt.Errorf("type %q is not an ext2/3/4 disk image", m.Type)
	}
	var mk *Mkfs
	switch {
	case len(prefixes) == 0:
	case len(prefixes) == 1 && prefixes[0] == "mkfs":
		mk = &Mkfs{}
	default:
		return m, "", nil, fmt.Errorf("type %q has a transform other than mkfs", m.Type)
	}
	if !slices.Contains(m.Options, "loop") || slices.Contains(m.Options, "ro") {
		return m, "", nil, errors.New("not a writable disk image (it needs the loop option and no ro)")
	}
	if !filepath.IsAbs(m.Source) || filepath.Clean(m.Source) != m.Source {
		return m, "", nil, fmt.Errorf("source %q is not a clean absolute path", m.Source)
	}
	fsType := base
	for _, o := range m.Options {
		opt, ok := strings.CutPrefix(o, optMkfs)
		if !ok {
			if strings.HasPrefix(o, "X-containerd.") {
				return m, "", nil, fmt.Errorf("option %q is not one snapview performs", o)
			}
			continue
		}
		if mk == nil {
			return m, "", nil, fmt.Errorf("option %q on a mount without the mkfs transform", o)
		}
		key, value, _ := strings.Cut(opt, "=")
		switch key {
		case "fs":
			fsType = value
		case "size":
			n, err := units.RAMInBytes(value)
			if err != nil || n <= 0 {
				return m, "", nil, fmt.Errorf("option %q: not a size", o)
			}
			mk.Size = n
		case "uuid":
			mk.UUID = value
		default:
			return m, "", nil, fmt.Errorf("unknown mkfs option %q", o)
		}
	}
	if fsType != base {
		return m, "", nil, fmt.Errorf("mkfs filesystem %q is not the mount's type %q", fsType, base)
	}
	fi, err := os.Lstat(m.Source)
	switch {
	case err == nil && !fi.Mode().IsRegular():
		return m, "", nil, fmt.Errorf("%s is %s, not a regular file", m.Source, kind(fi.Mode(), m.Options))
	case errors.Is(err, fs.ErrNotExist) && mk == nil:
		return m, "", nil, fmt.Errorf("%s does not exist", m.Source)
	case errors.Is(err, fs.ErrNotExist) && mk.Size == 0:
		return m, "", nil, fmt.Errorf("%s does not exist and the mount gives no %ssize to create it", m.Source, optMkfs)
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return m, "", nil, err
	}
	if fi, err := os.Stat(filepath.Dir(m.Source)); err != nil || !fi.IsDir() {
		return m, "", nil, fmt.Errorf("the directory of %s does not exist", m.Source)
	}
	return m, base, mk, nil
}

// mkdirOption reads "{{ mount W }}/path:mode[:uid:gid]", a directory inside
// the writable disk W.
func mkdirOption(v string, w int) (Dir, error) {
	parts := strings.Split(v, ":")
	i, p, err := diskPath(parts[0])
	if err != nil {
		return Dir{}, err
	}
	if i != w {
		return Dir{}, fmt.Errorf("a directory outside the writable disk (mount %d)", i)
	}
	d := Dir{Path: p, Mode: 0o700}
	if len(parts) >= 2 {
		mode, err := strconv.ParseUint(parts[1], 8, 32)
		if err != nil || os.FileMode(mode)&^os.ModePerm != 0 {
			return Dir{}, fmt.Errorf("mode %q", parts[1])
		}
		d.Mode = os.FileMode(mode)
	}
	switch len(parts) {
	case 1, 2:
	case 4:
		if d.UID, err = strconv.Atoi(parts[2]); err != nil || d.UID < 0 {
			return Dir{}, fmt.Errorf("uid %q", parts[2])
		}
		if d.GID, err = strconv.Atoi(parts[3]); err != nil || d.GID < 0 {
			return Dir{}, fmt.Errorf("gid %q", parts[3])
		}
	default:
		return Dir{}, errors.New("want path:mode[:uid:gid]")
	}
	return d, nil
}

// layer checks a read-only layer: an erofs mount of a regular file, read
// only, with the loop option, and with no option snapview cannot hand a
// guest (dm-verity, for one, is refused).
func layer(m Mount) (Layer, error) {
	if m.Type != "erofs" {
		return Layer{}, fmt.Errorf("type %q is not erofs", m.Type)
	}
	if !slices.Contains(m.Options, "ro") {
		return Layer{}, errors.New("not read-only")
	}
	ly := Layer{Mount: m}
	files := []string{m.Source}
	for _, o := range m.Options {
		switch {
		case o == "ro", o == "loop":
		case strings.HasPrefix(o, "device="):
			b := strings.TrimPrefix(o, "device=")
			ly.Blobs = append(ly.Blobs, b)
			files = append(files, b)
		default:
			return Layer{}, fmt.Errorf("option %q is not one snapview can hand to a guest", o)
		}
	}
	for _, f := range files {
		if !filepath.IsAbs(f) || filepath.Clean(f) != f {
			return Layer{}, fmt.Errorf("%q is not a clean absolute path", f)
		}
		fi, err := os.Stat(f)
		if err != nil {
			return Layer{}, err
		}
		if !fi.Mode().IsRegular() {
			return Layer{}, fmt.Errorf("%s is %s, not a regular file", f, kind(fi.Mode(), nil))
		}
	}
	return ly, nil
}

// The mount types and transforms snapview performs itself, and so claims
// from containerd's mount manager (the shim's MountCapabilities, and the
// runtime-allow-mounts annotation of its -info output): containerd then
// hands a rootfs that has them to the shim unperformed. snapview performs
// them in one of two ways: a layered rootfs in block mode becomes the
// guest's disks (the erofs layers attached read-only, the writable image
// formatted if new, the overlay described to the guest), and any other
// container's rootfs goes to containerd's mount manager after all, from
// the shim, as containerd would have sent it there.
var (
	ClaimedTypes      = []string{"erofs"}
	ClaimedTransforms = []string{"format", "mkdir", "mkfs"}
)

// Claimed reports whether mounts hold a mount type or transform that
// snapview claims from containerd, which containerd therefore left for the
// shim to perform.
func Claimed(mounts []Mount) bool {
	for _, m := range mounts {
		base, prefixes := splitType(m.Type)
		if slices.Contains(ClaimedTypes, base) {
			return true
		}
		for _, p := range prefixes {
			if slices.Contains(ClaimedTransforms, p) {
				return true
			}
		}
	}
	return false
}

// Disks returns the files of the read-only disks of l, in disk order (see
// DiskFiles).
func (l *Layered) Disks() []string { return DiskFiles(l.Layers) }

// DiskFiles returns the files (or devices) of the read-only disks of
// layers, in disk order: each layer's, top-most first, then the blob files
// of the bottom layer. A layered rootfs and a volume number their disks
// this way.
func DiskFiles(layers []Layer) []string {
	var files, blobs []string
	for _, ly := range layers {
		files = append(files, ly.Mount.Source)
		blobs = append(blobs, ly.Blobs...)
	}
	return append(files, blobs...)
}

// LayerParams describes layers for a guest, given where each of their
// disks is ({host device, container path}, in the order of DiskFiles): one
// disk per layer, a layer's blob disks named in its Devices.
func LayerParams(layers []Layer, disks [][2]string) []DiskParams {
	var out []DiskParams
	next := len(layers)
	for i, ly := range layers {
		d := DiskParams{Device: disks[i][1], FSType: ly.Mount.Type, Source: disks[i][0], Options: GuestOptions(ly.Mount.Options)}
		for range ly.Blobs {
			d.Devices = append(d.Devices, disks[next][1])
			next++
		}
		out = append(out, d)
	}
	return out
}

// Params describes l for a guest, given where each of its disks is:
// writable is the writable disk ({host device, container path}), disks the
// read-only ones in the order of Disks.
func (l *Layered) Params(writable [2]string, disks [][2]string) Params {
	return Params{
		Kind: KindLayered, FSType: l.FSType, Source: writable[0], Options: GuestOptions(l.Writable.Options), Device: writable[1],
		UpperDir: l.UpperDir, WorkDir: l.WorkDir, OverlayOptions: l.OverlayOptions,
		Layers: LayerParams(l.Layers, disks),
	}
}

// GuestOptions are a mount's options as a guest mounts the disk: without
// loop, device= and containerd's own X-containerd. options.
func GuestOptions(opts []string) []string {
	out := []string{}
	for _, o := range opts {
		if o != "loop" && !strings.HasPrefix(o, "device=") && !strings.HasPrefix(o, "X-containerd.") {
			out = append(out, o)
		}
	}
	return out
}

// LayersDir holds a layered rootfs's read-only disks inside the container.
const LayersDir = params.LayersDir

// VolumesDir holds the volumes' read-only disks inside a block-mode
// container.
const VolumesDir = params.VolumesDir

// VolumeDevice returns where disk i of volume name is inside a block-mode
// container: /dev/snapview/volumes/<name>/<i>, 0 its top-most layer.
func VolumeDevice(name string, i int) string { return fmt.Sprintf("%s/%s/%d", VolumesDir, name, i) }

// VolumeWritableDevice returns where the writable disk of volume name, a
// writable clone of a snapshot, is inside a block-mode container.
func VolumeWritableDevice(name string) string { return fmt.Sprintf("%s/%s/writable", VolumesDir, name) }

// LayerDevice returns where read-only disk i of a layered rootfs is inside
// the container: /dev/snapview/layers/<i>, 0 the top-most layer.
func LayerDevice(i int) string { return fmt.Sprintf("%s/%d", LayersDir, i) }

// ReadOnlyDisks returns the disks of a read-only view, as a guest gets a
// volume: a blockfile view (one image file with the loop option), a
// devmapper view (one block device), or an erofs view (each layer file, in
// the order of its overlay's lowerdir, top-most first). Each is a Layer:
// its mount (Source the file or device) and any blob files it reads. A
// view that is a directory tree (overlayfs, native) has no disks.
func ReadOnlyDisks(mounts []Mount) ([]Layer, error) {
	fail := func(format string, args ...any) ([]Layer, error) {
		return nil, fmt.Errorf("it is %s, not disks: %s", describe(mounts), fmt.Sprintf(format, args...))
	}
	switch {
	case len(mounts) == 0:
		return fail("no mounts")
	case len(mounts) == 1:
		m := mounts[0]
		if m.Type == "erofs" {
			ly, err := layer(m)
			if err != nil {
				return fail("%v", err)
			}
			return []Layer{ly}, nil
		}
		if !filepath.IsAbs(m.Source) {
			return fail("a filesystem tree")
		}
		if _, err := detectDisk(m); err != nil {
			return fail("%v", err)
		}
		return []Layer{{Mount: m}}, nil
	}
	ov := mounts[len(mounts)-1]
	if base, prefixes := splitType(ov.Type); base != "overlay" || slices.ContainsFunc(prefixes, func(p string) bool { return p != "format" && p != "mkdir" }) {
		return fail("its last mount is not an overlay of erofs layers")
	}
	var lowerRef string
	for _, o := range ov.Options {
		switch {
		case strings.HasPrefix(o, "lowerdir="):
			lowerRef = strings.TrimPrefix(o, "lowerdir=")
		case strings.HasPrefix(o, "upperdir="), strings.HasPrefix(o, "workdir="):
			return fail("it is writable")
		}
	}
	lowers, err := lowerIndexes(lowerRef)
	if err != nil {
		return fail("lowerdir: %v", err)
	}
	if len(lowers) != len(mounts)-1 {
		return fail("lowerdir names %d of its %d layers", len(lowers), len(mounts)-1)
	}
	var out []Layer
	seen := map[int]bool{}
	for n, i := range lowers {
		if i >= len(mounts)-1 || seen[i] {
			return fail("lowerdir names mount %d", i)
		}
		seen[i] = true
		ly, err := layer(mounts[i])
		if err != nil {
			return fail("layer %d (mount %d): %v", n, i, err)
		}
		out = append(out, ly)
	}
	return out, nil
}

// detectDisk is DetectBlock's check of one mount's source, whatever its
// options: a block device, or a regular file with the loop option.
func detectDisk(m Mount) (BlockSource, error) {
	fi, err := os.Stat(m.Source)
	if err != nil {
		return BlockSource{}, err
	}
	switch {
	case fi.Mode()&fs.ModeDevice != 0 && fi.Mode()&fs.ModeCharDevice == 0:
		return BlockSource{Mount: m}, nil
	case fi.Mode().IsRegular() && slices.Contains(m.Options, "loop"):
		return BlockSource{Mount: m, Loop: true}, nil
	}
	return BlockSource{}, fmt.Errorf("%s is %s", m.Source, kind(fi.Mode(), m.Options))
}
