//! A HEXZ archive opened for reading: its index, its key, its parents, and
//! the views of its two streams.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tracing::warn;
use zstd::zstd_safe::DDict;

use crate::cache::{block_mut, new_block, BlockCache, BlockKey, BlockKind};
use crate::error::{Error, Result};
use crate::io::{check_named, with_scratch, OpenRules, Source};
use crate::view::{Extent, View};

use super::codec::{self, Key, Part, MAX_BLOCK};
use super::header::{Codec, Header, HEADER_SIZE, MAGIC};
use super::index::{self, BlockInfo, MasterIndex, PageEntry, BLOCK_INFO_SIZE, LEGACY_BLOCK_INFO_SIZE};
use super::manifest::Manifest;

/// Archives in one parent chain, counted over the whole tree of parents.
pub const MAX_CHAIN: usize = 64;
/// hexz's own reader refuses fewer iterations; more than this would make a
/// hostile header stall the mount for minutes.
const MIN_ITERATIONS: u32 = 100_000;
#[cfg(not(fuzzing))]
const MAX_ITERATIONS: u32 = 20_000_000;
/// Fuzzing: key derivations within the one-second budget per input (the
/// bound itself is what is under test). hexz's own 600,000 take over a
/// second under ASan, so encrypted inputs are fuzzed up to the key check.
#[cfg(fuzzing)]
const MAX_ITERATIONS: u32 = MIN_ITERATIONS;
const MAX_METADATA: u32 = 64 << 20;
/// Missing blocks of one read (or read-ahead) are fetched with one `pread`
/// per run of them in the file, merged across gaps of up to this many bytes
/// (reading a gap costs less than another request on a cold disk) ...
const MERGE_GAP: u64 = 256 << 10;
/// ... and at most this many bytes per run (a single larger block is a run
/// of its own).
const MAX_RUN: u64 = 4 << 20;
/// How far ahead of a sequential reader blocks are decoded into the cache
/// (at most a quarter of the cache, so read-ahead does not evict itself).
const READ_AHEAD: u64 = 4 << 20;
/// A read continues the previous one if it starts this near its end: behind
/// it (FUSE's worker threads may take a sequential reader's requests a
/// little out of order) ...
const SEQUENTIAL_BEHIND: u64 = 1 << 20;
/// ... or ahead of it.
const SEQUENTIAL_AHEAD: u64 = 128 << 10;
/// The most blocks one read-ahead window fetches (4 MiB of hexz's smallest
/// CDC chunks, 16 KiB, is 256).
const MAX_AHEAD_BLOCKS: usize = 1024;
const MAX_DICTIONARY: u32 = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Main,
    Auxiliary,
}

pub use crate::format::PasswordSource;

/// Where a content hash is found in an archive's own blocks.
#[derive(Clone, Copy)]
enum Located {
    Stored { global: u64, info: BlockInfo },
    Zero { len: u32 },
}

pub struct HexzArchive {
    path: PathBuf,
    file: Arc<Source>,
    header: Header,
    index: MasterIndex,
    cache: Arc<BlockCache>,
    key: Option<Key>,
    dict: Option<DDict<'static>>,
    manifest: Option<Manifest>,
    parents: Vec<(String, Arc<HexzArchive>)>,
    /// Parents, grandparents, ... once each, nearest first: where parent
    /// references are looked up.
    ancestors: Vec<Arc<HexzArchive>>,
    /// Content hash -> own block, built on the first parent lookup.
    hashes: OnceLock<HashMap<[u8; 32], Located>>,
    /// Per stream (main, auxiliary): who reads it sequentially.
    sequence: [Sequence; 2],
}

/// Where the last read of a stream ended, whether it continued the one
/// before, and how far its blocks have been decoded ahead into the
/// cache. Shared by all threads; a race costs at most a missed or a
/// repeated read-ahead.
struct Sequence {
    /// `u64::MAX`: no read yet.
    last_end: AtomicU64,
    /// Whether the last read continued the one before it.
    continued: AtomicBool,
    ahead: AtomicU64,
}

impl Default for Sequence {
    fn default() -> Self {
        Sequence { last_end: AtomicU64::new(u64::MAX), continued: AtomicBool::new(false), ahead: AtomicU64::new(0) }
    }
}

/// A stored block a read needs: its entry, global index and logical start.
#[derive(Clone, Copy)]
struct Want {
    global: u64,
    info: BlockInfo,
    logical: u64,
}

/// A run of a stream: a block, or a stretch no block covers.
enum Piece {
    Block { start: u64, global: u64, info: BlockInfo },
    Uncovered { start: u64, end: u64 },
}

impl HexzArchive {
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self) -> &Arc<Source> {
        &self.file
    }
    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn index(&self) -> &MasterIndex {
        &self.index
    }
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }
    pub fn parents(&self) -> &[(String, Arc<HexzArchive>)] {
        &self.parents
    }

    pub fn stream_size(&self, stream: Stream) -> u64 {
        match stream {
            Stream::Main => self.index.main_size,
            Stream::Auxiliary => self.index.aux_size,
        }
    }

    fn pages(&self, stream: Stream) -> &[PageEntry] {
        match stream {
            Stream::Main => &self.index.main_pages,
            Stream::Auxiliary => &self.index.aux_pages,
        }
    }

    pub fn has_auxiliary(&self) -> bool {
        self.index.aux_size > 0 || !self.index.aux_pages.is_empty()
    }

    pub fn view(self: &Arc<Self>, stream: Stream) -> StreamView {
        StreamView { archive: self.clone(), stream }
    }

    /// The block entries of one index page, from the cache or the file.
    /// One index page from the cache or the file, as cached: the page as
    /// stored (a count, then 52-byte entries), followed by each block's
    /// logical end (u64 LE), so a read finds its block by binary search
    /// instead of walking up to 4096 entries.
    fn page(&self, entry: &PageEntry) -> Result<Arc<[u8]>> {
        let key = BlockKey { file: self.file.id(), kind: BlockKind::Table, offset: entry.offset };
        self.cache.get_or_load(key, || {
            if entry.offset.checked_add(entry.length as u64).is_none_or(|e| e > self.file.len()) {
                return Err(self.corrupt(entry.start_logical, "index page runs past the end of the file"));
            }
            let len = entry.length as usize;
            let mut count = [0u8; 8];
            self.file.read_at(&mut count, entry.offset)?;
            let n = u64::from_le_bytes(count);
            if n.checked_mul(BLOCK_INFO_SIZE).and_then(|b| b.checked_add(8)) != Some(len as u64) {
                return Err(self.corrupt(entry.start_logical, "index page length does not match its entry count"));
            }
            let mut page = new_block(len + 8 * n as usize);
            let bytes = block_mut(&mut page);
            self.file.read_at(&mut bytes[..len], entry.offset)?;
            let mut end = entry.start_logical;
            for j in 0..n as usize {
                let info = BlockInfo::parse(&bytes[8 + j * 52..8 + j * 52 + 52]);
                end = end.saturating_add(info.logical_len as u64);
                bytes[len + j * 8..len + j * 8 + 8].copy_from_slice(&end.to_le_bytes());
            }
            Ok(page)
        })
    }

    /// Every index page of both streams with its entry, main stream first.
    fn all_pages(&self) -> impl Iterator<Item = (&PageEntry, Result<Arc<[u8]>>)> {
        [Stream::Main, Stream::Auxiliary]
            .into_iter()
            .flat_map(|stream| self.pages(stream).iter())
            .map(|entry| (entry, self.page(entry)))
    }

    /// The cache key of a stored block: its file offset, so deduplicated
    /// entries share one cached block.
    fn block_key(&self, info: &BlockInfo) -> BlockKey {
        BlockKey { file: self.file.id(), kind: BlockKind::Decompressed, offset: info.offset }
    }

    fn corrupt(&self, offset: u64, msg: impl Into<String>) -> Error {
        Error::corrupt(&self.path, offset, msg)
    }

    /// The pieces covering `[from, to)` of a stream, in order.
    fn pieces(&self, stream: Stream, from: u64, to: u64, mut each: impl FnMut(Piece) -> Result<bool>) -> Result<()> {
        let pages = self.pages(stream);
        let first = pages.partition_point(|p| p.start_logical <= from).saturating_sub(1);
        let mut pos = from;
        for entry in pages.iter().skip(first) {
            if pos >= to {
                return Ok(());
            }
            if entry.start_logical > pos {
                let end = entry.start_logical.min(to);
                if !each(Piece::Uncovered { start: pos, end })? {
                    return Ok(());
                }
                pos = end;
                if pos >= to {
                    return Ok(());
                }
            }
            let page = self.page(entry)?;
            let ends = page_parts(&page).1;
            let first_block = ends.first_ending_after(pos);
            let mut start = if first_block == 0 { entry.start_logical } else { ends.end(first_block - 1) };
            for (global, info) in page_blocks(entry, &page).skip(first_block) {
                let end = start.saturating_add(info.logical_len as u64);
                if end > pos && info.logical_len > 0 {
                    if start >= to {
                        return Ok(());
                    }
                    if !each(Piece::Block { start, global, info })? {
                        return Ok(());
                    }
                    pos = end;
                }
                start = end;
            }
            pos = pos.max(start);
        }
        if pos < to {
            each(Piece::Uncovered { start: pos, end: to })?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of a stream at `offset`; past the declared
    /// size, zeros.
    ///
    /// The stored blocks the read needs that are not cached are fetched
    /// together (`fetch`: one `pread` per run of them in the file, decoded
    /// on several threads), with the next blocks too when the read
    /// continues the previous one (read-ahead). A small read that misses
    /// only part of one block decodes only up to what it asked for, and that
    /// partial block is not cached.
    pub fn read_stream(&self, stream: Stream, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.stream_size(stream);
        let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        let end = offset + n as u64;
        let sequential = self.continues(stream, offset, end);
        let mut pieces = Vec::new();
        self.pieces(stream, offset, end, |piece| {
            pieces.push(piece);
            Ok(true)
        })?;

        // What the cache holds, and what is missing.
        let mut have: Vec<Option<Arc<[u8]>>> = vec![None; pieces.len()];
        let mut missing = Vec::new();
        let mut missing_piece = 0;
        for (i, piece) in pieces.iter().enumerate() {
            if let Piece::Block { start, global, info } = *piece {
                if info.is_sparse() || info.is_parent_ref() {
                    continue;
                }
                match self.cache.get(&self.block_key(&info)) {
                    Some(b) if b.len() == info.logical_len as usize => have[i] = Some(b),
                    _ => {
                        missing.push(Want { global, info, logical: start });
                        missing_piece = i;
                    }
                }
            }
        }
        let ahead = if sequential { self.read_ahead(stream, end) } else { Vec::new() };
        let mut fetched = HashMap::new();
        if let ([want], false) = (&missing[..], sequential) {
            // One block, maybe only its start wanted: decode no further
            // (a sequential reader will want the rest: it decodes whole).
            let need = end.min(want.logical + want.info.logical_len as u64) - want.logical;
            have[missing_piece] = Some(self.decode_part(want, need as usize)?);
        } else if !missing.is_empty() || !ahead.is_empty() {
            missing.extend(ahead);
            fetched = self.fetch(missing);
        }

        for (i, piece) in pieces.into_iter().enumerate() {
            let (start, bytes_end) = match &piece {
                Piece::Block { start, info, .. } => (*start, start + info.logical_len as u64),
                Piece::Uncovered { start, end } => (*start, *end),
            };
            let lo = start.max(offset);
            let hi = bytes_end.min(end);
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match piece {
                Piece::Uncovered { .. } => self.read_uncovered(stream, dst, lo)?,
                Piece::Block { start, global, info } => {
                    let within = (lo - start) as usize;
                    if info.is_sparse() {
                        dst.fill(0);
                        continue;
                    }
                    let block = match (have[i].take(), fetched.get(&info.offset)) {
                        (Some(b), _) => b,
                        (None, Some(b)) if b.len() == info.logical_len as usize && !info.is_parent_ref() => {
                            Arc::clone(b)
                        }
                        // A parent reference, or a block that failed to
                        // fetch: its own way (which reports the error).
                        _ => self.block_bytes(global, &info, start)?,
                    };
                    dst.copy_from_slice(&block[within..within + dst.len()]);
                }
            }
        }
        Ok(())
    }

    /// Notes a read of `[offset, end)`; whether it is sequential: it and the
    /// read before it each continued the one before. (One read landing near
    /// the last is chance for a random reader, 1 in 1000 on a 1 GiB disk,
    /// and would cost it a whole read-ahead window; two in a row are not.)
    fn continues(&self, stream: Stream, offset: u64, end: u64) -> bool {
        let seq = &self.sequence[stream as usize];
        let last = seq.last_end.swap(end, Ordering::Relaxed);
        let near = last != u64::MAX
            && offset <= last.saturating_add(SEQUENTIAL_AHEAD)
            && offset >= last.saturating_sub(SEQUENTIAL_BEHIND);
        let before = seq.continued.swap(near, Ordering::Relaxed);
        near && before
    }

    /// For a sequential reader now at `end`: the uncached stored blocks of
    /// the next read-ahead window, unless the blocks already decoded ahead
    /// still reach more than half a window past `end`.
    fn read_ahead(&self, stream: Stream, end: u64) -> Vec<Want> {
        let window = READ_AHEAD.min(self.cache.capacity() / 4);
        let seq = &self.sequence[stream as usize];
        let ahead = seq.ahead.load(Ordering::Relaxed);
        let from = if ahead > end && ahead - end <= window { ahead } else { end };
        let to = end.saturating_add(window).min(self.stream_size(stream));
        if from >= to || from - end > window / 2 {
            return Vec::new();
        }
        // One thread per window: another that got here first does it.
        if seq.ahead.compare_exchange(ahead, to, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return Vec::new();
        }
        let mut wants = Vec::new();
        let (mut bytes, mut stored) = (0u64, 0u64);
        // Errors (a damaged index page) are for a read there to report.
        let _ = self.pieces(stream, from, to, |piece| {
            if let Piece::Block { start, global, info } = piece {
                // Huge blocks (up to 64 MiB) are left to the read that needs them.
                if info.is_sparse() || info.is_parent_ref() || info.logical_len as u64 > window {
                    return Ok(true);
                }
                bytes += info.logical_len as u64;
                if self.cache.get(&self.block_key(&info)).is_none() {
                    stored += info.length as u64;
                    wants.push(Want { global, info, logical: start });
                }
                // A hostile index's tiny blocks with large stored sizes
                // must not turn a window into much more work than its bytes.
                return Ok(bytes < window && stored < 2 * window && wants.len() < MAX_AHEAD_BLOCKS);
            }
            Ok(true)
        });
        wants
    }

    /// Fetches and decodes stored blocks into the cache: sorted by file
    /// offset (deduplicated entries once), in runs of one `pread` each
    /// (merged across gaps up to `MERGE_GAP`, up to `MAX_RUN` bytes), each
    /// run's blocks decoded on several threads. Returns the blocks decoded,
    /// by file offset (a small cache may already have let them go). A block
    /// that fails is left out: the read that needs it decodes it alone and
    /// reports the error.
    fn fetch(&self, mut wants: Vec<Want>) -> HashMap<u64, Arc<[u8]>> {
        wants.retain(|w| self.check_stored(&w.info, w.logical).is_ok());
        wants.sort_unstable_by_key(|w| w.info.offset);
        wants.dedup_by_key(|w| w.info.offset);
        let mut got = HashMap::with_capacity(wants.len());
        let mut rest = &wants[..];
        while let Some(first) = rest.first() {
            let from = first.info.offset;
            let mut to = from + first.info.length as u64;
            let mut n = 1;
            for w in &rest[1..] {
                let end = (w.info.offset + w.info.length as u64).max(to);
                if w.info.offset > to + MERGE_GAP || end - from > MAX_RUN {
                    break;
                }
                to = end;
                n += 1;
            }
            let (run, later) = rest.split_at(n);
            rest = later;
            with_scratch((to - from) as usize, |stored| {
                if self.file.read_at(stored, from).is_err() {
                    return;
                }
                let stored = &*stored;
                let slots: Vec<OnceLock<Arc<[u8]>>> = run.iter().map(|_| OnceLock::new()).collect();
                let decode = |k: &usize| {
                    let w = &run[*k];
                    let at = (w.info.offset - from) as usize;
                    let raw = &stored[at..at + w.info.length as usize];
                    if let Ok((block, Part::Whole)) = self.decode_stored(w, raw, None) {
                        self.cache.insert(self.block_key(&w.info), block.clone());
                        let _ = slots[*k].set(block);
                    }
                };
                let items: Vec<usize> = (0..run.len()).collect();
                crate::spread(&items, decode);
                for (w, slot) in run.iter().zip(slots) {
                    if let Some(block) = slot.into_inner() {
                        got.insert(w.info.offset, block);
                    }
                }
            });
        }
        got
    }

    /// Decodes a missing block for a read that needs its first `need`
    /// bytes: the whole block (cached) unless stopping early saves work;
    /// a partly decoded block is returned for this read only, never cached.
    fn decode_part(&self, want: &Want, need: usize) -> Result<Arc<[u8]>> {
        let info = &want.info;
        self.check_stored(info, want.logical)?;
        let (block, part) = with_scratch(info.length as usize, |stored| {
            self.file.read_at(stored, info.offset)?;
            self.decode_stored(want, stored, Some(need))
        })?;
        if part == Part::Whole {
            self.cache.insert(self.block_key(info), block.clone());
        }
        Ok(block)
    }

    /// What no block covers: the parents' bytes at the same offset (as hexz
    /// does), else zeros.
    fn read_uncovered(&self, stream: Stream, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.parents.first() {
            Some((_, parent)) => parent.read_stream(stream, buf, offset),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// The bytes of a block: its own, or a parent's for a parent reference.
    fn block_bytes(&self, global: u64, info: &BlockInfo, logical: u64) -> Result<Arc<[u8]>> {
        if info.is_parent_ref() {
            return self.resolve_parent(info, logical);
        }
        self.stored_block(global, info, logical)
    }

    fn stored_block(&self, global: u64, info: &BlockInfo, logical: u64) -> Result<Arc<[u8]>> {
        if info.logical_len > MAX_BLOCK {
            return Err(self.corrupt(logical, format!("block of {} bytes (limit {MAX_BLOCK})", info.logical_len)));
        }
        let block = self.cache.get_or_load(self.block_key(info), || self.decode(global, info, logical))?;
        if block.len() != info.logical_len as usize {
            // Two entries sharing an offset with different sizes: only in a damaged index.
            return self.decode(global, info, logical);
        }
        Ok(block)
    }

    /// What is checked of a stored block's entry before any read or
    /// allocation for it.
    fn check_stored(&self, info: &BlockInfo, logical: u64) -> Result<()> {
        if info.logical_len > MAX_BLOCK {
            return Err(self.corrupt(logical, format!("block of {} bytes (limit {MAX_BLOCK})", info.logical_len)));
        }
        if info.offset.checked_add(info.length as u64).is_none_or(|e| e > self.file.len()) {
            return Err(self.corrupt(logical, format!("block at {:#x} runs past the end of the file", info.offset)));
        }
        // LZ4's worst case for the largest block, plus prefix and GCM tag.
        if info.length > MAX_BLOCK + MAX_BLOCK / 255 + 64 {
            return Err(
                self.corrupt(logical, format!("stored block of {} bytes is larger than any block", info.length))
            );
        }
        Ok(())
    }

    fn decode(&self, global: u64, info: &BlockInfo, logical: u64) -> Result<Arc<[u8]>> {
        self.check_stored(info, logical)?;
        let want = Want { global, info: *info, logical };
        with_scratch(info.length as usize, |stored| {
            self.file.read_at(stored, info.offset)?;
            self.decode_stored(&want, stored, None).map(|(block, _)| block)
        })
    }

    /// A block from its stored bytes (`check_stored` passed): CRC32 check,
    /// decryption, then decompression, whole, or with `need` only as far
    /// as that (`codec::decompress_part`).
    fn decode_stored(&self, want: &Want, stored: &[u8], need: Option<usize>) -> Result<(Arc<[u8]>, Part)> {
        let Want { global, info, logical } = *want;
        let crc = crc32fast::hash(stored);
        if crc != info.checksum {
            return Err(self.corrupt(
                logical,
                format!(
                    "block at {:#x}: CRC32 {crc:08x} does not match the index ({:08x})",
                    info.offset, info.checksum
                ),
            ));
        }
        let decrypted;
        let plain: &[u8] = match &self.key {
            Some(key) => {
                decrypted = key.decrypt(global, stored).map_err(|m| self.corrupt(logical, m))?;
                &decrypted
            }
            None => stored,
        };
        let mut out = new_block(info.logical_len as usize);
        let damaged = |m: String| self.corrupt(logical, format!("block at {:#x}: {m}", info.offset));
        let part = match need {
            Some(need) => {
                codec::decompress_part(self.header.codec, self.dict.as_ref(), plain, block_mut(&mut out), need)
                    .map_err(damaged)?
            }
            None => {
                codec::decompress(self.header.codec, self.dict.as_ref(), plain, block_mut(&mut out))
                    .map_err(damaged)?;
                Part::Whole
            }
        };
        Ok((out, part))
    }

    fn hash_index(&self) -> &HashMap<[u8; 32], Located> {
        self.hashes.get_or_init(|| {
            let mut map = HashMap::new();
            for (entry, page) in self.all_pages() {
                let page = match page {
                    Ok(p) => p,
                    Err(e) => {
                        warn!("{e}; its blocks cannot serve parent references");
                        continue;
                    }
                };
                for (global, info) in page_blocks(entry, &page) {
                    if info.hash == [0; 32] || info.is_parent_ref() {
                        continue;
                    }
                    let located = if info.is_sparse() {
                        Located::Zero { len: info.logical_len }
                    } else {
                        Located::Stored { global, info }
                    };
                    map.entry(info.hash).or_insert(located);
                }
            }
            map
        })
    }

    /// Finds a parent reference's content by hash in the parents, then
    /// their parents, and so on (hexz 0.8.2 stops at the first level and
    /// returns zeros; a reference nobody holds is an error here).
    fn resolve_parent(&self, info: &BlockInfo, logical: u64) -> Result<Arc<[u8]>> {
        for ancestor in &self.ancestors {
            match ancestor.hash_index().get(&info.hash) {
                Some(Located::Stored { global, info: found }) if found.logical_len == info.logical_len => {
                    return ancestor.stored_block(*global, found, logical);
                }
                Some(Located::Zero { len }) if *len == info.logical_len => {
                    return Ok(vec![0u8; *len as usize].into());
                }
                _ => {}
            }
        }
        let hash: String = info.hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Err(self.corrupt(logical, format!("block {hash}… is referenced from a parent archive, but no parent holds it")))
    }

    /// The run of equal allocation from `offset`: consecutive blocks of one
    /// kind are merged in one walk (a whole-archive `stat` is one pass over
    /// the index, not one page walk per block).
    fn extent(&self, stream: Stream, offset: u64, max: u64) -> Result<Extent> {
        let limit = offset + (self.stream_size(stream) - offset).min(max.max(1));
        let mut found: Option<Extent> = None;
        self.pieces(stream, offset, limit, |piece| {
            // `whole`: the piece's state is known to its end (a parent's
            // extent may be shorter than an uncovered stretch).
            let (end, data, whole) = match piece {
                Piece::Block { start, info, .. } => (start + info.logical_len as u64, !info.is_sparse(), true),
                Piece::Uncovered { start, end } => match self.parents.first() {
                    Some((_, p)) if start < p.stream_size(stream) => {
                        let e = p.extent(stream, start, end - start)?;
                        (start + e.len.min(end - start), e.data, e.len >= end - start)
                    }
                    _ => (end, false, true),
                },
            };
            match &mut found {
                None => found = Some(Extent { len: end - offset, data }),
                Some(e) if e.data == data => e.len = end - offset,
                Some(_) => return Ok(false),
            }
            Ok(whole)
        })?;
        let mut e = found.unwrap_or(Extent { len: limit - offset, data: false });
        e.len = e.len.clamp(1, limit - offset);
        Ok(e)
    }
}

/// A cached page's blocks, each with its archive-global index.
fn page_blocks<'a>(entry: &PageEntry, page: &'a [u8]) -> impl Iterator<Item = (u64, BlockInfo)> + 'a {
    let start_block = entry.start_block;
    page_parts(page)
        .0
        .chunks_exact(BLOCK_INFO_SIZE as usize)
        .enumerate()
        .map(move |(j, raw)| (start_block.wrapping_add(j as u64), BlockInfo::parse(raw)))
}

/// A cached page's entries (52 bytes each) and its blocks' logical ends.
fn page_parts(page: &[u8]) -> (&[u8], Ends<'_>) {
    let n = u64::from_le_bytes(page[..8].try_into().unwrap()) as usize;
    let entries_end = 8 + n * BLOCK_INFO_SIZE as usize;
    (&page[8..entries_end], Ends(&page[entries_end..]))
}

/// The u64 LE block ends appended to a cached page.
struct Ends<'a>(&'a [u8]);

impl Ends<'_> {
    fn len(&self) -> usize {
        self.0.len() / 8
    }

    fn end(&self, j: usize) -> u64 {
        u64::from_le_bytes(self.0[j * 8..j * 8 + 8].try_into().unwrap())
    }

    /// The first block that ends past `pos` (ends are non-decreasing).
    fn first_ending_after(&self, pos: u64) -> usize {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.end(mid) <= pos {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// One stream of an archive as a view.
pub struct StreamView {
    archive: Arc<HexzArchive>,
    stream: Stream,
}

impl View for StreamView {
    fn size(&self) -> u64 {
        self.archive.stream_size(self.stream)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.archive.read_stream(self.stream, buf, offset)
    }

    fn extent(&self, offset: u64, max: u64) -> Result<Extent> {
        self.archive.extent(self.stream, offset, max)
    }
}

/// Opens an archive and its parents. `passwords` is asked for each
/// encrypted archive met.
pub fn open_hexz(
    path: &Path,
    cache: &Arc<BlockCache>,
    passwords: PasswordSource,
    rules: &OpenRules,
) -> Result<Arc<HexzArchive>> {
    let mut opened = Vec::new();
    open_in_chain(path, None, cache, passwords, rules, &mut Vec::new(), &mut opened)
}

/// Opens the archive at `path`, named (as the second item) as a parent
/// inside `child`, or given by the user when `child` is `None`.
fn open_in_chain(
    path: &Path,
    child: Option<(&Source, &str)>,
    cache: &Arc<BlockCache>,
    passwords: PasswordSource,
    rules: &OpenRules,
    chain: &mut Vec<PathBuf>,
    opened: &mut Vec<(PathBuf, Arc<HexzArchive>)>,
) -> Result<Arc<HexzArchive>> {
    let bad = |msg: String| Error::open(path, msg);
    // Checked before the shared-parent shortcut below: each child that
    // names a parent must be allowed to.
    if let (Some((child, name)), false) = (child, rules.trust_backing) {
        check_named(child, name, path, "parent archive")?;
    }
    let canonical = crate::io::canonical(path)?;
    if chain.contains(&canonical) {
        return Err(bad("parent chain loops back to this archive".into()));
    }
    // A parent shared by two children is opened once.
    if let Some((_, a)) = opened.iter().find(|(p, _)| *p == canonical) {
        return Ok(a.clone());
    }
    if opened.len() >= MAX_CHAIN {
        return Err(bad(format!("parent chain of more than {MAX_CHAIN} archives")));
    }
    let file = Arc::new(Source::open_image(path, rules)?);
    let mut block = vec![0u8; HEADER_SIZE];
    file.read_at(&mut block, 0)?;
    if block[0..4] != MAGIC {
        return Err(bad("not a HEXZ archive (no HEXZ magic)".into()));
    }
    let index_offset = u64::from_le_bytes(block[12..20].try_into().unwrap());
    let index = read_master(&file, index_offset).map_err(|m| bad(format!("bad index: {m}")))?;
    refuse_legacy(&file, &index).map_err(bad)?;
    let header = Header::parse(&block).map_err(|m| bad(format!("bad header: {m}")))?;

    let dict = match header.dictionary {
        Some((off, len)) if len > 0 && header.codec == Codec::Zstd => {
            if len > MAX_DICTIONARY || off.checked_add(len as u64).is_none_or(|e| e > file.len()) {
                return Err(bad("bad header: zstd dictionary out of the file".into()));
            }
            let mut raw = vec![0u8; len as usize];
            file.read_at(&mut raw, off)?;
            Some(DDict::create(&raw))
        }
        _ => None,
    };
    let manifest = match header.metadata {
        Some((off, len)) if len > 0 => {
            if len > MAX_METADATA || off.checked_add(len as u64).is_none_or(|e| e > file.len()) {
                return Err(bad("bad header: metadata out of the file".into()));
            }
            let mut raw = vec![0u8; len as usize];
            file.read_at(&mut raw, off)?;
            Manifest::parse(&raw)
        }
        _ => None,
    };

    chain.push(canonical.clone());
    let mut parents = Vec::new();
    for name in &header.parent_paths {
        // Against where the archive really is (a remote one may have been
        // redirected).
        let parent_path = resolve_parent_path(file.path(), name, rules)?;
        let parent = open_in_chain(&parent_path, Some((&file, name)), cache, passwords, rules, chain, opened)?;
        parents.push((name.clone(), parent));
    }
    chain.pop();
    let mut ancestors: Vec<Arc<HexzArchive>> = Vec::new();
    for (_, p) in &parents {
        for a in std::iter::once(p).chain(p.ancestors.iter()) {
            if !ancestors.iter().any(|x| Arc::ptr_eq(x, a)) {
                ancestors.push(a.clone());
            }
        }
    }

    let mut archive = HexzArchive {
        path: path.to_path_buf(),
        file,
        header,
        index,
        cache: cache.clone(),
        key: None,
        dict,
        manifest,
        parents,
        ancestors,
        hashes: OnceLock::new(),
        sequence: Default::default(),
    };
    if let Some(enc) = archive.header.encryption.clone() {
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&enc.iterations) {
            return Err(bad(format!(
                "encryption with {} PBKDF2 iterations (accepted: {MIN_ITERATIONS} to {MAX_ITERATIONS})",
                enc.iterations
            )));
        }
        let password = passwords(path).map_err(|m| bad(format!("encrypted archive: {m}")))?;
        archive.key = Some(Key::derive(password.as_bytes(), &enc.salt, enc.iterations));
        archive.check_password()?;
    }
    let archive = Arc::new(archive);
    opened.push((canonical, archive.clone()));
    Ok(archive)
}

/// What the index says about an archive's blocks (for info.json).
#[derive(Debug, Default)]
pub struct BlockStats {
    pub entries: u64,
    pub stored: u64,
    pub deduplicated: u64,
    pub sparse: u64,
    pub parent_refs: u64,
    pub stored_bytes: u64,
    pub logical_bytes: u64,
    pub unreadable_pages: u64,
}

impl HexzArchive {
    /// Walks every index page once.
    pub fn block_stats(&self) -> BlockStats {
        let mut st = BlockStats::default();
        let mut offsets = std::collections::HashSet::new();
        for (entry, page) in self.all_pages() {
            let Ok(page) = page else {
                st.unreadable_pages += 1;
                continue;
            };
            for (_, info) in page_blocks(entry, &page) {
                st.entries += 1;
                st.logical_bytes += info.logical_len as u64;
                if info.is_parent_ref() {
                    st.parent_refs += 1;
                } else if info.is_sparse() {
                    st.sparse += 1;
                } else if offsets.insert(info.offset) {
                    st.stored += 1;
                    st.stored_bytes += info.length as u64;
                } else {
                    st.deduplicated += 1;
                }
            }
        }
        st
    }

    /// Decrypts the first stored block: a wrong password fails the GCM tag.
    fn check_password(&self) -> Result<()> {
        for (entry, page) in self.all_pages() {
            let page = page?;
            let first_stored = page_blocks(entry, &page).find(|(_, info)| !info.is_parent_ref() && !info.is_sparse());
            if let Some((global, info)) = first_stored {
                let mut stored = vec![0u8; (info.length as u64).min(self.file.len()) as usize];
                self.file.read_at(&mut stored, info.offset)?;
                let key = self.key.as_ref().expect("checked only with a key");
                return key
                    .decrypt(global, &stored)
                    .map(|_| ())
                    .map_err(|_| Error::open(&self.path, "wrong password (the first block does not decrypt)"));
            }
        }
        Ok(())
    }
}

/// Reads the master index field by field: metadata and a signature may
/// follow it, and counts are checked against the file before reading.
fn read_master(file: &Source, offset: u64) -> std::result::Result<MasterIndex, String> {
    let len = file.len();
    if offset < HEADER_SIZE as u64 || offset >= len {
        return Err(format!("index offset {offset:#x} is outside the file"));
    }
    let read = |at: u64, n: u64| -> std::result::Result<Vec<u8>, String> {
        if at.checked_add(n).is_none_or(|e| e > len) {
            return Err("master index runs past the end of the file".into());
        }
        let mut buf = vec![0u8; n as usize];
        file.read_at(&mut buf, at).map_err(|e| e.to_string())?;
        Ok(buf)
    };
    let main_count = u64::from_le_bytes(read(offset, 8)?.try_into().unwrap());
    let main_bytes = main_count.checked_mul(index::PAGE_ENTRY_SIZE).ok_or("page count overflows")?;
    let aux_at = offset.checked_add(8 + main_bytes).ok_or("page count overflows")?;
    let aux_count = u64::from_le_bytes(read(aux_at, 8)?.try_into().unwrap());
    let aux_bytes = aux_count.checked_mul(index::PAGE_ENTRY_SIZE).ok_or("page count overflows")?;
    let total = (8 + main_bytes).checked_add(8 + aux_bytes + 16).ok_or("page count overflows")?;
    index::parse_master(&read(offset, total)?)
}

/// Archives from hexz before 0.5 carry the same version number but 20-byte
/// block entries: recognised by their first index page, and refused.
fn refuse_legacy(file: &Source, index: &MasterIndex) -> std::result::Result<(), String> {
    let Some(entry) = index.main_pages.first().or(index.aux_pages.first()) else {
        return Ok(());
    };
    let mut count = [0u8; 8];
    file.read_at(&mut count, entry.offset).map_err(|e| e.to_string())?;
    let n = u64::from_le_bytes(count);
    let fits = |size: u64| n.checked_mul(size).and_then(|b| b.checked_add(8)) == Some(entry.length as u64);
    if fits(LEGACY_BLOCK_INFO_SIZE) && !fits(BLOCK_INFO_SIZE) {
        return Err("archive written by hexz before 0.5 (20-byte block entries); snapmount reads the format of hexz 0.5 and later; repack it with a current hexz".into());
    }
    Ok(())
}

/// Parent paths: absolute as stored; relative ones against the child's
/// directory, then the current directory (hexz's tools disagree; this
/// finds what any of them would).
fn resolve_parent_path(child: &Path, name: &str, rules: &OpenRules) -> Result<PathBuf> {
    if rules.mapped(name).is_some() || crate::io::remote::is_url(child) {
        return crate::io::resolve_name(child, name, "parent archive", rules);
    }
    let p = Path::new(name);
    if p.is_absolute() {
        if p.exists() {
            return Ok(p.to_path_buf());
        }
        return Err(Error::open(child, format!("parent archive '{name}' not found")));
    }
    let dir = child.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let beside = dir.join(p);
    if beside.exists() {
        return Ok(beside);
    }
    if p.exists() {
        return Ok(std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
    }
    Err(Error::open(child, format!("parent archive '{name}' not found (looked for {} and ./{name})", beside.display())))
}
