// Package annotations parses and validates snapview's input annotations
// from a container's OCI spec:
//
//	io.snapview.mode         view | block | off
//	io.snapview.boot.<name>  absolute path inside the image of a boot artifact
//	io.snapview.boot-dir     absolute path inside the container for the artifacts
//	io.snapview.view-target  absolute path inside the container for the whole view
//	io.snapview.monitor-rootfs  block mode: "view" or a name from [block.monitors]
//	io.snapview.volume.<name>  a volume: {"image":"<ref>","target":"<path>","subpath":"<path>"}
//
// Annotations come from whoever writes the pod spec, so nothing here is
// trusted: every value is checked, and an error names the annotation. The
// annotations snapview writes (io.snapview.view.*, io.snapview.rootfs.params,
// io.snapview.bound.*, io.snapview.volumes) use other keys and are never
// read back as input.
package annotations

import (
	"fmt"
	"path"
	"slices"
	"sort"
	"strings"

	"github.com/snapview/snapview/params"

	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/snapshot/record"
)

// Input annotation keys (defined for runtime authors in package params).
const (
	Mode       = params.Mode
	BootPrefix = params.BootPrefix
	BootDir    = params.BootDir
	ViewTarget = params.ViewTarget
	// MonitorRootfs chooses block mode's monitor rootfs by name, among
	// those the configuration offers; it never names a host path.
	MonitorRootfs = params.MonitorRootfs
	// Restore names a disk snapshot a block-mode container's writable
	// disk starts as.
	Restore = params.Restore
)

// Output annotation keys and prefixes (written by snapview into
// config.json; package params defines them for runtime authors).
const (
	ViewSnapshotter = params.ViewSnapshotter
	ViewKey         = params.ViewKey
	ViewLease       = params.ViewLease
	ViewMountpoint  = params.ViewMountpoint
	ViewSource      = params.ViewSource
	RootfsParams    = params.RootfsParams
	BoundPrefix     = params.BoundPrefix
	// Volumes describes the container's volumes: JSON, name → volume.
	Volumes = params.Volumes
	// Doc is the whole params document.
	Doc        = params.DocAnnotation
	outputView = "io.snapview.view."
)

// Prefix starts every snapview annotation.
const Prefix = "io.snapview."

// MaxArtifacts is the most boot artifacts one container may name.
const MaxArtifacts = 16

// ParamsTarget is where the rootfs params file is bound in the container.
const ParamsTarget = params.File

// maxPath bounds every path value (PATH_MAX).
const maxPath = 4096

var namePattern = config.NamePattern

// forbiddenTargets are kernel filesystems no bind may cover or enter.
var forbiddenTargets = []string{"/proc", "/sys", "/dev"}

// Artifact is a boot artifact a container asks for.
type Artifact struct {
	// Name is the <name> of io.snapview.boot.<name>.
	Name string
	// Path is the artifact's absolute path inside the image.
	Path string
	// Target is where it is bound inside the container: <boot-dir>/<name>.
	Target string
}

// Request is what a container's annotations ask of snapview.
type Request struct {
	// Mode is the io.snapview.mode value, or "" when it is not set.
	Mode string
	// Artifacts are sorted by name.
	Artifacts []Artifact
	// BootDir is where artifacts are bound (the annotation, else the default).
	BootDir string
	// ViewTarget is where the whole view is bound, or "" for nowhere.
	ViewTarget string
	// MonitorRootfs is the monitor rootfs chosen by name, or "" for the
	// configuration's default.
	MonitorRootfs string
	// Volumes are sorted by name.
	Volumes []Volume
	// Restore is the id of the disk snapshot to restore, or "".
	Restore string
}

// Parse reads snapview's annotations from ann. defaultBootDir is used when
// io.snapview.boot-dir is not set. Unknown io.snapview.* keys are errors
// (a typo must not be ignored), except snapview's own output keys.
func Parse(ann map[string]string, defaultBootDir string) (*Request, error) {
	r := &Request{BootDir: defaultBootDir}
	keys := make([]string, 0, len(ann))
	for k := range ann {
		if strings.HasPrefix(k, Prefix) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := ann[k]
		switch {
		case k == Mode:
			switch v {
			case config.ModeView, config.ModeBlock, config.ModeOff:
				r.Mode = v
			default:
				return nil, fmt.Errorf("snapview: annotation %s=%q: want view, block or off", k, v)
			}
		case k == BootDir:
			if err := checkTarget(v); err != nil {
				return nil, fmt.Errorf("snapview: annotation %s=%q: %w", k, v, err)
			}
			r.BootDir = v
		case k == ViewTarget:
			if err := checkTarget(v); err != nil {
				return nil, fmt.Errorf("snapview: annotation %s=%q: %w", k, v, err)
			}
			r.ViewTarget = v
		case k == MonitorRootfs:
			if !namePattern.MatchString(v) {
				return nil, fmt.Errorf("snapview: annotation %s=%q: want %q or the name of a monitor rootfs in the configuration's [block.monitors] (matching %s), never a path", k, v, config.MonitorRootfsView, namePattern)
			}
			r.MonitorRootfs = v
		case k == Restore:
			id, err := record.ParseID(v)
			if err != nil {
				return nil, fmt.Errorf("snapview: annotation %s: %w", k, err)
			}
			r.Restore = id
		case strings.HasPrefix(k, BootPrefix):
			name := strings.TrimPrefix(k, BootPrefix)
			if !namePattern.MatchString(name) {
				return nil, fmt.Errorf("snapview: annotation %s: artifact name %q must match %s", k, name, namePattern)
			}
			if err := checkPath(v); err != nil {
				return nil, fmt.Errorf("snapview: annotation %s=%q: %w", k, v, err)
			}
			r.Artifacts = append(r.Artifacts, Artifact{Name: name, Path: v})
		case strings.HasPrefix(k, VolumePrefix):
			name := strings.TrimPrefix(k, VolumePrefix)
			if !namePattern.MatchString(name) {
				return nil, fmt.Errorf("snapview: annotation %s: volume name %q must match %s", k, name, namePattern)
			}
			vol, err := parseVolume(name, v)
			if err != nil {
				return nil, fmt.Errorf("snapview: annotation %s: %w", k, err)
			}
			r.Volumes = append(r.Volumes, vol)
		case strings.HasPrefix(k, outputView), k == RootfsParams, strings.HasPrefix(k, BoundPrefix), k == Volumes, k == Doc:
			// snapview's own output: overwritten, never read.
		default:
			return nil, fmt.Errorf("snapview: unknown annotation %s (known: %s, %s<name>, %s, %s, %s, %s<name>, %s)", k, Mode, BootPrefix, BootDir, ViewTarget, MonitorRootfs, VolumePrefix, Restore)
		}
	}
	if len(r.Artifacts) > MaxArtifacts {
		return nil, fmt.Errorf("snapview: %d boot artifacts (%s*): at most %d", len(r.Artifacts), BootPrefix, MaxArtifacts)
	}
	if len(r.Volumes) > MaxVolumes {
		return nil, fmt.Errorf("snapview: %d volumes (%s*): at most %d", len(r.Volumes), VolumePrefix, MaxVolumes)
	}
	if len(r.Artifacts) > 0 || r.ViewTarget != "" {
		if err := checkTarget(r.BootDir); err != nil {
			return nil, fmt.Errorf("snapview: boot directory %q: %w", r.BootDir, err)
		}
	}
	for i := range r.Artifacts {
		r.Artifacts[i].Target = path.Join(r.BootDir, r.Artifacts[i].Name)
	}
	if err := r.checkOverlaps(); err != nil {
		return nil, err
	}
	return r, nil
}

// HasBinds reports whether the request asks for anything to be bound (or,
// in block mode, a volume's disks).
func (r *Request) HasBinds() bool {
	return len(r.Artifacts) > 0 || r.ViewTarget != "" || len(r.Volumes) > 0
}

// checkPath checks an artifact path: absolute, clean, without "..".
func checkPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("empty path")
	case len(p) > maxPath:
		return fmt.Errorf("path longer than %d bytes", maxPath)
	case strings.ContainsRune(p, 0):
		return fmt.Errorf("path contains a NUL byte")
	case !strings.HasPrefix(p, "/"):
		return fmt.Errorf("path must be absolute")
	}
	if slices.Contains(strings.Split(p, "/"), "..") {
		return fmt.Errorf(`path must not contain ".."`)
	}
	if path.Clean(p) != p {
		return fmt.Errorf("path must be clean (no //, /./ or trailing /)")
	}
	if p == "/" {
		return fmt.Errorf("path names the root directory")
	}
	return nil
}

// checkTarget checks a path inside the container that snapview binds onto.
func checkTarget(p string) error {
	if err := checkPath(p); err != nil {
		return err
	}
	for _, f := range forbiddenTargets {
		if p == f || strings.HasPrefix(p, f+"/") {
			return fmt.Errorf("target under %s is not allowed", f)
		}
	}
	return nil
}

// checkOverlaps refuses bind targets that are equal to or nested in one
// another: a bind inside the read-only view bind, or over the params file,
// would fail in runc or hide one of them.
func (r *Request) checkOverlaps() error {
	type target struct{ path, what string }
	targets := []target{{ParamsTarget, "the params file"}}
	if r.ViewTarget != "" {
		targets = append(targets, target{r.ViewTarget, ViewTarget})
	}
	for _, a := range r.Artifacts {
		targets = append(targets, target{a.Target, BootPrefix + a.Name})
	}
	for _, v := range r.Volumes {
		targets = append(targets, target{v.Target, VolumePrefix + v.Name})
	}
	for i, a := range targets {
		for _, b := range targets[i+1:] {
			if a.path == b.path || strings.HasPrefix(b.path, a.path+"/") || strings.HasPrefix(a.path, b.path+"/") {
				return fmt.Errorf("snapview: bind targets overlap: %s at %s and %s at %s", a.what, a.path, b.what, b.path)
			}
		}
	}
	return nil
}
