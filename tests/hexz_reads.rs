//! The HEXZ read path against the bytes that were packed: archives made by
//! the real hexz-cli 0.8.2 (LZ4 and zstd; CDC chunks of 16-256 KiB, `--dcam`
//! chunks up to 1 MiB, and `convert tar`'s fixed blocks of several sizes),
//! read through the library in seeded random order: small reads (which
//! decode only part of a block when it is not cached), large ones, reads
//! across block boundaries, sequential runs (which read ahead), and four
//! threads at once; with a cache far smaller than the data, and one that
//! holds it all. Every byte is compared with the source.
//!
//! The seed is printed; SNAPMOUNT_TEST_SEED=N runs the same reads again.
//! Needs hexz-cli 0.8.2 (`common::hexz_bin`, or SNAPMOUNT_HEXZ).

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use snapmount::cache::BlockCache;
use snapmount::format::hexz::{open_hexz, Stream};
use snapmount::view::View;

fn hexz(dir: &Path, args: &[&str]) {
    let o = exec(hexz_bin().to_str().unwrap(), args, Some(dir), DEFAULT_TIMEOUT);
    assert!(o.success(), "hexz failed\n{}", o.describe());
}

/// Disk-like data: text, random and zero 4 KiB pieces (gen_bytes), a long
/// zero stretch, and a repeated stretch (deduplicated chunks).
fn source(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = gen_bytes(len, seed);
    let zeros = len / 3;
    bytes[zeros..zeros + len / 10].fill(0);
    let (from, to, n) = (len / 8, len * 3 / 4, len / 16);
    bytes.copy_within(from..from + n, to);
    bytes
}

struct Archive {
    name: String,
    path: std::path::PathBuf,
    /// Fixed block size of `convert tar` archives, for reads around block
    /// boundaries (0: CDC chunks, boundaries unknown).
    block: u64,
}

/// Reads of one kind, each compared with `want`.
fn check_read(v: &dyn View, want: &[u8], off: u64, len: usize, what: &str) {
    let mut got = vec![0xA5u8; len];
    v.read_at(&mut got, off).unwrap_or_else(|e| panic!("{what}: read {len}@{off}: {e}"));
    let size = want.len() as u64;
    let end = (off + len as u64).min(size.max(off));
    let valid = (end - off) as usize;
    if got[..valid] != want[off as usize..end as usize] {
        let j = (0..valid).find(|&j| got[j] != want[off as usize + j]).unwrap();
        panic!(
            "{what}: read {len}@{off}: byte {} differs: got {:02x}, expected {:02x}",
            off + j as u64,
            got[j],
            want[off as usize + j]
        );
    }
    assert!(got[valid..].iter().all(|&b| b == 0), "{what}: read {len}@{off}: not zeros past the end");
}

/// One mix of seeded reads: `rounds` operations of random kinds.
fn random_reads(v: &dyn View, want: &[u8], block: u64, seed: u64, rounds: usize, what: &str) {
    let size = want.len() as u64;
    let mut rng = Rng::new(seed);
    for round in 0..rounds {
        let what = format!("{what}, seed {seed}, round {round}");
        match rng.below(6) {
            // Small reads anywhere: a missed block is decoded only so far.
            0 | 1 => {
                let len = rng.range(1, 8192) as usize;
                check_read(v, want, rng.below(size), len, &what);
            }
            // Large reads: several blocks fetched together.
            2 => {
                let len = rng.range(64 << 10, 3 << 20) as usize;
                check_read(v, want, rng.below(size), len, &what);
            }
            // Across a block boundary (fixed blocks), or a medium read.
            3 => {
                let (off, len) = if let Some(blocks) = size.checked_div(block) {
                    let b = rng.range(1, blocks.max(1)) * block;
                    let before = rng.range(1, 6000);
                    (b.saturating_sub(before), (before + rng.range(1, 6000)) as usize)
                } else {
                    (rng.below(size), rng.range(8 << 10, 200 << 10) as usize)
                };
                check_read(v, want, off, len, &what);
            }
            // A sequential run: reads ahead, then on through the window.
            4 => {
                let len = *rng.pick(&[4096u64, 16 << 10, 128 << 10, 1 << 20]);
                let count = rng.range(2, (12 << 20) / len) as usize;
                let mut off = rng.below(size);
                for i in 0..count {
                    if off >= size {
                        break;
                    }
                    check_read(v, want, off, len as usize, &format!("{what}, sequential read {i}"));
                    off += len;
                }
            }
            // The tail of the stream, past its end.
            _ => {
                let len = rng.range(1, 300 << 10) as usize;
                let off = size.saturating_sub(rng.below(len as u64 + 1));
                check_read(v, want, off, len, &what);
            }
        }
    }
}

fn check_archive(a: &Archive, want: &[u8], seed: u64) {
    // 256 KiB: smaller than one read-ahead window, even than some blocks
    // (not cached at all then); 256 MiB: everything stays.
    for cache_bytes in [256u64 << 10, 4 << 20, 256 << 20] {
        let what = format!("{} with a {} KiB cache", a.name, cache_bytes >> 10);
        let cache = Arc::new(BlockCache::new(cache_bytes));
        let no_password = |_: &Path| Err("no password".to_string());
        let archive = open_hexz(&a.path, &cache, &no_password, &Default::default()).unwrap();
        let view = archive.view(Stream::Main);
        assert!(view.size() >= want.len() as u64, "{what}: size {}", view.size());
        let mut want = want.to_vec();
        // `convert tar` declares more than its blocks cover: zeros there.
        want.resize(view.size() as usize, 0);
        random_reads(&view, &want, a.block, seed ^ cache_bytes, 400, &what);
        // Four threads at once, each its own mix (read-ahead races,
        // blocks decoded twice, evictions under one another's feet).
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (view, want, what) = (&view, &want, &what);
                s.spawn(move || random_reads(view, want, a.block, seed ^ cache_bytes ^ (t + 1) << 32, 150, what));
            }
        });
        // And the whole stream, in one pass of 1 MiB reads.
        let mut pos = 0;
        while pos < want.len() as u64 {
            check_read(&view, &want, pos, 1 << 20, &format!("{what}, whole pass"));
            pos += 1 << 20;
        }
    }
}

fn archives(dir: &Path, codec: &str) -> Vec<Archive> {
    let mut out = Vec::new();
    let mut add = |name: String, block: u64| out.push(Archive { path: dir.join(&name), name, block });
    let z: &[&str] = if codec == "zstd" { &["--compression", "zstd"] } else { &[] };
    let pack = |name: &str, extra: &[&str]| {
        let mut args = vec!["pack", "-s", "src.raw", name];
        args.extend_from_slice(z);
        args.extend_from_slice(extra);
        hexz(dir, &args);
    };
    let name = format!("{codec}.hxz");
    pack(&name, &[]);
    add(name, 0);
    let name = format!("{codec}-dcam.hxz");
    pack(&name, &["--dcam"]);
    add(name, 0);
    let name = format!("{codec}-serial.hxz");
    pack(&name, &["--workers", "1"]);
    add(name, 0);
    for block in [4096u64, 65536, 1 << 20] {
        let name = format!("{codec}-tar-{}k.hxz", block >> 10);
        let bs = block.to_string();
        let mut args = vec!["convert", "-s", "tar", "src.tar", &name, "--block-size", &bs];
        args.extend_from_slice(z);
        hexz(dir, &args);
        add(name, block);
    }
    out
}

fn run(codec: &str, default_seed: u64) {
    let seed = test_seed(default_seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let want = source((20 * MIB + 12345) as usize, seed);
    std::fs::write(dir.join("src.raw"), &want).unwrap();
    bash(dir, "tar cf src.tar src.raw");
    for a in archives(dir, codec) {
        eprintln!("{}", a.name);
        check_archive(&a, &want, seed);
    }
}

#[test]
fn lz4_archives_read_back_exactly() {
    run("lz4", 20_260_101);
}

#[test]
fn zstd_archives_read_back_exactly() {
    run("zstd", 20_260_102);
}
