//! The kernel reads our views as block devices: ext4 inside a snapshot view,
//! a backing-chain view and a HEXZ archive, loop-mounted at the same time;
//! and the partition table of a GPT disk, seen through `losetup -r` + partx.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;

/// An ext4 image holding `files` (name, content), made without mounting.
fn ext4_image(dir: &Path, name: &str, files: &[(&str, &str)]) {
    let root = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&root).unwrap();
    for (f, content) in files {
        std::fs::write(root.join(f), content).unwrap();
    }
    let raw = dir.join(name);
    std::fs::File::create(&raw).unwrap().set_len(16 << 20).unwrap();
    run("mkfs.ext4", &[OsStr::new("-q"), OsStr::new("-F"), OsStr::new("-d"), root.as_os_str(), raw.as_os_str()]);
}

#[test]
fn ext4_in_a_snapshot_a_backing_view_and_a_hexz_archive_at_once() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    ext4_image(&dir, "v1.raw", &[("version", "one\n")]);
    ext4_image(&dir, "v2.raw", &[("version", "two\n")]);
    // base.qcow2 holds v1; top.qcow2 over it holds v2 (all blocks rewritten)
    // with an internal snapshot of it, then its current state is wiped.
    qemu_img_in(&dir, &["convert", "-f", "raw", "-O", "qcow2", "v1.raw", "base.qcow2"]);
    create_qcow2(&dir.join("top.qcow2"), "16M", "compression_type=zstd", Some(("base.qcow2", "qcow2")));
    qemu_io(&dir.join("top.qcow2"), &["write -s v2.raw 0 16M"]);
    qemu_img_in(&dir, &["snapshot", "-c", "v2", "top.qcow2"]);
    qemu_io(&dir.join("top.qcow2"), &["write -z 0 16M"]);
    for f in ["v1.raw", "v2.raw"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    let ext4_hxz = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hexz/ext4.hxz");
    let m = Mount::new(&[&dir.join("top.qcow2"), &ext4_hxz], &tmp.path().join("mnt"));
    let top = m.image_dir("top.qcow2");
    let snap = LoopMount::new(&top.join("snapshots/v2/disk.raw"), &tmp.path().join("snap"));
    let base = LoopMount::new(&top.join("backing/1-base.qcow2/disk.raw"), &tmp.path().join("base"));
    let hexz = LoopMount::new(&m.disk("ext4.hxz"), &tmp.path().join("hexz"));
    assert_eq!(std::fs::read_to_string(snap.dir.join("version")).unwrap(), "two\n");
    assert_eq!(std::fs::read_to_string(base.dir.join("version")).unwrap(), "one\n");
    assert_eq!(std::fs::read_to_string(hexz.dir.join("etc/motd")).unwrap(), "Welcome to the fixture VM\n");
}

/// Detaches a loop device on drop.
struct LoopDev(String);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = exec("losetup", &["-d", &self.0], None, std::time::Duration::from_secs(30));
    }
}

#[test]
fn a_gpt_disk_shows_its_partitions() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("gpt.raw");
    std::fs::File::create(&raw).unwrap().set_len(16 << 20).unwrap();
    let o = exec_stdin("sfdisk", &["-q", raw.to_str().unwrap()], "label: gpt\nsize=4MiB, name=first\nname=second\n");
    assert!(o.0, "sfdisk failed: {}", o.1);
    qemu_img_in(&dir, &["convert", "-f", "raw", "-O", "qcow2", "gpt.raw", "gpt.qcow2"]);
    let m = Mount::new(&[&dir.join("gpt.qcow2")], &tmp.path().join("mnt"));
    let dev =
        run("losetup", &[OsStr::new("-r"), OsStr::new("-f"), OsStr::new("--show"), m.disk("gpt.qcow2").as_os_str()]);
    let dev = LoopDev(dev.trim().to_string());
    let parts = run("partx", &["-g", "-o", "NR,START,SECTORS,NAME", &dev.0]);
    let rows: Vec<Vec<&str>> = parts.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "two partitions: {parts}");
    assert_eq!(rows[0][0], "1");
    assert_eq!(rows[0][2], (4 * 2048).to_string(), "4 MiB first partition: {parts}");
    assert_eq!((rows[0][3], rows[1][3]), ("first", "second"), "{parts}");
    // The same table as the raw file itself says.
    let direct = run("partx", &["-g", "-o", "NR,START,SECTORS,NAME", raw.to_str().unwrap()]);
    assert_eq!(parts, direct);
}

fn exec_stdin(cmd: &str, args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}
