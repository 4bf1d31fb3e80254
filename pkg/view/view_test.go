package view

import (
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"

	"github.com/snapview/snapview/pkg/lease"
)

// The mount shapes each snapshotter returns for a view (see docs/architecture.md).
func TestMountShapes(t *testing.T) {
	for _, tc := range []struct {
		name         string
		mounts       []mount.Mount
		needsManager bool
		readOnly     []mount.Mount
	}{
		{
			name:     "overlayfs, one parent: ro bind",
			mounts:   []mount.Mount{{Type: "bind", Source: "/s/1/fs", Options: []string{"ro", "rbind"}}},
			readOnly: []mount.Mount{{Type: "bind", Source: "/s/1/fs", Options: []string{"ro", "rbind"}}},
		},
		{
			name:     "overlayfs, two parents: lowerdir only",
			mounts:   []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"index=off", "lowerdir=/s/2/fs:/s/1/fs"}}},
			readOnly: []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"index=off", "lowerdir=/s/2/fs:/s/1/fs", "ro"}}},
		},
		{
			name:     "native: rbind ro",
			mounts:   []mount.Mount{{Type: "bind", Source: "/n/2", Options: []string{"rbind", "ro"}}},
			readOnly: []mount.Mount{{Type: "bind", Source: "/n/2", Options: []string{"rbind", "ro"}}},
		},
		{
			name:     "blockfile: loop ro",
			mounts:   []mount.Mount{{Type: "ext4", Source: "/b/snapshots/2", Options: []string{"loop", "ro"}}},
			readOnly: []mount.Mount{{Type: "ext4", Source: "/b/snapshots/2", Options: []string{"loop", "ro", "noload"}}},
		},
		{
			name:     "devmapper: a thin device, made read-only",
			mounts:   []mount.Mount{{Type: "ext4", Source: "/dev/mapper/pool-snap-9", Options: []string{"rw"}}},
			readOnly: []mount.Mount{{Type: "ext4", Source: "/dev/mapper/pool-snap-9", Options: []string{"ro", "noload"}}},
		},
		{
			name:     "devmapper xfs: nouuid kept",
			mounts:   []mount.Mount{{Type: "xfs", Source: "/dev/mapper/pool-snap-9", Options: []string{"ro", "nouuid"}}},
			readOnly: []mount.Mount{{Type: "xfs", Source: "/dev/mapper/pool-snap-9", Options: []string{"ro", "nouuid"}}},
		},
		{
			name:     "erofs, one layer",
			mounts:   []mount.Mount{{Type: "erofs", Source: "/e/1/layer.erofs", Options: []string{"ro", "loop"}}},
			readOnly: []mount.Mount{{Type: "erofs", Source: "/e/1/layer.erofs", Options: []string{"ro", "loop"}}},
		},
		{
			name: "erofs, two layers: needs the mount manager",
			mounts: []mount.Mount{
				{Type: "erofs", Source: "/e/2/layer.erofs", Options: []string{"ro", "loop"}},
				{Type: "erofs", Source: "/e/1/layer.erofs", Options: []string{"ro", "loop"}},
				{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{"lowerdir={{ overlay 0 1 }}"}},
			},
			needsManager: true,
		},
		{
			name:         "templated options alone",
			mounts:       []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir={{ mount 0 }}"}}},
			needsManager: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := NeedsManager(tc.mounts); got != tc.needsManager {
				t.Fatalf("NeedsManager = %v", got)
			}
			if tc.needsManager {
				return
			}
			if got := ReadOnly(tc.mounts); !reflect.DeepEqual(got, tc.readOnly) {
				t.Fatalf("ReadOnly = %+v, want %+v", got, tc.readOnly)
			}
		})
	}
}

func TestNames(t *testing.T) {
	if Key("c1") != "snapview/c1" {
		t.Fatal(Key("c1"))
	}
	o := lease.NewOwner("c1", time.Date(2026, 11, 23, 12, 0, 0, 5, time.UTC))
	l := Labels(o)
	if l[LabelGCBackRef] != "c1" || l["snapview.io/container"] != "c1" || l["snapview.io/created"] != "2026-11-23T12:00:00.000000005Z" {
		t.Fatal(l)
	}
}

// TestMountLoopDevices mounts a bind view and a loop-backed ext4 view for
// real: only the second reports a loop device, the one backing its file.
func TestMountLoopDevices(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts and loop devices")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if out, err := exec.Command("mkfs.ext4", "-q", img, "8M").CombinedOutput(); err != nil {
		t.Skipf("mkfs.ext4: %v: %s", err, out)
	}
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		mounts []mount.Mount
		loops  int
	}{
		{"bind", []mount.Mount{{Type: "bind", Source: src, Options: []string{"rbind", "ro"}}}, 0},
		{"ext4 on a loop device", []mount.Mount{{Type: "ext4", Source: img, Options: []string{"loop", "ro"}}}, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			target := filepath.Join(dir, "target")
			loops, err := Mount(c.mounts, target)
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := Unmount(target); err != nil {
					t.Error(err)
				}
			}()
			if len(loops) != c.loops {
				t.Fatalf("loop devices %v, want %d", loops, c.loops)
			}
			for _, l := range loops {
				b, err := os.ReadFile("/sys/block/" + strings.TrimPrefix(l, "/dev/") + "/loop/backing_file")
				if err != nil || strings.TrimSpace(string(b)) != img {
					t.Fatalf("%s backs %q (%v), want %s", l, b, err, img)
				}
			}
		})
	}
}
