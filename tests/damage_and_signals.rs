//! Cases found in review: damage that must not spread, and signals that
//! must unmount even while files are open.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use common::*;

/// Host offset of the L2 table for guest offset 0 (64 KiB clusters).
fn first_l2(img: &Path) -> u64 {
    let l1 = read_be64(img, 40);
    read_be64(img, l1) & 0x00ff_ffff_ffff_fe00
}

#[test]
fn damage_elsewhere_never_makes_st_blocks_zero() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.qcow2");
    create_qcow2(&img, "16M", "", None);
    qemu_io(&img, &["write -P 0x61 0 8M"]);
    // Cluster 200 (12.5 MiB, never written) gets an unaligned offset.
    write_be64(&img, first_l2(&img) + 200 * 8, 0x8000_0000_0005_0200);
    let m = Mount::new(&[&img], &tmp.path().join("mnt"));
    let meta = std::fs::metadata(m.disk("d.qcow2")).unwrap();
    assert!(meta.blocks() * 512 >= 8 << 20, "st_blocks {} must count at least the 8 MiB of data", meta.blocks());
    let f = std::fs::File::open(m.disk("d.qcow2")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x61));
    assert_eq!(f.read_at(&mut buf, 200 << 16).unwrap_err().raw_os_error(), Some(libc::EIO));
}

#[test]
fn one_bad_snapshot_fails_only_its_own_view() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("s.qcow2");
    create_qcow2(&img, "8M", "", None);
    qemu_io(&img, &["write -P 0x11 0 1M"]);
    qemu_img_in(tmp.path(), &["snapshot", "-c", "a", "s.qcow2"]);
    qemu_io(&img, &["write -P 0x22 0 1M"]);
    qemu_img_in(tmp.path(), &["snapshot", "-c", "b", "s.qcow2"]);
    // Snapshot a's L1 table offset moves off its cluster boundary.
    let table = read_be64(&img, 64);
    let l1 = read_be64(&img, table);
    write_be64(&img, table, l1 + 512);
    let m = Mount::new(&[&img], &tmp.path().join("mnt"));
    let snaps = m.image_dir("s.qcow2").join("snapshots");
    let mut buf = vec![0u8; 4096];
    let a = std::fs::File::open(snaps.join("a/disk.raw")).unwrap();
    assert_eq!(a.read_at(&mut buf, 0).unwrap_err().raw_os_error(), Some(libc::EIO));
    let b = std::fs::File::open(snaps.join("b/disk.raw")).unwrap();
    b.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0x22), "snapshot b still reads");
    m.assert_matches(&img, &tmp.path().join("scratch"));
}

#[test]
fn a_zero_entry_without_offset_in_a_data_file_image_reads_as_zeros() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("x.qcow2");
    create_qcow2(&img, "4M", "data_file=x.data", None);
    qemu_io(&img, &["write -P 0x5a 0 64k", "write -P 0x5b 2M 64k"]);
    // Guest cluster 16 (1 MiB): COPIED | zero flag, no offset (QEMU: ZERO_PLAIN).
    write_be64(&img, first_l2(&img) + 16 * 8, 0x8000_0000_0000_0001);
    let m = Mount::new(&[&img], &tmp.path().join("mnt"));
    m.assert_matches(&img, &tmp.path().join("scratch"));
}

#[test]
fn extended_l2_below_16k_clusters_is_refused_as_qemu_does() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("e.qcow2");
    create_qcow2(&img, "4M", "cluster_size=4k", None);
    or_byte(&img, 79, 0x10);
    let o = snapmount(&[std::ffi::OsStr::new("info"), img.as_os_str()]);
    assert!(!o.success() && o.stderr.contains("e.qcow2") && o.stderr.contains("extended L2"), "{}", o.describe());
}

#[test]
fn sigterm_unmounts_even_with_a_file_open() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("t.qcow2");
    create_qcow2(&img, "4M", "", None);
    let mnt = tmp.path().join("mnt");
    let m = Mount::new(&[&img], &mnt);
    let held = std::fs::File::open(m.disk("t.qcow2")).unwrap();
    let pids = pids_mentioning(&m.dir);
    assert_eq!(pids.len(), 1, "one daemon: {pids:?}");
    // SAFETY: signalling our own test daemon.
    unsafe { libc::kill(pids[0], libc::SIGTERM) };
    assert!(wait_for(Duration::from_secs(10), || !is_mountpoint(&m.dir)), "the mount must go away on SIGTERM");
    drop(held);
    assert!(
        wait_for(Duration::from_secs(10), || pids_mentioning(&m.dir).is_empty()),
        "the daemon must exit once the last file is closed"
    );
}

#[test]
fn umount_refuses_what_snapmount_did_not_mount() {
    let o = snapmount(&["umount", "/"]);
    assert!(!o.success() && o.stderr.contains("not a snapmount mount"), "{}", o.describe());
}
