//! The layers of an exported image, read from the OCI layout itself (umoci's raw unpack
//! flattens them): each layer blob listed with `tar -tv`, so a test can see what one Dockerfile
//! step put into its layer, hard-link entries included.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::env::run_command;

/// One entry of a layer tar, as `tar --numeric-owner -tv` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    /// The path, without `./` or a trailing `/`.
    pub name: String,
    /// `-` file, `d` directory, `l` symlink, `h` hard link to an earlier entry, `p` fifo, ...
    pub kind: char,
    /// Permission bits, set-id and sticky bits included.
    pub mode: u32,
    /// `uid/gid`.
    pub owner: String,
    /// Size of a regular file (0 for every other kind).
    pub size: u64,
    /// A symlink's target, or the name a hard-link entry links to.
    pub link: String,
}

impl std::fmt::Display for LayerEntry {
    /// Everything the comparison looks at, on one line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {:04o} {}",
            self.name, self.kind, self.mode, self.owner
        )?;
        match self.kind {
            '-' => write!(f, " {} bytes", self.size),
            'l' => write!(f, " -> {}", self.link),
            'h' => write!(f, " link to {}", self.link),
            _ => Ok(()),
        }
    }
}

/// A layer: its digest and its entries by name.
#[derive(Debug, Clone)]
pub struct Layer {
    pub digest: String,
    pub entries: BTreeMap<String, LayerEntry>,
}

/// The `sha256:HEX` digests in `text`, in order.
fn digests(text: &str) -> Vec<String> {
    text.match_indices("sha256:")
        .filter_map(|(i, _)| {
            let hex = text.get(i + 7..i + 7 + 64)?;
            hex.bytes()
                .all(|b| b.is_ascii_hexdigit())
                .then(|| format!("sha256:{hex}"))
        })
        .collect()
}

/// The blob `digest` of the layout at `layout`.
fn blob(layout: &Path, digest: &str) -> std::path::PathBuf {
    layout.join("blobs").join(digest.replacen(':', "/", 1))
}

/// The layers of the one image manifest of the OCI layout `layout`, bottom first, each listed.
pub fn read_layers(layout: &Path) -> Result<Vec<Layer>, String> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let index = read(&layout.join("index.json"))?;
    // The manifest is the blob the index names that has "layers" (an image index would
    // name a manifest in turn; BuildKit exports one manifest without attestations).
    let mut manifest = None;
    let mut todo = digests(&index);
    while let Some(d) = todo.pop() {
        let text = read(&blob(layout, &d))?;
        if let Some((_, after)) = text.split_once("\"layers\"") {
            manifest = Some(after.split(']').next().unwrap_or_default().to_string());
            break;
        }
        if text.contains("\"manifests\"") {
            todo.extend(digests(&text));
        }
    }
    let layers = manifest.ok_or_else(|| format!("no image manifest in {}", layout.display()))?;
    digests(&layers)
        .into_iter()
        .map(|d| {
            let out = run_command(
                Command::new("tar")
                    .args(["--numeric-owner", "-tvf"])
                    .arg(blob(layout, &d)),
                Duration::from_secs(60),
            )?;
            if !out.status.success() {
                return Err(format!("tar -tvf layer {d} {}", out.report()));
            }
            let entries = parse_listing(&out.stdout)
                .map_err(|e| format!("layer {d}: {e}\n{}", out.stdout))?;
            Ok(Layer { digest: d, entries })
        })
        .collect()
}

/// Permission bits from `ls`-style text (`rwsr-xr-x`).
fn mode_of(perms: &str) -> Option<u32> {
    let c: Vec<char> = perms.chars().collect();
    if c.len() != 9 {
        return None;
    }
    let mut m = 0;
    for (i, ch) in c.iter().enumerate() {
        let bit = 1 << (8 - i);
        match ch {
            'r' | 'w' | 'x' => m |= bit,
            's' | 't' => m |= bit | [0o4000, 0o2000, 0o1000][i / 3],
            'S' | 'T' => m |= [0o4000, 0o2000, 0o1000][i / 3],
            '-' => {}
            _ => return None,
        }
    }
    Some(m)
}

/// Parses GNU tar's `--numeric-owner -tv` listing: `PERMS UID/GID SIZE DATE TIME NAME`
/// (`NAME -> TARGET` for a symlink, `NAME link to TARGET` for a hard link).
pub fn parse_listing(listing: &str) -> Result<BTreeMap<String, LayerEntry>, String> {
    let norm = |s: &str| {
        let s = s.strip_prefix("./").unwrap_or(s);
        s.strip_suffix('/').unwrap_or(s).to_string()
    };
    let mut entries = BTreeMap::new();
    for line in listing.lines().filter(|l| !l.trim().is_empty()) {
        // GNU tar pads the size column with spaces.
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 6 {
            return Err(format!("tar listing line {line:?}"));
        }
        let perms = words[0];
        let rest = words[5..].join(" ");
        let kind = perms.chars().next().unwrap_or('?');
        let (name, link) = match kind {
            'l' => rest.split_once(" -> ").map(|(n, t)| (n, t.to_string())),
            'h' => rest.split_once(" link to ").map(|(n, t)| (n, norm(t))),
            _ => Some((rest.as_str(), String::new())),
        }
        .ok_or_else(|| format!("tar listing line {line:?}: no link target"))?;
        let name = norm(name);
        if name.is_empty() || name == "." {
            continue;
        }
        let mode = mode_of(&perms[1..]).ok_or_else(|| format!("permissions in {line:?}"))?;
        let entry = LayerEntry {
            name: name.clone(),
            kind,
            mode,
            owner: words[1].to_string(),
            size: if kind == '-' {
                words[2].parse().unwrap_or(0)
            } else {
                0
            },
            link,
        };
        if entries.insert(name.clone(), entry).is_some() {
            return Err(format!("{name} twice in one layer"));
        }
    }
    Ok(entries)
}

/// A Dockerfile step that changes the metadata of ONE name of a hard link made in an earlier
/// step (see [`super::DOCKERFILE`]).
#[derive(Debug)]
pub struct LinkChange {
    /// The step, as the Dockerfile has it.
    pub step: &'static str,
    /// The name the step changes.
    pub changed: &'static str,
    /// Every name of the file, sorted.
    pub group: &'static [&'static str],
    /// The mode after the step, and before it.
    pub mode: (u32, u32),
    /// The owner (`uid/gid`) after the step, and before it.
    pub owner: (&'static str, &'static str),
}

/// What a copy-up does to the other names of a lower hard link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkCopyUp {
    /// Every name stays one file (kernel overlayfs with `index=on`; rustfuse): the step's
    /// layer holds one file and a hard-link entry for each other name.
    Kept,
    /// Only the changed name is copied up and becomes a file of its own (kernel overlayfs
    /// with `index=off`, which containerd's and rustfuse-snapshotter's overlay mounts ask
    /// for): the layer holds that name alone, the others keep the old metadata.
    Split,
}

impl LinkChange {
    /// Which form the step's layer has, or what is wrong with it.
    pub fn in_layer(&self, layer: &Layer) -> Result<LinkCopyUp, String> {
        let got: Vec<&LayerEntry> = self
            .group
            .iter()
            .filter_map(|n| layer.entries.get(*n))
            .collect();
        let shown = || {
            let lines: Vec<String> = got.iter().map(|e| e.to_string()).collect();
            format!("{:?}", lines)
        };
        let changed_ok = |e: &LayerEntry| e.mode == self.mode.0 && e.owner == self.owner.0;
        let files: Vec<&&LayerEntry> = got.iter().filter(|e| e.kind == '-').collect();
        match files.as_slice() {
            [file] if got.len() == 1 && file.name == self.changed && changed_ok(file) => {
                Ok(LinkCopyUp::Split)
            }
            [file]
                if got.len() == self.group.len()
                    && changed_ok(file)
                    && got
                        .iter()
                        .all(|e| e.name == file.name || (e.kind == 'h' && e.link == file.name)) =>
            {
                Ok(LinkCopyUp::Kept)
            }
            _ => Err(format!(
                "`{}`: the layer's entries for {:?} are {}; want one file (mode {:04o}, owner \
                 {}) and a hard-link entry to it for every other name, or (index=off) {} alone",
                self.step,
                self.group,
                shown(),
                self.mode.0,
                self.owner.0,
                self.changed
            )),
        }
    }
}

/// For each layer of `a` and `b` (which must have as many), the entries that differ, one
/// line each; `skip(i, name)` leaves an entry of layer `i` out.
pub fn diff_layers(
    a: &[Layer],
    an: &str,
    b: &[Layer],
    bn: &str,
    skip: impl Fn(usize, &str) -> bool,
) -> Vec<String> {
    if a.len() != b.len() {
        return vec![format!("{an} has {} layers, {bn} {}", a.len(), b.len())];
    }
    let mut out = Vec::new();
    for (i, (la, lb)) in a.iter().zip(b).enumerate() {
        let names: std::collections::BTreeSet<&String> =
            la.entries.keys().chain(lb.entries.keys()).collect();
        for n in names.into_iter().filter(|n| !skip(i, n)) {
            let show = |e: Option<&LayerEntry>| e.map_or("(none)".to_string(), |e| e.to_string());
            let (x, y) = (la.entries.get(n), lb.entries.get(n));
            if x != y {
                out.push(format!("layer {i}: {an}: {}; {bn}: {}", show(x), show(y)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gnu_tar_listing() {
        let l = "drwxr-xr-x 0/0               0 2026-12-06 05:30 gen/\n\
                 -rw----r-- 0/0               2 2026-12-06 05:30 gen/a\n\
                 hrw----r-- 0/0               0 2026-12-06 05:30 gen/b link to gen/a\n\
                 lrwxrwxrwx 0/0               0 2026-12-06 05:30 new/sym -> one\n\
                 -rwsr-xr-x 7/8              10 2026-12-06 05:30 ./new/suid\n\
                 drwxr-sr-x 0/0               0 2026-12-06 05:30 new/d/\n";
        let e = parse_listing(l).unwrap();
        assert_eq!(e["gen"].kind, 'd');
        assert_eq!(e["gen/a"].mode, 0o604);
        assert_eq!((e["gen/b"].kind, e["gen/b"].link.as_str()), ('h', "gen/a"));
        assert_eq!(e["new/sym"].link, "one");
        assert_eq!((e["new/suid"].mode, e["new/suid"].size), (0o4755, 10));
        assert_eq!(e["new/suid"].owner, "7/8");
        assert_eq!(e["new/d"].mode, 0o2755);
        assert_eq!(e["gen/b"].to_string(), "gen/b h 0604 0/0 link to gen/a");
    }

    #[test]
    fn finds_digests() {
        let h = "a".repeat(64);
        assert_eq!(
            digests(&format!(r#"{{"digest":"sha256:{h}","x":"sha256:12"}}"#)),
            vec![format!("sha256:{h}")]
        );
    }
}
