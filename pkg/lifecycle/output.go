package lifecycle

import (
	"encoding/json"
	"fmt"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
	"github.com/snapview/snapview/pkg/rootfs"
)

// configPatch is what Setup adds to config.json: the annotations for every
// container with a view, the binds it asked for, and in block mode each
// disk with the cgroup rule that lets the container open it: read-write
// for the writable disk, read-only for a layer.
func (p *Plan) configPatch(st *bundle.State, binds []specs.Mount, cfg *config.Config, volumes map[string]volumeDoc) (bundle.ConfigPatch, error) {
	params, err := json.Marshal(st.Rootfs)
	if err != nil {
		return bundle.ConfigPatch{}, err
	}
	patch := bundle.ConfigPatch{
		Annotations: map[string]string{
			annotations.ViewSnapshotter: st.Snapshotter,
			annotations.ViewKey:         st.ViewKey,
			annotations.ViewLease:       st.LeaseID,
			annotations.ViewMountpoint:  st.Mountpoint,
			annotations.RootfsParams:    string(params),
		},
		Mounts: binds,
	}
	for _, a := range st.Artifacts {
		patch.Annotations[annotations.BoundPrefix+a.Name] = a.Target
	}
	if volumes != nil {
		doc, err := json.Marshal(volumes)
		if err != nil {
			return bundle.ConfigPatch{}, err
		}
		patch.Annotations[annotations.Volumes] = string(doc)
	}
	if b := st.Block; b != nil {
		patch.AddDisk(cfg.Block.Device, b.Major, b.Minor, false, p.spec.UID, p.spec.GID)
		for _, d := range b.Layers {
			patch.AddDisk(d.Path, d.Major, d.Minor, true, p.spec.UID, p.spec.GID)
		}
	}
	for _, v := range st.Volumes {
		for _, d := range v.Disks {
			patch.AddDisk(d.Path, d.Major, d.Minor, true, p.spec.UID, p.spec.GID)
		}
	}
	return patch, nil
}

// paramsDoc is the content of /.snapview/params.json.
type paramsDoc struct {
	Rootfs     rootfs.Params        `json:"rootfs"`
	Artifacts  map[string]string    `json:"artifacts"`
	ViewTarget string               `json:"view_target,omitempty"`
	Volumes    map[string]volumeDoc `json:"volumes,omitempty"`
}

// writeParams writes the params file bound read-only into the container.
func writeParams(path string, st *bundle.State, viewTarget string, volumes map[string]volumeDoc) error {
	doc := paramsDoc{Rootfs: st.Rootfs, Artifacts: map[string]string{}, ViewTarget: viewTarget, Volumes: volumes}
	for _, a := range st.Artifacts {
		doc.Artifacts[a.Name] = a.Target
	}
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	if err := bundle.WriteFile(path, append(data, '\n'), 0o444); err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	return nil
}
