//! Confinement: root mounts images that other users own, with --allow-other,
//! and nobody reads through the mount what they could not read without it.
//!
//! "Other users" are uids that own nothing on this machine (4242, 4343); the
//! tests read through the mount as them with `setpriv` (util-linux), so the
//! kernel's own permission check (default_permissions) is the oracle.

mod common;

use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

const USER: u32 = 4242;
const STRANGER: u32 = 4343;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn give(p: &Path, uid: u32) {
    chown(p, Some(uid), Some(uid)).unwrap();
}

/// A scratch tree that other uids can walk (tempdir makes it 0700).
fn scratch() -> (tempfile::TempDir, PathBuf) {
    preflight();
    assert_eq!(unsafe { libc::geteuid() }, 0, "the confinement tests mount as root");
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let dir = tmp.path().join("w");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o755);
    (tmp, dir)
}

/// Reads `path` as `uid` (with that gid and no other groups): the bytes, or
/// the error `cat` printed.
fn read_as(uid: u32, path: &Path) -> Result<Vec<u8>, String> {
    let out = std::process::Command::new("setpriv")
        .args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into(), "cat".into()])
        .arg(path)
        .output()
        .expect("setpriv runs");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A root-only file of random bytes: what must never leak.
fn secret(dir: &Path) -> PathBuf {
    let p = dir.join("secret.bin");
    gen_data(&p, 64 * KIB, 7);
    chmod(&p, 0o600);
    p
}

/// `snapmount mount --allow-other EXTRA... SOURCE MNT` must fail; returns stderr.
fn refused(extra: &[&str], source: &Path, mnt: &Path) -> String {
    std::fs::create_dir_all(mnt).unwrap();
    let mut args: Vec<&std::ffi::OsStr> = vec!["mount".as_ref(), "--allow-other".as_ref()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.push(source.as_os_str());
    args.push(mnt.as_os_str());
    let o = snapmount(&args);
    let mounted = is_mountpoint(mnt);
    if mounted {
        force_unmount(mnt);
    }
    assert!(!o.success() && !mounted, "mount of {} should be refused\n{}", source.display(), o.describe());
    assert_eq!(o.stderr.trim().lines().count(), 1, "one line:\n{}", o.stderr);
    o.stderr
}

#[test]
fn a_user_image_cannot_name_a_root_only_backing_or_data_file() {
    let (tmp, dir) = scratch();
    let secret = secret(&dir);
    let mnt = tmp.path().join("mnt");
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // By absolute name, as a raw backing file.
    let abs = dir.join("abs.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &s(&secret), "-F", "raw", &s(&abs), "64K"]);
    // By a relative name through `..`.
    std::fs::create_dir(dir.join("sub")).unwrap();
    chmod(&dir.join("sub"), 0o755);
    let rel = dir.join("sub/rel.qcow2");
    qemu_img_in(
        &dir.join("sub"),
        &["create", "-q", "-f", "qcow2", "-b", "../secret.bin", "-F", "raw", "rel.qcow2", "64K"],
    );
    // Through a symlink the user made.
    symlink(&secret, dir.join("innocent.raw")).unwrap();
    let link = dir.join("link.qcow2");
    qemu_img_in(&dir, &["create", "-q", "-f", "qcow2", "-b", "innocent.raw", "-F", "raw", "link.qcow2", "64K"]);
    // As an external data file, through a symlink swapped in after creation.
    let data = dir.join("data.qcow2");
    qemu_img_in(
        &dir,
        &["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on", "data.qcow2", "64K"],
    );
    std::fs::remove_file(dir.join("data.raw")).unwrap();
    symlink(&secret, dir.join("data.raw")).unwrap();

    for (img, named) in [(&abs, "secret.bin"), (&rel, "../secret.bin"), (&link, "innocent.raw"), (&data, "data.raw")] {
        give(img, USER);
        let err = refused(&[], img, &mnt);
        let img_name = img.file_name().unwrap().to_str().unwrap();
        for word in [img_name, named, "--trust-backing", "uid 4242"] {
            assert!(err.contains(word), "refusal of {img_name} lacks '{word}': {err}");
        }
        // info and export apply the same rule.
        let o = snapmount(&[std::ffi::OsStr::new("info"), img.as_os_str()]);
        assert!(!o.success() && o.stderr.contains("--trust-backing"), "info: {}", o.describe());
        let out = tmp.path().join("out.raw");
        let o = snapmount(&[std::ffi::OsStr::new("export"), img.as_os_str(), out.as_os_str()]);
        assert!(!o.success() && o.stderr.contains("--trust-backing"), "export: {}", o.describe());
    }

    // --trust-backing opens it; the served bits still keep the secret from
    // the image's owner and everyone else, while root reads the oracle.
    let m = Mount::with_args(&["--allow-other", "--trust-backing"], &[&abs], &mnt);
    m.assert_matches(&abs, tmp.path());
    let err = read_as(USER, &m.disk("abs.qcow2")).expect_err("the owner must not read a root-only backing file");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(read_as(STRANGER, &m.disk("abs.qcow2")).is_err());
}

#[test]
fn a_user_image_may_name_files_its_owner_can_read() {
    let (tmp, dir) = scratch();
    let base = dir.join("base.qcow2");
    create_qcow2(&base, "1M", "cluster_size=4096", None);
    qemu_io(&base, &["write -P 0x5a 0 256k"]);
    let top = dir.join("top.qcow2");
    qemu_img_in(&dir, &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "1M"]);
    qemu_io(&top, &["write -P 0xa5 128k 64k"]);
    chmod(&base, 0o644); // root's, readable by all
    chmod(&top, 0o640);
    give(&top, USER);

    let mnt = tmp.path().join("mnt");
    let m = Mount::with_args(&["--allow-other"], &[&top], &mnt);
    m.assert_matches(&top, tmp.path());
    let meta = std::fs::metadata(m.disk("top.qcow2")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (USER, USER, 0o440),
        "the image's owner, group, read bits"
    );
    let dir_meta = std::fs::metadata(m.image_dir("top.qcow2")).unwrap();
    assert_eq!(dir_meta.mode() & 0o7777, 0o550);
    let backing = m.image_dir("top.qcow2").join("backing/1-base.qcow2/disk.raw");
    assert_eq!(std::fs::metadata(&backing).unwrap().mode() & 0o777, 0o440, "backing views inherit from their image");
    let got = read_as(USER, &m.disk("top.qcow2")).unwrap();
    assert_eq!(got, std::fs::read(m.disk("top.qcow2")).unwrap(), "the owner reads what root reads");
    assert!(read_as(STRANGER, &m.disk("top.qcow2")).is_err(), "0640: others may not read");
    assert!(read_as(STRANGER, &backing).is_err());
    drop(m);

    // A name that leads through a directory the owner cannot search.
    let private = dir.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::rename(&base, private.join("base.qcow2")).unwrap();
    chmod(&private, 0o700);
    let hidden = dir.join("hidden.qcow2");
    qemu_img_in(
        &dir,
        &["create", "-q", "-f", "qcow2", "-b", "private/base.qcow2", "-F", "qcow2", "-u", "hidden.qcow2", "1M"],
    );
    give(&hidden, USER);
    let err = refused(&[], &hidden, &mnt);
    assert!(err.contains("no search permission") && err.contains("private"), "{err}");
}

#[test]
fn a_private_image_stays_private_and_the_overrides_still_apply() {
    let (tmp, dir) = scratch();
    let img = dir.join("private.qcow2");
    create_qcow2(&img, "1M", "cluster_size=4096", None);
    qemu_io(&img, &["write -P 0x11 0 64k"]);
    chmod(&img, 0o600);
    let open = dir.join("open.qcow2");
    create_qcow2(&open, "1M", "cluster_size=4096", None);
    qemu_io(&open, &["write -P 0x22 0 64k"]);
    chmod(&open, 0o644);

    let m = Mount::with_args(&["--allow-other"], &[&img, &open], &tmp.path().join("mnt"));
    for path in [m.disk("private.qcow2"), m.image_dir("private.qcow2").join("info.json")] {
        let err = read_as(STRANGER, &path).expect_err("a 0600 image is not readable by others through the mount");
        assert!(err.contains("Permission denied"), "{err}");
    }
    assert_eq!(read_as(STRANGER, &m.disk("open.qcow2")).unwrap(), std::fs::read(m.disk("open.qcow2")).unwrap());
    drop(m);

    // --uid/--gid/--umask override what the image says.
    let m = Mount::with_args(
        &["--allow-other", "--uid", &STRANGER.to_string(), "--gid", "0", "--umask", "027"],
        &[&img],
        &tmp.path().join("mnt2"),
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(m.disk("private.qcow2")).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (STRANGER, 0, 0o400));
    assert!(read_as(STRANGER, &m.disk("private.qcow2")).is_ok());
}

#[test]
fn a_user_archive_cannot_name_a_root_only_parent() {
    let (tmp, dir) = scratch();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hexz");
    for f in ["base.hxz", "child.hxz"] {
        std::fs::copy(fixtures.join(f), dir.join(f)).unwrap();
    }
    chmod(&dir.join("base.hxz"), 0o600);
    give(&dir.join("child.hxz"), USER);
    let err = refused(&[], &dir.join("child.hxz"), &tmp.path().join("mnt"));
    for word in ["child.hxz", "base.hxz", "parent archive", "--trust-backing"] {
        assert!(err.contains(word), "refusal lacks '{word}': {err}");
    }
    // Readable by its owner: fine, and served with the archive's owner.
    chmod(&dir.join("base.hxz"), 0o644);
    let m = Mount::with_args(&["--allow-other"], &[&dir.join("child.hxz")], &tmp.path().join("mnt"));
    assert!(read_as(USER, &m.disk("child.hxz")).is_ok());
    assert!(read_as(USER, &m.image_dir("child.hxz").join("info.json")).is_ok());
}
