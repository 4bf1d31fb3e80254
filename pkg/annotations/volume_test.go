package annotations

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// snapID is a snapshot id as snapview prints them.
const snapID = "2f1c0a3e-5b7d-4e8a-9f00-1a2b3c4d5e6f"

func TestParseVolumes(t *testing.T) {
	vol := func(name, image, ref, target, sub string) Volume {
		return Volume{Name: name, Image: image, Ref: ref, Target: target, Subpath: sub}
	}
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		want    []Volume
		wantErr []string
	}{
		{name: "two volumes", ann: map[string]string{
			"io.snapview.volume.models": `{"image":"docker.io/acme/models:v3","target":"/models"}`,
			"io.snapview.volume.tools":  `{"image":"registry.example/tools@sha256:` + strings.Repeat("a", 64) + `","target":"/opt/tools","subpath":"usr/bin"}`,
		}, want: []Volume{
			vol("models", "docker.io/acme/models:v3", "docker.io/acme/models:v3", "/models", "/"),
			vol("tools", "registry.example/tools@sha256:"+strings.Repeat("a", 64), "registry.example/tools@sha256:"+strings.Repeat("a", 64), "/opt/tools", "/usr/bin"),
		}},
		{name: "short name normalised", ann: map[string]string{"io.snapview.volume.a": `{"image":"alpine","target":"/a","subpath":"/etc"}`},
			want: []Volume{vol("a", "alpine", "docker.io/library/alpine:latest", "/a", "/etc")}},
		{name: "whitespace", ann: map[string]string{"io.snapview.volume.a": " {\n \"target\" : \"/a\" , \"image\":\"x/y:1\" }\n"},
			want: []Volume{vol("a", "x/y:1", "docker.io/x/y:1", "/a", "/")}},
		{name: "not JSON", ann: map[string]string{"io.snapview.volume.a": `image=x`}, wantErr: []string{"io.snapview.volume.a", "not a JSON object"}},
		{name: "a JSON array", ann: map[string]string{"io.snapview.volume.a": `["x"]`}, wantErr: []string{"not a JSON object"}},
		{name: "truncated", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/a"`}, wantErr: []string{"malformed JSON"}},
		{name: "trailing data", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/a"} {}`}, wantErr: []string{"trailing data"}},
		{name: "unknown field", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/a","readonly":false}`}, wantErr: []string{`unknown field "readonly"`}},
		{name: "host path field", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/a","source":"/etc"}`}, wantErr: []string{`unknown field "source"`}},
		{name: "duplicate field", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/a","image":"y"}`}, wantErr: []string{`field "image" given twice`}},
		{name: "wrong type", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":7}`}, wantErr: []string{`field "target" is not a string`}},
		{name: "object as a value", ann: map[string]string{"io.snapview.volume.a": `{"image":{"name":"x"},"target":"/a"}`}, wantErr: []string{`field "image" is not a string`}},
		{name: "null", ann: map[string]string{"io.snapview.volume.a": `{"image":null,"target":"/a"}`}, wantErr: []string{`field "image" is not a string`}},
		{name: "no image", ann: map[string]string{"io.snapview.volume.a": `{"target":"/a"}`}, wantErr: []string{`no "image" or "snapshot" field`}},
		{name: "a snapshot", ann: map[string]string{"io.snapview.volume.a": `{"snapshot":"` + snapID + `","target":"/data","subpath":"x"}`},
			want: []Volume{{Name: "a", Snapshot: snapID, Target: "/data", Subpath: "/x"}}},
		{name: "a writable snapshot", ann: map[string]string{"io.snapview.volume.a": `{"snapshot":"` + snapID + `","target":"/data","writable":true}`},
			want: []Volume{{Name: "a", Snapshot: snapID, Writable: true, Target: "/data", Subpath: "/"}}},
		{name: "writable false", ann: map[string]string{"io.snapview.volume.a": `{"snapshot":"` + snapID + `","target":"/data","writable":false}`},
			want: []Volume{{Name: "a", Snapshot: snapID, Target: "/data", Subpath: "/"}}},
		{name: "image and snapshot", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","snapshot":"` + snapID + `","target":"/a"}`}, wantErr: []string{`both "image" and "snapshot"`}},
		{name: "a writable image", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/a","writable":true}`}, wantErr: []string{`"writable" applies to a snapshot`}},
		{name: "writable as a string", ann: map[string]string{"io.snapview.volume.a": `{"snapshot":"` + snapID + `","target":"/a","writable":"true"}`}, wantErr: []string{`field "writable" is not true or false`}},
		{name: "an upper-case id", ann: map[string]string{"io.snapview.volume.a": `{"snapshot":"` + strings.ToUpper(snapID) + `","target":"/a"}`}, wantErr: []string{"not a snapshot id"}},
		{name: "a name for an id", ann: map[string]string{"io.snapview.volume.a": `{"snapshot":"nightly","target":"/a"}`}, wantErr: []string{`snapshot id "nightly"`, "not a snapshot id"}},
		{name: "a snapshot at the root", ann: map[string]string{"io.snapview.volume.a": `{"snapshot":"` + snapID + `","target":"/"}`}, wantErr: []string{"root directory"}},
		{name: "no target", ann: map[string]string{"io.snapview.volume.a": `{"image":"x"}`}, wantErr: []string{`no "target" field`}},
		{name: "bad reference", ann: map[string]string{"io.snapview.volume.a": `{"image":"Upper/Case","target":"/a"}`}, wantErr: []string{"not an image reference"}},
		{name: "relative target", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"a"}`}, wantErr: []string{`target "a"`, "absolute"}},
		{name: "target under /proc", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/proc/x"}`}, wantErr: []string{"under /proc"}},
		{name: "target dot-dot", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/a/../etc"}`}, wantErr: []string{`".."`}},
		{name: "subpath climbing out", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/a","subpath":"../../etc"}`}, wantErr: []string{"subpath", `".."`}},
		{name: "empty subpath", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/a","subpath":""}`}, wantErr: []string{"subpath", "empty"}},
		{name: "bad name", ann: map[string]string{"io.snapview.volume.A": `{"image":"x","target":"/a"}`}, wantErr: []string{"volume name", "must match"}},
		{name: "overlapping targets", ann: map[string]string{
			"io.snapview.volume.a": `{"image":"x","target":"/data"}`, "io.snapview.volume.b": `{"image":"y","target":"/data/b"}`,
		}, wantErr: []string{"overlap", "io.snapview.volume.a at /data", "io.snapview.volume.b at /data/b"}},
		{name: "the same target twice", ann: map[string]string{
			"io.snapview.volume.a": `{"image":"x","target":"/data"}`, "io.snapview.volume.b": `{"image":"y","target":"/data"}`,
		}, wantErr: []string{"overlap"}},
		{name: "over the params file", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/.snapview"}`}, wantErr: []string{"overlap", "the params file"}},
		{name: "over a boot artifact", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/.snapview/boot"}`, "io.snapview.boot.k": "/k"},
			wantErr: []string{"overlap", "io.snapview.boot.k"}},
		{name: "inside the view target", ann: map[string]string{"io.snapview.volume.a": `{"image":"x","target":"/image/a"}`, "io.snapview.view-target": "/image"},
			wantErr: []string{"overlap", "io.snapview.view-target"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.ann, defBoot)
			if tc.wantErr != nil {
				if err == nil {
					t.Fatalf("accepted: %+v", got.Volumes)
				}
				for _, w := range append([]string{"snapview: "}, tc.wantErr...) {
					if !strings.Contains(err.Error(), w) {
						t.Fatalf("error %q does not contain %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got.Volumes, tc.want) || !got.HasBinds() {
				t.Fatalf("got %+v\nwant %+v", got.Volumes, tc.want)
			}
		})
	}
}

func TestParseVolumeLimit(t *testing.T) {
	ann := map[string]string{}
	for i := range MaxVolumes {
		ann[fmt.Sprintf("io.snapview.volume.v%d", i)] = fmt.Sprintf(`{"image":"x","target":"/v%d"}`, i)
	}
	if _, err := Parse(ann, defBoot); err != nil {
		t.Fatalf("%d volumes: %v", MaxVolumes, err)
	}
	ann["io.snapview.volume.one-more"] = `{"image":"x","target":"/one-more"}`
	if _, err := Parse(ann, defBoot); err == nil || !strings.Contains(err.Error(), "17 volumes (io.snapview.volume.*): at most 16") {
		t.Fatalf("17 volumes: %v", err)
	}
}
