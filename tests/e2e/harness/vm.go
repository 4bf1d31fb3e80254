package harness

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// The VM of `make demo-vm` and of the e2e VM test: a guest kernel from
// Debian's cloud kernel package (unpacked into .cache by
// hack/install-deps.sh, never installed on the host), an initrd that loads
// the virtio modules and switches to the root disk, and a guest init that
// writes a marker on that disk and powers off. The VM image is both the
// guest's disk and, with qemu in it, the monitor's root.
const (
	// GuestKernelPath and GuestInitrdPath are where the VM image holds the
	// guest's kernel and initrd.
	GuestKernelPath = "/boot/vmlinuz"
	GuestInitrdPath = "/boot/initrd.img"
	// GuestMarkerPath is the file the guest writes on its root disk.
	GuestMarkerPath = "/snapview-guest-marker"
	// GuestBootedLine starts the console line the guest prints once it
	// runs from its disk.
	GuestBootedLine = "snapview-guest: booted "
	// GuestFsckLine starts the console line the initrd prints after it
	// checked the writable disk's filesystem.
	GuestFsckLine = "snapview-guest: fsck /dev/vda: "
	// GuestFoundLine starts the console line the guest prints when its
	// disk holds a marker of an earlier boot (a restored disk).
	GuestFoundLine = "snapview-guest: found on its disk: "
	// GuestWroteLine starts the line the guest prints after its marker.
	GuestWroteLine = "snapview-guest: wrote on its disk: "
	// GuestStayLine is printed by a guest told to stay up
	// (snapview.stay on its command line) once its marker is on the disk.
	GuestStayLine = "snapview-guest: staying up, writing"
	// QemuPath is where qemu is in a VM image or monitor tree.
	QemuPath = "/usr/bin/qemu-system-x86_64"
)

// virtioModules are the modules the cloud kernel needs to see a virtio
// disk, and to stack a layered root (erofs layers under an overlay), in
// the order they load.
var virtioModules = []string{"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk", "libcrc32c", "erofs", "overlay"}

// GuestKernel is an unpacked kernel package.
type GuestKernel struct {
	Version string // uname -r of the guest, e.g. 6.1.0-56-cloud-amd64
	Vmlinuz string
	Modules string // lib/modules/<version>
}

// GuestKernelFromEnv finds the guest kernel the Makefile points at
// ($SNAPVIEW_GUEST_KERNEL, the root of the unpacked package).
func GuestKernelFromEnv() (*GuestKernel, error) {
	root := os.Getenv("SNAPVIEW_GUEST_KERNEL")
	if root == "" {
		return nil, errors.New("SNAPVIEW_GUEST_KERNEL is not set: run through the Makefile")
	}
	matches, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(matches) != 1 {
		return nil, fmt.Errorf("no guest kernel under %s/boot (run `make deps`): %v", root, matches)
	}
	version := strings.TrimPrefix(filepath.Base(matches[0]), "vmlinuz-")
	k := &GuestKernel{Version: version, Vmlinuz: matches[0], Modules: filepath.Join(root, "lib", "modules", version)}
	if _, err := os.Stat(k.Modules); err != nil {
		return nil, fmt.Errorf("guest kernel modules: %w", err)
	}
	return k, nil
}

// initScript is the initrd's /init: load the modules, mount the root and
// run the guest's init from it. The root is the first disk (vda); with
// snapview.layers=N on the kernel command line it is a layered root, as
// snapview's params describe it: the writable disk vda holds the overlay's
// upper and work directories, the next N disks are the read-only erofs
// layers, top-most first.
const initScript = `#!/bin/sh
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
for m in %s; do insmod /lib/modules/$m.ko || echo "initrd: insmod $m failed"; done
waitdisk() { for w in $(seq 1 100); do [ -b $1 ] && return 0; sleep 0.05; done; return 1; }
fail() { echo "initrd: $*"; poweroff -f; }
layers=0
for w in $(cat /proc/cmdline); do case $w in snapview.layers=*) layers=${w#snapview.layers=};; esac; done
waitdisk /dev/vda || fail "no disk /dev/vda"
# The writable disk's filesystem is checked before it is mounted: preen
# (which replays a journal a crash left behind), then a forced read-only
# check, whose exit status must be 0.
e2fsck -p /dev/vda > /fsck.out 2>&1; p=$?
j=clean; grep -q "recovering journal" /fsck.out && j="journal recovered"
e2fsck -fn /dev/vda > /dev/null 2>&1; echo "` + GuestFsckLine + `$j, preen exit $p, check exit $?"
if [ "$layers" -gt 0 ]; then
  mkdir -p /disk
  mount -t ext4 -o rw /dev/vda /disk || fail "cannot mount the writable disk /dev/vda"
  i=0
  lower=
  for l in b c d e f g h i j k l m n o p q r s t u v w x y z; do
    [ $i -lt $layers ] || break
    mkdir -p /layers/$i
    waitdisk /dev/vd$l || fail "no disk /dev/vd$l for layer $i"
    mount -t erofs -o ro /dev/vd$l /layers/$i || fail "cannot mount layer $i (/dev/vd$l)"
    lower=${lower:+$lower:}/layers/$i
    i=$((i+1))
  done
  mkdir -p /disk/upper /disk/work
  mount -t overlay overlay -o lowerdir=$lower,upperdir=/disk/upper,workdir=/disk/work /newroot || fail "cannot stack the overlay"
  echo "initrd: root is an overlay of $layers erofs layers over /dev/vda"
else
  mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda"
fi
umount /proc
mount --move /dev /newroot/dev
exec switch_root /newroot /guest-init
`

// guestInit runs on the guest's root disk (the container's own snapshot):
// it reports the kernel and a marker an earlier boot left (a restored
// disk), writes its own marker (kernel, boot id) and syncs it, then powers
// the VM off, which ends qemu with status 0; with snapview.stay on its
// command line it stays up instead, writing files without syncing them.
const guestInit = `#!/bin/sh
mount -t proc proc /proc
echo "` + GuestBootedLine + `$(uname -r) from $(tr ' ' '\n' < /proc/cmdline | grep -E '^(root|snapview.layers)=' | tr '\n' ' ')"
if [ -f ` + GuestMarkerPath + ` ]; then echo "` + GuestFoundLine + `$(cat ` + GuestMarkerPath + `)"; fi
echo "kernel=$(uname -r) boot=$(cat /proc/sys/kernel/random/boot_id)" > ` + GuestMarkerPath + `
sync
echo "` + GuestWroteLine + `$(cat ` + GuestMarkerPath + `)"
if grep -q snapview.stay /proc/cmdline; then
  echo "` + GuestStayLine + `"
  i=0
  while :; do i=$((i+1)); echo "$i" > /churn-$((i % 64)); sleep 0.02; done
fi
echo "snapview-guest: powering off"
# Every filesystem remounted read-only first (the emergency remount, as
# the root under an overlay cannot be reached otherwise), so that the disk
# is left clean, its journal empty.
echo u > /proc/sysrq-trigger
sleep 1
poweroff -f
`

// Initrd returns the initrd of k: static busybox, the virtio modules and
// /init, as a gzip-compressed newc cpio archive.
func (k *GuestKernel) Initrd() ([]byte, error) {
	bb, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return nil, fmt.Errorf("read static busybox (Debian package busybox-static): %w", err)
	}
	var c cpio
	for _, d := range []string{"bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"} {
		c.dir(d)
	}
	c.file("bin/busybox", 0o755, bb)
	for _, a := range []string{"sh", "insmod", "mount", "umount", "switch_root", "seq", "sleep", "echo", "poweroff", "cat", "mkdir", "grep"} {
		c.symlink("bin/"+a, "busybox")
	}
	for _, m := range virtioModules {
		var found string
		_ = filepath.WalkDir(filepath.Join(k.Modules, "kernel"), func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.Name() == m+".ko" {
				found = p
			}
			return nil
		})
		if found == "" {
			return nil, fmt.Errorf("module %s not found under %s", m, k.Modules)
		}
		data, err := os.ReadFile(found)
		if err != nil {
			return nil, err
		}
		c.file("lib/modules/"+m+".ko", 0o644, data)
	}
	if err := c.binary(E2fsckPath, "bin/e2fsck"); err != nil {
		return nil, err
	}
	c.file("init", 0o755, fmt.Appendf(nil, initScript, strings.Join(virtioModules, " ")))
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	if _, err := zw.Write(c.close()); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// cpio writes a newc ("070701") cpio archive, the format the kernel
// unpacks as an initramfs.
type cpio struct {
	buf   bytes.Buffer
	ino   int
	names map[string]bool
}

func (c *cpio) entry(name string, mode uint32, data []byte) {
	if c.names == nil {
		c.names = map[string]bool{}
	}
	c.names[name] = true
	c.ino++
	fmt.Fprintf(&c.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, 1, mtime.Unix(), len(data), 0, 0, 0, 0, len(name)+1, 0)
	c.buf.WriteString(name)
	c.buf.WriteByte(0)
	c.pad()
	c.buf.Write(data)
	c.pad()
}

func (c *cpio) pad() {
	for c.buf.Len()%4 != 0 {
		c.buf.WriteByte(0)
	}
}

func (c *cpio) dir(name string)                         { c.entry(name, 0o040755, nil) }
func (c *cpio) file(name string, mode uint32, b []byte) { c.entry(name, 0o100000|mode, b) }
func (c *cpio) symlink(name, target string)             { c.entry(name, 0o120777, []byte(target)) }

// binary adds the host's program path at name, with the shared libraries
// ldd lists for it at their host paths (and their directories).
func (c *cpio) binary(path, name string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("%s (Debian package e2fsprogs): %w", path, err)
	}
	c.file(name, 0o755, data)
	out, err := exec.Command("ldd", path).Output()
	if err != nil {
		return fmt.Errorf("ldd %s: %w", path, err)
	}
	for _, lib := range lddPath.FindAllString(string(out), -1) {
		rel := strings.TrimPrefix(lib, "/")
		if c.names[rel] {
			continue
		}
		data, err := os.ReadFile(lib)
		if err != nil {
			return err
		}
		var parents []string
		for d := filepath.Dir(rel); d != "."; d = filepath.Dir(d) {
			parents = append([]string{d}, parents...)
		}
		for _, d := range parents {
			if !c.names[d] {
				c.dir(d)
			}
		}
		c.file(rel, 0o755, data)
	}
	return nil
}

func (c *cpio) close() []byte {
	c.entry("TRAILER!!!", 0, nil)
	return c.buf.Bytes()
}

// guestApplets are the busybox applets the guest's init uses.
var guestApplets = []string{"sh", "mount", "echo", "cat", "uname", "date", "sync", "poweroff", "tr", "grep", "sleep", "ls"}

// E2fsckPath is the host's e2fsck (Debian's e2fsprogs), which the initrd
// carries with its libraries to check the guest's disk.
const E2fsckPath = "/usr/sbin/e2fsck"

// VMImage builds the VM image named ref: busybox, the guest kernel and
// initrd under /boot, and /guest-init; with qemu, also the monitor (qemu
// from the host, its libraries, accelerator module and firmware), so that
// the image is at once the monitor's root and the guest's disk.
func VMImage(ref string, k *GuestKernel, withQemu bool) (*OCIImage, error) {
	base, err := BusyboxLayer(guestApplets)
	if err != nil {
		return nil, err
	}
	kernel, err := os.ReadFile(k.Vmlinuz)
	if err != nil {
		return nil, err
	}
	initrd, err := k.Initrd()
	if err != nil {
		return nil, err
	}
	boot := NewLayer().Dir("boot", 0o755).
		File(strings.TrimPrefix(GuestKernelPath, "/"), 0o644, kernel).
		File(strings.TrimPrefix(GuestInitrdPath, "/"), 0o644, initrd).
		File("guest-init", 0o755, []byte(guestInit))
	layers := []*Layer{base, boot}
	if withQemu {
		q, err := QemuLayer()
		if err != nil {
			return nil, err
		}
		layers = append(layers, q)
	}
	cfg := ocispec.ImageConfig{Env: []string{"PATH=/usr/bin:/bin"}, Cmd: []string{"sh"}, WorkingDir: "/"}
	return Compose(ref, cfg, layers...)
}

// qemuFiles are the files qemu needs besides its binary and libraries:
// Debian builds TCG as a module, and looks for firmware in these
// directories.
var qemuFiles = []string{
	"/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so",
	"/usr/share/seabios/bios-256k.bin",
	"/usr/share/qemu/linuxboot_dma.bin",
	"/usr/share/qemu/kvmvapic.bin",
}

var lddPath = regexp.MustCompile(`(/\S+)`)

// QemuLayer returns a layer holding the host's qemu-system-x86_64 (Debian's
// qemu-system-x86), the shared libraries ldd lists for it and its TCG
// module, and the firmware it loads, each at its host path.
func QemuLayer() (*Layer, error) {
	if _, err := os.Stat(QemuPath); err != nil {
		return nil, fmt.Errorf("qemu (Debian package qemu-system-x86): %w", err)
	}
	paths := []string{QemuPath}
	for _, bin := range []string{QemuPath, qemuFiles[0]} {
		out, err := exec.Command("ldd", bin).Output()
		if err != nil {
			return nil, fmt.Errorf("ldd %s: %w", bin, err)
		}
		paths = append(paths, lddPath.FindAllString(string(out), -1)...)
	}
	paths = append(paths, qemuFiles...)
	l := NewLayer()
	dirs := map[string]bool{}
	for _, p := range paths {
		for d := filepath.Dir(p); d != "/" && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	for _, d := range sortedKeys(dirs) {
		l.Dir(strings.TrimPrefix(d, "/"), 0o755)
	}
	seen := map[string]bool{}
	for _, p := range paths {
		if seen[p] {
			continue
		}
		seen[p] = true
		// Symlinks (libfoo.so.1 -> libfoo.so.1.2.3) become the file itself.
		if err := l.HostFile(strings.TrimPrefix(p, "/"), p); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// QemuArgs returns the monitor's command line: the guest kernel and initrd
// bound from the image by snapview, the container's own disk as the guest's
// virtio disk, the console on stdout, KVM if kvm is set and TCG otherwise.
func QemuArgs(kvm bool) []string {
	accel := []string{"-machine", "accel=tcg"}
	if kvm {
		accel = []string{"-machine", "accel=kvm", "-cpu", "host"}
	}
	return append(append([]string{QemuPath,
		"-nodefaults", "-nographic", "-no-user-config", "-no-reboot"}, accel...),
		"-m", "256",
		"-kernel", "/.snapview/boot/kernel",
		"-initrd", "/.snapview/boot/initrd",
		"-append", "console=ttyS0 root=/dev/vda rw panic=-1 quiet",
		"-drive", "file=/dev/snapview/rootfs,format=raw,if=virtio,cache=none",
		"-serial", "stdio",
	)
}

// QemuLayeredScript returns the monitor's launcher for a layered rootfs,
// a shell script (the container's process) that builds qemu's command line
// from the disks snapview gave the container: the writable disk first, as
// the guest's vda, then every layer disk, read-only, top-most first, and
// the number of layers on the guest's kernel command line.
func QemuLayeredScript(kvm bool) string { return QemuLayeredScriptOf(QemuArgs(kvm)) }

// QemuLayeredScriptOf is QemuLayeredScript for qemu's command line args.
func QemuLayeredScriptOf(args []string) string {
	args = slices.Clone(args)
	for i, a := range args {
		if strings.HasPrefix(a, "console=") {
			args[i] = a + " snapview.layers=$n"
		}
	}
	return `n=0
for d in /dev/snapview/layers/*; do n=$((n+1)); done
set -- ` + shellWords(args) + `
i=0
while [ $i -lt $n ]; do
  set -- "$@" -drive file=/dev/snapview/layers/$i,format=raw,if=virtio,readonly=on
  i=$((i+1))
done
exec "$@"
`
}

// WithGuestStay returns qemu's command line args with snapview.stay added
// to the guest kernel's: the guest keeps running and writing once its
// marker is on its disk.
func WithGuestStay(args []string) []string {
	args = slices.Clone(args)
	for i, a := range args {
		if strings.HasPrefix(a, "console=") {
			args[i] = a + " snapview.stay"
		}
	}
	return args
}

// shellWords quotes args for a shell, leaving $n to expand.
func shellWords(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = `"` + a + `"`
	}
	return strings.Join(q, " ")
}

// VMAnnotations are the annotations of a VM container: block mode, and the
// guest's kernel and initrd from the image.
func VMAnnotations() map[string]string {
	return map[string]string{
		"io.snapview.mode":        "block",
		"io.snapview.boot.kernel": GuestKernelPath,
		"io.snapview.boot.initrd": GuestInitrdPath,
	}
}

// KVM reports whether this machine runs the guest kernel k under KVM, and
// why not when it does not. $SNAPVIEW_VM_ACCEL=kvm or tcg decides without
// probing. Otherwise /dev/kvm must open and k must boot under KVM on the
// host up to the point where it looks for its root disk, within
// kvmProbeTimeout: a /dev/kvm that opens is not enough, since a nested or
// paravirtualised KVM (e.g. kvm-pvm on cloud VMs) can hang or fail the
// guest with an emulation error. The answer is computed once per process.
func KVM(k *GuestKernel) (bool, string) {
	kvmOnce.Do(func() { kvmOK, kvmWhy = probeKVM(k) })
	return kvmOK, kvmWhy
}

var (
	kvmOnce sync.Once
	kvmOK   bool
	kvmWhy  string
)

const kvmProbeTimeout = 5 * time.Second

func probeKVM(k *GuestKernel) (bool, string) {
	switch a := os.Getenv("SNAPVIEW_VM_ACCEL"); a {
	case "kvm":
		return true, "KVM: SNAPVIEW_VM_ACCEL=kvm"
	case "tcg":
		return false, "TCG: SNAPVIEW_VM_ACCEL=tcg"
	case "":
	default:
		return false, fmt.Sprintf("TCG: SNAPVIEW_VM_ACCEL=%q is neither kvm nor tcg", a)
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false, "TCG: no usable /dev/kvm"
	}
	f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), kvmProbeTimeout)
	defer cancel()
	// No root disk: the kernel panics where it would mount one, and
	// panic=-1 with -no-reboot ends qemu there.
	out, _ := exec.CommandContext(ctx, QemuPath, "-nodefaults", "-nographic", "-no-user-config", "-no-reboot",
		"-machine", "accel=kvm", "-cpu", "host", "-m", "128", "-kernel", k.Vmlinuz,
		"-append", "console=ttyS0 panic=-1", "-serial", "stdio").CombinedOutput()
	if bytes.Contains(out, []byte("VFS: Unable to mount root fs")) {
		return true, "KVM"
	}
	why := "did not reach its root disk within " + kvmProbeTimeout.String()
	if bytes.Contains(out, []byte("KVM internal error")) {
		why = "failed with a KVM internal error"
	}
	return false, "TCG: /dev/kvm opens, but the guest kernel " + why + " under KVM on this host"
}

// sortedKeys returns m's keys sorted, so that parents come before their
// children.
func sortedKeys(m map[string]bool) []string {
	return slices.Sorted(maps.Keys(m))
}

// WriteMonitorTree writes a host directory for a host-directory monitor
// rootfs: busybox and qemu with what it needs, as an operator would install
// a monitor beside the node's runtime.
func WriteMonitorTree(dir string) error {
	base, err := BusyboxLayer([]string{"sh", "cat", "echo", "ls"})
	if err != nil {
		return err
	}
	q, err := QemuLayer()
	if err != nil {
		return err
	}
	if err := base.WriteTo(dir); err != nil {
		return err
	}
	return q.WriteTo(dir)
}
