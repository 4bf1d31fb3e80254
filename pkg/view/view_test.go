package view

import (
	"time"

	"github.com/snapview/snapview/pkg/lease"

	"reflect"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
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
