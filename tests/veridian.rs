//! VeridianOS snapshots (VMSN v1, snapmount's profile) and migration
//! streams (v3). A writer here builds files from the byte tables of
//! `../shared/research/veridian.md` (not from snapmount's reader); random
//! files (seeded) and the note's golden vectors are compared through a
//! mount with what was written.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

mod common;
use common::*;

fn bytes(rng: &mut Rng, n: impl TryInto<usize>) -> Vec<u8> {
    let n = n.try_into().ok().unwrap();
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// One region of a snapshot as the writer lays it out.
struct Region {
    kind: u32,
    vcpu: u32,
    payload: Vec<u8>,
}

/// A VMSN file: 64-byte header (padding filled with garbage, as a raw dump
/// of upstream's struct has it), descriptors, payloads. With `absolute`,
/// payloads go in shuffled order with gaps and descriptors carry their file
/// offsets; else offsets are 0 and payloads follow in order.
fn write_vmsn(
    rng: &mut Rng,
    vm_id: u64,
    vcpus: u32,
    memory_pages: u64,
    regions: &[Region],
    absolute: bool,
    bad_checksum: bool,
) -> Vec<u8> {
    let n = regions.len() as u64;
    let table_end = 64 + 24 * n;
    let total: u64 = table_end + regions.iter().map(|r| r.payload.len() as u64).sum::<u64>();
    let timestamp = rng.next_u64();
    let mut checksum = 0x564D534Eu64 ^ 1 ^ vm_id ^ vcpus as u64 ^ memory_pages ^ n ^ total ^ timestamp;
    if bad_checksum {
        checksum ^= 0x40;
    }
    let mut out = Vec::new();
    out.extend(0x564D534Eu32.to_le_bytes());
    out.extend(1u32.to_le_bytes());
    out.extend(vm_id.to_le_bytes());
    out.extend(vcpus.to_le_bytes());
    out.extend(bytes(rng, 4));
    out.extend(memory_pages.to_le_bytes());
    out.extend((n as u32).to_le_bytes());
    out.extend(bytes(rng, 4));
    out.extend(total.to_le_bytes());
    out.extend(timestamp.to_le_bytes());
    out.extend(checksum.to_le_bytes());
    let mut offsets = vec![0u64; regions.len()];
    let mut payloads = Vec::new();
    if absolute {
        let mut order: Vec<usize> = (0..regions.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut pos = table_end;
        for i in order {
            let gap = rng.below(3) * 100;
            payloads.extend(bytes(rng, gap as usize));
            pos += gap;
            offsets[i] = pos;
            payloads.extend(&regions[i].payload);
            pos += regions[i].payload.len() as u64;
        }
    } else {
        for r in regions {
            payloads.extend(&r.payload);
        }
    }
    for (r, off) in regions.iter().zip(&offsets) {
        out.extend(r.kind.to_le_bytes());
        out.extend(r.vcpu.to_le_bytes());
        out.extend(off.to_le_bytes());
        out.extend((r.payload.len() as u64).to_le_bytes());
    }
    out.extend(payloads);
    out
}

/// A migration stream: header, VM-state section, device section, and
/// `trailing` extra bytes.
fn write_migration(
    num_vcpus: u32,
    memory: u64,
    hash: u64,
    vcpus: &[Vec<u8>],
    devices: &[(Vec<u8>, Vec<u8>)],
    trailing: &[u8],
) -> Vec<u8> {
    let mut vm = Vec::new();
    vm.extend(num_vcpus.to_le_bytes());
    vm.extend(memory.to_le_bytes());
    vm.extend(hash.to_le_bytes());
    for v in vcpus {
        vm.extend((v.len() as u32).to_le_bytes());
        vm.extend(v);
    }
    let mut dev = Vec::new();
    for (name, data) in devices {
        dev.extend((name.len() as u32).to_le_bytes());
        dev.extend(name);
        dev.extend((data.len() as u32).to_le_bytes());
        dev.extend(data);
    }
    let mut out = Vec::new();
    for f in [0x51454D49u32, 3, vm.len() as u32, dev.len() as u32, devices.len() as u32, 0] {
        out.extend(f.to_le_bytes());
    }
    out.extend(vm);
    out.extend(dev);
    out.extend(trailing);
    out
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn info(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&read(&p.join("info.json"))).unwrap()
}

/// The note's vectors: the 86-byte stream of §3.6 (checked upstream against
/// `serialize_state`) and the §4.7 snapshot header (checksum 0x564C94C8).
#[test]
fn golden_vectors() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let stream = hex("494d4551 03000000 24000000 1a000000 02000000 00000000
        02000000 0000001000000000 7856341200000000 04000000 01020304 04000000 05060708
        04000000 75617274 02000000 aabb 03000000 706963 01000000 cc");
    assert_eq!(stream.len(), 86);
    assert_eq!(
        stream,
        write_migration(
            2,
            0x1000_0000,
            0x1234_5678,
            &[vec![1, 2, 3, 4], vec![5, 6, 7, 8]],
            &[(b"uart".to_vec(), vec![0xaa, 0xbb]), (b"pic".to_vec(), vec![0xcc])],
            &[]
        ),
        "the test writer reproduces upstream's bytes"
    );
    std::fs::write(dir.join("vm.mig"), &stream).unwrap();
    let header = hex("4e534d56 01000000 0100000000000000 02000000 00000000 0004000000000000 04000000 00000000
        c021000000000000 40e2010000000000 c8944c5600000000");
    let mut snap = header;
    for (kind, vcpu, size) in [(2u32, 0u32, 144u64), (2, 1, 144), (4, 0, 4096), (4, 0, 4096)] {
        snap.extend(kind.to_le_bytes());
        snap.extend(vcpu.to_le_bytes());
        snap.extend(0u64.to_le_bytes());
        snap.extend(size.to_le_bytes());
    }
    let regs: Vec<u8> = (0..36u64).flat_map(|i| (i * 3 + 1).to_le_bytes()).collect();
    snap.extend(&regs);
    snap.extend([0x5au8; 4096]);
    snap.extend([0xa5u8; 4096]);
    assert_eq!(snap.len(), 8640, "total_size of §4.7");
    std::fs::write(dir.join("snap.vmsn"), &snap).unwrap();

    let m = Mount::new(&[dir.join("vm.mig"), dir.join("snap.vmsn")], &dir.join("mnt"));
    let mig = m.image_dir("vm.mig");
    assert_eq!(read(&mig.join("vcpus/0.bin")), [1, 2, 3, 4]);
    assert_eq!(read(&mig.join("vcpus/1.bin")), [5, 6, 7, 8]);
    assert_eq!(read(&mig.join("devices/0-uart.bin")), [0xaa, 0xbb]);
    assert_eq!(read(&mig.join("devices/1-pic.bin")), [0xcc]);
    let i = info(&mig);
    assert_eq!(
        (i["num_vcpus"].as_u64(), i["memory_size"].as_u64(), i["memory_hash"].as_u64()),
        (Some(2), Some(0x1000_0000), Some(0x1234_5678))
    );
    assert_eq!((i["truncated"].as_bool(), i["trailing_bytes"].as_u64()), (Some(false), Some(0)));

    let s = m.image_dir("snap.vmsn");
    let i = info(&s);
    assert_eq!((i["checksum"].as_u64(), i["checksum_ok"].as_bool()), (Some(0x564C94C8), Some(true)));
    assert_eq!(read(&s.join("vcpu0/registers.bin")), regs[..144]);
    assert_eq!(read(&s.join("vcpu1/registers.bin")), regs[144..]);
    let r: serde_json::Value = serde_json::from_slice(&read(&s.join("vcpu1/registers.json"))).unwrap();
    assert_eq!((r["rax"].as_u64(), r["rflags"].as_u64()), (Some(18 * 3 + 1), Some(35 * 3 + 1)));
    let memory = read(&s.join("memory.raw"));
    assert_eq!(memory.len(), 1024 * 4096);
    assert!(memory[..4096].iter().all(|&b| b == 0x5a) && memory[4096..8192].iter().all(|&b| b == 0xa5));
    assert!(memory[8192..].iter().all(|&b| b == 0), "unsaved pages read as zeros");
    assert_eq!(std::fs::metadata(s.join("memory.raw")).unwrap().blocks() * 512, 8192, "holes where no page was saved");
}

/// Random snapshots of the profile: both page numberings, both offset
/// modes, bad checksums, every region type, repeated regions; every file of
/// the mount equals what the writer put in.
#[test]
fn random_snapshots_and_streams_read_back_exactly() {
    preflight();
    let seed = test_seed(9);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(seed);
    let mut expected: Vec<(String, BTreeMap<String, Vec<u8>>)> = Vec::new();
    for f in 0..8 {
        let vcpus = 1 + rng.below(3) as u32;
        let memory_pages = 16 + rng.below(64);
        let numbered = rng.chance(50);
        let mut regions = Vec::new();
        let mut want = BTreeMap::new();
        let mut memory = vec![0u8; memory_pages as usize * 4096];
        let mut pages: Vec<u64> = (0..memory_pages).collect();
        for i in (1..pages.len()).rev() {
            pages.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let saved = 1 + rng.below(6) as usize;
        let mut page_k = 0u64;
        let mut per_vcpu: BTreeMap<(u32, &str), usize> = BTreeMap::new();
        let mut devices = 0;
        for _ in 0..(saved + 6) {
            let kind = if regions.iter().filter(|r: &&Region| r.kind == 4).count() < saved {
                [4, 4, 2, 3, 1, 5, 6, 9][rng.below(8) as usize]
            } else {
                [2, 3, 1, 5, 6, 7, 9][rng.below(7) as usize]
            };
            let vcpu = rng.below(vcpus as u64) as u32;
            let payload = match kind {
                4 => bytes(&mut rng, 4096),
                2 => bytes(&mut rng, 144),
                3 => {
                    let n = 16 * (1 + rng.below(5));
                    bytes(&mut rng, n)
                }
                1 => {
                    let n = 12 * (1 + rng.below(5));
                    bytes(&mut rng, n)
                }
                _ => {
                    let n = rng.below(300);
                    bytes(&mut rng, n)
                }
            };
            let index = regions.len();
            match kind {
                4 => {
                    let page = if numbered { pages[page_k as usize] } else { page_k };
                    memory[page as usize * 4096..][..4096].copy_from_slice(&payload);
                    regions.push(Region { kind, vcpu: if numbered { page as u32 } else { 0 }, payload });
                    page_k += 1;
                    continue;
                }
                5 => {
                    want.insert(format!("devices/{devices}.bin"), payload.clone());
                    devices += 1;
                }
                9 => {
                    want.insert(format!("regions/{index}-type9.bin"), payload.clone());
                }
                _ => {
                    let stem = match kind {
                        1 => "vmcs",
                        2 => "registers",
                        3 => "msrs",
                        6 => "lapic",
                        _ => "state",
                    };
                    let n = per_vcpu.entry((vcpu, stem)).or_default();
                    *n += 1;
                    let name = if *n == 1 { format!("{stem}.bin") } else { format!("{stem}~{n}.bin") };
                    want.insert(format!("vcpu{vcpu}/{name}"), payload.clone());
                }
            }
            regions.push(Region { kind, vcpu, payload });
        }
        want.insert("memory.raw".into(), memory);
        let absolute = rng.chance(50);
        let bad = rng.chance(30);
        let name = format!("s{f}.vmsn");
        std::fs::write(dir.join(&name), write_vmsn(&mut rng, f, vcpus, memory_pages, &regions, absolute, bad)).unwrap();
        eprintln!(
            "{name}: {} regions, numbered pages {numbered}, absolute offsets {absolute}, bad checksum {bad}",
            regions.len()
        );
        expected.push((name, want));
    }
    for f in 0..6 {
        let vcpus: Vec<Vec<u8>> = (0..rng.below(4))
            .map(|_| {
                let n = rng.below(200);
                bytes(&mut rng, n)
            })
            .collect();
        let mut devices: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for _ in 0..rng.below(5) {
            let name = match rng.below(4) {
                0 => b"uart".to_vec(),
                1 => vec![0xff, b'/', b'x'],
                2 => b".hidden".to_vec(),
                _ => format!("dev{}", rng.below(3)).into_bytes(),
            };
            let n = rng.below(100);
            devices.push((name, bytes(&mut rng, n)));
        }
        let n = if rng.chance(30) { 7 } else { 0 };
        let trailing = bytes(&mut rng, n);
        let name = format!("m{f}.mig");
        let stream = write_migration(vcpus.len() as u32, rng.next_u64(), rng.next_u64(), &vcpus, &devices, &trailing);
        std::fs::write(dir.join(&name), stream).unwrap();
        let mut want = BTreeMap::new();
        for (i, v) in vcpus.iter().enumerate() {
            want.insert(format!("vcpus/{i}.bin"), v.clone());
        }
        for (k, (n, d)) in devices.iter().enumerate() {
            let escaped = String::from_utf8_lossy(n).replace('/', "%2F").replace('\u{FFFD}', "%FF");
            let escaped = match escaped.strip_prefix('.') {
                Some(rest) => format!("%2E{rest}"),
                None => escaped,
            };
            want.insert(format!("devices/{k}-{escaped}.bin"), d.clone());
        }
        expected.push((name, want));
    }
    let sources: Vec<_> = expected.iter().map(|(n, _)| dir.join(n)).collect();
    let m = Mount::new(&sources, &dir.join("mnt"));
    for (name, want) in &expected {
        let root = m.image_dir(name);
        for (file, bytes) in want {
            assert!(read(&root.join(file)) == *bytes, "{name}: {file} (seed {seed})");
        }
        let i = info(&root);
        if name.ends_with(".vmsn") {
            let listed: usize = std::fs::read_dir(&root).unwrap().count();
            assert!(listed >= 2, "{name}");
            assert_eq!(
                i["checksum_ok"].as_bool().unwrap(),
                i["checksum"].as_u64() == Some(expected_checksum(&read(&dir.join(name)))),
                "{name}"
            );
        }
    }
}

fn expected_checksum(file: &[u8]) -> u64 {
    let le32 = |at: usize| u32::from_le_bytes(file[at..at + 4].try_into().unwrap()) as u64;
    let le64 = |at: usize| u64::from_le_bytes(file[at..at + 8].try_into().unwrap());
    le32(0) ^ le32(4) ^ le64(8) ^ le32(16) ^ le64(24) ^ le32(32) ^ le64(40) ^ le64(48)
}

/// Truncated files, other versions, ambiguous page numbering: the mount
/// fails with one line naming the file, and nothing is mounted. A stream
/// whose entries run past their sections mounts, saying `truncated`.
#[test]
fn refusals_and_truncated_lists() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(1);
    let page = |vcpu| Region { kind: 4, vcpu, payload: vec![7; 4096] };
    let good = write_vmsn(&mut rng, 1, 1, 8, &[page(0), page(0)], false, false);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("short.vmsn", good[..good.len() - 100].to_vec(), "past the end of the file"),
        (
            "v2.vmsn",
            {
                let mut b = good.clone();
                b[4] = 2;
                b
            },
            "version 2",
        ),
        ("ambiguous.vmsn", write_vmsn(&mut rng, 1, 1, 8, &[page(1), page(1), page(2)], false, false), "ambiguously"),
        ("beyond.vmsn", write_vmsn(&mut rng, 1, 1, 8, &[page(3), page(9)], false, false), "past memory_pages"),
        (
            "halfpage.vmsn",
            write_vmsn(&mut rng, 1, 1, 8, &[Region { kind: 4, vcpu: 0, payload: vec![1; 100] }], false, false),
            "not 4096",
        ),
        (
            "count.vmsn",
            {
                let mut b = good.clone();
                b[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
                b
            },
            "descriptors run past",
        ),
        (
            "v4.mig",
            {
                let mut b = write_migration(0, 0, 0, &[], &[], &[]);
                b[4] = 4;
                b
            },
            "version 4",
        ),
        ("short.mig", write_migration(1, 0, 0, &[vec![1; 50]], &[], &[])[..60].to_vec(), "past the end of the file"),
    ];
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    for (name, bytes, why) in &cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let o = snapmount(&[OsStr::new("mount"), p.as_os_str(), mnt.as_os_str()]);
        let msg = o.stderr.trim();
        assert!(
            !o.success() && msg.contains(p.to_str().unwrap()) && msg.contains(why),
            "{name}: want '{why}': {}",
            o.describe()
        );
        assert_eq!(msg.lines().count(), 1, "{name}: one line: {msg}");
        assert!(!is_mountpoint(&mnt));
    }
    // Device entries that run past their section: the list ends there.
    let mut cut =
        write_migration(1, 0, 0, &[vec![1, 2]], &[(b"a".to_vec(), vec![3; 10]), (b"b".to_vec(), vec![4; 10])], &[]);
    let dev_size_at = 12;
    let dev_size = u32::from_le_bytes(cut[dev_size_at..dev_size_at + 4].try_into().unwrap()) - 5;
    cut[dev_size_at..dev_size_at + 4].copy_from_slice(&dev_size.to_le_bytes());
    std::fs::write(dir.join("cut.mig"), &cut).unwrap();
    let m = Mount::new(&[dir.join("cut.mig")], &mnt);
    let i = info(&m.image_dir("cut.mig"));
    assert_eq!(
        (i["truncated"].as_bool(), i["devices"].as_array().unwrap().len(), i["trailing_bytes"].as_u64()),
        (Some(true), 1, Some(5))
    );
}
