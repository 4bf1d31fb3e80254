package params

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/santhosh-tekuri/jsonschema/v6"
)

const schemaFile = "../docs/params.schema.json"

// docs are documents as the shim writes them: view mode with a boot
// artifact, one-disk block mode, layered block mode with volumes.
func docs() map[string]Doc {
	return map[string]Doc{
		"view": {Version: 1, Rootfs: Rootfs{Kind: KindFS, FSType: "overlay", Source: "overlay", Options: []string{"lowerdir=/a:/b", "upperdir=/u", "workdir=/w"}},
			Artifacts: map[string]string{"kernel": "/.snapview/boot/kernel"}, ViewTarget: "/image",
			Volumes: map[string]Volume{"models": {Image: "docker.io/acme/models:v3", Target: "/models", Subpath: "/weights"}}},
		"block": {Version: 1, Rootfs: Rootfs{Kind: KindBlock, FSType: "ext4", Source: "/dev/loop3", Options: []string{"rw"}, Device: RootfsDevice},
			Artifacts: map[string]string{}},
		"layered": {Version: 1, Rootfs: Rootfs{Kind: KindLayered, FSType: "ext4", Source: "/dev/loop5", Options: []string{"rw"}, Device: RootfsDevice,
			Layers: []Disk{
				{Device: LayersDir + "/0", FSType: "erofs", Source: "/dev/loop6", Options: []string{"ro"}},
				{Device: LayersDir + "/1", FSType: "erofs", Source: "/dev/loop7", Options: []string{"ro"}, Devices: []string{LayersDir + "/2"}},
			},
			UpperDir: "/upper", WorkDir: "/work", OverlayOptions: []string{"index=off"}},
			Artifacts: map[string]string{"kernel": "/.snapview/boot/kernel"},
			Volumes: map[string]Volume{"tools": {Image: "docker.io/acme/tools:1", Target: "/opt/tools",
				Layers: []Disk{{Device: VolumesDir + "/tools/0", FSType: "erofs", Source: "/dev/loop9", Options: []string{"ro"}}}}}},
	}
}

func compileSchema(t *testing.T) *jsonschema.Schema {
	t.Helper()
	f, err := os.Open(schemaFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	doc, err := jsonschema.UnmarshalJSON(f)
	if err != nil {
		t.Fatal(err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource("params.schema.json", doc); err != nil {
		t.Fatal(err)
	}
	s, err := c.Compile("params.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestSchemaValidates checks documents as the shim writes them against the
// JSON Schema of docs/, and that the schema refuses what is not a version 1
// document.
func TestSchemaValidates(t *testing.T) {
	s := compileSchema(t)
	for name, d := range docs() {
		data, err := json.Marshal(d)
		if err != nil {
			t.Fatal(err)
		}
		v, err := jsonschema.UnmarshalJSON(bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Validate(v); err != nil {
			t.Errorf("%s: %s\n%v", name, data, err)
		}
	}
	for name, body := range map[string]string{
		"another version":      `{"version":2,"rootfs":{"kind":"fs","fstype":"overlay","source":"overlay","options":[]},"artifacts":{}}`,
		"block without device": `{"version":1,"rootfs":{"kind":"block","fstype":"ext4","source":"/dev/loop1","options":[]},"artifacts":{}}`,
		"unknown kind":         `{"version":1,"rootfs":{"kind":"vm","fstype":"x","source":"x","options":[]},"artifacts":{}}`,
		"relative target":      `{"version":1,"rootfs":{"kind":"fs","fstype":"x","source":"x","options":[]},"artifacts":{},"volumes":{"v":{"image":"x","target":"v"}}}`,
	} {
		v, err := jsonschema.UnmarshalJSON(strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Validate(v); err == nil {
			t.Errorf("%s: the schema accepts %s", name, body)
		}
	}
}

// TestSchemaMatchesTypes checks, both ways, that the schema has a property
// for every field of the Go types and no other, of the JSON type the field
// marshals to, and requires exactly the fields that are never omitted.
func TestSchemaMatchesTypes(t *testing.T) {
	raw, err := os.ReadFile(schemaFile)
	if err != nil {
		t.Fatal(err)
	}
	var schema map[string]any
	if err := json.Unmarshal(raw, &schema); err != nil {
		t.Fatal(err)
	}
	defs := schema["$defs"].(map[string]any)
	for _, c := range []struct {
		typ  reflect.Type
		node map[string]any
	}{
		{reflect.TypeFor[Doc](), schema},
		{reflect.TypeFor[Rootfs](), defs["rootfs"].(map[string]any)},
		{reflect.TypeFor[Disk](), defs["disk"].(map[string]any)},
		{reflect.TypeFor[Volume](), defs["volume"].(map[string]any)},
		{reflect.TypeFor[WritableDisk](), defs["writable"].(map[string]any)},
	} {
		props := c.node["properties"].(map[string]any)
		var fields, required []string
		for f := range c.typ.Fields() {
			name, opts, _ := strings.Cut(f.Tag.Get("json"), ",")
			fields = append(fields, name)
			if opts != "omitempty" {
				required = append(required, name)
			}
			p, ok := props[name].(map[string]any)
			if !ok {
				t.Errorf("%s.%s (json %q) is not in the schema", c.typ.Name(), f.Name, name)
				continue
			}
			if got, want := schemaType(p, defs), jsonType(f.Type); got != want {
				t.Errorf("%s.%s: the schema says %s, the Go type marshals to %s", c.typ.Name(), f.Name, got, want)
			}
		}
		for name := range props {
			if !slices.Contains(fields, name) {
				t.Errorf("the schema's %q is no field of %s", name, c.typ.Name())
			}
		}
		var schemaRequired []string
		for _, r := range c.node["required"].([]any) {
			schemaRequired = append(schemaRequired, r.(string))
		}
		sort.Strings(required)
		sort.Strings(schemaRequired)
		if !slices.Equal(required, schemaRequired) {
			t.Errorf("%s: the schema requires %v, the Go type always writes %v", c.typ.Name(), schemaRequired, required)
		}
	}
}

// schemaType is the JSON type a property allows: its type, or its $ref's,
// or "integer" for a numeric const.
func schemaType(p, defs map[string]any) string {
	if ref, ok := p["$ref"].(string); ok {
		def := defs[strings.TrimPrefix(ref, "#/$defs/")].(map[string]any)
		if typ, ok := def["type"].(string); ok {
			return typ
		}
		return "?"
	}
	if typ, ok := p["type"].(string); ok {
		return typ
	}
	if _, ok := p["const"].(float64); ok {
		return "integer"
	}
	if e, ok := p["enum"].([]any); ok && len(e) > 0 {
		if _, ok := e[0].(string); ok {
			return "string"
		}
	}
	return "?"
}

func jsonType(t reflect.Type) string {
	switch t.Kind() {
	case reflect.String:
		return "string"
	case reflect.Int:
		return "integer"
	case reflect.Slice:
		return "array"
	case reflect.Map, reflect.Struct:
		return "object"
	case reflect.Pointer:
		return jsonType(t.Elem())
	}
	return "?"
}

func TestParse(t *testing.T) {
	for name, d := range docs() {
		data, _ := json.Marshal(d)
		got, err := Parse(data)
		if err != nil || !reflect.DeepEqual(*got, d) {
			t.Errorf("%s: round trip %+v %v", name, got, err)
		}
	}
	got, err := Parse([]byte(`{"rootfs":{"kind":"fs","fstype":"overlay","source":"overlay","options":[]},"artifacts":{"k":"/k"},"from_the_future":{"x":1}}`))
	if err != nil || got.Version != 1 || got.Artifacts["k"] != "/k" {
		t.Fatalf("a document of the release before versions, with a field added: %+v %v", got, err)
	}
	for body, want := range map[string]string{
		`{"version":2,"rootfs":{"kind":"fs"}}`: "version 2, but this reader knows version 1",
		`{"version":0,"rootfs":{"kind":"fs"}}`: "version 0 is not a version",
		`{"version":1,"rootfs":{"kind":"vm"}}`: `rootfs kind "vm"`,
		`{"version":"1"}`:                      "cannot unmarshal",
		`not json`:                             "invalid character",
	} {
		if _, err := Parse([]byte(body)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", body, err, want)
		}
	}
}

func TestFromSpec(t *testing.T) {
	d := docs()["layered"]
	whole, _ := json.Marshal(d)
	got, err := FromSpec(&specs.Spec{Annotations: map[string]string{DocAnnotation: string(whole)}})
	if err != nil || !reflect.DeepEqual(*got, d) {
		t.Fatalf("from the params annotation: %+v %v", got, err)
	}
	// A spec of the release before the params annotation.
	rootfs, _ := json.Marshal(d.Rootfs)
	vols, _ := json.Marshal(d.Volumes)
	got, err = FromSpec(&specs.Spec{Annotations: map[string]string{RootfsParams: string(rootfs), BoundPrefix + "kernel": "/.snapview/boot/kernel", Volumes: string(vols)}})
	if err != nil || !reflect.DeepEqual(got.Rootfs, d.Rootfs) || got.Artifacts["kernel"] != "/.snapview/boot/kernel" || !reflect.DeepEqual(got.Volumes, d.Volumes) {
		t.Fatalf("from the separate annotations: %+v %v", got, err)
	}
	if _, err := FromSpec(&specs.Spec{Annotations: map[string]string{"org.example": "x"}}); !errors.Is(err, ErrNoParams) {
		t.Fatalf("a spec without snapview's annotations: %v", err)
	}
}
