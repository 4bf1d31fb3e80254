#!/usr/bin/env bash
# Installs what snapview's tests and demo need on a fresh machine, idempotently:
#  - Debian packages (busybox-static for test images, erofs-utils and e2fsprogs
#    for the erofs and blockfile snapshotters, criu for checkpoint tests);
#  - the pinned containerd, ctr and containerd-shim-runc-v2 versions and runc, built with `go install` into
#    .cache/tools/<name>-<version>/, a directory the Makefile owns and git ignores.
# Nothing is installed into the system's containerd or runc paths.
set -euo pipefail

TOOLS=${TOOLS:?TOOLS must name the tools directory}
CONTAINERD_VERSIONS=${CONTAINERD_VERSIONS:-"v2.4.2 v2.2.9"}
RUNC_VERSION=${RUNC_VERSION:-v1.5.2}
APT_PACKAGES=(busybox-static erofs-utils e2fsprogs criu util-linux libseccomp-dev pkg-config)

log() { printf '[install-deps] %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	if [ "$(id -u)" -ne 0 ]; then
		log "missing Debian packages ${missing[*]} (run as root to install them)"
	else
		log "installing Debian packages: ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
fi

for v in $CONTAINERD_VERSIONS; do
	dir=$TOOLS/containerd-$v
	if [ -x "$dir/containerd" ] && [ -x "$dir/ctr" ] && [ -x "$dir/containerd-shim-runc-v2" ]; then
		continue
	fi
	log "building containerd $v with ctr and the runc shim (first time only, a few minutes)"
	GOBIN=$dir go install -tags no_btrfs,no_devmapper,no_zfs \
		"github.com/containerd/containerd/v2/cmd/containerd@$v" \
		"github.com/containerd/containerd/v2/cmd/ctr@$v" \
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$v"
done

dir=$TOOLS/runc-$RUNC_VERSION
if [ ! -x "$dir/runc" ]; then
	log "building runc $RUNC_VERSION"
	CGO_ENABLED=1 GOBIN=$dir go install "github.com/opencontainers/runc@$RUNC_VERSION"
fi
