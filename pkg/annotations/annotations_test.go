package annotations

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

const defBoot = "/.snapview/boot"

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		want    *Request
		wantErr []string
	}{
		{name: "nothing", ann: map[string]string{"org.example": "x"}, want: &Request{BootDir: defBoot}},
		{
			name: "unikernel monitor",
			ann: map[string]string{
				"io.snapview.mode": "view", "io.snapview.boot.kernel": "/boot/vmlinux", "io.snapview.boot.initrd": "/boot/initrd.img",
				"io.snapview.boot.urunc.json": "/urunc.json", "io.snapview.view-target": "/image",
			},
			want: &Request{Mode: "view", BootDir: defBoot, ViewTarget: "/image", Artifacts: []Artifact{
				{Name: "initrd", Path: "/boot/initrd.img", Target: "/.snapview/boot/initrd"},
				{Name: "kernel", Path: "/boot/vmlinux", Target: "/.snapview/boot/kernel"},
				{Name: "urunc.json", Path: "/urunc.json", Target: "/.snapview/boot/urunc.json"},
			}},
		},
		{
			name: "own boot-dir",
			ann:  map[string]string{"io.snapview.boot-dir": "/guest", "io.snapview.boot.k": "/k"},
			want: &Request{BootDir: "/guest", Artifacts: []Artifact{{Name: "k", Path: "/k", Target: "/guest/k"}}},
		},
		{
			name: "output annotations are ignored, not read back",
			ann:  map[string]string{"io.snapview.bound.kernel": "/etc/shadow", "io.snapview.view.mountpoint": "/", "io.snapview.rootfs.params": "{}"},
			want: &Request{BootDir: defBoot},
		},
		{name: "63-character name", ann: map[string]string{"io.snapview.boot." + strings.Repeat("a", 63): "/k"},
			want: &Request{BootDir: defBoot, Artifacts: []Artifact{{Name: strings.Repeat("a", 63), Path: "/k", Target: defBoot + "/" + strings.Repeat("a", 63)}}}},
		{name: "unknown mode", ann: map[string]string{"io.snapview.mode": "View"}, wantErr: []string{"io.snapview.mode", `"View"`}},
		{name: "upper-case name", ann: map[string]string{"io.snapview.boot.Kernel": "/k"}, wantErr: []string{"io.snapview.boot.Kernel", "must match"}},
		{name: "64-character name", ann: map[string]string{"io.snapview.boot." + strings.Repeat("a", 64): "/k"}, wantErr: []string{"must match"}},
		{name: "name starting with a dot", ann: map[string]string{"io.snapview.boot..k": "/k"}, wantErr: []string{"must match"}},
		{name: "empty name", ann: map[string]string{"io.snapview.boot.": "/k"}, wantErr: []string{"must match"}},
		{name: "name with a slash", ann: map[string]string{"io.snapview.boot.a/b": "/k"}, wantErr: []string{"must match"}},
		{name: "relative path", ann: map[string]string{"io.snapview.boot.k": "boot/k"}, wantErr: []string{"io.snapview.boot.k", "absolute"}},
		{name: "dot-dot", ann: map[string]string{"io.snapview.boot.k": "/boot/../../etc/shadow"}, wantErr: []string{`".."`}},
		{name: "trailing dot-dot", ann: map[string]string{"io.snapview.boot.k": "/boot/.."}, wantErr: []string{`".."`}},
		{name: "unclean path", ann: map[string]string{"io.snapview.boot.k": "/boot//k"}, wantErr: []string{"clean"}},
		{name: "trailing slash", ann: map[string]string{"io.snapview.boot.k": "/boot/"}, wantErr: []string{"clean"}},
		{name: "root", ann: map[string]string{"io.snapview.boot.k": "/"}, wantErr: []string{"root directory"}},
		{name: "empty path", ann: map[string]string{"io.snapview.boot.k": ""}, wantErr: []string{"empty"}},
		{name: "NUL", ann: map[string]string{"io.snapview.boot.k": "/k\x00/x"}, wantErr: []string{"NUL"}},
		{name: "long path", ann: map[string]string{"io.snapview.boot.k": "/" + strings.Repeat("a", 4096)}, wantErr: []string{"longer than"}},
		{name: "boot-dir under /proc", ann: map[string]string{"io.snapview.boot-dir": "/proc/x", "io.snapview.boot.k": "/k"}, wantErr: []string{"io.snapview.boot-dir", "under /proc"}},
		{name: "boot-dir is /sys", ann: map[string]string{"io.snapview.boot-dir": "/sys"}, wantErr: []string{"under /sys"}},
		{name: "view-target under /dev", ann: map[string]string{"io.snapview.view-target": "/dev/v"}, wantErr: []string{"io.snapview.view-target", "under /dev"}},
		{name: "/procfoo is fine as a target prefix", ann: map[string]string{"io.snapview.view-target": "/procfoo"}, want: &Request{BootDir: defBoot, ViewTarget: "/procfoo"}},
		{name: "relative view-target", ann: map[string]string{"io.snapview.view-target": "v"}, wantErr: []string{"absolute"}},
		{name: "artifacts inside the view target", ann: map[string]string{"io.snapview.view-target": "/image", "io.snapview.boot-dir": "/image/boot", "io.snapview.boot.k": "/k"}, wantErr: []string{"overlap"}},
		{name: "artifact over the params file", ann: map[string]string{"io.snapview.boot-dir": "/.snapview", "io.snapview.boot.params.json": "/k"}, wantErr: []string{"overlap", "/.snapview/params.json"}},
		{name: "monitor rootfs by name", ann: map[string]string{"io.snapview.monitor-rootfs": "qemu-8.2"}, want: &Request{BootDir: defBoot, MonitorRootfs: "qemu-8.2"}},
		{name: "monitor rootfs as a path", ann: map[string]string{"io.snapview.monitor-rootfs": "/opt/qemu"}, wantErr: []string{"io.snapview.monitor-rootfs", "never a path"}},
		{name: "monitor rootfs as a relative path", ann: map[string]string{"io.snapview.monitor-rootfs": "../qemu"}, wantErr: []string{"never a path"}},
		{name: "unknown key", ann: map[string]string{"io.snapview.boot_dir": "/b"}, wantErr: []string{"unknown annotation io.snapview.boot_dir"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.ann, defBoot)
			if tc.wantErr != nil {
				if err == nil {
					t.Fatalf("accepted: %+v", got)
				}
				if !strings.HasPrefix(err.Error(), "snapview: ") {
					t.Fatalf("error %q lacks the snapview: prefix", err)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Fatalf("error %q does not contain %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestParseLimit(t *testing.T) {
	ann := map[string]string{}
	for i := range MaxArtifacts {
		ann[fmt.Sprintf("io.snapview.boot.a%d", i)] = "/k"
	}
	if _, err := Parse(ann, defBoot); err != nil {
		t.Fatalf("%d artifacts: %v", MaxArtifacts, err)
	}
	ann["io.snapview.boot.one-more"] = "/k"
	if _, err := Parse(ann, defBoot); err == nil || !strings.Contains(err.Error(), "at most 16") {
		t.Fatalf("17 artifacts: %v", err)
	}
}
