#!/usr/bin/env bash
# tests/kernel.sh [VERSION]: the kernel-facing tests on an old kernel, booted for real.
#
# rustfuse exists for hosts where an unprivileged user cannot mount kernel overlayfs (Linux
# 4.18-5.10). This boots Debian's Linux VERSION (default 5.10: bullseye's
# linux-image-5.10.0-NN-amd64, FUSE protocol 7.32, no overlayfs in a user namespace) under
# qemu with the host's userspace shared into the guest (virtme-ng), and runs the test
# executables built here on the host inside it (tests/kernel/guest.sh says which and why).
# VERSION 4.15 is Ubuntu 18.04's linux-image-4.15.0-NNN-generic (FUSE protocol 7.26), from
# Ubuntu's archive, below the product's floor; VERSION 5.4 is Ubuntu 20.04's
# linux-image-5.4.0-NNN-generic (FUSE protocol 7.31), the same way: see their cases below.
#
# - The kernel package is pinned (KERNEL_PIN below), with a fallback to the newest of that
#   series in the suite. It is fetched with `apt-get download` under a private source list,
#   Dir::State::Lists and Dir::Cache in target/kernel/apt/ (the host's apt state is not
#   touched), unpacked with dpkg-deb -x and cached in target/kernel/PKG_VERSION/: a second run
#   downloads nothing.
# - qemu-system-x86 (and kmod, busybox-static, which virtme-ng uses) come from Debian, virtme-ng
#   from PyPI in a venv at target/kernel/venv.
# - KVM is probed with one short boot; where it fails or hangs (a 5.10 guest hangs under KVM on
#   some hosts) the guest runs under TCG (`vng --disable-kvm`).
# - Before it boots, when the guest's buildah step is to run, the same rootless buildah build
#   is made here on the host's kernel with the same binaries: the reference the guest's image
#   must match layer by layer (target/kernel/run-VERSION/buildah-host/).
# - Deadlines everywhere: the boot (KERNEL_BOOT_SECS), the whole guest run (KERNEL_RUN_SECS),
#   and each test executable inside (guest.sh). A guest that cannot boot fails the run; nothing
#   here ever skips.
#
# - powercut (KERNEL_STEPS=powercut; also in `all`) is a step of its own: two boots, a power
#   cut in the middle of copy-ups in the first (qemu SIGKILLed), every file read after
#   recovery in the second, on the same virtual disks (tests/kernel/powercut.sh). Results in
#   target/kernel/run-VERSION/powercut/; asked for alone, the rest of run-VERSION/ stays.
#
# Output: target/kernel/run-VERSION/ (console.log: the guest's console; STEP.log per step;
# results: one `STEP NAME EXIT SECONDS` line per step). Exit 0 only if every step passed.
# Environment: KERNEL_STEPS="differential options ..." runs only those steps (guest.sh's names,
# and powercut; `all` adds the ones not run by default);
# KERNEL_BOOT_SECS, KERNEL_RUN_SECS, KERNEL_MEMORY (default 4G), KERNEL_CPUS (default 2),
# POWERCUT_SECS (each powercut boot's deadline, default 600), KERNEL_RUSTFUSE (a rustfuse
# binary to test instead of the one built here).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export DEBIAN_FRONTEND=noninteractive
VERSION="${1:-5.10}"
BOOT_SECS="${KERNEL_BOOT_SECS:-300}"
RUN_SECS="${KERNEL_RUN_SECS:-2100}"
start_all=$(date +%s)

say() { echo "== kernel.sh $VERSION: $*"; }
die() {
  echo "== kernel.sh $VERSION: FAILED: $*" >&2
  exit 1
}

# VERSION -> Debian suite, package name pattern, pinned package and version.
DISTRO=debian
case "$VERSION" in
  5.10)
    SUITE=bullseye
    PATTERN='^linux-image-5\.10\.0-[0-9]+-amd64$'
    KERNEL_PIN="linux-image-5.10.0-32-amd64=5.10.223-1"
    ;;
  4.15)
    # Ubuntu 18.04's (bionic) Linux 4.15.0-NNN-generic, FUSE protocol 7.26: below the product's
    # floor (4.18, where upstream FUSE mounts in a user namespace came; Ubuntu's 4.15 carries
    # them, and overlayfs in a user namespace without userxattr, as Ubuntu patches).
    # Its image package has no modules: they are linux-modules-4.15.0-NNN-generic (fuse, ext4
    # and loop are built in; overlay and 9p, which virtme-ng loads, are modules).
    # Only Ubuntu's archive still carries a 4.x kernel that apt reaches here (Debian's buster
    # is gone from it); its key comes from Debian's ubuntu-keyring package (ubuntu_keyring).
    DISTRO=ubuntu
    SUITE="bionic bionic-updates bionic-security"
    PATTERN='^linux-image-4\.15\.0-[0-9]+-generic$'
    KERNEL_PIN="linux-image-4.15.0-213-generic=4.15.0-213.224"
    # Steps by default (guest.sh's names; KERNEL_STEPS overrides, `all` runs every one): the
    # mount program's, root and rootless, and doctor; about 5 minutes in all under TCG on a
    # loaded 2-core host. conformance (10+ minutes) and containerd (4) run on 5.10 already and
    # would not fit in the stage's ~6 minutes of CI.
    : "${KERNEL_STEPS:=differential reads options rootless lifecycle fusermount3 doctor}"
    ;;
  5.4)
    # Ubuntu 20.04's (focal) Linux 5.4.0-NNN-generic, FUSE protocol 7.31: a kernel of the
    # supported range as Ubuntu 20.04 CI hosts run it (overlayfs in a user namespace without
    # userxattr, as Ubuntu patches its kernels before 5.11). From Ubuntu's archive, as 4.15
    # (modules in linux-modules-5.4.0-NNN-generic). Not run in CI: by hand, with the same
    # steps as 4.15 by default (KERNEL_STEPS=all adds the snapshotter's, containerd's and
    # buildah's, as on 5.10).
    DISTRO=ubuntu
    SUITE="focal focal-updates focal-security"
    PATTERN='^linux-image-5\.4\.0-[0-9]+-generic$'
    KERNEL_PIN="linux-image-5.4.0-216-generic=5.4.0-216.236"
    : "${KERNEL_STEPS:=differential reads options rootless lifecycle fusermount3 doctor}"
    ;;
  *) die "unknown kernel VERSION '$VERSION' (known: 5.10, 4.15, 5.4)" ;;
esac

KDIR="$ROOT/target/kernel"
mkdir -p "$KDIR"

# ---------------------------------------------------------------- host tools
host_pkgs=(qemu-system-x86 kmod busybox-static e2fsprogs util-linux)
missing=()
for p in "${host_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  timeout 600 apt-get update -qq
  timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

VENV="$KDIR/venv"
VNG_VERSION=1.42
if ! "$VENV/bin/vng" --version 2>/dev/null | grep -q "$VNG_VERSION"; then
  say "installing virtme-ng $VNG_VERSION in $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  timeout 600 "$VENV/bin/pip" install -q "virtme-ng==$VNG_VERSION"
fi
export PATH="$VENV/bin:$PATH" # vng runs virtme-run from PATH

# ---------------------------------------------------------------- the kernel
# A kernel is cached as target/kernel/PKG_VERSION/ (the unpacked .deb) with a .complete marker.
cached() { [ -f "$KDIR/$1_$2/.complete" ] && echo "$KDIR/$1_$2"; }

APT="$KDIR/apt"
[ "$DISTRO" = debian ] || APT="$KDIR/apt-$DISTRO"
apt_private() {
  # Only this tree: its own source list, lists and cache; no host sources, no host lists
  # (with a deadline: it is the network).
  timeout 900 apt-get -q -o Dir::Etc::SourceList="$APT/sources.list" -o Dir::Etc::SourceParts="$APT/parts" \
    -o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache" \
    -o Dir::Etc::Preferences="$APT/preferences" -o Dir::Etc::PreferencesParts="$APT/parts" \
    -o APT::Sandbox::User=root "$@"
}
apt_cache_private() {
  timeout 120 apt-cache -o Dir::Etc::SourceList="$APT/sources.list" -o Dir::Etc::SourceParts="$APT/parts" \
    -o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache" "$@"
}

# Ubuntu's archive key, from Debian's own ubuntu-keyring package (not in bookworm: fetched
# from trixie with the same private apt state, unpacked into target/kernel/ubuntu-keyring/).
ubuntu_keyring() {
  local dir="$KDIR/ubuntu-keyring" APT="$KDIR/apt-keyring"
  if [ ! -f "$dir/.complete" ]; then
    mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/parts" "$APT/debs"
    : >"$APT/preferences"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
      >"$APT/sources.list"
    say "fetching Debian's ubuntu-keyring package (private lists in $APT)"
    apt_private update -qq || die "apt-get update of trixie (for ubuntu-keyring) failed"
    rm -f "$APT/debs/"*.deb
    (cd "$APT/debs" && apt_private download ubuntu-keyring) || die "apt-get download ubuntu-keyring failed"
    rm -rf "$dir"
    dpkg-deb -x "$APT/debs/"ubuntu-keyring_*.deb "$dir"
    rm -f "$APT/debs/"*.deb
    touch "$dir/.complete"
  fi
  UBUNTU_KEYRING="$dir/usr/share/keyrings/ubuntu-archive-keyring.gpg"
}

pin_pkg="${KERNEL_PIN%%=*}"
pin_ver="${KERNEL_PIN#*=}"
KROOT=$(cached "$pin_pkg" "$pin_ver" || true)
if [ -z "$KROOT" ]; then
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/parts" "$APT/debs"
  : >"$APT/preferences"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" \
    >"$APT/sources.list"
  if [ "$DISTRO" = ubuntu ]; then
    ubuntu_keyring
    for s in $SUITE; do
      echo "deb [arch=amd64 signed-by=$UBUNTU_KEYRING] http://archive.ubuntu.com/ubuntu $s main"
    done >"$APT/sources.list"
  fi
  say "apt-get update of the $SUITE suite (private lists in $APT)"
  apt_private update -qq || die "apt-get update of $SUITE failed"
  pkg=$pin_pkg ver=$pin_ver
  if ! apt_cache_private show "$pin_pkg=$pin_ver" >/dev/null 2>&1; then
    pkg=$(apt_cache_private pkgnames linux-image- | grep -E "$PATTERN" | sort -V | tail -1)
    [ -n "$pkg" ] || die "no package matching $PATTERN in $SUITE"
    ver=$(apt_cache_private show "$pkg" | sed -n 's/^Version: //p' | sort -V | tail -1)
    say "pinned $KERNEL_PIN is not in $SUITE any more; using the newest: $pkg=$ver"
  fi
  KROOT=$(cached "$pkg" "$ver" || true)
  if [ -z "$KROOT" ]; then
    say "downloading $pkg=$ver"
    rm -f "$APT/debs/"*.deb
    extra=() # Ubuntu: the modules are a package of their own
    [ "$DISTRO" = ubuntu ] && extra=("linux-modules-${pkg#linux-image-}=$ver")
    (cd "$APT/debs" && apt_private download "$pkg=$ver" "${extra[@]}") ||
      die "apt-get download $pkg=$ver ${extra[*]} failed"
    KROOT="$KDIR/${pkg}_$ver"
    rm -rf "$KROOT"
    mkdir -p "$KROOT"
    for deb in "$APT/debs/"*.deb; do dpkg-deb -x "$deb" "$KROOT"; done
    rm -f "$APT/debs/"*.deb
    kver=$(basename "$(ls -d "$KROOT"/lib/modules/*)")
    depmod -a -b "$KROOT" "$kver"
    touch "$KROOT/.complete"
  fi
fi
KIMG=$(ls "$KROOT"/boot/vmlinuz-*)
KVER=${KIMG##*/vmlinuz-}
say "kernel $KVER from $KROOT"

# ---------------------------------------------------------------- the test executables
# Built on the host (the guest shares the host's filesystem read-only); guest.sh runs them
# directly. The paths come from cargo's JSON messages.
say "building the binaries and test executables (cargo test --no-run)"
cargo build --workspace --locked -q
json=$(mktemp)
cargo test --locked --no-run --message-format=json \
  -p rustfuse-tests --test differential --test reads --test rootless --test options --test lifecycle \
  --test rootless_snapshotter --test rootless_build \
  -p rustfuse-snapshotter --test conformance --test containerd_e2e >"$json"
BINS="$KDIR/bins.env"
python3 - "$json" >"$BINS" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(f"TEST_BIN_{m['target']['name']}={m['executable']}")
EOF
rm -f "$json"
for t in differential reads rootless options lifecycle rootless_snapshotter rootless_build conformance containerd_e2e; do
  grep -q "^TEST_BIN_$t=" "$BINS" || die "cargo test --no-run gave no executable for $t"
done
# Private copies of everything the guest runs, taken under cargo's lock of target/debug: the
# target directory is shared with other builds, and a binary rebuilt under a running guest
# (seen: rustfuse-snapshotter replaced in the middle of the conformance run) crashes there.
# guest.sh bind-mounts the copies of rustfuse and rustfuse-snapshotter over target/debug/
# (some tests find them there by a path fixed at compile time).
PRIV="$KDIR/bin"
rm -rf "$PRIV"
mkdir -p "$PRIV"
flock -w 900 "$ROOT/target/debug/.cargo-lock" sh -c '
  set -e
  P=$1 B=$2 D=$3
  cp "$D/rustfuse" "$D/rustfuse-snapshotter" "$P/"
  while IFS="=" read -r k v; do cp "$v" "$P/${k#TEST_BIN_}"; echo "$k=$P/${k#TEST_BIN_}"; done <"$B" >"$B.new"
  mv "$B.new" "$B"
' sh "$PRIV" "$BINS" "$ROOT/target/debug"
# KERNEL_RUSTFUSE: another rustfuse to test instead (an older build, to compare).
if [ -n "${KERNEL_RUSTFUSE:-}" ]; then
  cp "$KERNEL_RUSTFUSE" "$PRIV/rustfuse"
  say "testing the rustfuse given in KERNEL_RUSTFUSE ($KERNEL_RUSTFUSE)"
fi
echo "TARGET_DEBUG=$ROOT/target/debug" >>"$BINS"
echo "PRIVATE_BIN=$PRIV" >>"$BINS"

OUT="$KDIR/run-$VERSION"
# powercut is no step of guest.sh: it needs two boots of its own (below), its results go to
# OUT/powercut/. Asked for alone, it leaves the rest of OUT as the last run left it.
POWERCUT=no
GUEST_STEPS=
for s in ${KERNEL_STEPS:-}; do
  case "$s" in
    powercut) POWERCUT=yes ;;
    all) POWERCUT=yes GUEST_STEPS="$GUEST_STEPS $s" ;;
    *) GUEST_STEPS="$GUEST_STEPS $s" ;;
  esac
done
GUEST_STEPS=${GUEST_STEPS# }
MAIN=yes
[ -n "${KERNEL_STEPS:-}" ] && [ -z "$GUEST_STEPS" ] && MAIN=no
if [ "$MAIN" = yes ]; then
  rm -rf "$OUT"
else
  rm -rf "$OUT/powercut"
fi
mkdir -p "$OUT"

# ---------------------------------------------------------------- the host's reference build
# The guest's buildah step builds a Containerfile and compares its image, layer by layer, with
# the same build made here on the host's kernel with the same binaries (and base image):
# made now, before the guest boots, when that step is to run (guest.sh's default steps have it).
steps=" ${KERNEL_STEPS:-default} "
if [[ "$steps" == *" default "* || "$steps" == *" all "* || "$steps" == *" buildah "* ]]; then
  say "the reference build on the host (rootless buildah, rustfuse as mount_program)"
  t0=$(date +%s)
  # shellcheck disable=SC1090
  if ! (. "$BINS" && CI=true RUSTFUSE_BIN="$PRIVATE_BIN/rustfuse" \
    RUSTFUSE_TEST_BUILDAH_KEEP="$OUT/buildah-host" timeout -k 10 600 "$TEST_BIN_rootless_build" \
    --ignored --exact buildah_bud_quick_same_layers_as_reference --nocapture) >"$OUT/buildah-host.log" 2>&1; then
    tail -40 "$OUT/buildah-host.log" >&2
    die "the reference build on the host failed (log above, in $OUT/buildah-host.log)"
  fi
  say "reference build on the host in $(($(date +%s) - t0)) s: $OUT/buildah-host/layers.txt"
fi

# ---------------------------------------------------------------- boot
vng_args=(--run "$KIMG" --cpus "${KERNEL_CPUS:-2}" --memory "${KERNEL_MEMORY:-4G}" --verbose
  --overlay-rwdir=/etc --rwdir="$OUT")

# KVM where it boots: one short probe (here a 5.10 guest under KVM either aborts at once or
# hangs), else TCG.
accel=(--disable-kvm)
if [ -w /dev/kvm ] && [ "${KERNEL_KVM:-probe}" != off ]; then
  rm -f "$OUT/kvm-ok"
  timeout -k 5 45 vng "${vng_args[@]}" --exec "touch $OUT/kvm-ok" </dev/null >"$OUT/kvm-probe.log" 2>&1 || true
  if [ -f "$OUT/kvm-ok" ]; then
    accel=()
    say "KVM boots this kernel: using it"
  else
    say "KVM probe did not boot ($(grep -a -m1 -iE 'error|assert' "$OUT/kvm-probe.log" | tr -d '\000' || echo 'no output within 45 s')): using TCG"
  fi
fi

# wait_for FILE PID SECS WHAT LOG: waits until FILE exists, failing the run when PID (a vng)
# exits first or SECS pass.
wait_for() {
  local t0
  t0=$(date +%s)
  until [ -f "$1" ]; do
    if ! kill -0 "$2" 2>/dev/null; then
      tail -40 "$5" | tr -d '\000' >&2
      die "the guest exited before $4 (console above, in $5)"
    fi
    if (($(date +%s) - t0 > $3)); then
      tail -40 "$5" | tr -d '\000' >&2
      die "the guest did not $4 within $3 s (console above, in $5)"
    fi
    sleep 0.1
  done
}

rc=0
if [ "$MAIN" = yes ]; then
  say "booting under qemu (${accel[*]:-KVM}); console in $OUT/console.log"
  boot_start=$(date +%s)
  timeout -k 10 "$RUN_SECS" vng "${vng_args[@]}" "${accel[@]}" \
    --exec "bash $ROOT/tests/kernel/guest.sh $OUT $BINS '$GUEST_STEPS'" \
    </dev/null >"$OUT/console.log" 2>&1 &
  VNG=$!
  cleanup() { kill "$VNG" 2>/dev/null || true; }
  trap cleanup EXIT
  wait_for "$OUT/booted" "$VNG" "$BOOT_SECS" "boot" "$OUT/console.log"
  say "booted in $(($(date +%s) - boot_start)) s: $(cat "$OUT/booted")"
  wait "$VNG" || rc=$?
  trap - EXIT
fi

# ---------------------------------------------------------------- powercut: two boots
# A power cut in the middle of copy-ups (tests/kernel/powercut.sh says what the guest does).
# The layers are on four virtual disks, files in PC (format raw, cache=writeback: what the
# guest wrote to a disk reached this host's page cache and stays when qemu dies; what it
# kept in its own page cache dies with qemu, as in a power cut). The first boot makes the
# layers and changes them through rustfuse; when it writes PC/cut-now, qemu gets SIGKILL
# (its pid from -pidfile: only that process). The second boot, on the same disks, mounts
# rustfuse again and reads every file. Each boot has a deadline (POWERCUT_SECS, default 600).
PC="$OUT/powercut"
PC_SECS="${POWERCUT_SECS:-600}"
pc_kill_qemu() { # SIGKILL the qemu of the pidfile, if it is still that qemu
  local pid
  pid=$(cat "$PC/qemu.pid" 2>/dev/null) || return 0
  [ -n "$pid" ] && grep -q '^qemu' "/proc/$pid/comm" 2>/dev/null && kill -KILL "$pid"
  return 0
}
pc_boot() { # pc_boot PHASE: starts a guest running powercut.sh PHASE; its vng's pid in VNG
  local qopts=("-pidfile" "$PC/qemu.pid") s
  rm -f "$PC/qemu.pid"
  for s in delayed rootless burst control; do
    qopts+=(-drive "if=none,id=pc-$s,file=$PC/$s.img,format=raw,cache=writeback"
      -device "virtio-blk-pci,drive=pc-$s,serial=pc-$s")
  done
  timeout -k 10 "$PC_SECS" vng "${vng_args[@]}" "${accel[@]}" --qemu-opts="${qopts[*]}" \
    --exec "bash $ROOT/tests/kernel/powercut.sh $1 $PC $BINS" </dev/null >"$PC/console-$1.log" 2>&1 &
  VNG=$!
}
if [ "$POWERCUT" = yes ]; then
  rm -rf "$PC"
  mkdir -p "$PC"
  for s in delayed rootless burst control; do truncate -s 256M "$PC/$s.img"; done
  cleanup() {
    pc_kill_qemu
    kill "$VNG" 2>/dev/null || true
  }
  trap cleanup EXIT
  say "powercut: first boot (layers, copy-ups, then the cut); console in $PC/console-cut.log"
  t0=$(date +%s)
  pc_boot cut
  wait_for "$PC/booted-cut" "$VNG" "$BOOT_SECS" "boot" "$PC/console-cut.log"
  boot1_booted=$(($(date +%s) - t0))
  wait_for "$PC/cut-now" "$VNG" "$PC_SECS" "reach the cut" "$PC/console-cut.log"
  burst_state="in the middle of the burst"
  [ -f "$PC/burst-done" ] && burst_state="after the burst had finished (not in its middle)"
  pc_kill_qemu
  wait "$VNG" || true
  say "powercut: qemu killed $burst_state, $(($(date +%s) - t0)) s after the start (booted in $boot1_booted s)"
  echo "CUT $burst_state; $(wc -l <"$PC/burst-fsynced" 2>/dev/null || echo 0) burst fsyncs done" >>"$PC/summary"
  say "powercut: second boot (recovery, then every file read); console in $PC/console-check.log"
  t0=$(date +%s)
  pc_boot check
  wait_for "$PC/booted-check" "$VNG" "$BOOT_SECS" "boot" "$PC/console-check.log"
  boot2_booted=$(($(date +%s) - t0))
  wait "$VNG" || true
  trap - EXIT
  say "powercut: second boot done in $(($(date +%s) - t0)) s (booted in $boot2_booted s)"
  grep -v '^SUMMARY' "$PC/summary" | sed 's/^/   /'
  for s in delayed rootless burst control bare; do
    grep -h -E '^(control: lost|[a-z]+: [0-9]+ files|  BAD|  lost)' "$PC/check-$s.log" 2>/dev/null | head -20 | sed 's/^/   /'
  done
fi

# ---------------------------------------------------------------- results
total=$(($(date +%s) - start_all))
failed=
dirs=()
[ "$MAIN" = yes ] && dirs+=("$OUT")
[ "$POWERCUT" = yes ] && dirs+=("$PC")
for d in "${dirs[@]}"; do
  echo "== kernel.sh $VERSION: results (${d#"$ROOT/"}/results)"
  [ -f "$d/results" ] && sed 's/^/   /' "$d/results"
  f=$(awk '$1 == "STEP" && $3 != 0 { print $2 }' "$d/results" 2>/dev/null || true)
  for s in $f; do
    echo "== step $s failed; the end of its log (in $d):"
    case "$s" in
      powercut-ops) tail -60 "$d/guest-cut.log" ;;
      # The set's part of the second boot's log (its check's output is in it).
      powercut-*) awk -v s="== ${s#powercut-}" '$0 == s { p = 1; next } /^== / { p = 0 } p' "$d/guest-check.log" | tail -60 ;;
      *) tail -60 "$d/$s.log" ;;
    esac | sed 's/^/   /'
  done
  failed="$failed $f"
  if ! grep -q '^DONE' "$d/results" 2>/dev/null; then
    console="$d/console.log"
    [ "$d" = "$PC" ] && console="$PC/console-check.log"
    tail -40 "$console" | tr -d '\000' >&2
    die "the guest run did not finish (vng exit $rc, within its deadline?): console above, logs in $d"
  fi
done
if [ -n "${failed// /}" ]; then
  die "steps failed on Linux $KVER: $(echo $failed) ($total s)"
fi
# The disks are kept for a look when a powercut step failed, else removed (~200 MiB).
[ "$POWERCUT" = yes ] && rm -f "$PC"/*.img
passed=$(cat "${dirs[@]/%//results}" | grep -c '^STEP')
say "all $passed steps passed on Linux $KVER in $total s"
