package shim

import (
	"encoding/json"
	"os"
	"slices"
	"time"
)

// NotARuntime is what the shim says when a client runs it as an OCI runtime
// (nerdctl's --runtime /path/to/containerd-shim-snapview-v2 does: it names
// the binary as runc's shim's BinaryName).
const NotARuntime = "snapview: containerd-shim-snapview-v2 is a containerd shim, not an OCI runtime: pass the runtime by name, --runtime io.containerd.snapview.v2"

// runcCommands are the commands a runc shim gives its OCI runtime.
var runcCommands = []string{"create", "start", "state", "kill", "delete", "exec", "pause", "resume", "ps", "features", "checkpoint", "restore", "update", "events"}

// asOCIRuntime reports whether args are an OCI runtime's command line, as
// runc's shim gives one (--root DIR --log FILE --log-format json create
// --bundle …), not a shim's (-namespace … start); and the --log file it
// names, where runc's shim reads the runtime's error from.
func asOCIRuntime(args []string) (bool, string) {
	var log string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--root" || a == "--log" || a == "--log-format" || a == "--criu" || a == "--rootless":
			if a == "--log" && i+1 < len(args) {
				log = args[i+1]
			}
			i++
		case len(a) > 7 && a[:7] == "--root=", a == "--systemd-cgroup", a == "--debug":
		case len(a) > 6 && a[:6] == "--log=":
			log = a[6:]
		case slices.Contains(runcCommands, a):
			return i > 0, log // a shim's own command follows its flags; a runtime's follows --root
		default:
			return false, ""
		}
	}
	return false, ""
}

// refuseAsRuntime writes NotARuntime where runc's shim reads an OCI
// runtime's error (one JSON line in the --log file) and on stderr.
func refuseAsRuntime(log string) {
	if log != "" {
		line, _ := json.Marshal(map[string]string{"level": "error", "msg": NotARuntime, "time": time.Now().UTC().Format(time.RFC3339Nano)})
		if f, err := os.OpenFile(log, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
			_, _ = f.Write(append(line, '\n'))
			f.Close()
		}
	}
	_, _ = os.Stderr.WriteString(NotARuntime + "\n")
	os.Exit(1)
}
