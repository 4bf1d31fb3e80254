package child

import (
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/pkg/sys/reaper"
)

// TestUnderReaper runs commands while a SIGCHLD loop reaps every child, as
// the shim's does: through the reaper each one's output and exit status
// arrive, a failure included.
func TestUnderReaper(t *testing.T) {
	sig := make(chan os.Signal, 32)
	signal.Notify(sig, syscall.SIGCHLD)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-sig:
				_ = reaper.Reap()
			case <-done:
				return
			}
		}
	}()
	t.Cleanup(func() { signal.Stop(sig); close(done); monitor.Store(nil) })
	UseReaper(reaper.Default)

	for i := range 200 {
		out, err := CombinedOutput(exec.Command("sh", "-c", "echo out; echo err >&2"))
		if err != nil || !strings.Contains(string(out), "out") || !strings.Contains(string(out), "err") {
			t.Fatalf("run %d: %q %v", i, out, err)
		}
	}
	if out, err := Output(exec.Command("sh", "-c", "echo half; exit 3")); err == nil || !strings.Contains(err.Error(), "exit status 3") || string(out) != "half\n" {
		t.Fatalf("a failing command: %q %v", out, err)
	}
}

// TestWithoutReaper: outside the shim's server a command runs as os/exec
// runs it.
func TestWithoutReaper(t *testing.T) {
	out, err := Output(exec.Command("echo", "plain"))
	if err != nil || string(out) != "plain\n" {
		t.Fatalf("%q %v", out, err)
	}
	if _, err := Output(exec.Command("false")); err == nil {
		t.Fatal("false succeeded")
	}
}
