// Command demo is `make demo`: it starts a private containerd under a
// temporary directory (never the system's), imports a small demo image, runs
// a container with the snapview runtime, shows what snapview did, and
// removes everything again.
package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"

	"github.com/snapview/snapview/tests/e2e/harness"
)

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
	if os.Getuid() != 0 {
		return fmt.Errorf("the demo needs root: it mounts filesystems and starts a private containerd (run 'sudo make demo')")
	}
	tools, err := harness.ToolsFromEnv(false)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	dir, err := os.MkdirTemp("", "snapview-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	step("building a demo image (static busybox + a guest kernel, initrd and config under /boot and /etc/snapview)")
	img, err := harness.BuildImage(dir, harness.ImageSpec{Ref: ref, KernelSize: 4 << 20})
	if err != nil {
		return err
	}

	step("starting a private containerd under %s (the system's containerd is not touched)", dir)
	d, err := harness.StartDaemon(ctx, dir, tools, "SNAPVIEW_CONFIG="+dir+"/snapview.toml")
	if err != nil {
		return err
	}
	defer func() {
		step("stopping the private containerd and removing %s", dir)
		if err := d.Stop(); err != nil && retErr == nil {
			retErr = err
		}
	}()
	fmt.Printf("    containerd %s, snapshotters %s, runtime %s\n", d.Version, strings.Join(d.Snapshotters, ", "), runtime)

	step("importing %s", ref)
	cimg, err := d.Import(ctx, ns, img)
	if err != nil {
		return err
	}
	ctx = harness.Context(ctx, ns)
	c := d.Client()

	step("running a container with --runtime %s", runtime)
	ctr, err := c.NewContainer(ctx, id,
		client.WithImage(cimg),
		client.WithSnapshotter("overlayfs"),
		client.WithNewSnapshot(id+"-snapshot", cimg),
		client.WithRuntime(runtime, nil),
		client.WithNewSpec(oci.WithImageConfig(cimg), oci.WithProcessArgs("sh", "-c",
			`echo "hello from a snapview container"; echo "kernel in the image: $(ls -l /boot/vmlinux)"`)),
	)
	if err != nil {
		return err
	}
	defer func() {
		if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) && retErr == nil {
			retErr = err
		}
	}()
	var out bytes.Buffer
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(bytes.NewReader(nil), &out, os.Stderr)))
	if err != nil {
		return err
	}
	exit, err := task.Wait(ctx)
	if err != nil {
		return err
	}
	if err := task.Start(ctx); err != nil {
		return err
	}
	st := <-exit
	task.IO().Wait()
	if _, err := task.Delete(ctx); err != nil {
		return err
	}
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		fmt.Println("    | " + l)
	}
	fmt.Printf("    exit status %d\n", st.ExitCode())
	if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
		return err
	}

	step("checking that nothing is left (leases, snapshots, mounts, loop devices, shims)")
	if err := d.CheckLeaks(ctx); err != nil {
		return err
	}
	fmt.Println("    nothing left")
	return nil
}
