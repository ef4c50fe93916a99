//! The inode table under contention: threads looking up and forgetting names of one directory
//! at once (the shape of a parallel `find` or `make -j`). Reports the time for a fixed number of
//! lookup+forget pairs per thread, so 1 vs 2 vs 4 threads shows how well it scales.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rustfuse_benches::{TempLayers, lookup_path, touch};

const NAMES: usize = 512;

fn bench(c: &mut Criterion) {
    let t = TempLayers::new("inodes", 3, |i, dir| {
        for k in (i..NAMES).step_by(3) {
            touch(dir, &format!("d/f{k}"));
        }
    });
    let ov = t.overlay();
    let dir = lookup_path(&ov, "d");
    let names: Vec<OsString> = (0..NAMES).map(|k| format!("f{k}").into()).collect();
    let mut g = c.benchmark_group("inode-table");
    g.measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for threads in [1usize, 2, 4] {
        g.bench_with_input(
            BenchmarkId::new("lookup-forget", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for th in 0..threads {
                            let (ov, names) = (&ov, &names);
                            s.spawn(move || {
                                for i in 0..iters as usize {
                                    // Threads overlap on names half of the time.
                                    let n = &names[(i * 7 + th * (i % 2) * 131) % NAMES];
                                    let a = ov.lookup(dir, n).expect("lookup");
                                    ov.forget(a.ino, 1);
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
