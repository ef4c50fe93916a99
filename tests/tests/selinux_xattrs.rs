//! `security.*` xattrs and SELinux mount options, as a container build sees them:
//!
//! - `security.*` xattrs of lower files and directories (a file capability, the way `setcap`
//!   writes it, any other `security.X` the kernel takes, and `security.selinux` where SELinux
//!   is off) read the same through the mount, survive copy-up byte for byte, stay after a
//!   remount, and a write drops `security.capability` as it does on kernel overlayfs (checked
//!   against kernel overlayfs on the same layers, operation by operation);
//! - `xattr_permissions=2`: `security.*` set through the mount is stored in the upper layer as
//!   `user.containers.override_security.*` (never as a real `security.*`), read and listed back
//!   as `security.*`, removed as such; a lower layer's override xattrs show as `security.*` and
//!   copy up;
//! - `user.containers.override_stat` as containers/storage reads it (`uid:gid:mode[:type]`,
//!   decimal ids, octal mode of at most 0o7777, type matching the entry), for files, directories,
//!   setuid bits and values containers/storage itself wrote; symlinks, pipes and devices, which
//!   cannot carry `user.*` xattrs, are owned for real;
//! - `context="..."` (as containers/storage passes it): with SELinux off the kernel refuses the
//!   option for FUSE, so it is not passed, and the mount works; with SELinux on it must show in
//!   /proc/self/mountinfo.
//!
//! Needs root and /dev/fuse (the xattrs are set as root on the lower layers, as an image
//! extracted by root has them).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustfuse_tests::env::{Scratch, bin_under_test, require_bin_under_test, scratch};
use rustfuse_tests::layers::{Layer, Materialized, Tree};
use rustfuse_tests::mount::{Mount, mount_at, timed};

/// `setcap cap_net_raw+ep`: VFS_CAP_REVISION_2, effective flag, permitted CAP_NET_RAW (bit 13).
const CAP_NET_RAW_EP: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];
const LABEL: &str = "system_u:object_r:container_file_t:s0:c1,c2";
const OVERRIDE_SECURITY: &str = "user.containers.override_security.";
const OVERRIDE_STAT: &str = "user.containers.override_stat";

fn selinux_enabled() -> bool {
    Path::new("/sys/fs/selinux/enforce").exists()
}

/// `lgetxattr`, with a deadline (the path may be on the mount).
fn getx(p: &Path, name: &str) -> Result<Vec<u8>, rustix::io::Errno> {
    let (p, name) = (p.to_path_buf(), name.to_string());
    timed(&format!("lgetxattr {} {name}", p.display()), move || {
        let mut buf = vec![0u8; 65536];
        rustix::fs::lgetxattr(&p, name.as_str(), &mut buf[..]).map(|n| buf[..n].to_vec())
    })
}

fn setx(p: &Path, name: &str, value: &[u8]) -> Result<(), rustix::io::Errno> {
    let (p, name, value) = (p.to_path_buf(), name.to_string(), value.to_vec());
    timed(&format!("lsetxattr {} {name}", p.display()), move || {
        rustix::fs::lsetxattr(&p, name.as_str(), &value, rustix::fs::XattrFlags::empty())
    })
}

/// Every xattr name of `p` with its value (or the errno getxattr gave), with a deadline.
fn xattrs(p: &Path) -> BTreeMap<String, Result<Vec<u8>, String>> {
    let p2 = p.to_path_buf();
    let names = timed(&format!("llistxattr {}", p.display()), move || {
        let mut buf = vec![0u8; 65536];
        rustix::fs::llistxattr(&p2, &mut buf[..]).map(|n| buf[..n].to_vec())
    })
    .unwrap_or_else(|e| panic!("llistxattr {}: {e}", p.display()));
    names
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| {
            let n = String::from_utf8_lossy(n).into_owned();
            let v = getx(p, &n).map_err(|e| e.to_string());
            (n, v)
        })
        .collect()
}

/// The `security.*` part of [`xattrs`].
fn security(p: &Path) -> BTreeMap<String, Result<Vec<u8>, String>> {
    let mut m = xattrs(p);
    m.retain(|k, _| k.starts_with("security."));
    m
}

/// A materialized tree in its own scratch directory.
fn tree_in(name: &str, tree: &Tree) -> (Scratch, Materialized) {
    let s = scratch(name);
    let mut m = tree.materialize(s.path()).expect("materialize");
    m.mnt = m.mnt.canonicalize().unwrap();
    (s, m)
}

fn mount(m: &Materialized, opts: &[&str]) -> Mount {
    Mount::fuse(&bin_under_test(), &m.stack, opts, &m.mnt)
        .unwrap_or_else(|e| panic!("mount -o {opts:?}: {e}"))
}

fn upper(m: &Materialized, rel: &str) -> PathBuf {
    m.stack.upper.as_ref().unwrap().join(rel)
}

/// Lower layer with `security.*` xattrs on files and a directory.
fn security_tree() -> Tree {
    let mut l = Layer::new()
        .file("cap", "#!/bin/sh\n")
        .mode(0o755)
        .xattr("security.capability", CAP_NET_RAW_EP)
        .xattr("security.rustfuse-test", "file")
        .file("cap_written", "x")
        .mode(0o755)
        .xattr("security.capability", CAP_NET_RAW_EP)
        .file("label", "l")
        .xattr("security.rustfuse-test", "label");
    if !selinux_enabled() {
        // Without SELinux any value is stored as is; with it, the policy decides.
        l = l.xattr("security.selinux", LABEL);
    }
    l = l
        .dir("d")
        .xattr("security.rustfuse-test", "dir")
        .file("d/inner", "i");
    Tree::new().lower(l)
}

const SECURITY_PATHS: [&str; 5] = ["cap", "cap_written", "label", "d", "d/inner"];

/// The copy-up triggers of [`security_xattrs_survive_copy_up`]; each leaves the `security.*`
/// xattrs alone except the write, which drops a file capability on any Linux filesystem.
fn copy_up_all(root: &Path) {
    setx(&root.join("cap"), "user.trigger", b"1").expect("setxattr user.trigger on cap");
    let p = root.join("label");
    timed("chmod label", move || {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
    })
    .expect("chmod label");
    let p = root.join("d/new");
    timed("create d/new", move || std::fs::write(&p, "n")).expect("create d/new");
    let p = root.join("cap_written");
    timed("append to cap_written", move || {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)?
            .write_all(b"y")
    })
    .expect("append to cap_written");
}

/// Every `security.*` xattr through the mount, per path.
fn seen(root: &Path) -> BTreeMap<&'static str, BTreeMap<String, Result<Vec<u8>, String>>> {
    SECURITY_PATHS
        .iter()
        .map(|p| (*p, security(&root.join(p))))
        .collect()
}

#[test]
fn security_xattrs_survive_copy_up() {
    if !require_bin_under_test() {
        return;
    }
    let tree = security_tree();
    let (_s, m) = tree_in("sec-copyup", &tree);
    let lower = &m.stack.lowers[0];
    let on_lower = seen(lower);
    assert_eq!(
        on_lower["cap"].get("security.capability"),
        Some(&Ok(CAP_NET_RAW_EP.to_vec())),
        "the kernel keeps a v2 file capability as written: {on_lower:?}"
    );

    // The same layers under kernel overlayfs: what a user must see.
    let (_sk, mk) = tree_in("sec-copyup-kernel", &tree);
    let k = Mount::kernel(&mk.stack, &mk.mnt).expect("kernel overlayfs");
    let k_before = seen(k.root());
    copy_up_all(k.root());
    let k_after = seen(k.root());
    k.unmount().unwrap();

    let g = mount(&m, &[]);
    let before = seen(g.root());
    assert_eq!(
        before, on_lower,
        "security.* xattrs through rustfuse before copy-up"
    );
    assert_eq!(
        before, k_before,
        "rustfuse and kernel overlayfs before copy-up"
    );
    copy_up_all(g.root());
    let after = seen(g.root());
    assert_eq!(
        after, k_after,
        "rustfuse and kernel overlayfs after the copy-ups"
    );
    // Spelled out: the copy-ups kept every security.* xattr, the write dropped the capability.
    let mut want = on_lower.clone();
    want.get_mut("cap_written")
        .unwrap()
        .remove("security.capability");
    assert_eq!(after, want, "security.* xattrs after copy-up");
    g.unmount().unwrap();

    // In the upper layer, byte for byte; the lower layer untouched.
    for p in ["cap", "cap_written", "label", "d"] {
        let u = upper(&m, p);
        assert!(
            std::fs::symlink_metadata(&u).is_ok(),
            "{p} was not copied up"
        );
        assert_eq!(security(&u), want[p], "security.* xattrs of upper {p}");
    }
    assert_eq!(seen(lower), on_lower, "lower layer changed");
    let g = mount(&m, &[]);
    assert_eq!(seen(g.root()), want, "after a remount");
    eprintln!(
        "security.* through rustfuse after copy-up (same as kernel overlayfs): {:?}",
        want.iter()
            .map(|(p, x)| (p, x.keys().collect::<Vec<_>>()))
            .collect::<Vec<_>>()
    );
}

#[test]
fn xattr_permissions_2_stores_security_as_override() {
    if !require_bin_under_test() {
        return;
    }
    // A layer extracted rootless carries override xattrs; `real` also has an on-disk
    // security.* xattr (extracted as root).
    let cap_name = format!("{OVERRIDE_SECURITY}capability");
    let tree = Tree::new().lower(
        Layer::new()
            .file("ov", "o")
            .xattr(&format!("{OVERRIDE_SECURITY}rustfuse-test"), "from-layer")
            .xattr(&cap_name, CAP_NET_RAW_EP)
            .file("real", "r")
            .xattr("security.rustfuse-test", "on-disk")
            .file("plain", "p")
            .dir("d"),
    );
    let (_s, m) = tree_in("sec-perm2", &tree);
    let g = mount(&m, &["xattr_permissions=2"]);
    let r = g.root();
    let ok = |v: &[u8]| Ok(v.to_vec());
    assert_eq!(
        xattrs(&r.join("ov")),
        BTreeMap::from([
            ("security.capability".to_string(), ok(&CAP_NET_RAW_EP)),
            ("security.rustfuse-test".to_string(), ok(b"from-layer")),
        ]),
        "a lower file's override xattrs read as security.*, the override names hidden"
    );
    // An on-disk security.* is neither readable nor listed: the security namespace of the
    // mount is the override one.
    assert_eq!(
        getx(&r.join("real"), "security.rustfuse-test"),
        Err(rustix::io::Errno::NODATA)
    );
    assert_eq!(
        xattrs(&r.join("real")),
        BTreeMap::new(),
        "listxattr of real"
    );

    // Set, read back, list, replace, remove, through the mount.
    for p in ["plain", "d"] {
        setx(&r.join(p), "security.rustfuse-test", b"v1").expect("set security.*");
        setx(&r.join(p), "security.rustfuse-test", b"v2").expect("replace security.*");
        setx(&r.join(p), "security.gone", b"x").expect("set security.gone");
        setx(&r.join(p), "user.plain", b"u").expect("set user.*");
    }
    let p2 = r.join("plain");
    timed("removexattr security.gone", move || {
        rustix::fs::lremovexattr(&p2, "security.gone")
    })
    .expect("removexattr security.gone");
    assert_eq!(
        getx(&r.join("plain"), "security.gone"),
        Err(rustix::io::Errno::NODATA)
    );
    assert_eq!(
        xattrs(&r.join("plain")),
        BTreeMap::from([
            ("security.rustfuse-test".to_string(), ok(b"v2")),
            ("user.plain".to_string(), ok(b"u")),
        ]),
        "plain through the mount"
    );
    // Copy-up of `ov` keeps its override xattrs.
    setx(&r.join("ov"), "user.trigger", b"1").expect("copy up ov");
    g.unmount().unwrap();

    let stored = |p: &str| {
        let mut x = xattrs(&upper(&m, p));
        x.retain(|k, _| k.starts_with("security.") || k.starts_with(OVERRIDE_SECURITY));
        x
    };
    let key = |s: &str| format!("{OVERRIDE_SECURITY}{s}");
    assert_eq!(
        stored("plain"),
        BTreeMap::from([(key("rustfuse-test"), ok(b"v2"))]),
        "upper plain: stored as override, no real security.* (and security.gone removed)"
    );
    assert_eq!(
        stored("d"),
        BTreeMap::from([(key("gone"), ok(b"x")), (key("rustfuse-test"), ok(b"v2"))]),
        "upper d"
    );
    assert_eq!(
        stored("ov"),
        BTreeMap::from([
            (key("capability"), ok(&CAP_NET_RAW_EP)),
            (key("rustfuse-test"), ok(b"from-layer")),
        ]),
        "upper ov after copy-up"
    );
    let g = mount(&m, &["xattr_permissions=2"]);
    assert_eq!(
        getx(&g.root().join("d"), "security.rustfuse-test"),
        Ok(b"v2".to_vec()),
        "after a remount"
    );
}

/// containers/storage's reading of `user.containers.override_stat`: at least three
/// `:`-separated parts, decimal uid and gid, an octal mode of permission and setuid/setgid/
/// sticky bits only, and an optional type. Returns (uid, gid, mode, type).
fn containers_storage_parse(v: &[u8]) -> Result<(u32, u32, u32, Option<String>), String> {
    let s = std::str::from_utf8(v).map_err(|e| e.to_string())?;
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() < 3 {
        return Err(format!("{s:?}: fewer than 3 parts"));
    }
    let uid = parts[0].parse().map_err(|e| format!("{s:?}: uid: {e}"))?;
    let gid = parts[1].parse().map_err(|e| format!("{s:?}: gid: {e}"))?;
    let mode = u32::from_str_radix(parts[2], 8).map_err(|e| format!("{s:?}: mode: {e}"))?;
    if mode & !0o7777 != 0 {
        return Err(format!("{s:?}: mode has file type bits"));
    }
    let ty = parts.get(3).map(|t| t.to_string());
    if let Some(t) = &ty {
        let known = ["file", "dir", "symlink", "pipe", "socket"].contains(&t.as_str())
            || t.strip_prefix("block-")
                .or_else(|| t.strip_prefix("char-"))
                .and_then(|r| r.split_once('-'))
                .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok());
        if !known {
            return Err(format!("{s:?}: unknown type {t:?}"));
        }
    }
    Ok((uid, gid, mode, ty))
}

#[test]
fn override_stat_as_containers_storage_reads_it() {
    if !require_bin_under_test() {
        return;
    }
    // Values as containers/storage writes them when it extracts a layer rootless.
    let tree = Tree::new().lower(
        Layer::new()
            .file("from_storage", "s")
            .xattr(OVERRIDE_STAT, "1000:1001:0644:file")
            .file("suid", "s")
            .mode(0o755)
            .xattr(OVERRIDE_STAT, "0:0:4755:file")
            .dir("dir_storage")
            .xattr(OVERRIDE_STAT, "1000:1001:0750:dir"),
    );
    let (_s, m) = tree_in("sec-override", &tree);
    let g = mount(&m, &["xattr_permissions=2"]);
    let r = g.root().to_path_buf();
    let stat = |p: &str| {
        let p = r.join(p);
        let md = timed(&format!("lstat {}", p.display()), move || {
            std::fs::symlink_metadata(&p)
        })
        .unwrap_or_else(|e| panic!("lstat: {e}"));
        (md.uid(), md.gid(), md.mode())
    };
    assert_eq!(stat("from_storage"), (1000, 1001, libc_mode(b'f', 0o644)));
    assert_eq!(stat("suid"), (0, 0, libc_mode(b'f', 0o4755)));
    assert_eq!(stat("dir_storage"), (1000, 1001, libc_mode(b'd', 0o750)));

    // Written through the mount.
    let rr = r.clone();
    timed(
        "create, mkdir, mkfifo, mknod, symlink, chmod, chown",
        move || {
            use std::os::unix::fs::{OpenOptionsExt, chown, lchown};
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(rr.join("new"))
                .unwrap();
            chown(rr.join("new"), Some(1234), Some(5678)).unwrap();
            std::fs::create_dir(rr.join("newdir")).unwrap();
            std::fs::set_permissions(rr.join("newdir"), std::fs::Permissions::from_mode(0o1777))
                .unwrap();
            std::fs::set_permissions(rr.join("suid"), std::fs::Permissions::from_mode(0o2711))
                .unwrap();
            chown(rr.join("from_storage"), Some(7), None).unwrap();
            let mk = |p: &str, kind: rustix::fs::FileType, dev| {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    rr.join(p),
                    kind,
                    rustix::fs::Mode::from(0o644),
                    dev,
                )
                .unwrap_or_else(|e| panic!("mknod {p}: {e}"));
                chown(rr.join(p), Some(42), Some(43)).unwrap_or_else(|e| panic!("chown {p}: {e}"));
            };
            mk("fifo", rustix::fs::FileType::Fifo, 0);
            mk(
                "null",
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::makedev(1, 3),
            );
            std::os::unix::fs::symlink("new", rr.join("link")).unwrap();
            lchown(rr.join("link"), Some(44), Some(45)).unwrap();
        },
    );
    let want = [
        ("new", (1234, 5678, libc_mode(b'f', 0o640))),
        ("newdir", (0, 0, libc_mode(b'd', 0o1777))),
        ("suid", (0, 0, libc_mode(b'f', 0o2711))),
        ("from_storage", (7, 1001, libc_mode(b'f', 0o644))),
    ];
    for (p, w) in want {
        assert_eq!(stat(p), w, "{p} through the mount");
    }
    let special = [
        ("fifo", (42, 43, libc_mode(b'p', 0o644))),
        ("null", (42, 43, libc_mode(b'c', 0o644))),
        ("link", (44, 45, libc_mode(b'l', 0o777))),
    ];
    for (p, w) in special {
        assert_eq!(stat(p), w, "{p} through the mount");
    }
    g.unmount().unwrap();

    // On disk: every override parses as containers/storage parses it and says the same.
    for (p, (uid, gid, mode)) in want {
        let v = getx(&upper(&m, p), OVERRIDE_STAT)
            .unwrap_or_else(|e| panic!("upper {p} has no {OVERRIDE_STAT}: {e}"));
        let (u, g, perm, ty) = containers_storage_parse(&v)
            .unwrap_or_else(|e| panic!("{p}: containers/storage cannot parse: {e}"));
        assert_eq!(
            (u, g, perm),
            (uid, gid, mode & 0o7777),
            "{p}: {OVERRIDE_STAT}"
        );
        let kind = if mode & 0o170000 == 0o040000 {
            "dir"
        } else {
            "file"
        };
        assert_eq!(ty.as_deref(), Some(kind), "{p}: type in {OVERRIDE_STAT}");
        let real = std::fs::symlink_metadata(upper(&m, p)).unwrap();
        if (uid, gid) != (0, 0) {
            assert_ne!(
                (real.uid(), real.gid()),
                (uid, gid),
                "{p}: chowned for real"
            );
        }
    }
    // Pipes, devices and symlinks cannot carry user.* xattrs: owned for real.
    for (p, (uid, gid, mode)) in special {
        let real = std::fs::symlink_metadata(upper(&m, p)).unwrap();
        assert_eq!(
            (real.uid(), real.gid(), real.mode()),
            (uid, gid, mode),
            "upper {p}"
        );
        let x = xattrs(&upper(&m, p));
        assert!(!x.contains_key(OVERRIDE_STAT), "upper {p}: {x:?}");
    }
    let null = std::fs::symlink_metadata(upper(&m, "null")).unwrap();
    assert_eq!(
        null.rdev(),
        rustix::fs::makedev(1, 3),
        "upper null device number"
    );
}

/// `S_IF*` bits of the type letter `t` (f, d, l, p, c) or'ed with `perm`.
fn libc_mode(t: u8, perm: u32) -> u32 {
    perm | match t {
        b'f' => 0o100000,
        b'd' => 0o040000,
        b'l' => 0o120000,
        b'p' => 0o010000,
        b'c' => 0o020000,
        _ => unreachable!(),
    }
}

#[test]
fn selinux_context_option() {
    if !require_bin_under_test() {
        return;
    }
    let tree = Tree::new().lower(Layer::new().file("a", "lower"));
    let (_s, m) = tree_in("sec-context", &tree);
    let opt = format!("context=\"{LABEL}\"");
    let g = mount(&m, &[&opt]);
    let info = mount_at(g.root()).expect("mountinfo line of the mount");
    let line = format!(
        "{} - {} {}",
        info.mount_options, info.fstype, info.super_options
    );
    if selinux_enabled() {
        // SELinux takes context= before FUSE sees it, and shows it in the super options.
        assert!(
            info.super_options.contains("context=") && info.super_options.contains(LABEL),
            "SELinux on: context= not in the super options: {line}"
        );
        assert_eq!(
            getx(&g.root().join("a"), "security.selinux").map(|v| String::from_utf8_lossy(&v)
                .trim_end_matches('\0')
                .to_string()),
            Ok(LABEL.to_string()),
            "the label of a file under context="
        );
    } else {
        // What the kernel does with the option for FUSE when no LSM claims it.
        let fs = rustix::mount::fsopen("fuse", rustix::mount::FsOpenFlags::FSOPEN_CLOEXEC)
            .expect("fsopen fuse");
        let r = rustix::mount::fsconfig_set_string(&fs, "context", LABEL);
        assert_eq!(
            r,
            Err(rustix::io::Errno::INVAL),
            "without SELinux the kernel refuses context= for FUSE"
        );
        assert!(!line.contains("context="), "context= in mountinfo: {line}");
        eprintln!(
            "SELinux off: the kernel refuses context= for FUSE (EINVAL); rustfuse leaves it out: {line}"
        );
    }
    let p = g.root().join("a");
    assert_eq!(
        timed("read a", move || std::fs::read_to_string(p)).unwrap(),
        "lower"
    );
    let p = g.root().join("b");
    timed("write b", move || std::fs::write(p, "b")).expect("write through the mount");
}
