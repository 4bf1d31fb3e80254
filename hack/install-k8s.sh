#!/usr/bin/env bash
# Builds the Kubernetes components `make k8s-e2e` runs, from Kubernetes' own
# code at the release hack/k8s/go.mod pins, into
# .cache/tools/kubernetes-<version>/, idempotently: kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kubectl, and etcd (its
# own server, the version that Kubernetes release is built against, from
# hack/k8s/etcd). Nothing is installed into the system's paths. The first
# build takes about 7 minutes on 2 cores. Also the CNI plugins the test's
# pods use (bridge, host-local, loopback: the reference plugins), into
# .cache/tools/cni-plugins-<version>/.
set -euo pipefail

TOOLS=${TOOLS:?TOOLS must name the tools directory}
K8S_VERSION=${K8S_VERSION:-v1.37.2}
CNI_PLUGINS_VERSION=${CNI_PLUGINS_VERSION:-v1.10.0}
here=$(cd "$(dirname "$0")" && pwd)
dir=$TOOLS/kubernetes-$K8S_VERSION
bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl etcd)

log() { printf '[install-k8s] %s\n' "$*" >&2; }

pinned=$(sed -nE 's/^[[:space:]]*(require[[:space:]]+)?k8s\.io\/kubernetes (v[^ ]+).*/\2/p' "$here/k8s/go.mod")
if [ "$pinned" != "$K8S_VERSION" ]; then
	log "hack/k8s/go.mod pins k8s.io/kubernetes $pinned, not $K8S_VERSION"
	exit 1
fi

buildlog=$TOOLS/install-k8s.log
mkdir -p "$TOOLS"

cni=$TOOLS/cni-plugins-$CNI_PLUGINS_VERSION
if ! [ -x "$cni/bridge" ] || ! [ -x "$cni/host-local" ] || ! [ -x "$cni/loopback" ]; then
	log "building the CNI plugins $CNI_PLUGINS_VERSION (bridge, host-local, loopback)"
	if ! CGO_ENABLED=0 GOBIN=$cni go install \
		"github.com/containernetworking/plugins/plugins/main/bridge@$CNI_PLUGINS_VERSION" \
		"github.com/containernetworking/plugins/plugins/ipam/host-local@$CNI_PLUGINS_VERSION" \
		"github.com/containernetworking/plugins/plugins/main/loopback@$CNI_PLUGINS_VERSION" >>"$buildlog" 2>&1; then
		log "failed; the end of $buildlog:"
		tail -n 30 "$buildlog" >&2
		exit 1
	fi
fi

have=1
for b in "${bins[@]}"; do [ -x "$dir/$b" ] || have=0; done
((have)) && exit 0

mkdir -p "$dir"
minor=${K8S_VERSION#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
	ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
log "building Kubernetes $K8S_VERSION (${bins[*]}) from source (first time only: about 7 minutes on 2 cores; output in $buildlog)"
cd "$here/k8s"
if ! CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$dir/" \
	k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
	k8s.io/kubernetes/cmd/kubectl ./etcd >>"$buildlog" 2>&1; then
	log "failed; the end of $buildlog:"
	tail -n 30 "$buildlog" >&2
	exit 1
fi
