//! Directory redirects (kernel overlayfs's `redirect_dir`): what a redirect value means, and
//! how it changes the place a lookup asks the lower layers for. A leaf: values and paths
//! only, no kernel calls.
//!
//! A directory renamed while it has lower-layer content keeps that content through a mark
//! on its upper directory, `trusted.overlay.redirect` (`user.overlay.redirect` where
//! `trusted.` cannot be written): a name (the directory it was, in the same parent) or a path
//! from the layer root starting with `/`. The lookup of the directory then asks the layers
//! below for that name or path instead of its own name.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// The longest redirect value followed (the kernel's `PATH_MAX`, less the NUL).
pub(crate) const REDIRECT_MAX: usize = 4095;
/// The longest absolute redirect written (kernel overlayfs's default `redirect_max`): a
/// move that would need a longer one answers EXDEV, and `mv` copies.
pub(crate) const REDIRECT_WRITE_MAX: usize = 256;

/// Where the lower layers are asked for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// This name, in the parent directory's part in each layer.
    Name(OsString),
    /// This path from each layer's root (after an absolute redirect).
    Path(Vec<OsString>),
}

/// One part of a path: never empty, `.`, `..`, longer than a name may be, or holding `/`.
fn part_ok(p: &[u8]) -> bool {
    !p.is_empty() && p != b"." && p != b".." && p.len() <= 255 && !p.contains(&0)
}

/// What redirect value `v` says, or none when it is not one a lookup may follow (empty, a
/// relative value with `/` in it, an absolute path with an empty, `.` or `..` part, or
/// longer than [`REDIRECT_MAX`]): such a value is refused, never followed.
pub(crate) fn parse(v: &[u8]) -> Option<Target> {
    if v.len() > REDIRECT_MAX {
        return None;
    }
    match v.strip_prefix(b"/") {
        Some(rest) => {
            let parts: Vec<&[u8]> = rest.split(|b| *b == b'/').collect();
            parts.iter().all(|p| part_ok(p)).then(|| {
                Target::Path(
                    parts
                        .into_iter()
                        .map(|p| OsString::from_vec(p.to_vec()))
                        .collect(),
                )
            })
        }
        None => {
            (part_ok(v) && !v.contains(&b'/')).then(|| Target::Name(OsString::from_vec(v.to_vec())))
        }
    }
}

/// The target for the layers below one that showed redirect `r` on a directory met while
/// walking `current`, with `post` parts of `current` still to walk after it: a name
/// replaces that directory's part, a path replaces everything up to it.
pub(crate) fn redirected(current: &Target, post: usize, r: Target) -> Target {
    match (current, r) {
        (Target::Name(_), r) => r,
        (Target::Path(parts), r) => {
            let rest = &parts[parts.len() - post..];
            let mut out = match r {
                Target::Name(n) => {
                    let keep = parts.len() - post - 1;
                    let mut v = parts[..keep].to_vec();
                    v.push(n);
                    v
                }
                Target::Path(p) => p,
            };
            out.extend_from_slice(rest);
            Target::Path(out)
        }
    }
}

/// The absolute redirect value of a directory's old place, from the parts on its way up
/// (itself first): each one its name or its own redirect, the walk having stopped at the
/// first absolute one. `None` when the value would be longer than
/// [`REDIRECT_WRITE_MAX`].
pub(crate) fn absolute(up: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    for p in up.iter().rev() {
        if !p.starts_with(b"/") {
            v.push(b'/');
        }
        v.extend_from_slice(p);
    }
    (v.len() <= REDIRECT_WRITE_MAX).then_some(v)
}

/// The value of a name, for messages.
pub(crate) fn show(v: &[u8]) -> String {
    OsStr::from_bytes(v).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &[&str]) -> Target {
        Target::Path(p.iter().map(OsString::from).collect())
    }

    #[test]
    fn values() {
        assert_eq!(parse(b"a"), Some(Target::Name("a".into())));
        assert_eq!(parse(b"/a/b"), Some(path(&["a", "b"])));
        for bad in [
            &b""[..],
            b"/",
            b"a/b",
            b"..",
            b".",
            b"/a//b",
            b"/a/../b",
            b"/../../etc",
            b"/a/",
            b"a\0b",
        ] {
            assert_eq!(parse(bad), None, "{:?}", show(bad));
        }
        let long = [b"/".as_slice(), &[b'x'; 200]].concat().repeat(21);
        assert!(long.len() > REDIRECT_MAX);
        assert_eq!(parse(&long), None);
        assert_eq!(parse(&[b'n'; 256]), None);
    }

    #[test]
    fn rewrites() {
        let cur = path(&["a", "b", "c"]);
        // A redirect on `b` (one part left after it).
        assert_eq!(
            redirected(&cur, 1, Target::Name("x".into())),
            path(&["a", "x", "c"])
        );
        assert_eq!(
            redirected(&cur, 1, path(&["p", "q"])),
            path(&["p", "q", "c"])
        );
        // On the last part.
        assert_eq!(
            redirected(&cur, 0, Target::Name("z".into())),
            path(&["a", "b", "z"])
        );
        assert_eq!(
            redirected(&Target::Name("n".into()), 0, path(&["m"])),
            path(&["m"])
        );
    }

    #[test]
    fn absolute_values() {
        assert_eq!(
            absolute(&[b"d".to_vec(), b"p".to_vec()]),
            Some(b"/p/d".to_vec())
        );
        assert_eq!(
            absolute(&[b"d".to_vec(), b"/x/y".to_vec()]),
            Some(b"/x/y/d".to_vec())
        );
        assert_eq!(absolute(&[vec![b'a'; 255]]).map(|v| v.len()), Some(256));
        assert_eq!(absolute(&[vec![b'a'; 128], vec![b'b'; 127]]), None);
    }
}
