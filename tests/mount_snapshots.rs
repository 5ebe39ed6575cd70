//! Per-snapshot and per-backing-image views through the real mount, with QEMU
//! as the oracle: `qemu-img snapshot -a` on a copy, then `convert -O raw`
//! (apply resizes to the snapshot's disk size, which `convert -l` does not).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;

fn sh(dir: &Path, script: &str) -> String {
    run_in(Some(dir), "bash", &["-euo", "pipefail", "-c", script])
}

/// The expected raw content of snapshot `id` of `img`: applied on a copy that
/// sits next to the image (so relative backing names still resolve).
fn snapshot_oracle(img: &Path, id: &str, out: &Path) {
    let dir = img.parent().unwrap();
    let copy = dir.join(format!(".oracle-{}", img.file_name().unwrap().to_string_lossy()));
    std::fs::copy(img, &copy).unwrap();
    run_in(Some(dir), "qemu-img", &["snapshot", "-a", id, copy.to_str().unwrap()]);
    oracle_raw(&copy, out);
    std::fs::remove_file(&copy).unwrap();
}

/// Every snapshot of `img` (as listed in the mount's info.json) reads back as
/// QEMU says; returns how many were checked.
fn check_all_snapshots(m: &Mount, img: &Path, scratch: &Path) -> usize {
    let name = img.file_name().unwrap().to_str().unwrap();
    let info = m.info(name);
    let snaps = info["snapshots"].as_array().expect("snapshots array").clone();
    let listed: Vec<String> = std::fs::read_dir(m.image_dir(name).join("snapshots"))
        .map(|d| d.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
        .unwrap_or_default();
    assert_eq!(listed.len(), snaps.len(), "{name}: one directory per snapshot: {listed:?}");
    let mut errors = Vec::new();
    for s in &snaps {
        let entry = s["entry"].as_str().unwrap();
        let id = s["id"].as_str().unwrap();
        let sdir = m.image_dir(name).join("snapshots").join(entry);
        let expected = scratch.join(format!("{name}.snap{id}.raw"));
        snapshot_oracle(img, id, &expected);
        let disk_size = s["disk_size"].as_u64().unwrap() & !511;
        assert_eq!(std::fs::metadata(&expected).unwrap().len(), disk_size, "{name} snapshot {id}: oracle size");
        if let Err(e) = files_equal(&sdir.join("disk.raw"), &expected) {
            errors.push(format!("{name} snapshot {id} ({entry}): {e}"));
        }
        // The snapshot directory's mtime is the snapshot's date.
        let meta = std::fs::metadata(&sdir).unwrap();
        assert_eq!(meta.mtime() as u64, s["date_sec"].as_u64().unwrap(), "{name}/{entry} mtime");
        let own: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(sdir.join("info.json")).unwrap()).unwrap();
        assert_eq!(own["id"], s["id"]);
        assert_eq!(own["disk_size"], s["disk_size"]);
        let _ = std::fs::remove_file(&expected);
    }
    assert!(errors.is_empty(), "{} snapshot views differ:\n{}", errors.len(), errors.join("\n"));
    snaps.len()
}

#[test]
fn snapshots_between_writes_zeroes_discards_compression_and_resizes() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    gen_data(&dir.join("data.bin"), 4 * MIB, 11);
    sh(
        &dir,
        r#"
        q() { qemu-io "$@" >/dev/null; }
        qemu-img create -q -f qcow2 base.qcow2 64M
        q -c 'write -P 0xb0 0 64M' base.qcow2
        for v in 1.1 0.10; do
          img=snaps-$v.qcow2
          qemu-img create -q -f qcow2 -o compat=$v -b base.qcow2 -F qcow2 $img 32M
          q -c 'write -s data.bin 0 4M' $img
          qemu-img snapshot -c s1 $img
          q -c 'write -P 0x02 512k 1M' -c 'write -z 4M 1M' -c 'discard 2M 128k' $img
          qemu-img snapshot -c s2 $img
          q -c 'write -c -s data.bin 8M 256k' -c 'write -c -P 0x07 16M 64k' $img
          qemu-img snapshot -c s3 $img
          # QEMU refuses to resize v2 images that have snapshots.
          late=20M
          if [ $v = 1.1 ]; then qemu-img resize -q $img 48M; late=40M; fi
          q -c "write -P 0x03 $late 1M" -c 'discard 0 64k' $img
          qemu-img snapshot -c 'third snap' $img
          qemu-img snapshot -a s1 $img          # back to 32M: shrinks the disk
          q -c 'write -P 0x04 0 128k' $img
          qemu-img snapshot -c after-apply $img
          q -c 'write -P 0x05 1M 64k' $img
        done
        qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b base.qcow2 -F qcow2 ext.qcow2 16M
        q -c 'write -P 0x01 2k 2k' -c 'write -z 8k 2k' ext.qcow2
        qemu-img snapshot -c e1 ext.qcow2
        q -c 'write -P 0x02 4097 100' -c 'write -z 1M 64k' ext.qcow2
        qemu-img snapshot -c e2 ext.qcow2
        q -c 'write -P 0x03 0 64k' ext.qcow2
    "#,
    );
    let imgs: Vec<PathBuf> = ["snaps-1.1.qcow2", "snaps-0.10.qcow2", "ext.qcow2"].iter().map(|n| dir.join(n)).collect();
    let m = Mount::new(&imgs, &tmp.path().join("mnt"));
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    assert_eq!(check_all_snapshots(&m, &imgs[0], &scratch), 5);
    assert_eq!(check_all_snapshots(&m, &imgs[1], &scratch), 5);
    assert_eq!(check_all_snapshots(&m, &imgs[2], &scratch), 2);
    m.assert_all_match(&imgs, &scratch);
}

#[test]
fn odd_snapshot_names_get_unique_working_entries() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    let long = "x".repeat(255);
    let script = format!(
        r#"
        q() {{ qemu-io "$@" >/dev/null; }}
        qemu-img create -q -f qcow2 odd.qcow2 8M
        n=1
        for name in same same 'a/b' '' 1 '{long}' 'héllo wörld' '..' 'tab	in'; do
          q -c "write -P $n $((n*64))k 64k" odd.qcow2
          qemu-img snapshot -c "$name" odd.qcow2
          n=$((n+1))
        done
        q -c 'write -P 0xee 0 64k' odd.qcow2
    "#
    );
    sh(&dir, &script);
    let img = dir.join("odd.qcow2");
    let m = Mount::new(&[&img], &tmp.path().join("mnt"));
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    assert_eq!(check_all_snapshots(&m, &img, &scratch), 9);
    let mut entries: Vec<String> = std::fs::read_dir(m.image_dir("odd.qcow2").join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    for e in &entries {
        assert!(!e.is_empty() && !e.contains('/') && e.len() <= 255, "bad entry {e:?}");
    }
    // Readable: unique, non-escaped names stay as they are.
    assert!(entries.contains(&"héllo wörld".to_string()), "{entries:?}");
    assert!(entries.contains(&long), "{entries:?}");
}

#[test]
fn vm_state_reads_back_as_qemu_stores_it() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    let vm_len: u64 = 200 * KIB;
    gen_data(&dir.join("vm.bin"), vm_len, 99);
    sh(
        &dir,
        r#"
        qemu-img create -q -f qcow2 vmst.qcow2 64M
        qemu-io -c 'write -P 0x10 0 64k' -c 'write -b -s vm.bin 0 200k' vmst.qcow2 >/dev/null
        qemu-img snapshot -c withvm vmst.qcow2
        qemu-img snapshot -c novm vmst.qcow2
    "#,
    );
    // qemu-img records no VM state size; patch the first entry as savevm would.
    let img = dir.join("vmst.qcow2");
    let table = read_be64(&img, 64);
    write_bytes_at(&img, table + 32, &(vm_len as u32).to_be_bytes());
    write_be64(&img, table + 40, vm_len);

    // The oracle: apply the snapshot on a copy and let qemu-io read the VM state.
    let copy = dir.join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    run("qemu-img", &["snapshot", "-a", "withvm", copy.to_str().unwrap()]);
    let dump = run("qemu-io", &["-r", "-c", &format!("read -b -v 0 {vm_len}"), copy.to_str().unwrap()]);
    let expected = parse_qemu_io_dump(&dump);
    assert_eq!(expected.len() as u64, vm_len);

    let m = Mount::new(&[&img], &tmp.path().join("mnt"));
    let snaps = m.image_dir("vmst.qcow2").join("snapshots");
    let got = std::fs::read(snaps.join("withvm").join("vmstate")).unwrap();
    assert!(got == expected, "vmstate differs from qemu-io's read -b");
    assert_eq!(got, std::fs::read(dir.join("vm.bin")).unwrap());
    assert!(!snaps.join("novm").join("vmstate").exists(), "no vmstate file without VM state");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(snaps.join("withvm").join("info.json")).unwrap()).unwrap();
    assert_eq!(info["vm_state_size"].as_u64(), Some(vm_len));
}

/// Parses `qemu-io read -v` output: `00000000:  5a 5a ...  ZZ..` lines.
fn parse_qemu_io_dump(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((addr, rest)) = line.split_once(':') else { continue };
        if addr.len() != 8 || !addr.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        for tok in rest.split_whitespace().take(16) {
            if tok.len() == 2 {
                if let Ok(b) = u8::from_str_radix(tok, 16) {
                    out.push(b);
                    continue;
                }
            }
            break;
        }
    }
    out
}

#[test]
fn every_backing_image_has_its_own_view() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("chain");
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    sh(
        &dir,
        r#"
        q() { qemu-io "$@" >/dev/null; }
        head -c $((3*1024*1024+100)) /dev/zero | tr '\0' 'r' > a/raw.img
        qemu-img create -q -f qcow2 -b raw.img -F raw a/base.qcow2 32M
        q -c 'write -P 0xa0 1M 8M' a/base.qcow2
        qemu-img create -q -f qcow2 -b ../a/base.qcow2 -F qcow2 b/mid1.qcow2 48M
        q -c 'write -P 0xa1 1M 1M' b/mid1.qcow2
        qemu-img create -q -f qcow2 -b "$PWD/b/mid1.qcow2" -F qcow2 mid2.qcow2 64M
        q -c 'write -P 0xa2 2M 1M' -c 'write -z 0 64k' mid2.qcow2
        qemu-img create -q -f qcow2 -b mid2.qcow2 -F qcow2 top.qcow2
        q -c 'write -P 0xa3 3M 1M' top.qcow2
    "#,
    );
    let top = dir.join("top.qcow2");
    let m = Mount::new(&[&top], &tmp.path().join("mnt"));
    let scratch = tmp.path().join("scratch");
    m.assert_matches(&top, &scratch);
    let backing = m.image_dir("top.qcow2").join("backing");
    let expect = [
        ("1-mid2.qcow2", dir.join("mid2.qcow2")),
        ("2-mid1.qcow2", dir.join("b/mid1.qcow2")),
        ("3-base.qcow2", dir.join("a/base.qcow2")),
    ];
    for (entry, img) in &expect {
        check_against_oracle(&backing.join(entry).join("disk.raw"), img, &scratch).unwrap();
        let info: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(backing.join(entry).join("info.json")).unwrap()).unwrap();
        assert_eq!(info["format"], "qcow2");
    }
    // The raw file at the bottom: its bytes, padded to 512 as QEMU does.
    let raw = std::fs::read(backing.join("4-raw.img").join("disk.raw")).unwrap();
    let mut want = std::fs::read(dir.join("a/raw.img")).unwrap();
    want.resize(want.len().div_ceil(512) * 512, 0);
    assert!(raw == want, "raw backing view differs");
    let chain = m.info("top.qcow2")["backing_chain"].as_array().unwrap().len();
    assert_eq!(chain, 4);
}

#[test]
fn two_snapshots_loop_mount_at_once_and_show_their_own_files() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    std::fs::create_dir_all(dir.join("v1")).unwrap();
    std::fs::write(dir.join("v1/hello.txt"), "hello from version one\n").unwrap();
    std::fs::write(dir.join("v1/gone.txt"), "deleted in version two\n").unwrap();
    sh(
        &dir,
        r#"
        truncate -s 32M fs.raw
        mkfs.ext4 -q -F -d v1 fs.raw
        qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd fs.raw vm.qcow2
        qemu-img snapshot -c before-upgrade vm.qcow2
        printf 'hello from version two\n' > two.txt
        debugfs -w -R 'rm gone.txt' fs.raw >/dev/null 2>&1
        debugfs -w -R 'rm hello.txt' fs.raw >/dev/null 2>&1
        debugfs -w -R 'write two.txt hello.txt' fs.raw >/dev/null 2>&1
        debugfs -w -R 'write two.txt new.txt' fs.raw >/dev/null 2>&1
        qemu-io -c 'write -s fs.raw 0 32M' vm.qcow2 >/dev/null
        qemu-img snapshot -c after-upgrade vm.qcow2
    "#,
    );
    let img = dir.join("vm.qcow2");
    let m = Mount::new(&[&img], &tmp.path().join("mnt"));
    let snaps = m.image_dir("vm.qcow2").join("snapshots");
    let one = LoopMount::new(&snaps.join("before-upgrade/disk.raw"), &tmp.path().join("one"));
    let two = LoopMount::new(&snaps.join("after-upgrade/disk.raw"), &tmp.path().join("two"));
    assert_eq!(std::fs::read_to_string(one.dir.join("hello.txt")).unwrap(), "hello from version one\n");
    assert!(one.dir.join("gone.txt").exists());
    assert!(!one.dir.join("new.txt").exists());
    assert_eq!(std::fs::read_to_string(two.dir.join("hello.txt")).unwrap(), "hello from version two\n");
    assert_eq!(std::fs::read_to_string(two.dir.join("new.txt")).unwrap(), "hello from version two\n");
    assert!(!two.dir.join("gone.txt").exists());
}

/// Seeded random histories: writes, zero writes, discards, compressed writes,
/// snapshots taken, applied and deleted, resizes; every snapshot and the
/// current disk must read as QEMU says. Rerun one with SNAPMOUNT_TEST_SEED=N.
#[test]
fn random_snapshot_histories_match_qemu() {
    preflight();
    let seeds: Vec<u64> = match std::env::var("SNAPMOUNT_TEST_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (1..=6).collect(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    gen_data(&dir.join("data.bin"), 2 * MIB, 5);
    let mut imgs = Vec::new();
    for &seed in &seeds {
        let mut rng = Rng::new(seed);
        let v3 = rng.chance(70);
        let cluster: u64 = *rng.pick(&[4096, 16384, 65536]);
        let ext_l2 = v3 && cluster >= 16384 && rng.chance(40);
        let zstd = v3 && rng.chance(50);
        let with_backing = rng.chance(50);
        let mut size: u64 = rng.range(4, 12) * MIB;
        let name = format!("r{seed}.qcow2");
        let mut opts = format!("cluster_size={cluster},compat={}", if v3 { "1.1" } else { "0.10" });
        if ext_l2 {
            opts.push_str(",extended_l2=on");
        }
        if zstd {
            opts.push_str(",compression_type=zstd");
        }
        let img = dir.join(&name);
        if with_backing {
            let base = dir.join(format!("rb{seed}.qcow2"));
            create_qcow2(&base, "16M", "", None);
            qemu_io(&base, &["write -P 0xba 0 16M"]);
            create_qcow2(&img, &format!("{size}"), &opts, Some((base.file_name().unwrap().to_str().unwrap(), "qcow2")));
        } else {
            create_qcow2(&img, &format!("{size}"), &opts, None);
        }
        let mut live: Vec<String> = Vec::new();
        let mut next_snap = 0;
        for _ in 0..rng.range(8, 20) {
            let sectors = size / 512;
            let off = rng.below(sectors) * 512;
            let len = (rng.range(1, 256) * 512).min(size - off);
            let cmd = match rng.below(10) {
                0..=2 => format!("write -P {} {off} {len}", rng.below(256)),
                3 => format!("write -s data.bin {off} {}", len.min(2 * MIB)),
                4 if v3 => format!("write -z {off} {len}"),
                5 if v3 => format!("discard {off} {len}"),
                6 => {
                    let c = rng.below(size / cluster) * cluster;
                    if ext_l2 {
                        format!("write -P 9 {c} {cluster}")
                    } else {
                        format!("write -c -P 7 {c} {cluster}")
                    }
                }
                _ => {
                    match rng.below(6) {
                        0 if v3 => {
                            size += rng.range(1, 4) * MIB;
                            qemu_img_in(&dir, &["resize", "-q", &name, &size.to_string()]);
                        }
                        1 if !live.is_empty() => {
                            let victim = live.remove(rng.below(live.len() as u64) as usize);
                            qemu_img_in(&dir, &["snapshot", "-d", &victim, &name]);
                        }
                        2 if !live.is_empty() && v3 => {
                            let target = live[rng.below(live.len() as u64) as usize].clone();
                            qemu_img_in(&dir, &["snapshot", "-a", &target, &name]);
                            let info = qemu_img_in(&dir, &["info", "--output=json", &name]);
                            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
                            size = v["virtual-size"].as_u64().unwrap();
                        }
                        _ => {
                            next_snap += 1;
                            let s = format!("snap{next_snap}");
                            qemu_img_in(&dir, &["snapshot", "-c", &s, &name]);
                            live.push(s);
                        }
                    }
                    continue;
                }
            };
            // QEMU refuses compressed writes over allocated clusters: then
            // the same data is written plainly.
            let o = exec("qemu-io", &["-c", &cmd, img.to_str().unwrap()], Some(&dir), DEFAULT_TIMEOUT);
            if !o.success() || o.stdout.contains("failed") {
                assert!(cmd.starts_with("write -c"), "qemu-io {cmd} failed\n{}", o.describe());
                qemu_io(&img, &[cmd.replacen("write -c", "write", 1)]);
            }
        }
        eprintln!("seed {seed}: {opts} backing={with_backing} snapshots={live:?}");
        imgs.push(img);
    }
    let m = Mount::new(&imgs, &tmp.path().join("mnt"));
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    for img in &imgs {
        check_all_snapshots(&m, img, &scratch);
    }
    m.assert_all_match(&imgs, &scratch);
}
