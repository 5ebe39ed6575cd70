//! End-to-end tests: images made with qemu-img / qemu-io, mounted with the real
//! `snapmount` binary (background mode), bytes compared with `qemu-img convert -O raw`.
//!
//! Needs: qemu-utils, e2fsprogs, /dev/fuse (fuse3), and root (FUSE mounts, loop mounts).
//! Run: `cargo test --release --test mount_qcow2 -- --test-threads=2`
//! Randomized test: SNAPMOUNT_TEST_SEED (base seed, default 1), SNAPMOUNT_TEST_CASES (count,
//! default 12); a failure prints the case seed and the full qemu-img/qemu-io recipe.
//! SNAPMOUNT_TEST_KEEP=1 keeps the test directories; SNAPMOUNT_TEST_WATCHDOG_SECS (default 240)
//! bounds how long a mount may live before its daemon is killed (a hung read fails, not hangs).

mod common;

use common::*;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Per-test directories: images, mount point, scratch (oracles), all inside one TempDir.
struct T {
    _td: Option<tempfile::TempDir>,
    root: PathBuf,
    imgs: PathBuf,
    mnt: PathBuf,
    scratch: PathBuf,
}

fn setup(name: &str) -> T {
    preflight();
    let td = tempfile::Builder::new().prefix(&format!("snapmount-{name}-")).tempdir().unwrap();
    let root = td.path().canonicalize().unwrap();
    let imgs = root.join("imgs");
    let mnt = root.join("mnt");
    let scratch = root.join("scratch");
    for d in [&imgs, &mnt, &scratch] {
        fs::create_dir_all(d).unwrap();
    }
    // SNAPMOUNT_TEST_KEEP=1 keeps the images (and oracles) for debugging.
    let td = if std::env::var_os("SNAPMOUNT_TEST_KEEP").is_some() {
        eprintln!("keeping test directory {}", root.display());
        let _ = td.keep();
        None
    } else {
        Some(td)
    };
    T { _td: td, root, imgs, mnt, scratch }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn m(n: u64) -> u64 {
    n * MIB
}

/// Directory entries of `dir` that are qcow2 images (by magic), sorted.
fn qcow2_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_file() && {
                let mut b = [0u8; 4];
                File::open(p).and_then(|f| f.read_exact_at(&mut b, 0)).is_ok() && b == *b"QFI\xfb"
            }
        })
        .collect();
    v.sort();
    v
}

fn json_u64(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key)
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("info.json: key `{key}` missing or not an unsigned integer in {v}"))
}

fn json_arr<'a>(v: &'a serde_json::Value, key: &str) -> &'a Vec<serde_json::Value> {
    v.get(key)
        .and_then(|x| x.as_array())
        .unwrap_or_else(|| panic!("info.json: key `{key}` missing or not an array in {v}"))
}

/// The Part C write pattern (research doc, C.1).
fn part_c_pattern(img: &Path, src8m: &Path, size: u64) {
    qemu_io(
        img,
        &[
            "write -P 0x11 0 3k".to_string(),
            "write -P 0x22 1M 1M".to_string(),
            format!("write -P 0x33 {} 4096", size - 4096),
            format!("write -s {} 20M 8M", s(src8m)),
        ],
    );
}

fn qemu_compare_raw_vs_qcow2(raw: &Path, img: &Path) {
    let o = exec(
        "qemu-img",
        &[
            OsStr::new("compare"),
            OsStr::new("-f"),
            OsStr::new("raw"),
            raw.as_os_str(),
            OsStr::new("-F"),
            OsStr::new("qcow2"),
            img.file_name().unwrap(),
        ],
        img.parent(),
        Duration::from_secs(120),
    );
    assert!(o.success(), "qemu-img compare reports a difference\n{}", o.describe());
}

// ---------------------------------------------------------------------------
// 1. Cluster sizes, v2
// ---------------------------------------------------------------------------

#[test]
fn cluster_sizes_512b_to_2m() {
    let t = setup("clusters");
    let src = t.scratch.join("src8m.raw");
    gen_data(&src, m(8), 1);
    let size = m(64);
    let mut imgs = Vec::new();
    for cb in 9..=21u32 {
        let img = t.imgs.join(format!("cs{cb}.qcow2"));
        create_qcow2(&img, "64M", &format!("cluster_size={}", 1u64 << cb), None);
        part_c_pattern(&img, &src, size);
        imgs.push(img);
    }
    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    let names: Vec<String> = imgs.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(mnt.entries(), {
        let mut n = names.clone();
        n.sort();
        n
    });
    mnt.assert_all_match_thoroughly(&imgs, &t.scratch, 30);
    // QEMU's own comparison, once with the smallest and once with the default cluster size.
    qemu_compare_raw_vs_qcow2(&mnt.disk("cs9.qcow2"), &t.imgs.join("cs9.qcow2"));
    qemu_compare_raw_vs_qcow2(&mnt.disk("cs16.qcow2"), &t.imgs.join("cs16.qcow2"));
    for cb in [9u32, 16, 21] {
        let info = mnt.info(&format!("cs{cb}.qcow2"));
        assert_eq!(json_u64(&info, "cluster_size"), 1 << cb, "cluster_size in info.json of cs{cb}");
        assert_eq!(json_u64(&info, "virtual_size"), size);
    }
}

#[test]
fn v2_images_overlay_and_snapshot() {
    let t = setup("v2");
    let src = t.scratch.join("src.raw");
    gen_data(&src, m(2), 2);
    let v2 = t.imgs.join("v2.qcow2");
    create_qcow2(&v2, "16M", "compat=0.10", None);
    qemu_io(&v2, &["write -P 0x22 0 1M", "write -z 2M 64k"]);
    qemu_img(&["snapshot", "-c", "v2snap", &s(&v2)]);
    qemu_io(&v2, &["write -P 0x23 0 64k", "write -P 0x24 5M 100"]);
    let v2top = t.imgs.join("v2top.qcow2");
    create_qcow2(&v2top, "", "compat=0.10", Some(("v2.qcow2", "qcow2")));
    qemu_io(&v2top, &["write -z 0 64k", "write -P 0x25 640k 10k", "discard 5M 64k"]);
    // v2 with tiny clusters, compressed clusters and odd-offset writes
    let v2small = t.imgs.join("v2small.qcow2");
    create_qcow2(&v2small, "8M", "compat=0.10,cluster_size=512", None);
    qemu_io(
        &v2small,
        &[
            "write -P 0x31 100 5000".to_string(),
            "write -c -P 0x32 8k 4k".to_string(),
            format!("write -c -s {} 1M 64k", s(&src)),
            format!("write -s {} 3M 1M", s(&src)),
            "write -z 3M 4k".to_string(),
        ],
    );
    let v2big = t.imgs.join("v2big.qcow2");
    create_qcow2(&v2big, "16M", "compat=0.10,cluster_size=2M", None);
    qemu_io(&v2big, &["write -P 0x41 1M 3M".to_string(), format!("write -c -s {} 8M 2M", s(&src))]);

    let imgs = qcow2_files(&t.imgs);
    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    mnt.assert_all_match_thoroughly(&imgs, &t.scratch, 40);
    let info = mnt.info("v2.qcow2");
    assert_eq!(json_u64(&info, "version"), 2);
    assert_eq!(json_arr(&info, "snapshots").len(), 1, "v2.qcow2 has one snapshot: {info}");
    let info = mnt.info("v2top.qcow2");
    let chain = json_arr(&info, "backing_chain");
    assert_eq!(chain.len(), 1, "{info}");
    assert!(chain[0]["path"].as_str().unwrap_or("").ends_with("v2.qcow2"), "{info}");
}

// ---------------------------------------------------------------------------
// 2. Compression
// ---------------------------------------------------------------------------

#[test]
fn compressed_zlib_and_zstd() {
    let t = setup("compressed");
    let src = t.scratch.join("src8m.raw");
    gen_data(&src, m(8), 3);
    let odd = t.scratch.join("odd.raw");
    gen_data(&odd, 8_324_615, 4);
    for ct in ["zlib", "zstd"] {
        for cb in [9u32, 12, 16, 21] {
            qemu_img(&[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ct},cluster_size={}", 1u64 << cb),
                &s(&src),
                &s(&t.imgs.join(format!("c_{ct}_cs{cb}.qcow2"))),
            ]);
        }
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct}"),
            &s(&odd),
            &s(&t.imgs.join(format!("c_{ct}_odd.qcow2"))),
        ]);
        // compressed and normal clusters mixed by qemu-io
        let mix = t.imgs.join(format!("mix_{ct}.qcow2"));
        create_qcow2(&mix, "16M", &format!("compression_type={ct}"), None);
        qemu_io(
            &mix,
            &[
                "write -c -P 0x41 0 64k".to_string(),
                "write -c -P 0x42 64k 64k".to_string(),
                "write -P 0x43 128k 64k".to_string(),
                format!("write -c -s {} 1M 64k", s(&src)),
                format!("write -c -s {} 2M 640k", s(&src)),
                "write -P 0x44 2200k 10k".to_string(), // partial overwrite of a compressed cluster
                "write -z 2560k 64k".to_string(),
            ],
        );
    }
    let imgs = qcow2_files(&t.imgs);
    assert_eq!(imgs.len(), 12);
    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    mnt.assert_all_match_thoroughly(&imgs, &t.scratch, 60);
    assert_seek_walks(&mnt, &imgs, &t.scratch);
    let info = mnt.info("c_zstd_odd.qcow2");
    assert_eq!(json_u64(&info, "virtual_size"), 8_325_120, "odd source rounds up to 512 in qemu-img: {info}");
}

/// The smallest block cache (16 MiB: eight 2 MiB clusters) and concurrent
/// random reads over 32 MiB of clusters; a cache below 16 MiB is refused.
#[test]
fn small_cache_and_concurrent_random_reads() {
    let t = setup("cache");
    let src = t.scratch.join("src.raw");
    gen_data(&src, m(16), 5);
    let a = t.imgs.join("zstd2m.qcow2");
    let b = t.imgs.join("zlib64k.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd,cluster_size=2M",
        &s(&src),
        &s(&a),
    ]);
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zlib", &s(&src), &s(&b)]);
    let refused = snapmount(&["mount", "--cache-size", "1M", &s(&t.imgs), &s(&t.mnt)]);
    assert!(!refused.success() && refused.stderr.contains("too small"), "{}", refused.describe());
    let mnt = Mount::with_args(&["--cache-size", "16M"], &[&t.imgs], &t.mnt);
    mnt.assert_all_match(&[&a, &b], &t.scratch);
    for img in [&a, &b] {
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        let exp_path = t.scratch.join(format!("{name}.exp"));
        oracle_raw(img, &exp_path);
        let exp = std::sync::Arc::new(fs::read(&exp_path).unwrap());
        let disk = mnt.disk(&name);
        let mut hs = Vec::new();
        for th in 0..4u64 {
            let exp = exp.clone();
            let disk = disk.clone();
            hs.push(std::thread::spawn(move || {
                let f = File::open(&disk).unwrap();
                let mut rng = Rng::new(100 + th);
                let len = exp.len() as u64;
                for _ in 0..300 {
                    let n = rng.range(1, 256 * 1024).min(len);
                    let off = rng.below(len - n + 1);
                    let mut buf = vec![0u8; n as usize];
                    f.read_exact_at(&mut buf, off)
                        .unwrap_or_else(|e| panic!("pread {n}@{off} of {}: {e}", disk.display()));
                    if buf[..] != exp[off as usize..(off + n) as usize] {
                        let i = (0..n as usize).find(|&i| buf[i] != exp[off as usize + i]).unwrap();
                        panic!("thread {th}: {} differs at byte {} (pread {n}@{off})", disk.display(), off + i as u64);
                    }
                }
            }));
        }
        for h in hs {
            h.join().expect("concurrent reader failed");
        }
    }
}

// ---------------------------------------------------------------------------
// 3. Extended L2
// ---------------------------------------------------------------------------

#[test]
fn extended_l2_subclusters_over_backing() {
    let t = setup("extl2");
    let src = t.scratch.join("src.raw");
    gen_data(&src, m(16), 6);
    let base = t.imgs.join("sc_base.qcow2");
    create_qcow2(&base, "16M", "cluster_size=64k", None);
    qemu_io(&base, &["write -P 0xbb 0 8M".to_string(), format!("write -s {} 8M 8M", s(&src))]);
    for cs in ["16k", "64k", "2M"] {
        let top = t.imgs.join(format!("sc_top_{cs}.qcow2"));
        create_qcow2(&top, "", &format!("extended_l2=on,cluster_size={cs}"), Some(("sc_base.qcow2", "qcow2")));
        qemu_io(
            &top,
            &[
                "write -P 0x01 2k 2k",
                "write -z 8k 2k",
                "write -P 0x02 1M 64k",
                "write -z 2M 64k",
                "write -P 0x03 4097 100",
                "write -z -u 3M 96k",
                "discard 4M 128k",
                "write -P 0x04 8388708 1000", // 8M+100: sub-cluster write over file data in the base
                "write -z 9000000 3000",
                "write -c -P 0x05 12M 2M",    // whole clusters compressed
                "write -P 0x06 12582912 512", // then overwrite part of a compressed cluster
            ],
        );
    }
    // stand-alone extended-L2 images (no backing)
    let sc2m = t.imgs.join("sc2m.qcow2");
    create_qcow2(&sc2m, "16M", "extended_l2=on,cluster_size=2M", None);
    qemu_io(&sc2m, &["write -P 0x05 64k 64k", "write -z 4M 64k", "write -P 0x07 4160k 10"]);
    let sc16k = t.imgs.join("sc16k.qcow2");
    create_qcow2(&sc16k, "16M", "extended_l2=on,cluster_size=16k", None);
    qemu_io(&sc16k, &["write -P 0x06 512 512", "write -c -P 0x07 32k 16k", "write -z -u 64k 1k"]);

    let imgs = qcow2_files(&t.imgs);
    assert_eq!(imgs.len(), 6);
    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    mnt.assert_all_match_thoroughly(&imgs, &t.scratch, 60);
    assert_seek_walks(&mnt, &imgs, &t.scratch);
}

// ---------------------------------------------------------------------------
// 4. Zero clusters
// ---------------------------------------------------------------------------

#[test]
fn zero_clusters_and_discard() {
    let t = setup("zero");
    let zero = t.imgs.join("zero.qcow2");
    create_qcow2(&zero, "16M", "", None);
    qemu_io(
        &zero,
        &[
            "write -P 0x77 0 4M",
            "write -z 64k 64k",
            "write -z -u 256k 128k",
            "discard 1M 128k",
            "write -z 8M 1M",
            "write -z 3000 5000",
        ],
    );
    let zerotop = t.imgs.join("zerotop.qcow2");
    create_qcow2(&zerotop, "", "", Some(("zero.qcow2", "qcow2")));
    qemu_io(&zerotop, &["write -z 0 64k", "write -z -u 2M 64k", "discard 3M 64k", "write -z 3200k 100"]);
    let z4k = t.imgs.join("zero4k.qcow2");
    create_qcow2(&z4k, "8M", "cluster_size=4k", None);
    qemu_io(&z4k, &["write -P 0x12 0 2M", "write -z 4k 4k", "write -z -u 12k 8k", "discard 1M 12k"]);
    let z4ktop = t.imgs.join("zero4ktop.qcow2");
    create_qcow2(&z4ktop, "", "cluster_size=4k", Some(("zero4k.qcow2", "qcow2")));
    qemu_io(&z4ktop, &["write -z 0 4k", "write -z -u 8k 4k", "discard 16k 16k", "write -z 2M 1M"]);
    // zero writes over compressed clusters
    let zc = t.imgs.join("zerocomp.qcow2");
    create_qcow2(&zc, "8M", "compression_type=zstd", None);
    qemu_io(
        &zc,
        &["write -c -P 0x51 0 1M", "write -z 64k 64k", "write -z -u 256k 64k", "discard 512k 64k", "write -z 700k 1k"],
    );

    let imgs = qcow2_files(&t.imgs);
    assert_eq!(imgs.len(), 5);
    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    mnt.assert_all_match_thoroughly(&imgs, &t.scratch, 40);
    assert_seek_walks(&mnt, &imgs, &t.scratch);
}

// ---------------------------------------------------------------------------
// 5. Backing chains
// ---------------------------------------------------------------------------

#[test]
fn backing_chains_raw_backing_and_duplicate_names() {
    let t = setup("chain");
    let chain = t.imgs.join("chain");
    fs::create_dir_all(chain.join("a")).unwrap();
    fs::create_dir_all(chain.join("b")).unwrap();
    let base = chain.join("a/base.qcow2");
    create_qcow2(&base, "32M", "", None);
    qemu_io(&base, &["write -P 0xa0 0 32M"]);
    let mid1 = chain.join("b/mid1.qcow2");
    create_qcow2(&mid1, "48M", "", Some(("../a/base.qcow2", "qcow2")));
    qemu_io(&mid1, &["write -P 0xa1 1M 1M", "write -P 0xa5 40M 64k"]);
    let mid2 = chain.join("mid2.qcow2");
    create_qcow2(&mid2, "64M", "cluster_size=4k", Some((&s(&mid1), "qcow2")));
    qemu_io(&mid2, &["write -P 0xa2 2M 1M", "write -z 0 64k", "write -P 0xa6 50M 1k"]);
    let top = chain.join("top.qcow2");
    create_qcow2(&top, "", "", Some(("mid2.qcow2", "qcow2")));
    qemu_io(&top, &["write -P 0xa3 3M 1M", "discard 2M 64k", "write -P 0xa7 31M 2M"]);

    // raw backing file of odd size (1 MiB + 100 B)
    let rawbase = t.imgs.join("rawbase.raw");
    gen_data(&rawbase, MIB + 100, 7);
    let rawtop = t.imgs.join("rawtop.qcow2");
    create_qcow2(&rawtop, "8M", "", Some(("rawbase.raw", "raw")));
    qemu_io(&rawtop, &["write -P 0x55 512k 64k", "write -P 0x56 1M 50"]);

    // qcow2 backing smaller than the overlay
    let smallbase = t.imgs.join("smallbase.qcow2");
    create_qcow2(&smallbase, "4M", "cluster_size=2M", None);
    qemu_io(&smallbase, &["write -P 0x61 0 4M"]);
    let smalltop = t.imgs.join("smalltop.qcow2");
    create_qcow2(&smalltop, "16M", "cluster_size=512", Some(("smallbase.qcow2", "qcow2")));
    qemu_io(&smalltop, &["write -P 0x62 3M 2M"]);

    // a second image called top.qcow2 in another directory
    let other = t.imgs.join("other");
    fs::create_dir_all(&other).unwrap();
    let top2 = other.join("top.qcow2");
    create_qcow2(&top2, "8M", "", None);
    qemu_io(&top2, &["write -P 0xee 0 1M"]);

    let mnt = Mount::new(&[&top, &rawtop, &smalltop, &top2], &t.mnt);
    mnt.assert_all_match_thoroughly(&[&rawtop, &smalltop], &t.scratch, 60);

    // two distinct directories for the two top.qcow2
    let tops: Vec<String> = mnt.entries().into_iter().filter(|n| n.starts_with("top")).collect();
    assert_eq!(tops.len(), 2, "expected two distinct dirs for the two top.qcow2 sources, got {:?}", mnt.entries());
    assert_eq!(mnt.entries().len(), 4, "{:?}", mnt.entries());
    let exp1 = t.scratch.join("top1.exp");
    let exp2 = t.scratch.join("top2.exp");
    oracle_raw(&top, &exp1);
    oracle_raw(&top2, &exp2);
    let d0 = mnt.disk(&tops[0]);
    let d1 = mnt.disk(&tops[1]);
    let straight = files_equal(&d0, &exp1).is_ok() && files_equal(&d1, &exp2).is_ok();
    let crossed = files_equal(&d0, &exp2).is_ok() && files_equal(&d1, &exp1).is_ok();
    if !straight && !crossed {
        panic!(
            "the two top.qcow2 dirs {tops:?} do not hold the two images' contents:\n chain top vs {}: {:?}\n chain top vs {}: {:?}",
            tops[0],
            files_equal(&d0, &exp1).err(),
            tops[1],
            files_equal(&d1, &exp1).err()
        );
    }
    let chain_dir = if straight { &tops[0] } else { &tops[1] };
    if let Err(e) = random_direct_reads(&mnt.disk(chain_dir), &exp1, 77, 80) {
        panic!("4-deep chain top.qcow2: {e}");
    }
    let info = mnt.info(chain_dir);
    let bc = json_arr(&info, "backing_chain");
    assert_eq!(bc.len(), 3, "4-deep chain: {info}");
    for (i, want) in ["mid2.qcow2", "mid1.qcow2", "base.qcow2"].iter().enumerate() {
        assert!(bc[i]["path"].as_str().unwrap_or("").ends_with(want), "backing_chain[{i}] should be {want}: {info}");
        assert_eq!(bc[i]["format"].as_str(), Some("qcow2"), "{info}");
    }
    let info = mnt.info("rawtop.qcow2");
    let bc = json_arr(&info, "backing_chain");
    assert_eq!(bc.len(), 1, "{info}");
    assert_eq!(bc[0]["format"].as_str(), Some("raw"), "{info}");
    assert!(bc[0]["path"].as_str().unwrap_or("").ends_with("rawbase.raw"), "{info}");
}

// ---------------------------------------------------------------------------
// 6. External data file
// ---------------------------------------------------------------------------

#[test]
fn external_data_files() {
    let t = setup("extdata");
    let ext = t.imgs.join("ext.qcow2");
    create_qcow2(&ext, "16M", "data_file=ext.data", None);
    qemu_io(
        &ext,
        &["write -P 0x99 1M 1M", "write -z 4M 64k", "write -P 0x98 0 4k", "discard 1M 64k", "write -P 0x97 15M 3000"],
    );
    let extraw = t.imgs.join("extraw.qcow2");
    create_qcow2(&extraw, "16M", "data_file=extraw.data,data_file_raw=on", None);
    qemu_io(&extraw, &["write -P 0x9a 1M 1M", "write -P 0x9b 10M 10"]);
    let abs_data = t.root.join("elsewhere");
    fs::create_dir_all(&abs_data).unwrap();
    let extabs = t.imgs.join("extabs.qcow2");
    create_qcow2(&extabs, "8M", &format!("data_file={},cluster_size=4k", s(&abs_data.join("abs.data"))), None);
    qemu_io(&extabs, &["write -P 0x9c 0 1M", "write -z 64k 4k"]);
    // external data file (not raw) over a backing file: unallocated clusters fall through
    let eb = t.imgs.join("extbacked.qcow2");
    create_qcow2(&eb, "", "data_file=extbacked.data", Some(("ext.qcow2", "qcow2")));
    qemu_io(&eb, &["write -P 0x9d 1536k 1M", "write -z 0 64k", "discard 4M 64k"]);
    let imgs = qcow2_files(&t.imgs);
    assert_eq!(imgs.len(), 4);
    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    mnt.assert_all_match_thoroughly(&imgs, &t.scratch, 40);
    // the data files are not images: not mounted
    assert_eq!(mnt.entries(), vec!["ext.qcow2", "extabs.qcow2", "extbacked.qcow2", "extraw.qcow2"]);
}

// ---------------------------------------------------------------------------
// 7. Dirty / corrupt / unknown compatible and autoclear bits, other accepted features
// ---------------------------------------------------------------------------

#[test]
fn dirty_corrupt_and_unknown_compatible_bits_accepted() {
    let t = setup("features");
    let base = t.imgs.join("plain.qcow2");
    create_qcow2(&base, "16M", "", None);
    qemu_io(&base, &["write -P 0x31 0 1M", "write -P 0x32 5M 100k"]);
    let lazy = t.imgs.join("lazy.qcow2");
    create_qcow2(&lazy, "16M", "lazy_refcounts=on", None);
    qemu_io(&lazy, &["write -P 0x66 0 1M"]);
    let dirty = t.imgs.join("dirty.qcow2");
    fs::copy(&lazy, &dirty).unwrap();
    let o = exec(
        "qemu-io",
        &[
            OsStr::new("-c"),
            OsStr::new("write -P 0x67 2M 1M"),
            OsStr::new("-c"),
            OsStr::new("abort"),
            dirty.as_os_str(),
        ],
        None,
        Duration::from_secs(60),
    );
    assert!(!o.success(), "qemu-io abort should exit non-zero\n{}", o.describe());
    assert_eq!(read_be64(&dirty, 72) & 1, 1, "dirty bit must be set by qemu-io abort");
    for (name, byte, mask) in [
        ("corrupt.qcow2", 79u64, 0x02u8),
        ("unkcompat.qcow2", 80, 0x80),
        ("unkautoclear.qcow2", 88, 0x80),
        ("unkcompat1.qcow2", 87, 0x02),
    ] {
        let p = t.imgs.join(name);
        fs::copy(&base, &p).unwrap();
        or_byte(&p, byte, mask);
    }
    for (name, opts) in [
        ("rc1.qcow2", "refcount_bits=1"),
        ("rc64.qcow2", "refcount_bits=64"),
        ("pmeta.qcow2", "preallocation=metadata"),
        ("pfalloc.qcow2", "preallocation=falloc"),
    ] {
        let p = t.imgs.join(name);
        create_qcow2(&p, "16M", opts, None);
        qemu_io(&p, &["write -P 0x44 1M 64k"]);
    }
    let bm = t.imgs.join("bitmap.qcow2");
    create_qcow2(&bm, "16M", "", None);
    qemu_img(&["bitmap", "--add", &s(&bm), "bm0"]);
    qemu_io(&bm, &["write -P 0x45 0 1M"]);

    let imgs = qcow2_files(&t.imgs);
    assert_eq!(imgs.len(), 12);
    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    mnt.assert_all_match(&imgs, &t.scratch);
}

// ---------------------------------------------------------------------------
// 8. Refusals
// ---------------------------------------------------------------------------

/// Runs `snapmount mount SOURCES MNT` and checks it is refused properly.
fn expect_refusal(t: &T, case: &str, sources: &[PathBuf], names: &[&str], keywords: &[&str]) -> Result<(), String> {
    let mnt = t.root.join(format!("mnt-{case}"));
    fs::create_dir_all(&mnt).unwrap();
    let mut args: Vec<std::ffi::OsString> = vec!["mount".into()];
    for src in sources {
        args.push(src.as_os_str().to_owned());
    }
    args.push(mnt.as_os_str().to_owned());
    let start = Instant::now();
    let o = exec(bin(), &args, None, Duration::from_secs(30));
    let took = start.elapsed();
    let mut errs = Vec::new();
    if o.timed_out() {
        errs.push("did not exit within 30 s".to_string());
    } else if o.success() {
        errs.push("exited 0 (expected a refusal)".to_string());
    }
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let good_line = lines.iter().any(|l| {
        let ll = l.to_lowercase();
        names.iter().any(|n| l.contains(n)) && keywords.iter().any(|k| ll.contains(&k.to_lowercase()))
    });
    if !good_line {
        errs.push(format!("no stderr line names the file (one of {names:?}) and the reason (one of {keywords:?})"));
    }
    if lines.len() != 1 {
        errs.push(format!("stderr has {} non-empty lines, expected a one-line error", lines.len()));
    }
    if anything_mounted_under(&mnt) {
        errs.push("something is mounted at the mount point after the refusal".into());
    }
    if !wait_for(Duration::from_secs(3), || pids_mentioning(&mnt).is_empty()) {
        errs.push(format!("processes still running for this mount point: {:?}", pids_mentioning(&mnt)));
    }
    force_unmount(&mnt);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "[{case}] {} (after {:.1}s)\n  {}",
            errs.join("; "),
            took.as_secs_f64(),
            o.describe().replace('\n', "\n  ")
        ))
    }
}

#[test]
fn refusals_fail_before_mounting() {
    let t = setup("refuse");
    let good = t.imgs.join("good.qcow2");
    create_qcow2(&good, "16M", "", None);
    qemu_io(&good, &["write -P 0x11 0 1M"]);
    let mk = |name: &str| {
        let p = t.imgs.join(name);
        fs::copy(&good, &p).unwrap();
        p
    };
    let bit63 = mk("badincompat63.qcow2");
    or_byte(&bit63, 72, 0x80);
    let bit5 = mk("badincompat5.qcow2");
    or_byte(&bit5, 79, 0x20);
    let badcb = mk("badclusterbits.qcow2");
    write_bytes_at(&badcb, 20, &30u32.to_be_bytes());
    // sanity: qemu refuses these too
    for p in [&bit63, &bit5, &badcb] {
        let o = exec("qemu-img", &[OsStr::new("info"), p.as_os_str()], None, Duration::from_secs(30));
        assert!(!o.success(), "test setup: qemu-img should refuse {}", p.display());
    }
    let luks = t.imgs.join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        &s(&luks),
        "16M",
    ]);
    // missing backing file
    let gone = t.imgs.join("gonebase.qcow2");
    create_qcow2(&gone, "16M", "", None);
    let orphan = t.imgs.join("orphan.qcow2");
    create_qcow2(&orphan, "", "", Some(("gonebase.qcow2", "qcow2")));
    fs::remove_file(&gone).unwrap();
    // backing loop la -> lb -> la
    let lb = t.imgs.join("loopb.qcow2");
    create_qcow2(&lb, "16M", "", None);
    let la = t.imgs.join("loopa.qcow2");
    create_qcow2(&la, "", "", Some(("loopb.qcow2", "qcow2")));
    qemu_img_in(&t.imgs, &["rebase", "-u", "-b", "loopa.qcow2", "-F", "qcow2", "loopb.qcow2"]);
    // json: and nbd:// backing names
    let js = t.imgs.join("jsonback.qcow2");
    create_qcow2(&js, "", "", Some(("good.qcow2", "qcow2")));
    qemu_img_in(
        &t.imgs,
        &["rebase", "-u", "-b", r#"json:{"driver":"file","filename":"/etc/hostname"}"#, "-F", "raw", "jsonback.qcow2"],
    );
    let nbd = t.imgs.join("nbdback.qcow2");
    create_qcow2(&nbd, "", "", Some(("good.qcow2", "qcow2")));
    qemu_img_in(&t.imgs, &["rebase", "-u", "-b", "nbd://localhost/x", "-F", "raw", "nbdback.qcow2"]);
    // not an image at all
    let notimg = t.imgs.join("notes.txt");
    fs::write(&notimg, "just some text, not a disk image\n").unwrap();

    let feat = ["incompatible", "feature", "unsupported"];
    #[allow(clippy::type_complexity)] // (name, sources, named files, message words)
    let cases: Vec<(&str, Vec<PathBuf>, Vec<&str>, Vec<&str>)> = vec![
        ("bit63", vec![bit63.clone()], vec!["badincompat63.qcow2"], feat.to_vec()),
        ("bit5", vec![bit5.clone()], vec!["badincompat5.qcow2"], feat.to_vec()),
        ("luks", vec![luks.clone()], vec!["luks.qcow2"], vec!["encrypt", "luks"]),
        (
            "missing-backing",
            vec![orphan.clone()],
            vec!["orphan.qcow2", "gonebase.qcow2"],
            vec!["backing", "no such file", "not found", "missing"],
        ),
        ("loop", vec![la.clone()], vec!["loopa.qcow2", "loopb.qcow2"], vec!["loop", "cycle", "circular", "recurs"]),
        ("json", vec![js.clone()], vec!["jsonback.qcow2"], vec!["json", "protocol"]),
        ("nbd", vec![nbd.clone()], vec!["nbdback.qcow2"], vec!["nbd", "protocol", "url", "scheme"]),
        (
            "not-an-image",
            vec![notimg.clone()],
            vec!["notes.txt"],
            vec!["not a", "format", "magic", "unrecognized", "unknown", "unsupported"],
        ),
        ("bad-cluster-bits", vec![badcb.clone()], vec!["badclusterbits.qcow2"], vec!["cluster"]),
        // a good image together with a bad one: nothing at all gets mounted
        ("good-plus-bad", vec![good.clone(), bit63.clone()], vec!["badincompat63.qcow2"], feat.to_vec()),
    ];
    let mut failures = Vec::new();
    for (case, srcs, names, kws) in &cases {
        if let Err(e) = expect_refusal(&t, case, srcs, names, kws) {
            failures.push(e);
        }
    }
    // A directory holding one refused image next to good ones is refused as a whole.
    let mixdir = t.root.join("mixdir");
    fs::create_dir_all(&mixdir).unwrap();
    fs::copy(&good, mixdir.join("a_good.qcow2")).unwrap();
    fs::copy(&bit5, mixdir.join("b_bad.qcow2")).unwrap();
    if let Err(e) = expect_refusal(&t, "dir-with-bad-image", std::slice::from_ref(&mixdir), &["b_bad.qcow2"], &feat) {
        failures.push(e);
    }
    if !failures.is_empty() {
        panic!("{} of {} refusal cases failed:\n{}", failures.len(), cases.len() + 1, failures.join("\n"));
    }
}

// ---------------------------------------------------------------------------
// 9. EIO on damaged metadata
// ---------------------------------------------------------------------------

fn pread(path: &Path, off: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)?;
    Ok(buf)
}

fn qemu_io_read_fails_with_eio(img: &Path, off: u64, len: u64) {
    let o = exec(
        "qemu-io",
        &[OsStr::new("-r"), OsStr::new("-c"), OsStr::new(&format!("read {off} {len}")), img.as_os_str()],
        None,
        Duration::from_secs(60),
    );
    let all = format!("{}{}", o.stdout, o.stderr);
    assert!(
        !o.success() && all.contains("Input/output error"),
        "test setup: QEMU should fail to read {len}@{off} of {} with EIO\n{}",
        img.display(),
        o.describe()
    );
}

#[test]
fn eio_on_damaged_metadata_daemon_survives() {
    let t = setup("eio");
    let orig = t.root.join("orig");
    fs::create_dir_all(&orig).unwrap();
    // The same recipe for every damaged image: cluster 0 damaged, cluster 1 (64k..128k) fine.
    let make = |name: &str, opts: &str, cmds: &[&str]| -> PathBuf {
        let p = orig.join(name);
        create_qcow2(&p, "16M", opts, None);
        qemu_io(&p, cmds);
        let q = t.imgs.join(name);
        fs::copy(&p, &q).unwrap();
        q
    };
    // (a) L2 entry 0 -> unaligned host offset
    let unaligned = make("unaligned.qcow2", "", &["write -P 0x11 0 1M", "write -P 0x22 1M 1M"]);
    let pos = l2_entry_pos(&unaligned, 0);
    let e = read_be64(&unaligned, pos);
    assert!(e & L2_OFFSET_MASK != 0, "test setup: cluster 0 must be allocated");
    write_be64(&unaligned, pos, e | 0x200); // +512 bytes: inside the offset field, not cluster-aligned
                                            // (b) compressed clusters whose bytes are garbage (zstd and deflate)
    let mut comp = Vec::new();
    for ct in ["zstd", "zlib"] {
        let p = make(
            &format!("badcomp_{ct}.qcow2"),
            &format!("compression_type={ct}"),
            &["write -c -P 0x41 0 64k", "write -P 0x43 64k 64k", "write -c -P 0x44 128k 64k"],
        );
        let pos = l2_entry_pos(&p, 0);
        let e = read_be64(&p, pos);
        assert!(e & (1 << 62) != 0, "test setup: cluster 0 of {} must be compressed (entry {e:#x})", p.display());
        let x = 70 - 16; // 64 KiB clusters
        let coffset = e & ((1u64 << x) - 1);
        write_bytes_at(&p, coffset, &[0xff; 16]);
        comp.push(p);
    }
    // (c) zero flag in a v2 image
    let v2zero = make("v2zero.qcow2", "compat=0.10", &["write -P 0x31 0 128k"]);
    let pos = l2_entry_pos(&v2zero, 0);
    let e = read_be64(&v2zero, pos);
    write_be64(&v2zero, pos, e | 1);
    // a healthy image in the same mount
    let good = t.imgs.join("good.qcow2");
    create_qcow2(&good, "16M", "", None);
    qemu_io(&good, &["write -P 0x55 0 4M"]);

    let damaged: Vec<PathBuf> = vec![unaligned.clone(), comp[0].clone(), comp[1].clone(), v2zero.clone()];
    for d in &damaged {
        qemu_io_read_fails_with_eio(d, 0, 4096);
    }
    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    let mut errs = Vec::new();
    for d in &damaged {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        let disk = mnt.disk(&name);
        match pread(&disk, 0, 4096) {
            Ok(_) => errs.push(format!("{name}: read of the damaged cluster 0 succeeded, expected EIO")),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
            Err(e) => errs.push(format!("{name}: read of the damaged cluster 0 failed with {e}, expected EIO")),
        }
        // cluster 1 reads fine and matches the undamaged original
        let exp = t.scratch.join(format!("{name}.orig.raw"));
        oracle_raw(&orig.join(&name), &exp);
        let want = pread(&exp, 64 * KIB, 64 * 1024).unwrap();
        match pread(&disk, 64 * KIB, 64 * 1024) {
            Ok(got) if got == want => {}
            Ok(_) => errs.push(format!("{name}: cluster 1 (64k..128k) has wrong bytes")),
            Err(e) => errs.push(format!("{name}: reading healthy cluster 1 failed: {e}")),
        }
        // a second attempt on the damaged cluster still gives EIO (not ENOTCONN: daemon alive)
        match pread(&disk, 0, 512) {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
            other => {
                errs.push(format!("{name}: second read of damaged cluster: {:?}, expected EIO", other.map(|_| "Ok")))
            }
        }
    }
    assert!(is_mountpoint(&t.mnt), "mount disappeared after EIO reads");
    if let Err(e) = mnt.check(&good, &t.scratch) {
        errs.push(format!("healthy image after the EIO reads: {e}"));
    }
    if !errs.is_empty() {
        panic!("EIO handling problems:\n{}", errs.join("\n"));
    }
}

// ---------------------------------------------------------------------------
// 10. ext4 inside a compressed qcow2 with an overlay, loop-mounted
// ---------------------------------------------------------------------------

fn write_tree(dir: &Path, variant: u64) {
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::create_dir_all(dir.join("home/user/docs")).unwrap();
    fs::write(dir.join("etc/hostname"), "snapmount-test\n").unwrap();
    fs::write(dir.join("etc/motd"), format!("Welcome (variant {variant})\n")).unwrap();
    fs::write(dir.join("home/user/empty"), "").unwrap();
    for i in 0..20u64 {
        let text = format!("file {i}\n").repeat((i as usize + 1) * 37);
        fs::write(dir.join(format!("home/user/docs/note{i:02}.txt")), text).unwrap();
    }
    fs::write(dir.join("home/user/blob.bin"), gen_bytes(3 * 1024 * 1024 + 123, 42)).unwrap();
    if variant == 2 {
        // changes: modified, added and removed files
        fs::write(dir.join("etc/hostname"), "snapmount-test-changed\n").unwrap();
        fs::write(dir.join("home/user/new.bin"), gen_bytes(2 * 1024 * 1024 + 7, 43)).unwrap();
        fs::remove_file(dir.join("home/user/docs/note05.txt")).unwrap();
        let mut blob = gen_bytes(3 * 1024 * 1024 + 123, 42);
        for b in &mut blob[1_000_000..1_000_100] {
            *b = 0x5a;
        }
        fs::write(dir.join("home/user/blob.bin"), blob).unwrap();
    }
}

fn list_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if rel == Path::new("lost+found") {
                continue;
            }
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(rel);
        }
    }
    out.sort();
    out
}

fn assert_trees_equal(got: &Path, want: &Path) {
    let g = list_tree(got);
    let w = list_tree(want);
    assert_eq!(g, w, "file lists differ between {} and {}", got.display(), want.display());
    for rel in &w {
        let (a, b) = (got.join(rel), want.join(rel));
        if b.is_file() {
            assert_files_equal(&a, &b);
        }
    }
}

/// Writes the blocks where `new` differs from `old` into `img` with qemu-io (64 KiB granularity).
fn write_diff(img: &Path, old: &Path, new: &Path, scratch: &Path) -> usize {
    let a = fs::read(old).unwrap();
    let b = fs::read(new).unwrap();
    assert_eq!(a.len(), b.len());
    const G: usize = 64 * 1024;
    let mut cmds = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let end = (i + G).min(b.len());
        if a[i..end] != b[i..end] {
            let mut j = end;
            while j < b.len() && a[j..(j + G).min(b.len())] != b[j..(j + G).min(b.len())] {
                j = (j + G).min(b.len());
            }
            let chunk = scratch.join(format!("chunk{}.bin", cmds.len()));
            fs::write(&chunk, &b[i..j]).unwrap();
            cmds.push(format!("write -s {} {} {}", s(&chunk), i, j - i));
            i = j;
        } else {
            i = end;
        }
    }
    for c in cmds.chunks(200) {
        qemu_io(img, c);
    }
    cmds.len()
}

#[test]
fn ext4_in_compressed_base_with_overlay_loop_mounts() {
    let t = setup("ext4");
    let tree1 = t.root.join("tree1");
    let tree2 = t.root.join("tree2");
    write_tree(&tree1, 1);
    write_tree(&tree2, 2);
    let raw1 = t.scratch.join("fs1.raw");
    let raw2 = t.scratch.join("fs2.raw");
    let uuid = "5d8f2a4e-1c3b-4e7a-9f60-2b1d3c4e5f60";
    for (raw, tree) in [(&raw1, &tree1), (&raw2, &tree2)] {
        File::create(raw).unwrap().set_len(m(64)).unwrap();
        run("mkfs.ext4", &["-q", "-F", "-U", uuid, "-E", &format!("hash_seed={uuid}"), "-d", &s(tree), &s(raw)]);
    }
    let base = t.imgs.join("base.qcow2");
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", &s(&raw1), &s(&base)]);
    let top = t.imgs.join("top.qcow2");
    create_qcow2(&top, "", "", Some(("base.qcow2", "qcow2")));
    let runs = write_diff(&top, &raw1, &raw2, &t.scratch);
    assert!(runs > 0, "test setup: the second mkfs pass changed nothing");
    // the overlay must now equal fs2 (qemu's view)
    let o = exec(
        "qemu-img",
        &[OsStr::new("compare"), OsStr::new("-F"), OsStr::new("qcow2"), raw2.as_os_str(), top.as_os_str()],
        None,
        Duration::from_secs(60),
    );
    assert!(o.success(), "test setup: overlay differs from fs2\n{}", o.describe());

    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    mnt.assert_all_match(&[&base, &top], &t.scratch);
    {
        let lm_top = LoopMount::new(&mnt.disk("top.qcow2"), &t.root.join("loop-top"));
        let lm_base = LoopMount::new(&mnt.disk("base.qcow2"), &t.root.join("loop-base"));
        assert_trees_equal(&lm_top.dir, &tree2);
        assert_trees_equal(&lm_base.dir, &tree1);
    }
    assert!(!is_mountpoint(&t.root.join("loop-top")));
}

// ---------------------------------------------------------------------------
// 11. SEEK_DATA / SEEK_HOLE, st_blocks, O_DIRECT
// ---------------------------------------------------------------------------

/// Walks `disk` with SEEK_DATA/SEEK_HOLE from 0 to EOF. Checks the walk is well formed and
/// that every byte the daemon reports as a hole is zero in `expected` (the oracle). Reporting
/// zeros as data is allowed; reporting data as a hole would lose it for `cp --sparse` etc.
fn seek_walk_consistent(disk: &Path, expected: &Path) -> Result<(), String> {
    let f = File::open(disk).unwrap();
    let exp = File::open(expected).unwrap();
    let size = exp.metadata().unwrap().len();
    let mut off = 0u64;
    let mut steps = 0;
    while off < size {
        steps += 1;
        if steps > 1_000_000 {
            return Err(format!("{}: SEEK walk does not terminate", disk.display()));
        }
        let hole = lseek(&f, off, libc::SEEK_HOLE)
            .map_err(|e| format!("{}: SEEK_HOLE from {off}: errno {e}", disk.display()))?;
        if hole < off || hole > size {
            return Err(format!("{}: SEEK_HOLE from {off} returned {hole} (size {size})", disk.display()));
        }
        if hole == size {
            break;
        }
        let next = match lseek(&f, hole, libc::SEEK_DATA) {
            Ok(d) if d > hole && d <= size => d,
            Ok(d) => return Err(format!("{}: SEEK_DATA from hole {hole} returned {d} (size {size})", disk.display())),
            Err(e) if e == libc::ENXIO => size,
            Err(e) => return Err(format!("{}: SEEK_DATA from {hole}: errno {e}", disk.display())),
        };
        // hole = [hole, next): must be zeros in the oracle
        let mut pos = hole;
        let mut buf = vec![0u8; 1 << 20];
        while pos < next {
            let n = ((next - pos) as usize).min(buf.len());
            exp.read_exact_at(&mut buf[..n], pos).unwrap();
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Err(format!(
                    "{}: daemon reports a hole at [{hole}, {next}) but byte {} is {:#04x} (non-zero) in the qemu-img oracle",
                    disk.display(),
                    pos + i as u64,
                    buf[i]
                ));
            }
            pos += n as u64;
        }
        off = next;
    }
    Ok(())
}

/// `seek_walk_consistent` for each image; panics listing all failures.
fn assert_seek_walks(mnt: &Mount, imgs: &[PathBuf], scratch: &Path) {
    let mut errs = Vec::new();
    for img in imgs {
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        let exp = scratch.join(format!("{name}.seek.exp"));
        oracle_raw(img, &exp);
        if let Err(e) = seek_walk_consistent(&mnt.disk(&name), &exp) {
            errs.push(e);
        }
        let _ = fs::remove_file(&exp);
    }
    if !errs.is_empty() {
        panic!("SEEK_DATA/SEEK_HOLE problems:\n{}", errs.join("\n"));
    }
}

/// Data ranges (merged) from `qemu-img map --output=json`.
fn qemu_data_ranges(img: &Path) -> Vec<(u64, u64)> {
    let out = qemu_img_in(img.parent().unwrap(), &["map", "--output=json", &s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
    let mut r: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"].as_bool() == Some(true) {
            let st = e["start"].as_u64().unwrap();
            let end = st + e["length"].as_u64().unwrap();
            match r.last_mut() {
                Some(last) if last.1 == st => last.1 = end,
                _ => r.push((st, end)),
            }
        }
    }
    r
}

fn lseek(f: &File, off: u64, whence: libc::c_int) -> Result<u64, i32> {
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as u64)
    }
}

fn check_seek(disk: &Path, ranges: &[(u64, u64)], size: u64) -> Vec<String> {
    let f = File::open(disk).unwrap();
    let mut probes: Vec<u64> = vec![0, 1, size / 2, size - 1, size, size + 4096];
    for &(a, b) in ranges {
        for p in [a.saturating_sub(1), a, a + 1, (a + b) / 2, b - 1, b, b + 1] {
            probes.push(p);
        }
    }
    probes.sort();
    probes.dedup();
    let mut errs = Vec::new();
    for off in probes {
        let exp_data = if off >= size {
            Err(libc::ENXIO)
        } else {
            ranges.iter().find(|r| r.1 > off).map(|r| r.0.max(off)).ok_or(libc::ENXIO)
        };
        let exp_hole = if off >= size {
            Err(libc::ENXIO)
        } else {
            Ok(ranges.iter().find(|r| r.0 <= off && off < r.1).map(|r| r.1).unwrap_or(off))
        };
        let got_data = lseek(&f, off, libc::SEEK_DATA);
        let got_hole = lseek(&f, off, libc::SEEK_HOLE);
        if got_data != exp_data {
            errs.push(format!("SEEK_DATA from {off}: got {got_data:?}, expected {exp_data:?} (Err = errno)"));
        }
        if got_hole != exp_hole {
            errs.push(format!("SEEK_HOLE from {off}: got {got_hole:?}, expected {exp_hole:?} (Err = errno)"));
        }
    }
    errs
}

#[test]
fn seek_data_hole_st_blocks_and_o_direct() {
    let t = setup("seek");
    let img = t.imgs.join("seek.qcow2");
    create_qcow2(&img, "64M", "", None);
    qemu_io(&img, &["write -P 0x5a 1M 1M", "write -P 0x5b 8M 1M"]);
    let big = t.imgs.join("big.qcow2");
    create_qcow2(&big, "1G", "", None);
    qemu_io(&big, &["write -P 0x77 100M 1M"]);
    let ranges = qemu_data_ranges(&img);
    assert_eq!(ranges, vec![(m(1), m(2)), (m(8), m(9))], "test setup: qemu-img map");

    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    let disk = mnt.disk("seek.qcow2");
    let errs = check_seek(&disk, &ranges, m(64));
    // st_blocks
    let mut errs = errs;
    let md = fs::metadata(&disk).unwrap();
    if md.blocks() * 512 < m(2) || md.blocks() * 512 > m(16) {
        errs.push(format!("seek.qcow2: st_blocks*512 = {} for 2 MiB of data", md.blocks() * 512));
    }
    let mdb = fs::metadata(mnt.disk("big.qcow2")).unwrap();
    assert_eq!(mdb.len(), 1 << 30);
    if mdb.blocks() * 512 < MIB || mdb.blocks() * 512 > 64 * MIB {
        errs.push(format!("big.qcow2 (1 GiB, 1 MiB written): st_blocks*512 = {}", mdb.blocks() * 512));
    }
    // O_DIRECT
    let exp = t.scratch.join("seek.exp");
    oracle_raw(&img, &exp);
    let direct = t.scratch.join("direct.raw");
    let o = exec(
        "dd",
        &[
            format!("if={}", s(&disk)),
            format!("of={}", s(&direct)),
            "bs=1M".into(),
            "iflag=direct".into(),
            "status=none".into(),
        ],
        None,
        Duration::from_secs(120),
    );
    if !o.success() {
        errs.push(format!("dd iflag=direct failed\n{}", o.describe()));
    } else if let Err(e) = files_equal(&direct, &exp) {
        errs.push(format!("O_DIRECT read: {e}"));
    }
    // also an O_DIRECT read of big.qcow2 around the data
    let o = exec(
        "dd",
        &[
            format!("if={}", s(&mnt.disk("big.qcow2"))),
            "of=/dev/null".into(),
            "bs=1M".into(),
            "skip=99".into(),
            "count=3".into(),
            "iflag=direct".into(),
            "status=none".into(),
        ],
        None,
        Duration::from_secs(60),
    );
    if !o.success() {
        errs.push(format!("dd iflag=direct on big.qcow2 failed\n{}", o.describe()));
    }
    if let Err(e) = files_equal(&disk, &exp) {
        errs.push(e);
    }
    if !errs.is_empty() {
        panic!("seek/st_blocks/O_DIRECT problems:\n{}", errs.join("\n"));
    }
}

#[test]
fn seek_data_hole_over_backing_file() {
    let t = setup("seekchain");
    let base = t.imgs.join("sbase.qcow2");
    create_qcow2(&base, "64M", "", None);
    qemu_io(&base, &["write -P 0x5a 1M 1M"]);
    let top = t.imgs.join("stop.qcow2");
    create_qcow2(&top, "", "", Some(("sbase.qcow2", "qcow2")));
    qemu_io(&top, &["write -P 0x5b 8M 1M", "write -P 0x5c 20M 64k"]);
    let ranges = qemu_data_ranges(&top);
    assert_eq!(ranges, vec![(m(1), m(2)), (m(8), m(9)), (m(20), m(20) + 64 * KIB)], "test setup: qemu-img map");
    let mnt = Mount::new(&[&top], &t.mnt);
    mnt.assert_matches(&top, &t.scratch);
    let errs = check_seek(&mnt.disk("stop.qcow2"), &ranges, m(64));
    if !errs.is_empty() {
        panic!("seek over a backing file:\n{}", errs.join("\n"));
    }
}

// ---------------------------------------------------------------------------
// Layout, permissions, info.json, mtime
// ---------------------------------------------------------------------------

#[test]
fn layout_permissions_info_json_and_mtime() {
    let t = setup("layout");
    let a = t.imgs.join("a.qcow2");
    create_qcow2(&a, "16M", "", None);
    qemu_io(&a, &["write -P 0x01 0 1M"]);
    qemu_img(&["snapshot", "-c", "s1", &s(&a)]);
    qemu_io(&a, &["write -P 0x02 512k 1M"]);
    qemu_img(&["snapshot", "-c", "s2", &s(&a)]);
    qemu_io(&a, &["write -P 0x03 4M 64k"]);
    let b = t.imgs.join("b.qcow2");
    create_qcow2(&b, "", "cluster_size=4k", Some(("a.qcow2", "qcow2")));
    qemu_io(&b, &["write -P 0x04 100k 10k"]);
    // header size not a multiple of 512: exposed rounded down
    let odd = t.imgs.join("odd.qcow2");
    create_qcow2(&odd, "64M", "", None);
    qemu_io(&odd, &["write -P 0x05 63M 1M"]);
    write_be64(&odd, 24, m(64) - 100);
    fs::write(t.imgs.join("README.txt"), "not an image, must be skipped\n").unwrap();
    // images in sub-directories are not mounted ("every image directly inside")
    fs::create_dir_all(t.imgs.join("subdir")).unwrap();
    create_qcow2(&t.imgs.join("subdir/deep.qcow2"), "1M", "", None);

    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    assert_eq!(mnt.entries(), vec!["a.qcow2", "b.qcow2", "odd.qcow2"]);
    mnt.assert_all_match(&[&a, &b, &odd], &t.scratch);
    qemu_compare_raw_vs_qcow2(&mnt.disk("b.qcow2"), &b);

    let mut errs = Vec::new();
    // sizes and info.json
    assert_eq!(fs::metadata(mnt.disk("odd.qcow2")).unwrap().len(), 67_108_352);
    let ia = mnt.info("a.qcow2");
    assert_eq!(ia["format"].as_str(), Some("qcow2"), "{ia}");
    assert_eq!(json_u64(&ia, "virtual_size"), m(16));
    assert_eq!(json_u64(&ia, "cluster_size"), 65536);
    assert_eq!(json_u64(&ia, "version"), 3);
    assert_eq!(json_arr(&ia, "backing_chain").len(), 0, "{ia}");
    assert_eq!(json_arr(&ia, "snapshots").len(), 2, "a.qcow2 has two snapshots: {ia}");
    let ib = mnt.info("b.qcow2");
    assert_eq!(json_u64(&ib, "cluster_size"), 4096);
    let bc = json_arr(&ib, "backing_chain");
    assert_eq!(bc.len(), 1, "{ib}");
    assert!(bc[0]["path"].as_str().unwrap_or("").ends_with("a.qcow2"), "{ib}");
    assert_eq!(bc[0]["format"].as_str(), Some("qcow2"), "{ib}");
    assert_eq!(json_u64(&mnt.info("odd.qcow2"), "virtual_size"), 67_108_352);

    // modes
    let mode = |p: &Path| fs::metadata(p).map(|m| m.mode() & 0o7777).unwrap_or(0xffff);
    for name in ["a.qcow2", "b.qcow2", "odd.qcow2"] {
        for f in ["disk.raw", "info.json"] {
            let p = mnt.image_dir(name).join(f);
            if mode(&p) != 0o444 {
                errs.push(format!("{}: mode {:o}, expected 444", p.display(), mode(&p)));
            }
        }
        let d = mnt.image_dir(name);
        if mode(&d) != 0o555 {
            errs.push(format!("{}: mode {:o}, expected 555", d.display(), mode(&d)));
        }
    }
    if mode(&mnt.dir) != 0o555 {
        errs.push(format!("mount root: mode {:o}, expected 555", mode(&mnt.dir)));
    }
    // writes fail with EROFS or EACCES
    let ro = |what: &str, r: std::io::Result<()>, errs: &mut Vec<String>| match r {
        Ok(()) => errs.push(format!("{what}: succeeded on a read-only mount")),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)) => {}
        Err(e) => errs.push(format!("{what}: failed with {e}, expected EROFS or EACCES")),
    };
    ro(
        "open disk.raw for writing",
        fs::OpenOptions::new().write(true).open(mnt.disk("a.qcow2")).map(|_| ()),
        &mut errs,
    );
    ro("create a file", File::create(mnt.image_dir("a.qcow2").join("new")).map(|_| ()), &mut errs);
    ro("mkdir at the root", fs::create_dir(mnt.dir.join("newdir")), &mut errs);
    ro("unlink disk.raw", fs::remove_file(mnt.disk("a.qcow2")), &mut errs);
    ro(
        "truncate disk.raw",
        File::options().write(true).truncate(true).open(mnt.disk("b.qcow2")).map(|_| ()),
        &mut errs,
    );
    // mtime of disk.raw = mtime of the image file
    for img in [&a, &b, &odd] {
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        let want = fs::metadata(img).unwrap().mtime();
        let got = fs::metadata(mnt.disk(&name)).unwrap().mtime();
        if want != got {
            errs.push(format!("{name}: disk.raw mtime {got}, image file mtime {want}"));
        }
    }
    if !errs.is_empty() {
        panic!("layout problems:\n{}", errs.join("\n"));
    }
}

// ---------------------------------------------------------------------------
// 12. Signals and unmounting
// ---------------------------------------------------------------------------

struct ChildGuard {
    child: std::process::Child,
    mnt: PathBuf,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        force_unmount(&self.mnt);
    }
}

fn foreground_signal(t: &T, img: &Path, sig: libc::c_int, tag: &str) -> Result<(), String> {
    let mnt = t.root.join(format!("mnt-fg-{tag}"));
    fs::create_dir_all(&mnt).unwrap();
    let log = t.scratch.join(format!("fg-{tag}.log"));
    let logf = File::create(&log).unwrap();
    let child = Command::new(bin())
        .args([OsStr::new("mount"), OsStr::new("-f"), img.as_os_str(), mnt.as_os_str()])
        .stdin(Stdio::null())
        .stdout(Stdio::from(logf.try_clone().unwrap()))
        .stderr(Stdio::from(logf))
        .spawn()
        .unwrap();
    let mut g = ChildGuard { child, mnt: mnt.clone() };
    let name = img.file_name().unwrap().to_string_lossy().into_owned();
    let disk = mnt.join(&name).join("disk.raw");
    if !wait_for(Duration::from_secs(30), || disk.exists()) {
        return Err(format!(
            "[{tag}] foreground mount: {} did not appear within 30 s; log:\n{}",
            disk.display(),
            fs::read_to_string(&log).unwrap_or_default()
        ));
    }
    check_against_oracle(&disk, img, &t.scratch).map_err(|e| format!("[{tag}] {e}"))?;
    unsafe {
        libc::kill(g.child.id() as i32, sig);
    }
    let start = Instant::now();
    let status = loop {
        if let Some(st) = g.child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > Duration::from_secs(20) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let Some(status) = status else {
        return Err(format!("[{tag}] daemon still running 20 s after signal {sig}"));
    };
    if is_mountpoint(&mnt) {
        return Err(format!(
            "[{tag}] daemon exited ({status}) after signal {sig} but {} is still mounted",
            mnt.display()
        ));
    }
    eprintln!("[{tag}] foreground daemon exited with {status} after signal {sig}");
    Ok(())
}

fn background_then(t: &T, img: &Path, tag: &str, how: &str) -> Result<(), String> {
    let mnt = t.root.join(format!("mnt-bg-{tag}"));
    let mount = Mount::new(&[img], &mnt);
    let name = img.file_name().unwrap().to_string_lossy().into_owned();
    mount.check(img, &t.scratch).map_err(|e| format!("[{tag}] {e}"))?;
    let pids = pids_mentioning(&mnt);
    if pids.is_empty() {
        return Err(format!("[{tag}] no daemon process with the mount point in its command line"));
    }
    match how {
        "snapmount-umount" => {
            let o = snapmount(&[OsStr::new("umount"), mnt.as_os_str()]);
            if !o.success() {
                return Err(format!("[{tag}] snapmount umount failed\n{}", o.describe()));
            }
        }
        "umount" => {
            let o = exec("umount", &[mnt.as_os_str()], None, Duration::from_secs(30));
            if !o.success() {
                return Err(format!("[{tag}] umount failed\n{}", o.describe()));
            }
        }
        "sigterm" => {
            for p in &pids {
                unsafe {
                    libc::kill(*p, libc::SIGTERM);
                }
            }
        }
        "stale" => {
            // daemon dies hard: the mount point is left stale (ENOTCONN);
            // `snapmount umount` says it also cleans a stale mount point
            for p in &pids {
                unsafe {
                    libc::kill(*p, libc::SIGKILL);
                }
            }
            wait_for(Duration::from_secs(10), || pids_mentioning(&mnt).is_empty());
            let o = snapmount(&[OsStr::new("umount"), mnt.as_os_str()]);
            if !o.success() {
                return Err(format!("[{tag}] snapmount umount of a stale mount point failed\n{}", o.describe()));
            }
        }
        _ => unreachable!(),
    }
    if !wait_for(Duration::from_secs(10), || !is_mountpoint(&mnt)) {
        return Err(format!("[{tag}] still mounted 10 s after {how}"));
    }
    if !wait_for(Duration::from_secs(10), || pids_mentioning(&mnt).is_empty()) {
        return Err(format!("[{tag}] daemon {:?} still alive 10 s after {how}", pids_mentioning(&mnt)));
    }
    if mnt.join(&name).exists() {
        return Err(format!("[{tag}] image dir still visible after {how}"));
    }
    drop(mount);
    Ok(())
}

#[test]
fn sigterm_sigint_umount_and_snapmount_umount() {
    let t = setup("signals");
    let img = t.imgs.join("sig.qcow2");
    create_qcow2(&img, "16M", "", None);
    qemu_io(&img, &["write -P 0x42 0 2M", "write -P 0x43 10M 100k"]);
    let mut errs = Vec::new();
    for r in [
        foreground_signal(&t, &img, libc::SIGTERM, "sigterm"),
        foreground_signal(&t, &img, libc::SIGINT, "sigint"),
        background_then(&t, &img, "snapmount-umount", "snapmount-umount"),
        background_then(&t, &img, "umount", "umount"),
        background_then(&t, &img, "bg-sigterm", "sigterm"),
        background_then(&t, &img, "stale", "stale"),
    ] {
        if let Err(e) = r {
            errs.push(e);
        }
    }
    if !errs.is_empty() {
        panic!("unmount problems:\n{}", errs.join("\n"));
    }
}

// ---------------------------------------------------------------------------
// 13. Randomized chains
// ---------------------------------------------------------------------------

struct Case {
    seed: u64,
    images: Vec<PathBuf>,
    recipe: Vec<String>,
}

fn rand_len(rng: &mut Rng, max: u64) -> u64 {
    let cap = if rng.chance(50) { 8 * KIB } else { 512 * KIB };
    rng.range(1, cap.min(max).max(1))
}

fn rand_off(rng: &mut Rng, size: u64, cs: u64) -> u64 {
    let o = rng.below(size);
    match rng.below(4) {
        0 => o / cs * cs,
        1 => o / 512 * 512,
        _ => o,
    }
}

fn build_case(seed: u64, dir: &Path, data: &Path) -> Case {
    let mut rng = Rng::new(seed);
    let depth = rng.range(1, 3);
    let mut images = Vec::new();
    let mut recipe = Vec::new();
    for k in 0..depth {
        let v3 = rng.chance(70);
        let cb = rng.range(9, 21);
        let cs = 1u64 << cb;
        let ext_l2 = v3 && cb >= 14 && rng.chance(40);
        let zstd = v3 && rng.chance(50);
        let size = rng.range(1, 32) * MIB + if rng.chance(30) { rng.range(1, 2047) * 512 } else { 0 };
        let mut opts = format!("compat={},cluster_size={cs}", if v3 { "1.1" } else { "0.10" });
        if v3 {
            opts.push_str(if zstd { ",compression_type=zstd" } else { ",compression_type=zlib" });
        }
        if ext_l2 {
            opts.push_str(",extended_l2=on");
        }
        let name = format!("r{seed}_l{k}.qcow2");
        let img = dir.join(&name);
        let backing = if k > 0 { Some(format!("r{seed}_l{}.qcow2", k - 1)) } else { None };
        recipe.push(format!(
            "qemu-img create -f qcow2 -o {opts}{} {name} {size}",
            backing.as_ref().map(|b| format!(" -b {b} -F qcow2")).unwrap_or_default()
        ));
        create_qcow2(&img, &size.to_string(), &opts, backing.as_deref().map(|b| (b, "qcow2")));
        let nops = rng.range(10, 30);
        let mut cmds = Vec::new();
        // QEMU can only write a compressed cluster where nothing was written in this layer
        // (it fails with EIO otherwise), so track the clusters each op touches.
        let mut touched = std::collections::HashSet::new();
        for _ in 0..nops {
            let kind = rng.below(100);
            let off = rand_off(&mut rng, size, cs);
            let len = rand_len(&mut rng, size - off);
            let pat = rng.range(1, 255);
            if kind < 78 {
                for c in off / cs..=(off + len - 1) / cs {
                    touched.insert(c);
                }
            }
            let cmd = if kind < 35 {
                format!("write -P {pat} {off} {len}")
            } else if kind < 45 {
                format!("write -s {} {off} {}", s(data), len.min(MIB))
            } else if kind < 58 {
                format!("write -z {off} {}", len.clamp(1, 2 * MIB).min(size - off))
            } else if kind < 68 {
                format!("write -z -u {off} {len}")
            } else if kind < 78 {
                format!("discard {off} {len}")
            } else {
                // compressed write of whole clusters
                let full = size / cs;
                if full == 0 {
                    continue;
                }
                let c0 = rng.below(full);
                let mut n = rng.range(1, (full - c0).min((4 * MIB / cs).max(1)).min(8));
                if let Some(i) = (c0..c0 + n).position(|c| touched.contains(&c)) {
                    n = i as u64;
                }
                if n == 0 {
                    continue;
                }
                if rng.chance(50) {
                    format!("write -c -P {pat} {} {}", c0 * cs, n * cs)
                } else {
                    // the data file holds 2 MiB: at least one cluster, never more than 2 MiB
                    n = n.min((2 * MIB / cs).max(1));
                    format!("write -c -s {} {} {}", s(data), c0 * cs, n * cs)
                }
            };
            if kind >= 78 {
                // n was narrowed above; recompute from the command to mark the right clusters
                let parts: Vec<u64> = cmd.rsplit(' ').take(2).map(|x| x.parse().unwrap()).collect();
                for c in parts[1] / cs..(parts[1] + parts[0]) / cs {
                    touched.insert(c);
                }
            }
            cmds.push(cmd);
        }
        for c in &cmds {
            recipe.push(format!("qemu-io -c \"{c}\" {name}"));
        }
        // One qemu-io process per batch, a batch ending after each compressed write:
        // QEMU 10.0.2 keeps a compressed-write cursor inside a host cluster across writes in
        // one process; if a later write frees and reuses that cluster (e.g. as an L2 table),
        // the next compressed write trips "Preventing invalid write on metadata (overlaps
        // with active L2 table)" and marks the image corrupt. Repro (one process):
        // cluster_size=2048,compression_type=zstd 17M: write -c -P 1 15874048 2048;
        // write -P 190 15736308 408893; write -c -P 33 2879488 6144.
        let mut batches: Vec<Vec<String>> = vec![Vec::new()];
        for c in &cmds {
            batches.last_mut().unwrap().push(c.clone());
            if c.starts_with("write -c") {
                batches.push(Vec::new());
            }
        }
        if let Err(e) = std::panic::catch_unwind(|| {
            for b in &batches {
                qemu_io(&img, b);
            }
        }) {
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            panic!(
                "seed {seed}: building the image failed (a test generator bug or a qemu-io limit):\n  {}\n{msg}",
                recipe.join("\n  ")
            );
        }
        images.push(img);
    }
    Case { seed, images, recipe }
}

#[test]
fn randomized_chains_match_qemu() {
    let t = setup("random");
    let base_seed: u64 = std::env::var("SNAPMOUNT_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let n: u64 = std::env::var("SNAPMOUNT_TEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    println!(
        "randomized: seeds {base_seed}..{} (override with SNAPMOUNT_TEST_SEED / SNAPMOUNT_TEST_CASES)",
        base_seed + n - 1
    );
    let data = t.scratch.join("data.bin");
    gen_data(&data, 2 * MIB, 0xda7a);
    let mut cases = Vec::new();
    for i in 0..n {
        let c = build_case(base_seed + i, &t.imgs, &data);
        println!("seed {}: {} layer(s)", c.seed, c.images.len());
        cases.push(c);
    }
    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    let mut failures = Vec::new();
    for c in &cases {
        for img in &c.images {
            let r = mnt.check_thoroughly(img, &t.scratch, c.seed, 30).and_then(|_| {
                let name = img.file_name().unwrap().to_string_lossy().into_owned();
                let exp = t.scratch.join(format!("{name}.seek.exp"));
                oracle_raw(img, &exp);
                let r = seek_walk_consistent(&mnt.disk(&name), &exp);
                let _ = fs::remove_file(&exp);
                r
            });
            if let Err(e) = r {
                failures.push(format!(
                    "seed {} (reproduce: SNAPMOUNT_TEST_SEED={} SNAPMOUNT_TEST_CASES=1): {e}\nrecipe (data file = {} bytes of gen_data seed 0xda7a):\n  {}",
                    c.seed,
                    c.seed,
                    2 * MIB,
                    c.recipe.join("\n  ")
                ));
                break;
            }
        }
    }
    if !failures.is_empty() {
        panic!("{} of {} random cases differ from qemu-img:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
    }
}

// ---------------------------------------------------------------------------
// Extra edge cases: paths, names, big offsets, many images, --allow-other
// ---------------------------------------------------------------------------

/// Relative SOURCE and MOUNTPOINT (a daemon that chdir("/")s must resolve them first),
/// and a relative backing name reached through a relative SOURCE.
#[test]
fn relative_source_and_mountpoint_paths() {
    let t = setup("relpath");
    fs::create_dir_all(t.imgs.join("sub")).unwrap();
    let base = t.imgs.join("sub/rbase.qcow2");
    create_qcow2(&base, "8M", "", None);
    qemu_io(&base, &["write -P 0x71 0 4M"]);
    let top = t.imgs.join("rtop.qcow2");
    create_qcow2(&top, "", "", Some(("sub/rbase.qcow2", "qcow2")));
    qemu_io(&top, &["write -P 0x72 1M 64k"]);
    let o = exec(bin(), &["mount", "imgs/rtop.qcow2", "mnt"], Some(&t.root), Duration::from_secs(60));
    // guard even if the mount went somewhere unexpected
    struct G(PathBuf);
    impl Drop for G {
        fn drop(&mut self) {
            force_unmount(&self.0);
        }
    }
    let _g = G(t.mnt.clone());
    assert!(o.success(), "mount with relative paths failed\n{}", o.describe());
    assert!(is_mountpoint(&t.mnt), "relative mount point {} not mounted\n{}", t.mnt.display(), o.describe());
    if let Err(e) = check_against_oracle(&t.mnt.join("rtop.qcow2/disk.raw"), &top, &t.scratch) {
        panic!("{e}");
    }
    // The other test thread's children hold copies of this process's open
    // descriptors between their fork and exec (CLOEXEC closes them only at
    // exec): on a loaded machine the file just compared may still be open
    // in one of them for a moment, and the mount is busy until it execs.
    let mut o = exec(bin(), &["umount", "mnt"], Some(&t.root), Duration::from_secs(30));
    for _ in 0..50 {
        if o.success() || !o.stderr.contains("mount is busy") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        o = exec(bin(), &["umount", "mnt"], Some(&t.root), Duration::from_secs(30));
    }
    assert!(o.success(), "snapmount umount with a relative path failed\n{}", o.describe());
    assert!(wait_for(Duration::from_secs(10), || !is_mountpoint(&t.mnt)), "still mounted after `snapmount umount mnt`");
}

/// Spaces, '#', UTF-8 in image, backing and mount point names.
#[test]
fn odd_file_names() {
    let t = setup("names");
    let bdir = t.imgs.join("base dir");
    fs::create_dir_all(&bdir).unwrap();
    let base = bdir.join("base image ü.qcow2");
    create_qcow2(&base, "8M", "", None);
    qemu_io(&base, &["write -P 0x21 0 2M"]);
    let top = t.imgs.join("VM disk #1 (ü).qcow2");
    create_qcow2(&top, "", "cluster_size=4k", Some(("base dir/base image ü.qcow2", "qcow2")));
    qemu_io(&top, &["write -P 0x22 1M 100k"]);
    let mnt_dir = t.root.join("mount point ü");
    let mnt = Mount::new(&[&top], &mnt_dir);
    assert!(is_mountpoint(&mnt_dir));
    assert_eq!(mnt.entries(), vec!["VM disk #1 (ü).qcow2"]);
    mnt.assert_matches(&top, &t.scratch);
    let info = mnt.info("VM disk #1 (ü).qcow2");
    let bc = json_arr(&info, "backing_chain");
    assert!(bc.len() == 1 && bc[0]["path"].as_str().unwrap_or("").ends_with("base dir/base image ü.qcow2"), "{info}");
}

/// Guest offsets beyond 4 GiB (32-bit overflow in index or offset arithmetic), both with
/// 64 KiB and 512 B clusters; compared window by window (the images are mostly holes).
#[test]
fn offsets_beyond_4gib() {
    let t = setup("big");
    let src = t.scratch.join("src.raw");
    gen_data(&src, 2 * MIB, 11);
    let g = 1u64 << 30;
    let regions: Vec<(u64, u64)> =
        vec![(4 * g - 512, 1024), (4 * g + MIB, MIB), (5 * g + 12345, 70000), (6 * g - 4096, 4096)];
    let mut imgs = Vec::new();
    for (name, opts) in [
        ("big64k.qcow2", "cluster_size=64k"),
        ("big512.qcow2", "cluster_size=512"),
        ("big2m_zstd.qcow2", "cluster_size=2M,compression_type=zstd"),
    ] {
        let img = t.imgs.join(name);
        create_qcow2(&img, "6G", opts, None);
        let mut cmds: Vec<String> =
            regions.iter().enumerate().map(|(i, (o, l))| format!("write -P {} {o} {l}", 0x30 + i)).collect();
        cmds.push(format!("write -s {} {} {}", s(&src), 4 * g + 3 * MIB, 2 * MIB));
        if name.contains("zstd") {
            cmds.push(format!("write -c -s {} {} {}", s(&src), 5 * g + 64 * MIB, 2 * MIB));
        }
        qemu_io(&img, &cmds);
        imgs.push(img);
    }
    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    let mut errs = Vec::new();
    for img in &imgs {
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        let exp = t.scratch.join(format!("{name}.exp"));
        oracle_raw(img, &exp);
        let disk = mnt.disk(&name);
        let size = fs::metadata(&disk).unwrap().len();
        if size != 6 * g {
            errs.push(format!("{name}: size {size}, expected {}", 6 * g));
            continue;
        }
        let mut windows: Vec<(u64, u64)> = regions.iter().map(|(o, l)| (o.saturating_sub(MIB), l + 2 * MIB)).collect();
        windows.push((4 * g + 2 * MIB, 4 * MIB));
        windows.push((5 * g + 63 * MIB, 4 * MIB));
        windows.push((0, MIB));
        for (o, l) in windows {
            let l = l.min(size - o.min(size));
            let want = pread(&exp, o, l as usize).unwrap();
            match pread(&disk, o, l as usize) {
                Ok(got) if got == want => {}
                Ok(got) => {
                    let i = (0..got.len()).find(|&i| got[i] != want[i]).unwrap();
                    errs.push(format!("{name}: window {l}@{o}: first difference at byte {}", o + i as u64));
                }
                Err(e) => errs.push(format!("{name}: pread {l}@{o}: {e}")),
            }
        }
        // the data map above 4 GiB
        let ranges = qemu_data_ranges(img);
        errs.extend(check_seek(&disk, &ranges, size).into_iter().map(|e| format!("{name}: {e}")));
        let _ = fs::remove_file(&exp);
    }
    if !errs.is_empty() {
        panic!("offsets beyond 4 GiB:\n{}", errs.join("\n"));
    }
}

/// A directory with 200 overlays sharing one base image (all mounted at once).
#[test]
fn many_images_in_one_directory() {
    let t = setup("many");
    let base_dir = t.root.join("basedir");
    fs::create_dir_all(&base_dir).unwrap();
    let base = base_dir.join("shared-base.qcow2");
    create_qcow2(&base, "4M", "", None);
    qemu_io(&base, &["write -P 0x10 0 4M"]);
    let proto = t.scratch.join("proto.qcow2");
    create_qcow2(&proto, "", "", Some((&s(&base), "qcow2")));
    let n = 200;
    for i in 0..n {
        let p = t.imgs.join(format!("vm{i:03}.qcow2"));
        fs::copy(&proto, &p).unwrap();
    }
    // give a few of them their own data
    for i in [0usize, 57, 123, 199] {
        qemu_io(
            &t.imgs.join(format!("vm{i:03}.qcow2")),
            &[format!("write -P {} {} 64k", i + 1, (i as u64 % 60) * 64 * KIB)],
        );
    }
    let mnt = Mount::new(&[&t.imgs], &t.mnt);
    assert_eq!(mnt.entries().len(), n, "all {n} images should be listed");
    let check: Vec<PathBuf> =
        [0usize, 1, 57, 123, 198, 199].iter().map(|i| t.imgs.join(format!("vm{i:03}.qcow2"))).collect();
    mnt.assert_all_match(&check, &t.scratch);
    // every disk.raw opens and reads
    for i in 0..n {
        let d = mnt.disk(&format!("vm{i:03}.qcow2"));
        let b = pread(&d, 4 * MIB - 4096, 4096).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        assert!(b.iter().all(|&x| x == 0x10), "{}: last 4k should come from the shared base", d.display());
    }
}

/// --allow-other is passed to the kernel; without it the mount is not allow_other.
#[test]
fn allow_other_option() {
    let t = setup("allowother");
    let img = t.imgs.join("ao.qcow2");
    create_qcow2(&img, "4M", "", None);
    qemu_io(&img, &["write -P 0x33 0 1M"]);
    let opts_of = |mnt: &Path| -> String {
        let want = abs_path(mnt).to_string_lossy().into_owned();
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
        text.lines().find(|l| l.split(' ').nth(4).map(|mp| mp == want).unwrap_or(false)).unwrap_or("").to_string()
    };
    {
        let m1 = Mount::with_args(&["--allow-other"], &[&img], &t.root.join("mnt-ao"));
        let line = opts_of(&m1.dir);
        assert!(line.contains("allow_other"), "--allow-other not in mount options: {line}");
        m1.assert_matches(&img, &t.scratch);
    }
    let m2 = Mount::new(&[&img], &t.root.join("mnt-default"));
    let line = opts_of(&m2.dir);
    assert!(!line.contains("allow_other"), "allow_other should be off by default: {line}");
}
