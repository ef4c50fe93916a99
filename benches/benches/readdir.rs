//! Readdir merge: open, read to the end and release a directory whose entries come from four
//! layers, with names shadowed by higher layers and whiteouts dropping lower names.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rustfuse_benches::{TempLayers, lookup_path, touch, whiteout};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("readdir");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for per_layer in [100usize, 1000] {
        let t = TempLayers::new(&format!("readdir{per_layer}"), 4, |i, dir| {
            for k in 0..per_layer {
                // Half of the names repeat in every layer; the other half are this layer's own.
                let name = if k % 2 == 0 {
                    format!("d/shared{k}")
                } else {
                    format!("d/own{i}-{k}")
                };
                touch(dir, &name);
            }
            if i > 0 {
                for k in (1..per_layer).step_by(10) {
                    whiteout(&dir.join("d"), &format!("own{}-{k}", i - 1));
                }
            }
        });
        let ov = t.overlay();
        let dir = lookup_path(&ov, "d");
        g.bench_with_input(
            BenchmarkId::new("merge-4-layers", per_layer),
            &(),
            |b, _| {
                b.iter(|| {
                    let fh = ov.opendir(dir).expect("opendir");
                    let mut n = 0usize;
                    let mut off = 0;
                    loop {
                        let mut got = 0;
                        ov.readdir(fh, dir, off, |e, next| {
                            black_box(&e.name);
                            off = next;
                            got += 1;
                            got == 128
                        })
                        .expect("readdir");
                        n += got;
                        if got < 128 {
                            break;
                        }
                    }
                    ov.release(fh);
                    black_box(n)
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
