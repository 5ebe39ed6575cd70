//! Byte sources with positioned reads.
//!
//! Images are opened read-only, and nothing in this crate ever writes to them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::error::{Error, Result};

pub mod access;
pub mod lock;

/// The rules a command applies to every file it opens for reading.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenRules {
    /// Take no QEMU image locks and do not refuse images that a writer holds
    /// (`--force-share`).
    pub force_share: bool,
    /// Open backing, data and parent files named inside an image even when
    /// the image's owner could not read them (`--trust-backing`).
    pub trust_backing: bool,
    /// Open to describe only (`snapmount info`): encrypted images are not
    /// unlocked, so no password is asked.
    pub describe_only: bool,
}

/// Identity of a file on this host: the cache keys on it, so that two paths to
/// one file (or two views of one image) share cached blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// What `FileSource::stamp` compares: any write changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    mtime: (i64, i64),
}

/// A local file, read with `pread`.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    id: FileId,
    len: u64,
    mtime: SystemTime,
    atime: SystemTime,
    ctime: SystemTime,
    /// Owner, group and permission bits of the file when it was opened.
    uid: u32,
    gid: u32,
    mode: u32,
    readahead: Readahead,
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

impl FileSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        FileSource::from_file(file, path)
    }

    fn from_file(file: File, path: &Path) -> Result<Self> {
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
        Ok(FileSource {
            id: FileId { dev: meta.dev(), ino: meta.ino() },
            len,
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            atime: time(meta.atime(), meta.atime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode(),
            path: path.to_path_buf(),
            file,
            readahead: Readahead::default(),
        })
    }

    /// Opens a file that snapmount will read as an image or part of one
    /// (backing file, data file, parent archive): under QEMU's image locks
    /// unless `rules.force_share`.
    pub fn open_image(path: &Path, rules: &OpenRules) -> Result<Self> {
        let source = FileSource::open(path)?;
        if !rules.force_share {
            lock::lock_shared_read(&source.file, path)?;
        }
        Ok(source)
    }

    /// Opens `path`, the file that the image `referrer` names `name` inside
    /// itself (`what`: "backing file", "external data file", ...): only if
    /// the owner of `referrer` could read it (see `access`), unless
    /// `rules.trust_backing`. A refusal names both files and the way out.
    pub fn open_named(referrer: &FileSource, name: &str, path: &Path, what: &str, rules: &OpenRules) -> Result<Self> {
        if rules.trust_backing {
            return FileSource::open_image(path, rules);
        }
        let checked = check_named(referrer, name, path, what)?;
        let source = FileSource::open_image(path, rules)?;
        if let Some(id) = checked {
            if source.id != id {
                return Err(Error::open(
                    referrer.path(),
                    format!(
                        "{what} '{name}'{} changed while it was being checked",
                        crate::format::resolved(name, path)
                    ),
                ));
            }
        }
        Ok(source)
    }

    /// The same open file, its length and times read anew (a second
    /// descriptor on the same open file description: it shares the locks).
    pub fn refreshed(&self) -> Result<FileSource> {
        let file = self.file.try_clone().map_err(|e| Error::io(&self.path, e))?;
        FileSource::from_file(file, &self.path)
    }

    /// Size and modification time now: what changes when anyone writes to
    /// the file. (The kernel gives a fine-grained mtime to a write that
    /// follows a query of it, so two writes within one clock tick are told
    /// apart from none.)
    pub fn stamp(&self) -> Result<Stamp> {
        let meta = self.file.metadata().map_err(|e| Error::io(&self.path, e))?;
        Ok(Stamp { len: meta.len(), mtime: (meta.mtime(), meta.mtime_nsec()) })
    }

    /// Owner and group of the file.
    pub fn owner(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// `st_mode` of the file (type and permission bits).
    pub fn mode(&self) -> u32 {
        self.mode
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> FileId {
        self.id
    }

    /// Length of the file when it was opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn times(&self) -> (SystemTime, SystemTime, SystemTime) {
        (self.atime, self.mtime, self.ctime)
    }

    /// Fills `buf` from `offset`; bytes past the end of the file read as zeros,
    /// as QEMU's block layer does for short reads. A file that has become
    /// shorter than it was when opened fails reads that reach the lost part.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_ahead(offset, buf.len() as u64);
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
                Ok(0) if pos < self.len => {
                    return Err(Error::io(
                        &self.path,
                        std::io::Error::other(format!(
                        "ends at {pos:#x}, short of the {} bytes it had when it was opened (truncated while in use?)",
                        self.len
                    )),
                    ))
                }
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, e)),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// When this read lands near where the previous one ended (compressed
    /// clusters leave small gaps, and the clusters of one request are read
    /// by several threads, slightly out of order), asks the kernel to start
    /// reading the next window in the background (POSIX_FADV_WILLNEED does
    /// not wait).
    fn read_ahead(&self, offset: u64, len: u64) {
        let ra = &self.readahead;
        let end = offset.saturating_add(len);
        let last = ra.last_end.swap(end, Ordering::Relaxed);
        if offset.abs_diff(last) > NEAR {
            return;
        }
        let advised = ra.advised.load(Ordering::Relaxed);
        if advised >= end.saturating_add(READAHEAD_WINDOW / 2) || end >= self.len {
            return;
        }
        let from = advised.max(end);
        let to = end.saturating_add(READAHEAD_WINDOW).min(self.len);
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

/// The access check of `open_named`: `Some(identity)` of the file the
/// referrer's owner may read, `None` when the referrer is root's (it may
/// name anything).
pub fn check_named(referrer: &FileSource, name: &str, path: &Path, what: &str) -> Result<Option<FileId>> {
    let (uid, gid) = referrer.owner();
    if uid == 0 {
        return Ok(None);
    }
    let absolute = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
    match access::readable_as(uid, gid, &absolute) {
        Ok((_, id)) => Ok(Some(id)),
        Err(access::Denied::NotFound(_)) => Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound))),
        Err(denied) => Err(Error::open(
            referrer.path(),
            format!(
                "{what} '{name}'{} is refused: the image's owner (uid {uid}, gid {gid}) could not read it \
                 ({denied}); --trust-backing opens it anyway",
                crate::format::resolved(name, path)
            ),
        )),
    }
}

const SCRATCH_KEEP: usize = 8 << 20;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a per-thread buffer of `len` bytes (contents unspecified),
/// for bytes needed only briefly, such as a compressed cluster on its way to
/// being decompressed: no allocation per read, and no heap churn.
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let result = f(&mut buf[..len]);
            // Keep a typical buffer for the next read, not a rare huge one.
            if buf.len() > SCRATCH_KEEP {
                *buf = Vec::new();
            }
            result
        }
        // Re-entered on this thread (a parent read inside a read): a fresh buffer.
        Err(_) => f(&mut vec![0u8; len]),
    })
}
