package bundle

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParseState checks that no state file content panics the reader, and
// that whatever it accepts names everything teardown needs.
func FuzzParseState(f *testing.F) {
	good, _ := json.Marshal(validState())
	f.Add(good)
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"version":2,"namespace":"x"}`))
	f.Add([]byte(`{"version":1,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/m","mounts":[{"type":"bind"}]}`))
	f.Add([]byte(`{"version":1,"namespace":"default","container_id":"c1","snapshotter":"blockfile","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","mode":"block","block":{"device":"/dev/loop1","monitor_rootfs":"view","loop":{"backing_file":"/f","backing_ino":3}}}`))
	f.Add([]byte(`{"version":2,"namespace":"default","container_id":"c1","mode":"none","rootfs_activation":"c1"}`))
	f.Add([]byte(`{"version":2,"namespace":"default","container_id":"c1","snapshotter":"erofs","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","mode":"block","block":{"device":"/dev/loop1","monitor_rootfs":"view","loop":{"backing_file":"/f","backing_ino":3},"layers":[{"path":"/dev/snapview/layers/0","device":"/dev/loop2","loop":{"backing_file":"/l","backing_ino":4}}]}}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := ParseState(data)
		if err != nil {
			return
		}
		// Whatever is accepted names everything teardown needs, a
		// mountpoint that is a bundle's view mountpoint (never "/" or a
		// host directory), and, in block mode, a device under /dev.
		if s.Mode == ModeNone {
			if s.RootfsActivation == "" || s.ContainerID == "" || s.Namespace == "" || s.ViewKey != "" || s.LeaseID != "" || s.Mountpoint != "" || s.Block != nil {
				t.Fatalf("accepted %+v", s)
			}
			return
		}
		bundleDir := filepath.Dir(filepath.Dir(s.Mountpoint))
		if s.Version < 1 || s.Version > StateVersion || s.Version < s.minVersion() || s.ViewKey == "" || s.LeaseID == "" || s.ContainerID == "" ||
			!filepath.IsAbs(s.Mountpoint) || Mountpoint(bundleDir) != s.Mountpoint || bundleDir == "/" {
			t.Fatalf("accepted %+v", s)
		}
		if s.Mode == ModeBlock && (s.Block == nil || !strings.HasPrefix(s.Block.Device, "/dev/")) {
			t.Fatalf("accepted block state %+v", s.Block)
		}
		if s.Version == 1 && (s.RootfsActivation != "" || s.Block != nil && s.Block.Layers != nil) {
			t.Fatalf("accepted version 2 fields in version 1: %+v", s)
		}
		if s.Block != nil {
			for _, d := range s.Block.Layers {
				if !strings.HasPrefix(d.Device, "/dev/loop") || d.Loop.BackingIno == 0 {
					t.Fatalf("accepted layer disk %+v", d)
				}
			}
		}
		if s.Mode != ModeBlock && s.Block != nil {
			t.Fatalf("accepted block state in mode %q", s.Mode)
		}
	})
}
