package harness

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"sort"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// BusyboxPath is Debian's static busybox (package busybox-static).
const BusyboxPath = "/bin/busybox"

// busyboxApplets are linked into /bin of every test image.
var busyboxApplets = []string{
	"sh", "cat", "echo", "sleep", "ls", "head", "tail", "tty", "true", "false", "kill",
	"mkdir", "rm", "wc", "sha256sum", "cmp", "dd", "stat", "id", "env", "test", "grep",
	"touch", "ps", "printf", "readlink", "seq", "tr", "mount", "cp", "mv", "ln", "df",
}

// ImageSpec describes a test image.
type ImageSpec struct {
	// Ref is the image name, e.g. "docker.io/snapview/test:latest".
	Ref string
	// KernelSize is the size of /boot/vmlinux, a deterministic pseudo-random
	// file standing in for a guest kernel.
	KernelSize int64
	// Cmd is the image's default command (default /bin/sh).
	Cmd []string
}

// Image is a built test image: an OCI archive and what its files hold.
type Image struct {
	Ref     string
	Archive string
	// Files maps the regular files of the image to their content's sha256.
	Files map[string]string
}

// Boot artifacts every test image carries, in its second layer.
const (
	KernelPath = "/boot/vmlinux"
	InitrdPath = "/boot/initrd.img"
	ConfigPath = "/etc/snapview/config.json"
)

type layerFile struct {
	hdr  tar.Header
	data []byte
}

// BuildImage writes an OCI archive for spec to dir: a base layer of static
// busybox and a second layer of boot artifacts (a KernelSize kernel, a 1 MiB
// initrd and a JSON config), so that every view has more than one parent.
func BuildImage(dir string, spec ImageSpec) (*Image, error) {
	bb, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return nil, fmt.Errorf("read static busybox (Debian package busybox-static): %w", err)
	}
	img := &Image{Ref: spec.Ref, Files: map[string]string{}}
	mtime := time.Unix(1700000000, 0)
	dirEntry := func(name string, mode int64) layerFile {
		return layerFile{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, ModTime: mtime}}
	}
	file := func(name string, mode int64, data []byte) layerFile {
		sum := sha256.Sum256(data)
		img.Files["/"+name] = hex.EncodeToString(sum[:])
		return layerFile{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: mtime}, data: data}
	}
	link := func(name, target string) layerFile {
		return layerFile{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: mtime}}
	}

	base := []layerFile{
		dirEntry("bin", 0o755), dirEntry("dev", 0o755), dirEntry("etc", 0o755), dirEntry("proc", 0o555),
		dirEntry("sys", 0o555), dirEntry("tmp", 0o1777), dirEntry("root", 0o700), dirEntry("var", 0o755),
		dirEntry("run", 0o755),
		file("bin/busybox", 0o755, bb),
		file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n")),
		file("etc/group", 0o644, []byte("root:x:0:\n")),
	}
	for _, a := range busyboxApplets {
		base = append(base, link("bin/"+a, "busybox"))
	}

	rng := rand.NewChaCha8([32]byte{'s', 'n', 'a', 'p', 'v', 'i', 'e', 'w'})
	kernel := make([]byte, spec.KernelSize)
	_, _ = rng.Read(kernel)
	initrd := make([]byte, 1<<20)
	_, _ = rng.Read(initrd)
	cfg, _ := json.Marshal(map[string]string{"kernel": KernelPath, "initrd": InitrdPath, "cmdline": "console=ttyS0 quiet"})
	boot := []layerFile{
		dirEntry("boot", 0o755),
		file("boot/vmlinux", 0o644, kernel),
		file("boot/initrd.img", 0o644, initrd),
		dirEntry("etc", 0o755),
		dirEntry("etc/snapview", 0o755),
		file("etc/snapview/config.json", 0o644, cfg),
		// Hostile and odd entries for the boot-artifact tests: every
		// symlink below must resolve inside the image, or not at all.
		link("boot/kernel-link", "vmlinux"),
		link("boot/abs-link", "/etc/passwd"),                       // the image's passwd, not the host's
		link("boot/abs-escape", "/etc/shadow"),                     // exists on the host only
		link("boot/rel-escape", "../../../../../../../etc/shadow"), // climbs past the root
		link("boot/proc-escape", "/proc/self/root/etc/shadow"),     // the shim's root, if followed on the host
		link("boot/loop", "loop"),
		{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "boot/fifo", Mode: 0o644, ModTime: mtime}},
		{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "boot/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: mtime}},
	}

	ow := newOCIWriter()
	var diffIDs []digest.Digest
	var layers []ocispec.Descriptor
	for _, l := range [][]layerFile{base, boot} {
		desc, diffID, err := ow.addLayer(l)
		if err != nil {
			return nil, err
		}
		layers = append(layers, desc)
		diffIDs = append(diffIDs, diffID)
	}
	cmd := spec.Cmd
	if len(cmd) == 0 {
		cmd = []string{"/bin/sh"}
	}
	config := ocispec.Image{
		Platform: ocispec.Platform{Architecture: "amd64", OS: "linux"},
		Config: ocispec.ImageConfig{
			Env:        []string{"PATH=/bin"},
			Cmd:        cmd,
			WorkingDir: "/",
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	}
	configDesc := ow.addJSON(ocispec.MediaTypeImageConfig, config)
	manifest := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    configDesc,
		Layers:    layers,
	}
	manifestDesc := ow.addJSON(ocispec.MediaTypeImageManifest, manifest)
	manifestDesc.Platform = &config.Platform
	manifestDesc.Annotations = map[string]string{
		images.AnnotationImageName: spec.Ref,
		ocispec.AnnotationRefName:  "latest",
	}
	index := ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{manifestDesc},
	}

	f, err := os.CreateTemp(dir, "image-*.tar")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := ow.write(f, index); err != nil {
		return nil, err
	}
	img.Archive = f.Name()
	return img, f.Close()
}

type ociWriter struct {
	blobs map[digest.Digest][]byte
}

func newOCIWriter() *ociWriter { return &ociWriter{blobs: map[digest.Digest][]byte{}} }

func (w *ociWriter) addBlob(mediaType string, data []byte) ocispec.Descriptor {
	d := digest.FromBytes(data)
	w.blobs[d] = data
	return ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(data))}
}

func (w *ociWriter) addJSON(mediaType string, v any) ocispec.Descriptor {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own types are marshalled
	}
	return w.addBlob(mediaType, b)
}

func (w *ociWriter) addLayer(files []layerFile) (ocispec.Descriptor, digest.Digest, error) {
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, f := range files {
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
	return w.addBlob(ocispec.MediaTypeImageLayerGzip, gz.Bytes()), diffID, nil
}

func (w *ociWriter) write(out io.Writer, index ocispec.Index) error {
	tw := tar.NewWriter(out)
	put := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	layout, _ := json.Marshal(ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
	idx, _ := json.Marshal(index)
	if err := put(ocispec.ImageLayoutFile, layout); err != nil {
		return err
	}
	if err := put("index.json", idx); err != nil {
		return err
	}
	digests := make([]string, 0, len(w.blobs))
	for d := range w.blobs {
		digests = append(digests, d.String())
	}
	sort.Strings(digests)
	for _, d := range digests {
		dg := digest.Digest(d)
		if err := put("blobs/"+dg.Algorithm().String()+"/"+dg.Encoded(), w.blobs[dg]); err != nil {
			return err
		}
	}
	return tw.Close()
}

// Import imports img into namespace ns of the daemon and unpacks it for
// snapshotters, or for every snapshotter the daemon serves if none are named.
func (d *Daemon) Import(ctx context.Context, ns string, img *Image, snapshotters ...string) (client.Image, error) {
	if len(snapshotters) == 0 {
		snapshotters = d.Snapshotters
	}
	ctx = Context(ctx, ns)
	f, err := os.Open(img.Archive)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	imgs, err := d.client.Import(ctx, f)
	if err != nil {
		return nil, fmt.Errorf("import %s: %w", img.Ref, err)
	}
	if len(imgs) != 1 {
		return nil, fmt.Errorf("import %s: got %d images", img.Ref, len(imgs))
	}
	ci := client.NewImage(d.client, imgs[0])
	for _, sn := range snapshotters {
		if err := ci.Unpack(ctx, sn); err != nil {
			return nil, fmt.Errorf("unpack %s for %s: %w", img.Ref, sn, err)
		}
	}
	return ci, nil
}
