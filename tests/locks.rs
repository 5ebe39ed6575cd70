//! Images in use: QEMU's image locks, against the real qemu-storage-daemon,
//! qemu-io and qemu-img. snapmount holds a read-only user's locks on every
//! file it reads, refuses images a writer holds, and under --force-share
//! keeps snapshot views exact while a VM writes and never serves a changed
//! current disk.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
use common::*;

/// qemu-storage-daemon serving `img` read-write over NBD on a unix socket,
/// as a VM would hold it (QEMU's write lock taken). Killed on drop.
struct Writer {
    child: Child,
    socket: PathBuf,
}

impl Writer {
    fn start(img: &Path) -> Writer {
        let socket = img.with_extension("sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file,filename={}", img.display()))
            .args(["--blockdev", "driver=qcow2,node-name=fmt,file=file"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .args(["--export", "type=nbd,id=e,node-name=fmt,name=disk,writable=on"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon (qemu-utils)");
        assert!(wait_for(Duration::from_secs(10), || socket.exists()), "qemu-storage-daemon did not come up");
        Writer { child, socket }
    }

    /// Writes through the daemon, as the VM's guest would.
    fn write(&self, cmd: &str) {
        let url = format!("nbd+unix:///disk?socket={}", self.socket.display());
        let o = exec("qemu-io", &["-f", "raw", &url, "-c", cmd], None, DEFAULT_TIMEOUT);
        assert!(o.success() && !o.stdout.contains("failed"), "{}", o.describe());
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qemu-img convert` of the image's state (or of a snapshot) to raw.
fn oracle(img: &Path, snapshot: Option<&str>, out: &Path) {
    let mut args = vec!["convert".to_string(), "-f".into(), "qcow2".into()];
    if let Some(s) = snapshot {
        args.push("-l".into());
        args.push(format!("snapshot.name={s}"));
    }
    args.extend(["-O".into(), "raw".into(), img.display().to_string(), out.display().to_string()]);
    qemu_img(&args);
}

/// `count` writes of up to 128 KiB at random places of the first `mib` MiB.
fn random_writes(img: &Path, mib: u64, seed: u64, count: usize) {
    let mut rng = Rng::new(seed);
    let cmds: Vec<String> = (0..count)
        .map(|_| {
            let at = rng.below(mib * 2048 - 256) * 512;
            format!("write -P {} {at} {}", 1 + rng.below(250), 512 * (1 + rng.below(256)))
        })
        .collect();
    qemu_io(img, &cmds);
}

/// A running writer keeps mount, info and export out, each with one line
/// naming the image and --force-share; with --force-share the snapshots stay
/// exact while the writer writes, and the current disk fails once changed.
#[test]
fn a_writer_keeps_snapmount_out_and_force_share_never_mixes() {
    preflight();
    let seed = test_seed(7);
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("live.qcow2");
    create_qcow2(&img, "16M", "cluster_size=65536", None);
    random_writes(&img, 15, seed, 40);
    qemu_img(&[OsStr::new("snapshot"), OsStr::new("-c"), OsStr::new("s1"), img.as_os_str()]);
    random_writes(&img, 15, seed + 1, 40);
    let (snap_raw, active_raw) = (tmp.path().join("s1.raw"), tmp.path().join("active.raw"));
    oracle(&img, Some("s1"), &snap_raw);
    oracle(&img, None, &active_raw);

    let writer = Writer::start(&img);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let img_s = img.to_str().unwrap();
    for args in [
        vec!["mount", img_s, mnt.to_str().unwrap()],
        vec!["info", img_s],
        vec!["export", img_s, tmp.path().join("out.raw").to_str().unwrap()],
    ] {
        let o = snapmount(&args);
        assert!(!o.success(), "{} must refuse an image a writer holds\n{}", args[0], o.describe());
        let msg = o.stderr.trim();
        assert!(msg.contains(img_s) && msg.contains("\"write\" lock") && msg.contains("--force-share"), "{msg}");
        assert_eq!(msg.lines().count(), 1, "one line: {msg}");
    }
    assert!(!is_mountpoint(&mnt), "nothing mounted");
    assert!(!tmp.path().join("out.raw").exists(), "export wrote nothing");

    let log = tmp.path().join("daemon.log");
    let m = Mount::with_args(&["--force-share", "--log-file", log.to_str().unwrap()], &[&img], &mnt);
    let snap = m.image_dir("live.qcow2").join("snapshots/s1/disk.raw");
    assert_files_equal(&snap, &snap_raw);
    assert_files_equal(&m.disk("live.qcow2"), &active_raw);

    // The VM writes, over what the snapshot and the current disk hold, and
    // beyond the old end of the file (new clusters).
    let mut rng = Rng::new(seed + 2);
    for _ in 0..30 {
        let at = rng.below(16 * 1024 - 64) * 1024;
        writer.write(&format!("write -P {} {at} {}", 1 + rng.below(250), 4096 * (1 + rng.below(16))));
        assert_files_equal(&snap, &snap_raw);
    }
    let err = std::fs::read(m.disk("live.qcow2")).expect_err("a changed current disk must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_files_equal(&snap, &snap_raw);
    drop(m);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("--force-share") && text.contains("changed since it was mounted"), "{text}");
}

/// While snapmount serves an idle image, QEMU cannot open it, its backing
/// file or its data file for writing (QEMU's own lock error); read-only QEMU
/// users still can; after the unmount, writers can again.
#[test]
fn a_mounted_image_keeps_qemu_writers_out() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create_qcow2(&dir.join("base.qcow2"), "8M", "", None);
    qemu_io(&dir.join("base.qcow2"), &["write -P 0x42 0 1M"]);
    create_qcow2(&dir.join("top.qcow2"), "8M", "", Some(("base.qcow2", "qcow2")));
    create_qcow2(&dir.join("ext.qcow2"), "8M", "data_file=ext.data,data_file_raw=on", None);
    let images = [dir.join("top.qcow2"), dir.join("ext.qcow2")];
    let m = Mount::new(&images, &dir.join("mnt"));

    let write = |args: &[&str]| exec("qemu-io", args, Some(dir), DEFAULT_TIMEOUT);
    for (fmt, file) in [("qcow2", "top.qcow2"), ("qcow2", "base.qcow2"), ("qcow2", "ext.qcow2"), ("raw", "ext.data")] {
        let o = write(&["-f", fmt, file, "-c", "write 0 4k"]);
        assert!(!o.success(), "qemu-io wrote to {file} while it was mounted\n{}", o.describe());
        assert!(o.stderr.contains("Failed to get \"write\" lock"), "QEMU's lock error for {file}:\n{}", o.describe());
        // A read-only QEMU user shares with snapmount.
        let o = write(&["-r", "-f", fmt, file, "-c", "read 0 4k"]);
        assert!(o.success(), "{}", o.describe());
    }
    let info = exec("qemu-img", &["info", "top.qcow2"], Some(dir), DEFAULT_TIMEOUT);
    assert!(info.success(), "{}", info.describe());
    // And a second snapmount mount of the same image works beside the first.
    let m2 = Mount::new(&images[..1], &dir.join("mnt2"));
    assert_files_equal(&m2.disk("top.qcow2"), &m.disk("top.qcow2"));
    drop((m, m2));
    for file in ["top.qcow2", "base.qcow2"] {
        let o = write(&["-f", "qcow2", file, "-c", "write 0 4k"]);
        assert!(o.success(), "after the unmount {file} is writable again\n{}", o.describe());
    }
}

/// Under --force-share, deleting a snapshot while it is mounted (its
/// clusters may then be reused) stops that snapshot being served; the other
/// snapshot stays exact.
#[test]
fn force_share_stops_serving_a_deleted_snapshot() {
    preflight();
    let seed = test_seed(7);
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("s.qcow2");
    create_qcow2(&img, "16M", "cluster_size=4096", None);
    random_writes(&img, 15, seed, 20);
    qemu_img(&[OsStr::new("snapshot"), OsStr::new("-c"), OsStr::new("a"), img.as_os_str()]);
    random_writes(&img, 15, seed + 1, 20);
    qemu_img(&[OsStr::new("snapshot"), OsStr::new("-c"), OsStr::new("b"), img.as_os_str()]);
    let b_raw = tmp.path().join("b.raw");
    oracle(&img, Some("b"), &b_raw);

    let m = Mount::with_args(&["--force-share"], &[&img], &tmp.path().join("mnt"));
    let snaps = m.image_dir("s.qcow2").join("snapshots");
    std::fs::read(snaps.join("a/disk.raw")).unwrap();
    qemu_img(&[OsStr::new("snapshot"), OsStr::new("-d"), OsStr::new("a"), img.as_os_str()]);
    random_writes(&img, 15, seed + 2, 20);
    let err = std::fs::read(snaps.join("a/disk.raw")).expect_err("a deleted snapshot must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_files_equal(&snaps.join("b/disk.raw"), &b_raw);
}

/// An image on a block device (a loop device here) under --force-share:
/// writes do not change a device's times, so the current disk is not
/// served at all (EIO); its snapshots are, exactly.
#[test]
fn force_share_on_a_block_device_serves_snapshots_only() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("dev.qcow2");
    create_qcow2(&img, "8M", "cluster_size=4096", None);
    random_writes(&img, 7, test_seed(7), 20);
    qemu_img(&[OsStr::new("snapshot"), OsStr::new("-c"), OsStr::new("s1"), img.as_os_str()]);
    let snap_raw = tmp.path().join("s1.raw");
    oracle(&img, Some("s1"), &snap_raw);
    // A block device holds whole 512-byte sectors: pad the file, as an
    // image written to a device would be.
    let len = std::fs::metadata(&img).unwrap().len();
    File::options().write(true).open(&img).unwrap().set_len(len.div_ceil(512) * 512).unwrap();
    let dev = run("losetup", &[OsStr::new("-f"), OsStr::new("--show"), OsStr::new("-r"), img.as_os_str()]);
    let dev = PathBuf::from(dev.trim());
    struct Detach(PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = exec("losetup", &[OsStr::new("-d"), self.0.as_os_str()], None, DEFAULT_TIMEOUT);
        }
    }
    let _detach = Detach(dev.clone());
    let m = Mount::with_args(&["--force-share"], &[&dev], &tmp.path().join("mnt"));
    let name = dev.file_name().unwrap().to_str().unwrap();
    files_equal(&m.image_dir(name).join("snapshots/s1/disk.raw"), &snap_raw).unwrap();
    let err = std::fs::read(m.disk(name)).expect_err("the current disk of a block device is not served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}
