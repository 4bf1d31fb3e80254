package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/snapview/snapview/pkg/backend"
	"github.com/snapview/snapview/pkg/inventory"
	"github.com/snapview/snapview/pkg/sweep"
)

// gc removes orphaned views: snapview leases whose container no longer
// exists, with their view snapshots and any view still mounted under the
// bundle directory.
func gc(ctx context.Context, g global, args []string) error {
	fs := flag.NewFlagSet("gc", flag.ContinueOnError)
	dryRun := fs.Bool("dry-run", false, "report orphans without removing them")
	if err := fs.Parse(args); err != nil {
		return err
	}
	b := backend.New(g.address)
	defer func() { _ = b.Close() }()
	nss, err := g.namespaces(ctx, b)
	if err != nil {
		return err
	}
	verb := "removed"
	if *dryRun {
		verb = "would remove"
	}
	var failed bool
	total := 0
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		orphans, err := sweep.Namespace(nctx, b, ns, sweep.Options{BundleRoot: inventory.BundleRoot(g.state, ns), DryRun: *dryRun})
		for _, o := range orphans {
			total++
			if o.Snapshot != "" {
				fmt.Printf("%s dead capture %s/%s: lease %s", verb, ns, o.Snapshot, o.Lease)
				if o.ContainerID != "" {
					fmt.Printf(", container %s resumed", o.ContainerID)
				}
				fmt.Println()
				continue
			}
			fmt.Printf("%s orphan %s/%s: lease %s, views %v", verb, ns, o.ContainerID, o.Lease, o.Views)
			if len(o.Mountpoints) > 0 {
				fmt.Printf(", mount %s", strings.Join(o.Mountpoints, ", "))
			}
			fmt.Println()
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "snapviewctl: namespace %s: %v\n", ns, err)
			failed = true
		}
	}
	fmt.Printf("%d orphan(s) %s\n", total, verb)
	if failed {
		return fmt.Errorf("the sweep was incomplete")
	}
	return nil
}
