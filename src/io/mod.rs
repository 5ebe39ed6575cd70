//! Byte sources with positioned reads: local files and block devices
//! (`file`), and objects on HTTP(S) servers and S3-compatible object stores
//! (`remote`). The formats see only `Source`.
//!
//! Images are opened read-only, and nothing in this crate ever writes to them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::error::{Error, Result};

pub mod access;
mod file;
pub mod lock;
pub mod remote;

/// The rules a command applies to every file it opens for reading.
#[derive(Clone, Debug, Default)]
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
    /// Names of backing files and parents, as written inside images, that
    /// the user maps to another path or URL (`--backing-map OLD=NEW`).
    pub backing_map: Arc<[(String, String)]>,
    /// How remote sources are reached; `None` refuses them.
    pub remote: Option<Arc<remote::Remote>>,
}

impl OpenRules {
    /// What the user mapped `name` to, if anything.
    pub fn mapped(&self, name: &str) -> Option<&str> {
        self.backing_map.iter().find(|(old, _)| old == name).map(|(_, new)| new.as_str())
    }
}

/// Identity of a byte source: the cache keys on it, so that two paths to
/// one file (or two views of one image) share cached blocks. Local files
/// are their device and inode; remote objects get a `dev` no device has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// What `Source::stamp` compares: any write changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    mtime: (i64, i64),
}

/// What every source records when it is opened.
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    pub id: FileId,
    pub len: u64,
    pub mtime: SystemTime,
    pub atime: SystemTime,
    pub ctime: SystemTime,
    /// Owner, group and permission bits (of a local file when it was
    /// opened; for a remote object, the mounting user's, read-only).
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// Bytes an image is read from: a local file or a remote object.
#[derive(Debug)]
pub struct Source {
    backend: Backend,
    /// The path, or the URL, the source was opened by (in every message).
    path: PathBuf,
    meta: Meta,
}

#[derive(Debug)]
enum Backend {
    File(file::LocalFile),
    Remote(remote::Object),
}

impl Source {
    /// Opens a local file, or a remote object when `path` is a URL.
    pub fn open(path: &Path, rules: &OpenRules) -> Result<Self> {
        if remote::is_url(path) {
            let remote =
                rules.remote.as_ref().ok_or_else(|| Error::open(path, "remote sources are not enabled here"))?;
            let (object, meta, moved) = remote.open(path)?;
            let path = moved.unwrap_or_else(|| path.to_path_buf());
            return Ok(Source { backend: Backend::Remote(object), path, meta });
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Source::from_file(file, path)
    }

    fn from_file(file: File, path: &Path) -> Result<Self> {
        let (local, meta) = file::LocalFile::from_file(file, path)?;
        Ok(Source { backend: Backend::File(local), path: path.to_path_buf(), meta })
    }

    /// Opens a file that snapmount will read as an image or part of one
    /// (backing file, data file, parent archive): under QEMU's image locks
    /// unless `rules.force_share` (remote objects have none: their version
    /// is pinned instead).
    pub fn open_image(path: &Path, rules: &OpenRules) -> Result<Self> {
        let source = Source::open(path, rules)?;
        if let (Backend::File(f), false) = (&source.backend, rules.force_share) {
            lock::lock_shared_read(&f.file, path)?;
        }
        Ok(source)
    }

    /// Opens `path`, the file that the image `referrer` names `name` inside
    /// itself (`what`: "backing file", "external data file", ...): only if
    /// the owner of `referrer` could read it (see `access`), unless
    /// `rules.trust_backing`. A refusal names both files and the way out.
    pub fn open_named(referrer: &Source, name: &str, path: &Path, what: &str, rules: &OpenRules) -> Result<Self> {
        if rules.trust_backing {
            return Source::open_image(path, rules);
        }
        let checked = check_named(referrer, name, path, what)?;
        let source = Source::open_image(path, rules)?;
        if let Some(id) = checked {
            if source.meta.id != id {
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
    /// A remote object is pinned to the version opened: it is itself.
    pub fn refreshed(&self) -> Result<Source> {
        match &self.backend {
            Backend::File(f) => {
                let file = f.file.try_clone().map_err(|e| Error::io(&self.path, e))?;
                Source::from_file(file, &self.path)
            }
            Backend::Remote(o) => {
                Ok(Source { backend: Backend::Remote(o.clone()), path: self.path.clone(), meta: self.meta })
            }
        }
    }

    /// Size and modification time now: what changes when anyone writes to
    /// the file. A remote object's never does (every read is pinned to the
    /// version opened, and fails once the object was replaced).
    pub fn stamp(&self) -> Result<Stamp> {
        match &self.backend {
            Backend::File(f) => f.stamp(&self.path),
            Backend::Remote(_) => Ok(Stamp { len: self.meta.len, mtime: (0, 0) }),
        }
    }

    /// Whether this is a remote object (no local file behind it).
    pub fn is_remote(&self) -> bool {
        matches!(self.backend, Backend::Remote(_))
    }

    /// Owner and group of the file.
    pub fn owner(&self) -> (u32, u32) {
        (self.meta.uid, self.meta.gid)
    }

    /// `st_mode` of the file (type and permission bits).
    pub fn mode(&self) -> u32 {
        self.meta.mode
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> FileId {
        self.meta.id
    }

    /// Length of the file when it was opened.
    pub fn len(&self) -> u64 {
        self.meta.len
    }

    pub fn is_empty(&self) -> bool {
        self.meta.len == 0
    }

    pub fn times(&self) -> (SystemTime, SystemTime, SystemTime) {
        (self.meta.atime, self.meta.mtime, self.meta.ctime)
    }

    /// Fills `buf` from `offset`; bytes past the end read as zeros, as
    /// QEMU's block layer does for short reads. A local file that has become
    /// shorter than it was when opened, or a remote object replaced since,
    /// fails reads that reach what changed.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backend {
            Backend::File(f) => f.read_at(&self.path, self.meta.len, buf, offset),
            Backend::Remote(o) => o.read_at(&self.path, buf, offset),
        }
    }

    /// `n` bytes at `offset` mapped instead of read, when the source is a
    /// local regular file that holds them all, in the page cache (else
    /// None: read them). Hand them to the kernel, never read them here:
    /// see `LocalFile::mapped`.
    pub fn mapped(&self, offset: u64, n: usize) -> Option<&[u8]> {
        match &self.backend {
            Backend::File(f) => f.mapped(self.meta.len, offset, n),
            Backend::Remote(_) => None,
        }
    }
}

/// Where a chain of images stands on this host, for loop detection: the
/// real path of a local file, the URL of a remote object.
pub fn canonical(path: &Path) -> Result<PathBuf> {
    if remote::is_url(path) {
        return Ok(path.to_path_buf());
    }
    std::fs::canonicalize(path).map_err(|e| Error::io(path, e))
}

/// Turns a name written inside the image at `image` (a backing file, data
/// file or parent archive) into the path or URL to open: the user's
/// `--backing-map` first; a remote image's names resolve against its URL
/// and never reach a local file (`remote::resolve`); a local image's
/// relative names against the directory of the path it was opened by (not
/// its real path, as QEMU does). `json:` and protocol names (`nbd://…`,
/// `http:…`) in a local image are refused: they would reach beyond local
/// files (and use the mounting user's credentials).
pub fn resolve_name(image: &Path, name: &str, what: &str, rules: &OpenRules) -> Result<PathBuf> {
    if let Some(new) = rules.mapped(name) {
        return Ok(PathBuf::from(new));
    }
    if remote::is_url(image) {
        return remote::resolve(image, name, what);
    }
    if name.starts_with("json:") {
        return Err(Error::open(image, format!("{what} '{name}' is a json: name; only file names are supported")));
    }
    // QEMU's rule: a ':' before any '/' makes it a protocol.
    if let Some(colon) = name.find(':') {
        if !name[..colon].contains('/') {
            return Err(Error::open(
                image,
                format!("{what} '{name}' names a protocol; only local files are supported (--backing-map maps it)"),
            ));
        }
    }
    let name = Path::new(name);
    if name.is_absolute() {
        return Ok(name.to_path_buf());
    }
    let dir = image.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(dir.join(name))
}

/// The access check of `open_named`: `Some(identity)` of the file the
/// referrer's owner may read, `None` when the referrer is root's (it may
/// name anything) or nothing local is involved.
pub fn check_named(referrer: &Source, name: &str, path: &Path, what: &str) -> Result<Option<FileId>> {
    let (uid, gid) = referrer.owner();
    // A remote image's names resolve only to remote objects (or to what the
    // user mapped them to), and a remote object is no local file to check.
    if uid == 0 || referrer.is_remote() || remote::is_url(path) {
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
