#!/usr/bin/env bash
# Builds the container clients snapview's tests drive, from their own code at
# pinned releases, into .cache/tools/<name>-<version>/, idempotently (only what
# is missing); nothing is installed into the system's paths:
#  - nerdctl, through the wrapper module hack/nerdctl (go install of nerdctl
#    fails: its go.mod has a replace directive, and the proxy refuses its
#    version list), for tests/e2e/nerdctl_test.go;
#  - dockerd, the Docker Engine (moby's module github.com/moby/moby/v2, which
#    runs containerd shims by name and has the containerd image store), for
#    tests/docker;
#  - the CNCF Distribution registry, for tests that push and pull images.
# The Go build output goes to $TOOLS/install.log, shown only on failure.
set -euo pipefail

TOOLS=${TOOLS:?TOOLS must name the tools directory}
NERDCTL_VERSION=${NERDCTL_VERSION:-v2.3.5}
DOCKERD_VERSION=${DOCKERD_VERSION:-v2.0.0-beta.24}
REGISTRY_VERSION=${REGISTRY_VERSION:-v3.1.2}
here=$(cd "$(dirname "$0")" && pwd)

log() { printf '[install-clients] %s\n' "$*" >&2; }

mkdir -p "$TOOLS"
buildlog=$TOOLS/install.log
quietly() {
	if ! "$@" >>"$buildlog" 2>&1; then
		log "failed; the end of $buildlog:"
		tail -n 30 "$buildlog" >&2
		return 1
	fi
}

pinned=$(sed -nE 's/^[[:space:]]*(require[[:space:]]+)?github\.com\/containerd\/nerdctl\/v2 (v[^ ]+).*/\2/p' "$here/nerdctl/go.mod")
if [ "$pinned" != "$NERDCTL_VERSION" ]; then
	log "hack/nerdctl/go.mod pins nerdctl $pinned, not $NERDCTL_VERSION"
	exit 1
fi
dir=$TOOLS/nerdctl-$NERDCTL_VERSION
if [ ! -x "$dir/nerdctl" ]; then
	log "building nerdctl $NERDCTL_VERSION from source (first time only: about 1.5 minutes on 2 cores; output in $buildlog)"
	(cd "$here/nerdctl" && CGO_ENABLED=0 quietly go build -trimpath \
		-ldflags "-s -w -X github.com/containerd/nerdctl/v2/pkg/version.Version=$NERDCTL_VERSION" \
		-o "$dir/nerdctl" github.com/containerd/nerdctl/v2/cmd/nerdctl)
fi

# CGO off: the btrfs graph driver is cgo-only and journald needs libsystemd;
# the tags are those of moby's hack/make.sh for a static daemon.
dir=$TOOLS/dockerd-$DOCKERD_VERSION
if [ ! -x "$dir/dockerd" ]; then
	log "building dockerd $DOCKERD_VERSION from source (first time only: about 7 minutes on 2 cores; output in $buildlog)"
	CGO_ENABLED=0 GOBIN=$dir quietly go install -trimpath -tags "netgo osusergo static_build nri_no_wasm" \
		-ldflags "-s -w -X github.com/moby/moby/v2/dockerversion.Version=${DOCKERD_VERSION#v}" \
		"github.com/moby/moby/v2/cmd/dockerd@$DOCKERD_VERSION"
fi

dir=$TOOLS/registry-$REGISTRY_VERSION
if [ ! -x "$dir/registry" ]; then
	log "building the Distribution registry $REGISTRY_VERSION from source (first time only: about 3 minutes on 2 cores; output in $buildlog)"
	CGO_ENABLED=0 GOBIN=$dir quietly go install -trimpath -ldflags "-s -w" \
		"github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
fi
