package annotations

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"

	"github.com/snapview/snapview/params"

	"github.com/distribution/reference"
)

// VolumePrefix starts the annotation of a volume: io.snapview.volume.<name>.
const VolumePrefix = params.VolumePrefix

// MaxVolumes is the most volumes one container may ask for.
const MaxVolumes = 16

// Volume is a volume a container asks for: a read-only view of another
// image, by io.snapview.volume.<name> =
// {"image":"<reference>","target":"<path>","subpath":"<path>"}.
type Volume struct {
	// Name is the <name> of the annotation.
	Name string
	// Image is the image reference as written; Ref is it normalised (a
	// short name gains docker.io/library/ and :latest), the name
	// containerd's image store knows it by.
	Image, Ref string
	// Target is where the volume is bound inside the container.
	Target string
	// Subpath is the directory of the volume bound there, an absolute
	// clean path inside the volume ("/" for the whole volume).
	Subpath string
}

// volumeFields are the fields of a volume's JSON object.
var volumeFields = []string{"image", "target", "subpath"}

// parseVolume decodes the value of annotation io.snapview.volume.<name>
// strictly: one JSON object with a string "image" and "target" and an
// optional string "subpath", and nothing else (no unknown or repeated
// field, no other type, no trailing data).
func parseVolume(name, value string) (Volume, error) {
	v := Volume{Name: name, Subpath: "/"}
	fields, err := decodeObject(value)
	if err != nil {
		return v, err
	}
	for _, f := range []string{"image", "target"} {
		if _, ok := fields[f]; !ok {
			return v, fmt.Errorf("no %q field (want {\"image\":\"<reference>\",\"target\":\"<path>\"}, optional \"subpath\")", f)
		}
	}
	v.Image, v.Target = fields["image"], fields["target"]
	if v.Image == "" {
		return v, errors.New(`"image" is empty`)
	}
	ref, err := reference.ParseDockerRef(v.Image)
	if err != nil {
		return v, fmt.Errorf("image %q is not an image reference: %w", v.Image, err)
	}
	v.Ref = ref.String()
	if err := checkTarget(v.Target); err != nil {
		return v, fmt.Errorf("target %q: %w", v.Target, err)
	}
	if sp, ok := fields["subpath"]; ok {
		if v.Subpath, err = subpath(sp); err != nil {
			return v, fmt.Errorf("subpath %q: %w", sp, err)
		}
	}
	return v, nil
}

// decodeObject decodes a JSON object whose every value is a string, with
// no field outside volumeFields and none twice.
func decodeObject(value string) (map[string]string, error) {
	dec := json.NewDecoder(strings.NewReader(value))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, errors.New("not a JSON object")
	}
	fields := map[string]string{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("malformed JSON: %w", err)
		}
		key, _ := tok.(string)
		if !slices.Contains(volumeFields, key) {
			return nil, fmt.Errorf("unknown field %q (known: %s)", key, strings.Join(volumeFields, ", "))
		}
		if _, dup := fields[key]; dup {
			return nil, fmt.Errorf("field %q given twice", key)
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, fmt.Errorf("malformed JSON: %w", err)
		}
		var s string
		if !bytes.HasPrefix(bytes.TrimSpace(raw), []byte(`"`)) || json.Unmarshal(raw, &s) != nil {
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
