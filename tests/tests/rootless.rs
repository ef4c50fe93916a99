//! Rootless: the binary under test, run as uid 65534 inside `unshare -Urm` (root in a new user
//! namespace, nothing more), mounts, reads, writes and unmounts.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rustfuse_tests::env::{
    bin_under_test, dev_fuse_for_everyone, require_bin_under_test, rootless_sh, run_command,
    scratch, skip,
};

const NOBODY: u32 = 65534;

fn chown_r(p: &Path) {
    rustix::fs::chownat(
        rustix::fs::CWD,
        p,
        Some(rustix::fs::Uid::from_raw(NOBODY)),
        Some(rustix::fs::Gid::from_raw(NOBODY)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
    if p.is_dir() && !p.is_symlink() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            chown_r(&e.path());
        }
    }
}

fn can_run() -> bool {
    if !require_bin_under_test() {
        return false;
    }
    for tool in ["/usr/bin/setpriv", "/usr/bin/unshare"] {
        if !Path::new(tool).exists() {
            return skip(&format!("{tool} missing (util-linux)"));
        }
    }
    // An unprivileged user must be able to open /dev/fuse.
    if let Err(e) = dev_fuse_for_everyone("the rootless test") {
        return skip(&e);
    }
    let probe = run_command(
        Command::new("setpriv").args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "unshare",
            "-Urm",
            "true",
        ]),
        Duration::from_secs(10),
    );
    match probe {
        Ok(o) if o.status.success() => true,
        Ok(o) => skip(&format!(
            "unprivileged user namespaces unavailable: {}",
            o.stderr.trim()
        )),
        Err(e) => skip(&e),
    }
}

#[test]
fn mount_read_write_unmount_in_user_namespace() {
    if !can_run() {
        return;
    }
    let s = scratch("rootless");
    let base = s.path();
    for d in ["lower/dir", "upper", "work", "mnt"] {
        std::fs::create_dir_all(base.join(d)).unwrap();
    }
    std::fs::write(base.join("lower/file"), "from lower").unwrap();
    std::fs::write(base.join("lower/dir/gone"), "to delete").unwrap();
    chown_r(base);
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The binary must be reachable by uid 65534.
    let bin = bin_under_test();
    let bin_copy = base.join("bin-under-test");
    std::fs::copy(&bin, &bin_copy).unwrap();
    std::fs::set_permissions(&bin_copy, std::fs::Permissions::from_mode(0o755)).unwrap();

    let script = r#"
set -eu
B="$1"; D="$2"
"$B" -o "lowerdir=$D/lower,upperdir=$D/upper,workdir=$D/work" "$D/mnt"
grep -q " $D/mnt " /proc/self/mountinfo
test "$(cat "$D/mnt/file")" = "from lower"
echo written > "$D/mnt/new"
echo more >> "$D/mnt/file"
rm "$D/mnt/dir/gone"
mkdir "$D/mnt/newdir"
test "$(cat "$D/mnt/new")" = written
ls "$D/mnt/dir" | grep -q gone && { echo "deleted file still listed"; exit 1; }
stat -c '%u:%g' "$D/mnt/new"
umount "$D/mnt"
"#;
    let out = run_command(
        rootless_sh(script).arg(&bin_copy).arg(base),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "rootless run failed {}", out.report());
    assert_eq!(
        out.stdout.trim(),
        "0:0",
        "owner of a new file inside the namespace"
    );
    // Seen from outside: the upper layer holds the changes, owned by the unprivileged user.
    let up = base.join("upper");
    assert_eq!(
        std::fs::read_to_string(up.join("new")).unwrap(),
        "written\n"
    );
    assert_eq!(
        std::fs::read_to_string(up.join("file")).unwrap(),
        "from lowermore\n"
    );
    assert_eq!(std::fs::metadata(up.join("new")).unwrap().uid(), NOBODY);
    assert!(up.join("newdir").is_dir());
    let wh = up.join("dir/gone");
    let wh_file = up.join("dir/.wh.gone");
    let whiteout_ok = std::fs::symlink_metadata(&wh)
        .map(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_char_device() && m.rdev() == 0
        })
        .unwrap_or(false)
        || wh_file.exists();
    assert!(whiteout_ok, "no whiteout for dir/gone in the upper layer");
}
