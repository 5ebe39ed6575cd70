//! qcow version 1 against QEMU: plain, compressed, AES-encrypted, and in
//! backing chains with raw and qcow2 images (either way round), mounted and
//! compared with `qemu-img convert -O raw`.

mod common;
use common::*;

/// Random writes over the first 7 MiB (images made with a backing file
/// have 512-byte clusters, the others 4 KiB) as qemu-io commands: compressed
/// whole clusters first where `cluster` is given (a compressed write needs a
/// cluster never written), then plain writes over anything.
fn writes(rng: &mut Rng, n: usize, cluster: Option<u64>) -> String {
    let mut compressed = Vec::new();
    let mut plain = String::new();
    for _ in 0..n {
        match cluster {
            Some(cs) if rng.chance(30) => {
                let c = rng.below(7 * MIB / cs);
                if !compressed.iter().any(|(k, _)| *k == c) {
                    compressed.push((c, format!(" -c 'write -c -P {} {} {cs}'", 1 + rng.below(250), c * cs)));
                }
            }
            _ => {
                let at = rng.below(7 * MIB / 512 - 300) * 512;
                plain.push_str(&format!(" -c 'write -P {} {at} {}'", 1 + rng.below(250), 512 * (1 + rng.below(256))));
            }
        }
    }
    compressed.into_iter().map(|(_, c)| c).collect::<String>() + &plain
}

#[test]
fn qcow_version_1_reads_back_as_qemu_reads_it() {
    preflight();
    let seed = test_seed(3);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(seed);
    gen_data(&dir.join("src.raw"), 6 * MIB, seed);
    let s = "--object secret,id=s0,data=v1-password";
    let aes = "driver=qcow,file.filename=aes.qcow,encrypt.key-secret=s0";
    bash(
        dir,
        &format!(
            r#"
        qemu-img create -q -f qcow plain.qcow 8M
        qemu-io -f qcow {} plain.qcow >/dev/null
        qemu-img create -q -f qcow compressed.qcow 8M
        qemu-io -f qcow {} compressed.qcow >/dev/null
        qemu-img create -q -f qcow {s} -o encrypt.format=aes,encrypt.key-secret=s0 aes.qcow 8M
        qemu-io {s} --image-opts {aes} {} >/dev/null
        qemu-img create -q -f raw base.raw 8M
        qemu-io -f raw -c 'write -s src.raw 1M 6M' base.raw >/dev/null
        qemu-img create -q -f qcow -b base.raw -F raw over-raw.qcow 8M
        qemu-io -f qcow {} over-raw.qcow >/dev/null
        qemu-img create -q -f qcow2 -o cluster_size=4096 base.qcow2 8M
        qemu-io -f qcow2 -c 'write -s src.raw 0 6M' base.qcow2 >/dev/null
        qemu-img create -q -f qcow -b base.qcow2 -F qcow2 over-qcow2.qcow 8M
        qemu-io -f qcow {} over-qcow2.qcow >/dev/null
        qemu-img create -q -f qcow2 -b over-raw.qcow -F qcow top.qcow2 8M
        qemu-io -f qcow2 {} top.qcow2 >/dev/null
        for f in plain.qcow compressed.qcow over-raw.qcow over-qcow2.qcow; do qemu-img convert -f qcow -O raw $f $f.raw; done
        qemu-img convert -O raw top.qcow2 top.qcow2.raw
        qemu-img convert {s} --image-opts {aes} -O raw aes.qcow.raw
    "#,
            writes(&mut rng, 30, Some(4096)),
            writes(&mut rng, 200, Some(4096)),
            writes(&mut rng, 30, Some(4096)),
            writes(&mut rng, 20, Some(512)),
            writes(&mut rng, 20, Some(512)),
            writes(&mut rng, 10, None),
        ),
    );
    std::fs::write(dir.join("pw"), "v1-password").unwrap();
    let pw = dir.join("pw");
    let names = ["plain.qcow", "compressed.qcow", "aes.qcow", "over-raw.qcow", "over-qcow2.qcow", "top.qcow2"];
    let sources: Vec<_> = names.iter().map(|n| dir.join(n)).collect();
    let arg = format!("aes.qcow={}", pw.display());
    let m = Mount::with_args(&["--password-file", &arg], &sources, &dir.join("mnt"));
    for name in names {
        files_equal(&m.disk(name), &dir.join(format!("{name}.raw"))).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for name in &names[..5] {
        let info = m.info(name);
        assert_eq!((info["format"].as_str(), info["version"].as_u64()), (Some("qcow"), Some(1)), "{name}");
    }
    assert_eq!(m.info("aes.qcow")["encryption"]["format"], "aes");
    let backing = m.image_dir("top.qcow2").join("backing");
    files_equal(&backing.join("1-over-raw.qcow/disk.raw"), &dir.join("over-raw.qcow.raw")).unwrap();
    files_equal(&backing.join("2-base.raw/disk.raw"), &dir.join("base.raw")).unwrap();
}
