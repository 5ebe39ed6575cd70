//! A local file or block device, read with `pread`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::SystemTime;

use memmap2::{Mmap, MmapOptions};

use super::{FileId, Meta, Stamp};
use crate::error::{Error, Result};

#[derive(Debug)]
pub struct LocalFile {
    pub(super) file: File,
    readahead: Readahead,
    /// A regular file (which can be mapped), not a block device.
    regular: bool,
    /// The whole file (as long as it was when opened) mapped read-only,
    /// made on the first `mapped`; None if it cannot be.
    map: OnceLock<Option<Mmap>>,
}

/// Sequential reads of an image file ask the kernel to fetch ahead, further
/// than its own readahead window (often 128 KiB): a sequential read of the
/// served disk then keeps the host disk busy instead of waiting on each
/// request. Shared by all threads; races only cost an extra hint.
#[derive(Debug, Default)]
struct Readahead {
    /// Where the last read ended.
    last_end: AtomicU64,
    /// How far the kernel has been asked to read.
    advised: AtomicU64,
}

/// How far ahead of a sequential reader the file is fetched.
const READAHEAD_WINDOW: u64 = 8 << 20;
/// How close to the previous read's end a read counts as sequential.
const NEAR: u64 = 2 << 20;

impl LocalFile {
    /// The open file and what `Source` records of it.
    pub fn from_file(file: File, path: &Path) -> Result<(LocalFile, Meta)> {
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let block_device = std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type());
        if !meta.is_file() && !block_device {
            return Err(Error::open(path, "not a regular file or block device"));
        }
        // A block device (an image on LVM, a raw base on /dev/...) has no
        // length in its metadata: ask it where it ends.
        let len = if block_device {
            std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0)).map_err(|e| Error::io(path, e))?
        } else {
            meta.len()
        };
        let time = |s: i64, ns: i64| {
            let d = std::time::Duration::new(s.max(0) as u64, ns.clamp(0, 999_999_999) as u32);
            SystemTime::UNIX_EPOCH + d
        };
        let info = Meta {
            id: FileId { dev: meta.dev(), ino: meta.ino() },
            len,
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            atime: time(meta.atime(), meta.atime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode(),
        };
        Ok((
            LocalFile { file, readahead: Readahead::default(), regular: meta.is_file(), map: Default::default() },
            info,
        ))
    }

    /// Size and modification time now: what changes when anyone writes to
    /// the file. (The kernel gives a fine-grained mtime to a write that
    /// follows a query of it, so two writes within one clock tick are told
    /// apart from none.)
    pub fn stamp(&self, path: &Path) -> Result<Stamp> {
        let meta = self.file.metadata().map_err(|e| Error::io(path, e))?;
        Ok(Stamp { len: meta.len(), mtime: (meta.mtime(), meta.mtime_nsec()) })
    }

    /// Fills `buf` from `offset`; bytes past the end of the file read as zeros,
    /// as QEMU's block layer does for short reads. A file that has become
    /// shorter than `len` (its length when opened) fails reads that reach
    /// the lost part.
    pub fn read_at(&self, path: &Path, len: u64, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_ahead(offset, buf.len() as u64, len);
        let mut done = 0;
        while done < buf.len() {
            let pos = match offset.checked_add(done as u64) {
                Some(p) => p,
                None => break,
            };
            match self.file.read_at(&mut buf[done..], pos) {
                // Short of the length the file had when it was opened: it
                // was truncated since. Zeros there would be a silent lie
                // about data the image had; fail the read instead.
                Ok(0) if pos < len => {
                    return Err(Error::io(
                        path,
                        std::io::Error::other(format!(
                            "ends at {pos:#x}, short of the {len} bytes it had when it was opened (truncated while in use?)"
                        )),
                    ))
                }
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// `n` bytes at `offset` as mapped memory, when they lie within the
    /// `len` bytes the file had when it was opened and all are in the page
    /// cache (a FUSE reply then copies them straight from there: one copy
    /// instead of a read into a buffer and a copy out of it; bytes still on
    /// disk are read instead, with the read-ahead `read_at` keeps, which
    /// faults in a mapping cannot).
    ///
    /// The bytes are only ever handed to the kernel, never read here: if
    /// the file were truncated under the mapping, reading them here would
    /// die of SIGBUS, while the kernel's copy fails with EFAULT and FUSE
    /// then fails the request with EIO.
    pub fn mapped(&self, len: u64, offset: u64, n: usize) -> Option<&[u8]> {
        let end = offset.checked_add(n as u64)?;
        if !self.regular || n == 0 || end > len {
            return None;
        }
        let map = self.map.get_or_init(|| map_whole(&self.file, len)).as_ref()?;
        let bytes = &map[offset as usize..end as usize];
        in_page_cache(map, bytes).then(|| {
            self.read_ahead(offset, n as u64, len);
            bytes
        })
    }

    /// When this read lands near where the previous one ended (compressed
    /// clusters leave small gaps, and the clusters of one request are read
    /// by several threads, slightly out of order), asks the kernel to start
    /// reading the next window in the background (POSIX_FADV_WILLNEED does
    /// not wait).
    fn read_ahead(&self, offset: u64, len: u64, file_len: u64) {
        let ra = &self.readahead;
        let end = offset.saturating_add(len);
        let last = ra.last_end.swap(end, Ordering::Relaxed);
        if offset.abs_diff(last) > NEAR {
            return;
        }
        let advised = ra.advised.load(Ordering::Relaxed);
        if advised >= end.saturating_add(READAHEAD_WINDOW / 2) || end >= file_len {
            return;
        }
        let from = advised.max(end);
        let to = end.saturating_add(READAHEAD_WINDOW).min(file_len);
        ra.advised.store(to, Ordering::Relaxed);
        // SAFETY: an advisory call on our own open descriptor.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                from as libc::off_t,
                (to - from) as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }
}

/// The file's first `len` bytes mapped read-only and shared: pages of the
/// page cache, not copies. The pages replies were copied from stay mapped
/// (a re-read then costs no page fault), so they count in the daemon's RSS
/// as file pages (RssFile, up to the part of the image read): page cache
/// the kernel reclaims as usual, not memory of the daemon's own, which is
/// its anonymous part (RssAnon), bounded by `--cache-size`. (Dropping them
/// from the page tables every 32 MiB served kept VmHWM at 41 MB but cost
/// 30-45 % more daemon CPU on warm re-reads: every page faulted again.)
fn map_whole(file: &File, len: u64) -> Option<Mmap> {
    let len = usize::try_from(len).ok()?;
    // SAFETY: the mapping is read-only and its bytes are handed only to the
    // kernel (see `LocalFile::mapped`), so a file changed or truncated under
    // it can neither fault this process nor break what Rust assumes of
    // memory it reads.
    unsafe { MmapOptions::new().len(len).map(file) }.ok()
}

/// Whether every page of `bytes` (a range of `map`) is in the page cache.
fn in_page_cache(map: &Mmap, bytes: &[u8]) -> bool {
    // Asked a stretch at a time, so a read needs no allocation.
    const PAGES: usize = 256;
    let page = page_size();
    let skip = (bytes.as_ptr() as usize - map.as_ptr() as usize) % page;
    let mut start = bytes.as_ptr().wrapping_sub(skip);
    let mut left = skip + bytes.len();
    let mut resident = [0u8; PAGES];
    while left > 0 {
        let len = left.min(PAGES * page);
        // SAFETY: `start` is page-aligned (mappings start on a page) and
        // `start..start + len` lies within `map`; `resident` has a byte for
        // each of its at most PAGES pages.
        let rc = unsafe { libc::mincore(start as *mut libc::c_void, len, resident.as_mut_ptr()) };
        if rc != 0 || resident[..len.div_ceil(page)].iter().any(|r| r & 1 == 0) {
            return false;
        }
        start = start.wrapping_add(len);
        left -= len;
    }
    true
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Mapped reads from one page to three `mincore` stretches (1 MiB
    /// each), page-aligned or not, of a file just written (so in the page
    /// cache): all mapped, and the bytes are the file's.
    #[test]
    fn mapped_ranges_are_the_files_bytes() {
        let bytes: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&bytes).unwrap();
        tmp.flush().unwrap();
        let path = tmp.path().to_path_buf();
        let (file, meta) = LocalFile::from_file(File::open(&path).unwrap(), &path).unwrap();
        let len = meta.len;
        // Written through the page cache, so all resident.
        for (offset, n) in
            [(0, 4096), (4096, 1 << 20), (1, 1 << 20), (4095, (1 << 20) + 2), (123, 2 << 20), (0, 3 << 20)]
        {
            let got = file.mapped(len, offset as u64, n).unwrap_or_else(|| panic!("{offset}+{n} not mapped"));
            assert!(got == &bytes[offset..offset + n], "{offset}+{n}");
        }
        assert!(file.mapped(len, 1, 3 << 20).is_none(), "past the end");
    }
}
