package harness

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// mtime is the modification time of every file in a composed image, so
// that the same content always gives the same digests.
var mtime = time.Unix(1700000000, 0)

// Layer is the content of one image layer, in the order it was added.
type Layer struct {
	entries []layerFile
	// files maps each regular file, as /path, to its content's sha256.
	files map[string]string
}

type layerFile struct {
	hdr  tar.Header
	data []byte
}

// NewLayer returns an empty layer.
func NewLayer() *Layer { return &Layer{files: map[string]string{}} }

// Dir adds a directory owned by root.
func (l *Layer) Dir(name string, mode int64) *Layer {
	return l.Entry(tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode})
}

// File adds a regular file owned by root.
func (l *Layer) File(name string, mode int64, data []byte) *Layer {
	sum := sha256.Sum256(data)
	l.files["/"+name] = hex.EncodeToString(sum[:])
	l.entries = append(l.entries, layerFile{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: mtime}, data: data})
	return l
}

// Symlink adds a symbolic link.
func (l *Layer) Symlink(name, target string) *Layer {
	return l.Entry(tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777})
}

// Entry adds any tar entry without content (a directory, fifo, device or
// link, with any owner).
func (l *Layer) Entry(hdr tar.Header) *Layer {
	hdr.ModTime = mtime
	l.entries = append(l.entries, layerFile{hdr: hdr})
	return l
}

// HostFile adds the host file src at name, keeping its mode.
func (l *Layer) HostFile(name, src string) error {
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	l.File(name, int64(fi.Mode().Perm()), data)
	return nil
}

// OCIImage is a composed image: its index, manifest and blobs.
type OCIImage struct {
	Ref string
	// Manifest is the descriptor of the image's only manifest.
	Manifest ocispec.Descriptor
	// Files maps the regular files of all layers to their content's sha256.
	Files map[string]string

	index ocispec.Index
	blobs map[digest.Digest][]byte
}

// Compose builds an image named ref for linux/amd64 with config cfg and the
// layers in order, lowest first.
func Compose(ref string, cfg ocispec.ImageConfig, layers ...*Layer) (*OCIImage, error) {
	img := &OCIImage{Ref: ref, Files: map[string]string{}, blobs: map[digest.Digest][]byte{}}
	var (
		diffIDs []digest.Digest
		descs   []ocispec.Descriptor
	)
	for _, l := range layers {
		desc, diffID, err := img.addLayer(l)
		if err != nil {
			return nil, err
		}
		descs = append(descs, desc)
		diffIDs = append(diffIDs, diffID)
		maps.Copy(img.Files, l.files)
	}
	config := ocispec.Image{
		Platform: ocispec.Platform{Architecture: "amd64", OS: "linux"},
		Config:   cfg,
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	}
	configDesc, err := img.addJSON(ocispec.MediaTypeImageConfig, config)
	if err != nil {
		return nil, err
	}
	manifest := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    configDesc,
		Layers:    descs,
	}
	if img.Manifest, err = img.addJSON(ocispec.MediaTypeImageManifest, manifest); err != nil {
		return nil, err
	}
	img.Manifest.Platform = &config.Platform
	named := img.Manifest
	named.Annotations = map[string]string{
		images.AnnotationImageName: ref,
		ocispec.AnnotationRefName:  "latest",
	}
	img.index = ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{named},
	}
	return img, nil
}

// Index returns the image index a registry serves for the image's tag: its
// one manifest, for linux/amd64, as multi-platform images are published.
func (img *OCIImage) Index() (ocispec.Descriptor, error) {
	idx := ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{img.Manifest},
	}
	return img.addJSON(ocispec.MediaTypeImageIndex, idx)
}

// Blob returns the blob (layer, config or manifest) of digest d.
func (img *OCIImage) Blob(d digest.Digest) ([]byte, bool) {
	b, ok := img.blobs[d]
	return b, ok
}

func (img *OCIImage) addBlob(mediaType string, data []byte) ocispec.Descriptor {
	d := digest.FromBytes(data)
	img.blobs[d] = data
	return ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(data))}
}

func (img *OCIImage) addJSON(mediaType string, v any) (ocispec.Descriptor, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	return img.addBlob(mediaType, b), nil
}

func (img *OCIImage) addLayer(l *Layer) (ocispec.Descriptor, digest.Digest, error) {
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, f := range l.entries {
		hdr := f.hdr
		if err := tw.WriteHeader(&hdr); err != nil {
			return ocispec.Descriptor{}, "", err
		}
		if _, err := tw.Write(f.data); err != nil {
			return ocispec.Descriptor{}, "", err
		}
	}
	if err := tw.Close(); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	diffID := digest.FromBytes(raw.Bytes())
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	if _, err := zw.Write(raw.Bytes()); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	if err := zw.Close(); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	return img.addBlob(ocispec.MediaTypeImageLayerGzip, gz.Bytes()), diffID, nil
}

// WriteArchive writes the image as an OCI image layout archive, as
// `ctr images import` reads it.
func (img *OCIImage) WriteArchive(out io.Writer) error {
	tw := tar.NewWriter(out)
	put := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	layout, _ := json.Marshal(ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
	idx, _ := json.Marshal(img.index)
	if err := put(ocispec.ImageLayoutFile, layout); err != nil {
		return err
	}
	if err := put("index.json", idx); err != nil {
		return err
	}
	digests := make([]string, 0, len(img.blobs))
	for d := range img.blobs {
		digests = append(digests, d.String())
	}
	sort.Strings(digests)
	for _, d := range digests {
		dg := digest.Digest(d)
		if err := put("blobs/"+dg.Algorithm().String()+"/"+dg.Encoded(), img.blobs[dg]); err != nil {
			return err
		}
	}
	return tw.Close()
}

// WriteArchiveFile writes the image's archive into dir and returns its path.
func (img *OCIImage) WriteArchiveFile(dir string) (string, error) {
	f, err := os.CreateTemp(dir, "image-*.tar")
	if err != nil {
		return "", err
	}
	defer f.Close()
	if err := img.WriteArchive(f); err != nil {
		return "", fmt.Errorf("write %s: %w", f.Name(), err)
	}
	return f.Name(), f.Close()
}

// WriteTo writes the layer's directories, files and symlinks into dir, as
// a container runtime would unpack them (owners and special files aside).
func (l *Layer) WriteTo(dir string) error {
	for _, e := range l.entries {
		p := filepath.Join(dir, filepath.Clean("/"+e.hdr.Name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		mode := os.FileMode(e.hdr.Mode).Perm()
		switch e.hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, mode); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.WriteFile(p, e.data, mode); err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := os.Symlink(e.hdr.Linkname, p); err != nil {
				return err
			}
		}
	}
	return nil
}
