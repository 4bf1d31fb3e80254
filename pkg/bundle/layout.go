package bundle

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// The layout of what snapview keeps in a container's bundle directory. It is
// defined here only: the shim, the dead-shim path, the sweep and the tests
// derive every path from a bundle with these functions.
//
//	<bundle>/snapview.json          the state file (StatePath)
//	<bundle>/snapview/              snapview's directory (Dir); its presence marks a view as started
//	<bundle>/snapview/view          the view's mountpoint (Mountpoint)
//	<bundle>/snapview/params.json   bound at /.snapview/params.json (ParamsFile)
//	<bundle>/snapview/volumes/<name>  view mode: where volume <name> is mounted (VolumeMountpoint)
//	<bundle>/work/snapview/upper, work  block mode: the monitor rootfs overlay's upper and work
//	                                  dirs, on containerd's root filesystem (MonitorDirs)
const (
	dirName    = "snapview"
	viewName   = "view"
	paramsName = "params.json"
	upperName  = "upper"
	workName   = "work"
	volumesDir = "volumes"
)

// Dir returns snapview's directory in bundle. Setup creates it before its
// first side effect, so that the dead-shim path can tell from the bundle
// alone, without calling containerd, whether a view was ever started.
func Dir(bundle string) string { return filepath.Join(bundle, dirName) }

// Mountpoint returns where a container's view is mounted on the host.
func Mountpoint(bundle string) string { return filepath.Join(bundle, dirName, viewName) }

// ParamsFile returns the host file bound at /.snapview/params.json.
func ParamsFile(bundle string) string { return filepath.Join(bundle, dirName, paramsName) }

// VolumesDir returns the directory of the volumes' mountpoints in bundle.
func VolumesDir(bundle string) string { return filepath.Join(bundle, dirName, volumesDir) }

// VolumeMountpoint returns where volume name is mounted on the host.
func VolumeMountpoint(bundle, name string) string { return filepath.Join(VolumesDir(bundle), name) }

// taskWorkLink is the link containerd makes in every bundle to the task's
// working directory, <root>/io.containerd.runtime.v2.task/<ns>/<id> on its
// root filesystem, which it removes with the bundle.
const taskWorkLink = "work"

// MonitorDir returns where the block-mode monitor rootfs's upper and work
// directories go: snapview's directory in the task's working directory,
// which containerd keeps on its root filesystem (the node's disk) and
// removes with the bundle, so that what a block-mode container writes to
// its root lands where a container's writes are counted (the kubelet's
// eviction sees that filesystem), not in containerd's state directory, a
// tmpfs on most nodes (/run) that a container could fill for the whole
// node. A bundle without the link (not made by containerd's task manager)
// keeps them in snapview's directory in the bundle. The link must lead to a
// directory, and snapview's directory there, if it exists, must be one
// (not a symlink): everything removed there stays below it.
func MonitorDir(bundle string) (string, error) {
	link := filepath.Join(bundle, taskWorkLink)
	fi, err := os.Stat(link)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return Dir(bundle), nil
	case err != nil:
		return "", fmt.Errorf("the task's working directory %s: %w", link, err)
	case !fi.IsDir():
		return "", fmt.Errorf("the task's working directory %s is a %s, not a directory", link, fi.Mode().Type())
	}
	dir := filepath.Join(link, dirName)
	if fi, err := os.Lstat(dir); err == nil && !fi.IsDir() {
		return "", fmt.Errorf("%s is a %s, not a directory: nothing below it is touched", dir, fi.Mode().Type())
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("check %s: %w", dir, err)
	}
	return dir, nil
}

// MonitorDirs returns the upper and work directories of the block-mode
// monitor rootfs (see MonitorDir).
func MonitorDirs(bundle string) (upper, work string, err error) {
	dir, err := MonitorDir(bundle)
	if err != nil {
		return "", "", err
	}
	return filepath.Join(dir, upperName), filepath.Join(dir, workName), nil
}

// LegacyMonitorDirs returns where a release before MonitorDir kept them,
// in snapview's directory in the bundle, for the teardown of its views.
func LegacyMonitorDirs(bundle string) (upper, work string) {
	return filepath.Join(bundle, dirName, upperName), filepath.Join(bundle, dirName, workName)
}

// MakeDir creates snapview's directory in bundle, mode 0700. A directory
// already there (from an earlier attempt in the same bundle) is reused; a
// symlink or any other kind of file is refused, so that nothing snapview
// writes or mounts later can be redirected outside the bundle.
func MakeDir(bundle string) error {
	dir := Dir(bundle)
	err := os.Mkdir(dir, 0o700)
	if err == nil || !errors.Is(err, fs.ErrExist) {
		if err != nil {
			return fmt.Errorf("create %s: %w", dir, err)
		}
		return nil
	}
	return CheckDir(bundle)
}

// CheckDir checks that snapview's directory in bundle, if it exists, is a
// directory and not a symlink (or anything else): every path snapview
// removes or unmounts lies below it, and must stay inside the bundle.
func CheckDir(bundle string) error {
	dir := Dir(bundle)
	fi, err := os.Lstat(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("check %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is a %s, not a directory: nothing below it is touched", dir, fi.Mode().Type())
	}
	return nil
}

// Started reports whether bundle shows that a view was started in it: a
// state file or snapview's directory exists.
func Started(bundle string) bool {
	for _, p := range []string{StatePath(bundle), Dir(bundle)} {
		if _, err := os.Lstat(p); err == nil || !errors.Is(err, fs.ErrNotExist) {
			return true
		}
	}
	return false
}
