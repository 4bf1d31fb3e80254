package bundle

import (
	"encoding/json"
	"fmt"
	"maps"
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
	// Devices are appended to linux.devices.
	Devices []specs.LinuxDevice
	// DeviceRules are appended to linux.resources.devices, after the rules
	// already there (CRI starts them with deny-all).
	DeviceRules []specs.LinuxDeviceCgroup
}

// AddDisk adds block device major:minor at path inside the container, owned
// by uid:gid, with the cgroup rule that lets the container open it:
// read-write (mode 0660, rule rw), or read-only (0440, rule r).
func (p *ConfigPatch) AddDisk(path string, major, minor uint32, readOnly bool, uid, gid uint32) {
	mode, access := os.FileMode(0o660), "rw"
	if readOnly {
		mode, access = 0o440, "r"
	}
	maj, mnr := int64(major), int64(minor)
	p.Devices = append(p.Devices, specs.LinuxDevice{Path: path, Type: "b", Major: maj, Minor: mnr, FileMode: &mode, UID: &uid, GID: &gid})
	p.DeviceRules = append(p.DeviceRules, specs.LinuxDeviceCgroup{Allow: true, Type: "b", Major: &maj, Minor: &mnr, Access: access})
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
	// UID and GID are the container process's user.
	UID, GID uint32
	// UserNamespace reports whether the spec asks for a user namespace.
	UserNamespace bool
	// RootPath is the spec's root.path, made absolute against the bundle.
	RootPath string
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
	if raw, ok := c.fields["process"]; ok {
		var p struct {
			User struct {
				UID uint32 `json:"uid"`
				GID uint32 `json:"gid"`
			} `json:"user"`
		}
		if err := json.Unmarshal(raw, &p); err != nil {
			return nil, fmt.Errorf("snapview: decode process of %s: %w", path, err)
		}
		c.UID, c.GID = p.User.UID, p.User.GID
	}
	if raw, ok := c.fields["root"]; ok {
		var r struct {
			Path string `json:"path"`
		}
		if err := json.Unmarshal(raw, &r); err != nil {
			return nil, fmt.Errorf("snapview: decode root of %s: %w", path, err)
		}
		c.RootPath = r.Path
		if r.Path != "" && !filepath.IsAbs(r.Path) {
			c.RootPath = filepath.Join(bundle, r.Path)
		}
	}
	if raw, ok := c.fields["linux"]; ok {
		var l struct {
			Namespaces []specs.LinuxNamespace `json:"namespaces"`
		}
		if err := json.Unmarshal(raw, &l); err != nil {
			return nil, fmt.Errorf("snapview: decode linux of %s: %w", path, err)
		}
		for _, n := range l.Namespaces {
			if n.Type == specs.UserNamespace {
				c.UserNamespace = true
			}
		}
	}
	return c, nil
}

// Apply writes config.json with p applied, atomically, keeping its mode.
// Restore puts the original back.
func (c *Config) Apply(p ConfigPatch) error {
	fields := make(map[string]json.RawMessage, len(c.fields)+2)
	maps.Copy(fields, c.fields)
	if len(p.Annotations) > 0 {
		ann := make(map[string]string, len(c.Annotations)+len(p.Annotations))
		maps.Copy(ann, c.Annotations)
		maps.Copy(ann, p.Annotations)
		raw, err := json.Marshal(ann)
		if err != nil {
			return err
		}
		fields["annotations"] = raw
	}
	if err := appendTo(fields, "mounts", p.Mounts); err != nil {
		return fmt.Errorf("snapview: mounts of %s: %w", c.path, err)
	}
	if len(p.Devices) > 0 || len(p.DeviceRules) > 0 {
		linux := map[string]json.RawMessage{}
		if err := decodeField(fields, "linux", &linux); err != nil {
			return fmt.Errorf("snapview: linux of %s: %w", c.path, err)
		}
		if err := appendTo(linux, "devices", p.Devices); err != nil {
			return fmt.Errorf("snapview: linux.devices of %s: %w", c.path, err)
		}
		if len(p.DeviceRules) > 0 {
			res := map[string]json.RawMessage{}
			if err := decodeField(linux, "resources", &res); err != nil {
				return fmt.Errorf("snapview: linux.resources of %s: %w", c.path, err)
			}
			if err := appendTo(res, "devices", p.DeviceRules); err != nil {
				return fmt.Errorf("snapview: linux.resources.devices of %s: %w", c.path, err)
			}
			if err := encodeField(linux, "resources", res); err != nil {
				return err
			}
		}
		if err := encodeField(fields, "linux", linux); err != nil {
			return err
		}
	}
	data, err := json.Marshal(fields)
	if err != nil {
		return err
	}
	return c.write(data)
}

// decodeField decodes fields[key], if present and not null, into v.
func decodeField(fields map[string]json.RawMessage, key string, v any) error {
	raw, ok := fields[key]
	if !ok || string(raw) == "null" {
		return nil
	}
	return json.Unmarshal(raw, v)
}

func encodeField(fields map[string]json.RawMessage, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	fields[key] = raw
	return nil
}

// appendTo appends items to the JSON array fields[key], keeping the
// elements already there byte for byte.
func appendTo[T any](fields map[string]json.RawMessage, key string, items []T) error {
	if len(items) == 0 {
		return nil
	}
	var list []json.RawMessage
	if err := decodeField(fields, key, &list); err != nil {
		return err
	}
	for _, it := range items {
		raw, err := json.Marshal(it)
		if err != nil {
			return err
		}
		list = append(list, raw)
	}
	return encodeField(fields, key, list)
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
