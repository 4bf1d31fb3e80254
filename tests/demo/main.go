// Command demo is `make demo`: it starts a private containerd under a
// temporary directory (never the system's), imports a small demo image, runs
// a container with the snapview runtime, shows what snapview did, and
// removes everything again.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// demoScript is the container's process: a stand-in for a VM monitor that
// reads its guest's kernel and config from the bound artifacts.
const demoScript = `echo "hello from a snapview container"
echo overwritten > /boot/vmlinux
echo "my own /boot/vmlinux now holds: $(cat /boot/vmlinux)"
echo "bound kernel /.snapview/boot/kernel: $(wc -c < /.snapview/boot/kernel) bytes, sha256 $(sha256sum < /.snapview/boot/kernel | cut -c1-16)…"
echo "bound config /.snapview/boot/config: $(cat /.snapview/boot/config)"
if (echo x > /.snapview/boot/kernel) 2>/dev/null; then echo "writing the bound kernel: allowed (!)"; else echo "writing the bound kernel: refused (read-only)"; fi
if rm /.snapview/boot/config 2>/dev/null; then echo "removing the bound config: allowed (!)"; else echo "removing the bound config: refused"; fi
echo "params: $(cat /.snapview/params.json | tr -d '\n' | tr -s ' ')"
echo ready
exec sleep 300`

const (
	ns      = "snapview-demo"
	runtime = "io.containerd.snapview.v2"
	ref     = "docker.io/snapview/demo:latest"
	id      = "demo"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) {
	fmt.Printf("\n==> "+format+"\n", args...)
}

func run() (retErr error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	step("starting a private containerd in a temporary directory (the system's containerd is not touched)")
	// The demo's snapview configuration keeps runc's state in the private
	// directory too, not in the system's /run/containerd/runc.
	runcRoot, err := os.MkdirTemp("", "snapview-demo-runc-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(runcRoot)
	s, err := harness.NewSession(ctx, "the demo (run 'sudo make demo')", "snapview-demo-", false, harness.WithSnapviewConfig(fmt.Sprintf("Root = %q\n", runcRoot)))
	if err != nil {
		return err
	}
	d, dir := s.Daemon, s.Dir
	defer func() {
		step("stopping the private containerd and removing %s", dir)
		if err := s.Close(); err != nil && retErr == nil {
			retErr = err
		}
	}()
	fmt.Printf("    under %s\n", dir)

	step("building a demo image (static busybox + a guest kernel, initrd and config under /boot and /etc/snapview)")
	img, err := harness.BuildImage(dir, harness.ImageSpec{Ref: ref, KernelSize: 4 << 20})
	if err != nil {
		return err
	}
	fmt.Printf("    containerd %s, snapshotters %s, runtime %s\n", d.Version, strings.Join(d.Snapshotters, ", "), runtime)

	step("importing %s", ref)
	cimg, err := d.Import(ctx, ns, img)
	if err != nil {
		return err
	}
	ctx = harness.Context(ctx, ns)
	c := d.Client()

	step("running a container with --runtime %s and boot-artifact annotations; it overwrites its own /boot/vmlinux", runtime)
	ann := map[string]string{
		"io.snapview.boot.kernel": "/boot/vmlinux",
		"io.snapview.boot.config": "/etc/snapview/config.json",
	}
	for k, v := range ann {
		fmt.Printf("    --annotation %s=%s\n", k, v)
	}
	ctr, task, cleanup, err := runUntilReady(ctx, c, cimg, id, "overlayfs", ann, demoScript)
	if err != nil {
		return err
	}
	defer func() {
		if err := cleanup(); err != nil && retErr == nil {
			retErr = err
		}
	}()

	step("while it runs, snapview holds a read-only view of its image")
	ls, err := c.LeasesService().List(ctx, `labels."snapview.io/container"==`+id)
	if err != nil {
		return err
	}
	for _, l := range ls {
		fmt.Printf("    lease     %s  labels %v\n", l.ID, l.Labels)
	}
	vi, err := c.SnapshotService("overlayfs").Stat(ctx, "snapview/"+id)
	if err != nil {
		return err
	}
	fmt.Printf("    view      %s  kind %s, parent %.19s…  (the image's top layer)\n", vi.Name, vi.Kind, vi.Parent)
	bundle := filepath.Join(d.State, "io.containerd.runtime.v2.task", ns, id)
	st, err := os.ReadFile(filepath.Join(bundle, "snapview.json"))
	if err != nil {
		return err
	}
	var state struct {
		Mountpoint string          `json:"mountpoint"`
		Rootfs     json.RawMessage `json:"rootfs"`
	}
	if err := json.Unmarshal(st, &state); err != nil {
		return err
	}
	fmt.Printf("    mount     %s (read-only)\n", state.Mountpoint)
	fmt.Printf("    state     %s\n", filepath.Join(bundle, "snapview.json"))
	spec, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return err
	}
	var cfg struct {
		Annotations map[string]string `json:"annotations"`
	}
	if err := json.Unmarshal(spec, &cfg); err != nil {
		return err
	}
	fmt.Println("    config.json annotations runc was given:")
	for _, k := range []string{"io.snapview.view.snapshotter", "io.snapview.view.key", "io.snapview.view.lease", "io.snapview.view.mountpoint", "io.snapview.bound.kernel", "io.snapview.bound.config", "io.snapview.rootfs.params"} {
		fmt.Printf("      %s = %s\n", k, cfg.Annotations[k])
	}

	step("the container changed its copy; the view is still the image")
	inContainer, err := exec(ctx, task, "head", "-c", "20", "/boot/vmlinux")
	if err != nil {
		return err
	}
	fmt.Printf("    inside the container: /boot/vmlinux = %q\n", inContainer)
	data, err := os.ReadFile(filepath.Join(state.Mountpoint, "boot/vmlinux"))
	if err != nil {
		return err
	}
	sum := sha256.Sum256(data)
	fmt.Printf("    in the view:          /boot/vmlinux = %d bytes, sha256 %x… (as in the image: %v)\n",
		len(data), sum[:8], hex.EncodeToString(sum[:]) == img.Files["/boot/vmlinux"])
	if err := os.WriteFile(filepath.Join(state.Mountpoint, "boot/vmlinux"), []byte("x"), 0o644); err != nil {
		fmt.Printf("    writing into the view from the host: %v\n", err)
	} else {
		return fmt.Errorf("the view is writable")
	}

	step("deleting the task and the container")
	if _, err := task.Delete(ctx, client.WithProcessKill); err != nil {
		return err
	}
	if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
		return err
	}

	step("checking that nothing is left (leases, snapshots, mounts, loop devices, shims)")
	if err := d.CheckLeaks(ctx); err != nil {
		return err
	}
	fmt.Println("    nothing left")

	if err := demoBlock(ctx, d, cimg); err != nil {
		return err
	}
	step("checking again that nothing is left")
	if err := d.CheckLeaks(ctx); err != nil {
		return err
	}
	fmt.Println("    nothing left")
	return nil
}

// blockScript is the block-mode container's process, standing in for a VM
// monitor: it looks at the disk it was given and at the kernel bound from
// the image, as a monitor would before booting a guest.
const blockScript = `dev=/dev/snapview/rootfs
echo "disk $dev: $(stat -c '%F, device %t:%T' $dev)"
echo "ext4 superblock magic read from it: 0x$(dd if=$dev bs=1 skip=1081 count=1 2>/dev/null | od -An -tx1 | tr -d ' ')$(dd if=$dev bs=1 skip=1080 count=1 2>/dev/null | od -An -tx1 | tr -d ' ') (0xef53 is ext4)"
echo "guest kernel /.snapview/boot/kernel: $(wc -c < /.snapview/boot/kernel) bytes from the image"
echo "params: $(tr -d '\n' < /.snapview/params.json | tr -s ' ')"
echo "a monitor would now run: qemu-system-x86_64 -kernel /.snapview/boot/kernel -drive file=$dev,format=raw,if=virtio ..."
echo ready
exec sleep 300`

// demoBlock runs a block-mode container on the blockfile snapshotter: its
// own snapshot reaches it as a block device, and is never mounted on the
// host.
func demoBlock(ctx context.Context, d *harness.Daemon, img client.Image) (retErr error) {
	const id = "demo-block"
	step("block mode: a container on the blockfile snapshotter gets its own disk as a block device, never mounted on the host")
	ann := map[string]string{"io.snapview.mode": "block", "io.snapview.boot.kernel": "/boot/vmlinux"}
	for k, v := range ann {
		fmt.Printf("    --annotation %s=%s\n", k, v)
	}
	ctr, task, cleanup, err := runUntilReady(ctx, d.Client(), img, id, "blockfile", ann, blockScript)
	if err != nil {
		return err
	}
	defer func() {
		if err := cleanup(); err != nil && retErr == nil {
			retErr = err
		}
	}()

	step("on the host")
	bundle := filepath.Join(d.State, "io.containerd.runtime.v2.task", ns, id)
	raw, err := os.ReadFile(filepath.Join(bundle, "snapview.json"))
	if err != nil {
		return err
	}
	var st struct {
		Block struct {
			Rootfs struct {
				Source string `json:"source"`
			} `json:"rootfs"`
			Device        string `json:"device"`
			Major         uint32 `json:"major"`
			Minor         uint32 `json:"minor"`
			MonitorRootfs string `json:"monitor_rootfs"`
		} `json:"block"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return err
	}
	fmt.Printf("    the container's snapshot %s\n", st.Block.Rootfs.Source)
	fmt.Printf("    is attached to %s (%d:%d), held open by the shim, and passed in as /dev/snapview/rootfs\n", st.Block.Device, st.Block.Major, st.Block.Minor)
	mounted, err := mountinfo.GetMounts(func(m *mountinfo.Info) (bool, bool) {
		return m.Source != st.Block.Device && m.Source != st.Block.Rootfs.Source, false
	})
	if err != nil {
		return err
	}
	fmt.Printf("    host mounts of that disk: %d (it is never mounted on the host)\n", len(mounted))
	fmt.Printf("    the container's root is an overlay over its image's read-only view (block.monitor_rootfs = %q)\n", st.Block.MonitorRootfs)

	step("deleting the block-mode task and container: the loop device goes with them")
	if _, err := task.Delete(ctx, client.WithProcessKill); err != nil {
		return err
	}
	return ctr.Delete(ctx, client.WithSnapshotCleanup)
}

// runUntilReady runs script in a new container id of img on snapshotter sn
// with snapview and annotations ann, waits until it prints "ready", and
// shows its output. cleanup deletes the task and the container, whatever
// the caller already deleted.
func runUntilReady(ctx context.Context, c *client.Client, img client.Image, id, sn string, ann map[string]string, script string) (_ client.Container, _ client.Task, cleanup func() error, retErr error) {
	ctr, err := c.NewContainer(ctx, id,
		client.WithImage(img),
		client.WithSnapshotter(sn),
		client.WithNewSnapshot(id+"-snapshot", img),
		client.WithRuntime(runtime, nil),
		client.WithNewSpec(oci.WithImageConfig(img), oci.WithAnnotations(ann), oci.WithProcessArgs("sh", "-c", script)),
	)
	if err != nil {
		return nil, nil, nil, err
	}
	var task client.Task
	cleanup = func() error {
		if task != nil {
			if _, err := task.Delete(ctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
				return err
			}
		}
		if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		return nil
	}
	defer func() {
		if retErr != nil {
			_ = cleanup()
		}
	}()
	out := &harness.SafeBuffer{}
	if task, err = ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(bytes.NewReader(nil), out, os.Stderr))); err != nil {
		return nil, nil, nil, err
	}
	if err := task.Start(ctx); err != nil {
		return nil, nil, nil, err
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(out.String(), "ready"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			return nil, nil, nil, fmt.Errorf("container %s did not start: %q", id, out.String())
		}
	}
	for l := range strings.SplitSeq(strings.TrimSpace(out.String()), "\n") {
		fmt.Println("    | " + l)
	}
	return ctr, task, cleanup, nil
}

// exec runs args in the task and returns its output.
func exec(ctx context.Context, task client.Task, args ...string) (string, error) {
	spec, err := task.Spec(ctx)
	if err != nil {
		return "", err
	}
	ps := *spec.Process
	ps.Args = args
	ps.Terminal = false
	out := &harness.SafeBuffer{}
	p, err := task.Exec(ctx, "demo-exec", &ps, cio.NewCreator(cio.WithStreams(bytes.NewReader(nil), out, os.Stderr)))
	if err != nil {
		return "", err
	}
	defer p.Delete(ctx)
	ch, err := p.Wait(ctx)
	if err != nil {
		return "", err
	}
	if err := p.Start(ctx); err != nil {
		return "", err
	}
	<-ch
	p.IO().Wait()
	return out.String(), nil
}
