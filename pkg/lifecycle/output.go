package lifecycle

import (
	"encoding/json"
	"fmt"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/snapview/snapview/params"
	"github.com/snapview/snapview/pkg/annotations"
	"github.com/snapview/snapview/pkg/bundle"
	"github.com/snapview/snapview/pkg/config"
)

// configPatch is what Setup adds to config.json: the annotations for every
// container with a view (the params document, and its rootfs and volumes
// alone), the binds it asked for, and in block mode each disk with the
// cgroup rule that lets the container open it: read-write for the writable
// disk, read-only for a layer or a volume's disk.
func (p *Plan) configPatch(st *bundle.State, binds []specs.Mount, cfg *config.Config, doc *params.Doc) (bundle.ConfigPatch, error) {
	whole, err := json.Marshal(doc)
	if err != nil {
		return bundle.ConfigPatch{}, err
	}
	rootfsParams, err := json.Marshal(doc.Rootfs)
	if err != nil {
		return bundle.ConfigPatch{}, err
	}
	patch := bundle.ConfigPatch{
		Annotations: map[string]string{
			annotations.ViewSnapshotter: st.Snapshotter,
			annotations.ViewKey:         st.ViewKey,
			annotations.ViewLease:       st.LeaseID,
			annotations.ViewMountpoint:  st.Mountpoint,
			annotations.ViewSource:      doc.ViewSource,
			annotations.RootfsParams:    string(rootfsParams),
			annotations.Doc:             string(whole),
		},
		Mounts: binds,
	}
	if st.Derived() {
		// No view snapshot, and no lease of its own: absent, not empty.
		// A lease is there only for the volumes' views.
		delete(patch.Annotations, annotations.ViewKey)
		if st.LeaseID == "" {
			delete(patch.Annotations, annotations.ViewLease)
		}
		if st.Snapshotter == "" {
			delete(patch.Annotations, annotations.ViewSnapshotter)
		}
	}
	for _, a := range st.Artifacts {
		patch.Annotations[annotations.BoundPrefix+a.Name] = a.Target
	}
	if doc.Volumes != nil {
		vols, err := json.Marshal(doc.Volumes)
		if err != nil {
			return bundle.ConfigPatch{}, err
		}
		patch.Annotations[annotations.Volumes] = string(vols)
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
		if d := v.WritableDisk; d != nil {
			patch.AddDisk(d.Path, d.Major, d.Minor, false, p.spec.UID, p.spec.GID)
		}
	}
	return patch, nil
}

// paramsDoc is the params document of a setup: the content of
// /.snapview/params.json, and of the io.snapview.params annotation.
func (s *setupRun) paramsDoc() *params.Doc {
	st := s.v.State
	doc := &params.Doc{Version: params.Version, Rootfs: st.Rootfs, Artifacts: map[string]string{}, ViewTarget: s.p.ann.ViewTarget, Volumes: s.volumeDocs(), ViewSource: s.viewSource()}
	for _, a := range st.Artifacts {
		doc.Artifacts[a.Name] = a.Target
	}
	return doc
}

// writeParams writes the params file bound read-only into the container.
func writeParams(path string, doc *params.Doc) error {
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	if err := bundle.WriteFile(path, append(data, '\n'), 0o444); err != nil {
		return fmt.Errorf("snapview: %w", err)
	}
	return nil
}
