//! HEXZ archives packed on the spot by hexz-cli 0.8.2 (from fresh random
//! data), mounted by the real binary. Oracles: the data that was packed, and
//! `hexz extract` where hexz itself reads correctly (it does not for chains of
//! three or more archives).
//!
//! These run hexz-cli 0.8.2 as `scripts/test.sh` installs it under
//! `target/tools` (`common::hexz_bin`), and fail without it. The committed
//! fixtures (tests/mount_hexz_fixtures.rs) cover the same cases too.

mod common;

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn hexz(dir: &Path, args: &[&str]) -> String {
    let hexz = hexz_bin();
    let o = exec(hexz.to_str().unwrap(), args, Some(dir), DEFAULT_TIMEOUT);
    assert!(o.success(), "hexz failed\n{}", o.describe());
    o.stdout
}

fn hexz_env(dir: &Path, env: &[(&str, &str)], args: &[&str]) {
    let mut c = std::process::Command::new(hexz_bin());
    c.args(args).current_dir(dir).stdin(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("hexz runs");
    assert!(out.status.success(), "hexz {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    std::fs::create_dir_all(&dir).unwrap();
    (tmp, dir)
}

/// A disk-like image: mixed data with zero stretches.
fn disk_image(path: &Path, len: u64, seed: u64) {
    gen_data(path, len, seed);
    let mut bytes = std::fs::read(path).unwrap();
    let zero_at = (len / 3) as usize;
    bytes[zero_at..zero_at + (len / 8) as usize].fill(0);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn lz4_and_zstd_parallel_and_serial_packs() {
    let (tmp, dir) = scratch();
    disk_image(&dir.join("src.raw"), 24 * MIB + 12345, 1);
    hexz(&dir, &["pack", "-s", "src.raw", "lz4.hxz"]);
    hexz(&dir, &["pack", "-s", "src.raw", "zstd.hxz", "--compression", "zstd"]);
    hexz(&dir, &["pack", "-s", "src.raw", "serial.hxz", "--workers", "1"]);
    hexz(&dir, &["pack", "-s", "src.raw", "big.hxz", "--dcam"]);
    let names = ["lz4.hxz", "zstd.hxz", "serial.hxz", "big.hxz"];
    let m = Mount::new(&[&dir], &tmp.path().join("mnt"));
    for name in names {
        assert_files_equal(&m.disk(name), &dir.join("src.raw"));
        let out = tmp.path().join(format!("{name}.extracted"));
        hexz(&dir, &["extract", name, out.to_str().unwrap()]);
        assert_files_equal(&m.disk(name), &out);
        let info = m.info(name);
        assert_eq!(info["format"], "hexz");
        assert_eq!(info["streams"]["main_size"].as_u64(), Some(24 * MIB + 12345));
        assert!(!m.image_dir(name).join("auxiliary.raw").exists());
    }
    assert_eq!(m.info("zstd.hxz")["compression"], "zstd");
    assert!(m.info("serial.hxz")["blocks"]["sparse"].as_u64().unwrap() > 0, "serial packs store zero blocks sparsely");
    assert!(m.info("lz4.hxz")["blocks"]["deduplicated"].as_u64().unwrap() > 0, "parallel packs dedup zero chunks");
    // Sparse zero blocks are holes; data blocks are data.
    let meta = std::fs::metadata(m.disk("serial.hxz")).unwrap();
    assert!(meta.blocks() * 512 < meta.len(), "st_blocks counts the sparse blocks as holes");
}

#[test]
fn directory_pack_shows_its_files_and_the_auxiliary_stream() {
    let (tmp, dir) = scratch();
    let src = dir.join("tree");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    let files: Vec<(&str, u64, u32)> = vec![
        ("a.txt", 5000, 0o644),
        ("sub/b.bin", 300_000, 0o600),
        ("sub/deeper/c.sh", 77, 0o755),
        ("empty", 0, 0o644),
        ("memory", 200_000, 0o644),
    ];
    for (i, (name, len, mode)) in files.iter().enumerate() {
        let p = src.join(name);
        gen_data(&p, *len, 100 + i as u64);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    run("touch", &["-d", "2021-06-01 12:00:00 UTC", src.join("a.txt").to_str().unwrap()]);
    hexz(&dir, &["pack", "-s", "tree", "tree.hxz"]);
    let m = Mount::new(&[&dir.join("tree.hxz")], &tmp.path().join("mnt"));
    let root = m.image_dir("tree.hxz").join("files");
    for (name, len, mode) in &files {
        let got = root.join(name);
        let meta = std::fs::metadata(&got).unwrap_or_else(|e| panic!("files/{name}: {e}"));
        assert_eq!(meta.len(), *len, "files/{name} size");
        assert_eq!(meta.mode() & 0o777, mode & 0o555, "files/{name}: mode without write bits");
        assert_files_equal(&got, &src.join(name));
    }
    let a_mtime = std::fs::metadata(src.join("a.txt")).unwrap().mtime();
    assert_eq!(std::fs::metadata(root.join("a.txt")).unwrap().mtime(), a_mtime);
    // The top-level `memory` file is hexz's auxiliary stream (hexz mount
    // itself serves the main stream's bytes there).
    assert_files_equal(&m.image_dir("tree.hxz").join("auxiliary.raw"), &src.join("memory"));
}

#[test]
fn thin_chains_resolve_through_every_level() {
    let (tmp, dir) = scratch();
    let base = dir.join("base.raw");
    disk_image(&base, 6 * MIB, 7);
    // child: 70 bytes inserted (shifts the CDC chunks) and a rewritten stretch.
    let mut child = std::fs::read(&base).unwrap();
    child.splice(96_000..96_000, std::iter::repeat_n(0xAB, 70));
    let mut rng = Rng::new(3);
    rng.fill(&mut child[2_000_000..2_300_000]);
    std::fs::write(dir.join("child.raw"), &child).unwrap();
    let mut grand = child.clone();
    rng.fill(&mut grand[4_000_000..4_100_000]);
    grand.truncate(grand.len() - 1000);
    std::fs::write(dir.join("grand.raw"), &grand).unwrap();
    hexz(&dir, &["pack", "-s", "base.raw", "base.hxz"]);
    hexz(&dir, &["pack", "-s", "child.raw", "child.hxz", "--base", "base.hxz"]);
    hexz(&dir, &["pack", "-s", "grand.raw", "grand.hxz", "--base", "child.hxz", "--compression", "zstd"]);
    let m = Mount::new(&[&dir.join("grand.hxz")], &tmp.path().join("mnt"));
    assert_files_equal(&m.disk("grand.hxz"), &dir.join("grand.raw"));
    let backing = m.image_dir("grand.hxz").join("backing");
    assert_files_equal(&backing.join("1-child.hxz/disk.raw"), &dir.join("child.raw"));
    assert_files_equal(&backing.join("2-base.hxz/disk.raw"), &base);
    let info = m.info("grand.hxz");
    assert!(info["blocks"]["parent_refs"].as_u64().unwrap() > 0, "the grandchild is thin");
    assert_eq!(info["parent_chain"].as_array().unwrap().len(), 2);
    // hexz 0.8.2 itself reads grandparent-only blocks as zeros; say so if it still does.
    let out = tmp.path().join("hexz-extract.raw");
    hexz(&dir, &["extract", "grand.hxz", out.to_str().unwrap()]);
    if files_equal(&out, &dir.join("grand.raw")).is_err() {
        eprintln!("note: hexz extract of the grandchild differs from its source (known hexz 0.8.2 bug); snapmount reads it right");
    }
}

#[test]
fn encrypted_archives_need_the_right_password() {
    let (tmp, dir) = scratch();
    disk_image(&dir.join("src.raw"), 3 * MIB, 21);
    hexz_env(&dir, &[("HEXZ_PASSWORD", "correct horse")], &["pack", "-s", "src.raw", "enc.hxz", "--encrypt"]);
    let img = dir.join("enc.hxz");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();

    // Wrong password: refused before anything is mounted.
    let run_mount = |env: &[(&str, &str)], extra: &[&str]| {
        let mut c = std::process::Command::new(bin());
        c.arg("mount").args(extra).arg(&img).arg(&mnt).stdin(std::process::Stdio::null());
        c.env_remove("SNAPMOUNT_PASSWORD");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = run_mount(&[("SNAPMOUNT_PASSWORD", "wrong")], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong password must fail the mount");
    assert!(err.contains("enc.hxz") && err.contains("wrong password"), "message: {err}");
    assert!(!is_mountpoint(&mnt));

    let pw = tmp.path().join("pw.txt");
    std::fs::write(&pw, "correct horse\n").unwrap();
    let m = Mount::with_args(&["--password-file", pw.to_str().unwrap()], &[&img], &mnt);
    assert_files_equal(&m.disk("enc.hxz"), &dir.join("src.raw"));
    assert_eq!(m.info("enc.hxz")["encryption"]["cipher"], "aes-256-gcm");
    drop(m);

    std::env::set_var("SNAPMOUNT_PASSWORD", "correct horse");
    let m = Mount::new(&[&img], &mnt);
    std::env::remove_var("SNAPMOUNT_PASSWORD");
    assert_files_equal(&m.disk("enc.hxz"), &dir.join("src.raw"));
}

#[test]
fn a_damaged_block_fails_only_its_own_reads() {
    let (tmp, dir) = scratch();
    disk_image(&dir.join("src.raw"), 4 * MIB, 5);
    hexz(&dir, &["pack", "-s", "src.raw", "bad.hxz", "--workers", "1"]);
    hexz(&dir, &["pack", "-s", "src.raw", "good.hxz"]);
    // The first stored block starts right after the 4096-byte header.
    let bad = dir.join("bad.hxz");
    or_byte(&bad, 4096 + 40, 0x10);
    let m = Mount::new(&[&bad, &dir.join("good.hxz")], &tmp.path().join("mnt"));
    let f = std::fs::File::open(m.disk("bad.hxz")).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = std::os::unix::fs::FileExt::read_at(&f, &mut buf, 0).expect_err("the damaged block must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // A block far from it still reads, and so does the other archive.
    let src = std::fs::read(dir.join("src.raw")).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 3 * MIB).unwrap();
    assert_eq!(&buf[..], &src[3 * MIB as usize..3 * MIB as usize + 4096]);
    assert_files_equal(&m.disk("good.hxz"), &dir.join("src.raw"));
}

fn mount_fails(tmp: &Path, src: &Path, words: &[&str]) {
    let mnt = tmp.join("mnt-refused");
    std::fs::create_dir_all(&mnt).unwrap();
    let args = [OsString::from("mount"), src.as_os_str().to_owned(), mnt.as_os_str().to_owned()];
    let o = exec(bin(), &args, None, Duration::from_secs(60));
    assert!(!o.success(), "mount of {} should fail\n{}", src.display(), o.describe());
    let err = o.stderr.trim();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for w in words {
        assert!(err.contains(w), "message lacks {w:?}: {err}");
    }
    assert!(!is_mountpoint(&mnt));
}

#[test]
fn refusals_name_the_archive_and_the_reason() {
    let (tmp, dir) = scratch();
    disk_image(&dir.join("src.raw"), MIB, 9);
    hexz(&dir, &["pack", "-s", "src.raw", "base.hxz"]);
    std::fs::write(dir.join("child.raw"), {
        let mut v = std::fs::read(dir.join("src.raw")).unwrap();
        v[100] ^= 1;
        v
    })
    .unwrap();
    hexz(&dir, &["pack", "-s", "child.raw", "child.hxz", "--base", "base.hxz"]);
    std::fs::rename(dir.join("base.hxz"), dir.join("moved.hxz")).unwrap();
    mount_fails(tmp.path(), &dir.join("child.hxz"), &["child.hxz", "parent archive", "base.hxz", "not found"]);

    let v2 = dir.join("v2.hxz");
    std::fs::copy(dir.join("moved.hxz"), &v2).unwrap();
    write_bytes_at(&v2, 4, &2u32.to_le_bytes());
    mount_fails(tmp.path(), &v2, &["v2.hxz", "version 2"]);

    let codec = dir.join("codec.hxz");
    std::fs::copy(dir.join("moved.hxz"), &codec).unwrap();
    // No parents, no options: compression sits at byte 34 (hexz.md §3.2).
    let b = std::fs::read(&codec).unwrap();
    assert_eq!(&b[28..34], &[0, 0, 0, 0, 0, 0], "unexpected header layout");
    write_bytes_at(&codec, 35, &9u32.to_le_bytes());
    mount_fails(tmp.path(), &codec, &["codec.hxz", "compression"]);

    let legacy = dir.join("legacy.hxz");
    std::fs::write(&legacy, legacy_archive()).unwrap();
    mount_fails(tmp.path(), &legacy, &["legacy.hxz", "before 0.5"]);
}

/// A minimal archive in the pre-0.5 layout: `parent_path: Option<String>`
/// and 20-byte block entries. Its one block's bytes are never decoded: the
/// archive is refused on its index layout first.
fn legacy_archive() -> Vec<u8> {
    let data = vec![0x5au8; 29];
    let data_at = 4096u64;
    let page_at = data_at + data.len() as u64;
    let mut page = 1u64.to_le_bytes().to_vec();
    page.extend_from_slice(&data_at.to_le_bytes());
    page.extend_from_slice(&(data.len() as u32).to_le_bytes());
    page.extend_from_slice(&4096u32.to_le_bytes());
    page.extend_from_slice(&0u32.to_le_bytes());
    let index_at = page_at + page.len() as u64;
    let mut master = 1u64.to_le_bytes().to_vec();
    master.extend_from_slice(&page_at.to_le_bytes());
    master.extend_from_slice(&(page.len() as u32).to_le_bytes());
    master.extend_from_slice(&0u64.to_le_bytes());
    master.extend_from_slice(&0u64.to_le_bytes());
    master.extend_from_slice(&0u64.to_le_bytes());
    master.extend_from_slice(&4096u64.to_le_bytes());
    master.extend_from_slice(&0u64.to_le_bytes());
    let mut file = vec![0u8; 4096];
    file[0..4].copy_from_slice(b"HEXZ");
    file[4..8].copy_from_slice(&1u32.to_le_bytes());
    file[8..12].copy_from_slice(&65536u32.to_le_bytes());
    file[12..20].copy_from_slice(&index_at.to_le_bytes());
    // byte 20: parent_path None; then five more None options, encryption None,
    // compression 0 (LZ4), features: has_disk=1, has_memory=0, variable=0.
    file[28] = 1;
    file.extend_from_slice(&data);
    file.extend_from_slice(&page);
    file.extend_from_slice(&master);
    file
}

#[test]
fn tar_conversions_read_their_declared_size() {
    let (tmp, dir) = scratch();
    let t = dir.join("t");
    std::fs::create_dir_all(&t).unwrap();
    gen_data(&t.join("one"), 100_000, 1);
    gen_data(&t.join("two"), 70_001, 2);
    run_in(Some(&dir), "tar", &["cf", "in.tar", "t"]);
    hexz(&dir, &["convert", "tar", "in.tar", "tar.hxz", "--block-size", "16384", "-s"]);
    let m = Mount::new(&[&dir.join("tar.hxz")], &tmp.path().join("mnt"));
    let out = tmp.path().join("tar.extracted");
    hexz(&dir, &["extract", "tar.hxz", out.to_str().unwrap()]);
    assert_files_equal(&m.disk("tar.hxz"), &out);
}
