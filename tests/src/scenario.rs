//! Differential runs: the same layer tree and the same ops on kernel overlayfs (the oracle) and
//! on the FUSE overlay under test, compared step by step and at the end.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::env::{Scratch, scratch};
use crate::layers::{Materialized, Tree};
use crate::mount::{Mount, timed};
use crate::ops::{Op, Outcome, apply, show};
use crate::snapshot::{Snapshot, diff, ino_changes, ino_links, snapshot};
use crate::upper::{self, Upper, describe_upper, work_leftovers};

/// Takes a snapshot with a deadline (the FUSE side could hang).
pub fn snap(root: &Path) -> Snapshot {
    let r = root.to_path_buf();
    timed(&format!("snapshot of {}", root.display()), move || {
        snapshot(&r)
    })
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
    before: (Snapshot, Snapshot),
    /// A deliberate difference from the oracle, with its reason: inode identity and
    /// nlink-vs-names findings are reported as notes instead of failures.
    pub known_inode_deviation: Option<&'static str>,
    // Declared last: dropped after the mounts.
    _scratch: Scratch,
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
        let s = scratch(name);
        let mut sides = Vec::new();
        for (fs, dir) in [(a, "a"), (b, "b")] {
            let dir = s.path().join(dir);
            let mat = if readonly {
                tree.materialize_ro(&dir)
            } else {
                tree.materialize(&dir)
            }
            .map_err(|e| format!("materialize layers: {e}"))?;
            let mount = fs.mount(&mat)?;
            let name = fs.name();
            sides.push(Side {
                fs,
                name,
                mat,
                mount: Some(mount),
                outcomes: Vec::new(),
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
            let o = timed(&format!("{} {op:?}", side.name), move || apply(&root, &op2));
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

    /// The table of steps with their outcomes, mismatches marked `!!`.
    pub fn steps_table(&self) -> String {
        let mut t = String::new();
        for (i, op) in self.ops.iter().enumerate() {
            let (x, y) = (&self.a.outcomes[i], &self.b.outcomes[i]);
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

    /// Compares the merged views, inode behaviour, the upper dirs after unmount and the views
    /// after a remount. Consumes the pair (everything gets unmounted).
    pub fn finish(mut self, check_remount: bool) -> Findings {
        let mut f = Findings::default();
        let (an, bn) = (self.a.name.clone(), self.b.name.clone());
        let mismatched_steps = self
            .a
            .outcomes
            .iter()
            .zip(&self.b.outcomes)
            .any(|(x, y)| x != y);
        if mismatched_steps {
            f.failures.push(format!(
                "errno/result of some steps differ:\n{}",
                self.steps_table()
            ));
        }
        let after = (snap(self.a.root()), snap(self.b.root()));
        let d = diff(&after.0, &an, &after.1, &bn);
        if !d.is_empty() {
            f.failures
                .push(format!("merged views differ:\n  {}", d.join("\n  ")));
        }
        for (side, s0, s1) in [
            (&self.a, &self.before.0, &after.0),
            (&self.b, &self.before.1, &after.1),
        ] {
            let mut probs: Vec<String> = s0.problems.clone();
            probs.extend(s1.problems.iter().cloned());
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
        // Unmount, compare the upper dirs.
        let mut uppers: Vec<Upper> = Vec::new();
        for side in [&mut self.a, &mut self.b] {
            if let Err(e) = side.mount.take().expect("mounted").unmount() {
                f.failures.push(format!("{}: unmount: {e}", side.name));
            }
            let (Some(up), Some(work)) = (&side.mat.stack.upper, &side.mat.stack.work) else {
                continue;
            };
            uppers.push(describe_upper(up, &side.mat.stack.lowers));
            let left = work_leftovers(work);
            if !left.is_empty() {
                f.failures.push(format!(
                    "{}: workdir not clean after unmount: {left:?}",
                    side.name
                ));
            }
        }
        let d = match uppers.as_slice() {
            [x, y] => upper::diff(x, &an, y, &bn),
            _ => Vec::new(),
        };
        if !d.is_empty() {
            f.failures
                .push(format!("upper dirs differ:\n  {}", d.join("\n  ")));
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
        }
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
        let mut pair = Pair::with_mode(
            self.name,
            &self.tree,
            Fs::Kernel,
            Fs::under_test(),
            self.readonly,
        )
        .unwrap_or_else(|e| panic!("{}: set-up failed: {e}", self.name));
        pair.known_inode_deviation = self.known_inode_deviation;
        for op in &self.ops {
            pair.step(op);
        }
        let table = pair.steps_table();
        let f = pair.finish(self.remount);
        for n in &f.notes {
            eprintln!("note ({}): {n}", self.name);
        }
        if !f.failures.is_empty() {
            panic!(
                "scenario {}: {} difference(s) between kernel overlayfs and {}\nsteps:\n{table}\n{}",
                self.name,
                f.failures.len(),
                crate::env::bin_under_test().display(),
                f.failures.join("\n\n")
            );
        }
    }
}
