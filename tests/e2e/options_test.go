package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
)

// runcSpy is an OCI runtime wrapper that logs each invocation, and on
// `create` a copy of the bundle's config.json as runc is given it, then
// execs runc. Used as BinaryName, it proves which options and which
// config.json reached runc.
type runcSpy struct {
	bin     string // the wrapper, for BinaryName
	logFile string // one line per invocation
}

// config returns where the spy copied container id's config.json.
func (s runcSpy) config(id string) string {
	return filepath.Join(filepath.Dir(s.logFile), "config-"+id+".json")
}

// opts returns runc options that make runc's shim use the spy.
func (s runcSpy) opts() *runcoptions.Options { return &runcoptions.Options{BinaryName: s.bin} }

func newRuncSpy(t *testing.T) runcSpy {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "runc-wrapper")
	logFile := filepath.Join(dir, "invocations.log")
	script := fmt.Sprintf(`#!/bin/sh
echo "$*" >> %[1]s
prev=
for a in "$@"; do
	if [ "$prev" = "--bundle" ] || [ "$prev" = "-b" ]; then
		id=$(basename "$a")
		cp "$a/config.json" %[2]s/config-"$id".json
	fi
	prev=$a
done
exec %[3]s "$@"
`, logFile, dir, suite.tools.Runc)
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return runcSpy{bin: bin, logFile: logFile}
}

// created reports whether the wrapper ran `create` for container id.
func (s runcSpy) created(t *testing.T, id string) bool {
	t.Helper()
	b, err := os.ReadFile(s.logFile)
	if err != nil {
		return false
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if strings.Contains(l, " create ") && strings.HasSuffix(l, " "+id) {
			return true
		}
	}
	return false
}

// TestRuntimeOptions runs a container with each form of runtime options
// containerd sends and checks that runc ran with the configured BinaryName.
func TestRuntimeOptions(t *testing.T) {
	d := suite.daemon
	defaultFile := filepath.Join(suite.dir, "snapview.toml")
	for _, tc := range []struct {
		name        string
		opts        func(wrapper string) any
		defaultBody func(wrapper string) string // written to the default file ($SNAPVIEW_CONFIG) for the test
	}{
		{
			name: "CRI runtimeoptions ConfigBody",
			opts: func(w string) any {
				return &runtimeoptions.Options{ConfigBody: []byte(fmt.Sprintf("BinaryName = %q\nSystemdCgroup = false\n\n[view]\nmode = \"view\"\n", w))}
			},
		},
		{
			name: "runtimeoptions ConfigPath",
			opts: func(w string) any {
				p := filepath.Join(filepath.Dir(w), "snapview.toml")
				if err := os.WriteFile(p, []byte(fmt.Sprintf("BinaryName = %q\n", w)), 0o600); err != nil {
					panic(err)
				}
				return &runtimeoptions.Options{ConfigPath: p}
			},
		},
		{
			name: "runc options",
			opts: func(w string) any { return &runcoptions.Options{BinaryName: w} },
		},
		{
			name:        "no options reads the default file",
			opts:        func(string) any { return nil },
			defaultBody: func(w string) string { return fmt.Sprintf("BinaryName = %q\n[block]\nmonitor_rootfs = \"view\"\n", w) },
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := setup(t, d)
			spy := newRuncSpy(t)
			wrapper := spy.bin
			if tc.defaultBody != nil {
				if err := os.WriteFile(defaultFile, []byte(tc.defaultBody(wrapper)), 0o600); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { os.Remove(defaultFile) })
			}
			id := "options-" + strings.ReplaceAll(strings.ToLower(tc.name), " ", "-")
			r, err := start(ctx, t, d, id, runOpts{runtime: snapviewRT, runtimeOpts: tc.opts(wrapper), args: []string{"sh", "-c", "echo ok"}})
			if err != nil {
				t.Fatal(err)
			}
			if code, err := r.wait(t); err != nil || code != 0 {
				t.Fatalf("exit %d, %v", code, err)
			}
			if !spy.created(t, id) {
				t.Fatalf("runc wrapper %s was not used for %s: the options did not reach runc", wrapper, id)
			}
		})
	}
}

// TestRuntimeOptionsUnknownKey checks that an unknown key fails task create
// with a snapview: error naming the key and its source, and leaves nothing.
func TestRuntimeOptionsUnknownKey(t *testing.T) {
	d := suite.daemon
	t.Run("CRI ConfigBody", func(t *testing.T) {
		ctx := setup(t, d)
		_, err := start(ctx, t, d, "options-unknown-body", runOpts{
			runtime:     snapviewRT,
			runtimeOpts: &runtimeoptions.Options{ConfigBody: []byte("SystemdCgroup = false\n[view]\nmod = \"view\"\n")},
			args:        []string{"true"},
		})
		if err == nil {
			t.Fatal("create succeeded with an unknown configuration key")
		}
		for _, want := range []string{"snapview: unknown configuration key", `"view.mod"`, "ConfigBody"} {
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("error %q does not contain %q", err, want)
			}
		}
	})
	t.Run("default file", func(t *testing.T) {
		ctx := setup(t, d)
		defaultFile := filepath.Join(suite.dir, "snapview.toml")
		if err := os.WriteFile(defaultFile, []byte("Bogus = 1\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(defaultFile) })
		_, err := start(ctx, t, d, "options-unknown-default", runOpts{runtime: snapviewRT, args: []string{"true"}})
		if err == nil || !strings.Contains(err.Error(), `snapview: unknown configuration key "Bogus" in `+defaultFile) {
			t.Fatalf("want unknown key error naming %s, got %v", defaultFile, err)
		}
	})
}

// TestCtrRuntimeConfigPath runs `ctr run --runtime io.containerd.snapview.v2
// --runtime-config-path FILE` as a user would, with a good file and one with
// an unknown key.
func TestCtrRuntimeConfigPath(t *testing.T) {
	d := suite.daemon
	ctr := func(ctx context.Context, args ...string) (string, error) {
		full := append([]string{"--address", d.Address, "--namespace", ns}, args...)
		out, err := exec.CommandContext(ctx, suite.tools.Ctr(), full...).CombinedOutput()
		return string(out), err
	}
	t.Run("good file", func(t *testing.T) {
		ctx := setup(t, d)
		spy := newRuncSpy(t)
		wrapper := spy.bin
		cfg := filepath.Join(t.TempDir(), "snapview.toml")
		if err := os.WriteFile(cfg, []byte(fmt.Sprintf("BinaryName = %q\n\n[view]\nmode = \"view\"\n", wrapper)), 0o600); err != nil {
			t.Fatal(err)
		}
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		out, err := ctr(cctx, "run", "--rm", "--runtime", snapviewRT, "--runtime-config-path", cfg, testImageID, "ctr-config-path", "sh", "-c", "echo from-ctr")
		if err != nil {
			t.Fatalf("ctr run: %v\n%s", err, out)
		}
		if !strings.Contains(out, "from-ctr") {
			t.Fatalf("unexpected output %q", out)
		}
		if !spy.created(t, "ctr-config-path") {
			t.Fatalf("the file's BinaryName was not used")
		}
	})
	t.Run("unknown key", func(t *testing.T) {
		ctx := setup(t, d)
		cfg := filepath.Join(t.TempDir(), "snapview.toml")
		if err := os.WriteFile(cfg, []byte("[block]\nmonitor = \"view\"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		out, err := ctr(cctx, "run", "--rm", "--runtime", snapviewRT, "--runtime-config-path", cfg, testImageID, "ctr-config-unknown", "true")
		if err == nil {
			t.Fatalf("ctr run succeeded with an unknown key:\n%s", out)
		}
		if !strings.Contains(out, `snapview: unknown configuration key "block.monitor" in `+cfg) {
			t.Fatalf("ctr output does not name the key and file:\n%s", out)
		}
		// ctr run --rm removed the container; the leak check verifies that nothing else is left.
	})
}
