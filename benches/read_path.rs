//! In-process benchmarks of the read path, no FUSE: so regressions in L2
//! lookup, decompression and the cache show without a mount.
//! Run: `cargo bench --bench read_path` (needs qemu-img to build the images).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use snapmount::cache::BlockCache;
use snapmount::format::open_qcow2;
use snapmount::view::View;

fn qemu_img(dir: &Path, args: &[&str]) {
    let ok = Command::new("qemu-img").args(args).current_dir(dir).status().expect("qemu-img runs");
    assert!(ok.success(), "qemu-img {args:?} failed");
}

/// 64 MiB of half-compressible data (text and pseudo-random halves per 4 KiB).
fn source(dir: &Path) {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut data = Vec::with_capacity(64 << 20);
    while data.len() < 64 << 20 {
        for i in 0..2048 {
            data.push(b"lorem ipsum dolor sit amet "[i % 27]);
        }
        for _ in 0..256 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(dir.join("src.raw"), data).unwrap();
}

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    source(dir);
    qemu_img(dir, &["convert", "-q", "-f", "raw", "-O", "qcow2", "src.raw", "plain.qcow2"]);
    for ct in ["zlib", "zstd"] {
        let out = format!("{ct}.qcow2");
        qemu_img(
            dir,
            &[
                "convert",
                "-q",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ct}"),
                "src.raw",
                &out,
            ],
        );
    }

    let mut group = c.benchmark_group("read_4k");
    group.throughput(Throughput::Bytes(4096));
    for name in ["plain", "zlib", "zstd"] {
        let cache = Arc::new(BlockCache::new(1 << 30));
        let image = open_qcow2(&dir.join(format!("{name}.qcow2")), &cache, &Default::default()).unwrap();
        let view = image.active_view();
        let mut buf = vec![0u8; 4096];
        let mut off = 0u64;
        // Cache hit: the cluster (and its L2 table) are already cached.
        group.bench_function(format!("{name}/cached"), |b| {
            b.iter(|| {
                off = (off + 4096) % (64 << 10);
                view.read_at(&mut buf, off).unwrap();
            })
        });
        // Cache miss: a fresh cache for every read, so each read pays the L2
        // table read and, for compressed images, one cluster decompression.
        group.bench_function(format!("{name}/cold"), |b| {
            b.iter_batched(
                || {
                    open_qcow2(
                        &dir.join(format!("{name}.qcow2")),
                        &Arc::new(BlockCache::new(1 << 30)),
                        &Default::default(),
                    )
                    .unwrap()
                },
                |img| img.active_view().read_at(&mut buf, 40 << 20).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    let mut group = c.benchmark_group("read_1m_sequential");
    group.throughput(Throughput::Bytes(1 << 20));
    for name in ["plain", "zstd"] {
        let cache = Arc::new(BlockCache::new(1 << 30));
        let image = open_qcow2(&dir.join(format!("{name}.qcow2")), &cache, &Default::default()).unwrap();
        let view = image.active_view();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                off = (off + (1 << 20)) % (64 << 20);
                view.read_at(&mut buf, off).unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
