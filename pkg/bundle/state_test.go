package bundle

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/params"
	"github.com/snapview/snapview/pkg/rootfs"
)

func validState() *State {
	return &State{
		Namespace:   "default",
		ContainerID: "c1",
		Snapshotter: "overlayfs",
		ViewKey:     "snapview/c1",
		Parent:      "sha256:abc",
		LeaseID:     "snapview/c1",
		Mountpoint:  Mountpoint("/run/containerd/io.containerd.runtime.v2.task/default/c1"),
		Mounts:      []Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a:/b", "ro"}}},
		Rootfs:      rootfs.Params{Kind: rootfs.KindFS, FSType: "overlay", Source: "overlay", Options: []string{}},
		Created:     time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC),
	}
}

func TestStateRoundTrip(t *testing.T) {
	dir := t.TempDir()
	want := validState()
	if err := WriteState(dir, want); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(StatePath(dir))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temporary files left: %v", entries)
	}
	got, err := ReadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Version != 1 || got.ViewKey != want.ViewKey || got.Mounts[0].Options[1] != "ro" || !got.Created.Equal(want.Created) {
		t.Fatalf("got %+v", got)
	}
	if err := RemoveState(dir); err != nil {
		t.Fatal(err)
	}
	if err := RemoveState(dir); err != nil {
		t.Fatalf("second remove: %v", err)
	}
}

// TestWriteStateVersion writes each state with the lowest version that can
// hold it: a release that knows only version 1 (after a rollback) reads the
// state of every container it could have made itself.
func TestWriteStateVersion(t *testing.T) {
	volume := []Volume{{Name: "v", Image: "docker.io/library/x:1", ViewKey: "snapview/c1/volumes/v", Target: "/v", Subpath: "/"}}
	for _, tc := range []struct {
		name string
		edit func(*State)
		want int
	}{
		{"view mode", func(*State) {}, 1},
		{"block mode, one disk", func(s *State) {
			s.Mode = ModeBlock
			s.Block = &Block{Rootfs: Mount{Type: "ext4", Source: "/img"}, Device: "/dev/loop3", MonitorRootfs: "view"}
		}, 1},
		{"a rootfs activation", func(s *State) { s.RootfsActivation = "c1" }, 2},
		{"volumes", func(s *State) { s.Volumes = volume }, 2},
		{"layered", func(s *State) {
			s.Mode = ModeBlock
			s.Block = &Block{Rootfs: Mount{Type: "ext4", Source: "/img"}, Device: "/dev/loop3", MonitorRootfs: "view", Layers: []Disk{}}
		}, 2},
		{"a restored disk", func(s *State) {
			s.Mode = ModeBlock
			s.Block = &Block{Rootfs: Mount{Type: "ext4", Source: "/img"}, Device: "/dev/loop3", MonitorRootfs: "view"}
			s.Restore = &Restore{Snapshot: "2f1c0a3e-5b7d-4e8a-9f00-1a2b3c4d5e6f", Disk: "/img"}
		}, 4},
		{"a view derived from the layers", func(s *State) {
			s.Source, s.ViewKey, s.LeaseID, s.Snapshotter = params.SourceLayers, "", "", ""
			s.Mounts = []Mount{{Type: "overlay", Source: "overlay", Options: []string{"ro", "lowerdir=/a:/b"}}}
		}, 5},
		{"a derived view with volumes", func(s *State) {
			s.Source, s.ViewKey, s.Volumes = params.SourceLayers, "", volume
			s.Mounts = []Mount{{Type: "bind", Source: "/a", Options: []string{"ro", "rbind"}}}
		}, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := validState()
			s.Mountpoint = Mountpoint(dir)
			tc.edit(s)
			if err := WriteState(dir, s); err != nil {
				t.Fatal(err)
			}
			got, err := ReadState(dir)
			if err != nil {
				t.Fatal(err)
			}
			if got.Version != tc.want {
				t.Fatalf("version %d, want %d", got.Version, tc.want)
			}
		})
	}
}

// TestReadStateVersion1 reads a block-mode state file as the previous
// release wrote it: after an upgrade, the new binary's dead-shim cleanup
// must still find everything a running container's old shim recorded.
func TestReadStateVersion1(t *testing.T) {
	dir := t.TempDir()
	v1 := `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"blockfile","view_key":"snapview/c1","parent":"p","lease":"snapview/c1",` +
		`"mountpoint":"` + Mountpoint(dir) + `","mounts":[{"type":"ext4","source":"/s/1","options":["ro","loop"]}],"activation":"",` +
		`"rootfs":{"kind":"block","fstype":"ext4","source":"/dev/loop3","options":["rw"],"device":"/dev/snapview/rootfs"},"loop_devices":["/dev/loop4"],` +
		`"created":"2026-11-30T10:00:00Z","mode":"block","block":{"rootfs":{"type":"ext4","source":"/s/2","options":["rw","loop"]},"device":"/dev/loop3",` +
		`"major":7,"minor":3,"loop":{"backing_file":"/s/2","backing_dev":2049,"backing_ino":12},"monitor_rootfs":"view"}}`
	if err := os.WriteFile(StatePath(dir), []byte(v1), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := ReadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if s.Version != 1 || s.Block == nil || s.Block.Loop.BackingIno != 12 || s.LoopDevices[0] != "/dev/loop4" || s.Block.Layers != nil {
		t.Fatalf("got %+v", s)
	}
}

func TestReadStateRejects(t *testing.T) {
	for _, tc := range []struct {
		name, body, want string
	}{
		{"empty", "", "malformed"},
		{"not json", "{version:1", "malformed"},
		{"no version", `{"namespace":"x"}`, "no version"},
		{"future version", `{"version":6}`, "unsupported version 6"},
		{"a derived view in version 4", `{"version":4,"namespace":"default","container_id":"c1","mountpoint":"/b/snapview/view","source":"layers","mounts":[{"type":"bind","source":"/l","options":["ro","rbind"]}]}`, "a field of version 5 in a version 4 file"},
		{"a derived view with a view key", `{"version":5,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","source":"layers","mounts":[{"type":"bind","source":"/l","options":["ro","rbind"]}]}`, "records a view snapshot"},
		{"a derived view without mounts", `{"version":5,"namespace":"default","container_id":"c1","mountpoint":"/b/snapview/view","source":"layers"}`, "records no mounts"},
		{"a derived view with volumes and no lease", `{"version":5,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","mountpoint":"/b/snapview/view","source":"layers","mounts":[{"type":"bind","source":"/l","options":["ro","rbind"]}],"volumes":[{"name":"v","image":"i","parent":"p","view_key":"k/v","target":"/v","subpath":"/"}]}`, "missing lease"},
		{"an unknown source", `{"version":5,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","source":"elsewhere"}`, "unknown source"},
		{"a restored disk in version 3", `{"version":3,"namespace":"default","container_id":"c1","snapshotter":"blockfile","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","mode":"block","restore":{"snapshot":"2f1c0a3e-5b7d-4e8a-9f00-1a2b3c4d5e6f","disk":"/s/img"}}`, "a field of version 4 in a version 3 file"},
		{"a restored disk in view mode", `{"version":4,"namespace":"default","container_id":"c1","snapshotter":"blockfile","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","restore":{"snapshot":"2f1c0a3e-5b7d-4e8a-9f00-1a2b3c4d5e6f","disk":"/s/img"}}`, "a restored disk in a \"\" mode file"},
		{"a snapshot volume in version 2", `{"version":2,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","volumes":[{"name":"v","image":"i","parent":"p","view_key":"k/v","target":"/v","subpath":"/","snapshot":"2f1c0a3e-5b7d-4e8a-9f00-1a2b3c4d5e6f"}]}`, "a field of version 3 in a version 2 file"},
		{"a writable clone of no snapshot", `{"version":3,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","volumes":[{"name":"v","image":"i","parent":"p","view_key":"k/v","target":"/v","subpath":"/","writable":true}]}`, "a writable clone of no snapshot"},
		{"version 2 field in version 1", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","rootfs_activation":"c1"}`, "a field of version 2 in a version 1 file"},
		{"layers in version 1", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"erofs","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","mode":"block","block":{"device":"/dev/loop1","monitor_rootfs":"view","layers":[]}}`, "a field of version 2 in a version 1 file"},
		{"mode none with a view", `{"version":2,"namespace":"default","container_id":"c1","mode":"none","rootfs_activation":"c1","lease":"l"}`, `mode "none" records a view`},
		{"mode none without activation", `{"version":2,"namespace":"default","container_id":"c1","mode":"none"}`, "no rootfs activation"},
		{"layer disk not a loop device", `{"version":2,"namespace":"default","container_id":"c1","snapshotter":"erofs","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","mode":"block","block":{"device":"/dev/loop1","monitor_rootfs":"view","layers":[{"path":"/dev/snapview/layers/0","device":"/dev/sda","loop":{"backing_file":"/f","backing_ino":3}}]}}`, "layer disk 0"},
		{"unknown field", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/m","extra":1}`, `unknown field "extra"`},
		{"trailing data", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/m"} {}`, "malformed"},
		{"missing lease", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","mountpoint":"/m"}`, "missing lease"},
		{"relative mountpoint", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"m"}`, "not a view mountpoint in a bundle"},
		{"unclean mountpoint", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/a/../../etc"}`, "not a view mountpoint in a bundle"},
		{"host directory as mountpoint", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/run"}`, "not a view mountpoint in a bundle"},
		{"root as bundle", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/snapview/view"}`, "not a view mountpoint in a bundle"},
		{"unknown mode", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","mode":"vm"}`, `unknown mode "vm"`},
		{"block mode without block state", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"blockfile","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","mode":"block"}`, "block mode without block state"},
		{"block state in view mode", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"blockfile","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","block":{"device":"/dev/loop1","monitor_rootfs":"view"}}`, "block state in a"},
		{"block device outside /dev", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"blockfile","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","mode":"block","block":{"device":"/etc/passwd","monitor_rootfs":"view"}}`, "not a path under /dev"},
		{"loop state on a non-loop device", `{"version":1,"namespace":"default","container_id":"c1","snapshotter":"blockfile","view_key":"k","lease":"l","mountpoint":"/b/snapview/view","mode":"block","block":{"device":"/dev/sda","monitor_rootfs":"view","loop":{"backing_file":"/f","backing_ino":3}}}`, "is not /dev/loopN"},
		{"wrong type", `{"version":"1"}`, "malformed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, StateFile), []byte(tc.body), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := ReadState(dir)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range []string{"snapview: state file " + StatePath(dir), tc.want} {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not contain %q", err, w)
				}
			}
		})
	}
	t.Run("missing", func(t *testing.T) {
		_, err := ReadState(t.TempDir())
		if err == nil || !strings.Contains(err.Error(), StateFile) {
			t.Fatalf("got %v", err)
		}
	})
}

func TestConfigApplyRestore(t *testing.T) {
	dir := t.TempDir()
	orig := `{"ociVersion":"1.2.0","process":{"args":["sh"]},"annotations":{"keep":"me"},"mounts":[{"destination":"/proc","type":"proc","source":"proc"}],"futureField":{"x":1}}`
	path := filepath.Join(dir, ConfigFile)
	if err := os.WriteFile(path, []byte(orig), 0o640); err != nil {
		t.Fatal(err)
	}
	c, err := ReadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	if c.Annotations["keep"] != "me" {
		t.Fatalf("annotations %v", c.Annotations)
	}
	if err := c.Apply(ConfigPatch{Annotations: map[string]string{"io.snapview.view.key": "snapview/c1"}}); err != nil {
		t.Fatal(err)
	}
	patched, err := ReadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	if patched.Annotations["keep"] != "me" || patched.Annotations["io.snapview.view.key"] != "snapview/c1" {
		t.Fatalf("patched annotations %v", patched.Annotations)
	}
	data, _ := os.ReadFile(path)
	if !strings.Contains(string(data), `"futureField":{"x":1}`) || !strings.Contains(string(data), `"destination":"/proc"`) {
		t.Fatalf("fields lost: %s", data)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
		t.Fatalf("mode changed to %v", fi.Mode().Perm())
	}
	if err := c.Restore(); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(path); string(data) != orig {
		t.Fatalf("not restored: %s", data)
	}
}

// TestUnwritableBundle checks that a bundle whose files cannot be written
// (here a read-only bind mount) fails with an error naming the file, and
// leaves config.json as it was.
func TestUnwritableBundle(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root for a read-only bind mount")
	}
	dir := t.TempDir()
	orig := []byte(`{"ociVersion":"1.2.0"}`)
	if err := os.WriteFile(filepath.Join(dir, ConfigFile), orig, 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := ReadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(dir, unix.MNT_DETACH)
	if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	err = c.Apply(ConfigPatch{Annotations: map[string]string{"io.snapview.view.key": "k"}})
	if err == nil || !strings.HasPrefix(err.Error(), "snapview: ") || !strings.Contains(err.Error(), filepath.Join(dir, ConfigFile)) {
		t.Fatalf("Apply on a read-only bundle: %v", err)
	}
	if err := WriteState(dir, validState()); err == nil || !strings.Contains(err.Error(), StatePath(dir)) {
		t.Fatalf("WriteState on a read-only bundle: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, ConfigFile)); string(b) != string(orig) {
		t.Fatalf("config.json changed: %s", b)
	}
}
