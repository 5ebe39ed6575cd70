//! Faults while serving: an image truncated under a live mount, storage that
//! returns read errors, a daemon killed under load, and many threads reading
//! every kind of view through a small cache. The oracle is qemu-img (and,
//! for HEXZ, the sums hexz-cli's fixtures were made with).

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyEntry, ReplyOpen, Request,
};

mod common;
use common::*;

/// An image of `size` MiB with random data everywhere (64 KiB clusters).
fn full_image(dir: &Path, name: &str, mib: u64, seed: u64) -> PathBuf {
    let src = dir.join(format!("{name}.src"));
    gen_data(&src, mib * MIB, seed);
    let img = dir.join(name);
    raw_to_qcow2(&src, &img);
    img
}

/// Where guest offset `guest` of `img` is stored in the file (qemu-img map).
fn host_offset(img: &Path, guest: u64) -> u64 {
    let map: serde_json::Value =
        serde_json::from_str(&qemu_img(&[OsStr::new("map"), OsStr::new("--output=json"), img.as_os_str()])).unwrap();
    let e = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["start"].as_u64().unwrap() <= guest
                && guest < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap()
        })
        .expect("guest offset mapped");
    e["offset"].as_u64().expect("stored in the file") + guest - e["start"].as_u64().unwrap()
}

fn pread(path: &Path, len: usize, at: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    File::open(path)?.read_exact_at(&mut buf, at)?;
    Ok(buf)
}

/// `pread` around the page cache (O_DIRECT): every read reaches the daemon.
fn pread_direct(path: &Path, len: usize, at: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut buf = vec![0u8; len];
    File::options().read(true).custom_flags(libc::O_DIRECT).open(path)?.read_exact_at(&mut buf, at)?;
    Ok(buf)
}

fn sha256(path: &Path) -> String {
    run("sha256sum", &[path]).split_whitespace().next().unwrap().to_string()
}

/// The image file shrinks under a live mount: reads that reach the lost part
/// fail with EIO (never zeros: those would be a silent lie) and are logged
/// with the file; reads of what is left, and of other images, keep working.
#[test]
fn an_image_truncated_under_a_live_mount_fails_only_the_lost_reads() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = full_image(tmp.path(), "t.qcow2", 8, test_seed(11));
    let other = full_image(tmp.path(), "other.qcow2", 2, test_seed(11) + 1);
    let expected = tmp.path().join("t.raw");
    oracle_raw(&img, &expected);
    let expected = std::fs::read(&expected).unwrap();
    let log = tmp.path().join("daemon.log");
    let m = Mount::with_args(&["--log-file", log.to_str().unwrap()], &[&img, &other], &tmp.path().join("mnt"));
    let disk = m.disk("t.qcow2");
    assert_eq!(pread(&disk, 4096, 0).unwrap(), expected[..4096]);
    // Large reads of data in the host's page cache are answered from a
    // mapping of the image (small ones are copied): both kinds, before and
    // after, around the mount's own page cache.
    let (at, big) = (6 * MIB as usize, MIB as usize);
    assert_eq!(pread_direct(&disk, big, at as u64).unwrap(), expected[at..at + big]);

    // Cut the file where guest 4 MiB is stored: what lies before stays.
    let cut = host_offset(&img, 4 * MIB);
    File::options().write(true).open(&img).unwrap().set_len(cut).unwrap();
    for len in [4096, big] {
        let err = pread_direct(&disk, len, at as u64).expect_err("a read of the lost part must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{len} bytes: {err}");
    }
    assert_eq!(pread(&disk, 65536, MIB).unwrap(), expected[MIB as usize..MIB as usize + 65536], "the rest reads");
    assert_eq!(pread_direct(&disk, big, MIB).unwrap(), expected[MIB as usize..MIB as usize + big], "the rest reads");
    m.assert_matches(&other, tmp.path());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&img.display().to_string()) && text.contains("truncated"), "{text}");
}

/// A single file on a FUSE filesystem of the test's own that fails reads
/// touching chosen byte ranges with EIO: real read errors from the kernel,
/// as a failing disk gives them (this kernel has no device-mapper for an
/// `error` target).
struct FaultyFs {
    file: File,
    bad: Arc<Mutex<Vec<(u64, u64)>>>,
}

const FAULTY_NAME: &str = "image.qcow2";

impl FaultyFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let meta = self.file.metadata().unwrap();
        let dir = ino == 1;
        FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { meta.len() },
            blocks: 0,
            atime: meta.modified().unwrap(),
            mtime: meta.modified().unwrap(),
            ctime: meta.modified().unwrap(),
            crtime: meta.modified().unwrap(),
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm: if dir { 0o755 } else { 0o644 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for FaultyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == FAULTY_NAME {
            reply.entry(&Duration::ZERO, &self.attr(2), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&Duration::ZERO, &self.attr(ino.0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = offset + size as u64;
        if self.bad.lock().unwrap().iter().any(|&(a, b)| offset < b && a < end) {
            return reply.error(Errno::EIO);
        }
        let mut buf = vec![0u8; size as usize];
        let n = self.file.read_at(&mut buf, offset).unwrap();
        reply.data(&buf[..n]);
    }
}

/// Reads that meet a storage error fail with EIO, logged with the image and
/// the offset; every other read, and the same read once the storage heals,
/// returns the right bytes (a failure is never cached).
#[test]
fn storage_read_errors_fail_only_the_reads_that_meet_them() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = full_image(tmp.path(), "real.qcow2", 8, test_seed(11));
    let expected = tmp.path().join("real.raw");
    oracle_raw(&img, &expected);
    let expected = std::fs::read(&expected).unwrap();

    let bad = Arc::new(Mutex::new(Vec::new()));
    let under = tmp.path().join("under");
    std::fs::create_dir(&under).unwrap();
    let fs = FaultyFs { file: File::open(&img).unwrap(), bad: bad.clone() };
    let mut config = fuser::Config::default();
    config.mount_options = vec![fuser::MountOption::RO, fuser::MountOption::FSName("faulty".into())];
    let session = fuser::Session::new(fs, &under, &config).unwrap().spawn().unwrap();

    let log = tmp.path().join("daemon.log");
    let m =
        Mount::with_args(&["--log-file", log.to_str().unwrap()], &[under.join(FAULTY_NAME)], &tmp.path().join("mnt"));
    let disk = m.disk(FAULTY_NAME);
    let guest = 4 * MIB + 8192;
    let host = host_offset(&img, guest);
    bad.lock().unwrap().push((host, host + 512));

    let err = pread(&disk, 4096, guest).expect_err("a read over a bad sector must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    for at in [0, 2 * MIB, guest + 65536, 8 * MIB - 4096] {
        assert_eq!(pread(&disk, 4096, at).unwrap(), expected[at as usize..at as usize + 4096], "read at {at:#x}");
    }
    bad.lock().unwrap().clear();
    assert_eq!(pread(&disk, 4096, guest).unwrap(), expected[guest as usize..guest as usize + 4096], "healed");
    drop(m);
    drop(session);
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text.lines().find(|l| l.contains("Input/output error")).unwrap_or_else(|| panic!("logged: {text}"));
    assert!(line.contains(FAULTY_NAME) && line.contains(&format!("{guest:#x}")), "image and offset: {line}");
}

/// SIGKILL under load: readers see errors, never wrong bytes; then
/// `snapmount umount` clears the dead mount, a fresh mount serves the same
/// bytes, and the image was never written (same bytes, same mtime).
#[test]
fn a_daemon_killed_under_load_recovers_with_umount_and_remount() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = full_image(tmp.path(), "k.qcow2", 16, test_seed(11));
    let expected = tmp.path().join("k.raw");
    oracle_raw(&img, &expected);
    let expected = Arc::new(std::fs::read(&expected).unwrap());
    let (sum, mtime) = (sha256(&img), std::fs::metadata(&img).unwrap().mtime_nsec());
    let mnt = tmp.path().join("mnt");
    let m = Mount::new(&[&img], &mnt);
    let disk = m.disk("k.qcow2");

    let readers: Vec<_> = (0..4u64)
        .map(|t| {
            let (disk, expected) = (disk.clone(), expected.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(test_seed(11) * 100 + t);
                for _ in 0..100_000 {
                    let len = rng.range(1, 256 * 1024);
                    let at = rng.below(expected.len() as u64 - len);
                    match pread(&disk, len as usize, at) {
                        Ok(got) => {
                            assert!(got[..] == expected[at as usize..(at + len) as usize], "wrong bytes at {at}")
                        }
                        Err(_) => return,
                    }
                }
                panic!("the reads never failed: was the daemon killed?");
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let pids = pids_mentioning(&m.dir);
    assert_eq!(pids.len(), 1, "one daemon: {pids:?}");
    // SAFETY: killing our own test daemon.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    for r in readers {
        r.join().expect("a reader saw wrong bytes");
    }
    assert!(is_mountpoint(&m.dir), "a killed daemon leaves its mount behind");
    let o = snapmount(&[OsStr::new("umount"), m.dir.as_os_str()]);
    assert!(o.success(), "{}", o.describe());
    assert!(!is_mountpoint(&m.dir), "umount clears a dead mount");
    drop(m);
    let m = Mount::new(&[&img], &mnt);
    assert_files_equal(&m.disk("k.qcow2"), &tmp.path().join("k.raw"));
    drop(m);
    assert_eq!((sha256(&img), std::fs::metadata(&img).unwrap().mtime_nsec()), (sum, mtime), "never written");
}

/// 16 threads of random reads over every kind of view at once (a current
/// disk over a two-level backing chain, its internal snapshots and VM state,
/// each backing layer, a raw base, HEXZ archives and a thin HEXZ chain)
/// through a 16 MiB cache, each compared with its oracle.
#[test]
fn sixteen_threads_over_every_kind_of_view_through_a_small_cache() {
    preflight();
    let seed = test_seed(11);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    gen_data(&dir.join("base.raw"), 24 * MIB, seed);
    create_qcow2(&dir.join("mid.qcow2"), "32M", "cluster_size=4096", Some(("base.raw", "raw")));
    let mut rng = Rng::new(seed);
    // Compressed writes only go to clusters not yet written (QEMU's rule).
    let writes = |rng: &mut Rng, n: usize, compressed: bool| -> Vec<String> {
        let mut clusters: Vec<u64> = (0..n).map(|_| rng.below(31 * 16)).collect();
        if compressed {
            clusters.sort();
            clusters.dedup();
        }
        let c = if compressed { "-c " } else { "" };
        clusters.iter().map(|k| format!("write {c}-P {} {} 65536", 1 + rng.below(250), k * 65536)).collect()
    };
    qemu_io(&dir.join("mid.qcow2"), &writes(&mut rng, 60, false));
    create_qcow2(
        &dir.join("top.qcow2"),
        "32M",
        "cluster_size=65536,compression_type=zstd",
        Some(("mid.qcow2", "qcow2")),
    );
    let top = dir.join("top.qcow2");
    qemu_io(&top, &writes(&mut rng, 40, true));
    qemu_img(&[OsStr::new("snapshot"), OsStr::new("-c"), OsStr::new("one"), top.as_os_str()]);
    qemu_io(&top, &writes(&mut rng, 40, false));
    qemu_img(&[OsStr::new("snapshot"), OsStr::new("-c"), OsStr::new("two"), top.as_os_str()]);
    qemu_io(&top, &writes(&mut rng, 40, false));

    // The oracle of every qcow2 view, by qemu-img.
    let mut views: Vec<(String, PathBuf)> = Vec::new();
    let convert = |args: &[&str], out: &str| {
        let out = dir.join(out);
        let mut a: Vec<&str> = vec!["convert"];
        a.extend(args);
        a.extend(["-O", "raw", out.to_str().unwrap()]);
        qemu_img_in(dir, &a);
        out
    };
    views.push(("top.qcow2/disk.raw".into(), convert(&["top.qcow2"], "top.exp")));
    for s in ["one", "two"] {
        let exp = convert(&["-l", &format!("snapshot.name={s}"), "top.qcow2"], &format!("{s}.exp"));
        views.push((format!("top.qcow2/snapshots/{s}/disk.raw"), exp));
    }
    views.push(("top.qcow2/backing/1-mid.qcow2/disk.raw".into(), convert(&["mid.qcow2"], "mid.exp")));
    let base_exp = dir.join("base.exp");
    std::fs::copy(dir.join("base.raw"), &base_exp).unwrap();
    views.push(("top.qcow2/backing/2-base.raw/disk.raw".into(), base_exp));
    // HEXZ: the fixtures, whose views' sums hexz-cli's packing recorded.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hexz");
    let sums = std::fs::read_to_string(fixtures.join("SHA256SUMS")).unwrap();
    let hexz_views = ["zstd.hxz/disk.raw", "grand.hxz/disk.raw", "grand.hxz/backing/1-child.hxz/disk.raw"];
    let sources = [top.clone(), fixtures.join("zstd.hxz"), fixtures.join("grand.hxz")];
    let m = Mount::with_args(&["--cache-size", "16M"], &sources, &dir.join("mnt"));
    for v in hexz_views {
        let want = sums.lines().find(|l| l.ends_with(&format!("  {v}"))).unwrap().split_whitespace().next().unwrap();
        let copy = dir.join(v.replace('/', "_"));
        std::fs::copy(m.dir.join(v), &copy).unwrap();
        assert_eq!(sha256(&copy), want, "{v}: the sum hexz-cli's fixture recorded");
        views.push((v.to_string(), copy));
    }
    let snaps = std::fs::read_dir(m.image_dir("top.qcow2").join("snapshots")).unwrap().count();
    assert_eq!(snaps, 2, "both snapshots are served");
    // The threads read around the page cache, so that every read reaches
    // the daemon and its 16 MiB cache.
    let views: Arc<Vec<(PathBuf, Vec<u8>)>> =
        Arc::new(views.into_iter().map(|(v, exp)| (m.dir.join(v), std::fs::read(exp).unwrap())).collect());
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let views = views.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed * 1000 + t);
                for _ in 0..200 {
                    let (path, exp) = &views[rng.below(views.len() as u64) as usize];
                    let len = rng.range(1, 300 * 1024).min(exp.len() as u64);
                    let at = rng.below(exp.len() as u64 - len + 1);
                    let got =
                        pread_direct(path, len as usize, at).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    if got[..] != exp[at as usize..(at + len) as usize] {
                        panic!("thread {t}: {} differs in {len} bytes at {at}", path.display());
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a reader saw wrong bytes");
    }
}
