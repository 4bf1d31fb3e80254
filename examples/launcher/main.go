// Command launcher is a worked example for runtime authors: a VM monitor's
// launcher that runs inside a snapview block-mode container, reads what
// snapview gave it (package params) and builds the monitor's command line
// from that alone: the guest kernel and initrd bound from the image, the
// container's writable disk, every read-only layer disk of a layered
// rootfs, and every volume's disks.
//
//	launcher            print the qemu command line and a firecracker
//	                    configuration, one after the other
//	launcher -exec      exec qemu (the monitor rootfs must hold it)
//
// It is built and run inside a block-mode container by snapview's
// end-to-end tests.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"

	"github.com/snapview/snapview/params"
)

func main() {
	file := flag.String("params", params.File, "the params file snapview bound into the container")
	run := flag.Bool("exec", false, "exec qemu instead of printing its command line")
	qemu := flag.String("qemu", "qemu-system-x86_64", "the qemu binary")
	flag.Parse()
	if err := launch(*file, *run, *qemu); err != nil {
		fmt.Fprintln(os.Stderr, "launcher:", err)
		os.Exit(1)
	}
}

func launch(file string, run bool, qemu string) error {
	p, err := params.Read(file)
	if err != nil {
		return err
	}
	if !p.Rootfs.Disks() {
		return fmt.Errorf("the container is not in block mode (rootfs kind %q): there are no disks to hand a guest", p.Rootfs.Kind)
	}
	disks := guestDisks(p)
	args := qemuArgs(qemu, p, disks)
	if run {
		path, err := exec.LookPath(qemu)
		if err != nil {
			return err
		}
		return syscall.Exec(path, args, os.Environ())
	}
	fmt.Println(strings.Join(args, " "))
	fc, err := firecracker(p, disks)
	if err != nil {
		return err
	}
	fmt.Println(string(fc))
	return nil
}

// disk is one disk the guest gets, in the order it sees them (vda, vdb,
// ...), and what it is for.
type disk struct {
	path     string // in the container
	readOnly bool
	role     string // rootfs, layer <i>, volume <name> <i>
}

// guestDisks orders every disk: the writable disk first (the guest's vda),
// then the rootfs's layers, top-most first, then each volume's disks, by
// volume name.
func guestDisks(p *params.Doc) []disk {
	out := []disk{{path: p.Rootfs.Device, role: "rootfs"}}
	for i, l := range p.Rootfs.Layers {
		out = append(out, disk{path: l.Device, readOnly: true, role: fmt.Sprintf("layer %d", i)})
		for _, d := range l.Devices {
			out = append(out, disk{path: d, readOnly: true, role: fmt.Sprintf("layer %d blob", i)})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(p.Volumes)) {
		var blobs []disk
		for i, l := range p.Volumes[name].Layers {
			out = append(out, disk{path: l.Device, readOnly: true, role: fmt.Sprintf("volume %s %d", name, i)})
			for _, d := range l.Devices {
				blobs = append(blobs, disk{path: d, readOnly: true, role: fmt.Sprintf("volume %s %d blob", name, i)})
			}
		}
		out = append(out, blobs...)
	}
	return out
}

// qemuArgs is qemu's command line: one virtio disk per disk, read-only
// ones with readonly=on, and on the kernel command line what the guest's
// init needs to stack a layered root (the number of layers).
func qemuArgs(qemu string, p *params.Doc, disks []disk) []string {
	cmdline := "console=ttyS0 root=/dev/vda rw"
	if p.Rootfs.Layered() {
		cmdline = fmt.Sprintf("console=ttyS0 snapview.layers=%d snapview.upperdir=%s snapview.workdir=%s", len(p.Rootfs.Layers), p.Rootfs.UpperDir, p.Rootfs.WorkDir)
	}
	args := []string{qemu, "-nographic", "-m", "256"}
	if k, ok := p.Artifacts["kernel"]; ok {
		args = append(args, "-kernel", k)
	}
	if i, ok := p.Artifacts["initrd"]; ok {
		args = append(args, "-initrd", i)
	}
	args = append(args, "-append", cmdline)
	for _, d := range disks {
		drive := "file=" + d.path + ",format=raw,if=virtio,cache=none"
		if d.readOnly {
			drive += ",readonly=on"
		}
		args = append(args, "-drive", drive)
	}
	return args
}

// firecracker is a firecracker configuration for the same guest: one drive
// per disk, none the root device when the guest stacks its root itself.
func firecracker(p *params.Doc, disks []disk) ([]byte, error) {
	type drive struct {
		ID       string `json:"drive_id"`
		Path     string `json:"path_on_host"`
		Root     bool   `json:"is_root_device"`
		ReadOnly bool   `json:"is_read_only"`
	}
	cfg := struct {
		Boot struct {
			Kernel string `json:"kernel_image_path"`
			Initrd string `json:"initrd_path,omitempty"`
			Args   string `json:"boot_args"`
		} `json:"boot-source"`
		Drives []drive `json:"drives"`
	}{}
	cfg.Boot.Kernel, cfg.Boot.Initrd = p.Artifacts["kernel"], p.Artifacts["initrd"]
	cfg.Boot.Args = "console=ttyS0"
	if p.Rootfs.Layered() {
		cfg.Boot.Args += fmt.Sprintf(" snapview.layers=%d", len(p.Rootfs.Layers))
	}
	for i, d := range disks {
		cfg.Drives = append(cfg.Drives, drive{ID: fmt.Sprintf("disk%d", i), Path: d.path, Root: i == 0 && !p.Rootfs.Layered(), ReadOnly: d.readOnly})
	}
	return json.MarshalIndent(cfg, "", "  ")
}
