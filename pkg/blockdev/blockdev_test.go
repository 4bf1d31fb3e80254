package blockdev

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestCreateImage formats a new writable image without mounting it: the
// directories it must hold are there (read back with debugfs), it is an
// ext4 filesystem, and an existing image is left alone.
func TestCreateImage(t *testing.T) {
	if _, err := exec.LookPath("debugfs"); err != nil {
		t.Skip("debugfs (e2fsprogs) is not installed")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "rwlayer.img")
	spec := ImageSpec{FSType: "ext4", Size: 16 << 20, Dirs: []Dir{{Path: "/upper", Mode: 0o755}, {Path: "/work", Mode: 0o700, UID: 7, GID: 8}}}
	created, err := CreateImage(context.Background(), img, spec)
	if err != nil || !created {
		t.Fatalf("create: %v %v", created, err)
	}
	if err := CheckImage(img); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(img)
	if err != nil || fi.Size() != 16<<20 {
		t.Fatalf("image %v %v", fi, err)
	}
	out, err := exec.Command("debugfs", "-R", "ls -l /", img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs: %v %s", err, out)
	}
	for _, want := range []string{"40755 (2)      0      0", "upper", "40700 (2)      7      8", "work"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the image's root lacks %q:\n%s", want, out)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("left beside the image: %v", entries)
	}

	if err := os.WriteFile(img, []byte("kept"), 0o600); err != nil {
		t.Fatal(err)
	}
	if created, err := CreateImage(context.Background(), img, spec); err != nil || created {
		t.Fatalf("an existing image: %v %v", created, err)
	}
	if b, _ := os.ReadFile(img); string(b) != "kept" {
		t.Fatal("an existing image was changed")
	}
	if err := CheckImage(img); !errors.Is(err, ErrNotExt) {
		t.Fatalf("check of a non-ext4 file: %v", err)
	}

	for _, tc := range []struct {
		name string
		spec ImageSpec
		want string
	}{
		{"xfs", ImageSpec{FSType: "xfs", Size: 1 << 20}, "only ext2, ext3 and ext4"},
		{"no size", ImageSpec{FSType: "ext4"}, "no size"},
		{"directory outside", ImageSpec{FSType: "ext4", Size: 16 << 20, Dirs: []Dir{{Path: "/"}}}, "not inside the image"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "x.img")
			if _, err := CreateImage(context.Background(), p, tc.spec); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
				t.Fatal("an image was left")
			}
		})
	}
}

// TestAttachReadOnly attaches a read-only loop device: it reads the file,
// and no write through it reaches the file.
func TestAttachReadOnly(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root for loop devices")
	}
	f := filepath.Join(t.TempDir(), "layer.erofs")
	if err := os.WriteFile(f, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := Attach(f, true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	w, err := os.OpenFile(d.Path, os.O_WRONLY, 0)
	if err == nil {
		_, err = w.Write([]byte("x"))
		w.Close()
	}
	if !errors.Is(err, unix.EROFS) && !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EACCES) {
		t.Fatalf("write to a read-only loop device: %v", err)
	}
	if ok, err := Bound(d.Path, *d.Backing); err != nil || !ok {
		t.Fatalf("bound: %v %v", ok, err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Detach(d.Path, *d.Backing); err != nil {
		t.Fatal(err)
	}
}
