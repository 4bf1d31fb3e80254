package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// blockScript is the process of a block-mode container, a stand-in for a
// VM monitor: it reports the device node it was given, the ext4 magic read
// from the device's superblock, the bound kernel and the params, writes
// $MARKER into the device at markerOffset, checks that its own root is
// writable, and waits.
const blockScript = `
dev=/dev/snapview/rootfs
echo "node $(stat -c '%F %t:%T' $dev)"
echo "magic $(dd if=$dev bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')"
echo "kernel $(sha256sum < /.snapview/boot/kernel | cut -c1-64)"
echo "params $(tr -d '\n ' < /.snapview/params.json)"
if printf '%s' "$MARKER" | dd of=$dev bs=1M seek=380 conv=notrunc 2>/dev/null && sync; then echo "wrote marker"; fi
if touch /written-by-monitor; then echo "root writable"; fi
echo ready
exec sleep 300
`

// markerOffset is where blockScript writes its marker: 380 MiB into the
// 384 MiB blockfile disk, in the last block group, whose blocks the small
// test image leaves free, so the filesystem is not damaged.
const markerOffset = 380 << 20

var blockAnn = map[string]string{"io.snapview.mode": "block", "io.snapview.boot.kernel": harness.KernelPath}

// blockState is the part of snapview.json block mode adds.
type blockState struct {
	Mode   string `json:"mode"`
	Mounts []struct {
		Source string `json:"source"`
	} `json:"mounts"`
	Rootfs struct {
		Kind   string `json:"kind"`
		Source string `json:"source"`
		Device string `json:"device"`
	} `json:"rootfs"`
	Block struct {
		Rootfs struct {
			Type    string   `json:"type"`
			Source  string   `json:"source"`
			Options []string `json:"options"`
		} `json:"rootfs"`
		Device        string `json:"device"`
		Major         uint32 `json:"major"`
		Minor         uint32 `json:"minor"`
		MonitorRootfs string `json:"monitor_rootfs"`
		Loop          *struct {
			BackingFile string `json:"backing_file"`
		} `json:"loop"`
	} `json:"block"`
}

func readBlockState(t *testing.T, d *harness.Daemon, id string) blockState {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(bundleDir(d, id), "snapview.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st blockState
	if err := json.Unmarshal(raw, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode != "block" || st.Block.Loop == nil || st.Block.Loop.BackingFile != st.Block.Rootfs.Source || st.Block.Major != 7 {
		t.Fatalf("block state %s", raw)
	}
	return st
}

// monitorTree writes a host directory holding a busybox root, as an
// operator would provide a monitor and its libraries.
func monitorTree(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	l, err := harness.BusyboxLayer([]string{"sh", "cat", "echo", "sleep", "stat", "dd", "od", "tr", "sha256sum", "cut", "touch", "sync", "printf", "grep"})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.WriteTo(dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestBlockMode runs block mode on the blockfile snapshotter with each kind
// of monitor rootfs. The container gets its own snapshot as a block device
// (the image's ext4, readable and writable, its writes landing in its own
// snapshot file and never in the image), the kernel bound from the image's
// view, and a writable root over a source that stays untouched. All the
// while, nothing on the host mounts its snapshot or loop device.
func TestBlockMode(t *testing.T) {
	d := suite.daemon
	for _, tc := range []struct {
		name    string
		monitor func(t *testing.T) string
		// chosen: the configuration's default stays "view", and the
		// container chooses the monitor rootfs by its name in
		// [block.monitors] (annotation io.snapview.monitor-rootfs).
		chosen bool
	}{
		{"view", func(*testing.T) string { return "view" }, false},
		{"host directory", monitorTree, false},
		{"host directory chosen by name", monitorTree, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := setup(t, d)
			spy := newRuncSpy(t)
			monitor := tc.monitor(t)
			id := "block-" + strings.ReplaceAll(tc.name, " ", "-")
			marker := "snapview-marker-" + id
			cfg := fmt.Sprintf("BinaryName = %q\n[block]\nmonitor_rootfs = %q\n", spy.bin, monitor)
			ann := blockAnn
			if tc.chosen {
				cfg = fmt.Sprintf("BinaryName = %q\n[block.monitors]\noperator = %q\n", spy.bin, monitor)
				ann = maps.Clone(blockAnn)
				ann["io.snapview.monitor-rootfs"] = "operator"
			}
			opts := &runtimeoptions.Options{ConfigBody: []byte(cfg)}
			r, err := start(ctx, t, d, id, runOpts{
				runtime: snapviewRT, runtimeOpts: opts, snapshotter: "blockfile", annotations: ann,
				args: []string{"sh", "-c", blockScript}, specOpts: []oci.SpecOpts{oci.WithEnv([]string{"MARKER=" + marker})},
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := r.waitOutput("ready"); err != nil {
				t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
			}
			st := readBlockState(t, d, id)
			out := r.stdout.String()
			for _, want := range []string{
				fmt.Sprintf("node block special file %x:%x", st.Block.Major, st.Block.Minor),
				"magic 53ef", // ext4 superblock, read through the device
				"kernel " + suite.image.Files[harness.KernelPath],
				`"kind":"block"`, `"device":"/dev/snapview/rootfs"`, `"source":"` + st.Block.Device + `"`,
				"wrote marker",
				"root writable",
			} {
				if !strings.Contains(out, want) {
					t.Errorf("container output lacks %q:\n%s", want, out)
				}
			}
			if st.Block.MonitorRootfs != monitor {
				t.Errorf("monitor rootfs %q, want %q", st.Block.MonitorRootfs, monitor)
			}
			checkNeverMounted(ctx, t, d, r, st)
			checkBlockConfig(t, spy.config(id), st)
			if monitor != "view" {
				if _, err := os.Stat(filepath.Join(monitor, "written-by-monitor")); err == nil {
					t.Error("the container wrote into the host monitor directory")
				}
			}

			snapshotFile, viewFile := st.Block.Rootfs.Source, st.Mounts[0].Source
			if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
				t.Fatal(err)
			}
			if got := readAt(t, snapshotFile, markerOffset, len(marker)); got != marker {
				t.Errorf("the container's snapshot file holds %q at the marker, want %q", got, marker)
			}
			if got := readAt(t, viewFile, markerOffset, len(marker)); got == marker {
				t.Error("the container's write landed in the image's own file")
			}
			if loops := harness.LoopDevices(filepath.Dir(snapshotFile)); len(loops) > 0 {
				t.Errorf("loop devices left after the task's delete: %v", loops)
			}
		})
	}
}

// checkNeverMounted checks the double-mount hazard while a block-mode
// container runs: the snapshot file is bound to exactly the loop device
// snapview recorded, and no mount in the test's, containerd's, the shim's
// or the container's mount namespace has the file, or any loop device bound
// to it, as its source.
func checkNeverMounted(ctx context.Context, t *testing.T, d *harness.Daemon, r *running, st blockState) {
	t.Helper()
	file, dev := st.Block.Rootfs.Source, st.Block.Device
	var bound []string
	backed := map[string]bool{file: true, dev: true} // what no mount may have as its source
	for _, l := range harness.LoopDevices(filepath.Dir(file)) {
		if loop, ok := strings.CutSuffix(l, " -> "+file); ok {
			bound = append(bound, l)
			backed[loop] = true
		}
	}
	if len(bound) != 1 || !strings.HasPrefix(bound[0], dev+" ") {
		t.Errorf("loop devices bound to the snapshot file: %v, want %s alone", bound, dev)
	}
	pids := map[string]int{"this test": os.Getpid(), "the container": int(r.task.Pid())}
	for _, p := range harness.ShimPids(d.Address, r.ctr.ID()) {
		pids["the shim"] = p
	}
	if cmd := d.Pid(); cmd > 0 {
		pids["containerd"] = cmd
	}
	for who, pid := range pids {
		f, err := os.Open(fmt.Sprintf("/proc/%d/mountinfo", pid))
		if err != nil {
			t.Errorf("mountinfo of %s: %v", who, err)
			continue
		}
		infos, err := mountinfo.GetMountsFromReader(f, nil)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range infos {
			if backed[m.Source] {
				t.Errorf("%s mounts the container's disk: %s on %s (%s)", who, m.Source, m.Mountpoint, m.FSType)
			}
		}
	}
}

// checkBlockConfig checks the config.json runc was given: the device at
// /dev/snapview/rootfs with the recorded numbers, the cgroup rule that
// allows it after the spec's own rules, and the block params annotation.
func checkBlockConfig(t *testing.T, path string, st blockState) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("config.json given to runc: %v", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, dev := range spec.Linux.Devices {
		if dev.Path == "/dev/snapview/rootfs" {
			found = dev.Type == "b" && dev.Major == int64(st.Block.Major) && dev.Minor == int64(st.Block.Minor)
		}
	}
	if !found {
		t.Errorf("linux.devices %+v lack /dev/snapview/rootfs b %d:%d", spec.Linux.Devices, st.Block.Major, st.Block.Minor)
	}
	rules := spec.Linux.Resources.Devices
	if len(rules) < 2 || rules[0].Allow {
		t.Errorf("the spec's own device rules are gone: %+v", rules)
	} else if last := rules[len(rules)-1]; !last.Allow || last.Type != "b" || *last.Major != int64(st.Block.Major) || *last.Minor != int64(st.Block.Minor) || last.Access != "rw" {
		t.Errorf("last device rule %+v, want allow b %d:%d rw", last, st.Block.Major, st.Block.Minor)
	}
	var params map[string]any
	if err := json.Unmarshal([]byte(spec.Annotations["io.snapview.rootfs.params"]), &params); err != nil || params["kind"] != "block" || params["device"] != "/dev/snapview/rootfs" {
		t.Errorf("rootfs params %q: %v", spec.Annotations["io.snapview.rootfs.params"], err)
	}
}

func readAt(t *testing.T, path string, off int64, n int) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return string(bytes.TrimRight(b, "\x00"))
}

// TestBlockRefused checks that every rootfs or spec block mode cannot serve
// fails the create with a snapview: error that says what was wrong, and
// leaves nothing behind.
func TestBlockRefused(t *testing.T) {
	d := suite.daemon
	for _, tc := range []struct {
		name         string
		snapshotter  string
		viewSnapshot bool
		specOpts     []oci.SpecOpts
		config       string
		annotations  map[string]string
		want         []string
	}{
		{name: "overlay rootfs", snapshotter: "overlayfs", want: []string{"block mode (annotation io.snapview.mode) needs a block-backed rootfs", "an overlay mount"}},
		{name: "directory rootfs", snapshotter: "native", want: []string{"block-backed", "(a directory)"}},
		// snapview claims the erofs snapshotter's mounts from containerd,
		// so they arrive unperformed; without block mode (no default_size)
		// they are no disks (TestLayeredRefused has the message).
		{name: "erofs rootfs", snapshotter: "erofs", want: []string{"block-backed", "it is "}},
		{name: "read-only view rootfs", snapshotter: "blockfile", viewSnapshot: true, want: []string{"block-backed", "read-only"}},
		{name: "user namespace", snapshotter: "blockfile", specOpts: []oci.SpecOpts{oci.WithUserNamespace(
			[]specs.LinuxIDMapping{{ContainerID: 0, HostID: 100000, Size: 65536}}, []specs.LinuxIDMapping{{ContainerID: 0, HostID: 100000, Size: 65536}})},
			want: []string{"user namespace"}},
		{name: "missing monitor rootfs", snapshotter: "blockfile", config: "[block]\nmonitor_rootfs = \"/nonexistent/monitor\"\n", want: []string{`block.monitor_rootfs "/nonexistent/monitor"`}},
		{name: "monitor rootfs not offered", snapshotter: "blockfile", config: "[block.monitors]\nqemu = \"/opt/qemu\"\n",
			annotations: map[string]string{"io.snapview.monitor-rootfs": "firecracker"},
			want:        []string{`annotation io.snapview.monitor-rootfs="firecracker"`, "offers no monitor rootfs of that name; choose one of view, qemu"}},
		{name: "monitor rootfs as a host path", snapshotter: "blockfile", annotations: map[string]string{"io.snapview.monitor-rootfs": "/usr"},
			want: []string{"io.snapview.monitor-rootfs", "never a path"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := setup(t, d)
			id := "block-refused-" + strings.ReplaceAll(tc.name, " ", "-")
			var opts any
			if tc.config != "" {
				opts = &runtimeoptions.Options{ConfigBody: []byte(tc.config)}
			}
			ann := maps.Clone(blockAnn)
			maps.Copy(ann, tc.annotations)
			refused(ctx, t, d, id, runOpts{runtime: snapviewRT, runtimeOpts: opts, snapshotter: tc.snapshotter, viewSnapshot: tc.viewSnapshot,
				annotations: ann, specOpts: tc.specOpts, args: []string{"true"}}, tc.want...)
		})
	}
}

// TestBlockShimKilled kills the shim of a running block-mode container
// with SIGKILL and deletes the task as a user would: containerd's `delete`
// action must leave nothing, the loop device included.
func TestBlockShimKilled(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	id := "block-killed"
	r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: "blockfile", annotations: blockAnn, args: []string{"sleep", "300"}})
	if err != nil {
		t.Fatal(err)
	}
	st := readBlockState(t, d, id)
	r.killShimAndDelete(ctx, t, d, id)
	if err := r.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
		t.Fatal(err)
	}
	// The leak check, which waits for the `delete` action, finds no loop
	// device on containerd's files; this names the one that mattered.
	t.Logf("loop device %s (%d:%d) on %s", st.Block.Device, st.Block.Major, st.Block.Minor, st.Block.Rootfs.Source)
}

// TestBlockModeRootOnDisk writes 64 MiB to the root of a block-mode
// container (the monitor rootfs): the writes land on containerd's root
// filesystem, in the task's working directory, where a node counts a
// container's writes, not on its state tmpfs (/run on a node), which one
// container could fill for every other shim, bundle and socket; and they
// go with the task.
func TestBlockModeRootOnDisk(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	id := "block-root-on-disk"
	r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: "blockfile", annotations: blockAnn,
		args: []string{"sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=64 2>/dev/null && sync && echo ready; exec sleep 300"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.waitOutput("ready"); err != nil {
		t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
	}
	upper := filepath.Join(bundleDir(d, id), "work", "snapview", "upper")
	fi, err := os.Stat(filepath.Join(upper, "fill"))
	if err != nil || fi.Size() != 64<<20 {
		t.Fatalf("the container's root writes are not in %s: %v %v", upper, fi, err)
	}
	var upperFS, stateFS, rootFS unix.Statfs_t
	for p, st := range map[string]*unix.Statfs_t{upper: &upperFS, d.State: &stateFS, d.Root: &rootFS} {
		if err := unix.Statfs(p, st); err != nil {
			t.Fatal(err)
		}
	}
	if upperFS.Type == unix.TMPFS_MAGIC || upperFS.Fsid != rootFS.Fsid || upperFS.Fsid == stateFS.Fsid {
		t.Errorf("the monitor rootfs's writes are on filesystem %x (fsid %v); containerd's root is %v, its state (tmpfs) %v", upperFS.Type, upperFS.Fsid, rootFS.Fsid, stateFS.Fsid)
	}
	if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(upper); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the monitor rootfs's writes outlived the task: %v", err)
	}
}
