package record

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/google/uuid"
)

func TestParseID(t *testing.T) {
	id, err := NewID()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ParseID(id); err != nil || got != id {
		t.Fatalf("ParseID(%q) = %q, %v", id, got, err)
	}
	for _, bad := range []string{
		"", "x", strings.ToUpper(id), "{" + id + "}", "urn:uuid:" + id, strings.ReplaceAll(id, "-", ""),
		id + " ", " " + id, id + "\n", "../" + id,
		"6ba7b810-9dad-11d1-80b4-00c04fd430c8",    // version 1
		"00000000-0000-0000-0000-000000000000",    // nil
		id[:14] + "4" + id[15:19] + "c" + id[20:], // variant not RFC 4122
	} {
		if bad == id {
			continue
		}
		if _, err := ParseID(bad); !errors.Is(err, ErrBadID) {
			t.Errorf("ParseID(%q) = %v, want ErrBadID", bad, err)
		}
	}
}

// FuzzParseID checks that an id is accepted only in the one canonical form
// it has, and that an accepted id names exactly one image record.
func FuzzParseID(f *testing.F) {
	for _, s := range []string{"2f1c0a3e-5b7d-4e8a-9f00-1a2b3c4d5e6f", "2F1C0A3E-5B7D-4E8A-9F00-1A2B3C4D5E6F", "", "../x", "2f1c0a3e5b7d4e8a9f001a2b3c4d5e6f"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ParseID(s)
		if err != nil {
			return
		}
		u, perr := uuid.Parse(s)
		if id != s || perr != nil || u.String() != s || u.Version() != 4 || strings.ContainsAny(s, "/: \n") {
			t.Fatalf("accepted %q as %q", s, id)
		}
		if ImageName(id) != "localhost/snapview/snapshot:"+s {
			t.Fatalf("image name %q", ImageName(id))
		}
	})
}

func TestFromImage(t *testing.T) {
	id, _ := NewID()
	created := time.Date(2026, 12, 2, 12, 0, 0, 123, time.UTC)
	r := Record{ID: id, Kind: KindContainer, Form: FormImage, Source: "c1", Base: "sha256:" + strings.Repeat("a", 64), Snapshotter: "overlayfs", Created: created, Name: "nightly"}
	got, err := FromImage(images.Image{Name: ImageName(id), Labels: r.Labels()})
	if err != nil || got.ID != id || !got.Created.Equal(created) || got.Name != "nightly" || got.Base != r.Base {
		t.Fatalf("FromImage: %+v %v", got, err)
	}
	for _, tc := range []struct {
		name string
		edit func(img *images.Image)
	}{
		{"another name", func(img *images.Image) { img.Name = ImageName(id) + "x" }},
		{"a record named after another id", func(img *images.Image) { other, _ := NewID(); img.Name = ImageName(other) }},
		{"unknown kind", func(img *images.Image) { img.Labels[LabelKind] = "memory" }},
		{"directory of disk form", func(img *images.Image) { img.Labels[LabelKind], img.Labels[LabelForm] = KindDirectory, FormDisk }},
		{"no base", func(img *images.Image) { delete(img.Labels, LabelBase) }},
		{"bad name", func(img *images.Image) { img.Labels[LabelName] = "../x" }},
		{"no creation time", func(img *images.Image) { delete(img.Labels, LabelCreated) }},
		{"upper-case id", func(img *images.Image) { img.Labels[LabelSnapshot] = strings.ToUpper(id) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := images.Image{Name: ImageName(id), Labels: r.Labels()}
			tc.edit(&img)
			if _, err := FromImage(img); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}
