//! Directory redirects across a restart in another mode (issue 18), with the real
//! `rustfuse-snapshotter` binary, real FUSE and kernel overlay mounts.
//!
//! In FUSE mode the snapshotter's overlays carry `redirect_dir=on` (here mounted the way
//! containerd mounts a `fuse3.*` type: `mount.fuse3 overlay TARGET -o OPT ... -t rustfuse`,
//! which runs `rustfuse` from PATH), so renames of directories with parent-layer content leave
//! redirects in the layers. Restarted in overlay mode as root, the service finds them (the
//! count Commit stored, a walk of the Active snapshots prepared in FUSE mode), mounts with
//! `redirect_dir=follow`, and kernel overlayfs shows the trees rustfuse showed. Where the
//! kernel cannot follow (a user namespace: `unshare -Urm`, where the kernel refuses
//! `redirect_dir=follow` with `userxattr`), `--mode auto` stays in FUSE mode and
//! `--mode overlay` refuses to start, both naming the snapshots; `doctor` says which.
//!
//! Needs root, /dev/fuse, mount.fuse3 and unshare; prints `SKIPPED: <reason>` when it cannot
//! run, or fails under `CI=true`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use rustfuse_snapshotter::api::Mount;
use rustfuse_snapshotter::mode::which;
use rustfuse_snapshotter::store::Store;

/// Every entry under `root`: directories as `None`, files with their content.
fn tree(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let name = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                out.insert(name, None);
                stack.push(p);
            } else {
                out.insert(name, Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// Mount a `fuse3.rustfuse` spec as containerd does: `mount.fuse3 SOURCE TARGET -o OPT ...
/// -t rustfuse`, with the FUSE program's directory first on PATH.
fn mount_via_mount_fuse3(mounts: &[Mount], target: &Path) -> MountGuard {
    let m = &mounts[0];
    let prog = fuse_program().expect("FUSE program");
    let alias_dir = target.with_extension("bin");
    std::fs::create_dir_all(&alias_dir).unwrap();
    let alias = alias_dir.join("rustfuse");
    if !alias.exists() {
        std::os::unix::fs::symlink(&prog, &alias).unwrap();
    }
    let path = format!(
        "{}:{}",
        alias_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let subtype = m.r#type.strip_prefix("fuse3.").expect("a fuse3.* mount");
    std::fs::create_dir_all(target).unwrap();
    let mut cmd = Command::new(which("mount.fuse3").expect("mount.fuse3"));
    cmd.arg(&m.source).arg(target);
    for o in &m.options {
        cmd.arg("-o").arg(o);
    }
    let out = cmd
        .args(["-t", subtype])
        .env("PATH", path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount.fuse3 {m:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    wait_mounted(target);
    MountGuard::adopt(target)
}

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn rename(root: &Path, from: &str, to: &str) {
    std::fs::rename(root.join(from), root.join(to))
        .unwrap_or_else(|e| panic!("rename {from} to {to} (redirect_dir=on): {e}"));
}

/// The snapshots FUSE mode leaves: `base` (no parent), `step` (on base: `/opt/app` renamed
/// to `/opt/app.old`, a new `/opt/app`), `plain` (on base, no rename), and Active `active` (on
/// step: `/etc/cfg` from base renamed into `/srv/cfg.d`, `/opt/app.old` renamed again).
/// Returns the trees of `step` and `active` as rustfuse shows them.
struct Layers {
    step: BTreeMap<String, Option<Vec<u8>>>,
    active: BTreeMap<String, Option<Vec<u8>>>,
}

fn fuse_layers(s: &Server) -> Layers {
    let c = s.client();
    let work = s.work();
    let g = mount_all(&c.prepare("base-a", "").unwrap(), &work.join("base"));
    let b = work.join("base");
    write(&b, "opt/app/conf", "v1");
    write(&b, "opt/app/bin/run", "#!/bin/sh\n");
    write(&b, "etc/cfg/a", "a");
    write(&b, "etc/cfg/sub/b", "b");
    std::fs::create_dir_all(b.join("srv")).unwrap();
    g.unmount();
    c.commit("base", "base-a").unwrap();

    let mounts = c.prepare("step-a", "base").unwrap();
    assert_eq!(mounts[0].r#type, "fuse3.rustfuse");
    assert!(mounts[0].options.contains(&"redirect_dir=on".to_string()));
    let mp = work.join("step");
    let g = mount_via_mount_fuse3(&mounts, &mp);
    rename(&mp, "opt/app", "opt/app.old");
    write(&mp, "opt/app/conf", "v2");
    let (_, upper) = first_dir(&mounts);
    assert!(
        rustfuse_snapshotter::redirects::is_redirected(&upper.join("opt/app.old")),
        "mount.fuse3 passed redirect_dir=on through: the upper holds a redirect"
    );
    g.unmount();
    c.commit("step", "step-a").unwrap();

    let g = mount_all(&c.prepare("plain-a", "base").unwrap(), &work.join("plain"));
    write(&work.join("plain"), "plain", "p");
    g.unmount();
    c.commit("plain", "plain-a").unwrap();

    let mounts = c.prepare("active", "step").unwrap();
    let mp = work.join("active");
    let g = mount_all(&mounts, &mp);
    rename(&mp, "etc/cfg", "srv/cfg.d");
    rename(&mp, "opt/app.old", "opt/app.older");
    write(&mp, "srv/cfg.d/sub/c", "c");
    let active = tree(&mp);
    g.unmount();

    let mp = work.join("fuse-view");
    let g = mount_all(&c.view("fuse-view", "step").unwrap(), &mp);
    let step = tree(&mp);
    g.unmount();
    c.remove("fuse-view").unwrap();
    assert!(step.contains_key("opt/app.old/bin/run") && !step.contains_key("opt/app/bin"));
    assert!(active.contains_key("srv/cfg.d/sub/b") && !active.contains_key("etc/cfg"));
    Layers { step, active }
}

fn doctor(s: &Server, wrapper: &[&str], choice: &str) -> String {
    let mut cmd = match wrapper.split_first() {
        Some((p, a)) => {
            let mut c = Command::new(p);
            c.args(a).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let out = cmd
        .args(["doctor", "--root"])
        .arg(s.root())
        .args(["--mode", choice])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "doctor: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn has(m: &[Mount], opt: &str) -> bool {
    m[0].options.iter().any(|o| o == opt)
}

fn can_run_here() -> bool {
    if !(can_run(Mode::Fuse) && can_run(Mode::Overlay)) {
        return false;
    }
    for prog in ["mount.fuse3", "unshare"] {
        if which(prog).is_none() {
            skip(&format!(
                "{prog} not found (Debian packages fuse3, util-linux)"
            ));
            return false;
        }
    }
    true
}

/// FUSE-mode layers with redirects, then a restart in overlay mode as root: the counts are in
/// the store, the mounts carry `redirect_dir=follow`, and kernel overlayfs shows the trees
/// rustfuse showed (a two-layer view of the committed rename, the Active snapshot prepared in
/// FUSE mode, a child prepared in overlay mode); `--mode auto` chooses the same; doctor says so.
#[test]
fn restart_in_overlay_mode_follows_fuse_mode_redirects() {
    if !can_run_here() {
        return;
    }
    let mut s = Server::start(Mode::Fuse);
    let want = fuse_layers(&s);
    s.stop();
    {
        let store = Store::open(&s.root().join("metadata.redb")).unwrap();
        let get = |k: &str| store.must_get(k).unwrap();
        assert_eq!(get("step").redirect_dirs, 1, "Commit counted the redirect");
        assert_eq!(get("base").redirect_dirs, 0);
        assert_eq!(get("plain").redirect_dirs, 0);
        assert!(
            get("active").fuse_upper,
            "Prepare in FUSE mode marked the upper"
        );
        assert!(
            !get("base").fuse_upper,
            "a bind-mounted upper is no rustfuse upper"
        );
    }
    let d = doctor(&s, &[], "overlay");
    assert!(d.contains("redirect_dir:         follow"), "{d}");
    assert!(
        d.contains("\"step\" (1 redirected directory)") && d.contains("\"active\" (active"),
        "{d}"
    );

    for choice in ["overlay", "auto"] {
        s.mode = Mode::Overlay;
        s.choice = Some(choice);
        s.spawn();
        let log = s.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("mount mode chosen") && l.contains("redirect_dir=follow")),
            "--mode {choice}:\n{log}"
        );
        let c = s.client();
        let m = c.mounts("active").unwrap();
        assert_eq!(m[0].r#type, "overlay", "--mode {choice}");
        assert!(has(&m, "redirect_dir=follow"), "{m:?}");
        let g = mount_all(&m, &s.work().join(format!("k-active-{choice}")));
        assert_eq!(
            tree(&s.work().join(format!("k-active-{choice}"))),
            want.active
        );
        g.unmount();
        let m = c.view("kernel-view", "step").unwrap();
        assert!(has(&m, "redirect_dir=follow"), "{m:?}");
        let mp = s.work().join(format!("k-view-{choice}"));
        let g = mount_all(&m, &mp);
        assert_eq!(
            tree(&mp),
            want.step,
            "a kernel mount of step (--mode {choice})"
        );
        g.unmount();
        c.remove("kernel-view").unwrap();
        // A child prepared now, in overlay mode, over the redirected layer.
        let m = c.prepare("kernel-child", "step").unwrap();
        assert!(has(&m, "redirect_dir=follow"), "{m:?}");
        let mp = s.work().join(format!("k-child-{choice}"));
        let g = mount_all(&m, &mp);
        assert_eq!(
            tree(&mp),
            want.step,
            "a kernel child of step (--mode {choice})"
        );
        assert!(!mp.join("opt/app/bin").exists());
        g.unmount();
        c.remove("kernel-child").unwrap();
        drop(c);
        s.stop();
    }
}

/// Where the kernel cannot follow redirects (a user namespace, where overlay mounts need
/// `userxattr` and the kernel refuses `redirect_dir=follow` with it): `--mode overlay` fails
/// to start naming the snapshot that holds them, `--mode auto` falls back to FUSE mode saying
/// why, and its mounts (`redirect_dir=on`) show the trees; doctor says the same.
#[test]
fn no_kernel_follow_keeps_fuse_mode_naming_the_snapshots() {
    if !can_run_here() {
        return;
    }
    let mut s = Server::start(Mode::Fuse);
    let want = fuse_layers(&s);
    s.stop();
    let userns = ["unshare", "-Urm"];
    s.wrapper = userns.iter().map(|a| a.to_string()).collect();

    s.mode = Mode::Overlay;
    s.choice = Some("overlay");
    let err = s
        .try_spawn()
        .expect_err("--mode overlay must refuse to start");
    for want in [
        "--mode overlay",
        "\"step\" (1 redirected directory)",
        "redirect_dir=follow",
        "together with userxattr",
    ] {
        assert!(err.contains(want), "{want:?} in:\n{err}");
    }

    s.mode = Mode::Fuse;
    s.choice = Some("auto");
    s.spawn();
    let log = s.log_text();
    let chosen = log
        .lines()
        .rfind(|l| l.contains("mount mode chosen"))
        .unwrap_or_else(|| panic!("no mode line in:\n{log}"));
    assert!(
        chosen.contains("mode=\"fuse\"") || chosen.contains("mode=fuse"),
        "{chosen}"
    );
    assert!(
        chosen.contains("\\\"step\\\"") || chosen.contains("\"step\""),
        "{chosen}"
    );
    let c = s.client();
    let m = c.mounts("active").unwrap();
    assert_eq!(m[0].r#type, "fuse3.rustfuse");
    assert!(has(&m, "redirect_dir=on"), "{m:?}");
    let mp = s.work().join("f-active");
    let g = mount_all(&m, &mp);
    assert_eq!(tree(&mp), want.active);
    g.unmount();
    let mp = s.work().join("f-view");
    let g = mount_all(&c.view("fuse-view-2", "step").unwrap(), &mp);
    assert_eq!(tree(&mp), want.step);
    g.unmount();
    drop(c);
    s.stop();

    let d = doctor(&s, &userns, "auto");
    assert!(
        d.contains("mode:                 fuse (snapshots \"step\""),
        "{d}"
    );
    assert!(d.contains("redirect_dir:         on (FUSE mode"), "{d}");
    assert!(
        d.contains("trial follow mount:   [") && d.contains("failed"),
        "{d}"
    );
    let d = doctor(&s, &userns, "overlay");
    assert!(
        d.contains("mode:                 none: --mode overlay: snapshots \"step\""),
        "{d}"
    );
    // Without the user namespace the same root mounts kernel overlays that follow.
    let d = doctor(&s, &[], "auto");
    assert!(
        d.contains("mode:                 overlay") && d.contains("redirect_dir:         follow"),
        "{d}"
    );
}
