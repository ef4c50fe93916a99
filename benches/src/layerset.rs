//! The generated, image-like layer set every filesystem mounts.
//!
//! Four lower layers (bottom first): `base` (a distro rootfs: usr/bin, usr/lib, usr/share/doc,
//! usr/share/locale, usr/include, etc, var/lib/dpkg, and the large files), `updates` (overrides
//! of base files, char-device whiteouts of files and whole directories, an opaque directory),
//! `app` (a node_modules tree, a git repository, a small C project) and `config` (a few more
//! overrides and whiteouts). Generation is deterministic and skipped when the work dir already
//! holds a set of the same version and scale.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const VERSION: &str = "rustfuse-compare layers v1";
/// Layers in the mount-time sets.
pub const MOUNT_SET_LAYERS: usize = 50;

/// Sizes derived from `--scale`.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub scale: f64,
    /// Small files across the lower layers.
    pub files: usize,
    pub seq_bytes: u64,
    pub append_bytes: u64,
    pub rand_bytes: u64,
    pub untar_files: usize,
    pub fsync_files: usize,
    pub c_files: usize,
    pub rand_ops_per_job: usize,
}

impl Sizes {
    pub fn new(scale: f64) -> Sizes {
        const MIB: f64 = 1024.0 * 1024.0;
        let s = |n: f64, min: f64| (n * scale).max(min);
        Sizes {
            scale,
            files: s(30_000.0, 300.0) as usize,
            seq_bytes: (s(1024.0, 4.0) * MIB) as u64,
            append_bytes: (s(512.0, 2.0) * MIB) as u64,
            rand_bytes: (s(256.0, 4.0) * MIB) as u64,
            untar_files: s(20_000.0, 200.0) as usize,
            fsync_files: s(1000.0, 50.0) as usize,
            c_files: s(64.0, 8.0) as usize,
            rand_ops_per_job: s(50_000.0, 2_000.0) as usize,
        }
    }
}

/// Where the generated data lives.
#[derive(Debug, Clone)]
pub struct Layers {
    /// Lower layers, top first (the order of `lowerdir=`).
    pub lowers: Vec<PathBuf>,
    /// Small single-directory layers for the mount-time workloads, in order.
    pub mount_set: Vec<PathBuf>,
    /// Visible regular files of the merged view, relative, one per line.
    pub file_list: PathBuf,
    /// The archive the untar workload extracts.
    pub untar_archive: PathBuf,
}

/// Deterministic xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Writes one layer and keeps the merged view's visible files up to date.
struct Writer<'a> {
    root: PathBuf,
    visible: &'a mut BTreeSet<String>,
    rng: Rng,
    buf: Vec<u8>,
}

impl Writer<'_> {
    fn file(&mut self, rel: &str, size: usize) -> Result<()> {
        let p = self.root.join(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let start = self.rng.below(self.buf.len() as u64 / 2) as usize;
        let size = size.min(self.buf.len() - start);
        fs::write(&p, &self.buf[start..start + size])
            .with_context(|| format!("write {}", p.display()))?;
        self.visible.insert(rel.to_string());
        Ok(())
    }

    fn small(&mut self, rel: &str, max: u64) -> Result<()> {
        crate::run::check_interrupted()?;
        let size = self.rng.below(max) as usize;
        self.file(rel, size)
    }

    fn text(&mut self, rel: &str, text: &str) -> Result<()> {
        let p = self.root.join(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)?;
        }
        fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        self.visible.insert(rel.to_string());
        Ok(())
    }

    fn symlink(&mut self, rel: &str, target: &str) -> Result<()> {
        let p = self.root.join(rel);
        std::os::unix::fs::symlink(target, &p).with_context(|| format!("symlink {}", p.display()))
    }

    /// A char-device 0/0 whiteout of `rel` (file or directory) in this layer.
    fn whiteout(&mut self, rel: &str) -> Result<()> {
        let p = self.root.join(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)?;
        }
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .with_context(|| format!("mknod whiteout {}", p.display()))?;
        self.hide(rel);
        Ok(())
    }

    /// An opaque directory: the lower layers' contents of `rel` are hidden.
    fn opaque_dir(&mut self, rel: &str) -> Result<()> {
        let p = self.root.join(rel);
        fs::create_dir_all(&p)?;
        for name in ["trusted.overlay.opaque", "user.overlay.opaque"] {
            rustix::fs::setxattr(&p, name, b"y", rustix::fs::XattrFlags::empty())
                .with_context(|| format!("setxattr {name} on {}", p.display()))?;
        }
        self.hide(rel);
        Ok(())
    }

    fn hide(&mut self, rel: &str) {
        self.visible.remove(rel);
        let prefix = format!("{rel}/");
        let below: Vec<String> = self
            .visible
            .range(prefix.clone()..)
            .take_while(|p| p.starts_with(&prefix))
            .cloned()
            .collect();
        for p in below {
            self.visible.remove(&p);
        }
    }

    fn big(&mut self, rel: &str, bytes: u64) -> Result<()> {
        let p = self.root.join(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)?;
        }
        let mut f = std::io::BufWriter::with_capacity(
            1 << 20,
            fs::File::create(&p).with_context(|| format!("create {}", p.display()))?,
        );
        let chunk = &self.buf[..1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.flush()?;
        self.visible.insert(rel.to_string());
        Ok(())
    }
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    // Text-like bytes compress a little, as real files do.
    for (i, b) in v.iter_mut().enumerate() {
        if i % 3 == 0 {
            *b = b'a' + (*b % 26);
        }
    }
    v
}

/// The layer set under `dir`, generated unless a complete one of this scale is there.
pub fn ensure(dir: &Path, sizes: &Sizes) -> Result<Layers> {
    let root = dir.join("layers");
    let marker = root.join(".complete");
    let want = format!("{VERSION} scale={}\n", sizes.scale);
    let layers = Layers {
        lowers: ["3-config", "2-app", "1-updates", "0-base"]
            .iter()
            .map(|n| root.join(n))
            .collect(),
        mount_set: (0..MOUNT_SET_LAYERS)
            .map(|i| root.join("m").join(i.to_string()))
            .collect(),
        file_list: root.join("files.txt"),
        untar_archive: root.join("untar.tar"),
    };
    if fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(layers);
    }
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("remove {}", root.display()))?;
    }
    fs::create_dir_all(&root)?;
    eprintln!(
        "generating layers in {} ({} small files, scale {})",
        root.display(),
        sizes.files,
        sizes.scale
    );
    let mut visible = BTreeSet::new();
    let buf = pseudo_random(4 << 20, 0x5eed);
    let lowers_bottom_first: Vec<PathBuf> = layers.lowers.iter().rev().cloned().collect();
    for (i, layer) in lowers_bottom_first.iter().enumerate() {
        fs::create_dir_all(layer)?;
        let mut w = Writer {
            root: layer.clone(),
            visible: &mut visible,
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1)),
            buf: buf.clone(),
        };
        match i {
            0 => base(&mut w, sizes)?,
            1 => updates(&mut w, sizes)?,
            2 => app(&mut w, sizes)?,
            _ => config(&mut w, sizes)?,
        }
    }
    let mut list = String::new();
    for p in &visible {
        list.push_str(p);
        list.push('\n');
    }
    fs::write(&layers.file_list, list)?;
    for (i, l) in layers.mount_set.iter().enumerate() {
        for k in 0..10 {
            let d = l.join(format!("d{i}"));
            fs::create_dir_all(&d)?;
            fs::write(d.join(format!("f{k}")), format!("{i} {k}\n"))?;
        }
    }
    untar_archive(&root, &layers.untar_archive, sizes, &buf)?;
    fs::write(&marker, want)?;
    Ok(layers)
}

fn count(sizes: &Sizes, share: f64) -> usize {
    ((sizes.files as f64) * share).max(10.0) as usize
}

fn base(w: &mut Writer, sizes: &Sizes) -> Result<()> {
    for i in 0..count(sizes, 0.06) {
        w.small(&format!("usr/bin/cmd{i}"), 48 << 10)?;
    }
    let libs = count(sizes, 0.04);
    for i in 0..libs {
        w.small(&format!("usr/lib/x86_64-linux-gnu/lib{i}.so.1"), 96 << 10)?;
        if i % 4 == 0 {
            w.symlink(
                &format!("usr/lib/x86_64-linux-gnu/lib{i}.so"),
                &format!("lib{i}.so.1"),
            )?;
        }
    }
    for i in 0..count(sizes, 0.08) {
        w.small(
            &format!("usr/lib/python3/dist-packages/mod{}/f{}.py", i / 20, i % 20),
            8 << 10,
        )?;
    }
    let docs = count(sizes, 0.12) / 3;
    for j in 0..docs {
        w.small(&format!("usr/share/doc/pkg{j}/copyright"), 4 << 10)?;
        w.small(
            &format!("usr/share/doc/pkg{j}/changelog.Debian.gz"),
            8 << 10,
        )?;
        w.small(&format!("usr/share/doc/pkg{j}/README.Debian"), 2 << 10)?;
    }
    for i in 0..count(sizes, 0.04) {
        w.small(
            &format!("usr/share/locale/l{}/LC_MESSAGES/dom{}.mo", i / 16, i % 16),
            4 << 10,
        )?;
    }
    for i in 0..count(sizes, 0.08) {
        w.small(&format!("usr/include/sub{}/h{}.h", i / 25, i % 25), 6 << 10)?;
    }
    for i in 0..count(sizes, 0.02) {
        w.small(
            &format!("etc/conf{}.d/file{}.conf", i / 10, i % 10),
            1 << 10,
        )?;
    }
    for i in 0..count(sizes, 0.06) / 2 {
        w.small(&format!("var/lib/dpkg/info/pkg{i}.list"), 2 << 10)?;
        w.small(&format!("var/lib/dpkg/info/pkg{i}.md5sums"), 2 << 10)?;
    }
    w.big("big/seq.bin", sizes.seq_bytes)?;
    w.big("big/append.bin", sizes.append_bytes)?;
    w.big("big/rand.bin", sizes.rand_bytes)?;
    Ok(())
}

fn updates(w: &mut Writer, sizes: &Sizes) -> Result<()> {
    for i in (0..count(sizes, 0.06)).step_by(10) {
        w.small(&format!("usr/bin/cmd{i}"), 48 << 10)?;
    }
    for i in (0..count(sizes, 0.02)).step_by(5) {
        w.small(
            &format!("etc/conf{}.d/file{}.conf", i / 10, i % 10),
            1 << 10,
        )?;
    }
    for i in (0..count(sizes, 0.08)).step_by(20) {
        w.small(
            &format!("usr/lib/python3/dist-packages/mod{}/f{}.py", i / 20, i % 20),
            8 << 10,
        )?;
    }
    for i in 0..count(sizes, 0.03) {
        w.small(
            &format!("usr/lib/x86_64-linux-gnu/new/lib{i}.so.2"),
            64 << 10,
        )?;
    }
    let docs = count(sizes, 0.12) / 3;
    for j in 0..docs {
        if j % 7 == 3 {
            w.whiteout(&format!("usr/share/doc/pkg{j}"))?;
        } else if j % 5 == 1 {
            w.whiteout(&format!("usr/share/doc/pkg{j}/README.Debian"))?;
        }
    }
    w.opaque_dir("usr/share/locale")?;
    for i in 0..count(sizes, 0.005) {
        w.small(
            &format!("usr/share/locale/l{}/LC_MESSAGES/new{}.mo", i / 8, i % 8),
            4 << 10,
        )?;
    }
    Ok(())
}

fn app(w: &mut Writer, sizes: &Sizes) -> Result<()> {
    let files = count(sizes, 0.30);
    let mut n = 0;
    let mut pkg = 0;
    while n < files {
        let d = format!("app/node_modules/pkg{pkg}");
        w.text(
            &format!("{d}/package.json"),
            &format!("{{\"name\":\"pkg{pkg}\",\"version\":\"1.0.{pkg}\"}}\n"),
        )?;
        w.small(&format!("{d}/index.js"), 4 << 10)?;
        w.small(&format!("{d}/README.md"), 6 << 10)?;
        for k in 0..7 {
            w.small(&format!("{d}/lib/part{k}.js"), 3 << 10)?;
        }
        n += 10;
        if pkg % 5 == 0 {
            for k in 0..3 {
                let nd = format!("{d}/node_modules/dep{k}");
                w.text(&format!("{nd}/package.json"), "{\"name\":\"dep\"}\n")?;
                w.small(&format!("{nd}/index.js"), 2 << 10)?;
                n += 2;
            }
        }
        pkg += 1;
    }
    // A git repository: files committed from inside the layer.
    let repo = w.root.join("app/repo");
    for i in 0..count(sizes, 0.02) {
        w.small(
            &format!("app/repo/src/mod{}/f{}.rs", i / 15, i % 15),
            6 << 10,
        )?;
    }
    git(&repo, &["init", "-q"])?;
    git(&repo, &["add", "-A"])?;
    git(
        &repo,
        &[
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@example.invalid",
            "commit",
            "-qm",
            "init",
        ],
    )?;
    // A small C project for the build-like job.
    let mut objs = String::new();
    for i in 0..sizes.c_files {
        let mut src =
            String::from("#include <stdio.h>\n#include <string.h>\n#include <stdlib.h>\n");
        for f in 0..12 {
            src.push_str(&format!(
                "int f{i}_{f}(int n) {{ int a[64]; memset(a, 0, sizeof a); \
                 for (int k = 0; k < n; k++) a[k % 64] += k * {f} ^ (a[(k + 3) % 64] >> 1); \
                 int s = 0; for (int k = 0; k < 64; k++) s += a[k]; return s; }}\n"
            ));
        }
        w.text(&format!("app/proj/f{i}.c"), &src)?;
        objs.push_str(&format!(" f{i}.o"));
    }
    w.text(
        "app/proj/main.c",
        "#include <stdio.h>\nint main(void) { puts(\"ok\"); return 0; }\n",
    )?;
    w.text(
        "app/proj/Makefile",
        &format!(
            "OBJS = main.o{objs}\nprog: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n%.o: %.c\n\t$(CC) -O1 -c -o $@ $<\n"
        ),
    )?;
    Ok(())
}

fn config(w: &mut Writer, sizes: &Sizes) -> Result<()> {
    for i in (0..count(sizes, 0.02)).step_by(7) {
        w.small(
            &format!("etc/conf{}.d/file{}.conf", i / 10, i % 10),
            1 << 10,
        )?;
    }
    w.whiteout("app/node_modules/pkg1")?;
    w.whiteout("usr/bin/cmd2")?;
    for i in 0..count(sizes, 0.01) {
        w.small(&format!("app/node_modules/pkg0/extra/e{i}.js"), 2 << 10)?;
    }
    Ok(())
}

fn git(repo: &Path, args: &[&str]) -> Result<()> {
    let st = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .status()
        .context("run git")?;
    if !st.success() {
        bail!("git {args:?} in {} failed: {st}", repo.display());
    }
    Ok(())
}

fn untar_archive(root: &Path, archive: &Path, sizes: &Sizes, buf: &[u8]) -> Result<()> {
    let src = root.join("untar-src");
    let mut rng = Rng(77);
    for i in 0..sizes.untar_files {
        let d = src.join(format!("d{}/s{}", i / 1000, (i / 100) % 10));
        if i % 100 == 0 {
            fs::create_dir_all(&d)?;
        }
        let size = rng.below(4096) as usize;
        fs::write(d.join(format!("f{i}")), &buf[..size])?;
    }
    let st = Command::new("tar")
        .arg("cf")
        .arg(archive)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .context("run tar")?;
    if !st.success() {
        bail!("tar of {} failed: {st}", src.display());
    }
    fs::remove_dir_all(&src)?;
    Ok(())
}
