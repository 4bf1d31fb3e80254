package shim

import "testing"

func TestAsOCIRuntime(t *testing.T) {
	for _, tc := range []struct {
		args []string
		ok   bool
		log  string
	}{
		// runc's shim creating a container with the binary as its runtime.
		{[]string{"--root", "/run/containerd/runc/default", "--log", "/run/b/log.json", "--log-format", "json", "create", "--bundle", "/run/b", "--pid-file", "/run/b/init.pid", "c1"}, true, "/run/b/log.json"},
		{[]string{"--root=/r", "--log=/l.json", "--systemd-cgroup", "delete", "--force", "c1"}, true, "/l.json"},
		{[]string{"--root", "/r", "features"}, true, ""},
		// A shim's own command lines.
		{[]string{"-namespace", "default", "-address", "/run/containerd/containerd.sock", "-id", "c1", "start"}, false, ""},
		{[]string{"-namespace", "default", "-id", "c1", "delete"}, false, ""},
		{[]string{"-info"}, false, ""},
		{[]string{"-v"}, false, ""},
		{[]string{"delete"}, false, ""},
		{nil, false, ""},
	} {
		ok, log := asOCIRuntime(tc.args)
		if ok != tc.ok || log != tc.log {
			t.Errorf("asOCIRuntime(%q) = %v %q, want %v %q", tc.args, ok, log, tc.ok, tc.log)
		}
	}
}
