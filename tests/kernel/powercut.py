#!/usr/bin/env python3
"""The files of the power-cut test (tests/kernel/powercut.sh): made, changed, checked.

  powercut.py make LOWER...        the lower layer's files, the same in every LOWER
  powercut.py ops MNT [--cut-after K --cut-file F] [--fsync-log L] [--done-file D]
                                   the changes, through a mount, in plan order
  powercut.py check MNT SET strict|control|reference [--fsynced L]
                                   reads every file through a mount after the cut
  powercut.py marks UPPER WORKDIR  the copies the daemon has not synced yet: its flag file
                                   (WORKDIR/rustfuse-unsynced.PID) and the upper files with a mark

Every file's content comes from its path (shake-256 of it), so the checker recomputes what
"old" and "new" are: old is the lower file, new is old plus one appended line. The plan
(which file gets which change) comes from the file's index, the same for every run.
"""
import argparse
import hashlib
import json
import os
import stat
import sys

FILES = int(os.environ.get("POWERCUT_FILES", "240"))
DIRS = 4
OLD_MODE = 0o644
# One entry per index modulo len(KINDS): what `ops` does to the file.
KINDS = [
    "append",
    "append",
    "append",
    "append",
    "chmod+append",
    "chmod",
    "rename+append",
    "rename",
    "append+fsync",
    "append+fsync",
    "untouched",
    "append",
]
NEW_MODE = {"chmod+append": 0o640, "chmod": 0o600}


class Entry:
    def __init__(self, i):
        self.i = i
        self.dir = f"d{i % DIRS}"
        self.name = f"f{i:04d}"
        self.rel = f"{self.dir}/{self.name}"
        self.kind = KINDS[i % len(KINDS)]
        self.size = size_of(i)

    @property
    def renamed(self):
        return f"{self.dir}/{self.name}.renamed"

    def old(self):
        return hashlib.shake_256(self.rel.encode()).digest(self.size)

    def line(self):
        return f"appended by the power-cut test: {self.rel}\n".encode()


def size_of(i):
    """4 KiB .. 64 KiB, every 40th file 1 .. 3 MiB; every 5th a whole number of blocks."""
    if i % 40 == 0:
        size = (1 << 20) + (i * 7919 * 37) % (2 << 20)
    else:
        size = 4096 + (i * 104729) % (60 << 10)
    if i % 5 == 0:
        size = (size + 4095) // 4096 * 4096
    return size


def plan():
    return [Entry(i) for i in range(FILES)]


def make(lowers):
    for low in lowers:
        for d in range(DIRS):
            os.makedirs(os.path.join(low, f"d{d}"), exist_ok=True)
    for e in plan():
        data = e.old()
        for low in lowers:
            p = os.path.join(low, e.rel)
            with open(p, "wb") as f:
                f.write(data)
            os.chmod(p, OLD_MODE)
    total = sum(e.size for e in plan())
    print(f"made {FILES} files ({total >> 20} MiB) in each of {len(lowers)} lower layers")


def append_line(path, data, fsync):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def touch(path):
    with open(path, "w") as f:
        f.write("1\n")


def ops(mnt, cut_after, cut_file, fsync_log, done_file):
    log = os.open(fsync_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if fsync_log else None
    done = 0
    for e in plan():
        path = os.path.join(mnt, e.rel)
        if e.kind.startswith("rename"):
            os.rename(path, os.path.join(mnt, e.renamed))
            path = os.path.join(mnt, e.renamed)
        if e.kind in NEW_MODE:
            os.chmod(path, NEW_MODE[e.kind])
        if "append" in e.kind:
            append_line(path, e.line(), e.kind.endswith("fsync"))
            if e.kind.endswith("fsync") and log is not None:
                # The log is on the host (9p, mounted sync): once written it outlives the cut.
                os.write(log, f"{e.rel}\n".encode())
        done += 1
        if cut_file and done == cut_after:
            touch(cut_file)
    if done_file:
        touch(done_file)
    print(f"{mnt}: {done} changes made")


def first_diff(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n if len(a) != len(b) else None


def describe(got, old, new):
    d_old, d_new = first_diff(got, old), first_diff(got, new)
    start = min(x for x in (d_old, d_new) if x is not None)
    rest = got[start:]
    what = "all zeros" if rest.count(0) == len(rest) else f"{len(rest) - rest.count(0)} non-zero bytes"
    return (
        f"read {len(got)} bytes; old is {len(old)}, new is {len(new)}; first difference from "
        f"old at {d_old}, from new at {d_new}; from there {len(rest)} bytes, {what}"
    )


def appended_size_only(got, old, new):
    """Old content, then zeros up to the new size or short of it: an append that nobody
    synced, whose new size ext4 committed without its data (delayed allocation: a write
    past the end updates the on-disk size at once as far as the file's last allocated
    block reaches, the data waits for writeback). The copy-up is whole (the old content is
    all there); the same happens on ext4 with no overlay at all (the `bare` reference set
    shows it, file for file)."""
    tail = got[len(old) :]
    return len(old) < len(got) <= len(new) and got[: len(old)] == old and tail.count(0) == len(tail)


def check(mnt, setname, mode, fsynced_file):
    """strict: every file old, new, or old with (part of) an unsynced append's size but not
    its data (see appended_size_only); a file fsynced before the cut reads new. control: must have
    lost files. reference: counts only (a tree on ext4 with no overlay)."""
    fsynced = None
    if fsynced_file is not None:
        fsynced = set()
        if os.path.exists(fsynced_file):
            fsynced = set(open(fsynced_file).read().split())
    counts = {"old": 0, "new": 0, "old+zeros": 0, "bad": 0}
    counts.update({"renamed-new-name": 0, "renamed-old-name": 0, "mode-new": 0})
    bad = []
    expected_names = {f"d{d}": set() for d in range(DIRS)}
    for e in plan():
        old = e.old()
        new = old + e.line() if "append" in e.kind else old
        p_old = os.path.join(mnt, e.rel)
        p_new = os.path.join(mnt, e.renamed)
        path = p_old
        if e.kind.startswith("rename"):
            at_old, at_new = os.path.lexists(p_old), os.path.lexists(p_new)
            if at_old and at_new:
                bad.append(f"{e.rel} ({e.kind}): both {e.name} and {e.name}.renamed exist")
                expected_names[e.dir].update([e.name, e.name + ".renamed"])
                continue
            if not at_old and not at_new:
                bad.append(f"{e.rel} ({e.kind}): neither {e.name} nor {e.name}.renamed exists")
                continue
            path = p_new if at_new else p_old
            counts["renamed-new-name" if at_new else "renamed-old-name"] += 1
        expected_names[e.dir].add(os.path.basename(path))
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                got = f.read()
        except OSError as err:
            bad.append(f"{e.rel} ({e.kind}): {err}")
            continue
        # (A volatile mount's fsync does nothing: the control's fsynced files may read old.)
        must_be_new = (
            mode != "control" and e.kind.endswith("fsync") and (fsynced is None or e.rel in fsynced)
        )
        if got == new and "append" in e.kind:
            verdict = "new"
        elif must_be_new:
            bad.append(f"{e.rel} ({e.kind}, {os.path.basename(path)}): fsynced before the cut, "
                       f"must read new: {describe(got, old, new)}")
            continue
        elif got == old:
            verdict = "old"
        elif "append" in e.kind and appended_size_only(got, old, new):
            verdict = "old+zeros"
        else:
            bad.append(f"{e.rel} ({e.kind}, {os.path.basename(path)}): {describe(got, old, new)}")
            continue
        m = stat.S_IMODE(st.st_mode)
        if m == NEW_MODE.get(e.kind):
            counts["mode-new"] += 1
        elif m != OLD_MODE:
            bad.append(f"{e.rel} ({e.kind}): mode {m:o}, neither old {OLD_MODE:o} nor new")
            continue
        counts[verdict] += 1
    for d, names in expected_names.items():
        try:
            listed = set(os.listdir(os.path.join(mnt, d)))
        except OSError as err:
            bad.append(f"{d}: {err}")
            continue
        extra = sorted(listed - names)
        if extra and mode == "strict":
            bad.append(f"{d}: names no file of the plan has: {extra[:10]}")
    counts["bad"] = len(bad)
    counts["fsynced-logged"] = len(fsynced) if fsynced is not None else None
    line = (
        f"{setname}: {FILES} files: old {counts['old']}, new {counts['new']}, old+zeros "
        f"{counts['old+zeros']} (an append not synced: its size without its data), bad "
        f"{counts['bad']} (renamed: {counts['renamed-new-name']} under the new name, "
        f"{counts['renamed-old-name']} under the old; new mode kept: {counts['mode-new']})"
    )
    if mode == "reference":
        print(line.replace(" bad ", " other "))
        print("SUMMARY " + json.dumps({"set": setname, "mode": mode, **counts}))
        return 0
    if mode == "control":
        # The control (-o volatile: no fsync at all, as fuse-overlayfs) must have lost files
        # to the cut, or the cut dropped nothing and proved nothing.
        lost = len(bad)
        print(f"{setname}: lost {lost} of {FILES} files (neither old nor new content)")
        for b in bad[:5]:
            print(f"  lost: {b}")
        print("SUMMARY " + json.dumps({"set": setname, "mode": mode, "lost": lost, **counts}))
        if lost == 0:
            print(f"{setname}: FAILED: the control lost nothing: the power cut was not real")
            return 1
        return 0
    for b in bad:
        print(f"  BAD {b}")
    print(line)
    print("SUMMARY " + json.dumps({"set": setname, "mode": mode, **counts}))
    return 1 if bad else 0


MARKS = ["trusted.overlay.rustfuse.unsynced", "user.overlay.rustfuse.unsynced"]


def marks(upper, workdir):
    flag = any(n.startswith("rustfuse-unsynced") for n in os.listdir(workdir))
    marked = []
    for top, _, files in os.walk(upper):
        for f in files:
            p = os.path.join(top, f)
            for x in MARKS:
                try:
                    v = os.getxattr(p, x, follow_symlinks=False)
                except OSError:
                    continue
                marked.append(f"{os.path.relpath(p, upper)} {x}={v.decode(errors='replace')}")
    print(f"flag {'present' if flag else 'absent'}, {len(marked)} marked")
    for m in marked[:5]:
        print(f"  {m}")
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("lowers", nargs="+")
    o = sub.add_parser("ops")
    o.add_argument("mnt")
    o.add_argument("--cut-after", type=int, default=0)
    o.add_argument("--cut-file")
    o.add_argument("--fsync-log")
    o.add_argument("--done-file")
    c = sub.add_parser("check")
    c.add_argument("mnt")
    c.add_argument("set")
    c.add_argument("mode", choices=["strict", "control", "reference"])
    c.add_argument("--fsynced")
    k = sub.add_parser("marks")
    k.add_argument("upper")
    k.add_argument("workdir")
    a = ap.parse_args()
    if a.cmd == "marks":
        return marks(a.upper, a.workdir)
    if a.cmd == "make":
        make(a.lowers)
        return 0
    if a.cmd == "ops":
        ops(a.mnt, a.cut_after, a.cut_file, a.fsync_log, a.done_file)
        return 0
    return check(a.mnt, a.set, a.mode, a.fsynced)


if __name__ == "__main__":
    sys.exit(main())
