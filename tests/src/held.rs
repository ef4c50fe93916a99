//! A log appended to beside a reader: `tail -f` on a lower file that short-lived writers append
//! to with `>>`. The scenario of tests/tests/reads.rs and of the comparison tool's append-held
//! workload; kernel overlayfs moves the reader's handle to the copy the first append makes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The lower file as the scenario starts from it: a small log.
pub fn lower_log() -> Vec<u8> {
    (0..64)
        .flat_map(|i| format!("lower layer log line {i}\n").into_bytes())
        .collect()
}

/// Appends `n` lines to `file`, each through its own `O_APPEND` open, while a read handle
/// opened before the first stays open. After each append that handle must read every line
/// (the first mismatch ends the appends), and again once its pages are out of the page cache
/// (`POSIX_FADV_DONTNEED`, as memory pressure would do, so the read asks the filesystem);
/// after its close a fresh open must read them all. Returns what was written (the file as it
/// was, then the lines) and each of those checks that failed; an open, write or read that
/// fails is an error naming it.
pub fn append_beside_reader(file: &Path, n: usize) -> Result<(Vec<u8>, Vec<String>), String> {
    let shown = file.display();
    let held = fs::File::open(file).map_err(|e| format!("open {shown} for reading: {e}"))?;
    let mut want = read_from_start(&held)?;
    let mut problems = Vec::new();
    for i in 0..n {
        let line = format!("appended line {i}\n");
        fs::OpenOptions::new()
            .append(true)
            .open(file)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| format!("append {i} to {shown}: {e}"))?;
        want.extend_from_slice(line.as_bytes());
        let got = read_from_start(&held)?;
        if got != want {
            problems.push(format!(
                "after append {i} the handle of {shown} opened before the appends reads {}",
                compared(&got, &want)
            ));
            break;
        }
    }
    rustix::fs::fadvise(&held, 0, None, rustix::fs::Advice::DontNeed)
        .map_err(|e| format!("fadvise DONTNEED on {shown}: {e}"))?;
    let got = read_from_start(&held)?;
    if got != want {
        problems.push(format!(
            "out of the page cache, the handle of {shown} opened before the appends reads {}",
            compared(&got, &want)
        ));
    }
    drop(held);
    let got = fs::read(file).map_err(|e| format!("read {shown} after the appends: {e}"))?;
    if got != want {
        problems.push(format!(
            "after the handle's close a fresh open of {shown} reads {}",
            compared(&got, &want)
        ));
    }
    Ok((want, problems))
}

/// Everything `f` reads from offset 0 on.
fn read_from_start(f: &fs::File) -> Result<Vec<u8>, String> {
    let mut v = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f
            .read_at(&mut buf, v.len() as u64)
            .map_err(|e| format!("read the held handle at {}: {e}", v.len()))?;
        if n == 0 {
            return Ok(v);
        }
        v.extend_from_slice(&buf[..n]);
    }
}

/// What was read against what was written: sizes and how many leading bytes agree.
fn compared(got: &[u8], want: &[u8]) -> String {
    let same = got.iter().zip(want).take_while(|(a, b)| a == b).count();
    format!(
        "{} bytes ({same} of them as written), not the {} written",
        got.len(),
        want.len()
    )
}
