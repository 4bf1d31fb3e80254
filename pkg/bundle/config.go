package bundle

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// ConfigFile is the OCI runtime configuration in the bundle.
const ConfigFile = "config.json"

// ConfigPatch is what snapview adds to config.json.
type ConfigPatch struct {
	// Annotations are set (replacing any earlier value of the same key).
	Annotations map[string]string
	// Mounts are appended to the spec's mounts.
	Mounts []specs.Mount
}

// Config is a bundle's config.json, decoded only as far as snapview needs:
// every other field is kept byte for byte, so a spec written by a newer
// containerd loses nothing it does not know.
type Config struct {
	path   string
	orig   []byte
	fields map[string]json.RawMessage
	// Annotations are the spec's annotations.
	Annotations map[string]string
}

// ReadConfig reads the bundle's config.json.
func ReadConfig(bundle string) (*Config, error) {
	path := filepath.Join(bundle, ConfigFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("snapview: read %s: %w", path, err)
	}
	c := &Config{path: path, orig: data}
	if err := json.Unmarshal(data, &c.fields); err != nil {
		return nil, fmt.Errorf("snapview: decode %s: %w", path, err)
	}
	if raw, ok := c.fields["annotations"]; ok {
		if err := json.Unmarshal(raw, &c.Annotations); err != nil {
			return nil, fmt.Errorf("snapview: decode annotations of %s: %w", path, err)
		}
	}
	return c, nil
}

// Apply writes config.json with p applied, atomically, keeping its mode.
// Restore puts the original back.
func (c *Config) Apply(p ConfigPatch) error {
	fields := make(map[string]json.RawMessage, len(c.fields)+2)
	for k, v := range c.fields {
		fields[k] = v
	}
	if len(p.Annotations) > 0 {
		ann := make(map[string]string, len(c.Annotations)+len(p.Annotations))
		for k, v := range c.Annotations {
			ann[k] = v
		}
		for k, v := range p.Annotations {
			ann[k] = v
		}
		raw, err := json.Marshal(ann)
		if err != nil {
			return err
		}
		fields["annotations"] = raw
	}
	if len(p.Mounts) > 0 {
		var mounts []json.RawMessage
		if raw, ok := fields["mounts"]; ok {
			if err := json.Unmarshal(raw, &mounts); err != nil {
				return fmt.Errorf("snapview: decode mounts of %s: %w", c.path, err)
			}
		}
		for _, m := range p.Mounts {
			raw, err := json.Marshal(m)
			if err != nil {
				return err
			}
			mounts = append(mounts, raw)
		}
		raw, err := json.Marshal(mounts)
		if err != nil {
			return err
		}
		fields["mounts"] = raw
	}
	data, err := json.Marshal(fields)
	if err != nil {
		return err
	}
	return c.write(data)
}

// Restore writes back config.json as it was read.
func (c *Config) Restore() error {
	return c.write(c.orig)
}

func (c *Config) write(data []byte) error {
	mode := os.FileMode(0o644)
	if fi, err := os.Stat(c.path); err == nil {
		mode = fi.Mode().Perm()
	}
	if err := writeAtomic(c.path, data, mode); err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	return nil
}
