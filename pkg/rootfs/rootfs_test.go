package rootfs

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
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

func TestBlock(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "snapshot.img")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	dev := filepath.Join(dir, "dm-7")
	haveDev := unix.Mknod(dev, unix.S_IFBLK|0o600, int(unix.Mkdev(253, 7))) == nil

	for _, tc := range []struct {
		name     string
		mounts   []Mount
		want     Params
		wantErr  bool
		needsDev bool
	}{
		{name: "blockfile: file with loop", mounts: []Mount{{Type: "ext4", Source: file, Options: []string{"loop", "rw"}}},
			want: Params{Kind: KindBlock, FSType: "ext4", Source: file, Options: []string{"rw"}, Device: "/dev/snapview/rootfs"}},
		// devmapper returns {Source: /dev/mapper/<pool>-snap-<id>, Type: ext4|xfs, Options: [rw|ro(,nouuid)]}.
		{name: "devmapper: block device", needsDev: true, mounts: []Mount{{Type: "xfs", Source: dev, Options: []string{"nouuid"}}},
			want: Params{Kind: KindBlock, FSType: "xfs", Source: dev, Options: []string{"nouuid"}, Device: "/dev/snapview/rootfs"}},
		{name: "file without loop", mounts: []Mount{{Type: "ext4", Source: file}}, wantErr: true},
		{name: "overlay", mounts: []Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a"}}}, wantErr: true},
		{name: "directory bind", mounts: []Mount{{Type: "bind", Source: dir, Options: []string{"rbind"}}}, wantErr: true},
		{name: "char device", mounts: []Mount{{Type: "ext4", Source: "/dev/null"}}, wantErr: true},
		{name: "missing source", mounts: []Mount{{Type: "ext4", Source: filepath.Join(dir, "nope"), Options: []string{"loop"}}}, wantErr: true},
		{name: "two mounts", mounts: []Mount{{Type: "ext4", Source: file, Options: []string{"loop"}}, {Type: "overlay", Source: "overlay"}}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needsDev && !haveDev {
				t.Skip("mknod of a block device needs root")
			}
			got, err := Block(tc.mounts, "/dev/snapview/rootfs")
			if tc.wantErr {
				if !errors.Is(err, ErrNotBlock) {
					t.Fatalf("got %+v, %v; want ErrNotBlock", got, err)
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
