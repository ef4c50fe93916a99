//! Name lookup across layers: a hit in the top layer, a hit in the bottom layer of five, a
//! miss (every layer probed, then the negative answer), and a name hidden by a whiteout.

use std::ffi::OsString;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rustfuse_benches::{TempLayers, lookup_path, touch, whiteout};

const LAYERS: usize = 5;

fn bench(c: &mut Criterion) {
    let t = TempLayers::new("lookup", LAYERS, |i, dir| {
        for k in 0..200 {
            touch(dir, &format!("usr/lib/l{i}-f{k}"));
        }
        if i == LAYERS - 1 {
            whiteout(&dir.join("usr/lib"), "l0-f7");
        }
    });
    let ov = t.overlay();
    let dir = lookup_path(&ov, "usr/lib");
    let mut g = c.benchmark_group("lookup");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for (label, name) in [
        ("hit-top-layer", format!("l{}-f3", LAYERS - 1)),
        ("hit-bottom-layer", "l0-f3".to_string()),
        ("miss", "nosuchname".to_string()),
        ("whiteout", "l0-f7".to_string()),
    ] {
        let name = OsString::from(name);
        g.bench_function(label, |b| {
            b.iter(|| {
                if let Ok(a) = ov.lookup(dir, black_box(&name)) {
                    ov.forget(a.ino, 1);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
