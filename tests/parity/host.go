package main

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/moby/sys/mountinfo"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// randomPart is what differs between two runs in the paths of a test's
// temporary directories (Go's t.TempDir: <TMPDIR>/<Test><digits>/001).
var randomPart = regexp.MustCompile(`[0-9]{6,}`)

// suiteProcess reports whether the command line args belongs to a run of
// the suite: it names one of its directories.
func suiteProcess(args []string, dirs []string) bool {
	for _, a := range args {
		for _, d := range dirs {
			if strings.Contains(a, d) {
				return true
			}
		}
	}
	return false
}

// procArgs returns the command line of process pid.
func procArgs(pid string) []string {
	b, err := os.ReadFile(filepath.Join("/proc", pid, "cmdline"))
	if err != nil || len(b) == 0 {
		return nil
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

// leftovers lists what runs of the suite left on the host, named so that
// the leftovers of two runs compare: mounts and loop devices under the
// suite's directories and its TMPDIR, and the processes that name them
// (shims, whichever runtime's, by container id; gVisor's sandbox and gofer
// by bundle; containerd).
func leftovers(tmp string) []string {
	dirs := []string{suiteRoot, suiteState, tmp}
	norm := func(p string) string {
		p = strings.Replace(p, tmp, "$TMPDIR", 1)
		return randomPart.ReplaceAllString(p, "N")
	}
	var out []string
	for _, dir := range dirs {
		ms, _ := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
		for _, m := range ms {
			out = append(out, "mount "+norm(m.Mountpoint)+" ("+m.FSType+")")
		}
		for _, l := range harness.LoopDevices(dir) {
			out = append(out, "loop device backed by "+norm(l))
		}
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		args := procArgs(e.Name())
		if len(args) == 0 || !suiteProcess(args, dirs) || e.Name() == strconv.Itoa(os.Getpid()) {
			continue
		}
		name := filepath.Base(args[0])
		what := ""
		for i, a := range args {
			switch {
			case a == "-id" && i+1 < len(args):
				what = "container " + args[i+1]
			case strings.HasPrefix(a, "--bundle="):
				what = "bundle " + filepath.Base(strings.TrimPrefix(a, "--bundle="))
			case a == "--bundle" && i+1 < len(args):
				what = "bundle " + filepath.Base(args[i+1])
			}
		}
		if strings.HasPrefix(name, "containerd-shim-") {
			name = "shim" // runc's or snapview's: the same leftover
		}
		out = append(out, strings.TrimSpace("process "+name+" "+norm(what)))
	}
	slices.Sort(out)
	return out
}

// clearHost removes what runs of the suite left on the host, so that the
// next run starts on a clean one: it kills the processes that name the
// suite's directories, unmounts everything under them, and removes them,
// as the suite itself does when it ends normally.
func clearHost(tmp string) {
	dirs := []string{suiteRoot, suiteState, tmp}
	self := strconv.Itoa(os.Getpid())
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if args := procArgs(e.Name()); len(args) > 0 && e.Name() != self && suiteProcess(args, dirs) {
			if pid, err := strconv.Atoi(e.Name()); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	time.Sleep(500 * time.Millisecond)
	for _, dir := range dirs {
		_ = mount.UnmountRecursive(dir, syscall.MNT_DETACH)
		_ = os.RemoveAll(dir)
	}
	// The OCI runtime's state of the suite's containers, under the shims'
	// default runtime root, per namespace: runsc keeps a container's there
	// when its delete fails, and the next run's container of that name
	// then fails to create ("container already exists").
	roots, _ := filepath.Glob(filepath.Join(runtimeRoot, "testing"))
	more, _ := filepath.Glob(filepath.Join(runtimeRoot, "testing-*"))
	for _, r := range append(roots, more...) {
		_ = os.RemoveAll(r)
	}
}

// runtimeRoot is the runc shim's default root for the OCI runtime's state
// (options Root), one directory per namespace; the suite's namespaces are
// testing and testing-<test>.
const runtimeRoot = "/run/containerd/runc"

// newLeftovers returns what after holds and before does not.
func newLeftovers(before, after []string) []string {
	var out []string
	for _, l := range after {
		if !slices.Contains(before, l) {
			out = append(out, l)
		}
	}
	return out
}
