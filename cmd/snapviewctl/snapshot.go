package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/snapview/snapview/snapshots"
)

// snapshotCommands are the subcommands of `snapviewctl snapshot`.
var snapshotCommands = map[string]func(ctx context.Context, c *snapshots.Client, args []string) error{
	"create":  snapshotCreate,
	"ls":      snapshotList,
	"inspect": snapshotInspect,
	"rm":      snapshotRemove,
	"push":    snapshotPush,
	"pull":    snapshotPull,
}

const snapshotUsage = `usage: snapviewctl [--address SOCK] [--namespace NS] [--state DIR] snapshot COMMAND
  create [--dir PATH] [--name NAME] [--ttl DURATION] [--no-pause] [--config FILE] CONTAINER
  ls [--json]
  inspect ID
  rm ID...
  push [--hosts-dir DIR] [--plain-http] [--user USER[:PASSWORD]] ID REF
  pull [--hosts-dir DIR] [--plain-http] [--user USER[:PASSWORD]] [--snapshotter NAME] REF
The namespace defaults to "default", as for ctr.`

// snapshot runs `snapviewctl snapshot`: the snapshots of one namespace,
// through the public Go package (package snapshots).
func snapshot(ctx context.Context, g global, args []string) error {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, snapshotUsage)
		return fmt.Errorf("%w: snapshot needs a command", errUsage)
	}
	cmd, ok := snapshotCommands[args[0]]
	if !ok {
		fmt.Fprintln(os.Stderr, snapshotUsage)
		return fmt.Errorf("%w: unknown snapshot command %q", errUsage, args[0])
	}
	ns := g.namespace
	if ns == "" {
		ns = "default"
	}
	opts := []snapshots.Option{snapshots.WithNamespace(ns), snapshots.WithStateDir(g.state)}
	if p := configFlag(args[1:]); p != "" {
		opts = append(opts, snapshots.WithConfig(p))
	}
	c, err := snapshots.New(g.address, opts...)
	if err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	return cmd(ctx, c, args[1:])
}

// configFlag finds --config FILE (or --config=FILE) among a command's
// arguments, which the client needs before the command parses them.
func configFlag(args []string) string {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--config="); ok {
			return v
		}
		if a == "--config" && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func snapshotCreate(ctx context.Context, c *snapshots.Client, args []string) error {
	fs := flag.NewFlagSet("snapshot create", flag.ContinueOnError)
	var o snapshots.CreateOptions
	fs.StringVar(&o.Dir, "dir", "", "take a directory snapshot of this absolute path in the container")
	fs.StringVar(&o.Name, "name", "", "a name for people")
	fs.DurationVar(&o.TTL, "ttl", 0, "let containerd collect the snapshot this long after it was taken (a Go duration: 24h)")
	fs.BoolVar(&o.NoPause, "no-pause", false, "do not pause a running container during the capture")
	fs.String("config", "", "snapview's configuration file (default: the shim's)")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%w: snapshot create takes one container", errUsage)
	}
	s, err := c.Create(ctx, fs.Arg(0), o)
	if err != nil {
		return err
	}
	return printJSON(s)
}

func snapshotList(ctx context.Context, c *snapshots.Client, args []string) error {
	fs := flag.NewFlagSet("snapshot ls", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print JSON, one array of snapshots")
	if err := fs.Parse(args); err != nil || fs.NArg() != 0 {
		return fmt.Errorf("%w: snapshot ls [--json]", errUsage)
	}
	ss, err := c.List(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		if ss == nil {
			ss = []snapshots.Snapshot{}
		}
		return printJSON(ss)
	}
	now := time.Now()
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tKIND\tFORM\tNAME\tSIZE\tAGE\tSOURCE\tBASE")
	for _, s := range ss {
		a := age(now.Sub(s.Created))
		if s.Old(now) {
			a += " (old)"
		}
		base := s.Base
		if base == "" && s.Dir != "" {
			base = "dir " + s.Dir
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, s.Kind, s.Form, dash(s.Name), bytesOf(s.Size), a, s.Source, dash(base))
	}
	return w.Flush()
}

func snapshotInspect(ctx context.Context, c *snapshots.Client, args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("%w: snapshot inspect takes one id", errUsage)
	}
	s, err := c.Inspect(ctx, args[0])
	if err != nil {
		return err
	}
	return printJSON(s)
}

func snapshotRemove(ctx context.Context, c *snapshots.Client, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: snapshot rm takes one id or more", errUsage)
	}
	err := c.Remove(ctx, args...)
	if err == nil {
		for _, id := range args {
			fmt.Println(id)
		}
	}
	return err
}

// bytesOf writes n bytes for people.
func bytesOf(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
