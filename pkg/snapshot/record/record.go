// Package record owns snapview's snapshot records: their ids, the image
// records that hold them in containerd, and finding, reading, listing and
// removing them. The shim's restore steps and snapviewctl both use it.
//
// A snapshot is an image record named localhost/snapview/snapshot:<id> in
// the namespace of the container it was taken from, whose labels say what
// it is (Label*). Its manifest's and config's garbage-collection labels keep
// its content and snapshots; nothing else does.
//
// Only an id ever comes back from a caller: everything else (kind, form,
// base, snapshotter) is read from snapview's own record, whose name is
// derived from the id, never from caller text. An id is accepted only in
// the canonical form snapview printed.
package record

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/google/uuid"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Labels of a snapshot's image record.
const (
	LabelSnapshot = "snapview.io/snapshot"
	LabelKind     = "snapview.io/kind"
	LabelForm     = "snapview.io/form"
	LabelSource   = "snapview.io/source"
	LabelCreated  = "snapview.io/created"
	// LabelBase is the manifest digest of the image the container ran
	// (a container snapshot).
	LabelBase = "snapview.io/base"
	// LabelName is a name for people, never used to find anything.
	LabelName = "snapview.io/name"
	// LabelDir is the directory a directory snapshot was taken of, as the
	// container named it.
	LabelDir = "snapview.io/dir"
	// LabelSnapshotter is the snapshotter of the container it was taken
	// from, where its layers are (or are to be) unpacked.
	LabelSnapshotter = "snapview.io/snapshotter"
	// LabelSkipped counts the special files a directory snapshot left out.
	LabelSkipped = "snapview.io/skipped"
	// LabelSize is the bytes the snapshot's own blobs take in the content
	// store, as snapview measured them there.
	LabelSize = "snapview.io/size"
	// LabelExpire is containerd's: an image past it is collected.
	LabelExpire = "containerd.io/gc.expire"
)

// Kinds of snapshot.
const (
	// KindContainer is the whole state of a container's filesystem,
	// restored as the starting state of a new container.
	KindContainer = "container"
	// KindDirectory is one directory of a container, restored into other
	// containers as a volume.
	KindDirectory = "directory"
)

// Forms of snapshot.
const (
	// FormImage is an ordinary OCI image.
	FormImage = "image"
	// FormDisk is a block-mode container's writable disk, an OCI artifact
	// whose subject is the base image.
	FormDisk = "disk"
)

// ImagePrefix starts the name of every snapshot's image record.
const ImagePrefix = "localhost/snapview/snapshot:"

// The disk form: an OCI 1.1 artifact whose one blob is a block-mode
// container's writable disk, as a diskstream stream compressed with zstd.
const (
	// ArtifactTypeDisk is the artifact type of a disk snapshot's manifest.
	ArtifactTypeDisk = "application/vnd.snapview.disk.v1"
	// MediaTypeDisk is the media type of its blob.
	MediaTypeDisk = "application/vnd.snapview.disk.v1.extents+zstd"
	// AnnotationDiskSize is the saved disk's size in bytes, on the blob's
	// descriptor and the manifest; AnnotationDiskLayout the rootfs it was
	// the writable disk of: LayoutLayered (the erofs snapshotter's
	// writable image, under the image's layer disks) or LayoutDisk (a
	// one-disk rootfs: blockfile, devmapper).
	AnnotationDiskSize   = "io.snapview.disk.size"
	AnnotationDiskLayout = "io.snapview.disk.layout"
	LayoutLayered        = "layered"
	LayoutDisk           = "disk"
)

// ImageName returns the name of snapshot id's image record.
func ImageName(id string) string { return ImagePrefix + id }

// NewID returns a new snapshot id: a random (version 4) UUID in canonical
// lower-case form.
func NewID() (string, error) {
	u, err := uuid.NewRandom()
	if err != nil {
		return "", err
	}
	return u.String(), nil
}

// ErrBadID is wrapped by every error of ParseID.
var ErrBadID = errors.New("not a snapshot id")

// ParseID accepts id only if it is a version 4 UUID in the canonical
// lower-case form snapview prints: parsing it and formatting it again gives
// the same text.
func ParseID(id string) (string, error) {
	u, err := uuid.Parse(id)
	if err != nil || u.String() != id || u.Version() != 4 || u.Variant() != uuid.RFC4122 {
		return "", fmt.Errorf("snapshot id %q: %w (a UUID in the lower-case form snapview printed)", id, ErrBadID)
	}
	return id, nil
}

var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// CheckName checks a snapshot's name, for people: [A-Za-z0-9][A-Za-z0-9._-]{0,62}.
func CheckName(name string) error {
	if !namePattern.MatchString(name) {
		return fmt.Errorf("snapshot name %q must match %s", name, namePattern)
	}
	return nil
}

// Record is a snapshot as snapview recorded it.
type Record struct {
	ID     string
	Kind   string
	Form   string
	Name   string
	Source string
	// Base is the manifest digest of the image the source container ran (a
	// container snapshot).
	Base string
	// Dir is the directory of a directory snapshot.
	Dir         string
	Snapshotter string
	Skipped     int
	Size        int64
	Created     time.Time
	// Expires is when containerd may collect it (zero: never).
	Expires time.Time
	// Target is the record's manifest.
	Target ocispec.Descriptor
}

// Labels returns the image record's labels for r.
func (r Record) Labels() map[string]string {
	l := map[string]string{
		LabelSnapshot:    r.ID,
		LabelKind:        r.Kind,
		LabelForm:        r.Form,
		LabelSource:      r.Source,
		LabelCreated:     r.Created.UTC().Format(time.RFC3339Nano),
		LabelSnapshotter: r.Snapshotter,
	}
	for k, v := range map[string]string{LabelBase: r.Base, LabelName: r.Name, LabelDir: r.Dir} {
		if v != "" {
			l[k] = v
		}
	}
	if r.Skipped > 0 {
		l[LabelSkipped] = fmt.Sprint(r.Skipped)
	}
	if r.Size > 0 {
		l[LabelSize] = fmt.Sprint(r.Size)
	}
	if !r.Expires.IsZero() {
		l[LabelExpire] = r.Expires.UTC().Format(time.RFC3339)
	}
	return l
}

// FromImage reads the record of an image record, strictly: its name must be
// the one its id gives, and every label snapview writes must be there and
// well formed. An image record that is not a snapshot's is an error.
func FromImage(img images.Image) (Record, error) {
	l := img.Labels
	id, err := ParseID(l[LabelSnapshot])
	if err != nil {
		return Record{}, fmt.Errorf("image %s: label %s: %w", img.Name, LabelSnapshot, err)
	}
	if img.Name != ImageName(id) {
		return Record{}, fmt.Errorf("image %s carries the labels of snapshot %s", img.Name, id)
	}
	r := Record{ID: id, Kind: l[LabelKind], Form: l[LabelForm], Name: l[LabelName], Source: l[LabelSource], Base: l[LabelBase],
		Dir: l[LabelDir], Snapshotter: l[LabelSnapshotter], Target: img.Target}
	switch {
	case r.Kind != KindContainer && r.Kind != KindDirectory:
		return Record{}, fmt.Errorf("snapshot %s: kind %q", id, r.Kind)
	case r.Form != FormImage && r.Form != FormDisk:
		return Record{}, fmt.Errorf("snapshot %s: form %q", id, r.Form)
	case r.Kind == KindDirectory && r.Form != FormImage:
		return Record{}, fmt.Errorf("snapshot %s: a directory snapshot of form %q", id, r.Form)
	case r.Source == "" || r.Snapshotter == "":
		return Record{}, fmt.Errorf("snapshot %s: no source container or snapshotter", id)
	}
	if r.Kind == KindContainer {
		if _, err := digest.Parse(r.Base); err != nil {
			return Record{}, fmt.Errorf("snapshot %s: base %q: %w", id, r.Base, err)
		}
	}
	if r.Name != "" {
		if err := CheckName(r.Name); err != nil {
			return Record{}, fmt.Errorf("snapshot %s: %w", id, err)
		}
	}
	if r.Created, err = time.Parse(time.RFC3339Nano, l[LabelCreated]); err != nil {
		return Record{}, fmt.Errorf("snapshot %s: label %s: %w", id, LabelCreated, err)
	}
	if v, ok := l[LabelExpire]; ok {
		if r.Expires, err = time.Parse(time.RFC3339, v); err != nil {
			return Record{}, fmt.Errorf("snapshot %s: label %s: %w", id, LabelExpire, err)
		}
	}
	for label, p := range map[string]*int64{LabelSkipped: new(int64), LabelSize: &r.Size} {
		if v, ok := l[label]; ok {
			if _, err := fmt.Sscan(v, p); err != nil || *p < 0 {
				return Record{}, fmt.Errorf("snapshot %s: label %s=%q", id, label, v)
			}
			if label == LabelSkipped {
				r.Skipped = int(*p)
			}
		}
	}
	return r, nil
}

// Getter gets an image record by name in the namespace of ctx; a missing
// one is an error wrapping errdefs.ErrNotFound.
type Getter func(ctx context.Context, name string) (images.Image, error)

// Lookup finds snapshot id in namespace ns through get. Each way it can
// fail is an error that names the id: malformed (wrapping ErrBadID),
// unknown in the namespace (wrapping errdefs.ErrNotFound), or a record
// that is not snapview's.
func Lookup(ctx context.Context, get Getter, ns, id string) (Record, error) {
	if _, err := ParseID(id); err != nil {
		return Record{}, err
	}
	img, err := get(ctx, ImageName(id))
	if errdefs.IsNotFound(err) {
		return Record{}, fmt.Errorf("snapshot %s: not found in namespace %s: %w", id, ns, errdefs.ErrNotFound)
	}
	if err != nil {
		return Record{}, fmt.Errorf("snapshot %s: look up its record: %w", id, err)
	}
	r, err := FromImage(img)
	if err != nil {
		return Record{}, fmt.Errorf("snapshot %s: its record in namespace %s is not snapview's: %w", id, ns, err)
	}
	return r, nil
}

// Labels of a capture's lease.
const (
	// LabelCapture names the lock file of the command that holds the
	// capture, in CaptureDir.
	LabelCapture = "snapview.io/capture"
	// LabelPaused names the container the capture paused, which the sweep
	// resumes if the command died before it could.
	LabelPaused = "snapview.io/paused"
)

// LeasePrefix starts the id of every capture's lease.
const LeasePrefix = "snapview/snapshot/"

// CaptureDir returns where the captures' locks are, for containerd's
// state directory stateDir: a hidden directory of
// containerd's task state directory (containerd skips names that start
// with a dot there).
func CaptureDir(stateDir string) string {
	return filepath.Join(stateDir, "io.containerd.runtime.v2.task", ".snapview-captures")
}

// CaptureMounts returns where a capture of snapshot id mounts what it
// reads (a view of the container's image, its rootfs): below CaptureDir,
// where the sweep unmounts them if the capture's command died.
func CaptureMounts(stateDir, id string) string { return filepath.Join(CaptureDir(stateDir), id+".d") }

// Filter selects the image records of snapshots in an images List call.
var Filter = fmt.Sprintf("labels.%q", LabelSnapshot)
