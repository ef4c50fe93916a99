//! Workloads written in Rust. They run as a child process (`rustfuse-compare __worker ...`)
//! so that, like the shell workloads, they have a deadline and can be killed.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

fn list(list: &Path, prefixes: &[&str]) -> Result<Vec<String>> {
    let text = fs::read_to_string(list).with_context(|| format!("read {}", list.display()))?;
    Ok(text
        .lines()
        .filter(|l| prefixes.is_empty() || prefixes.iter().any(|p| l.starts_with(p)))
        .map(str::to_string)
        .collect())
}

fn arg<'a>(args: &'a [String], i: usize, what: &str) -> Result<&'a str> {
    args.get(i)
        .map(String::as_str)
        .with_context(|| format!("missing argument {i}: {what}"))
}

/// `args[0]` names the worker; the working directory is the mount.
pub fn main(args: &[String]) -> Result<()> {
    let name = arg(args, 0, "worker name")?;
    match name {
        // appendheld FILE N: N appends to FILE beside a read handle opened before them
        "appendheld" => {
            let file = PathBuf::from(arg(args, 1, "file")?);
            let n: usize = arg(args, 2, "appends")?.parse()?;
            let (_, problems) =
                rustfuse_tests::held::append_beside_reader(&file, n).map_err(anyhow::Error::msg)?;
            if !problems.is_empty() {
                bail!("{}", problems.join("; "));
            }
            Ok(())
        }
        // randread FILE JOBS OPS_PER_JOB
        "randread" => {
            let file = PathBuf::from(arg(args, 1, "file")?);
            let jobs: usize = arg(args, 2, "jobs")?.parse()?;
            let ops: usize = arg(args, 3, "ops")?.parse()?;
            randread(&file, jobs, ops)
        }
        // createfsync DIR N
        "createfsync" => {
            let dir = PathBuf::from(arg(args, 1, "dir")?);
            let n: usize = arg(args, 2, "count")?.parse()?;
            fs::create_dir_all(&dir)?;
            let data = vec![b'x'; 4096];
            for i in 0..n {
                let p = dir.join(format!("f{i}"));
                let mut f =
                    fs::File::create(&p).with_context(|| format!("create {}", p.display()))?;
                f.write_all(&data)?;
                f.sync_all()?;
            }
            Ok(())
        }
        // statlist LIST: lstat every listed path
        "statlist" => {
            let mut n = 0usize;
            for p in list(Path::new(arg(args, 1, "list")?), &[])? {
                if fs::symlink_metadata(&p).is_ok() {
                    n += 1;
                }
            }
            if n == 0 {
                bail!("no listed file could be stat'ed");
            }
            Ok(())
        }
        // renames LIST PREFIX...: rename each listed file under the prefixes
        "renames" => {
            let prefixes: Vec<&str> = args[2..].iter().map(String::as_str).collect();
            for p in list(Path::new(arg(args, 1, "list")?), &prefixes)? {
                fs::rename(&p, format!("{p}.renamed")).with_context(|| format!("rename {p}"))?;
            }
            Ok(())
        }
        // replace LIST PREFIX...: write a new version beside each file, rename it over
        "replace" => {
            let prefixes: Vec<&str> = args[2..].iter().map(String::as_str).collect();
            let data = vec![b'n'; 6000];
            for p in list(Path::new(arg(args, 1, "list")?), &prefixes)? {
                let tmp = format!("{p}.dpkg-new");
                fs::write(&tmp, &data).with_context(|| format!("write {tmp}"))?;
                fs::rename(&tmp, &p).with_context(|| format!("rename over {p}"))?;
            }
            Ok(())
        }
        // lone OP LIST N: N calls of one kind, one at a time, on the first listed files
        "lone" => {
            let op = arg(args, 1, "op")?;
            let files = list(Path::new(arg(args, 2, "list")?), &[])?;
            let n: usize = arg(args, 3, "calls")?.parse()?;
            lone(op, &files, n)
        }
        _ => bail!("unknown worker {name}"),
    }
}

/// Files a lone-request workload cycles over (looked up once before the timed calls).
const LONE_FILES: usize = 256;

/// One call that reaches the FUSE daemon every time: a GETXATTR (the kernel caches no
/// xattrs), an OPEN and RELEASE of a lower file, or a GETATTR (`statx` with
/// `AT_STATX_FORCE_SYNC` skips the attribute cache).
fn lone_call(op: &str, p: &str, buf: &mut [u8]) -> Result<()> {
    use rustix::fs::{AtFlags, CWD, StatxFlags};
    match op {
        "getxattr" => match rustix::fs::lgetxattr(p, "user.rustfuse-compare", buf) {
            Ok(_) | Err(rustix::io::Errno::NODATA) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("getxattr {p}")),
        },
        "open" => {
            drop(fs::File::open(p).with_context(|| format!("open {p}"))?);
            Ok(())
        }
        "statx" => {
            let flags = AtFlags::STATX_FORCE_SYNC | AtFlags::SYMLINK_NOFOLLOW;
            rustix::fs::statx(CWD, p, flags, StatxFlags::BASIC_STATS)
                .with_context(|| format!("statx {p}"))?;
            Ok(())
        }
        _ => bail!("unknown lone op {op}"),
    }
}

/// `n` calls one after the other; prints `LAT P50 P90 P99` (seconds per call) on stderr.
fn lone(op: &str, files: &[String], n: usize) -> Result<()> {
    let files = &files[..files.len().min(LONE_FILES)];
    if files.is_empty() || n == 0 {
        bail!("nothing to call");
    }
    let mut buf = vec![0u8; 256];
    for p in files {
        lone_call(op, p, &mut buf)?;
    }
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = std::time::Instant::now();
        lone_call(op, &files[i % files.len()], &mut buf)?;
        lat.push(t.elapsed().as_secs_f64());
    }
    lat.sort_by(f64::total_cmp);
    let q = |f: f64| lat[((lat.len() - 1) as f64 * f).round() as usize];
    eprintln!("LAT {} {} {}", q(0.5), q(0.9), q(0.99));
    Ok(())
}

fn randread(file: &Path, jobs: usize, ops: usize) -> Result<()> {
    let size = fs::metadata(file)?.len();
    let blocks = (size / 4096).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..jobs)
            .map(|j| {
                s.spawn(move || -> Result<()> {
                    let f = fs::File::open(file)?;
                    let mut buf = vec![0u8; 4096];
                    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ (j as u64 + 1);
                    for _ in 0..ops {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = (x % blocks) * 4096;
                        f.read_at(&mut buf, off)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
        }
        Ok(())
    })
}
