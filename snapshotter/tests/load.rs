//! Load: 100 clients, each on its own connection and thread, run Prepare / write / Commit /
//! Remove against one real `rustfuse-snapshotter` (overlay mode) at the same time, and race
//! each other for the same keys and names. The only errors allowed are the ones the races
//! call for (AlreadyExists for the loser of a key or name, FailedPrecondition for removing a
//! parent that has children); every race has exactly one winner; afterwards the listing,
//! the directories and the file contents agree, and it all takes a bounded time.
//!
//! Needs root; prints `SKIPPED` or fails under `CI=true` without it. `RUSTFUSE_LOAD_ROUNDS`
//! sets the rounds per client (default 4).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use rustfuse_snapshotter::api::snapshots as pb;
use tonic::Code;

const CLIENTS: usize = 100;
/// The whole run (setup, load, checks) must finish within this.
const WALL_LIMIT: Duration = Duration::from_secs(240);

/// What one client saw.
#[derive(Default)]
struct Outcome {
    /// Snapshot names this client committed and kept, with the file content it wrote.
    kept: BTreeMap<String, Vec<u8>>,
    /// Races won: `shared-R` names committed, `same-R` keys prepared.
    won_commit: Vec<usize>,
    won_prepare: Vec<usize>,
    /// Expected refusals seen.
    refused: usize,
    calls: usize,
    /// Anything else: the call and the status.
    unexpected: Vec<String>,
}

impl Outcome {
    /// Record `r`: Ok → true, one of `expected` → false, anything else noted → false.
    fn check<T>(&mut self, what: &str, r: R<T>, expected: &[Code]) -> Option<T> {
        self.calls += 1;
        match r {
            Ok(v) => Some(v),
            Err(s) if expected.contains(&s.code()) => {
                self.refused += 1;
                None
            }
            Err(s) => {
                self.unexpected.push(format!("{what}: {s:?}"));
                None
            }
        }
    }
}

/// One client: each round prepares on `base`, writes a file into the snapshot's directory
/// (the upperdir its mounts name), commits, and keeps or removes the result; races for
/// `same-R` (Prepare) and `shared-R` (Commit); tries to remove `base`.
fn client_run(
    server_socket: &std::path::Path,
    i: usize,
    rounds: usize,
    start: &Barrier,
) -> Outcome {
    let c = Client::connect(server_socket);
    let mut o = Outcome::default();
    start.wait();
    for r in 0..rounds {
        let key = format!("default/{i}/extract {r}");
        let name = format!("default/{i}/layer {r}");
        if let Some(m) = o.check("Prepare", c.prepare(&key, "base"), &[]) {
            let (_, dir) = first_dir(&m);
            let data = format!("client {i} round {r}\n").repeat(1 + (i + r) % 50);
            std::fs::write(dir.join(format!("c{i}")), &data).unwrap();
            if let Some(info) = o.check("Stat", c.stat(&key), &[]) {
                if info.kind != pb::Kind::Active as i32 || info.parent != "base" {
                    o.unexpected.push(format!("Stat {key:?}: {info:?}"));
                }
            }
            if o.check("Commit", c.commit(&name, &key), &[]).is_some() {
                if r % 2 == 0 {
                    o.check("Remove", c.remove(&name), &[]);
                } else {
                    o.kept.insert(name, data.into_bytes());
                }
            }
        }
        // Everyone prepares the same key: one wins.
        if o.check(
            "Prepare same",
            c.prepare(&format!("same-{r}"), ""),
            &[Code::AlreadyExists],
        )
        .is_some()
        {
            o.won_prepare.push(r);
        }
        // Everyone commits to the same name: one wins, the others drop their snapshot.
        let mine = format!("default/{i}/contend {r}");
        if o.check("Prepare contend", c.prepare(&mine, "base"), &[])
            .is_some()
        {
            match o.check(
                "Commit shared",
                c.commit(&format!("shared-{r}"), &mine),
                &[Code::AlreadyExists],
            ) {
                Some(()) => o.won_commit.push(r),
                None => {
                    o.check("Remove contend", c.remove(&mine), &[]);
                }
            }
        }
        if r == 0 {
            o.check("Remove base", c.remove("base"), &[Code::FailedPrecondition]);
        }
    }
    o
}

#[test]
fn hundred_concurrent_clients() {
    if !can_run(Mode::Overlay) {
        return;
    }
    let rounds = env_number("RUSTFUSE_LOAD_ROUNDS", 4) as usize;
    let started = Instant::now();
    let mut server = Server::start(Mode::Overlay);
    let c = server.client();
    c.prepare("base-a", "").unwrap();
    c.commit("base", "base-a").unwrap();
    let start = Arc::new(Barrier::new(CLIENTS + 1));
    let socket = server.socket();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let start = start.clone();
            let socket = socket.clone();
            std::thread::Builder::new()
                .name(format!("client {i}"))
                .spawn(move || client_run(&socket, i, rounds, &start))
                .unwrap()
        })
        .collect();
    start.wait();
    let load_start = Instant::now();
    let outcomes: Vec<Outcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let load_time = load_start.elapsed();

    let unexpected: Vec<&String> = outcomes.iter().flat_map(|o| &o.unexpected).collect();
    assert!(
        unexpected.is_empty(),
        "{} unexpected errors, e.g. {:?}\n{}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)],
        server.log_text()
    );
    for r in 0..rounds {
        let n = outcomes
            .iter()
            .filter(|o| o.won_prepare.contains(&r))
            .count();
        assert_eq!(n, 1, "winners of Prepare same-{r}");
        let n = outcomes
            .iter()
            .filter(|o| o.won_commit.contains(&r))
            .count();
        assert_eq!(n, 1, "winners of Commit shared-{r}");
    }
    let calls: usize = outcomes.iter().map(|o| o.calls).sum();
    let refused: usize = outcomes.iter().map(|o| o.refused).sum();
    // Expected refusals: the losers of both races each round, and Remove of base once each.
    assert_eq!(
        refused,
        rounds * 2 * (CLIENTS - 1) + CLIENTS,
        "expected refusals"
    );

    // The final state: exactly what the clients kept.
    let kept: BTreeMap<&String, &Vec<u8>> = outcomes.iter().flat_map(|o| &o.kept).collect();
    let mut want: BTreeMap<String, (pb::Kind, String)> = BTreeMap::new();
    want.insert("base".into(), (pb::Kind::Committed, String::new()));
    for k in kept.keys() {
        want.insert((*k).clone(), (pb::Kind::Committed, "base".into()));
    }
    for r in 0..rounds {
        want.insert(format!("same-{r}"), (pb::Kind::Active, String::new()));
        want.insert(format!("shared-{r}"), (pb::Kind::Committed, "base".into()));
    }
    let listed: BTreeMap<String, (pb::Kind, String)> = c
        .list(&[])
        .unwrap()
        .into_iter()
        .map(|i| {
            let kind = pb::Kind::try_from(i.kind).unwrap();
            (i.name, (kind, i.parent))
        })
        .collect();
    assert_eq!(listed, want, "final listing");

    // Every kept layer holds what its client wrote (read through a View's directory).
    let mut ids = BTreeSet::new();
    for (name, data) in &kept {
        let v = format!("check {name}");
        let m = c.view(&v, name).unwrap();
        let (id, dir) = first_dir(&m);
        ids.insert(id);
        let got = read_files(&dir);
        assert_eq!(got.len(), 1, "{name:?}: {:?}", got.keys());
        assert_eq!(got.values().next().unwrap(), *data, "{name:?}");
        c.remove(&v).unwrap();
    }
    c.cleanup().unwrap();
    let on_disk = listing(&server.root().join("snapshots"));
    assert_eq!(
        on_disk.len(),
        want.len(),
        "one directory per snapshot after Cleanup"
    );
    for id in ids {
        assert!(
            on_disk.contains(&id.to_string()),
            "directory of snapshot id {id}"
        );
    }
    drop(c);
    let stop = Instant::now();
    server.stop();
    let elapsed = started.elapsed();
    eprintln!(
        "load: {CLIENTS} clients x {rounds} rounds: {calls} calls ({refused} expected refusals) in {load_time:?} ({:.0} calls/s); {} snapshots at the end; stop {:?}; total {elapsed:?}",
        calls as f64 / load_time.as_secs_f64(),
        want.len(),
        stop.elapsed()
    );
    assert!(
        elapsed < WALL_LIMIT,
        "took {elapsed:?}, limit {WALL_LIMIT:?}"
    );
}
