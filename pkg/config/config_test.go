package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// criBody is what containerd's CRI plugin puts in ConfigBody for a runtime
// whose options table is copied from a runc one plus snapview's tables: the
// TOML re-marshalled from the options map (GenerateRuntimeOptions).
const criBody = `BinaryName = '/usr/local/bin/runc'
SystemdCgroup = true
TypeUrl = ''

[block]
monitor_rootfs = '/opt/monitor'

[block.monitors]
firecracker = '/opt/firecracker'
qemu = '/opt/qemu'

[view]
mode = 'block'
sandbox = true
`

func marshal(t *testing.T, v any) *anypb.Any {
	t.Helper()
	a, err := typeurl.MarshalAnyToProto(v)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func writeFile(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestFromOptions(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, dir, "snapview.toml", "Root = '/run/snapview-runc'\n[view]\nmode = 'off'\n")
	defFile := writeFile(t, dir, "default.toml", "[view]\nboot_dir = '/boot-here'\n")
	badKey := writeFile(t, dir, "bad.toml", "[view]\nmode = 'view'\nmodee = 'x'\n")

	for _, tc := range []struct {
		name        string
		opts        *anypb.Any
		defaultFile string // "" means a path that does not exist
		check       func(t *testing.T, c *Config)
		wantErr     []string
	}{
		{
			name: "no options and no file gives built-in defaults",
			check: func(t *testing.T, c *Config) {
				if c.View.Mode != ModeView || c.View.BootDir != "/.snapview/boot" || c.Block.MonitorRootfs != "view" || c.Block.Device != "/dev/snapview/rootfs" {
					t.Fatalf("unexpected defaults: %+v", c)
				}
				if c.RuncOptions() != nil {
					t.Fatalf("defaults carry runc options: %v", c.RuncOptions())
				}
			},
		},
		{
			name:        "no options reads the default file",
			defaultFile: defFile,
			check: func(t *testing.T, c *Config) {
				if c.View.BootDir != "/boot-here" || c.Source != defFile {
					t.Fatalf("default file not read: %+v", c)
				}
			},
		},
		{
			name: "CRI ConfigBody",
			opts: marshal(t, &runtimeoptions.Options{TypeUrl: "", ConfigBody: []byte(criBody)}),
			check: func(t *testing.T, c *Config) {
				if c.View.Mode != ModeBlock || !c.View.Sandbox || c.Block.MonitorRootfs != "/opt/monitor" {
					t.Fatalf("snapview tables not read: %+v", c)
				}
				if dir, ok := c.Monitor("qemu"); !ok || dir != "/opt/qemu" {
					t.Fatalf("monitor qemu: %q %v", dir, ok)
				}
				if _, ok := c.Monitor("/opt/qemu"); ok {
					t.Fatal("a path is not a monitor's name")
				}
				if got := strings.Join(c.MonitorChoices(), ","); got != "view,firecracker,qemu" {
					t.Fatalf("monitor choices %s", got)
				}
				o := c.RuncOptions()
				if o == nil || o.BinaryName != "/usr/local/bin/runc" || !o.SystemdCgroup {
					t.Fatalf("runc options not carried: %v", o)
				}
			},
		},
		{
			name: "ConfigPath (ctr --runtime-config-path)",
			opts: marshal(t, &runtimeoptions.Options{ConfigPath: file}),
			check: func(t *testing.T, c *Config) {
				if c.View.Mode != ModeOff || c.RuncOptions().GetRoot() != "/run/snapview-runc" || c.Source != file {
					t.Fatalf("file not read: %+v", c)
				}
			},
		},
		{
			name: "ConfigBody naming ConfigPath reads the file",
			opts: marshal(t, &runtimeoptions.Options{ConfigBody: []byte("ConfigPath = '" + file + "'\n")}),
			check: func(t *testing.T, c *Config) {
				if c.View.Mode != ModeOff {
					t.Fatalf("file not read: %+v", c)
				}
			},
		},
		{
			name: "empty runtimeoptions falls back to defaults",
			opts: marshal(t, &runtimeoptions.Options{}),
			check: func(t *testing.T, c *Config) {
				if c.View.Mode != ModeView {
					t.Fatalf("unexpected: %+v", c)
				}
			},
		},
		{
			name:        "runc options with snapview settings from the default file",
			opts:        marshal(t, &runcoptions.Options{SystemdCgroup: true, BinaryName: "crun"}),
			defaultFile: defFile,
			check: func(t *testing.T, c *Config) {
				o := c.RuncOptions()
				if !o.GetSystemdCgroup() || o.GetBinaryName() != "crun" || c.View.BootDir != "/boot-here" {
					t.Fatalf("unexpected: %+v", c)
				}
			},
		},
		{
			name:    "unknown key in ConfigBody is named with its source",
			opts:    marshal(t, &runtimeoptions.Options{ConfigBody: []byte("SystemdCgroups = true\n")}),
			wantErr: []string{"snapview:", `"SystemdCgroups"`, "ConfigBody"},
		},
		{
			name:    "unknown key in a table of a file is named with the file",
			opts:    marshal(t, &runtimeoptions.Options{ConfigPath: badKey}),
			wantErr: []string{"snapview:", `"view.modee"`, badKey},
		},
		{
			name:        "unknown key in the default file fails runc options too",
			opts:        marshal(t, &runcoptions.Options{}),
			defaultFile: badKey,
			wantErr:     []string{"snapview:", `"view.modee"`, badKey},
		},
		{
			name:    "missing ConfigPath file",
			opts:    marshal(t, &runtimeoptions.Options{ConfigPath: filepath.Join(dir, "nope.toml")}),
			wantErr: []string{"snapview:", "nope.toml"},
		},
		{
			name:    "relative ConfigPath",
			opts:    marshal(t, &runtimeoptions.Options{ConfigPath: "snapview.toml"}),
			wantErr: []string{"snapview:", `"snapview.toml"`, "not absolute"},
		},
		{
			name:    "invalid mode",
			opts:    marshal(t, &runtimeoptions.Options{ConfigBody: []byte("[view]\nmode = 'fast'\n")}),
			wantErr: []string{"snapview:", "view.mode", `"fast"`},
		},
		{
			name:    "invalid view source",
			opts:    marshal(t, &runtimeoptions.Options{ConfigBody: []byte("[view]\nsource = 'rootfs'\n")}),
			wantErr: []string{"snapview:", "view.source", `"rootfs"`, "snapshotter or layers"},
		},
		{
			name:    "relative boot_dir",
			opts:    marshal(t, &runtimeoptions.Options{ConfigBody: []byte("[view]\nboot_dir = 'boot'\n")}),
			wantErr: []string{"snapview:", "view.boot_dir"},
		},
		{
			name:    "relative monitor rootfs",
			opts:    marshal(t, &runtimeoptions.Options{ConfigBody: []byte("[block]\nmonitor_rootfs = 'monitor'\n")}),
			wantErr: []string{"snapview:", "block.monitor_rootfs"},
		},
		{
			name:    "relative named monitor rootfs",
			opts:    marshal(t, &runtimeoptions.Options{ConfigBody: []byte("[block.monitors]\nqemu = 'opt/qemu'\n")}),
			wantErr: []string{"snapview:", "block.monitors.qemu", "clean absolute path"},
		},
		{
			name:    "monitor named view",
			opts:    marshal(t, &runtimeoptions.Options{ConfigBody: []byte("[block.monitors]\nview = '/opt/qemu'\n")}),
			wantErr: []string{"snapview:", `block.monitors."view"`},
		},
		{
			name:    "monitor name with upper case",
			opts:    marshal(t, &runtimeoptions.Options{ConfigBody: []byte("[block.monitors]\nQemu = '/opt/qemu'\n")}),
			wantErr: []string{"snapview:", `block.monitors."Qemu"`, "must match"},
		},
		{
			name:    "device outside /dev",
			opts:    marshal(t, &runtimeoptions.Options{ConfigBody: []byte("[block]\ndevice = '/tmp/rootfs'\n")}),
			wantErr: []string{"snapview:", "block.device"},
		},
		{
			name:    "device among the layer disks",
			opts:    marshal(t, &runtimeoptions.Options{ConfigBody: []byte("[block]\ndevice = '/dev/snapview/layers/0'\n")}),
			wantErr: []string{"snapview:", "block.device", "layer disks"},
		},
		{
			name:    "wrong value type",
			opts:    marshal(t, &runtimeoptions.Options{ConfigBody: []byte("SystemdCgroup = 'yes'\n")}),
			wantErr: []string{"snapview:", "ConfigBody", "line 1"},
		},
		{
			name:    "unsupported options type",
			opts:    marshal(t, &runcoptions.CheckpointOptions{}),
			wantErr: []string{"snapview:", "unsupported runtime options type"},
		},
		{
			name:    "garbage options",
			opts:    &anypb.Any{TypeUrl: "example.com/nope", Value: []byte{1, 2, 3}},
			wantErr: []string{"snapview:", "example.com/nope"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			def := tc.defaultFile
			if def == "" {
				def = filepath.Join(dir, "absent.toml")
			}
			t.Setenv(PathEnv, def)
			var opts typeurl.Any
			if tc.opts != nil {
				opts = tc.opts
			}
			c, err := FromOptions(opts)
			if len(tc.wantErr) > 0 {
				if err == nil {
					t.Fatalf("want error containing %q, got config %+v", tc.wantErr, c)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Fatalf("error %q does not contain %q", err, w)
					}
				}
				if !strings.HasPrefix(err.Error(), "snapview: ") {
					t.Fatalf("error %q does not start with snapview:", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, c)
		})
	}
}

func TestReadOptionsRoundTrip(t *testing.T) {
	t.Setenv(PathEnv, filepath.Join(t.TempDir(), "absent.toml"))
	for _, tc := range []struct {
		name     string
		data     []byte
		wantRunc *runcoptions.Options
	}{
		{name: "empty stdin", data: nil},
		{
			name:     "CRI body becomes runc options",
			data:     mustProto(t, marshal(t, &runtimeoptions.Options{ConfigBody: []byte(criBody)})),
			wantRunc: &runcoptions.Options{BinaryName: "/usr/local/bin/runc", SystemdCgroup: true},
		},
		{
			name:     "runc options pass through",
			data:     mustProto(t, marshal(t, &runcoptions.Options{ShimCgroup: "/snapview", IoUid: 1000, IoGid: 1000})),
			wantRunc: &runcoptions.Options{ShimCgroup: "/snapview", IoUid: 1000, IoGid: 1000},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ReadOptions(tc.data)
			if err != nil {
				t.Fatal(err)
			}
			a, err := c.RuncAny()
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantRunc == nil {
				if a != nil {
					t.Fatalf("want no runc options, got %v", a)
				}
				return
			}
			v, err := typeurl.UnmarshalAny(a)
			if err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(v.(*runcoptions.Options), tc.wantRunc) {
				t.Fatalf("got %v, want %v", v, tc.wantRunc)
			}
		})
	}
}

func mustProto(t *testing.T, a *anypb.Any) []byte {
	t.Helper()
	b, err := proto.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestVolumesAllow(t *testing.T) {
	c, err := Parse([]byte("[volumes]\nallow = ['docker.io/acme/*', 'registry.example/ml/**', 'docker.io/library/busybox:1.36']\n"), "test.toml")
	if err != nil {
		t.Fatal(err)
	}
	for ref, want := range map[string]bool{
		"docker.io/acme/models:v3":             true,
		"docker.io/acme/team/models:v3":        false, // * stays within one path element
		"registry.example/ml/a/b/weights:1":    true,
		"registry.example/mlx/weights:1":       false,
		"docker.io/library/busybox:1.36":       true,
		"docker.io/library/busybox:latest":     false,
		"docker.io/acme-evil/models:v3":        false,
		"evil.example/docker.io/acme/x:latest": false,
	} {
		if got := c.AllowsVolume(ref); got != want {
			t.Errorf("AllowsVolume(%q) = %v, want %v", ref, got, want)
		}
	}
	if Default().AllowsVolume("docker.io/library/alpine:latest") {
		t.Error("the default configuration allows a volume")
	}
	for body, want := range map[string]string{
		"[volumes]\nallow = ['']\n":            "empty volumes.allow pattern in bad.toml",
		"[volumes]\nallow = ['docker.io/[']\n": `invalid volumes.allow pattern "docker.io/[" in bad.toml`,
		"[volumes]\nallowed = ['x']\n":         `unknown configuration key "volumes.allowed" in bad.toml`,
	} {
		if _, err := Parse([]byte(body), "bad.toml"); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", body, err, want)
		}
	}
}
