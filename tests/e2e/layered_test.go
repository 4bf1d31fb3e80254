package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// erofsBlockSize is the writable image each container gets from the erofs
// snapshotter in block mode (its default_size).
const erofsBlockSize = "64M"

// layeredDaemons are the daemons, one per containerd version, whose erofs
// snapshotter runs in block mode: started by the first test that needs
// one, stopped by TestMain.
var layeredDaemons struct {
	mu sync.Mutex
	d  map[bool]*harness.Daemon // by compat
}

// layeredDaemon returns the daemon of the newest containerd (or, with
// compat, of the oldest supported) whose erofs snapshotter runs in block
// mode, with the test image unpacked for erofs, overlayfs and blockfile.
func layeredDaemon(t *testing.T, compat bool) *harness.Daemon {
	t.Helper()
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	layeredDaemons.mu.Lock()
	defer layeredDaemons.mu.Unlock()
	if d := layeredDaemons.d[compat]; d != nil {
		return d
	}
	tools, err := harness.ToolsFromEnv(compat)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d, err := harness.StartDaemon(ctx, suite.dir, tools, harness.WithErofsBlock(erofsBlockSize),
		harness.WithEnv("SNAPVIEW_CONFIG="+filepath.Join(suite.dir, "snapview.toml")))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Import(ctx, ns, suite.image, "erofs", "overlayfs", "blockfile"); err != nil {
		d.Stop()
		t.Fatal(err)
	}
	if layeredDaemons.d == nil {
		layeredDaemons.d = map[bool]*harness.Daemon{}
	}
	layeredDaemons.d[compat] = d
	return d
}

// stopLayeredDaemons stops the daemons layeredDaemon started.
func stopLayeredDaemons() error {
	var err error
	for _, d := range layeredDaemons.d {
		if serr := d.Stop(); serr != nil {
			err = serr
		}
	}
	return err
}

// eachVersion runs f for the newest containerd and the oldest supported.
func eachVersion(t *testing.T, f func(t *testing.T, compat bool)) {
	for _, v := range []struct {
		name   string
		compat bool
	}{{"containerd-newest", false}, {"containerd-compat", true}} {
		t.Run(v.name, func(t *testing.T) { f(t, v.compat) })
	}
}

// layeredProbe is what a layered block-mode container does, a stand-in for
// a VM monitor: it reports each disk node it was given with its
// superblock's magic number, tries to write a layer disk, reports the
// params, writes $MARKER into its writable disk and checks that its root is
// writable. layeredScript then waits.
const layeredProbe = `
for d in /dev/snapview/rootfs /dev/snapview/layers/*; do
  echo "node $d $(stat -c '%F %t:%T' $d)"
done
echo "rootfs-magic $(dd if=/dev/snapview/rootfs bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')"
for d in /dev/snapview/layers/*; do
  echo "layer-magic $d $(dd if=$d bs=1 skip=1024 count=4 2>/dev/null | od -An -tx1 | tr -d ' \n')"
done
if printf x | dd of=/dev/snapview/layers/0 bs=1 seek=8192 conv=notrunc 2>/dev/null; then echo "layer written"; else echo "layer write refused"; fi
echo "params $(tr -d '\n ' < /.snapview/params.json)"
if printf '%s' "$MARKER" | dd of=/dev/snapview/rootfs bs=1M seek=62 conv=notrunc 2>/dev/null && sync; then echo "wrote marker"; fi
if touch /written-by-monitor; then echo "root writable"; fi
`

const layeredScript = layeredProbe + "echo ready\nexec sleep 300\n"

// layeredMarkerOffset is where layeredScript writes its marker: 62 MiB into
// the 64 MiB writable image, among blocks a new, empty filesystem leaves
// free.
const layeredMarkerOffset = 62 << 20

// layeredState is the part of snapview.json a layered rootfs adds.
type layeredState struct {
	blockState
	Block struct {
		Rootfs struct {
			Type   string `json:"type"`
			Source string `json:"source"`
		} `json:"rootfs"`
		Device string `json:"device"`
		Major  uint32 `json:"major"`
		Minor  uint32 `json:"minor"`
		Layers []struct {
			Path   string `json:"path"`
			Device string `json:"device"`
			Major  uint32 `json:"major"`
			Minor  uint32 `json:"minor"`
			Loop   struct {
				BackingFile string `json:"backing_file"`
			} `json:"loop"`
		} `json:"layers"`
		MonitorRootfs string `json:"monitor_rootfs"`
	} `json:"block"`
}

func readLayeredState(t *testing.T, d *harness.Daemon, id string) layeredState {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(bundleDir(d, id), "snapview.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st layeredState
	if err := json.Unmarshal(raw, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode != "block" || st.Block.Rootfs.Type != "mkfs/ext4" || len(st.Block.Layers) < 2 {
		t.Fatalf("layered block state %s", raw)
	}
	// The one-disk checks (checkNeverMounted) read the same file.
	st.blockState.Block.Rootfs.Source, st.blockState.Block.Device = st.Block.Rootfs.Source, st.Block.Device
	return st
}

// layerFiles returns the sha256 of each layer file of st.
func layerFiles(t *testing.T, st layeredState) map[string]string {
	t.Helper()
	var files []string
	for _, l := range st.Block.Layers {
		files = append(files, l.Loop.BackingFile)
	}
	return hashFiles(t, files)
}

// hashFiles returns the sha256 of each of files.
func hashFiles(t *testing.T, files []string) map[string]string {
	t.Helper()
	sums := map[string]string{}
	for _, p := range files {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		sums[p] = hex.EncodeToString(h.Sum(nil))
	}
	return sums
}

// TestLayeredBlock runs block mode on the erofs snapshotter in block mode,
// through ctr's client on both containerd versions and with each kind of
// monitor rootfs: the container gets its writable image as
// /dev/snapview/rootfs and each erofs layer read-only as
// /dev/snapview/layers/<i>, reads their superblocks, cannot write a layer,
// and its write lands in its own image; no host mount ever has the
// writable image or its loop device as its source, and the layer files
// stay byte for byte what they were.
func TestLayeredBlock(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		for _, tc := range []struct {
			name    string
			monitor func(t *testing.T) string
		}{
			{"view", func(*testing.T) string { return "view" }},
			{"host directory", monitorTree},
		} {
			t.Run(tc.name, func(t *testing.T) {
				ctx := setup(t, d)
				spy := newRuncSpy(t)
				monitor := tc.monitor(t)
				id := "layered-" + strings.ReplaceAll(tc.name, " ", "-")
				marker := "snapview-marker-" + id
				opts := &runtimeoptions.Options{ConfigBody: fmt.Appendf(nil, "BinaryName = %q\n[block]\nmonitor_rootfs = %q\n", spy.bin, monitor)}
				r, err := start(ctx, t, d, id, runOpts{
					runtime: snapviewRT, runtimeOpts: opts, snapshotter: "erofs", annotations: blockAnn,
					args: []string{"sh", "-c", layeredScript}, specOpts: []oci.SpecOpts{oci.WithEnv([]string{"MARKER=" + marker})},
				})
				if err != nil {
					t.Fatal(err)
				}
				if err := r.waitOutput("ready"); err != nil {
					t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
				}
				st := readLayeredState(t, d, id)
				before := layerFiles(t, st)
				out := r.stdout.String()
				want := []string{
					fmt.Sprintf("node /dev/snapview/rootfs block special file %x:%x", st.Block.Major, st.Block.Minor),
					"rootfs-magic 53ef",
					"layer write refused",
					`"kind":"layered"`, `"device":"/dev/snapview/rootfs"`, `"upperdir":"/upper"`, `"workdir":"/work"`,
					"wrote marker", "root writable",
				}
				for i, l := range st.Block.Layers {
					want = append(want,
						fmt.Sprintf("node %s block special file %x:%x", l.Path, l.Major, l.Minor),
						fmt.Sprintf("layer-magic /dev/snapview/layers/%d e2e1f5e0", i), // erofs, read through the disk
						fmt.Sprintf(`{"device":"/dev/snapview/layers/%d","fstype":"erofs","source":"%s","options":["ro"]}`, i, l.Device))
					if ro, err := os.ReadFile("/sys/block/" + filepath.Base(l.Device) + "/ro"); err != nil || strings.TrimSpace(string(ro)) != "1" {
						t.Errorf("layer disk %s is not a read-only loop device: %q %v", l.Device, ro, err)
					}
				}
				for _, w := range want {
					if !strings.Contains(out, w) {
						t.Errorf("container output lacks %q:\n%s", w, out)
					}
				}
				checkNeverMounted(ctx, t, d, r, st.blockState)
				checkLayeredConfig(t, spy.config(id), st)

				if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
					t.Fatal(err)
				}
				if got := readAt(t, st.Block.Rootfs.Source, layeredMarkerOffset, len(marker)); got != marker {
					t.Errorf("the container's writable image holds %q at the marker, want %q", got, marker)
				}
				if after := hashFiles(t, slices.Collect(maps.Keys(before))); !maps.Equal(before, after) {
					t.Errorf("layer files changed: %v, then %v", before, after)
				}
				if loops := harness.LoopDevices(d.Dir); len(loops) > 0 {
					t.Errorf("loop devices left after the task's delete: %v", loops)
				}
			})
		}
	})
}

// checkLayeredConfig checks the config.json runc was given: the writable
// disk with a read-write rule, each layer with a read-only one, after the
// spec's own rules.
func checkLayeredConfig(t *testing.T, path string, st layeredState) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("config.json given to runc: %v", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		t.Fatal(err)
	}
	devices := map[string]specs.LinuxDevice{}
	for _, d := range spec.Linux.Devices {
		devices[d.Path] = d
	}
	rules := map[string]string{}
	for _, r := range spec.Linux.Resources.Devices {
		if r.Allow && r.Type == "b" && r.Major != nil && r.Minor != nil {
			rules[fmt.Sprintf("%d:%d", *r.Major, *r.Minor)] = r.Access
		}
	}
	check := func(path string, major, minor uint32, access string) {
		d, ok := devices[path]
		if !ok || d.Type != "b" || d.Major != int64(major) || d.Minor != int64(minor) {
			t.Errorf("linux.devices lack %s b %d:%d: %+v", path, major, minor, spec.Linux.Devices)
		}
		if got := rules[fmt.Sprintf("%d:%d", major, minor)]; got != access {
			t.Errorf("device rule of %s (%d:%d) %q, want %q", path, major, minor, got, access)
		}
	}
	check("/dev/snapview/rootfs", st.Block.Major, st.Block.Minor, "rw")
	for _, l := range st.Block.Layers {
		check(l.Path, l.Major, l.Minor, "r")
	}
	if r := spec.Linux.Resources.Devices; len(r) == 0 || r[0].Allow {
		t.Errorf("the spec's own device rules are gone: %+v", r)
	}
}

// TestLayeredCtrRun runs a layered block-mode container with the ctr
// binary of each containerd version, as a user would.
func TestLayeredCtrRun(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		ctx := setup(t, d)
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		out, err := exec.CommandContext(cctx, d.Tools.Ctr(), "--address", d.Address, "--namespace", ns,
			"run", "--rm", "--snapshotter", "erofs", "--runtime", snapviewRT, "--annotation", "io.snapview.mode=block",
			testImageID, "layered-ctr", "sh", "-c", layeredProbe).CombinedOutput()
		if err != nil {
			t.Fatalf("ctr run: %v\n%s", err, out)
		}
		for _, want := range []string{"rootfs-magic 53ef", "layer-magic /dev/snapview/layers/0 e2e1f5e0", "layer-magic /dev/snapview/layers/1 e2e1f5e0", "layer write refused", `"upperdir":"/upper"`} {
			if !strings.Contains(string(out), want) {
				t.Errorf("ctr run output lacks %q:\n%s", want, out)
			}
		}
	})
}

// TestLayeredViewMode runs containers that do not hand the erofs
// snapshotter's block-mode rootfs to a guest (view mode with a boot
// artifact, and mode off) on both containerd versions: snapview claimed
// their mounts from containerd, so the shim has containerd's mount manager
// perform them under the task's id, and the container runs as under runc,
// on an overlay it can write; the activation is gone once the task is.
func TestLayeredViewMode(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		for _, tc := range []struct {
			name     string
			ann      map[string]string
			wantMode string
			script   string
		}{
			{"view", map[string]string{"io.snapview.boot.kernel": harness.KernelPath}, "view",
				`echo "kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)"; `},
			{"off", map[string]string{"io.snapview.mode": "off"}, "none", ""},
		} {
			t.Run(tc.name, func(t *testing.T) {
				ctx := setup(t, d)
				id := "layered-mode-" + tc.name
				r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: "erofs", annotations: tc.ann,
					args: []string{"sh", "-c", tc.script + `echo "rootfs $(stat -f -c %t /)"; echo data > /written && cat /written; echo ready; exec sleep 300`}})
				if err != nil {
					t.Fatal(err)
				}
				if err := r.waitOutput("ready"); err != nil {
					t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
				}
				out := r.stdout.String()
				want := []string{"rootfs 794c7630", "data"} // overlayfs's magic
				if tc.wantMode == "view" {
					want = append(want, "kernel "+suite.image.Files[harness.KernelPath])
				}
				for _, w := range want {
					if !strings.Contains(out, w) {
						t.Errorf("container output lacks %q:\n%s", w, out)
					}
				}
				raw, err := os.ReadFile(filepath.Join(bundleDir(d, id), "snapview.json"))
				if err != nil {
					t.Fatal(err)
				}
				var st struct {
					Mode             string `json:"mode"`
					RootfsActivation string `json:"rootfs_activation"`
				}
				if err := json.Unmarshal(raw, &st); err != nil || st.Mode != tc.wantMode || st.RootfsActivation != id {
					t.Fatalf("state %s: %v", raw, err)
				}
				ai, err := d.Client().MountManager().Info(ctx, id)
				if err != nil || ai.Labels["containerd.io/gc.bref.container"] != id || ai.Labels["snapview.io/container"] != id {
					t.Fatalf("mount activation of the rootfs: %+v %v", ai, err)
				}
				if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
					t.Fatal(err)
				}
				if _, err := d.Client().MountManager().Info(ctx, id); err == nil {
					t.Error("the rootfs activation outlived the task")
				}
			})
		}
	})
}

// TestLayeredRefused checks what block mode refuses on the erofs
// snapshotter: each fails the create with a snapview: error that says
// what was wrong, and leaves nothing behind.
func TestLayeredRefused(t *testing.T) {
	for _, tc := range []struct {
		name         string
		layered      bool // on the erofs snapshotter in block mode, else without
		viewSnapshot bool
		specOpts     []oci.SpecOpts
		want         []string
	}{
		{name: "erofs without block mode", want: []string{"block-backed", "the erofs snapshotter is not in block mode (its default_size is not set)"}},
		{name: "read-only view rootfs", layered: true, viewSnapshot: true, want: []string{"block-backed", "read-only (a view of the image)"}},
		{name: "user namespace", layered: true, specOpts: []oci.SpecOpts{oci.WithUserNamespace(
			[]specs.LinuxIDMapping{{ContainerID: 0, HostID: 100000, Size: 65536}}, []specs.LinuxIDMapping{{ContainerID: 0, HostID: 100000, Size: 65536}})},
			want: []string{"user namespace"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := suite.daemon
			if tc.layered {
				d = layeredDaemon(t, false)
			}
			ctx := setup(t, d)
			id := "layered-refused-" + strings.ReplaceAll(tc.name, " ", "-")
			refused(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: "erofs", viewSnapshot: tc.viewSnapshot,
				annotations: blockAnn, specOpts: tc.specOpts, args: []string{"true"}}, append([]string{"snapview: block mode"}, tc.want...)...)
		})
	}
}

// TestLayeredShimKilled kills the shim of a running layered block-mode
// container with SIGKILL, on both containerd versions, and deletes the
// task and container as a user would: containerd's `delete` action must
// leave nothing, no layer disk's loop device included.
func TestLayeredShimKilled(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		ctx := setup(t, d)
		id := "layered-killed"
		r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: "erofs", annotations: blockAnn, args: []string{"sleep", "300"}})
		if err != nil {
			t.Fatal(err)
		}
		st := readLayeredState(t, d, id)
		r.killShimAndDelete(ctx, t, d, id)
		if err := r.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
			t.Fatal(err)
		}
		t.Logf("writable disk %s on %s, %d layer disks", st.Block.Device, st.Block.Rootfs.Source, len(st.Block.Layers))
	})
}

// TestLayeredCRI runs a pod through containerd's CRI plugin, on both
// containerd versions, with a runtime handler whose snapshotter is erofs in
// block mode: the pause container has no view, so snapview has the mount
// manager perform its rootfs mounts; a block-mode container gets its
// layers as read-only disks and its writable image, never mounted on the
// host; a view-mode container beside it runs as under runc.
func TestLayeredCRI(t *testing.T) {
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
		d, rs := startCRIDaemon(t, tools, []harness.Option{harness.WithErofsBlock(erofsBlockSize)}, []*harness.Image{suite.image}, "overlayfs", "erofs")
		setup(t, d)

		podID, podConfig, logDir := runPod(ctx, t, rs, "snapview-layered", nil)
		raw, err := os.ReadFile(filepath.Join(d.State, "io.containerd.runtime.v2.task", criNamespace, podID, "snapview.json"))
		if err != nil || !strings.Contains(string(raw), `"mode": "none"`) || !strings.Contains(string(raw), `"rootfs_activation": "`+podID+`"`) {
			t.Errorf("the pause container's state %s: %v", raw, err)
		}
		ids := map[string]string{}
		for _, c := range []struct {
			name string
			ann  map[string]string
			cmd  string
			want []string
		}{
			{"guest", blockAnn, layeredScript, []string{"rootfs-magic 53ef", "layer-magic /dev/snapview/layers/1 e2e1f5e0", "layer write refused", "root writable", "ready"}},
			{"app", map[string]string{"io.snapview.boot.kernel": harness.KernelPath},
				`echo "kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)"; echo data > /written && echo ready; exec sleep 300`,
				[]string{"kernel " + suite.image.Files[harness.KernelPath], "ready"}},
		} {
			ctr, err := rs.CreateContainer(ctx, containerRequest(podID, podConfig, c.name, c.ann, "sh", "-c", c.cmd))
			if err != nil {
				t.Fatalf("CreateContainer %s: %v", c.name, err)
			}
			if _, err := rs.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: ctr.ContainerId}); err != nil {
				t.Fatalf("StartContainer %s: %v", c.name, err)
			}
			waitLog(t, filepath.Join(logDir, c.name+".log"), c.want...)
			ids[c.name] = ctr.ContainerId
		}

		raw, err = os.ReadFile(filepath.Join(d.State, "io.containerd.runtime.v2.task", criNamespace, ids["guest"], "snapview.json"))
		if err != nil {
			t.Fatal(err)
		}
		var st layeredState
		if err := json.Unmarshal(raw, &st); err != nil || st.Mode != "block" || len(st.Block.Layers) != 2 {
			t.Fatalf("state of the block-mode container %s: %v", raw, err)
		}
		backed := map[string]bool{st.Block.Rootfs.Source: true, st.Block.Device: true}
		mounts, err := mountinfo.GetMounts(func(m *mountinfo.Info) (bool, bool) { return !backed[m.Source], false })
		if err != nil || len(mounts) > 0 {
			t.Errorf("the pod's writable disk is mounted on the host: %v %v", mounts, err)
		}
		for _, name := range []string{"guest", "app"} {
			if _, err := rs.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: ids[name], Timeout: 1}); err != nil {
				t.Fatalf("StopContainer %s: %v", name, err)
			}
			if _, err := rs.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: ids[name]}); err != nil {
				t.Fatalf("RemoveContainer %s: %v", name, err)
			}
		}
	})
}
