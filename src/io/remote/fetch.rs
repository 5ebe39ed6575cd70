//! One opened remote object: its reads as chunks, fetched once each, with
//! a read-ahead for sequential readers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use tracing::{debug, warn};

use super::http::{Answer, Failure};
use super::{DiskCache, Location, Remote};
use crate::cache::{BlockKey, BlockKind};
use crate::error::{Error, Result};
use crate::io::FileId;

/// The unit of fetching and caching. A random reader's miss costs one
/// round trip plus a chunk's time on the link, and four such readers share
/// it: 128 KiB is 1.1 ms at 1 Gbit/s against a 10 ms round trip (256 KiB
/// cost a quarter of the random-read rate there, BENCHMARKS.md). Sequential
/// readers do not feel it: their misses merge into GETs of up to 8 MiB.
/// Big enough for a qcow2 L2 table of 64 KiB clusters.
pub const CHUNK: u64 = 128 << 10;
/// The most one GET asks for (adjacent misses are merged up to this).
const MAX_GET: u64 = 8 << 20;
/// A sequential reader's first read-ahead window, and the largest (also at
/// most a quarter of the block cache, which holds what is fetched ahead).
const FIRST_WINDOW: u64 = 1 << 20;
const MAX_WINDOW: u64 = 64 << 20;
/// Read-ahead is fetched in pieces of this size, by several threads at once.
const PIECE: u64 = 2 << 20;
const PREFETCH_THREADS: usize = 6;
/// Pieces waiting for a read-ahead thread; more are dropped.
const PREFETCH_QUEUE: usize = 64;
/// How far from the previous read's end a read still counts as sequential:
/// the FUSE threads answer a sequential reader's requests slightly out of
/// order (a few requests of up to 1 MiB), and compressed clusters leave
/// gaps. Further ahead is a jump: scattered metadata reads (L2 tables,
/// index pages) must not pass for a stream.
const BEHIND: u64 = 2 << 20;
const AHEAD: u64 = 4 << 20;
/// Reads in a row that must look sequential before read-ahead starts (one
/// read after a jump is no stream yet).
const STREAK: u32 = 2;

#[derive(Clone)]
pub struct Object(Arc<Inner>);

struct Inner {
    remote: Arc<Remote>,
    /// As the user (or the referring image) named it: in every message.
    url: PathBuf,
    loc: Location,
    /// Where GETs go.
    http_url: String,
    etag: Option<String>,
    modified: Option<SystemTime>,
    len: u64,
    id: FileId,
    /// This version's folder in the cache directory (only with an ETag: a
    /// version without one cannot be told from the next).
    disk_key: Option<String>,
    flights: Mutex<HashMap<u64, Arc<Flight>>>,
    seq: Mutex<Sequential>,
    /// Set once the server said the object changed (logged once).
    changed: AtomicBool,
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Object({}, {} bytes, {:?})", self.0.url.display(), self.0.len, self.0.etag)
    }
}

/// A chunk being fetched by one thread, waited for by the others.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<std::result::Result<Arc<[u8]>, Failure>>>,
    ready: Condvar,
}

#[derive(Default)]
struct Sequential {
    last_end: u64,
    /// Sequential reads in a row.
    streak: u32,
    window: u64,
    /// How far read-ahead has been asked for.
    ahead_to: u64,
}

impl Object {
    pub(super) fn new(
        remote: Arc<Remote>,
        url: &Path,
        loc: Location,
        http_url: String,
        answer: &Answer,
        id: FileId,
    ) -> Object {
        let disk_key = match (&remote.disk, &answer.etag) {
            (Some(_), Some(etag)) => Some(DiskCache::object_key(&http_url, etag, answer.total)),
            _ => None,
        };
        Object(Arc::new(Inner {
            remote,
            url: url.to_path_buf(),
            loc,
            http_url,
            etag: answer.etag.clone(),
            modified: answer.modified,
            len: answer.total,
            id,
            disk_key,
            flights: Mutex::new(HashMap::new()),
            seq: Mutex::new(Sequential::default()),
            changed: AtomicBool::new(false),
        }))
    }

    /// Keeps the first chunk, fetched while opening.
    pub(super) fn keep_first(&self, bytes: Vec<u8>) {
        if bytes.len() as u64 == self.chunk_len(0) && !bytes.is_empty() {
            let chunk: Arc<[u8]> = Arc::from(bytes);
            self.keep(0, &chunk, true);
        }
    }

    fn chunk_len(&self, index: u64) -> u64 {
        CHUNK.min(self.0.len.saturating_sub(index * CHUNK))
    }

    fn key(&self, index: u64) -> BlockKey {
        BlockKey { file: self.0.id, kind: BlockKind::Remote, offset: index * CHUNK }
    }

    fn keep(&self, index: u64, chunk: &Arc<[u8]>, to_disk: bool) {
        self.0.remote.cache.insert(self.key(index), chunk.clone());
        if let (true, Some(disk), Some(key)) = (to_disk, &self.0.remote.disk, &self.0.disk_key) {
            disk.put(key, index, chunk);
        }
    }

    /// Fills `buf` from `offset` (zeros past the end).
    pub fn read_at(&self, url: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = self.0.len;
        let end = offset.saturating_add(buf.len() as u64).min(len);
        if offset >= end {
            buf.fill(0);
            return Ok(());
        }
        let (wanted, past_end) = buf.split_at_mut((end - offset) as usize);
        past_end.fill(0);
        self.note_read(offset, end);
        let first = offset / CHUNK;
        let count = (end - 1) / CHUNK - first + 1;
        let deadline = Instant::now() + self.0.remote.options.timeout;
        let chunks = self.chunks(first, count, deadline).map_err(|f| self.error(url, f))?;
        let mut pos = offset;
        let mut done = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            let start = (first + i as u64) * CHUNK;
            let from = (pos - start) as usize;
            let n = (chunk.len() - from).min(wanted.len() - done);
            wanted[done..done + n].copy_from_slice(&chunk[from..from + n]);
            done += n;
            pos += n as u64;
        }
        Ok(())
    }

    fn error(&self, url: &Path, f: Failure) -> Error {
        super::http::error(url, f.why())
    }

    /// Notes that the server no longer has the version opened (logged
    /// once, whichever thread, reader or read-ahead, learns it first).
    fn mark_changed(&self) {
        if !self.0.changed.swap(true, Ordering::Relaxed) {
            warn!(
                "{}: object changed on the server since it was opened (ETag {}); reads of what is not \
                 cached fail (EIO) rather than mix two versions: mount it again to read the new one",
                self.0.url.display(),
                self.0.etag.as_deref().unwrap_or("none")
            );
        }
    }

    /// Chunks `first..first + count`, from memory, the cache directory or
    /// the server; each missing chunk is fetched by one thread only.
    fn chunks(&self, first: u64, count: u64, deadline: Instant) -> std::result::Result<Vec<Arc<[u8]>>, Failure> {
        let cache = &self.0.remote.cache;
        let mut out: Vec<Option<Arc<[u8]>>> = (first..first + count).map(|i| cache.get(&self.key(i))).collect();
        if out.iter().all(Option::is_some) {
            return Ok(out.into_iter().flatten().collect());
        }
        if self.0.changed.load(Ordering::Relaxed) {
            return Err(Failure::Changed("object changed on the server since it was opened".into()));
        }
        let mut mine = Claimed { object: self, flights: Vec::new() };
        let mut theirs = Vec::new();
        {
            let mut flights = self.0.flights.lock();
            for (pos, slot) in out.iter().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let index = first + pos as u64;
                match flights.get(&index) {
                    Some(f) => theirs.push((pos, f.clone())),
                    None => {
                        let f = Arc::new(Flight::default());
                        flights.insert(index, f.clone());
                        mine.flights.push((index, f));
                    }
                }
            }
        }
        // Runs of adjacent chunks claimed here: one GET each (at most
        // MAX_GET).
        let mut claimed: Vec<u64> = mine.flights.iter().map(|(i, _)| *i).collect();
        claimed.sort_unstable();
        let mut failure = None;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for index in claimed {
            match runs.last_mut() {
                Some((a, n)) if *a + *n == index && (*n + 1) * CHUNK <= MAX_GET => *n += 1,
                _ => runs.push((index, 1)),
            }
        }
        for (a, n) in runs {
            match self.load(a, n, deadline) {
                Ok(chunks) => {
                    for (j, chunk) in chunks.into_iter().enumerate() {
                        let index = a + j as u64;
                        if index >= first && index < first + count {
                            out[(index - first) as usize] = Some(chunk.clone());
                        }
                        mine.publish(index, Ok(chunk));
                    }
                }
                Err(f) => {
                    for index in a..a + n {
                        mine.publish(index, Err(f.clone()));
                    }
                    failure.get_or_insert(f);
                }
            }
        }
        if let Some(f) = failure {
            return Err(f);
        }
        for (pos, flight) in theirs {
            let mut result = flight.result.lock();
            while result.is_none() {
                flight.ready.wait(&mut result);
            }
            match result.as_ref().unwrap() {
                Ok(chunk) => out[pos] = Some(chunk.clone()),
                Err(f) => return Err(f.clone()),
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Chunks `first..first + count` (adjacent), from the cache directory
    /// or one ranged GET; kept in memory (and on disk).
    fn load(&self, first: u64, count: u64, deadline: Instant) -> std::result::Result<Vec<Arc<[u8]>>, Failure> {
        let disk = match (&self.0.remote.disk, &self.0.disk_key) {
            (Some(d), Some(k)) => Some((d, k)),
            _ => None,
        };
        let mut out: Vec<Option<Arc<[u8]>>> =
            (first..first + count).map(|i| disk.and_then(|(d, k)| d.get(k, i, self.chunk_len(i) as usize))).collect();
        let mut j = 0;
        while j < out.len() {
            if out[j].is_some() {
                self.keep(first + j as u64, out[j].as_ref().unwrap(), false);
                j += 1;
                continue;
            }
            let a = j;
            while j < out.len() && out[j].is_none() {
                j += 1;
            }
            let start = (first + a as u64) * CHUNK;
            let end = ((first + j as u64) * CHUNK).min(self.0.len);
            let mut buf = vec![0u8; (end - start) as usize];
            self.get(start, &mut buf, deadline)?;
            for (k, piece) in buf.chunks(CHUNK as usize).enumerate() {
                let chunk: Arc<[u8]> = Arc::from(piece);
                self.keep(first + (a + k) as u64, &chunk, true);
                out[a + k] = Some(chunk);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// One ranged GET of the version opened, retried within `deadline`.
    fn get(&self, start: u64, buf: &mut [u8], deadline: Instant) -> std::result::Result<(), Failure> {
        let o = &self.0;
        let remote = &o.remote;
        let got = remote.retrying(&o.url, deadline, || {
            let mut headers = remote.auth(&o.url, &o.loc, "GET", &o.http_url)?;
            match (&o.etag, o.modified) {
                (Some(etag), _) => headers.push(("If-Match".into(), etag.clone())),
                (None, Some(t)) => headers.push(("If-Unmodified-Since".into(), httpdate::fmt_http_date(t))),
                (None, None) => {}
            }
            let answer = remote.http.get_range(&o.http_url, &headers, start, buf, o.loc.follows_redirects())?;
            if answer.total != o.len || answer.etag.as_ref().is_some_and(|e| o.etag.as_ref().is_some_and(|o| o != e)) {
                return Err(Failure::Changed(format!(
                    "object changed on the server since it was opened (now {} bytes, ETag {})",
                    answer.total,
                    answer.etag.as_deref().unwrap_or("none")
                )));
            }
            if answer.filled != buf.len() {
                return Err(Failure::Transient { why: "the server sent fewer bytes than asked".into(), after: None });
            }
            Ok(())
        });
        if let Err(Failure::Changed(_)) = &got {
            self.mark_changed();
        }
        got
    }

    /// Tracks a reader: while reads follow one another, fetch ahead of them
    /// in a window that doubles each time it is extended.
    fn note_read(&self, offset: u64, end: u64) {
        let len = self.0.len;
        let max_window = MAX_WINDOW.min(self.0.remote.cache.capacity() / 4).max(FIRST_WINDOW);
        let (from, to) = {
            let mut s = self.0.seq.lock();
            let sequential = offset + BEHIND >= s.last_end && offset <= s.last_end.saturating_add(AHEAD);
            if !sequential {
                *s = Sequential { last_end: end, streak: 0, window: 0, ahead_to: end };
                return;
            }
            s.last_end = s.last_end.max(end);
            s.ahead_to = s.ahead_to.max(end);
            s.streak = s.streak.saturating_add(1);
            if s.streak < STREAK {
                return;
            }
            if s.window == 0 {
                s.window = FIRST_WINDOW;
            }
            if s.ahead_to >= len || s.ahead_to - end >= s.window / 2 {
                return;
            }
            let from = s.ahead_to;
            let to = end.saturating_add(s.window).min(len);
            s.ahead_to = to;
            s.window = (s.window * 2).min(max_window);
            (from, to)
        };
        let mut at = from / CHUNK * CHUNK;
        while at < to {
            let next = (at + PIECE).min(to);
            self.0.remote.prefetch.ask(self.clone(), at / CHUNK, (next - 1) / CHUNK - at / CHUNK + 1);
            at = next;
        }
    }

    /// Fetches chunks ahead of a reader (on a read-ahead thread).
    fn prefetch(&self, first: u64, count: u64) {
        let deadline = Instant::now() + self.0.remote.options.timeout;
        if let Err(f) = self.chunks(first, count, deadline) {
            debug!("{}: read-ahead failed: {}", self.0.url.display(), f.why());
        }
    }
}

/// The chunks one thread claimed: every one gets a result, also when the
/// fetch fails or unwinds, so no other reader waits forever.
struct Claimed<'a> {
    object: &'a Object,
    flights: Vec<(u64, Arc<Flight>)>,
}

impl Claimed<'_> {
    fn publish(&mut self, index: u64, result: std::result::Result<Arc<[u8]>, Failure>) {
        let Some(pos) = self.flights.iter().position(|(i, _)| *i == index) else { return };
        let (_, flight) = self.flights.swap_remove(pos);
        *flight.result.lock() = Some(result);
        flight.ready.notify_all();
        self.object.0.flights.lock().remove(&index);
    }
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        let left: Vec<u64> = self.flights.iter().map(|(i, _)| *i).collect();
        for index in left {
            self.publish(index, Err(Failure::Fatal("the fetch was abandoned".into())));
        }
    }
}

/// The read-ahead threads, started on first use.
#[derive(Default)]
pub(super) struct Prefetcher {
    queue: std::sync::OnceLock<mpsc::SyncSender<(Object, u64, u64)>>,
}

impl Prefetcher {
    fn ask(&self, object: Object, first: u64, count: u64) {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel::<(Object, u64, u64)>(PREFETCH_QUEUE);
            let rx = Arc::new(std::sync::Mutex::new(rx));
            for n in 0..PREFETCH_THREADS {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new().name(format!("read-ahead-{n}")).spawn(move || loop {
                    let job = rx.lock().map(|r| r.recv());
                    match job {
                        Ok(Ok((object, first, count))) => object.prefetch(first, count),
                        _ => return,
                    }
                });
                if let Err(e) = spawned {
                    warn!("cannot start a read-ahead thread: {e}");
                }
            }
            tx
        });
        // A full queue: the reader is far behind what was asked; skip.
        let _ = queue.try_send((object, first, count));
    }
}
