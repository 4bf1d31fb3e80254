package main

import (
	"fmt"
	"net"
	"net/http"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// registry is a read-only OCI distribution registry on loopback, serving
// composed images by repository and tag or digest: enough for containerd's
// puller (GET /v2/, HEAD and GET of manifests and blobs). containerd talks
// plain HTTP to localhost registries.
type registry struct {
	addr string
	// tags maps "repo:tag" (the repository without the registry host) to
	// an image, served by tag as an image index.
	tags  map[string]*harness.OCIImage
	index map[string]ocispec.Descriptor
	srv   *http.Server
}

func startRegistry(images map[string]*harness.OCIImage) (*registry, error) {
	r := &registry{tags: images, index: map[string]ocispec.Descriptor{}}
	for name, img := range images {
		d, err := img.Index()
		if err != nil {
			return nil, err
		}
		r.index[name] = d
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r.addr = ln.Addr().String()
	r.srv = &http.Server{Handler: r}
	go func() { _ = r.srv.Serve(ln) }()
	return r, nil
}

func (r *registry) close() { _ = r.srv.Close() }

func (r *registry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		http.Error(w, "read-only registry", http.StatusMethodNotAllowed)
		return
	}
	path := strings.TrimPrefix(req.URL.Path, "/v2/")
	if path == "" || req.URL.Path == "/v2" {
		w.WriteHeader(http.StatusOK)
		return
	}
	var repo, kind, ref string
	for _, k := range []string{"/manifests/", "/blobs/"} {
		if i := strings.LastIndex(path, k); i > 0 {
			repo, kind, ref = path[:i], strings.Trim(k, "/"), path[i+len(k):]
		}
	}
	if repo == "" {
		http.NotFound(w, req)
		return
	}
	var (
		data      []byte
		mediaType = "application/octet-stream"
	)
	switch {
	case kind == "manifests" && !strings.HasPrefix(ref, "sha256:"):
		img, ok := r.tags[repo+":"+ref]
		if !ok {
			http.NotFound(w, req)
			return
		}
		idx := r.index[repo+":"+ref]
		data, _ = img.Blob(idx.Digest)
		mediaType = idx.MediaType
	default:
		d, err := digest.Parse(ref)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		for name, img := range r.tags {
			if !strings.HasPrefix(name, repo+":") {
				continue
			}
			if b, ok := img.Blob(d); ok {
				data = b
				if kind == "manifests" {
					mediaType = img.Manifest.MediaType
					if d == r.index[name].Digest {
						mediaType = r.index[name].MediaType
					}
				}
			}
		}
		if data == nil {
			http.NotFound(w, req)
			return
		}
	}
	w.Header().Set("Content-Type", mediaType)
	w.Header().Set("Content-Length", fmt.Sprint(len(data)))
	w.Header().Set("Docker-Content-Digest", digest.FromBytes(data).String())
	w.WriteHeader(http.StatusOK)
	if req.Method == http.MethodGet {
		_, _ = w.Write(data)
	}
}
