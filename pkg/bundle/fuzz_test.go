package bundle

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParseState checks that no state file content panics the reader, and
// that whatever it accepts names everything teardown needs.
func FuzzParseState(f *testing.F) {
	good, _ := json.Marshal(validState())
	f.Add(good)
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"version":2,"namespace":"x"}`))
	f.Add([]byte(`{"version":1,"namespace":"default","container_id":"c1","snapshotter":"overlayfs","view_key":"k","lease":"l","mountpoint":"/m","mounts":[{"type":"bind"}]}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := ParseState(data)
		if err != nil {
			return
		}
		if s.Version != StateVersion || s.ViewKey == "" || s.LeaseID == "" || s.ContainerID == "" ||
			!filepath.IsAbs(s.Mountpoint) || filepath.Clean(s.Mountpoint) != s.Mountpoint || strings.Contains(s.Mountpoint, "/../") {
			t.Fatalf("accepted %+v", s)
		}
	})
}
