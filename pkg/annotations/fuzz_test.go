package annotations

import (
	"path"
	"strings"
	"testing"

	"github.com/snapview/snapview/pkg/snapshot/record"
)

// FuzzParse checks that no annotation can panic the parser or yield a
// target outside the rules: every accepted artifact path and target is
// absolute, clean and free of "..", and no target enters /proc, /sys or /dev.
func FuzzParse(f *testing.F) {
	for _, s := range [][3]string{
		{"io.snapview.boot.kernel", "/boot/vmlinux", "/.snapview/boot"},
		{"io.snapview.boot.k", "/boot/../etc/shadow", "/b"},
		{"io.snapview.boot.Kernel", "/k", "/b"},
		{"io.snapview.mode", "block", "/b"},
		{"io.snapview.boot-dir", "/proc/x", "/b"},
		{"io.snapview.view-target", "/image", "/b"},
		{"io.snapview.boot.a", "//a/./b/", "relative"},
		{"io.snapview.bound.x", "/etc/shadow", "/b"},
	} {
		f.Add(s[0], s[1], s[2])
	}
	f.Fuzz(func(t *testing.T, key, value, bootDirValue string) {
		ann := map[string]string{key: value, "io.snapview.boot-dir": bootDirValue, "io.snapview.boot.fixed": value}
		r, err := Parse(ann, "/.snapview/boot")
		if err != nil {
			if !strings.HasPrefix(err.Error(), "snapview: ") {
				t.Fatalf("error without prefix: %v", err)
			}
			return
		}
		check := func(what, p string) {
			if !path.IsAbs(p) || path.Clean(p) != p || strings.Contains(p, "..") && strings.Contains("/"+p+"/", "/../") {
				t.Fatalf("%s %q accepted", what, p)
			}
		}
		for _, a := range r.Artifacts {
			check("path", a.Path)
			check("target", a.Target)
			for _, f := range forbiddenTargets {
				if a.Target == f || strings.HasPrefix(a.Target, f+"/") {
					t.Fatalf("target %q under %s", a.Target, f)
				}
			}
		}
		if r.ViewTarget != "" {
			check("view target", r.ViewTarget)
		}
	})
}

// FuzzParseVolume checks that no value of a volume annotation can panic
// the parser, and that whatever it accepts is a volume within the rules:
// an image reference that parsed, a target bind-able under the rules of
// every bind, a subpath that stays inside the volume, and nothing taken
// from a field other than image or snapshot, target, subpath and writable:
// exactly one of an image and a canonical snapshot id, and writable only
// for a snapshot.
func FuzzParseVolume(f *testing.F) {
	for _, s := range []string{
		`{"image":"docker.io/acme/models:v3","target":"/models"}`,
		`{"image":"x","target":"/a","subpath":"usr/bin"}`,
		`{"image":"x","target":"/a","image":"y"}`,
		`{"image":"x","target":"/a","source":"/etc"}`,
		`{"image":"x","target":"/a","subpath":"../../etc"}`,
		`{"image":"x","target":"/proc"}`,
		`{"image":["x"],"target":"/a"}`,
		`{"image":"x","target":"/a"} trailing`,
		`null`,
		`{"snapshot":"2f1c0a3e-5b7d-4e8a-9f00-1a2b3c4d5e6f","target":"/data","writable":true}`,
		`{"snapshot":"2F1C0A3E-5B7D-4E8A-9F00-1A2B3C4D5E6F","target":"/data"}`,
		`{"snapshot":"2f1c0a3e-5b7d-4e8a-9f00-1a2b3c4d5e6f","image":"x","target":"/data"}`,
		`{"image":"x","target":"/a","writable":true}`,
		`{"snapshot":"2f1c0a3e-5b7d-4e8a-9f00-1a2b3c4d5e6f","target":"/","writable":1}`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, value string) {
		r, err := Parse(map[string]string{"io.snapview.volume.v": value}, "/.snapview/boot")
		if err != nil {
			if !strings.HasPrefix(err.Error(), "snapview: annotation io.snapview.volume.v: ") {
				t.Fatalf("error without the annotation's name: %v", err)
			}
			return
		}
		if len(r.Volumes) != 1 {
			t.Fatalf("accepted %d volumes", len(r.Volumes))
		}
		v := r.Volumes[0]
		image := v.Image != "" && v.Ref != "" && v.Snapshot == "" && !v.Writable && strings.Contains(value, "image")
		snapshot := v.Image == "" && v.Ref == "" && v.Snapshot != "" && strings.Contains(value, v.Snapshot)
		if v.Name != "v" || image == snapshot || !strings.Contains(value, "target") {
			t.Fatalf("accepted %+v from %q", v, value)
		}
		if snapshot {
			if id, err := record.ParseID(v.Snapshot); err != nil || id != v.Snapshot {
				t.Fatalf("accepted snapshot id %q from %q", v.Snapshot, value)
			}
		}
		for _, p := range []string{v.Target, v.Subpath} {
			if !path.IsAbs(p) || path.Clean(p) != p || strings.Contains("/"+p+"/", "/../") {
				t.Fatalf("accepted path %q in %+v", p, v)
			}
		}
		if checkTarget(v.Target) != nil || v.Target == ParamsTarget || strings.HasPrefix(ParamsTarget, v.Target+"/") {
			t.Fatalf("accepted target %q", v.Target)
		}
	})
}
