// Command demovm is `make demo-vm`: in a private containerd, a container in
// snapview's block mode runs qemu, which boots the image's own kernel on the
// container's own disk; the guest writes a marker on that disk and powers
// off, and the demo reads the marker back from the container's snapshot
// once nothing runs any more. It does so twice: on the blockfile snapshotter
// (one disk), and on the erofs snapshotter in block mode, where the guest
// gets every layer of the image as a read-only disk and the container's
// writable image, and stacks the overlay itself. Then everything is removed.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"maps"
	"os"
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
}

func (vm vmRun) run(ctx context.Context, d *harness.Daemon, k *harness.GuestKernel, kvm bool, accel string) (retErr error) {
	c := d.Client()
	cimg, err := c.GetImage(ctx, ref)
	if err != nil {
		return err
	}
	specOpts := []oci.SpecOpts{oci.WithImageConfig(cimg), oci.WithAnnotations(harness.VMAnnotations()), oci.WithProcessArgs(vm.args...)}
	if kvm {
		specOpts = append(specOpts, oci.WithLinuxDevice("/dev/kvm", "rwm"))
	}
	step("running qemu (%s) in a container on the %s snapshotter with --runtime %s; %s", accel, vm.snapshotter, runtime, vm.what)
	ann := harness.VMAnnotations()
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
	if _, err := task.Delete(ctx); err != nil {
		return err
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
