package lifecycle

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/snapview/snapview/pkg/child"
)

// Block mode hands the container disks through the spec's linux.devices,
// which the OCI runtime must create. gVisor's runsc does not: it has no
// block devices, and silently starts the container without them. So, in
// block mode, snapview asks the OCI runtime what it is (`<runtime>
// --version`, once per binary per shim process) and refuses gVisor with an
// error the user can act on, instead of a guest that finds no disk.

// runtimeNames caches what each OCI runtime binary says it is, by its
// path, size and modification time.
var runtimeNames sync.Map

// ociRuntimeName returns the first line of `binary --version`, or "" when
// it cannot be run (runc's own create reports that).
func ociRuntimeName(ctx context.Context, binary string) string {
	path, err := exec.LookPath(binary)
	if err != nil {
		return ""
	}
	fi, err := os.Stat(path)
	if err != nil {
		return ""
	}
	key := fmt.Sprintf("%s %d %d", path, fi.Size(), fi.ModTime().UnixNano())
	if v, ok := runtimeNames.Load(key); ok {
		return v.(string)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := child.Output(exec.CommandContext(ctx, path, "--version"))
	if err != nil {
		return ""
	}
	name, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	runtimeNames.Store(key, name)
	return name
}

// checkDeviceRuntime refuses an OCI runtime that cannot hand a container
// block devices (binary "" is runc, from PATH).
func checkDeviceRuntime(ctx context.Context, binary string) error {
	if binary == "" {
		binary = "runc"
	}
	if name := ociRuntimeName(ctx, binary); strings.HasPrefix(name, "runsc") {
		return fmt.Errorf("needs an OCI runtime that creates the container's block devices (linux.devices), but BinaryName %q is gVisor (%q), which has none: run block-mode containers under runc (or another runtime that creates device nodes)", binary, name)
	}
	return nil
}
