//! The commands besides `mount`: `info`, `export`, and mount(8)/fstab use.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn snapmount_ok(args: &[&str]) -> String {
    let o = snapmount(args);
    assert!(o.success(), "snapmount failed\n{}", o.describe());
    o.stdout
}

fn image_with_snapshots(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    create_qcow2(&base, "32M", "", None);
    qemu_io(&base, &["write -P 0xb0 0 8M"]);
    let img = dir.join("vm.qcow2");
    create_qcow2(&img, "32M", "compression_type=zstd", Some(("base.qcow2", "qcow2")));
    qemu_io(&img, &["write -P 0x11 1M 1M", "write -c -P 0x12 4M 64k"]);
    qemu_img_in(dir, &["snapshot", "-c", "before upgrade", "vm.qcow2"]);
    qemu_io(&img, &["write -P 0x13 1M 64k", "write -z 4M 64k"]);
    qemu_img_in(dir, &["snapshot", "-c", "after", "vm.qcow2"]);
    img
}

#[test]
fn info_describes_without_mounting() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = image_with_snapshots(tmp.path());
    let text = snapmount_ok(&["info", img.to_str().unwrap()]);
    for want in ["qcow2", "32.0 MiB", "base.qcow2", "before upgrade", "after", "zstd"] {
        assert!(text.contains(want), "info lacks {want:?}:\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&snapmount_ok(&["info", "--json", img.to_str().unwrap()])).unwrap();
    let qemu: serde_json::Value =
        serde_json::from_str(&qemu_img_in(tmp.path(), &["info", "--output=json", "vm.qcow2"])).unwrap();
    assert_eq!(json["virtual_size"], qemu["virtual-size"]);
    assert_eq!(json["cluster_size"], qemu["cluster-size"]);
    let ours: Vec<&str> = json["snapshots"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    let theirs: Vec<&str> = qemu["snapshots"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(ours, theirs);
    let hexz = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hexz/grand.hxz");
    let text = snapmount_ok(&["info", hexz.to_str().unwrap()]);
    assert!(text.contains("hexz") && text.contains("child.hxz") && text.contains("base.hxz"), "{text}");
    let o = snapmount(&["info", "/nonexistent/x.qcow2"]);
    assert!(!o.success() && o.stderr.contains("/nonexistent/x.qcow2"), "{}", o.describe());
    assert_eq!(o.stderr.matches("No such file").count(), 1, "the reason once: {}", o.stderr);
}

/// The mount shows as fuse.snapmount, and a loop mount, reads and an
/// unmount leave nothing in the daemon's log a person would have to act on.
#[test]
fn mount_type_and_a_quiet_log() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let ext4 = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hexz/ext4.hxz");
    let log = tmp.path().join("daemon.log");
    let mnt = tmp.path().join("mnt");
    let m = Mount::with_args(&["--log-file", log.to_str().unwrap()], &[&ext4], &mnt);
    let fstype = mounts().into_iter().find(|(mp, _, _)| Path::new(mp) == m.dir).map(|(_, t, _)| t);
    assert_eq!(fstype.as_deref(), Some("fuse.snapmount"), "type in /proc/self/mountinfo");
    {
        let lm = LoopMount::new(&m.disk("ext4.hxz"), &tmp.path().join("loop"));
        assert_eq!(std::fs::read_to_string(lm.dir.join("etc/motd")).unwrap(), "Welcome to the fixture VM\n");
    }
    let o = snapmount(&[OsStr::new("umount"), m.dir.as_os_str()]);
    assert!(o.success(), "{}", o.describe());
    assert!(wait_for(Duration::from_secs(10), || pids_mentioning(&mnt).is_empty()), "the daemon exits");
    let text = std::fs::read_to_string(&log).unwrap();
    let noisy: Vec<&str> = text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    assert!(noisy.is_empty(), "log lines with nothing to act on:\n{}", noisy.join("\n"));
}

#[test]
fn export_writes_sparse_raw_files_that_match_qemu() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = image_with_snapshots(tmp.path());
    let out = tmp.path().join("current.raw");
    snapmount_ok(&["export", img.to_str().unwrap(), out.to_str().unwrap()]);
    let exp = tmp.path().join("expected.raw");
    oracle_raw(&img, &exp);
    assert_files_equal(&out, &exp);
    assert!(std::fs::metadata(&out).unwrap().blocks() * 512 < 12 << 20, "the export is sparse");
    // A snapshot, by name and by ID.
    for (sel, id) in [("before upgrade", "1"), ("2", "2")] {
        let snap_out = tmp.path().join(format!("snap-{id}.raw"));
        snapmount_ok(&["export", &format!("{}@{sel}", img.display()), snap_out.to_str().unwrap()]);
        let copy = tmp.path().join("copy.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        qemu_img_in(tmp.path(), &["snapshot", "-a", id, "copy.qcow2"]);
        let want = tmp.path().join(format!("want-{id}.raw"));
        oracle_raw(&copy, &want);
        assert_files_equal(&snap_out, &want);
    }
    let o = snapmount(&["export", &format!("{}@nope", img.display()), "/tmp/never.raw"]);
    assert!(!o.success() && o.stderr.contains("no snapshot 'nope'"), "{}", o.describe());
    // A HEXZ archive exports to the bytes that were packed.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hexz");
    let out = tmp.path().join("hexz.raw");
    snapmount_ok(&["export", fixtures.join("grand.hxz").to_str().unwrap(), out.to_str().unwrap()]);
    let sums = std::fs::read_to_string(fixtures.join("SHA256SUMS")).unwrap();
    let want = sums.lines().find(|l| l.ends_with("  grand.hxz/disk.raw")).unwrap().split_once("  ").unwrap().0;
    let got = run("sha256sum", &[out.to_str().unwrap()]);
    assert!(got.starts_with(want), "{got} vs {want}");
}

/// Removes the mount helper link on drop (only if this test made it).
struct HelperLink(Option<PathBuf>);

impl Drop for HelperLink {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[test]
fn mount_8_and_fstab() {
    preflight();
    let helper = PathBuf::from("/sbin/mount.fuse.snapmount");
    let _link = if helper.exists() {
        HelperLink(None)
    } else {
        std::os::unix::fs::symlink(bin(), &helper).expect("make the mount helper link (needs root)");
        HelperLink(Some(helper))
    };
    let tmp = tempfile::tempdir().unwrap();
    let img = image_with_snapshots(tmp.path());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let guard = MountGuard(mnt.clone());
    let o = exec(
        "mount",
        &[
            OsStr::new("-t"),
            OsStr::new("fuse.snapmount"),
            img.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("-o"),
            OsStr::new("cache_size=64M,allow_other,uid=4321,gid=8765,umask=027"),
        ],
        None,
        Duration::from_secs(60),
    );
    assert!(o.success(), "mount -t fuse.snapmount failed\n{}", o.describe());
    let meta = std::fs::metadata(mnt.join("vm.qcow2/disk.raw")).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (4321, 8765, 0o440));
    let exp = tmp.path().join("exp.raw");
    oracle_raw(&img, &exp);
    assert_files_equal(&mnt.join("vm.qcow2/disk.raw"), &exp);
    assert!(is_mountpoint(&mnt), "listed in mountinfo");
    run("umount", &[mnt.to_str().unwrap()]);
    assert!(!is_mountpoint(&mnt));

    // The same as an fstab line, mounted by its mountpoint alone.
    let fstab = tmp.path().join("fstab");
    std::fs::write(
        &fstab,
        format!("{} {} fuse.snapmount ro,noauto,allow_other,cache_size=32M 0 0\n", img.display(), mnt.display()),
    )
    .unwrap();
    run("mount", &["--fstab", fstab.to_str().unwrap(), mnt.to_str().unwrap()]);
    assert_files_equal(&mnt.join("vm.qcow2/disk.raw"), &exp);
    assert!(mnt.join("vm.qcow2/snapshots/before upgrade/disk.raw").exists());
    run("umount", &[mnt.to_str().unwrap()]);
    drop(guard);

    // Unknown options are refused with a message, nothing mounted.
    let o =
        snapmount(&[OsStr::new("mount"), OsStr::new("-o"), OsStr::new("bogus=1"), img.as_os_str(), mnt.as_os_str()]);
    assert!(!o.success() && o.stderr.contains("unknown mount option 'bogus=1'"), "{}", o.describe());
    assert!(!is_mountpoint(&mnt));
}

struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        force_unmount(&self.0);
    }
}

/// The kernel's read-ahead for a mount is raised past the 128 KiB it sets
/// from FUSE's INIT (root may write its bdi knob): buffered sequential
/// readers then keep several requests in flight.
#[test]
fn the_mount_reads_ahead_4_mib() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = image_with_snapshots(tmp.path());
    let mnt = tmp.path().join("mnt");
    let m = Mount::new(&[&img], &mnt);
    let dev = std::fs::metadata(&m.dir).unwrap().dev();
    let knob = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    // Set by a thread of the daemon right after the mount went live.
    let raised = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&knob).map(|v| v.trim() == "4096").unwrap_or(false)
    });
    assert!(raised, "{knob}: {:?}", std::fs::read_to_string(&knob));
}
