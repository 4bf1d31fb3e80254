package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// diskWriteScript writes $MARKER at 62 MiB of the container's writable
// disk (inside the 64 MiB erofs writable image and the 384 MiB blockfile
// image, among blocks a new, empty filesystem leaves free) as a guest would, through the disk's device, without
// syncing it (what is still in the loop device's page cache must reach
// the snapshot), then waits.
const diskWriteScript = `printf '%s' "$MARKER" | dd of=/dev/snapview/rootfs bs=1M seek=62 conv=notrunc 2>/dev/null && echo ready; exec sleep 300`

// diskReadScript reads back what diskWriteScript wrote, and the
// superblock's magic of the disk, as a guest would see them.
const diskReadScript = `echo "marker $(dd if=/dev/snapview/rootfs bs=1M skip=62 count=1 2>/dev/null | head -c 64 | tr -d '\0')"; ` +
	`echo "ext4=$(dd if=/dev/snapview/rootfs bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')"; echo ready; exec sleep 300`

// diskLoops counts the loop devices bound to file.
func diskLoops(file string) int {
	n := 0
	for _, l := range harness.LoopDevices(filepath.Dir(file)) {
		if strings.HasSuffix(l, " -> "+file) {
			n++
		}
	}
	return n
}

// watchCapture watches, until stopped, that file (a guest's disk) is
// never mounted on the host and never bound to more loop devices than the
// one its container's shim attached.
func watchCapture(file, device string) func() []string {
	stop := make(chan struct{})
	var (
		wg   sync.WaitGroup
		seen []string
		once = map[string]bool{}
	)
	wg.Go(func() {
		for {
			if n := diskLoops(file); n != 1 && !once["loops"] {
				once["loops"] = true
				seen = append(seen, fmt.Sprintf("%s bound to %d loop devices", file, n))
			}
			infos, _ := mountinfo.GetMounts(func(m *mountinfo.Info) (bool, bool) { return m.Source != file && m.Source != device, false })
			for _, m := range infos {
				if v := fmt.Sprintf("%s mounted on %s (%s)", m.Source, m.Mountpoint, m.FSType); !once[v] {
					once[v] = true
					seen = append(seen, v)
				}
			}
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	})
	return func() []string { close(stop); wg.Wait(); return seen }
}

// restoreAnn asks block mode with the writable disk restored from id.
func restoreAnn(id string) map[string]string {
	ann := maps.Clone(blockAnn)
	ann["io.snapview.restore"] = id
	return ann
}

// sameBytes compares the first n bytes of two files.
func sameBytes(t *testing.T, a, b string, n int64) bool {
	t.Helper()
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); off < n; off += 1 << 20 {
		na, _ := io.ReadFull(io.NewSectionReader(fa, off, 1<<20), ba)
		nb, _ := io.ReadFull(io.NewSectionReader(fb, off, 1<<20), bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			t.Logf("%s and %s differ in the MiB at %d", a, b, off)
			return false
		}
	}
	return true
}

// TestDiskSnapshot takes a disk snapshot of a block-mode container, on the
// erofs snapshotter in block mode (its writable image) and on blockfile
// (its one disk), on both containerd versions: the container's task is
// paused for the copy and runs on, what its "guest" wrote through the disk
// device without a sync is in the snapshot, the disk is never mounted on
// the host nor bound to a loop device of the capture's, and the snapshot
// holds the disk's data, not its holes. A new block-mode container of the
// same image restored from it (io.snapview.restore) starts with that disk,
// byte for byte, holes as holes; a snapshot of the restored container
// restores in turn. Then the snapshots are removed, with nothing left.
func TestDiskSnapshot(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		for _, sn := range []string{"erofs", "blockfile"} {
			t.Run(sn, func(t *testing.T) {
				ctx := setup(t, d)
				marker := fmt.Sprintf("disk-marker-%s-%d", sn, time.Now().UnixNano())
				src := "disksnap-src-" + sn
				r, err := start(ctx, t, d, src, runOpts{runtime: snapviewRT, snapshotter: sn, annotations: blockAnn,
					args: []string{"sh", "-c", diskWriteScript}, specOpts: []oci.SpecOpts{oci.WithEnv([]string{"MARKER=" + marker})}})
				if err != nil {
					t.Fatal(err)
				}
				if err := r.waitOutput("ready"); err != nil {
					t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
				}
				st := readBlockState(t, d, src)
				disk := st.Block.Rootfs.Source
				watch := watchCapture(disk, st.Block.Device)
				s := takeSnapshot(t, d, "--name", "guest-"+sn, src)
				for _, v := range watch() {
					t.Errorf("during the capture: %s", v)
				}
				img, err := r.ctr.Image(ctx)
				if err != nil {
					t.Fatal(err)
				}
				fi, err := os.Stat(disk)
				if err != nil {
					t.Fatal(err)
				}
				if s.Kind != "container" || s.Form != "disk" || s.Base != img.Target().Digest.String() || s.Size <= 0 || s.Size > fi.Size()/8 {
					t.Fatalf("snapshot %+v of a %d-byte disk", s, fi.Size())
				}
				if ts, err := r.task.Status(ctx); err != nil || ts.Status != client.Running {
					t.Fatalf("the source container is %v after the capture (%v)", ts.Status, err)
				}

				// Restore into a new container of the same image.
				id := "disksnap-restored-" + sn
				c, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: sn, annotations: restoreAnn(s.ID), args: []string{"sh", "-c", diskReadScript}})
				if err != nil {
					t.Fatal(err)
				}
				if err := c.waitOutput("ready"); err != nil {
					t.Fatalf("%v\nstderr: %s", err, c.stderr.String())
				}
				if out := c.stdout.String(); !strings.Contains(out, "marker "+marker+"\n") || !strings.Contains(out, "ext4=53ef") {
					t.Errorf("the restored container reads %q, want marker %s on an ext4 disk", out, marker)
				}
				rst := readBlockState(t, d, id)
				var rs struct {
					Restore struct{ Snapshot, Disk string } `json:"restore"`
				}
				raw, _ := os.ReadFile(filepath.Join(bundleDir(d, id), "snapview.json"))
				if err := json.Unmarshal(raw, &rs); err != nil || rs.Restore.Snapshot != s.ID || rs.Restore.Disk != rst.Block.Rootfs.Source {
					t.Errorf("the restored container's state: %s", raw)
				}
				// Byte for byte, as the source's disk was at the capture (the
				// source is paused now, so its disk holds still).
				if err := r.task.Pause(ctx); err != nil {
					t.Fatal(err)
				}
				if f, err := os.OpenFile(st.Block.Device, os.O_RDONLY, 0); err == nil {
					_ = f.Sync()
					f.Close()
				}
				if !sameBytes(t, disk, rst.Block.Rootfs.Source, fi.Size()) {
					t.Error("the restored disk differs from the saved one")
				}
				var a, b unix.Stat_t
				_ = unix.Stat(disk, &a)
				_ = unix.Stat(rst.Block.Rootfs.Source, &b)
				if b.Blocks > a.Blocks+(4<<20)/512 {
					t.Errorf("the restored disk allocates %d blocks, the saved one %d: holes were filled", b.Blocks, a.Blocks)
				}
				if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
					t.Fatal(err)
				}

				// A snapshot of the restored container restores in turn.
				s2 := takeSnapshot(t, d, id)
				if _, err := c.task.Delete(ctx, client.WithProcessKill); err != nil {
					t.Fatal(err)
				}
				third := "disksnap-again-" + sn
				c3, err := start(ctx, t, d, third, runOpts{runtime: snapviewRT, snapshotter: sn, annotations: restoreAnn(s2.ID), args: []string{"sh", "-c", diskReadScript}})
				if err != nil {
					t.Fatal(err)
				}
				if err := c3.waitOutput("ready"); err != nil || !strings.Contains(c3.stdout.String(), "marker "+marker+"\n") {
					t.Errorf("the second generation reads %q (%v)", c3.stdout.String(), err)
				}
				if _, err := c3.task.Delete(ctx, client.WithProcessKill); err != nil {
					t.Fatal(err)
				}
				removeSnapshot(ctx, t, d, s2.ID)
				removeSnapshot(ctx, t, d, s.ID)
			})
		}
	})
}

// TestDiskSnapshotRefused refuses every restore that does not fit, each
// with a snapview: error naming it at Create, nothing left: outside block
// mode, an unknown id, a malformed one, a directory snapshot, an image-form
// container snapshot, a disk snapshot of another image, of another
// snapshotter, and restoring turned off; and a directory snapshot of a
// block-mode container.
func TestDiskSnapshotRefused(t *testing.T) {
	d := layeredDaemon(t, false)
	ctx := setup(t, d)
	src, err := start(ctx, t, d, "disksnap-ref-src", runOpts{runtime: snapviewRT, snapshotter: "erofs", annotations: blockAnn,
		args: []string{"sh", "-c", diskWriteScript}, specOpts: []oci.SpecOpts{oci.WithEnv([]string{"MARKER=x"})}})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.waitOutput("ready"); err != nil {
		t.Fatal(err)
	}
	disk := takeSnapshot(t, d, "disksnap-ref-src")
	if out, errOut, code := ctlRun(t, d, nil, "snapshot", "create", "--dir", "/data", "disksnap-ref-src"); code != 1 || !strings.Contains(errOut, "snapview: container disksnap-ref-src runs its rootfs in a guest (block mode)") || out != "" {
		t.Errorf("a directory snapshot of a block-mode container: exit %d %q %q", code, out, errOut)
	}
	if _, err := src.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
	view, err := start(ctx, t, d, "disksnap-ref-view", runOpts{runtime: snapviewRT, snapshotter: "overlayfs", args: []string{"sh", "-c", "mkdir -p /data && echo x > /data/x && echo ready; exec sleep 300"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := view.waitOutput("ready"); err != nil {
		t.Fatal(err)
	}
	imageForm := takeSnapshot(t, d, "disksnap-ref-view")
	dir := takeSnapshot(t, d, "--dir", "/data", "disksnap-ref-view")
	if _, err := view.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
	other := otherImage(ctx, t, d, "erofs")
	unknown := "6f1c1f0e-3b7a-4c0e-9a57-1d2f3e4a5b6c"
	off := &runtimeoptions.Options{ConfigBody: []byte("[snapshots]\nrestore = false\n")}
	for _, tc := range []struct {
		name, sn, image string
		ann             map[string]string
		opts            any
		want            []string
	}{
		{"view mode", "erofs", "", map[string]string{"io.snapview.restore": disk.ID}, nil, []string{"annotation io.snapview.restore=" + disk.ID + " restores a block-mode container's writable disk, but the mode is view"}},
		{"unknown", "erofs", "", restoreAnn(unknown), nil, []string{"annotation io.snapview.restore", "snapshot " + unknown + ": not found in namespace " + ns}},
		{"malformed", "erofs", "", restoreAnn("NOT-AN-ID"), nil, []string{"annotation io.snapview.restore", `snapshot id "NOT-AN-ID"`}},
		{"a directory snapshot", "erofs", "", restoreAnn(dir.ID), nil, []string{"snapshot " + dir.ID + " is a directory snapshot in image form, not a container's disk"}},
		{"an image-form snapshot", "erofs", "", restoreAnn(imageForm.ID), nil, []string{"snapshot " + imageForm.ID + " is a container snapshot in image form, not a container's disk"}},
		{"another image", "erofs", other, restoreAnn(disk.ID), nil, []string{"snapshot " + disk.ID + " was taken of a container of image " + disk.Base + ", whose layers are not this container's"}},
		{"another snapshotter", "blockfile", "", restoreAnn(disk.ID), nil, []string{"snapshot " + disk.ID + " was taken on snapshotter erofs, and the container is on blockfile"}},
		{"restore off", "erofs", "", restoreAnn(disk.ID), off, []string{"annotation io.snapview.restore=" + disk.ID + ": restoring snapshots is off ([snapshots] restore = false"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "disksnap-ref-" + strings.ReplaceAll(tc.name, " ", "-")
			_, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, runtimeOpts: tc.opts, snapshotter: tc.sn, image: tc.image, annotations: tc.ann, args: []string{"true"}})
			if err == nil {
				t.Fatal("the container started")
			}
			for _, w := range append([]string{"snapview: "}, tc.want...) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if left := d.SnapviewObjectsOf(ctx, ns, id); len(left) > 0 {
				t.Errorf("left after the refusal: %v", left)
			}
		})
	}
	for _, s := range []snapshotJSON{disk, imageForm, dir} {
		removeSnapshot(ctx, t, d, s.ID)
	}
}

// TestDiskSnapshotBetweenNodes pushes a disk snapshot taken on containerd
// 2.4 through the registry and pulls it on 2.2, with its base image; a
// block-mode container of the base there restores it and reads the marker:
// a layered rootfs's writable image (erofs) and a one-disk rootfs
// (blockfile).
func TestDiskSnapshotBetweenNodes(t *testing.T) {
	a, b, reg, ctx := twoNodes(t)
	for _, sn := range []string{"erofs", "blockfile"} {
		t.Run(sn, func(t *testing.T) {
			marker := fmt.Sprintf("travelling-disk-%s-%d", sn, time.Now().UnixNano())
			src := "disksnap-travel-src-" + sn
			r, err := start(ctx, t, a, src, runOpts{runtime: snapviewRT, snapshotter: sn, annotations: blockAnn,
				args: []string{"sh", "-c", diskWriteScript}, specOpts: []oci.SpecOpts{oci.WithEnv([]string{"MARKER=" + marker})}})
			if err != nil {
				t.Fatal(err)
			}
			if err := r.waitOutput("ready"); err != nil {
				t.Fatal(err)
			}
			s := takeSnapshot(t, a, src)
			if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
				t.Fatal(err)
			}
			ref := reg.Addr + "/snapview/disk-" + sn + ":1"
			if out, errOut, code := ctlRun(t, a, nil, "snapshot", "push", "--plain-http", s.ID, ref); code != 0 {
				t.Fatalf("push: exit %d\n%s%s", code, out, errOut)
			}
			p := pulled(t, b, "--plain-http", ref)
			if p.ID != s.ID || p.Form != "disk" || p.Base != s.Base || p.Size != s.Size {
				t.Errorf("pulled %+v, pushed %+v", p, s)
			}
			c, err := start(ctx, t, b, "disksnap-travel-restored-"+sn, runOpts{runtime: snapviewRT, snapshotter: sn, annotations: restoreAnn(s.ID), args: []string{"sh", "-c", diskReadScript}})
			if err != nil {
				t.Fatal(err)
			}
			if err := c.waitOutput("ready"); err != nil || !strings.Contains(c.stdout.String(), "marker "+marker+"\n") {
				t.Errorf("the container restored on the other node reads %q (%v)", c.stdout.String(), err)
			}
			if _, err := c.task.Delete(ctx, client.WithProcessKill); err != nil {
				t.Fatal(err)
			}
			removeSnapshot(ctx, t, b, s.ID)
			removeSnapshot(ctx, t, a, s.ID)
		})
	}
}

// TestDiskSnapshotCRI takes a disk snapshot of a block-mode container of a
// CRI pod (the erofs snapshotter's layered rootfs, through the
// snapview-layered handler) and restores it into a container of another
// pod by the container annotation io.snapview.restore, as a kubelet would
// pass it, on both containerd versions.
func TestDiskSnapshotCRI(t *testing.T) {
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	eachVersion(t, func(t *testing.T, compat bool) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		tools, err := harness.ToolsFromEnv(compat)
		if err != nil {
			t.Fatal(err)
		}
		d, rs := startCRIDaemon(t, tools, []harness.Option{harness.WithErofsBlock(erofsBlockSize)}, []*harness.Image{suite.image}, "erofs")
		setup(t, d)
		marker := fmt.Sprintf("cri-disk-%d", time.Now().UnixNano())
		srcPod, srcCfg, srcLogs := runPodWith(ctx, t, rs, "snapview-layered", nil, &runtime.PodSandboxMetadata{Name: "disk-src", Namespace: "default", Uid: "uid-disk-src"})
		src, err := rs.CreateContainer(ctx, containerRequest(srcPod, srcCfg, "guest", blockAnn, "sh", "-c", "MARKER="+marker+"; "+diskWriteScript))
		if err != nil {
			t.Fatalf("CreateContainer: %v", err)
		}
		if _, err := rs.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: src.ContainerId}); err != nil {
			t.Fatalf("StartContainer: %v", err)
		}
		waitLog(t, filepath.Join(srcLogs, "guest.log"), "ready")
		out, errOut, code := ctlRunIn(t, d, criNamespace, nil, "snapshot", "create", src.ContainerId)
		if code != 0 {
			t.Fatalf("snapshot create: exit %d\n%s%s", code, out, errOut)
		}
		var s snapshotJSON
		if err := json.Unmarshal([]byte(out), &s); err != nil || s.Form != "disk" {
			t.Fatalf("snapshot create printed %q (%v), want a disk snapshot", out, err)
		}
		dstPod, dstCfg, dstLogs := runPodWith(ctx, t, rs, "snapview-layered", nil, &runtime.PodSandboxMetadata{Name: "disk-dst", Namespace: "default", Uid: "uid-disk-dst"})
		dst, err := rs.CreateContainer(ctx, containerRequest(dstPod, dstCfg, "restored", restoreAnn(s.ID), "sh", "-c", diskReadScript))
		if err != nil {
			t.Fatalf("CreateContainer of the restored container: %v", err)
		}
		if _, err := rs.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: dst.ContainerId}); err != nil {
			t.Fatalf("StartContainer: %v", err)
		}
		waitLog(t, filepath.Join(dstLogs, "restored.log"), "marker "+marker, "ext4=53ef", "ready")
		for _, id := range []string{src.ContainerId, dst.ContainerId} {
			if _, err := rs.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: id, Timeout: 1}); err != nil {
				t.Fatalf("StopContainer: %v", err)
			}
			if _, err := rs.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id}); err != nil {
				t.Fatalf("RemoveContainer: %v", err)
			}
		}
		if _, errOut, code := ctlRunIn(t, d, criNamespace, nil, "snapshot", "rm", s.ID); code != 0 {
			t.Fatalf("snapshot rm: exit %d: %s", code, errOut)
		}
	})
}
