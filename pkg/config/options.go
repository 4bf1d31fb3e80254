package config

import (
	"bytes"
	"fmt"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// FromOptions returns the configuration carried by the runtime options that
// containerd sent (CreateTaskRequest.Options, or the shim's start/info
// stdin), in any of the forms containerd uses:
//   - nothing: the default file, else the built-in defaults;
//   - runtimeoptions.Options with ConfigPath: that file;
//   - runtimeoptions.Options with ConfigBody: that TOML (CRI's inline options table);
//   - runcoptions.Options: runc's settings from it, snapview's from the default file.
func FromOptions(opts typeurl.Any) (*Config, error) {
	if opts == nil || len(opts.GetValue()) == 0 && opts.GetTypeUrl() == "" {
		return LoadDefault()
	}
	v, err := typeurl.UnmarshalAny(opts)
	if err != nil {
		return nil, fmt.Errorf("snapview: runtime options of type %q: %w", opts.GetTypeUrl(), err)
	}
	switch o := v.(type) {
	case *runtimeoptions.Options:
		return fromRuntimeOptions(o)
	case *runcoptions.Options:
		c, err := LoadDefault()
		if err != nil {
			return nil, err
		}
		c.setRunc(o)
		c.Source = "runc options + " + c.Source
		return c, nil
	default:
		return nil, fmt.Errorf("snapview: unsupported runtime options type %q: want runtimeoptions.v1.Options or runc options", opts.GetTypeUrl())
	}
}

func fromRuntimeOptions(o *runtimeoptions.Options) (*Config, error) {
	if o.ConfigPath != "" {
		return ReadFile(o.ConfigPath)
	}
	if len(bytes.TrimSpace(o.ConfigBody)) == 0 {
		return LoadDefault()
	}
	c, err := Parse(o.ConfigBody, "the runtime options table (ConfigBody)")
	if err != nil {
		return nil, err
	}
	// CRI writes ConfigBody only when ConfigPath is empty, but a body that
	// names a file still means the file.
	if c.ConfigPath != "" {
		return ReadFile(c.ConfigPath)
	}
	return c, nil
}

// IsOptions reports whether a carries runtime options in a form
// FromOptions reads: runtimeoptions.v1.Options or runc's options.
func IsOptions(a *anypb.Any) bool {
	return a.MessageIs(&runtimeoptions.Options{}) || a.MessageIs(&runcoptions.Options{})
}

// ReadOptions decodes the runtime options containerd writes on a shim's
// stdin for `start` and `-info` (a protobuf Any, possibly empty).
func ReadOptions(data []byte) (*Config, error) {
	if len(data) == 0 {
		return FromOptions(nil)
	}
	var a anypb.Any
	if err := proto.Unmarshal(data, &a); err != nil {
		return nil, fmt.Errorf("snapview: decode runtime options: %w", err)
	}
	return FromOptions(&a)
}

// RuncAny returns c's runc options marshalled for the inner runc shim, or nil
// when there are none: the only two forms runc's task service accepts.
func (c *Config) RuncAny() (*anypb.Any, error) {
	o := c.RuncOptions()
	if o == nil {
		return nil, nil
	}
	a, err := typeurl.MarshalAnyToProto(o)
	if err != nil {
		return nil, fmt.Errorf("snapview: marshal runc options: %w", err)
	}
	return a, nil
}
