// Package image reads what a container needs of an image from containerd's
// content store: the manifest for this platform, its config, and the chain
// id of its layers, which names the image's top snapshot in a snapshotter.
// It changes nothing.
package image

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Resolved is an image as a container of this platform sees it.
type Resolved struct {
	// Manifest is the descriptor of the image's manifest for this platform
	// (the target itself, or the one an index names for it).
	Manifest ocispec.Descriptor
	// Parsed is that manifest.
	Parsed ocispec.Manifest
	// Config is the image's config, and ConfigDesc its descriptor.
	Config     ocispec.Image
	ConfigDesc ocispec.Descriptor
	// ChainID names the image's top snapshot: the chain id of its layers'
	// diff ids ("" for an image without layers).
	ChainID string
}

// maxIndexDepth bounds nested indexes.
const maxIndexDepth = 4

// Resolve reads the image whose target is target for platform (nil: this
// machine's) from cs. An error wraps errdefs.ErrNotFound when a blob it
// needs is not in the content store, and says which.
func Resolve(ctx context.Context, cs content.Provider, target ocispec.Descriptor, platform platforms.MatchComparer) (Resolved, error) {
	if platform == nil {
		platform = platforms.Default()
	}
	desc := target
	for depth := 0; images.IsIndexType(desc.MediaType); depth++ {
		if depth == maxIndexDepth {
			return Resolved{}, fmt.Errorf("index %s: indexes nested more than %d deep", target.Digest, maxIndexDepth)
		}
		var idx ocispec.Index
		if err := readJSON(ctx, cs, desc, &idx); err != nil {
			return Resolved{}, fmt.Errorf("read index %s: %w", desc.Digest, err)
		}
		var found *ocispec.Descriptor
		for i, m := range idx.Manifests {
			if m.Platform != nil && !platform.Match(*m.Platform) {
				continue
			}
			if !images.IsManifestType(m.MediaType) && !images.IsIndexType(m.MediaType) {
				continue
			}
			if found == nil || m.Platform != nil && found.Platform != nil && platform.Less(*m.Platform, *found.Platform) {
				found = &idx.Manifests[i]
			}
		}
		if found == nil {
			return Resolved{}, fmt.Errorf("no manifest for this platform (%s) in index %s: %w", platforms.DefaultString(), desc.Digest, errdefs.ErrNotFound)
		}
		desc = *found
	}
	if !images.IsManifestType(desc.MediaType) {
		return Resolved{}, fmt.Errorf("%s is a %s, not an image manifest", desc.Digest, desc.MediaType)
	}
	r := Resolved{Manifest: desc}
	if err := readJSON(ctx, cs, desc, &r.Parsed); err != nil {
		return Resolved{}, fmt.Errorf("read manifest %s: %w", desc.Digest, err)
	}
	r.ConfigDesc = r.Parsed.Config
	if err := readJSON(ctx, cs, r.ConfigDesc, &r.Config); err != nil {
		return Resolved{}, fmt.Errorf("read config %s: %w", r.ConfigDesc.Digest, err)
	}
	if len(r.Config.RootFS.DiffIDs) > 0 {
		r.ChainID = identity.ChainID(r.Config.RootFS.DiffIDs).String()
	}
	return r, nil
}

// maxJSON bounds a manifest, index or config read into memory.
const maxJSON = 4 << 20

func readJSON(ctx context.Context, cs content.Provider, desc ocispec.Descriptor, v any) error {
	if desc.Size > maxJSON {
		return fmt.Errorf("%s is %d bytes, more than the %d a manifest or config may have", desc.Digest, desc.Size, maxJSON)
	}
	b, err := content.ReadBlob(ctx, cs, desc)
	if err != nil {
		return err
	}
	if digest.FromBytes(b) != desc.Digest {
		return errors.New("content does not match its digest")
	}
	return json.Unmarshal(b, v)
}
