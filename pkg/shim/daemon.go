package shim

import (
	"context"
	"debug/buildinfo"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// claimsInInfo reports whether the -info answer must carry the mount claims
// for the containerd that runs it (this process's parent): true for
// containerd 2.2 and earlier, which read the claims from -info alone, and
// for a daemon whose version cannot be told; false for 2.3 and later, which
// read them from each start.
func claimsInInfo() bool {
	major, minor, err := daemonVersion(os.Getppid())
	if err != nil {
		return true
	}
	return readsClaimsFromInfo(major, minor)
}

// readsClaimsFromInfo reports whether containerd major.minor reads mount
// claims only from a runtime's -info (before the start protocol carried
// them, containerd 2.3).
func readsClaimsFromInfo(major, minor int) bool {
	return major < 2 || major == 2 && minor < 3
}

// daemonVersion returns the version of containerd running as process pid:
// from the Go build information of its binary, or else what the binary
// says with --version. A parent that is not containerd is an error.
func daemonVersion(pid int) (major, minor int, err error) {
	exe := fmt.Sprintf("/proc/%d/exe", pid)
	target, err := os.Readlink(exe)
	if err != nil {
		return 0, 0, err
	}
	if !strings.HasPrefix(filepath.Base(strings.TrimSuffix(target, " (deleted)")), "containerd") {
		return 0, 0, fmt.Errorf("the parent process %s is not containerd", target)
	}
	if bi, err := buildinfo.ReadFile(exe); err == nil && strings.HasPrefix(bi.Main.Path, "github.com/containerd/containerd") {
		if major, minor, err := parseVersion(bi.Main.Version); err == nil {
			return major, minor, nil
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, exe, "--version").Output()
	if err != nil {
		return 0, 0, err
	}
	// "containerd github.com/containerd/containerd/v2 v2.4.2 <revision>"
	f := strings.Fields(string(out))
	if len(f) < 3 {
		return 0, 0, fmt.Errorf("containerd --version said %q", out)
	}
	return parseVersion(f[2])
}

var versionRE = regexp.MustCompile(`^v?([0-9]+)\.([0-9]+)(\.|$|-|\+)`)

// parseVersion reads the major and minor version of "v2.4.2", "2.2.1",
// "v2.3.0-beta.1".
func parseVersion(v string) (major, minor int, err error) {
	m := versionRE.FindStringSubmatch(v)
	if m == nil {
		return 0, 0, errors.New("not a version: " + v)
	}
	major, _ = strconv.Atoi(m[1])
	minor, _ = strconv.Atoi(m[2])
	return major, minor, nil
}
