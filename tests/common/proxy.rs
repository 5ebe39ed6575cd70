//! A fault-injecting HTTP/1.1 reverse proxy and a small origin server, for
//! the tests of remote sources. std only, one thread per connection.
//!
//! [`Origin`] serves in-memory objects with what snapmount's HTTP client
//! needs: `HEAD`, `Range: bytes=a-b` (206 + `Content-Range`, 416 past the
//! end), `Accept-Ranges: bytes`, a strong `ETag` that changes whenever an
//! object is replaced, and `If-Match` (412 on a mismatch).
//!
//! [`Proxy`] sits in front of any origin (`host:port`) and forwards requests
//! on keep-alive connections (several requests per connection, `HEAD` with a
//! `Content-Length` and no body), while a test switches what it does at
//! runtime, from any thread: delay responses (whole, or paced per body
//! chunk), cut bodies short and close, answer 503 with `Retry-After: 1`, an
//! S3 `SlowDown`, 429 or any status, close without answering, or stall (read
//! the request, never answer) — for the next K requests ([`Proxy::next`]) or
//! for every request ([`Proxy::always`]). [`Proxy::down`] closes the listening
//! socket and every live connection (connections are refused), [`Proxy::up`]
//! listens again on the same port. Every request is recorded ([`Seen`]) with
//! its method, path, `Range`, `If-Match` and the fault it met.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking connection thread must not wedge the test that owns the server.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// HTTP/1.1 message heads and bodies
// ---------------------------------------------------------------------------

/// The head of a request or a response: the start line and the header fields.
#[derive(Clone, Debug)]
pub struct Head {
    pub start: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    fn word(&self, i: usize) -> &str {
        self.start.split_whitespace().nth(i).unwrap_or("")
    }

    /// Request method.
    pub fn method(&self) -> &str {
        self.word(0)
    }

    /// Request target.
    pub fn target(&self) -> &str {
        self.word(1)
    }

    /// Response status code (0 when unparsable).
    pub fn status(&self) -> u16 {
        self.word(1).parse().unwrap_or(0)
    }

    /// Whether the sender of this request keeps the connection open afterwards.
    fn request_keeps_alive(&self) -> bool {
        if self.has_token("connection", "close") {
            return false;
        }
        self.word(2) != "HTTP/1.0" || self.has_token("connection", "keep-alive")
    }

    fn response_keeps_alive(&self) -> bool {
        if self.has_token("connection", "close") {
            return false;
        }
        self.word(0) != "HTTP/1.0" || self.has_token("connection", "keep-alive")
    }

    fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.trim().parse().ok())
    }

    fn chunked(&self) -> bool {
        self.has_token("transfer-encoding", "chunked")
    }

    fn bytes(&self) -> Vec<u8> {
        let mut s = String::with_capacity(256);
        s.push_str(&self.start);
        s.push_str("\r\n");
        for (k, v) in &self.headers {
            s.push_str(k);
            s.push_str(": ");
            s.push_str(v);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s.into_bytes()
    }
}

const MAX_HEAD: usize = 64 * 1024;

/// Reads one message head. `Ok(None)`: the peer closed before sending a byte.
pub fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut lines: Vec<String> = Vec::new();
    let mut total = 0;
    loop {
        let mut raw = Vec::new();
        let n = r.by_ref().take((MAX_HEAD + 2) as u64).read_until(b'\n', &mut raw)?;
        if n == 0 {
            if lines.is_empty() && total == 0 {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a message head"));
        }
        total += n;
        if total > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "message head too long"));
        }
        let line = String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if lines.is_empty() {
                continue; // RFC 9112 2.2: ignore empty lines before a request line
            }
            break;
        }
        lines.push(line);
    }
    let start = lines.remove(0);
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad header line {l:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some(Head { start, headers }))
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

fn request_framing(req: &Head) -> Framing {
    if req.chunked() {
        Framing::Chunked
    } else {
        match req.content_length() {
            Some(n) if n > 0 => Framing::Length(n),
            _ => Framing::Empty,
        }
    }
}

fn response_framing(method: &str, resp: &Head) -> Framing {
    let code = resp.status();
    if method.eq_ignore_ascii_case("HEAD") || (100..200).contains(&code) || code == 204 || code == 304 {
        Framing::Empty
    } else if resp.chunked() {
        Framing::Chunked
    } else {
        match resp.content_length() {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    }
}

/// Where a relayed body goes: a writer that can pace its writes and stop
/// (with an error) after a number of bytes.
struct Sink<'a, W: Write> {
    out: &'a mut W,
    sent: u64,
    cut: Option<u64>,
    pace: Option<(usize, Duration)>,
}

#[derive(Debug)]
struct CutShort;

impl std::fmt::Display for CutShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("body cut short by the proxy")
    }
}

impl std::error::Error for CutShort {}

impl<W: Write> Sink<'_, W> {
    fn put(&mut self, mut data: &[u8]) -> io::Result<()> {
        if let Some(limit) = self.cut {
            let room = limit.saturating_sub(self.sent);
            if (data.len() as u64) > room {
                let keep = room as usize;
                self.put_paced(&data[..keep])?;
                self.out.flush()?;
                return Err(io::Error::other(CutShort));
            }
        }
        while !data.is_empty() {
            let n = data.len().min(1 << 20);
            self.put_paced(&data[..n])?;
            data = &data[n..];
        }
        Ok(())
    }

    fn put_paced(&mut self, data: &[u8]) -> io::Result<()> {
        match self.pace {
            Some((chunk, delay)) if chunk > 0 => {
                for piece in data.chunks(chunk) {
                    self.out.write_all(piece)?;
                    self.out.flush()?;
                    self.sent += piece.len() as u64;
                    thread::sleep(delay);
                }
            }
            _ => {
                self.out.write_all(data)?;
                self.sent += data.len() as u64;
            }
        }
        Ok(())
    }
}

fn copy_exact<R: Read, W: Write>(src: &mut R, sink: &mut Sink<'_, W>, mut n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let want = n.min(buf.len() as u64) as usize;
        let got = src.read(&mut buf[..want])?;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed inside a body"));
        }
        sink.put(&buf[..got])?;
        n -= got as u64;
    }
    Ok(())
}

/// Relays one body as it is on the wire (chunk framing included).
fn relay_body<R: BufRead, W: Write>(framing: Framing, src: &mut R, sink: &mut Sink<'_, W>) -> io::Result<()> {
    match framing {
        Framing::Empty => Ok(()),
        Framing::Length(n) => copy_exact(src, sink, n),
        Framing::UntilClose => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let got = src.read(&mut buf)?;
                if got == 0 {
                    return Ok(());
                }
                sink.put(&buf[..got])?;
            }
        }
        Framing::Chunked => loop {
            let mut line = Vec::new();
            src.read_until(b'\n', &mut line)?;
            if line.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed inside a chunked body"));
            }
            sink.put(&line)?;
            let text = String::from_utf8_lossy(&line);
            let hex = text.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(hex, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {hex:?}")))?;
            if size == 0 {
                // Trailer fields, then an empty line.
                loop {
                    let mut t = Vec::new();
                    src.read_until(b'\n', &mut t)?;
                    if t.is_empty() {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed inside a trailer"));
                    }
                    sink.put(&t)?;
                    if t == b"\r\n" || t == b"\n" {
                        return Ok(());
                    }
                }
            }
            copy_exact(src, sink, size + 2)?; // data + CRLF
        },
    }
}

/// Reads a request body whole (requests to these servers are small).
fn read_request_body<R: BufRead>(req: &Head, src: &mut R) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let framing = request_framing(req);
    if framing != Framing::Empty {
        let mut sink = Sink { out: &mut body, sent: 0, cut: None, pace: None };
        relay_body(framing, src, &mut sink)?;
    }
    Ok(body)
}

/// An HTTP date (RFC 9110 IMF-fixdate).
pub fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][month as usize - 1];
    format!("{weekday}, {day:02} {mon} {year} {:02}:{:02}:{:02} GMT", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Writes a complete small response (`body` left out for HEAD).
fn write_simple<W: Write>(
    out: &mut W,
    method: &str,
    status: &str,
    extra: &[(&str, String)],
    body: &[u8],
) -> io::Result<()> {
    let mut head = Head { start: format!("HTTP/1.1 {status}"), headers: Vec::new() };
    head.headers.push(("Date".into(), http_date(SystemTime::now())));
    for (k, v) in extra {
        head.headers.push((k.to_string(), v.clone()));
    }
    head.headers.push(("Content-Length".into(), body.len().to_string()));
    out.write_all(&head.bytes())?;
    if !method.eq_ignore_ascii_case("HEAD") {
        out.write_all(body)?;
    }
    out.flush()
}

// ---------------------------------------------------------------------------
// A listening socket that can be closed and reopened on the same port
// ---------------------------------------------------------------------------

type Handler = Arc<dyn Fn(u64, TcpStream) + Send + Sync>;

struct Acceptor {
    addr: SocketAddr,
    slot: Arc<Mutex<Option<TcpListener>>>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    fn start(handler: Handler) -> Acceptor {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let slot = Arc::new(Mutex::new(Some(listener)));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::new(Mutex::new(HashMap::new()));
        let accepted = Arc::new(AtomicU64::new(0));
        let thread = {
            let (slot, stop, conns, accepted) = (slot.clone(), stop.clone(), conns.clone(), accepted.clone());
            thread::Builder::new()
                .name(format!("accept-{}", addr.port()))
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        // The slot stays locked while a connection is accepted and
                        // registered, so that `close_listener` + `close_connections`
                        // cannot miss one.
                        let guard = lock(&slot);
                        let Some(l) = guard.as_ref() else {
                            drop(guard);
                            thread::sleep(Duration::from_millis(5));
                            continue;
                        };
                        match l.accept() {
                            Ok((s, _)) => {
                                let id = accepted.fetch_add(1, Ordering::SeqCst) + 1;
                                let _ = s.set_nonblocking(false);
                                let _ = s.set_nodelay(true);
                                if let Ok(c) = s.try_clone() {
                                    lock(&conns).insert(id, c);
                                }
                                drop(guard);
                                let (handler, conns) = (handler.clone(), conns.clone());
                                let spawned = thread::Builder::new().name(format!("conn-{id}")).spawn(move || {
                                    handler(id, s);
                                    if let Some(c) = lock(&conns).remove(&id) {
                                        let _ = c.shutdown(Shutdown::Both);
                                    }
                                });
                                if spawned.is_err() {
                                    eprintln!("test HTTP server: cannot start a connection thread");
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                drop(guard);
                                thread::sleep(Duration::from_millis(5));
                            }
                            Err(_) => {
                                drop(guard);
                                thread::sleep(Duration::from_millis(5));
                            }
                        }
                    }
                })
                .unwrap()
        };
        Acceptor { addr, slot, stop, conns, accepted, thread: Some(thread) }
    }

    fn close_listener(&self) {
        lock(&self.slot).take();
    }

    fn reopen_listener(&self) {
        let mut slot = lock(&self.slot);
        if slot.is_some() {
            return;
        }
        let start = Instant::now();
        let l = loop {
            // std sets SO_REUSEADDR, so connections in TIME_WAIT do not block the port.
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    eprintln!("test HTTP server: rebinding {} failed ({e}), retrying", self.addr);
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        l.set_nonblocking(true).unwrap();
        *slot = Some(l);
    }

    fn close_connections(&self) {
        for (_, c) in lock(&self.conns).drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn live_connections(&self) -> usize {
        lock(&self.conns).len()
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.close_listener();
        self.close_connections();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Origin: a small range-capable HTTP server
// ---------------------------------------------------------------------------

static ETAG_GENERATION: AtomicU64 = AtomicU64::new(1);

#[derive(Clone)]
struct Object {
    body: Arc<Vec<u8>>,
    etag: String,
    modified: SystemTime,
}

/// A request as the origin saw it.
#[derive(Clone, Debug)]
pub struct OriginSeen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub if_match: Option<String>,
    pub status: u16,
}

#[derive(Default)]
struct OriginState {
    objects: Mutex<HashMap<String, Object>>,
    ignore_range: AtomicBool,
    seen: Mutex<Vec<OriginSeen>>,
}

/// A threaded HTTP/1.1 origin on 127.0.0.1 serving in-memory objects by path.
pub struct Origin {
    state: Arc<OriginState>,
    acceptor: Acceptor,
}

/// A parsed single `Range: bytes=...` against an object of `len` bytes.
enum RangeAsk {
    /// No usable Range header: the whole object, 200.
    Whole,
    /// Inclusive first and last byte.
    Part(u64, u64),
    Unsatisfiable,
}

fn parse_range(value: Option<&str>, len: u64) -> RangeAsk {
    let Some(v) = value else { return RangeAsk::Whole };
    let Some(spec) = v.trim().strip_prefix("bytes=") else { return RangeAsk::Whole };
    if spec.contains(',') {
        return RangeAsk::Whole; // multi-range: RFC 9110 lets a server ignore Range
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeAsk::Whole };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last N bytes.
        let Ok(n) = b.parse::<u64>() else { return RangeAsk::Whole };
        if n == 0 || len == 0 {
            return RangeAsk::Unsatisfiable;
        }
        return RangeAsk::Part(len - n.min(len), len - 1);
    }
    let Ok(first) = a.parse::<u64>() else { return RangeAsk::Whole };
    let last = if b.is_empty() {
        u64::MAX
    } else {
        match b.parse::<u64>() {
            Ok(x) if x >= first => x,
            _ => return RangeAsk::Whole,
        }
    };
    if first >= len {
        return RangeAsk::Unsatisfiable;
    }
    RangeAsk::Part(first, last.min(len - 1))
}

fn if_match_ok(value: &str, etag: &str) -> bool {
    value.split(',').map(str::trim).any(|t| t == "*" || t == etag)
}

impl Origin {
    pub fn start() -> Origin {
        let state = Arc::new(OriginState::default());
        let st = state.clone();
        let acceptor = Acceptor::start(Arc::new(move |_id, s| serve_origin(&st, s)));
        Origin { state, acceptor }
    }

    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// Serves `body` at `path` (e.g. "/img.qcow2"), replacing what was there;
    /// returns the new ETag (quoted, as on the wire).
    pub fn put(&self, path: &str, body: Vec<u8>) -> String {
        let generation = ETAG_GENERATION.fetch_add(1, Ordering::SeqCst);
        let etag = format!("\"sm{generation:x}-{:x}\"", body.len());
        let obj = Object { body: Arc::new(body), etag: etag.clone(), modified: SystemTime::now() };
        lock(&self.state.objects).insert(path.to_string(), obj);
        etag
    }

    /// Serves the bytes of `file` at `path`; returns the new ETag.
    pub fn put_file(&self, path: &str, file: &Path) -> String {
        let body = std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        self.put(path, body)
    }

    pub fn remove(&self, path: &str) {
        lock(&self.state.objects).remove(path);
    }

    /// The ETag now served at `path`.
    pub fn etag(&self, path: &str) -> Option<String> {
        lock(&self.state.objects).get(path).map(|o| o.etag.clone())
    }

    /// Length of the object now served at `path`.
    pub fn len(&self, path: &str) -> Option<u64> {
        lock(&self.state.objects).get(path).map(|o| o.body.len() as u64)
    }

    /// When set, answer every GET with 200 and the whole object, no
    /// `Content-Range` and no `Accept-Ranges` (a server without range support).
    pub fn set_ignore_range(&self, on: bool) {
        self.state.ignore_range.store(on, Ordering::SeqCst);
    }

    /// Every request the origin answered, in order.
    pub fn requests(&self) -> Vec<OriginSeen> {
        lock(&self.state.seen).clone()
    }

    /// Closes every open connection (the listener stays).
    pub fn close_connections(&self) {
        self.acceptor.close_connections();
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.acceptor.accepted.load(Ordering::SeqCst)
    }
}

/// Path of a request target (origin-form or absolute-form), query removed.
fn target_path(target: &str) -> String {
    let t = match target.find("://") {
        Some(i) => match target[i + 3..].find('/') {
            Some(j) => &target[i + 3 + j..],
            None => "/",
        },
        None => target,
    };
    t.split(['?', '#']).next().unwrap_or("/").to_string()
}

fn serve_origin(state: &OriginState, stream: TcpStream) {
    let Ok(read_half) = stream.try_clone() else { return };
    let mut r = BufReader::new(read_half);
    let mut w = stream;
    loop {
        let req = match read_head(&mut r) {
            Ok(Some(h)) => h,
            _ => return,
        };
        if read_request_body(&req, &mut r).is_err() {
            return;
        }
        let keep = req.request_keeps_alive();
        let method = req.method().to_ascii_uppercase();
        let path = target_path(req.target());
        let range = req.header("range").map(str::to_string);
        let if_match = req.header("if-match").map(str::to_string);
        let obj = lock(&state.objects).get(&path).cloned();
        let mut conn: Vec<(&str, String)> = Vec::new();
        if !keep {
            conn.push(("Connection", "close".into()));
        }
        let status;
        let result = if method != "GET" && method != "HEAD" {
            status = 405;
            let mut h = conn.clone();
            h.push(("Allow", "GET, HEAD".into()));
            write_simple(&mut w, &method, "405 Method Not Allowed", &h, b"method not allowed\n")
        } else if let Some(obj) = obj {
            let len = obj.body.len() as u64;
            let mut h = conn.clone();
            h.push(("ETag", obj.etag.clone()));
            h.push(("Last-Modified", http_date(obj.modified)));
            if if_match.as_deref().is_some_and(|v| !if_match_ok(v, &obj.etag)) {
                status = 412;
                write_simple(&mut w, &method, "412 Precondition Failed", &h, b"precondition failed\n")
            } else {
                let ignore = state.ignore_range.load(Ordering::SeqCst);
                if !ignore {
                    h.push(("Accept-Ranges", "bytes".into()));
                }
                h.push(("Content-Type", "application/octet-stream".into()));
                let ask = if ignore { RangeAsk::Whole } else { parse_range(range.as_deref(), len) };
                match ask {
                    RangeAsk::Unsatisfiable => {
                        status = 416;
                        h.retain(|(k, _)| *k != "Content-Type");
                        h.push(("Content-Range", format!("bytes */{len}")));
                        write_simple(&mut w, &method, "416 Range Not Satisfiable", &h, b"")
                    }
                    RangeAsk::Whole => {
                        status = 200;
                        write_simple(&mut w, &method, "200 OK", &h, &obj.body)
                    }
                    RangeAsk::Part(a, b) => {
                        status = 206;
                        h.push(("Content-Range", format!("bytes {a}-{b}/{len}")));
                        write_simple(&mut w, &method, "206 Partial Content", &h, &obj.body[a as usize..=b as usize])
                    }
                }
            }
        } else {
            status = 404;
            write_simple(&mut w, &method, "404 Not Found", &conn, b"not found\n")
        };
        lock(&state.seen).push(OriginSeen { method, path, range, if_match, status });
        if result.is_err() || !keep {
            let _ = w.shutdown(Shutdown::Both);
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Proxy
// ---------------------------------------------------------------------------

/// What the proxy does with one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Forward it and relay the answer.
    Pass,
    /// Forward it, and hold the answer this long before relaying it.
    Delay(Duration),
    /// Forward it, relay the head and at most N body bytes (always fewer than
    /// the whole body: at most its length − 1), then close the connection.
    Cut(u64),
    /// 503 with `Retry-After: 1`, not forwarded.
    Unavailable,
    /// 503 with S3's `SlowDown` XML error, not forwarded.
    SlowDown,
    /// 429 Too Many Requests (no `Retry-After`), not forwarded.
    TooMany,
    /// Any status with a short text body, not forwarded.
    Status(u16),
    /// Close the connection without answering.
    Close,
    /// Read the request and never answer; the connection stays open until
    /// the client gives up (or `close_connections` / `down` / drop).
    Stall,
}

/// A request as the proxy saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub if_match: Option<String>,
    pub fault: Fault,
    /// When its head had been read.
    pub at: Instant,
    /// Which client connection (1, 2, ... in accept order).
    pub conn: u64,
}

impl Seen {
    /// `(first, last)` of a `bytes=a-b` Range, `last` = `len - 1` when open-ended.
    pub fn range_bounds(&self, len: u64) -> Option<(u64, u64)> {
        match parse_range(self.range.as_deref(), len) {
            RangeAsk::Part(a, b) => Some((a, b)),
            _ => None,
        }
    }
}

struct Control {
    default: Fault,
    next: VecDeque<Fault>,
    delay: Duration,
    pace: Option<(usize, Duration)>,
    seen: Vec<Seen>,
}

struct ProxyState {
    origin: SocketAddr,
    ctl: Mutex<Control>,
    down: AtomicBool,
}

/// A fault-injecting HTTP/1.1 reverse proxy on 127.0.0.1 in front of `origin`.
pub struct Proxy {
    state: Arc<ProxyState>,
    acceptor: Acceptor,
}

impl Proxy {
    /// Starts passing everything through to `origin`.
    pub fn start(origin: SocketAddr) -> Proxy {
        let state = Arc::new(ProxyState {
            origin,
            ctl: Mutex::new(Control {
                default: Fault::Pass,
                next: VecDeque::new(),
                delay: Duration::ZERO,
                pace: None,
                seen: Vec::new(),
            }),
            down: AtomicBool::new(false),
        });
        let st = state.clone();
        let acceptor = Acceptor::start(Arc::new(move |id, s| serve_proxy(&st, id, s)));
        Proxy { state, acceptor }
    }

    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr
    }

    pub fn port(&self) -> u16 {
        self.acceptor.addr.port()
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// Back to plain forwarding: no queued faults, no delay, no pacing.
    pub fn pass(&self) {
        let mut c = lock(&self.state.ctl);
        c.default = Fault::Pass;
        c.next.clear();
        c.delay = Duration::ZERO;
        c.pace = None;
    }

    /// What every request meets once the queued faults are used up.
    pub fn always(&self, fault: Fault) {
        lock(&self.state.ctl).default = fault;
    }

    /// The next `k` requests (after those already queued) meet `fault`.
    pub fn next(&self, k: usize, fault: Fault) {
        let mut c = lock(&self.state.ctl);
        for _ in 0..k {
            c.next.push_back(fault.clone());
        }
    }

    /// Queued faults not used yet.
    pub fn pending(&self) -> usize {
        lock(&self.state.ctl).next.len()
    }

    /// A delay before every response (forwarded or made up), on top of any `Fault::Delay`.
    pub fn set_delay(&self, d: Duration) {
        lock(&self.state.ctl).delay = d;
    }

    /// Relay bodies `chunk` bytes at a time with `delay` after each (None: at full speed).
    pub fn set_pace(&self, pace: Option<(usize, Duration)>) {
        lock(&self.state.ctl).pace = pace;
    }

    /// The server goes away: the listening socket is closed (new connections
    /// are refused) and every open connection is closed.
    pub fn down(&self) {
        self.state.down.store(true, Ordering::SeqCst);
        self.acceptor.close_listener();
        self.acceptor.close_connections();
    }

    /// Listens again, on the same port.
    pub fn up(&self) {
        // Not down first: a connection accepted as soon as the listener is
        // back must not be taken for one made while down.
        self.state.down.store(false, Ordering::SeqCst);
        self.acceptor.reopen_listener();
    }

    /// Closes every open client connection (stalled ones too); the listener stays.
    pub fn close_connections(&self) {
        self.acceptor.close_connections();
    }

    /// Client connections open now.
    pub fn live_connections(&self) -> usize {
        self.acceptor.live_connections()
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.acceptor.accepted.load(Ordering::SeqCst)
    }

    /// Every request seen so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.state.ctl).seen.clone()
    }

    /// Requests seen with `method` (e.g. "GET").
    pub fn count(&self, method: &str) -> usize {
        lock(&self.state.ctl).seen.iter().filter(|s| s.method.eq_ignore_ascii_case(method)).count()
    }

    /// Requests seen with `method`, in order.
    pub fn requests_by(&self, method: &str) -> Vec<Seen> {
        lock(&self.state.ctl).seen.iter().filter(|s| s.method.eq_ignore_ascii_case(method)).cloned().collect()
    }

    /// Forgets the requests seen so far.
    pub fn reset_counts(&self) {
        lock(&self.state.ctl).seen.clear();
    }
}

impl ProxyState {
    /// Picks the fault of one request and records the request.
    fn decide(&self, req: &Head, conn: u64) -> (Fault, Duration, Option<(usize, Duration)>) {
        let mut c = lock(&self.ctl);
        let fault = c.next.pop_front().unwrap_or_else(|| c.default.clone());
        c.seen.push(Seen {
            method: req.method().to_ascii_uppercase(),
            path: target_path(req.target()),
            range: req.header("range").map(str::to_string),
            if_match: req.header("if-match").map(str::to_string),
            fault: fault.clone(),
            at: Instant::now(),
            conn,
        });
        (fault, c.delay, c.pace)
    }
}

struct Upstream {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Upstream {
    fn connect(addr: SocketAddr) -> io::Result<Upstream> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        let _ = s.set_nodelay(true);
        Ok(Upstream { r: BufReader::new(s.try_clone()?), w: s })
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

const SLOW_DOWN_XML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
<Message>Please reduce your request rate.</Message><RequestId>SNAPMOUNTTEST</RequestId>\
<HostId>snapmount-test-proxy</HostId></Error>\n";

/// Holds a stalled connection until the client hangs up or the proxy closes it.
fn stall(client: &TcpStream) {
    let _ = client.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 4096];
    let mut s = client;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {} // pipelined or retried bytes: never answered either
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn serve_proxy(state: &ProxyState, id: u64, client: TcpStream) {
    let Ok(read_half) = client.try_clone() else { return };
    let mut cr = BufReader::new(read_half);
    let mut cw = client;
    let mut up: Option<Upstream> = None;
    while let Ok(Some(req)) = read_head(&mut cr) {
        if state.down.load(Ordering::SeqCst) {
            break;
        }
        let Ok(body) = read_request_body(&req, &mut cr) else { break };
        let (fault, delay, pace) = state.decide(&req, id);
        let method = req.method().to_ascii_uppercase();
        let keep = req.request_keeps_alive();
        let canned = |code: u16, extra: &[(&str, String)], text: &[u8], cw: &mut TcpStream| -> bool {
            thread::sleep(delay);
            let mut h: Vec<(&str, String)> = extra.to_vec();
            if !keep {
                h.push(("Connection", "close".into()));
            }
            let status = format!("{code} {}", reason(code));
            write_simple(cw, &method, &status, &h, text).is_ok() && keep
        };
        let go_on = match fault {
            Fault::Close => false,
            Fault::Stall => {
                stall(&cw);
                false
            }
            Fault::Unavailable => canned(
                503,
                &[("Retry-After", "1".into()), ("Content-Type", "text/plain".into())],
                b"service unavailable (snapmount test proxy)\n",
                &mut cw,
            ),
            Fault::SlowDown => {
                canned(503, &[("Content-Type", "application/xml".into())], SLOW_DOWN_XML.as_bytes(), &mut cw)
            }
            Fault::TooMany => canned(
                429,
                &[("Content-Type", "text/plain".into())],
                b"too many requests (snapmount test proxy)\n",
                &mut cw,
            ),
            Fault::Status(code) => canned(
                code,
                &[("Content-Type", "text/plain".into())],
                format!("status {code} (snapmount test proxy)\n").as_bytes(),
                &mut cw,
            ),
            Fault::Pass | Fault::Delay(_) | Fault::Cut(_) => {
                let extra = if let Fault::Delay(d) = fault { d } else { Duration::ZERO };
                let cut = if let Fault::Cut(n) = fault { Some(n) } else { None };
                match forward(state.origin, &mut up, &req, &body, &mut cw, delay + extra, cut, pace) {
                    Ok(upstream_keeps) => upstream_keeps && keep,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        // The origin itself is down: a gateway error, as a real proxy gives.
                        canned(502, &[("Content-Type", "text/plain".into())], b"origin refused\n", &mut cw)
                    }
                    Err(_) => false,
                }
            }
        };
        if !go_on {
            break;
        }
    }
    let _ = cw.shutdown(Shutdown::Both);
}

/// Forwards one request and relays the answer. Ok(false): the connection
/// must close afterwards.
#[allow(clippy::too_many_arguments)]
fn forward(
    origin: SocketAddr,
    up: &mut Option<Upstream>,
    req: &Head,
    body: &[u8],
    cw: &mut TcpStream,
    delay: Duration,
    cut: Option<u64>,
    pace: Option<(usize, Duration)>,
) -> io::Result<bool> {
    let mut wire = req.bytes();
    wire.extend_from_slice(body);
    let mut retried = false;
    let resp = loop {
        let reused = up.is_some();
        if up.is_none() {
            *up = Some(Upstream::connect(origin)?);
        }
        let u = up.as_mut().unwrap();
        let got = u.w.write_all(&wire).and_then(|_| u.w.flush()).and_then(|_| read_head(&mut u.r));
        match got {
            Ok(Some(h)) if h.status() >= 200 || h.status() == 101 => break h,
            Ok(Some(_)) => {
                // 1xx interim answer: relay nothing, read the final one.
                let mut h = None;
                while let Ok(Some(x)) = read_head(&mut u.r) {
                    if x.status() >= 200 {
                        h = Some(x);
                        break;
                    }
                }
                match h {
                    Some(h) => break h,
                    None => {
                        *up = None;
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "origin closed"));
                    }
                }
            }
            // A kept-alive upstream connection the origin had closed: once more on a new one.
            Ok(None) | Err(_) if reused && !retried => {
                *up = None;
                retried = true;
            }
            Ok(None) => {
                *up = None;
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "origin closed without answering"));
            }
            Err(e) => {
                *up = None;
                return Err(e);
            }
        }
    };
    let framing = response_framing(req.method(), &resp);
    let upstream_keeps = resp.response_keeps_alive() && framing != Framing::UntilClose;
    thread::sleep(delay);
    let cut = match (cut, framing) {
        (Some(n), Framing::Length(len)) => Some(n.min(len.saturating_sub(1))),
        (c, _) => c,
    };
    cw.write_all(&resp.bytes())?;
    let u = up.as_mut().unwrap();
    let mut sink = Sink { out: cw, sent: 0, cut, pace };
    let relayed = relay_body(framing, &mut u.r, &mut sink).and_then(|_| sink.out.flush());
    if let Err(e) = relayed {
        *up = None;
        return Err(e);
    }
    if !upstream_keeps {
        *up = None;
    }
    Ok(upstream_keeps)
}
