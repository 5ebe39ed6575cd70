//! The fetch layer of remote sources (src/io/remote/fetch.rs), seen from the
//! server: which ranged GETs a mount sends for which reads. The image is
//! served by the test's own origin (`common::proxy::Origin`) through the
//! recording proxy (`common::proxy::Proxy`), mounted as
//! `http://127.0.0.1:PORT/img.qcow2` with `--cache-size` and `--log-file`;
//! every byte read is compared with qemu-img's conversion of the same file.
//! Reads go around the page cache (O_DIRECT), so that each one reaches the
//! daemon. Where a test speaks of an image's bytes on the server (the GETs'
//! ranges), guest offsets are translated with `qemu-img map`.
//!
//! Checked here: two readers of one chunk cause one GET (single flight); the
//! missing chunks of one read are fetched with one GET, not one per chunk; a
//! sequential reader's read-ahead runs on several connections at once;
//! random readers get no read-ahead; a long sequential read stays within
//! a memory bound set by `--cache-size`; and one reader's GETs, one after
//! the other, reuse a kept-alive connection (they once did not: a body read
//! to its length, but not to its end, kept ureq from pooling it).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

mod common;
use common::proxy::{Origin, Proxy, Seen};
use common::*;

const NAME: &str = "img.qcow2";
const PATH: &str = "/img.qcow2";
/// The fetch layer's chunk (`fetch::CHUNK`).
const CHUNK: u64 = 256 * KIB;
/// The largest request the kernel sends the daemon (`fs::MAX_READ`: FUSE
/// max_pages 256): one O_DIRECT read larger than this reaches the daemon as
/// several reads, one after the other.
const FUSE_MAX_READ: u64 = MIB;

// ---------------------------------------------------------------------------
// The image, the servers and the mount
// ---------------------------------------------------------------------------

/// A qcow2 image (64 KiB clusters, uncompressed) of `mib` MiB of generated
/// data, every cluster allocated, made by `qemu-img convert`: its clusters
/// lie in guest order on the server, as in a raw file after the metadata.
fn image(dir: &Path, mib: u64, seed: u64) -> PathBuf {
    let src = dir.join("img.src");
    gen_data(&src, mib * MIB, seed);
    let img = dir.join(NAME);
    raw_to_qcow2(&src, &img);
    std::fs::remove_file(&src).unwrap();
    img
}

/// Where guest bytes `guest..guest + len` of `img` are in the file (one
/// contiguous run of data clusters; panics otherwise).
fn host_offset(img: &Path, guest: u64, len: u64) -> u64 {
    let out = qemu_img(&[OsStr::new("map"), "--output=json".as_ref(), img.as_os_str()]);
    let map: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img map: {e}\n{out}"));
    for e in map.as_array().expect("qemu-img map gives a list") {
        let (start, length) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if start <= guest && guest < start + length {
            assert!(
                guest + len <= start + length && e["data"] == true && e["offset"].is_u64(),
                "guest {guest:#x}+{len:#x} is not one run of data clusters: {e}"
            );
            return e["offset"].as_u64().unwrap() + (guest - start);
        }
    }
    panic!("guest {guest:#x} not in the map of {}:\n{out}", img.display())
}

/// An image served by an origin, behind a proxy, mounted from the proxy's URL.
/// Fields drop in order: the mount first, while the servers still answer.
struct Rig {
    m: Mount,
    proxy: Proxy,
    _origin: Origin,
    img: PathBuf,
    /// The object's length on the server.
    len: u64,
    /// qemu-img's raw conversion of the image.
    expected_file: PathBuf,
    expected: File,
    log: PathBuf,
    _tmp: tempfile::TempDir,
}

fn rig(mib: u64, seed: u64, cache_size: &str) -> Rig {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), mib, seed);
    let expected_file = tmp.path().join("img.raw");
    oracle_raw(&img, &expected_file);
    let expected = File::open(&expected_file).unwrap();
    let origin = Origin::start();
    origin.put_file(PATH, &img);
    let len = origin.len(PATH).unwrap();
    let proxy = Proxy::start(origin.addr());
    let log = tmp.path().join("daemon.log");
    let m = Mount::with_args(
        &["--cache-size", cache_size, "--log-file", log.to_str().unwrap()],
        &[proxy.url(PATH)],
        &tmp.path().join("mnt"),
    );
    let r = Rig { m, proxy, _origin: origin, img, len, expected_file, expected, log, _tmp: tmp };
    r.settle();
    r
}

impl Rig {
    fn disk(&self) -> PathBuf {
        self.m.disk(NAME)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn want(&self, len: usize, at: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.expected.read_exact_at(&mut v, at).unwrap();
        v
    }

    /// Waits until the proxy has seen no new request for 300 ms (the
    /// mount's probes and any read-ahead they started are over).
    fn settle(&self) {
        let mut last = usize::MAX;
        let mut since = Instant::now();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            let n = self.proxy.requests().len();
            if n != last {
                (last, since) = (n, Instant::now());
            } else if since.elapsed() >= Duration::from_millis(300) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("the proxy kept seeing requests for 20 s: {:?}", self.proxy.requests().len());
    }

    /// Host ranges `(first, last)` of every GET seen so far.
    fn get_ranges(&self) -> Vec<(u64, u64)> {
        let len = self.len;
        self.proxy.requests_by("GET").iter().map(|g| g.range_bounds(len).unwrap_or((0, len - 1))).collect()
    }

    /// The GETs seen so far whose range meets host bytes `a..b`.
    fn gets_meeting(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        self.get_ranges().into_iter().filter(|&(first, last)| first < b && last >= a).collect()
    }

    /// A read through the daemon that must give the oracle's bytes.
    fn read_ok(&self, len: usize, at: u64, what: &str) {
        let disk = self.disk();
        let got = timed(what, move || direct_read(&disk, len, at))
            .unwrap_or_else(|e| panic!("{what}: {len} bytes at {at:#x}: {e}\ndaemon log:\n{}", self.log_text()));
        assert!(got == self.want(len, at), "{what}: {len} bytes at {at:#x} differ from qemu-img's");
    }

    /// The daemon's pid (the one process whose command line names the mount point).
    fn daemon_pid(&self) -> i32 {
        let pids = pids_mentioning(&self.m.dir);
        assert_eq!(pids.len(), 1, "one daemon for {}: {pids:?}", self.m.dir.display());
        pids[0]
    }
}

/// A field of /proc/PID/status in bytes (e.g. "VmHWM").
fn proc_status_bytes(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{text}"));
    let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect(line);
    kib * KIB
}

fn open_direct(disk: &Path) -> io::Result<File> {
    File::options().read(true).custom_flags(libc::O_DIRECT).open(disk)
}

/// `len` bytes at `at` with O_DIRECT preads (short only at the end of the disk).
fn pread_full(f: &File, len: usize, at: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut n = 0;
    while n < len {
        match f.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

fn direct_read(disk: &Path, len: usize, at: u64) -> io::Result<Vec<u8>> {
    pread_full(&open_direct(disk)?, len, at)
}

/// `f()` in a thread; a call that has not returned after 120 s fails the
/// test as a hang (the Mount guard unmounts).
fn timed<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| panic!("{what} hung for 120 s"))
}

/// The most GETs in flight at once that the proxy's records prove: GETs on
/// different connections whose heads were read less than `delay` apart were
/// all waiting for their answers (each held at least `delay`) at the moment
/// the last of them arrived.
fn proven_concurrency(gets: &[Seen], delay: Duration) -> usize {
    let mut best = 0;
    for g in gets {
        let mut conns: Vec<u64> =
            gets.iter().filter(|h| h.at <= g.at && g.at.duration_since(h.at) < delay).map(|h| h.conn).collect();
        conns.sort_unstable();
        conns.dedup();
        best = best.max(conns.len());
    }
    best
}

/// `count` 4 KiB-aligned guest offsets of a disk of `size` bytes, each in a
/// 256 KiB guest chunk not picked before, none in the first 2 MiB (what the
/// mount read), and none in [previous end - 2 MiB, previous end + 16 MiB]:
/// what the fetch layer takes for a sequential reader's next read (its
/// `BEHIND` and `AHEAD`) after a 4 KiB read at the previous offset.
fn far_apart_offsets(seed: u64, size: u64, count: usize) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    let mut used = std::collections::HashSet::new();
    let mut prev_end = 0u64;
    let mut out = Vec::new();
    while out.len() < count {
        let at = rng.range(1, size / (4 * KIB) - 1) * 4 * KIB;
        let sequential = at + 2 * MIB >= prev_end && at <= prev_end + 16 * MIB + 4 * KIB;
        if !sequential && at >= 2 * MIB && used.insert(at / CHUNK) {
            out.push(at);
            prev_end = at + 4 * KIB;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// Eight readers of the same uncached 64 KiB, let go at once (a barrier)
/// while every answer takes 300 ms: all get qemu-img's bytes, and the proxy
/// saw exactly one GET whose range meets those bytes (the others waited for
/// the first reader's fetch instead of sending their own).
#[test]
fn readers_of_one_chunk_share_one_get() {
    let seed = test_seed(31);
    let r = rig(64, seed, "64M");
    // Far from what the mount's probes read and from each other's read-ahead.
    let guest = 40 * MIB + 64 * KIB;
    let len = 64 * KIB;
    let host = host_offset(&r.img, guest, len);
    assert!(
        r.gets_meeting(host, host + len).is_empty(),
        "the region was fetched before the test: {:?}",
        r.get_ranges()
    );
    r.proxy.reset_counts();
    r.proxy.set_delay(Duration::from_millis(300));

    const READERS: usize = 8;
    let barrier = std::sync::Arc::new(Barrier::new(READERS));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (disk, barrier) = (r.disk(), barrier.clone());
            thread::spawn(move || {
                let f = open_direct(&disk)?;
                barrier.wait();
                let start = Instant::now();
                pread_full(&f, len as usize, guest).map(|b| (b, start.elapsed()))
            })
        })
        .collect();
    let want = r.want(len as usize, guest);
    for (i, t) in readers.into_iter().enumerate() {
        let (got, took) = t.join().unwrap().unwrap_or_else(|e| panic!("reader {i}: {e}\n{}", r.log_text()));
        assert!(got == want, "reader {i}: 64 KiB at {guest:#x} differ from qemu-img's");
        assert!(took >= Duration::from_millis(250), "reader {i} was answered in {took:?}, before any GET could be");
    }
    r.settle();
    let meeting = r.gets_meeting(host, host + len);
    eprintln!("GETs after the barrier: {:?}; meeting {host:#x}+{len:#x}: {meeting:?}", r.get_ranges());
    assert_eq!(meeting.len(), 1, "one GET for 8 readers of host {host:#x}+{len:#x}: {:?}", r.get_ranges());
    let (a, b) = meeting[0];
    assert!(a <= host && b + 1 >= host + len, "the one GET covers the region: {a:#x}-{b:#x}");
}

/// One 4 MiB O_DIRECT read of an uncached region: the kernel hands it to the
/// daemon as reads of at most 1 MiB (FUSE max_pages 256), and the missing
/// chunks of each are fetched with one GET — at most one GET per 1 MiB (4
/// here, read-ahead pieces included), not one per 256 KiB chunk (16), and
/// together they cover the region.
#[test]
fn the_misses_of_one_read_are_one_get() {
    let seed = test_seed(32);
    let r = rig(64, seed, "64M");
    let guest = 40 * MIB;
    let len = 4 * MIB;
    let host = host_offset(&r.img, guest, len);
    assert!(
        r.gets_meeting(host, host + len).is_empty(),
        "the region was fetched before the test: {:?}",
        r.get_ranges()
    );
    r.proxy.reset_counts();
    r.read_ok(len as usize, guest, "one 4 MiB read");
    r.settle();
    let meeting = r.gets_meeting(host, host + len);
    eprintln!("GETs: {:?}; meeting {host:#x}+{len:#x}: {meeting:?}", r.get_ranges());
    let mut covered = host;
    let mut sorted = meeting.clone();
    sorted.sort_unstable();
    for &(a, b) in &sorted {
        assert!(a <= covered, "a hole in the GETs at {covered:#x}: {sorted:?}");
        covered = covered.max(b + 1);
    }
    assert!(covered >= host + len, "the GETs cover the region: {sorted:?}");
    let most = len.div_ceil(FUSE_MAX_READ) as usize;
    assert!(
        meeting.len() <= most,
        "{} GETs for a 4 MiB read ({} chunks; at most one per {} KiB FUSE read): {meeting:?}",
        meeting.len(),
        len / CHUNK,
        FUSE_MAX_READ / KIB
    );
}

/// A sequential read of a 64 MiB image while every answer takes 200 ms:
/// the bytes match, the proxy's records prove at least 2 GETs in flight at
/// once on different connections (and at least 2 connections were open at
/// once), and the whole read took less than its GETs one after the other
/// would have (each GET ≥ 200 ms).
#[test]
fn a_sequential_reader_is_fetched_ahead_on_several_connections() {
    let seed = test_seed(33);
    let r = rig(64, seed, "64M");
    let delay = Duration::from_millis(200);
    r.proxy.reset_counts();
    r.proxy.set_delay(delay);
    let size = std::fs::metadata(r.disk()).unwrap().len();
    let most_live = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let (took, result) = thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                most_live.fetch_max(r.proxy.live_connections(), Ordering::SeqCst);
                thread::sleep(Duration::from_millis(5));
            }
        });
        let start = Instant::now();
        let result = (|| -> io::Result<()> {
            let f = open_direct(&r.disk())?;
            let mut at = 0;
            while at < size {
                let n = FUSE_MAX_READ.min(size - at) as usize;
                let got = pread_full(&f, n, at)?;
                if got != r.want(n, at) {
                    return Err(io::Error::other(format!("{n} bytes at {at:#x} differ from qemu-img's")));
                }
                at += n as u64;
            }
            Ok(())
        })();
        let took = start.elapsed();
        done.store(true, Ordering::SeqCst);
        (took, result)
    });
    result.unwrap_or_else(|e| panic!("sequential read: {e}\n{}", r.log_text()));
    let gets = r.proxy.requests_by("GET");
    let concurrent = proven_concurrency(&gets, delay);
    let conns: std::collections::BTreeSet<u64> = gets.iter().map(|g| g.conn).collect();
    let serial = delay * gets.len() as u32;
    eprintln!(
        "sequential read of {} MiB: {took:?}; {} GETs on {} connections, ≥{concurrent} proven in flight at once, \
         ≤{} connections open at once; one after the other: ≥{serial:?}",
        size / MIB,
        gets.len(),
        conns.len(),
        most_live.load(Ordering::SeqCst)
    );
    assert!(concurrent >= 2, "no two GETs in flight at once: {gets:?}");
    assert!(most_live.load(Ordering::SeqCst) >= 2, "never 2 connections open at once");
    assert!(took < serial, "the read took {took:?}, no less than its {} GETs one after the other", gets.len());
}

/// 50 O_DIRECT 4 KiB reads at random, far-apart offsets (never within the
/// span a sequential reader's next read would fall in): each gives
/// qemu-img's bytes, no GET is longer than two chunks, and the bytes fetched
/// in all stay below 50 × (256 KiB + 64 KiB) × 2 — no read-ahead windows.
#[test]
fn random_readers_get_no_read_ahead() {
    let seed = test_seed(34);
    let r = rig(96, seed, "64M");
    let size = std::fs::metadata(r.disk()).unwrap().len();
    r.proxy.reset_counts();
    const READS: u64 = 50;
    for (i, at) in far_apart_offsets(seed, size, READS as usize).into_iter().enumerate() {
        r.read_ok(4096, at, &format!("random read #{i}"));
    }
    r.settle();
    let ranges = r.get_ranges();
    let bytes: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
    let longest = ranges.iter().map(|(a, b)| b - a + 1).max().unwrap_or(0);
    let bound = READS * (CHUNK + 64 * KIB) * 2;
    let conns: std::collections::BTreeSet<u64> = r.proxy.requests_by("GET").iter().map(|g| g.conn).collect();
    eprintln!(
        "{READS} random 4 KiB reads: {} GETs on {} connections, {bytes} bytes, the longest {longest} (bound {bound})",
        ranges.len(),
        conns.len()
    );
    assert!(longest <= 2 * CHUNK, "a GET of {longest} bytes for 4 KiB random reads: {ranges:?}");
    assert!(bytes < bound, "{bytes} bytes fetched for {READS} random 4 KiB reads (bound {bound}): {ranges:?}");
}

/// With `--cache-size 16M`, a sequential read of a 128 MiB image gives
/// qemu-img's bytes, and the daemon's peak resident size (VmHWM) stays below
/// its size right after mounting + 16 MiB (the cache) + 64 MiB (read-ahead
/// buffers, FUSE buffers, allocator slack).
#[test]
fn a_long_sequential_read_stays_within_the_memory_bound() {
    let seed = test_seed(35);
    let r = rig(128, seed, "16M");
    let pid = r.daemon_pid();
    let baseline = proc_status_bytes(pid, "VmHWM");
    let size = std::fs::metadata(r.disk()).unwrap().len();
    let disk = r.disk();
    let expected = r.expected_file.clone();
    timed("the sequential read", move || files_equal_direct(&disk, &expected))
        .unwrap_or_else(|e| panic!("sequential read: {e}\n{}", r.log_text()));
    let peak = proc_status_bytes(pid, "VmHWM");
    let bound = baseline + 16 * MIB + 64 * MIB;
    let fetched: u64 = r.get_ranges().iter().map(|(a, b)| b - a + 1).sum();
    eprintln!(
        "sequential read of {} MiB with --cache-size 16M: VmHWM {} KiB after mount, {} KiB after the read \
         (bound {} KiB); {fetched} bytes fetched",
        size / MIB,
        baseline / KIB,
        peak / KIB,
        bound / KIB
    );
    assert!(peak < bound, "VmHWM {} KiB, over the bound {} KiB", peak / KIB, bound / KIB);
}

/// Compares `disk` (read with O_DIRECT, 1 MiB at a time, in order) with `expected`.
fn files_equal_direct(disk: &Path, expected: &Path) -> Result<(), String> {
    let f = open_direct(disk).map_err(|e| format!("open {}: {e}", disk.display()))?;
    let exp = File::open(expected).unwrap();
    let size = exp.metadata().unwrap().len();
    let mut at = 0;
    while at < size {
        let n = FUSE_MAX_READ.min(size - at) as usize;
        let got = pread_full(&f, n, at).map_err(|e| format!("{n} bytes at {at:#x}: {e}"))?;
        let mut want = vec![0u8; n];
        exp.read_exact_at(&mut want, at).unwrap();
        if got != want {
            return Err(format!("{n} bytes at {at:#x} differ from qemu-img's"));
        }
        at += n as u64;
    }
    Ok(())
}

/// GETs one after the other (20 random 4 KiB reads by one reader, no
/// read-ahead) reuse one kept-alive connection (`http::CONNECTIONS_PER_HOST`
/// are kept per host), rather than opening a connection (for HTTPS, a TLS
/// handshake) per GET: at most one new connection for the 20 GETs.
#[test]
fn one_reader_reuses_a_kept_alive_connection() {
    let seed = test_seed(36);
    let r = rig(64, seed, "64M");
    let size = std::fs::metadata(r.disk()).unwrap().len();
    r.proxy.reset_counts();
    let accepted = r.proxy.connections();
    const READS: usize = 20;
    for (i, at) in far_apart_offsets(seed, size, READS).into_iter().enumerate() {
        r.read_ok(4096, at, &format!("random read #{i}"));
    }
    r.settle();
    let gets = r.proxy.requests_by("GET");
    let conns: std::collections::BTreeSet<u64> = gets.iter().map(|g| g.conn).collect();
    let opened = r.proxy.connections() - accepted;
    eprintln!(
        "{READS} reads one after the other: {} GETs on {} connections ({opened} opened) to the proxy at {}",
        gets.len(),
        conns.len(),
        r.proxy.addr()
    );
    assert!(gets.len() >= READS / 2, "the reads reached the server: {gets:?}");
    // The pool already holds the connections of the open and its read-ahead
    // (several threads at once); one reader after that needs no new one.
    assert!(
        opened <= 1,
        "{} GETs one after the other opened {opened} connections (on {} in all)",
        gets.len(),
        conns.len()
    );
}
