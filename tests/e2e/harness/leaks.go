package harness

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
)

// LeaseLabel marks the leases snapview owns.
const LeaseLabel = "snapview.io/container"

// ViewPrefix starts the key of every view snapview creates.
const ViewPrefix = "snapview/"

// CheckLeaks reports everything a finished test may have left behind, in
// every namespace: snapview leases, snapview/ snapshots, containerd mount
// manager activations, containers, mounts under the daemon's directory, loop devices backed by its files, and shim
// processes. It waits up to 10 s for what is left to go, since shims exit
// only after answering the last Delete and Shutdown.
func (d *Daemon) CheckLeaks(ctx context.Context) error {
	var leaks []string
	deadline := time.Now().Add(10 * time.Second)
	for {
		leaks = d.leaks(ctx)
		if len(leaks) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(leaks) > 0 {
		return fmt.Errorf("leaks:\n  %s", strings.Join(leaks, "\n  "))
	}
	return nil
}

// ViewLeaks reports what of snapview's own is left in namespace ns: its
// leases, views and mount activations, and, on the whole node, the mounts of views (under a
// bundle's snapview/ directory) and the loop devices backed by the daemon's
// files. Unlike CheckLeaks it ignores containers, shims and other mounts, so
// it can judge a node whose other workloads (a kubelet's) still run.
func (d *Daemon) ViewLeaks(ctx context.Context, ns string) []string {
	nctx := Context(ctx, ns)
	leaks := d.snapviewObjects(nctx, ns, all)
	acts, err := d.client.MountManager().List(nctx)
	if err != nil && !errdefs.IsNotImplemented(err) {
		leaks = append(leaks, fmt.Sprintf("list mount activations in %s: %v", ns, err))
	}
	for _, a := range acts {
		if a.Labels[LeaseLabel] != "" || strings.HasPrefix(a.Name, ViewPrefix) {
			leaks = append(leaks, fmt.Sprintf("mount activation %s/%s %v", ns, a.Name, a.Labels))
		}
	}
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(d.RunDir))
	if err != nil {
		leaks = append(leaks, fmt.Sprintf("read mountinfo: %v", err))
	}
	for _, m := range mounts {
		if strings.Contains(strings.TrimPrefix(m.Mountpoint, d.RunDir), "/snapview/") {
			leaks = append(leaks, fmt.Sprintf("mount %s (%s from %s)", m.Mountpoint, m.FSType, m.Source))
		}
	}
	for _, l := range LoopDevices(d.Dir) {
		leaks = append(leaks, "loop device "+l)
	}
	return leaks
}

// SnapviewObjectsOf lists what of snapview's is left in containerd for
// container id of namespace ns: its lease, its view and volume snapshots
// (snapview/<id>...), and the mount activations snapview makes for it (its
// views', and its rootfs's, named after it and labelled as snapview's).
// Unlike CheckLeaks it can run while the container record still exists,
// before containerd's GC could take anything that the record's deletion
// frees.
func (d *Daemon) SnapviewObjectsOf(ctx context.Context, ns, id string) []string {
	nctx := Context(ctx, ns)
	leaks := d.snapviewObjects(nctx, ns, func(name string) bool { return name == ViewPrefix+id || strings.HasPrefix(name, ViewPrefix+id+"/") })
	acts, err := d.client.MountManager().List(nctx)
	if err != nil && !errdefs.IsNotImplemented(err) {
		leaks = append(leaks, fmt.Sprintf("list mount activations in %s: %v", ns, err))
	}
	for _, a := range acts {
		if a.Name == id && a.Labels[LeaseLabel] == id || a.Name == ViewPrefix+id || strings.HasPrefix(a.Name, ViewPrefix+id+"/") {
			leaks = append(leaks, fmt.Sprintf("mount activation %s/%s %v", ns, a.Name, a.Labels))
		}
	}
	return leaks
}

// snapviewObjects lists snapview's leases and view snapshots in namespace
// ns (nctx carries it) whose names match.
func (d *Daemon) snapviewObjects(nctx context.Context, ns string, match func(name string) bool) []string {
	var leaks []string
	c := d.client
	ls, err := c.LeasesService().List(nctx, fmt.Sprintf("labels.%q", LeaseLabel))
	if err != nil {
		leaks = append(leaks, fmt.Sprintf("list leases in %s: %v", ns, err))
	}
	for _, l := range ls {
		if match(l.ID) {
			leaks = append(leaks, fmt.Sprintf("lease %s/%s %v", ns, l.ID, l.Labels))
		}
	}
	for _, sn := range d.Snapshotters {
		err := c.SnapshotService(sn).Walk(nctx, func(_ context.Context, info snapshots.Info) error {
			if strings.HasPrefix(info.Name, ViewPrefix) && match(info.Name) {
				leaks = append(leaks, fmt.Sprintf("snapshot %s/%s %s (parent %s)", ns, sn, info.Name, info.Parent))
			}
			return nil
		})
		if err != nil {
			leaks = append(leaks, fmt.Sprintf("walk %s snapshots in %s: %v", sn, ns, err))
		}
	}
	return leaks
}

func all(string) bool { return true }

func (d *Daemon) leaks(ctx context.Context) []string {
	var leaks []string
	c := d.client
	nss, err := c.NamespaceService().List(ctx)
	if err != nil {
		return []string{fmt.Sprintf("list namespaces: %v", err)}
	}
	for _, ns := range nss {
		nctx := Context(ctx, ns)
		leaks = append(leaks, d.snapviewObjects(nctx, ns, all)...)
		acts, err := c.MountManager().List(nctx)
		if err != nil && !errdefs.IsNotImplemented(err) {
			leaks = append(leaks, fmt.Sprintf("list mount activations in %s: %v", ns, err))
		}
		for _, a := range acts {
			leaks = append(leaks, fmt.Sprintf("mount activation %s/%s %v", ns, a.Name, a.Labels))
		}
		cs, err := c.Containers(nctx)
		if err != nil {
			leaks = append(leaks, fmt.Sprintf("list containers in %s: %v", ns, err))
		}
		for _, ctr := range cs {
			leaks = append(leaks, fmt.Sprintf("container %s/%s", ns, ctr.ID()))
		}
	}
	for _, dir := range []string{d.Dir, d.RunDir} {
		mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
		if err != nil {
			leaks = append(leaks, fmt.Sprintf("read mountinfo: %v", err))
		}
		for _, m := range mounts {
			if m.Mountpoint == d.RunDir {
				continue // the harness's own tmpfs
			}
			leaks = append(leaks, fmt.Sprintf("mount %s (%s from %s)", m.Mountpoint, m.FSType, m.Source))
		}
	}
	for _, l := range LoopDevices(d.Dir) {
		leaks = append(leaks, "loop device "+l)
	}
	for _, pid := range shimPids(d.Address) {
		leaks = append(leaks, fmt.Sprintf("shim process %d", pid))
	}
	return leaks
}

// LoopDevices lists the attached loop devices whose backing file is under
// dir, as "/dev/loopN -> file".
func LoopDevices(dir string) []string {
	var out []string
	matches, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err != nil {
			continue
		}
		backing := strings.TrimSpace(string(b))
		if strings.HasPrefix(backing, dir+"/") {
			dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(m)))
			out = append(out, dev+" -> "+backing)
		}
	}
	return out
}

func detachLoops(dir string) {
	for _, l := range LoopDevices(dir) {
		dev, _, _ := strings.Cut(l, " ")
		_ = exec.Command("losetup", "-d", dev).Run()
	}
}

// shimPids lists the shim processes started for the daemon at address.
func shimPids(address string) []int { return ShimPids(address, "") }

// ShimPids lists the shim processes started for the daemon at address and,
// unless id is empty, for container id (a pod's shim carries the id of the
// container that started it).
func ShimPids(address, id string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte("containerd-shim")) {
			continue
		}
		if !bytes.Contains(cmdline, []byte(address+"\x00")) {
			continue
		}
		if id == "" || bytes.Contains(cmdline, []byte("\x00-id\x00"+id+"\x00")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// DeleteLeases removes every lease in ns whose ID has prefix, for tests that
// take leases of their own.
func (d *Daemon) DeleteLeases(ctx context.Context, ns, prefix string) error {
	nctx := Context(ctx, ns)
	ls, err := d.client.LeasesService().List(nctx)
	if err != nil {
		return err
	}
	for _, l := range ls {
		if strings.HasPrefix(l.ID, prefix) {
			if err := d.client.LeasesService().Delete(nctx, l, leases.SynchronousDelete); err != nil {
				return err
			}
		}
	}
	return nil
}
