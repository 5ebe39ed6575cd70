//! `snapmount export SOURCE[@SNAPSHOT] OUTPUT`: writes one view to a raw
//! file without FUSE, leaving holes where the source is unallocated or zero.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use snapmount::cache::BlockCache;
use snapmount::catalog::{Catalog, Content};
use snapmount::view::View;

use super::password::PasswordFiles;
use super::RuleArgs;

mod output;
use output::{Buffer, Output, BLOCK};

/// The unit of work of the export workers (a multiple of BLOCK).
const PIECE: u64 = 4 << 20;

/// Splits `vm.qcow2@before-upgrade` into the file and the snapshot, unless
/// the whole string names an existing file.
fn split_source(source: &str) -> (PathBuf, Option<String>) {
    if Path::new(source).exists() {
        return (source.into(), None);
    }
    match source.rsplit_once('@') {
        Some((file, snap)) => (file.into(), Some(snap.to_string())),
        None => (source.into(), None),
    }
}

/// The view to export: the disk, or the snapshot named by its directory
/// entry, its ID, or its name.
fn select(catalog: &Catalog, source: &Path, snapshot: Option<&str>) -> Result<Arc<dyn View>> {
    let top = catalog.children(snapmount::catalog::ROOT);
    let image = top.first().ok_or_else(|| anyhow!("{}: nothing to export", source.display()))?;
    let path = match snapshot {
        // A disk, or the guest memory of a VM snapshot.
        None if catalog.resolve(&format!("{image}/disk.raw")).is_some() => format!("{image}/disk.raw"),
        None => format!("{image}/memory.raw"),
        Some(snap) => {
            let info = catalog
                .resolve(&format!("{image}/info.json"))
                .and_then(|ino| catalog.node(ino))
                .and_then(|n| match &n.content {
                    Content::Bytes(b) => serde_json::from_slice::<serde_json::Value>(b).ok(),
                    _ => None,
                })
                .unwrap_or_default();
            let snaps = info["snapshots"].as_array().cloned().unwrap_or_default();
            let pick = |key: &str| snaps.iter().find(|s| s[key].as_str() == Some(snap));
            let found = pick("entry").or_else(|| pick("id")).or_else(|| pick("name"));
            let entry = found.and_then(|s| s["entry"].as_str()).ok_or_else(|| {
                let known: Vec<&str> = snaps.iter().filter_map(|s| s["entry"].as_str()).collect();
                anyhow!(
                    "{}: no snapshot '{snap}' (snapshots: {})",
                    source.display(),
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                )
            })?;
            format!("{image}/snapshots/{entry}/disk.raw")
        }
    };
    let node = catalog.resolve(&path).and_then(|ino| catalog.node(ino));
    match node.map(|n| &n.content) {
        Some(Content::View(v)) => Ok(v.clone()),
        _ => bail!("{}: no view {path}", source.display()),
    }
}

pub fn export(
    source: &str,
    output: &Path,
    password_files: &PasswordFiles,
    cache_size: u64,
    rules: &RuleArgs,
    progress: ProgressMode,
    sync: bool,
) -> Result<()> {
    let (file, snapshot) = split_source(source);
    let cache = Arc::new(BlockCache::new(cache_size));
    let rules = &rules.rules(&cache)?;
    let passwords = |image: &Path| password_files.password_for(image);
    let catalog = Catalog::build(std::slice::from_ref(&file), &cache, &passwords, rules)?;
    let view = select(&catalog, &file, snapshot.as_deref())?;
    let size = view.size();
    let pieces = pieces(view.as_ref())?;
    let total: u64 = pieces.iter().map(|p| p.1 as u64).sum();
    let progress = Progress::new(progress, size, total);
    let mut out = Output::create(output, size)?;

    // Workers take the next piece and read (decompress, decrypt) it, on
    // every core; one writer writes the pieces where they belong (offsets
    // make their order irrelevant) with many writes in flight (output.rs).
    // A few buffers circulate between them.
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 16) + 1;
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Buffer>();
    for _ in 0..2 * workers {
        free_tx.send(Buffer::new(PIECE as usize)).expect("the pool is open");
    }
    let mut free_tx = Some(free_tx);
    let free_rx = std::sync::Mutex::new(free_rx);
    let (full_tx, full_rx) = std::sync::mpsc::channel::<(u64, usize, Buffer)>();
    let view = &view;
    std::thread::scope(|scope| -> Result<()> {
        // On a write error: no more pieces, and the workers waiting for a
        // buffer stop (their channel closes).
        let stop = |e, failed: &mut Option<anyhow::Error>, free_tx: &mut Option<_>| {
            next.store(pieces.len(), Ordering::Relaxed);
            *failed = Some(e);
            *free_tx = None;
        };
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let full_tx = full_tx.clone();
                let (free_rx, next, pieces) = (&free_rx, &next, &pieces);
                scope.spawn(move || -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(at, n)) = pieces.get(i) else { return Ok(()) };
                        let Ok(mut buf) = free_rx.lock().map_err(|_| ()).and_then(|r| r.recv().map_err(|_| ())) else {
                            return Ok(());
                        };
                        if let Err(e) = view.read_at(&mut buf.bytes_mut()[..n], at) {
                            // The others stop at their next piece.
                            next.store(pieces.len(), Ordering::Relaxed);
                            return Err(e.into());
                        }
                        let _ = full_tx.send((at, n, buf));
                    }
                })
            })
            .collect();
        drop(full_tx);
        // Buffers come back from the output only as their writes complete:
        // with nothing decoded to write, wait for those rather than for the
        // workers, who may be waiting for those very buffers.
        let mut failed = None;
        loop {
            let next_full = match full_rx.try_recv() {
                Ok(full) => Some(full),
                Err(std::sync::mpsc::TryRecvError::Empty) if out.busy() && failed.is_none() => {
                    match out.wait() {
                        Ok(done) => done.into_iter().for_each(|b| drop(free_tx.as_ref().map(|tx| tx.send(b)))),
                        Err(e) => stop(e, &mut failed, &mut free_tx),
                    }
                    continue;
                }
                Err(_) => full_rx.recv().ok(),
            };
            let Some((at, n, buf)) = next_full else { break };
            if failed.is_some() {
                continue;
            }
            match out.write(at, n, buf) {
                Ok(done) => {
                    progress.advance(n as u64);
                    done.into_iter().for_each(|b| drop(free_tx.as_ref().map(|tx| tx.send(b))));
                }
                Err(e) => stop(e, &mut failed, &mut free_tx),
            }
        }
        for h in handles {
            h.join().map_err(|_| anyhow!("an export worker panicked"))??;
        }
        failed.map_or(Ok(()), Err)
    })?;
    let written = out.written();
    out.finish(sync)?;
    progress.finish();
    eprintln!("{}: {} bytes ({} written, the rest left sparse)", output.display(), size, written);
    Ok(())
}

/// The ranges of the view to read, as (offset, length): its data extents,
/// widened to whole blocks (holes are never read, and writes stay aligned
/// for O_DIRECT), cut at PIECE boundaries so that pieces are large and the
/// workers share them out.
fn pieces(view: &dyn View) -> Result<Vec<(u64, usize)>> {
    let size = view.size();
    let block = BLOCK as u64;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let extent = view.extent(pos, u64::MAX)?;
        let end = pos + extent.len;
        if extent.data {
            let (start, end) = (pos / block * block, end.div_ceil(block).saturating_mul(block).min(size));
            match ranges.last_mut() {
                Some((_, last)) if *last >= start => *last = end,
                _ => ranges.push((start, end)),
            }
        }
        pos = end;
    }
    let mut pieces = Vec::new();
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            let next = ((at / PIECE + 1) * PIECE).min(end);
            pieces.push((at, (next - at) as usize));
            at = next;
        }
    }
    Ok(pieces)
}

/// Progress on a terminal (a line with the rate and the time left, as
/// `qemu-img convert -p`), or as JSON lines for scripts (`--json`).
struct Progress {
    mode: ProgressMode,
    size: u64,
    total: u64,
    done: AtomicU64,
    started: Instant,
    /// When the last line was printed, in ms since `started`.
    last: AtomicU64,
}

#[derive(Clone, Copy, PartialEq)]
pub enum ProgressMode {
    Quiet,
    Terminal,
    Json,
}

impl Progress {
    fn new(mode: ProgressMode, size: u64, total: u64) -> Progress {
        Progress { mode, size, total, done: AtomicU64::new(0), started: Instant::now(), last: AtomicU64::new(0) }
    }

    fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last.load(Ordering::Relaxed);
        // At most five lines a second.
        if self.mode != ProgressMode::Quiet
            && now >= last + 200
            && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.print(done, false);
        }
    }

    fn finish(&self) {
        if self.mode != ProgressMode::Quiet {
            self.print(self.total, true);
        }
    }

    fn print(&self, done: u64, end: bool) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let left = if rate > 0.0 { (self.total - done.min(self.total)) as f64 / rate } else { 0.0 };
        let pct = if self.total == 0 { 100.0 } else { done as f64 * 100.0 / self.total as f64 };
        let mut err = std::io::stderr().lock();
        let _ = match self.mode {
            ProgressMode::Json => writeln!(
                err,
                "{{\"done\":{done},\"total\":{},\"size\":{},\"seconds\":{secs:.3},\"finished\":{end}}}",
                self.total, self.size
            ),
            _ => write!(
                err,
                "\r{pct:5.1}%  {:>8.1} MiB/s  {:>5.0} s left {}",
                rate / (1 << 20) as f64,
                left,
                if end { "\n" } else { "" }
            ),
        };
        let _ = err.flush();
    }
}
