package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// The volume images: two images other than the container's, of one and
// of two layers, that containers mount as volumes.
const (
	modelsImage = "docker.io/snapview/vol-models:1"
	toolsImage  = "docker.io/snapview/vol-tools:1"
	// volumeAllow is the configuration that allows them.
	volumeAllow = "[volumes]\nallow = [\"docker.io/snapview/vol-*\"]\n"
)

var volumeImagesOnce struct {
	once sync.Once
	imgs []*harness.Image
	err  error
}

// volumeImages builds the volume images once: models (one layer: 1 MiB of
// weights and a README) and tools (two layers: a binary, and a symlink out
// of the image).
func volumeImages(t *testing.T) []*harness.Image {
	t.Helper()
	volumeImagesOnce.once.Do(func() {
		rng := rand.NewChaCha8([32]byte{'v', 'o', 'l'})
		weights := make([]byte, 1<<20)
		_, _ = rng.Read(weights)
		build := func(ref string, layers ...*harness.Layer) (*harness.Image, error) {
			img, err := harness.Compose(ref, ocispec.ImageConfig{}, layers...)
			if err != nil {
				return nil, err
			}
			archive, err := img.WriteArchiveFile(suite.dir)
			if err != nil {
				return nil, err
			}
			return &harness.Image{Ref: ref, Archive: archive, Files: img.Files}, nil
		}
		models, err := build(modelsImage, harness.NewLayer().Dir("weights", 0o755).File("weights/model.bin", 0o644, weights).File("README", 0o644, []byte("models v1\n")))
		if err != nil {
			volumeImagesOnce.err = err
			return
		}
		tools, err := build(toolsImage,
			harness.NewLayer().Dir("usr", 0o755).Dir("usr/bin", 0o755).File("usr/bin/tool", 0o755, []byte("#!/bin/sh\necho tool\n")),
			harness.NewLayer().Dir("usr", 0o755).Symlink("usr/escape", "/etc").File("usr/VERSION", 0o644, []byte("tools 1\n")))
		volumeImagesOnce.imgs, volumeImagesOnce.err = []*harness.Image{models, tools}, err
	})
	if volumeImagesOnce.err != nil {
		t.Fatal(volumeImagesOnce.err)
	}
	return volumeImagesOnce.imgs
}

// volumeAnn asks for both volume images: models at /models, and tools'
// usr/bin at /opt/tools.
var volumeAnn = map[string]string{
	"io.snapview.volume.models": `{"image":"` + modelsImage + `","target":"/models"}`,
	"io.snapview.volume.tools":  `{"image":"` + toolsImage + `","target":"/opt/tools","subpath":"usr/bin"}`,
}

func withVolumes(ann map[string]string) map[string]string { return withVolumesOf(ann, volumeAnn) }

// volumeScript reads both volumes as a view-mode container sees them, and
// tries to write into them.
const volumeScript = `
echo "weights $(sha256sum < /models/weights/model.bin | cut -c1-64)"
echo "readme $(cat /models/README)"
echo "tool $(sha256sum < /opt/tools/tool | cut -c1-64)"
if touch /models/written 2>/dev/null; then echo "volume written"; else echo "volume write refused"; fi
if touch /opt/tools/written 2>/dev/null; then echo "volume written"; else echo "volume write refused"; fi
if [ -e /opt/tools/VERSION ]; then echo "subpath ignored"; fi
echo "params $(tr -d '\n ' < /.snapview/params.json)"
`

// TestVolumes mounts two volumes of two images into a view-mode container
// on overlayfs, blockfile and the erofs snapshotter in block mode, on both
// containerd versions: each at its target with the image's bytes, the
// subpath of one, neither writable, and nothing left after delete.
func TestVolumes(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		for _, sn := range []string{"overlayfs", "blockfile", "erofs"} {
			t.Run(sn, func(t *testing.T) {
				ctx := setup(t, d)
				importVolumeImages(ctx, t, d, sn)
				id := "vol-" + sn
				opts := &runtimeoptions.Options{ConfigBody: []byte(volumeAllow)}
				r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, runtimeOpts: opts, snapshotter: sn, annotations: volumeAnn,
					args: []string{"sh", "-c", volumeScript + "echo ready; exec sleep 300"}})
				if err != nil {
					t.Fatal(err)
				}
				if err := r.waitOutput("ready"); err != nil {
					t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
				}
				imgs := volumeImages(t)
				out := r.stdout.String()
				for _, w := range []string{
					"weights " + imgs[0].Files["/weights/model.bin"], "readme models v1", "tool " + imgs[1].Files["/usr/bin/tool"],
					`"volumes":{"models":{"image":"` + modelsImage + `","target":"/models"}`, `"subpath":"/usr/bin"`,
				} {
					if !strings.Contains(out, w) {
						t.Errorf("container output lacks %q:\n%s", w, out)
					}
				}
				if strings.Contains(out, "volume written") || strings.Count(out, "volume write refused") != 2 || strings.Contains(out, "subpath ignored") {
					t.Errorf("a volume is writable, or its subpath was ignored:\n%s", out)
				}
				if sn == "overlayfs" {
					info, code := snapviewctl(t, d, "inspect", id)
					for _, w := range []string{"health      ok", "volume      models: image " + modelsImage + " at /models (subpath /)", "volume      tools: image " + toolsImage + " at /opt/tools (subpath /usr/bin)", "(mounted: true)"} {
						if code != 0 || !strings.Contains(info, w) {
							t.Errorf("inspect (exit %d) lacks %q:\n%s", code, w, info)
						}
					}
				}
				st := readVolumeState(t, d, id)
				for _, v := range st.Volumes {
					info, err := d.Client().SnapshotService(sn).Stat(ctx, v.ViewKey)
					if err != nil || info.Kind.String() != "View" || info.Labels["snapview.io/container"] != id || info.Parent != v.Parent {
						t.Errorf("volume %s's view: %+v %v", v.Name, info, err)
					}
				}
				if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
					t.Fatal(err)
				}
			})
		}
	})
}

// volumeState is the part of snapview.json volumes add.
type volumeState struct {
	Volumes []struct {
		Name, Image, Parent, Target, Subpath, Mountpoint, Source string
		ViewKey                                                  string `json:"view_key"`
		Disks                                                    []struct {
			Path, Device string
			Major, Minor uint32
		} `json:"disks"`
	} `json:"volumes"`
}

func readVolumeState(t *testing.T, d *harness.Daemon, id string) volumeState {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(bundleDir(d, id), "snapview.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st volumeState
	if err := json.Unmarshal(raw, &st); err != nil || len(st.Volumes) != 2 {
		t.Fatalf("volumes in the state %s: %v", raw, err)
	}
	return st
}

// importVolumeImages imports the volume images into d's test namespace and
// unpacks them for snapshotter sn.
func importVolumeImages(ctx context.Context, t *testing.T, d *harness.Daemon, sn string) {
	t.Helper()
	for _, img := range volumeImages(t) {
		if _, err := d.Import(ctx, ns, img, sn); err != nil {
			t.Fatal(err)
		}
	}
}

// volumeDiskScript reports, in a block-mode container, each volume disk
// node and its superblock magic (ext4 at 1080, erofs at 1024), tries to
// write one, and prints the params.
const volumeDiskScript = `
for d in /dev/snapview/volumes/*/*; do
  echo "disk $d $(stat -c '%F' $d) ext4=$(dd if=$d bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n') erofs=$(dd if=$d bs=1 skip=1024 count=4 2>/dev/null | od -An -tx1 | tr -d ' \n')"
done
if printf x | dd of=/dev/snapview/volumes/models/0 bs=1 seek=8192 conv=notrunc 2>/dev/null; then echo "volume disk written"; else echo "volume disk write refused"; fi
echo "params $(tr -d '\n ' < /.snapview/params.json)"
`

// TestVolumesBlock hands the volumes of a block-mode container to it as
// read-only disks, on blockfile (one ext4 disk per volume) and on the
// erofs snapshotter in block mode (one erofs disk per layer), on both
// containerd versions: never mounted on the host, their superblocks read
// through the disks, a write refused.
func TestVolumesBlock(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		for _, tc := range []struct {
			sn, magic string
			disks     map[string]int // per volume
		}{
			{"blockfile", "ext4=53ef", map[string]int{"models": 1, "tools": 1}},
			{"erofs", "erofs=e2e1f5e0", map[string]int{"models": 1, "tools": 2}},
		} {
			t.Run(tc.sn, func(t *testing.T) {
				ctx := setup(t, d)
				importVolumeImages(ctx, t, d, tc.sn)
				id := "vol-block-" + tc.sn
				opts := &runtimeoptions.Options{ConfigBody: []byte(volumeAllow)}
				r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, runtimeOpts: opts, snapshotter: tc.sn, annotations: withVolumes(blockAnn),
					args: []string{"sh", "-c", volumeDiskScript + "echo ready; exec sleep 300"}})
				if err != nil {
					t.Fatal(err)
				}
				if err := r.waitOutput("ready"); err != nil {
					t.Fatalf("%v\nstderr: %s", err, r.stderr.String())
				}
				out := r.stdout.String()
				st := readVolumeState(t, d, id)
				for _, v := range st.Volumes {
					if len(v.Disks) != tc.disks[v.Name] || v.Mountpoint != "" || v.Source != "" {
						t.Errorf("volume %s: %+v, want %d disks and no host mount", v.Name, v, tc.disks[v.Name])
					}
					for i, disk := range v.Disks {
						path := fmt.Sprintf("/dev/snapview/volumes/%s/%d", v.Name, i)
						if disk.Path != path || !strings.Contains(out, "disk "+path+" block special file") {
							t.Errorf("volume %s disk %d: %+v; output:\n%s", v.Name, i, disk, out)
						}
						if !strings.Contains(out, path) || !strings.Contains(lineOf(out, "disk "+path), tc.magic) {
							t.Errorf("disk %s does not read %s:\n%s", path, tc.magic, out)
						}
						if ro, err := os.ReadFile("/sys/block/" + filepath.Base(disk.Device) + "/ro"); err != nil || strings.TrimSpace(string(ro)) != "1" {
							t.Errorf("volume disk %s is not a read-only loop device: %q %v", disk.Device, ro, err)
						}
						checkNotMounted(t, disk.Device)
					}
				}
				for _, w := range []string{"volume disk write refused", `"volumes":{"models":{"image":"` + modelsImage + `","target":"/models","layers":[{"device":"/dev/snapview/volumes/models/0"`} {
					if !strings.Contains(out, w) {
						t.Errorf("container output lacks %q:\n%s", w, out)
					}
				}
				if _, err := r.task.Delete(ctx, client.WithProcessKill); err != nil {
					t.Fatal(err)
				}
			})
		}
	})
}

func lineOf(out, prefix string) string {
	for l := range strings.SplitSeq(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// checkNotMounted checks that no mount of this process's namespace has
// dev as its source.
func checkNotMounted(t *testing.T, dev string) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 9 && f[len(f)-2] == dev {
			t.Errorf("volume disk %s is mounted on the host: %s", dev, l)
		}
	}
}

// TestVolumesCtrRun runs a container with volumes through the ctr binary of
// each containerd version, as a user would.
func TestVolumesCtrRun(t *testing.T) {
	eachVersion(t, func(t *testing.T, compat bool) {
		d := layeredDaemon(t, compat)
		ctx := setup(t, d)
		importVolumeImages(ctx, t, d, "overlayfs")
		cfg := filepath.Join(t.TempDir(), "snapview.toml")
		if err := os.WriteFile(cfg, []byte(volumeAllow), 0o600); err != nil {
			t.Fatal(err)
		}
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		args := []string{"--address", d.Address, "--namespace", ns, "run", "--rm", "--runtime", snapviewRT, "--runtime-config-path", cfg}
		for k, v := range volumeAnn {
			args = append(args, "--annotation", k+"="+v)
		}
		out, err := exec.CommandContext(cctx, d.Tools.Ctr(), append(args, testImageID, "vol-ctr", "sh", "-c", volumeScript)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ctr run: %v\n%s", err, out)
		}
		imgs := volumeImages(t)
		for _, w := range []string{"weights " + imgs[0].Files["/weights/model.bin"], "tool " + imgs[1].Files["/usr/bin/tool"]} {
			if !strings.Contains(string(out), w) {
				t.Errorf("ctr run output lacks %q:\n%s", w, out)
			}
		}
	})
}

// TestVolumesRefused checks that every bad volume fails the create with a
// snapview: error that names what was wrong, and leaves nothing behind.
func TestVolumesRefused(t *testing.T) {
	d := layeredDaemon(t, false)
	ctx := setup(t, d)
	importVolumeImages(ctx, t, d, "overlayfs")
	// An image in another namespace only (another tenant's), and one
	// unpacked for another snapshotter than the container's.
	theirs, packed := "docker.io/snapview/vol-theirs:1", "docker.io/snapview/vol-packed:1"
	for _, c := range []struct{ ref, ns, sn string }{{theirs, "other-tenant", "overlayfs"}, {packed, ns, "blockfile"}} {
		img, err := harness.Compose(c.ref, ocispec.ImageConfig{}, harness.NewLayer().File("secret", 0o644, []byte(c.ref)))
		if err != nil {
			t.Fatal(err)
		}
		archive, err := img.WriteArchiveFile(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.Import(ctx, c.ns, &harness.Image{Ref: c.ref, Archive: archive}, c.sn); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = d.Client().ImageService().Delete(harness.Context(context.Background(), c.ns), c.ref) })
	}
	many := map[string]string{}
	for i := range 17 {
		many[fmt.Sprintf("io.snapview.volume.v%d", i)] = fmt.Sprintf(`{"image":%q,"target":"/v%d"}`, modelsImage, i)
	}
	vol := func(v string) map[string]string { return map[string]string{"io.snapview.volume.v": v} }
	for _, tc := range []struct {
		name   string
		ann    map[string]string
		config string
		want   []string
	}{
		{"bad JSON", vol(`{"image":`), volumeAllow, []string{"annotation io.snapview.volume.v", "malformed JSON"}},
		{"unknown field", vol(`{"image":"` + modelsImage + `","target":"/m","source":"/etc"}`), volumeAllow, []string{`unknown field "source"`}},
		{"17 volumes", many, volumeAllow, []string{"17 volumes (io.snapview.volume.*): at most 16"}},
		{"overlapping targets", map[string]string{
			"io.snapview.volume.a": `{"image":"` + modelsImage + `","target":"/data"}`,
			"io.snapview.volume.b": `{"image":"` + toolsImage + `","target":"/data/tools"}`,
		}, volumeAllow, []string{"bind targets overlap", "io.snapview.volume.a at /data"}},
		{"relative target", vol(`{"image":"` + modelsImage + `","target":"data"}`), volumeAllow, []string{`target "data"`, "absolute"}},
		{"subpath escaping through a symlink", vol(`{"image":"` + toolsImage + `","target":"/t","subpath":"usr/escape/cron.d"}`), volumeAllow,
			[]string{`subpath "/usr/escape/cron.d" in image ` + toolsImage, "symlinks are resolved inside the image"}},
		{"image of another namespace", vol(`{"image":"` + theirs + `","target":"/m"}`), volumeAllow, []string{"image " + theirs + ": no such image in namespace " + ns}},
		{"disallowed image", vol(`{"image":"` + testImageID + `","target":"/m"}`), volumeAllow, []string{"image " + testImageID + " is not allowed as a volume by [volumes] allow"}},
		{"no image allowed, the default", vol(`{"image":"` + modelsImage + `","target":"/m"}`), "", []string{"is not allowed as a volume", "(none: it is empty, the default)"}},
		{"missing image", vol(`{"image":"docker.io/snapview/vol-missing:1","target":"/m"}`), volumeAllow,
			[]string{"image docker.io/snapview/vol-missing:1: no such image in namespace " + ns, "ctr -n " + ns + " images pull --snapshotter overlayfs"}},
		{"image not unpacked", vol(`{"image":"` + packed + `","target":"/m"}`), volumeAllow, []string{"image " + packed + ": not unpacked in snapshotter overlayfs"}},
		{"volume in mode off", withVolumes(map[string]string{"io.snapview.mode": "off"}), volumeAllow, []string{"asks for binds from the view, but the mode is off"}},
		{"block mode on overlayfs", withVolumes(blockAnn), volumeAllow, []string{"block mode"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := setup(t, d)
			var opts any
			if tc.config != "" {
				opts = &runtimeoptions.Options{ConfigBody: []byte(tc.config)}
			}
			id := "vol-refused-" + strings.NewReplacer(" ", "-", ",", "").Replace(tc.name)
			refused(ctx, t, d, id, runOpts{runtime: snapviewRT, runtimeOpts: opts, annotations: tc.ann, args: []string{"true"}}, tc.want...)
		})
	}
}

// TestVolumesShimKilled kills the shim of a running container with
// volumes mounted, in view mode and in block mode, and deletes it as a
// user would: containerd's `delete` action must leave nothing.
func TestVolumesShimKilled(t *testing.T) {
	d := layeredDaemon(t, false)
	for _, tc := range []struct {
		name, sn string
		ann      map[string]string
	}{
		{"view", "overlayfs", volumeAnn},
		{"block", "erofs", withVolumes(blockAnn)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := setup(t, d)
			importVolumeImages(ctx, t, d, tc.sn)
			id := "vol-killed-" + tc.name
			opts := &runtimeoptions.Options{ConfigBody: []byte(volumeAllow)}
			r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, runtimeOpts: opts, snapshotter: tc.sn, annotations: tc.ann, args: []string{"sleep", "300"}})
			if err != nil {
				t.Fatal(err)
			}
			readVolumeState(t, d, id)
			r.killShimAndDelete(ctx, t, d, id)
			if err := r.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestVolumesCRI runs pods with volumes through containerd's CRI plugin,
// on both containerd versions, asked for by a pod annotation: a view-mode
// container on overlayfs reads both volumes at their targets, and a
// block-mode container on the erofs snapshotter in block mode gets them as
// read-only disks; the pause containers, which the pod annotation reaches
// too, ignore it.
func TestVolumesCRI(t *testing.T) {
	if suite.skip != "" {
		t.Skip(suite.skip)
	}
	eachVersion(t, func(t *testing.T, compat bool) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		tools, err := harness.ToolsFromEnv(compat)
		if err != nil {
			t.Fatal(err)
		}
		d, rs := startCRIDaemon(t, tools, []harness.Option{harness.WithErofsBlock(erofsBlockSize)}, append([]*harness.Image{suite.image}, volumeImages(t)...), "overlayfs", "erofs")
		setup(t, d)
		imgs := volumeImages(t)
		for _, tc := range []struct {
			handler, cmd string
			ann          map[string]string
			want         []string
		}{
			{"snapview", volumeScript + "echo ready; exec sleep 300", nil,
				[]string{"weights " + imgs[0].Files["/weights/model.bin"], "tool " + imgs[1].Files["/usr/bin/tool"], "volume write refused", "ready"}},
			{"snapview-layered", volumeDiskScript + "echo ready; exec sleep 300", blockAnn,
				[]string{"disk /dev/snapview/volumes/models/0 block special file", "erofs=e2e1f5e0", "disk /dev/snapview/volumes/tools/1", "volume disk write refused", "ready"}},
		} {
			podID, podConfig, logDir := runPod(ctx, t, rs, tc.handler, volumeAnn)
			ctr, err := rs.CreateContainer(ctx, containerRequest(podID, podConfig, "app", tc.ann, "sh", "-c", tc.cmd))
			if err != nil {
				t.Fatalf("%s: CreateContainer: %v", tc.handler, err)
			}
			if _, err := rs.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: ctr.ContainerId}); err != nil {
				t.Fatalf("%s: StartContainer: %v", tc.handler, err)
			}
			waitLog(t, filepath.Join(logDir, "app.log"), tc.want...)
			if raw, err := os.ReadFile(filepath.Join(d.State, "io.containerd.runtime.v2.task", criNamespace, podID, "snapview.json")); err == nil && strings.Contains(string(raw), `"volumes"`) {
				t.Errorf("%s: the pause container got volumes: %s", tc.handler, raw)
			}
			if _, err := rs.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: ctr.ContainerId, Timeout: 1}); err != nil {
				t.Fatalf("StopContainer: %v", err)
			}
			if _, err := rs.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: ctr.ContainerId}); err != nil {
				t.Fatalf("RemoveContainer: %v", err)
			}
		}
	})
}

// TestVolumesTooManyDisks refuses a container whose volumes would take more
// loop devices of the node than one container may have (16 volumes of a
// 9-layer image on the erofs snapshotter: 144 read-only disks), in view
// mode, where containerd's mount manager would attach them for the
// volumes' mounts, and in block mode, where the shim would attach them for
// the guest; before anything is mounted or attached, and nothing is left.
func TestVolumesTooManyDisks(t *testing.T) {
	d := layeredDaemon(t, false)
	ctx := setup(t, d)
	const ref = "docker.io/snapview/vol-layers:9"
	var layers []*harness.Layer
	for i := range 9 {
		layers = append(layers, harness.NewLayer().File(fmt.Sprintf("layer%d", i), 0o644, []byte(fmt.Sprintf("layer %d\n", i))))
	}
	img, err := harness.Compose(ref, ocispec.ImageConfig{}, layers...)
	if err != nil {
		t.Fatal(err)
	}
	archive, err := img.WriteArchiveFile(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Import(ctx, ns, &harness.Image{Ref: ref, Archive: archive}, "erofs"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Client().ImageService().Delete(harness.Context(context.Background(), ns), ref) })
	ann := map[string]string{}
	for i := range 16 {
		ann[fmt.Sprintf("io.snapview.volume.v%02d", i)] = fmt.Sprintf(`{"image":%q,"target":"/v%02d"}`, ref, i)
	}
	allow := "[volumes]\nallow = [\"docker.io/snapview/*\"]\n"
	for _, tc := range []struct {
		name string
		ann  map[string]string
		want string
	}{
		{"view", ann, "the container would have 144 read-only disks"},
		{"block", withVolumesOf(blockAnn, ann), "the container would have 146 read-only disks (rootfs 2, volume v00 9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := setup(t, d)
			refused(ctx, t, d, "vol-disks-"+tc.name, runOpts{runtime: snapviewRT, runtimeOpts: &runtimeoptions.Options{ConfigBody: []byte(allow)},
				snapshotter: "erofs", annotations: tc.ann, args: []string{"true"}}, tc.want, "more than the 128 one container may have")
		})
	}
}

// withVolumesOf returns ann with the volume annotations vols added.
func withVolumesOf(ann, vols map[string]string) map[string]string {
	out := maps.Clone(ann)
	maps.Copy(out, vols)
	return out
}
