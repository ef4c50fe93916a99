//! Results: medians, the table, the JSON (written by hand: no serde in the workspace).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::Target;

pub const PHASES: [&str; 7] = [
    "prepare", "mounts", "mount", "write", "umount", "commit", "remove",
];

pub struct Cycles {
    pub target: Target,
    /// Per cycle, the phases in [`PHASES`] order.
    pub cycles: Vec<[Duration; 7]>,
    /// Per batch, the synchronous GC after it divided by the batch's cycles.
    pub gc_per_cycle: Vec<Duration>,
}

impl Cycles {
    pub fn new(target: Target) -> Cycles {
        Cycles {
            target,
            cycles: Vec::new(),
            gc_per_cycle: Vec::new(),
        }
    }

    fn totals(&self) -> Vec<Duration> {
        self.cycles.iter().map(|c| c.iter().sum()).collect()
    }

    fn phase(&self, i: usize) -> Vec<Duration> {
        self.cycles.iter().map(|c| c[i]).collect()
    }
}

pub struct Unpacks {
    pub target: Target,
    pub unpack: Vec<Duration>,
    pub view_mount: Vec<Duration>,
}

impl Unpacks {
    pub fn new(target: Target) -> Unpacks {
        Unpacks {
            target,
            unpack: Vec::new(),
            view_mount: Vec::new(),
        }
    }
}

pub fn median(v: &[Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let mut s = v.to_vec();
    s.sort();
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2
    }
}

fn mean(v: &[Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.iter().sum::<Duration>() / v.len() as u32
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ratio(x: Duration, base: Duration) -> f64 {
    if base.is_zero() {
        f64::NAN
    } else {
        x.as_secs_f64() / base.as_secs_f64()
    }
}

fn cmd_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub struct Machine {
    pub nproc: usize,
    pub mem_total: String,
    pub kernel: String,
    pub containerd: String,
    pub snapshotter: String,
    pub rustfuse: String,
}

impl Machine {
    pub fn probe(snap: &Path, fuse: &Path) -> Machine {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .map(|l| l.trim_start_matches("MemTotal:").trim().to_string())
            .unwrap_or_default();
        let u = rustix::system::uname();
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_total,
            kernel: format!(
                "{} {}",
                u.release().to_string_lossy(),
                u.machine().to_string_lossy()
            ),
            containerd: cmd_line("containerd", &["--version"]),
            snapshotter: snap.display().to_string(),
            rustfuse: fuse.display().to_string(),
        }
    }

    pub fn text(&self) -> String {
        format!(
            "machine: {} CPUs, {} RAM, kernel {}\n{}\nrustfuse-snapshotter: {}\nrustfuse: {}",
            self.nproc,
            self.mem_total,
            self.kernel,
            self.containerd,
            self.snapshotter,
            self.rustfuse
        )
    }
}

/// The results as Markdown tables.
pub fn table(cycles: usize, layers: usize, a: &[Cycles], b: &[Unpacks]) -> String {
    let mut s = String::new();
    if let Some(base) = a.first() {
        let base_m = median(&base.totals());
        let _ = writeln!(
            s,
            "\nWorkload A: Prepare+Mounts+mount+write+umount+Commit+Remove, {cycles} cycles per snapshotter\n"
        );
        let _ = writeln!(
            s,
            "| snapshotter | median/cycle | mean/cycle | vs overlayfs (median) | GC/cycle (median) |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        for c in a {
            let t = c.totals();
            let _ = writeln!(
                s,
                "| {} | {:.3} ms | {:.3} ms | {:.2}x | {:.3} ms |",
                c.target.label,
                ms(median(&t)),
                ms(mean(&t)),
                ratio(median(&t), base_m),
                ms(median(&c.gc_per_cycle)),
            );
        }
        let _ = writeln!(s, "\nWorkload A, median per phase (ms):\n");
        let _ = writeln!(s, "| snapshotter | {} |", PHASES.join(" | "));
        let _ = writeln!(s, "|---|{}", "---:|".repeat(PHASES.len()));
        for c in a {
            let cells: Vec<String> = (0..PHASES.len())
                .map(|i| format!("{:.3}", ms(median(&c.phase(i)))))
                .collect();
            let _ = writeln!(s, "| {} | {} |", c.target.label, cells.join(" | "));
        }
    }
    if let Some(base) = b.first() {
        let base_m = median(&base.unpack);
        let import = b
            .iter()
            .find(|u| u.target.sn.is_empty())
            .map(|u| median(&u.unpack))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "\nWorkload B: `ctr images import --snapshotter X` of a {layers}-layer image (content already in the store: unpack of every layer)\n"
        );
        let _ = writeln!(
            s,
            "| snapshotter | reps | median | min | max | vs overlayfs (median) | median minus import-only | net vs overlayfs | View+mount of the top (median) |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for u in b {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.2}x | {:.0} ms | {:.2}x | {:.1} ms |",
                u.target.label,
                u.unpack.len(),
                ms(median(&u.unpack)),
                ms(u.unpack.iter().min().copied().unwrap_or_default()),
                ms(u.unpack.iter().max().copied().unwrap_or_default()),
                ratio(median(&u.unpack), base_m),
                ms(median(&u.unpack).saturating_sub(import)),
                ratio(
                    median(&u.unpack).saturating_sub(import),
                    base_m.saturating_sub(import)
                ),
                ms(median(&u.view_mount)),
            );
        }
    }
    s
}

fn jstr(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn jnum(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6}")
    } else {
        "null".into()
    }
}

fn jlist(v: &[Duration]) -> String {
    let items: Vec<String> = v.iter().map(|d| jnum(ms(*d))).collect();
    format!("[{}]", items.join(","))
}

/// The results as JSON (times in milliseconds).
pub fn json(m: &Machine, cmdline: &str, a: &[Cycles], b: &[Unpacks]) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(
        s,
        "  \"machine\": {{\"nproc\": {}, \"mem_total\": {}, \"kernel\": {}, \"containerd\": {}}},",
        m.nproc,
        jstr(&m.mem_total),
        jstr(&m.kernel),
        jstr(&m.containerd)
    );
    let _ = writeln!(s, "  \"command\": {},", jstr(cmdline));
    let base_a = a.first().map(|c| median(&c.totals())).unwrap_or_default();
    let cyc: Vec<String> = a
        .iter()
        .map(|c| {
            let t = c.totals();
            let phases: Vec<String> = PHASES
                .iter()
                .enumerate()
                .map(|(i, p)| format!("{}: {}", jstr(p), jnum(ms(median(&c.phase(i))))))
                .collect();
            format!(
                "    {{\"snapshotter\": {}, \"label\": {}, \"cycles\": {}, \"median_ms\": {}, \"mean_ms\": {}, \"ratio_to_overlayfs\": {}, \"gc_per_cycle_median_ms\": {}, \"phase_median_ms\": {{{}}}, \"cycle_ms\": {}}}",
                jstr(c.target.sn),
                jstr(c.target.label),
                t.len(),
                jnum(ms(median(&t))),
                jnum(ms(mean(&t))),
                jnum(ratio(median(&t), base_a)),
                jnum(ms(median(&c.gc_per_cycle))),
                phases.join(", "),
                jlist(&t),
            )
        })
        .collect();
    let _ = writeln!(s, "  \"cycles\": [\n{}\n  ],", cyc.join(",\n"));
    let base_b = b.first().map(|u| median(&u.unpack)).unwrap_or_default();
    let unp: Vec<String> = b
        .iter()
        .map(|u| {
            format!(
                "    {{\"snapshotter\": {}, \"label\": {}, \"median_ms\": {}, \"ratio_to_overlayfs\": {}, \"unpack_ms\": {}, \"view_mount_ms\": {}}}",
                jstr(u.target.sn),
                jstr(u.target.label),
                jnum(ms(median(&u.unpack))),
                jnum(ratio(median(&u.unpack), base_b)),
                jlist(&u.unpack),
                jlist(&u.view_mount),
            )
        })
        .collect();
    let _ = writeln!(s, "  \"unpack\": [\n{}\n  ]", unp.join(",\n"));
    s.push_str("}\n");
    s
}
