#!/usr/bin/env bash
# Runs inside the guests that tests/kernel.sh boots for its powercut step (as root, the host's
# filesystem shared read-only): the two halves of a power cut in the middle of copy-ups.
# Usage: powercut.sh cut|check OUT BINS_ENV
#   OUT       host directory shared read-write (9p, mounted sync: a line written there is on
#             the host when write returns, and outlives the cut): `booted`, `results`, logs
#   BINS_ENV  kernel.sh's list of the binaries (PRIVATE_BIN: its copy of rustfuse)
#
# The layers are on four virtual disks (qemu files, cache=writeback: what the guest wrote
# to a disk is in the host's page cache and stays when qemu is killed; what the guest kept
# in its own page cache is gone, as in a power cut). One ext4 each, mounted with commit=1,
# so that no layer set's fsync or syncfs can flush another's data:
#   delayed   root, RUSTFUSE_SYNC_DELAY_MS=600000: copies published and never synced before
#             the cut (the syncer waits 10 minutes); recovery at the next mount must bring
#             each back to its old content
#   rootless  the same as a non-root user in `unshare -Urm` (user.* marks)
#   burst     root, the default syncer: the host cuts the power while its copy-ups run
#   control   root, -o volatile (no fsync at all, as fuse-overlayfs): it must lose files,
#             or the cut was not real and the test proves nothing; on its disk too, `bare`:
#             the same files and changes with no overlay, a reference (counted, not judged)
# Each set's lower layer has the same 240 files (powercut.py: 4 KiB .. 3 MiB, 19 MiB in all,
# content from the path); `ops` appends a line to most of them, chmods, renames, appends and
# fsyncs some.
#
# cut (first boot): makes the disks, the layers and the mounts, runs `ops` on delayed,
#   rootless and control, waits 3 s (journal commits: the renames into place are on disk),
#   starts the burst and writes OUT/cut-now after a quarter of it; kernel.sh then kills qemu.
# check (second boot): mounts the disks (the journal replays), counts each set's copies left
#   unsynced (the flag <workdir>/rustfuse-unsynced.PID, the upper files with a mark: what the
#   recovery has to do), mounts rustfuse again (its recovery runs), reads every file
#   through the mount: each must read its old or its new content (a file appended to and
#   fsynced before the cut: new), nothing empty or partial; after a clean unmount no flag and
#   no mark is left. The control must have lost some files.
#   One more outcome is accepted, and counted apart (old+zeros): the old content whole, then
#   zeros up to at most the new size. That is an append nobody synced, whose new size ext4
#   committed without its data (delayed allocation: the size moves as far as the last
#   allocated block at once, the data waits for writeback); the copy-up under it is whole.
#   `bare` shows the same on ext4 with no overlay (the fsync-per-copy-up daemon gave, file
#   for file, the same counts as bare). A lost copy-up reads otherwise: empty, short, or
#   zeros where the old content was (what the control shows).
set -uo pipefail
PHASE="$1"
OUT="$2"
BINS="$3"
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC1090
. "$BINS"
exec >"$OUT/guest-$PHASE.log" 2>&1
export CI=true
SETS="delayed rootless burst control"
NOBODY=65534
# Guest-only copies (the rootless user cannot reach the host's target/ through 9p).
B=/run/powercut-bin
mkdir -p "$B"
cp "$PRIVATE_BIN/rustfuse" "$HERE/powercut.py" "$B/"
chmod 0755 "$B" "$B/rustfuse" "$B/powercut.py"
PY="python3 $B/powercut.py"

for m in fuse virtio_blk ext4; do modprobe "$m" || echo "modprobe $m failed"; done
chmod 0666 /dev/fuse

result() { echo "STEP $1 $2 $3" >>"$OUT/results"; }

# The disk of a set: kernel.sh gives each one the serial pc-SET.
disk_of() {
  local b
  for b in /sys/block/vd*; do
    [ "$(cat "$b/serial" 2>/dev/null)" = "pc-$1" ] && { echo "/dev/${b##*/}"; return 0; }
  done
  return 1
}

running() { [ -n "$1" ] && [ -e "/proc/$1" ] && ! grep -q '^[^ ]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
wait_mount() { # wait_mount DIR [NSPID]: polls mountinfo (of NSPID's namespace) with a deadline
  local info=/proc/self/mountinfo i
  [ -n "${2:-}" ] && info=/proc/$2/mountinfo
  for i in $(seq 300); do
    grep -q " $1 " "$info" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no mount at $1 after 30 s"
  return 1
}

# rustfuse_mount SET [ENV...]: mounts rustfuse on SET's layers at /run/pc/SET/mnt (as root,
# or for rootless inside a user namespace that stays while its daemon runs).
rustfuse_mount() {
  local set=$1 d=/run/pc/$1
  shift
  local opts="lowerdir=$d/lower,upperdir=$d/upper,workdir=$d/work"
  [ "$set" = control ] && opts="$opts,volatile"
  if [ "$set" = rootless ]; then
    timeout 60 setpriv --reuid=$NOBODY --regid=$NOBODY --clear-groups env "$@" \
      unshare -Urm sh -c 'exec "$1" -o "$2" "$3"' sh "$B/rustfuse" "$opts" "$d/mnt" || return 1
    return 0
  fi
  timeout 60 env "$@" "$B/rustfuse" -o "$opts" "$d/mnt" || return 1
  wait_mount "$d/mnt"
}

# daemon_of SET: the pid of the rustfuse daemon serving SET's mount.
daemon_of() { pgrep -f "^$B/rustfuse -o lowerdir=/run/pc/$1/lower," | head -1; }

# in_set SET COMMAND...: runs COMMAND where SET's mount is seen (the rootless one: in the
# namespace of its daemon, as the non-root user).
in_set() {
  local set=$1
  shift
  if [ "$set" = rootless ]; then
    local pid
    pid=$(daemon_of rootless)
    [ -n "$pid" ] || { echo "no rootless rustfuse daemon"; return 1; }
    # As the non-root user, entering the namespace it owns (root there, the user outside;
    # its credentials kept: setgroups is denied in it).
    setpriv --reuid=$NOBODY --regid=$NOBODY --clear-groups \
      nsenter -t "$pid" -U -m --preserve-credentials -- "$@"
  else
    "$@"
  fi
}

list_unsynced() { # list_unsynced SET WHEN: the copies the set's daemon has not synced yet
  local r
  r=$($PY marks "/run/pc/$1/upper" "/run/pc/$1/work")
  echo "$1 $2: $r"
  echo "UNSYNCED $1 $2: $(echo "$r" | head -1)" >>"$OUT/summary"
}

t_phase=$(date +%s)
echo "Linux $(uname -r), boot $(cat /proc/sys/kernel/random/boot_id), phase $PHASE" >"$OUT/booted.new"
mv "$OUT/booted.new" "$OUT/booted-$PHASE" # kernel.sh waits for it
cat "$OUT/booted-$PHASE"

if [ "$PHASE" = cut ]; then
  set -e
  : >"$OUT/results"
  : >"$OUT/summary"
  t0=$(date +%s)
  for s in $SETS; do
    dev=$(disk_of "$s")
    mkfs.ext4 -q -F -b 4096 "$dev"
    mkdir -p "/run/pc/$s"
    mount -o commit=1 "$dev" "/run/pc/$s"
    mkdir -p "/run/pc/$s/lower" "/run/pc/$s/upper" "/run/pc/$s/work" "/run/pc/$s/mnt"
  done
  # shellcheck disable=SC2046
  $PY make $(for s in $SETS; do echo "/run/pc/$s/lower"; done) /run/pc/control/bare
  chown -R $NOBODY:$NOBODY /run/pc/rootless
  sync
  # From here on nothing is written back unless someone syncs: data not synced stays in the
  # page cache, which the cut takes.
  echo 0 >/proc/sys/vm/dirty_writeback_centisecs
  echo 360000 >/proc/sys/vm/dirty_expire_centisecs
  echo 80 >/proc/sys/vm/dirty_background_ratio
  echo 90 >/proc/sys/vm/dirty_ratio
  echo "disks and layers in $(($(date +%s) - t0)) s"
  set +e
  rc=0
  for s in $SETS; do
    echo "== mounting $s"
    if [ "$s" = burst ]; then
      rustfuse_mount "$s" || rc=1
    else
      rustfuse_mount "$s" RUSTFUSE_SYNC_DELAY_MS=600000 || rc=1
    fi
  done
  if [ "$rc" = 0 ]; then
    wait_mount /run/pc/rootless/mnt "$(daemon_of rootless)" || rc=1
  fi
  grep ' fuse' /proc/self/mountinfo
  t0=$(date +%s)
  for s in delayed rootless control; do
    [ "$rc" = 0 ] || break
    echo "== ops on $s"
    in_set "$s" timeout 300 $PY ops "/run/pc/$s/mnt" || rc=1
  done
  # The reference: the same changes to a copy of the lower files on ext4, no overlay.
  [ "$rc" = 0 ] && { timeout 300 $PY ops /run/pc/control/bare || rc=1; }
  echo "ops on delayed, rootless, control, bare: exit $rc in $(($(date +%s) - t0)) s"
  result powercut-ops "$rc" $(($(date +%s) - t0))
  # The renames into place reach the journal within a second (commit=1); the data not synced
  # stays in the page cache.
  sleep 3
  for s in delayed rootless control; do list_unsynced "$s" before-cut; done
  echo "== the burst (kernel.sh cuts the power after a quarter of it)"
  t0=$(date +%s)
  timeout 300 $PY ops /run/pc/burst/mnt --cut-after $((${POWERCUT_FILES:-240} / 4)) --cut-file "$OUT/cut-now" \
    --fsync-log "$OUT/burst-fsynced" --done-file "$OUT/burst-done"
  rc=$?
  echo "the burst finished before the cut, in $(($(date +%s) - t0)) s (exit $rc)"
  [ -f "$OUT/cut-now" ] || touch "$OUT/cut-now" # its ops failed early: cut all the same
  sleep 600
  exit 1
fi

# ---------------------------------------------------------------- check (the second boot)
rc_all=0
for s in $SETS; do
  dev=$(disk_of "$s")
  mkdir -p "/run/pc/$s"
  mount "$dev" "/run/pc/$s" || { result "powercut-$s" 1 0; rc_all=1; continue; }
done
if mountpoint -q /run/pc/control; then
  echo "== bare (the reference: the same changes on ext4 with no overlay)"
  timeout 300 $PY check /run/pc/control/bare bare reference >"$OUT/check-bare.log" 2>&1
  cat "$OUT/check-bare.log"
  grep -h '^SUMMARY' "$OUT/check-bare.log" >>"$OUT/summary"
fi
for s in $SETS; do
  mountpoint -q "/run/pc/$s" || continue
  t0=$(date +%s)
  echo "== $s"
  list_unsynced "$s" before-mount
  echo "$s: $(($(date +%s) - t0)) s: mounting (the recovery runs)"
  rc=0
  rustfuse_mount "$s" || rc=1
  if [ "$rc" = 0 ] && [ "$s" = rootless ]; then
    wait_mount /run/pc/rootless/mnt "$(daemon_of rootless)" || rc=1
  fi
  echo "$s: $(($(date +%s) - t0)) s: mounted (exit $rc)"
  if [ "$rc" = 0 ]; then
    mode=strict
    [ "$s" = control ] && mode=control
    extra=()
    [ "$s" = burst ] && extra=(--fsynced "$OUT/burst-fsynced")
    in_set "$s" timeout 300 $PY check "/run/pc/$s/mnt" "$s" "$mode" "${extra[@]}" >"$OUT/check-$s.log" 2>&1 || rc=1
    echo "$s: $(($(date +%s) - t0)) s: checked"
    cat "$OUT/check-$s.log"
    grep -h '^SUMMARY' "$OUT/check-$s.log" >>"$OUT/summary"
    list_unsynced "$s" mounted
    pid=$(daemon_of "$s")
    if [ "$s" = rootless ]; then
      in_set rootless timeout 60 umount /run/pc/rootless/mnt || rc=1
    else
      timeout 60 umount "/run/pc/$s/mnt" || rc=1
    fi
    # A clean unmount drains the syncer's queue: the daemon exits when it is done (and
    # stays a zombie: the guest's init does not reap it).
    for _ in $(seq 300); do running "$pid" || break; sleep 0.1; done
    if running "$pid"; then
      echo "$s: the daemon $pid still runs 30 s after its unmount"
      rc=1
    fi
    list_unsynced "$s" after-umount
    # Every mark and the flag must be gone once recovery ran and the queue drained (a
    # volatile mount makes none).
    if ! grep -q "^UNSYNCED $s after-umount: flag absent, 0 marked" "$OUT/summary"; then
      echo "$s: marks or the flag left after recovery and a clean unmount"
      rc=1
    fi
  fi
  result "powercut-$s" "$rc" $(($(date +%s) - t0))
  [ "$rc" = 0 ] || rc_all=1
done
for s in $SETS; do umount "/run/pc/$s" 2>/dev/null; done
echo "check phase: exit $rc_all in $(($(date +%s) - t_phase)) s"
echo "DONE" >>"$OUT/results"
