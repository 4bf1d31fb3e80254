package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/snapview/snapview/snapshots"
)

// registryFlags are the flags that say how to reach a registry, as ctr's.
func registryFlags(fs *flag.FlagSet, r *snapshots.Registry) {
	fs.StringVar(&r.HostsDir, "hosts-dir", "", "directory of hosts.toml files by registry host (default /etc/containerd/certs.d)")
	fs.BoolVar(&r.PlainHTTP, "plain-http", false, "talk HTTP, not HTTPS, to the registry")
	fs.StringVar(&r.User, "user", "", "USER[:PASSWORD] for the registry")
}

func snapshotPush(ctx context.Context, c *snapshots.Client, args []string) error {
	fs := flag.NewFlagSet("snapshot push", flag.ContinueOnError)
	var r snapshots.Registry
	registryFlags(fs, &r)
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() != 2 {
		return fmt.Errorf("%w: snapshot push takes an id and a reference", errUsage)
	}
	d, err := c.Push(ctx, fs.Arg(0), fs.Arg(1), r)
	if err != nil {
		return err
	}
	fmt.Println(d)
	return nil
}

func snapshotPull(ctx context.Context, c *snapshots.Client, args []string) error {
	fs := flag.NewFlagSet("snapshot pull", flag.ContinueOnError)
	var o snapshots.PullOptions
	registryFlags(fs, &o.Registry)
	fs.StringVar(&o.Snapshotter, "snapshotter", "", "unpack an image-form snapshot in this snapshotter (default: the one it was taken in)")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%w: snapshot pull takes one reference", errUsage)
	}
	s, err := c.Pull(ctx, fs.Arg(0), o)
	if err != nil {
		return err
	}
	return printJSON(s)
}
