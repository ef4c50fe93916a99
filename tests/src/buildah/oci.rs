//! Reads an image that `buildah push ... oci:DIR` wrote (an OCI layout; gzip layers are read
//! through `gzip -dc`): its layers in order, each as the list of its tar entries (type, mode, owner, size,
//! mtime, link target, xattrs, content), and the image's diff IDs. Enough to compare two builds
//! of one Containerfile layer by layer, and to say what differs. No JSON or tar crate: the
//! manifest and config are read for their digests only, and the tar reader knows ustar, PAX
//! (`x` records: long names, xattrs) and GNU long names, which is what Go's archive/tar writes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// One tar entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// As in the archive, `./` and a trailing `/` removed, with a leading `/`.
    pub path: String,
    /// The ustar type flag: `0` file, `1` hard link, `2` symlink, `3`/`4` devices, `5` dir.
    pub kind: char,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub uname: String,
    pub gname: String,
    pub size: u64,
    pub mtime: u64,
    /// Hard link or symlink target (hard link: as a path of the archive, with a leading `/`).
    pub link: String,
    pub dev: (u64, u64),
    /// PAX `SCHILY.xattr.*` records.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// FNV-1a 64 of the content (regular files), for listings; the content itself below.
    pub content_hash: u64,
    pub content: Vec<u8>,
}

impl fmt::Display for TarEntry {
    /// One `tar -tv`-like line: type, mode, owner, size, mtime, content hash, xattrs, name, link.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04o} {}/{} ({}/{}) {} t={} h={:016x}",
            self.kind,
            self.mode,
            self.uid,
            self.gid,
            self.uname,
            self.gname,
            self.size,
            self.mtime,
            self.content_hash
        )?;
        if self.dev != (0, 0) && matches!(self.kind, '3' | '4') {
            write!(f, " dev={},{}", self.dev.0, self.dev.1)?;
        }
        for (k, v) in &self.xattrs {
            write!(
                f,
                " xattr:{k}={}",
                String::from_utf8_lossy(v).escape_default()
            )?;
        }
        write!(f, " {}", self.path)?;
        if !self.link.is_empty() {
            write!(f, " -> {}", self.link)?;
        }
        Ok(())
    }
}

/// One layer: its blob digest (of the compressed blob, if it is) and entries in archive
/// order.
#[derive(Debug, Clone)]
pub struct Layer {
    pub digest: String,
    pub entries: Vec<TarEntry>,
}

/// An image read from an OCI layout.
#[derive(Debug, Clone)]
pub struct Image {
    /// `rootfs.diff_ids` of the config, in order.
    pub diff_ids: Vec<String>,
    pub layers: Vec<Layer>,
}

impl Image {
    /// Every layer as `tar -tv`-like lines, headed by `LAYER i DIGEST`.
    pub fn listing(&self) -> String {
        let mut s = format!("DIFF_IDS {}\n", self.diff_ids.join(" "));
        for (i, l) in self.layers.iter().enumerate() {
            s.push_str(&format!("LAYER {i} {}\n", l.digest));
            for e in &l.entries {
                s.push_str(&format!("  {e}\n"));
            }
        }
        s
    }
}

/// `sha256:<64 hex>` strings of `text`, in order.
fn digests(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("sha256:") {
        let hex: String = rest[i + 7..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        if hex.len() == 64 {
            out.push(format!("sha256:{hex}"));
        }
        rest = &rest[i + 7 + hex.len()..];
    }
    out
}

fn blob(layout: &Path, digest: &str) -> Result<Vec<u8>, String> {
    let p = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
}

/// The text of the JSON array that follows `"key":` in `json` (brackets excluded).
fn array_after<'a>(json: &'a str, key: &str) -> Result<&'a str, String> {
    let k = format!("\"{key}\"");
    let at = json.find(&k).ok_or_else(|| format!("no {k} in {json}"))?;
    let rest = &json[at + k.len()..];
    let open = rest
        .find('[')
        .ok_or_else(|| format!("no array after {k}"))?;
    let close = rest[open..]
        .find(']')
        .ok_or_else(|| format!("unterminated array after {k}"))?;
    Ok(&rest[open + 1..open + close])
}

/// Reads the one image of the OCI layout `layout` (its index must name one manifest).
pub fn read_layout(layout: &Path) -> Result<Image, String> {
    let index = std::fs::read_to_string(layout.join("index.json"))
        .map_err(|e| format!("{}/index.json: {e}", layout.display()))?;
    let manifests = digests(array_after(&index, "manifests")?);
    let [manifest] = manifests.as_slice() else {
        return Err(format!("index.json names {manifests:?}, want one manifest"));
    };
    let manifest = String::from_utf8(blob(layout, manifest)?).map_err(|e| e.to_string())?;
    let config_at = manifest
        .find("\"config\"")
        .ok_or_else(|| format!("no config in the manifest {manifest}"))?;
    let config = digests(&manifest[config_at..])
        .into_iter()
        .next()
        .ok_or_else(|| format!("no config digest in {manifest}"))?;
    let layer_digests = digests(array_after(&manifest, "layers")?);
    let config = String::from_utf8(blob(layout, &config)?).map_err(|e| e.to_string())?;
    let diff_ids = digests(array_after(&config, "diff_ids")?);
    let mut layers = Vec::new();
    for d in layer_digests {
        let entries = read_tar(&gunzip(blob(layout, &d)?)?)
            .map_err(|e| format!("layer {d} of {}: {e}", layout.display()))?;
        layers.push(Layer { digest: d, entries });
    }
    Ok(Image { diff_ids, layers })
}

/// `data`, or its `gzip -dc` where it starts with gzip's magic bytes.
fn gunzip(data: Vec<u8>) -> Result<Vec<u8>, String> {
    if !data.starts_with(&[0x1f, 0x8b]) {
        return Ok(data);
    }
    let mut child = std::process::Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("gzip -dc: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Fed from a thread: gzip writes while it reads.
    let feeder = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("gzip -dc: {e}"))?;
    feeder
        .join()
        .expect("feeder thread")
        .map_err(|e| format!("gzip -dc stdin: {e}"))?;
    if !out.status.success() {
        return Err(format!("gzip -dc failed: {}", out.status));
    }
    Ok(out.stdout)
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A NUL-terminated header string field.
fn field_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A numeric header field: octal (spaces and NULs around it), or base-256 (GNU, high bit set).
fn field_num(b: &[u8]) -> Result<u64, String> {
    if b.first().is_some_and(|c| c & 0x80 != 0) {
        return Ok(b[1..]
            .iter()
            .fold(u64::from(b[0] & 0x7f), |n, &c| (n << 8) | u64::from(c)));
    }
    let s = field_str(b);
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|e| format!("numeric field {s:?}: {e}"))
}

fn clean_path(p: &str) -> String {
    let p = p.trim_start_matches("./").trim_start_matches('/');
    format!("/{}", p.trim_end_matches('/'))
}

/// PAX records `LEN key=value\n` of an `x` header's data.
fn pax_records(mut data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !data.is_empty() && data[0] != 0 {
        let sp = data
            .iter()
            .position(|&c| c == b' ')
            .ok_or("PAX record without a length")?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record length")?;
        if len > data.len() || len <= sp + 1 {
            return Err("PAX record length out of range".into());
        }
        let rec = &data[sp + 1..len - 1]; // without the trailing newline
        let eq = rec
            .iter()
            .position(|&c| c == b'=')
            .ok_or("PAX record without =")?;
        out.push((
            String::from_utf8_lossy(&rec[..eq]).into_owned(),
            rec[eq + 1..].to_vec(),
        ));
        data = &data[len..];
    }
    Ok(out)
}

/// The entries of an uncompressed tar archive, in order.
pub fn read_tar(data: &[u8]) -> Result<Vec<TarEntry>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    while at + 512 <= data.len() {
        let h = &data[at..at + 512];
        if h.iter().all(|&c| c == 0) {
            break;
        }
        let size = field_num(&h[124..136])?;
        let body_at = at + 512;
        let body_end = body_at
            .checked_add(usize::try_from(size).map_err(|e| e.to_string())?)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| format!("entry at {at}: size {size} past the end"))?;
        let body = &data[body_at..body_end];
        at = body_at + (size as usize).div_ceil(512) * 512;
        let kind = h[156] as char;
        match kind {
            'x' => {
                pax = pax_records(body)?;
                continue;
            }
            'g' => continue,
            'L' => {
                long_name = Some(field_str(body));
                continue;
            }
            'K' => {
                long_link = Some(field_str(body));
                continue;
            }
            _ => {}
        }
        let mut name = field_str(&h[0..100]);
        let prefix = field_str(&h[345..500]);
        if &h[257..263] == b"ustar\0" && !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
        let mut link = field_str(&h[157..257]);
        let mut size_v = size;
        let mut mtime = field_num(&h[136..148])?;
        let mut uid = field_num(&h[108..116])?;
        let mut gid = field_num(&h[116..124])?;
        let mut uname = field_str(&h[265..297]);
        let mut gname = field_str(&h[297..329]);
        let mut xattrs = BTreeMap::new();
        if let Some(n) = long_name.take() {
            name = n;
        }
        if let Some(l) = long_link.take() {
            link = l;
        }
        for (k, v) in pax.drain(..) {
            let s = || String::from_utf8_lossy(&v).into_owned();
            let num = |what: &str| -> Result<u64, String> {
                let t = s();
                t.split('.')
                    .next()
                    .unwrap_or("")
                    .parse()
                    .map_err(|e| format!("PAX {what} {t:?}: {e}"))
            };
            match k.as_str() {
                "path" => name = s(),
                "linkpath" => link = s(),
                "size" => size_v = num("size")?,
                "mtime" => mtime = num("mtime")?,
                "uid" => uid = num("uid")?,
                "gid" => gid = num("gid")?,
                "uname" => uname = s(),
                "gname" => gname = s(),
                _ => {
                    if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                        xattrs.insert(x.to_string(), v);
                    }
                }
            }
        }
        let content = if kind == '0' || kind == '\0' {
            body.to_vec()
        } else {
            Vec::new()
        };
        out.push(TarEntry {
            path: clean_path(&name),
            kind: if kind == '\0' { '0' } else { kind },
            mode: field_num(&h[100..108])? as u32 & 0o7777,
            uid,
            gid,
            uname,
            gname,
            size: size_v,
            mtime,
            link: if kind == '1' { clean_path(&link) } else { link },
            dev: (field_num(&h[329..337])?, field_num(&h[337..345])?),
            xattrs,
            content_hash: fnv1a(&content),
            content,
        });
    }
    Ok(out)
}

/// What differs between image `a` (named `an`) and `b` (`bn`): diff IDs, layer count, and per
/// layer the entries only in one or different (all fields, content included), and a different
/// order. Empty when they are the same.
pub fn compare(a: &Image, an: &str, b: &Image, bn: &str) -> Vec<String> {
    let mut out = Vec::new();
    if a.diff_ids != b.diff_ids {
        out.push(format!(
            "diff IDs differ:\n  {an}: {:?}\n  {bn}: {:?}",
            a.diff_ids, b.diff_ids
        ));
    }
    if a.layers.len() != b.layers.len() {
        out.push(format!(
            "{an} has {} layers, {bn} {}",
            a.layers.len(),
            b.layers.len()
        ));
    }
    for (i, (la, lb)) in a.layers.iter().zip(&b.layers).enumerate() {
        let ma: BTreeMap<&str, &TarEntry> =
            la.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        let mb: BTreeMap<&str, &TarEntry> =
            lb.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        for (p, ea) in &ma {
            match mb.get(p) {
                None => out.push(format!("layer {i}: only in {an}: {ea}")),
                Some(eb) if eb != ea => out.push(format!(
                    "layer {i}: {p} differs:\n  {an}: {ea}\n  {bn}: {eb}"
                )),
                Some(_) => {}
            }
        }
        for (p, eb) in &mb {
            if !ma.contains_key(p) {
                out.push(format!("layer {i}: only in {bn}: {eb}"));
            }
        }
        let order = |l: &Layer| l.entries.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
        if ma.len() == la.entries.len() && ma.keys().eq(mb.keys()) && order(la) != order(lb) {
            out.push(format!("layer {i}: the same entries in another order"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, kind: u8, size: usize, link: &str) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0001750");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h
    }

    fn pad(v: &mut Vec<u8>) {
        while v.len() % 512 != 0 {
            v.push(0);
        }
    }

    #[test]
    fn reads_files_links_and_pax_xattrs() {
        let mut t = header("./a/f", b'0', 3, "");
        t.extend_from_slice(b"hi\n");
        pad(&mut t);
        t.extend(header("a/g", b'1', 0, "a/f"));
        let body = " SCHILY.xattr.user.k=value\n";
        let rec = format!("{}{body}", body.len() + 2); // a 2-digit length
        let mut pax = header("PaxHeaders/x", b'x', rec.len(), "");
        pax.extend_from_slice(rec.as_bytes());
        pad(&mut pax);
        t.extend(pax);
        t.extend(header("a/.wh.gone", b'0', 0, ""));
        t.extend(vec![0u8; 1024]);
        let e = read_tar(&t).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(
            (e[0].path.as_str(), e[0].content.as_slice()),
            ("/a/f", &b"hi\n"[..])
        );
        assert_eq!((e[0].gid, e[0].mode), (0o1750, 0o644));
        assert_eq!((e[1].kind, e[1].link.as_str()), ('1', "/a/f"));
        assert_eq!(e[2].path, "/a/.wh.gone");
        assert_eq!(e[2].xattrs["user.k"], b"value");
    }

    #[test]
    fn compare_names_what_differs() {
        let mut t = header("f", b'0', 0, "");
        t.extend(vec![0u8; 1024]);
        let layer = |entries| Layer {
            digest: "sha256:x".into(),
            entries,
        };
        let a = Image {
            diff_ids: vec!["sha256:a".into()],
            layers: vec![layer(read_tar(&t).unwrap())],
        };
        assert!(compare(&a, "a", &a.clone(), "b").is_empty());
        let mut b = a.clone();
        b.diff_ids = vec!["sha256:b".into()];
        b.layers[0].entries[0].mode = 0o600;
        let d = compare(&a, "a", &b, "b");
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("diff IDs differ"), "{d:?}");
        assert!(d[1].starts_with("layer 0: /f differs"), "{d:?}");
    }

    #[test]
    fn finds_digests_in_order() {
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let j = format!(r#"{{"rootfs":{{"diff_ids":["sha256:{a}","sha256:{b}"]}}}}"#);
        assert_eq!(
            digests(array_after(&j, "diff_ids").unwrap()),
            [format!("sha256:{a}"), format!("sha256:{b}")]
        );
    }
}
