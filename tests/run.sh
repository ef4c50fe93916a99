#!/usr/bin/env bash
# The test command (README "Set-up", second command; CI runs it through .ci/run).
# Installs what the tests need, then runs every check: fmt, clippy, build, unit tests, and
# the integration tests that mount for real (they need root and /dev/fuse; under CI=true a
# test that cannot run fails instead of skipping).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

# Free space first: a full run writes ~7 GiB here (target/: debug, static release, fault
# injection, guest kernels and their packages) and a few hundred MiB in /tmp and
# /var/cache/rustfuse-test. A disk that fills part way fails in rustc or in a mount test with
# an error that names neither the disk nor the cause; this names both.
need_gib="${RUSTFUSE_TEST_FREE_GIB:-10}"
for dir in "$PWD" "${TMPDIR:-/tmp}"; do
  free_kib="$(df -Pk "$dir" | awk 'NR == 2 { print $4 }')"
  if ((free_kib < need_gib * 1024 * 1024)); then
    echo "tests/run.sh: $dir has $((free_kib / 1024)) MiB free; a full test run needs ${need_gib} GiB there" >&2
    echo "  (set RUSTFUSE_TEST_FREE_GIB to change what is asked for)" >&2
    exit 1
  fi
done

# Debian packages the tests use, one per line in tests/apt-packages.txt.
mapfile -t pkgs < <(grep -v '^\s*#' tests/apt-packages.txt | sed 's/\s*#.*//' | grep -v '^\s*$')
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "== installing: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
  else
    SUDO=
  fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# BuildKit for tests/tests/buildkit.rs (no Debian package): built with Go, cached by version.
echo "== BuildKit (tests/install-buildkit.sh)"
if ! bash tests/install-buildkit.sh; then
  case "${CI:-}" in true | 1) exit 1 ;; esac
  echo "== BuildKit not installed: tests/tests/buildkit.rs will print SKIPPED"
fi

# containerd 2.x for the containerd2_* end-to-end tests (Debian ships 1.6): built, cached.
echo "== containerd 2.x (tests/install-containerd2.sh)"
if ! bash tests/install-containerd2.sh; then
  case "${CI:-}" in true | 1) exit 1 ;; esac
  echo "== containerd 2.x not installed: the containerd2_* tests will print SKIPPED"
fi

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build"
cargo build --workspace --locked
echo "== cargo build: the mount program as README's set-up installs it (static, release)"
host="$(rustc --print host-tuple)"
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked -p rustfuse --target "$host"
echo "== cargo build: the daemon with fault injection (tests/tests/injected.rs)"
cargo build -p rustfuse --locked --features fault-injection --target-dir target/fault-injection
echo "== cargo test"
# One test binary at a time runs its mount tests in parallel threads; keep that bounded.
RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}" cargo test --workspace --locked --no-fail-fast -- --nocapture
echo "== differential and read tests again, rustfuse behaving as on Linux 4.18 (FUSE 7.27, no newer syscalls)"
RUSTFUSE_COMPAT_4_18=1 cargo test -p rustfuse-tests --locked --test differential --test reads
RUSTFUSE_COMPAT_4_18=1 cargo test -p rustfuse-snapshotter --locked --test conformance fuse::
echo "== the installed build (static, release): CLI, lifecycle, differential, read tests, BuildKit running it as fuse-overlayfs"
RUSTFUSE_BIN="$PWD/target/$host/release/rustfuse" RUSTFUSE_SNAPSHOTTER_BIN="$PWD/target/debug/rustfuse-snapshotter" \
  cargo test -p rustfuse-tests --locked --test cli --test lifecycle --test differential --test reads
RUSTFUSE_BIN="$PWD/target/$host/release/rustfuse" RUSTFUSE_SNAPSHOTTER_BIN="$PWD/target/debug/rustfuse-snapshotter" \
  cargo test -p rustfuse-tests --locked --test buildkit builtin_fuse_overlayfs_is_rustfuse_v0_34_2
echo "== fuzz: a short run of every cargo-fuzz target"
FUZZ_SECONDS="${FUZZ_SECONDS:-20}" bash tests/fuzz.sh
echo "== Linux 5.10 booted under qemu: the kernel-facing tests there (tests/kernel.sh)"
CI=true bash tests/kernel.sh 5.10
echo "== Linux 5.10 under qemu: a power cut in the middle of copy-ups, two boots (tests/kernel/powercut.sh)"
CI=true KERNEL_STEPS=powercut bash tests/kernel.sh 5.10
echo "== Linux 4.15 (Ubuntu 18.04) booted under qemu: the root steps there (tests/kernel.sh)"
CI=true bash tests/kernel.sh 4.15
echo "== done"
