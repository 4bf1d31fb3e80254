// Package harness owns a private containerd for snapview's end-to-end tests
// and demo, in the manner of containerd's integration/client: temporary root,
// state and sockets, the freshly built shim first on the daemon's PATH, wait
// until serving, fail on plugin init errors, stop with SIGTERM then SIGKILL,
// and hand back the daemon and shim logs.
package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/template"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"golang.org/x/sys/unix"
)

// Tools names the binaries the harness runs. The Makefile fills them in from
// .cache/tools (see hack/install-deps.sh).
type Tools struct {
	Shim       string // containerd-shim-snapview-v2
	Containerd string // containerd (its directory also holds ctr and containerd-shim-runc-v2)
	Runc       string

	// The clients, built by hack/install-clients.sh; empty when their
	// variable is not set (a test that needs one then skips, saying so).
	Nerdctl  string // nerdctl ($SNAPVIEW_NERDCTL)
	Dockerd  string // dockerd, the Docker Engine ($SNAPVIEW_DOCKERD)
	Registry string // the CNCF Distribution registry ($SNAPVIEW_REGISTRY)
}

// ToolsFromEnv reads the tool paths the Makefile exports. compat selects the
// older containerd (SNAPVIEW_CONTAINERD_COMPAT) the parity suite also runs on.
func ToolsFromEnv(compat bool) (Tools, error) {
	key := "SNAPVIEW_CONTAINERD"
	if compat {
		key = "SNAPVIEW_CONTAINERD_COMPAT"
	}
	t := Tools{
		Shim:       os.Getenv("SNAPVIEW_SHIM"),
		Containerd: os.Getenv(key),
		Runc:       os.Getenv("SNAPVIEW_RUNC"),
	}
	for name, p := range map[string]string{"SNAPVIEW_SHIM": t.Shim, key: t.Containerd, "SNAPVIEW_RUNC": t.Runc} {
		if p == "" {
			return t, fmt.Errorf("%s is not set: run the tests through `make e2e`", name)
		}
		if _, err := os.Stat(p); err != nil {
			return t, fmt.Errorf("%s: %w (run `make deps build`)", name, err)
		}
	}
	// The clients are optional, but a path that is set must exist: the
	// Makefile always sets them, so a missing binary is a failure, not a skip.
	for _, c := range []struct {
		name string
		dst  *string
	}{{"SNAPVIEW_NERDCTL", &t.Nerdctl}, {"SNAPVIEW_DOCKERD", &t.Dockerd}, {"SNAPVIEW_REGISTRY", &t.Registry}} {
		*c.dst = os.Getenv(c.name)
		if *c.dst == "" {
			continue
		}
		if _, err := os.Stat(*c.dst); err != nil {
			return t, fmt.Errorf("%s: %w (run `make deps`)", c.name, err)
		}
	}
	return t, nil
}

// NeedClient returns why a test that needs the client whose binary is path
// (a Tools field) cannot run, or "" if it can: its variable (name) is not
// set, as when the tests run without the Makefile.
func NeedClient(name, path string) string {
	if path != "" {
		return ""
	}
	return name + " is not set: the test needs that client (hack/install-clients.sh builds it; `make e2e` sets the variable)"
}

// Ctr returns the ctr binary built with containerd.
func (t Tools) Ctr() string { return filepath.Join(filepath.Dir(t.Containerd), "ctr") }

// RuncShim returns containerd's own runc shim of the same version.
func (t Tools) RuncShim() string {
	return filepath.Join(filepath.Dir(t.Containerd), "containerd-shim-runc-v2")
}

// Daemon is a private containerd.
type Daemon struct {
	Dir     string // the daemon's root and files live under Dir
	RunDir  string // its state and sockets live under RunDir, on tmpfs
	Address string // gRPC socket
	Root    string
	State   string
	Version string // e.g. v2.4.2, from `containerd --version`
	Tools   Tools
	// SnapshotterNames are the snapshotters this daemon serves and the tests use.
	Snapshotters []string
	// DefaultSnapshotter, when set, is the snapshotter of a test container
	// that names none (else overlayfs).
	DefaultSnapshotter string

	// LogLevel is containerd's (and so the shims') log level.
	LogLevel string
	// CRI, when set, enables containerd's CRI plugin with snapview runtimes.
	CRI *CRIConfig
	// ErofsBlockSize, when set, runs the erofs snapshotter in block mode:
	// every container's snapshot gets a writable ext4 image of this size
	// (its default_size) over the image's erofs layer files.
	ErofsBlockSize string
	// MetricsAddress, when set, is where containerd serves its Prometheus
	// metrics (/v1/metrics), on loopback.
	MetricsAddress string

	cmd     *exec.Cmd
	logFile *os.File
	waitErr chan error
	client  *client.Client
	// argv and env start the daemon process (again, on Restart).
	argv []string
	env  []string
	// mu orders Supervise's restarts with Stop.
	mu sync.Mutex
}

const configTemplate = `version = 3
root = "{{.Root}}"
state = "{{.State}}"
disabled_plugins = [
{{- if not .CRI}}
  "io.containerd.grpc.v1.cri",
  "io.containerd.cri.v1.images",
  "io.containerd.cri.v1.runtime",
  "io.containerd.podsandbox.controller.v1.podsandbox",
{{- end}}
  "io.containerd.nri.v1.nri",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{{.Address}}"

[ttrpc]
  address = "{{.Address}}.ttrpc"

[debug]
  level = "{{.LogLevel}}"
{{- if .MetricsAddress}}

[metrics]
  address = "{{.MetricsAddress}}"
{{- end}}

{{- if .CRI}}

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{{.CRI.SandboxImage}}"

[plugins."io.containerd.cri.v1.runtime"]
  # Lowering oom_score_adj is denied on some machines; every sandbox fails without this.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{{.Dir}}/cni/bin"]
    conf_dir = "{{.Dir}}/cni/net.d"
{{- if .CRI.Bare}}
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
      SystemdCgroup = false
{{- else}}
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview]
    runtime_type = "io.containerd.snapview.v2"
    pod_annotations = ["io.snapview.*"]
    container_annotations = ["io.snapview.*"]
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview.options]
      SystemdCgroup = false
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview.options.view]
        mode = "view"
{{- if not .CRI.NoVolumes}}
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview.options.volumes]
        allow = ["docker.io/snapview/vol-*"]
{{- end}}
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-runc-path]
    runtime_type = "io.containerd.runc.v2"
    runtime_path = "{{.Tools.Shim}}"
    pod_annotations = ["io.snapview.*"]
    container_annotations = ["io.snapview.*"]
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-runc-path.options]
      SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-off]
    runtime_type = "io.containerd.snapview.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-off.options]
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-off.options.view]
        mode = "off"
{{- if not .CRI.NoVolumes}}
  # Views derived from the layers the rootfs names (view.source).
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-layers]
    runtime_type = "io.containerd.snapview.v2"
    pod_annotations = ["io.snapview.*"]
    container_annotations = ["io.snapview.*"]
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-layers.options]
      SystemdCgroup = false
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-layers.options.view]
        source = "layers"
{{- end}}
  # Block mode: the runtime's own snapshotter is block-backed.
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-block]
    runtime_type = "io.containerd.snapview.v2"
    snapshotter = "blockfile"
    pod_annotations = ["io.snapview.*"]
    container_annotations = ["io.snapview.*"]
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-block.options]
      SystemdCgroup = false
  # Layered block mode: the erofs snapshotter (in block mode if the daemon's
  # erofs snapshotter has a default_size).
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-layered]
    runtime_type = "io.containerd.snapview.v2"
    snapshotter = "erofs"
    pod_annotations = ["io.snapview.*"]
    container_annotations = ["io.snapview.*"]
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-layered.options]
      SystemdCgroup = false
{{- if not .CRI.NoVolumes}}
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.snapview-layered.options.volumes]
        allow = ["docker.io/snapview/vol-*"]
{{- end}}
{{- end}}

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
{{- end}}

{{- if .ErofsBlockSize}}

[plugins."io.containerd.snapshotter.v1.erofs"]
  default_size = "{{.ErofsBlockSize}}"
{{- end}}

[plugins."io.containerd.snapshotter.v1.blockfile"]
  scratch_file = "{{.Dir}}/blockfile-scratch.ext4"
  fs_type = "ext4"
  mount_options = []
  recreate_scratch = false
`

// blockfileScratchSize is the size of every blockfile snapshot: the test
// images are a few MiB of busybox plus the boot artifacts.
const blockfileScratchSize = 384 << 20

// Option configures a daemon.
type Option func(*options)

type options struct {
	netns          string
	env            []string
	logLevel       string
	cri            *CRIConfig
	snapviewConfig *string
	erofsBlockSize string
	scratchSize    int64
	metrics        bool
}

// WithMetrics has containerd serve its Prometheus metrics on a free
// loopback port (Daemon.MetricsAddress), for the benchmark's figures of
// containerd's garbage collection.
func WithMetrics() Option {
	return func(o *options) { o.metrics = true }
}

// WithSnapviewConfig writes body as snapview's configuration file in the
// daemon's directory and points the shims at it ($SNAPVIEW_CONFIG), so that
// the system's /etc/containerd/snapview.toml is never read.
func WithSnapviewConfig(body string) Option {
	return func(o *options) { o.snapviewConfig = &body }
}

// WithBlockfileScratch makes the blockfile snapshotter's scratch file, and
// so every blockfile snapshot, size bytes (default 384 MiB).
func WithBlockfileScratch(size int64) Option {
	return func(o *options) { o.scratchSize = size }
}

// WithErofsBlock runs the daemon's erofs snapshotter in block mode, with
// writable images of size (e.g. "64M"): the layered block-backed rootfs.
func WithErofsBlock(size string) Option {
	return func(o *options) { o.erofsBlockSize = size }
}

// CRIConfig configures containerd's CRI plugin for a daemon. Its runtime
// handlers are "snapview" (runtime_type io.containerd.snapview.v2 with an
// inline options table, which CRI sends as runtimeoptions ConfigBody),
// "snapview-runc-path" (runtime_type io.containerd.runc.v2 with runtime_path
// set to the shim, which CRI sends runc options), "snapview-block"
// (snapview on the blockfile snapshotter, for block mode), "snapview-layered"
// (snapview on the erofs snapshotter), "snapview-layers" (views derived
// from the rootfs's layers), "snapview-off"
// (snapview with views off) and "runc". Pods must use host
// networking: no CNI plugin is configured.
type CRIConfig struct {
	// SandboxImage is the pause image, imported by the test into k8s.io.
	SandboxImage string
	// Bare configures only the runc handler, as a node's containerd is
	// before `snapviewctl install` adds snapview's (the Kubernetes test);
	// CNI plugins, if any, go in <Dir>/cni/bin and their configuration in
	// <Dir>/cni/net.d.
	Bare bool
	// NoVolumes leaves [volumes] out of the handlers' options, for a shim
	// of a release before volumes (the upgrade test), which refuses it.
	NoVolumes bool
}

// WithCRI enables containerd's CRI plugin.
func WithCRI(c CRIConfig) Option {
	return func(o *options) { o.cri = &c }
}

// WithNetNS runs the daemon (and so its shims and CNI plugins) in the
// network namespace bound at path (an `ip netns add` name's file), through
// nsenter, which changes nothing else.
func WithNetNS(path string) Option {
	return func(o *options) { o.netns = path }
}

// WithEnv adds variables to the daemon's (and so the shims') environment.
func WithEnv(env ...string) Option {
	return func(o *options) { o.env = append(o.env, env...) }
}

// WithLogLevel sets containerd's log level (default debug, so that a failed
// test can print what happened; the benchmark uses info, as production does).
func WithLogLevel(level string) Option {
	return func(o *options) { o.logLevel = level }
}

// StartDaemon starts a private containerd under a new directory in parent
// and returns once it serves and every plugin the tests need is loaded.
func StartDaemon(ctx context.Context, parent string, tools Tools, opts ...Option) (_ *Daemon, retErr error) {
	o := options{logLevel: "debug", scratchSize: blockfileScratchSize}
	for _, opt := range opts {
		opt(&o)
	}
	dir, err := os.MkdirTemp(parent, "containerd-")
	if err != nil {
		return nil, err
	}
	// State (bundles, sockets) lives on tmpfs under /run, as a real
	// containerd's /run/containerd does; root stays on disk.
	runDir, err := os.MkdirTemp("/run", "snapview-containerd-")
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := unix.Mount("tmpfs", runDir, "tmpfs", 0, "mode=0711,size=256m"); err != nil {
		os.RemoveAll(dir)
		os.Remove(runDir)
		return nil, fmt.Errorf("mount tmpfs for the daemon's state: %w", err)
	}
	d := &Daemon{
		Dir:      dir,
		RunDir:   runDir,
		Address:  filepath.Join(runDir, "containerd.sock"),
		Root:     filepath.Join(dir, "root"),
		State:    filepath.Join(runDir, "state"),
		Tools:    tools,
		LogLevel: o.logLevel,
		CRI:      o.cri,

		ErofsBlockSize: o.erofsBlockSize,
		waitErr:        make(chan error, 1),
	}
	defer func() {
		if retErr != nil {
			d.Stop()
		}
	}()
	if o.metrics {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a port for containerd's metrics: %w", err)
		}
		d.MetricsAddress = l.Addr().String()
		l.Close()
	}
	out, err := exec.Command(tools.Containerd, "--version").Output()
	if err != nil {
		return nil, fmt.Errorf("containerd --version: %w", err)
	}
	if f := strings.Fields(string(out)); len(f) >= 3 {
		d.Version = f[2]
	}
	if err := makeExt4(filepath.Join(dir, "blockfile-scratch.ext4"), o.scratchSize); err != nil {
		return nil, err
	}
	var cfg bytes.Buffer
	if err := template.Must(template.New("config").Parse(configTemplate)).Execute(&cfg, d); err != nil {
		return nil, err
	}
	if o.snapviewConfig != nil {
		p := filepath.Join(dir, "snapview.toml")
		if err := os.WriteFile(p, []byte(*o.snapviewConfig), 0o600); err != nil {
			return nil, err
		}
		o.env = append(o.env, "SNAPVIEW_CONFIG="+p)
	}
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, cfg.Bytes(), 0o600); err != nil {
		return nil, err
	}
	d.logFile, err = os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		return nil, err
	}

	// The freshly built shim and runc come first on PATH; the runc shim of the
	// same containerd version serves io.containerd.runc.v2.
	path := strings.Join([]string{
		filepath.Dir(tools.Shim),
		filepath.Dir(tools.Runc),
		filepath.Dir(tools.Containerd),
		os.Getenv("PATH"),
	}, string(os.PathListSeparator))
	d.argv = []string{tools.Containerd, "--config", cfgPath}
	if o.netns != "" {
		d.argv = append([]string{"nsenter", "--net=" + o.netns, "--"}, d.argv...)
	}
	d.env = append(append(os.Environ(), "PATH="+path), o.env...)
	if err := d.launch(ctx); err != nil {
		return nil, err
	}
	if err := d.checkPlugins(ctx); err != nil {
		return nil, err
	}
	return d, nil
}

// launch starts the daemon process and waits until it serves.
func (d *Daemon) launch(ctx context.Context) error {
	d.cmd = exec.Command(d.argv[0], d.argv[1:]...)
	d.cmd.Env = d.env
	d.cmd.Stdout = d.logFile
	d.cmd.Stderr = d.logFile
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		return fmt.Errorf("start containerd: %w", err)
	}
	d.waitErr = make(chan error, 1)
	go func(cmd *exec.Cmd, w chan error) { w <- cmd.Wait() }(d.cmd, d.waitErr)
	// What a node's service manager knows: the pid, for a restart by signal.
	if err := os.WriteFile(d.PidFile(), []byte(strconv.Itoa(d.cmd.Process.Pid)+"\n"), 0o644); err != nil {
		return err
	}
	return d.waitServing(ctx, 30*time.Second)
}

// PidFile holds the pid of the daemon process.
func (d *Daemon) PidFile() string { return filepath.Join(d.Dir, "containerd.pid") }

// Supervise starts the daemon process again whenever it exits by itself
// (a signal from a test, an installer's restart), as a node's service
// manager does, until the returned stop is called; call it before Stop.
func (d *Daemon) Supervise(ctx context.Context, logf func(format string, args ...any)) (stop func()) {
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		for {
			d.mu.Lock()
			w := d.waitErr
			d.mu.Unlock()
			select {
			case <-done:
				return
			case err := <-w:
				d.mu.Lock()
				logf("containerd exited (%v): starting it again", err)
				d.cmd = nil
				err = d.launch(ctx)
				d.mu.Unlock()
				if err != nil {
					logf("containerd did not start again: %v", err)
					return
				}
				logf("containerd started again (pid %d)", d.Pid())
			}
		}
	}()
	return func() { close(done); <-finished }
}

// StopProcess stops the daemon process with SIGTERM (SIGKILL after 10 s),
// leaving its shims, containers, directories and mounts as they are, as a
// containerd that is restarted or crashes would. The daemon's client stays,
// and reconnects once the daemon is started again.
func (d *Daemon) StopProcess() {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.waitErr:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.waitErr
	}
	d.cmd = nil
}

// StartProcess starts the daemon process again after StopProcess, with the
// same configuration, directories and environment.
func (d *Daemon) StartProcess(ctx context.Context) error {
	return d.launch(ctx)
}

// Restart stops and starts the daemon process.
func (d *Daemon) Restart(ctx context.Context) error {
	d.StopProcess()
	return d.StartProcess(ctx)
}

func makeExt4(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	f.Close()
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,nodiscard", path).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 %s: %w: %s", path, err, out)
	}
	return nil
}

func (d *Daemon) waitServing(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		select {
		case err := <-d.waitErr:
			d.waitErr <- err
			return fmt.Errorf("containerd exited before serving: %w\n%s", err, d.Log())
		default:
		}
		if _, err := os.Stat(d.Address); err == nil {
			if d.client != nil {
				// After a restart the same client reconnects, as a real
				// client of a restarted containerd does.
				if serving, err := d.client.IsServing(ctx); err == nil && serving {
					return nil
				}
			} else if c, err := client.New(d.Address, client.WithTimeout(2*time.Second)); err == nil {
				serving, err := c.IsServing(ctx)
				if err == nil && serving {
					d.client = c
					return nil
				}
				c.Close()
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("containerd did not serve within %s\n%s", timeout, d.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// requiredPlugins must load; any other plugin's init error other than a
// deliberate skip fails the start too.
var requiredPlugins = []string{
	"io.containerd.snapshotter.v1.overlayfs",
	"io.containerd.snapshotter.v1.native",
	"io.containerd.snapshotter.v1.blockfile",
	"io.containerd.snapshotter.v1.erofs",
	"io.containerd.runtime.v2.task",
	"io.containerd.service.v1.tasks-service",
}

func (d *Daemon) checkPlugins(ctx context.Context) error {
	resp, err := d.client.IntrospectionService().Plugins(ctx)
	if err != nil {
		return fmt.Errorf("list plugins: %w", err)
	}
	loaded := map[string]bool{}
	var failed []string
	for _, p := range resp.Plugins {
		id := p.Type + "." + p.ID
		if p.InitErr == nil {
			loaded[id] = true
			continue
		}
		if strings.Contains(p.InitErr.Message, "skip plugin") {
			continue
		}
		failed = append(failed, fmt.Sprintf("%s: %s", id, p.InitErr.Message))
	}
	if len(failed) > 0 {
		return fmt.Errorf("containerd plugins failed to load:\n  %s", strings.Join(failed, "\n  "))
	}
	required := requiredPlugins
	if d.CRI != nil {
		required = append(required, "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime")
	}
	for _, id := range required {
		if !loaded[id] {
			return fmt.Errorf("containerd plugin %s is not loaded (skipped?)\n%s", id, d.Log())
		}
	}
	d.Snapshotters = []string{"overlayfs", "native", "blockfile", "erofs"}
	return nil
}

// Pid returns the daemon's process id, or 0 if it is not running.
func (d *Daemon) Pid() int {
	if d.cmd == nil || d.cmd.Process == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// Client returns the daemon's client.
func (d *Daemon) Client() *client.Client { return d.client }

// Context returns ctx in the given namespace.
func Context(ctx context.Context, ns string) context.Context {
	return namespaces.WithNamespace(ctx, ns)
}

// Log returns the daemon's log (which includes the shims' logs).
func (d *Daemon) Log() string {
	b, err := os.ReadFile(filepath.Join(d.Dir, "containerd.log"))
	if err != nil {
		return fmt.Sprintf("(no containerd log: %v)", err)
	}
	return string(b)
}

// Stop stops the daemon with SIGTERM, then SIGKILL after 10 s, kills any
// shim it left, unmounts everything under its directory and removes it.
func (d *Daemon) Stop() error {
	if d.client != nil {
		d.client.Close()
		d.client = nil
	}
	var errs []error
	if d.cmd != nil && d.cmd.Process != nil {
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.waitErr:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
			<-d.waitErr
		}
	}
	// Shims run in their own process groups; kill those started for this daemon.
	killShims(d.Address)
	if d.logFile != nil {
		d.logFile.Close()
	}
	for _, dir := range []string{d.RunDir, d.Dir} {
		if dir == "" {
			continue
		}
		if err := mount.UnmountRecursive(dir, 0); err != nil {
			errs = append(errs, err)
		}
		detachLoops(dir)
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killShims kills the shim processes started for the daemon at address.
func killShims(address string) {
	for _, pid := range shimPids(address) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}
