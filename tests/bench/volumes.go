package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	cri "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

var volumeRows = flag.Bool("volumes", true, "also compare containers with volumes: 0, 1 and 4 under snapview, and a CRI pod with one against containerd's own image volume on runc (first daemon)")

// volumeImage names the i-th volume image of the benchmark; the CRI
// configuration of the harness allows docker.io/snapview/vol-*.
func volumeImage(i int) string { return fmt.Sprintf("docker.io/snapview/vol-bench-%d:1", i) }

// volumeAllow is the configuration that allows the benchmark's volumes.
const volumeAllow = "[volumes]\nallow = [\"docker.io/snapview/vol-*\"]\n"

// importVolumeImages builds four volume images of 1 MiB each and imports
// them for overlayfs in both namespaces.
func (b *bench) importVolumeImages(ctx context.Context) error {
	for i := range 4 {
		data := bytes.Repeat([]byte{byte('a' + i)}, 1<<20)
		img, err := harness.Compose(volumeImage(i), ocispec.ImageConfig{}, harness.NewLayer().Dir("data", 0o755).File("data/blob", 0o644, data))
		if err != nil {
			return err
		}
		archive, err := img.WriteArchiveFile(b.dir)
		if err != nil {
			return err
		}
		for _, n := range []string{ns, criNS} {
			if _, err := b.d.Import(ctx, n, &harness.Image{Ref: volumeImage(i), Archive: archive}, "overlayfs"); err != nil {
				return err
			}
		}
		os.Remove(archive)
	}
	return nil
}

// volumes compares, under snapview, the task lifecycle of a container with
// no volume, one and four (each a read-only view of another image, mounted
// and bound), and, through CRI as the kubelet drives it, a pod whose
// container reads one volume: snapview's volume annotation against
// containerd's own image volume (the kubelet's Mount.image) on runc, the
// same image in the same run.
func (b *bench) volumes(ctx context.Context) error {
	if err := b.importVolumeImages(ctx); err != nil {
		return err
	}
	v := variant{rt: snapview, config: volumeAllow}
	got := map[int][]time.Duration{}
	for i := range *iterations {
		for _, n := range []int{0, 1, 4} {
			ann := map[string]string{}
			for j := range n {
				ann[fmt.Sprintf("io.snapview.volume.v%d", j)] = fmt.Sprintf(`{"image":%q,"target":"/v%d"}`, volumeImage(j), j)
			}
			r, err := b.lifecycle(ctx, v, small, fmt.Sprintf("vols-%d-%d", n, i), "overlayfs", ann)
			if err != nil {
				return fmt.Errorf("%d volumes: %w", n, err)
			}
			got[n] = append(got[n], r.total)
		}
	}
	base := median(got[0])
	fmt.Printf("\ncontainers with volumes under snapview, task create→start→wait→delete (median of %d)\n", *iterations)
	var out [][]string
	for _, n := range []int{0, 1, 4} {
		m := median(got[n])
		out = append(out, []string{fmt.Sprintf("%d volumes", n), ms(m), fmt.Sprintf("%+.1f ms", float64((m-base).Microseconds())/1000), fmt.Sprintf("%.3f", float64(m)/float64(base))})
	}
	table([]string{"", "median", "against none", "ratio"}, out)

	cctx := harness.Context(ctx, criNS)
	pod := samples{}
	for i := range *iterations {
		for _, rt := range order(i) {
			var d time.Duration
			var err error
			if rt == runc {
				d, err = b.criVolume(cctx, "runc", i, nil, []*cri.Mount{{ContainerPath: "/v0", Image: &cri.ImageSpec{Image: volumeImage(0)}, Readonly: true}})
			} else {
				d, err = b.criVolume(cctx, "snapview", i, map[string]string{"io.snapview.volume.v0": fmt.Sprintf(`{"image":%q,"target":"/v0"}`, volumeImage(0))}, nil)
			}
			if err != nil {
				return fmt.Errorf("CRI pod with a volume on %s: %w", rt, err)
			}
			pod.add(rt, d)
		}
	}
	fmt.Printf("\nCRI pod whose container reads a volume, to its first output (median of %d): containerd's image volume on runc against snapview's\n", *iterations)
	table([]string{"", "runc + image volume", "snapview + volume", "ratio"},
		[][]string{{"pod to first output", ms(median(pod[runc])), ms(median(pod[snapview])), fmt.Sprintf("%.3f", pod.ratio())}})
	return nil
}

// criVolume times a CRI pod of handler whose container prints a byte of
// /v0/data/blob: the volume asked for by pod annotation (snapview) or as
// an image mount (containerd's own image volumes).
func (b *bench) criVolume(ctx context.Context, handler string, i int, ann map[string]string, mounts []*cri.Mount) (time.Duration, error) {
	return b.podToOutput(ctx, handler, fmt.Sprintf("vol-%s-%d", handler, i), ann, mounts, []string{"head", "-c", "1", "/v0/data/blob"}, " a")
}
