//! Remote sources: images served by real servers on 127.0.0.1 (nginx for
//! HTTP, SeaweedFS `weed mini` for S3; tests/common/remote.rs) and mounted
//! by URL (`http://…`, `s3://BUCKET/KEY`, `s3://BUCKET/PREFIX/`). Every view
//! is compared byte for byte with the oracle of the same files on local disk
//! (`qemu-img convert`, `qemu-img snapshot -a` on a copy, the data hexz
//! packed), and nginx's access log says what went over the wire.
//!
//! Needs what `scripts/test.sh` installs: nginx-light, the venv
//! `target/tools/venv` with SeaweedFS 4.48 and boto3, hexz-cli 0.8.2.
//! Run: `cargo test --release --test remote -- --test-threads=2`.
//! Randomized data: SNAPMOUNT_TEST_SEED; SNAPMOUNT_TEST_KEEP=1 keeps the
//! test directories.

mod common;

use common::remote::*;
use common::*;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// No variables for the daemon (HTTP needs no credentials).
const NO_ENV: &[(&str, &str)] = &[];

fn setup(name: &str) -> Site {
    Site::new(&format!("snapmount-remote-{name}-"))
}

fn hexz(dir: &Path, args: &[&str]) {
    let o = exec(hexz_bin().to_str().unwrap(), args, Some(dir), DEFAULT_TIMEOUT);
    assert!(o.success(), "hexz failed\n{}", o.describe());
}

/// `HEXZ_PASSWORD=PW hexz ARGS` in `dir`.
fn hexz_with_password(dir: &Path, pw: &str, args: &[&str]) {
    let out = std::process::Command::new(hexz_bin())
        .args(args)
        .current_dir(dir)
        .env("HEXZ_PASSWORD", pw)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("hexz runs");
    assert!(out.status.success(), "hexz {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A disk-like raw file: `gen_data` with a zero stretch in the middle.
fn disk_data(path: &Path, len: u64, seed: u64) {
    gen_data(path, len, seed);
    let mut bytes = std::fs::read(path).unwrap();
    let at = (len / 3) as usize;
    bytes[at..at + (len / 8) as usize].fill(0);
    std::fs::write(path, bytes).unwrap();
}

/// `got` equals `expected` whole, and in `reads` random unaligned O_DIRECT reads.
fn compare(got: &Path, expected: &Path, seed: u64, reads: usize) -> Result<(), String> {
    files_equal(got, expected).and_then(|_| random_direct_reads(got, expected, seed, reads))
}

/// The expected raw content of snapshot `id` of `img`, from `qemu-img
/// snapshot -a` on a copy beside it (so relative backing names resolve).
fn snapshot_oracle(img: &Path, id: &str, out: &Path) {
    let dir = img.parent().unwrap();
    let copy = dir.join(format!(".oracle-{}", img.file_name().unwrap().to_string_lossy()));
    std::fs::copy(img, &copy).unwrap();
    run_in(Some(dir), "qemu-img", &["snapshot", "-a", id, s(&copy)]);
    oracle_raw(&copy, out);
    std::fs::remove_file(&copy).unwrap();
}

fn info_of(view: &Path) -> serde_json::Value {
    let p = view.join("info.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

/// Every view of the qcow2 image `img` under `view` (`MNT/<name>`): its
/// disk.raw, the disk.raw of each snapshot its info.json lists, and
/// `backing/<n>-<file>/disk.raw` for each local file of `backing` (the
/// direct backing file first). Returns the failures.
fn check_qcow2_views(view: &Path, img: &Path, backing: &[&Path], scratch: &Path, seed: u64) -> Vec<String> {
    let mut errs = Vec::new();
    let name = img.file_name().unwrap().to_string_lossy().into_owned();
    let exp = scratch.join(format!("{name}.expected.raw"));
    oracle_raw(img, &exp);
    if let Err(e) = compare(&view.join("disk.raw"), &exp, seed, 40) {
        errs.push(format!("{name} disk.raw: {e}"));
    }
    std::fs::remove_file(&exp).unwrap();
    let info = info_of(view);
    let snaps = info["snapshots"].as_array().cloned().unwrap_or_default();
    for (i, snap) in snaps.iter().enumerate() {
        let entry = snap["entry"].as_str().expect("entry");
        let id = snap["id"].as_str().expect("id");
        let exp = scratch.join(format!("{name}.snap{id}.raw"));
        snapshot_oracle(img, id, &exp);
        if let Err(e) = compare(&view.join("snapshots").join(entry).join("disk.raw"), &exp, seed + 1 + i as u64, 20) {
            errs.push(format!("{name} snapshot {id} ({entry}): {e}"));
        }
        std::fs::remove_file(&exp).unwrap();
    }
    for (n, b) in backing.iter().enumerate() {
        let bname = b.file_name().unwrap().to_string_lossy().into_owned();
        let dir = view.join("backing").join(format!("{}-{bname}", n + 1));
        let exp = scratch.join(format!("{name}.backing{}.raw", n + 1));
        oracle_raw(b, &exp);
        if let Err(e) = compare(&dir.join("disk.raw"), &exp, seed + 100 + n as u64, 20) {
            errs.push(format!("{name} backing {} ({bname}): {e}", n + 1));
        }
        std::fs::remove_file(&exp).unwrap();
    }
    errs
}

/// Panics with every failure at once.
fn assert_none(errs: Vec<String>) {
    assert!(errs.is_empty(), "{} views differ from the local oracle:\n{}", errs.len(), errs.join("\n\n"));
}

/// nginx saw the reads of a mount as the spec says: every GET is a ranged
/// GET answered 206 (or an open probe `bytes=0-0`), every data GET carries
/// If-Match, and no path still holds a `..`.
fn assert_ranged_pinned_gets(ngx: &Nginx) {
    let gets = ngx.gets();
    assert!(!gets.is_empty(), "the mount read nothing from nginx");
    for g in &gets {
        assert!(g.range.is_some() && g.status == 206, "a GET without a satisfied Range: {g:?}");
        assert!(g.is_open_probe() || g.if_match.is_some(), "a data GET without If-Match: {g:?}");
        assert!(!g.uri.contains("/../") && !g.uri.contains("/./"), "an unnormalized path: {g:?}");
    }
}

/// The command fails (exit non-zero) with one line on stderr that holds
/// every word of `words` (case-insensitive), and nothing is mounted.
fn refused<K: AsRef<str>, V: AsRef<str>>(env: &[(K, V)], args: &[&str], mnt: &Path, words: &[&str]) -> String {
    std::fs::create_dir_all(mnt).unwrap();
    let o = snapmount_env(env, args);
    assert!(!o.success(), "should fail\n{}", o.describe());
    assert!(!o.timed_out(), "should fail at once\n{}", o.describe());
    let err = o.stderr.trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line on stderr\n{}", o.describe());
    let low = err.to_lowercase();
    for w in words {
        assert!(low.contains(&w.to_lowercase()), "the message lacks {w:?}: {err}");
    }
    assert!(!is_mountpoint(mnt), "{} is mounted after a refusal", mnt.display());
    err
}

/// Under `www/vm`: `comp.qcow2`, `qemu-img convert -c` (zstd) of a disk,
/// and `ext.qcow2`: extended L2, 128 KiB clusters, subcluster writes and
/// zeroes, with a snapshot.
fn make_compressed_and_extended_l2(www: &Path, scratch: &Path, seed: u64) {
    std::fs::create_dir_all(www.join("vm")).unwrap();
    disk_data(&scratch.join("comp-src.raw"), 24 * MIB, seed + 2);
    gen_data(&scratch.join("e4.bin"), 4 * MIB, seed + 3);
    bash(
        &www.join("vm"),
        &format!(
            r#"
            q() {{ qemu-io "$@" >/dev/null; }}
            qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd {comp} comp.qcow2
            qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k ext.qcow2 32M
            q -c 'write -P 0x11 4k 4k' -c "write -s {e4} 1M 3M" -c 'write -z 1028k 8k' -c 'write -P 0x12 9000k 5000' ext.qcow2
            qemu-img snapshot -c e1 ext.qcow2
            q -c 'write -P 0x13 2M 12k' -c 'write -z 3M 4k' -c 'write -P 0x14 31M 1M' ext.qcow2
            "#,
            comp = s(&scratch.join("comp-src.raw")),
            e4 = s(&scratch.join("e4.bin")),
        ),
    );
}

// ---------------------------------------------------------------------------
// HTTP (nginx)
// ---------------------------------------------------------------------------

/// A qcow2 chain whose backing file is in another folder (`../base/…`,
/// resolved against the URL), internal snapshots, a compressed image and an
/// extended-L2 image, all over HTTP in one mount: every view equals the
/// local oracle, and nginx only saw ranged, If-Match-pinned GETs of
/// normalized paths, the base included.
#[test]
fn http_chain_snapshots_compressed_and_extended_l2_match_local_oracles() {
    let t = setup("http-qcow2");
    let seed = test_seed(11);
    make_chain(&t.www, &t.scratch, seed);
    make_compressed_and_extended_l2(&t.www, &t.scratch, seed);
    let ngx = Nginx::serve(&t.www);
    let names = ["top.qcow2", "comp.qcow2", "ext.qcow2"];
    let urls: Vec<PathBuf> = names.iter().map(|n| PathBuf::from(ngx.url(&format!("vm/{n}")))).collect();
    let m = mount_with_env(NO_ENV, &[], &urls, &t.mnt("mnt"));
    assert_eq!(m.entries(), ["comp.qcow2", "ext.qcow2", "top.qcow2"]);
    let vm = t.www.join("vm");
    let base = t.www.join("base/base.qcow2");
    let mut errs = check_qcow2_views(&m.image_dir("top.qcow2"), &vm.join("top.qcow2"), &[&base], &t.scratch, seed);
    errs.extend(check_qcow2_views(&m.image_dir("comp.qcow2"), &vm.join("comp.qcow2"), &[], &t.scratch, seed + 10));
    errs.extend(check_qcow2_views(&m.image_dir("ext.qcow2"), &vm.join("ext.qcow2"), &[], &t.scratch, seed + 20));
    assert_none(errs);
    let info = m.info("top.qcow2");
    let snaps: Vec<&str> = info["snapshots"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(snaps, ["before", "after edits"], "{info}");
    assert_eq!(m.info("comp.qcow2")["compression_type"], "zstd");
    assert_eq!(m.info("ext.qcow2")["cluster_size"], 128 * 1024);
    assert_eq!(info["backing_chain"].as_array().map(|c| c.len()), Some(1), "{info}");
    // `export URL@SNAPSHOT` writes what the snapshot view shows.
    let out = t.scratch.join("exported.raw");
    let src = format!("{}@before", urls[0].display());
    let o = snapmount_env(NO_ENV, &["export", src.as_str(), s(&out)]);
    assert!(o.success(), "{}", o.describe());
    let exp = t.scratch.join("before.expected.raw");
    snapshot_oracle(&vm.join("top.qcow2"), "before", &exp);
    assert_files_equal(&out, &exp);
    // The base came from the server, at the resolved URL.
    assert!(ngx.gets().iter().any(|g| g.uri == "/base/base.qcow2" && !g.is_open_probe()), "{:?}", ngx.gets());
    assert_ranged_pinned_gets(&ngx);
}

/// A thin HEXZ chain (child in one folder, its parent named
/// `../base/base.hxz`) and an encrypted archive over HTTP: the child's disk,
/// its parent's view and the decrypted disk equal the data hexz packed. A
/// wrong password is refused.
#[test]
fn http_hexz_thin_chain_and_encrypted_archive_match_their_sources() {
    let t = setup("http-hexz");
    let seed = test_seed(21);
    let hx = t.www.join("hx");
    for d in ["base", "child"] {
        std::fs::create_dir_all(hx.join(d)).unwrap();
    }
    let base_raw = t.scratch.join("base.raw");
    disk_data(&base_raw, 24 * MIB, seed);
    let mut child = std::fs::read(&base_raw).unwrap();
    child.splice(96_000..96_000, std::iter::repeat_n(0xAB, 70));
    let mut rng = Rng::new(seed);
    rng.fill(&mut child[5_000_000..5_700_000]);
    rng.fill(&mut child[20_000_000..20_100_000]);
    let child_raw = t.scratch.join("child.raw");
    std::fs::write(&child_raw, &child).unwrap();
    hexz(&hx.join("base"), &["pack", "-s", s(&base_raw), "base.hxz"]);
    hexz(&hx.join("child"), &["pack", "-s", s(&child_raw), "child.hxz", "--base", "../base/base.hxz"]);
    let enc_raw = t.scratch.join("enc.raw");
    disk_data(&enc_raw, 16 * MIB, seed + 1);
    hexz_with_password(&hx, "correct horse", &["pack", "-s", s(&enc_raw), "enc.hxz", "--encrypt"]);
    let pw = t.root.join("pw.txt");
    std::fs::write(&pw, "correct horse\n").unwrap();
    let wrong = t.root.join("wrong.txt");
    std::fs::write(&wrong, "wrong\n").unwrap();

    let ngx = Nginx::serve(&t.www);
    let child_url = ngx.url("hx/child/child.hxz");
    let enc_url = ngx.url("hx/enc.hxz");
    let mnt = t.mnt("mnt");
    refused(NO_ENV, &["mount", "--password-file", s(&wrong), &enc_url, s(&mnt)], &mnt, &["enc.hxz", "wrong password"]);

    let m = mount_with_env(NO_ENV, &["--password-file", s(&pw)], &[Path::new(&child_url), Path::new(&enc_url)], &mnt);
    assert_eq!(m.entries(), ["child.hxz", "enc.hxz"]);
    let mut errs = Vec::new();
    for (got, want, sd) in [
        (m.disk("child.hxz"), &child_raw, seed),
        (m.image_dir("child.hxz").join("backing/1-base.hxz/disk.raw"), &base_raw, seed + 1),
        (m.disk("enc.hxz"), &enc_raw, seed + 2),
    ] {
        if let Err(e) = compare(&got, want, sd, 40) {
            errs.push(e);
        }
    }
    assert_none(errs);
    assert!(m.info("child.hxz")["blocks"]["parent_refs"].as_u64().unwrap() > 0, "the child is thin");
    assert_eq!(m.info("enc.hxz")["encryption"]["cipher"], "aes-256-gcm");
    assert!(ngx.gets().iter().any(|g| g.uri == "/hx/base/base.hxz" && !g.is_open_probe()), "{:?}", ngx.gets());
    assert_ranged_pinned_gets(&ngx);
}

/// A percent-encoded URL (`some%20dir/my%20disk.qcow2`) mounts as
/// `my disk.qcow2`, and its backing file `base.qcow2` resolves in the same
/// (encoded) folder.
#[test]
fn http_percent_encoded_name_is_decoded_for_the_directory() {
    let t = setup("http-space");
    let seed = test_seed(31);
    let dir = t.www.join("some dir");
    std::fs::create_dir_all(&dir).unwrap();
    gen_data(&t.scratch.join("d.bin"), 4 * MIB, seed);
    bash(
        &dir,
        &format!(
            r#"
            qemu-img create -q -f qcow2 base.qcow2 16M
            qemu-io -c "write -s {d} 0 4M" base.qcow2 >/dev/null
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 'my disk.qcow2'
            qemu-io -c 'write -P 0x61 2M 3M' 'my disk.qcow2' >/dev/null
            "#,
            d = s(&t.scratch.join("d.bin"))
        ),
    );
    let ngx = Nginx::serve(&t.www);
    let url = ngx.url("some%20dir/my%20disk.qcow2");
    let m = mount_with_env(NO_ENV, &[], &[Path::new(&url)], &t.mnt("mnt"));
    assert_eq!(m.entries(), ["my disk.qcow2"]);
    let img = dir.join("my disk.qcow2");
    assert_none(check_qcow2_views(&m.image_dir("my disk.qcow2"), &img, &[&dir.join("base.qcow2")], &t.scratch, seed));
    let uris: Vec<String> = ngx.gets().into_iter().map(|g| g.uri).collect();
    assert!(uris.iter().any(|u| u == "/some%20dir/my%20disk.qcow2"), "{uris:?}");
    assert!(uris.iter().any(|u| u == "/some%20dir/base.qcow2"), "{uris:?}");
}

/// Refusals: a server that ignores Range (python's http.server answers 200
/// with the whole file), and a remote image naming an absolute local path as
/// its backing file (a real local qcow2, and /etc/passwd) -- each names the
/// URL. With `--backing-map OLD=URL` the first mounts and matches.
#[test]
fn http_refuses_servers_without_range_and_local_backing_paths_unless_mapped() {
    let t = setup("http-refusals");
    let seed = test_seed(41);
    std::fs::create_dir_all(t.www.join("base")).unwrap();
    std::fs::create_dir_all(t.www.join("abs")).unwrap();
    let base = t.www.join("base/base.qcow2");
    gen_data(&t.scratch.join("d.bin"), 4 * MIB, seed);
    bash(
        &t.www,
        &format!(
            r#"
            qemu-img create -q -f qcow2 base/base.qcow2 16M
            qemu-io -c "write -s {d} 0 4M" -c 'write -P 0x42 10M 1M' base/base.qcow2 >/dev/null
            qemu-img create -q -f qcow2 -b {base} -F qcow2 abs/top.qcow2
            qemu-io -c 'write -P 0x43 3M 2M' abs/top.qcow2 >/dev/null
            qemu-img create -q -f qcow2 -b /etc/passwd -F raw abs/etc.qcow2 16M
            qemu-img convert -f raw -O qcow2 {d} plain.qcow2
            "#,
            d = s(&t.scratch.join("d.bin")),
            base = s(&base),
        ),
    );
    let mnt = t.mnt("mnt");

    // No Range support.
    let plain = PlainHttp::serve(&t.www);
    let url = plain.url("plain.qcow2");
    refused(NO_ENV, &["mount", &url, s(&mnt)], &mnt, &[&url, "range"]);
    drop(plain);

    let ngx = Nginx::serve(&t.www);
    let top_url = ngx.url("abs/top.qcow2");
    let etc_url = ngx.url("abs/etc.qcow2");
    let base_url = ngx.url("base/base.qcow2");
    refused(NO_ENV, &["mount", &top_url, s(&mnt)], &mnt, &[&top_url]);
    refused(NO_ENV, &["mount", &etc_url, s(&mnt)], &mnt, &[&etc_url]);
    refused(NO_ENV, &["info", &top_url], &mnt, &[&top_url]);
    assert!(!ngx.gets().iter().any(|g| g.uri.contains("base")), "nothing of the base was read: {:?}", ngx.gets());

    // Mapped to the URL of the same file: mounts, and reads the base remotely.
    let map = format!("{}={base_url}", s(&base));
    let m = mount_with_env(NO_ENV, &["--backing-map", &map], &[Path::new(&top_url)], &mnt);
    let top = t.www.join("abs/top.qcow2");
    assert_none(check_qcow2_views(&m.image_dir("top.qcow2"), &top, &[&base], &t.scratch, seed));
    assert!(ngx.gets().iter().any(|g| g.uri == "/base/base.qcow2" && !g.is_open_probe()), "{:?}", ngx.gets());
    assert_ranged_pinned_gets(&ngx);
}

/// (path, first, last) of each ranged GET that nginx answered in full
/// (206, every byte of the range sent).
fn fetched_ranges(ngx: &Nginx) -> Vec<(String, u64, u64)> {
    ngx.gets()
        .iter()
        .filter(|g| g.status == 206)
        .filter_map(|g| {
            let (a, b) = g.range.as_deref()?.strip_prefix("bytes=")?.split_once('-')?;
            let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
            (g.bytes == b - a + 1).then(|| (g.uri.clone(), a, b))
        })
        .collect()
}

/// Waits (at most 10 s) until nginx has logged no new GET for half a
/// second: the daemon's fetches, read-ahead included, are over.
fn settle(ngx: &Nginx) {
    let mut count = usize::MAX;
    wait_for(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = ngx.get_count();
        std::mem::replace(&mut count, now) == now
    });
}

/// Where guest byte `guest` of the qcow2 `img` is stored in its file, if
/// it is allocated there (`qemu-img map`).
fn host_offset(img: &Path, guest: u64) -> Option<u64> {
    let map: serde_json::Value = serde_json::from_str(&qemu_img(&["map", "--output=json", s(img)])).unwrap();
    map.as_array().unwrap().iter().find_map(|e| {
        let (start, len) = (e["start"].as_u64()?, e["length"].as_u64()?);
        let inside = start <= guest && guest < start + len && e["data"].as_bool() == Some(true);
        inside.then(|| e["offset"].as_u64().map(|o| o + guest - start)).flatten()
    })
}

/// An object replaced on the server while mounted (a new file renamed over
/// it: new ETag): what was read still reads the same or fails, data not yet
/// fetched fails with EIO -- never old or new bytes -- and the daemon log
/// says "object changed" with the URL. nginx answered the pinned GET with
/// 412.
#[test]
fn http_replaced_object_fails_unread_data_with_eio() {
    let t = setup("http-replaced");
    let seed = test_seed(51);
    let src_old = t.scratch.join("old.raw");
    let src_new = t.scratch.join("new.raw");
    gen_data(&src_old, 64 * MIB, seed);
    gen_data(&src_new, 64 * MIB, seed + 1);
    let img = t.www.join("rep.qcow2");
    let next = t.scratch.join("rep-new.qcow2");
    raw_to_qcow2(&src_old, &img);
    raw_to_qcow2(&src_new, &next);
    let old_raw = t.scratch.join("old.expected.raw");
    let new_raw = t.scratch.join("new.expected.raw");
    oracle_raw(&img, &old_raw);
    oracle_raw(&next, &new_raw);

    let ngx = Nginx::serve(&t.www);
    let url = ngx.url("rep.qcow2");
    let log = t.root.join("daemon.log");
    let m =
        mount_with_env(NO_ENV, &["--log-file", s(&log), "--remote-timeout", "10"], &[Path::new(&url)], &t.mnt("mnt"));
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(m.disk("rep.qcow2")).unwrap();
    let old = std::fs::read(&old_raw).unwrap();
    let new = std::fs::read(&new_raw).unwrap();
    let len = 64 * KIB as usize;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == old[..len], "the first read gives the opened version");

    // Once the daemon's fetches (read-ahead included) are over: a stretch
    // of the disk whose clusters nothing fetched, with 1 MiB to spare on
    // either side, from the end of the file down.
    settle(&ngx);
    let before = fetched_ranges(&ngx);
    let at = (4..64u64)
        .rev()
        .map(|i| i * MIB - len as u64)
        .find(|&g| {
            host_offset(&img, g).is_some_and(|h| {
                let (lo, hi) = (h.saturating_sub(MIB), h + len as u64 + MIB);
                before.iter().all(|&(_, a, b)| b < lo || a >= hi)
            })
        })
        .unwrap_or_else(|| panic!("the daemon fetched the whole image before anything asked for it: {before:?}"))
        as usize;

    replace_file(&img, &next);
    for attempt in 0..2 {
        match f.read_exact_at(&mut buf, at as u64) {
            Ok(()) => panic!(
                "read #{attempt} at {at} of data not fetched before the replacement succeeded ({} bytes); nginx sent \
                 before: {before:?}",
                if buf == old[at..at + len] {
                    "old"
                } else if buf == new[at..at + len] {
                    "new"
                } else {
                    "mixed"
                },
            ),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "read #{attempt} at {at}: {e}"),
        }
    }
    // What was read before: the same bytes, or EIO; never the new ones.
    match f.read_exact_at(&mut buf, 0) {
        Ok(()) => assert!(buf == old[..len], "an earlier read now gives other bytes"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    let said = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("object changed") && l.contains(&url))
    });
    assert!(
        said,
        "no log line with \"object changed\" and {url}:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(ngx.gets().iter().any(|g| g.status == 412), "nginx refused a pinned GET: {:?}", ngx.gets());
    drop(f);
}

/// `--cache-dir`: a second mount with the same cache directory reads the
/// whole disk (a chain of two images) again, and the bytes still match,
/// without one GET of anything the first mount fetched: only the opens
/// reach the server (HEAD; or a GET of bytes 0-0), and read-ahead of what
/// the first mount never fetched.
#[test]
fn http_cache_dir_serves_a_second_mount_without_refetching() {
    let t = setup("http-cache-dir");
    let seed = test_seed(61);
    std::fs::create_dir_all(t.www.join("base")).unwrap();
    std::fs::create_dir_all(t.www.join("vm")).unwrap();
    gen_data(&t.scratch.join("b.raw"), 32 * MIB, seed);
    gen_data(&t.scratch.join("d.bin"), 8 * MIB, seed + 1);
    raw_to_qcow2(&t.scratch.join("b.raw"), &t.www.join("base/base.qcow2"));
    bash(
        &t.www.join("vm"),
        &format!(
            r#"
            qemu-img create -q -f qcow2 -b ../base/base.qcow2 -F qcow2 top.qcow2
            qemu-io -c "write -s {d} 4M 8M" -c 'write -c -P 0x33 20M 2M' top.qcow2 >/dev/null
            "#,
            d = s(&t.scratch.join("d.bin"))
        ),
    );
    let top = t.www.join("vm/top.qcow2");
    let expected = t.scratch.join("top.expected.raw");
    oracle_raw(&top, &expected);
    let ngx = Nginx::serve(&t.www);
    let url = ngx.url("vm/top.qcow2");
    let cache = t.root.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let args = ["--cache-dir", s(&cache)];
    let mnt = t.mnt("mnt");

    let m = mount_with_env(NO_ENV, &args, &[Path::new(&url)], &mnt);
    assert_files_equal(&m.disk("top.qcow2"), &expected);
    settle(&ngx);
    drop(m);
    assert!(!is_mountpoint(&mnt));
    let first = fetched_ranges(&ngx);
    let data_bytes: u64 = first.iter().map(|(_, a, b)| b - a + 1).sum();
    assert!(data_bytes >= 16 * MIB, "the first mount read its data from nginx ({data_bytes} bytes)");
    let cached = exec("du", &["-sb", s(&cache)], None, Duration::from_secs(30));
    let cached: u64 = cached.stdout.split_whitespace().next().unwrap_or("0").parse().unwrap_or(0);
    assert!(cached >= 8 * MIB, "the cache directory holds the data ({cached} bytes)");

    ngx.clear_log();
    let m = mount_with_env(NO_ENV, &args, &[Path::new(&url)], &mnt);
    assert_files_equal(&m.disk("top.qcow2"), &expected);
    random_direct_reads(&m.disk("top.qcow2"), &expected, seed, 30).unwrap();
    settle(&ngx);
    let again: Vec<Access> = ngx.gets().into_iter().filter(|g| !g.is_open_probe()).collect();
    let refetched: Vec<&Access> = again
        .iter()
        .filter(|g| {
            let Some((a, b)) = g.range.as_deref().and_then(|r| r.strip_prefix("bytes=")?.split_once('-')) else {
                return true;
            };
            let (a, b): (u64, u64) = (a.parse().unwrap_or(0), b.parse().unwrap_or(u64::MAX));
            first.iter().any(|(uri, x, y)| *uri == g.uri && a <= *y && *x <= b)
        })
        .collect();
    assert!(refetched.is_empty(), "the second mount fetched again what the first one had: {refetched:?}");
    if !again.is_empty() {
        eprintln!("note: the second mount fetched what the first never had: {again:?}");
    }
    let probes = ngx.gets().iter().filter(|g| g.is_open_probe()).count();
    assert!(probes <= 2, "at most one open probe per object (top, base): {:?}", ngx.gets());
}

// ---------------------------------------------------------------------------
// S3 (SeaweedFS)
// ---------------------------------------------------------------------------

/// A qcow2 chain (top under `vms/`, its base named `../bases/base.qcow2`)
/// and a thin HEXZ chain (`hexz/child.hxz` on `hexz/base.hxz`) uploaded to
/// SeaweedFS, mounted as `s3://BUCKET/KEY` with credentials from the
/// environment and `--s3-endpoint`: every view equals the local oracle.
#[test]
fn s3_qcow2_and_hexz_chains_match_local_oracles() {
    let t = setup("s3-chains");
    let seed = test_seed(71);
    make_chain(&t.www, &t.scratch, seed);
    // The S3 layout: vms/top.qcow2 -> ../bases/base.qcow2.
    let local = t.root.join("s3");
    for d in ["vms", "bases", "hexz"] {
        std::fs::create_dir_all(local.join(d)).unwrap();
    }
    std::fs::copy(t.www.join("base/base.qcow2"), local.join("bases/base.qcow2")).unwrap();
    std::fs::copy(t.www.join("vm/top.qcow2"), local.join("vms/top.qcow2")).unwrap();
    qemu_img_in(&local.join("vms"), &["rebase", "-u", "-b", "../bases/base.qcow2", "-F", "qcow2", "top.qcow2"]);
    let base_raw = t.scratch.join("hbase.raw");
    disk_data(&base_raw, 16 * MIB, seed + 3);
    let mut child = std::fs::read(&base_raw).unwrap();
    Rng::new(seed).fill(&mut child[3_000_000..3_500_000]);
    let child_raw = t.scratch.join("hchild.raw");
    std::fs::write(&child_raw, &child).unwrap();
    hexz(&local.join("hexz"), &["pack", "-s", s(&base_raw), "base.hxz"]);
    hexz(&local.join("hexz"), &["pack", "-s", s(&child_raw), "child.hxz", "--base", "base.hxz"]);

    let sw = Seaweed::start();
    let b = sw.bucket.clone();
    sw.put_all(
        &b,
        &[
            ("vms/top.qcow2", local.join("vms/top.qcow2")),
            ("bases/base.qcow2", local.join("bases/base.qcow2")),
            ("hexz/child.hxz", local.join("hexz/child.hxz")),
            ("hexz/base.hxz", local.join("hexz/base.hxz")),
        ],
    );
    let sources = [PathBuf::from(sw.url(&b, "vms/top.qcow2")), PathBuf::from(sw.url(&b, "hexz/child.hxz"))];
    let args = sw.args();
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let m = mount_with_env(&sw.env(), &args, &sources, &t.mnt("mnt"));
    assert_eq!(m.entries(), ["child.hxz", "top.qcow2"]);
    let mut errs = check_qcow2_views(
        &m.image_dir("top.qcow2"),
        &local.join("vms/top.qcow2"),
        &[&local.join("bases/base.qcow2")],
        &t.scratch,
        seed,
    );
    if let Err(e) = compare(&m.disk("child.hxz"), &child_raw, seed + 5, 30) {
        errs.push(e);
    }
    if let Err(e) = compare(&m.image_dir("child.hxz").join("backing/1-base.hxz/disk.raw"), &base_raw, seed + 6, 30) {
        errs.push(e);
    }
    assert_none(errs);
}

/// `s3://BUCKET/PREFIX/` mounts every image under the prefix (found by
/// magic bytes; a text object is skipped, keys outside the prefix are not
/// shown), each with its backing file or parent from the same prefix.
#[test]
fn s3_prefix_mounts_every_image_under_it() {
    let t = setup("s3-prefix");
    let seed = test_seed(81);
    let set = t.www.join("set");
    std::fs::create_dir_all(&set).unwrap();
    gen_data(&t.scratch.join("d.bin"), 8 * MIB, seed);
    bash(
        &set,
        &format!(
            r#"
            qemu-img create -q -f qcow2 base.qcow2 16M
            qemu-io -c "write -s {d} 0 8M" base.qcow2 >/dev/null
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
            qemu-io -c 'write -P 0x7e 6M 3M' top.qcow2 >/dev/null
            echo 'not an image, just notes about the images here' > notes.txt
            "#,
            d = s(&t.scratch.join("d.bin"))
        ),
    );
    let parent_raw = t.scratch.join("parent.raw");
    disk_data(&parent_raw, 8 * MIB, seed + 1);
    let mut thin = std::fs::read(&parent_raw).unwrap();
    Rng::new(seed + 2).fill(&mut thin[1_000_000..1_200_000]);
    let thin_raw = t.scratch.join("thin.raw");
    std::fs::write(&thin_raw, &thin).unwrap();
    hexz(&set, &["pack", "-s", s(&parent_raw), "parent.hxz"]);
    hexz(&set, &["pack", "-s", s(&thin_raw), "thin.hxz", "--base", "parent.hxz"]);

    let sw = Seaweed::start();
    let b = sw.bucket.clone();
    let mut objects: Vec<(String, PathBuf)> = ["base.qcow2", "top.qcow2", "notes.txt", "parent.hxz", "thin.hxz"]
        .iter()
        .map(|n| (format!("set/{n}"), set.join(n)))
        .collect();
    objects.push(("setting/other.qcow2".into(), set.join("base.qcow2")));
    objects.push(("elsewhere/top.qcow2".into(), set.join("top.qcow2")));
    let objs: Vec<(&str, &Path)> = objects.iter().map(|(k, p)| (k.as_str(), p.as_path())).collect();
    sw.put_all(&b, &objs);
    let args = sw.args();
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let prefix = PathBuf::from(sw.url(&b, "set/"));
    let m = mount_with_env(&sw.env(), &args, &[&prefix], &t.mnt("mnt"));
    assert_eq!(m.entries(), ["base.qcow2", "parent.hxz", "thin.hxz", "top.qcow2"]);
    let mut errs = check_qcow2_views(
        &m.image_dir("top.qcow2"),
        &set.join("top.qcow2"),
        &[&set.join("base.qcow2")],
        &t.scratch,
        seed,
    );
    errs.extend(check_qcow2_views(&m.image_dir("base.qcow2"), &set.join("base.qcow2"), &[], &t.scratch, seed + 1));
    for (name, raw) in [("thin.hxz", &thin_raw), ("parent.hxz", &parent_raw)] {
        if let Err(e) = compare(&m.disk(name), raw, seed + 3, 20) {
            errs.push(e);
        }
    }
    if let Err(e) = compare(&m.image_dir("thin.hxz").join("backing/1-parent.hxz/disk.raw"), &parent_raw, seed + 4, 20) {
        errs.push(e);
    }
    assert_none(errs);
}

/// A key with spaces (`my folder/my disk.qcow2`, signed as S3 encodes it)
/// mounts as `my disk.qcow2`, its backing file resolved in the same folder.
#[test]
fn s3_key_with_a_space() {
    let t = setup("s3-space");
    let seed = test_seed(91);
    let dir = t.www.join("my folder");
    std::fs::create_dir_all(&dir).unwrap();
    gen_data(&t.scratch.join("d.bin"), 4 * MIB, seed);
    bash(
        &dir,
        &format!(
            r#"
            qemu-img create -q -f qcow2 base.qcow2 16M
            qemu-io -c "write -s {d} 1M 4M" base.qcow2 >/dev/null
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 'my disk.qcow2'
            qemu-io -c 'write -P 0x20 0 2M' 'my disk.qcow2' >/dev/null
            "#,
            d = s(&t.scratch.join("d.bin"))
        ),
    );
    let sw = Seaweed::start();
    let b = sw.bucket.clone();
    sw.put_all(
        &b,
        &[("my folder/my disk.qcow2", dir.join("my disk.qcow2")), ("my folder/base.qcow2", dir.join("base.qcow2"))],
    );
    let args = sw.args();
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let url = PathBuf::from(sw.url(&b, "my folder/my disk.qcow2"));
    let m = mount_with_env(&sw.env(), &args, &[&url], &t.mnt("mnt"));
    assert_eq!(m.entries(), ["my disk.qcow2"]);
    assert_none(check_qcow2_views(
        &m.image_dir("my disk.qcow2"),
        &dir.join("my disk.qcow2"),
        &[&dir.join("base.qcow2")],
        &t.scratch,
        seed,
    ));
}

/// A wrong secret: `mount` and `info` fail with one line naming the
/// s3:// URL and saying access was denied (or the signature did not match).
#[test]
fn s3_wrong_secret_is_refused_naming_the_url() {
    let t = setup("s3-wrong-secret");
    let img = t.www.join("img.qcow2");
    create_qcow2(&img, "16M", "", None);
    qemu_io(&img, &["write -P 0x31 0 1M"]);
    let sw = Seaweed::start();
    let b = sw.bucket.clone();
    sw.put(&b, "vm/img.qcow2", &img);
    let url = sw.url(&b, "vm/img.qcow2");
    let env = sw.env_with_secret("not-the-secret-0123456789abcdefghijklm");
    let mnt = t.mnt("mnt");
    for args in [
        vec!["mount", "--s3-endpoint", sw.endpoint.as_str(), url.as_str(), s(&mnt)],
        vec!["info", "--s3-endpoint", sw.endpoint.as_str(), url.as_str()],
    ] {
        let err = refused(&env, &args, &mnt, &[&url]);
        let low = err.to_lowercase();
        assert!(
            low.contains("denied") || low.contains("signature"),
            "the message says access was denied or the signature did not match: {err}"
        );
    }
    // The right secret works (the refusal was about the secret).
    let m = mount_with_env(&sw.env(), &["--s3-endpoint", &sw.endpoint], &[Path::new(&url)], &mnt);
    m.assert_matches(&img, &t.scratch);
}

/// URLs work where mount(8) and fstab pass them: `mount -t fuse.snapmount
/// http://… MNT -o remote_timeout=…,cache_dir=…` and an fstab line with an
/// s3:// source and `s3_endpoint=` (credentials from the environment mount(8)
/// hands its helper); the views equal the oracle's, and /proc/mounts shows
/// no URL query.
#[test]
fn mount_8_and_fstab_take_urls() {
    let t = setup("mount8");
    let img = t.www.join("img.qcow2");
    create_qcow2(&img, "16M", "", None);
    qemu_io(&img, &["write -P 0x5a 0 3M", "write -P 0xa5 9M 1M"]);
    let helper = PathBuf::from("/sbin/mount.fuse.snapmount");
    let made_link = !helper.exists();
    if made_link {
        std::os::unix::fs::symlink(bin(), &helper).expect("make the mount helper link (needs root)");
    }
    struct Unlink(Option<PathBuf>);
    impl Drop for Unlink {
        fn drop(&mut self) {
            if let Some(p) = &self.0 {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let _unlink = Unlink(made_link.then(|| helper.clone()));
    let mnt = t.mnt("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            force_unmount(&self.0);
        }
    }
    let _guard = Unmount(mnt.clone());

    let ngx = Nginx::serve(&t.www);
    let url = format!("{}?token=secret-query", ngx.url("img.qcow2"));
    let cache = t.root.join("cache");
    let opts = format!("remote_timeout=10,cache_dir={},cache_size=32M", cache.display());
    let o = exec(
        "mount",
        &["-t", "fuse.snapmount", url.as_str(), s(&mnt), "-o", opts.as_str()],
        None,
        Duration::from_secs(60),
    );
    assert!(o.success(), "mount -t fuse.snapmount {url}\n{}", o.describe());
    assert!(is_mountpoint(&mnt));
    let line =
        std::fs::read_to_string("/proc/mounts").unwrap().lines().find(|l| l.contains(s(&mnt))).unwrap().to_string();
    assert!(line.contains(&ngx.url("img.qcow2")) && !line.contains("secret-query"), "/proc/mounts: {line}");
    let exp = t.scratch.join("img.raw");
    oracle_raw(&img, &exp);
    assert_files_equal(&mnt.join("img.qcow2/disk.raw"), &exp);
    assert!(std::fs::read_dir(&cache).unwrap().next().is_some(), "cache_dir= was taken");
    run("umount", &[s(&mnt)]);
    assert!(!is_mountpoint(&mnt));

    // An fstab line with an s3:// source, mounted by its mountpoint alone.
    let sw = Seaweed::start();
    let b = sw.bucket.clone();
    sw.put(&b, "vm/img.qcow2", &img);
    let fstab = t.root.join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "{} {} fuse.snapmount ro,noauto,s3_endpoint={},remote_timeout=10 0 0\n",
            sw.url(&b, "vm/img.qcow2"),
            mnt.display(),
            sw.endpoint
        ),
    )
    .unwrap();
    let mut args: Vec<String> = Vec::new();
    for (k, v) in sw.env() {
        args.push(format!("{k}={v}"));
    }
    args.extend(["mount".into(), "--fstab".into(), fstab.display().to_string(), mnt.display().to_string()]);
    let o = exec("env", &args, None, Duration::from_secs(60));
    assert!(o.success(), "mount --fstab with an s3:// line\n{}", o.describe());
    assert_files_equal(&mnt.join("img.qcow2/disk.raw"), &exp);
    run("umount", &[s(&mnt)]);
}
