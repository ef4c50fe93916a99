//! Hostile input to the real `rustfuse-snapshotter` over its socket (overlay mode), beyond
//! what conformance.rs e01-e03 and e08 cover (error codes for missing or wrong parents,
//! labels over 4096 bytes on Prepare/Commit/Update, one bad filter, socket mode 0600):
//! - keys and names that look like paths (`../`, `/`, `.`, `..`, a number, `new-1-0`), hold
//!   NUL bytes or newlines, are empty, or are 64 KiB to 1 MiB long: each is a key in the
//!   store only; nothing is created outside the root and `snapshots/` holds numeric ids only;
//!   a key too large for a message is refused cleanly;
//! - labels over the limit on View, a label whose key alone is over it: InvalidArgument;
//! - malformed List filters: InvalidArgument, and a huge regex is refused, not compiled;
//! - raw bytes on the socket (garbage, a truncated HTTP/2 frame, an oversized frame, a gRPC
//!   message shorter than its length prefix) and valid gRPC calls with corrupt protobuf
//!   bodies: the server answers with an error or closes that connection, keeps serving a
//!   client connected before, and nothing changes on disk;
//! - the socket refuses another uid (65534) with EACCES, and the same probe connects once
//!   the mode allows it (so the refusal is the mode's doing); with `--group G` it is 0660
//!   root:G, a process in G connects and one outside it gets EACCES.
//!
//! Needs root; prints `SKIPPED` or fails under `CI=true` without it.

mod common;

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use prost::bytes::{Buf, BufMut};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

const SERVICE: &str = "/containerd.services.snapshots.v1.Snapshots";

/// Every path under `dir` except the snapshotter's root and its log.
fn tree_outside_root(server: &Server) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![server.dir().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p == server.root() || p.ends_with("server.log") {
                continue;
            }
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

/// `snapshots/` holds only numeric snapshot directories, each with `fs` and maybe `work`.
fn assert_only_ids(server: &Server, what: &str) {
    let snaps = server.root().join("snapshots");
    for n in listing(&snaps) {
        assert!(
            n.parse::<u64>().is_ok(),
            "{what}: unexpected {n:?} in snapshots/"
        );
        for e in listing(&snaps.join(&n)) {
            assert!(e == "fs" || e == "work", "{what}: unexpected {n}/{e}");
        }
    }
    let root: Vec<String> = listing(&server.root());
    assert_eq!(root, ["metadata.redb", "snapshots"], "{what}: root holds");
}

fn start() -> Option<(Server, Client)> {
    if !can_run(Mode::Overlay) {
        return None;
    }
    let server = Server::start(Mode::Overlay);
    let c = server.client();
    Some((server, c))
}

#[test]
fn keys_that_look_like_paths_stay_keys() {
    let Some((server, c)) = start() else { return };
    let tag = std::process::id();
    let escape_tmp = format!("/tmp/rustfuse-escape-{tag}");
    let long = "k".repeat(64 * 1024);
    let longer = format!("../{}", "x/".repeat(512 * 1024));
    let keys: Vec<String> = vec![
        format!("../escape-{tag}"),
        format!("../../../../../../..{escape_tmp}"),
        escape_tmp.clone(),
        "a/../../b".into(),
        ".".into(),
        "..".into(),
        "/".into(),
        "1".into(),
        "snapshots/1".into(),
        "new-1-0".into(),
        "rm-1".into(),
        "with\0nul".into(),
        "\0".into(),
        "line\nbreak".into(),
        "ключ ☃".into(),
        long,
        longer,
    ];
    let before = tree_outside_root(&server);
    let names: Vec<String> = keys.iter().map(|k| format!("{k}/committed")).collect();
    for (k, n) in keys.iter().zip(&names) {
        let short: String = k.chars().take(40).collect();
        let m = c
            .prepare(k, "")
            .unwrap_or_else(|e| panic!("prepare {short:?}: {e}"));
        let (_, dir) = first_dir(&m);
        assert!(
            dir.starts_with(server.root().join("snapshots")),
            "{short:?}: {}",
            dir.display()
        );
        let st = c.stat(k).unwrap();
        assert_eq!(&st.name, k);
        std::fs::write(dir.join("f"), short.as_bytes()).unwrap();
        c.commit(n, k).unwrap();
        assert_code(c.stat(k), Code::NotFound, "");
        // The hostile name as a parent, and as a missing parent.
        let child = format!("{k}/child");
        c.prepare(&child, n).unwrap();
        assert_code(c.prepare("x", &child), Code::InvalidArgument, "");
        assert_code(c.prepare("x", &format!("{k}/missing")), Code::NotFound, "");
        let v = c.view(&format!("{k}/view"), n).unwrap();
        let (_, vdir) = first_dir(&v);
        assert_eq!(std::fs::read(vdir.join("f")).unwrap(), short.as_bytes());
        assert_only_ids(&server, &short);
    }
    let listed: BTreeSet<String> = c.list(&[]).unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(listed.len(), keys.len() * 3);
    for n in &names {
        assert!(listed.contains(n));
    }
    for k in &keys {
        c.remove(&format!("{k}/view")).unwrap();
        c.remove(&format!("{k}/child")).unwrap();
    }
    for n in &names {
        c.remove(n).unwrap();
    }
    // Empty keys and names are refused.
    assert_code(c.prepare("", ""), Code::InvalidArgument, "empty");
    assert_code(c.view("", ""), Code::InvalidArgument, "empty");
    c.prepare("a", "").unwrap();
    assert_code(c.commit("", "a"), Code::InvalidArgument, "empty");
    // A key larger than a message may be (4 MiB) is refused before it reaches the store.
    let huge = "h".repeat(5 * 1024 * 1024);
    let r = c.prepare(&huge, "");
    let code = r.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
    assert!(
        matches!(code, Code::ResourceExhausted | Code::OutOfRange),
        "5 MiB key: {:?}",
        r.map_err(|s| (s.code(), s.message().chars().take(200).collect::<String>()))
    );
    c.stat("a").expect("still serving after a 5 MiB key");
    c.cleanup().unwrap();
    assert_eq!(
        listing(&server.root().join("snapshots")),
        [last_id(&c, "a")]
    );
    assert_eq!(
        tree_outside_root(&server),
        before,
        "nothing changed outside the root"
    );
    for p in [
        PathBuf::from(&escape_tmp),
        server.root().join(format!("../escape-{tag}")),
        server.root().join(format!("snapshots/../escape-{tag}")),
        server.root().join("b"),
        server.root().join("snapshots/snapshots"),
    ] {
        assert!(!p.exists(), "{} exists", p.display());
    }
}

/// The id of active snapshot `key`, from its mounts.
fn last_id(c: &Client, key: &str) -> String {
    first_dir(&c.mounts(key).unwrap()).0.to_string()
}

#[test]
fn oversized_labels_are_invalid_argument() {
    let Some((server, c)) = start() else { return };
    c.prepare("a", "").unwrap();
    c.commit("c", "a").unwrap();
    let before = listing(&server.root().join("snapshots"));
    let over = "v".repeat(4096);
    let big_key = "k".repeat(4097);
    let cases: Vec<(&str, R<()>)> = vec![
        (
            "View, value over",
            c.view_l("v1", "c", labels(&[("l", &over)])).map(drop),
        ),
        (
            "Prepare, key over",
            c.prepare_l("p1", "c", labels(&[(&big_key, "")])).map(drop),
        ),
        (
            "View, key over",
            c.view_l("v2", "", labels(&[(&big_key, "v")])).map(drop),
        ),
        ("Prepare, one of many over", {
            let mut l = labels(&[("l", &over)]);
            for i in 0..100 {
                l.insert(format!("ok{i}"), "v".repeat(4000));
            }
            c.prepare_l("p2", "", l).map(drop)
        }),
    ];
    for (what, r) in cases {
        match r {
            Ok(()) => panic!("{what}: accepted"),
            Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}"),
        }
    }
    for k in ["v1", "p1", "v2", "p2"] {
        assert_code(c.stat(k), Code::NotFound, k);
    }
    let mut info = c.stat("c").unwrap();
    info.labels = labels(&[(&big_key, "v")]);
    assert_code(c.update(&info, &[]), Code::InvalidArgument, "");
    assert_eq!(c.stat("c").unwrap().labels, gc_labels());
    assert_eq!(listing(&server.root().join("snapshots")), before);
}

#[test]
fn malformed_filters_are_invalid_argument() {
    let Some((_server, c)) = start() else { return };
    c.prepare("a", "").unwrap();
    // Not errors: a bare field tests presence, a value runs to the next space or comma.
    assert_eq!(c.list(&["kind"]).unwrap().len(), 1);
    assert!(c.list(&["kind==active|name==a"]).unwrap().is_empty());
    let bad = [
        "==active",
        "kind===active",
        "kind==active,",
        ",kind==active",
        "kind==active,,name==a",
        "kind==\"unterminated",
        "labels.\"unterminated==x",
        "name~=[",
        "name~=(",
        "name~=(a{1000}){1000}",
        "kind!",
        "kind==active extra",
        "\0",
        "kind\0==active",
        "labels.==x",
    ];
    for f in bad {
        match c.list(&[f]) {
            Ok(v) => panic!("filter {f:?} accepted: {v:?}"),
            Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "filter {f:?}: {s:?}"),
        }
        // A bad filter among good ones fails the whole call too.
        assert_code(c.list(&["kind==active", f]), Code::InvalidArgument, "");
    }
    let long = format!("name=={}", "x".repeat(1024 * 1024));
    assert!(c.list(&[&long]).unwrap().is_empty());
    let deep = vec!["kind==active"; 10_000];
    assert_eq!(c.list(&deep).unwrap().len(), 1);
}

// ---- raw bytes on the socket ----------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut v = len.to_be_bytes()[1..].to_vec();
    v.push(ty);
    v.push(flags);
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A header block of literal fields (never indexed, no Huffman), names and values under
/// 127 bytes.
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (n, val) in fields {
        v.push(0x10);
        v.push(n.len() as u8);
        v.extend_from_slice(n.as_bytes());
        v.push(val.len() as u8);
        v.extend_from_slice(val.as_bytes());
    }
    v
}

/// A gRPC call on stream 1 whose DATA is `body`, as bytes after the preface.
fn grpc_request(method: &str, body: &[u8]) -> Vec<u8> {
    let path = format!("{SERVICE}/{method}");
    let mut v = PREFACE.to_vec();
    v.extend(frame(SETTINGS, 0, 0, &[]));
    v.extend(frame(
        HEADERS,
        END_HEADERS,
        1,
        &hpack(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", &path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]),
    ));
    v.extend(frame(DATA, END_STREAM, 1, body));
    v
}

/// What the server did with bytes sent on a fresh connection.
#[derive(Debug, Default)]
struct Reply {
    /// Frame types received, in order (when the reply parses as HTTP/2 frames).
    frames: Vec<(u8, u8, u32)>,
    /// The server closed the connection.
    closed: bool,
}

impl Reply {
    fn has(&self, ty: u8, stream: u32) -> bool {
        self.frames.iter().any(|f| f.0 == ty && f.2 == stream)
    }

    /// Stream 1 ended: trailers (HEADERS with END_STREAM) or RST_STREAM.
    fn stream1_answered(&self) -> bool {
        self.frames
            .iter()
            .any(|f| f.2 == 1 && (f.0 == RST_STREAM || (f.0 == HEADERS && f.1 & END_STREAM != 0)))
    }
}

/// Send `bytes` (then half-close if `eof`), read until the server closes, `done` says the
/// reply is complete, or 10 s pass.
fn exchange(socket: &Path, bytes: &[u8], eof: bool, done: impl Fn(&Reply) -> bool) -> Reply {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let _ = s.write_all(bytes);
    if eof {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = Vec::new();
    let mut reply = Reply::default();
    while Instant::now() < deadline {
        let mut chunk = [0u8; 16384];
        match s.read(&mut chunk) {
            Ok(0) => {
                reply.closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                reply.closed = true;
                break;
            }
        }
        reply.frames = parse_frames(&buf);
        if done(&reply) {
            break;
        }
    }
    reply.frames = parse_frames(&buf);
    reply
}

fn parse_frames(mut b: &[u8]) -> Vec<(u8, u8, u32)> {
    let mut out = Vec::new();
    while b.len() >= 9 {
        let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
        let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff;
        out.push((b[3], b[4], stream));
        b = &b[(9 + len).min(b.len())..];
    }
    out
}

/// Raw bytes that pass for `Vec<u8>` through tonic, for bodies no message type encodes.
#[derive(Clone, Copy)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

fn raw_call(c: &Client, method: &str, body: Vec<u8>) -> R<Vec<u8>> {
    let mut grpc = tonic::client::Grpc::new(c.channel.clone());
    let path = PathAndQuery::try_from(format!("{SERVICE}/{method}")).unwrap();
    c.rt.block_on(async move {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        grpc.unary(tonic::Request::new(body), path, Raw).await
    })
    .map(|r| r.into_inner())
}

#[test]
fn malformed_frames_and_bodies_get_an_error_or_a_closed_connection() {
    let Some((server, c)) = start() else { return };
    c.prepare("a", "").unwrap();
    c.commit("c", "a").unwrap();
    let snaps = server.root().join("snapshots");
    let before_disk = listing(&snaps);
    let before_list = c.list(&[]).unwrap();
    let sock = server.socket();
    let mut rng = Rng::from_env("hostile frames");

    // Garbage instead of the HTTP/2 preface: the server hangs up by itself.
    for len in [1, 24, 4096, 256 * 1024] {
        let r = exchange(&sock, &rng.bytes(len), false, |_| false);
        assert!(
            r.closed,
            "{len} garbage bytes: connection left open ({r:?})"
        );
        c.stat("c").expect("serving after garbage");
    }
    // Half an HTTP request line.
    let r = exchange(&sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false, |_| {
        false
    });
    assert!(r.closed, "HTTP/1.1 request: {r:?}");

    // A truncated frame (header says 100 bytes, 10 follow), then EOF: closed.
    let mut b = PREFACE.to_vec();
    b.extend(&frame(SETTINGS, 0, 0, &[0; 100])[..19]);
    let r = exchange(&sock, &b, true, |_| false);
    assert!(r.closed, "truncated frame: {r:?}");

    // A frame larger than the peer allows (16 MiB - 1 > 16 KiB default): GOAWAY, closed.
    let mut b = PREFACE.to_vec();
    b.extend(frame(SETTINGS, 0, 0, &[]));
    b.extend_from_slice(&[0xff, 0xff, 0xff, DATA, 0, 0, 0, 0, 1]);
    let r = exchange(&sock, &b, false, |_| false);
    assert!(r.closed && r.has(GOAWAY, 0), "oversized frame: {r:?}");

    // A HEADERS frame on stream 0 is a connection error: GOAWAY.
    let mut b = PREFACE.to_vec();
    b.extend(frame(SETTINGS, 0, 0, &[]));
    b.extend(frame(
        HEADERS,
        END_HEADERS,
        0,
        &hpack(&[(":method", "POST")]),
    ));
    let r = exchange(&sock, &b, false, |_| false);
    assert!(r.closed && r.has(GOAWAY, 0), "HEADERS on stream 0: {r:?}");

    // A valid request whose gRPC message is shorter than its length prefix says.
    let mut body = vec![0, 0, 0, 0x03, 0xe8];
    body.extend_from_slice(&[0x12, 0x01, b'k']);
    let r = exchange(
        &sock,
        &grpc_request("Prepare", &body),
        false,
        Reply::stream1_answered,
    );
    assert!(
        r.stream1_answered(),
        "short gRPC message: no answer on stream 1: {r:?}"
    );
    // A compressed-flag message without a grpc-encoding header.
    let r = exchange(
        &sock,
        &grpc_request("Prepare", &[1, 0, 0, 0, 3, 0x12, 0x01, b'k']),
        false,
        Reply::stream1_answered,
    );
    assert!(
        r.stream1_answered(),
        "compressed flag: no answer on stream 1: {r:?}"
    );
    // An unknown method.
    let r = exchange(
        &sock,
        &grpc_request("Explode", &[0, 0, 0, 0, 0]),
        false,
        Reply::stream1_answered,
    );
    assert!(r.stream1_answered(), "unknown method: {r:?}");

    // Corrupt protobuf bodies through a proper gRPC call: a clean error each.
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("truncated varint", vec![0xff, 0xff, 0xff]),
        ("invalid wire type", vec![0x17, 0x01]),
        ("field 0", vec![0x00, 0x01]),
        ("key not UTF-8", vec![0x12, 0x02, 0xff, 0xfe]),
        (
            "key length past the end",
            vec![0x12, 0x64, b'k', b'e', b'y'],
        ),
        ("key as a varint", vec![0x10, 0x05]),
        ("label entry garbage", vec![0x22, 0x03, 0x0a, 0x05, b'x']),
        ("random", rng.bytes(512)),
    ];
    for method in ["Prepare", "View", "Commit", "Remove", "Update", "List"] {
        for (what, b) in &bodies {
            // Field 4 is the labels map only in these; elsewhere it is an unknown field,
            // which protobuf skips.
            if *what == "label entry garbage" && !["Prepare", "View", "Commit"].contains(&method) {
                continue;
            }
            let r = raw_call(&c, method, b.clone());
            match r {
                Ok(v) if *what == "random" => {
                    // Random bytes can decode as a valid message; then it is an ordinary
                    // call with odd fields, answered in kind.
                    let _ = v;
                }
                Ok(v) => panic!("{method} with {what}: accepted, answer {v:?}"),
                Err(s) if *what == "random" => {
                    assert_ne!(s.code(), Code::Unavailable, "{method} random: {s:?}")
                }
                Err(s) => assert_eq!(s.code(), Code::Internal, "{method} with {what}: {s:?}"),
            }
        }
    }
    // The client connected before all this is still served, so is a new one, and nothing
    // changed.
    c.stat("c").expect("the first client is still served");
    let c2 = server.client();
    assert_eq!(c2.list(&[]).unwrap(), before_list);
    assert_eq!(listing(&snaps), before_disk);
    assert_only_ids(&server, "after malformed input");
}

// ---- who may connect ------------------------------------------------------------------

const NOBODY: u32 = 65534;

/// Connect to `socket` as uid `NOBODY` with group `gid` (no supplementary groups) in a
/// child process: Ok, or the errno the connect failed with.
fn connect_as_nobody(socket: &Path, gid: u32) -> std::io::Result<()> {
    let socket = socket.to_path_buf();
    let mut cmd = std::process::Command::new("/bin/true");
    cmd.uid(NOBODY).gid(gid);
    // SAFETY: the closure runs in the forked child before exec, after std has dropped to
    // NOBODY; it only calls connect(2) (through UnixStream, which builds the address on the
    // stack) and returns its error, which spawn() hands back to the parent. No locks are
    // taken and nothing is allocated.
    unsafe {
        cmd.pre_exec(move || UnixStream::connect(&socket).map(drop));
    }
    let mut child = cmd.spawn()?;
    child.wait()?;
    Ok(())
}

fn assert_eacces(r: std::io::Result<()>, what: &str) {
    match r {
        Ok(()) => panic!("{what}: connected"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::ACCESS.raw_os_error()),
            "{what}: {e}"
        ),
    }
}

/// The socket's mode, owner and group.
fn socket_stat(sock: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(sock).unwrap();
    (md.mode() & 0o7777, md.uid(), md.gid())
}

#[test]
fn socket_refuses_other_users() {
    let Some((server, c)) = start() else { return };
    let sock = server.socket();
    assert_eq!(
        socket_stat(&sock),
        (0o600, 0, 0),
        "socket mode, owner, group"
    );
    // Let NOBODY reach the socket's directory, so only the socket's own mode decides.
    std::fs::set_permissions(server.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    assert_eacces(connect_as_nobody(&sock, NOBODY), "uid 65534, mode 0600");
    // The probe does connect when the mode allows it.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let r = connect_as_nobody(&sock, NOBODY);
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    r.expect("with mode 0666 uid 65534 connects (the probe works)");
    c.prepare("still", "").expect("root is still served");
}

#[test]
fn socket_group_admits_only_that_group() {
    if !can_run(Mode::Overlay) {
        return;
    }
    const GROUP: u32 = 4242;
    let server = Server::start_with(Mode::Overlay, &["--group", &GROUP.to_string()]);
    let sock = server.socket();
    assert_eq!(
        socket_stat(&sock),
        (0o660, 0, GROUP),
        "socket mode, owner, group"
    );
    std::fs::set_permissions(server.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    connect_as_nobody(&sock, GROUP).expect("a member of --group connects");
    assert_eacces(
        connect_as_nobody(&sock, NOBODY),
        "uid 65534 outside the group",
    );
    server.client().prepare("a", "").unwrap();
}
