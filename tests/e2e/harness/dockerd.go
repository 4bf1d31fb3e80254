package harness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/moby/sys/mountinfo"
)

// Dockerd is the Docker Engine's daemon (dockerd, built by
// hack/install-clients.sh from moby's github.com/moby/moby/v2) on a
// private containerd, as `make docker-e2e` and the benchmark run it:
//   - in a network namespace of its own, made for it, with loopback only:
//     no bridge, no iptables, no IP forwarding, no userland proxy, so that
//     it touches nothing of the host's network;
//   - with its data root, exec root, pid file, socket and daemon.json in a
//     directory of its own;
//   - on the containerd image store (its images and snapshots in
//     containerd, namespace Namespace), with the cgroupfs driver.
//
// It imports nothing of moby: tests drive it through its API socket.
type Dockerd struct {
	Dir string
	// Socket is the Engine API's unix socket; Host is its address for a
	// client (unix://<Socket>).
	Socket string
	// Namespace is the containerd namespace of Docker's containers and
	// images; its plugins (BuildKit's) use Namespace-plugins.
	Namespace string
	// ConfigFile is the daemon.json it was started with.
	ConfigFile string
	// NetNS is the path of its network namespace.
	NetNS string

	netnsName string
	cmd       *exec.Cmd
	done      chan struct{}
}

// DockerdConfig configures a Dockerd.
type DockerdConfig struct {
	// Namespace is the containerd namespace of its containers and images.
	Namespace string
	// DaemonJSON is the body of its daemon.json (default {}). It must not
	// set what the harness sets on the command line (exec-opts, the
	// network, the roots): dockerd refuses a directive given both ways.
	DaemonJSON string
}

var netnsSeq atomic.Int64

// StartDockerd starts dockerd (bin, Tools.Dockerd) in a new directory
// under parent (keep it short: the API socket lives there), pointed at
// daemon d, and returns once its API answers /_ping.
func StartDockerd(ctx context.Context, bin string, d *Daemon, parent string, c DockerdConfig) (_ *Dockerd, retErr error) {
	if bin == "" {
		return nil, errors.New(NeedClient("SNAPVIEW_DOCKERD", bin))
	}
	if c.Namespace == "" {
		return nil, errors.New("dockerd needs a containerd namespace")
	}
	if c.DaemonJSON == "" {
		c.DaemonJSON = "{}"
	}
	dir, err := os.MkdirTemp(parent, "dockerd-")
	if err != nil {
		return nil, err
	}
	k := &Dockerd{
		Dir:        dir,
		Socket:     filepath.Join(dir, "docker.sock"),
		Namespace:  c.Namespace,
		ConfigFile: filepath.Join(dir, "daemon.json"),
		done:       make(chan struct{}),
	}
	defer func() {
		if retErr != nil {
			_ = k.Stop()
		}
	}()
	if err := os.WriteFile(k.ConfigFile, []byte(c.DaemonJSON), 0o600); err != nil {
		return nil, err
	}
	name := fmt.Sprintf("snapview-docker-%d-%d", os.Getpid(), netnsSeq.Add(1))
	if out, err := exec.CommandContext(ctx, "ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %w: %s", name, err, out)
	}
	k.netnsName, k.NetNS = name, "/run/netns/"+name
	if out, err := exec.CommandContext(ctx, "ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip -n %s link set lo up: %w: %s", name, err, out)
	}
	logf, err := os.Create(k.logPath())
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	k.cmd = exec.Command("nsenter", "--net="+k.NetNS, "--", bin,
		"--containerd="+d.Address,
		"--containerd-namespace", c.Namespace,
		"--containerd-plugins-namespace", c.Namespace+"-plugins",
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "docker.pid"),
		"-H", k.Host(),
		"--config-file", k.ConfigFile,
		"--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--userland-proxy=false",
		"--feature", "containerd-snapshotter=true",
		"--exec-opt", "native.cgroupdriver=cgroupfs",
	)
	// The same runc the daemon's shims run first on PATH, for `runc
	// features`, which dockerd asks at start.
	k.cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(d.Tools.Runc)+string(os.PathListSeparator)+os.Getenv("PATH"))
	k.cmd.Stdout, k.cmd.Stderr = logf, logf
	k.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := k.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start dockerd: %w", err)
	}
	go func() { _ = k.cmd.Wait(); close(k.done) }()

	hc := k.HTTPClient()
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-k.done:
			return nil, fmt.Errorf("dockerd exited before serving:\n%s", k.Log())
		default:
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/_ping", nil)
		if resp, err := hc.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return k, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("dockerd did not serve within 60s:\n%s", k.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Host returns the API's address for a Docker client: unix://<Socket>.
func (k *Dockerd) Host() string { return "unix://" + k.Socket }

// HTTPClient returns an HTTP client that talks to the API socket whatever
// the URL's host (e.g. http://docker/v1.44/containers/json).
func (k *Dockerd) HTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", k.Socket)
		},
	}}
}

func (k *Dockerd) logPath() string { return filepath.Join(k.Dir, "dockerd.log") }

// Log returns dockerd's log.
func (k *Dockerd) Log() string {
	b, err := os.ReadFile(k.logPath())
	if err != nil {
		return fmt.Sprintf("(no dockerd log: %v)", err)
	}
	return string(b)
}

// Pid returns dockerd's process id.
func (k *Dockerd) Pid() int {
	b, err := os.ReadFile(filepath.Join(k.Dir, "docker.pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// Mounts lists the mounts under dockerd's directory but its data root's
// own (dockerd makes its data root a shared mount while it runs): none once
// every container is removed (a running one has its rootfs and network
// namespace mounted there).
func (k *Dockerd) Mounts() []string {
	var out []string
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(k.Dir))
	if err != nil {
		return []string{fmt.Sprintf("read mountinfo: %v", err)}
	}
	for _, m := range mounts {
		if m.Mountpoint == filepath.Join(k.Dir, "data") {
			continue
		}
		out = append(out, fmt.Sprintf("mount %s (%s from %s)", m.Mountpoint, m.FSType, m.Source))
	}
	return out
}

// Stop stops dockerd with SIGTERM (SIGKILL after 30 s: it first stops its
// containers), unmounts what it left under its directory, removes the
// directory and its network namespace.
func (k *Dockerd) Stop() error {
	var errs []error
	if k.cmd != nil && k.cmd.Process != nil {
		_ = k.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-k.done:
		case <-time.After(30 * time.Second):
			_ = syscall.Kill(-k.cmd.Process.Pid, syscall.SIGKILL)
			<-k.done
			errs = append(errs, errors.New("dockerd did not stop within 30s of SIGTERM"))
		}
	}
	if err := mount.UnmountRecursive(k.Dir, 0); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(k.Dir); err != nil {
		errs = append(errs, err)
	}
	if k.netnsName != "" {
		if out, err := exec.Command("ip", "netns", "del", k.netnsName).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %w: %s", k.netnsName, err, out))
		}
	}
	return errors.Join(errs...)
}
