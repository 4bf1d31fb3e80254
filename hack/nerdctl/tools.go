//go:build tools

// Package nerdctl pins the nerdctl command hack/install-clients.sh builds,
// so that go mod tidy keeps what it needs.
package nerdctl

import (
	_ "github.com/containerd/nerdctl/v2/cmd/nerdctl"
)
