//! The mount-option codec: fuse-overlayfs's `-o` language, parsed and written.
//!
//! Pure functions, no I/O: the snapshotter uses [`join_lowerdirs`] to write `lowerdir=` values
//! and the daemon uses [`parse`] to read a command line's options.
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// One `FROM:TO:LEN` range of a `uidmapping=` or `gidmapping=` option.
/// FROM is the id stored on disk, TO the id shown through the mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub disk: u32,
    pub shown: u32,
    pub len: u32,
}

/// An id mapping made of ranges. Empty means identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    pub ranges: Vec<IdRange>,
}

impl IdMap {
    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The id shown for an id on disk; `None` when unmapped.
    pub fn to_shown(&self, disk: u32) -> Option<u32> {
        if self.ranges.is_empty() {
            return Some(disk);
        }
        self.ranges.iter().find_map(|r| {
            let off = disk.checked_sub(r.disk)?;
            (off < r.len).then(|| r.shown + off)
        })
    }

    /// The id stored on disk for an id shown; `None` when unmapped.
    pub fn to_disk(&self, shown: u32) -> Option<u32> {
        if self.ranges.is_empty() {
            return Some(shown);
        }
        self.ranges.iter().find_map(|r| {
            let off = shown.checked_sub(r.shown)?;
            (off < r.len).then(|| r.disk + off)
        })
    }
}

/// Which xattr keeps the owner and mode a rootless mount could not set for real.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XattrPermissions {
    /// Owner and mode are set on the files themselves.
    #[default]
    Off,
    /// `security.fuseoverlayfs.override_stat`.
    Security,
    /// `user.containers.override_stat` (or `user.fuseoverlayfs.override_stat` where the upper
    /// root already carries that one); `security.*` xattrs are stored under
    /// `user.containers.override_security.*`.
    User,
}

/// `redirect_dir=`: whether a rename of a directory with lower-layer content writes a
/// redirect (kernel overlayfs's `trusted.overlay.redirect`, the directory's old path) and
/// whether lookups follow the redirects they find.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedirectDir {
    /// Not written (such a rename answers EXDEV, as with fuse-overlayfs), but followed, as
    /// kernel overlayfs does with `off` and its default `redirect_always_follow`. The
    /// default.
    #[default]
    Off,
    /// Not written, and refused: a lookup that would follow one fails with EPERM.
    NoFollow,
    /// Followed, not written.
    Follow,
    /// Written and followed.
    On,
}

impl RedirectDir {
    /// The option's value, as written on a command line.
    pub fn as_str(self) -> &'static str {
        match self {
            RedirectDir::Off => "off",
            RedirectDir::NoFollow => "nofollow",
            RedirectDir::Follow => "follow",
            RedirectDir::On => "on",
        }
    }

    /// Lookups follow the redirects of directories (all but `nofollow`).
    pub fn follows(self) -> bool {
        self != RedirectDir::NoFollow
    }

    /// A rename of a directory with lower content writes a redirect (else EXDEV).
    pub fn writes(self) -> bool {
        self == RedirectDir::On
    }
}

/// Everything fuse-overlayfs's `-o` options say, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct OverlayOptions {
    /// Lower layers, topmost first.
    pub lowerdirs: Vec<PathBuf>,
    pub upperdir: Option<PathBuf>,
    pub workdir: Option<PathBuf>,
    pub uid_map: IdMap,
    pub gid_map: IdMap,
    pub squash_to_root: bool,
    pub squash_to_uid: Option<u32>,
    pub squash_to_gid: Option<u32>,
    pub static_nlink: bool,
    pub noacl: bool,
    /// `fsync=0` or `volatile`: fsync answers ENOSYS and nothing is synced.
    pub fsync: bool,
    /// `background_sync=0|1`: copy-ups synced after they are answered, by a background
    /// thread (`1`), or before, on the request path as kernel overlayfs does (`0`). Unset:
    /// in the background where the upper layer's filesystem writes its metadata back in
    /// order (a journal, copy-on-write; see `sys::metadata_order`), which the crash recovery
    /// needs, else on the request path.
    pub background_sync: Option<bool>,
    pub threaded: Option<bool>,
    pub writeback: Option<bool>,
    /// `passthrough=0|1`: FUSE passthrough of upper files' reads and writes (on by default
    /// where the kernel offers it and the daemon may use it; `0` keeps all I/O in the daemon).
    pub passthrough: Option<bool>,
    /// `metacopy=on|off` (as kernel overlayfs; off by default): a change of mode, owner,
    /// times or xattrs, or a rename, of a lower file copies up its metadata only (a rename
    /// records where the data is, kernel overlayfs's redirect), and the data follows at
    /// the first write. Off by default because such an upper file reads as zeros through
    /// fuse-overlayfs and through tools that read an upper layer directly.
    pub metacopy: bool,
    /// `redirect_dir=on|follow|nofollow|off` (see [`RedirectDir`]).
    pub redirect_dir: RedirectDir,
    /// Cache timeout in seconds; `None` means effectively infinite.
    pub timeout: Option<f64>,
    pub noxattrs: bool,
    pub xattr_permissions: XattrPermissions,
    pub context: Option<String>,
    pub read_only: bool,
    /// Generic FUSE/mount options, passed on to the kernel mount (`allow_other`, `nosuid`, ...).
    pub mount_flags: Vec<String>,
    /// Options nobody here knows: warned about, never fatal.
    pub unknown: Vec<String>,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        OverlayOptions {
            lowerdirs: Vec::new(),
            upperdir: None,
            workdir: None,
            uid_map: IdMap::default(),
            gid_map: IdMap::default(),
            squash_to_root: false,
            squash_to_uid: None,
            squash_to_gid: None,
            static_nlink: false,
            noacl: false,
            fsync: true,
            background_sync: None,
            threaded: None,
            writeback: None,
            passthrough: None,
            metacopy: false,
            redirect_dir: RedirectDir::Off,
            timeout: None,
            noxattrs: false,
            xattr_permissions: XattrPermissions::Off,
            context: None,
            read_only: false,
            mount_flags: Vec::new(),
            unknown: Vec::new(),
        }
    }
}

/// A bad option: names the option and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("option {option}: {reason}")]
    Invalid { option: String, reason: String },
    #[error("option lowerdir: missing (at least one lower directory is required)")]
    MissingLowerdir,
    #[error("option workdir: missing (upperdir={0} needs a workdir)")]
    MissingWorkdir(String),
    #[error("option upperdir: missing (workdir={0} given without an upperdir)")]
    MissingUpperdir(String),
    #[error("options {0}: conflicting squash options")]
    ConflictingSquash(String),
}

fn invalid(option: &str, reason: impl Into<String>) -> OptionError {
    OptionError::Invalid {
        option: option.to_string(),
        reason: reason.into(),
    }
}

/// Generic FUSE and mount options accepted and handed to the mount.
const MOUNT_FLAGS: &[&str] = &[
    "rw",
    "allow_root",
    "allow_other",
    "default_permissions",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "diratime",
    "nodiratime",
    "relatime",
    "norelatime",
    "strictatime",
    "kernel_cache",
    "auto_unmount",
    "sync",
    "async",
    "dirsync",
    "lazytime",
    "nolazytime",
];

/// Options that mount helpers add and a mount program ignores.
const IGNORED: &[&str] = &[
    "user", "nouser", "users", "auto", "noauto", "nofail", "_netdev", "defaults", "owner",
];

/// Split a `lowerdir=` value on `:`, honouring `\:` (and `\\`) escapes.
pub fn split_lowerdirs(value: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => cur.push(n),
                None => cur.push('\\'),
            },
            ':' => out.push(PathBuf::from(std::mem::take(&mut cur))),
            c => cur.push(c),
        }
    }
    out.push(PathBuf::from(cur));
    out.retain(|p| !p.as_os_str().is_empty());
    out
}

/// Escape one directory for a `lowerdir=` value (`:` and `\` get a backslash).
pub fn escape_lowerdir(dir: &std::path::Path) -> String {
    let s = dir.to_string_lossy();
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == ':' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Write a `lowerdir=` value (without the `lowerdir=` prefix), topmost first.
pub fn join_lowerdirs<P: AsRef<std::path::Path>>(dirs: &[P]) -> String {
    dirs.iter()
        .map(|d| escape_lowerdir(d.as_ref()))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_idmap(option: &str, value: &str) -> Result<IdMap, OptionError> {
    let nums: Result<Vec<u32>, _> = value
        .split(':')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().parse::<u32>())
        .collect();
    let nums = nums.map_err(|_| invalid(option, format!("{value:?} is not FROM:TO:LEN[:...]")))?;
    if nums.is_empty() || nums.len() % 3 != 0 {
        return Err(invalid(
            option,
            format!("{value:?} is not FROM:TO:LEN[:FROM:TO:LEN...]"),
        ));
    }
    let ranges = nums
        .chunks(3)
        .map(|c| IdRange {
            disk: c[0],
            shown: c[1],
            len: c[2],
        })
        .collect();
    Ok(IdMap { ranges })
}

fn parse_bool(option: &str, value: Option<&str>) -> Result<bool, OptionError> {
    match value {
        None | Some("1") | Some("true") | Some("yes") | Some("on") => Ok(true),
        Some("0") | Some("false") | Some("no") | Some("off") => Ok(false),
        Some(v) => Err(invalid(option, format!("{v:?} is not 0 or 1"))),
    }
}

fn parse_u32(option: &str, value: Option<&str>) -> Result<u32, OptionError> {
    value
        .ok_or_else(|| invalid(option, "needs a value"))?
        .parse()
        .map_err(|_| invalid(option, format!("{:?} is not a number", value.unwrap_or(""))))
}

/// Parse the `-o` strings of one command line, in order. Later options win.
///
/// Checks what can be checked without touching the disk: a lowerdir present, upperdir and
/// workdir together, squash options consistent. Paths are checked by the mount itself.
pub fn parse<S: AsRef<str>>(option_strings: &[S]) -> Result<OverlayOptions, OptionError> {
    let mut o = OverlayOptions::default();
    // `context="a:b:c1,c2"` arrives split on the comma; glue the pieces back together.
    let mut tokens: Vec<String> = Vec::new();
    for s in option_strings {
        for tok in s.as_ref().split(',') {
            if let Some(last) = tokens.last_mut() {
                if last.starts_with("context=\"") && last.matches('"').count() == 1 {
                    last.push(',');
                    last.push_str(tok);
                    continue;
                }
            }
            tokens.push(tok.to_string());
        }
    }
    for tok in tokens {
        let tok = tok.trim();
        if tok.is_empty() {
            continue;
        }
        let (key, value) = match tok.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (tok, None),
        };
        match key {
            "lowerdir" => {
                let v = value.unwrap_or("");
                o.lowerdirs = split_lowerdirs(v);
                if o.lowerdirs.is_empty() {
                    return Err(invalid("lowerdir", "empty"));
                }
            }
            "upperdir" => {
                let v = value.filter(|v| !v.is_empty());
                o.upperdir = Some(PathBuf::from(
                    v.ok_or_else(|| invalid("upperdir", "empty"))?,
                ));
            }
            "workdir" => {
                let v = value.filter(|v| !v.is_empty());
                o.workdir = Some(PathBuf::from(v.ok_or_else(|| invalid("workdir", "empty"))?));
            }
            "uidmapping" => o.uid_map = parse_idmap("uidmapping", value.unwrap_or(""))?,
            "gidmapping" => o.gid_map = parse_idmap("gidmapping", value.unwrap_or(""))?,
            "squash_to_root" => o.squash_to_root = parse_bool(key, value)?,
            "squash_to_uid" => o.squash_to_uid = Some(parse_u32(key, value)?),
            "squash_to_gid" => o.squash_to_gid = Some(parse_u32(key, value)?),
            "static_nlink" => o.static_nlink = parse_bool(key, value)?,
            "noacl" => o.noacl = parse_bool(key, value)?,
            "fsync" => o.fsync = parse_bool(key, value)?,
            "volatile" => o.fsync = false,
            "background_sync" => o.background_sync = Some(parse_bool(key, value)?),
            "threaded" => o.threaded = Some(parse_bool(key, value)?),
            "writeback" => o.writeback = Some(parse_bool(key, value)?),
            "passthrough" => o.passthrough = Some(parse_bool(key, value)?),
            "metacopy" => o.metacopy = parse_bool(key, value)?,
            "timeout" => {
                let v = value.ok_or_else(|| invalid("timeout", "needs a value"))?;
                let t: f64 = v
                    .parse()
                    .map_err(|_| invalid("timeout", format!("{v:?} is not a number")))?;
                if !t.is_finite() || t < 0.0 {
                    return Err(invalid(
                        "timeout",
                        format!("{v:?} is not a non-negative number"),
                    ));
                }
                o.timeout = Some(t);
            }
            "noxattrs" => o.noxattrs = parse_bool(key, value)?,
            "xattr_permissions" => {
                o.xattr_permissions = match value {
                    Some("0") => XattrPermissions::Off,
                    Some("1") => XattrPermissions::Security,
                    Some("2") => XattrPermissions::User,
                    v => {
                        return Err(invalid(
                            "xattr_permissions",
                            format!("{:?} is not 0, 1 or 2", v.unwrap_or("")),
                        ));
                    }
                }
            }
            "redirect_dir" => {
                o.redirect_dir = match value {
                    Some("on") => RedirectDir::On,
                    Some("follow") => RedirectDir::Follow,
                    Some("nofollow") => RedirectDir::NoFollow,
                    Some("off") => RedirectDir::Off,
                    v => {
                        return Err(invalid(
                            "redirect_dir",
                            format!("{:?} is not on, follow, nofollow or off", v.unwrap_or("")),
                        ));
                    }
                }
            }
            "context" | "fscontext" | "defcontext" | "rootcontext" => {
                o.context = value.map(|v| v.trim_matches('"').to_string());
            }
            // The last of `ro` and `rw` wins, as with mount(8).
            "ro" => o.read_only = true,
            "rw" => o.read_only = false,
            "max_write" | "max_read" | "fsname" | "subtype" | "blksize" => {}
            k if MOUNT_FLAGS.contains(&k) => {
                if !o.mount_flags.iter().any(|f| f == tok) {
                    o.mount_flags.push(tok.to_string());
                }
            }
            k if IGNORED.contains(&k) => {}
            _ => o.unknown.push(tok.to_string()),
        }
    }
    if o.lowerdirs.is_empty() {
        return Err(OptionError::MissingLowerdir);
    }
    match (&o.upperdir, &o.workdir) {
        (Some(u), None) => return Err(OptionError::MissingWorkdir(u.display().to_string())),
        (None, Some(w)) => return Err(OptionError::MissingUpperdir(w.display().to_string())),
        _ => {}
    }
    if o.squash_to_root && (o.squash_to_uid.is_some() || o.squash_to_gid.is_some()) {
        return Err(OptionError::ConflictingSquash(
            "squash_to_root and squash_to_uid/squash_to_gid".into(),
        ));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowerdir_escapes_round_trip() {
        let dirs = vec![
            PathBuf::from("/a:b"),
            PathBuf::from("/c\\d"),
            PathBuf::from("/e"),
        ];
        let joined = join_lowerdirs(&dirs);
        assert_eq!(joined, "/a\\:b:/c\\\\d:/e");
        assert_eq!(split_lowerdirs(&joined), dirs);
    }

    #[test]
    fn parses_podman_style_with_empty_option() {
        let o = parse(&["lowerdir=/l1:/l2,upperdir=/u,workdir=/w,,volatile"]).unwrap();
        assert_eq!(
            o.lowerdirs,
            vec![PathBuf::from("/l1"), PathBuf::from("/l2")]
        );
        assert_eq!(o.upperdir, Some(PathBuf::from("/u")));
        assert!(!o.fsync);
    }

    #[test]
    fn background_sync_is_unset_on_or_off() {
        let base = "lowerdir=/l,upperdir=/u,workdir=/w";
        assert_eq!(parse(&[base]).unwrap().background_sync, None);
        let on = format!("{base},background_sync=1");
        assert_eq!(parse(&[on.as_str()]).unwrap().background_sync, Some(true));
        let off = format!("{base},background_sync=0");
        assert_eq!(parse(&[off.as_str()]).unwrap().background_sync, Some(false));
        let bad = format!("{base},background_sync=later");
        let e = parse(&[bad.as_str()]).unwrap_err().to_string();
        assert!(e.contains("background_sync"), "{e}");
    }

    #[test]
    fn context_with_comma_is_glued() {
        let o = parse(&["lowerdir=/l,context=\"system_u:object_r:c:s0:c1,c2\",noatime"]).unwrap();
        assert_eq!(o.context.as_deref(), Some("system_u:object_r:c:s0:c1,c2"));
        assert!(o.unknown.is_empty());
        assert_eq!(o.mount_flags, vec!["noatime".to_string()]);
    }

    #[test]
    fn last_of_ro_and_rw_wins() {
        let ro = parse(&["lowerdir=/l,upperdir=/u,workdir=/w,rw,ro"]).unwrap();
        assert!(ro.read_only);
        assert_eq!(ro.upperdir, Some(PathBuf::from("/u")));
        let rw = parse(&["lowerdir=/l,upperdir=/u,workdir=/w", "ro", "rw"]).unwrap();
        assert!(!rw.read_only);
    }

    #[test]
    fn unknown_is_kept_not_fatal() {
        let o = parse(&["lowerdir=/l", "frobnicate=3"]).unwrap();
        assert_eq!(o.unknown, vec!["frobnicate=3".to_string()]);
    }

    #[test]
    fn errors_name_the_option() {
        assert_eq!(
            parse::<&str>(&[]).unwrap_err(),
            OptionError::MissingLowerdir
        );
        let e = parse(&["lowerdir=/l,upperdir=/u"]).unwrap_err().to_string();
        assert!(e.contains("workdir"), "{e}");
        let e = parse(&["lowerdir=/l,redirect_dir=yes"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("redirect_dir") && e.contains("yes"), "{e}");
        let e = parse(&["lowerdir=/l,squash_to_root,squash_to_uid=3"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("squash"), "{e}");
        let e = parse(&["lowerdir=/l,uidmapping=0:1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("uidmapping"), "{e}");
    }

    #[test]
    fn redirect_dir_values() {
        for (v, want) in [
            ("on", RedirectDir::On),
            ("follow", RedirectDir::Follow),
            ("nofollow", RedirectDir::NoFollow),
            ("off", RedirectDir::Off),
        ] {
            let o = parse(&[format!("lowerdir=/l,redirect_dir={v}")]).unwrap();
            assert_eq!(o.redirect_dir, want);
            assert_eq!(want.as_str(), v);
        }
        assert_eq!(
            parse(&["lowerdir=/l"]).unwrap().redirect_dir,
            RedirectDir::Off
        );
    }

    #[test]
    fn idmap_both_ways() {
        let o = parse(&["lowerdir=/l,uidmapping=0:1000:1:1:100000:65536"]).unwrap();
        assert_eq!(o.uid_map.to_shown(0), Some(1000));
        assert_eq!(o.uid_map.to_shown(5), Some(100004));
        assert_eq!(o.uid_map.to_disk(100004), Some(5));
        assert_eq!(o.uid_map.to_shown(70000), None);
    }
}
