//! The many-layer image of workload B, built offline with umoci: a busybox-static base
//! layer (as containerd_e2e.rs builds it), then `umoci insert` layers of `files` small files
//! (0.5 to 4 KiB, in 10 directories) plus one 1 MiB file each, and every 10th layer a
//! deletion (`umoci insert --whiteout`) of a directory an earlier layer added.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::proc::{run, which};

const T: Duration = Duration::from_secs(300);

/// A small deterministic generator for file contents (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// What a layer of the image does.
pub enum Layer {
    Base,
    Files(usize),
    Whiteout(String),
}

/// The layer plan: `layers` in all, the first the busybox base.
pub fn plan(layers: usize) -> Vec<Layer> {
    let mut v = vec![Layer::Base];
    for i in 1..layers {
        if i % 10 == 0 && i > 5 {
            v.push(Layer::Whiteout(format!("/data/l{:03}", i - 5)));
        } else {
            v.push(Layer::Files(i));
        }
    }
    v
}

/// Build the image; returns the OCI archive (a tar of the layout, tag `latest`).
pub fn build(dir: &Path, layers: usize, files: usize, scratch: &Path) -> anyhow::Result<PathBuf> {
    let img = dir.join("img");
    let image = format!("{}:latest", img.display());
    let bundle = dir.join("bundle");
    run(
        Command::new("umoci").arg("init").arg("--layout").arg(&img),
        T,
        scratch,
    )?;
    run(
        Command::new("umoci").args(["new", "--image", &image]),
        T,
        scratch,
    )?;
    run(
        Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle),
        T,
        scratch,
    )?;
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::create_dir_all(rootfs.join("data"))?;
    let busybox = which("busybox").context("busybox not found (Debian: busybox-static)")?;
    std::fs::copy(busybox, rootfs.join("bin/busybox"))?;
    for l in ["sh", "cat", "echo", "ls"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l))?;
    }
    run(
        Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle),
        T,
        scratch,
    )?;
    std::fs::remove_dir_all(&bundle)?;
    run(
        Command::new("umoci").args(["config", "--image", &image, "--config.cmd", "/bin/sh"]),
        T,
        scratch,
    )?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for layer in plan(layers).into_iter().skip(1) {
        match layer {
            Layer::Base => unreachable!(),
            Layer::Files(i) => {
                let src = dir.join(format!("src-{i}"));
                for f in 0..files {
                    let sub = src.join(format!("d{}", f % 10));
                    std::fs::create_dir_all(&sub)?;
                    let n = 512 + (rng.next() % 3584) as usize;
                    std::fs::write(sub.join(format!("f{f:04}")), rng.bytes(n))?;
                }
                std::fs::create_dir_all(&src)?;
                std::fs::write(src.join("big.bin"), rng.bytes(1 << 20))?;
                run(
                    Command::new("umoci")
                        .args(["insert", "--no-history", "--image", &image])
                        .arg(&src)
                        .arg(format!("/data/l{i:03}")),
                    T,
                    scratch,
                )?;
                std::fs::remove_dir_all(&src)?;
            }
            Layer::Whiteout(path) => {
                run(
                    Command::new("umoci").args([
                        "insert",
                        "--no-history",
                        "--image",
                        &image,
                        "--whiteout",
                        &path,
                    ]),
                    T,
                    scratch,
                )?;
            }
        }
    }
    let tar = dir.join("image.tar");
    run(
        Command::new("tar")
            .arg("-C")
            .arg(&img)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        T,
        scratch,
    )?;
    std::fs::remove_dir_all(&img)?;
    Ok(tar)
}
