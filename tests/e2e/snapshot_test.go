package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// snapshotJSON is what `snapviewctl snapshot create` prints.
type snapshotJSON struct {
	ID      string     `json:"id"`
	Kind    string     `json:"kind"`
	Form    string     `json:"form"`
	Size    int64      `json:"size"`
	Name    string     `json:"name"`
	Created time.Time  `json:"created"`
	Source  string     `json:"source"`
	Base    string     `json:"base"`
	Dir     string     `json:"dir"`
	Skipped int        `json:"skipped"`
	Expires *time.Time `json:"expires"`
	Image   string     `json:"image"`
}

// ctlRun runs snapviewctl against daemon d with args and returns its
// stdout, its stderr and its exit code.
func ctlRun(t *testing.T, d *harness.Daemon, env []string, args ...string) (string, string, int) {
	t.Helper()
	return ctlRunIn(t, d, ns, env, args...)
}

// ctlRunIn is ctlRun in containerd namespace namespace.
func ctlRunIn(t *testing.T, d *harness.Daemon, namespace string, env []string, args ...string) (string, string, int) {
	t.Helper()
	full := append([]string{"--address", d.Address, "--state", d.State, "--namespace", namespace}, args...)
	cmd := exec.Command(os.Getenv("SNAPVIEW_CTL"), full...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return stdout.String(), stderr.String(), 0
	case errors.As(err, &exit):
		return stdout.String(), stderr.String(), exit.ExitCode()
	default:
		t.Fatalf("snapviewctl %v: %v", args, err)
		return "", "", -1
	}
}

// takeSnapshot runs `snapviewctl snapshot create` with args and returns
// the snapshot it printed; stdout must hold that one JSON object alone.
func takeSnapshot(t *testing.T, d *harness.Daemon, args ...string) snapshotJSON {
	t.Helper()
	out, errOut, code := ctlRun(t, d, nil, append([]string{"snapshot", "create"}, args...)...)
	if code != 0 {
		t.Fatalf("snapshot create %v: exit %d\n%s%s", args, code, out, errOut)
	}
	var s snapshotJSON
	dec := json.NewDecoder(strings.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil || dec.More() {
		t.Fatalf("snapshot create printed %q: %v", out, err)
	}
	return s
}

// removeSnapshot removes snapshot id with snapviewctl, and checks that its
// record and its own blobs are gone (a leak check of its own: the daemon's
// does not look at images and content).
func removeSnapshot(ctx context.Context, t *testing.T, d *harness.Daemon, id string) {
	t.Helper()
	c := d.Client()
	img, err := c.ImageService().Get(ctx, "localhost/snapview/snapshot:"+id)
	if err != nil {
		t.Fatalf("snapshot %s's record: %v", id, err)
	}
	own := ownBlobs(ctx, t, c, img.Target)
	if out, errOut, code := ctlRun(t, d, nil, "snapshot", "rm", id); code != 0 || strings.TrimSpace(out) != id {
		t.Fatalf("snapshot rm %s: exit %d\n%s%s", id, code, out, errOut)
	}
	if _, err := c.ImageService().Get(ctx, "localhost/snapview/snapshot:"+id); !errdefs.IsNotFound(err) {
		t.Errorf("snapshot %s's record left after rm: %v", id, err)
	}
	for _, dg := range own {
		if _, err := c.ContentStore().Info(ctx, dg.Digest); !errdefs.IsNotFound(err) {
			t.Errorf("snapshot %s's %s %s left after rm: %v", id, dg.MediaType, dg.Digest, err)
		}
	}
	checkNoSnapshotLeftovers(ctx, t, d)
}

// ownBlobs returns the blobs of a snapshot's manifest that no other image
// of the namespace names: its manifest, config and added layers.
func ownBlobs(ctx context.Context, t *testing.T, c *client.Client, man ocispec.Descriptor) []ocispec.Descriptor {
	t.Helper()
	others := map[string]bool{}
	imgs, err := c.ImageService().List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, img := range imgs {
		if img.Target.Digest == man.Digest {
			continue
		}
		for _, dg := range blobsOf(ctx, t, c, img.Target) {
			others[dg.Digest.String()] = true
		}
	}
	var own []ocispec.Descriptor
	for _, dg := range blobsOf(ctx, t, c, man) {
		if !others[dg.Digest.String()] {
			own = append(own, dg)
		}
	}
	return own
}

// blobsOf returns a manifest, its config and its layers (one level of
// index followed).
func blobsOf(ctx context.Context, t *testing.T, c *client.Client, d ocispec.Descriptor) []ocispec.Descriptor {
	t.Helper()
	b, err := content.ReadBlob(ctx, c.ContentStore(), d)
	if err != nil {
		return nil // not on the node
	}
	var m struct {
		Manifests []ocispec.Descriptor `json:"manifests"`
		Config    ocispec.Descriptor   `json:"config"`
		Layers    []ocispec.Descriptor `json:"layers"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	out := []ocispec.Descriptor{d}
	for _, child := range m.Manifests {
		out = append(out, blobsOf(ctx, t, c, child)...)
	}
	if m.Config.Digest != "" {
		out = append(out, m.Config)
	}
	return append(out, m.Layers...)
}

// checkNoSnapshotLeftovers checks that no capture's lease or lock is left
// in the test namespace.
func checkNoSnapshotLeftovers(ctx context.Context, t *testing.T, d *harness.Daemon) {
	t.Helper()
	ls, err := d.Client().LeasesService().List(ctx, `labels."snapview.io/capture"`)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		t.Errorf("capture lease left: %s %v", l.ID, l.Labels)
	}
	if entries, _ := os.ReadDir(d.State + "/io.containerd.runtime.v2.task/.snapview-captures"); len(entries) > 0 {
		t.Errorf("capture locks left: %v", entries)
	}
}

// snapshotScript changes a container's filesystem in every way a diff
// records (a new file in a new directory, a changed file, a removed one, a
// symlink), then says so and waits.
const snapshotScript = `mkdir -p /data/sub && echo hello > /data/sub/hello && echo changed > /etc/motd && rm -f /etc/profile && ln -s /data/sub/hello /data/link && echo ready; exec sleep 300`

// snapshotCheck reads in a container what snapshotScript did.
const snapshotCheck = `cat /data/sub/hello /etc/motd; readlink /data/link; test -e /etc/profile && echo profile-present || echo profile-gone`

// TestSnapshotContainer takes a container snapshot of a running container,
// on containerd 2.4 (overlayfs, native and the erofs snapshotter in
// directory mode) and 2.2 (overlayfs), which is
// paused for the capture and resumed after, and runs it as an image: the
// new container starts from the first one's filesystem. The snapshot is
// listed, inspected, and removed with nothing left.
func TestSnapshotContainer(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d, sns := suite.daemon, []string{"overlayfs", "native", "erofs"}
		if compat {
			d, sns = layeredDaemon(t, true), []string{"overlayfs"}
		}
		for _, sn := range sns {
			snapshotContainer(t, d, sn)
		}
	})
}

func snapshotContainer(t *testing.T, d *harness.Daemon, sn string) {
	t.Run(sn, func(t *testing.T) {
		ctx := setup(t, d)
		id := "snap-src-" + sn
		r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: sn, args: []string{"sh", "-c", snapshotScript}})
		if err != nil {
			t.Fatal(err)
		}
		if err := r.waitOutput("ready"); err != nil {
			t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
		}
		img, err := r.ctr.Image(ctx)
		if err != nil {
			t.Fatal(err)
		}
		s := takeSnapshot(t, d, "--name", "nightly-"+sn, id)
		if s.Kind != "container" || s.Form != "image" || s.Source != id || s.Base != img.Target().Digest.String() || s.Size <= 0 || s.Name != "nightly-"+sn ||
			s.Image != "localhost/snapview/snapshot:"+s.ID || time.Since(s.Created) > time.Minute {
			t.Fatalf("snapshot %+v", s)
		}
		if st, err := r.task.Status(ctx); err != nil || st.Status != client.Running {
			t.Fatalf("the source container is %v after the capture (%v), want it running again", st.Status, err)
		}
		// Restore: the snapshot is an image; a new container runs it, as
		// a user runs any image (ctr unpacks it first).
		if got := ctrRun(ctx, t, d, "--snapshotter", sn, "--runtime", snapviewRT, s.Image, "snap-restored-"+sn, "sh", "-c", snapshotCheck); !strings.Contains(got, "hello\nchanged\n/data/sub/hello\nprofile-gone") {
			t.Errorf("the restored container says %q", got)
		}

		out, _, code := ctlRun(t, d, nil, "snapshot", "ls")
		if code != 0 || !strings.Contains(out, s.ID) || !strings.Contains(out, "nightly-"+sn) || !strings.Contains(out, "container  image") {
			t.Errorf("snapshot ls (exit %d):\n%s", code, out)
		}
		out, _, code = ctlRun(t, d, nil, "snapshot", "inspect", s.ID)
		var got snapshotJSON
		if code != 0 || json.Unmarshal([]byte(out), &got) != nil || got.ID != s.ID || got.Size != s.Size || got.Base != s.Base {
			t.Errorf("snapshot inspect (exit %d):\n%s", code, out)
		}
		if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
			t.Fatal(err)
		}
		removeSnapshot(ctx, t, d, s.ID)
	})
}

// ctrRun runs `ctr run --rm` with args against daemon d, as a user would,
// and returns its output.
func ctrRun(ctx context.Context, t *testing.T, d *harness.Daemon, args ...string) string {
	t.Helper()
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	full := append([]string{"--address", d.Address, "--namespace", ns, "run", "--rm"}, args...)
	out, err := exec.CommandContext(cctx, d.Tools.Ctr(), full...).CombinedOutput()
	if err != nil {
		t.Fatalf("ctr %s: %v\n%s", strings.Join(full, " "), err, out)
	}
	return string(out)
}

// dirScript makes a directory of every kind of entry a directory snapshot
// meets: files, a subdirectory, a symlink out of the directory (kept as a
// symlink), a hard link, a FIFO (left out), then says so and waits.
const dirScript = `mkdir -p /data/sub && echo one > /data/one && echo two > /data/sub/two && chmod 0640 /data/sub/two && ` +
	`ln -s /etc/passwd /data/passwd-link && ln /data/one /data/one-again && mkfifo /data/pipe && echo ready; exec sleep 300`

// dirCheck reads, in a container, a directory snapshot restored at
// /restored, and tries to write into it.
const dirCheck = `cat /restored/one /restored/sub/two; stat -c '%a' /restored/sub/two; readlink /restored/passwd-link; ` +
	`test -e /restored/pipe && echo pipe-present || echo pipe-gone; ` +
	`if echo x > /restored/new 2>/dev/null; then echo written; cat /restored/new; else echo write-refused; fi`

// TestSnapshotDirectory takes a directory snapshot of a running container
// and restores it into containers of another image as a volume: read-only,
// and as writable clones, each its own; then removes it while a container
// still uses it, which keeps running with its data.
func TestSnapshotDirectory(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := suite.daemon
		if compat {
			d = layeredDaemon(t, true)
		}
		snapshotDirectory(t, d)
	})
}

func snapshotDirectory(t *testing.T, d *harness.Daemon) {
	ctx := setup(t, d)
	r, err := start(ctx, t, d, "dir-src", runOpts{runtime: snapviewRT, args: []string{"sh", "-c", dirScript}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.waitOutput("ready"); err != nil {
		t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
	}
	s := takeSnapshot(t, d, "--dir", "/data", "dir-src")
	if s.Kind != "directory" || s.Form != "image" || s.Dir != "/data" || s.Skipped != 1 || s.Base != "" || s.Size <= 0 {
		t.Fatalf("snapshot %+v", s)
	}
	if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
	vol := func(writable bool) map[string]string {
		w := ""
		if writable {
			w = `,"writable":true`
		}
		return map[string]string{"io.snapview.volume.data": `{"snapshot":"` + s.ID + `","target":"/restored"` + w + `}`}
	}
	for _, tc := range []struct {
		name     string
		writable bool
		want     string
	}{
		{"read-only", false, "one\ntwo\n640\n/etc/passwd\npipe-gone\nwrite-refused"},
		{"writable clone", true, "one\ntwo\n640\n/etc/passwd\npipe-gone\nwritten\nx"},
		// A second clone starts from the snapshot, not from the first's writes.
		{"another writable clone", true, "one\ntwo\n640\n/etc/passwd\npipe-gone\nwritten\nx"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "dir-" + strings.ReplaceAll(tc.name, " ", "-")
			c, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, image: otherImage(ctx, t, d), args: []string{"sh", "-c", dirCheck}, annotations: vol(tc.writable)})
			if err != nil {
				t.Fatal(err)
			}
			if code, err := c.wait(t); err != nil || code != 0 {
				t.Fatalf("exit %d: %v\n%s", code, err, c.stderr.String())
			}
			if got := c.stdout.String(); !strings.Contains(got, tc.want) {
				t.Errorf("the container says %q, want %q", got, tc.want)
			}
			// Until its task's delete, snapviewctl ls lists the volume.
			col := "data=snapshot:" + s.ID[:8]
			if tc.writable {
				col += ":rw"
			}
			if out, errOut, code := ctlRun(t, d, nil, "ls"); code != 0 || !strings.Contains(lineOf(out, ns+"  "+id+" "), col+" ") {
				t.Errorf("snapviewctl ls (exit %d) lacks %s for %s:\n%s%s", code, col, id, out, errOut)
			}
			if _, err := c.task.Delete(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}

	// Removed while a container uses it: the container keeps its volume.
	user, err := start(ctx, t, d, "dir-user", runOpts{runtime: snapviewRT, image: otherImage(ctx, t, d), annotations: vol(false),
		args: []string{"sh", "-c", `echo ready; while [ ! -e /tmp/go ]; do sleep 0.1; done; cat /restored/one /restored/sub/two`}})
	if err != nil {
		t.Fatal(err)
	}
	if err := user.waitOutput("ready"); err != nil {
		t.Fatal(err)
	}
	// snapviewctl ls and inspect name the snapshot the volume restores.
	if out, errOut, code := ctlRun(t, d, nil, "ls"); code != 0 || !strings.Contains(out, "data=snapshot:"+s.ID[:8]+" ") && !strings.Contains(out, "data=snapshot:"+s.ID[:8]+"\t") {
		t.Errorf("snapviewctl ls (exit %d) lacks the snapshot volume:\n%s%s", code, out, errOut)
	}
	if out, errOut, code := ctlRun(t, d, nil, "inspect", "dir-user"); code != 0 || !strings.Contains(out, "volume      data: directory snapshot "+s.ID+" at /restored") {
		t.Errorf("snapviewctl inspect (exit %d) lacks the snapshot volume:\n%s%s", code, out, errOut)
	}
	removeSnapshot(ctx, t, d, s.ID)
	if code, _, errOut, err := user.exec(ctx, "go", "touch", "/tmp/go"); err != nil || code != 0 {
		t.Fatalf("exec: %d %v %s", code, err, errOut)
	}
	if code, err := user.wait(t); err != nil || code != 0 || !strings.Contains(user.stdout.String(), "one\ntwo") {
		t.Fatalf("the container using the removed snapshot: exit %d %v: %q", code, err, user.stdout.String())
	}
}

// otherImageRef is an image of its own, not the source container's: a
// directory snapshot restores into a container of any image.
const otherImageRef = "docker.io/snapview/other:1"

var otherImageOnce struct {
	sync.Once
	img *harness.Image
	err error
}

// otherImage imports otherImageRef into d (unpacked for its snapshotters)
// and returns its name.
func otherImage(ctx context.Context, t *testing.T, d *harness.Daemon, snapshotters ...string) string {
	t.Helper()
	otherImageOnce.Do(func() {
		otherImageOnce.img, otherImageOnce.err = harness.BuildImage(suite.dir, harness.ImageSpec{Ref: otherImageRef, KernelSize: 4 << 10})
	})
	if otherImageOnce.err != nil {
		t.Fatal(otherImageOnce.err)
	}
	if _, err := d.Import(ctx, ns, otherImageOnce.img, snapshotters...); err != nil {
		t.Fatal(err)
	}
	return otherImageRef
}

// TestSnapshotCaptureKilled kills snapviewctl (SIGKILL, from inside, as a
// crash would: its fault build) at every step of a capture that leaves
// something behind, container, directory and disk snapshots alike, and then runs
// the sweep (snapviewctl gc): the container the capture paused runs again,
// and no capture lease, lock, mount, activation or blob of the capture is
// left; a capture killed after its record exists left a whole snapshot.
func TestSnapshotCaptureKilled(t *testing.T) {
	faultCtl := os.Getenv("SNAPVIEW_FAULT_CTL")
	if faultCtl == "" {
		t.Fatal("SNAPVIEW_FAULT_CTL is not set: run through `make e2e`")
	}
	d := suite.daemon
	ctx := setup(t, d)
	src := "capture-killed"
	r, err := start(ctx, t, d, src, runOpts{runtime: snapviewRT, args: []string{"sh", "-c", dirScript}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.waitOutput("ready"); err != nil {
		t.Fatal(err)
	}
	// A block-mode container, whose capture is a disk snapshot.
	diskSrc := "capture-killed-disk"
	rd, err := start(ctx, t, d, diskSrc, runOpts{runtime: snapviewRT, snapshotter: "blockfile", annotations: blockAnn,
		args: []string{"sh", "-c", diskWriteScript}, specOpts: []oci.SpecOpts{oci.WithEnv([]string{"MARKER=killed"})}})
	if err != nil {
		t.Fatal(err)
	}
	if err := rd.waitOutput("ready"); err != nil {
		t.Fatal(err)
	}
	// The two shims just started sweep the node shortly after their start,
	// and such a sweep once took a killed capture while snapviewctl gc
	// skipped it as locked (the sweep held its lock): the sweep is made
	// not due, as if it had just run, so that gc alone finds each capture.
	sweepDue(t, d, time.Now())
	faultFile := t.TempDir() + "/fault"
	for _, tc := range []struct {
		kind   string
		r      *running
		args   []string
		points []string
	}{
		{"container", r, nil, []string{"capture-lease", "capture-paused", "capture-mounted", "capture-layer", "capture-config", "capture-manifest", "capture-record"}},
		{"directory", r, []string{"--dir", "/data"}, []string{"capture-lease", "capture-paused", "capture-layer", "capture-config", "capture-manifest", "capture-unpacked", "capture-record"}},
		{"disk", rd, nil, []string{"capture-lease", "capture-paused", "capture-layer", "capture-config", "capture-manifest", "capture-record"}},
	} {
		src := tc.r.ctr.ID()
		for _, point := range tc.points {
			t.Run(tc.kind+"/"+point, func(t *testing.T) {
				before := blobSet(ctx, t, d)
				logStart := len(d.Log())
				if err := os.WriteFile(faultFile, []byte(point+" "+src), 0o644); err != nil {
					t.Fatal(err)
				}
				full := append([]string{"--address", d.Address, "--state", d.State, "--namespace", ns, "snapshot", "create"}, append(tc.args, src)...)
				cmd := exec.Command(faultCtl, full...)
				cmd.Env = append(os.Environ(), "SNAPVIEW_FAULT_FILE="+faultFile)
				out, err := cmd.CombinedOutput()
				if _, ferr := os.Stat(faultFile + ".fired"); ferr != nil || err == nil {
					t.Fatalf("snapviewctl was not killed at %s: %v\n%s", point, err, out)
				}
				os.Remove(faultFile + ".fired")
				gc, _, code := ctlRun(t, d, nil, "gc")
				if code != 0 || !strings.Contains(gc, "removed dead capture "+ns+"/") {
					t.Fatalf("snapviewctl gc (exit %d) did not remove the dead capture:\n%s\nlog:\n%s", code, gc, d.Log()[logStart:])
				}
				if st, err := tc.r.task.Status(ctx); err != nil || st.Status != client.Running {
					t.Fatalf("the source container is %v after the sweep (%v), want it running", st.Status, err)
				}
				checkNoSnapshotLeftovers(ctx, t, d)
				var kept []string
				if point == "capture-record" {
					imgs, err := d.Client().ImageService().List(ctx, `labels."snapview.io/snapshot"`)
					if err != nil || len(imgs) != 1 {
						t.Fatalf("a capture killed after its record: %v %v, want one snapshot", imgs, err)
					}
					for _, b := range blobsOf(ctx, t, d.Client(), imgs[0].Target) {
						kept = append(kept, b.Digest.String())
					}
					defer removeSnapshot(ctx, t, d, strings.TrimPrefix(imgs[0].Name, "localhost/snapview/snapshot:"))
				}
				for dg := range blobSet(ctx, t, d) {
					if !before[dg] && !slices.Contains(kept, dg) {
						t.Errorf("blob %s of the killed capture left", dg)
					}
				}
			})
		}
	}
}

// blobSet returns the digests of every blob in the content store of the
// test namespace.
func blobSet(ctx context.Context, t *testing.T, d *harness.Daemon) map[string]bool {
	t.Helper()
	set := map[string]bool{}
	if err := d.Client().ContentStore().Walk(ctx, func(info content.Info) error {
		set[info.Digest.String()] = true
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return set
}

// TestSnapshotRefused checks that every bad request is refused with a
// snapview: error that names what was wrong, exit code 1 (2 for bad usage),
// and leaves nothing: captures of a container that does not exist, has no
// image snapshot, or whose image lacks its layers' blobs, a bad name, a
// relative directory or one that is not there, one larger than the cap;
// and every wrong id given back, in any command and as a volume.
func TestSnapshotRefused(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	src := "snap-refused"
	r, err := start(ctx, t, d, src, runOpts{runtime: snapviewRT, args: []string{"sh", "-c", dirScript}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.waitOutput("ready"); err != nil {
		t.Fatal(err)
	}
	// A container whose rootfs was given to containerd (ctr run --rootfs,
	// Docker): no image snapshot.
	bare, err := d.Client().NewContainer(ctx, "snap-refused-bare", client.WithRuntime(snapviewRT, nil),
		client.WithNewSpec(oci.WithRootFSPath(t.TempDir()), oci.WithProcessArgs("true")))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { deleteContainer(t, bare) })
	container := takeSnapshot(t, d, src)
	defer removeSnapshot(ctx, t, d, container.ID)
	unknown := "2f1c0a3e-5b7d-4e8a-9f00-1a2b3c4d5e6f"
	small := t.TempDir() + "/small.toml"
	if err := os.WriteFile(small, []byte("[snapshots]\nmax_directory_size = \"2KiB\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"no such container", []string{"create", "nope"}, 1, []string{"container nope: not found in namespace " + ns}},
		{"no image snapshot", []string{"create", "snap-refused-bare"}, 1, []string{"container snap-refused-bare has no image snapshot"}},
		{"bad name", []string{"create", "--name", "../x", src}, 1, []string{`snapshot name "../x" must match`}},
		{"relative directory", []string{"create", "--dir", "data", src}, 1, []string{`--dir "data" is not a clean absolute path`}},
		{"no such directory", []string{"create", "--dir", "/nope", src}, 1, []string{"directory /nope of container " + src, "no such file or directory"}},
		{"a file for a directory", []string{"create", "--dir", "/data/one", src}, 1, []string{"directory /data/one of container " + src, "not a directory"}},
		{"a directory out through a symlink", []string{"create", "--dir", "/data/passwd-link", src}, 1, []string{"directory /data/passwd-link", "not a directory"}},
		{"larger than the cap", []string{"create", "--config", small, "--dir", "/bin", src}, 1, []string{"directory /bin of container " + src + " is larger than the 2KiB a directory snapshot may be", "max_directory_size in " + small}},
		{"no container", []string{"create"}, 2, []string{"snapshot create takes one container"}},
		{"malformed id", []string{"inspect", "nightly"}, 1, []string{`snapshot id "nightly"`, "not a snapshot id"}},
		{"upper-case id", []string{"rm", strings.ToUpper(container.ID)}, 1, []string{"not a snapshot id"}},
		{"unknown id", []string{"inspect", unknown}, 1, []string{"snapshot " + unknown + ": not found in namespace " + ns}},
		{"another namespace's", []string{"--namespace-of-test", "inspect", container.ID}, 1, []string{"snapshot " + container.ID + ": not found in namespace other-" + ns}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"snapshot"}, tc.args...)
			var env []string
			if args[1] == "--namespace-of-test" {
				args = append([]string{"--namespace", "other-" + ns, "snapshot"}, tc.args[1:]...)
			}
			before := blobSet(ctx, t, d)
			out, errOut, code := ctlRun(t, d, env, args...)
			if code != tc.code || out != "" {
				t.Fatalf("exit %d, stdout %q, want exit %d and nothing on stdout\n%s", code, out, tc.code, errOut)
			}
			if tc.code == 1 && !strings.HasPrefix(errOut, "snapview: ") {
				t.Errorf("stderr does not start with snapview: %q", errOut)
			}
			for _, w := range tc.want {
				if !strings.Contains(errOut, w) {
					t.Errorf("stderr lacks %q:\n%s", w, errOut)
				}
			}
			checkNoSnapshotLeftovers(ctx, t, d)
			for dg := range blobSet(ctx, t, d) {
				if !before[dg] {
					t.Errorf("blob %s left", dg)
				}
			}
			if st, err := r.task.Status(ctx); err != nil || st.Status != client.Running {
				t.Fatalf("the source container is %v (%v), want it running", st.Status, err)
			}
		})
	}

	// Every wrong id as a volume: a snapview: error naming it, never an
	// empty volume, and nothing left.
	vol := func(id string, extra string) map[string]string {
		return map[string]string{"io.snapview.volume.v": `{"snapshot":"` + id + `","target":"/restored"` + extra + `}`}
	}
	for _, tc := range []struct {
		name   string
		ann    map[string]string
		config string
		want   []string
	}{
		{"malformed", vol("nightly", ""), "", []string{"annotation io.snapview.volume.v", `snapshot id "nightly"`, "not a snapshot id"}},
		{"unknown", vol(unknown, ""), "", []string{"annotation io.snapview.volume.v", "snapshot " + unknown + ": not found in namespace " + ns}},
		{"a container snapshot", vol(container.ID, ""), "", []string{"snapshot " + container.ID + " is a container snapshot, not a directory snapshot", container.Image}},
		{"restore off", vol(unknown, ""), "[snapshots]\nrestore = false\n", []string{"restoring snapshots is off ([snapshots] restore = false"}},
		{"at the root", vol(unknown, ""), "", []string{}},
	} {
		t.Run("volume "+tc.name, func(t *testing.T) {
			ann := tc.ann
			if tc.name == "at the root" {
				ann = map[string]string{"io.snapview.volume.v": `{"snapshot":"` + unknown + `","target":"/"}`}
				tc.want = []string{"annotation io.snapview.volume.v", `target "/"`, "root directory"}
			}
			var opts any
			if tc.config != "" {
				opts = &runtimeoptions.Options{ConfigBody: []byte(tc.config)}
			}
			refused(ctx, t, d, "snap-vol-refused-"+strings.ReplaceAll(tc.name, " ", "-"), runOpts{runtime: snapviewRT, runtimeOpts: opts, annotations: ann, args: []string{"true"}}, tc.want...)
		})
	}
	if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
}

// TestSnapshotBaseLayersMissing refuses a container snapshot of a container
// whose image lacks its layers' blobs in the content store (as after a pull
// that discarded them once unpacked): such a snapshot could not be pushed
// or moved. The error names the layers and says what to do.
func TestSnapshotBaseLayersMissing(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	const ref = "docker.io/snapview/partial:1"
	built, err := harness.BuildImage(t.TempDir(), harness.ImageSpec{Ref: ref, KernelSize: 2 << 10})
	if err != nil {
		t.Fatal(err)
	}
	img, err := d.Import(ctx, ns, built)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = d.Client().ImageService().Delete(harness.Context(context.Background(), ns), ref)
	})
	r, err := start(ctx, t, d, "snap-partial", runOpts{runtime: snapviewRT, image: ref, args: []string{"sleep", "300"}})
	if err != nil {
		t.Fatal(err)
	}
	man, err := images.Manifest(ctx, d.Client().ContentStore(), img.Target(), platforms.Default())
	if err != nil {
		t.Fatal(err)
	}
	// Only the layers no other image of the suite shares are deleted: the
	// busybox layer is every test image's (deleting it broke the snapshot
	// tests that ran after this one).
	shared := map[digest.Digest]bool{}
	imgs, err := d.Client().ImageService().List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, other := range imgs {
		if other.Name == ref {
			continue
		}
		if m, err := images.Manifest(ctx, d.Client().ContentStore(), other.Target, platforms.Default()); err == nil {
			for _, l := range m.Layers {
				shared[l.Digest] = true
			}
		}
	}
	var deleted []digest.Digest
	for _, l := range man.Layers {
		if shared[l.Digest] {
			continue
		}
		if err := d.Client().ContentStore().Delete(ctx, l.Digest); err != nil {
			t.Fatal(err)
		}
		deleted = append(deleted, l.Digest)
	}
	if len(deleted) == 0 {
		t.Fatalf("every layer of %s is shared with another image: nothing to delete", ref)
	}
	out, errOut, code := ctlRun(t, d, nil, "snapshot", "create", "snap-partial")
	if code != 1 || out != "" || !strings.Contains(errOut, fmt.Sprintf("image %s lacks %d of its layers in the content store (%s", ref, len(deleted), deleted[0])) ||
		!strings.Contains(errOut, "content fetch") {
		t.Fatalf("exit %d\n%s%s", code, out, errOut)
	}
	checkNoSnapshotLeftovers(ctx, t, d)
	if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
}

// TestSnapshotTaskStates takes snapshots of containers whose task is
// paused (it stays paused), created (not started: it stays created),
// stopped, or that have no task, container and directory snapshots alike
// (a directory of a container without a task is read from its rootfs
// mounted read-only, which a disk image never is).
func TestSnapshotTaskStates(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	for _, tc := range []struct {
		state string
		sn    string
		want  client.ProcessStatus // after the capture; "" for no task
	}{
		{"paused", "overlayfs", client.Paused},
		{"created", "overlayfs", client.Created},
		{"stopped", "overlayfs", client.Stopped},
		{"no task", "overlayfs", ""},
		{"no task", "native", ""},
	} {
		t.Run(tc.state+"/"+tc.sn, func(t *testing.T) {
			id := "snap-state-" + strings.ReplaceAll(tc.state, " ", "-") + "-" + tc.sn
			o := runOpts{runtime: snapviewRT, snapshotter: tc.sn, args: []string{"sh", "-c", "mkdir -p /data && echo kept > /data/f; exec sleep 300"}}
			switch tc.state {
			case "created":
				o.noStart = true
			case "stopped", "no task":
				o.args = []string{"sh", "-c", "mkdir -p /data && echo kept > /data/f"}
			}
			r, err := start(ctx, t, d, id, o)
			if err != nil {
				t.Fatal(err)
			}
			switch tc.state {
			case "paused":
				deadline := time.Now().Add(10 * time.Second)
				for {
					if out, _, _, _ := r.exec(ctx, "check", "cat", "/data/f"); out == 0 {
						break
					}
					if time.Now().After(deadline) {
						t.Fatal("the container never wrote /data/f")
					}
					time.Sleep(100 * time.Millisecond)
				}
				if err := r.task.Pause(ctx); err != nil {
					t.Fatal(err)
				}
			case "stopped", "no task":
				if code, err := r.wait(t); err != nil || code != 0 {
					t.Fatalf("exit %d %v", code, err)
				}
				if tc.state == "no task" {
					if _, err := r.task.Delete(ctx); err != nil {
						t.Fatal(err)
					}
				}
			}
			whole := takeSnapshot(t, d, id)
			var dir snapshotJSON
			if tc.state != "created" {
				dir = takeSnapshot(t, d, "--dir", "/data", id)
			}
			switch task, err := r.ctr.Task(ctx, nil); {
			case tc.want == "" && !errdefs.IsNotFound(err):
				t.Errorf("a task after the capture: %v", err)
			case tc.want != "":
				if err != nil {
					t.Fatal(err)
				}
				if st, err := task.Status(ctx); err != nil || st.Status != tc.want {
					t.Errorf("the task is %v after the capture (%v), want %v", st.Status, err, tc.want)
				}
			}
			if tc.state == "paused" {
				if err := r.task.Resume(ctx); err != nil {
					t.Fatal(err)
				}
			}
			if dir.ID != "" {
				got := ctrRun(ctx, t, d, "--snapshotter", tc.sn, "--runtime", snapviewRT, "--annotation",
					`io.snapview.volume.d={"snapshot":"`+dir.ID+`","target":"/restored"}`, testImageID, id+"-restore", "cat", "/restored/f")
				if !strings.Contains(got, "kept") {
					t.Errorf("the directory snapshot restored holds %q", got)
				}
				removeSnapshot(ctx, t, d, dir.ID)
			}
			if tc.state != "created" {
				got := ctrRun(ctx, t, d, "--snapshotter", tc.sn, "--runtime", snapviewRT, whole.Image, id+"-whole", "cat", "/data/f")
				if !strings.Contains(got, "kept") {
					t.Errorf("the container snapshot restored holds %q", got)
				}
			}
			if tc.state != "no task" {
				if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
					t.Fatal(err)
				}
			}
			removeSnapshot(ctx, t, d, whole.ID)
		})
	}
	t.Run("no task on a disk image", func(t *testing.T) {
		r, err := start(ctx, t, d, "snap-state-blockfile", runOpts{runtime: snapviewRT, snapshotter: "blockfile", args: []string{"true"}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := r.wait(t); err != nil {
			t.Fatal(err)
		}
		if _, err := r.task.Delete(ctx); err != nil {
			t.Fatal(err)
		}
		out, errOut, code := ctlRun(t, d, nil, "snapshot", "create", "--dir", "/etc", "snap-state-blockfile")
		if code != 1 || out != "" || !strings.Contains(errOut, "has no task, and its rootfs in snapshotter blockfile is a disk image, which snapview does not mount on the host") {
			t.Fatalf("exit %d\n%s%s", code, out, errOut)
		}
		checkNoSnapshotLeftovers(ctx, t, d)
	})
}

// TestSnapshotTTL takes a snapshot that containerd may collect after a
// second: once that is past, containerd's garbage collector takes its
// record and its blobs.
func TestSnapshotTTL(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	r, err := start(ctx, t, d, "snap-ttl", runOpts{runtime: snapviewRT, args: []string{"sh", "-c", snapshotScript}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.waitOutput("ready"); err != nil {
		t.Fatal(err)
	}
	s := takeSnapshot(t, d, "--ttl", "1s", "snap-ttl")
	img, err := d.Client().ImageService().Get(ctx, s.Image)
	if err != nil || img.Labels["containerd.io/gc.expire"] == "" {
		t.Fatalf("the record %+v (%v) has no expiry", img.Labels, err)
	}
	own := ownBlobs(ctx, t, d.Client(), img.Target)
	if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	// A collection, as containerd schedules them.
	l, err := d.Client().LeasesService().Create(ctx, leases.WithRandomID())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Client().LeasesService().Delete(ctx, l, leases.SynchronousDelete); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Client().ImageService().Get(ctx, s.Image); !errdefs.IsNotFound(err) {
		t.Errorf("the expired snapshot's record is still there: %v", err)
	}
	for _, b := range own {
		if _, err := d.Client().ContentStore().Info(ctx, b.Digest); !errdefs.IsNotFound(err) {
			t.Errorf("the expired snapshot's %s is still there: %v", b.Digest, err)
		}
	}
}

// snapVolumeState is the part of snapview.json snapshot volumes add.
type snapVolumeState struct {
	Volumes []struct {
		Name, Image, Snapshot, Target, Mountpoint string
		Writable                                  bool
		Disks                                     []struct{ Path, Device string } `json:"disks"`
		WritableDisk                              *struct{ Path, Device string }  `json:"writable_disk"`
	} `json:"volumes"`
}

func readSnapVolumeState(t *testing.T, d *harness.Daemon, id string) snapVolumeState {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(bundleDir(d, id), "snapview.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st snapVolumeState
	if err := json.Unmarshal(raw, &st); err != nil || len(st.Volumes) != 2 {
		t.Fatalf("volumes in the state %s: %v", raw, err)
	}
	return st
}

// snapVolumeDiskScript is what a block-mode container with a directory
// snapshot as a read-only volume (data) and as a writable clone (scratch)
// does, a stand-in for a monitor: it reports each volume disk with its
// superblock's magic, tries to write the read-only one, writes into the
// writable one, and reports the params.
const snapVolumeDiskScript = `
for d in /dev/snapview/volumes/*/*; do
  echo "disk $d $(stat -c '%F' $d) ext4=$(dd if=$d bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n') erofs=$(dd if=$d bs=1 skip=1024 count=4 2>/dev/null | od -An -tx1 | tr -d ' \n')"
done
if printf x | dd of=/dev/snapview/volumes/data/0 bs=1 seek=8192 conv=notrunc 2>/dev/null; then echo "read-only disk written"; else echo "read-only disk write refused"; fi
if printf x | dd of=/dev/snapview/volumes/scratch/writable bs=1 seek=1048576 conv=notrunc 2>/dev/null; then echo "writable disk written"; else echo "writable disk write refused"; fi
echo "params $(tr -d '\n ' < /.snapview/params.json)"
echo ready; exec sleep 300
`

// TestSnapshotVolumesBlock restores a directory snapshot into block-mode
// containers on blockfile and on the erofs snapshotter in block mode, on
// both containerd versions, read-only and as a writable clone at once: the
// read-only volume's disks are read-only loop devices (one ext4 image on
// blockfile, the layer's erofs image on erofs), the writable clone's disk
// a writable one the shim made (the clone's own ext4 image on blockfile; a
// new ext4 image over the read-only erofs layer on erofs), none mounted on
// the host; the writable clone goes with the container, the snapshot stays.
func TestSnapshotVolumesBlock(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		for _, tc := range []struct {
			sn, magic   string
			layers      int // the writable clone's read-only disks
			upperOnDisk bool
		}{
			{"blockfile", "ext4=53ef", 0, false},
			{"erofs", "erofs=e2e1f5e0", 1, true},
		} {
			t.Run(tc.sn, func(t *testing.T) {
				ctx := setup(t, d)
				src := "snapvol-src-" + tc.sn
				r, err := start(ctx, t, d, src, runOpts{runtime: snapviewRT, snapshotter: tc.sn, args: []string{"sh", "-c", dirScript}})
				if err != nil {
					t.Fatal(err)
				}
				if err := r.waitOutput("ready"); err != nil {
					t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
				}
				s := takeSnapshot(t, d, "--dir", "/data", src)
				if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
					t.Fatal(err)
				}
				ann := maps.Clone(blockAnn)
				ann["io.snapview.volume.data"] = `{"snapshot":"` + s.ID + `","target":"/restored"}`
				ann["io.snapview.volume.scratch"] = `{"snapshot":"` + s.ID + `","target":"/scratch","writable":true}`
				id := "snapvol-block-" + tc.sn
				c, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: tc.sn, annotations: ann, args: []string{"sh", "-c", snapVolumeDiskScript}})
				if err != nil {
					t.Fatal(err)
				}
				if err := c.waitOutput("ready"); err != nil {
					t.Fatalf("%v\nstderr: %s", err, c.stderr.String())
				}
				out := c.stdout.String()
				st := readSnapVolumeState(t, d, id)
				for _, v := range st.Volumes {
					if v.Snapshot != s.ID || v.Mountpoint != "" || v.Image != s.Image {
						t.Errorf("volume %+v", v)
					}
					for _, disk := range v.Disks {
						if !strings.Contains(lineOf(out, "disk "+disk.Path), tc.magic) {
							t.Errorf("disk %s does not read %s:\n%s", disk.Path, tc.magic, out)
						}
						if ro, err := os.ReadFile("/sys/block/" + filepath.Base(disk.Device) + "/ro"); err != nil || strings.TrimSpace(string(ro)) != "1" {
							t.Errorf("volume %s's disk %s is not read-only: %q %v", v.Name, disk.Device, ro, err)
						}
						checkNotMounted(t, disk.Device)
					}
					switch v.Name {
					case "data":
						if v.Writable || v.WritableDisk != nil || len(v.Disks) != 1 {
							t.Errorf("the read-only volume: %+v", v)
						}
					case "scratch":
						if !v.Writable || v.WritableDisk == nil || len(v.Disks) != tc.layers || v.WritableDisk.Path != "/dev/snapview/volumes/scratch/writable" {
							t.Fatalf("the writable clone: %+v", v)
						}
						if ro, err := os.ReadFile("/sys/block/" + filepath.Base(v.WritableDisk.Device) + "/ro"); err != nil || strings.TrimSpace(string(ro)) != "0" {
							t.Errorf("the writable clone's disk %s: ro %q %v", v.WritableDisk.Device, ro, err)
						}
						if !strings.Contains(lineOf(out, "disk "+v.WritableDisk.Path), "ext4=53ef") {
							t.Errorf("the writable clone's disk is not ext4:\n%s", out)
						}
						checkNotMounted(t, v.WritableDisk.Device)
					}
				}
				for _, w := range []string{"read-only disk write refused", "writable disk written",
					`"snapshot":"` + s.ID + `","writable":{"device":"/dev/snapview/volumes/scratch/writable","fstype":"ext4"`} {
					if !strings.Contains(out, w) {
						t.Errorf("container output lacks %q:\n%s", w, out)
					}
				}
				if got := strings.Contains(lineOf(out, "params"), `"upperdir"`); got != tc.upperOnDisk {
					t.Errorf("the params name an upper directory on the writable disk: %v, want %v:\n%s", got, tc.upperOnDisk, lineOf(out, "params"))
				}
				if _, err := c.task.Delete(ctx, client.WithProcessKill); err != nil {
					t.Fatal(err)
				}
				if err := c.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
					t.Fatal(err)
				}
				// The snapshot outlives the containers; its removal leaves nothing.
				removeSnapshot(ctx, t, d, s.ID)
			})
		}
	})
}

// TestSnapshotVolumesShimKilled SIGKILLs the shim of a container with a
// directory snapshot as a read-only volume and as a writable clone, in view
// mode and in block mode: the task's delete after the shim died removes
// the views, the clone's writable snapshot, the disks and the lease.
func TestSnapshotVolumesShimKilled(t *testing.T) {
	d := layeredDaemon(t, false)
	for _, tc := range []struct {
		name, sn string
		ann      map[string]string
	}{
		{"view", "overlayfs", map[string]string{}},
		{"block", "erofs", blockAnn},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := setup(t, d)
			src := "snapvol-kill-src-" + tc.name
			r, err := start(ctx, t, d, src, runOpts{runtime: snapviewRT, snapshotter: tc.sn, args: []string{"sh", "-c", dirScript}})
			if err != nil {
				t.Fatal(err)
			}
			if err := r.waitOutput("ready"); err != nil {
				t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
			}
			s := takeSnapshot(t, d, "--dir", "/data", src)
			if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
				t.Fatal(err)
			}
			ann := maps.Clone(tc.ann)
			ann["io.snapview.volume.data"] = `{"snapshot":"` + s.ID + `","target":"/restored"}`
			ann["io.snapview.volume.scratch"] = `{"snapshot":"` + s.ID + `","target":"/scratch","writable":true}`
			id := "snapvol-killed-" + tc.name
			c, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: tc.sn, annotations: ann, args: []string{"sleep", "300"}})
			if err != nil {
				t.Fatal(err)
			}
			st := readSnapVolumeState(t, d, id)
			c.killShimAndDelete(ctx, t, d, id)
			// The dead shim's cleanup, which containerd runs when it sees the
			// shim gone (the task's delete may return before it ends), removes
			// the writable clone's snapshot with the rest, before the
			// container's record (and with it containerd's hold) goes, and
			// with no GC or sweep: the lease would keep them from GC.
			leaks := d.SnapviewObjectsOf(ctx, ns, id)
			for deadline := time.Now().Add(10 * time.Second); len(leaks) > 0 && time.Now().Before(deadline); leaks = d.SnapviewObjectsOf(ctx, ns, id) {
				time.Sleep(100 * time.Millisecond)
			}
			if len(leaks) > 0 {
				t.Errorf("left after the dead shim's task delete: %v (state %+v)", leaks, st)
			}
			if err := c.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
				t.Fatal(err)
			}
			removeSnapshot(ctx, t, d, s.ID)
		})
	}
}
