package snapshot

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"archive/tar"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/snapview/snapview/pkg/fault"
	"github.com/snapview/snapview/pkg/image"
	"github.com/snapview/snapview/pkg/snapshot/record"
)

// Annotations of a snapshot's manifest: what its record's labels say, for
// a registry and the node that pulls it (labels do not travel).
const (
	AnnotationID          = "io.snapview.snapshot.id"
	AnnotationKind        = "io.snapview.snapshot.kind"
	AnnotationForm        = "io.snapview.snapshot.form"
	AnnotationSource      = "io.snapview.snapshot.source"
	AnnotationCreated     = "io.snapview.snapshot.created"
	AnnotationBase        = "io.snapview.snapshot.base"
	AnnotationName        = "io.snapview.snapshot.name"
	AnnotationDir         = "io.snapview.snapshot.dir"
	AnnotationSnapshotter = "io.snapview.snapshot.snapshotter"
	AnnotationSkipped     = "io.snapview.snapshot.skipped"
)

// annotations are the manifest annotations of rec.
func annotations(rec record.Record) map[string]string {
	a := map[string]string{
		AnnotationID: rec.ID, AnnotationKind: rec.Kind, AnnotationForm: rec.Form, AnnotationSource: rec.Source,
		AnnotationCreated: rec.Created.UTC().Format(time.RFC3339Nano), AnnotationSnapshotter: rec.Snapshotter,
	}
	for k, v := range map[string]string{AnnotationBase: rec.Base, AnnotationName: rec.Name, AnnotationDir: rec.Dir} {
		if v != "" {
			a[k] = v
		}
	}
	if rec.Skipped > 0 {
		a[AnnotationSkipped] = strconv.Itoa(rec.Skipped)
	}
	return a
}

// captureContainer takes an image-form container snapshot: the container's
// image plus one layer holding the diff of its rootfs against that image,
// written once into the content store, never applied (no layer when the
// diff is empty; a history entry either way). Its layers are unpacked when
// it first runs, as any image's are.
// It returns the bytes the snapshot's own blobs take.
func (n *Node) captureContainer(ctx context.Context, rec *record.Record, info containers.Container, task client.Task) (int64, error) {
	cs := n.Client.ContentStore()
	if task != nil {
		// A rootfs on a disk image (blockfile in view mode) is read through
		// another mount of that image: the container's writes must be in it.
		if ms, err := n.Client.SnapshotService(info.Snapshotter).Mounts(ctx, info.SnapshotKey); err == nil && slices.ContainsFunc(ms, diskImage) {
			if err := syncRoot(task.Pid()); err != nil {
				return 0, fmt.Errorf("snapview: flush container %s's rootfs to its disk: %w", info.ID, err)
			}
		}
	}
	base, err := n.base(ctx, info)
	if err != nil {
		return 0, err
	}
	rec.Base = base.Manifest.Digest.String()
	layerType := ocispec.MediaTypeImageLayerGzip
	if base.Manifest.MediaType == images.MediaTypeDockerSchema2Manifest {
		layerType = images.MediaTypeDockerSchema2LayerGzip
	}
	layer, diffID, err := n.writeLayer(ctx, rec, layerType, 0, func(w io.Writer) error {
		return n.writeChanges(ctx, rec, info.Snapshotter, info.SnapshotKey, w)
	})
	if err != nil {
		return 0, fmt.Errorf("snapview: the changes of container %s's rootfs: %w", info.ID, err)
	}
	fault.Point(PointLayer, rec.Source)
	empty, err := emptyLayer(ctx, cs, layer)
	if err != nil {
		return 0, err
	}
	var added []ocispec.Descriptor
	if !empty {
		added = append(added, layer)
	}
	h := ocispec.History{Created: &rec.Created, CreatedBy: "snapviewctl snapshot create " + info.ID,
		Comment: "snapview snapshot " + rec.ID, EmptyLayer: empty}
	var diffIDs []digest.Digest
	if !empty {
		diffIDs = []digest.Digest{diffID}
	}
	config, err := n.writeConfig(ctx, rec, base.ConfigDesc, diffIDs, h)
	if err != nil {
		return 0, err
	}
	fault.Point(PointConfig, rec.Source)
	man, err := n.writeManifest(ctx, rec, base, config, added)
	if err != nil {
		return 0, err
	}
	fault.Point(PointManifest, rec.Source)
	rec.Target = man
	return man.Size + config.Size + sizeOf(added), nil
}

// base resolves the image a container runs, and checks that all its
// content is on the node: a snapshot of an image whose layers were never
// fetched could not be pushed or moved.
func (n *Node) base(ctx context.Context, info containers.Container) (image.Resolved, error) {
	if info.Image == "" {
		return image.Resolved{}, fmt.Errorf("snapview: container %s names no image to take a snapshot against", info.ID)
	}
	img, err := n.Client.ImageService().Get(ctx, info.Image)
	if err != nil {
		return image.Resolved{}, fmt.Errorf("snapview: container %s's image %s: %w", info.ID, info.Image, err)
	}
	cs := n.Client.ContentStore()
	base, err := image.Resolve(ctx, cs, img.Target, nil)
	if err != nil {
		return image.Resolved{}, fmt.Errorf("snapview: container %s's image %s: %w", info.ID, info.Image, err)
	}
	var missing []string
	for _, l := range base.Parsed.Layers {
		if _, err := cs.Info(ctx, l.Digest); errdefs.IsNotFound(err) {
			missing = append(missing, l.Digest.String())
		} else if err != nil {
			return image.Resolved{}, fmt.Errorf("snapview: container %s's image %s: layer %s: %w", info.ID, info.Image, l.Digest, err)
		}
	}
	if len(missing) > 0 {
		return image.Resolved{}, fmt.Errorf("snapview: container %s's image %s lacks %d of its layers in the content store (%s): a snapshot of it could not be pushed or moved; fetch them first (ctr -n <namespace> content fetch %s), or pull the image again with its layers kept",
			info.ID, info.Image, len(missing), strings.Join(missing, ", "), info.Image)
	}
	return base, nil
}

// emptyLayer reports whether the compressed tar layer holds no entry.
func emptyLayer(ctx context.Context, cs content.Provider, layer ocispec.Descriptor) (bool, error) {
	ra, err := cs.ReaderAt(ctx, layer)
	if err != nil {
		return false, fmt.Errorf("snapview: read the diff layer: %w", err)
	}
	defer func() { _ = ra.Close() }()
	zr, err := gzip.NewReader(content.NewReader(ra))
	if err != nil {
		return false, fmt.Errorf("snapview: read the diff layer: %w", err)
	}
	defer func() { _ = zr.Close() }()
	_, err = tar.NewReader(zr).Next()
	if errors.Is(err, io.EOF) {
		return true, nil
	}
	return false, err
}

// writeConfig writes the snapshot's image config: the base's (every field
// kept), with diffIDs added to its layers and h to its history.
func (n *Node) writeConfig(ctx context.Context, rec *record.Record, baseConfig ocispec.Descriptor, diffIDs []digest.Digest, h ocispec.History) (ocispec.Descriptor, error) {
	cs := n.Client.ContentStore()
	var cfg map[string]json.RawMessage
	if baseConfig.Digest != "" {
		b, err := content.ReadBlob(ctx, cs, baseConfig)
		if err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("snapview: the base image's config: %w", err)
		}
		if err := json.Unmarshal(b, &cfg); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("snapview: the base image's config: %w", err)
		}
	}
	if cfg == nil {
		cfg = map[string]json.RawMessage{}
	}
	var rfs ocispec.RootFS
	if raw, ok := cfg["rootfs"]; ok {
		if err := json.Unmarshal(raw, &rfs); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("snapview: the base image's config: rootfs: %w", err)
		}
	}
	rfs.Type = "layers"
	rfs.DiffIDs = append(rfs.DiffIDs, diffIDs...)
	var history []ocispec.History
	if raw, ok := cfg["history"]; ok {
		if err := json.Unmarshal(raw, &history); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("snapview: the base image's config: history: %w", err)
		}
	}
	history = append(history, h)
	set := func(k string, v any) error {
		b, err := json.Marshal(v)
		cfg[k] = b
		return err
	}
	if err := errors.Join(set("rootfs", rfs), set("history", history), set("created", rec.Created)); err != nil {
		return ocispec.Descriptor{}, err
	}
	mediaType := baseConfig.MediaType
	if mediaType == "" {
		mediaType = ocispec.MediaTypeImageConfig
	}
	return n.writeJSON(ctx, rec, "config", mediaType, cfg, nil)
}

// writeManifest writes the snapshot's manifest: the base's (every field
// kept), with config and the base's layers plus added, annotated with the
// snapshot's record for the registries it is pushed to, and labelled so
// that containerd's garbage collector keeps every blob it names.
func (n *Node) writeManifest(ctx context.Context, rec *record.Record, base image.Resolved, config ocispec.Descriptor, added []ocispec.Descriptor) (ocispec.Descriptor, error) {
	b, err := content.ReadBlob(ctx, n.Client.ContentStore(), base.Manifest)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("snapview: the base image's manifest: %w", err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("snapview: the base image's manifest: %w", err)
	}
	layers := append(append([]ocispec.Descriptor{}, base.Parsed.Layers...), added...)
	ann := base.Parsed.Annotations
	if ann == nil {
		ann = map[string]string{}
	}
	maps.Copy(ann, annotations(*rec))
	set := func(k string, v any) error {
		raw, err := json.Marshal(v)
		m[k] = raw
		return err
	}
	if err := errors.Join(set("config", config), set("layers", layers), set("annotations", ann)); err != nil {
		return ocispec.Descriptor{}, err
	}
	labels := map[string]string{"containerd.io/gc.ref.content.config": config.Digest.String()}
	for i, l := range layers {
		labels[fmt.Sprintf("containerd.io/gc.ref.content.l.%d", i)] = l.Digest.String()
	}
	return n.writeJSON(ctx, rec, "manifest", base.Manifest.MediaType, m, labels)
}

// writeJSON writes v as a blob of mediaType into the content store, under
// the capture's lease, with labels.
func (n *Node) writeJSON(ctx context.Context, rec *record.Record, what, mediaType string, v any, labels map[string]string) (ocispec.Descriptor, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	var opts []content.Opt
	if labels != nil {
		opts = append(opts, content.WithLabels(labels))
	}
	if err := content.WriteBlob(ctx, n.Client.ContentStore(), "snapview-snapshot-"+rec.ID+"-"+what, bytes.NewReader(b), desc, opts...); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("snapview: write the snapshot's %s: %w", what, err)
	}
	return desc, nil
}

func sizeOf(ds []ocispec.Descriptor) int64 {
	var n int64
	for _, d := range ds {
		n += d.Size
	}
	return n
}
