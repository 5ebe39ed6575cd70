//! The servers of the remote tests (tests/common/remote.rs), checked on
//! their own with other clients (curl, boto3): these tests say the test
//! infrastructure works, whatever snapmount does. nginx answers Range with
//! 206 and refuses a wrong If-Match with 412, python's http.server ignores
//! Range, SeaweedFS checks SigV4 signatures and serves ranges of what boto3
//! put, and the helpers log, replace and clean up as they say.

mod common;

use common::remote::*;
use common::*;
use std::time::Duration;

/// `curl -sS -D HEADERS -o BODY ARGS... URL`: (status, headers in lower
/// case, body).
fn curl_get(url: &str, headers: &[&str]) -> (u16, String, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let h = tmp.path().join("headers");
    let b = tmp.path().join("body");
    let mut args: Vec<&str> = vec!["-sS", "-D", h.to_str().unwrap(), "-o", b.to_str().unwrap()];
    for x in headers {
        args.push("-H");
        args.push(x);
    }
    args.push(url);
    let o = curl(&args);
    assert!(o.success(), "{}", o.describe());
    let head = std::fs::read_to_string(&h).unwrap().to_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, std::fs::read(&b).unwrap_or_default())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| l.strip_prefix(&format!("{name}:")).map(|v| v.trim()))
}

#[test]
fn nginx_serves_ranges_with_etags_logs_every_request_and_sees_replacements() {
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    std::fs::create_dir_all(www.join("sub")).unwrap();
    gen_data(&www.join("sub/my disk.bin"), 3 * MIB + 5, 1);
    let data = std::fs::read(www.join("sub/my disk.bin")).unwrap();
    let ngx = Nginx::serve(&www);
    let url = ngx.url("sub/my%20disk.bin");

    let (st, head, _) = curl_get(&url, &[]);
    assert_eq!(st, 200);
    assert_eq!(header(&head, "accept-ranges"), Some("bytes"));
    let etag = header(&head, "etag").expect("an ETag").to_string();

    let (st, head, body) = curl_get(&url, &["Range: bytes=1000000-1999999"]);
    assert_eq!(st, 206, "{head}");
    assert_eq!(header(&head, "content-range"), Some(format!("bytes 1000000-1999999/{}", data.len()).as_str()));
    assert!(body == data[1_000_000..2_000_000], "the bytes of the range");

    let (st, ..) = curl_get(&url, &["Range: bytes=0-9", "If-Match: \"not-the-etag\""]);
    assert_eq!(st, 412, "a wrong If-Match is refused");
    let (st, _, body) = curl_get(&url, &["Range: bytes=0-9", &format!("If-Match: {etag}")]);
    assert_eq!((st, &body[..]), (206, &data[..10]));
    let (st, ..) = curl_get(&url, &[&format!("Range: bytes={}-", data.len() + 10)]);
    assert_eq!(st, 416, "a range past the end");

    // Every request is in the access log, with its Range, If-Match, status and size.
    let log = ngx.requests();
    assert_eq!(log.len(), 5, "{log:?}");
    assert_eq!(
        log[1],
        Access {
            method: "GET".into(),
            uri: "/sub/my%20disk.bin".into(),
            range: Some("bytes=1000000-1999999".into()),
            if_match: None,
            status: 206,
            bytes: 1_000_000,
        }
    );
    assert_eq!(log[2].if_match.as_deref(), Some("\"not-the-etag\""));
    assert_eq!(log[2].status, 412);
    assert_eq!(ngx.get_count(), 5);
    assert_eq!(ngx.get_bytes(), data.len() as u64 + 1_000_000 + 10 + log[2].bytes + log[4].bytes);
    let (st, ..) = curl_get(&url, &["Range: bytes=0-0"]);
    assert_eq!(st, 206);
    assert!(ngx.gets().last().unwrap().is_open_probe());
    ngx.clear_log();
    assert!(ngx.requests().is_empty());
    let (st, ..) = curl_get(&url, &["Range: bytes=5-6"]);
    assert_eq!((st, ngx.get_count()), (206, 1), "the log goes on after clear_log");

    // A replacement of the same size: new ETag, the old one gets 412.
    let new = tmp.path().join("new.bin");
    gen_data(&new, data.len() as u64, 2);
    replace_file(&www.join("sub/my disk.bin"), &new);
    let (st, head, _) = curl_get(&url, &["Range: bytes=0-0"]);
    assert_eq!(st, 206);
    assert_ne!(header(&head, "etag"), Some(etag.as_str()), "the ETag changes");
    let (st, ..) = curl_get(&url, &["Range: bytes=0-9", &format!("If-Match: {etag}")]);
    assert_eq!(st, 412);

    // Two servers at once, each on its own port; a dropped one is gone.
    let other = Nginx::serve(&www);
    assert_ne!(other.port, ngx.port);
    let port = other.port;
    drop(other);
    assert!(!port_open(port), "nginx still listens after drop");
    assert!(ngx.error_log().lines().all(|l| !l.contains("[emerg]")), "{}", ngx.error_log());
}

#[test]
fn python_http_server_ignores_range() {
    let tmp = tempfile::tempdir().unwrap();
    gen_data(&tmp.path().join("img.bin"), MIB, 3);
    let srv = PlainHttp::serve(tmp.path());
    let (st, head, body) = curl_get(&srv.url("img.bin"), &["Range: bytes=0-511"]);
    assert_eq!(st, 200, "python's http.server answers a Range request with the whole file");
    assert_eq!(header(&head, "content-range"), None);
    assert_eq!(body.len() as u64, MIB);
    let port = srv.port;
    drop(srv);
    assert!(!port_open(port));
}

#[test]
fn seaweedfs_checks_signatures_and_serves_ranges_of_uploads() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.bin");
    let b = tmp.path().join("b.bin");
    gen_data(&a, 5 * MIB + 3, 4);
    gen_data(&b, 5 * MIB + 3, 5);
    let data = std::fs::read(&a).unwrap();
    let sw = Seaweed::start();
    let bucket = sw.bucket.clone();
    let etags = sw.put_all(&bucket, &[("dir/my disk.bin", &a), ("dir/sub/b.bin", &b), ("top.bin", &b)]);
    assert_eq!(etags.len(), 3);
    assert_eq!(sw.head(&bucket, "dir/my disk.bin"), (data.len() as u64, etags[0].clone()));

    let out = tmp.path().join("out");
    let get = |secret: &str, key: &str, range: &str, extra: &[&str]| {
        let mut args = vec!["get", &bucket, key, range, out.to_str().unwrap()];
        args.extend_from_slice(extra);
        sw.s3ctl(secret, &args)
    };
    let o = get(&sw.secret_key, "dir/my disk.bin", "bytes=4000000-4999999", &[]);
    assert!(o.success(), "{}", o.describe());
    assert!(o.stdout.starts_with(&format!("206 bytes 4000000-4999999/{} ", data.len())), "{}", o.stdout);
    assert!(std::fs::read(&out).unwrap() == data[4_000_000..5_000_000], "the bytes of the range");

    let o = get(&sw.secret_key, "dir/my disk.bin", "bytes=0-9", &["\"0123456789abcdef0123456789abcdef\""]);
    assert!(!o.success() && o.stderr.contains("412"), "a wrong If-Match is refused\n{}", o.describe());
    let o = get(&sw.secret_key, "dir/my disk.bin", "bytes=0-9", &[&etags[0]]);
    assert!(o.success(), "the right If-Match passes\n{}", o.describe());

    let o = get("wrong-secret", "dir/my disk.bin", "bytes=0-9", &[]);
    assert!(
        !o.success() && o.stderr.contains("403") && o.stderr.contains("SignatureDoesNotMatch"),
        "a wrong secret gets 403\n{}",
        o.describe()
    );
    // Unsigned: refused too.
    let (st, ..) = curl_get(&format!("{}/{bucket}/dir/my%20disk.bin", sw.endpoint), &["Range: bytes=0-9"]);
    assert_eq!(st, 403, "anonymous reads are refused");

    // Another SigV4 signer (curl's) reads a range of the key with a space.
    let user = format!("{}:{}", sw.access_key, sw.secret_key);
    let o = curl(&[
        "-sS",
        "-o",
        out.to_str().unwrap(),
        "-w",
        "%{http_code}",
        "--aws-sigv4",
        "aws:amz:us-east-1:s3",
        "--user",
        &user,
        "-H",
        "Range: bytes=100-199",
        &format!("{}/{bucket}/dir/my%20disk.bin", sw.endpoint),
    ]);
    assert!(o.success() && o.stdout == "206", "curl --aws-sigv4\n{}", o.describe());
    assert!(std::fs::read(&out).unwrap() == data[100..200]);

    let o = sw.s3ctl(&sw.secret_key, &["list", &bucket, "dir/"]);
    assert_eq!(o.stdout.lines().collect::<Vec<_>>(), ["dir/my disk.bin", "dir/sub/b.bin"], "{}", o.describe());

    // Replacing an object changes its ETag; the old one gets 412.
    let new = sw.replace(&bucket, "dir/my disk.bin", &b);
    assert_ne!(new, etags[0]);
    let o = get(&sw.secret_key, "dir/my disk.bin", "bytes=0-9", &[&etags[0]]);
    assert!(!o.success() && o.stderr.contains("412"), "{}", o.describe());

    // Everything weed listens on is on 127.0.0.1, and goes with the guard.
    let port = sw.port;
    let pid = sw.pid();
    let ss = exec("ss", &["-ltnpH"], None, Duration::from_secs(10)).stdout;
    let listening: Vec<&str> = ss.lines().filter(|l| l.contains(&format!("pid={pid},"))).collect();
    assert!(listening.len() >= 8, "{ss}");
    for l in &listening {
        assert!(l.contains(" 127.0.0.1:"), "weed listens beyond loopback: {l}");
    }
    drop(sw);
    assert!(!port_open(port), "weed still listens after drop");
}

/// `mount_with_env` mounts (a local image here) with the environment it is
/// given, and unmounts on drop.
#[test]
fn mount_with_env_passes_the_environment_to_the_daemon() {
    preflight();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("local.qcow2");
    create_qcow2(&img, "4M", "", None);
    qemu_io(&img, &["write -P 0x5c 64k 1M"]);
    let mnt = tmp.path().join("mnt");
    {
        let m = mount_with_env(&[("SNAPMOUNT_TEST_MARKER", "present")], &[], &[&img], &mnt);
        m.assert_matches(&img, tmp.path());
        let pids = pids_mentioning(&mnt);
        assert_eq!(pids.len(), 1, "one daemon for the mount");
        let environ = std::fs::read(format!("/proc/{}/environ", pids[0])).unwrap();
        let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
        assert!(vars.contains(&&b"SNAPMOUNT_TEST_MARKER=present"[..]), "the daemon has the variable");
        assert!(vars.contains(&&b"AWS_EC2_METADATA_DISABLED=true"[..]));
        assert!(!vars.iter().any(|v| v.starts_with(b"AWS_ACCESS_KEY_ID=")), "no machine credentials");
    }
    assert!(!is_mountpoint(&mnt));
    let o = snapmount_env(&[("A", "B")], &["info", img.to_str().unwrap()]);
    assert!(o.success() && o.stdout.contains("qcow2"), "{}", o.describe());
}
