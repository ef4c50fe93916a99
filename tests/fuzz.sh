#!/usr/bin/env bash
# A short run of every cargo-fuzz target in fuzz/ (the CI fuzz step; longer runs: fuzz/README.md).
# Fails if a target crashes, panics, hangs on one input or fails to build.
#
# The toolchain is stable: cargo-fuzz's `-Z` flags are let through with RUSTC_BOOTSTRAP=1, and
# `-s none` builds without a sanitizer (coverage instrumentation and debug assertions stay on;
# the code under fuzz is safe Rust, AddressSanitizer would find little and doubles the build).
#
#   FUZZ_SECONDS=N   seconds per target (default 20)
#   FUZZ_TARGETS="a b"   only these targets
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${FUZZ_SECONDS:-20}"
read -r -a targets <<<"${FUZZ_TARGETS:-mount_options lowerdir_codec snapshot_filter store_records overlay_ops}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

echo "== fuzz: build"
cargo fuzz build -s none

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
for t in "${targets[@]}"; do
  args=(-max_total_time="$secs" -timeout=10 -print_final_stats=1)
  # overlay_ops needs room for a layer tree and a few dozen operations.
  [ "$t" = overlay_ops ] && args+=(-max_len=1024)
  corpus=("corpus/$t")
  [ -d "seeds/$t" ] && corpus+=("seeds/$t")
  mkdir -p "corpus/$t"
  echo "== fuzz: $t (${secs}s)"
  if ! cargo fuzz run -s none "$t" "${corpus[@]}" -- "${args[@]}" >"$logs/$t.log" 2>&1; then
    # The panic message (with the operations that led there), the input, how to reproduce.
    grep -v '^"' "$logs/$t.log" | tail -n 80
    echo "FAILED: fuzz target $t (input saved under fuzz/artifacts/$t/; reproduce with" \
      "RUSTC_BOOTSTRAP=1 cargo fuzz run -s none $t fuzz/artifacts/$t/<file>)"
    exit 1
  fi
  grep -E '^Done [0-9]+ runs' "$logs/$t.log" || true
done
echo "== fuzz: done"
