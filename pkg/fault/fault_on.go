//go:build snapview_faults

// Package fault marks the points where a test build of the shim can be made
// to crash. This is the test build (tag snapview_faults): the file named by
// $SNAPVIEW_FAULT_FILE holds one line, "<point> <container id>"; the first
// process to reach that point for that container removes the file and
// kills itself with SIGKILL, as a crash or the OOM killer would.
package fault

import (
	"os"
	"strings"
	"syscall"
)

// FileEnv names the environment variable that points at the fault file.
const FileEnv = "SNAPVIEW_FAULT_FILE"

// Point crashes the process at point name for container id if the fault
// file asks for it; the fault fires once.
func Point(name, id string) {
	path := os.Getenv(FileEnv)
	if path == "" {
		return
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	f := strings.Fields(string(b))
	if len(f) != 2 || f[0] != name || f[1] != id {
		return
	}
	// Only one process may win: the rename is atomic.
	if err := os.Rename(path, path+".fired"); err != nil {
		return
	}
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // the signal is on its way
}
