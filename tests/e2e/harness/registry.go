package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Registry is a CNCF Distribution registry (the `registry` command of
// github.com/distribution/distribution/v3, built by hack/install-clients.sh)
// on loopback: plain HTTP on 127.0.0.1 at a port the kernel chose, its
// storage in a directory of its own, its access log captured so that a test
// can count what was pushed and pulled. containerd and nerdctl talk plain
// HTTP to a registry on localhost or 127.0.0.1 without being told.
type Registry struct {
	// Addr is host:port, e.g. 127.0.0.1:41234; an image reference names
	// the registry by it (127.0.0.1:41234/snapview/test:latest).
	Addr string
	// Dir holds config.yml, storage/, access.log and registry.log.
	Dir string

	cmd  *exec.Cmd
	done chan struct{}
}

// registryConfig is the registry's configuration: loopback, a port of the
// kernel's choosing, filesystem storage, deletes allowed, no debug server,
// no health checks; the access log (Apache combined format) goes to stdout.
const registryConfig = `version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:0
`

// StartRegistry starts the registry binary bin (Tools.Registry) with its
// files in a new directory under parent, and returns once GET /v2/ answers.
// Stop it with Stop; its directory stays, for the caller's temporary
// directory to remove.
func StartRegistry(ctx context.Context, bin, parent string) (_ *Registry, retErr error) {
	if bin == "" {
		return nil, errors.New(NeedClient("SNAPVIEW_REGISTRY", bin))
	}
	dir, err := os.MkdirTemp(parent, "registry-")
	if err != nil {
		return nil, err
	}
	r := &Registry{Dir: dir, done: make(chan struct{})}
	cfg := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, registryConfig, filepath.Join(dir, "storage")), 0o600); err != nil {
		return nil, err
	}
	access, err := os.Create(r.accessLogPath())
	if err != nil {
		return nil, err
	}
	logf, err := os.Create(r.logPath())
	if err != nil {
		access.Close()
		return nil, err
	}
	r.cmd = exec.Command(bin, "serve", cfg)
	// No OpenTelemetry exporter: the default one would send traces to
	// localhost:4318.
	r.cmd.Env = append(os.Environ(), "OTEL_TRACES_EXPORTER=none")
	r.cmd.Stdout, r.cmd.Stderr = access, logf
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = r.cmd.Start()
	access.Close()
	logf.Close()
	if err != nil {
		return nil, fmt.Errorf("start the registry: %w", err)
	}
	go func() { _ = r.cmd.Wait(); close(r.done) }()
	defer func() {
		if retErr != nil {
			r.Stop()
		}
	}()

	// The registry logs the address it listens on ("listening on
	// 127.0.0.1:41234"); then /v2/ must answer.
	listening := regexp.MustCompile(`listening on (127\.0\.0\.1:[0-9]+)`)
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-r.done:
			return nil, fmt.Errorf("the registry exited before serving:\n%s", r.Log())
		default:
		}
		if r.Addr == "" {
			if m := listening.FindStringSubmatch(r.Log()); m != nil {
				r.Addr = m[1]
			}
		}
		if r.Addr != "" {
			if code, err := r.get(ctx, "/v2/"); err == nil && code == http.StatusOK {
				return r, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the registry did not serve within 30s:\n%s", r.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *Registry) accessLogPath() string { return filepath.Join(r.Dir, "access.log") }
func (r *Registry) logPath() string       { return filepath.Join(r.Dir, "registry.log") }

// URL returns the registry's base URL, http://127.0.0.1:<port>.
func (r *Registry) URL() string { return "http://" + r.Addr }

func (r *Registry) get(ctx context.Context, path string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.URL()+path, nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// Log returns the registry's own log (not the access log).
func (r *Registry) Log() string {
	b, err := os.ReadFile(r.logPath())
	if err != nil {
		return fmt.Sprintf("(no registry log: %v)", err)
	}
	return string(b)
}

// Running reports whether the registry process is still running.
func (r *Registry) Running() bool {
	select {
	case <-r.done:
		return false
	default:
		return true
	}
}

// Stop stops the registry with SIGTERM, SIGKILL after 10 s. Its directory,
// and so its access log, stay.
func (r *Registry) Stop() {
	if r.cmd == nil || r.cmd.Process == nil {
		return
	}
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-r.cmd.Process.Pid, syscall.SIGKILL)
		<-r.done
	}
}

// Request is one line of the registry's access log.
type Request struct {
	Method string
	Path   string // the request's path, without the query
	Query  url.Values
	Status int
	Bytes  int64 // the response body's size
}

// accessLine matches the Apache combined format the registry writes:
// host ident user [time] "METHOD URI PROTO" status size "referer" "agent".
var accessLine = regexp.MustCompile(`^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)`)

// Requests returns the requests the registry has answered so far, in order.
func (r *Registry) Requests() ([]Request, error) {
	f, err := os.Open(r.accessLogPath())
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Request
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		m := accessLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		u, err := url.ParseRequestURI(m[2])
		if err != nil {
			continue
		}
		status, _ := strconv.Atoi(m[3])
		size, _ := strconv.ParseInt(m[4], 10, 64) // "-" is 0
		out = append(out, Request{Method: m[1], Path: u.Path, Query: u.Query(), Status: status, Bytes: size})
	}
	return out, sc.Err()
}

// BlobUploads counts, per digest, the blobs pushed whole: an upload
// completed (PUT …/blobs/uploads/<id>?digest=…, 201) or made in one
// request (POST …/blobs/uploads/?digest=…, 201). A blob mounted from
// another repository (POST ?mount=…&from=…) is not an upload; MountedBlobs
// counts those.
func (r *Registry) BlobUploads() (map[string]int, error) {
	reqs, err := r.Requests()
	if err != nil {
		return nil, err
	}
	n := map[string]int{}
	for _, q := range reqs {
		if q.Status != http.StatusCreated || !strings.Contains(q.Path, "/blobs/uploads/") {
			continue
		}
		if d := q.Query.Get("digest"); d != "" && (q.Method == http.MethodPut || q.Method == http.MethodPost) {
			n[d]++
		}
	}
	return n, nil
}

// MountedBlobs counts, per digest, the blobs a client mounted from another
// repository of the registry instead of uploading them (201).
func (r *Registry) MountedBlobs() (map[string]int, error) {
	reqs, err := r.Requests()
	if err != nil {
		return nil, err
	}
	n := map[string]int{}
	for _, q := range reqs {
		if q.Method == http.MethodPost && q.Status == http.StatusCreated && strings.Contains(q.Path, "/blobs/uploads/") && q.Query.Get("mount") != "" {
			n[q.Query.Get("mount")]++
		}
	}
	return n, nil
}

// BlobDownloads counts, per digest, the blobs served whole or in part
// (GET …/blobs/<digest>, 200 or 206). HEAD requests, which only ask whether
// a blob exists, are not downloads.
func (r *Registry) BlobDownloads() (map[string]int, error) {
	reqs, err := r.Requests()
	if err != nil {
		return nil, err
	}
	n := map[string]int{}
	for _, q := range reqs {
		if q.Method != http.MethodGet || (q.Status != http.StatusOK && q.Status != http.StatusPartialContent) {
			continue
		}
		i := strings.LastIndex(q.Path, "/blobs/")
		if i < 0 || strings.Contains(q.Path, "/blobs/uploads/") {
			continue
		}
		n[q.Path[i+len("/blobs/"):]]++
	}
	return n, nil
}
