// Package bundle reads and writes what snapview keeps in a container's
// bundle directory: its state file, snapview.json, and the annotations it
// adds to config.json before the OCI runtime reads it.
//
// Both files are written atomically (temporary file, fsync, rename), so a
// reader, whether runc or a fresh shim process running the dead-shim cleanup,
// sees either the old content or the new, never a torn file.
package bundle

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/atomicfile"

	"github.com/snapview/snapview/params"
	"github.com/snapview/snapview/pkg/rootfs"
	"github.com/snapview/snapview/pkg/snapshot/record"
)

// StateFile is the name of the state file in the bundle.
const StateFile = "snapview.json"

// StateVersion is the newest version of the state file this build writes
// and reads. A state is written with the lowest version that can hold it
// (version 1 unless it has a field of version 2), so that the previous
// release, after a rollback, still reads the state of every container
// that release could have made; each older version is read strictly,
// without any field of a later one.
const StateVersion = 5

// minVersion returns the lowest state file version that can hold s.
func (s *State) minVersion() int {
	if s.Source != "" {
		return 5
	}
	if s.Restore != nil {
		return 4
	}
	for _, v := range s.Volumes {
		if v.Snapshot != "" || v.Writable || v.WritableDisk != nil {
			return 3
		}
	}
	if s.RootfsActivation != "" || s.Mode == ModeNone || s.Block != nil && s.Block.Layers != nil || s.Volumes != nil {
		return 2
	}
	return 1
}

// Mount is a mount as recorded in the state file.
type Mount struct {
	Type    string   `json:"type"`
	Source  string   `json:"source"`
	Target  string   `json:"target,omitempty"`
	Options []string `json:"options,omitempty"`
}

// MountOf records m as the state file keeps it.
func MountOf(m mount.Mount) Mount {
	return Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options}
}

// State is the persisted state of one container's view: everything a fresh
// process needs to undo it.
type State struct {
	Version     int    `json:"version"`
	Namespace   string `json:"namespace"`
	ContainerID string `json:"container_id"`
	Snapshotter string `json:"snapshotter"`
	// ViewKey is the key of the view snapshot; Parent the committed
	// snapshot it views (the parent of the container's own snapshot).
	ViewKey string `json:"view_key"`
	Parent  string `json:"parent"`
	LeaseID string `json:"lease"`
	// Mountpoint is the host directory the view is mounted on.
	Mountpoint string `json:"mountpoint"`
	// Mounts are the view's mounts as mounted (after any mount-manager activation).
	Mounts []Mount `json:"mounts"`
	// Activation names the containerd mount-manager activation the view
	// needed, if any (multi-layer erofs).
	Activation string `json:"activation,omitempty"`
	// RootfsActivation names the mount-manager activation snapview made
	// for the container's own rootfs (the container id), if any: the
	// mounts snapview claims from containerd, performed as containerd
	// would have for a container that does not hand them to a guest.
	// Version 2.
	RootfsActivation string `json:"rootfs_activation,omitempty"`
	// Rootfs is the container's rootfs, as the OCI runtime and guests see it.
	Rootfs rootfs.Params `json:"rootfs"`
	// LoopDevices are the loop devices attached for the view.
	LoopDevices []string `json:"loop_devices,omitempty"`
	// Artifacts are the boot artifacts bound into the container.
	Artifacts []Artifact `json:"artifacts,omitempty"`
	// Created is when setup began; with the container id it is the owner
	// of the lease and the view (their snapview.io/created label).
	Created time.Time `json:"created"`
	// Mode is "view" or "block"; files without it are view mode.
	Mode string `json:"mode,omitempty"`
	// Block is what block mode did with the container's rootfs.
	Block *Block `json:"block,omitempty"`
	// Volumes are the container's volumes, read-only views of other
	// images, by name. Version 2.
	Volumes []Volume `json:"volumes,omitempty"`
	// Restore is the disk snapshot the writable disk was restored from
	// (block mode, annotation io.snapview.restore). Version 4.
	Restore *Restore `json:"restore,omitempty"`
	// Source is params.SourceLayers for a view derived from the layers the
	// container's rootfs mounts name: a read-only mount (Mounts) with no
	// view snapshot and no lease of its own (a lease exists only for the
	// volumes' views); "" for a leased View. Version 5.
	Source string `json:"source,omitempty"`
}

// Derived reports whether the view was derived from the rootfs's layers.
func (s *State) Derived() bool { return s.Source == params.SourceLayers }

// Volume is one volume of a container: a read-only view of another image,
// under the container's lease, mounted and bound (view mode) or attached as
// read-only disks (block mode).
type Volume struct {
	// Name is the <name> of io.snapview.volume.<name>.
	Name string `json:"name"`
	// Image is the image's normalised reference; Parent the snapshot it
	// views (the chain id of the image's layers).
	Image  string `json:"image"`
	Parent string `json:"parent"`
	// ViewKey is the volume's view, snapview/<id>/volumes/<name>.
	ViewKey string `json:"view_key"`
	// Target is where the volume is inside the container, and Subpath the
	// directory of the volume bound there (absolute inside the volume).
	Target  string `json:"target"`
	Subpath string `json:"subpath"`
	// Activation names the mount-manager activation the view needed.
	Activation string `json:"activation,omitempty"`
	// View mode: the volume's mount on the host, its mounts and loop
	// devices, and Source, the host directory bound at Target.
	Mountpoint  string   `json:"mountpoint,omitempty"`
	Mounts      []Mount  `json:"mounts,omitempty"`
	LoopDevices []string `json:"loop_devices,omitempty"`
	Source      string   `json:"source,omitempty"`
	// Block mode: the volume's read-only disks.
	Disks []Disk `json:"disks,omitempty"`
	// Snapshot is the id of the directory snapshot the volume is of (its
	// image then its record's). Version 3.
	Snapshot string `json:"snapshot,omitempty"`
	// Writable: the volume is a writable clone of the snapshot, an active
	// snapshot under ViewKey, discarded with the container. Version 3.
	Writable bool `json:"writable,omitempty"`
	// WritableDisk is a writable clone's writable disk in block mode (its
	// read-only layers are Disks). Version 3.
	WritableDisk *Disk `json:"writable_disk,omitempty"`
}

// Modes recorded in the state file.
const (
	ModeView  = "view"
	ModeBlock = "block"
	// ModeNone: the container has no view; snapview only performed its
	// rootfs mounts (RootfsActivation). Version 2.
	ModeNone = "none"
)

// Block records the block device a block-mode container gets instead of a
// mounted rootfs.
type Block struct {
	// Rootfs is the container's own rootfs mount as containerd sent it. It
	// is never mounted on the host.
	Rootfs Mount `json:"rootfs"`
	// Device is the host block device: a loop device snapview attached to
	// Rootfs.Source (blockfile) or the device-mapper node (devmapper).
	Device string `json:"device"`
	Major  uint32 `json:"major"`
	Minor  uint32 `json:"minor"`
	// Loop is set when snapview attached Device itself, and identifies the
	// backing file, so that a reused loop number is never detached.
	Loop *Loop `json:"loop,omitempty"`
	// MonitorRootfs is the lower layer of the container's root: "view" or
	// a host directory.
	MonitorRootfs string `json:"monitor_rootfs"`
	// Layers are the read-only disks of a layered rootfs, top-most first
	// (then the blob files of a merged bottom layer); Rootfs, Device and
	// Loop are then its writable disk. Version 2.
	Layers []Disk `json:"layers,omitempty"`
}

// Restore records a disk snapshot written into a block-mode container's
// writable disk (annotation io.snapview.restore). Version 4.
type Restore struct {
	// Snapshot is the disk snapshot's id.
	Snapshot string `json:"snapshot"`
	// Disk is the writable disk image or device it was written into.
	Disk string `json:"disk"`
	// Created says the shim created Disk (a layered rootfs's new writable
	// image), which a setup rolled back before any guest got it removes.
	Created bool `json:"created,omitempty"`
}

// Disk is a read-only disk snapview attached for a container: a loop
// device bound to a file.
type Disk struct {
	// Path is where the container sees the disk.
	Path string `json:"path"`
	// Device is the host loop device; Major and Minor its numbers.
	Device string `json:"device"`
	Major  uint32 `json:"major"`
	Minor  uint32 `json:"minor"`
	// Loop identifies the file the device is bound to; for a block
	// device snapview did not attach (a devmapper view), it is empty.
	Loop Loop `json:"loop"`
}

// Loop identifies the file a loop device was attached to.
type Loop struct {
	BackingFile string `json:"backing_file"`
	BackingDev  uint64 `json:"backing_dev"`
	BackingIno  uint64 `json:"backing_ino"`
}

// Artifact is a boot artifact bound from the view into the container.
type Artifact struct {
	Name   string `json:"name"`
	Path   string `json:"path"`   // inside the image
	Source string `json:"source"` // host path inside the mounted view
	Target string `json:"target"` // inside the container
}

// StatePath returns the state file's path in bundle.
func StatePath(bundle string) string { return filepath.Join(bundle, StateFile) }

// WriteState writes s to the bundle's state file atomically, mode 0600,
// with the lowest version that can hold it.
func WriteState(bundle string, s *State) error {
	s.Version = s.minVersion()
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	return writeAtomic(StatePath(bundle), data, 0o600)
}

// ErrNoState is returned by ReadState when the bundle has no state file.
var ErrNoState = errors.New("no snapview state file")

// ReadState reads the bundle's state file strictly: an unknown version,
// unknown fields, trailing data or missing required fields are errors that
// name the file. A missing file is ErrNoState.
func ReadState(bundle string) (*State, error) {
	path := StatePath(bundle)
	fi, err := os.Lstat(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", path, ErrNoState)
		}
		return nil, fmt.Errorf("snapview: read state file %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		// Written by snapview, it is always a regular file: a symlink could
		// make the shim read, and trust, another container's state.
		return nil, fmt.Errorf("snapview: state file %s is a %s, not a regular file", path, fi.Mode().Type())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("snapview: read state file %s: %w", path, err)
	}
	s, err := ParseState(data)
	if err != nil {
		return nil, fmt.Errorf("snapview: state file %s: %w", path, err)
	}
	return s, nil
}

// ParseState decodes and validates a state file's content.
func ParseState(data []byte) (*State, error) {
	var probe struct {
		Version *int `json:"version"`
	}
	if err := json.Unmarshal(data, &probe); err != nil {
		return nil, fmt.Errorf("malformed: %w", err)
	}
	if probe.Version == nil {
		return nil, errors.New("no version")
	}
	if *probe.Version < 1 || *probe.Version > StateVersion {
		return nil, fmt.Errorf("unsupported version %d (this shim reads versions 1 to %d)", *probe.Version, StateVersion)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var s State
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("malformed: %w", err)
	}
	if dec.More() {
		return nil, errors.New("malformed: trailing data")
	}
	if s.minVersion() > s.Version {
		return nil, fmt.Errorf("malformed: a field of version %d in a version %d file", s.minVersion(), s.Version)
	}
	if s.Namespace == "" || s.ContainerID == "" {
		return nil, errors.New("missing namespace or container_id")
	}
	if s.Mode == ModeNone {
		if s.RootfsActivation == "" || s.Snapshotter != "" || s.ViewKey != "" || s.LeaseID != "" || s.Mountpoint != "" || s.Block != nil || s.Volumes != nil {
			return nil, fmt.Errorf("mode %q records a view, or no rootfs activation", ModeNone)
		}
		return &s, nil
	}
	required := map[string]string{"snapshotter": s.Snapshotter, "view_key": s.ViewKey, "lease": s.LeaseID, "mountpoint": s.Mountpoint}
	switch s.Source {
	case "":
	case params.SourceLayers:
		// No view snapshot; a lease (and the snapshotter it is in) only
		// for the volumes' views.
		if s.ViewKey != "" || s.Activation != "" || s.Mode == ModeBlock {
			return nil, fmt.Errorf("source %q records a view snapshot, its activation, or block mode", s.Source)
		}
		if len(s.Mounts) == 0 {
			return nil, fmt.Errorf("source %q records no mounts", s.Source)
		}
		delete(required, "view_key")
		if len(s.Volumes) == 0 {
			delete(required, "lease")
			delete(required, "snapshotter")
		}
	default:
		return nil, fmt.Errorf("unknown source %q", s.Source)
	}
	for field, v := range required {
		if v == "" {
			return nil, fmt.Errorf("missing %s", field)
		}
	}
	if !filepath.IsAbs(s.Mountpoint) || filepath.Clean(s.Mountpoint) != s.Mountpoint ||
		Mountpoint(filepath.Dir(filepath.Dir(s.Mountpoint))) != s.Mountpoint || s.Mountpoint == Mountpoint("/") {
		return nil, fmt.Errorf("mountpoint %q is not a view mountpoint in a bundle", s.Mountpoint)
	}
	for i, v := range s.Volumes {
		if err := v.check(filepath.Dir(filepath.Dir(s.Mountpoint)), s.Mode == ModeBlock); err != nil {
			return nil, fmt.Errorf("volume %d: %w", i, err)
		}
	}
	if r := s.Restore; r != nil {
		if s.Mode != ModeBlock {
			return nil, fmt.Errorf("a restored disk in a %q mode file", s.Mode)
		}
		if _, err := record.ParseID(r.Snapshot); err != nil {
			return nil, fmt.Errorf("restore: %w", err)
		}
		if !filepath.IsAbs(r.Disk) || filepath.Clean(r.Disk) != r.Disk {
			return nil, fmt.Errorf("restore: disk %q is not a clean absolute path", r.Disk)
		}
	}
	switch s.Mode {
	case "", ModeView:
		if s.Block != nil {
			return nil, fmt.Errorf("block state in a %q mode file", ModeView)
		}
	case ModeBlock:
		if err := s.Block.check(); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("unknown mode %q", s.Mode)
	}
	return &s, nil
}

func (b *Block) check() error {
	if b == nil {
		return errors.New("block mode without block state")
	}
	if !isDevPath(b.Device) {
		return fmt.Errorf("block device %q is not a path under /dev", b.Device)
	}
	if b.Loop != nil {
		if !loopPath.MatchString(b.Device) {
			return fmt.Errorf("loop device %q is not /dev/loopN", b.Device)
		}
		if !filepath.IsAbs(b.Loop.BackingFile) || b.Loop.BackingIno == 0 {
			return fmt.Errorf("loop backing file %q (inode %d) is not identified", b.Loop.BackingFile, b.Loop.BackingIno)
		}
	}
	if b.MonitorRootfs == "" {
		return errors.New("block mode without a monitor rootfs")
	}
	for i, d := range b.Layers {
		if !isDevPath(d.Path) || !loopPath.MatchString(d.Device) || !filepath.IsAbs(d.Loop.BackingFile) || d.Loop.BackingIno == 0 {
			return fmt.Errorf("layer disk %d (%s, loop device %q on %q) is not identified", i, d.Path, d.Device, d.Loop.BackingFile)
		}
	}
	return nil
}

// check checks a volume's record: a name, a view, and its place on this
// host (below the bundle's snapview directory) or its disks, by mode.
func (v Volume) check(bundle string, block bool) error {
	if !volumeName.MatchString(v.Name) || v.ViewKey == "" || v.Image == "" {
		return fmt.Errorf("%q is not identified (name, view key, image)", v.Name)
	}
	if v.Mountpoint != "" && v.Mountpoint != VolumeMountpoint(bundle, v.Name) {
		return fmt.Errorf("volume %q: mountpoint %q is not %q", v.Name, v.Mountpoint, VolumeMountpoint(bundle, v.Name))
	}
	if block && (v.Mountpoint != "" || v.Source != "") {
		return fmt.Errorf("volume %q of a block-mode container is mounted on the host", v.Name)
	}
	if !block && v.Disks != nil {
		return fmt.Errorf("volume %q has disks outside block mode", v.Name)
	}
	for i, d := range v.Disks {
		if !isDevPath(d.Path) || !isDevPath(d.Device) || d.Loop.BackingFile != "" && (!loopPath.MatchString(d.Device) || d.Loop.BackingIno == 0) {
			return fmt.Errorf("volume %q: disk %d (%s on %q) is not identified", v.Name, i, d.Path, d.Device)
		}
	}
	if d := v.WritableDisk; d != nil {
		if !block || !v.Writable {
			return fmt.Errorf("volume %q has a writable disk outside block mode or a writable clone", v.Name)
		}
		if !isDevPath(d.Path) || !isDevPath(d.Device) || d.Loop.BackingFile != "" && (!loopPath.MatchString(d.Device) || d.Loop.BackingIno == 0) {
			return fmt.Errorf("volume %q: the writable disk (%s on %q) is not identified", v.Name, d.Path, d.Device)
		}
	}
	if v.Writable && v.Snapshot == "" {
		return fmt.Errorf("volume %q: a writable clone of no snapshot", v.Name)
	}
	return nil
}

// volumeName is what a volume's name matches (config.NamePattern).
var volumeName = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

var loopPath = regexp.MustCompile(`^/dev/loop[0-9]+$`)

func isDevPath(p string) bool {
	return strings.HasPrefix(p, "/dev/") && filepath.Clean(p) == p
}

// RemoveState removes the bundle's state file; a missing file is success.
func RemoveState(bundle string) error {
	if err := os.Remove(StatePath(bundle)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// WriteFile writes data to path atomically (temporary file, fsync, rename).
func WriteFile(path string, data []byte, mode os.FileMode) error {
	return writeAtomic(path, data, mode)
}

func writeAtomic(path string, data []byte, mode os.FileMode) (retErr error) {
	f, err := atomicfile.New(path, mode)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer func() {
		if retErr != nil {
			_ = f.Cancel()
		}
	}()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
