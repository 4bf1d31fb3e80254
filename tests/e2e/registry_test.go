package e2e

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// TestRegistryHarness starts the Distribution registry the harness offers
// to the push and pull tests, pushes nothing, and checks that it serves the
// distribution API on loopback (GET /v2/), that its access log is read back
// request by request with nothing counted as a blob upload or download, and
// that Stop ends it.
func TestRegistryHarness(t *testing.T) {
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	if why := harness.NeedClient("SNAPVIEW_REGISTRY", suite.tools.Registry); why != "" {
		t.Skip(why)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := harness.StartRegistry(ctx, suite.tools.Registry, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	if host, _, err := net.SplitHostPort(r.Addr); err != nil || host != "127.0.0.1" {
		t.Fatalf("registry address %q (%v), want 127.0.0.1:<port>", r.Addr, err)
	}

	get := func(path string) (int, string, http.Header) {
		t.Helper()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.URL()+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.Header
	}
	code, body, hdr := get("/v2/")
	if code != http.StatusOK || strings.TrimSpace(body) != "{}" || hdr.Get("Docker-Distribution-Api-Version") != "registry/2.0" {
		t.Errorf("GET /v2/: %d %q %v", code, body, hdr)
	}
	missing := "sha256:" + strings.Repeat("0", 64)
	if code, body, _ := get("/v2/snapview/none/blobs/" + missing); code != http.StatusNotFound {
		t.Errorf("GET of a missing blob: %d %q", code, body)
	}

	reqs, err := r.Requests()
	if err != nil {
		t.Fatal(err)
	}
	var sawRoot, sawBlob bool
	for _, q := range reqs {
		sawRoot = sawRoot || (q.Method == http.MethodGet && q.Path == "/v2/" && q.Status == http.StatusOK)
		sawBlob = sawBlob || (q.Method == http.MethodGet && q.Path == "/v2/snapview/none/blobs/"+missing && q.Status == http.StatusNotFound)
	}
	if !sawRoot || !sawBlob {
		t.Errorf("the access log lacks GET /v2/ (200) or the missing blob's GET (404): %+v", reqs)
	}
	up, err := r.BlobUploads()
	if err != nil || len(up) != 0 {
		t.Errorf("blob uploads %v %v, want none", up, err)
	}
	down, err := r.BlobDownloads()
	if err != nil || len(down) != 0 {
		t.Errorf("blob downloads %v %v, want none (a 404 is not a download)", down, err)
	}

	r.Stop()
	if r.Running() {
		t.Error("the registry runs after Stop")
	}
	if c, err := net.DialTimeout("tcp", r.Addr, time.Second); err == nil {
		c.Close()
		t.Errorf("something still listens on %s after Stop", r.Addr)
	}
}
