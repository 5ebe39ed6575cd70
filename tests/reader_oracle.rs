//! The qcow2 reader, driven directly (no FUSE), against `qemu-img convert -O
//! raw` as the oracle: the image matrix of the research note, Part C.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use snapmount::cache::BlockCache;
use snapmount::format::open_qcow2;
use snapmount::view::View;

fn sh(dir: &Path, script: &str) {
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "script failed: {script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic half-compressible data: text-like runs, random runs, zeros.
fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let kind = next() % 3;
        let run = (next() % 20000) as usize + 1;
        for i in 0..run {
            out.push(match kind {
                0 => b"the quick brown fox jumps over the lazy dog "[i % 44],
                1 => next() as u8,
                _ => 0,
            });
        }
    }
    out.truncate(len);
    out
}

/// Compares the reader's view of `img` with qemu-img's raw conversion, in
/// chunks of odd sizes so that reads straddle clusters.
fn check(dir: &Path, img: &str, cache: &Arc<BlockCache>) {
    let expected_path = dir.join(format!("{img}.expected"));
    sh(dir, &format!("qemu-img convert -O raw '{img}' '{}'", expected_path.display()));
    let expected = std::fs::read(&expected_path).unwrap();
    let image = open_qcow2(&dir.join(img), cache, &Default::default()).unwrap_or_else(|e| panic!("{img}: {e}"));
    let view = image.active_view();
    assert_eq!(view.size(), expected.len() as u64, "{img}: size");
    let mut got = vec![0u8; expected.len()];
    let mut pos = 0usize;
    let mut step = 1usize << 20;
    while pos < got.len() {
        let end = (pos + step).min(got.len());
        view.read_at(&mut got[pos..end], pos as u64).unwrap_or_else(|e| panic!("{img}: {e}"));
        pos = end;
        step = if step == 1 << 20 { 777_777 } else { 1 << 20 };
    }
    if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
        panic!("{img}: first difference at byte {i:#x}: got {:#x}, want {:#x}", got[i], expected[i]);
    }
    std::fs::remove_file(expected_path).unwrap();
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("src8m.raw"), mixed_data(8 << 20, 42)).unwrap();
    std::fs::write(dir.join("odd.raw"), mixed_data(8_324_615, 7)).unwrap();
    (tmp, dir)
}

#[test]
fn every_cluster_size() {
    let (_tmp, dir) = scratch();
    let cache = Arc::new(BlockCache::new(64 << 20));
    for cb in 9..=21 {
        let img = format!("cs{cb}.qcow2");
        sh(
            &dir,
            &format!(
                "qemu-img create -q -f qcow2 -o cluster_size={} {img} 64M && \
             qemu-io -c 'write -P 0x11 0 3k' -c 'write -P 0x22 1M 1M' -c 'write -P 0x33 {} 4096' \
                     -c 'write -s src8m.raw 20M 8M' {img} >/dev/null",
                1u64 << cb,
                (64 << 20) - 4096
            ),
        );
        check(&dir, &img, &cache);
    }
}

#[test]
fn compressed_zlib_and_zstd() {
    let (_tmp, dir) = scratch();
    let cache = Arc::new(BlockCache::new(64 << 20));
    for ct in ["zlib", "zstd"] {
        for cb in [9, 12, 16, 21] {
            let img = format!("c_{ct}_{cb}.qcow2");
            sh(
                &dir,
                &format!(
                    "qemu-img convert -c -f raw -O qcow2 -o compression_type={ct},cluster_size={} src8m.raw {img}",
                    1u64 << cb
                ),
            );
            check(&dir, &img, &cache);
        }
        let img = format!("c_{ct}_odd.qcow2");
        sh(&dir, &format!("qemu-img convert -c -f raw -O qcow2 -o compression_type={ct} odd.raw {img}"));
        check(&dir, &img, &cache);
    }
    sh(
        &dir,
        "qemu-img create -q -f qcow2 -o compression_type=zstd mixc.qcow2 16M && \
        qemu-io -c 'write -c -P 0x41 0 64k' -c 'write -c -P 0x42 64k 64k' -c 'write -P 0x43 128k 64k' \
                -c 'write -c -s src8m.raw 1M 64k' mixc.qcow2 >/dev/null",
    );
    check(&dir, "mixc.qcow2", &cache);
}

/// Small reads that end inside a compressed cluster decode only up to their
/// end (deflate) and must not leave a partial cluster in the cache; large
/// reads decode whole clusters straight into the caller's buffer. Seeded
/// random reads of every size in random order, over one cache, against
/// qemu-img's conversion, for zlib and zstd and three cluster sizes.
#[test]
fn partial_and_direct_decoding_in_any_order() {
    let (_tmp, dir) = scratch();
    let seed: u64 = std::env::var("SNAPMOUNT_TEST_SEED").map_or(21, |s| s.parse().unwrap());
    eprintln!("seed {seed} (SNAPMOUNT_TEST_SEED)");
    for ct in ["zlib", "zstd"] {
        for cb in [12, 16, 18] {
            let img = format!("p_{ct}_{cb}.qcow2");
            let exp = format!("{img}.raw");
            sh(
                &dir,
                &format!(
                    "qemu-img convert -c -f raw -O qcow2 -o compression_type={ct},cluster_size={} src8m.raw {img} && \
                     qemu-img convert -O raw {img} {exp}",
                    1u64 << cb
                ),
            );
            let expected = std::fs::read(dir.join(&exp)).unwrap();
            // A cache of a few clusters, so that clusters come and go.
            let cache = Arc::new(BlockCache::new(4 << cb));
            let view = open_qcow2(&dir.join(&img), &cache, &Default::default()).unwrap().active_view();
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let cs = 1u64 << cb;
            for i in 0..3000 {
                let cluster = next() % (expected.len() as u64 / cs);
                // The cluster's head, its tail, a middle bit, all of it, or
                // a run of several clusters from an odd offset.
                let (off, len) = match next() % 5 {
                    0 => (cluster * cs, 1 + next() % 4096),
                    1 => (cluster * cs + cs - 4096, 4096),
                    2 => (cluster * cs + next() % (cs / 2), 1 + next() % (cs / 2)),
                    3 => (cluster * cs, cs),
                    _ => (cluster * cs + next() % cs, 1 + next() % (5 * cs)),
                };
                let len = len.min(expected.len() as u64 - off) as usize;
                let mut got = vec![0u8; len];
                view.read_at(&mut got, off).unwrap();
                let want = &expected[off as usize..off as usize + len];
                assert!(got == want, "{img} read #{i}: {len} bytes at {off:#x} differ (seed {seed})");
            }
        }
    }
}

#[test]
fn extended_l2_zero_clusters_v2_and_chains() {
    let (_tmp, dir) = scratch();
    let cache = Arc::new(BlockCache::new(64 << 20));
    sh(
        &dir,
        r#"
        q() { qemu-io "$@" >/dev/null; }
        qemu-img create -q -f qcow2 -o cluster_size=64k sc_base.qcow2 16M
        q -c 'write -P 0xbb 0 16M' sc_base.qcow2
        qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b sc_base.qcow2 -F qcow2 sc_top.qcow2
        q -c 'write -P 0x01 2k 2k' -c 'write -z 8k 2k' -c 'write -P 0x02 1M 64k' -c 'write -z 2M 64k' -c 'write -P 0x03 4097 100' sc_top.qcow2
        qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=2M sc2m.qcow2 16M
        q -c 'write -P 0x05 64k 64k' sc2m.qcow2
        qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16k sc16k.qcow2 16M
        q -c 'write -P 0x06 512 512' -c 'write -c -P 0x07 32k 16k' sc16k.qcow2
        mkdir -p chain/a chain/b
        qemu-img create -q -f qcow2 chain/a/base.qcow2 32M
        q -c 'write -P 0xa0 0 32M' chain/a/base.qcow2
        qemu-img create -q -f qcow2 -b ../a/base.qcow2 -F qcow2 chain/b/mid1.qcow2 48M
        q -c 'write -P 0xa1 1M 1M' chain/b/mid1.qcow2
        qemu-img create -q -f qcow2 -b "$PWD/chain/b/mid1.qcow2" -F qcow2 chain/mid2.qcow2 64M
        q -c 'write -P 0xa2 2M 1M' -c 'write -z 0 64k' chain/mid2.qcow2
        qemu-img create -q -f qcow2 -b mid2.qcow2 -F qcow2 chain/top.qcow2
        q -c 'write -P 0xa3 3M 1M' -c 'discard 2M 64k' chain/top.qcow2
        head -c $((1024*1024+100)) src8m.raw > rawbase.raw
        qemu-img create -q -f qcow2 -b rawbase.raw -F raw rawtop.qcow2 8M
        q -c 'write -P 0x55 1M 64k' rawtop.qcow2
        qemu-img create -q -f qcow2 zero.qcow2 16M
        q -c 'write -P 0x77 0 4M' -c 'write -z 64k 64k' -c 'write -z -u 256k 128k' -c 'discard 1M 128k' -c 'write -z 8M 1M' zero.qcow2
        qemu-img create -q -f qcow2 -b zero.qcow2 -F qcow2 zerotop.qcow2
        q -c 'write -z 0 64k' -c 'write -z -u 2M 64k' -c 'discard 3M 64k' zerotop.qcow2
        qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 16M
        q -c 'write -P 0x22 0 1M' -c 'write -z 2M 64k' v2.qcow2
        qemu-img snapshot -c v2snap v2.qcow2
        q -c 'write -P 0x23 0 64k' v2.qcow2
        qemu-img create -q -f qcow2 -o compat=0.10 -b v2.qcow2 -F qcow2 v2top.qcow2
        q -c 'write -z 0 64k' v2top.qcow2
        qemu-img create -q -f qcow2 -o data_file=ext.data ext.qcow2 16M
        q -c 'write -P 0x99 1M 1M' -c 'write -z 4M 64k' ext.qcow2
        qemu-img create -q -f qcow2 -o data_file=extraw.data,data_file_raw=on extraw.qcow2 16M
        q -c 'write -P 0x9a 1M 1M' extraw.qcow2
        qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 16M
        q -c 'write -P 0x66 0 1M' lazy.qcow2
        cp lazy.qcow2 dirty.qcow2
        qemu-io -c 'write -P 0x67 2M 1M' -c abort dirty.qcow2 >/dev/null 2>&1 || true
        qemu-img create -q -f qcow2 -o preallocation=metadata pmeta.qcow2 16M
        q -c 'write -P 0x44 1M 64k' pmeta.qcow2
        for f in rc1 rc64; do qemu-img create -q -f qcow2 -o refcount_bits=${f#rc} $f.qcow2 16M; q -c 'write -P 0x31 0 1M' $f.qcow2; done
        qemu-img create -q -f qcow2 bitmap.qcow2 16M
        qemu-img bitmap --add bitmap.qcow2 bm0
        q -c 'write -P 0x45 0 1M' bitmap.qcow2
    "#,
    );
    for img in [
        "sc_top.qcow2",
        "sc2m.qcow2",
        "sc16k.qcow2",
        "chain/top.qcow2",
        "chain/mid2.qcow2",
        "rawtop.qcow2",
        "zero.qcow2",
        "zerotop.qcow2",
        "v2.qcow2",
        "v2top.qcow2",
        "ext.qcow2",
        "extraw.qcow2",
        "lazy.qcow2",
        "dirty.qcow2",
        "pmeta.qcow2",
        "rc1.qcow2",
        "rc64.qcow2",
        "bitmap.qcow2",
    ] {
        check(&dir, img, &cache);
    }
}
