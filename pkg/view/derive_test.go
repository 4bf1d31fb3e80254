package view

import (
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
)

// TestDerive checks which rootfs mounts name the image's layers.
func TestDerive(t *testing.T) {
	for _, tc := range []struct {
		name  string
		in    []mount.Mount
		want  string // type and options of the one mount, or "" for none
		wantS string
	}{
		{"overlay of two layers", []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"index=off", "userxattr", "workdir=/w", "upperdir=/u", "lowerdir=/a:/b"}}}, "overlay [index=off userxattr ro lowerdir=/a:/b]", ""},
		{"overlay of one layer", []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"workdir=/w", "upperdir=/u", "lowerdir=/a"}}}, "bind [ro rbind]", ""},
		{"read-only overlay (a view snapshot)", []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"ro", "lowerdir=/a:/b"}}}, "overlay [ro lowerdir=/a:/b]", ""},
		{"read-only bind", []mount.Mount{{Type: "bind", Source: "/a", Options: []string{"ro", "rbind"}}}, "bind [ro rbind]", ""},
		{"writable bind", []mount.Mount{{Type: "bind", Source: "/a", Options: []string{"rw", "rbind"}}}, "", "writable bind"},
		{"one disk", []mount.Mount{{Type: "ext4", Source: "/img", Options: []string{"loop"}}}, "", "ext4 mount"},
		{"idmapped", []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a:/b", "uidmap=0:1000:1"}}}, "", "maps ids"},
		{"for the mount manager", []mount.Mount{{Type: "erofs", Source: "/l", Options: []string{"ro", "loop"}}, {Type: "format/mkdir/overlay", Source: "overlay", Options: []string{"lowerdir={{ overlay 0 0 }}"}}}, "", "2 mounts"},
		{"no mounts", nil, "", "0 mounts"},
		{"relative lower", []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=a:/b"}}}, "", "not an absolute path"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Derive(tc.in)
			if tc.want == "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantS) {
					t.Fatalf("derive: %+v %v, want an error with %q", got, err, tc.wantS)
				}
				return
			}
			if err != nil || len(got) != 1 {
				t.Fatalf("derive: %+v %v", got, err)
			}
			if s := got[0].Type + " " + fmt.Sprint(got[0].Options); s != tc.want {
				t.Fatalf("derive: %s, want %s", s, tc.want)
			}
		})
	}
}

// TestSnapshotterOf checks that the snapshotter is found in the layers'
// paths, and that nothing is guessed where they do not say.
func TestSnapshotterOf(t *testing.T) {
	for in, want := range map[string]string{
		"lowerdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/3/fs:/x": "overlayfs",
		"lowerdir=/var/lib/containerd/io.containerd.mount-manager.v1/targets/1":                 "",
	} {
		if got := SnapshotterOf([]mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{in}}}); got != want {
			t.Errorf("SnapshotterOf(%s) = %q, want %q", in, got, want)
		}
	}
}
