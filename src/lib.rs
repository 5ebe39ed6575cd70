//! snapmount: VM disk images and their snapshots, read-only, as raw files.
//!
//! The format readers (`format`) and views (`view`) know nothing of FUSE, so
//! tests and `snapmount export` drive them directly; `fs` adapts the catalog
//! of views to FUSE.

pub mod bytes;
pub mod cache;
pub mod catalog;
pub mod error;
pub mod format;
pub mod fs;
pub mod io;
pub mod partition;
pub mod tree;
pub mod view;

pub use error::{Error, Result};

/// CPUs this process may use, asked once: `available_parallelism` reads
/// cgroup files on every call, far too slow for a read path.
pub fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `work` on every item, the items shared out over up to `cpus()`
/// threads; returns when all are done. For warming the cache with the
/// blocks of one large request.
pub fn spread<T: Sync>(items: &[T], work: impl Fn(&T) + Sync) {
    let mut items: Vec<&T> = items.iter().collect();
    spread_mut(&mut items, |item| work(item));
}

/// `spread` for work that writes into its item (each its own slice of one
/// buffer, say).
pub fn spread_mut<T: Send>(items: &mut [T], work: impl Fn(&mut T) + Sync) {
    // One item, or one CPU (as under the fuzzer): no threads at all.
    if items.len() < 2 || cpus() < 2 {
        return items.iter_mut().for_each(work);
    }
    let per = items.len().div_ceil(cpus().min(items.len()));
    let work = &work;
    std::thread::scope(|scope| {
        for chunk in items.chunks_mut(per) {
            scope.spawn(move || chunk.iter_mut().for_each(work));
        }
    });
}
