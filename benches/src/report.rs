//! Medians, ratios to kernel overlayfs, and the three outputs: a Markdown table, JSON, SVG.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::layerset::Sizes;
use crate::mount::Fs;
use crate::workloads::{Target, Unit, Workload};

/// Why a run's time does not count: what it left in the view is not kernel overlayfs's.
const VIEW_DIFFERS: &str = "view differs from kernel overlayfs";

/// How far behind the FUSE floor (libfuse's passthrough_ll) rustfuse may be on a metadata or
/// read workload (issue 17).
const FLOOR_RATIO: f64 = 1.1;

pub struct Results<'a> {
    fss: &'a [Fs],
    workloads: Vec<&'a Workload>,
    sizes: Sizes,
    reps: usize,
    mode: &'static str,
    samples: Vec<BTreeMap<&'static str, Vec<f64>>>,
    /// Lone-request workloads: (p50, p90, p99) seconds of each run.
    latency: Vec<BTreeMap<&'static str, Vec<[f64; 3]>>>,
    errors: Vec<BTreeMap<&'static str, String>>,
    /// The hash of each run's description of the view (see `view`).
    views: Vec<BTreeMap<&'static str, Vec<u64>>>,
}

pub(crate) fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn fmt_value(unit: Unit, v: f64) -> String {
    match unit {
        Unit::Bytes => format!("{:.1} MiB", v / (1024.0 * 1024.0)),
        Unit::Seconds if v < 0.001 => format!("{:.1} µs", v * 1e6),
        Unit::Seconds if v < 0.01 => format!("{:.2} ms", v * 1e3),
        Unit::Seconds if v < 1.0 => format!("{:.0} ms", v * 1e3),
        Unit::Seconds => format!("{v:.2} s"),
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
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

fn json_num(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x}"),
        _ => "null".into(),
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The machine the run is on, for the JSON and the docs.
pub fn machine(workdir: &std::path::Path) -> Vec<(&'static str, String)> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(String::new(), |kb| {
            format!("{:.1} GiB", kb as f64 / 1048576.0)
        });
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let u = rustix::system::uname();
    vec![
        ("cpus", cpus.to_string()),
        ("cpu_model", cpu_model),
        ("memory", mem),
        ("kernel", u.release().to_string_lossy().into_owned()),
        ("workdir_copy_up_syncs", workdir_copy_up_syncs(workdir)),
    ]
}

/// When rustfuse (by default) syncs the copy-ups of an upper layer in `workdir`: in the
/// background where that filesystem keeps its metadata in order, else before answering.
pub fn workdir_copy_up_syncs(workdir: &std::path::Path) -> String {
    let order = std::fs::File::open(workdir)
        .map_err(|e| e.to_string())
        .and_then(|d| rustfuse::sys::metadata_order(std::os::fd::AsFd::as_fd(&d)));
    match order {
        Ok(by) => format!("in the background ({by} keeps the metadata in order)"),
        Err(why) => format!("before answering ({why})"),
    }
}

impl<'a> Results<'a> {
    pub fn new(
        fss: &'a [Fs],
        workloads: &[&'a Workload],
        sizes: &Sizes,
        reps: usize,
        mode: &'static str,
    ) -> Self {
        Results {
            fss,
            workloads: workloads.to_vec(),
            sizes: *sizes,
            reps,
            mode,
            samples: vec![BTreeMap::new(); workloads.len()],
            latency: vec![BTreeMap::new(); workloads.len()],
            errors: vec![BTreeMap::new(); workloads.len()],
            views: vec![BTreeMap::new(); workloads.len()],
        }
    }

    /// The hash of the view one run left (see `view::record`).
    pub fn add_view(&mut self, wi: usize, fs: &'static str, digest: u64) {
        self.views[wi].entry(fs).or_default().push(digest);
    }

    /// Whether `fs`'s view differed from kernel overlayfs's in any run of the workload (None:
    /// not both known). Kernel overlayfs's own runs must agree among themselves.
    pub fn view_differs(&self, wi: usize, fs: &str) -> Option<bool> {
        let k = self.views[wi].get("kernel")?;
        let first = *k.first()?;
        if fs == "kernel" {
            return Some(k.iter().any(|d| *d != first));
        }
        Some(self.views[wi].get(fs)?.iter().any(|d| *d != first))
    }

    pub fn add(&mut self, wi: usize, fs: &'static str, v: f64) {
        self.samples[wi].entry(fs).or_default().push(v);
    }

    /// The latency percentiles (p50, p90, p99) of one lone-request run.
    pub fn add_latency(&mut self, wi: usize, fs: &'static str, l: [f64; 3]) {
        self.latency[wi].entry(fs).or_default().push(l);
    }

    /// Median over the repetitions of each percentile, in µs.
    fn latency_us(&self, wi: usize, fs: &str) -> Option<[f64; 3]> {
        let runs = self.latency[wi].get(fs)?;
        let mut out = [0.0; 3];
        for (i, o) in out.iter_mut().enumerate() {
            let v: Vec<f64> = runs.iter().map(|r| r[i] * 1e6).collect();
            *o = median(&v)?;
        }
        Some(out)
    }

    /// The lone-request workloads' latency distribution, when any ran.
    pub fn latency_table(&self) -> String {
        let rows: Vec<usize> = (0..self.workloads.len())
            .filter(|&wi| !self.latency[wi].is_empty())
            .collect();
        if rows.is_empty() {
            return String::new();
        }
        let mut s = String::from(
            "\nLatency per call, µs (p50 / p90 / p99; each the median over the repetitions)\n\n| workload |",
        );
        for f in self.fss {
            let _ = write!(s, " {} |", f.label);
        }
        s.push_str("\n|---|");
        for _ in self.fss {
            s.push_str("---|");
        }
        s.push('\n');
        for wi in rows {
            let _ = write!(s, "| {} |", self.workloads[wi].name);
            for f in self.fss {
                match self.latency_us(wi, f.id) {
                    Some([a, b, c]) => {
                        let _ = write!(s, " {a:.1} / {b:.1} / {c:.1} |");
                    }
                    None => s.push_str(" n/a |"),
                }
            }
            s.push('\n');
        }
        s
    }

    pub fn fail(&mut self, wi: usize, fs: &'static str, e: String) {
        self.errors[wi].entry(fs).or_insert(e);
    }

    fn median(&self, wi: usize, fs: &str) -> Option<f64> {
        self.samples[wi].get(fs).and_then(|v| median(v))
    }

    fn ratio(&self, wi: usize, fs: &str) -> Option<f64> {
        Some(self.median(wi, fs)? / self.median(wi, "kernel")?)
    }

    /// rustfuse's median over rustfuse B's (`--rustfuse-b`), where both ran.
    fn ratio_to_b(&self, wi: usize) -> Option<f64> {
        Some(self.median(wi, "rustfuse")? / self.median(wi, "rustfuse-b")?)
    }

    /// [`Target::EveryVariant`]: every rustfuse column faster than both fuse-overlayfs, the
    /// snapshotter in FUSE mode within `max` times kernel overlayfs.
    fn verdict_variants(&self, wi: usize, max: f64) -> Option<(bool, String)> {
        let mut why = Vec::new();
        let mut any = false;
        for v in ["rustfuse", "snap-fuse", "snap-auto"] {
            let Some(r) = self.median(wi, v) else {
                if self.errors[wi].contains_key(v) {
                    why.push(format!("{v} failed"));
                }
                continue;
            };
            any = true;
            for fo in ["fo1", "fo2"] {
                if let Some(m) = self.median(wi, fo)
                    && r >= m
                {
                    why.push(format!("{v} not faster than {fo}"));
                }
            }
        }
        if let Some(x) = self.ratio(wi, "snap-fuse")
            && x > max
        {
            why.push(format!("snap-fuse {x:.2}x kernel > {max}x"));
        }
        any.then(|| (why.is_empty(), why.join("; ")))
    }

    /// Whether rustfuse meets the target on this workload, and why not.
    fn verdict(&self, wi: usize) -> Option<(bool, String)> {
        let w = self.workloads[wi];
        if let Target::EveryVariant(max) = w.target {
            return self.verdict_variants(wi, max);
        }
        let r = self.median(wi, "rustfuse")?;
        let mut why = Vec::new();
        if self.view_differs(wi, "rustfuse") == Some(true) {
            why.push(VIEW_DIFFERS.to_string());
        }
        for fo in ["fo1", "fo2"] {
            // A fuse-overlayfs whose view was wrong did something else in its time.
            if let Some(m) = self.median(wi, fo)
                && r >= m
                && self.view_differs(wi, fo) != Some(true)
            {
                why.push(match w.unit {
                    Unit::Bytes => format!("not below {fo}"),
                    Unit::Seconds => format!("not faster than {fo}"),
                });
            }
        }
        match w.target {
            Target::KernelRatio(max) => {
                if let Some(x) = self.ratio(wi, "rustfuse")
                    && x > max
                {
                    why.push(format!("{x:.2}x kernel > {max}x"));
                }
            }
            Target::Seconds(max) => {
                if r > max {
                    why.push(format!(
                        "{} > {}",
                        fmt_value(w.unit, r),
                        fmt_value(w.unit, max)
                    ));
                }
            }
            Target::FuseOverlayfsRss(f) => {
                let fo = ["fo1", "fo2"]
                    .iter()
                    .filter_map(|x| self.median(wi, x))
                    .fold(f64::INFINITY, f64::min);
                if fo.is_finite() && r > f * fo {
                    why.push(format!("{:.0}% of fuse-overlayfs", 100.0 * r / fo));
                }
            }
            Target::BeatFuseOverlayfs | Target::EveryVariant(_) => {}
        }
        // Issue 17: within 1.1x of the FUSE floor (or ahead) where it ran.
        if let Some(fl) = self.median(wi, "floor")
            && r > FLOOR_RATIO * fl
        {
            why.push(format!("{:.2}x FUSE floor > {FLOOR_RATIO}x", r / fl));
        }
        Some((why.is_empty(), why.join("; ")))
    }

    fn target_text(w: &Workload) -> String {
        match w.target {
            Target::KernelRatio(x) => format!("≤{x}x kernel"),
            Target::Seconds(s) => format!("<{}", fmt_value(w.unit, s)),
            Target::FuseOverlayfsRss(f) => format!("≤{f}× f-o RSS"),
            Target::BeatFuseOverlayfs => "beat f-o".into(),
            Target::EveryVariant(x) => {
                format!("every rustfuse column beats f-o; snap-fuse ≤{x}x kernel")
            }
        }
    }

    fn cell(&self, wi: usize, f: &Fs) -> String {
        if let Some(m) = &f.missing {
            return m.clone();
        }
        match self.median(wi, f.id) {
            Some(v) => {
                let mut s = fmt_value(self.workloads[wi].unit, v);
                if f.id != "kernel"
                    && let Some(r) = self.ratio(wi, f.id)
                {
                    let _ = write!(s, " ({r:.2}x)");
                }
                if self.view_differs(wi, f.id) == Some(true) {
                    s.push_str(if f.id == "kernel" {
                        " (view varies)"
                    } else {
                        " **≠ kernel**"
                    });
                }
                s
            }
            None if self.errors[wi].contains_key(f.id) => "FAILED".into(),
            None => "n/a".into(),
        }
    }

    /// One line per workload for the progress output.
    pub fn summary_line(&self, wi: usize) -> String {
        let mut s = format!("{:15}", self.workloads[wi].name);
        for f in self.fss {
            let _ = write!(s, "  {}: {}", f.id, self.cell(wi, f));
        }
        s
    }

    fn has_b(&self) -> bool {
        self.fss
            .iter()
            .any(|f| f.id == "rustfuse-b" && f.missing.is_none())
    }

    /// A Markdown table of medians with ratios to kernel overlayfs (and of rustfuse to
    /// rustfuse B, when there is a B).
    pub fn table(&self) -> String {
        let mut s = String::from("| workload |");
        for f in self.fss {
            let _ = write!(s, " {} |", f.label);
        }
        if self.has_b() {
            s.push_str(" rustfuse / B |");
        }
        s.push_str(" target (rustfuse) | met |\n|---|");
        for _ in self.fss {
            s.push_str("---|");
        }
        if self.has_b() {
            s.push_str("---|");
        }
        s.push_str("---|---|\n");
        for (wi, w) in self.workloads.iter().enumerate() {
            let _ = write!(s, "| {} |", w.name);
            for f in self.fss {
                let _ = write!(s, " {} |", self.cell(wi, f));
            }
            if self.has_b() {
                match self.ratio_to_b(wi) {
                    Some(r) => {
                        let _ = write!(s, " {r:.3} |");
                    }
                    None => s.push_str(" n/a |"),
                }
            }
            let verdict = match self.verdict(wi) {
                Some((true, _)) => "yes".to_string(),
                Some((false, why)) => format!("**no**: {why}"),
                None => "-".into(),
            };
            let _ = writeln!(s, " {} | {} |", Self::target_text(w), verdict);
        }
        s
    }

    pub fn json(&self, machine: &[(&str, String)]) -> String {
        let mut s = String::from("{\n  \"machine\": {");
        let m: Vec<String> = machine
            .iter()
            .map(|(k, v)| format!("{}: {}", json_str(k), json_str(v)))
            .collect();
        s.push_str(&m.join(", "));
        let _ = write!(
            s,
            "}},\n  \"mode\": {},\n  \"scale\": {},\n  \"reps\": {},\n  \"small_files\": {},\n  \"filesystems\": [",
            json_str(self.mode),
            self.sizes.scale,
            self.reps,
            self.sizes.files
        );
        let fs: Vec<String> = self
            .fss
            .iter()
            .map(|f| {
                format!(
                    "\n    {{\"id\": {}, \"label\": {}, \"path\": {}, \"version\": {}, \"missing\": {}}}",
                    json_str(f.id),
                    json_str(f.label),
                    json_str(&f.bin.display().to_string()),
                    json_str(&f.version),
                    f.missing.as_deref().map_or("null".into(), json_str)
                )
            })
            .collect();
        s.push_str(&fs.join(","));
        s.push_str("\n  ],\n  \"workloads\": [");
        let ws: Vec<String> = self
            .workloads
            .iter()
            .enumerate()
            .map(|(wi, w)| {
                let per = |f: &dyn Fn(&Fs) -> String| {
                    self.fss
                        .iter()
                        .map(|x| format!("{}: {}", json_str(x.id), f(x)))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let samples = per(&|x| {
                    let v = self.samples[wi].get(x.id).cloned().unwrap_or_default();
                    format!(
                        "[{}]",
                        v.iter().map(|n| format!("{n}")).collect::<Vec<_>>().join(", ")
                    )
                });
                let medians = per(&|x| json_num(self.median(wi, x.id)));
                let ratios = per(&|x| json_num(self.ratio(wi, x.id)));
                let to_b = json_num(self.ratio_to_b(wi));
                let latency = per(&|x| match self.latency_us(wi, x.id) {
                    Some([a, b, c]) => format!("[{a}, {b}, {c}]"),
                    None => "null".into(),
                });
                let differs = per(&|x| match self.view_differs(wi, x.id) {
                    Some(d) => d.to_string(),
                    None => "null".into(),
                });
                let errors = self.errors[wi]
                    .iter()
                    .map(|(k, v)| format!("{}: {}", json_str(k), json_str(v)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let (met, why) = match self.verdict(wi) {
                    Some((m, why)) => (m.to_string(), json_str(&why)),
                    None => ("null".into(), "null".into()),
                };
                format!(
                    "\n    {{\"name\": {}, \"group\": {}, \"unit\": {}, \"about\": {}, \"target\": {}, \
                     \"samples\": {{{samples}}}, \"median\": {{{medians}}}, \
                     \"ratio_to_kernel\": {{{ratios}}}, \"ratio_rustfuse_to_b\": {to_b}, \
                     \"latency_us_p50_p90_p99\": {{{latency}}}, \
                     \"view_differs_from_kernel\": {{{differs}}}, \"errors\": {{{errors}}}, \
                     \"rustfuse_target_met\": {met}, \"rustfuse_misses\": {why}}}",
                    json_str(w.name),
                    json_str(w.group.name()),
                    json_str(match w.unit {
                        Unit::Seconds => "s",
                        Unit::Bytes => "bytes",
                    }),
                    json_str(w.about),
                    json_str(&Self::target_text(w)),
                )
            })
            .collect();
        s.push_str(&ws.join(","));
        s.push_str("\n  ]\n}\n");
        s
    }

    /// Horizontal bars of the ratio to kernel overlayfs on a log2 axis (0.25x to 64x).
    /// Workloads without a kernel median (RSS) are drawn relative to fuse-overlayfs 1.x.
    pub fn svg(&self) -> String {
        const COLORS: [&str; 7] = [
            "#4c72b0", "#dd8452", "#c44e52", "#55a868", "#8172b3", "#937860", "#da8bc3",
        ];
        let (left, width, bar, gap) = (170.0, 640.0, 9.0, 10.0);
        let (lo, hi) = (-2.0f64, 6.0f64);
        let x = |r: f64| left + (r.log2().clamp(lo, hi) - lo) / (hi - lo) * width;
        let n = self.fss.len() as f64;
        let block = n * bar + gap;
        // The legend takes a row per four columns.
        let legend_rows = self.fss.len().div_ceil(4).max(1);
        let top = 38.0 + 12.0 * legend_rows as f64;
        let height = top + block * self.workloads.len() as f64 + 40.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" \
             font-family=\"sans-serif\" font-size=\"11\">",
            left + width + 80.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{left}\" y=\"16\" font-size=\"13\">Median time relative to kernel \
             overlayfs (log scale, lower is better); {}, scale {}, {} reps</text>",
            self.mode, self.sizes.scale, self.reps
        );
        for (i, f) in self.fss.iter().enumerate() {
            let lx = left + (i % 4) as f64 * 160.0;
            let ly = 24.0 + (i / 4) as f64 * 12.0;
            let _ = writeln!(
                s,
                "<rect x=\"{lx}\" y=\"{ly}\" width=\"10\" height=\"10\" fill=\"{}\"/>\
                 <text x=\"{}\" y=\"{}\">{}</text>",
                COLORS[i % COLORS.len()],
                lx + 14.0,
                ly + 9.0,
                xml(f.label)
            );
        }
        let bottom = height - 30.0;
        for e in (lo as i32)..=(hi as i32) {
            let r = 2f64.powi(e);
            let gx = x(r);
            let _ = writeln!(
                s,
                "<line x1=\"{gx}\" y1=\"{top}\" x2=\"{gx}\" y2=\"{bottom}\" stroke=\"{}\"/>\
                 <text x=\"{gx}\" y=\"{}\" text-anchor=\"middle\">{}x</text>",
                if e == 0 { "#333" } else { "#ddd" },
                bottom + 14.0,
                if r < 1.0 {
                    format!("{r}")
                } else {
                    format!("{r:.0}")
                }
            );
        }
        for (wi, w) in self.workloads.iter().enumerate() {
            let y0 = top + wi as f64 * block;
            let base = if self.median(wi, "kernel").is_some() {
                "kernel"
            } else {
                "fo1"
            };
            let label = if base == "kernel" {
                w.name.to_string()
            } else {
                format!("{} (vs f-o 1.x)", w.name)
            };
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
                left - 6.0,
                y0 + n * bar / 2.0 + 4.0,
                xml(&label)
            );
            for (i, f) in self.fss.iter().enumerate() {
                let y = y0 + i as f64 * bar;
                let (Some(v), Some(b)) = (self.median(wi, f.id), self.median(wi, base)) else {
                    continue;
                };
                let r = v / b;
                let _ = writeln!(
                    s,
                    "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{}\">\
                     <title>{}: {} ({r:.2}x)</title></rect>\
                     <text x=\"{:.1}\" y=\"{}\" font-size=\"8\">{r:.2}x</text>",
                    (x(r) - left).max(1.0),
                    bar - 1.0,
                    COLORS[i % COLORS.len()],
                    xml(f.label),
                    fmt_value(w.unit, v),
                    x(r) + 3.0,
                    y + bar - 2.0
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::Kind;
    use crate::workloads::WORKLOADS;

    fn fs(id: &'static str, kind: Kind) -> Fs {
        Fs {
            id,
            label: id,
            kind,
            bin: "x".into(),
            version: String::new(),
            missing: None,
        }
    }

    /// A filesystem whose view differs from kernel overlayfs's is marked, and rustfuse need
    /// not beat its time; rustfuse's own wrong view fails its target.
    #[test]
    fn a_view_unlike_the_kernels_is_marked_and_its_time_not_counted() {
        let fss = [
            fs("kernel", Kind::Kernel),
            fs("fo2", Kind::Fuse),
            fs("rustfuse", Kind::Fuse),
        ];
        let w = WORKLOADS.iter().find(|w| w.name == "renames").unwrap();
        let mut r = Results::new(&fss, &[w], &Sizes::new(0.3), 1, "root");
        for (id, t, view) in [("kernel", 1.0, 7), ("fo2", 0.5, 8), ("rustfuse", 0.9, 7)] {
            r.add(0, id, t);
            r.add_view(0, id, view);
        }
        assert_eq!(r.view_differs(0, "fo2"), Some(true));
        assert_eq!(r.view_differs(0, "rustfuse"), Some(false));
        let table = r.table();
        assert!(table.contains("500 ms (0.50x) **≠ kernel**"), "{table}");
        assert_eq!(r.verdict(0), Some((true, String::new())), "{table}");
        r.add(0, "rustfuse", 0.9);
        r.add_view(0, "rustfuse", 9);
        let (met, why) = r.verdict(0).unwrap();
        assert!(!met && why.contains(VIEW_DIFFERS), "{why}");
        assert!(r.json(&[]).contains(
            "\"view_differs_from_kernel\": {\"kernel\": false, \"fo2\": true, \"rustfuse\": true}"
        ));
    }
}
