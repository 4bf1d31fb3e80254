// Package e2e runs snapview against a real containerd daemon, real runc and
// real snapshotters. It needs root; `make e2e` (or `make test` as root) runs it.
package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// ns is the containerd namespace of the tests, unique per test process: runc
// keeps its state under a fixed root per namespace (/run/containerd/runc/<ns>),
// so two suites running at once, or a system containerd, never share it.
var ns = fmt.Sprintf("snapview-e2e-%d", os.Getpid())

const (
	snapviewRT  = "io.containerd.snapview.v2"
	runcRT      = "io.containerd.runc.v2"
	testImageID = "docker.io/snapview/test:latest"
)

// suite is the state shared by the tests: one daemon of the newest containerd
// with the test image imported and unpacked for every snapshotter.
var suite struct {
	tools  harness.Tools
	dir    string
	daemon *harness.Daemon
	image  *harness.Image
	skip   string
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Getuid() != 0 {
		suite.skip = "e2e needs root (mounts, loop devices, a private containerd)"
		return m.Run()
	}
	tools, err := harness.ToolsFromEnv(false)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	suite.tools = tools
	// Keep the daemon's directory short: unix socket paths are limited to 108 bytes.
	suite.dir, err = os.MkdirTemp("", "snapview-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(suite.dir)

	suite.image, err = harness.BuildImage(suite.dir, harness.ImageSpec{Ref: testImageID, KernelSize: 8 << 20})
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: build image:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	suite.daemon, err = startDaemon(ctx, tools)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	code := m.Run()
	if err := stopLayeredDaemons(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: stop the layered daemons:", err)
		if code == 0 {
			code = 1
		}
	}
	if err := suite.daemon.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: stop daemon:", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// startDaemon starts a daemon and imports the test image into it.
func startDaemon(ctx context.Context, tools harness.Tools) (*harness.Daemon, error) {
	d, err := harness.StartDaemon(ctx, suite.dir, tools, harness.WithEnv("SNAPVIEW_CONFIG="+filepath.Join(suite.dir, "snapview.toml")))
	if err != nil {
		return nil, err
	}
	if _, err := d.Import(ctx, ns, suite.image); err != nil {
		d.Stop()
		return nil, err
	}
	return d, nil
}

// setup starts a test against daemon d: it skips without root, and registers
// the leak check and, on failure, the daemon and shim logs of the test.
func setup(t *testing.T, d *harness.Daemon) context.Context {
	t.Helper()
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	logStart := len(d.Log())
	t.Cleanup(func() {
		defer cancel()
		if err := d.CheckLeaks(context.Background()); err != nil {
			t.Errorf("leak check: %v", err)
		}
		if t.Failed() {
			log := d.Log()
			if logStart <= len(log) {
				log = log[logStart:]
			}
			t.Logf("containerd %s log (with shim logs) during this test:\n%s", d.Version, tail(log, 200))
		}
	})
	return harness.Context(ctx, ns)
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// eachSnapshotter runs f as a subtest of t for each snapshotter of daemon d,
// set up as every test is (setup), with a runc spy for the container.
func eachSnapshotter(t *testing.T, d *harness.Daemon, f func(ctx context.Context, t *testing.T, sn string, spy runcSpy)) {
	for _, sn := range d.Snapshotters {
		t.Run(sn, func(t *testing.T) {
			ctx := setup(t, d)
			f(ctx, t, sn, newRuncSpy(t))
		})
	}
}
