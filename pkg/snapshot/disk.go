package snapshot

import (
	"context"
	"fmt"

	"github.com/containerd/containerd/v2/core/containers"

	"github.com/snapview/snapview/pkg/snapshot/record"
)

// captureDisk takes a disk-form container snapshot of a block-mode
// container: its writable disk, never mounted.
func (n *Node) captureDisk(ctx context.Context, rec *record.Record, info containers.Container) (int64, error) {
	return 0, fmt.Errorf("snapview: container %s hands its rootfs to a guest (block mode): a snapshot of it is its writable disk (form disk), not yet supported", info.ID)
}
