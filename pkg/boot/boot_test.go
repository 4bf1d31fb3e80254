package boot

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/snapview/snapview/pkg/annotations"
)

// TestResolveStaysInside builds a view root next to a "host" secret and
// checks that no symlink in the view reaches the secret.
func TestResolveStaysInside(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "view")
	secret := filepath.Join(dir, "secret")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.WriteFile(secret, []byte("host secret"), 0o600))
	must(os.MkdirAll(filepath.Join(root, "boot"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	must(os.WriteFile(filepath.Join(root, "boot", "vmlinux"), []byte("kernel"), 0o644))
	must(os.WriteFile(filepath.Join(root, "etc", "passwd"), []byte("image passwd"), 0o644))
	must(os.Symlink("vmlinux", filepath.Join(root, "boot", "rel")))
	must(os.Symlink("/etc/passwd", filepath.Join(root, "boot", "abs")))
	must(os.Symlink(secret, filepath.Join(root, "boot", "abs-escape")))
	must(os.Symlink("../../../../../../.."+secret, filepath.Join(root, "boot", "rel-escape")))
	must(os.Symlink("/proc/self/root"+secret, filepath.Join(root, "boot", "proc-escape")))
	must(os.Symlink("loop", filepath.Join(root, "boot", "loop")))
	must(syscall.Mkfifo(filepath.Join(root, "boot", "fifo"), 0o644))

	for _, tc := range []struct {
		path    string
		content string // want the resolved file to hold this
		wantErr string
	}{
		{path: "/boot/vmlinux", content: "kernel"},
		{path: "/boot/rel", content: "kernel"},
		{path: "/boot/abs", content: "image passwd"},
		{path: "/boot/abs-escape", wantErr: "no such file"},
		{path: "/boot/rel-escape", wantErr: "no such file"},
		{path: "/boot/proc-escape", wantErr: "no such file"},
		{path: "/boot/loop", wantErr: "cannot be resolved"},
		{path: "/boot/fifo", wantErr: "is a fifo"},
		{path: "/boot", wantErr: "is a directory"},
		{path: "/boot/missing", wantErr: "no such file"},
	} {
		t.Run(tc.path, func(t *testing.T) {
			arts, err := Resolve(root, []annotations.Artifact{{Name: "k", Path: tc.path, Target: "/.snapview/boot/k"}})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "io.snapview.boot.k") {
					t.Fatalf("got %v, %v; want an error naming io.snapview.boot.k with %q", arts, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(arts[0].Source, root+"/") {
				t.Fatalf("resolved outside the view: %s", arts[0].Source)
			}
			b, err := os.ReadFile(arts[0].Source)
			if err != nil || string(b) != tc.content {
				t.Fatalf("resolved %s holds %q (%v), want %q", arts[0].Source, b, err, tc.content)
			}
		})
	}
}

func TestMounts(t *testing.T) {
	ms := Mounts(nil, "/b/snapview/view", "/image", "/b/snapview/params.json")
	if len(ms) != 2 || ms[0].Destination != "/image" || ms[1].Destination != annotations.ParamsTarget {
		t.Fatalf("%+v", ms)
	}
	for _, m := range ms {
		opts := strings.Join(m.Options, ",")
		for _, o := range []string{"ro", "nosuid", "nodev"} {
			if !strings.Contains(","+opts+",", ","+o+",") {
				t.Fatalf("%s lacks %s: %s", m.Destination, o, opts)
			}
		}
	}
}
