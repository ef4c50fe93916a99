#!/usr/bin/env bash
# Builds buildkitd and buildctl for tests/tests/buildkit.rs (Debian 12 has no BuildKit package)
# with the Go toolchain on PATH, from the Go module proxy, and caches them by version in
#   $RUSTFUSE_BUILDKIT_CACHE (default /var/cache/rustfuse-test/buildkit)/VERSION/{buildkitd,buildctl}
# where the tests look. A version already there is not built again; the script is idempotent.
#
#   bash tests/install-buildkit.sh [VERSION...]     (default: v0.34.2 v0.11.6)
#
# The defaults are rustfuse_tests::buildkit::VERSIONS: v0.34.2, the newest release (it needs
# go >= 1.26, as its go.mod says), and v0.11.6, the last of the 0.11 series (the client
# contracts in ../shared/docs/client-contracts.md were read from its sources). Both build with
# Go 1.26.8; a first build of each takes 5-10 minutes on 2 cores.
#
# Why not `go install github.com/moby/buildkit/cmd/buildkitd@VERSION`: recent releases (v0.34.2
# among them) have `exclude` directives in go.mod, and `go install pkg@version` refuses a
# module whose go.mod has exclude or replace directives. So each version is built from a
# throwaway wrapper module that requires BuildKit and carries BuildKit's own exclude and
# replace directives (local-path replaces dropped), so that the build resolves the versions
# BuildKit's go.mod asks for.
set -euo pipefail

CACHE="${RUSTFUSE_BUILDKIT_CACHE:-/var/cache/rustfuse-test/buildkit}"
if (($#)); then VERSIONS="$*"; else VERSIONS="v0.34.2 v0.11.6"; fi
# Generous: a first build downloads a few hundred modules and compiles on 2 cores.
LIMIT=1800

if ! command -v go >/dev/null; then
  echo "install-buildkit: go not found; cannot build BuildKit (tests/tests/buildkit.rs cannot run)" >&2
  exit 1
fi

# Prints the `exclude` and `replace` directives (single lines and blocks) of go.mod file $1.
directives() {
  awk '
    /^(exclude|replace)[ \t]*\($/ { block = 1; print; next }
    block { print; if ($0 ~ /^\)/) block = 0; next }
    /^(exclude|replace)[ \t]/ { print }
  ' "$1"
}

build_one() {
  local v="$1" dest="$CACHE/$1"
  if [ -x "$dest/buildkitd" ] && [ -x "$dest/buildctl" ]; then
    echo "install-buildkit: $v cached in $dest"
    return 0
  fi
  echo "install-buildkit: building BuildKit $v with $(go version) into $dest"
  WRAP="$(mktemp -d)"
  (
    cd "$WRAP"
    export GOFLAGS="${GOFLAGS:-} -mod=mod" GOTOOLCHAIN=local
    go mod init rustfuse.test/buildkit-wrapper >/dev/null 2>&1
    local gomod
    gomod="$(go mod download -json "github.com/moby/buildkit@$v" |
      sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    if [ -z "$gomod" ] || [ ! -f "$gomod" ]; then
      echo "install-buildkit: cannot download github.com/moby/buildkit@$v" >&2
      exit 1
    fi
    # A replace of a local path (../something) cannot work outside BuildKit's tree: drop it.
    directives "$gomod" | grep -v '=>[[:space:]]*\.' >>go.mod || true
    echo "install-buildkit: directives taken from BuildKit's go.mod:"
    sed -n '/^\(exclude\|replace\)/,$p' go.mod | sed 's/^/    /'
    go get "github.com/moby/buildkit@$v"
    mkdir -p "$dest.tmp"
    local ld="-X github.com/moby/buildkit/version.Version=$v"
    for p in buildkitd buildctl; do
      timeout "$LIMIT" go build -trimpath -ldflags "$ld" -o "$dest.tmp/$p" "github.com/moby/buildkit/cmd/$p"
    done
  )
  rm -rf "$WRAP" "$dest"
  WRAP=
  mv "$dest.tmp" "$dest"
  echo "install-buildkit: $("$dest/buildkitd" --version)"
}

WRAP=
trap 'if [ -n "$WRAP" ]; then rm -rf "$WRAP"; fi' EXIT
mkdir -p "$CACHE"
# One build at a time (two test runs may start together); the second then finds the cache.
exec 9>"$CACHE/lock"
timeout "$LIMIT" flock 9
for v in $VERSIONS; do
  rm -rf "$CACHE/$v.tmp"
  build_one "$v"
done
echo "install-buildkit: cached in $CACHE: $VERSIONS"
