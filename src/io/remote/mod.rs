//! Remote sources: objects on HTTP(S) servers and in S3-compatible object
//! stores, read in aligned chunks through the block cache.
//!
//! The fetch layer below the formats: a read becomes the chunks it covers;
//! chunks in memory (the shared `BlockCache`, so their bytes count against
//! `--cache-size`) or in the cache directory are not fetched; the missing
//! ones are claimed (two readers of one chunk cause one GET), merged into
//! one ranged GET per run of adjacent chunks, and pinned to the version
//! opened (`If-Match`). A sequential reader gets a read-ahead window that
//! grows while it stays sequential, fetched by background threads over
//! several connections.

mod disk_cache;
mod fetch;
pub mod http;
mod location;
pub mod s3;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tracing::debug;

pub use disk_cache::DiskCache;
pub use fetch::Object;
pub use http::TlsOptions;
pub use location::{is_url, resolve, Location};

use self::http::{Answer, Failure, Http};
use super::{FileId, Meta};
use crate::cache::BlockCache;
use crate::error::{Error, Result};

/// What the user set for remote sources.
#[derive(Clone, Debug)]
pub struct Options {
    pub tls: TlsOptions,
    /// `--s3-endpoint`.
    pub s3_endpoint: Option<String>,
    /// How long one read keeps retrying (`--remote-timeout`).
    pub timeout: Duration,
    /// `--cache-dir` and `--cache-dir-size`.
    pub cache_dir: Option<(PathBuf, u64)>,
}

/// The `dev` of every remote object's `FileId`: no device has it.
const REMOTE_DEV: u64 = u64::MAX;
/// At most this many objects under one S3 prefix (a listing that never
/// ends must not keep the mount from starting).
const MAX_LISTED: usize = 100_000;
/// A listing page is at most this long (S3 sends 1000 keys, ~300 KiB).
const MAX_LISTING_PAGE: u64 = 16 << 20;

/// How remote objects are reached: one per command, shared by every object
/// it opens.
pub struct Remote {
    options: Options,
    http: Http,
    /// Loaded on the first `s3://` source (the AWS configuration and
    /// credential chain cost a moment, and HTTP users need neither).
    s3: OnceLock<std::result::Result<s3::S3, String>>,
    cache: Arc<BlockCache>,
    disk: Option<DiskCache>,
    prefetch: fetch::Prefetcher,
    /// The identity of each object version opened, so that a base image
    /// shared by two chains is cached once.
    ids: Mutex<HashMap<String, u64>>,
    /// Every object opened, by the URL it was opened by: opened again (the
    /// probe, then the format; a base shared by two chains), it is the same
    /// version, with no second round trip.
    opened: Mutex<HashMap<PathBuf, Opened>>,
}

type Opened = (Object, Meta, Option<PathBuf>);

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote {{ {:?} }}", self.options)
    }
}

impl Remote {
    pub fn new(options: Options, cache: Arc<BlockCache>) -> Result<Arc<Remote>> {
        let http = Http::new(&options.tls, options.timeout)?;
        let disk = match &options.cache_dir {
            Some((dir, bound)) => Some(DiskCache::open(dir, *bound)?),
            None => None,
        };
        Ok(Arc::new(Remote {
            http,
            s3: OnceLock::new(),
            prefetch: fetch::Prefetcher::default(),
            cache,
            disk,
            ids: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashMap::new()),
            options,
        }))
    }

    fn s3(&self, url: &Path) -> Result<&s3::S3> {
        self.s3
            .get_or_init(|| s3::S3::new(self.options.s3_endpoint.as_deref()))
            .as_ref()
            .map_err(|e| Error::open(url, e.clone()))
    }

    /// Where a GET for `loc` goes.
    fn http_url(&self, url: &Path, loc: &Location) -> Result<String> {
        Ok(match loc {
            Location::Http { .. } => loc.url(),
            Location::S3 { bucket, key } => self.s3(url)?.object_url(bucket, key),
        })
    }

    /// The headers that authorize a request of `http_url` for `loc`.
    fn auth(
        &self,
        url: &Path,
        loc: &Location,
        method: &str,
        http_url: &str,
    ) -> std::result::Result<Vec<(String, String)>, Failure> {
        match loc {
            Location::Http { .. } => Ok(Vec::new()),
            Location::S3 { .. } => {
                let s3 = self.s3(url).map_err(|e| Failure::Fatal(e.to_string()))?;
                s3.sign(method, http_url).map_err(Failure::Fatal)
            }
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or `deadline`
    /// passes, waiting between tries with jittered exponential backoff, or
    /// as long as the server's `Retry-After` says.
    fn retrying<T>(
        &self,
        url: &Path,
        deadline: Instant,
        mut attempt: impl FnMut() -> std::result::Result<T, Failure>,
    ) -> std::result::Result<T, Failure> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match attempt() {
                Err(Failure::Transient { why, after }) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let secs = self.options.timeout.as_secs_f64();
                        return Err(Failure::Transient {
                            why: format!("{why}; gave up after {secs:.0} s of retries"),
                            after,
                        });
                    }
                    // The last try is made at the deadline.
                    let wait = after.unwrap_or_else(|| jitter(backoff)).min(deadline - now);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    debug!("{}: {why}; trying again in {} ms", url.display(), wait.as_millis());
                    std::thread::sleep(wait);
                }
                other => return other,
            }
        }
    }

    /// Opens the object at `url`: its size, version and times from a HEAD,
    /// or, where HEAD fails or says no Range support, from a ranged GET of
    /// its first chunk (which also tells a server that ignores Range).
    ///
    /// Where HTTP redirects led, the object is read (and the names inside it
    /// resolve) at the URL they led to, returned third.
    pub fn open(self: &Arc<Self>, url: &Path) -> Result<Opened> {
        if let Some(known) = self.opened.lock().get(url) {
            return Ok(known.clone());
        }
        let opened = self.open_anew(url)?;
        self.opened.lock().insert(url.to_path_buf(), opened.clone());
        Ok(opened)
    }

    fn open_anew(self: &Arc<Self>, url: &Path) -> Result<Opened> {
        let loc = Location::parse(url)?;
        if loc.is_prefix() {
            return Err(Error::open(
                url,
                "names a folder, not an object (an s3:// prefix is mounted as a source, not opened as an image)",
            ));
        }
        let http_url = self.http_url(url, &loc)?;
        let deadline = Instant::now() + self.options.timeout;
        let fail = |f: Failure| http::error(url, f.why());
        let head = self.retrying(url, deadline, || {
            let headers = self.auth(url, &loc, "HEAD", &http_url)?;
            self.http.head(&http_url, &headers, loc.follows_redirects())
        });
        let (answer, first) = match head {
            Ok((answer, true)) => (answer, None),
            // No `Accept-Ranges: bytes`, or no answer to HEAD: a ranged GET
            // decides.
            Ok((_, false)) | Err(Failure::Fatal(_)) => {
                let mut buf = vec![0u8; fetch::CHUNK as usize];
                let answer = self
                    .retrying(url, deadline, || {
                        let headers = self.auth(url, &loc, "GET", &http_url)?;
                        self.http.get_range(&http_url, &headers, 0, &mut buf, loc.follows_redirects())
                    })
                    .map_err(fail)?;
                buf.truncate(answer.filled);
                (answer, Some(buf))
            }
            Err(f) => return Err(fail(f)),
        };
        let (url, loc, http_url) = match (&answer.redirected, &loc) {
            (Some(to), Location::Http { .. }) => {
                let to = PathBuf::from(to);
                let loc = Location::parse(&to)?;
                debug!("{}: redirected to {}", url.display(), to.display());
                (to, loc.clone(), loc.url())
            }
            _ => (url.to_path_buf(), loc, http_url),
        };
        let meta = self.meta(&http_url, &answer);
        let object = Object::new(self.clone(), &url, loc, http_url, &answer, meta.id);
        if let Some(first) = first {
            object.keep_first(first);
        }
        let moved = answer.redirected.is_some().then_some(url);
        Ok((object, meta, moved))
    }

    fn meta(&self, http_url: &str, answer: &Answer) -> Meta {
        let version = format!("{:?} {:?} {}", answer.etag, answer.modified, answer.total);
        let ino = {
            let mut ids = self.ids.lock();
            let next = ids.len() as u64 + 1;
            *ids.entry(format!("{http_url}\0{version}")).or_insert(next)
        };
        let mtime = answer.modified.unwrap_or_else(SystemTime::now);
        // SAFETY: plain getters. A remote object belongs to whoever mounts
        // (their credentials fetched it); who else may read it is the
        // mount's choice (--allow-other).
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Meta {
            id: FileId { dev: REMOTE_DEV, ino },
            len: answer.total,
            mtime,
            atime: mtime,
            ctime: mtime,
            uid,
            gid,
            mode: libc::S_IFREG | 0o444,
        }
    }

    /// The objects directly under the S3 prefix `url` (ending in '/').
    pub fn list(&self, url: &Path) -> Result<Vec<PathBuf>> {
        let loc = Location::parse(url)?;
        let Location::S3 { bucket, key: prefix } = &loc else {
            return Err(Error::open(
                url,
                "an HTTP URL must name one image (HTTP has no listing); use s3:// for a folder",
            ));
        };
        let s3 = self.s3(url)?;
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let list_url = s3.list_url(bucket, prefix, token.as_deref());
            let deadline = Instant::now() + self.options.timeout;
            let page = self
                .retrying(url, deadline, || {
                    let headers = s3.sign("GET", &list_url).map_err(Failure::Fatal)?;
                    self.http.get_document(&list_url, &headers, MAX_LISTING_PAGE)
                })
                .map_err(|f| http::error(url, &format!("cannot list: {}", f.why())))?;
            let (keys, next) = s3::parse_listing(&page).map_err(|e| http::error(url, &format!("cannot list: {e}")))?;
            for key in keys {
                // Folder markers, and keys a broken server returns outside
                // the prefix.
                if key.ends_with('/') || !key.starts_with(prefix.as_str()) {
                    continue;
                }
                found.push(PathBuf::from(Location::S3 { bucket: bucket.clone(), key }.url()));
            }
            if found.len() > MAX_LISTED {
                return Err(Error::open(url, format!("more than {MAX_LISTED} objects under this prefix")));
            }
            match next {
                Some(t) if Some(&t) != token.as_ref() => token = Some(t),
                _ => break,
            }
        }
        Ok(found)
    }
}

impl Location {
    /// Plain HTTP follows redirects (without credentials across hosts);
    /// a signed S3 request is for one host only.
    fn follows_redirects(&self) -> bool {
        matches!(self, Location::Http { .. })
    }
}

/// A wait of between half and all of `d` (spreads the retries of many
/// readers, so a recovering server is not hit by all of them at once).
fn jitter(d: Duration) -> Duration {
    use std::hash::BuildHasher;
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    d / 2 + Duration::from_nanos(r % (d.as_nanos() as u64 / 2 + 1))
}

/// The name of a remote source's directory in the mount: the last segment
/// of its path or key.
pub fn display_name(url: &Path) -> Option<Vec<u8>> {
    let name = Location::parse(url).ok()?.name();
    (!name.is_empty()).then_some(name)
}
