package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// derivedConfig turns on views derived from the rootfs's layers.
const derivedConfig = "[view]\nsource = \"layers\"\n"

// derivedScript rewrites, in the container's own rootfs, the files the
// view shows (the kernel, the config), reads back what snapview bound
// (the boot artifact, the whole view, the volumes), and waits.
const derivedScript = `
echo changed > ` + harness.KernelPath + `; rm ` + harness.ConfigPath + `
echo "artifact $(sha256sum < /.snapview/boot/kernel | cut -c1-64)"
echo "view-target $(sha256sum < /image` + harness.KernelPath + ` | cut -c1-64)"
echo "view-config $(test -e /image` + harness.ConfigPath + ` && echo present || echo gone)"
echo "weights $(sha256sum < /models/weights/model.bin | cut -c1-64)"
echo "tool $(sha256sum < /opt/tools/tool | cut -c1-64)"
if touch /image/written 2>/dev/null; then echo "view written"; else echo "view write refused"; fi
echo "params $(tr -d '\n ' < /.snapview/params.json)"
echo ready; exec sleep 300`

// TestDerivedView runs containers with view.source "layers" on containerd
// 2.4 (overlayfs, and the erofs snapshotter's layers) and 2.2 (overlayfs,
// and a view-mode container on the erofs snapshotter in block mode), each
// with a boot artifact, view-target and two volumes, rewriting the files
// its view shows. The view is derived: no view snapshot, a lease holding
// the volumes' views alone (none without volumes), the state, params and
// annotations say so; what the container reads through each bind is the
// image's, and the derived view equals a leased View of the same image
// file by file (a second container with the default source). On the
// snapshotters whose rootfs names no layers (native, blockfile) the view
// is the leased View, and the log says why. The leak check runs after.
func TestDerivedView(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := suite.daemon
		if compat {
			d = layeredDaemon(t, true)
		}
		for _, sn := range []string{"overlayfs", "erofs"} {
			t.Run(sn, func(t *testing.T) {
				ctx := setup(t, d)
				importVolumeImages(ctx, t, d, sn)
				derivedView(ctx, t, d, sn)
			})
		}
		if compat {
			return
		}
		for _, sn := range []string{"native", "blockfile"} {
			t.Run(sn+"-falls-back", func(t *testing.T) {
				ctx := setup(t, d)
				id := "derived-fallback-" + sn
				logStart := len(d.Log())
				r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, snapshotter: sn,
					runtimeOpts: &runtimeoptions.Options{ConfigBody: []byte(derivedConfig)},
					annotations: map[string]string{"io.snapview.boot.kernel": harness.KernelPath}, args: []string{"sleep", "300"}})
				if err != nil {
					t.Fatal(err)
				}
				st := readDerivedState(t, d, id)
				if st.Source != "" || st.ViewKey != "snapview/"+id || st.Lease != "snapview/"+id {
					t.Fatalf("state %+v, want a leased View", st)
				}
				checkPristine(t, st.Mountpoint)
				if !strings.Contains(d.Log()[logStart:], "the rootfs does not name the image's layers") {
					t.Error("the fallback to the leased View is not in the shim log")
				}
				killTask(ctx, t, r)
			})
		}
	})
}

// derivedState is the part of snapview.json a derived view is checked by.
type derivedState struct {
	Version     int    `json:"version"`
	Source      string `json:"source"`
	Snapshotter string `json:"snapshotter"`
	ViewKey     string `json:"view_key"`
	Lease       string `json:"lease"`
	Mountpoint  string `json:"mountpoint"`
}

func readDerivedState(t *testing.T, d *harness.Daemon, id string) derivedState {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(bundleDir(d, id), "snapview.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st derivedState
	if err := json.Unmarshal(raw, &st); err != nil {
		t.Fatalf("state file: %v\n%s", err, raw)
	}
	return st
}

func derivedView(ctx context.Context, t *testing.T, d *harness.Daemon, sn string) {
	t.Helper()
	opts := &runtimeoptions.Options{ConfigBody: []byte(volumeAllow + derivedConfig)}
	ann := withVolumes(map[string]string{"io.snapview.boot.kernel": harness.KernelPath, "io.snapview.view-target": "/image"})
	id := "derived-" + sn
	r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, runtimeOpts: opts, snapshotter: sn, annotations: ann, args: []string{"sh", "-c", derivedScript}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.waitOutput("ready"); err != nil {
		t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
	}
	st := readDerivedState(t, d, id)
	if st.Version != 5 || st.Source != "layers" || st.ViewKey != "" || st.Lease != "snapview/"+id || st.Snapshotter != sn {
		t.Fatalf("state %+v, want a view derived from the layers, with a lease for the volumes alone", st)
	}
	c := d.Client()
	if _, err := c.SnapshotService(sn).Stat(ctx, "snapview/"+id); !errdefs.IsNotFound(err) {
		t.Fatalf("a view snapshot for a derived view: %v", err)
	}
	ls, err := c.LeasesService().List(ctx, fmt.Sprintf("id==%q", st.Lease))
	if err != nil || len(ls) != 1 {
		t.Fatalf("lease %s: %v %v", st.Lease, ls, err)
	}
	res, err := c.LeasesService().ListResources(ctx, ls[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, rs := range res {
		if !strings.HasPrefix(rs.ID, "snapview/"+id+"/volumes/") {
			t.Errorf("the lease of a derived view holds %s %s, want the volumes' views alone", rs.Type, rs.ID)
		}
	}
	if len(res) != 2 {
		t.Errorf("the lease holds %v, want the two volumes' views", res)
	}
	// The view: the image's files, read-only, although the container
	// rewrote its own copy.
	checkPristine(t, st.Mountpoint)
	if err := os.WriteFile(filepath.Join(st.Mountpoint, "written-by-host"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("writing into the view: %v, want EROFS", err)
	}
	out := r.stdout.String()
	kernel := suite.image.Files[harness.KernelPath]
	for _, want := range []string{"artifact " + kernel, "view-target " + kernel, "view-config present", "view write refused", `"view_source":"layers"`} {
		if !strings.Contains(out, want) {
			t.Errorf("the container read %q, want %q", out, want)
		}
	}
	for _, img := range volumeImages(t) {
		for path, sum := range img.Files {
			switch path {
			case "/weights/model.bin":
				if !strings.Contains(out, "weights "+sum) {
					t.Errorf("volume models: %q", out)
				}
			case "/usr/bin/tool":
				if !strings.Contains(out, "tool "+sum) {
					t.Errorf("volume tools: %q", out)
				}
			}
		}
	}
	// config.json as runc reads it: no view key, the lease (the
	// volumes'), the source.
	var spec struct {
		Annotations map[string]string `json:"annotations"`
	}
	raw, err := os.ReadFile(filepath.Join(bundleDir(d, id), "config.json"))
	if err != nil || json.Unmarshal(raw, &spec) != nil {
		t.Fatalf("config.json: %v", err)
	}
	if _, ok := spec.Annotations["io.snapview.view.key"]; ok || spec.Annotations["io.snapview.view.source"] != "layers" ||
		spec.Annotations["io.snapview.view.lease"] != st.Lease || spec.Annotations["io.snapview.view.mountpoint"] != st.Mountpoint {
		t.Errorf("config.json annotations %v", spec.Annotations)
	}
	// snapviewctl ls knows the kind and finds it healthy.
	lsOut, code := snapviewctl(t, d, "ls", "--json")
	var entries []struct {
		Container, Source, Health string
	}
	if code != 0 || json.Unmarshal([]byte(lsOut), &entries) != nil {
		t.Fatalf("ls --json exit %d:\n%s", code, lsOut)
	}
	found := false
	for _, e := range entries {
		if e.Container == id {
			found = true
			if e.Source != "layers" || e.Health != "ok" {
				t.Errorf("ls: %+v", e)
			}
		}
	}
	if !found {
		t.Errorf("ls does not list %s:\n%s", id, lsOut)
	}

	// The same image's leased View, in a container with the default
	// source and no volumes: the same tree, file by file.
	leasedID := "leased-" + sn
	lr, err := start(ctx, t, d, leasedID, runOpts{runtime: snapviewRT, snapshotter: sn,
		annotations: map[string]string{"io.snapview.boot.kernel": harness.KernelPath}, args: []string{"sleep", "300"}})
	if err != nil {
		t.Fatal(err)
	}
	leased := readDerivedState(t, d, leasedID)
	if leased.Source != "" || leased.ViewKey != "snapview/"+leasedID {
		t.Fatalf("the default source made %+v, want a leased View", leased)
	}
	if diffs := compareTrees(st.Mountpoint, leased.Mountpoint); len(diffs) > 0 {
		t.Errorf("the derived view differs from the leased View:\n  %s", strings.Join(diffs, "\n  "))
	}
	killTask(ctx, t, lr)

	// Without volumes: no lease at all.
	bare := "derived-bare-" + sn
	br, err := start(ctx, t, d, bare, runOpts{runtime: snapviewRT, snapshotter: sn, runtimeOpts: &runtimeoptions.Options{ConfigBody: []byte(derivedConfig)},
		annotations: map[string]string{"io.snapview.boot.kernel": harness.KernelPath}, args: []string{"sleep", "300"}})
	if err != nil {
		t.Fatal(err)
	}
	if bs := readDerivedState(t, d, bare); bs.Source != "layers" || bs.Lease != "" || bs.ViewKey != "" {
		t.Errorf("state %+v, want a derived view with no lease", bs)
	}
	if ls, err := c.LeasesService().List(ctx, fmt.Sprintf("id==%q", "snapview/"+bare)); err != nil || len(ls) != 0 {
		t.Errorf("a lease for a derived view without volumes: %v %v", ls, err)
	}
	killTask(ctx, t, br)
	killTask(ctx, t, r)
	if m, _ := mountinfo.Mounted(st.Mountpoint); m {
		t.Errorf("the derived view is still mounted after delete")
	}
}

// killTask kills and deletes r's task (its container goes with the test).
func killTask(ctx context.Context, t *testing.T, r *running) {
	t.Helper()
	if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
}

// compareTrees compares two directory trees entry by entry (type, mode,
// owner, size, content, link target) and returns what differs.
func compareTrees(a, b string) []string {
	var diffs []string
	seen := map[string]bool{}
	_ = filepath.WalkDir(a, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			diffs = append(diffs, err.Error())
			return nil
		}
		rel, _ := filepath.Rel(a, p)
		seen[rel] = true
		if d := compareEntry(p, filepath.Join(b, rel)); d != "" {
			diffs = append(diffs, rel+": "+d)
		}
		return nil
	})
	_ = filepath.WalkDir(b, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			diffs = append(diffs, err.Error())
			return nil
		}
		if rel, _ := filepath.Rel(b, p); !seen[rel] {
			diffs = append(diffs, rel+": only in "+b)
		}
		return nil
	})
	if len(seen) < 10 {
		diffs = append(diffs, fmt.Sprintf("only %d entries in %s: not an image", len(seen), a))
	}
	return diffs
}

func compareEntry(a, b string) string {
	fa, err := os.Lstat(a)
	if err != nil {
		return err.Error()
	}
	fb, err := os.Lstat(b)
	if err != nil {
		return err.Error()
	}
	sa, sb := fa.Sys().(*syscall.Stat_t), fb.Sys().(*syscall.Stat_t)
	switch {
	case fa.Mode() != fb.Mode():
		return fmt.Sprintf("mode %v, %v", fa.Mode(), fb.Mode())
	case sa.Uid != sb.Uid || sa.Gid != sb.Gid:
		return fmt.Sprintf("owner %d:%d, %d:%d", sa.Uid, sa.Gid, sb.Uid, sb.Gid)
	case fa.Mode().IsRegular() && fa.Size() != fb.Size():
		return fmt.Sprintf("size %d, %d", fa.Size(), fb.Size())
	case fa.Mode()&fs.ModeSymlink != 0:
		la, _ := os.Readlink(a)
		lb, _ := os.Readlink(b)
		if la != lb {
			return fmt.Sprintf("link %q, %q", la, lb)
		}
	case fa.Mode().IsRegular():
		if !bytes.Equal(fileSum(a), fileSum(b)) {
			return "content differs"
		}
	}
	return ""
}

func fileSum(p string) []byte {
	f, err := os.Open(p)
	if err != nil {
		return []byte(err.Error())
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return []byte(err.Error())
	}
	return h.Sum(nil)
}
