package annotations

import (
	"path"
	"strings"
	"testing"
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
