//! `snapmount export` against `qemu-img convert -O raw`: the same bytes and
//! the same holes, on random images, through O_DIRECT with an io_uring and
//! through plain writes, and a clear error when the disk fills.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// The data runs of a file, by SEEK_DATA / SEEK_HOLE.
fn data_map(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let size = f.metadata().unwrap().len() as i64;
    let (mut map, mut pos) = (Vec::new(), 0i64);
    while pos < size {
        // SAFETY: plain lseek on an open descriptor.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        map.push((data as u64, hole as u64));
        pos = hole;
    }
    map
}

/// Exports `img` to `out` and checks bytes and holes against qemu-img's
/// conversion into `want` (same file system as `out`).
fn check_export(img: &Path, out: &Path, want: &Path, extra: &[&str]) -> Result<(), String> {
    let mut args: Vec<&OsStr> = vec!["export".as_ref()];
    args.extend(extra.iter().map(OsStr::new));
    args.extend([img.as_os_str(), out.as_os_str()]);
    let o = snapmount(&args);
    if !o.success() {
        return Err(o.describe());
    }
    oracle_raw(img, want);
    files_equal(out, want)?;
    // qemu-img always allocates the first block of a raw file it creates
    // (file-posix.c allocate_first_block: its O_DIRECT alignment probe
    // needs one), zero or not: compare past it.
    let past_first = |map: Vec<(u64, u64)>| -> Vec<(u64, u64)> {
        map.into_iter().filter(|&(_, h)| h > 4096).map(|(d, h)| (d.max(4096), h)).collect()
    };
    let (got, exp) = (past_first(data_map(out)), past_first(data_map(want)));
    if got != exp {
        let first = got.iter().zip(&exp).position(|(a, b)| a != b).unwrap_or(got.len().min(exp.len()));
        return Err(format!(
            "holes differ from qemu-img's: {} data runs vs {}, first difference at run {first}: {:?} vs {:?}",
            got.len(),
            exp.len(),
            got.get(first),
            exp.get(first)
        ));
    }
    Ok(())
}

/// A random qcow2: random cluster size and layout, data with zero blocks
/// and zero sectors, compressed or not, then random writes, zero writes
/// and discards at sector (not block) alignment, and a size that is not a
/// multiple of 4 KiB.
fn random_image(dir: &Path, rng: &mut Rng, seed: u64) -> PathBuf {
    let sectors = rng.range(1, 6 * 2048) * 8 + rng.below(8);
    let size = sectors * 512;
    let raw = dir.join("src.raw");
    let mut data = gen_bytes(size as usize, seed);
    // Zero runs of odd lengths inside data.
    for _ in 0..rng.range(0, 40) {
        let at = rng.below(size) as usize;
        let len = (rng.range(1, 40) * 512) as usize;
        let end = (at + len).min(data.len());
        data[at..end].fill(0);
    }
    std::fs::write(&raw, &data).unwrap();
    let cluster = *rng.pick(&["4k", "16k", "64k", "128k"]);
    let compression = *rng.pick(&["", "zlib", "zstd"]);
    let extended = cluster != "4k" && rng.chance(40);
    let mut opts = format!("cluster_size={cluster}");
    if !compression.is_empty() {
        opts += &format!(",compression_type={compression}");
    }
    if extended {
        opts += ",extended_l2=on";
    }
    let img = dir.join("t.qcow2");
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", &opts];
    if !compression.is_empty() {
        args.push("-c");
    }
    let (raw_s, img_s) = (raw.to_str().unwrap(), img.to_str().unwrap());
    args.extend([raw_s, img_s]);
    qemu_img(&args);
    let mut cmds = Vec::new();
    for _ in 0..rng.range(0, 12) {
        let at = rng.below(sectors) * 512;
        let len = rng.range(1, 300).min(sectors - at / 512) * 512;
        cmds.push(match rng.below(3) {
            0 => format!("write -P {} {at} {len}", rng.range(1, 255)),
            1 => format!("write -z {at} {len}"),
            _ => format!("discard {at} {len}"),
        });
    }
    if !cmds.is_empty() {
        qemu_io(&img, &cmds);
    }
    img
}

#[test]
fn export_matches_qemu_img_bytes_and_holes_on_random_images() {
    preflight();
    let seed = test_seed(14);
    let mut rng = Rng::new(seed);
    for case in 0..12 {
        let tmp = tempfile::tempdir().unwrap();
        let img = random_image(tmp.path(), &mut rng, seed * 100 + case);
        let (out, want) = (tmp.path().join("out.raw"), tmp.path().join("want.raw"));
        let extra: &[&str] = if case % 2 == 0 { &["--no-sync"] } else { &[] };
        check_export(&img, &out, &want, extra).unwrap_or_else(|e| {
            let info = qemu_img(&["info", img.to_str().unwrap()]);
            panic!("case {case} (seed {seed}): {e}\n{info}")
        });
    }
}

/// A large image whose pieces run many writes at once: data with a hole in
/// every 64 KiB (as the benchmark's), 24 MiB.
#[test]
fn export_of_many_short_runs_matches_qemu_img() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("src.raw");
    let mut data = gen_bytes(24 << 20, test_seed(3));
    for chunk in data.chunks_mut(64 << 10) {
        chunk[48 << 10..].fill(0);
        chunk[..16].fill(0xa5);
    }
    std::fs::write(&raw, &data).unwrap();
    for compressed in [false, true] {
        let img = tmp.path().join(format!("t{compressed}.qcow2"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
        if compressed {
            args.push("-c");
        }
        args.extend([raw.to_str().unwrap(), img.to_str().unwrap()]);
        qemu_img(&args);
        let (out, want) = (tmp.path().join("out.raw"), tmp.path().join("want.raw"));
        check_export(&img, &out, &want, &[]).unwrap();
    }
}

/// Exports through every write path: O_DIRECT with an io_uring on the
/// temp dir's disk and on tmpfs, and plain writes when io_uring is
/// disabled (as in a sandbox), with the sysctl put back afterwards.
#[test]
fn export_without_io_uring_and_onto_tmpfs() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(test_seed(7));
    let img = random_image(tmp.path(), &mut rng, 7);
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    check_export(&img, &shm.path().join("out.raw"), &shm.path().join("want.raw"), &[]).unwrap();

    struct Sysctl(String);
    impl Drop for Sysctl {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/sys/kernel/io_uring_disabled", &self.0);
        }
    }
    let knob = "/proc/sys/kernel/io_uring_disabled";
    let _restore = Sysctl(std::fs::read_to_string(knob).unwrap());
    std::fs::write(knob, "2").unwrap();
    let (out, want) = (tmp.path().join("out.raw"), tmp.path().join("want.raw"));
    check_export(&img, &out, &want, &[]).unwrap();
}

/// A full disk: the export fails in one line naming the output and the
/// reason, and does not hang.
#[test]
fn export_onto_a_full_disk_fails_clearly() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("src.raw");
    gen_data(&raw, 16 << 20, 5);
    let img = tmp.path().join("t.qcow2");
    raw_to_qcow2(&raw, &img);
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    run("mount", &["-t", "tmpfs", "-o", "size=4m", "tmpfs", small.to_str().unwrap()]);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    let out = small.join("out.raw");
    let o = exec(bin(), &[OsStr::new("export"), img.as_os_str(), out.as_os_str()], None, Duration::from_secs(60));
    assert!(!o.success(), "{}", o.describe());
    let line = format!("{}: write failed", out.display());
    assert!(o.stderr.contains(&line) && o.stderr.contains("No space left on device"), "{}", o.describe());
}

/// A HEXZ archive whose size is not a multiple of 4 KiB: the short last
/// block is written plainly beside the O_DIRECT writes.
#[test]
fn export_of_an_odd_sized_hexz_archive() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("src.raw");
    gen_data(&raw, (3 << 20) + 1234, 9);
    // A zero stretch in the middle stays a hole.
    std::fs::OpenOptions::new().write(true).open(&raw).unwrap().write_all_at(&[0u8; 256 << 10], 1 << 20).unwrap();
    let hxz = tmp.path().join("t.hxz");
    let o = exec(
        hexz_bin().to_str().unwrap(),
        &[OsStr::new("pack"), raw.as_os_str(), hxz.as_os_str()],
        None,
        DEFAULT_TIMEOUT,
    );
    assert!(o.success(), "{}", o.describe());
    let out = tmp.path().join("out.raw");
    let o = snapmount(&["export", hxz.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(o.success(), "{}", o.describe());
    files_equal(&out, &raw).unwrap();
    let map = data_map(&out);
    assert!(
        !map.iter().any(|&(d, h)| d < (1 << 20) + (256 << 10) && h > 1 << 20),
        "the zero stretch is a hole: {map:?}"
    );
}
