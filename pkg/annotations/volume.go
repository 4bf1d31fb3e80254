package annotations

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"path"
	"slices"
	"strings"

	"github.com/snapview/snapview/params"
	"github.com/snapview/snapview/pkg/snapshot/record"

	"github.com/distribution/reference"
)

// VolumePrefix starts the annotation of a volume: io.snapview.volume.<name>.
const VolumePrefix = params.VolumePrefix

// MaxVolumes is the most volumes one container may ask for.
const MaxVolumes = 16

// Volume is a volume a container asks for, by io.snapview.volume.<name> =
// {"image":"<reference>","target":"<path>"} (a read-only view of another
// image) or {"snapshot":"<id>","target":"<path>"} (a directory snapshot),
// with an optional "subpath" and, for a snapshot, "writable": true (a
// writable clone of it, discarded with the container).
type Volume struct {
	// Name is the <name> of the annotation.
	Name string
	// Image is the image reference as written; Ref is it normalised (a
	// short name gains docker.io/library/ and :latest), the name
	// containerd's image store knows it by. Both empty for a snapshot.
	Image, Ref string
	// Snapshot is the id of a directory snapshot, in the canonical form
	// snapview printed ("" for an image).
	Snapshot string
	// Writable asks for a writable clone of the snapshot.
	Writable bool
	// Target is where the volume is bound inside the container.
	Target string
	// Subpath is the directory of the volume bound there, an absolute
	// clean path inside the volume ("/" for the whole volume).
	Subpath string
}

// volumeFields are the fields of a volume's JSON object, and whether each
// is a boolean (else a string).
var volumeFields = map[string]bool{"image": false, "snapshot": false, "target": false, "subpath": false, "writable": true}

const volumeForm = `{"image":"<reference>","target":"<path>"} or {"snapshot":"<id>","target":"<path>"}, optional "subpath", and "writable":true for a snapshot`

// parseVolume decodes the value of annotation io.snapview.volume.<name>
// strictly: one JSON object with a string "target", exactly one of a string
// "image" and a string "snapshot", an optional string "subpath" and, with a
// snapshot, an optional boolean "writable", and nothing else (no unknown or
// repeated field, no other type, no trailing data).
func parseVolume(name, value string) (Volume, error) {
	v := Volume{Name: name, Subpath: "/"}
	fields, err := decodeObject(value)
	if err != nil {
		return v, err
	}
	_, hasImage := fields["image"]
	_, hasSnapshot := fields["snapshot"]
	switch {
	case hasImage && hasSnapshot:
		return v, fmt.Errorf(`both "image" and "snapshot": a volume is one or the other (want %s)`, volumeForm)
	case !hasImage && !hasSnapshot:
		return v, fmt.Errorf(`no "image" or "snapshot" field (want %s)`, volumeForm)
	}
	if _, ok := fields["target"]; !ok {
		return v, fmt.Errorf(`no "target" field (want %s)`, volumeForm)
	}
	v.Target = fields["target"].(string)
	if hasImage {
		v.Image = fields["image"].(string)
		if v.Image == "" {
			return v, errors.New(`"image" is empty`)
		}
		ref, err := reference.ParseDockerRef(v.Image)
		if err != nil {
			return v, fmt.Errorf("image %q is not an image reference: %w", v.Image, err)
		}
		v.Ref = ref.String()
		if _, ok := fields["writable"]; ok {
			return v, errors.New(`"writable" applies to a snapshot, not an image: an image volume is read-only`)
		}
	} else {
		if v.Snapshot, err = record.ParseID(fields["snapshot"].(string)); err != nil {
			return v, err
		}
		if w, ok := fields["writable"]; ok {
			v.Writable = w.(bool)
		}
	}
	if err := checkTarget(v.Target); err != nil {
		return v, fmt.Errorf("target %q: %w", v.Target, err)
	}
	if sp, ok := fields["subpath"]; ok {
		if v.Subpath, err = subpath(sp.(string)); err != nil {
			return v, fmt.Errorf("subpath %q: %w", sp, err)
		}
	}
	return v, nil
}

// decodeObject decodes a JSON object whose every value is of its field's
// type in volumeFields (a string, or a boolean), with no other field and
// none twice.
func decodeObject(value string) (map[string]any, error) {
	dec := json.NewDecoder(strings.NewReader(value))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, errors.New("not a JSON object")
	}
	fields := map[string]any{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("malformed JSON: %w", err)
		}
		key, _ := tok.(string)
		isBool, known := volumeFields[key]
		if !known {
			return nil, fmt.Errorf("unknown field %q (known: %s)", key, strings.Join(slices.Sorted(maps.Keys(volumeFields)), ", "))
		}
		if _, dup := fields[key]; dup {
			return nil, fmt.Errorf("field %q given twice", key)
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, fmt.Errorf("malformed JSON: %w", err)
		}
		raw = bytes.TrimSpace(raw)
		if isBool {
			var b bool
			if (string(raw) != "true" && string(raw) != "false") || json.Unmarshal(raw, &b) != nil {
				return nil, fmt.Errorf("field %q is not true or false", key)
			}
			fields[key] = b
			continue
		}
		var s string
		if !bytes.HasPrefix(raw, []byte(`"`)) || json.Unmarshal(raw, &s) != nil {
			return nil, fmt.Errorf("field %q is not a string", key)
		}
		fields[key] = s
	}
	if _, err := dec.Token(); err != nil {
		return nil, fmt.Errorf("malformed JSON: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("trailing data after the JSON object")
	}
	return fields, nil
}

// subpath checks a volume's subpath, relative (as Kubernetes' subPath) or
// absolute, and returns it absolute: clean, without "..", no NUL.
func subpath(p string) (string, error) {
	if p == "" {
		return "", errors.New("empty path")
	}
	abs := p
	if !strings.HasPrefix(abs, "/") {
		abs = "/" + abs
	}
	if abs == "/" {
		return abs, nil
	}
	if err := checkPath(abs); err != nil {
		return "", err
	}
	return path.Clean(abs), nil
}
