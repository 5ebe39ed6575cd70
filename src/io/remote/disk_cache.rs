//! The persistent chunk cache (`--cache-dir`): fetched chunks kept on local
//! disk across unmounts and restarts, bounded in bytes, evicted least
//! recently used.
//!
//! A chunk lives at `DIR/<object>/<index>`, where `<object>` is a digest
//! of the URL, the ETag and the size (a replaced object never meets its
//! old chunks). Each file is written under a temporary name and renamed
//! into place, and carries its length and CRC-32: after a crash a chunk is
//! whole and verified, or it is ignored and fetched again. Two mounts may
//! share one directory: renames are atomic, and each one's eviction walks
//! what is really there.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"SMCHUNK1";
const HEADER: usize = 16;

#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    bound: u64,
    /// Bytes in the directory as last counted, plus what this process
    /// wrote since.
    used: AtomicU64,
    evicting: Mutex<()>,
    temp_seq: AtomicU64,
}

impl DiskCache {
    pub fn open(dir: &Path, bound: u64) -> Result<DiskCache> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| Error::io(dir, e))?;
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            bound,
            used: AtomicU64::new(0),
            evicting: Mutex::new(()),
            temp_seq: AtomicU64::new(0),
        };
        let used = cache.entries().iter().map(|e| e.1).sum();
        cache.used.store(used, Ordering::Relaxed);
        Ok(cache)
    }

    /// The folder name of one version of one object.
    pub fn object_key(url: &str, version: &str, len: u64) -> String {
        let mut h = Sha256::new();
        h.update(url.as_bytes());
        h.update([0]);
        h.update(version.as_bytes());
        h.update([0]);
        h.update(len.to_le_bytes());
        h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn path(&self, object: &str, index: u64) -> PathBuf {
        self.dir.join(object).join(format!("{index:012x}"))
    }

    /// Chunk `index` of `object`, if it is here whole, `len` bytes long and
    /// its checksum holds.
    pub fn get(&self, object: &str, index: u64, len: usize) -> Option<Arc<[u8]>> {
        let path = self.path(object, index);
        let bytes = fs::read(&path).ok()?;
        let ok = bytes.len() == HEADER + len
            && &bytes[..8] == MAGIC
            && u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize == len
            && u32::from_le_bytes(bytes[12..16].try_into().unwrap()) == crc32fast::hash(&bytes[HEADER..]);
        if !ok {
            debug!("{}: damaged cached chunk, fetching it again", path.display());
            let _ = fs::remove_file(&path);
            return None;
        }
        // Its time is its place in the LRU order.
        if let Ok(f) = fs::File::open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(Arc::from(&bytes[HEADER..]))
    }

    /// Keeps chunk `index` of `object`; a failure only costs a later fetch.
    pub fn put(&self, object: &str, index: u64, data: &[u8]) {
        if let Err(e) = self.write(object, index, data) {
            warn!("{}: cannot keep a chunk in the cache directory: {e}", self.dir.display());
            return;
        }
        let used = self.used.fetch_add((HEADER + data.len()) as u64, Ordering::Relaxed);
        if used > self.bound {
            self.evict();
        }
    }

    fn write(&self, object: &str, index: u64, data: &[u8]) -> std::io::Result<()> {
        let folder = self.dir.join(object);
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&folder)?;
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let temp = folder.join(format!(".tmp-{}-{seq}", std::process::id()));
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        header[12..16].copy_from_slice(&crc32fast::hash(data).to_le_bytes());
        let written = f.write_all(&header).and_then(|_| f.write_all(data));
        drop(f);
        match written.and_then(|_| fs::rename(&temp, self.path(object, index))) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = fs::remove_file(&temp);
                Err(e)
            }
        }
    }

    /// Every chunk file: (path, bytes, last use).
    fn entries(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut out = Vec::new();
        let Ok(objects) = fs::read_dir(&self.dir) else { return out };
        for object in objects.flatten() {
            let Ok(chunks) = fs::read_dir(object.path()) else { continue };
            for chunk in chunks.flatten() {
                if let Ok(meta) = chunk.metadata() {
                    if meta.is_file() {
                        out.push((chunk.path(), meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
                    }
                }
            }
        }
        out
    }

    /// Deletes the least recently used chunks until the directory is back
    /// under nine tenths of its bound (one thread at a time; the others go
    /// on).
    fn evict(&self) {
        let Some(_guard) = self.evicting.try_lock() else { return };
        let mut entries = self.entries();
        let mut used: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort_by_key(|e| e.2);
        let target = self.bound / 10 * 9;
        for (path, len, _) in entries {
            if used <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                used -= len;
            }
        }
        self.used.store(used, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_damage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let key = DiskCache::object_key("http://h/x", "\"e1\"", 100);
        cache.put(&key, 3, b"hello");
        assert_eq!(&*cache.get(&key, 3, 5).unwrap(), b"hello");
        assert!(cache.get(&key, 3, 6).is_none(), "a wrong length is no hit");
        cache.put(&key, 4, b"world");
        let path = cache.path(&key, 4);
        let mut bytes = fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(cache.get(&key, 4, 5).is_none(), "a flipped bit is no hit");
        assert!(!path.exists(), "and the damaged chunk is gone");
    }

    #[test]
    fn eviction_keeps_the_bound_and_the_recent() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 10 * (HEADER as u64 + 1000)).unwrap();
        let key = DiskCache::object_key("s3://b/k", "v", 1);
        for i in 0..30 {
            cache.put(&key, i, &[i as u8; 1000]);
            // A chunk read now and then stays.
            assert!(cache.get(&key, 0, 1000).is_some());
        }
        let total: u64 = cache.entries().iter().map(|e| e.1).sum();
        assert!(total <= 10 * (HEADER as u64 + 1000), "{total}");
        assert!(cache.get(&key, 29, 1000).is_some());
    }
}
