//! `--count-requests`: the FUSE requests each daemon got during one run of each workload,
//! by opcode, read back from the daemons' own request logs (libfuse's `-d` for
//! fuse-overlayfs 1.x and the FUSE floor, fuser's debug log for fuse-overlayfs 2.0 and
//! rustfuse). Logging slows the daemons down, so this mode times nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// Opcode -> count, from one daemon's log.
pub type Counts = BTreeMap<String, u64>;

/// Counts the requests a log shows. libfuse writes `unique: N, opcode: NAME (n), ...`;
/// fuser writes `FUSE(  N) ino 0x... NAME ...`, with no name for FORGET and BATCH_FORGET.
pub fn parse(log: &str) -> Counts {
    let mut c = Counts::new();
    for line in log.lines() {
        let op = if let Some(rest) = line.split_once("opcode: ").map(|(_, r)| r) {
            rest.split([' ', ',']).next().unwrap_or("")
        } else if let Some(rest) = line.split_once("FUSE(").map(|(_, r)| r) {
            let Some((_, after)) = rest.split_once(") ino 0x") else {
                continue;
            };
            let mut words = after.split(' ');
            words.next();
            match words.next() {
                Some(w)
                    if !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '_') =>
                {
                    w
                }
                _ => "FORGET",
            }
        } else {
            continue;
        };
        if !op.is_empty() {
            *c.entry(op.to_string()).or_default() += 1;
        }
    }
    c
}

/// One Markdown table per workload: a row per opcode, a column per filesystem, the totals
/// last.
pub fn table(per_workload: &[(String, Vec<(String, Counts)>)]) -> String {
    let mut s = String::new();
    for (w, cols) in per_workload {
        let _ = writeln!(s, "\n### {w}\n");
        s.push_str("| request |");
        for (label, _) in cols {
            let _ = write!(s, " {label} |");
        }
        s.push_str("\n|---|");
        for _ in cols {
            s.push_str("---:|");
        }
        s.push('\n');
        let ops: BTreeSet<&String> = cols.iter().flat_map(|(_, c)| c.keys()).collect();
        for op in ops {
            let _ = write!(s, "| {op} |");
            for (_, c) in cols {
                let _ = write!(s, " {} |", c.get(op).copied().unwrap_or(0));
            }
            s.push('\n');
        }
        s.push_str("| **total** |");
        for (_, c) in cols {
            let _ = write!(s, " **{}** |", c.values().sum::<u64>());
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_log_formats() {
        let log = "unique: 4, opcode: LOOKUP (1), nodeid: 1, insize: 42, pid: 7\n\
                   unique: 6, opcode: GETATTR (3), nodeid: 2, insize: 56, pid: 7\n\
                   2026-12-06T08:31:15Z DEBUG fuser::request: FUSE(  8) ino 0x0000000000988040 OPEN flags 0x8000 thread=fuser-2\n\
                   [2026-12-06T08:31:10Z DEBUG fuser::request] FUSE( 16) ino 0x0000000000988040 thread=fuser-0\n\
                   [2026-12-06T08:31:10Z DEBUG fuser::request] FUSE( 18) ino 0x0000000000000001 LOOKUP name \"f\" thread=fuser-1\n\
                   something else\n";
        let c = parse(log);
        assert_eq!(c.get("LOOKUP"), Some(&2));
        assert_eq!(c.get("GETATTR"), Some(&1));
        assert_eq!(c.get("OPEN"), Some(&1));
        assert_eq!(c.get("FORGET"), Some(&1));
        assert_eq!(c.values().sum::<u64>(), 5);
    }
}
