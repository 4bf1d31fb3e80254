package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/docker/go-units"

	"github.com/snapview/snapview/tests/e2e/harness"
)

var (
	blockSizes = flag.String("block-sizes", "64M,1G", "image content sizes of the block-mode comparison of blockfile and layered erofs (empty: skip it)")
	blockRuns  = flag.Int("block-n", 5, "runs per snapshotter and image size of the block-mode comparison")
)

// blockBySize compares block mode's two shapes, both under snapview, as a
// user waits for them: a container's whole life (its snapshot prepared,
// task created, started, run and deleted, container and snapshot removed)
// on the blockfile snapshotter (one disk: a copy of the image's disk image)
// against the erofs snapshotter in block mode (the image's layers shared as
// read-only disks, a new writable image per container), for images of each
// size in -block-sizes; and the disk each container adds. Each size has its
// own daemon, sized for it as an operator would size the node.
func blockBySize(ctx context.Context) error {
	var sizes []int64
	for f := range strings.SplitSeq(*blockSizes, ",") {
		if f == "" {
			continue
		}
		n, err := units.RAMInBytes(f)
		if err != nil {
			return fmt.Errorf("-block-sizes %q: %w", f, err)
		}
		sizes = append(sizes, n)
	}
	if len(sizes) == 0 {
		return nil
	}
	fmt.Printf("\nblock mode by image size: blockfile (a copy of the scratch file per container) against the erofs snapshotter in block mode, both under snapview, median of %d runs each after one warm-up\n", *blockRuns)
	var out [][]string
	for _, size := range sizes {
		row, err := blockRow(ctx, size)
		if err != nil {
			return fmt.Errorf("%s image: %w", units.BytesSize(float64(size)), err)
		}
		out = append(out, row)
	}
	table([]string{"image content", "disk size", "blockfile life", "layered erofs life", "blockfile/erofs", "disk per container, blockfile", "layered erofs"}, out)
	return nil
}

// blockRow measures one image size on a daemon of its own. The scratch
// file (every blockfile snapshot's size) holds the image with room for the
// filesystem and a container's writes. The erofs snapshotter unpacks each
// layer into a writable image of its default_size before turning it into
// an erofs layer, so that is the same size; a container's writable image
// is sparse and costs only what is written to it.
func blockRow(ctx context.Context, size int64) ([]string, error) {
	disk := size + size/4 + 128<<20
	s, err := harness.NewSession(ctx, "the benchmark (run 'sudo make bench')", "snapview-bench-block-", false,
		harness.WithLogLevel(*logLevel), harness.WithErofsBlock(strconv.FormatInt(disk, 10)), harness.WithBlockfileScratch(disk))
	if err != nil {
		return nil, err
	}
	defer s.Close()
	d := s.Daemon
	nctx := harness.Context(ctx, ns)
	ref := fmt.Sprintf("docker.io/snapview/bench-block-%d:latest", size)
	t0 := time.Now()
	img, err := harness.BuildImage(s.Dir, harness.ImageSpec{Ref: ref, KernelSize: size})
	if err != nil {
		return nil, err
	}
	if _, err := d.Import(ctx, ns, img, "blockfile", "erofs"); err != nil {
		return nil, err
	}
	os.Remove(img.Archive)
	fmt.Printf("  %s of image content (containerd %s, disks of %s): built and unpacked for both in %s\n",
		units.BytesSize(float64(size)), d.Version, units.BytesSize(float64(disk)), time.Since(t0).Round(time.Second))
	got := map[string][]time.Duration{}
	added := map[string]int64{}
	for i := range *blockRuns + 1 {
		for _, sn := range []string{"blockfile", "erofs"} {
			took, n, err := blockLife(nctx, d, ref, fmt.Sprintf("bsz-%s-%d", sn, i), sn)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", sn, err)
			}
			if i > 0 { // the first is the warm-up
				got[sn] = append(got[sn], took)
				added[sn] = n
			}
		}
	}
	if err := d.CheckLeaks(nctx); err != nil {
		return nil, err
	}
	bf, er := median(got["blockfile"]), median(got["erofs"])
	return []string{units.BytesSize(float64(size)), units.BytesSize(float64(disk)), ms(bf), ms(er), fmt.Sprintf("%.1fx", float64(bf)/float64(er)),
		units.BytesSize(float64(added["blockfile"])), units.BytesSize(float64(added["erofs"]))}, nil
}

// blockLife runs one block-mode container of ref on snapshotter sn under
// snapview, from its snapshot's preparation to its removal, and returns
// how long that took and how much disk the container's own snapshot
// occupied while it ran (allocated blocks: the blockfile copy, or the
// erofs snapshotter's writable image; the layers are the image's).
func blockLife(ctx context.Context, d *harness.Daemon, ref, id, sn string) (time.Duration, int64, error) {
	c := d.Client()
	img, err := c.GetImage(ctx, ref)
	if err != nil {
		return 0, 0, err
	}
	t0 := time.Now()
	ctr, err := c.NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter(sn),
		client.WithNewSnapshot(id, img), client.WithRuntime(snapview, nil),
		client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("true"), oci.WithAnnotations(map[string]string{"io.snapview.mode": "block"})))
	if err != nil {
		return 0, 0, err
	}
	removed := false
	defer func() {
		if !removed {
			ctr.Delete(ctx, client.WithSnapshotCleanup)
		}
	}()
	var out bytes.Buffer
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(bytes.NewReader(nil), &out, &out)))
	if err != nil {
		return 0, 0, err
	}
	exit, err := task.Wait(ctx)
	if err != nil {
		return 0, 0, err
	}
	if err := task.Start(ctx); err != nil {
		return 0, 0, err
	}
	st := <-exit
	info, err := ctr.Info(ctx)
	if err != nil {
		return 0, 0, err
	}
	mounts, err := c.SnapshotService(sn).Mounts(ctx, info.SnapshotKey)
	if err != nil {
		return 0, 0, err
	}
	var fi syscall.Stat_t
	if err := syscall.Stat(mounts[0].Source, &fi); err != nil {
		return 0, 0, err
	}
	if _, err := task.Delete(ctx); err != nil {
		return 0, 0, err
	}
	if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
		return 0, 0, err
	}
	removed = true
	took := time.Since(t0)
	if st.ExitCode() != 0 {
		return 0, 0, fmt.Errorf("%s exited %d: %s", id, st.ExitCode(), out.String())
	}
	return took, fi.Blocks * 512, nil
}
