package main

import (
	"slices"
	"strings"
	"testing"

	"github.com/snapview/snapview/params"
)

// TestGuestDisks orders every disk a guest gets, a merged layer's blob
// disks included, the rootfs's and the volumes' alike.
func TestGuestDisks(t *testing.T) {
	p := &params.Doc{Version: params.Version, Rootfs: params.Rootfs{
		Kind: params.KindLayered, Device: "/dev/snapview/rootfs", UpperDir: "/upper", WorkDir: "/work",
		Layers: []params.Disk{{Device: "/dev/snapview/layers/0"}, {Device: "/dev/snapview/layers/1", Devices: []string{"/dev/snapview/layers/2"}}},
	}, Volumes: map[string]params.Volume{
		"models": {Target: "/models", Layers: []params.Disk{{Device: "/dev/snapview/volumes/models/0", Devices: []string{"/dev/snapview/volumes/models/1", "/dev/snapview/volumes/models/2"}}}},
		"data":   {Target: "/data", Layers: []params.Disk{{Device: "/dev/snapview/volumes/data/0"}}},
	}}
	var got []string
	for _, d := range guestDisks(p) {
		got = append(got, d.path)
		if d.readOnly == (d.path == "/dev/snapview/rootfs") {
			t.Errorf("%s: read-only %v", d.path, d.readOnly)
		}
	}
	want := []string{"/dev/snapview/rootfs", "/dev/snapview/layers/0", "/dev/snapview/layers/1", "/dev/snapview/layers/2",
		"/dev/snapview/volumes/data/0", "/dev/snapview/volumes/models/0", "/dev/snapview/volumes/models/1", "/dev/snapview/volumes/models/2"}
	if !slices.Equal(got, want) {
		t.Fatalf("disks\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	args := strings.Join(qemuArgs("qemu", p, guestDisks(p)), " ")
	if !strings.Contains(args, "snapview.layers=2") || strings.Contains(args, "root=/dev/vda") {
		t.Errorf("a layered rootfs's command line: %s", args)
	}
}

// TestLaunchRefusesNoDisks refuses a container whose rootfs is not disks.
func TestLaunchRefusesNoDisks(t *testing.T) {
	p := &params.Doc{Version: params.Version, Rootfs: params.Rootfs{Kind: params.KindFS}}
	if p.Rootfs.Disks() {
		t.Fatal("a filesystem rootfs reported as disks")
	}
}
