//! Differential runs: the same layer tree and the same ops on kernel overlayfs (the oracle) and
//! on the FUSE overlay under test, compared step by step and at the end.

use std::fmt::Write as _;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::env::{Scratch, scratch};
use crate::layers::{Materialized, Tree};
use crate::mount::{Mount, timed};
use crate::ops::{Op, Outcome, apply, show};
use crate::snapshot::{Snapshot, diff, ino_changes, ino_links, snapshot};
use crate::upper::{self, UKind, Upper, describe_upper, work_leftovers};

/// Takes a snapshot with a deadline (the FUSE side could hang).
pub fn snap(root: &Path) -> Snapshot {
    let r = root.to_path_buf();
    timed(&format!("snapshot of {}", root.display()), move || {
        snapshot(&r)
    })
}

/// Kernel overlayfs features of the hard-link oracle: lower hard links keep one inode through
/// copy-up (an index in the workdir), as rustfuse's hard links do.
pub const KERNEL_INDEX: &str = "redirect_dir=off,index=on,metacopy=off";

/// Kernel overlayfs features of the directory-rename oracle: `redirect_dir=MODE` with index
/// and metacopy off, as the other oracles.
pub fn kernel_redirect_features(mode: &str) -> String {
    format!("redirect_dir={mode},index=off,metacopy=off")
}

/// `RUSTFUSE_TEST_SELF_CHECK=1`: the cases that name their side under test with
/// [`Fs::under_test_or_kernel`] run it as kernel overlayfs with the oracle's features instead,
/// to check the cases themselves (every step, view and upper layer must then agree) before
/// the filesystem under test implements what they test.
pub fn self_check() -> bool {
    std::env::var("RUSTFUSE_TEST_SELF_CHECK").is_ok_and(|v| v == "1")
}

/// Which filesystem a side of the comparison is.
#[derive(Debug, Clone)]
pub enum Fs {
    /// Kernel overlayfs.
    Kernel,
    /// Kernel overlayfs with these features instead of the defaults of [`Mount::kernel`].
    KernelWith(String),
    /// A FUSE overlay binary with extra `-o` options and environment.
    Fuse {
        /// The binary.
        bin: PathBuf,
        /// Extra mount options.
        opts: Vec<String>,
        /// Extra environment.
        env: Vec<(String, String)>,
    },
}

impl Fs {
    /// The binary under test with no extra options.
    pub fn under_test() -> Fs {
        Fs::Fuse {
            bin: crate::env::bin_under_test(),
            opts: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The binary under test with extra `-o` options.
    pub fn under_test_with(opts: &[&str]) -> Fs {
        Fs::Fuse {
            bin: crate::env::bin_under_test(),
            opts: opts.iter().map(|o| o.to_string()).collect(),
            env: Vec::new(),
        }
    }

    /// The binary under test with extra `-o` options, or under [`self_check`] kernel overlayfs
    /// with `kernel_features` (the options' kernel equivalent).
    pub fn under_test_or_kernel(opts: &[&str], kernel_features: &str) -> Fs {
        match self_check() {
            true => Fs::KernelWith(kernel_features.into()),
            false => Fs::under_test_with(opts),
        }
    }

    /// Kernel overlayfs mounted `redirect_dir=MODE` ([`kernel_redirect_features`]).
    pub fn kernel_redirect(mode: &str) -> Fs {
        Fs::KernelWith(kernel_redirect_features(mode))
    }

    /// The binary under test with `-o redirect_dir=MODE` (kernel overlayfs with the same mode
    /// under [`self_check`]).
    pub fn under_test_redirect(mode: &str) -> Fs {
        Fs::under_test_or_kernel(
            &[&format!("redirect_dir={mode}")],
            &kernel_redirect_features(mode),
        )
    }

    /// True for kernel overlayfs.
    pub fn is_kernel(&self) -> bool {
        matches!(self, Fs::Kernel | Fs::KernelWith(_))
    }

    /// Kernel overlayfs with [`KERNEL_INDEX`] (`index=on`).
    pub fn kernel_index() -> Fs {
        Fs::KernelWith(KERNEL_INDEX.into())
    }

    /// True for kernel overlayfs mounted with `index=on`: its workdir keeps `index/` entries
    /// and its upper layer holds only the names copied up through.
    pub fn indexes(&self) -> bool {
        matches!(self, Fs::KernelWith(f) if f.split(',').any(|o| o == "index=on"))
    }

    /// Mounts `m` with this filesystem.
    pub fn mount(&self, m: &Materialized) -> Result<Mount, String> {
        match self {
            Fs::Kernel => Mount::kernel(&m.stack, &m.mnt),
            Fs::KernelWith(f) => Mount::kernel_with(&m.stack, &m.mnt, f),
            Fs::Fuse { bin, opts, env } => {
                let o: Vec<&str> = opts.iter().map(String::as_str).collect();
                let e: Vec<(&str, &str)> =
                    env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                Mount::fuse_env(bin, &m.stack, &o, &m.mnt, &e)
            }
        }
    }

    /// Short name for reports.
    pub fn name(&self) -> String {
        match self {
            Fs::Kernel | Fs::KernelWith(_) => "kernel".into(),
            Fs::Fuse { bin, .. } => bin
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "fuse".into()),
        }
    }
}

/// One side of a comparison: its layers, its mount, what it answered.
pub struct Side {
    /// Which filesystem.
    pub fs: Fs,
    /// Name in reports (`kernel`, `fuse-overlayfs`, `rustfuse`).
    pub name: String,
    /// The layer directories.
    pub mat: Materialized,
    /// The live mount (None after unmount).
    pub mount: Option<Mount>,
    /// Outcome of every op so far.
    pub outcomes: Vec<Outcome>,
    /// Outcome of every op of the preparation ([`Pair::prepared`]).
    pub prep_outcomes: Vec<Outcome>,
}

impl Side {
    fn root(&self) -> &Path {
        self.mount.as_ref().expect("mounted").root()
    }
}

/// Two sides run in lockstep: `a` is the oracle (kernel), `b` the filesystem under test.
pub struct Pair {
    /// Oracle.
    pub a: Side,
    /// Under test.
    pub b: Side,
    /// Ops applied so far.
    pub ops: Vec<Op>,
    /// Ops applied before the sides were mounted for the comparison ([`Pair::prepared`]).
    pub prep_ops: Vec<Op>,
    before: (Snapshot, Snapshot),
    /// A deliberate difference from the oracle, with its reason: inode identity and
    /// nlink-vs-names findings are reported as notes instead of failures.
    pub known_inode_deviation: Option<&'static str>,
    // Declared last: dropped after the mounts.
    _scratch: Scratch,
}

/// The kernel oracle's outcome of `op`, with the answers that differ only between kernel
/// versions, where rustfuse gives the newer one, put in that form (docs/compatibility.md,
/// "Tested kernels"): decided from what the kernel answered, not from its version.
///
/// - A get of one of overlayfs's own `trusted.overlay.*` xattrs: Linux 5.10 answers
///   EOPNOTSUPP, 6.x (and rustfuse, and fuse-overlayfs) ENODATA.
fn oracle_outcome(op: &Op, o: Outcome) -> Outcome {
    match (op, &o) {
        (Op::GetXattr { name, .. }, Err(e))
            if name.starts_with("trusted.overlay.") && e == "EOPNOTSUPP" =>
        {
            eprintln!(
                "note: kernel overlayfs answers EOPNOTSUPP to a get of {name} (Linux 5.10); compared as ENODATA, the answer of 6.x"
            );
            Err("ENODATA".into())
        }
        _ => o,
    }
}

/// Everything compared at the end of a run.
#[derive(Default)]
pub struct Findings {
    /// Mismatches: each one fails the test.
    pub failures: Vec<String>,
    /// Oddities of the oracle itself, reported but not failing.
    pub notes: Vec<String>,
}

impl Pair {
    /// Materializes `tree` twice and mounts it with `a` and `b`.
    pub fn new(name: &str, tree: &Tree, a: Fs, b: Fs) -> Result<Pair, String> {
        Self::with_mode(name, tree, a, b, false)
    }

    /// [`Pair::new`], read-only (no upper layer) when `readonly`.
    pub fn with_mode(
        name: &str,
        tree: &Tree,
        a: Fs,
        b: Fs,
        readonly: bool,
    ) -> Result<Pair, String> {
        Self::with_trees(name, (tree, a), (tree, b), readonly)
    }

    /// [`Pair::with_mode`] with a tree of its own for each side: the same layers in another
    /// on-disk format (`.wh.` whiteouts for the side under test where the kernel has char 0/0).
    pub fn with_trees(
        name: &str,
        a: (&Tree, Fs),
        b: (&Tree, Fs),
        readonly: bool,
    ) -> Result<Pair, String> {
        Self::build(name, [(a.0, None, a.1), (b.0, None, b.1)], readonly, &[])
    }

    /// A pair whose layers were first written by other mounts: each side's copy of `tree` is
    /// mounted with its `prep` filesystem, `prep_ops` run there (outcomes in
    /// [`Side::prep_outcomes`]; [`Pair::finish`] fails when they differ), it is unmounted, then
    /// mounted with `fs` for the comparison. How one filesystem reading the layers another
    /// wrote (kernel overlayfs's redirects read by rustfuse, or the reverse) is checked.
    pub fn prepared(
        name: &str,
        tree: &Tree,
        a: (Fs, Fs),
        b: (Fs, Fs),
        prep_ops: &[Op],
    ) -> Result<Pair, String> {
        Self::build(
            name,
            [(tree, Some(a.0), a.1), (tree, Some(b.0), b.1)],
            false,
            prep_ops,
        )
    }

    fn build(
        name: &str,
        sides_spec: [(&Tree, Option<Fs>, Fs); 2],
        readonly: bool,
        prep_ops: &[Op],
    ) -> Result<Pair, String> {
        let s = scratch(name);
        let mut sides = Vec::new();
        for ((tree, prep, fs), dir) in sides_spec.into_iter().zip(["a", "b"]) {
            let dir = s.path().join(dir);
            let mat = if readonly {
                tree.materialize_ro(&dir)
            } else {
                tree.materialize(&dir)
            }
            .map_err(|e| format!("materialize layers: {e}"))?;
            let mut prep_outcomes = Vec::new();
            if let Some(prep) = prep {
                let m = prep.mount(&mat).map_err(|e| format!("preparation: {e}"))?;
                prep_outcomes = crate::ops::run(m.root(), prep_ops);
                if prep.is_kernel() {
                    prep_outcomes = prep_ops
                        .iter()
                        .zip(prep_outcomes)
                        .map(|(op, o)| oracle_outcome(op, o))
                        .collect();
                }
                m.unmount()
                    .map_err(|e| format!("preparation: unmount: {e}"))?;
            }
            let mount = fs.mount(&mat)?;
            let name = fs.name();
            sides.push(Side {
                fs,
                name,
                mat,
                mount: Some(mount),
                outcomes: Vec::new(),
                prep_outcomes,
            });
        }
        let mut b = sides.pop().expect("two sides");
        let a = sides.pop().expect("two sides");
        if a.name == b.name {
            b.name.push_str("#2");
        }
        let before = (snap(a.root()), snap(b.root()));
        Ok(Pair {
            known_inode_deviation: None,
            a,
            b,
            ops: Vec::new(),
            prep_ops: prep_ops.to_vec(),
            before,
            _scratch: s,
        })
    }

    /// Applies `op` to both sides; returns a message when the outcomes differ.
    pub fn step(&mut self, op: &Op) -> Option<String> {
        let mut outs = Vec::new();
        for side in [&mut self.a, &mut self.b] {
            let root = side.root().to_path_buf();
            let op2 = op.clone();
            let mut o = timed(&format!("{} {op:?}", side.name), move || apply(&root, &op2));
            if !matches!(side.fs, Fs::Fuse { .. }) {
                o = oracle_outcome(op, o);
            }
            side.outcomes.push(o.clone());
            outs.push(o);
        }
        self.ops.push(op.clone());
        (outs[0] != outs[1]).then(|| {
            format!(
                "step {} {op:?}: {} {} / {} {}",
                self.ops.len(),
                self.a.name,
                show(&outs[0]),
                self.b.name,
                show(&outs[1])
            )
        })
    }

    /// The table of steps with their outcomes, mismatches marked `!!` (after the table of the
    /// preparation, if any).
    pub fn steps_table(&self) -> String {
        let mut t = String::new();
        if !self.prep_ops.is_empty() {
            let _ = writeln!(t, "preparation (before the mounts compared):");
            t.push_str(&self.table(&self.prep_ops, |s| &s.prep_outcomes));
            let _ = writeln!(t, "compared:");
        }
        t.push_str(&self.table(&self.ops, |s| &s.outcomes));
        t
    }

    fn table(&self, ops: &[Op], outcomes: impl Fn(&Side) -> &Vec<Outcome>) -> String {
        let mut t = String::new();
        for (i, op) in ops.iter().enumerate() {
            let (x, y) = (&outcomes(&self.a)[i], &outcomes(&self.b)[i]);
            let mark = if x == y { "  " } else { "!!" };
            let _ = writeln!(
                t,
                "{mark} {:>2}. {op:?}\n        {}: {}   {}: {}",
                i + 1,
                self.a.name,
                show(x),
                self.b.name,
                show(y)
            );
        }
        t
    }

    /// Snapshots both merged views now and compares them as [`Pair::finish`] does (view,
    /// inode identity since the start, nlink against the names seen): the findings, and the
    /// snapshots.
    pub fn compare_now(&self) -> (Findings, (Snapshot, Snapshot)) {
        let now = (snap(self.a.root()), snap(self.b.root()));
        let mut f = Findings::default();
        self.compare_views(&now, &mut f);
        (f, now)
    }

    fn compare_views(&self, after: &(Snapshot, Snapshot), f: &mut Findings) {
        let (an, bn) = (&self.a.name, &self.b.name);
        let d = diff(&after.0, an, &after.1, bn);
        if !d.is_empty() {
            f.failures
                .push(format!("merged views differ:\n  {}", d.join("\n  ")));
        }
        // What the oracle's view shows of itself, the side under test may show too (a note):
        // an oracle with index=on shows a lower hard link's true nlink even where a whiteout
        // hides some of its names; two directories redirected to one lower directory show its
        // files under both names, one inode with nlink 1.
        let oracle_problems: Vec<&String> = self
            .before
            .0
            .problems
            .iter()
            .chain(&after.0.problems)
            .collect();
        for (side, s0, s1) in [
            (&self.a, &self.before.0, &after.0),
            (&self.b, &self.before.1, &after.1),
        ] {
            let mut probs: Vec<String> = s0.problems.clone();
            probs.extend(s1.problems.iter().cloned());
            let (as_oracle, probs): (Vec<String>, Vec<String>) = match side.fs {
                Fs::Fuse { .. } => probs
                    .into_iter()
                    .partition(|p| oracle_problems.contains(&p)),
                _ => (Vec::new(), probs),
            };
            if !as_oracle.is_empty() {
                f.notes.push(format!(
                    "{} shows what the oracle shows:\n  {}",
                    side.name,
                    as_oracle.join("\n  ")
                ));
            }
            if !probs.is_empty() {
                let msg = format!(
                    "{} merged view inconsistent with itself:\n  {}",
                    side.name,
                    probs.join("\n  ")
                );
                if matches!(side.fs, Fs::Kernel | Fs::KernelWith(_)) {
                    f.notes.push(msg);
                } else if let Some(why) = self.known_inode_deviation {
                    f.notes.push(format!("known deviation ({why}): {msg}"));
                } else {
                    f.failures.push(msg);
                }
            }
        }
        let la = ino_links(&self.before.0, &after.0);
        let lb = ino_links(&self.before.1, &after.1);
        if la != lb {
            let only_a: Vec<_> = la.difference(&lb).collect();
            let only_b: Vec<_> = lb.difference(&la).collect();
            let out = match self.known_inode_deviation {
                Some(_) => &mut f.notes,
                None => &mut f.failures,
            };
            out.push(format!(
                "inode identity differs (pairs (path before ops, path after ops) with the same st_ino):\n  only {an}: {only_a:?}\n  only {bn}: {only_b:?}"
            ));
        }
    }

    /// Compares the merged views, inode behaviour, the upper dirs after unmount and the views
    /// after a remount. Consumes the pair (everything gets unmounted).
    ///
    /// Against an oracle with `index=on` ([`Fs::indexes`]) the workdirs' indexes (`index/`,
    /// `rustfuse-index`) are not leftovers, and a regular file only the side under test has in
    /// its upper dir is a note, not a difference, when it is a hard link (nlink > 1) showing in
    /// the oracle's view with the same content: the kernel links a name of an indexed inode
    /// into its upper dir only when copying up through that name.
    pub fn finish(mut self, check_remount: bool) -> Findings {
        let mut f = Findings::default();
        let (an, bn) = (self.a.name.clone(), self.b.name.clone());
        let mismatched_steps =
            self.a.outcomes != self.b.outcomes || self.a.prep_outcomes != self.b.prep_outcomes;
        if mismatched_steps {
            f.failures.push(format!(
                "errno/result of some steps differ:\n{}",
                self.steps_table()
            ));
        }
        let after = (snap(self.a.root()), snap(self.b.root()));
        self.compare_views(&after, &mut f);
        let indexed = self.a.fs.indexes();
        // Unmount, compare the upper dirs.
        let mut uppers: Vec<Upper> = Vec::new();
        let mut redirects = Vec::new();
        for side in [&mut self.a, &mut self.b] {
            if let Err(e) = side.mount.take().expect("mounted").unmount() {
                f.failures.push(format!("{}: unmount: {e}", side.name));
            }
            let (Some(up), Some(work)) = (&side.mat.stack.upper, &side.mat.stack.work) else {
                continue;
            };
            uppers.push(describe_upper(up, &side.mat.stack.lowers));
            redirects.push(crate::layers::dir_redirects(up));
            let mut left = work_leftovers(work);
            if indexed {
                left.retain(|l| !l.starts_with("index/") && l != "rustfuse-index");
                let n =
                    index_files(&work.join("index")) + index_files(&work.join("rustfuse-index"));
                f.notes.push(format!(
                    "{}: {n} index entries left in the workdir (regular files, distinct inodes)",
                    side.name
                ));
            }
            if !left.is_empty() {
                f.failures.push(format!(
                    "{}: workdir not clean after unmount: {left:?}",
                    side.name
                ));
            }
        }
        if let [x, y] = uppers.as_mut_slice() {
            if self.a.fs.is_kernel() {
                f.notes.extend(upper::drop_empty_copied_up_dirs(x, &an, y));
            }
            if indexed {
                let upper_b = self.b.mat.stack.upper.clone().expect("upper");
                f.notes
                    .extend(drop_linked_names(x, y, &upper_b, &after.0, &bn));
            }
            let d = upper::diff(x, &an, y, &bn);
            if !d.is_empty() {
                f.failures
                    .push(format!("upper dirs differ:\n  {}", d.join("\n  ")));
            }
        }
        if let [x, y] = redirects.as_slice() {
            if x != y {
                f.failures.push(format!(
                    "redirected directories of the upper dirs differ (path: where lookups below it continue):\n  {an}: {x:?}\n  {bn}: {y:?}"
                ));
            }
        }
        if check_remount {
            for (side, s1) in [(&mut self.a, &after.0), (&mut self.b, &after.1)] {
                let m = match side.fs.mount(&side.mat) {
                    Ok(m) => m,
                    Err(e) => {
                        f.failures.push(format!("{}: remount: {e}", side.name));
                        continue;
                    }
                };
                let s2 = snap(m.root());
                drop(m);
                let mut msgs = diff(s1, "before remount", &s2, "after remount");
                msgs.extend(ino_changes(s1, &s2));
                if !msgs.is_empty() {
                    let msg = format!(
                        "{}: view changed across unmount+mount:\n  {}",
                        side.name,
                        msgs.join("\n  ")
                    );
                    if matches!(side.fs, Fs::Kernel | Fs::KernelWith(_)) {
                        f.notes.push(msg);
                    } else {
                        f.failures.push(msg);
                    }
                }
            }
        }
        f
    }
}

/// Takes out of `y` (the upper dir of `bn`, at `upper_b`) what only it has because it links
/// the names of an indexed inode into the upper dir where the oracle (upper dir `x`, merged
/// view `view`) does not: regular files that are hard links (nlink > 1) whose content the
/// oracle's view shows at that path, and the directories created to hold only those, with the
/// mode and owner the view shows. Returns a note per entry taken out.
fn drop_linked_names(
    x: &Upper,
    y: &mut Upper,
    upper_b: &Path,
    view: &Snapshot,
    bn: &str,
) -> Vec<String> {
    let mut notes = Vec::new();
    y.retain(|p, e| {
        let linked_name = x.get(p).is_none()
            && matches!(&e.kind, UKind::File(c)
                if view.entries.get(p).and_then(|i| i.content.as_ref()) == Some(c))
            && std::fs::symlink_metadata(upper_b.join(p)).is_ok_and(|m| m.nlink() > 1);
        if linked_name {
            notes.push(format!(
                "upper {p}: only in {bn}, a hard link of the copied-up file: {e}"
            ));
        }
        !linked_name
    });
    let mut dirs: Vec<String> = y
        .iter()
        .filter(|(p, e)| {
            !p.is_empty() && x.get(*p).is_none() && matches!(e.kind, UKind::Dir { opaque: false })
        })
        .map(|(p, _)| p.clone())
        .collect();
    dirs.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for p in dirs {
        let prefix = format!("{p}/");
        let holds_nothing_else = !y.keys().any(|k| k.starts_with(&prefix));
        let as_viewed = view.entries.get(&p).is_some_and(|i| {
            i.kind == crate::snapshot::Kind::Dir && y[&p].attrs == Some((i.mode, i.uid, i.gid))
        });
        if holds_nothing_else && as_viewed {
            let e = y.remove(&p).expect("listed");
            notes.push(format!(
                "upper {p}: only in {bn}, a directory holding only linked names: {e}"
            ));
        }
    }
    notes
}

/// Regular files under `dir` (recursively), counted once per inode.
fn index_files(dir: &Path) -> usize {
    let mut inos = std::collections::BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => {
                    inos.insert(e.ino());
                }
                _ => {}
            }
        }
    }
    inos.len()
}

/// A scripted differential case.
pub struct Scenario {
    /// Name (scratch dir prefix, reports).
    pub name: &'static str,
    /// Layers.
    pub tree: Tree,
    /// Ops, applied in order.
    pub ops: Vec<Op>,
    /// Also compare the view after unmount + mount.
    pub remount: bool,
    /// Mount without upper layer.
    pub readonly: bool,
    /// See [`Pair::known_inode_deviation`].
    pub known_inode_deviation: Option<&'static str>,
    /// The oracle ([`Fs::Kernel`] unless set).
    pub oracle: Fs,
    /// The layers the filesystem under test mounts, when not [`Scenario::tree`]: the same
    /// layers in a format the oracle cannot read (`.wh.` whiteouts).
    pub under_test_tree: Option<Tree>,
    /// Compare the merged views and inode identity after every step, not only at the end.
    pub each_step: bool,
    /// The side under test ([`Fs::under_test`] unless set).
    pub under_test: Fs,
    /// What the oracle must answer to each op, as [`show`] prints it (`ok`, `EXDEV`, `ok: …`;
    /// `*` anything, a trailing `*` a prefix): the case is what it says it is (a rename that
    /// must succeed on the oracle does). Empty: not checked.
    pub oracle_expects: Vec<&'static str>,
    /// Filesystems that write the layers first, and what they do ([`Pair::prepared`]): the
    /// oracle's copy, the copy of the side under test, the ops.
    pub prepared_by: Option<(Fs, Fs, Vec<Op>)>,
}

impl Scenario {
    /// A scenario with remount checking on.
    pub fn new(name: &'static str, tree: Tree, ops: Vec<Op>) -> Scenario {
        Scenario {
            name,
            tree,
            ops,
            remount: true,
            readonly: false,
            known_inode_deviation: None,
            oracle: Fs::Kernel,
            under_test_tree: None,
            each_step: false,
            under_test: Fs::under_test(),
            oracle_expects: Vec::new(),
            prepared_by: None,
        }
    }

    /// A scenario whose steps come with what the oracle must answer to each
    /// ([`Scenario::oracle_expects`]).
    pub fn expecting(name: &'static str, tree: Tree, steps: Vec<(Op, &'static str)>) -> Scenario {
        let (ops, expects) = steps.into_iter().unzip();
        let mut s = Scenario::new(name, tree, ops);
        s.oracle_expects = expects;
        s
    }

    /// Runs `fs` as the side under test instead of [`Fs::under_test`].
    pub fn under_test(mut self, fs: Fs) -> Scenario {
        self.under_test = fs;
        self
    }

    /// Has the layers written first: the oracle's copy by `oracle_prep`, the other by
    /// `under_test_prep`, both running `ops` ([`Pair::prepared`]).
    pub fn prepared_by(mut self, oracle_prep: Fs, under_test_prep: Fs, ops: Vec<Op>) -> Scenario {
        self.prepared_by = Some((oracle_prep, under_test_prep, ops));
        self
    }

    /// Declares a deliberate inode-number difference from kernel overlayfs, with its reason.
    pub fn known_inode_deviation(mut self, why: &'static str) -> Scenario {
        self.known_inode_deviation = Some(why);
        self
    }

    /// Makes it a read-only mount (lower layers only).
    pub fn readonly(mut self) -> Scenario {
        self.readonly = true;
        self
    }

    /// Compares against `oracle` (a kernel overlayfs, e.g. [`Fs::kernel_index`]) instead of
    /// [`Fs::Kernel`].
    pub fn oracle(mut self, oracle: Fs) -> Scenario {
        self.oracle = oracle;
        self
    }

    /// The filesystem under test mounts `tree` (the same layers in another on-disk format)
    /// while the oracle mounts [`Scenario::tree`].
    pub fn under_test_tree(mut self, tree: Tree) -> Scenario {
        self.under_test_tree = Some(tree);
        self
    }

    /// Compares the merged views, inode identity and link counts after every step.
    pub fn each_step(mut self) -> Scenario {
        self.each_step = true;
        self
    }

    /// Runs it on kernel overlayfs vs the binary under test and panics with a full report on
    /// any difference. Returns early (SKIPPED) when not privileged or the binary is missing.
    pub fn check(self) {
        if !crate::env::require_bin_under_test() {
            return;
        }
        assert!(
            self.tree.kernel_compatible(),
            "scenario {} uses .wh. whiteouts that kernel overlayfs does not understand",
            self.name
        );
        let tree_b = self.under_test_tree.as_ref().unwrap_or(&self.tree);
        let pair = match &self.prepared_by {
            Some((pa, pb, prep_ops)) => {
                assert!(
                    self.under_test_tree.is_none() && !self.readonly,
                    "scenario {}: a prepared scenario has one tree and an upper layer",
                    self.name
                );
                Pair::prepared(
                    self.name,
                    &self.tree,
                    (pa.clone(), self.oracle.clone()),
                    (pb.clone(), self.under_test.clone()),
                    prep_ops,
                )
            }
            None => Pair::with_trees(
                self.name,
                (&self.tree, self.oracle.clone()),
                (tree_b, self.under_test.clone()),
                self.readonly,
            ),
        };
        let mut pair = pair.unwrap_or_else(|e| panic!("{}: set-up failed: {e}", self.name));
        pair.known_inode_deviation = self.known_inode_deviation;
        let mut step_failures = Vec::new();
        for (i, op) in self.ops.iter().enumerate() {
            pair.step(op);
            if self.each_step {
                let (f, _) = pair.compare_now();
                if !f.failures.is_empty() {
                    step_failures.push(format!(
                        "after step {} {op:?}:
{}",
                        i + 1,
                        f.failures.join("\n")
                    ));
                }
            }
        }
        assert!(
            self.oracle_expects.is_empty() || self.oracle_expects.len() == self.ops.len(),
            "scenario {}: one oracle expectation per op",
            self.name
        );
        for (i, (want, got)) in self.oracle_expects.iter().zip(&pair.a.outcomes).enumerate() {
            let got = show(got);
            let fits = match want.strip_suffix('*') {
                Some(prefix) => got.starts_with(prefix),
                None => got == *want,
            };
            if !fits {
                step_failures.push(format!(
                    "the oracle answered step {} {:?} with {got} where the case expects {want}: the case is wrong or the kernel differs",
                    i + 1,
                    self.ops[i]
                ));
            }
        }
        let table = pair.steps_table();
        let b_name = pair.b.name.clone();
        let mut f = pair.finish(self.remount);
        for n in &f.notes {
            eprintln!("note ({}): {n}", self.name);
        }
        step_failures.append(&mut f.failures);
        if !step_failures.is_empty() {
            panic!(
                "scenario {}: {} difference(s) between kernel overlayfs ({:?}) and {b_name} ({:?})\nsteps:\n{table}\n{}",
                self.name,
                step_failures.len(),
                self.oracle,
                self.under_test,
                step_failures.join("\n\n")
            );
        }
    }
}
