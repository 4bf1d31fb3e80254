// Command containerd-shim-snapview-v2 is the snapview containerd shim: runc's
// shim, plus a leased read-only view of each container's image.
package main

import (
	"context"

	"github.com/snapview/snapview/pkg/shim"
)

func main() {
	shim.Run(context.Background(), shim.NewManager())
}
