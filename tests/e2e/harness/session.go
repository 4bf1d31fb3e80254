package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
)

// Session is a private containerd in a temporary directory, for the
// programs that are not tests (the demo, the benchmark): the checks and
// setup they all do, and one Close that removes everything.
type Session struct {
	// Dir is the session's temporary directory; the daemon lives under it.
	Dir    string
	Daemon *Daemon
}

// NewSession checks that it runs as root, reads the tool paths from the
// environment (compat selects the older containerd), makes a temporary
// directory named after prefix, and starts a daemon there with opts.
// purpose completes the error given without root (e.g. "the demo").
func NewSession(ctx context.Context, purpose, prefix string, compat bool, opts ...Option) (_ *Session, retErr error) {
	if os.Getuid() != 0 {
		return nil, fmt.Errorf("%s needs root: it mounts filesystems and starts a private containerd", purpose)
	}
	tools, err := ToolsFromEnv(compat)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			os.RemoveAll(dir)
		}
	}()
	d, err := StartDaemon(ctx, dir, tools, opts...)
	if err != nil {
		return nil, err
	}
	return &Session{Dir: dir, Daemon: d}, nil
}

// Close stops the daemon and removes the session's directory.
func (s *Session) Close() error {
	return errors.Join(s.Daemon.Stop(), os.RemoveAll(s.Dir))
}

// SafeBuffer is a bytes.Buffer that a container's IO copy goroutines and
// the reader can use at once.
type SafeBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SafeBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns what was written so far.
func (s *SafeBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
