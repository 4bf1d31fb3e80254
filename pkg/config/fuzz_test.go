package config

import (
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParse checks that no configuration panics the reader, that every
// error starts with snapview: and names its source, and that whatever is
// accepted is valid.
func FuzzParse(f *testing.F) {
	f.Add([]byte(criBody))
	f.Add([]byte("[view]\nmode = 'off'\n"))
	f.Add([]byte("Bogus = 1\n"))
	f.Add([]byte("[block]\nmonitor_rootfs = '/opt/m'\ndevice = '/dev/x'\n"))
	f.Add([]byte("SystemdCgroup = 'yes'\n"))
	f.Add([]byte("[view\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data, "fuzz-source")
		if err != nil {
			if !strings.HasPrefix(err.Error(), "snapview: ") || !strings.Contains(err.Error(), "fuzz-source") {
				t.Fatalf("error %q lacks prefix or source", err)
			}
			return
		}
		switch c.View.Mode {
		case ModeView, ModeBlock, ModeOff:
		default:
			t.Fatalf("accepted mode %q", c.View.Mode)
		}
		if !filepath.IsAbs(c.View.BootDir) || filepath.Clean(c.View.BootDir) != c.View.BootDir {
			t.Fatalf("accepted boot_dir %q", c.View.BootDir)
		}
		if !strings.HasPrefix(c.Block.Device, "/dev/") {
			t.Fatalf("accepted device %q", c.Block.Device)
		}
	})
}
