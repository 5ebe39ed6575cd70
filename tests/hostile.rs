//! Hostile images: seeded random damage to real qcow2 files. Opening may fail
//! (with a message naming the file), reads may fail (EIO-style errors); the
//! reader must never panic, hang, or allocate without bound.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use snapmount::cache::BlockCache;
use snapmount::format::hexz::{open_hexz, Stream};
use snapmount::format::open_qcow2;
use snapmount::view::{self, View};

mod common;

/// Runs a bash script in `dir`; with `hexz`, the HEXZ oracle (hexz-cli 0.8.2
/// from `common::hexz_bin`) comes first on its PATH.
fn sh(dir: &Path, script: &str, hexz: bool) {
    let mut path = std::ffi::OsString::new();
    if hexz {
        path.push(common::hexz_bin().parent().unwrap());
        path.push(":");
    }
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let ok = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .status()
        .unwrap();
    assert!(ok.success(), "script failed: {script}");
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Opens the image and reads every view through in 1 MiB steps (bounded,
/// so a view claiming exabytes is sampled, not read whole), plus the
/// allocation walk that `stat` and SEEK_DATA do.
fn exercise(path: &Path) -> Result<(), String> {
    let cache = Arc::new(BlockCache::new(16 << 20));
    let image = open_qcow2(path, &cache, &Default::default()).map_err(|e| e.to_string())?;
    let mut views: Vec<Box<dyn View>> = vec![Box::new(image.active_view())];
    for i in 0..image.snapshots().len().min(8) {
        views.push(Box::new(image.snapshot_view(i)));
        views.push(Box::new(image.vmstate_view(i)));
    }
    let mut buf = vec![0u8; 1 << 20];
    for v in &views {
        let mut reads = 0;
        let mut pos = 0u64;
        while pos < v.size() && reads < 96 {
            let _ = v.read_at(&mut buf, pos);
            pos = pos.saturating_add(if reads < 64 { 1 << 20 } else { v.size() / 32 + 1 });
            reads += 1;
        }
        let _ = view::allocated_bytes(v.as_ref(), 1 << 16);
        let _ = view::seek_data(v.as_ref(), 0);
        let _ = view::seek_hole(v.as_ref(), 0);
    }
    Ok(())
}

fn seeds() -> Vec<u64> {
    match std::env::var("SNAPMOUNT_TEST_SEED") {
        Ok(s) => vec![s.parse().expect("SNAPMOUNT_TEST_SEED is a number")],
        // SNAPMOUNT_TEST_SEEDS=N runs seeds 1..=N (default 150).
        Err(_) => {
            let n = std::env::var("SNAPMOUNT_TEST_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
            (1..=n).collect()
        }
    }
}

#[test]
fn damaged_images_never_panic_or_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Text, random and zero runs, the same bytes on every run.
    common::gen_data(&dir.join("rnd.bin"), 2 << 20, 77);
    sh(
        dir,
        r#"
        q() { qemu-io "$@" >/dev/null; }
        qemu-img create -q -f qcow2 -o cluster_size=4k base.qcow2 4M
        q -c 'write -P 0x11 0 2M' base.qcow2
        qemu-img create -q -f qcow2 -o cluster_size=4k,compression_type=zstd -b base.qcow2 -F qcow2 zstd.qcow2 4M
        q -c 'write -c -s rnd.bin 0 64k' -c 'write -c -P 0x22 64k 64k' -c 'write -z 128k 8k' zstd.qcow2
        qemu-img snapshot -c s1 zstd.qcow2
        q -c 'write -P 0x33 1M 16k' zstd.qcow2
        qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on ext.qcow2 4M
        q -c 'write -P 0x44 2k 2k' -c 'write -z 8k 2k' -c 'write -c -P 0x45 32k 16k' ext.qcow2
        qemu-img create -q -f qcow2 -o cluster_size=4k,compat=0.10 v2.qcow2 4M
        q -c 'write -c -P 0x55 0 16k' -c 'write -P 0x56 64k 4k' v2.qcow2
        qemu-img snapshot -c v2s v2.qcow2
    "#,
        false,
    );
    let originals: Vec<PathBuf> = ["zstd.qcow2", "ext.qcow2", "v2.qcow2"].iter().map(|n| dir.join(n)).collect();
    damage_and_read(&originals, dir, exercise, &["base.qcow2"]);
}

/// Damages copies of `originals` (seeded) and runs `read` on each in a
/// thread: it must return (Ok or an error naming a file), never panic or hang.
fn damage_and_read(originals: &[PathBuf], dir: &Path, read: fn(&Path) -> Result<(), String>, also_named: &[&str]) {
    for seed in seeds() {
        let mut rng = Rng(seed);
        let original = &originals[(seed % originals.len() as u64) as usize];
        let mut bytes = std::fs::read(original).unwrap();
        // Most damage goes to metadata: at the front (qcow2 header, L1, L2,
        // snapshot table; HEXZ header) and at the end (HEXZ index); some anywhere.
        let hits = 1 + rng.below(12);
        let len = bytes.len() as u64;
        for _ in 0..hits {
            let at = match rng.below(3) {
                0 => rng.below(len),
                1 => rng.below((64 << 10).min(len)),
                _ => len - 1 - rng.below((64 << 10).min(len)),
            } as usize;
            match rng.below(3) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = rng.next() as u8,
                _ => {
                    let end = (at + 8).min(bytes.len());
                    for b in &mut bytes[at..end] {
                        *b = rng.next() as u8;
                    }
                }
            }
        }
        let ext = original.extension().unwrap().to_str().unwrap();
        let damaged = dir.join(format!("damaged-{seed}.{ext}"));
        std::fs::write(&damaged, &bytes).unwrap();
        match bounded(&damaged, read) {
            Err(why) => panic!("seed {seed}: {why} (rerun with SNAPMOUNT_TEST_SEED={seed})"),
            Ok(Err(msg)) => assert!(
                msg.contains(damaged.to_str().unwrap()) || also_named.iter().any(|n| msg.contains(n)),
                "seed {seed}: error does not name the file: {msg}"
            ),
            Ok(Ok(())) => {}
        }
        std::fs::remove_file(&damaged).unwrap();
    }
}

/// Runs `read` on `path` in a thread: its result, or why it did not return
/// one (a panic, or a hang of 60 s).
fn bounded(path: &Path, read: fn(&Path) -> Result<(), String>) -> Result<Result<(), String>, String> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| read(&p));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Err(_) => Err(format!("reading {} hung for 60 s", path.display())),
        Ok(Err(_)) => Err(format!("the reader panicked on {}", path.display())),
        Ok(Ok(r)) => Ok(r),
    }
}

/// What the fuzzers found (fuzz/, FUZZING.md), kept in tests/fixtures/fuzz:
/// each input opens or fails with a message naming it, and its reads end.
#[test]
fn fuzz_findings_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let mut found = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let read = if path.extension().is_some_and(|e| e == "hxz") { exercise_hexz } else { exercise };
        match bounded(&path, read) {
            Err(why) => panic!("{why}"),
            Ok(Err(msg)) => assert!(msg.contains(path.to_str().unwrap()), "error does not name the file: {msg}"),
            Ok(Ok(())) => {}
        }
        found += 1;
    }
    assert!(found > 0, "the findings are in {}", dir.display());
}

fn exercise_hexz(path: &Path) -> Result<(), String> {
    let cache = Arc::new(BlockCache::new(16 << 20));
    let no_password = |_: &Path| Err("no password in this test".to_string());
    let archive = open_hexz(path, &cache, &no_password, &Default::default()).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    for stream in [Stream::Main, Stream::Auxiliary] {
        let v = archive.view(stream);
        let mut pos = 0u64;
        let mut reads = 0;
        while pos < v.size() && reads < 96 {
            let _ = v.read_at(&mut buf, pos);
            pos = pos.saturating_add(if reads < 64 { 1 << 20 } else { v.size() / 32 + 1 });
            reads += 1;
        }
        let _ = view::allocated_bytes(&v, 1 << 16);
    }
    let _ = archive.block_stats();
    Ok(())
}

#[test]
fn damaged_hexz_archives_never_panic_or_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::gen_data(&dir.join("rnd.bin"), 1 << 20, 78);
    sh(
        dir,
        r#"
        { head -c 300k rnd.bin; head -c 700k < <(yes 'some text that compresses'); head -c 200k /dev/zero; } > disk.raw
        hexz pack -s disk.raw lz4.hxz
        hexz pack -s disk.raw zstd.hxz --compression zstd --workers 1
        { head -c 100 rnd.bin; cat disk.raw; } > child.raw
        hexz pack -s child.raw thin.hxz --base lz4.hxz
        mkdir tree; cp rnd.bin tree/a; head -c 5000 disk.raw > tree/memory
        hexz pack -s tree tree.hxz
    "#,
        true,
    );
    let originals: Vec<PathBuf> = ["lz4.hxz", "zstd.hxz", "thin.hxz", "tree.hxz"].iter().map(|n| dir.join(n)).collect();
    damage_and_read(&originals, dir, exercise_hexz, &["lz4.hxz"]);
}
