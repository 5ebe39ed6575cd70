//! Byte sources with positioned reads.
//!
//! Images are opened read-only, and nothing in this crate ever writes to them.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, Result};

/// Identity of a file on this host: the cache keys on it, so that two paths to
/// one file (or two views of one image) share cached blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
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
}

impl FileSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::open(path, "not a regular file"));
        }
        let time = |s: i64, ns: i64| {
            let d = std::time::Duration::new(s.max(0) as u64, ns.clamp(0, 999_999_999) as u32);
            SystemTime::UNIX_EPOCH + d
        };
        Ok(FileSource {
            id: FileId { dev: meta.dev(), ino: meta.ino() },
            len: meta.len(),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            atime: time(meta.atime(), meta.atime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            path: path.to_path_buf(),
            file,
        })
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
    /// as QEMU's block layer does for short reads.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let pos = match offset.checked_add(done as u64) {
                Some(p) => p,
                None => break,
            };
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, e)),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }
}
