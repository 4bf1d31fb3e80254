package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/snapview/snapview/pkg/backend"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/inventory"
	"github.com/snapview/snapview/pkg/lease"
	"github.com/snapview/snapview/pkg/view"
)

// ls lists every view snapview holds, across namespaces, with a health
// verdict: ok, orphan (its container is gone), or broken (a lease without
// its view, a view without its mount, a missing or unreadable state file).
func ls(ctx context.Context, g global, args []string) error {
	fs := flag.NewFlagSet("ls", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print JSON, one array of views")
	if err := fs.Parse(args); err != nil {
		return err
	}
	b := backend.New(g.address)
	defer func() { _ = b.Close() }()
	nss, err := g.namespaces(ctx, b)
	if err != nil {
		return err
	}
	all := []inventory.Entry{}
	for _, ns := range nss {
		entries, err := inventory.List(namespaces.WithNamespace(ctx, ns), b, ns, g.state)
		if err != nil {
			return fmt.Errorf("namespace %s: %w", ns, err)
		}
		all = append(all, entries...)
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(all)
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAMESPACE\tCONTAINER\tMODE\tSNAPSHOTTER\tVIEW\tLEASE\tMOUNTPOINT\tDEVICE\tVOLUMES\tAGE\tHEALTH")
	for _, e := range all {
		device := e.Device
		if e.Layers > 0 {
			device += fmt.Sprintf(" +%d layers", e.Layers)
		}
		viewCol := e.ViewKey
		if e.Source != "" {
			viewCol = "(from " + e.Source + ")"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Namespace, e.Container, dash(e.Mode), dash(e.Snapshotter),
			dash(viewCol), dash(e.Lease), dash(e.Mountpoint), dash(device), dash(volumesColumn(e)), age(e.Age()), e.Health)
	}
	return w.Flush()
}

// volumesColumn names a container's volumes, a snapshot volume with its
// snapshot's id (shortened, as image ids are) and "rw" for a writable clone.
func volumesColumn(e inventory.Entry) string {
	snaps := map[string]inventory.SnapshotVolume{}
	for _, v := range e.SnapshotVolumes {
		snaps[v.Name] = v
	}
	out := make([]string, 0, len(e.Volumes))
	for _, name := range e.Volumes {
		if v, ok := snaps[name]; ok {
			name += "=snapshot:" + v.Snapshot[:min(8, len(v.Snapshot))]
			if v.Writable {
				name += ":rw"
			}
		}
		out = append(out, name)
	}
	return strings.Join(out, ",")
}

// inspect prints what snapview holds for one container, for
// troubleshooting: the verdict, the state file, the params file, the binds,
// and the containerd objects and host mounts behind them.
func inspect(ctx context.Context, g global, args []string) error {
	fs := flag.NewFlagSet("inspect", flag.ContinueOnError)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%w: inspect takes one container id", errUsage)
	}
	id := fs.Arg(0)
	b := backend.New(g.address)
	defer func() { _ = b.Close() }()
	nss, err := g.namespaces(ctx, b)
	if err != nil {
		return err
	}
	found := false
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		e, err := inventory.Find(nctx, b, ns, g.state, id)
		if err != nil {
			continue
		}
		found = true
		if err := describe(nctx, b, e); err != nil {
			return err
		}
	}
	if !found {
		return fmt.Errorf("snapview holds no view of container %s", id)
	}
	return nil
}

func describe(ctx context.Context, b *backend.Backend, e *inventory.Entry) error {
	fmt.Printf("container   %s/%s\nhealth      %s\nmode        %s\ncreated     %s (%s ago)\n",
		e.Namespace, e.Container, e.Health, dash(e.Mode), e.Created.Format(time.RFC3339Nano), age(e.Age()))
	if e.Bundle != "" {
		fmt.Printf("bundle      %s\n", e.Bundle)
		if raw, err := os.ReadFile(bundle.StatePath(e.Bundle)); err == nil {
			fmt.Printf("\nstate file %s:\n%s\n", bundle.StatePath(e.Bundle), raw)
		} else {
			fmt.Printf("\nstate file: %v\n", err)
		}
		if raw, err := os.ReadFile(bundle.ParamsFile(e.Bundle)); err == nil {
			fmt.Printf("\nparams (bound at /.snapview/params.json):\n%s", raw)
		}
	}
	if e.State != nil {
		if blk := e.State.Block; blk != nil {
			fmt.Printf("block       %s (%d:%d) from %s; monitor rootfs %s\n", blk.Device, blk.Major, blk.Minor, blk.Rootfs.Source, blk.MonitorRootfs)
			for _, d := range blk.Layers {
				fmt.Printf("layer       %s: %s (%d:%d, read-only) from %s%s\n", d.Path, d.Device, d.Major, d.Minor, d.Loop.BackingFile, loopStatus(d.Device))
			}
		}
		for _, a := range e.State.Artifacts {
			fmt.Printf("bind        %s -> %s (from %s in the image)\n", a.Source, a.Target, a.Path)
		}
		for _, v := range e.State.Volumes {
			switch {
			case v.Snapshot != "" && v.Writable:
				fmt.Printf("volume      %s: a writable clone of directory snapshot %s at %s (subpath %s), snapshot %s\n", v.Name, v.Snapshot, v.Target, v.Subpath, v.ViewKey)
			case v.Snapshot != "":
				fmt.Printf("volume      %s: directory snapshot %s at %s (subpath %s), view %s\n", v.Name, v.Snapshot, v.Target, v.Subpath, v.ViewKey)
			default:
				fmt.Printf("volume      %s: image %s at %s (subpath %s), view %s\n", v.Name, v.Image, v.Target, v.Subpath, v.ViewKey)
			}
			if v.Mountpoint != "" {
				mounted, _ := mountinfo.Mounted(v.Mountpoint)
				fmt.Printf("  mount     %s (mounted: %v), bound from %s\n", v.Mountpoint, mounted, v.Source)
			}
			for _, d := range v.Disks {
				fmt.Printf("  disk      %s: %s (%d:%d, read-only)%s\n", d.Path, d.Device, d.Major, d.Minor, loopStatus(d.Device))
			}
			if d := v.WritableDisk; d != nil {
				fmt.Printf("  disk      %s: %s (%d:%d, writable)%s\n", d.Path, d.Device, d.Major, d.Minor, loopStatus(d.Device))
			}
		}
	}
	if e.Lease != "" {
		lm, err := b.Leases()
		if err != nil {
			return err
		}
		l, err := lease.Get(ctx, lm, e.Container)
		if err == nil {
			fmt.Printf("\nlease       %s labels %v\n", l.ID, l.Labels)
			res, _ := lm.ListResources(ctx, l)
			for _, r := range res {
				fmt.Printf("  holds     %s %s\n", r.Type, r.ID)
			}
		}
	}
	if e.Source != "" && e.State != nil {
		fmt.Printf("view        derived from the rootfs's layers (view.source %s): no view snapshot\n", e.Source)
		for _, m := range e.State.Mounts {
			fmt.Printf("  from      %s %s %v\n", m.Type, m.Source, m.Options)
		}
	}
	if e.ViewKey != "" {
		sn, err := b.Snapshotter(e.Snapshotter)
		if err != nil {
			return err
		}
		if info, err := sn.Stat(ctx, view.Key(e.Container)); err == nil {
			fmt.Printf("view        %s/%s kind %s parent %s\n  labels    %v\n", e.Snapshotter, info.Name, info.Kind, info.Parent, info.Labels)
		} else {
			fmt.Printf("view        %s/%s: %v\n", e.Snapshotter, e.ViewKey, err)
		}
	}
	if e.Mountpoint != "" {
		infos, _ := mountinfo.GetMounts(mountinfo.SingleEntryFilter(e.Mountpoint))
		if len(infos) == 0 {
			fmt.Printf("mount       %s: not mounted\n", e.Mountpoint)
		}
		for _, m := range infos {
			fmt.Printf("mount       %s: %s from %s (%s)\n", m.Mountpoint, m.FSType, m.Source, m.Options)
		}
	}
	if e.Device != "" {
		fmt.Printf("device      %s%s\n", e.Device, loopStatus(e.Device))
	}
	if e.RootfsActivation != "" {
		mm, err := b.Mounts()
		if err != nil {
			return err
		}
		if ai, err := mm.Info(ctx, e.RootfsActivation); err == nil {
			fmt.Printf("rootfs      mount activation %s: %d mounts performed, labels %v\n", ai.Name, len(ai.Active), ai.Labels)
		} else {
			fmt.Printf("rootfs      mount activation %s: %v\n", e.RootfsActivation, err)
		}
	}
	fmt.Println()
	return nil
}

// loopStatus says what a loop device is bound to.
func loopStatus(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		if _, serr := os.Stat(dev); serr == nil {
			var st unix.Stat_t
			if unix.Stat(dev, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
				return " (not a bound loop device)"
			}
		}
		return " (free)"
	}
	return " bound to " + string(b[:len(b)-1])
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func age(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < time.Minute:
		return d.Round(time.Second).String()
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	default:
		return fmt.Sprintf("%dd", int(d.Hours()/24))
	}
}
