package installer

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

const dropIn = "/etc/containerd/conf.d/snapview.toml"

// TestImportEdits adds the drop-in to the imports of configurations of
// every shape, checks that only that changed (the operator's comments and
// layout included) and that removing it gives the original bytes back.
func TestImportEdits(t *testing.T) {
	for _, tc := range []struct {
		name, config, want string
	}{
		{
			name: "no imports: a line above the first table and its comment",
			config: `# My containerd.
version = 3
root = "/var/lib/containerd" # on the big disk

# CRI, tuned by hand.
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
`,
			want: `# My containerd.
version = 3
root = "/var/lib/containerd" # on the big disk

imports = ["/etc/containerd/conf.d/snapview.toml"]
# CRI, tuned by hand.
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
`,
		},
		{
			name:   "imports of other files",
			config: "version = 2\nimports = [\"/etc/containerd/a.toml\", '/etc/containerd/b.toml'] # mine\n[plugins]\n",
			want:   "version = 2\nimports = [\"/etc/containerd/a.toml\", '/etc/containerd/b.toml', \"/etc/containerd/conf.d/snapview.toml\"] # mine\n[plugins]\n",
		},
		{
			name:   "empty imports",
			config: "version = 3\nimports = [ ]\n",
			want:   "version = 3\nimports = [\"/etc/containerd/conf.d/snapview.toml\" ]\n",
		},
		{
			name:   "imports over several lines with comments",
			config: "version = 3\nimports = [\n  \"/etc/a.toml\", # first\n  \"/etc/b.toml\",\n]\n",
			want:   "version = 3\nimports = [\n  \"/etc/a.toml\", # first\n  \"/etc/b.toml\", \"/etc/containerd/conf.d/snapview.toml\",\n]\n",
		},
		{
			name:   "no table at all",
			config: "version = 3\n",
			want:   "version = 3\nimports = [\"/etc/containerd/conf.d/snapview.toml\"]\n",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := addImport([]byte(tc.config), dropIn)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Fatalf("added:\n%s\nwant:\n%s", got, tc.want)
			}
			back, changed, err := removeImport(got, dropIn)
			if err != nil || !changed {
				t.Fatalf("remove: %v %v", changed, err)
			}
			if string(back) != tc.config {
				t.Fatalf("removed:\n%q\nwant the original:\n%q", back, tc.config)
			}
			if _, changed, err := removeImport(back, dropIn); err != nil || changed {
				t.Fatalf("second remove: %v %v", changed, err)
			}
		})
	}
}

func TestImportsCovered(t *testing.T) {
	for _, tc := range []struct {
		list []string
		want bool
	}{
		{[]string{"/etc/containerd/conf.d/*.toml"}, true},
		{[]string{"conf.d/*.toml"}, true}, // relative to the main file
		{[]string{dropIn}, true},
		{[]string{"/etc/containerd/other/*.toml"}, false},
		{nil, false},
	} {
		c := &mainConfig{version: 3, list: tc.list}
		if got := c.imports(dropIn, "/etc/containerd/config.toml"); got != tc.want {
			t.Errorf("imports %v cover %s: %v, want %v", tc.list, dropIn, got, tc.want)
		}
	}
}

// TestPlanApply installs into a root holding a containerd configuration of
// each version, twice (the second run changes nothing), then uninstalls:
// the main configuration is byte for byte what it was.
func TestPlanApply(t *testing.T) {
	bin := t.TempDir()
	for _, b := range []string{"shim", "ctl"} {
		if err := os.WriteFile(filepath.Join(bin, b), []byte("#!/bin/sh\necho "+b+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name, config, plugin string
		version              int
		wantErr              string
	}{
		{name: "version 2", config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause\"\n", plugin: "io.containerd.grpc.v1.cri", version: 2},
		{name: "version 3", config: "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"overlayfs\"\n", plugin: "io.containerd.cri.v1.runtime", version: 3},
		{name: "version 4 importing conf.d", config: "version = 4\nimports = ['/etc/containerd/conf.d/*.toml']\n", plugin: "io.containerd.cri.v1.runtime", version: 3},
		{name: "version 1", config: "root = \"/x\"\n", wantErr: "version 0 is not supported"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := Defaults()
			o.Root, o.Shim, o.Ctl = t.TempDir(), filepath.Join(bin, "shim"), filepath.Join(bin, "ctl")
			cfgPath := filepath.Join(o.Root, o.ContainerdConfig)
			if err := os.MkdirAll(filepath.Dir(cfgPath), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(cfgPath, []byte(tc.config), 0o640); err != nil {
				t.Fatal(err)
			}
			changes, err := Plan(o)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("plan: %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := Apply(o.Root, changes); err != nil {
				t.Fatal(err)
			}
			var d map[string]any
			data, err := os.ReadFile(filepath.Join(o.Root, o.DropIn))
			if err != nil {
				t.Fatal(err)
			}
			if err := toml.Unmarshal(data, &d); err != nil {
				t.Fatal(err)
			}
			rt := d["plugins"].(map[string]any)[tc.plugin].(map[string]any)["containerd"].(map[string]any)["runtimes"].(map[string]any)["snapview"].(map[string]any)
			if int(d["version"].(int64)) != tc.version || rt["runtime_type"] != "io.containerd.snapview.v2" || rt["runtime_path"] != "/usr/local/bin/containerd-shim-snapview-v2" ||
				rt["options"].(map[string]any)["ConfigPath"] != "/etc/containerd/snapview.toml" {
				t.Fatalf("drop-in:\n%s", data)
			}
			main, _ := os.ReadFile(cfgPath)
			c, _ := readMain(main)
			if !c.imports(o.DropIn, o.ContainerdConfig) {
				t.Fatalf("the main configuration does not import the drop-in:\n%s", main)
			}
			if fi, _ := os.Stat(cfgPath); fi.Mode().Perm() != 0o640 {
				t.Errorf("the main configuration's mode changed to %v", fi.Mode().Perm())
			}
			if again, err := Plan(o); err != nil || len(again) != 0 {
				t.Fatalf("second plan: %+v %v, want nothing to change", again, err)
			}

			undo, err := PlanUninstall(o)
			if err != nil {
				t.Fatal(err)
			}
			if err := Apply(o.Root, undo); err != nil {
				t.Fatal(err)
			}
			if main, _ := os.ReadFile(cfgPath); string(main) != tc.config {
				t.Fatalf("after uninstall:\n%s\nwant:\n%s", main, tc.config)
			}
			for _, p := range []string{o.DropIn, o.SnapviewConfig, o.ShimPath(), o.ctlPath()} {
				if _, err := os.Stat(filepath.Join(o.Root, p)); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("%s left after uninstall: %v", p, err)
				}
			}
		})
	}
}

// TestDropInSnapshotter: a handler of its own snapshotter (a block-mode
// handler on blockfile) gets it in its runtime table, and a name that would
// break the TOML is refused.
func TestDropInSnapshotter(t *testing.T) {
	o := Defaults()
	o.Handler, o.Snapshotter = "snapview-block", "blockfile"
	data, err := o.dropIn(3)
	if err != nil {
		t.Fatal(err)
	}
	var d map[string]any
	if err := toml.Unmarshal(data, &d); err != nil {
		t.Fatal(err)
	}
	rt := d["plugins"].(map[string]any)["io.containerd.cri.v1.runtime"].(map[string]any)["containerd"].(map[string]any)["runtimes"].(map[string]any)["snapview-block"].(map[string]any)
	if rt["snapshotter"] != "blockfile" {
		t.Fatalf("drop-in without the snapshotter:\n%s", data)
	}
	o.Snapshotter = ""
	if data, _ := o.dropIn(3); strings.Contains(string(data), "snapshotter") {
		t.Fatalf("a drop-in that names no snapshotter has one:\n%s", data)
	}
	o.Snapshotter = `blockfile"]`
	if err := o.check(); err == nil || !strings.Contains(err.Error(), "--snapshotter") {
		t.Fatalf("check of snapshotter %q: %v", o.Snapshotter, err)
	}
}
