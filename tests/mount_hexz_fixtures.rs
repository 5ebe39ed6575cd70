//! The committed HEXZ fixtures (made by tests/fixtures/make-hexz.sh with the
//! real hexz-cli 0.8.2), mounted by the real binary: every view must have the
//! SHA-256 of the bytes that were packed. No hexz needed here.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hexz")
}

fn sha256(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_fixture_view_has_the_packed_bytes() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let pw = fixtures().join("password.txt");
    let m = Mount::with_args(&["--password-file", pw.to_str().unwrap()], &[fixtures()], &tmp.path().join("mnt"));
    let sums = std::fs::read_to_string(fixtures().join("SHA256SUMS")).unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for line in sums.lines() {
        let (want, rel) = line.split_once("  ").expect("sha256sum format");
        let got = sha256(&m.dir.join(rel));
        if got != want {
            failures.push(format!("{rel}: sha256 {got}, want {want}"));
        }
        checked += 1;
    }
    assert!(checked >= 16, "SHA256SUMS lists {checked} views");
    assert!(failures.is_empty(), "views differ from what was packed:\n{}", failures.join("\n"));
    // The signed archive reads like the unsigned one and says it is signed.
    assert_eq!(m.info("signed.hxz")["signature"], true);
    assert_eq!(m.info("grand.hxz")["parent_chain"].as_array().unwrap().len(), 2);
    assert!(m.info("grand.hxz")["blocks"]["parent_refs"].as_u64().unwrap() > 0);
    // Non-archives in the directory are skipped.
    assert!(!m.dir.join("SHA256SUMS").exists() && !m.dir.join("password.txt").exists());
}

#[test]
fn ext4_inside_an_archive_loop_mounts() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let m = Mount::new(&[fixtures().join("ext4.hxz")], &tmp.path().join("mnt"));
    let fs = LoopMount::new(&m.disk("ext4.hxz"), &tmp.path().join("root"));
    assert_eq!(std::fs::read_to_string(fs.dir.join("etc/motd")).unwrap(), "Welcome to the fixture VM\n");
    assert_eq!(std::fs::metadata(fs.dir.join("home/alice/data.bin")).unwrap().len(), 300000);
}

#[test]
fn a_flipped_byte_in_a_block_fails_that_block_only() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("flipped.hxz");
    std::fs::copy(fixtures().join("lz4.hxz"), &copy).unwrap();
    // The first block starts right after the 4096-byte header.
    or_byte(&copy, 4096 + 100, 0x01);
    let m = Mount::new(&[&copy, &fixtures().join("zstd.hxz")], &tmp.path().join("mnt"));
    let f = std::fs::File::open(m.disk("flipped.hxz")).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = f.read_at(&mut buf, 0).expect_err("the damaged block must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // The rest of the archive reads, and matches the intact archive.
    let good = std::fs::File::open(m.disk("zstd.hxz")).unwrap();
    let size = f.metadata().unwrap().len();
    let mut want = vec![0u8; 4096];
    for off in [600_000u64, 1_000_000, size - 4096] {
        f.read_exact_at(&mut buf, off).unwrap();
        good.read_exact_at(&mut want, off).unwrap();
        assert_eq!(buf, want, "offset {off}");
    }
    // And the daemon still serves the first block of the other archive.
    good.read_exact_at(&mut want, 0).unwrap();
}

#[test]
fn qcow2_and_hexz_side_by_side() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mixed");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixtures().join("zstd.hxz"), dir.join("vm.hxz")).unwrap();
    let img = dir.join("vm.qcow2");
    create_qcow2(&img, "8M", "compression_type=zstd", None);
    qemu_io(&img, &["write -P 0x42 1M 1M"]);
    let m = Mount::new(&[&dir], &tmp.path().join("mnt"));
    assert_eq!(m.entries(), ["vm.hxz", "vm.qcow2"]);
    assert_eq!(m.info("vm.hxz")["format"], "hexz");
    assert_eq!(m.info("vm.qcow2")["format"], "qcow2");
    m.assert_matches(&img, &tmp.path().join("scratch"));
    let sums = std::fs::read_to_string(fixtures().join("SHA256SUMS")).unwrap();
    let want = sums.lines().find(|l| l.ends_with("  zstd.hxz/disk.raw")).unwrap().split_once("  ").unwrap().0;
    assert_eq!(sha256(&m.disk("vm.hxz")), want);
}

#[test]
fn a_parent_loop_or_a_missing_parent_fails_the_mount() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let refused = |src: &Path, words: &[&str]| {
        let o = snapmount(&[std::ffi::OsStr::new("mount"), src.as_os_str(), mnt.as_os_str()]);
        assert!(!o.success(), "mounting {} must fail", src.display());
        let err = o.stderr.trim().to_string();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        for w in words {
            assert!(err.contains(w), "{err:?} lacks {w:?}");
        }
        assert!(!is_mountpoint(&mnt));
    };
    // child.hxz names "base.hxz" as its parent: a copy of it under that name
    // is its own parent.
    let looped = tmp.path().join("loop");
    std::fs::create_dir_all(&looped).unwrap();
    std::fs::copy(fixtures().join("child.hxz"), looped.join("base.hxz")).unwrap();
    refused(&looped.join("base.hxz"), &["base.hxz", "loops"]);
    // Alone, child.hxz has no parent to read from.
    let alone = tmp.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::copy(fixtures().join("child.hxz"), alone.join("child.hxz")).unwrap();
    refused(&alone.join("child.hxz"), &["child.hxz", "parent archive 'base.hxz'", "not found"]);
}

#[test]
fn holes_are_zero_blocks_and_seek_walks_the_whole_stream() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let m = Mount::new(&[fixtures().join("serial.hxz"), fixtures().join("grand.hxz")], &tmp.path().join("mnt"));
    for name in ["serial.hxz", "grand.hxz"] {
        let path = m.disk(name);
        let f = std::fs::File::open(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let size = bytes.len() as i64;
        let (mut pos, mut holes) = (0i64, 0);
        while pos < size {
            // SAFETY: lseek on an open descriptor.
            let hole = unsafe { libc::lseek(fd, pos, libc::SEEK_HOLE) };
            assert!(hole >= pos && hole <= size, "{name}: SEEK_HOLE from {pos} gave {hole}");
            if hole == size {
                break;
            }
            let data = unsafe { libc::lseek(fd, hole, libc::SEEK_DATA) };
            let data = if data < 0 { size } else { data };
            assert!(data > hole, "{name}: SEEK_DATA from {hole} gave {data}");
            assert!(
                bytes[hole as usize..data as usize].iter().all(|&b| b == 0),
                "{name}: hole {hole}..{data} holds data"
            );
            holes += 1;
            pos = data;
        }
        if name == "serial.hxz" {
            assert!(holes > 0, "serial packs store zero blocks sparsely: they are holes");
        }
    }
}
