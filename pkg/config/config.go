// Package config reads snapview's runtime configuration.
//
// One TOML schema reaches the shim in three ways: inline as CRI's
// runtimeoptions ConfigBody (the raw TOML of the runtime's options table), as
// a file named by runtimeoptions ConfigPath (CRI's ConfigPath or ctr's
// --runtime-config-path), or as the default file. The top-level keys are
// runc's own option names, so a runc options table can be copied over
// unchanged; snapview's own settings live in the [view] and [block] tables.
// A plain runcoptions.Options is accepted too: runc's settings then come from
// it and snapview's from the default file.
//
// Whatever form came in, the inner runc task service only ever sees a
// runcoptions.Options or nothing (see Config.RuncOptions).
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	"github.com/docker/go-units"
	"github.com/pelletier/go-toml/v2"

	"github.com/snapview/snapview/params"
)

// DefaultPath is the configuration file read when the runtime options name none.
const DefaultPath = "/etc/containerd/snapview.toml"

// PathEnv names the environment variable that, when set in the shim's
// environment (inherited from containerd), replaces DefaultPath. It lets a
// private containerd, such as the one `make demo` starts, use its own file
// without touching /etc.
const PathEnv = "SNAPVIEW_CONFIG"

// Modes of a container (annotation io.snapview.mode, default view.mode).
const (
	ModeView  = "view"
	ModeBlock = "block"
	ModeOff   = "off"
)

// layersDir holds the layer disks of a layered rootfs inside the container
// (rootfs.LayersDir); the writable disk's path may not be among them.
const layersDir = "/dev/snapview/layers"

// MonitorRootfsView selects the container's own read-only image view as the
// monitor rootfs in block mode.
const MonitorRootfsView = "view"

// NamePattern is what every name snapview accepts must match: a boot
// artifact's <name> in io.snapview.boot.<name>, and a monitor rootfs's name
// in [block.monitors].
var NamePattern = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// Monitor returns the monitor rootfs a container chose by name: "view", or
// the directory of block.monitors.<name>. ok is false when the
// configuration offers no such choice.
func (c *Config) Monitor(name string) (dir string, ok bool) {
	if name == MonitorRootfsView {
		return MonitorRootfsView, true
	}
	dir, ok = c.Block.Monitors[name]
	return dir, ok
}

// MonitorChoices lists the names a container may choose from, sorted.
func (c *Config) MonitorChoices() []string {
	return append([]string{MonitorRootfsView}, slices.Sorted(maps.Keys(c.Block.Monitors))...)
}

// Config is snapview's configuration: runc's options at the top level and
// snapview's settings in tables.
type Config struct {
	// runc's option names, copied verbatim into runcoptions.Options.
	BinaryName    string `toml:"BinaryName"`
	Root          string `toml:"Root"`
	SystemdCgroup bool   `toml:"SystemdCgroup"`
	NoPivotRoot   bool   `toml:"NoPivotRoot"`
	NoNewKeyring  bool   `toml:"NoNewKeyring"`
	ShimCgroup    string `toml:"ShimCgroup"`
	IoUID         uint32 `toml:"IoUid"`
	IoGID         uint32 `toml:"IoGid"`
	CriuImagePath string `toml:"CriuImagePath"`
	CriuWorkPath  string `toml:"CriuWorkPath"`

	// ConfigPath and TypeUrl are known so that CRI's inline body, which keeps
	// every key of the options table, is accepted. When ConfigPath is set the
	// file it names is the configuration.
	ConfigPath string `toml:"ConfigPath"`
	TypeURL    string `toml:"TypeUrl"`

	View      View      `toml:"view"`
	Block     Block     `toml:"block"`
	Volumes   Volumes   `toml:"volumes"`
	Snapshots Snapshots `toml:"snapshots"`

	// Source says where this configuration came from, for logs and errors.
	Source string `toml:"-"`
}

// View holds the [view] table.
type View struct {
	// Mode is the default mode: view, block or off.
	Mode string `toml:"mode"`
	// Sandbox turns views on for CRI sandbox (pause) containers.
	Sandbox bool `toml:"sandbox"`
	// BootDir is the default directory, inside the container, where boot
	// artifacts are bound.
	BootDir string `toml:"boot_dir"`
	// ImageSnapshotter is the snapshotter in which the view of a container
	// whose client mounted its rootfs itself (Docker, with containerd's
	// image store) is found: its image's layers unpacked there. Default
	// containerd's default snapshotter, overlayfs.
	ImageSnapshotter string `toml:"image_snapshotter"`
	// Source is where a view-mode container's view comes from:
	// "snapshotter" (the default) a leased View of the container's image
	// in its snapshotter; "layers" a read-only mount of the image layers
	// its own rootfs mounts already name, with no lease and no call into
	// containerd, where the rootfs names them (overlayfs, the erofs
	// snapshotter's layers), and the leased View elsewhere.
	Source string `toml:"source"`
}

// DefaultImageSnapshotter is containerd's default snapshotter on Linux,
// the one Docker's containerd image store uses unless told otherwise.
const DefaultImageSnapshotter = "overlayfs"

// Block holds the [block] table.
type Block struct {
	// MonitorRootfs is "view" or an absolute host directory bound read-only
	// as the container's root in block mode.
	MonitorRootfs string `toml:"monitor_rootfs"`
	// Monitors are the other monitor rootfs a container may choose by name
	// (annotation io.snapview.monitor-rootfs): name → absolute host
	// directory. A container can only pick one of these or "view"; it can
	// never name a host path itself.
	Monitors map[string]string `toml:"monitors"`
	// Device is where the block device appears inside the container.
	Device string `toml:"device"`
}

// Volumes holds the [volumes] table.
type Volumes struct {
	// Allow lists the images a container may mount as volumes, as
	// patterns of normalised references (docker.io/acme/models:v3): a
	// pattern matches as path.Match does ("*" within one path element,
	// "docker.io/acme/*" every image of docker.io/acme), and one ending in
	// "/**" also matches every path below it. Empty, the default, allows
	// none: a pod could otherwise read any image another tenant pulled
	// onto the node.
	Allow []string `toml:"allow"`
}

// Snapshots holds the [snapshots] table.
type Snapshots struct {
	// Restore lets containers restore snapshots (a directory snapshot as a
	// volume, a disk snapshot as a block-mode container's writable disk);
	// a snapshot id is an unguessable capability within its namespace.
	// Default true.
	Restore bool `toml:"restore"`
	// MaxDirectorySize caps a directory snapshot (the directory's files as
	// a tar, before compression), with a unit: "1GiB", "500MB". Default
	// 1GiB.
	MaxDirectorySize string `toml:"max_directory_size"`
}

// DefaultMaxDirectorySize is the cap on a directory snapshot by default.
const DefaultMaxDirectorySize = "1GiB"

// MaxDirectoryBytes returns the cap on a directory snapshot in bytes.
func (s Snapshots) MaxDirectoryBytes() int64 {
	n, _ := units.RAMInBytes(s.MaxDirectorySize) // validated
	return n
}

// AllowsVolume reports whether the configuration allows image ref (a
// normalised reference) as a volume.
func (c *Config) AllowsVolume(ref string) bool {
	for _, p := range c.Volumes.Allow {
		if ok, _ := path.Match(p, ref); ok {
			return true
		}
		if base, ok := strings.CutSuffix(p, "/**"); ok && strings.HasPrefix(ref, base+"/") {
			return true
		}
	}
	return false
}

// Default returns the built-in configuration.
func Default() *Config {
	return &Config{
		View: View{
			Mode:             ModeView,
			BootDir:          "/.snapview/boot",
			ImageSnapshotter: DefaultImageSnapshotter,
			Source:           params.SourceSnapshotter,
		},
		Block: Block{
			MonitorRootfs: MonitorRootfsView,
			Device:        "/dev/snapview/rootfs",
		},
		Snapshots: Snapshots{Restore: true, MaxDirectorySize: DefaultMaxDirectorySize},
		Source:    "built-in defaults",
	}
}

// Parse decodes TOML from data, read from source (named in errors), on top
// of the defaults, and validates it. Unknown keys are an error.
func Parse(data []byte, source string) (*Config, error) {
	c := Default()
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(c); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) && len(strict.Errors) > 0 {
			keys := make([]string, 0, len(strict.Errors))
			for _, e := range strict.Errors {
				keys = append(keys, fmt.Sprintf("%q", strings.Join(e.Key(), ".")))
			}
			return nil, fmt.Errorf("snapview: unknown configuration key %s in %s", strings.Join(keys, ", "), source)
		}
		if derr, ok := errors.AsType[*toml.DecodeError](err); ok {
			row, col := derr.Position()
			return nil, fmt.Errorf("snapview: invalid configuration in %s at line %d column %d: %s", source, row, col, derr.Error())
		}
		return nil, fmt.Errorf("snapview: invalid configuration in %s: %w", source, err)
	}
	c.Source = source
	if err := c.validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// ReadFile parses the configuration file at path.
func ReadFile(path string) (*Config, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("snapview: configuration path %q is not absolute", path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("snapview: read configuration file %s: %w", path, err)
	}
	c, err := Parse(data, path)
	if err != nil {
		return nil, err
	}
	if c.ConfigPath != "" && c.ConfigPath != path {
		return nil, fmt.Errorf("snapview: configuration file %s sets ConfigPath %q: a file cannot name another file", path, c.ConfigPath)
	}
	return c, nil
}

// DefaultFile returns the path of the default configuration file: $SNAPVIEW_CONFIG
// if set, else DefaultPath.
func DefaultFile() string {
	if p := os.Getenv(PathEnv); p != "" {
		return p
	}
	return DefaultPath
}

// LoadDefault reads the default configuration file, or returns the built-in
// defaults if it does not exist.
func LoadDefault() (*Config, error) {
	path := DefaultFile()
	c, err := ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Default(), nil
		}
		return nil, err
	}
	return c, nil
}

func (c *Config) validate() error {
	switch c.View.Mode {
	case ModeView, ModeBlock, ModeOff:
	default:
		return fmt.Errorf("snapview: invalid view.mode %q in %s: want view, block or off", c.View.Mode, c.Source)
	}
	switch c.View.Source {
	case params.SourceSnapshotter, params.SourceLayers:
	default:
		return fmt.Errorf("snapview: invalid view.source %q in %s: want %s or %s", c.View.Source, c.Source, params.SourceSnapshotter, params.SourceLayers)
	}
	if err := absClean("view.boot_dir", c.View.BootDir, c.Source); err != nil {
		return err
	}
	if c.Block.MonitorRootfs != MonitorRootfsView {
		if err := absClean("block.monitor_rootfs", c.Block.MonitorRootfs, c.Source); err != nil {
			return fmt.Errorf("%w (or %q)", err, MonitorRootfsView)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(c.Block.Monitors)) {
		if !NamePattern.MatchString(name) || name == MonitorRootfsView {
			return fmt.Errorf("snapview: invalid monitor name block.monitors.%q in %s: must match %s and not be %q", name, c.Source, NamePattern, MonitorRootfsView)
		}
		if err := absClean("block.monitors."+name, c.Block.Monitors[name], c.Source); err != nil {
			return err
		}
	}
	if c.View.ImageSnapshotter == "" || strings.ContainsAny(c.View.ImageSnapshotter, "/ \t\n") {
		return fmt.Errorf("snapview: invalid view.image_snapshotter %q in %s: want a snapshotter's name, such as %q", c.View.ImageSnapshotter, c.Source, DefaultImageSnapshotter)
	}
	if err := absClean("block.device", c.Block.Device, c.Source); err != nil {
		return err
	}
	if !strings.HasPrefix(c.Block.Device, "/dev/") {
		return fmt.Errorf("snapview: invalid block.device %q in %s: must be under /dev/", c.Block.Device, c.Source)
	}
	for _, p := range c.Volumes.Allow {
		if p == "" {
			return fmt.Errorf("snapview: empty volumes.allow pattern in %s", c.Source)
		}
		if _, err := path.Match(strings.TrimSuffix(p, "/**"), ""); err != nil {
			return fmt.Errorf("snapview: invalid volumes.allow pattern %q in %s: %w", p, c.Source, err)
		}
	}
	if n, err := units.RAMInBytes(c.Snapshots.MaxDirectorySize); err != nil || n <= 0 {
		return fmt.Errorf("snapview: invalid snapshots.max_directory_size %q in %s: want a size such as \"1GiB\"", c.Snapshots.MaxDirectorySize, c.Source)
	}
	if strings.HasPrefix(c.Block.Device+"/", layersDir+"/") {
		return fmt.Errorf("snapview: invalid block.device %q in %s: %s holds a layered rootfs's layer disks", c.Block.Device, c.Source, layersDir)
	}
	return nil
}

func absClean(key, value, source string) error {
	if !filepath.IsAbs(value) || filepath.Clean(value) != value || value == "/" {
		return fmt.Errorf("snapview: invalid %s %q in %s: must be a clean absolute path", key, value, source)
	}
	return nil
}

// RuncOptions returns the runc options this configuration carries, or nil
// when it sets none, which is what the inner runc task service is handed.
func (c *Config) RuncOptions() *runcoptions.Options {
	if c.BinaryName == "" && c.Root == "" && !c.SystemdCgroup && !c.NoPivotRoot && !c.NoNewKeyring &&
		c.ShimCgroup == "" && c.IoUID == 0 && c.IoGID == 0 && c.CriuImagePath == "" && c.CriuWorkPath == "" {
		return nil
	}
	return &runcoptions.Options{
		BinaryName:    c.BinaryName,
		Root:          c.Root,
		SystemdCgroup: c.SystemdCgroup,
		NoPivotRoot:   c.NoPivotRoot,
		NoNewKeyring:  c.NoNewKeyring,
		ShimCgroup:    c.ShimCgroup,
		IoUid:         c.IoUID,
		IoGid:         c.IoGID,
		CriuImagePath: c.CriuImagePath,
		CriuWorkPath:  c.CriuWorkPath,
	}
}

// setRunc copies runc's settings from o, replacing the ones c has.
func (c *Config) setRunc(o *runcoptions.Options) {
	c.BinaryName = o.BinaryName
	c.Root = o.Root
	c.SystemdCgroup = o.SystemdCgroup
	c.NoPivotRoot = o.NoPivotRoot
	c.NoNewKeyring = o.NoNewKeyring
	c.ShimCgroup = o.ShimCgroup
	c.IoUID = o.IoUid
	c.IoGID = o.IoGid
	c.CriuImagePath = o.CriuImagePath
	c.CriuWorkPath = o.CriuWorkPath
}
