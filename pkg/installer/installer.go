// Package installer puts snapview on a node: the shim and snapviewctl in
// place, and a runtime handler registered with containerd's CRI plugin.
//
// The registration is a drop-in file of containerd configuration of its own
// (by default /etc/containerd/conf.d/snapview.toml), which containerd's
// main configuration imports. containerd 2.2 and later import
// /etc/containerd/conf.d/*.toml by default; a main configuration that does
// not import the drop-in gets one entry added to its imports, at a place
// located with the TOML parser, and the edit is verified by decoding the
// file before and after: nothing but that entry may change, and every
// comment and setting of the operator's file stays as it was. Uninstall
// takes back exactly what install added.
//
// Every change is computed first (Plan, PlanUninstall) and applied
// atomically (Apply), so that a second run finds nothing to change and a
// dry run shows exactly what a real one would do. All paths are on the
// node's filesystem mounted at Options.Root; the paths written into
// containerd's configuration are those the node sees.
package installer

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/pkg/atomicfile"
	"github.com/pelletier/go-toml/v2"
)

// Options say where to install and what to register.
type Options struct {
	// Root is where the node's filesystem is mounted ("/" on the node
	// itself, "/host" in a DaemonSet).
	Root string
	// Prefix is where the binaries go: <Prefix>/bin.
	Prefix string
	// Handler is the CRI runtime handler's name (RuntimeClass handler).
	Handler string
	// ContainerdConfig is containerd's main configuration file.
	ContainerdConfig string
	// DropIn is the configuration file install writes for containerd.
	DropIn string
	// SnapviewConfig is snapview's own configuration file, created with
	// the defaults if missing and named by the handler's ConfigPath.
	SnapviewConfig string
	// Snapshotter, when set, is the handler's snapshotter (its runtime
	// table's snapshotter key): a block-backed one (blockfile, devmapper,
	// erofs in block mode) for a block-mode handler.
	Snapshotter string
	// Shim and Ctl are the binaries to install.
	Shim, Ctl string
}

// Defaults returns the options of an install on the node itself.
func Defaults() Options {
	return Options{
		Root:             "/",
		Prefix:           "/usr/local",
		Handler:          "snapview",
		ContainerdConfig: "/etc/containerd/config.toml",
		DropIn:           "/etc/containerd/conf.d/snapview.toml",
		SnapviewConfig:   "/etc/containerd/snapview.toml",
	}
}

// Change is one file install or uninstall writes or removes.
type Change struct {
	// Path is the file's path on the node (without Root).
	Path string
	// What says what changes, for the operator.
	What string
	// Content is the new content; nil removes the file.
	Content []byte
	Mode    os.FileMode
}

// host returns where a node path is on this machine.
func (o Options) host(p string) string { return filepath.Join(o.Root, p) }

// ShimPath is where the shim is installed, as the node sees it.
func (o Options) ShimPath() string {
	return filepath.Join(o.Prefix, "bin", "containerd-shim-snapview-v2")
}

func (o Options) ctlPath() string { return filepath.Join(o.Prefix, "bin", "snapviewctl") }

func (o Options) check() error {
	for name, p := range map[string]string{"--root": o.Root, "--prefix": o.Prefix, "--config": o.ContainerdConfig, "--dropin": o.DropIn, "--snapview-config": o.SnapviewConfig} {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p {
			return fmt.Errorf("%s %q must be a clean absolute path", name, p)
		}
	}
	if o.Handler == "" || strings.ContainsAny(o.Handler, " \t\n\"'.[]=") {
		return fmt.Errorf("--handler %q is not a valid runtime handler name", o.Handler)
	}
	if strings.ContainsAny(o.Snapshotter, " \t\n\"'[]=\\") {
		return fmt.Errorf("--snapshotter %q is not a valid snapshotter name", o.Snapshotter)
	}
	return nil
}

// Plan computes what install changes. It reads the node's files and
// changes nothing; an empty plan means snapview is installed as asked.
func Plan(o Options) ([]Change, error) {
	if err := o.check(); err != nil {
		return nil, err
	}
	var changes []Change
	for _, b := range []struct{ src, dst string }{{o.Shim, o.ShimPath()}, {o.Ctl, o.ctlPath()}} {
		data, err := os.ReadFile(b.src)
		if err != nil {
			return nil, fmt.Errorf("read the binary to install: %w", err)
		}
		if cur, err := os.ReadFile(o.host(b.dst)); err != nil || !bytes.Equal(cur, data) {
			changes = append(changes, Change{Path: b.dst, What: "install " + filepath.Base(b.dst), Content: data, Mode: 0o755})
		}
	}

	mainPath := o.host(o.ContainerdConfig)
	main, err := os.ReadFile(mainPath)
	if err != nil {
		return nil, fmt.Errorf("read containerd's configuration: %w", err)
	}
	cfg, err := readMain(main)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", o.ContainerdConfig, err)
	}
	dropIn, err := o.dropIn(cfg.version)
	if err != nil {
		return nil, err
	}
	if cur, err := os.ReadFile(o.host(o.DropIn)); err != nil || !bytes.Equal(cur, dropIn) {
		changes = append(changes, Change{Path: o.DropIn, What: fmt.Sprintf("register runtime handler %q with containerd (config version %d)", o.Handler, cfg.version), Content: dropIn, Mode: 0o644})
	}
	if _, err := os.Stat(o.host(o.SnapviewConfig)); errors.Is(err, fs.ErrNotExist) {
		changes = append(changes, Change{Path: o.SnapviewConfig, What: "snapview's configuration, with the defaults", Content: []byte(defaultSnapviewConfig), Mode: 0o644})
	}
	if !cfg.imports(o.DropIn, o.ContainerdConfig) {
		edited, err := addImport(main, o.DropIn)
		if err != nil {
			return nil, fmt.Errorf("%s: %w (add %q to its imports by hand)", o.ContainerdConfig, err, o.DropIn)
		}
		fi, _ := os.Stat(mainPath)
		changes = append(changes, Change{Path: o.ContainerdConfig, What: "import " + o.DropIn, Content: edited, Mode: fi.Mode().Perm()})
	}
	return changes, nil
}

// PlanUninstall computes what uninstall changes: the binaries, the drop-in,
// the import entry install added, and snapview's configuration file if it
// is still the one install wrote.
func PlanUninstall(o Options) ([]Change, error) {
	if err := o.check(); err != nil {
		return nil, err
	}
	var changes []Change
	remove := func(p, what string) {
		if _, err := os.Lstat(o.host(p)); err == nil {
			changes = append(changes, Change{Path: p, What: what})
		}
	}
	remove(o.ShimPath(), "remove "+filepath.Base(o.ShimPath()))
	remove(o.ctlPath(), "remove "+filepath.Base(o.ctlPath()))
	remove(o.DropIn, "unregister runtime handler "+o.Handler)
	if cur, err := os.ReadFile(o.host(o.SnapviewConfig)); err == nil && string(cur) == defaultSnapviewConfig {
		changes = append(changes, Change{Path: o.SnapviewConfig, What: "remove snapview's default configuration"})
	}
	mainPath := o.host(o.ContainerdConfig)
	main, err := os.ReadFile(mainPath)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return changes, nil
		}
		return nil, err
	}
	edited, changed, err := removeImport(main, o.DropIn)
	if err != nil {
		return nil, fmt.Errorf("%s: %w (remove %q from its imports by hand)", o.ContainerdConfig, err, o.DropIn)
	}
	if changed {
		fi, _ := os.Stat(mainPath)
		changes = append(changes, Change{Path: o.ContainerdConfig, What: "stop importing " + o.DropIn, Content: edited, Mode: fi.Mode().Perm()})
	}
	return changes, nil
}

// Apply carries out changes on the node at root: each file is written
// atomically (temporary file, fsync, rename) or removed.
func Apply(root string, changes []Change) error {
	for _, c := range changes {
		p := filepath.Join(root, c.Path)
		if c.Content == nil {
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("%s: %w", c.What, err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return fmt.Errorf("%s: %w", c.What, err)
		}
		f, err := atomicfile.New(p, c.Mode)
		if err != nil {
			return fmt.Errorf("%s: %w", c.What, err)
		}
		if _, err := f.Write(c.Content); err != nil {
			_ = f.Cancel()
			return fmt.Errorf("%s: %w", c.What, err)
		}
		if err := f.Close(); err != nil {
			return fmt.Errorf("%s: %w", c.What, err)
		}
	}
	return nil
}

// dropIn is the containerd configuration that registers the handler, in
// the main configuration's version: the CRI plugin's name differs between
// version 2 and versions 3 and 4.
func (o Options) dropIn(version int) ([]byte, error) {
	plugin := `plugins."io.containerd.cri.v1.runtime".containerd.runtimes.` + o.Handler
	v := version
	switch version {
	case 2:
		plugin = `plugins."io.containerd.grpc.v1.cri".containerd.runtimes.` + o.Handler
	case 3, 4:
		v = 3 // containerd migrates an imported version 3 file to 4
	default:
		return nil, fmt.Errorf("containerd configuration version %d is not supported (2, 3 or 4; `containerd config migrate` upgrades older ones)", version)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# Written by `snapviewctl install`: the snapview runtime handler %q for\n", o.Handler)
	b.WriteString("# containerd's CRI plugin. `snapviewctl uninstall` removes it; edit\n")
	fmt.Fprintf(&b, "# %s for snapview's own settings.\n", o.SnapviewConfig)
	fmt.Fprintf(&b, "version = %d\n\n[%s]\n", v, plugin)
	b.WriteString("  runtime_type = \"io.containerd.snapview.v2\"\n")
	fmt.Fprintf(&b, "  runtime_path = %q\n", o.ShimPath())
	if o.Snapshotter != "" {
		fmt.Fprintf(&b, "  snapshotter = %q\n", o.Snapshotter)
	}
	b.WriteString("  pod_annotations = [\"io.snapview.*\"]\n")
	b.WriteString("  container_annotations = [\"io.snapview.*\"]\n")
	fmt.Fprintf(&b, "  [%s.options]\n", plugin)
	fmt.Fprintf(&b, "    ConfigPath = %q\n", o.SnapviewConfig)
	out := []byte(b.String())
	var check map[string]any
	if err := toml.Unmarshal(out, &check); err != nil {
		return nil, fmt.Errorf("the drop-in does not parse: %w", err)
	}
	return out, nil
}

// defaultSnapviewConfig is the snapview configuration install creates when
// there is none: the built-in defaults, spelled out.
const defaultSnapviewConfig = `# snapview's configuration (see docs/configuration.md). Every key is
# optional; these are the built-in defaults. The top level takes runc's
# option names (BinaryName, Root, SystemdCgroup, ...), as in a runc
# options table.

[view]
mode = "view"              # view, block or off (the annotation io.snapview.mode overrides it)
sandbox = false            # also give CRI sandbox (pause) containers a view
boot_dir = "/.snapview/boot"
# source = "layers"        # derive view-mode views from the rootfs's layers: one
#                          # mount, no lease, no call into containerd (default
#                          # "snapshotter", a leased View; see docs/configuration.md)

[block]
monitor_rootfs = "view"    # "view" or an absolute host directory
device = "/dev/snapview/rootfs"

# Monitor rootfs a block-mode container may choose by name with the
# annotation io.snapview.monitor-rootfs ("view" is always a choice):
# [block.monitors]
# qemu = "/opt/monitors/qemu"
`
