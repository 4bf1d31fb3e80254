#!/usr/bin/env bash
# Builds the shim of an earlier release of this repository, for the upgrade
# test (tests/e2e/upgrade_test.go): the commit's own tree, from git, with its
# own go.mod, into OUT. Usage: build-previous.sh COMMIT OUT
set -euo pipefail
rev=${1:?commit}
out=${2:?output path}
top=$(cd "$(dirname "$0")/.." && pwd)
if ! git -C "$top" cat-file -e "$rev^{commit}" 2>/dev/null; then
	echo "[build-previous] commit $rev is not in this clone (a shallow clone?): git fetch --unshallow, or set PREVIOUS_RELEASE" >&2
	exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git -C "$top" archive "$rev" | tar -x -C "$tmp"
mkdir -p "$(dirname "$out")"
echo "[build] containerd-shim-snapview-v2 of the earlier release $rev (for the upgrade test)"
(cd "$tmp" && CGO_ENABLED=0 go build -trimpath \
	-ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$rev" \
	-o "$out.new" ./cmd/containerd-shim-snapview-v2 2> >(grep -v '^go: downloading' >&2))
mv "$out.new" "$out"
