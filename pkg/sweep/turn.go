package sweep

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// TurnFile is the file, in containerd's task state directory
// (<state>/io.containerd.runtime.v2.task), that coordinates the shims'
// sweeps of a node: the shims of one containerd sweep every namespace
// once per interval between them, not each its own namespace at every
// start. containerd ignores it: it loads shims only from directories, and
// skips names that start with a dot.
//
// Whoever holds an exclusive flock on it has the turn. It holds one line,
// when the last sweep finished (RFC 3339); it is read and written only
// under the lock. A shim that dies with the turn loses the lock with its
// process and has recorded nothing, so the next shim to start takes the
// turn at once.
const TurnFile = ".snapview-sweep"

// Turn is one process's turn at the node's sweep.
type Turn struct {
	f *os.File
	// Last is when the previous sweep finished; zero if none is recorded.
	Last time.Time
}

// TakeTurn takes the turn at the sweep of the node whose task state
// directory is root, if no other process has it and the last sweep
// finished at least interval ago. It does not wait: a nil Turn, with a
// nil error, says it is not this caller's turn, and why.
func TakeTurn(root string, interval time.Duration) (*Turn, string, error) {
	f, err := os.OpenFile(filepath.Join(root, TurnFile), os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, "", fmt.Errorf("open the sweep's turn file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, "another shim is sweeping", nil
		}
		return nil, "", fmt.Errorf("lock the sweep's turn file: %w", err)
	}
	t := &Turn{f: f}
	b := make([]byte, 64)
	n, _ := f.ReadAt(b, 0)
	if last, err := time.Parse(time.RFC3339Nano, strings.TrimSpace(string(b[:n]))); err == nil {
		t.Last = last
	}
	if since := time.Since(t.Last); since < interval && since > -interval {
		t.Release()
		return nil, fmt.Sprintf("the last sweep finished %s ago, within the interval of %s", since.Round(time.Millisecond), interval), nil
	}
	return t, "", nil
}

// Finish records the time the sweep finished, and gives the turn up.
func (t *Turn) Finish(at time.Time) error {
	defer t.Release()
	line := at.UTC().Format(time.RFC3339Nano) + "\n"
	if err := t.f.Truncate(0); err != nil {
		return fmt.Errorf("record the sweep: %w", err)
	}
	if _, err := t.f.WriteAt([]byte(line), 0); err != nil {
		return fmt.Errorf("record the sweep: %w", err)
	}
	return nil
}

// Release gives the turn up without recording a sweep.
func (t *Turn) Release() {
	_ = t.f.Close() // closing the only descriptor drops the lock
}
