package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// travelImageRef is an image only TestSnapshotBetweenNodes uses, so that
// the node a snapshot is pulled on lacks (some of) its base's layers.
const travelImageRef = "docker.io/snapview/travel:1"

// travelScript changes a container's filesystem as snapshotScript does
// and puts a FIFO in /data, which a directory snapshot leaves out.
const travelScript = `mkdir -p /data/sub && echo hello > /data/sub/hello && echo changed > /etc/motd && rm -f /etc/profile && ` +
	`ln -s /data/sub/hello /data/link && mkfifo /data/pipe && echo ready; exec sleep 300`

// ctrCmd runs ctr with args against daemon d and returns its output.
func ctrCmd(ctx context.Context, t *testing.T, d *harness.Daemon, args ...string) string {
	t.Helper()
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	full := append([]string{"--address", d.Address, "--namespace", ns}, args...)
	out, err := exec.CommandContext(cctx, d.Tools.Ctr(), full...).CombinedOutput()
	if err != nil {
		t.Fatalf("ctr %s: %v\n%s", strings.Join(full, " "), err, out)
	}
	return string(out)
}

// pulled runs `snapviewctl snapshot pull` with args against d and returns
// the snapshot it printed.
func pulled(t *testing.T, d *harness.Daemon, args ...string) snapshotJSON {
	t.Helper()
	out, errOut, code := ctlRun(t, d, nil, append([]string{"snapshot", "pull"}, args...)...)
	if code != 0 {
		t.Fatalf("snapshot pull: exit %d\n%s%s", code, out, errOut)
	}
	var s snapshotJSON
	dec := json.NewDecoder(strings.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil || dec.More() {
		t.Fatalf("snapshot pull printed %q: %v", out, err)
	}
	return s
}

// has reports which of blobs the content store of d holds.
func has(ctx context.Context, d *harness.Daemon, blobs []ocispec.Descriptor) map[string]bool {
	out := map[string]bool{}
	for _, b := range blobs {
		_, err := d.Client().ContentStore().Info(ctx, b.Digest)
		out[b.Digest.String()] = err == nil
	}
	return out
}

// delta returns after's counts less before's, keeping what changed.
func delta(before, after map[string]int) map[string]int {
	out := map[string]int{}
	for k, v := range after {
		if v != before[k] {
			out[k] = v - before[k]
		}
	}
	return out
}

// blobsNotManifests keeps the configs and layers of ds: what a push
// uploads and a pull downloads as blobs (manifests go by other requests).
func blobsNotManifests(ds []ocispec.Descriptor) []ocispec.Descriptor {
	var out []ocispec.Descriptor
	for _, d := range ds {
		if !images.IsManifestType(d.MediaType) && !images.IsIndexType(d.MediaType) {
			out = append(out, d)
		}
	}
	return out
}

// layersOf keeps the layers of ds.
func layersOf(ds []ocispec.Descriptor) []ocispec.Descriptor {
	var out []ocispec.Descriptor
	for _, d := range ds {
		if images.IsLayerType(d.MediaType) {
			out = append(out, d)
		}
	}
	return out
}

func counts(t *testing.T, f func() (map[string]int, error)) map[string]int {
	t.Helper()
	m, err := f()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestSnapshotBetweenNodes moves snapshots between two containerd daemons
// standing in for two nodes, one of each version, through a real registry
// on loopback, as users do: node A pulled its image from the registry
// (`ctr pull`); snapviewctl takes a container and a directory snapshot of a
// running container there and pushes them (the registry configured once by
// a hosts.toml directory, once by --plain-http); node B pulls them (what it
// has of the base is not downloaded, what it lacks once), runs the
// container snapshot as an image with the directory snapshot as a volume,
// takes a container snapshot of that container in turn and pushes it, and
// node A pulls it, downloading only what B added. Every base layer is
// uploaded once, by the base's own push: the snapshots' pushes mount it. A
// pull of an image that is not a snapview snapshot is refused and leaves
// nothing it fetched; bad ids and references are refused by name.
func TestSnapshotBetweenNodes(t *testing.T) {
	a, b, reg, ctx := twoNodes(t)
	hostsDir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(hostsDir, reg.Addr), 0o755); err != nil {
		t.Fatal(err)
	}
	hostsToml := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n", reg.URL(), reg.URL())
	if err := os.WriteFile(filepath.Join(hostsDir, reg.Addr, "hosts.toml"), []byte(hostsToml), 0o644); err != nil {
		t.Fatal(err)
	}

	// Node A gets its image as a node does, from the registry.
	travel, err := harness.BuildImage(t.TempDir(), harness.ImageSpec{Ref: travelImageRef, KernelSize: 6 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Import(ctx, ns, travel, "overlayfs"); err != nil {
		t.Fatal(err)
	}
	baseRef := reg.Addr + "/snapview/base:1"
	ctrCmd(ctx, t, a, "images", "push", "--plain-http", baseRef, travelImageRef)
	ctrCmd(ctx, t, a, "images", "rm", travelImageRef)
	ctrCmd(ctx, t, a, "images", "pull", "--plain-http", baseRef)
	t.Cleanup(func() {
		for _, d := range []*harness.Daemon{a, b} {
			_ = d.Client().ImageService().Delete(context.Background(), baseRef)
		}
	})
	baseImg, err := a.Client().ImageService().Get(ctx, baseRef)
	if err != nil {
		t.Fatal(err)
	}
	baseBlobs := blobsNotManifests(blobsOf(ctx, t, a.Client(), baseImg.Target))
	baseLayers := layersOf(baseBlobs)
	up := counts(t, reg.BlobUploads)
	for _, bl := range baseBlobs {
		if up[bl.Digest.String()] != 1 {
			t.Fatalf("the base's push uploaded %s %d times: %v", bl.Digest, up[bl.Digest.String()], up)
		}
	}

	src, err := start(ctx, t, a, "travel-src", runOpts{runtime: snapviewRT, snapshotter: "overlayfs", image: baseRef, args: []string{"sh", "-c", travelScript}})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.waitOutput("ready"); err != nil {
		t.Fatalf("%v\nstderr: %s", err, src.stderr.String())
	}
	sc := takeSnapshot(t, a, "--name", "travel", "travel-src")
	sd := takeSnapshot(t, a, "--dir", "/data", "travel-src")
	if _, err := src.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
	if sc.Base != baseImg.Target.Digest.String() || sd.Skipped != 1 {
		t.Fatalf("snapshots %+v %+v", sc, sd)
	}

	// Push: by a hosts.toml directory, and by --plain-http.
	scRef, sdRef := reg.Addr+"/snapview/snap:container", reg.Addr+"/snapview/snap:dir"
	upBefore, mountsBefore := counts(t, reg.BlobUploads), counts(t, reg.MountedBlobs)
	scImg, err := a.Client().ImageService().Get(ctx, sc.Image)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []struct{ args []string }{
		{[]string{"--hosts-dir", hostsDir, sc.ID, scRef}},
		{[]string{"--plain-http", sd.ID, sdRef}},
	} {
		out, errOut, code := ctlRun(t, a, nil, append([]string{"snapshot", "push"}, p.args...)...)
		if code != 0 || !strings.HasPrefix(strings.TrimSpace(out), "sha256:") {
			t.Fatalf("snapshot push %v: exit %d\n%s%s", p.args, code, out, errOut)
		}
	}
	upNew, mountsNew := delta(upBefore, counts(t, reg.BlobUploads)), delta(mountsBefore, counts(t, reg.MountedBlobs))
	scBlobs := blobsNotManifests(blobsOf(ctx, t, a.Client(), scImg.Target))
	for _, bl := range baseLayers {
		if upNew[bl.Digest.String()] != 0 || mountsNew[bl.Digest.String()] != 1 {
			t.Errorf("base layer %s: uploaded %d more times, mounted %d times by the snapshot's push (want 0 and 1)", bl.Digest, upNew[bl.Digest.String()], mountsNew[bl.Digest.String()])
		}
	}
	for _, bl := range scBlobs {
		if n := counts(t, reg.BlobUploads)[bl.Digest.String()]; n > 1 {
			t.Errorf("blob %s uploaded %d times", bl.Digest, n)
		}
	}

	// Node B: a pull of an image that is not a snapshot is refused and
	// leaves nothing it fetched (B lacks the base's own layer).
	lacked := has(ctx, b, baseBlobs)
	if lacked[baseLayers[len(baseLayers)-1].Digest.String()] {
		t.Fatalf("node B has the base's last layer already: %v", lacked)
	}
	out, errOut, code := ctlRun(t, b, nil, "snapshot", "pull", "--plain-http", baseRef)
	if code != 1 || !strings.HasPrefix(errOut, "snapview: ") || !strings.Contains(errOut, "is not a snapview snapshot") || out != "" {
		t.Errorf("pull of a plain image: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if got := has(ctx, b, baseBlobs); !maps.Equal(got, lacked) {
		t.Errorf("the refused pull left blobs on node B: before %v, after %v", lacked, got)
	}
	checkNoSnapshotLeftovers(ctx, t, b)

	downBefore := counts(t, reg.BlobDownloads)
	had := has(ctx, b, scBlobs)
	pc := pulled(t, b, "--plain-http", scRef)
	pd := pulled(t, b, "--hosts-dir", hostsDir, "--snapshotter", "overlayfs", sdRef)
	if pc.ID != sc.ID || pc.Kind != "container" || pc.Form != "image" || pc.Name != "travel" || pc.Source != "travel-src" || pc.Base != sc.Base || pc.Size != sc.Size ||
		!pc.Created.Equal(sc.Created) || pc.Image != sc.Image {
		t.Errorf("node B's container snapshot %+v, node A's %+v", pc, sc)
	}
	if pd.ID != sd.ID || pd.Kind != "directory" || pd.Dir != "/data" || pd.Skipped != 1 || pd.Size != sd.Size {
		t.Errorf("node B's directory snapshot %+v, node A's %+v", pd, sd)
	}
	down := delta(downBefore, counts(t, reg.BlobDownloads))
	for _, bl := range scBlobs {
		want := 1
		if had[bl.Digest.String()] {
			want = 0
		}
		if down[bl.Digest.String()] != want {
			t.Errorf("node B downloaded %s %d times, want %d (it had it: %v)", bl.Digest, down[bl.Digest.String()], want, had[bl.Digest.String()])
		}
	}
	// A second pull of the same snapshot is a no-op that fetches no blob.
	downBefore = counts(t, reg.BlobDownloads)
	if again := pulled(t, b, "--plain-http", scRef); again.ID != sc.ID {
		t.Errorf("pulled again: %+v", again)
	}
	if d := delta(downBefore, counts(t, reg.BlobDownloads)); len(d) != 0 {
		t.Errorf("a second pull downloaded %v", d)
	}

	// Restore on node B: the container snapshot as the image, the directory
	// snapshot as a volume beside it.
	vol := `io.snapview.volume.data={"snapshot":"` + sd.ID + `","target":"/restored"}`
	got := ctrRun(ctx, t, b, "--snapshotter", "overlayfs", "--runtime", snapviewRT, "--annotation", vol, sc.Image, "travel-restored", "sh", "-c",
		snapshotCheck+"; cat /restored/sub/hello; readlink /restored/link; test -e /restored/pipe && echo pipe-present || echo pipe-gone")
	if want := "hello\nchanged\n/data/sub/hello\nprofile-gone\nhello\n/data/sub/hello\npipe-gone"; !strings.Contains(got, want) {
		t.Errorf("the container restored on node B says %q, want %q", got, want)
	}

	// Back again: node B (containerd 2.2) takes a container snapshot of a
	// container of the restored snapshot; node A pulls only what B added.
	second, err := start(ctx, t, b, "travel-second", runOpts{runtime: snapviewRT, snapshotter: "overlayfs", image: sc.Image,
		args: []string{"sh", "-c", "echo second > /data/second && echo ready; exec sleep 300"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := second.waitOutput("ready"); err != nil {
		t.Fatalf("%v\nstderr: %s", err, second.stderr.String())
	}
	s2 := takeSnapshot(t, b, "travel-second")
	if _, err := second.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
	s2Ref := reg.Addr + "/snapview/snap:second"
	if out, errOut, code := ctlRun(t, b, nil, "snapshot", "push", "--plain-http", s2.ID, s2Ref); code != 0 {
		t.Fatalf("push from node B: exit %d\n%s%s", code, out, errOut)
	}
	s2Img, err := b.Client().ImageService().Get(ctx, s2.Image)
	if err != nil {
		t.Fatal(err)
	}
	s2Blobs := blobsNotManifests(blobsOf(ctx, t, b.Client(), s2Img.Target))
	had = has(ctx, a, s2Blobs)
	downBefore = counts(t, reg.BlobDownloads)
	if p2 := pulled(t, a, "--plain-http", s2Ref); p2.ID != s2.ID || p2.Base != scImg.Target.Digest.String() {
		t.Errorf("node A's second-generation snapshot %+v (base %s)", p2, scImg.Target.Digest)
	}
	down = delta(downBefore, counts(t, reg.BlobDownloads))
	var fetched int
	for _, bl := range s2Blobs {
		if had[bl.Digest.String()] && down[bl.Digest.String()] != 0 || !had[bl.Digest.String()] && down[bl.Digest.String()] != 1 {
			t.Errorf("node A downloaded %s %d times (it had it: %v)", bl.Digest, down[bl.Digest.String()], had[bl.Digest.String()])
		}
		if !had[bl.Digest.String()] {
			fetched++
		}
	}
	if fetched != 2 { // the new config and the new layer
		t.Errorf("node A fetched %d blobs of the second generation, want its config and its layer: %v", fetched, down)
	}
	if got := ctrRun(ctx, t, a, "--snapshotter", "overlayfs", "--runtime", snapviewRT, s2.Image, "travel-back", "sh", "-c", "cat /data/sub/hello /data/second /etc/motd"); !strings.Contains(got, "hello\nsecond\nchanged") {
		t.Errorf("the second generation on node A says %q", got)
	}

	// Refusals, each by name, each leaving nothing.
	for _, tc := range []struct {
		d    *harness.Daemon
		args []string
		want string
	}{
		{a, []string{"push", "--plain-http", "6f1c1f0e-3b7a-4c0e-9a57-1d2f3e4a5b6c", reg.Addr + "/snapview/snap:none"}, "6f1c1f0e-3b7a-4c0e-9a57-1d2f3e4a5b6c"},
		{a, []string{"push", "--plain-http", "NOT-AN-ID", reg.Addr + "/snapview/snap:none"}, "NOT-AN-ID"},
		{a, []string{"push", "--plain-http", sc.ID, "Not A Reference"}, "Not A Reference"},
		{b, []string{"pull", "--plain-http", "Not A Reference"}, "Not A Reference"},
		{b, []string{"pull", "--plain-http", reg.Addr + "/snapview/snap:missing"}, "snap:missing"},
	} {
		out, errOut, code := ctlRun(t, tc.d, nil, append([]string{"snapshot"}, tc.args...)...)
		if code != 1 || !strings.HasPrefix(errOut, "snapview: ") || !strings.Contains(errOut, tc.want) || out != "" {
			t.Errorf("snapshot %v: exit %d, stdout %q, stderr %q (want a snapview: error naming %q)", tc.args, code, out, errOut, tc.want)
		}
	}
	checkNoSnapshotLeftovers(ctx, t, a)
	checkNoSnapshotLeftovers(ctx, t, b)

	removeSnapshot(ctx, t, a, s2.ID)
	removeSnapshot(ctx, t, b, s2.ID)
	for _, d := range []*harness.Daemon{a, b} {
		removeSnapshot(ctx, t, d, sd.ID)
		removeSnapshot(ctx, t, d, sc.ID)
	}
	if err := a.Client().ImageService().Delete(ctx, baseRef); err != nil && !errdefs.IsNotFound(err) {
		t.Fatal(err)
	}
}

// twoNodes returns two nodes, containerd 2.4 and 2.2 (each checked for
// leaks after the test), and a registry on loopback between them, with the
// first node's test context; without the registry's binary it skips.
func twoNodes(t *testing.T) (a, b *harness.Daemon, reg *harness.Registry, ctx context.Context) {
	t.Helper()
	if why := harness.NeedClient("SNAPVIEW_REGISTRY", suite.tools.Registry); why != "" {
		t.Skip(why)
	}
	a, b = layeredDaemon(t, false), layeredDaemon(t, true)
	ctx = setup(t, a)
	setup(t, b)
	reg, err := harness.StartRegistry(ctx, suite.tools.Registry, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(reg.Stop)
	return a, b, reg, ctx
}
