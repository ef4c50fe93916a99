#!/usr/bin/env bash
# Runs inside the guest that tests/kernel.sh boots (as root, the host's filesystem shared
# read-only, /etc writable in a guest-only overlay): prepares the guest, then runs the chosen
# test executables built on the host. Usage: guest.sh OUT BINS_ENV [STEPS]
#   OUT       host directory shared read-write: `booted`, `results`, one STEP.log per step
#   BINS_ENV  TEST_BIN_<name>=<path> lines (the executables cargo built on the host)
#   STEPS     space-separated step names to run (empty: the default ones; `all`: every one)
#
# Which tests, and why: only what meets the kernel (TCG runs about 10x slower than the host,
# and the stage must stay under ~25 minutes), every one with CI=true so nothing can skip:
#   differential   the mount program against the guest kernel's own overlayfs as the oracle,
#                  as root: every FUSE opcode and errno path, as 5.10 serves them (FUSE 7.32)
#   reads          reads of every shape give the layer's bytes (tests/tests/reads.rs): the
#                  splice(2) replies as this kernel's splice and /dev/fuse take them
#   options        every fuse-overlayfs option, as root (uid/gid mapping, noxattrs, timeout,
#                  xattr_permissions, ...): INIT flags and attribute caching of this kernel
#   rootless       a non-root user mounting inside `unshare -Urm` (FUSE in a user namespace)
#   fusermount3    a non-root user with no namespace: mount(2) answers EPERM and rustfuse
#                  mounts through the setuid fusermount3, then `fusermount3 -u`
#   lifecycle      mount.fuse3, mount(8), /dev/fd/N, umount -l, fusermount3 -u, EROFS
#   doctor         the snapshotter's mode choice: kernel overlayfs as root, FUSE in a user
#                  namespace (5.10 refuses overlayfs there), decided from the trial mount
#   conformance    the snapshotter's conformance suite in FUSE mode as a rootless user under
#                  RootlessKit, and --mode auto there (FUSE on 5.10)
#   containerd     containerd 1.6 `ctr run` with the snapshotter in FUSE mode (mount.fuse3)
#   buildah        a rootless `buildah bud` with rustfuse as mount_program, its four-step
#                  form (rootless_build's buildah_bud_quick_same_layers_as_reference: copy-ups,
#                  whiteouts, `rm -rf DIR && mkdir DIR`, renames of a file and a directory,
#                  chmod, chown, setuid bit, hard-link groups changed through one name, COPY;
#                  a last RUN checks it all through the committed layers), compared with the
#                  same build that kernel.sh made on the host before booting, on the same base
#                  image: diff IDs and every entry of every layer (`--timestamp 0` makes the
#                  build reproducible). Each step of `buildah bud` costs 30-50 s under TCG,
#                  nearly all of it buildah's own (its re-executions as buildah-chroot-runtime
#                  and buildah-chroot-exec, 1.5-4 s per start of its binary here, and the
#                  commit), little of it rustfuse's: hence four steps, about 4 minutes (227 and 270 s)
#   buildah-small  (only when asked: KERNEL_STEPS=buildah-small or all) the ten-step build of
#                  the host's test in its smaller form (RUSTFUSE_TEST_BUILDAH_REFERENCES=none,
#                  RUSTFUSE_TEST_BUILDAH_SIZE=small: a tenth of the files, the same steps),
#                  checked against what its Dockerfile must produce; about 16 minutes under TCG
#                  on a loaded 2-core host (buildah bud 748 s of its 963)
# Not run here: powercut (two boots of its own, on virtual disks: kernel.sh and powercut.sh);
# the scale, load, crash-loop, fuzz and BuildKit stages (they test the daemon's
# own logic, which does not change with the kernel, and would not fit in TCG time).
set -uo pipefail
OUT="$1"
BINS="$2"
DEFAULT_STEPS="differential reads options rootless lifecycle fusermount3 doctor conformance containerd buildah"
case "${3:-}" in
  "") STEPS=$DEFAULT_STEPS ;;
  all) STEPS="$DEFAULT_STEPS buildah-small" ;;
  *) STEPS=$3 ;;
esac
# shellcheck disable=SC1090
. "$BINS"
exec >"$OUT/guest.log" 2>&1
export CI=true

want() { [[ " $STEPS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- preparation
for m in fuse overlay loop ext4; do modprobe "$m" || echo "modprobe $m failed"; done
chmod 0666 /dev/fuse
# Test data on ext4 on a loop device backed by a guest tmpfs: 5.10's tmpfs has no user.*
# xattrs, and the shared host root is read-only 9p.
mkdir -p /run/kernel-img /tmp/kdata
mount -t tmpfs -o size=3G tmpfs /run/kernel-img
truncate -s 3G /run/kernel-img/data.ext4
mkfs.ext4 -q -F /run/kernel-img/data.ext4
mount -o loop /run/kernel-img/data.ext4 /tmp/kdata
mkdir -p /tmp/kdata/tmp
chmod 1777 /tmp/kdata /tmp/kdata/tmp
export TMPDIR=/tmp/kdata/tmp
# TCG is slow (and the host's cores are shared): room for every deadline that is not a hang.
export RUSTFUSE_TEST_WATCHDOG_SECS=600 RUSTFUSE_TEST_TIME_SCALE=4
# The binaries under test: kernel.sh's private copies, also where tests look for them by a
# path fixed at build time (target/debug/), so that a rebuild on the host cannot change them
# under a running test.
for b in rustfuse rustfuse-snapshotter; do
  mount --bind "$PRIVATE_BIN/$b" "$TARGET_DEBUG/$b"
done
RUSTFUSE="$PRIVATE_BIN/rustfuse"
SNAPSHOTTER="$PRIVATE_BIN/rustfuse-snapshotter"
export RUSTFUSE_BIN="$RUSTFUSE" RUSTFUSE_SNAPSHOTTER_BIN="$SNAPSHOTTER"
export RUSTFUSE_CONFORMANCE_BIN="$TEST_BIN_conformance"
export PATH="$PRIVATE_BIN:$PATH"
fuse_api=$(dmesg | sed -n 's/.*fuse:\{0,1\} init (API version \(.*\))/\1/p' | head -1) # 4.15: "fuse init"
echo "Linux $(uname -r), FUSE API $fuse_api" >"$OUT/booted.new"
mv "$OUT/booted.new" "$OUT/booted" # kernel.sh waits for it: whole, not half written
cat "$OUT/booted"

: >"$OUT/results"
step() { # step NAME SECONDS COMMAND...: runs COMMAND with a deadline, logs to OUT/NAME.log
  local name=$1 secs=$2
  shift 2
  want "$name" || return 0
  echo "== step $name (deadline $secs s)"
  local t0 rc
  t0=$(date +%s)
  (cd "$TMPDIR" && timeout -k 10 "$secs" "$@") >"$OUT/$name.log" 2>&1
  rc=$?
  echo "STEP $name $rc $(($(date +%s) - t0))" >>"$OUT/results"
  echo "== step $name: exit $rc in $(($(date +%s) - t0)) s"
}

# ---------------------------------------------------------------- the kernel's facts
# What this kernel does, recorded for docs/compatibility.md (informational, not a step).
{
  echo "uname: $(uname -r)"
  echo "fuse API: $fuse_api"
  d=$(mktemp -d)
  mkdir -p "$d/l" "$d/u" "$d/w" "$d/m"
  chmod -R 0777 "$d"
  echo lower >"$d/l/f"
  # With userxattr (5.11+), else without (Ubuntu's kernels allowed it before 5.11), as the
  # snapshotter's trial mounts do; and whether a lower file can be deleted there (a whiteout).
  ovl_userns=no
  for extra in ,userxattr ""; do
    r=$(setpriv --reuid=65534 --regid=65534 --clear-groups unshare -Urm sh -c '
      mount -t overlay overlay -o "lowerdir=$1/l,upperdir=$1/u,workdir=$1/w$2" "$1/m" 2>/dev/null || exit 9
      rm "$1/m/f" 2>&1 && echo ok' sh "$d" "$extra") && rc=0 || rc=$?
    if [ "$rc" != 9 ]; then
      [ -n "$extra" ] && how=${extra#,} || how="without userxattr"
      ovl_userns="yes ($how; unlink of a lower file: $r)"
      break
    fi
  done
  echo "overlayfs in a user namespace: $ovl_userns"
  if setpriv --reuid=65534 --regid=65534 --clear-groups unshare -Urm mknod "$d/u/wh" c 0 0 2>/dev/null; then
    echo "whiteout (mknod c 0 0) in a user namespace: yes"
  else
    echo "whiteout (mknod c 0 0) in a user namespace: no"
  fi
  # A FUSE mount(2) by a non-root user in its own namespace (4.18+; no daemon needed to
  # mount: the namespace and the /dev/fuse descriptor go when the shell exits).
  mkdir -p "$d/um"
  if setpriv --reuid=65534 --regid=65534 --clear-groups unshare -Urm sh -c \
    'exec 3<>/dev/fuse && mount -i -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0 probe "$1"' \
    sh "$d/um" 2>/dev/null; then
    echo "FUSE in a user namespace: yes"
  else
    echo "FUSE in a user namespace: no"
  fi
  mkdir -p /run/xt && mount -t tmpfs tmpfs /run/xt && touch /run/xt/f
  if setfattr -n user.x -v 1 /run/xt/f 2>/dev/null; then echo "tmpfs user.* xattrs: yes"; else echo "tmpfs user.* xattrs: no"; fi
  umount /run/xt
  # The FUSE INIT flags rustfuse takes from this kernel (its debug log).
  mkdir -p "$d/fl" "$d/fu" "$d/fw" "$d/fm"
  RUSTFUSE_LOG=debug timeout 120 "$RUSTFUSE" -f -o "lowerdir=$d/fl,upperdir=$d/fu,workdir=$d/fw" "$d/fm" 2>"$d/init.log" &
  for _ in $(seq 300); do grep -q " $d/fm " /proc/self/mountinfo && break; sleep 0.1; done
  ls "$d/fm" >/dev/null
  umount "$d/fm"
  wait
  echo "INIT flags taken: $(grep -a -m1 'capabilities negotiated' "$d/init.log" | sed 's/.*take=//')"
  rm -rf "$d"
} >"$OUT/facts" 2>&1

# ---------------------------------------------------------------- the steps

step differential 900 "$TEST_BIN_differential" --test-threads=2
step reads 300 "$TEST_BIN_reads" --test-threads=2
step options 300 "$TEST_BIN_options" --test-threads=2
step rootless 300 "$TEST_BIN_rootless" --test-threads=2
step lifecycle 300 "$TEST_BIN_lifecycle" --test-threads=2

# A non-root user with no namespace of its own: the mount goes through setuid fusermount3.
fusermount3_step() {
  set -eu
  local d
  d=$(mktemp -d)
  mkdir -p "$d/lower" "$d/upper" "$d/work" "$d/mnt"
  echo "from lower" >"$d/lower/file"
  cp "$RUSTFUSE" "$d/rustfuse"
  chown -R 65534:65534 "$d"
  chmod 0755 "$d"
  setpriv --reuid=65534 --regid=65534 --clear-groups sh -eu -c '
    D=$1
    "$D/rustfuse" -o "lowerdir=$D/lower,upperdir=$D/upper,workdir=$D/work" "$D/mnt"
    grep " $D/mnt " /proc/self/mountinfo
    test "$(cat "$D/mnt/file")" = "from lower"
    echo written > "$D/mnt/new"
    echo more >> "$D/mnt/file"
    rm "$D/mnt/file"
    test ! -e "$D/mnt/file"
    fusermount3 -u "$D/mnt"
    ! grep -q " $D/mnt " /proc/self/mountinfo
  ' sh "$d"
  test "$(cat "$d/upper/new")" = written
  ls -la "$d/upper"
  rm -rf "$d"
  echo "fusermount3: ok"
}
step fusermount3 120 bash -c "$(declare -f fusermount3_step); RUSTFUSE=$RUSTFUSE fusermount3_step"

# doctor: overlay as root; FUSE in a user namespace, where 5.10 refuses overlayfs.
doctor_step() {
  set -eu
  local d out
  d=$(mktemp -d)
  chmod 0777 "$d"
  export PATH="$(dirname "$SNAPSHOTTER"):$PATH"
  out=$("$SNAPSHOTTER" doctor --root "$d/root-as-root")
  echo "$out"
  echo "$out" | grep -q '^mode: *overlay' || { echo "doctor as root does not pick overlay"; exit 1; }
  out=$(setpriv --reuid=65534 --regid=65534 --clear-groups unshare -Urm \
    "$SNAPSHOTTER" doctor --root "$d/root-in-userns")
  echo "$out"
  echo "$out" | grep -q '^user namespace: *yes' || { echo "doctor did not see the user namespace"; exit 1; }
  # Kernel overlayfs in a user namespace only with userxattr: without it (Ubuntu's kernels
  # before 5.11 mount it) a directory removed and made again shows the lower one's entries
  # (4 of the 32 overlay:: conformance cases fail so under RootlessKit on Ubuntu's 4.15).
  if ! grep -q 'overlayfs in a user namespace: yes (userxattr' "$OUT/facts"; then
    echo "$out" | grep -q '^mode: *fuse' || { echo "doctor in a user namespace does not pick fuse"; exit 1; }
  else
    echo "$out" | grep -q '^mode: *overlay' || { echo "doctor in a user namespace does not pick overlay"; exit 1; }
  fi
  rm -rf "$d"
  echo "doctor: ok"
}
step doctor 120 bash -c "$(declare -f doctor_step); SNAPSHOTTER=$SNAPSHOTTER OUT=$OUT doctor_step"

step conformance 1300 "$TEST_BIN_rootless_snapshotter" --exact --test-threads=1 \
  rootlesskit_conformance_fuse_mode rootlesskit_conformance_auto_mode
step containerd 600 "$TEST_BIN_containerd_e2e" --exact --test-threads=1 containerd_fuse
# kernel.sh made the reference on the host (OUT/buildah-host); a missing one fails the step.
step buildah 900 env RUSTFUSE_TEST_BUILDAH_REFERENCE="$OUT/buildah-host" "$TEST_BIN_rootless_build" \
  --ignored --exact buildah_bud_quick_same_layers_as_reference --nocapture
step buildah-small 1800 env RUSTFUSE_TEST_BUILDAH_REFERENCES=none RUSTFUSE_TEST_BUILDAH_SIZE=small \
  "$TEST_BIN_rootless_build" --exact buildah_bud_with_rustfuse_matches_fuse_overlayfs --nocapture

echo "DONE" >>"$OUT/results"
