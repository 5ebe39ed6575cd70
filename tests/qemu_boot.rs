//! QEMU attaches a mounted view as a plain raw disk and boots from it: a
//! boot sector that prints a marker on the serial port, kept in a qcow2
//! internal snapshot (the current state is broken) and in a HEXZ archive.
//! qemu-system-x86_64 comes from scripts/get-qemu-system.sh (Debian's
//! package unpacked into target/, next to the machine's newer qemu-utils).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MARKER: &str = "SNAPMOUNT-BOOT-OK";

/// 1 MiB disk whose boot sector prints MARKER on COM1 and halts:
/// xor ax,ax; mov ds,ax; mov dx,0x3f8; mov si,msg; .l: lodsb; test al,al;
/// jz .d; out dx,al; jmp .l; .d: cli; hlt; jmp .d; msg: "SNAPMOUNT-BOOT-OK\r\n"
fn boot_disk() -> Vec<u8> {
    let mut code = vec![
        0x31, 0xc0, 0x8e, 0xd8, 0xba, 0xf8, 0x03, 0xbe, 0x16, 0x7c, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8,
        0xfa, 0xf4, 0xeb, 0xfc,
    ];
    code.extend_from_slice(MARKER.as_bytes());
    code.extend_from_slice(b"\r\n\0");
    code.resize(510, 0);
    code.extend_from_slice(&[0x55, 0xaa]);
    code.resize(1 << 20, 0);
    code
}

fn qemu_dir() -> PathBuf {
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/get-qemu-system.sh"))
        .output()
        .expect("run scripts/get-qemu-system.sh");
    assert!(out.status.success(), "scripts/get-qemu-system.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Boots the disk under TCG; returns the serial output, stopping as soon
/// as the marker shows or after `wait`.
fn boot(qemu: &Path, disk: &Path, cache_none: bool, wait: Duration) -> String {
    let root = qemu.join("root");
    let mut drive = format!("file={},format=raw,readonly=on,if=virtio", disk.display());
    if cache_none {
        drive.push_str(",cache=none");
    }
    let mut child = Command::new(root.join("usr/bin/qemu-system-x86_64"))
        .env("QEMU_MODULE_DIR", root.join("usr/lib/x86_64-linux-gnu/qemu"))
        .args([
            "-L",
            root.join("usr/share/qemu").to_str().unwrap(),
            "-L",
            root.join("usr/share/seabios").to_str().unwrap(),
        ])
        .args(["-nographic", "-display", "none", "-monitor", "none", "-serial", "stdio", "-net", "none", "-no-reboot"])
        .args(["-m", "64", "-drive", &drive])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let start = Instant::now();
    while start.elapsed() < wait {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.extend_from_slice(&chunk);
            if String::from_utf8_lossy(&seen).contains(MARKER) {
                break;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("qemu exited early ({status}): {err}");
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn qemu_boots_from_a_snapshot_view_and_a_hexz_archive() {
    preflight();
    let qemu = qemu_dir();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("boot.raw"), boot_disk()).unwrap();
    qemu_img_in(&dir, &["convert", "-f", "raw", "-O", "qcow2", "-c", "boot.raw", "vm.qcow2"]);
    std::fs::remove_file(dir.join("boot.raw")).unwrap();
    qemu_img_in(&dir, &["snapshot", "-c", "bootable", "vm.qcow2"]);
    // The current state no longer boots: its boot sector is gone.
    qemu_io(&dir.join("vm.qcow2"), &["write -z 0 64k"]);
    let hexz = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hexz/boot.hxz");
    std::fs::copy(&hexz, dir.join("boot.hxz")).unwrap();

    let m = Mount::new(&[&dir], &tmp.path().join("mnt"));
    let snapshot = m.image_dir("vm.qcow2").join("snapshots/bootable/disk.raw");
    let archive = m.disk("boot.hxz");
    for disk in [&snapshot, &archive] {
        for cache_none in [true, false] {
            let out = boot(&qemu, disk, cache_none, Duration::from_secs(60));
            assert!(
                out.contains(MARKER),
                "{} (cache=none: {cache_none}) did not boot; serial output:\n{out}",
                disk.display()
            );
        }
    }
    let out = boot(&qemu, &m.disk("vm.qcow2"), true, Duration::from_secs(8));
    assert!(!out.contains(MARKER), "the broken current state must not boot; serial output:\n{out}");
}
