//! One error type for the whole read path.
//!
//! Every variant carries the path of the file it is about, so that the one-line
//! message printed to a user (or logged by the daemon) says which file and why.

use std::io;
use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be used as an image: bad header, refused feature,
    /// missing backing file, and so on. Reported at open time.
    #[error("{}: {msg}", path.display())]
    Open { path: PathBuf, msg: String },

    /// An I/O error from the operating system while reading `path`. (Not a
    /// `source` field: the message already says it, and a chained report
    /// would say it twice.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: io::Error },

    /// Metadata met while serving a read does not make sense. The read that met
    /// it fails (EIO over FUSE); everything else keeps working.
    #[error("{}: corrupt image at guest offset {offset:#x}: {msg}", path.display())]
    Corrupt { path: PathBuf, offset: u64, msg: String },
}

impl Error {
    pub fn open(path: &Path, msg: impl Into<String>) -> Self {
        Error::Open { path: path.to_path_buf(), msg: msg.into() }
    }

    pub fn io(path: &Path, source: io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), err: source }
    }

    pub fn corrupt(path: &Path, offset: u64, msg: impl Into<String>) -> Self {
        Error::Corrupt { path: path.to_path_buf(), offset, msg: msg.into() }
    }

    /// The errno a FUSE reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}
