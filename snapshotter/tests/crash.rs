//! Crash safety: the real `rustfuse-snapshotter` is SIGKILLed again and again while a client
//! runs Prepare / write files through the returned mounts / Commit / Remove, each kill landing
//! inside one of those three calls after a random delay. After every restart the test checks,
//! over gRPC only:
//! - every snapshot whose Prepare or Commit returned OK is listed (and nothing that was
//!   removed), with its kind and parent; the one call in flight at the kill either happened
//!   or did not, never half (a Commit leaves exactly one of key and name);
//! - every listed snapshot has its directory (the paths its mounts name exist), and every
//!   committed snapshot reads back byte for byte through a View, as does every active one;
//! - Cleanup removes exactly the directories no listed snapshot uses (what a kill orphaned).
//!
//! Runs in kernel overlayfs mode (`--mode overlay`, `RUSTFUSE_CRASH_KILLS` kills, default 45)
//! and in FUSE mode (`--mode fuse`, `RUSTFUSE_CRASH_KILLS_FUSE`, default 45). Needs root (and
//! /dev/fuse for FUSE mode); prints `SKIPPED` or fails under `CI=true` without it.
//! `RUSTFUSE_TEST_SEED` repeats a run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rustfuse_snapshotter::api::Mount;
use rustfuse_snapshotter::api::snapshots as pb;

/// What a snapshot holds: its parent and every file a mount of it shows.
#[derive(Clone)]
struct Snap {
    parent: String,
    files: BTreeMap<String, Vec<u8>>,
}

/// What the client knows: the calls that returned OK.
#[derive(Default)]
struct Model {
    active: BTreeMap<String, Snap>,
    committed: BTreeMap<String, Snap>,
    next: u64,
}

impl Model {
    fn has_children(&self, name: &str) -> bool {
        self.active
            .values()
            .chain(self.committed.values())
            .any(|s| s.parent == name)
    }
}

/// The call a kill interrupted: it may or may not have happened.
#[derive(Clone)]
enum InFlight {
    Prepare { key: String, snap: Snap },
    Commit { name: String, key: String },
    Remove { key: String },
}

impl InFlight {
    /// The call, without the file contents.
    fn describe(&self) -> String {
        match self {
            InFlight::Prepare { key, snap } => {
                format!("Prepare({key:?}, parent {:?})", snap.parent)
            }
            InFlight::Commit { name, key } => format!("Commit({name:?}, {key:?})"),
            InFlight::Remove { key } => format!("Remove({key:?})"),
        }
    }

    fn op(&self) -> usize {
        match self {
            InFlight::Prepare { .. } => 0,
            InFlight::Commit { .. } => 1,
            InFlight::Remove { .. } => 2,
        }
    }
}

const OPS: [&str; 3] = ["Prepare", "Commit", "Remove"];
/// `CALL` holds 0 between calls, else 1 + the index in [`OPS`] of the call under way.
const IDLE: u8 = 0;

#[derive(Default)]
struct Stats {
    /// Kills per interrupted call, and how many of those calls turned out to have happened.
    killed_in: [usize; 3],
    applied: [usize; 3],
    orphans_cleaned: usize,
    files_checked: usize,
    bytes_checked: usize,
    /// Mean latency per call kind (microseconds), to aim the kills inside calls.
    latency_us: [u64; 3],
    total_us: [u64; 3],
    calls: [u64; 3],
}

/// The killer: after `delay`, waits until one of the three calls is under way, then after
/// up to the mean latency of that call sends SIGKILL. Sets `killed` just before the signal,
/// so any error the client sees afterwards is known to be the kill's.
fn spawn_killer(
    pid: rustix::process::Pid,
    call: Arc<AtomicU8>,
    killed: Arc<AtomicBool>,
    delay: Duration,
    latency_us: [u64; 3],
    seed: u64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut rng = Rng::new(seed);
        std::thread::sleep(delay);
        let deadline = Instant::now() + Duration::from_secs(20);
        let op = loop {
            let c = call.load(Ordering::SeqCst);
            if c != IDLE || Instant::now() > deadline {
                break c;
            }
            std::thread::yield_now();
        };
        let mean = latency_us[usize::from(op.max(1) - 1)].max(200);
        std::thread::sleep(Duration::from_micros(rng.below(mean)));
        killed.store(true, Ordering::SeqCst);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    })
}

#[test]
fn kill_during_prepare_commit_remove() {
    if can_run(Mode::Overlay) {
        crash_loop(
            Mode::Overlay,
            env_number("RUSTFUSE_CRASH_KILLS", 45) as usize,
        );
    }
}

/// The same in FUSE mode (the client mounts what Mounts returns as `fuse3.rustfuse`).
#[test]
fn kill_during_prepare_commit_remove_fuse_mode() {
    if can_run(Mode::Fuse) {
        crash_loop(
            Mode::Fuse,
            env_number("RUSTFUSE_CRASH_KILLS_FUSE", 45) as usize,
        );
    }
}

fn crash_loop(mode: Mode, kills: usize) {
    let started = Instant::now();
    let mut rng = Rng::from_env("crash");
    let mut server = Server::start(mode);
    let mut model = Model::default();
    let mut stats = Stats::default();
    let mut in_flight: Option<InFlight> = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for round in 0..kills {
            let c = server.client();
            verify(&server, &c, &mut model, in_flight.take(), &mut stats, round);
            let call = Arc::new(AtomicU8::new(IDLE));
            let killed = Arc::new(AtomicBool::new(false));
            let killer = spawn_killer(
                server.pid().expect("server pid"),
                call.clone(),
                killed.clone(),
                Duration::from_millis(rng.below(120)),
                stats.latency_us,
                rng.next_u64(),
            );
            let interrupted =
                run_until_killed(&server, &c, &mut model, &mut rng, &call, &mut stats);
            assert!(
                killed.load(Ordering::SeqCst),
                "{} failed but the server was not killed:\n{}",
                interrupted.describe(),
                server.log_text()
            );
            killer.join().unwrap();
            drop(c);
            server.reap_killed();
            stats.killed_in[interrupted.op()] += 1;
            in_flight = Some(interrupted);
            server.spawn();
        }
        let c = server.client();
        verify(&server, &c, &mut model, in_flight.take(), &mut stats, kills);
        drop(c);
        server.stop();
    }));
    if let Err(p) = r {
        eprintln!(
            "--- server log (tail) ---\n{}",
            tail(&server.log_text(), 60)
        );
        std::panic::resume_unwind(p);
    }
    let replaced = server
        .log_text()
        .matches("removing an orphaned snapshot directory")
        .count();
    let mut summary = String::new();
    for (i, op) in OPS.iter().enumerate() {
        summary += &format!(
            "{op}: {} kills ({} of those calls had happened), mean call {} us; ",
            stats.killed_in[i], stats.applied[i], stats.latency_us[i]
        );
    }
    eprintln!(
        "crash ({} mode): {kills} kills; {summary}{replaced} directories orphaned under a reused id replaced by Prepare, {} more removed by Cleanup; {} files / {} bytes read back; {:?}",
        mode.arg(),
        stats.orphans_cleaned,
        stats.files_checked,
        stats.bytes_checked,
        started.elapsed()
    );
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// One Prepare / write / Commit / Remove cycle after another until a call fails, which must
/// be because the killer struck; returns that call.
fn run_until_killed(
    server: &Server,
    c: &Client,
    model: &mut Model,
    rng: &mut Rng,
    call: &AtomicU8,
    stats: &mut Stats,
) -> InFlight {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no kill within 60 s");
        let op = next_op(model, rng);
        let idx = op.op();
        let t = Instant::now();
        call.store(idx as u8 + 1, Ordering::SeqCst);
        let r = match &op {
            InFlight::Prepare { key, snap } => c.prepare(key, &snap.parent).map(Some),
            InFlight::Commit { name, key } => c.commit(name, key).map(|()| None),
            InFlight::Remove { key } => c.remove(key).map(|()| None),
        };
        call.store(IDLE, Ordering::SeqCst);
        let Ok(mounts) = r else {
            return op;
        };
        stats.calls[idx] += 1;
        stats.total_us[idx] += t.elapsed().as_micros() as u64;
        stats.latency_us[idx] = stats.total_us[idx] / stats.calls[idx];
        match op {
            InFlight::Prepare { key, mut snap } => {
                write_layer(server, &key, &mounts.unwrap(), &mut snap, rng);
                model.active.insert(key, snap);
            }
            InFlight::Commit { name, key } => {
                let snap = model.active.remove(&key).unwrap();
                model.committed.insert(name, snap);
            }
            InFlight::Remove { key } => {
                model.active.remove(&key);
                model.committed.remove(&key);
            }
        }
    }
}

/// Commit (or now and then drop) an active snapshot, keep at most six committed ones by
/// removing leaves, else prepare a new one on a random committed parent or none.
fn next_op(model: &mut Model, rng: &mut Rng) -> InFlight {
    if let Some(key) = model.active.keys().next().cloned() {
        if rng.chance(15) {
            return InFlight::Remove { key };
        }
        model.next += 1;
        return InFlight::Commit {
            name: format!("sha256:layer-{}", model.next),
            key,
        };
    }
    let leaves: Vec<String> = model
        .committed
        .keys()
        .filter(|k| !model.has_children(k))
        .cloned()
        .collect();
    if model.committed.len() >= 6 || (!leaves.is_empty() && rng.chance(20)) {
        let key = leaves[rng.below(leaves.len() as u64) as usize].clone();
        return InFlight::Remove { key };
    }
    model.next += 1;
    let parents: Vec<&String> = model.committed.keys().collect();
    let snap = if parents.is_empty() || rng.chance(25) {
        Snap {
            parent: String::new(),
            files: BTreeMap::new(),
        }
    } else {
        let p = parents[rng.below(parents.len() as u64) as usize];
        Snap {
            parent: p.clone(),
            files: model.committed[p].files.clone(),
        }
    };
    InFlight::Prepare {
        key: format!("default/{}/extract {}", model.next, model.next),
        snap,
    }
}

/// Mount what Prepare returned and change it: new files, an inherited one overwritten, one
/// deleted; `snap.files` follows.
fn write_layer(server: &Server, key: &str, mounts: &[Mount], snap: &mut Snap, rng: &mut Rng) {
    let target = server.work().join(format!("w-{}", key.replace('/', "_")));
    let g = mount_all(mounts, &target);
    let inherited: Vec<String> = snap.files.keys().cloned().collect();
    if !inherited.is_empty() && rng.chance(50) {
        let f = &inherited[rng.below(inherited.len() as u64) as usize];
        std::fs::remove_file(target.join(f)).unwrap();
        snap.files.remove(f);
    }
    if !inherited.is_empty() && rng.chance(50) {
        let f = &inherited[rng.below(inherited.len() as u64) as usize];
        let len = rng.below(8192) as usize;
        let data = rng.bytes(len);
        std::fs::write(target.join(f), &data).unwrap();
        snap.files.insert(f.clone(), data);
    }
    for i in 0..1 + rng.below(3) {
        let f = format!("f{}-{i}", snap.files.len() + inherited.len());
        let len = rng.below(48 * 1024) as usize;
        let data = rng.bytes(len);
        std::fs::write(target.join(&f), &data).unwrap();
        snap.files.insert(f, data);
    }
    g.unmount();
    let _ = std::fs::remove_dir(&target);
}

/// After a restart: the listing agrees with the model (settling the interrupted call), each
/// snapshot's directory exists and reads back, and Cleanup removes exactly the orphans.
fn verify(
    server: &Server,
    c: &Client,
    model: &mut Model,
    in_flight: Option<InFlight>,
    stats: &mut Stats,
    round: usize,
) {
    let listed: BTreeMap<String, pb::Info> = c
        .list(&[])
        .unwrap_or_else(|e| panic!("round {round}: list: {e}"))
        .into_iter()
        .map(|i| (i.name.clone(), i))
        .collect();
    let what = format!(
        "round {round}, after {}",
        in_flight
            .as_ref()
            .map_or("start".into(), InFlight::describe)
    );
    // The interrupted call either happened or did not: settle the model by the listing.
    match in_flight {
        Some(InFlight::Prepare { key, snap }) if listed.contains_key(&key) => {
            stats.applied[0] += 1;
            model.active.insert(key, snap);
        }
        Some(InFlight::Commit { name, key }) => {
            let (k, n) = (listed.contains_key(&key), listed.contains_key(&name));
            assert!(k != n, "{what}: key listed {k}, name listed {n}");
            if n {
                stats.applied[1] += 1;
                let snap = model.active.remove(&key).unwrap();
                model.committed.insert(name, snap);
            }
        }
        Some(InFlight::Remove { key }) if !listed.contains_key(&key) => {
            stats.applied[2] += 1;
            model.active.remove(&key);
            model.committed.remove(&key);
        }
        _ => {}
    }
    let want: BTreeMap<&String, (pb::Kind, &Snap)> = model
        .active
        .iter()
        .map(|(k, s)| (k, (pb::Kind::Active, s)))
        .chain(
            model
                .committed
                .iter()
                .map(|(k, s)| (k, (pb::Kind::Committed, s))),
        )
        .collect();
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        want.keys().copied().collect::<Vec<_>>(),
        "{what}: listed snapshots"
    );
    let mut ids = BTreeSet::new();
    for (name, (kind, snap)) in &want {
        let info = &listed[*name];
        assert_eq!(info.kind, *kind as i32, "{what}: kind of {name:?}");
        assert_eq!(info.parent, snap.parent, "{what}: parent of {name:?}");
        let (view, mounts) = if *kind == pb::Kind::Active {
            (None, c.mounts(name).unwrap())
        } else {
            let v = format!("verify {name}");
            let m = c
                .view(&v, name)
                .unwrap_or_else(|e| panic!("{what}: view of {name:?}: {e}"));
            (Some(v), m)
        };
        let (id, dir) = first_dir(&mounts);
        assert!(
            dir.is_dir(),
            "{what}: {name:?}: {} is missing",
            dir.display()
        );
        ids.insert(id);
        let target = server.work().join("verify");
        let g = mount_all(&mounts, &target);
        let got = read_files(&target);
        g.unmount();
        assert!(
            got == snap.files,
            "{what}: {name:?} reads back {:?}, want {:?}",
            sizes(&got),
            sizes(&snap.files)
        );
        stats.files_checked += got.len();
        stats.bytes_checked += got.values().map(Vec::len).sum::<usize>();
        if let Some(v) = view {
            c.remove(&v).unwrap();
        }
    }
    let snaps = server.root().join("snapshots");
    let on_disk: BTreeSet<String> = listing(&snaps).into_iter().collect();
    let wanted: BTreeSet<String> = ids.iter().map(u64::to_string).collect();
    assert!(
        on_disk.is_superset(&wanted),
        "{what}: {on_disk:?} lacks some of {wanted:?}"
    );
    c.cleanup().unwrap();
    assert_eq!(
        listing(&snaps).into_iter().collect::<BTreeSet<_>>(),
        wanted,
        "{what}: after Cleanup"
    );
    stats.orphans_cleaned += on_disk.len() - wanted.len();
    check_no_stray(&snaps, &what);
}

/// Names and sizes, for a readable failure message.
fn sizes(files: &BTreeMap<String, Vec<u8>>) -> Vec<(&str, usize)> {
    files.iter().map(|(k, v)| (k.as_str(), v.len())).collect()
}

/// Each snapshot directory holds `fs` (and `work` for active ones), nothing else.
fn check_no_stray(snaps: &Path, what: &str) {
    for id in listing(snaps) {
        for e in listing(&snaps.join(&id)) {
            assert!(e == "fs" || e == "work", "{what}: stray {id}/{e}");
        }
    }
}
