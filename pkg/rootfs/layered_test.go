package rootfs

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/snapview/snapview/params"
)

// erofsBlock returns the mounts containerd's erofs snapshotter (v2.2, v2.4)
// gives an active snapshot of n layers in block mode, over files in dir.
func erofsBlock(t *testing.T, dir string, n int) []Mount {
	t.Helper()
	ms := []Mount{{Type: "mkfs/ext4", Source: filepath.Join(dir, "rwlayer.img"),
		Options: []string{"X-containerd.mkfs.fs=ext4", "X-containerd.mkfs.size=67108864", "rw", "loop"}}}
	for i := range n {
		f := filepath.Join(dir, fmt.Sprintf("layer%d.erofs", i))
		if err := os.WriteFile(f, []byte("erofs"), 0o644); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, Mount{Type: "erofs", Source: f, Options: []string{"ro", "loop"}})
	}
	lower := fmt.Sprintf("lowerdir={{ overlay 1 %d }}", n)
	if n == 1 {
		lower = "lowerdir={{ mount 1 }}"
	}
	return append(ms, Mount{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{
		"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
		"workdir={{ mount 0 }}/work", "upperdir={{ mount 0 }}/upper", lower, "index=off"}})
}

func TestDetectLayered(t *testing.T) {
	dir := t.TempDir()
	ms := erofsBlock(t, dir, 3)
	l, err := DetectLayered(ms)
	if err != nil {
		t.Fatal(err)
	}
	want := Layered{
		Writable: ms[0], FSType: "ext4", Mkfs: &Mkfs{Size: 64 << 20},
		Layers:   []Layer{{Mount: ms[1]}, {Mount: ms[2]}, {Mount: ms[3]}},
		UpperDir: "/upper", WorkDir: "/work",
		Dirs:           []Dir{{Path: "/upper", Mode: 0o755}, {Path: "/work", Mode: 0o755}},
		OverlayOptions: []string{"index=off"},
	}
	if !reflect.DeepEqual(l, want) {
		t.Fatalf("got %+v\nwant %+v", l, want)
	}
	if !IsLayered(ms) || IsLayered(ms[:1]) {
		t.Fatal("IsLayered")
	}

	t.Run("one layer", func(t *testing.T) {
		ms := erofsBlock(t, t.TempDir(), 1)
		l, err := DetectLayered(ms)
		if err != nil || len(l.Layers) != 1 || !reflect.DeepEqual(l.Layers[0].Mount, ms[1]) {
			t.Fatalf("%+v %v", l, err)
		}
	})
	t.Run("lowerdir in reverse", func(t *testing.T) {
		ms := erofsBlock(t, t.TempDir(), 3)
		ms[4].Options[4] = "lowerdir={{ overlay 3 1 }}"
		l, err := DetectLayered(ms)
		if err != nil || l.Layers[0].Mount.Source != ms[3].Source || l.Layers[2].Mount.Source != ms[1].Source {
			t.Fatalf("%+v %v", l, err)
		}
	})
	t.Run("merged fsmeta with blobs", func(t *testing.T) {
		d := t.TempDir()
		ms := erofsBlock(t, d, 2)
		blob := filepath.Join(d, "blob.erofs")
		if err := os.WriteFile(blob, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		ms[2].Options = append(ms[2].Options, "device="+blob)
		l, err := DetectLayered(ms)
		if err != nil || !reflect.DeepEqual(l.Layers[1].Blobs, []string{blob}) || l.DiskCount() != 3 {
			t.Fatalf("%+v %v", l, err)
		}
	})
	t.Run("existing image without mkfs", func(t *testing.T) {
		d := t.TempDir()
		ms := erofsBlock(t, d, 2)
		if err := os.WriteFile(ms[0].Source, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		ms[0] = Mount{Type: "ext4", Source: ms[0].Source, Options: []string{"rw", "loop"}}
		l, err := DetectLayered(ms)
		if err != nil || l.Mkfs != nil || l.FSType != "ext4" {
			t.Fatalf("%+v %v", l, err)
		}
	})

	for _, tc := range []struct {
		name   string
		change func(ms []Mount) []Mount
		want   string
	}{
		{"view of the image (no upper)", func(ms []Mount) []Mount {
			return append(ms[1:3:3], Mount{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{"lowerdir={{ overlay 0 1 }}"}})
		}, "read-only (a view of the image)"},
		{"plain overlay", func(ms []Mount) []Mount {
			return []Mount{ms[1], {Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a:/b", "upperdir=/u", "workdir=/w"}}}
		}, "not an overlay of the mount manager"},
		{"erofs without block mode", func(ms []Mount) []Mount {
			ms[4].Options = []string{"workdir=/s/3/work", "upperdir=/s/3/fs", "lowerdir={{ overlay 1 3 }}"}
			return ms[1:]
		}, "the erofs snapshotter is not in block mode"},
		{"unknown transform", func(ms []Mount) []Mount { ms[4].Type = "format/mount/overlay"; return ms }, "transform other than format and mkdir"},
		{"upper climbs out", func(ms []Mount) []Mount { ms[4].Options[3] = "upperdir={{ mount 0 }}/../upper"; return ms }, "climbs out of mount 0"},
		{"upper on a layer", func(ms []Mount) []Mount {
			ms[4].Options[2], ms[4].Options[3] = "workdir={{ mount 1 }}/work", "upperdir={{ mount 1 }}/upper"
			return ms
		}, "lowerdir names mount 1"},
		{"lowerdir names the overlay", func(ms []Mount) []Mount { ms[4].Options[4] = "lowerdir={{ overlay 1 4 }}"; return ms }, "names mount 4"},
		{"a mount nobody uses", func(ms []Mount) []Mount { ms[4].Options[4] = "lowerdir={{ overlay 1 2 }}"; return ms }, "neither the writable image nor a layer"},
		{"host path lowerdir", func(ms []Mount) []Mount { ms[4].Options[4] = "lowerdir=/etc:/usr"; return ms }, `"/etc:/usr" is not a list of mounts`},
		{"templated other option", func(ms []Mount) []Mount { ms[4].Options[5] = "metacopy={{ mount 1 }}"; return ms }, `overlay option "metacopy={{ mount 1 }}"`},
		{"writable not ext4", func(ms []Mount) []Mount { ms[0].Type = "mkfs/xfs"; return ms }, `type "mkfs/xfs" is not an ext2/3/4 disk image`},
		{"writable read-only", func(ms []Mount) []Mount { ms[0].Options[2] = "ro"; return ms }, "not a writable disk image"},
		{"writable without size", func(ms []Mount) []Mount { ms[0].Options = []string{"rw", "loop"}; return ms }, "gives no X-containerd.mkfs.size"},
		{"writable unknown mkfs option", func(ms []Mount) []Mount { ms[0].Options[1] = "X-containerd.mkfs.label=x"; return ms }, "unknown mkfs option"},
		{"writable a directory", func(ms []Mount) []Mount { ms[0].Source = filepath.Dir(ms[1].Source); return ms }, "a directory, not a regular file"},
		{"layer not erofs", func(ms []Mount) []Mount { ms[2].Type = "ext4"; return ms }, `layer 1 (mount 2): type "ext4" is not erofs`},
		{"layer writable", func(ms []Mount) []Mount { ms[1].Options = []string{"rw", "loop"}; return ms }, "layer 0 (mount 1): not read-only"},
		{"layer with dm-verity", func(ms []Mount) []Mount {
			ms[3].Options = append(ms[3].Options, "X-containerd.dmverity=/x.dmverity")
			return ms
		}, `option "X-containerd.dmverity=/x.dmverity"`},
		{"layer file missing", func(ms []Mount) []Mount { ms[3].Source += ".gone"; return ms }, "no such file"},
		{"blobs above the bottom", func(ms []Mount) []Mount { ms[1].Options = append(ms[1].Options, "device="+ms[3].Source); return ms }, "not the bottom-most"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms := tc.change(erofsBlock(t, t.TempDir(), 3))
			_, err := DetectLayered(ms)
			if !errors.Is(err, ErrNotBlock) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrNotBlock saying %q", err, tc.want)
			}
		})
	}

	t.Run("too many layers", func(t *testing.T) {
		ms := erofsBlock(t, t.TempDir(), MaxReadOnlyDisks+1)
		_, err := DetectLayered(ms)
		if !errors.Is(err, ErrNotBlock) || !strings.Contains(err.Error(), "129 read-only layer disks, more than the 128") {
			t.Fatalf("got %v", err)
		}
	})
}

func TestReadOnlyDisks(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "snapshot")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ms := erofsBlock(t, dir, 3)
	view := append(slices.Clone(ms[1:4]), Mount{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{"lowerdir={{ overlay 0 2 }}"}})
	for _, tc := range []struct {
		name   string
		mounts []Mount
		want   []string // the disks' sources
		err    string
	}{
		{"erofs view of three layers", view, []string{ms[1].Source, ms[2].Source, ms[3].Source}, ""},
		{"erofs view of one layer", ms[1:2], []string{ms[1].Source}, ""},
		{"blockfile view", []Mount{{Type: "ext4", Source: file, Options: []string{"ro", "loop"}}}, []string{file}, ""},
		{"overlayfs view", []Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a:/b"}}}, nil, "a filesystem tree"},
		{"native view", []Mount{{Type: "bind", Source: dir, Options: []string{"ro", "rbind"}}}, nil, "a directory"},
		{"writable erofs", ms, nil, "it is writable"},
		{"lowerdir misses a layer", append(slices.Clone(ms[1:4]), Mount{Type: "format/overlay", Source: "overlay", Options: []string{"lowerdir={{ overlay 0 1 }}"}}), nil, "names 2 of its 3 layers"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ReadOnlyDisks(tc.mounts)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %v %v, want an error saying %q", got, err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var srcs []string
			for _, l := range got {
				srcs = append(srcs, l.Mount.Source)
			}
			if !slices.Equal(srcs, tc.want) {
				t.Fatalf("disks %v, want %v", srcs, tc.want)
			}
		})
	}
}

// TestLayeredParamsRefusedByOneDiskReaders decodes the params of a layered
// rootfs as a reader written for one-disk block mode does (the release
// before layered rootfs: version 1, kind fs or block, the writable disk at
// Device as the guest's root): it must refuse them, not boot the writable
// disk, which holds only the overlay's upper and work directories, as the
// guest's root.
func TestLayeredParamsRefusedByOneDiskReaders(t *testing.T) {
	l, err := DetectLayered(erofsBlock(t, t.TempDir(), 2))
	if err != nil {
		t.Fatal(err)
	}
	p := l.Params([2]string{"/dev/loop9", "/dev/snapview/rootfs"}, [][2]string{{"/dev/loop10", LayerDevice(0)}, {"/dev/loop11", LayerDevice(1)}})
	data, err := json.Marshal(struct {
		Version int    `json:"version"`
		Rootfs  Params `json:"rootfs"`
	}{params.Version, p})
	if err != nil {
		t.Fatal(err)
	}
	var old struct {
		Version int `json:"version"`
		Rootfs  struct {
			Kind   string `json:"kind"`
			Device string `json:"device"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(data, &old); err != nil {
		t.Fatal(err)
	}
	if old.Version == 1 && (old.Rootfs.Kind == "fs" || old.Rootfs.Kind == "block") {
		t.Fatalf("a one-disk reader takes the layered rootfs for kind %q, version %d, and boots %s as its root:\n%s", old.Rootfs.Kind, old.Version, old.Rootfs.Device, data)
	}
}
