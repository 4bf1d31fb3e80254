// Command demovm is `make demo-vm`: in a private containerd, a container in
// snapview's block mode runs qemu, which boots the image's own kernel on the
// container's own disk; the guest writes a marker on that disk and powers
// off, and the demo reads the marker back from the container's snapshot
// once nothing runs any more. It does so twice: on the blockfile snapshotter
// (one disk), and on the erofs snapshotter in block mode, where the guest
// gets every layer of the image as a read-only disk and the container's
// writable image, and stacks the overlay itself.
//
// The second act saves a guest's state: a guest on the erofs snapshotter
// writes its marker and powers off, `snapviewctl snapshot create` saves the
// container's writable disk as a disk snapshot (read as bytes, never
// mounted on the host), and a new container restored from it with
// io.snapview.restore boots a guest that checks its filesystem and finds
// the first guest's marker on its own disk. Then everything is removed.
package main

import (
	"bytes"
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
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/tests/e2e/harness"
)

const (
	ns      = "snapview-demo-vm"
	runtime = "io.containerd.snapview.v2"
	ref     = "docker.io/snapview/demo-vm:latest"
	id      = "demo-vm"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo-vm failed:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) {
	fmt.Printf("\n==> "+format+"\n", args...)
}

func run() (retErr error) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	k, err := harness.GuestKernelFromEnv()
	if err != nil {
		return err
	}

	step("starting a private containerd in a temporary directory (the system's containerd is not touched), its erofs snapshotter in block mode")
	runcRoot, err := os.MkdirTemp("", "snapview-demo-vm-runc-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(runcRoot)
	s, err := harness.NewSession(ctx, "the VM demo (run 'sudo make demo-vm')", "snapview-demo-vm-", false,
		harness.WithSnapviewConfig(fmt.Sprintf("Root = %q\n", runcRoot)), harness.WithLogLevel("info"), harness.WithErofsBlock("64M"))
	if err != nil {
		return err
	}
	d := s.Daemon
	defer func() {
		step("stopping the private containerd and removing %s", s.Dir)
		if err := s.Close(); err != nil && retErr == nil {
			retErr = err
		}
	}()
	fmt.Printf("    containerd %s under %s\n", d.Version, s.Dir)

	step("building the VM image: qemu from this machine, Debian's cloud kernel %s, an initrd that loads the virtio, erofs and overlay modules, a guest init", k.Version)
	img, err := harness.VMImage(ref, k, true)
	if err != nil {
		return err
	}
	archive, err := img.WriteArchiveFile(s.Dir)
	if err != nil {
		return err
	}
	if fi, err := os.Stat(archive); err == nil {
		fmt.Printf("    %s: %.1f MiB compressed, 3 layers; the same image is the monitor's root and the guest's disk\n", ref, float64(fi.Size())/(1<<20))
	}
	if _, err := d.Import(ctx, ns, &harness.Image{Ref: ref, Archive: archive}, "blockfile", "erofs"); err != nil {
		return err
	}
	ctx = harness.Context(ctx, ns)
	kvm, accel := harness.KVM(k)
	for _, vm := range []vmRun{
		{id: id, snapshotter: "blockfile", args: harness.QemuArgs(kvm), marker: harness.GuestMarkerPath,
			what: "one disk: the container's own snapshot (a copy of the image's disk image) is the guest's root disk"},
		{id: id + "-layered", snapshotter: "erofs", args: []string{"sh", "-c", harness.QemuLayeredScript(kvm)}, marker: "/upper" + harness.GuestMarkerPath, layered: true,
			what: "layered: every erofs layer of the image a read-only disk, the container's own writable image a disk; the guest stacks the overlay"},
	} {
		if err := vm.run(ctx, d, k, kvm, accel); err != nil {
			return fmt.Errorf("%s: %w", vm.id, err)
		}
	}

	if err := secondAct(ctx, d, k, kvm, accel); err != nil {
		return fmt.Errorf("second act: %w", err)
	}

	step("checking that nothing is left (leases, snapshots, mount activations, mounts, loop devices, shims)")
	if err := d.CheckLeaks(ctx); err != nil {
		return err
	}
	fmt.Println("    nothing left")
	return nil
}

// vmRun is one VM of the demo: a container of the VM image on snapshotter,
// running args, whose guest writes its marker at marker on the container's
// writable disk.
type vmRun struct {
	id, snapshotter, marker, what string
	args                          []string
	layered                       bool
	// restore is a disk snapshot the container starts from
	// (io.snapview.restore); snapshot, when set, takes one of the stopped
	// container before it is removed. console gets what the guest printed.
	restore  string
	snapshot func(id string) error
	console  *string
}

func (vm vmRun) run(ctx context.Context, d *harness.Daemon, k *harness.GuestKernel, kvm bool, accel string) (retErr error) {
	c := d.Client()
	cimg, err := c.GetImage(ctx, ref)
	if err != nil {
		return err
	}
	ann := harness.VMAnnotations()
	if vm.restore != "" {
		ann["io.snapview.restore"] = vm.restore
	}
	specOpts := []oci.SpecOpts{oci.WithImageConfig(cimg), oci.WithAnnotations(ann), oci.WithProcessArgs(vm.args...)}
	if kvm {
		specOpts = append(specOpts, oci.WithLinuxDevice("/dev/kvm", "rwm"))
	}
	step("running qemu (%s) in a container on the %s snapshotter with --runtime %s; %s", accel, vm.snapshotter, runtime, vm.what)
	for _, k := range slices.Sorted(maps.Keys(ann)) {
		fmt.Printf("    --annotation %s=%s\n", k, ann[k])
	}
	fmt.Printf("    %s\n", strings.ReplaceAll(strings.TrimSpace(strings.Join(vm.args, " ")), "\n", "\n      "))
	opts := &runtimeoptions.Options{ConfigBody: []byte("[block]\nmonitor_rootfs = \"view\"\n")}
	t0 := time.Now()
	ctr, err := c.NewContainer(ctx, vm.id,
		client.WithImage(cimg),
		client.WithSnapshotter(vm.snapshotter),
		client.WithNewSnapshot(vm.id+"-snapshot", cimg),
		client.WithRuntime(runtime, opts),
		client.WithNewSpec(specOpts...),
	)
	if err != nil {
		return err
	}
	prepared := time.Since(t0)
	defer func() {
		if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) && retErr == nil {
			retErr = err
		}
	}()
	console := &consoleWriter{booted: make(chan struct{})}
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(bytes.NewReader(nil), console, console)))
	if err != nil {
		return err
	}
	defer task.Delete(ctx, client.WithProcessKill)
	info, err := ctr.Info(ctx)
	if err != nil {
		return err
	}
	mounts, err := c.SnapshotService(vm.snapshotter).Mounts(ctx, info.SnapshotKey)
	if err != nil {
		return err
	}
	disk := mounts[0].Source
	var layers []string
	if vm.layered {
		for _, m := range mounts[1 : len(mounts)-1] {
			layers = append(layers, m.Source)
		}
	}
	before, err := sums(layers)
	if err != nil {
		return err
	}
	fmt.Printf("    the container's snapshot took %s to prepare; its writable disk: %s\n", prepared.Round(time.Millisecond), disk)
	for i, l := range layers {
		fmt.Printf("    layer %d: %s -> /dev/snapview/layers/%d (read-only)\n", i, l, i)
	}
	exit, err := task.Wait(ctx)
	if err != nil {
		return err
	}
	fmt.Println("    the guest's console:")
	started := time.Now()
	if err := task.Start(ctx); err != nil {
		return err
	}
	var bootTime time.Duration
	select {
	case <-console.booted:
		bootTime = time.Since(started)
	case <-time.After(2 * time.Minute):
		return fmt.Errorf("the guest did not boot within 2 minutes")
	}
	st := <-exit
	total := time.Since(started)
	task.IO().Wait()
	console.flush()
	if st.ExitCode() != 0 {
		return fmt.Errorf("qemu exited %d", st.ExitCode())
	}
	step("the guest powered off and qemu exited 0")
	fmt.Printf("    guest kernel: %s (the image's own /boot/vmlinuz)\n", k.Version)
	fmt.Printf("    boot time:    %s from task start to the guest running from its root, %s to power-off\n", bootTime.Round(time.Millisecond), total.Round(time.Millisecond))
	if vm.console != nil {
		*vm.console = console.all.String()
	}
	if _, err := task.Delete(ctx); err != nil {
		return err
	}
	if vm.snapshot != nil {
		return vm.snapshot(vm.id)
	}
	if vm.restore != "" {
		return nil
	}

	step("reading the marker back from the container's own writable disk, mounted read-only now that nothing runs")
	marker, err := readMarker(disk, vm.marker)
	if err != nil {
		return err
	}
	fmt.Printf("    %s\n    %s: %s\n", disk, vm.marker, strings.TrimSpace(marker))
	if vm.layered {
		after, err := sums(layers)
		if err != nil {
			return err
		}
		if !maps.Equal(before, after) {
			return fmt.Errorf("the image's layer files changed under the guest: %v, then %v", before, after)
		}
		fmt.Printf("    the %d layer files are byte for byte what they were (sha256)\n", len(layers))
	}
	return nil
}

// secondAct saves a guest's disk and starts a new guest from it: on the
// erofs snapshotter, a guest writes its marker (its boot id) and powers
// off; snapviewctl takes a disk snapshot of the stopped container; a new
// container restored from it boots a guest that checks its filesystem and
// finds the marker; the snapshot is removed.
func secondAct(ctx context.Context, d *harness.Daemon, k *harness.GuestKernel, kvm bool, accel string) error {
	ctl := os.Getenv("SNAPVIEW_CTL")
	if ctl == "" {
		return fmt.Errorf("SNAPVIEW_CTL is not set: run it through `make demo-vm`")
	}
	snapctl := func(args ...string) (string, error) {
		full := append([]string{"--address", d.Address, "--state", d.State, "--namespace", ns}, args...)
		fmt.Printf("    $ snapviewctl %s\n", strings.Join(args, " "))
		cmd := exec.CommandContext(ctx, ctl, full...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		fmt.Print(indent(stderr.String()))
		if err != nil {
			return "", fmt.Errorf("snapviewctl %v: %w", args, err)
		}
		return string(out), nil
	}
	script := []string{"sh", "-c", harness.QemuLayeredScript(kvm)}
	var first, second, snapID string
	step("second act: a guest's state saved and started again. A guest on the erofs snapshotter writes its marker and powers off")
	src := vmRun{id: id + "-saved", snapshotter: "erofs", args: script, layered: true, console: &first,
		what: "the guest writes its marker (its boot id) on its writable disk",
		snapshot: func(id string) error {
			step("snapviewctl takes a disk snapshot of the stopped container: its writable disk read as bytes (holes left out), never mounted on the host")
			out, err := snapctl("snapshot", "create", "--name", "demo-vm-warm", id)
			if err != nil {
				return err
			}
			var s struct {
				ID   string `json:"id"`
				Form string `json:"form"`
				Size int64  `json:"size"`
			}
			if err := json.Unmarshal([]byte(out), &s); err != nil {
				return fmt.Errorf("snapshot create printed %q: %w", out, err)
			}
			snapID = s.ID
			fmt.Printf("    snapshot %s, form %s, %d bytes stored\n", s.ID, s.Form, s.Size)
			ls, err := snapctl("snapshot", "ls")
			fmt.Print(indent(ls))
			return err
		}}
	if err := src.run(ctx, d, k, kvm, accel); err != nil {
		return fmt.Errorf("%s: %w", src.id, err)
	}
	wrote, ok := afterPrefix(first, harness.GuestWroteLine)
	if !ok {
		return fmt.Errorf("the first guest printed no marker")
	}
	step("a new container of the same image, restored from the snapshot: --annotation io.snapview.restore=%s", snapID)
	dst := vmRun{id: id + "-restored", snapshotter: "erofs", args: script, layered: true, restore: snapID, console: &second,
		what: "its writable disk starts as the saved one; the guest checks its filesystem and reads what is there"}
	if err := dst.run(ctx, d, k, kvm, accel); err != nil {
		return fmt.Errorf("%s: %w", dst.id, err)
	}
	found, _ := afterPrefix(second, harness.GuestFoundLine)
	fsck, _ := afterPrefix(second, harness.GuestFsckLine)
	if found != wrote {
		return fmt.Errorf("the restored guest found %q on its disk, the first guest wrote %q", found, wrote)
	}
	if !strings.HasSuffix(fsck, "check exit 0") {
		return fmt.Errorf("the restored guest's filesystem check: %q", fsck)
	}
	step("the restored guest found the first guest's marker (%s) and its filesystem checked clean (%s)", found, fsck)
	if _, err := snapctl("snapshot", "rm", snapID); err != nil {
		return err
	}
	return nil
}

// afterPrefix returns the rest of the first line of text holding prefix.
func afterPrefix(text, prefix string) (string, bool) {
	for l := range strings.Lines(text) {
		if _, after, ok := strings.Cut(l, prefix); ok {
			return strings.TrimSpace(after), true
		}
	}
	return "", false
}

func indent(s string) string {
	var b strings.Builder
	for l := range strings.Lines(s) {
		b.WriteString("    " + l)
	}
	return b.String()
}

// sums returns the sha256 of each file.
func sums(files []string) (map[string]string, error) {
	out := map[string]string{}
	for _, p := range files {
		f, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return nil, err
		}
		out[p] = hex.EncodeToString(h.Sum(nil))
	}
	return out, nil
}

// readMarker mounts the disk read-only without replaying its journal,
// reads the guest's marker at path and unmounts it.
func readMarker(disk, path string) (string, error) {
	dir, err := os.MkdirTemp("", "snapview-demo-vm-disk-")
	if err != nil {
		return "", err
	}
	defer os.Remove(dir)
	if err := mount.All([]mount.Mount{{Type: "ext4", Source: disk, Options: []string{"loop", "ro", "noload"}}}, dir); err != nil {
		return "", err
	}
	defer mount.UnmountAll(dir, unix.MNT_DETACH)
	b, err := os.ReadFile(filepath.Join(dir, path))
	return string(b), err
}

// escapes are the terminal control sequences SeaBIOS writes.
var escapes = regexp.MustCompile(`\x1b(\[[0-9;?]*[a-zA-Z]|c)`)

// consoleWriter prints the guest's console line by line, indented and
// without terminal control sequences, and signals the line that says the
// guest runs from its disk.
type consoleWriter struct {
	mu     sync.Mutex
	buf    []byte
	all    strings.Builder
	booted chan struct{}
	once   sync.Once
}

func (w *consoleWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		w.line(string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
}

func (w *consoleWriter) line(l string) {
	l = strings.TrimRight(escapes.ReplaceAllString(l, ""), "\r ")
	if l == "" {
		return
	}
	fmt.Println("    | " + l)
	w.all.WriteString(l + "\n")
	if strings.Contains(l, harness.GuestBootedLine) {
		w.once.Do(func() { close(w.booted) })
	}
}

func (w *consoleWriter) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		w.line(string(w.buf))
		w.buf = nil
	}
}

var _ io.Writer = (*consoleWriter)(nil)
