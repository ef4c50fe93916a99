//! A rootless `buildah bud`, as podman/buildah users run it: a non-root user with /etc/subuid
//! and /etc/subgid ranges, containers/storage's overlay driver with a `mount_program` (or
//! none: the kernel's overlayfs in the user's namespace), offline from a busybox base image
//! made with umoci. Used by `tests/tests/rootless_build.rs` (the images must match) and by the
//! comparison tool in `benches/` (the `buildah-bud` workload: build times).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::env::{run_command, which};

pub mod oci;

/// The build user (no home: HOME is set per build).
pub const USER: &str = "rustfuse-rl";

/// Programs a build needs, with their Debian packages.
const TOOLS: &[(&str, &str)] = &[
    ("buildah", "buildah"),
    ("newuidmap", "uidmap"),
    ("newgidmap", "uidmap"),
    ("umoci", "umoci"),
    ("busybox", "busybox-static"),
    ("setpriv", "util-linux"),
    ("useradd", "passwd"),
];

/// Why a rootless build cannot run here, if it cannot (a missing program, /dev/fuse not
/// usable by other users and not fixable).
pub fn unavailable() -> Option<String> {
    for (prog, pkg) in TOOLS {
        if which(prog).is_none() {
            return Some(format!("{prog} not found (Debian package {pkg})"));
        }
    }
    crate::env::dev_fuse_for_everyone("the rootless build").err()
}

/// Runs `sh -c script sh args...`; its stdout, or an error with both outputs.
pub fn sh(script: &str, args: &[&str], deadline: Duration) -> Result<String, String> {
    let out = run_command(
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(args),
        deadline,
    )?;
    if !out.status.success() {
        return Err(format!(
            "script failed {}\n(script:\n{script})",
            out.report()
        ));
    }
    Ok(out.stdout)
}

/// Creates the build user with subordinate id ranges that overlap no other entry
/// (idempotent); its uid.
pub fn ensure_user() -> Result<u32, String> {
    let script = r#"
set -eu
U="$1"
id "$U" >/dev/null 2>&1 || useradd -M -d /nonexistent -s /bin/sh "$U" || id "$U" >/dev/null
for f in /etc/subuid /etc/subgid; do
  touch "$f"
  if ! grep -q "^$U:" "$f"; then
    start=$(awk -F: 'BEGIN{m=200000} {e=$2+$3; if (e>m) m=e} END{print m}' "$f")
    echo "$U:$start:65536" >> "$f"
  fi
done
id -u "$U"
"#;
    let out = sh(script, &[USER], Duration::from_secs(30))?;
    out.trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("no uid for {USER} in {out:?}"))
}

/// A two-layer busybox base image with lower files to modify, delete, replace and chmod, as
/// `d/base.tar` (an oci-archive, tags `latest` and `rf-base`: `buildah pull` of the second
/// names it `localhost/rf-base`).
pub fn build_base_image(d: &Path) -> Result<PathBuf, String> {
    let script = r#"
set -eu
D="$1"
img="$D/img"
rm -rf "$img" "$D/bundle"
umoci init --layout "$img"
umoci new --image "$img:latest"
umoci unpack --image "$img:latest" "$D/bundle" >/dev/null
R="$D/bundle/rootfs"
mkdir -p "$R/bin" "$R/tmp" "$R/etc"
cp "$(command -v busybox)" "$R/bin/busybox"
for a in $(busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
umoci repack --image "$img:latest" "$D/bundle" >/dev/null
rm -rf "$D/bundle"
umoci unpack --image "$img:latest" "$D/bundle" >/dev/null
R="$D/bundle/rootfs"
mkdir -p "$R/lower/deldir/sub" "$R/replace/a/b" "$R/chm"
i=1
while [ $i -le 50 ]; do
  echo "old$i" > "$R/replace/old$i"; echo x > "$R/replace/a/b/o$i"; i=$((i+1))
done
echo keep > "$R/lower/keep"; echo mod > "$R/lower/mod"; echo del > "$R/lower/del"
echo ren > "$R/lower/ren"; echo d > "$R/lower/deldir/sub/f"; echo c > "$R/chm/file"
ln -s keep "$R/lower/sym"
umoci repack --image "$img:latest" "$D/bundle" >/dev/null
rm -rf "$D/bundle"
umoci config --image "$img:latest" --config.cmd /bin/sh
umoci tag --image "$img:latest" rf-base
tar -C "$img" -cf "$D/base.tar" .
"#;
    sh(
        script,
        &[&d.display().to_string()],
        Duration::from_secs(120),
    )?;
    Ok(d.join("base.tar"))
}

/// RUN steps that create thousands of files, modify, delete and rename lower files, chmod and
/// chown, a `rm -rf DIR && mkdir DIR`, and a COPY of a 2000-file context.
pub const DOCKERFILE: &str = r#"FROM localhost/rf-base
RUN mkdir -p /many && cd /many && for i in $(seq 1 3000); do echo "file $i" > f$i; done && mkdir -p /many/d/e && echo deep > /many/d/e/x
RUN echo changed >> /lower/mod && rm /lower/del && rm -r /lower/deldir && mv /lower/ren /lower/renamed && ln -s ../many/f1 /lower/link && ln /lower/keep /lower/hard && rm /many/f1?? && echo again >> /many/f2
RUN rm -rf /replace && mkdir /replace && echo new > /replace/new
RUN chmod 0600 /lower/keep && chmod 0700 /chm && chmod 4755 /chm/file && chown 1000:1000 /lower/mod && chmod 0751 /many
COPY files /ctx/
RUN rm -rf /ctx/d3 && chmod 0640 /ctx/d4/c4 && ln /ctx/d5/c5 /ctx/d5/hard && echo h > /ctx/d5/h1 && ln /ctx/d5/h1 /ctx/d5/h2
"#;

/// How many files the build makes: [`Size::FULL`] as [`DOCKERFILE`] and [`build_context`]
/// have them, or fewer ([`Size::SMALL`]: the same steps, for a slow machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// Files the first RUN makes in /many (at least 200: a later step deletes f100..f199).
    pub many: u32,
    /// Files in the build context, spread over 20 directories (a multiple of 20).
    pub context: u32,
}

impl Size {
    /// [`DOCKERFILE`] and [`build_context`] as they are.
    pub const FULL: Size = Size {
        many: 3000,
        context: 2000,
    };
    /// A tenth of the files (each directory still spans several readdir replies).
    pub const SMALL: Size = Size {
        many: 300,
        context: 200,
    };

    /// [`DOCKERFILE`] making `self.many` files in /many.
    pub fn dockerfile(self) -> String {
        DOCKERFILE.replace("seq 1 3000", &format!("seq 1 {}", self.many))
    }
}

/// The build context `d/ctx`: the Dockerfile and 2000 files in 20 directories.
pub fn build_context(d: &Path) -> std::io::Result<PathBuf> {
    build_context_of(d, Size::FULL)
}

/// [`build_context`] with the Dockerfile and context files of `size`.
pub fn build_context_of(d: &Path, size: Size) -> std::io::Result<PathBuf> {
    let ctx = d.join("ctx");
    for i in 1..=size.context {
        let dir = ctx.join(format!("files/d{}", i % 20));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("c{i}")), format!("ctx {i}\n"))?;
    }
    std::fs::write(ctx.join("Dockerfile"), size.dockerfile())?;
    Ok(ctx)
}

/// Run as the build user: storage.conf with the given mount program (none: native overlay),
/// import the base image, `buildah bud`, optionally export the result as an OCI layout
/// `out-NAME`. Prints `BUILD_MS <n>` (the `buildah bud` alone).
const BUILD_SCRIPT: &str = r#"
set -eu
D="$1"; N="$2"; MP="$3"; EXPORT="$4"
export HOME="$D/home-$N" XDG_RUNTIME_DIR="$D/xdg-$N"
mkdir -p "$HOME/.config/containers" "$XDG_RUNTIME_DIR"
chmod 700 "$XDG_RUNTIME_DIR"
cat > "$HOME/.config/containers/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$D/graph-$N"
runroot = "$D/run-$N"

[storage.options.overlay]
EOF
if [ -n "$MP" ]; then echo "mount_program = \"$MP\"" >> "$HOME/.config/containers/storage.conf"; fi
id=$(buildah pull -q "oci-archive:$D/base.tar:latest")
buildah tag "$id" localhost/rf-base
s=$(date +%s%N)
buildah bud --isolation chroot --network host --pull-never --layers \
  -t localhost/rf-out -f "$D/ctx/Dockerfile" "$D/ctx"
e=$(date +%s%N)
echo "BUILD_MS $(( (e - s) / 1000000 ))"
if [ "$EXPORT" = 1 ]; then buildah push -q localhost/rf-out "oci:$D/out-$N:latest"; fi
buildah info | grep -A2 GraphOptions
buildah rmi -a -f >/dev/null
"#;

/// A four-step build for a slow machine (tests/kernel.sh under TCG, where each step of
/// `buildah bud` costs 30-50 s, most of it buildah's own re-executions and its commit): the
/// overlay work of [`DOCKERFILE`] and the hard-link steps in fewer layers. Two RUN steps over
/// the base image's lower files (append, unlink, `rm -r`, rename of a file and of a directory
/// of an earlier layer, symlink, hard link to a lower file, `rm -rf DIR && mkdir DIR`, chmod,
/// chown, setuid bit) and link groups made in one step and changed through one name in the
/// next; a COPY of the context; a last RUN that checks all of it through the committed layers
/// (`CK` becomes the [`CK`] shell function, which fails the build) and changes the copied
/// files. `buildah bud --timestamp 0` makes its layers the same bytes wherever it runs.
pub const QUICK_DOCKERFILE: &str = r#"FROM localhost/rf-base
RUN mkdir -p /many/d/e /gen /gen2 && cd /many && for i in $(seq 1 40); do echo "file $i" > f$i; done \
 && echo deep > /many/d/e/x && echo changed >> /lower/mod && rm /lower/del && rm -r /lower/deldir \
 && mv /lower/ren /lower/renamed && ln -s ../many/f1 /lower/link && ln /lower/keep /lower/hard \
 && rm /replace/a/b/o7 && echo a > /gen/a && ln /gen/a /gen/b && echo t > /gen/t1 && ln /gen/t1 /gen/t2 \
 && ln /gen/t1 /gen2/t3 && echo o > /gen/o1 && ln /gen/o1 /gen2/o2 && echo u > /gen/u1 && ln /gen/u1 /gen2/u2
RUN CK; rm -rf /replace && mkdir /replace && echo new > /replace/new && chmod 0600 /lower/keep \
 && chmod 0700 /chm && chmod 4755 /chm/file && chown 1000:1000 /lower/mod && chmod 0751 /many \
 && rm /many/f1? && echo again >> /many/f2 && mv /many/f3 /many/d/f3 && mv /many/d /many/dd \
 && chmod 0640 /gen2/t3 && chown 1000:1000 /gen2/o2 && chmod 0600 /gen/u1 \
 && ck '[ /gen/t1 -ef /gen2/t3 ]' && ck '[ $(stat -c %a /gen/t1) = 640 ]' \
 && ck '[ $(stat -c %u:%g /gen/o1) = 1000:1000 ]' && ck '[ $(stat -c %h /gen/t2) = 3 ]'
COPY files /ctx/
RUN CK; ck '[ /gen/a -ef /gen/b ]' && ck '[ /gen/t1 -ef /gen2/t3 ]' && ck '[ /gen/t2 -ef /gen2/t3 ]' \
 && ck '[ /gen/o1 -ef /gen2/o2 ]' && ck '[ /gen/u1 -ef /gen2/u2 ]' && ck '[ $(stat -c %a /gen2/u2) = 600 ]' \
 && ck '[ $(stat -c %a /gen/t2) = 640 ]' && ck '[ $(stat -c %h /gen2/t3) = 3 ]' \
 && ck '[ $(stat -c %u:%g /gen/o1) = 1000:1000 ]' && ck '[ $(stat -c %a /lower/keep) = 600 ]' \
 && ck '[ $(stat -c %u:%g /lower/mod) = 1000:1000 ]' && ck '[ "$(cat /lower/mod)" = "$(printf "mod\nchanged")" ]' \
 && ck '[ ! -e /lower/del ] && [ ! -e /lower/deldir ] && [ ! -e /lower/ren ]' \
 && ck '[ "$(cat /lower/renamed /lower/hard)" = "$(printf "ren\nkeep")" ]' && ck '[ "$(readlink /lower/link)" = ../many/f1 ]' \
 && ck '[ "$(ls -A /replace)" = new ]' && ck '[ $(stat -c %a /chm) = 700 ] && [ $(stat -c %a /chm/file) = 4755 ]' \
 && ck '[ ! -e /many/f15 ] && [ -e /many/f40 ] && [ "$(cat /many/f2)" = "$(printf "file 2\nagain")" ]' \
 && ck '[ ! -e /many/d ] && [ "$(cat /many/dd/e/x)" = deep ] && [ "$(cat /many/dd/f3)" = "file 3" ]' \
 && ck '[ $(stat -c %a /many) = 751 ] && [ $(ls /many | wc -l) = 30 ] && [ $(ls /ctx | wc -l) = 20 ]' \
 && rm -rf /ctx/d3 && chmod 0640 /ctx/d4/c4 && ln /ctx/d5/c5 /ctx/d5/hard && echo h > /ctx/d5/h1 \
 && ln /ctx/d5/h1 /ctx/d5/h2
"#;

/// The `ck` shell function `CK` stands for in [`QUICK_DOCKERFILE`]: it evaluates a test and,
/// when it is false, prints `LINKCHECK FAIL: <test>` and the listing of /gen and /gen2, and
/// fails the build.
pub const CK: &str =
    r#"ck() { eval "$1" || { echo "LINKCHECK FAIL: $1"; ls -lin /gen /gen2; exit 1; }; }"#;

/// The context of [`QUICK_DOCKERFILE`]: 20 files, one in each of `files/d0` .. `files/d19`.
pub const QUICK_SIZE: Size = Size {
    many: 200,
    context: 20,
};

/// Run as the build user: [`BUILD_SCRIPT`] with fewer buildah commands (each costs seconds
/// under TCG): the base image imported under its own name, `buildah bud --timestamp 0`, the
/// image exported to the OCI layout `out-NAME` (no `buildah info`, no `rmi`).
const QUICK_SCRIPT: &str = r#"
set -eu
D="$1"; N="$2"; MP="$3"
export HOME="$D/home-$N" XDG_RUNTIME_DIR="$D/xdg-$N"
mkdir -p "$HOME/.config/containers" "$XDG_RUNTIME_DIR"
chmod 700 "$XDG_RUNTIME_DIR"
cat > "$HOME/.config/containers/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$D/graph-$N"
runroot = "$D/run-$N"

[storage.options.overlay]
mount_program = "$MP"
EOF
buildah pull -q "oci-archive:$D/base.tar:rf-base" >/dev/null
s=$(date +%s%N)
buildah bud --isolation chroot --network host --pull-never --layers --timestamp 0 \
  -t localhost/rf-out -f "$D/ctx/Dockerfile" "$D/ctx"
e=$(date +%s%N)
echo "BUILD_MS $(( (e - s) / 1000000 ))"
buildah push -q localhost/rf-out "oci:$D/out-$N:latest"
"#;

/// One rootless build of [`QUICK_DOCKERFILE`] in `d` (owned by the build user, with the base
/// image of [`build_base_image`] and the context of [`QUICK_SIZE`]) with `mount_program` =
/// `mp`; the image is in the OCI layout `d/out-NAME`.
pub fn build_quick(d: &Path, name: &str, mp: &Path, deadline: Duration) -> Result<Build, String> {
    std::fs::write(d.join("ctx/Dockerfile"), QUICK_DOCKERFILE.replace("CK", CK))
        .map_err(|e| format!("ctx/Dockerfile: {e}"))?;
    let out = run_command(
        as_build_user()
            .args([
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "sh",
                "-c",
                QUICK_SCRIPT,
                "sh",
            ])
            .arg(d)
            .arg(name)
            .arg(mp)
            .current_dir(d),
        deadline,
    )
    .map_err(|e| format!("rootless build {name}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "rootless buildah build with mount_program {} failed {}",
            mp.display(),
            out.report()
        ));
    }
    let ms = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("BUILD_MS "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no BUILD_MS in:\n{}", out.stdout))?;
    Ok(Build {
        ms,
        stdout: out.stdout,
    })
}

/// Why containers/storage's native overlay driver cannot work for the build user here, if it
/// cannot: a trial mount of kernel overlayfs (`userxattr`, as containers/storage mounts it
/// rootless) as that user inside `unshare -Urm`, in `d/native-trial` (`d` owned by the user:
/// see [`chown_r`]). Linux before 5.11 refuses overlayfs in a user namespace; the kernel
/// version is never looked at. The mount goes away with the namespace.
pub fn native_overlay_refused(d: &Path) -> Result<Option<String>, String> {
    let t = d.join("native-trial");
    let out = run_command(
        as_build_user()
            .args([
                "unshare",
                "-Urm",
                "sh",
                "-c",
                r#"set -eu
T="$1"
mkdir -p "$T/l" "$T/u" "$T/w" "$T/m"
echo x > "$T/l/f"
mount -t overlay overlay -o "lowerdir=$T/l,upperdir=$T/u,workdir=$T/w,userxattr" "$T/m" || exit 3
test "$(cat "$T/m/f")" = x
echo y > "$T/m/g"
test -f "$T/u/g""#,
                "sh",
            ])
            .arg(&t)
            .current_dir(d),
        Duration::from_secs(30),
    )?;
    match out.status.code() {
        Some(0) => Ok(None),
        // The mount itself refused: the driver cannot be used here.
        Some(3) => Ok(Some(format!(
            "kernel overlayfs cannot be mounted in {USER}'s user namespace (trial mount: {})",
            out.stderr.trim()
        ))),
        // Anything else is a broken trial, not an answer.
        _ => Err(format!(
            "trial mount of kernel overlayfs as {USER} failed {}",
            out.report()
        )),
    }
}

/// What one build printed, and how long `buildah bud` took.
pub struct Build {
    pub ms: u64,
    pub stdout: String,
}

/// One rootless build in `d` (which the build user owns: see [`chown_r`]) named `name`, with
/// `mount_program` = `mp` (None: containers/storage's native overlay).
pub fn build_as_user(
    d: &Path,
    name: &str,
    mp: Option<&Path>,
    export: bool,
    deadline: Duration,
) -> Result<Build, String> {
    let out = run_command(
        as_build_user()
            .args([
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "sh",
                "-c",
                BUILD_SCRIPT,
                "sh",
            ])
            .arg(d)
            .arg(name)
            .arg(mp.unwrap_or(Path::new("")))
            .arg(if export { "1" } else { "0" })
            .current_dir(d),
        deadline,
    )
    .map_err(|e| format!("rootless build {name}: {e}"))?;
    let what = match mp {
        Some(p) => format!("mount_program {}", p.display()),
        None => "the native overlay driver".to_string(),
    };
    if !out.status.success() {
        return Err(format!(
            "rootless buildah build with {what} failed {}",
            out.report()
        ));
    }
    let ms = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("BUILD_MS "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no BUILD_MS in:\n{}", out.stdout))?;
    if let Some(p) = mp {
        if !out
            .stdout
            .contains(&format!("overlay.mount_program={}", p.display()))
        {
            return Err(format!(
                "buildah does not use the configured mount_program:\n{}",
                out.stdout
            ));
        }
    }
    Ok(Build {
        ms,
        stdout: out.stdout,
    })
}

/// `setpriv` to the build user (its uid, gid and groups); the caller appends the command.
fn as_build_user() -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        format!("--reuid={USER}"),
        format!("--regid={USER}"),
        "--init-groups".to_string(),
    ]);
    cmd
}

/// `setpriv` to the build user with a clean environment (`PATH` with `d/bin` first, `HOME` and
/// `XDG_RUNTIME_DIR` = `d`, plus `env`), running `prog` in `d`; the caller appends its
/// arguments.
pub fn as_user_in(d: &Path, env: &[String], prog: &str) -> Command {
    let mut cmd = as_build_user();
    cmd.args(["env", "-i"])
        .arg(format!(
            "PATH={}:/usr/sbin:/usr/bin:/sbin:/bin",
            d.join("bin").display()
        ))
        .arg(format!("HOME={}", d.display()))
        .arg(format!("XDG_RUNTIME_DIR={}", d.display()))
        .args(env)
        .arg(prog)
        .current_dir(d);
    cmd
}

/// [`as_user_in`] running `rootlesskit` with the host network, its own PID namespace (so that
/// killing it on a deadline takes every process inside, FUSE daemons included), `/etc` and
/// `/run` copied up, and state under `d/STATE`. The caller appends the command to run inside.
pub fn in_rootlesskit(d: &Path, state: &str, env: &[String]) -> Command {
    let mut cmd = as_user_in(d, env, "rootlesskit");
    cmd.args(["--net=host", "--pidns", "--copy-up=/etc", "--copy-up=/run"])
        .arg(format!("--state-dir={}", d.join(state).display()));
    cmd
}

/// A copy of `real` at `d/NAME` that the build user can run.
pub fn program_copy(d: &Path, name: &str, real: &Path) -> std::io::Result<PathBuf> {
    let p = d.join(name);
    std::fs::copy(real, &p)?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

/// `chown -R uid:uid p` (not following symlinks).
pub fn chown_r(p: &Path, uid: u32) -> std::io::Result<()> {
    rustix::fs::chownat(
        rustix::fs::CWD,
        p,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(uid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if p.is_dir() && !p.is_symlink() {
        for e in std::fs::read_dir(p)?.flatten() {
            chown_r(&e.path(), uid)?;
        }
    }
    Ok(())
}
