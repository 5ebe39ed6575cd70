//! Writing the exported disk: only its non-zero 4 KiB blocks (the rest stay
//! holes, as `qemu-img convert` leaves them), with O_DIRECT and many writes
//! in flight where the kernel allows it, else with plain positioned writes.
//!
//! Why O_DIRECT: a write through the page cache copies every byte into newly
//! allocated cache pages, which cost several times more CPU than the disk
//! takes to store them (on the 2-CPU VM of BENCHMARKS.md, 1 GiB: 2.5–3.8 s
//! buffered + flush, 0.6–0.7 s O_DIRECT + flush). Why an io_uring: writes
//! into holes take the inode lock exclusively until they complete, so
//! synchronous writers queue one behind the other (48 KiB runs: 1.75 s for
//! 1 GiB with one thread or four); asynchronous ones keep the disk busy.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use io_uring::{opcode, types, IoUring};

/// O_DIRECT alignment of memory, offsets and lengths (the logical block
/// size of every disk in use is 512 or 4096), and the granule of holes.
pub const BLOCK: usize = 4096;

/// Writes in flight at most (fio on this disk: 48 KiB runs into holes reach
/// 1.1 GB/s at depth 32, 175 MB/s at depth 1).
const DEPTH: u32 = 64;

/// A piece's bytes, in memory aligned for O_DIRECT.
pub struct Buffer {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buffer {
    pub fn new(len: usize) -> Buffer {
        let raw = vec![0u8; len + BLOCK];
        let start = raw.as_ptr().align_offset(BLOCK);
        Buffer { raw, start, len }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// The runs of blocks of `data` that hold a non-zero byte: (start, len).
/// Blocks are counted from the start of `data`, which the caller places at a
/// block-aligned file offset.
pub fn data_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in data.chunks(BLOCK).enumerate() {
        if is_zero(block) {
            continue;
        }
        let at = i * BLOCK;
        match runs.last_mut() {
            Some((start, len)) if *start + *len == at => *len += block.len(),
            _ => runs.push((at, block.len())),
        }
    }
    runs
}

fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

/// A piece handed to the writer, kept until all its writes complete.
struct Slot {
    buffer: Buffer,
    /// (file offset, start in the buffer, length) of each write.
    writes: Vec<(u64, usize, usize)>,
    pending: usize,
}

impl Drop for Direct {
    /// On an error, the writes still in flight read their buffers: wait for
    /// them before the buffers go.
    fn drop(&mut self) {
        while self.in_flight > 0 && self.ring.submit_and_wait(1).is_ok() {
            self.in_flight -= self.ring.completion().count() as u32;
        }
    }
}

/// The output file: opened plainly (the unaligned tail, the final flush, and
/// everything when O_DIRECT or io_uring are unavailable, as on tmpfs) and,
/// where possible, with O_DIRECT under an io_uring.
pub struct Output {
    path: PathBuf,
    plain: File,
    direct: Option<Direct>,
    written: u64,
}

struct Direct {
    file: File,
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    in_flight: u32,
    /// False once O_DIRECT refused a write: plain writes do the rest.
    usable: bool,
}

impl Direct {
    /// Queues `writes` of `buffer`, which stays in a slot until they are
    /// all reaped.
    fn submit(
        &mut self,
        buffer: Buffer,
        writes: Vec<(u64, usize, usize)>,
        plain: &File,
        done: &mut Vec<Buffer>,
    ) -> io::Result<()> {
        let index = match self.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let base = buffer.bytes().as_ptr();
        let fd = types::Fd(self.file.as_raw_fd());
        let entries: Vec<_> = writes
            .iter()
            .enumerate()
            .map(|(w, &(offset, start, len))| {
                opcode::Write::new(fd, base.wrapping_add(start), len as u32)
                    .offset(offset)
                    .build()
                    .user_data(((index as u64) << 32) | w as u64)
            })
            .collect();
        self.slots[index] = Some(Slot { pending: writes.len(), writes, buffer });
        for entry in entries {
            while self.in_flight >= DEPTH {
                self.reap(1, plain, done)?;
            }
            // SAFETY: the bytes written belong to the buffer in slot
            // `index`, whose heap allocation stays put and alive until this
            // write's completion is reaped; the queue has room, since fewer
            // than DEPTH writes are in flight.
            unsafe { self.ring.submission().push(&entry) }.expect("the submission queue has room");
            self.in_flight += 1;
        }
        self.ring.submit()?;
        Ok(())
    }

    /// Collects completed writes (waiting for at least `wait`), moving the
    /// buffers of finished pieces into `done`. A short write is completed
    /// with a plain write; a write O_DIRECT refuses (EINVAL: an alignment
    /// this file system does not take) is redone plainly, and plain writes
    /// do the rest.
    fn reap(&mut self, wait: usize, plain: &File, done: &mut Vec<Buffer>) -> io::Result<()> {
        if wait > 0 {
            self.ring.submit_and_wait(wait)?;
        }
        let completed: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        // Every completion is accounted for even after an error, so that
        // the count of writes in flight stays true (drop waits for it).
        let mut first_error = None;
        for (tag, result) in completed {
            self.in_flight -= 1;
            let index = (tag >> 32) as usize;
            let slot = self.slots[index].as_mut().expect("a write in flight has its slot");
            let (offset, start, len) = slot.writes[(tag & 0xffff_ffff) as usize];
            let wrote = match result {
                r if r == -libc::EINVAL => {
                    self.usable = false;
                    Some(0)
                }
                r if r < 0 => {
                    first_error.get_or_insert(io::Error::from_raw_os_error(-r));
                    None
                }
                r => Some(r as usize),
            };
            if let Some(wrote) = wrote.filter(|&w| w < len) {
                let rest = plain.write_all_at(&slot.buffer.bytes()[start + wrote..start + len], offset + wrote as u64);
                if let Err(e) = rest {
                    first_error.get_or_insert(e);
                }
            }
            slot.pending -= 1;
            if slot.pending == 0 {
                done.push(self.slots[index].take().expect("just seen").buffer);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
impl Output {
    /// Creates (or truncates) `path` as a sparse file of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<Output> {
        let plain = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
        plain.set_len(size).with_context(|| format!("{}: cannot size", path.display()))?;
        // Either part may be refused (tmpfs has no O_DIRECT; a sandbox may
        // forbid io_uring): plain writes then do all the work.
        let direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok().and_then(|file| {
            Some(Direct { file, ring: IoUring::new(DEPTH).ok()?, slots: Vec::new(), in_flight: 0, usable: true })
        });
        Ok(Output { path: path.into(), plain, direct, written: 0 })
    }

    /// Bytes written so far (the rest are holes).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes the non-zero blocks of `buffer`'s first `n` bytes at `at` (a
    /// multiple of BLOCK). Returns the buffers whose writes have completed,
    /// for reuse (this one, at once, if nothing of it is in flight).
    pub fn write(&mut self, at: u64, n: usize, buffer: Buffer) -> Result<Vec<Buffer>> {
        debug_assert_eq!(at % BLOCK as u64, 0);
        let Output { path, plain, direct, written } = self;
        let failed = || format!("{}: write failed", path.display());
        let direct = direct.as_mut().filter(|d| d.usable);
        let mut writes = Vec::new();
        for (start, len) in data_runs(&buffer.bytes()[..n]) {
            *written += len as u64;
            // O_DIRECT takes whole blocks; a view's last bytes may not be one.
            let whole = if direct.is_some() { len / BLOCK * BLOCK } else { 0 };
            if whole > 0 {
                writes.push((at + start as u64, start, whole));
            }
            if whole < len {
                let (s, l) = (start + whole, len - whole);
                plain.write_all_at(&buffer.bytes()[s..s + l], at + s as u64).with_context(failed)?;
            }
        }
        let mut done = Vec::new();
        match direct {
            Some(direct) if !writes.is_empty() => {
                direct.submit(buffer, writes, plain, &mut done).with_context(failed)?;
                direct.reap(0, plain, &mut done).with_context(failed)?;
            }
            _ => done.push(buffer),
        }
        Ok(done)
    }

    /// Whether writes are in flight (their buffers are not back yet).
    pub fn busy(&self) -> bool {
        self.direct.as_ref().is_some_and(|d| d.in_flight > 0)
    }

    /// Waits until at least one write in flight completes; returns the
    /// buffers that are free again.
    pub fn wait(&mut self) -> Result<Vec<Buffer>> {
        let mut done = Vec::new();
        if let Some(direct) = self.direct.as_mut().filter(|d| d.in_flight > 0) {
            let failed = || format!("{}: write failed", self.path.display());
            direct.reap(1, &self.plain, &mut done).with_context(failed)?;
        }
        Ok(done)
    }

    /// Waits for every write in flight, then (with `sync`) for the disk.
    pub fn finish(mut self, sync: bool) -> Result<()> {
        if let Some(direct) = self.direct.as_mut() {
            while direct.in_flight > 0 {
                let failed = || format!("{}: write failed", self.path.display());
                direct.reap(1, &self.plain, &mut Vec::new()).with_context(failed)?;
            }
        }
        if sync {
            self.plain.sync_all().with_context(|| format!("{}: sync failed", self.path.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_skip_zero_blocks_and_keep_a_short_tail() {
        let mut data = vec![0u8; 5 * BLOCK + 100];
        data[10] = 1; // block 0
        data[BLOCK + 4095] = 2; // block 1
        data[4 * BLOCK] = 3; // block 4
        data[5 * BLOCK + 99] = 4; // the short tail
        assert_eq!(data_runs(&data), vec![(0, 2 * BLOCK), (4 * BLOCK, BLOCK + 100)]);
        assert!(data_runs(&vec![0u8; 3 * BLOCK + 7]).is_empty());
    }

    #[test]
    fn buffers_are_aligned() {
        for len in [BLOCK, 4 << 20] {
            let mut b = Buffer::new(len);
            assert_eq!(b.bytes_mut().as_ptr() as usize % BLOCK, 0);
            assert_eq!(b.bytes().len(), len);
        }
    }
}
