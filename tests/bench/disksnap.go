package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/docker/go-units"
	"github.com/opencontainers/image-spec/identity"

	"github.com/snapview/snapview/tests/e2e/harness"
)

var (
	diskSnapshotRows = flag.Bool("disk-snapshots", true, "also measure disk snapshots of block-mode containers by how much the guest wrote (a fresh disk, 100 MiB, 1 GiB) on layered erofs and blockfile, against cp --sparse=always of the same disk and blockfile's own per-container copy (a daemon of its own, 2 GiB disks)")
	diskSnapshotN    = flag.Int("disk-snapshot-n", 3, "runs per row of the disk snapshot comparison")
)

// diskSnapshotSize is the size of every writable disk in the comparison.
const diskSnapshotSize = 2 << 30

// diskSnapshots measures, on a daemon of its own whose block-mode disks are
// 2 GiB (the erofs snapshotter's writable images and blockfile's scratch
// file), a disk snapshot of a block-mode container that wrote N MiB of
// random data through its disk (as a guest would) at 64 MiB: the capture
// (snapviewctl snapshot create, whole command, and its peak RSS), what it
// stores, a restore (task create of a new container restored from it
// against one that is not), and, as the alternatives, cp --sparse=always
// of the same disk file (the physical floor of a copy on this disk) and,
// on blockfile, the snapshotter's own copy of its scratch file for a new
// container (Prepare).
func diskSnapshots(ctx context.Context) error {
	ctl := os.Getenv("SNAPVIEW_CTL")
	if !*diskSnapshotRows || ctl == "" {
		return nil
	}
	s, err := harness.NewSession(ctx, "the benchmark (run 'sudo make bench')", "snapview-bench-disksnap-", false,
		harness.WithLogLevel(*logLevel), harness.WithErofsBlock(fmt.Sprint(diskSnapshotSize)), harness.WithBlockfileScratch(diskSnapshotSize))
	if err != nil {
		return err
	}
	defer s.Close()
	d := s.Daemon
	const ref = "docker.io/snapview/bench-disksnap:latest"
	img, err := harness.BuildImage(s.Dir, harness.ImageSpec{Ref: ref, KernelSize: 4 << 20})
	if err != nil {
		return err
	}
	if _, err := d.Import(ctx, ns, img, "blockfile", "erofs"); err != nil {
		return err
	}
	nctx := harness.Context(ctx, ns)
	c := d.Client()
	cimg, err := c.GetImage(nctx, ref)
	if err != nil {
		return err
	}
	run := func(id, sn string, ann map[string]string, script string) (client.Container, client.Task, time.Duration, error) {
		ctr, err := c.NewContainer(nctx, id, client.WithImage(cimg), client.WithSnapshotter(sn), client.WithNewSnapshot(id, cimg),
			client.WithRuntime(snapview, nil), client.WithNewSpec(oci.WithImageConfig(cimg), oci.WithProcessArgs("sh", "-c", script), oci.WithAnnotations(ann)))
		if err != nil {
			return nil, nil, 0, err
		}
		t0 := time.Now()
		task, err := ctr.NewTask(nctx, cio.NullIO)
		took := time.Since(t0)
		if err != nil {
			ctr.Delete(nctx, client.WithSnapshotCleanup)
			return nil, nil, 0, err
		}
		return ctr, task, took, task.Start(nctx)
	}
	remove := func(ctr client.Container, task client.Task) {
		_, _ = task.Delete(nctx, client.WithProcessKill)
		_ = ctr.Delete(nctx, client.WithSnapshotCleanup)
	}
	sctl := func(args ...string) (string, int64, time.Duration, error) { return runCtl(ctx, ctl, d, ns, args...) }
	block := map[string]string{"io.snapview.mode": "block"}
	var rows [][]string
	for _, mib := range []int{0, 100, 1024} {
		for _, sn := range []string{"erofs", "blockfile"} {
			var capture, cp, restore, plain, prepare []time.Duration
			var stored, rss int64
			for i := range *diskSnapshotN {
				id := fmt.Sprintf("dsnap-%s-%d-%d", sn, mib, i)
				script := "echo ready > /dev/null"
				if mib > 0 {
					script = fmt.Sprintf("dd if=/dev/urandom of=/dev/snapview/rootfs bs=1M seek=64 count=%d conv=notrunc,fsync 2>/dev/null", mib)
				}
				ctr, task, _, err := run(id, sn, block, script+" && touch /tmp/ready; exec sleep 3600")
				if err != nil {
					return fmt.Errorf("%s: %w", id, err)
				}
				bundle := filepath.Join(d.State, "io.containerd.runtime.v2.task", ns, id, "rootfs", "tmp", "ready")
				if err := waitFile(bundle, 5*time.Minute); err != nil {
					remove(ctr, task)
					return fmt.Errorf("%s: %w", id, err)
				}
				info, err := ctr.Info(nctx)
				if err != nil {
					return err
				}
				mounts, err := c.SnapshotService(sn).Mounts(nctx, info.SnapshotKey)
				if err != nil {
					return err
				}
				disk := mounts[0].Source
				out, peak, took, err := sctl("snapshot", "create", id)
				if err != nil {
					remove(ctr, task)
					return err
				}
				var snap struct {
					ID   string `json:"id"`
					Size int64  `json:"size"`
				}
				if err := json.Unmarshal([]byte(out), &snap); err != nil {
					return fmt.Errorf("snapshot create printed %q: %w", out, err)
				}
				capture, stored, rss = append(capture, took), snap.Size, max(rss, peak)

				// The alternative: a sparse copy of the same disk file.
				dst := filepath.Join(s.Dir, "cp-"+id)
				t0 := time.Now()
				if out, err := exec.CommandContext(ctx, "cp", "--sparse=always", disk, dst).CombinedOutput(); err != nil {
					return fmt.Errorf("cp: %w: %s", err, out)
				}
				cp = append(cp, time.Since(t0))
				os.Remove(dst)
				remove(ctr, task)

				// Restore: task create of a container restored from it,
				// against one that is not.
				rann := map[string]string{"io.snapview.mode": "block", "io.snapview.restore": snap.ID}
				rc, rt, took, err := run(id+"-r", sn, rann, "exec sleep 3600")
				if err != nil {
					return fmt.Errorf("restore %s: %w", id, err)
				}
				restore = append(restore, took)
				remove(rc, rt)
				pc, pt, took, err := run(id+"-p", sn, block, "exec sleep 3600")
				if err != nil {
					return err
				}
				plain = append(plain, took)
				remove(pc, pt)
				if sn == "blockfile" {
					// blockfile's own copy: a new snapshot's Prepare copies
					// the scratch file.
					t0 := time.Now()
					if _, err := c.SnapshotService(sn).Prepare(nctx, id+"-copy", chainID(nctx, cimg)); err != nil {
						return err
					}
					prepare = append(prepare, time.Since(t0))
					_ = c.SnapshotService(sn).Remove(nctx, id+"-copy")
				}
				if _, _, _, err := sctl("snapshot", "rm", snap.ID); err != nil {
					return err
				}
			}
			name := "fresh disk"
			if mib > 0 {
				name = units.BytesSize(float64(mib) * (1 << 20))
			}
			pc := "-"
			if len(prepare) > 0 {
				pc = ms(median(prepare))
			}
			rows = append(rows, []string{name, sn, ms(median(capture)), units.BytesSize(float64(stored)), mib1(rss), ms(median(cp)), pc,
				ms(median(restore)), ms(median(plain))})
		}
	}
	if err := d.CheckLeaks(nctx); err != nil {
		return err
	}
	fmt.Printf("\ndisk snapshots of a block-mode container that wrote N of random data through its 2 GiB disk (median of %d; containerd %s)\n", *diskSnapshotN, d.Version)
	table([]string{"written", "snapshotter", "capture (whole command)", "stored", "snapviewctl peak RSS", "cp --sparse=always", "blockfile's copy (Prepare)", "task create, restored", "task create, fresh"}, rows)
	return nil
}

func mib1(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// waitFile waits until path exists.
func waitFile(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %s", path, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// chainID returns the chain id of img's layers, the parent of a new
// container snapshot of it.
func chainID(ctx context.Context, img client.Image) string {
	ids, err := img.RootFS(ctx)
	if err != nil {
		return ""
	}
	return identity.ChainID(ids).String()
}
