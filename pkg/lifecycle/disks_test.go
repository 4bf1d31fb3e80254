package lifecycle

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/rootfs"
)

// erofsView returns the mounts of a read-only erofs view of n layers, as
// containerd's erofs snapshotter returns them, over files in dir.
func erofsView(t *testing.T, dir string, n int) []mount.Mount {
	t.Helper()
	var ms []mount.Mount
	for i := range n {
		f := filepath.Join(dir, fmt.Sprintf("layer%d.erofs", i))
		if err := os.WriteFile(f, []byte("erofs"), 0o644); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, mount.Mount{Type: "erofs", Source: f, Options: []string{"ro", "loop"}})
	}
	if n == 1 {
		return ms
	}
	return append(ms, mount.Mount{Type: "format/overlay", Source: "overlay", Options: []string{fmt.Sprintf("lowerdir={{ overlay 0 %d }}", n-1)}})
}

// TestCountDisks refuses, before any volume is mounted or attached, a
// container whose read-only disks, its layered rootfs's and its volumes'
// together, are more than one container may have, in block mode and in view
// mode (where containerd's mount manager attaches a loop device per layer
// of an erofs volume); a volume that is a directory tree counts none.
func TestCountDisks(t *testing.T) {
	dir := t.TempDir()
	tree := []mount.Mount{{Type: "bind", Source: dir, Options: []string{"rbind", "ro"}}}
	for _, tc := range []struct {
		name    string
		block   bool
		rootfs  int   // layered rootfs disks, 0 for none
		volumes []int // layers per volume, -1 for a directory tree
		wantErr string
	}{
		{"view mode, within the cap", false, 0, []int{60, 60, -1}, ""},
		{"view mode, over it", false, 0, []int{70, 70}, "140 read-only disks (volume v0 70, volume v1 70)"},
		{"sixteen volumes of nine layers", false, 0, []int{9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9}, "144 read-only disks"},
		{"block mode, rootfs and volumes", true, 100, []int{20, 9}, "129 read-only disks (rootfs 100, volume v0 20, volume v1 9)"},
		{"block mode, exactly the cap", true, 100, []int{28}, ""},
		{"block mode, a tree volume", true, 0, []int{-1}, "block mode hands a volume to the guest as disks"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &setupRun{p: &Plan{}, v: &View{State: &bundle.State{}}}
			if tc.block {
				s.p.block = &rootfs.BlockSource{}
			}
			if tc.rootfs > 0 {
				var l rootfs.Layered
				for range tc.rootfs {
					l.Layers = append(l.Layers, rootfs.Layer{})
				}
				s.p.layered, s.p.block = &l, nil
			}
			for i, n := range tc.volumes {
				s.v.State.Volumes = append(s.v.State.Volumes, bundle.Volume{Name: fmt.Sprintf("v%d", i)})
				ms := tree
				if n > 0 {
					d := filepath.Join(dir, fmt.Sprintf("%s-%d", strings.ReplaceAll(tc.name, " ", "-"), i))
					if err := os.Mkdir(d, 0o755); err != nil {
						t.Fatal(err)
					}
					ms = erofsView(t, d, n)
				}
				s.volumeMounts = append(s.volumeMounts, ms)
			}
			err := s.countDisks()
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.HasPrefix(err.Error(), "snapview: ")) {
				t.Fatalf("got %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// TestVolumeDeviceReadOnly hands a volume whose view is a block device (a
// devmapper view, which containerd activates writable; a loop device behind
// a symlink stands in) to a container read-only at the block layer, not
// only by its cgroup rule, which a privileged container's allow-all rule
// precedes.
func TestVolumeDeviceReadOnly(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: loop devices")
	}
	img := filepath.Join(t.TempDir(), "thin.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := mount.SetupLoop(img, mount.LoopParams{Autoclear: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		// A block device's read-only flag outlives its loop binding: the
		// next user of this loop number must not inherit it.
		if err := unix.IoctlSetPointerInt(int(f.Fd()), unix.BLKROSET, 0); err != nil {
			t.Error(err)
		}
		f.Close()
	}()
	link := filepath.Join(t.TempDir(), "pool-snap-9")
	if err := os.Symlink(f.Name(), link); err != nil {
		t.Fatal(err)
	}
	d, err := attachReadOnly(link)
	if err != nil {
		t.Fatal(err)
	}
	if d.Path != f.Name() || d.Backing != nil {
		t.Fatalf("device %+v, want %s as it is", d, f.Name())
	}
	if ro, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKROGET); err != nil || ro != 1 {
		t.Fatalf("BLKROGET %d %v, want a read-only device", ro, err)
	}
	if _, err := f.WriteAt([]byte("x"), 0); err == nil {
		t.Fatal("the volume's device took a write")
	}
}
