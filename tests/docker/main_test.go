// Package docker runs snapview under the Docker Engine, as Docker's users
// reach it: dockerd (moby's github.com/moby/moby/v2, built by
// hack/install-clients.sh) on a private containerd v2.4 with the containerd
// image store, in a network namespace the test made, driven by moby's Go
// client. It needs root; `make docker-e2e` (or `make test` as root) runs it.
//
// Docker prepares and mounts each container's rootfs itself and records no
// snapshot on the containerd container, so today snapview runs Docker's
// containers as runc does and refuses every annotation that asks for its
// view; TestDockerAnnotations holds those refusals in a table that the
// views for Docker's containers (issue 26, part 3) turn into successes.
package docker

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moby/moby/client"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

const (
	snapviewRT = "io.containerd.snapview.v2"
	// snapviewNamed is the daemon.json runtime whose runtimeType is
	// snapview's and whose options.ConfigPath names suite.config.
	snapviewNamed = "snapview"
	testImage     = "docker.io/snapview/test:latest"
	modelsImage   = "docker.io/snapview/vol-models:1"
)

// ns is Docker's containerd namespace, unique per test process: runc
// keeps its state under a fixed root per namespace.
var ns = fmt.Sprintf("snapview-moby-%d", os.Getpid())

var suite struct {
	skip   string
	tools  harness.Tools
	dir    string
	daemon *harness.Daemon
	docker *harness.Dockerd
	api    *client.Client
	image  *harness.Image
	models *harness.Image
	// config is the file the daemon.json runtime "snapview" names as
	// options.ConfigPath (absent: snapview's defaults).
	config string
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Getuid() != 0 {
		suite.skip = "the Docker e2e tests need root (a private containerd, dockerd, mounts)"
		return m.Run()
	}
	tools, err := harness.ToolsFromEnv(false)
	if err != nil {
		fmt.Fprintln(os.Stderr, "docker e2e:", err)
		return 1
	}
	suite.tools = tools
	if why := harness.NeedClient("SNAPVIEW_DOCKERD", tools.Dockerd); why != "" {
		suite.skip = why
		return m.Run()
	}
	// Short: dockerd's API socket lives under it.
	suite.dir, err = os.MkdirTemp("", "snapview-docker-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "docker e2e:", err)
		return 1
	}
	defer os.RemoveAll(suite.dir)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := start(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "docker e2e:", err)
		stop()
		return 1
	}
	code := m.Run()
	if err := stop(); err != nil {
		fmt.Fprintln(os.Stderr, "docker e2e: stop:", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// start builds the images, starts containerd and dockerd, and loads the
// images through Docker's API.
func start(ctx context.Context) error {
	var err error
	suite.image, err = harness.BuildImage(suite.dir, harness.ImageSpec{Ref: testImage, KernelSize: 8 << 20})
	if err != nil {
		return fmt.Errorf("build image: %w", err)
	}
	weights := make([]byte, 1<<20)
	for i := range weights {
		weights[i] = byte(i * 7)
	}
	models, err := harness.Compose(modelsImage, ocispec.ImageConfig{},
		harness.NewLayer().Dir("weights", 0o755).File("weights/model.bin", 0o644, weights))
	if err != nil {
		return err
	}
	archive, err := models.WriteArchiveFile(suite.dir)
	if err != nil {
		return err
	}
	suite.models = &harness.Image{Ref: modelsImage, Archive: archive, Files: models.Files}

	// snapview's default file ($SNAPVIEW_CONFIG) is never written: a
	// container of the runtime named by type gets the defaults.
	suite.daemon, err = harness.StartDaemon(ctx, suite.dir, suite.tools,
		harness.WithEnv("SNAPVIEW_CONFIG="+filepath.Join(suite.dir, "snapview-default.toml")))
	if err != nil {
		return err
	}
	suite.config = filepath.Join(suite.dir, "snapview.toml")
	daemonJSON := fmt.Sprintf(`{"runtimes": {%q: {"runtimeType": %q, "options": {"ConfigPath": %q}}}}`, snapviewNamed, snapviewRT, suite.config)
	suite.docker, err = harness.StartDockerd(ctx, suite.tools.Dockerd, suite.daemon, suite.dir, harness.DockerdConfig{Namespace: ns, DaemonJSON: daemonJSON})
	if err != nil {
		return err
	}
	suite.api, err = client.New(client.WithHost(suite.docker.Host()))
	if err != nil {
		return err
	}
	for _, img := range []*harness.Image{suite.image, suite.models} {
		if err := load(ctx, img); err != nil {
			return err
		}
	}
	return nil
}

// load loads img's OCI archive through Docker's image load API, as
// `docker load` does.
func load(ctx context.Context, img *harness.Image) error {
	f, err := os.Open(img.Archive)
	if err != nil {
		return err
	}
	defer f.Close()
	res, err := suite.api.ImageLoad(ctx, f)
	if err != nil {
		return fmt.Errorf("load %s: %w", img.Ref, err)
	}
	defer res.Close()
	out, err := io.ReadAll(res)
	if err != nil {
		return fmt.Errorf("load %s: %w", img.Ref, err)
	}
	// Docker names images of docker.io without the registry.
	if short := strings.TrimPrefix(img.Ref, "docker.io/"); !strings.Contains(string(out), "Loaded image: "+short) {
		return fmt.Errorf("load %s: %s", img.Ref, out)
	}
	return nil
}

func stop() error {
	var errs []string
	if suite.api != nil {
		suite.api.Close()
	}
	if suite.docker != nil {
		if err := suite.docker.Stop(); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if suite.daemon != nil {
		if err := suite.daemon.Stop(); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// setup starts a test: it skips without root or dockerd, registers the
// forced cleanup (every Docker container removed with force) and then the
// leak check, which so runs first: containerd's (snapview's leases, views
// and mounts, containers in every namespace, loop devices, shims), Docker's
// container list, and the mounts under dockerd's directory; on failure it
// logs the tails of dockerd's and containerd's logs.
func setup(t *testing.T) context.Context {
	t.Helper()
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		list, err := suite.api.ContainerList(ctx, client.ContainerListOptions{All: true})
		if err != nil {
			t.Errorf("cleanup: list containers: %v", err)
			return
		}
		for _, c := range list.Items {
			if _, err := suite.api.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true}); err != nil {
				t.Errorf("cleanup: remove %s: %v", c.ID, err)
			}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	d, k := suite.daemon, suite.docker
	logStart, dockerLogStart := len(d.Log()), len(k.Log())
	t.Cleanup(func() {
		defer cancel()
		if err := d.CheckLeaks(context.Background()); err != nil {
			t.Errorf("leak check: %v", err)
		}
		list, err := suite.api.ContainerList(context.Background(), client.ContainerListOptions{All: true})
		if err != nil {
			t.Errorf("leak check: list Docker's containers: %v", err)
		}
		for _, c := range list.Items {
			t.Errorf("leak check: Docker lists container %s %v (%s)", c.ID, c.Names, c.State)
		}
		if m := k.Mounts(); len(m) > 0 {
			t.Errorf("leak check: mounts under dockerd's directory:\n  %s", strings.Join(m, "\n  "))
		}
		if t.Failed() {
			t.Logf("dockerd log during this test:\n%s", tail(k.Log(), dockerLogStart, 100))
			t.Logf("containerd %s log (with shim logs) during this test:\n%s", d.Version, tail(d.Log(), logStart, 100))
		}
	})
	return ctx
}

// tail returns the last n lines of log written after offset start.
func tail(log string, start, n int) string {
	if start <= len(log) {
		log = log[start:]
	}
	l := strings.Split(log, "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}
