package shim

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"github.com/containerd/containerd/v2/pkg/shim"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// Run runs the shim binary: containerd's shim.RunShim with snapview's
// manager, under both generations of containerd's start protocol.
//
// containerd 2.3 and later start a shim with a bootstrap message
// (containerd.runtime.bootstrap.v1.BootstrapParams) on stdin and read a
// BootstrapResult from stdout. containerd 2.2 and earlier pass the runtime
// options on stdin, the addresses as flags and environment, and read a JSON
// answer. containerd's shim library, which snapview is built on, speaks only
// the new protocol, so for an older daemon Run translates: it builds the
// bootstrap message from what that daemon passed, and answers in JSON. Every
// other action (the server itself, delete, -info) is the same under both.
func Run(ctx context.Context, m shim.Shim) {
	if ok, log := asOCIRuntime(os.Args[1:]); ok {
		refuseAsRuntime(log)
	}
	answer, err := adaptLegacyStart(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %s", m.Name(), err)
		os.Exit(1)
	}
	shim.RunShim(ctx, m)
	if answer != nil {
		if err := answer(); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %s", m.Name(), err)
			os.Exit(1)
		}
	}
}

// legacyFlags are the flags containerd passes a shim binary; they are read
// here only to recognise an old-protocol start, shim.RunShim parses them again.
type legacyFlags struct {
	namespace, id, address string
	debug                  bool
	action                 string
}

func parseLegacyFlags(args []string) (legacyFlags, bool) {
	var f legacyFlags
	fs := flag.NewFlagSet("shim", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.BoolVar(&f.debug, "debug", false, "")
	fs.Bool("v", false, "")
	fs.Bool("version", false, "")
	fs.Bool("info", false, "")
	fs.StringVar(&f.namespace, "namespace", "", "")
	fs.StringVar(&f.id, "id", "", "")
	fs.String("socket", "", "")
	fs.String("debug-socket", "", "")
	fs.String("bundle", "", "")
	fs.StringVar(&f.address, "address", "", "")
	fs.String("publish-binary", "", "")
	if err := fs.Parse(args); err != nil {
		// Let shim.RunShim report it.
		return f, false
	}
	f.action = fs.Arg(0)
	return f, true
}

// adaptLegacyStart prepares an old-protocol start for shim.RunShim: stdin
// is replaced by the bootstrap message built from what the daemon passed,
// stdout by a pipe, and the returned answer turns the BootstrapResult
// written there into the JSON answer the daemon expects. For anything else
// it returns nil: another action leaves stdin alone, and a start by a 2.3+
// daemon, whose stdin had to be read to tell, gets the same bytes back on it.
func adaptLegacyStart(args []string) (answer func() error, _ error) {
	f, ok := parseLegacyFlags(args)
	if !ok || f.action != "start" {
		return nil, nil
	}
	input, err := io.ReadAll(io.LimitReader(os.Stdin, 10<<20))
	if err != nil {
		return nil, fmt.Errorf("snapview: read stdin of start: %w", err)
	}
	if isBootstrap(input, f.id, f.namespace) {
		return nil, replaceStdin(input)
	}
	msg, err := proto.Marshal(legacyBootstrap(f, os.Getenv("TTRPC_ADDRESS"), input))
	if err != nil {
		return nil, fmt.Errorf("snapview: marshal bootstrap message: %w", err)
	}
	if err := replaceStdin(msg); err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("snapview: pipe start's answer: %w", err)
	}
	stdout := os.Stdout
	os.Stdout = w
	var out bytes.Buffer
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(&out, r)
		r.Close()
		copied <- err
	}()
	return func() error {
		os.Stdout = stdout
		w.Close()
		if err := <-copied; err != nil {
			return fmt.Errorf("snapview: read start's answer: %w", err)
		}
		data, err := legacyAnswer(out.Bytes())
		if err != nil {
			return err
		}
		_, err = stdout.Write(data)
		return err
	}, nil
}

// isBootstrap reports whether input is a bootstrap message for shim id in
// namespace ns. Old-protocol runtime options can decode as one too, so, as
// containerd's shim library does, it counts only if it names this shim.
func isBootstrap(input []byte, id, ns string) bool {
	var p bootapi.BootstrapParams
	if len(input) == 0 || proto.Unmarshal(input, &p) != nil {
		return false
	}
	return p.GetInstanceID() == id && p.GetNamespace() == ns
}

// legacyBootstrap builds the bootstrap message of an old-protocol start:
// identity and addresses from the flags and $TTRPC_ADDRESS, the runtime
// options (marshalled google.protobuf.Any, or nothing) as its extension.
// Options that do not decode are left out, as runc's own manager did with
// options it could not read: the shim starts without them, and Create
// reports the error.
func legacyBootstrap(f legacyFlags, ttrpcAddress string, options []byte) *bootapi.BootstrapParams {
	p := &bootapi.BootstrapParams{
		InstanceID:             f.id,
		Namespace:              f.namespace,
		ContainerdGrpcAddress:  f.address,
		ContainerdTtrpcAddress: ttrpcAddress,
		LogLevel:               bootapi.LogLevel_LOG_LEVEL_INFO,
	}
	if f.debug {
		p.LogLevel = bootapi.LogLevel_LOG_LEVEL_DEBUG
	}
	a := &anypb.Any{}
	if len(options) > 0 && proto.Unmarshal(options, a) == nil {
		p.Extensions = append(p.Extensions, &bootapi.Extension{Value: a})
	}
	return p
}

// legacyAnswer turns a marshalled BootstrapResult into the JSON answer of
// the old protocol ({"version":…,"address":…,"protocol":…}).
func legacyAnswer(data []byte) ([]byte, error) {
	var res bootapi.BootstrapResult
	if err := proto.Unmarshal(data, &res); err != nil {
		return nil, fmt.Errorf("snapview: decode start's answer: %w", err)
	}
	if res.GetAddress() == "" {
		return nil, errors.New("snapview: start answered no address")
	}
	return json.Marshal(legacyResult{Version: int(res.GetVersion()), Address: res.GetAddress(), Protocol: res.GetProtocol()})
}

// legacyResult is the old protocol's answer to start, as containerd 2.2
// decodes it (pkg/shim BootstrapParams there).
type legacyResult struct {
	Version  int    `json:"version"`
	Address  string `json:"address"`
	Protocol string `json:"protocol"`
}

// replaceStdin makes os.Stdin read data.
func replaceStdin(data []byte) error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("snapview: pipe stdin of start: %w", err)
	}
	go func() {
		_, _ = w.Write(data)
		w.Close()
	}()
	os.Stdin = r
	return nil
}
