// Command snapviewctl inspects and repairs what snapview keeps in containerd.
//
//	snapviewctl [--address SOCKET] [--namespace NS] [--state DIR] gc [--dry-run]
//
// gc removes orphaned views: snapview leases whose container no longer
// exists, with their view snapshots and any view still mounted under the
// bundle directory. Every namespace is swept unless --namespace names one.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/snapview/snapview/pkg/backend"
	"github.com/snapview/snapview/pkg/sweep"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "snapviewctl:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("snapviewctl", flag.ContinueOnError)
	address := fs.String("address", "/run/containerd/containerd.sock", "containerd's gRPC socket")
	namespace := fs.String("namespace", "", "sweep only this namespace (default: all)")
	state := fs.String("state", "/run/containerd", "containerd's state directory, where bundles (and leftover view mounts) are")
	fs.Usage = func() {
		_, _ = fmt.Fprintln(fs.Output(), "usage: snapviewctl [flags] gc [--dry-run]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 || fs.Arg(0) != "gc" {
		fs.Usage()
		return fmt.Errorf("unknown or missing command %q", strings.Join(fs.Args(), " "))
	}
	gcFlags := flag.NewFlagSet("gc", flag.ContinueOnError)
	dryRun := gcFlags.Bool("dry-run", false, "report orphans without removing them")
	if err := gcFlags.Parse(fs.Args()[1:]); err != nil {
		return err
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b := backend.New(*address)
	defer func() { _ = b.Close() }()
	nss := []string{*namespace}
	if *namespace == "" {
		var err error
		if nss, err = b.Namespaces(ctx); err != nil {
			return fmt.Errorf("list namespaces at %s: %w", *address, err)
		}
	}
	verb := "removed"
	if *dryRun {
		verb = "would remove"
	}
	var failed bool
	total := 0
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		orphans, err := sweep.Namespace(nctx, b, ns, sweep.Options{
			BundleRoot: filepath.Join(*state, "io.containerd.runtime.v2.task", ns),
			DryRun:     *dryRun,
		})
		for _, o := range orphans {
			total++
			fmt.Printf("%s orphan %s/%s: lease %s, views %v", verb, ns, o.ContainerID, o.Lease, o.Views)
			if o.Mountpoint != "" {
				fmt.Printf(", mount %s", o.Mountpoint)
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
