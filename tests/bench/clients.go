package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/snapview/snapview/tests/e2e/harness"
)

var clientRows = flag.Bool("clients", true, "also compare `nerdctl run --rm` and Docker's run --rm (create, start, wait, remove through the Engine API) on runc and snapview, views on and off (first daemon; skipped, saying so, when SNAPVIEW_NERDCTL or SNAPVIEW_DOCKERD is unset)")

const (
	nerdctlNS = "snapview-bench-nerdctl"
	dockerNS  = "snapview-bench-moby"
	// dockerAPI is the Engine API version the benchmark speaks: 1.43 is
	// the first with HostConfig.Annotations.
	dockerAPI = "v1.44"
)

// clientAnn are the annotations of a client row: views on asks for a boot
// artifact, views off turns snapview's view off. runc gets the same
// annotations (and ignores them), so the commands differ only in the
// runtime.
func clientAnn(viewsOff bool) map[string]string {
	if viewsOff {
		return map[string]string{"io.snapview.mode": "off"}
	}
	return map[string]string{"io.snapview.boot.kernel": harness.KernelPath}
}

// clients compares, on runc and on snapview, the two container clients
// people type: a whole `nerdctl run --rm` (the command, from its start to
// its exit), and what `docker run --rm` asks of dockerd (create, start,
// wait, remove through the Engine API), each with views on and off. Docker
// records no image snapshot on containerd's container, so snapview cannot
// give it a view; a row snapview refuses says so instead of timing.
func (b *bench) clients(ctx context.Context, img *harness.Image) error {
	tools := b.d.Tools
	if tools.Nerdctl == "" || tools.Dockerd == "" {
		fmt.Printf("\nclients: skipped (%s%s)\n", harness.NeedClient("SNAPVIEW_NERDCTL", tools.Nerdctl), harness.NeedClient("SNAPVIEW_DOCKERD", tools.Dockerd))
		return nil
	}
	dir, err := os.MkdirTemp(b.dir, "clients-")
	if err != nil {
		return err
	}
	n := &benchNerdctl{bin: tools.Nerdctl, global: []string{
		"--address", b.d.Address, "--namespace", nerdctlNS, "--data-root", filepath.Join(dir, "nerdctl"),
		"--cni-netconfpath", filepath.Join(dir, "cni"), "--cgroup-manager", "cgroupfs",
	}, env: append(os.Environ(), "NERDCTL_TOML="+filepath.Join(dir, "nerdctl.toml"))}
	if out, err := n.run(ctx, "load", "-i", img.Archive); err != nil {
		return fmt.Errorf("nerdctl load: %w: %s", err, out)
	}
	k, err := harness.StartDockerd(ctx, tools.Dockerd, b.d, dir, harness.DockerdConfig{Namespace: dockerNS})
	if err != nil {
		return err
	}
	defer k.Stop()
	dk := &benchDocker{hc: k.HTTPClient()}
	if err := dk.load(ctx, img.Archive); err != nil {
		return err
	}

	type clientRow struct {
		name     string
		viewsOff bool
		measure  func(rt string, viewsOff bool, i int) (time.Duration, error)
	}
	nerdctlRun := func(rt string, viewsOff bool, i int) (time.Duration, error) {
		args := []string{"run", "--rm", "--pull", "never", "--network", "none", "--runtime", rt}
		for k, v := range clientAnn(viewsOff) {
			args = append(args, "--annotation", k+"="+v)
		}
		t0 := time.Now()
		out, err := n.run(ctx, append(args, "--entrypoint", "true", small)...)
		if err != nil {
			return 0, fmt.Errorf("nerdctl run (%s): %w: %s", rt, err, out)
		}
		return time.Since(t0), nil
	}
	dockerRun := func(rt string, viewsOff bool, i int) (time.Duration, error) {
		return dk.runRm(ctx, rt, clientAnn(viewsOff))
	}
	var out [][]string
	var notes []string
	for _, r := range []clientRow{
		{"nerdctl run --rm (whole command), views on (a boot artifact)", false, nerdctlRun},
		{"nerdctl run --rm (whole command), views off (mode off)", true, nerdctlRun},
		{"Docker run --rm (create, start, wait, remove), views on (a boot artifact)", false, dockerRun},
		{"Docker run --rm (create, start, wait, remove), views off (mode off)", true, dockerRun},
	} {
		got := samples{}
		var refused error
		for i := range *iterations {
			for _, rt := range order(i) {
				d, err := r.measure(rt, r.viewsOff, i)
				if err != nil && rt == snapview && strings.Contains(err.Error(), "snapview: ") && strings.Contains(err.Error(), "no image snapshot") {
					refused = err
					break
				}
				if err != nil {
					return fmt.Errorf("%s: %w", r.name, err)
				}
				got.add(rt, d)
			}
			if refused != nil {
				break
			}
		}
		if refused != nil {
			msg := refused.Error()
			if i := strings.Index(msg, "snapview: "); i >= 0 {
				msg = msg[i:]
			}
			out = append(out, []string{r.name, "-", "refused*", "-", "-", "-"})
			notes = append(notes, fmt.Sprintf("* %s: %s", r.name, msg))
			continue
		}
		out = append(out, []string{r.name, ms(median(got[runc])), ms(median(got[snapview])), fmt.Sprintf("%.3f", got.ratio()),
			ms(percentile(got[runc], 95)), ms(percentile(got[snapview], 95))})
	}
	fmt.Printf("\nclients on containerd %s (%s; dockerd: %s), %d runs per runtime and row, alternated\n",
		b.d.Version, version(tools.Nerdctl), version(tools.Dockerd), *iterations)
	table([]string{"", "runc median", "snapview median", "ratio", "runc p95", "snapview p95"}, out)
	for _, n := range notes {
		fmt.Println("  " + n)
	}
	if m := k.Mounts(); len(m) > 0 {
		return fmt.Errorf("mounts left under dockerd's directory: %v", m)
	}
	return nil
}

// version returns the first line of `bin --version`.
func version(bin string) string {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return "?"
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}

// benchNerdctl runs nerdctl against the benchmark's daemon, in a
// namespace, data root and CNI directory of its own.
type benchNerdctl struct {
	bin    string
	global []string
	env    []string
}

func (n *benchNerdctl) run(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, n.bin, append(append([]string(nil), n.global...), args...)...)
	cmd.Env = n.env
	return cmd.CombinedOutput()
}

// benchDocker speaks the Engine API, as the docker CLI does, over
// dockerd's socket; the benchmark's module imports nothing of moby.
type benchDocker struct{ hc *http.Client }

// call sends body (JSON, or a reader for a raw body) to the API and
// decodes the JSON answer into out, if any; a status of 300 or more is an
// error carrying the daemon's message.
func (k *benchDocker) call(ctx context.Context, method, path string, body any, out any) error {
	var r io.Reader
	ctype := "application/json"
	switch b := body.(type) {
	case nil:
	case io.Reader:
		r, ctype = b, "application/x-tar"
	default:
		j, err := json.Marshal(b)
		if err != nil {
			return err
		}
		r = bytes.NewReader(j)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://docker/"+dockerAPI+path, r)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", ctype)
	resp, err := k.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		var e struct{ Message string }
		if json.Unmarshal(raw, &e) == nil && e.Message != "" {
			return errors.New(e.Message)
		}
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, raw)
	}
	if out != nil {
		return json.Unmarshal(raw, out)
	}
	return nil
}

// load loads an OCI archive as `docker load` does.
func (k *benchDocker) load(ctx context.Context, archive string) error {
	f, err := os.Open(archive)
	if err != nil {
		return err
	}
	defer f.Close()
	return k.call(ctx, http.MethodPost, "/images/load?quiet=1", f, nil)
}

// runRm times what `docker run --rm --runtime rt --annotation … --network
// none --entrypoint true IMAGE` asks of dockerd: create, start, wait for
// the exit, remove.
func (k *benchDocker) runRm(ctx context.Context, rt string, ann map[string]string) (time.Duration, error) {
	t0 := time.Now()
	var created struct{ ID string }
	err := k.call(ctx, http.MethodPost, "/containers/create", map[string]any{
		"Image":      small,
		"Entrypoint": []string{"true"},
		"HostConfig": map[string]any{"Runtime": rt, "NetworkMode": "none", "Annotations": ann},
	}, &created)
	if err != nil {
		return 0, err
	}
	defer k.call(context.WithoutCancel(ctx), http.MethodDelete, "/containers/"+created.ID+"?force=1", nil, nil)
	if err := k.call(ctx, http.MethodPost, "/containers/"+created.ID+"/start", nil, nil); err != nil {
		return 0, err
	}
	var exit struct{ StatusCode int }
	if err := k.call(ctx, http.MethodPost, "/containers/"+created.ID+"/wait?condition=not-running", nil, &exit); err != nil {
		return 0, err
	}
	if exit.StatusCode != 0 {
		return 0, fmt.Errorf("container exited %d", exit.StatusCode)
	}
	if err := k.call(ctx, http.MethodDelete, "/containers/"+created.ID, nil, nil); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}
