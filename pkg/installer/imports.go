package installer

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// mainConfig is what install needs of containerd's main configuration.
type mainConfig struct {
	version int
	list    []string
}

func readMain(data []byte) (*mainConfig, error) {
	var c struct {
		Version int      `toml:"version"`
		Imports []string `toml:"imports"`
	}
	if err := toml.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	return &mainConfig{version: c.Version, list: c.Imports}, nil
}

// imports reports whether the configuration at mainPath imports dropIn,
// by name or by a glob, resolved as containerd resolves them.
func (c *mainConfig) imports(dropIn, mainPath string) bool {
	for _, p := range c.list {
		p = filepath.Clean(p)
		if !filepath.IsAbs(p) {
			p = filepath.Join(filepath.Dir(mainPath), p)
		}
		if p == dropIn {
			return true
		}
		if ok, err := filepath.Match(p, dropIn); err == nil && ok {
			return true
		}
	}
	return false
}

// topLevel finds, with the TOML parser, the top-level "imports" key-value
// (its key's offset and its string elements' ranges) and the offset of the
// first table header's line.
type topLevel struct {
	importsKey  int // -1 without an imports key
	elements    []unstable.Range
	firstHeader int // len(data) without a table
}

func scan(data []byte) (*topLevel, error) {
	t := &topLevel{importsKey: -1, firstHeader: len(data)}
	var p unstable.Parser
	p.Reset(data)
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			key := e.Key()
			key.Next()
			off := int(key.Node().Raw.Offset)
			t.firstHeader = bytes.LastIndexByte(data[:off], '\n') + 1
			return t, p.Error()
		case unstable.KeyValue:
			key := e.Key()
			key.Next()
			first := key.Node()
			if string(first.Data) != "imports" || key.Next() {
				continue // another key, or a dotted one
			}
			t.importsKey = int(first.Raw.Offset)
			value := e.Value()
			if value.Kind != unstable.Array {
				return nil, errors.New("imports is not an array")
			}
			for it := value.Children(); it.Next(); {
				if n := it.Node(); n.Kind == unstable.String {
					t.elements = append(t.elements, n.Raw)
				}
			}
		}
	}
	return t, p.Error()
}

// addImport returns data with path appended to its top-level imports,
// which it creates if missing: as a new line above the first table (and
// above the comments that belong to it). It checks by decoding both that
// nothing else changed.
func addImport(data []byte, path string) ([]byte, error) {
	t, err := scan(data)
	if err != nil {
		return nil, err
	}
	entry := fmt.Sprintf("%q", path)
	var out []byte
	switch {
	case t.importsKey >= 0 && len(t.elements) > 0:
		last := t.elements[len(t.elements)-1]
		at := int(last.Offset + last.Length)
		out = splice(data, at, ", "+entry)
	case t.importsKey >= 0:
		open := bytes.IndexByte(data[t.importsKey:], '[')
		if open < 0 {
			return nil, errors.New("cannot find the imports array")
		}
		out = splice(data, t.importsKey+open+1, entry)
	default:
		at := aboveComments(data, t.firstHeader)
		line := importsLine(path)
		if at > 0 && data[at-1] != '\n' {
			line = "\n" + line
		}
		out = splice(data, at, line)
	}
	if err := sameBut(data, out, path, true); err != nil {
		return nil, err
	}
	return out, nil
}

// removeImport returns data without path in its imports, and whether it
// was there. A line install added is removed whole.
func removeImport(data []byte, path string) ([]byte, bool, error) {
	t, err := scan(data)
	if err != nil {
		return nil, false, err
	}
	entry := fmt.Sprintf("%q", path)
	var out []byte
	for i, el := range t.elements {
		start, end := int(el.Offset), int(el.Offset+el.Length)
		if string(data[start:end]) != entry {
			continue
		}
		if line := importsLine(path); len(t.elements) == 1 && bytes.HasPrefix(data[lineStart(data, t.importsKey):], []byte(line)) {
			s := lineStart(data, t.importsKey)
			out = slices.Concat(data[:s], data[s+len(line):])
			break
		}
		if i > 0 { // take the separator before it
			prev := t.elements[i-1]
			start = int(prev.Offset + prev.Length)
		} else if len(t.elements) > 1 { // or the one after it
			end = int(t.elements[1].Offset)
		}
		out = slices.Concat(data[:start], data[end:])
		break
	}
	if out == nil {
		return data, false, nil
	}
	if err := sameBut(data, out, path, false); err != nil {
		return nil, false, err
	}
	return out, true, nil
}

func importsLine(path string) string { return fmt.Sprintf("imports = [%q]\n", path) }

func splice(data []byte, at int, s string) []byte {
	return slices.Concat(data[:at], []byte(s), data[at:])
}

func lineStart(data []byte, off int) int { return bytes.LastIndexByte(data[:off], '\n') + 1 }

// aboveComments moves a line offset up over the comment lines directly
// above it, so that an inserted line does not separate a table from the
// comment that describes it.
func aboveComments(data []byte, at int) int {
	for at > 0 {
		prev := lineStart(data, at-1)
		if !strings.HasPrefix(strings.TrimSpace(string(data[prev:at])), "#") {
			break
		}
		at = prev
	}
	return at
}

// sameBut checks that after decodes to the same configuration as before,
// but for path added to (or removed from) the top-level imports.
func sameBut(before, after []byte, path string, added bool) error {
	var b, a map[string]any
	if err := toml.Unmarshal(before, &b); err != nil {
		return err
	}
	if err := toml.Unmarshal(after, &a); err != nil {
		return fmt.Errorf("the edited file does not parse: %w", err)
	}
	want := slices.Clone(asStrings(b["imports"]))
	if added {
		want = append(want, path)
	} else {
		want = slices.DeleteFunc(want, func(s string) bool { return s == path })
	}
	if got := asStrings(a["imports"]); !slices.Equal(got, want) {
		return fmt.Errorf("the edited imports are %v, want %v", got, want)
	}
	delete(a, "imports")
	delete(b, "imports")
	if !reflect.DeepEqual(a, b) {
		return errors.New("the edit would change more than the imports")
	}
	return nil
}

func asStrings(v any) []string {
	list, _ := v.([]any)
	out := make([]string, 0, len(list))
	for _, x := range list {
		s, _ := x.(string)
		out = append(out, s)
	}
	return out
}
