//! Partitions as files. sfdisk writes GPT and MBR tables (with logical
//! partitions) into raw disks, mkfs fills partitions through `losetup -o
//! --sizelimit`, and the disks become compressed qcow2 images (with a
//! snapshot taken before the table and contents change, and an overlay) and
//! HEXZ archives. Every `partitions/N.raw` must equal the byte range that
//! `sfdisk --json` gives on the oracle's raw disk, and loop-mount.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

mod common;
use common::*;

/// (number, start, size) in bytes of each partition of a raw disk, as
/// util-linux's sfdisk reports them (the extended container left out, as
/// the kernel serves it as a 1 KiB stub and snapmount not at all).
fn sfdisk_partitions(raw: &Path) -> Vec<(u32, u64, u64)> {
    let json: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &[OsStr::new("--json"), raw.as_os_str()])).unwrap();
    let table = &json["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    let node = raw.to_str().unwrap();
    table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !["5", "f", "85"].contains(&p["type"].as_str().unwrap_or("")))
        .map(|p| {
            let n = p["node"].as_str().unwrap().strip_prefix(node).unwrap().parse().unwrap();
            (n, p["start"].as_u64().unwrap() * sector, p["size"].as_u64().unwrap() * sector)
        })
        .collect()
}

/// Compares every partition file of the disk view in `view_dir` with the
/// ranges of the oracle raw disk `raw`, and checks info.json lists them.
fn check_partitions(view_dir: &Path, info: &serde_json::Value, raw: &Path) {
    let want = sfdisk_partitions(raw);
    assert!(!want.is_empty(), "{} has partitions", raw.display());
    let mut names: Vec<String> = std::fs::read_dir(view_dir.join("partitions"))
        .unwrap_or_else(|e| panic!("{}/partitions: {e}", view_dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort_by_key(|n| n.trim_end_matches(".raw").parse::<u32>().unwrap());
    let expected: Vec<String> = want.iter().map(|(n, ..)| format!("{n}.raw")).collect();
    assert_eq!(names, expected, "{}", view_dir.display());
    let disk = std::fs::read(raw).unwrap();
    let listed = info["partitions"].as_array().unwrap();
    for ((n, start, size), entry) in want.iter().zip(listed) {
        let got = std::fs::read(view_dir.join(format!("partitions/{n}.raw"))).unwrap();
        assert!(got[..] == disk[*start as usize..(start + size) as usize], "{}: partition {n}", view_dir.display());
        assert_eq!(
            (entry["number"].as_u64(), entry["start"].as_u64(), entry["size"].as_u64()),
            (Some(*n as u64), Some(*start), Some(*size))
        );
    }
}

/// A 64 MiB GPT disk: an ext4 root, a FAT partition, a third filling the
/// rest; and a 64 MiB MBR disk with two primaries, an extended partition
/// and three logical ones (ext4 in the first logical).
fn make_disks(dir: &Path) {
    bash(
        dir,
        r#"
        fill() {  # fill DISK START_SECTORS SIZE_SECTORS ext4|vfat: a filesystem with a file
            local l
            l=$(losetup -f --show -o $(($2 * 512)) --sizelimit $(($3 * 512)) "$1")
            echo "$1 $2" > hello.txt
            if [ "$4" = ext4 ]; then
                mkfs.ext4 -q "$l"
                mkdir -p fs
                mount "$l" fs
                cp hello.txt fs/
                umount fs
            else
                # This kernel has no vfat: mtools writes (and reads) FAT.
                mkfs.vfat "$l" >/dev/null
                mcopy -i "$l" hello.txt ::hello.txt
            fi
            losetup -d "$l"
        }
        truncate -s 64M gpt.raw
        printf 'label: gpt\n\nsize=16M, type=L, name=root\nsize=8M, type=uefi, name="EFI system"\ntype=L\n' | sfdisk -q gpt.raw
        fill gpt.raw 2048 32768 ext4
        fill gpt.raw 34816 16384 vfat
        truncate -s 64M mbr.raw
        printf 'label: dos\n\nsize=8M, type=83\nsize=8M, type=c\ntype=5\nsize=10M, type=83\nsize=10M, type=82\ntype=83\n' | sfdisk -q mbr.raw
        fill mbr.raw 36864 20480 ext4
        fill mbr.raw 18432 16384 vfat
    "#,
    );
}

/// Mounts `partitions/N.raw` with a loop device and reads the file that
/// `make_disks` left in it.
fn loop_mount_reads(part: &Path, dir: &Path, want: &str) {
    let lm = LoopMount::new(part, &dir.join("loop"));
    assert_eq!(std::fs::read_to_string(lm.dir.join("hello.txt")).unwrap().trim(), want);
}

/// Reads the file `make_disks` left in the FAT filesystem of
/// `partitions/N.raw`, with mtools (this kernel cannot mount vfat).
fn fat_reads(part: &Path, want: &str) {
    let text = run("mtype", &[OsStr::new("-i"), part.as_os_str(), OsStr::new("::hello.txt")]);
    assert_eq!(text.trim(), want, "{}", part.display());
}

#[test]
fn gpt_and_mbr_partitions_in_active_snapshot_and_backing_views() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_disks(dir);
    bash(
        dir,
        r#"
        for t in gpt mbr; do
            qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd $t.raw $t.qcow2
            qemu-img snapshot -c before $t.qcow2
        done
        # After the snapshot: GPT partition 3 removed and a new 4th, written
        # through qemu-nbd-free raw round trip: change a copy, write it back.
        cp gpt.raw gpt-after.raw
        sfdisk -q --delete gpt-after.raw 3
        printf 'size=12M, type=L, name=new\n' | sfdisk -q --append gpt-after.raw
        qemu-io -f qcow2 -c "write -s gpt-after.raw 0 64M" gpt.qcow2 >/dev/null
        qemu-img create -q -f qcow2 -b mbr.qcow2 -F qcow2 mbr-top.qcow2
        qemu-io -f qcow2 -c "write -P 0x5a 60M 1M" mbr-top.qcow2 >/dev/null
        qemu-img convert -O raw gpt.qcow2 gpt-active.raw
        qemu-img convert -O raw mbr-top.qcow2 mbr-top.raw
    "#,
    );
    let m = Mount::new(&[dir.join("gpt.qcow2"), dir.join("mbr-top.qcow2")], &dir.join("mnt"));
    // GPT: the snapshot has the old table, the active disk the new one.
    let gpt = m.image_dir("gpt.qcow2");
    check_partitions(&gpt, &m.info("gpt.qcow2"), &dir.join("gpt-active.raw"));
    let snap = gpt.join("snapshots/before");
    let sinfo: serde_json::Value = serde_json::from_slice(&std::fs::read(snap.join("info.json")).unwrap()).unwrap();
    check_partitions(&snap, &sinfo, &dir.join("gpt.raw"));
    let size3 = |d: &Path| std::fs::metadata(d.join("partitions/3.raw")).unwrap().len();
    assert_eq!((size3(&gpt), size3(&snap)), (12 * MIB, 77824 * 512), "each view reads its own table");
    assert_eq!(sinfo["partitions"][1]["type_name"], "EFI System");
    assert_eq!(sinfo["partitions"][0]["name"], "root");
    loop_mount_reads(&snap.join("partitions/1.raw"), dir, "gpt.raw 2048");
    fat_reads(&gpt.join("partitions/2.raw"), "gpt.raw 34816");
    // MBR with logical partitions, over a backing file.
    let top = m.image_dir("mbr-top.qcow2");
    check_partitions(&top, &m.info("mbr-top.qcow2"), &dir.join("mbr-top.raw"));
    let base = top.join("backing/1-mbr.qcow2");
    let binfo: serde_json::Value = serde_json::from_slice(&std::fs::read(base.join("info.json")).unwrap()).unwrap();
    check_partitions(&base, &binfo, &dir.join("mbr.raw"));
    loop_mount_reads(&top.join("partitions/5.raw"), dir, "mbr.raw 36864");
    fat_reads(&base.join("partitions/2.raw"), "mbr.raw 18432");
    // Holes follow the disk's map: the snapshot's empty third partition
    // (zeros, left unallocated by qemu-img convert) takes no blocks.
    let meta = std::fs::metadata(snap.join("partitions/3.raw")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < meta.len(), "st_blocks follows the disk's allocation");
}

#[test]
fn partitions_of_hexz_archives() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_disks(dir);
    let hexz = hexz_bin();
    for t in ["gpt", "mbr"] {
        run_in(Some(dir), hexz.to_str().unwrap(), &["pack", "-s", &format!("{t}.raw"), &format!("{t}.hxz")]);
    }
    // A thin child of the GPT archive, repartitioned: its own table, and
    // the parent's under backing/.
    bash(
        dir,
        r#"
        cp gpt.raw child.raw
        sfdisk -q --delete child.raw 3
        printf 'size=20M, type=L, name=child\n' | sfdisk -q --append child.raw
        "#,
    );
    run_in(Some(dir), hexz.to_str().unwrap(), &["pack", "-s", "child.raw", "child.hxz", "--base", "gpt.hxz"]);
    let m = Mount::new(&[dir.join("gpt.hxz"), dir.join("mbr.hxz"), dir.join("child.hxz")], &dir.join("mnt"));
    check_partitions(&m.image_dir("gpt.hxz"), &m.info("gpt.hxz"), &dir.join("gpt.raw"));
    check_partitions(&m.image_dir("mbr.hxz"), &m.info("mbr.hxz"), &dir.join("mbr.raw"));
    loop_mount_reads(&m.image_dir("mbr.hxz").join("partitions/5.raw"), dir, "mbr.raw 36864");
    let child = m.image_dir("child.hxz");
    check_partitions(&child, &m.info("child.hxz"), &dir.join("child.raw"));
    let parent = child.join("backing/1-gpt.hxz");
    let pinfo: serde_json::Value = serde_json::from_slice(&std::fs::read(parent.join("info.json")).unwrap()).unwrap();
    check_partitions(&parent, &pinfo, &dir.join("gpt.raw"));
    loop_mount_reads(&parent.join("partitions/1.raw"), dir, "gpt.raw 2048");
}

/// Damaged tables: a broken primary GPT (the backup serves, as in the
/// kernel), a logical chain that loops (stops), partitions past the end
/// (clipped, or skipped when they start past it). Never a crash or hang.
#[test]
fn damaged_tables() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_disks(dir);
    let patch = |src: &str, dst: &str, at: u64, bytes: &[u8]| -> PathBuf {
        let mut b = std::fs::read(dir.join(src)).unwrap();
        b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        std::fs::write(dir.join(dst), b).unwrap();
        dir.join(dst)
    };
    // The primary GPT header's CRC broken: the backup table is used.
    patch("gpt.raw", "gpt-bad-primary.raw", 512 + 16, &[0xde, 0xad, 0xbe, 0xef]);
    // The second logical EBR's "next" entry pointing back to the first EBR
    // (relative start 0 from the extended partition at sector 34816).
    let ebr2 = 57344 * 512 + 446 + 16;
    let mut next = [0u8; 16];
    next[4] = 0x05;
    next[8..12].copy_from_slice(&0u32.to_le_bytes());
    next[12..16].copy_from_slice(&100u32.to_le_bytes());
    patch("mbr.raw", "mbr-loop.raw", ebr2, &next);
    // Primary 2 grown past the end; a primary 4 that starts past it.
    let mut p2 = std::fs::read(dir.join("mbr.raw")).unwrap()[446 + 16..446 + 32].to_vec();
    p2[12..16].copy_from_slice(&1_000_000u32.to_le_bytes());
    patch("mbr.raw", "mbr-past.raw", 446 + 16, &p2);
    let mut p4 = [0u8; 16];
    p4[4] = 0x83;
    p4[8..12].copy_from_slice(&200_000u32.to_le_bytes());
    p4[12..16].copy_from_slice(&10u32.to_le_bytes());
    patch("mbr-past.raw", "mbr-past.raw", 446 + 48, &p4);
    let names = ["gpt-bad-primary.raw", "mbr-loop.raw", "mbr-past.raw"];
    for n in names {
        let qcow = dir.join(n.replace(".raw", ".qcow2"));
        raw_to_qcow2(&dir.join(n), &qcow);
    }
    let sources: Vec<_> = names.iter().map(|n| dir.join(n.replace(".raw", ".qcow2"))).collect();
    let m = Mount::new(&sources, &dir.join("mnt"));
    let listed = |img: &str| -> Vec<(u64, u64, u64)> {
        m.info(img)["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["number"].as_u64().unwrap(), p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap()))
            .collect()
    };
    let gpt: Vec<(u64, u64, u64)> =
        sfdisk_partitions(&dir.join("gpt.raw")).iter().map(|&(n, s, z)| (n as u64, s, z)).collect();
    assert_eq!(listed("gpt-bad-primary.qcow2"), gpt, "the backup GPT");
    let logical: Vec<u64> = listed("mbr-loop.qcow2").iter().map(|p| p.0).collect();
    assert_eq!(logical, vec![1, 2, 5, 6], "the chain stops where it loops");
    let p = listed("mbr-past.qcow2");
    assert_eq!(p.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2, 5, 6, 7], "partition 4 starts past the end");
    assert_eq!(p[1], (2, 18432 * 512, 64 * MIB - 18432 * 512), "partition 2 clipped to the disk");
    let part2 = m.image_dir("mbr-past.qcow2").join("partitions/2.raw");
    assert_eq!(std::fs::metadata(&part2).unwrap().len(), 64 * MIB - 18432 * 512);
}

/// A GPT written with 4096-byte sectors (a 4Kn disk, here a loop device
/// with --sector-size 4096): found at byte 4096, offsets in 4 KiB sectors.
#[test]
fn gpt_with_4096_byte_sectors() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let json = bash(
        dir,
        r#"
        truncate -s 64M g4k.raw
        l=$(losetup -f --show --sector-size 4096 g4k.raw)
        printf 'label: gpt\n\nsize=16M, type=L, name=a\ntype=L, name=b\n' | sfdisk -q --no-reread "$l"
        sfdisk --json "$l"
        losetup -d "$l"
        head -c 16M /dev/zero | tr '\0' 'x' | dd of=g4k.raw bs=1M seek=1 conv=notrunc status=none
        qemu-img convert -c -f raw -O qcow2 g4k.raw g4k.qcow2
    "#,
    );
    let table: serde_json::Value = serde_json::from_str(&json).unwrap();
    let sector = table["partitiontable"]["sectorsize"].as_u64().unwrap();
    assert_eq!(sector, 4096);
    let m = Mount::new(&[dir.join("g4k.qcow2")], &dir.join("mnt"));
    let listed = m.info("g4k.qcow2")["partitions"].clone();
    let disk = std::fs::read(dir.join("g4k.raw")).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(listed.as_array().unwrap().len(), parts.len());
    for (i, (p, ours)) in parts.iter().zip(listed.as_array().unwrap()).enumerate() {
        let (start, size) = (p["start"].as_u64().unwrap() * sector, p["size"].as_u64().unwrap() * sector);
        assert_eq!((ours["start"].as_u64(), ours["size"].as_u64()), (Some(start), Some(size)), "partition {}", i + 1);
        let got = std::fs::read(m.image_dir("g4k.qcow2").join(format!("partitions/{}.raw", i + 1))).unwrap();
        assert!(got[..] == disk[start as usize..(start + size) as usize], "partition {}", i + 1);
    }
}
