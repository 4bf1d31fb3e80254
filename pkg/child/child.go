// Package child runs the short commands snapview needs in the shim (mkfs
// for a new writable disk, an OCI runtime's --version) so that their exit
// status is not lost to the shim's reaper.
//
// The shim is a child subreaper, and runc's shim reaps every exited child
// on SIGCHLD (reaper.Reap: wait4(-1)). A command run with os/exec alone can
// be reaped there first; its Wait then fails with "waitid: no child
// processes", and the command counts as failed whatever it did. runc's own
// calls avoid that by waiting through the reaper (go-runc's Monitor); once
// the shim's task service exists (UseReaper), so do these.
package child

import (
	"bytes"
	"fmt"
	"os/exec"
	"sync/atomic"

	"github.com/containerd/containerd/v2/pkg/sys/reaper"
)

var monitor atomic.Pointer[reaper.Monitor]

// UseReaper makes every later command wait through m, the monitor the
// process's SIGCHLD loop feeds. Only a process that runs that loop (the
// shim's server) may call it: elsewhere nothing would report the exit.
func UseReaper(m *reaper.Monitor) { monitor.Store(m) }

// CombinedOutput runs cmd and returns its standard output and error
// together, as exec.Cmd.CombinedOutput does.
func CombinedOutput(cmd *exec.Cmd) ([]byte, error) {
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := run(cmd)
	return b.Bytes(), err
}

// Output runs cmd and returns its standard output, as exec.Cmd.Output does
// (without the standard error in the error).
func Output(cmd *exec.Cmd) ([]byte, error) {
	var b bytes.Buffer
	cmd.Stdout = &b
	err := run(cmd)
	return b.Bytes(), err
}

func run(cmd *exec.Cmd) error {
	m := monitor.Load()
	if m == nil {
		return cmd.Run()
	}
	ec, err := m.Start(cmd)
	if err != nil {
		return err
	}
	status, err := m.Wait(cmd, ec)
	if err != nil {
		return err
	}
	if status != 0 {
		return fmt.Errorf("%s: exit status %d", cmd.Path, status)
	}
	return nil
}
