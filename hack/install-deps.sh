#!/usr/bin/env bash
# Installs what snapview's tests and demo need on a fresh machine, idempotently:
#  - Debian packages (busybox-static for test images, erofs-utils and e2fsprogs
#    for the erofs and blockfile snapshotters, criu for checkpoint tests,
#    qemu-system-x86 for the VM monitor of `make demo-vm` and its test, runsc
#    for the tests of gVisor as the OCI runtime, iproute2 for the Kubernetes
#    test's network namespace);
#  - a guest kernel: Debian's cloud kernel package, downloaded and unpacked into
#    .cache/tools/guest-kernel/ (never installed on the host);
#  - the pinned containerd, ctr and containerd-shim-runc-v2 versions and runc, built with `go install` into
#    .cache/tools/<name>-<version>/, a directory the Makefile owns and git ignores.
# Nothing is installed into the system's containerd or runc paths.
set -euo pipefail

TOOLS=${TOOLS:?TOOLS must name the tools directory}
CONTAINERD_VERSIONS=${CONTAINERD_VERSIONS:-"v2.4.2 v2.2.9"}
RUNC_VERSION=${RUNC_VERSION:-v1.5.2}
APT_PACKAGES=(busybox-static erofs-utils e2fsprogs criu util-linux iproute2 libseccomp-dev pkg-config qemu-system-x86 runsc)
GUEST_KERNEL_PACKAGE=${GUEST_KERNEL_PACKAGE:-linux-image-cloud-amd64}

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

# The guest kernel: the package the metapackage depends on, unpacked (not
# installed) into $TOOLS/guest-kernel; the VM image takes vmlinuz and the
# virtio modules from there.
kdir=$TOOLS/guest-kernel
if ! ls "$kdir"/root/boot/vmlinuz-* >/dev/null 2>&1; then
	pkg=$(apt-cache depends "$GUEST_KERNEL_PACKAGE" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
	if [ -z "$pkg" ] && [ "$(id -u)" -eq 0 ]; then
		apt-get update -qq
		pkg=$(apt-cache depends "$GUEST_KERNEL_PACKAGE" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
	fi
	if [ -z "$pkg" ]; then
		log "cannot resolve $GUEST_KERNEL_PACKAGE to a kernel package (apt lists missing?); the VM test and demo-vm will be skipped"
	else
		log "downloading the guest kernel $pkg (unpacked into $kdir, not installed)"
		rm -rf "$kdir" && mkdir -p "$kdir"
		(cd "$kdir" && apt-get download -q "$pkg" 2>/dev/null >/dev/null && dpkg-deb -x ./*.deb root && rm -f ./*.deb)
	fi
fi

# go install's download and build output goes to a log, shown only on failure.
mkdir -p "$TOOLS"
buildlog=$TOOLS/install.log
quietly() {
	if ! "$@" >>"$buildlog" 2>&1; then
		log "failed; the end of $buildlog:"
		tail -n 30 "$buildlog" >&2
		return 1
	fi
}

for v in $CONTAINERD_VERSIONS; do
	dir=$TOOLS/containerd-$v
	if [ -x "$dir/containerd" ] && [ -x "$dir/ctr" ] && [ -x "$dir/containerd-shim-runc-v2" ]; then
		continue
	fi
	log "building containerd $v with ctr and the runc shim from source (first time only: about 3 minutes on 2 cores; output in $buildlog)"
	GOBIN=$dir quietly go install -tags no_btrfs,no_devmapper,no_zfs \
		"github.com/containerd/containerd/v2/cmd/containerd@$v" \
		"github.com/containerd/containerd/v2/cmd/ctr@$v" \
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$v"
done

# With seccomp (libseccomp-dev above): without it runc refuses every spec
# that has a seccomp profile, as the kubelet's RuntimeDefault pod sandboxes
# do ("seccomp: config provided but seccomp not supported").
dir=$TOOLS/runc-$RUNC_VERSION-seccomp
if [ ! -x "$dir/runc" ]; then
	log "building runc $RUNC_VERSION with seccomp (first time only: about 20 seconds)"
	CGO_ENABLED=1 GOBIN=$dir quietly go install -tags seccomp "github.com/opencontainers/runc@$RUNC_VERSION"
fi
