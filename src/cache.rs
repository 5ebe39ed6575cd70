//! The block cache: decompressed clusters and metadata tables, shared by every
//! view of every image, bounded in bytes.
//!
//! Keys name what is really stored on disk (file identity + host offset), so a
//! cluster that two views or two chains share is cached once. The cache is
//! split into shards, each behind its own lock, so concurrent FUSE requests
//! rarely wait on one another; a lock is held only to look up or insert an
//! `Arc`, never while reading or decompressing.

use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use crate::io::FileId;

/// What a cached block holds; part of the key, so that, say, an L2 table and a
/// decompressed cluster at the same host offset never collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// A metadata table (qcow2 L2 table), raw bytes as on disk.
    Table,
    /// A qcow2 L1 table of this many entries, raw bytes as on disk.
    L1 { entries: u32 },
    /// A compressed block, decompressed (HEXZ; deduplicated entries share it).
    Decompressed,
    /// A compressed qcow2 cluster of this many stored bytes, decompressed
    /// (two entries naming one offset with different sizes stay apart).
    Cluster { stored: u64 },
    /// A chunk of a remote object, as stored (see `io::remote`).
    Remote,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub file: FileId,
    pub kind: BlockKind,
    pub offset: u64,
}

/// Bookkeeping cost of one entry beyond its bytes (key, Arc header, LRU node).
const ENTRY_OVERHEAD: usize = 96;

/// What a block of `len` bytes costs the process: its bytes, its
/// bookkeeping, and the heap fragmentation that blocks of this size leave
/// behind as they come and go (measured at about a tenth under 4-thread
/// random reads). Counting it keeps the daemon's memory near `--cache-size`.
fn cost(len: usize) -> usize {
    len + len / 8 + ENTRY_OVERHEAD
}
const SHARDS: usize = 32;
const MIN_SHARD_BYTES: u64 = 8 << 20;
/// The smallest cache that keeps a large-block slot (see `BlockCache`), and
/// the most set aside for it: the cost of a 64 MiB block, the largest hexz
/// writes.
const LARGE_FROM: u64 = 256 << 20;
const LARGE_SLOT: u64 = 80 << 20;
/// The smallest cache `--cache-size` accepts.
pub const MIN_CAPACITY: u64 = 16 << 20;

struct Shard {
    lru: LruCache<BlockKey, Arc<[u8]>>,
    bytes: usize,
}

pub struct BlockCache {
    capacity: u64,
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: usize,
    /// The most recent block too large for a shard's share (HEXZ chunks
    /// reach 64 MiB): kept alone, so that reads within one such block
    /// decode it once. Only in a cache of `LARGE_FROM` or more, which sets
    /// a quarter of its bytes (at most `LARGE_SLOT`) aside for it.
    large: Mutex<Option<(BlockKey, Arc<[u8]>)>>,
    large_capacity: usize,
    hasher: std::collections::hash_map::RandomState,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl BlockCache {
    /// A cache holding at most `capacity` bytes (spread evenly over the shards).
    pub fn new(capacity: u64) -> Self {
        // Fewer shards for a small cache, so that a shard still holds the
        // largest blocks (2 MiB clusters and L2 tables) several times over.
        let total = capacity;
        let large_capacity = if capacity >= LARGE_FROM { (capacity / 4).min(LARGE_SLOT) } else { 0 };
        let capacity = capacity - large_capacity;
        let count = (capacity / MIN_SHARD_BYTES).clamp(1, SHARDS as u64) as usize;
        let shards = (0..count).map(|_| Mutex::new(Shard { lru: LruCache::unbounded(), bytes: 0 })).collect();
        BlockCache {
            capacity: total,
            shards,
            large: Mutex::new(None),
            large_capacity: large_capacity.min(usize::MAX as u64) as usize,
            shard_capacity: (capacity / count as u64).min(usize::MAX as u64) as usize,
            hasher: Default::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &BlockKey) -> &Mutex<Shard> {
        &self.shards[self.hasher.hash_one(key) as usize % self.shards.len()]
    }

    pub fn get(&self, key: &BlockKey) -> Option<Arc<[u8]>> {
        let found = self.shard(key).lock().lru.get(key).cloned().or_else(|| match &*self.large.lock() {
            Some((k, block)) if k == key => Some(block.clone()),
            _ => None,
        });
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Inserts a block, evicting the least recently used ones of its shard
    /// until the shard fits its share of the capacity. A block larger than a
    /// shard's share takes the large-block slot if it fits there, else it is
    /// not kept at all.
    pub fn insert(&self, key: BlockKey, block: Arc<[u8]>) {
        let added = cost(block.len());
        if added > self.shard_capacity {
            if added <= self.large_capacity {
                *self.large.lock() = Some((key, block));
            }
            return;
        }
        let mut shard = self.shard(&key).lock();
        if let Some(old) = shard.lru.put(key, block) {
            shard.bytes -= cost(old.len());
        }
        shard.bytes += added;
        while shard.bytes > self.shard_capacity {
            match shard.lru.pop_lru() {
                Some((_, old)) => shard.bytes -= cost(old.len()),
                None => break,
            }
        }
    }

    /// Returns the cached block, or loads, caches and returns it. Two threads
    /// missing on one key at once may both load it; the result is the same.
    pub fn get_or_load<E>(&self, key: BlockKey, load: impl FnOnce() -> Result<Arc<[u8]>, E>) -> Result<Arc<[u8]>, E> {
        if let Some(block) = self.get(&key) {
            return Ok(block);
        }
        let block = load()?;
        self.insert(key, block.clone());
        Ok(block)
    }

    /// The bound it was made with.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// What the held blocks cost now (see `cost`).
    pub fn used_bytes(&self) -> usize {
        let large = self.large.lock().as_ref().map_or(0, |(_, b)| cost(b.len()));
        self.shards.iter().map(|s| s.lock().bytes).sum::<usize>() + large
    }

    pub fn stats(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }
}

/// A zero-filled block of `len` bytes, allocated once where the cache will
/// keep it (filling a `Vec` and converting would allocate and copy again).
/// Zeroed by the allocator (calloc): a large block comes as fresh zero
/// pages from the kernel, so a block that a hostile index claims is 64 MiB
/// costs nothing before decoding fails, and a real one is written once.
pub fn new_block(len: usize) -> Arc<[u8]> {
    let block: Arc<[std::mem::MaybeUninit<u8>]> = Arc::new_zeroed_slice(len);
    // SAFETY: zeroed bytes are valid `u8`s.
    unsafe { block.assume_init() }
}

/// The bytes of a block just made by `new_block`, to fill in.
pub fn block_mut(block: &mut Arc<[u8]>) -> &mut [u8] {
    Arc::get_mut(block).expect("a block being filled is not shared yet")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(offset: u64) -> BlockKey {
        BlockKey { file: FileId { dev: 1, ino: 2 }, kind: BlockKind::Decompressed, offset }
    }

    #[test]
    fn stays_within_its_byte_bound() {
        let cache = BlockCache::new(64 << 20);
        for i in 0..40_000u64 {
            cache.insert(key(i * 4096), vec![0u8; 4096].into());
            assert!(cache.used_bytes() <= 64 << 20);
        }
        assert!(cache.used_bytes() > 60 << 20, "and it is used");
    }

    #[test]
    fn returns_what_was_inserted() {
        let cache = BlockCache::new(1 << 20);
        cache.insert(key(0), vec![7u8; 100].into());
        assert_eq!(&*cache.get(&key(0)).unwrap(), &[7u8; 100][..]);
        assert!(cache.get(&key(1)).is_none());
        let other = BlockKey { kind: BlockKind::Table, ..key(0) };
        assert!(cache.get(&other).is_none(), "kinds must not collide");
    }

    #[test]
    fn a_block_too_large_for_a_shard_takes_the_large_slot() {
        let cache = BlockCache::new(512 << 20);
        let big = |byte: u8| -> Arc<[u8]> { vec![byte; 64 << 20].into() };
        cache.insert(key(0), big(1));
        assert_eq!(cache.get(&key(0)).unwrap()[0], 1);
        cache.insert(key(1), big(2));
        assert!(cache.get(&key(0)).is_none(), "one large block at a time");
        assert_eq!(cache.get(&key(1)).unwrap()[0], 2);
        for i in 0..200_000u64 {
            cache.insert(key(1000 + i * 4096), vec![0u8; 4096].into());
        }
        assert!(cache.used_bytes() <= 512 << 20, "within the bound: {}", cache.used_bytes());
        assert!(cache.get(&key(1)).is_some(), "small blocks do not evict it");
    }

    #[test]
    fn oversized_blocks_are_not_kept() {
        let cache = BlockCache::new(4000);
        cache.insert(key(0), vec![0u8; 5000].into());
        assert!(cache.get(&key(0)).is_none());
        assert_eq!(cache.used_bytes(), 0);
    }
}
