#!/usr/bin/env bash
# Builds containerd 2.x (containerd, ctr, containerd-shim-runc-v2) from its Go module with
# `go install` and the Go module proxy, into /var/cache/rustfuse-test/containerd/VERSION/bin,
# for snapshotter/tests/containerd_e2e.rs (its containerd2_* tests look there, or in
# $RUSTFUSE_CONTAINERD2_DIR). Idempotent: a complete cached build is kept and nothing runs.
#
#   bash tests/install-containerd2.sh [VERSION]     (default 2.4.2; needs go >= the module's)
#
# Debian 12's containerd (1.6) stays installed and is what the containerd_* tests use; this
# one is never put on PATH.
set -euo pipefail

version="${1:-2.4.2}"
version="${version#v}"
cache=/var/cache/rustfuse-test/containerd/$version
bin=$cache/bin
module=github.com/containerd/containerd/v2
programs=(containerd ctr containerd-shim-runc-v2)
# Generous: a first build downloads ~150 modules and compiles containerd on 2 cores.
limit=1800

cached() {
    [[ -f $cache/complete ]] || return 1
    for p in "${programs[@]}"; do [[ -x $bin/$p ]] || return 1; done
    echo "containerd $version: cached in $bin"
}
cached && exit 0

command -v go >/dev/null || { echo "install-containerd2: go not found" >&2; exit 1; }
mkdir -p "$cache"
exec 9>"$cache/lock"
timeout "$limit" flock 9
# Another run may have finished the build while we waited for the lock.
cached && exit 0
rm -f "$cache/complete"

tmp=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
ldflags="-X $module/version.Version=v$version"
echo "containerd $version: building ${programs[*]} with $(go version)"
# The daemon and ctr as containerd's Makefile builds them by default (cgo where available);
# the shim static, without cgo and gRPC (its Makefile's SHIM_CGO_ENABLED=0, tag no_grpc).
GOBIN=$tmp/bin timeout "$limit" \
    go install -tags urfave_cli_no_docs -ldflags "$ldflags" \
    "$module/cmd/containerd@v$version" "$module/cmd/ctr@v$version"
GOBIN=$tmp/bin CGO_ENABLED=0 timeout "$limit" \
    go install -tags "urfave_cli_no_docs no_grpc" -ldflags "$ldflags" \
    "$module/cmd/containerd-shim-runc-v2@v$version"

for p in "${programs[@]}"; do
    [[ -x $tmp/bin/$p ]] || { echo "install-containerd2: $p was not built" >&2; exit 1; }
done
"$tmp/bin/containerd" --version | grep -qF "v$version" \
    || { echo "install-containerd2: built containerd is not $version" >&2; exit 1; }
rm -rf "$bin"
mv "$tmp/bin" "$bin"
touch "$cache/complete"
echo "containerd $version: installed in $bin ($("$bin/containerd" --version))"
