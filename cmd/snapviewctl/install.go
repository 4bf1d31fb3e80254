package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/snapview/snapview/pkg/installer"
)

// installFlags are the flags install and uninstall share.
func installFlags(name string) (*flag.FlagSet, *installer.Options, *bool, *restartFlags) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	o := installer.Defaults()
	self, _ := os.Executable()
	fs.StringVar(&o.Root, "root", o.Root, "where the node's filesystem is mounted (a DaemonSet mounts it at e.g. /host)")
	fs.StringVar(&o.Prefix, "prefix", o.Prefix, "binaries go to PREFIX/bin")
	fs.StringVar(&o.Handler, "handler", o.Handler, "the CRI runtime handler's name (the RuntimeClass handler)")
	fs.StringVar(&o.ContainerdConfig, "config", o.ContainerdConfig, "containerd's main configuration file")
	fs.StringVar(&o.DropIn, "dropin", o.DropIn, "the configuration file that registers the handler")
	fs.StringVar(&o.SnapviewConfig, "snapview-config", o.SnapviewConfig, "snapview's own configuration file (created with the defaults if missing)")
	fs.StringVar(&o.Shim, "shim", filepath.Join(filepath.Dir(self), "containerd-shim-snapview-v2"), "the shim binary to install")
	fs.StringVar(&o.Ctl, "ctl", self, "the snapviewctl binary to install")
	fs.StringVar(&o.Snapshotter, "snapshotter", "", "the handler's snapshotter (e.g. blockfile or erofs for a block-mode handler; default containerd's)")
	dryRun := fs.Bool("dry-run", false, "print what would change, change nothing")
	var r restartFlags
	fs.BoolVar(&r.restart, "restart", false, "restart containerd if anything changed")
	fs.StringVar(&r.command, "restart-command", defaultRestart, "the shell command that restarts containerd, run inside --root")
	return fs, &o, dryRun, &r
}

// defaultRestart restarts a containerd that systemd runs as containerd.service.
const defaultRestart = "systemctl restart containerd"

// restartFlags say whether and how containerd is restarted after a change.
type restartFlags struct {
	restart bool
	// command runs with sh -c, chrooted into the node's root when that is
	// not /: the node's service manager, whatever it is (systemctl,
	// rc-service, a k3s unit, a supervisor's signal).
	command string
}

// install puts the shim and snapviewctl in place and registers a CRI
// runtime handler with containerd, idempotently.
func install(_ context.Context, _ global, args []string) error {
	fs, o, dryRun, restart := installFlags("install")
	if err := fs.Parse(args); err != nil {
		return err
	}
	changes, err := installer.Plan(*o)
	if err != nil {
		return err
	}
	return carryOut(*o, changes, *dryRun, restart, "snapview is installed as asked")
}

// uninstall takes back what install did.
func uninstall(_ context.Context, _ global, args []string) error {
	fs, o, dryRun, restart := installFlags("uninstall")
	if err := fs.Parse(args); err != nil {
		return err
	}
	changes, err := installer.PlanUninstall(*o)
	if err != nil {
		return err
	}
	return carryOut(*o, changes, *dryRun, restart, "snapview is not installed")
}

func carryOut(o installer.Options, changes []installer.Change, dryRun bool, restart *restartFlags, done string) error {
	if len(changes) == 0 {
		fmt.Printf("%s: nothing to change\n", done)
		return nil
	}
	for _, c := range changes {
		verb := "write"
		if c.Content == nil {
			verb = "remove"
		}
		if dryRun {
			verb = "would " + verb
		}
		fmt.Printf("%s %s: %s\n", verb, c.Path, c.What)
		if dryRun && c.Content != nil && filepath.Ext(c.Path) == ".toml" {
			fmt.Printf("%s\n", indent(string(c.Content)))
		}
	}
	if dryRun {
		return nil
	}
	if err := installer.Apply(o.Root, changes); err != nil {
		return err
	}
	if !restart.restart {
		fmt.Println("restart containerd for it to take effect (or run again with --restart)")
		return nil
	}
	cmd := exec.Command("sh", "-c", restart.command)
	if o.Root != "/" {
		cmd = exec.Command("chroot", o.Root, "sh", "-c", restart.command)
	}
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("restart containerd (%s): %w", restart.command, err)
	}
	fmt.Printf("containerd restarted (%s)\n", restart.command)
	return nil
}

func indent(s string) string {
	var b strings.Builder
	for l := range strings.SplitSeq(strings.TrimSuffix(s, "\n"), "\n") {
		b.WriteString("    | " + l + "\n")
	}
	return b.String()
}
