//! The shared part of the fuzz targets: an input becomes a file on a RAM
//! disk beside fixed neighbours (a base image it may name as backing file or
//! parent), is opened the way `snapmount mount` opens it, and every node of
//! the resulting tree is stat'ed, walked and read at a bounded set of offsets.
//!
//! The file is owned by `nobody`, so names inside it pass through the same
//! confinement check as on a real root mount: an input can reach only
//! world-readable files, read-only.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use snapmount::cache::BlockCache;
use snapmount::catalog::{Catalog, Content};
use snapmount::view::{self, View};

/// The uid and gid the input file is given (nobody, nogroup).
const NOBODY: u32 = 65534;
/// Password given to every encrypted HEXZ input (the fixtures' password,
/// so that encrypted seeds decrypt).
const PASSWORD: &str = include_str!("../../tests/fixtures/hexz/password.txt");
/// Reads done per view: the first MiB in 64 KiB steps, then samples.
const READS_PER_VIEW: u64 = 48;
/// The block cache: small, so that eviction paths run too.
const CACHE: u64 = 8 << 20;
/// Nodes whose views are read (the rest are only stat'ed).
const NODES_READ: u64 = 256;
/// Extents walked per view (`stat`'s allocated size, SEEK_DATA/SEEK_HOLE).
const WALK_STEPS: u64 = 4096;

/// A private directory on /dev/shm holding the neighbours, made once per
/// process; each input is written to `image` inside it.
fn workdir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        one_cpu();
        let dir = PathBuf::from(format!("/dev/shm/snapmount-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let raw: Vec<u8> = (0..1u32 << 20).map(|i| ((i * 7 + i / 4096) % 251) as u8).collect();
        for (name, bytes) in [
            ("base.qcow2", &include_bytes!("../assets/base.qcow2")[..]),
            ("base.raw", &raw[..]),
            ("base.hxz", &include_bytes!("../../tests/fixtures/hexz/base.hxz")[..]),
        ] {
            std::fs::write(dir.join(name), bytes).unwrap();
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        dir
    })
}

/// Keeps the process on one CPU before snapmount first asks how many it
/// has: the readers then decode on the calling thread instead of spreading
/// work over short-lived threads, whose thread-local decoders are freed
/// only as each thread exits, after the input is done, which libFuzzer's
/// per-input leak check would report as a leak. One fuzzer process per core
/// is the way to use more cores anyway.
fn one_cpu() {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and
    // sched_setaffinity only read and write that local set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(libc::sched_getcpu().max(0) as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    assert_eq!(snapmount::cpus(), 1, "snapmount must see one CPU");
}

/// Opens `data` as an image (its first bytes replaced by `magic`, so that
/// every input reaches the parser the target is for) and reads all of it.
pub fn exercise(magic: &[u8], data: &[u8]) {
    let path = workdir().join("image");
    let mut bytes = data.to_vec();
    let n = magic.len().min(bytes.len());
    bytes[..n].copy_from_slice(&magic[..n]);
    std::fs::write(&path, &bytes).unwrap();
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).unwrap();

    let cache = Arc::new(BlockCache::new(CACHE));
    let password = |_: &Path| Ok(PASSWORD.trim_end().to_string());
    let Ok(catalog) = Catalog::build(&[path], &cache, &password, &Default::default()) else {
        return;
    };
    let mut buf = vec![0u8; 64 << 10];
    // Every node is stat'ed; the first ones (an image's own views come
    // first, then its snapshots in table order) are read too: an input
    // with thousands of snapshots is then as fast per input as one with a
    // few, and the one-second budget measures the code, not the harness.
    for ino in 1..=catalog.len() as u64 {
        let Some(node) = catalog.node(ino) else { continue };
        if ino > NODES_READ {
            let _ = node.size();
            continue;
        }
        let _ = node.size();
        let _ = node.allocated();
        match &node.content {
            Content::View(v) => read_view(v.as_ref(), &mut buf),
            Content::Lazy(l) => {
                let _ = l.bytes();
            }
            Content::Dir(_) | Content::Bytes(_) => {}
        }
    }
}

fn read_view(v: &dyn View, buf: &mut [u8]) {
    let size = v.size();
    let step = buf.len() as u64;
    for i in 0..READS_PER_VIEW {
        let at = if i < 16 { i * step } else { (size / READS_PER_VIEW).saturating_mul(i) + 511 };
        if at >= size {
            continue;
        }
        let len = (size - at).min(step) as usize;
        let _ = v.read_at(&mut buf[..len], at);
    }
    let _ = view::allocated_bytes(v, WALK_STEPS);
    let _ = view::seek_data(v, size / 2);
    let _ = view::seek_hole(v, 0);
}

/// Bytes as a disk view, for the parsers that read a disk (partition
/// tables).
pub struct BytesView<'a>(pub &'a [u8]);

impl View for BytesView<'_> {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> snapmount::Result<()> {
        buf.fill(0);
        let start = (offset.min(self.0.len() as u64)) as usize;
        let n = buf.len().min(self.0.len() - start);
        buf[..n].copy_from_slice(&self.0[start..start + n]);
        Ok(())
    }

    fn extent(&self, offset: u64, max: u64) -> snapmount::Result<view::Extent> {
        Ok(view::Extent { len: (self.size() - offset).min(max).max(1), data: true })
    }
}
