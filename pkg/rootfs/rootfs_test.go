package rootfs

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestFromMounts(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mounts []Mount
		want   Params
	}{
		{"overlayfs", []Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a:/b", "upperdir=/u", "workdir=/w"}}},
			Params{Kind: KindFS, FSType: "overlay", Source: "overlay", Options: []string{"lowerdir=/a:/b", "upperdir=/u", "workdir=/w"}}},
		{"native", []Mount{{Type: "bind", Source: "/snap/1/fs", Options: []string{"rbind", "rw"}}},
			Params{Kind: KindFS, FSType: "bind", Source: "/snap/1/fs", Options: []string{"rbind", "rw"}}},
		{"erofs activated: the last mount is the rootfs", []Mount{{Type: "erofs", Source: "/l/layer.erofs", Options: []string{"ro", "loop"}}, {Type: "overlay", Source: "overlay"}},
			Params{Kind: KindFS, FSType: "overlay", Source: "overlay", Options: []string{}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := FromMounts(tc.mounts)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
	if _, err := FromMounts(nil); err == nil {
		t.Fatal("no mounts accepted")
	}
}

func TestDetectBlock(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "snapshot.img")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	dev := filepath.Join(dir, "dm-7")
	haveDev := unix.Mknod(dev, unix.S_IFBLK|0o600, int(unix.Mkdev(253, 7))) == nil
	mapper := filepath.Join(dir, "mapper-link")
	if err := os.Symlink("dm-7", mapper); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name     string
		mounts   []Mount
		want     BlockSource
		wantErr  string // what the error must say the rootfs is
		needsDev bool
	}{
		{name: "blockfile: file with loop", mounts: []Mount{{Type: "ext4", Source: file, Options: []string{"loop", "rw"}}},
			want: BlockSource{Mount: Mount{Type: "ext4", Source: file, Options: []string{"loop", "rw"}}, Loop: true}},
		// devmapper returns {Source: /dev/mapper/<pool>-snap-<id>, Type: ext4|xfs, Options: [rw|ro(,nouuid)]}.
		{name: "devmapper: block device", needsDev: true, mounts: []Mount{{Type: "xfs", Source: dev, Options: []string{"nouuid"}}},
			want: BlockSource{Mount: Mount{Type: "xfs", Source: dev, Options: []string{"nouuid"}}}},
		{name: "devmapper: symlink to a block device", needsDev: true, mounts: []Mount{{Type: "ext4", Source: mapper}},
			want: BlockSource{Mount: Mount{Type: "ext4", Source: mapper}}},
		{name: "file without loop", mounts: []Mount{{Type: "ext4", Source: file}}, wantErr: "regular file without the loop option"},
		{name: "overlay", mounts: []Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a", "upperdir=/u"}}}, wantErr: "an overlay mount"},
		{name: "directory bind", mounts: []Mount{{Type: "bind", Source: dir, Options: []string{"rbind"}}}, wantErr: "a directory"},
		{name: "char device", mounts: []Mount{{Type: "ext4", Source: "/dev/null"}}, wantErr: "a character device"},
		{name: "missing source", mounts: []Mount{{Type: "ext4", Source: filepath.Join(dir, "nope"), Options: []string{"loop"}}}, wantErr: "cannot be read"},
		{name: "two mounts", mounts: []Mount{{Type: "erofs", Source: file, Options: []string{"loop"}}, {Type: "overlay", Source: "overlay"}}, wantErr: "2 mounts (erofs, overlay)"},
		{name: "no mounts", wantErr: "no mount at all"},
		{name: "read-only blockfile view", mounts: []Mount{{Type: "ext4", Source: file, Options: []string{"loop", "ro"}}}, wantErr: "read-only"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needsDev && !haveDev {
				t.Skip("mknod of a block device needs root")
			}
			got, err := DetectBlock(tc.mounts)
			if tc.wantErr != "" {
				if !errors.Is(err, ErrNotBlock) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %+v, %v; want ErrNotBlock saying %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestBlockParams(t *testing.T) {
	got := BlockParams(Mount{Type: "ext4", Source: "/snap/3", Options: []string{"loop", "rw"}}, "/dev/loop4", "/dev/snapview/rootfs")
	want := Params{Kind: KindBlock, FSType: "ext4", Source: "/dev/loop4", Options: []string{"rw"}, Device: "/dev/snapview/rootfs"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
}

func TestReadOnly(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mounts []Mount
		want   bool
	}{
		{"overlay with upper", []Mount{{Type: "overlay", Options: []string{"lowerdir=/a:/b", "upperdir=/u", "workdir=/w"}}}, false},
		{"overlay view of several layers", []Mount{{Type: "overlay", Options: []string{"lowerdir=/a:/b"}}}, true},
		{"bind view of one layer", []Mount{{Type: "bind", Options: []string{"ro", "rbind"}}}, true},
		{"native active", []Mount{{Type: "bind", Options: []string{"rbind", "rw"}}}, false},
		{"erofs layers then overlay with upper", []Mount{{Type: "erofs", Options: []string{"ro", "loop"}}, {Type: "format/mkdir/overlay", Options: []string{"upperdir=/u"}}}, false},
		{"none", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ReadOnly(tc.mounts); got != tc.want {
				t.Fatalf("ReadOnly = %v, want %v", got, tc.want)
			}
		})
	}
}
