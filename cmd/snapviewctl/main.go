// Command snapviewctl inspects, repairs and installs snapview on a node.
//
//	snapviewctl [--address SOCKET] [--namespace NS] [--state DIR] <command> [flags]
//
//	gc         remove orphaned views (snapview leases whose container is gone),
//	           with their snapshots and anything still mounted; --dry-run lists them
//	ls         list every view snapview holds, with a health verdict; --json
//	inspect ID show one container's state file, params, binds and containerd objects
//	install    put the shim and snapviewctl in place and register a CRI runtime
//	           handler with containerd (see `snapviewctl install --help`)
//	uninstall  take back what install did
//	snapshot   take, list, inspect, remove, push and pull snapshots of containers
//	           (create, ls, inspect, rm, push, pull; the namespace defaults to
//	           "default")
//
// Every namespace is covered unless --namespace names one. The exit code is
// 0 on success, 1 when the command failed or was incomplete, 2 on bad usage.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/snapview/snapview/pkg/backend"
)

// global holds the flags every command shares.
type global struct {
	address   string
	namespace string
	state     string
}

// errUsage marks a usage error (exit code 2).
var errUsage = errors.New("usage")

var commands = map[string]func(ctx context.Context, g global, args []string) error{
	"gc":        gc,
	"ls":        ls,
	"inspect":   inspect,
	"install":   install,
	"uninstall": uninstall,
	"snapshot":  snapshot,
}

func main() {
	err := run(os.Args[1:])
	switch {
	case err == nil:
	case errors.Is(err, errUsage) || errors.Is(err, flag.ErrHelp):
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "snapviewctl:", err)
		}
		os.Exit(2)
	case strings.HasPrefix(err.Error(), "snapview:"):
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	default:
		fmt.Fprintln(os.Stderr, "snapviewctl:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("snapviewctl", flag.ContinueOnError)
	var g global
	fs.StringVar(&g.address, "address", "/run/containerd/containerd.sock", "containerd's gRPC socket")
	fs.StringVar(&g.namespace, "namespace", "", "only this namespace (default: all)")
	fs.StringVar(&g.state, "state", "/run/containerd", "containerd's state directory, where the bundles are")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: snapviewctl [flags] gc|ls|inspect|install|uninstall|snapshot [command flags]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return fmt.Errorf("%w: no command", errUsage)
	}
	cmd, ok := commands[fs.Arg(0)]
	if !ok {
		fs.Usage()
		return fmt.Errorf("%w: unknown command %q", errUsage, strings.Join(fs.Args(), " "))
	}
	// A snapshot takes as long as its data does (a capture's lease has no
	// expiry either); an interrupt ends it, and it cleans up after itself.
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if fs.Arg(0) != "snapshot" {
		var cancelT context.CancelFunc
		ctx, cancelT = context.WithTimeout(ctx, 5*time.Minute)
		defer cancelT()
	}
	return cmd(ctx, g, fs.Args()[1:])
}

// namespaces returns the namespace the flags name, or every namespace.
func (g global) namespaces(ctx context.Context, b *backend.Backend) ([]string, error) {
	if g.namespace != "" {
		return []string{g.namespace}, nil
	}
	nss, err := b.Namespaces(ctx)
	if err != nil {
		return nil, fmt.Errorf("list namespaces at %s: %w", g.address, err)
	}
	return nss, nil
}
