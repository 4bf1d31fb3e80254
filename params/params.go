// Package params is what snapview tells the OCI runtime and the monitor
// running in a container, for the authors of runtimes that build on
// snapview: the shape of /.snapview/params.json, the io.snapview.*
// annotations of config.json, and readers for both. It imports nothing but
// the standard library and the runtime-spec types, so an OCI runtime or a
// monitor's launcher can use it without containerd.
//
// snapview writes everything here through these same types, so the two
// cannot drift. A document carries Version: within one version fields may
// be added (a reader ignores fields it does not know), and anything else (a
// field removed, renamed, or changing meaning or type) makes a new version;
// Parse and FromSpec refuse a version they do not know.
//
//	p, err := params.Read(params.File)               // inside the container
//	p, err := params.FromSpec(spec)                   // an OCI runtime, from config.json
//	for _, l := range p.Rootfs.Layers { ... l.Device ... }
package params

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Version is the version of the documents this package reads and writes.
const Version = 1

// File is where the params are inside a container that asked for a bind
// (a boot artifact, the view, a volume) or runs in block mode, read-only.
const File = "/.snapview/params.json"

// Input annotations: what a container asks of snapview.
const (
	// Mode is view, block or off.
	Mode = "io.snapview.mode"
	// BootPrefix + <name>: a boot artifact, an absolute path in the image.
	BootPrefix = "io.snapview.boot."
	// BootDir is where the boot artifacts are bound in the container.
	BootDir = "io.snapview.boot-dir"
	// ViewTarget is where the whole image view is bound in the container.
	ViewTarget = "io.snapview.view-target"
	// MonitorRootfs chooses block mode's monitor rootfs by name.
	MonitorRootfs = "io.snapview.monitor-rootfs"
	// VolumePrefix + <name>: a volume, {"image","target","subpath"}.
	VolumePrefix = "io.snapview.volume."
	// Restore is a disk snapshot's id: in block mode, the container's
	// writable disk starts as that snapshot's saved disk.
	Restore = "io.snapview.restore"
)

// Output annotations: what snapview writes into config.json, before the
// OCI runtime reads it, for every container with a view. They are never
// read back as input.
const (
	// DocAnnotation is the whole params document (the content of File),
	// for every container with a view.
	DocAnnotation = "io.snapview.params"
	// RootfsParams is Params' Rootfs alone.
	RootfsParams = "io.snapview.rootfs.params"
	// BoundPrefix + <name>: where boot artifact <name> is in the container.
	BoundPrefix = "io.snapview.bound."
	// Volumes is Params' Volumes alone.
	Volumes = "io.snapview.volumes"
	// The view itself, for tooling: its snapshotter, snapshot key, lease,
	// and mountpoint on the host.
	ViewSnapshotter = "io.snapview.view.snapshotter"
	ViewKey         = "io.snapview.view.key"
	ViewLease       = "io.snapview.view.lease"
	ViewMountpoint  = "io.snapview.view.mountpoint"
	// ViewSource says where the view came from: SourceSnapshotter (a
	// leased View, named by ViewKey and ViewLease) or SourceLayers (a
	// read-only mount of the layers the container's own rootfs names,
	// with no view key and no lease: those two annotations are absent).
	ViewSource = "io.snapview.view.source"
)

// Sources of a view (ViewSource, Doc.ViewSource).
const (
	SourceSnapshotter = "snapshotter"
	SourceLayers      = "layers"
)

// Kinds of rootfs.
const (
	// KindFS is a filesystem tree the OCI runtime mounts (view mode).
	KindFS = "fs"
	// KindBlock is one disk handed to the container (block mode): the
	// writable disk at Device holds the root filesystem.
	KindBlock = "block"
	// KindLayered is a layered rootfs handed to the container as disks
	// (block mode on the erofs snapshotter): the read-only Layers, top-most
	// first, under an overlay whose upper and work directories are on the
	// writable disk at Device. It is a kind of its own, not "block", so that
	// a reader that knows only one disk refuses it instead of booting the
	// writable disk, which holds no root filesystem, as the root.
	KindLayered = "layered"
)

// Where block mode's disks are inside the container.
const (
	// RootfsDevice is the writable disk's default path (the shim's
	// block.device setting can change it; Rootfs.Device says where it is).
	RootfsDevice = "/dev/snapview/rootfs"
	// LayersDir holds a layered rootfs's read-only disks, 0 the top-most.
	LayersDir = "/dev/snapview/layers"
	// VolumesDir holds <name>/<i>, the read-only disks of volume <name>.
	VolumesDir = "/dev/snapview/volumes"
)

// Doc is the params document: the content of File, and the value of the
// DocAnnotation annotation.
type Doc struct {
	// Version is the document's version (Version).
	Version int `json:"version"`
	// Rootfs is the container's rootfs.
	Rootfs Rootfs `json:"rootfs"`
	// Artifacts maps each boot artifact's name to where it is bound in the
	// container.
	Artifacts map[string]string `json:"artifacts"`
	// ViewTarget is where the whole image view is bound, if it is.
	ViewTarget string `json:"view_target,omitempty"`
	// Volumes are the container's volumes, by name.
	Volumes map[string]Volume `json:"volumes,omitempty"`
	// ViewSource is where the image view came from (SourceSnapshotter or
	// SourceLayers); the view's content is the same either way. Absent in
	// documents of releases before it.
	ViewSource string `json:"view_source,omitempty"`
}

// Rootfs describes a container's rootfs: a filesystem tree (kind fs), or
// in block mode its writable disk (Device, kind block) and, for a layered
// rootfs (kind layered), its read-only layer disks (Layers, top-most first)
// with the overlay's upper and work directories inside the writable disk's
// filesystem.
type Rootfs struct {
	Kind string `json:"kind"`
	// FSType, Source and Options mount the rootfs: in block mode the
	// writable disk's filesystem, its host block device (for the shim's
	// and operators' eyes; a monitor uses Device) and its mount options.
	FSType  string   `json:"fstype"`
	Source  string   `json:"source"`
	Options []string `json:"options"`
	// Device is where the writable disk is inside the container (block
	// mode only).
	Device string `json:"device,omitempty"`
	// Layers are a layered rootfs's read-only disks, top-most first (the
	// order of overlay's lowerdir).
	Layers []Disk `json:"layers,omitempty"`
	// UpperDir and WorkDir are the overlay's upper and work directories,
	// absolute inside the writable disk's filesystem (a layered rootfs).
	UpperDir string `json:"upperdir,omitempty"`
	WorkDir  string `json:"workdir,omitempty"`
	// OverlayOptions are the overlay's other options.
	OverlayOptions []string `json:"overlay_options,omitempty"`
}

// Layered reports whether the rootfs is a layered one (KindLayered): a
// guest stacks its Layers under an overlay whose upper directory is on the
// writable disk.
func (r Rootfs) Layered() bool { return r.Kind == KindLayered }

// Disks reports whether the rootfs is handed to the container as disks
// (block mode): KindBlock or KindLayered.
func (r Rootfs) Disks() bool { return r.Kind == KindBlock || r.Kind == KindLayered }

// Disk is a read-only disk in the container.
type Disk struct {
	// Device is where the disk is inside the container.
	Device string `json:"device"`
	// FSType is its filesystem (erofs, ext4).
	FSType string `json:"fstype"`
	// Source is its host block device.
	Source string `json:"source"`
	// Options are its mount options.
	Options []string `json:"options"`
	// Devices are further disks its filesystem reads (erofs's device=
	// options of a merged layer), in order, as paths in the container.
	Devices []string `json:"devices,omitempty"`
}

// Volume is a volume: a read-only view of another image or of a directory
// snapshot, or a writable clone of a directory snapshot.
type Volume struct {
	// Image is the image's normalised reference (for a snapshot, the name
	// of its image record).
	Image string `json:"image"`
	// Snapshot is the id of the directory snapshot it is of, if it is.
	Snapshot string `json:"snapshot,omitempty"`
	// Writable is a writable clone's writable part: in view mode it is
	// bound read-write (Writable set, no disk); in block mode its writable
	// disk, with, when the snapshot's layers are disks of their own
	// (Layers), the overlay's upper and work directories on it.
	Writable *WritableDisk `json:"writable,omitempty"`
	// Target is where the volume is in the container (view mode), or where
	// the guest should mount it (block mode).
	Target string `json:"target"`
	// Subpath is the directory of the volume bound at Target ("" for the
	// whole volume).
	Subpath string `json:"subpath,omitempty"`
	// Layers are its read-only disks in block mode, top-most first: one
	// for a blockfile or devmapper volume, one per layer for erofs.
	Layers []Disk `json:"layers,omitempty"`
}

// WritableDisk is a writable clone's writable part.
type WritableDisk struct {
	// Device is where its writable disk is in the container (block mode).
	Device string `json:"device,omitempty"`
	// FSType, Source and Options mount that disk (Source is its host
	// block device, for operators).
	FSType  string   `json:"fstype,omitempty"`
	Source  string   `json:"source,omitempty"`
	Options []string `json:"options,omitempty"`
	// UpperDir and WorkDir are the overlay's upper and work directories in
	// that disk's filesystem, when the volume's Layers stack under it.
	UpperDir string `json:"upperdir,omitempty"`
	WorkDir  string `json:"workdir,omitempty"`
}

// Parse decodes a params document: strict about its version (one this
// package does not know is an error; none is a document of the release
// before versions, version 1), tolerant of fields it does not know.
func Parse(data []byte) (*Doc, error) {
	var d Doc
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, fmt.Errorf("snapview params: %w", err)
	}
	if d.Version == 0 {
		var probe map[string]json.RawMessage
		if err := json.Unmarshal(data, &probe); err == nil {
			if _, ok := probe["version"]; ok {
				return nil, errors.New("snapview params: version 0 is not a version")
			}
		}
		d.Version = 1
	}
	if d.Version != Version {
		return nil, fmt.Errorf("snapview params: version %d, but this reader knows version %d: update github.com/snapview/snapview/params", d.Version, Version)
	}
	switch d.Rootfs.Kind {
	case KindFS, KindBlock, KindLayered:
	default:
		return nil, fmt.Errorf("snapview params: rootfs kind %q is not one of %q, %q, %q: update github.com/snapview/snapview/params", d.Rootfs.Kind, KindFS, KindBlock, KindLayered)
	}
	return &d, nil
}

// Read reads and parses the params file at path (File, inside a
// container).
func Read(path string) (*Doc, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("snapview params: %w", err)
	}
	d, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return d, nil
}

// FromSpec reads the params from an OCI spec's annotations, as an OCI
// runtime sees config.json: the DocAnnotation annotation, or, in a spec written
// by the release before it, the document assembled from RootfsParams,
// BoundPrefix and Volumes. A spec snapview gave no view has none of them:
// the error then wraps ErrNoParams.
func FromSpec(spec *specs.Spec) (*Doc, error) {
	if spec == nil {
		return nil, ErrNoParams
	}
	ann := spec.Annotations
	if v, ok := ann[DocAnnotation]; ok {
		return Parse([]byte(v))
	}
	raw, ok := ann[RootfsParams]
	if !ok {
		return nil, ErrNoParams
	}
	var b bytes.Buffer
	b.WriteString(`{"version":1,"rootfs":`)
	b.WriteString(raw)
	arts := map[string]string{}
	for k, v := range ann {
		if name, ok := strings.CutPrefix(k, BoundPrefix); ok {
			arts[name] = v
		}
	}
	a, _ := json.Marshal(arts)
	b.WriteString(`,"artifacts":`)
	b.Write(a)
	if v, ok := ann[Volumes]; ok {
		b.WriteString(`,"volumes":`)
		b.WriteString(v)
	}
	b.WriteString("}")
	return Parse(b.Bytes())
}

// ErrNoParams is returned by FromSpec for a spec without snapview's
// annotations: a container snapview gave no view, or another runtime's.
var ErrNoParams = errors.New("snapview params: the spec has no io.snapview.params annotation")
