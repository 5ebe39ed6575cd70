//! HTTPS and redirects: images served by nginx (tests/common/remote.rs,
//! `Nginx::serve_with`) over TLS with a certificate of a CA made by the test
//! (`openssl`, in a temp directory), and behind redirects, mounted by URL and
//! compared byte for byte with the qemu-img oracle of the same files on local
//! disk. What is checked:
//!
//! - the certificate decides: a CA the machine does not trust is refused,
//!   naming the URL; `--ca-file CA.pem` (alone or in a bundle) trusts it,
//!   `--insecure` trusts anything; a certificate for another name, or from
//!   another CA, is refused even with `--ca-file`;
//! - a `--ca-file` that holds no PEM certificate (DER, broken base64, only a
//!   key, empty, missing) is refused naming that file, before any request;
//! - 301, 302 (absolute and relative `Location`), 307 and 308 redirects are
//!   followed, up to five in a row, by every read of a backing chain whose
//!   base is named relatively (`../base/base.qcow2`); a sixth, a loop and a
//!   ping-pong are refused at once, naming the URL;
//! - a backing chain with internal snapshots over HTTPS, also reached through
//!   a redirect, matches in every view.
//!
//! Needs what `scripts/test.sh` installs: nginx-light (with its ssl module),
//! openssl. Run: `cargo test --release --test remote_tls`.
//! Randomized data: SNAPMOUNT_TEST_SEED; SNAPMOUNT_TEST_KEEP=1 keeps the test
//! directories (certificates included).

mod common;

use common::remote::*;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// No variables for the daemon (HTTP needs no credentials).
const NO_ENV: &[(&str, &str)] = &[];

/// How long a refusal that no retry can change may take (a bad --ca-file,
/// too many redirects, an untrusted certificate).
const REFUSAL_BOUND: Duration = Duration::from_secs(10);

/// `--remote-timeout` of the mounts refused for their certificate: a bound
/// in case a certificate failure were ever retried again as a network error
/// (it once was, for all of --remote-timeout); that it is refused at once is
/// `untrusted_certificates_are_refused_at_once_in_one_line`'s to check.
const CERT_RETRY_SECS: u64 = 3;

fn setup(name: &str) -> Site {
    Site::new(&format!("snapmount-tls-{name}-"))
}

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// The certificates of one test, all P-256, valid for 30 days from now.
struct Pki {
    /// The test's CA (PEM), trusted by nothing on the machine.
    ca: PathBuf,
    /// Another CA, which signed nothing the servers present.
    other_ca: PathBuf,
    /// The server's certificate (IP SAN 127.0.0.1), signed by `ca`, and its key.
    cert: PathBuf,
    key: PathBuf,
    /// A certificate signed by `ca` for 127.0.0.2 and other.invalid only,
    /// and its key.
    wrong_name_cert: PathBuf,
    wrong_name_key: PathBuf,
}

/// Makes a [`Pki`] in `dir` with the openssl CLI, and checks it with
/// `openssl verify` (so that a refusal below is snapmount's, not the
/// fixture's).
fn make_pki(dir: &Path) -> Pki {
    let o = exec("openssl", &["version"], None, Duration::from_secs(30));
    assert!(o.success(), "the HTTPS tests need `openssl` (Debian package openssl; scripts/test.sh installs it)");
    std::fs::create_dir_all(dir).unwrap();
    bash(
        dir,
        r#"
        ca() {  # NAME CN
            openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                -keyout "$1.key" -out "$1.pem" -days 30 -subj "/CN=$2" \
                -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
        }
        leaf() {  # NAME SUBJECT_ALT_NAMES SERIAL
            openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                -keyout "$1.key" -out "$1.csr" -subj "/CN=$1"
            printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
                "$2" >"$1.ext"
            openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -set_serial "$3" -days 30 \
                -extfile "$1.ext" -out "$1.pem"
        }
        ca ca 'snapmount test CA'
        ca other-ca 'snapmount other CA'
        leaf server IP:127.0.0.1 2
        leaf wrong-name IP:127.0.0.2,DNS:other.invalid 3
        openssl verify -CAfile ca.pem server.pem wrong-name.pem
        ! openssl verify -CAfile other-ca.pem server.pem 2>/dev/null
        "#,
    );
    Pki {
        ca: dir.join("ca.pem"),
        other_ca: dir.join("other-ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        wrong_name_cert: dir.join("wrong-name.pem"),
        wrong_name_key: dir.join("wrong-name.key"),
    }
}

/// curl sees what snapmount should: `url` (HTTPS) answers a ranged GET
/// with 206 when `ca` is trusted, and fails its certificate check with the
/// system's roots.
fn assert_curl_agrees(url: &str, ca: &Path) {
    let o = curl(&["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-r", "0-511", "--cacert", s(ca), url]);
    assert!(o.success() && o.stdout == "206", "curl --cacert {} {url}\n{}", ca.display(), o.describe());
    let o = curl(&["-sS", "-o", "/dev/null", "-r", "0-511", url]);
    assert!(!o.success(), "curl trusted the test CA with the system's roots\n{}", o.describe());
}

// ---------------------------------------------------------------------------
// Images and checks
// ---------------------------------------------------------------------------

/// `www/img.qcow2`: 32 MiB with data, a compressed cluster run, zeroes and
/// a pattern near the end.
fn make_image(www: &Path, scratch: &Path, seed: u64) -> PathBuf {
    gen_data(&scratch.join("d8.bin"), 8 * MIB, seed);
    bash(
        www,
        &format!(
            r#"
            qemu-img create -q -f qcow2 img.qcow2 32M
            qemu-io -c "write -s {d8} 0 8M" -c 'write -c -P 0x5a 12M 1M' -c 'write -z 2M 64k' \
                -c 'write -P 0x5b 30M 2M' img.qcow2 >/dev/null
            "#,
            d8 = s(&scratch.join("d8.bin")),
        ),
    );
    www.join("img.qcow2")
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

/// Every view of the top `top` of a chain under `view` (`MNT/top.qcow2`):
/// its disk.raw, each snapshot's disk.raw, and `backing/1-<base>/disk.raw`,
/// against the oracles of the local files; whole and in random unaligned
/// O_DIRECT reads. Returns the failures.
fn check_chain_views(view: &Path, top: &Path, base: &Path, scratch: &Path, seed: u64) -> Vec<String> {
    let mut errs = Vec::new();
    if let Err(e) = check_thoroughly(&view.join("disk.raw"), top, scratch, seed, 30) {
        errs.push(format!("disk.raw: {e}"));
    }
    let bname = base.file_name().unwrap().to_string_lossy().into_owned();
    if let Err(e) = check_thoroughly(&view.join(format!("backing/1-{bname}/disk.raw")), base, scratch, seed + 1, 30) {
        errs.push(format!("backing/1-{bname}: {e}"));
    }
    let info_path = view.join("info.json");
    let text = std::fs::read_to_string(&info_path).unwrap_or_else(|e| panic!("read {}: {e}", info_path.display()));
    let info: serde_json::Value = serde_json::from_str(&text).unwrap();
    let snaps = info["snapshots"].as_array().cloned().unwrap_or_default();
    if snaps.len() != 2 {
        errs.push(format!("info.json lists {} snapshots, not 2: {info}", snaps.len()));
    }
    for (i, snap) in snaps.iter().enumerate() {
        let (entry, id) = (snap["entry"].as_str().expect("entry"), snap["id"].as_str().expect("id"));
        let exp = scratch.join(format!("snap{id}.expected.raw"));
        snapshot_oracle(top, id, &exp);
        let got = view.join("snapshots").join(entry).join("disk.raw");
        if let Err(e) = files_equal(&got, &exp).and_then(|_| random_direct_reads(&got, &exp, seed + 10 + i as u64, 20))
        {
            errs.push(format!("snapshot {id} ({entry}): {e}"));
        }
        std::fs::remove_file(&exp).unwrap();
    }
    errs
}

/// nginx saw the reads as the spec says: every GET that reached a file was
/// ranged and answered 206, and every data GET (not the `bytes=0-0` open
/// probe) carried If-Match; every other GET was answered with a redirect,
/// still carrying its Range; none was answered 200 (a Range lost on the
/// way).
fn assert_ranged_pinned_gets(ngx: &Nginx) {
    let gets = ngx.gets();
    assert!(gets.iter().any(|g| g.status == 206), "the mounts read nothing from nginx: {gets:?}");
    for g in &gets {
        match g.status {
            206 => assert!(g.is_open_probe() || g.if_match.is_some(), "a data GET without If-Match: {g:?}"),
            301 | 302 | 307 | 308 => {}
            _ => panic!("a GET answered {} (not 206 or a redirect): {g:?}", g.status),
        }
        assert!(g.range.is_some(), "a GET without Range: {g:?}");
    }
}

/// Runs `snapmount ARGS` (a mount onto `mnt`, or `info`) that must be
/// refused: exit non-zero within `bound`, nothing mounted at `mnt`.
fn refusal(args: &[&str], mnt: &Path, bound: Duration) -> Outcome {
    std::fs::create_dir_all(mnt).unwrap();
    let start = Instant::now();
    let o = snapmount_env(NO_ENV, args);
    let took = start.elapsed();
    assert!(!o.timed_out(), "should fail, and at once\n{}", o.describe());
    assert!(!o.success(), "should fail\n{}", o.describe());
    assert!(took <= bound, "the refusal took {took:?} (more than {bound:?})\n{}", o.describe());
    assert!(!is_mountpoint(mnt), "{} is mounted after a refusal", mnt.display());
    o
}

/// Refused within [`REFUSAL_BOUND`], with exactly one line on stderr that
/// holds every word of `words` (case-insensitive).
fn refused(args: &[&str], mnt: &Path, words: &[&str]) -> String {
    let o = refusal(args, mnt, REFUSAL_BOUND);
    let err = o.stderr.trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line on stderr\n{}", o.describe());
    let low = err.to_lowercase();
    for w in words {
        assert!(low.contains(&w.to_lowercase()), "the message lacks {w:?}: {err}\n{}", o.describe());
    }
    err
}

/// `mount --remote-timeout CERT_RETRY_SECS ARGS.. URL MNT` is refused for
/// the certificate of `url`, in what snapmount does today: within the
/// remote timeout (plus slack), its last line on stderr naming the URL and
/// the certificate (the lines before it are the TLS verifier's own; see
/// `untrusted_certificates_are_refused_at_once_in_one_line` for the one
/// line, at once, that the spec asks for).
fn refused_for_certificate(extra: &[&str], url: &str, mnt: &Path) -> String {
    let secs = CERT_RETRY_SECS.to_string();
    let mut args = vec!["mount", "--remote-timeout", &secs];
    args.extend_from_slice(extra);
    args.extend([url, s(mnt)]);
    let o = refusal(&args, mnt, Duration::from_secs(CERT_RETRY_SECS) + REFUSAL_BOUND);
    let last = o.stderr.trim().lines().last().unwrap_or_default().to_string();
    assert!(last.contains(url), "the last line does not name {url}\n{}", o.describe());
    assert!(last.to_lowercase().contains("certificate"), "the last line does not say `certificate`\n{}", o.describe());
    last
}

// ---------------------------------------------------------------------------
// HTTPS
// ---------------------------------------------------------------------------

/// An image over HTTPS with a certificate of the test's CA: refused without
/// options (the machine does not trust that CA), naming the URL and the
/// certificate; with `--ca-file ca.pem`, with `--ca-file` of a bundle (an
/// unrelated CA, a private key, then the CA: every certificate of the file
/// is read, anything else skipped) and with `--insecure`, it mounts and
/// every byte equals qemu-img's. nginx only saw ranged, pinned GETs.
#[test]
fn https_test_ca_is_trusted_with_ca_file_or_insecure_only() {
    let t = setup("ca");
    let seed = test_seed(71);
    let pki = make_pki(&t.root.join("pki"));
    let img = make_image(&t.www, &t.scratch, seed);
    let ngx = Nginx::serve_with(&t.www, Some((&pki.cert, &pki.key)), "");
    let url = ngx.url("img.qcow2");
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert_curl_agrees(&url, &pki.ca);
    ngx.clear_log();
    let mnt = t.mnt("mnt");

    refused_for_certificate(&[], &url, &mnt);
    assert!(ngx.requests().is_empty(), "a request got through an untrusted TLS session: {:?}", ngx.requests());

    let bundle = t.root.join("pki/bundle.pem");
    let mut pem = std::fs::read(&pki.other_ca).unwrap();
    pem.extend(std::fs::read(&pki.key).unwrap());
    pem.extend(std::fs::read(&pki.ca).unwrap());
    std::fs::write(&bundle, pem).unwrap();
    let ca = ["--ca-file", s(&pki.ca)];
    let bundled = ["--ca-file", s(&bundle)];
    let insecure = ["--insecure"];
    for (i, extra) in [&ca[..], &bundled[..], &insecure[..]].into_iter().enumerate() {
        let m = mount_with_env(NO_ENV, extra, &[Path::new(&url)], &mnt);
        assert_eq!(m.entries(), ["img.qcow2"], "{extra:?}");
        if let Err(e) = m.check_thoroughly(&img, &t.scratch, seed + i as u64, 40) {
            panic!("mounted with {extra:?}: {e}");
        }
        assert_eq!(m.info("img.qcow2")["filename"], url.as_str(), "{extra:?}");
    }
    assert_ranged_pinned_gets(&ngx);
}

/// A certificate of the test's CA for another name (127.0.0.2,
/// other.invalid), and a CA file that holds another CA: each refused,
/// naming the URL, whatever `--ca-file` trusts. `--insecure` checks neither
/// the name: the wrong-name server mounts and matches.
#[test]
fn https_certificate_for_another_name_or_from_another_ca_is_refused() {
    let t = setup("names");
    let seed = test_seed(81);
    let pki = make_pki(&t.root.join("pki"));
    let img = make_image(&t.www, &t.scratch, seed);
    let good = Nginx::serve_with(&t.www, Some((&pki.cert, &pki.key)), "");
    let wrong = Nginx::serve_with(&t.www, Some((&pki.wrong_name_cert, &pki.wrong_name_key)), "");
    let good_url = good.url("img.qcow2");
    let wrong_url = wrong.url("img.qcow2");
    let mnt = t.mnt("mnt");

    let err = refused_for_certificate(&["--ca-file", s(&pki.ca)], &wrong_url, &mnt);
    assert!(err.to_lowercase().contains("name"), "the message says the name is wrong: {err}");
    refused_for_certificate(&["--ca-file", s(&pki.other_ca)], &good_url, &mnt);
    assert!(good.requests().is_empty() && wrong.requests().is_empty(), "a request got through");

    let m = mount_with_env(NO_ENV, &["--insecure"], &[Path::new(&wrong_url)], &mnt);
    m.assert_matches(&img, &t.scratch);
    drop(m);
    assert_ranged_pinned_gets(&wrong);
}

/// `--ca-file` naming a file without a PEM certificate -- the CA in DER,
/// a PEM block whose base64 is broken, a PEM private key only, an empty
/// file, a missing file -- is refused at once in one line naming that file,
/// before any request; `info` says the same.
#[test]
fn ca_file_without_a_pem_certificate_is_refused_naming_it() {
    let t = setup("ca-file");
    let seed = test_seed(91);
    let pki = make_pki(&t.root.join("pki"));
    make_image(&t.www, &t.scratch, seed);
    let ngx = Nginx::serve_with(&t.www, Some((&pki.cert, &pki.key)), "");
    let url = ngx.url("img.qcow2");
    let dir = t.root.join("pki");
    bash(
        &dir,
        r#"
        openssl x509 -in ca.pem -outform DER -out ca.der
        printf -- '-----BEGIN CERTIFICATE-----\nnot*base64!\n-----END CERTIFICATE-----\n' >broken.pem
        cp server.key key-only.pem
        : >empty.pem
        "#,
    );
    let mnt = t.mnt("mnt");
    for name in ["ca.der", "broken.pem", "key-only.pem", "empty.pem"] {
        let f = dir.join(name);
        refused(&["mount", "--ca-file", s(&f), &url, s(&mnt)], &mnt, &[s(&f), "PEM"]);
    }
    let missing = dir.join("missing.pem");
    refused(&["mount", "--ca-file", s(&missing), &url, s(&mnt)], &mnt, &[s(&missing), "no such file"]);
    refused(&["info", "--ca-file", s(&dir.join("ca.der")), &url], &mnt, &[s(&dir.join("ca.der")), "PEM"]);
    assert!(ngx.requests().is_empty(), "requests were made: {:?}", ngx.requests());
}

/// A certificate that fails verification is refused at once, in one line
/// naming the URL (asking again cannot fix a certificate; it once was taken
/// for a network error and retried for all of `--remote-timeout`, with a log
/// line from the verifier at every try).
#[test]
fn untrusted_certificates_are_refused_at_once_in_one_line() {
    let t = setup("untrusted");
    let seed = test_seed(101);
    let pki = make_pki(&t.root.join("pki"));
    make_image(&t.www, &t.scratch, seed);
    let good = Nginx::serve_with(&t.www, Some((&pki.cert, &pki.key)), "");
    let wrong = Nginx::serve_with(&t.www, Some((&pki.wrong_name_cert, &pki.wrong_name_key)), "");
    let (good_url, wrong_url) = (good.url("img.qcow2"), wrong.url("img.qcow2"));
    let mnt = t.mnt("mnt");
    let mut failures = Vec::new();
    for (extra, url) in [
        (vec![], &good_url),
        (vec!["--ca-file", s(&pki.other_ca)], &good_url),
        (vec!["--ca-file", s(&pki.ca)], &wrong_url),
    ] {
        // A bound on what today is a wait for all of --remote-timeout: 20 s
        // instead of 60 per case (the refusal must take at most 10).
        let mut args = vec!["mount", "--remote-timeout", "20"];
        args.extend(&extra);
        args.extend([url.as_str(), s(&mnt)]);
        let r = std::panic::catch_unwind(|| refused(&args, &mnt, &[url, "certificate"]));
        if r.is_err() {
            failures.push(format!("{extra:?} {url}"));
        }
    }
    assert!(failures.is_empty(), "not refused at once in one line: {failures:?} (see the panics above)");
}

// ---------------------------------------------------------------------------
// Redirects
// ---------------------------------------------------------------------------

/// nginx locations in front of the files: one of each redirect status, a
/// chain of hops `/h1/` .. `/h6/` (from `/hN/`, 7 - N redirects to `/`), a
/// loop and a ping-pong.
const REDIRECTS: &str = r#"
        location /r302/ { rewrite ^/r302/(.*)$ /$1 redirect; }
        location /r301/ { absolute_redirect off; rewrite ^/r301/(.*)$ /$1 permanent; }
        location ~ ^/r307/(.*)$ { return 307 /$1; }
        location ~ ^/r308/(.*)$ { return 308 /$1; }
        location /h1/ { rewrite ^/h1/(.*)$ /h2/$1 redirect; }
        location /h2/ { rewrite ^/h2/(.*)$ /h3/$1 redirect; }
        location /h3/ { rewrite ^/h3/(.*)$ /h4/$1 redirect; }
        location /h4/ { rewrite ^/h4/(.*)$ /h5/$1 redirect; }
        location /h5/ { rewrite ^/h5/(.*)$ /h6/$1 redirect; }
        location /h6/ { rewrite ^/h6/(.*)$ /$1 redirect; }
        location /loop/ { return 302 $request_uri; }
        location /ping/ { rewrite ^/ping/(.*)$ /pong/$1 redirect; }
        location /pong/ { rewrite ^/pong/(.*)$ /ping/$1 redirect; }
        location = /images/latest/top.qcow2 { return 302 /vm/top.qcow2; }
"#;

/// A chain (`vm/top.qcow2` on `../base/base.qcow2`) mounted through a 302
/// (absolute Location), a 301 (relative Location), a 307, a 308 and five
/// hops in a row: the top, its snapshots and its base equal qemu-img's, the
/// base read from where the redirects lead; every GET kept its Range and
/// If-Match through the redirects. Six hops, a redirect to itself and a
/// ping-pong are refused at once, naming the URL.
#[test]
fn http_redirects_are_followed_up_to_five_for_a_chain() {
    let t = setup("redirects");
    let seed = test_seed(111);
    let (top, base) = make_chain(&t.www, &t.scratch, seed);
    let ngx = Nginx::serve_with(&t.www, None, REDIRECTS);
    let mnt = t.mnt("mnt");
    // The last: an alias in another folder ("latest"), whose target's
    // backing name resolves where the redirect led, not beside the alias.
    for (i, prefix) in ["r302", "r301", "r307", "r308", "h2", "images/latest"].into_iter().enumerate() {
        let url = match prefix {
            "images/latest" => ngx.url("images/latest/top.qcow2"),
            _ => ngx.url(&format!("{prefix}/vm/top.qcow2")),
        };
        let first = ngx.requests().len();
        let m = mount_with_env(NO_ENV, &[], &[Path::new(&url)], &mnt);
        let errs = check_chain_views(&m.image_dir("top.qcow2"), &top, &base, &t.scratch, seed + 100 * i as u64);
        assert!(errs.is_empty(), "through {url}:\n{}", errs.join("\n\n"));
        drop(m);
        let reqs = ngx.requests().split_off(first);
        let status = match prefix {
            "images/latest" => 302,
            "r301" => 301,
            "r307" => 307,
            "r308" => 308,
            _ => 302,
        };
        assert!(reqs.iter().any(|r| r.uri.starts_with(&format!("/{prefix}/")) && r.status == status), "{reqs:?}");
        for file in ["/vm/top.qcow2", "/base/base.qcow2"] {
            assert!(
                reqs.iter().any(|r| r.uri == file && r.status == 206 && !r.is_open_probe()),
                "{file} was not read through {url}: {reqs:?}"
            );
        }
    }
    assert_ranged_pinned_gets(&ngx);

    for prefix in ["h1", "loop", "ping"] {
        let url = ngx.url(&format!("{prefix}/vm/top.qcow2"));
        refused(&["mount", &url, s(&mnt)], &mnt, &[&url, "redirect"]);
    }
    assert!(
        !ngx.requests().iter().any(|r| r.uri.starts_with("/h1/") && r.status == 206),
        "a sixth redirect was followed"
    );
}

// ---------------------------------------------------------------------------
// A chain over HTTPS
// ---------------------------------------------------------------------------

/// A backing chain over HTTPS with `--ca-file` (the base named
/// `../base/base.qcow2`, resolved against the https URL), mounted directly
/// and through a 302 on the same server: the top, its snapshots and its
/// base equal qemu-img's; info.json names https URLs; nginx only saw
/// ranged, pinned GETs (and the redirects).
#[test]
fn https_backing_chain_matches_directly_and_through_a_redirect() {
    let t = setup("chain");
    let seed = test_seed(121);
    let pki = make_pki(&t.root.join("pki"));
    let (top, base) = make_chain(&t.www, &t.scratch, seed);
    let ngx = Nginx::serve_with(&t.www, Some((&pki.cert, &pki.key)), REDIRECTS);
    let mnt = t.mnt("mnt");
    for (i, path) in ["vm/top.qcow2", "r302/vm/top.qcow2"].into_iter().enumerate() {
        let url = ngx.url(path);
        let m = mount_with_env(NO_ENV, &["--ca-file", s(&pki.ca)], &[Path::new(&url)], &mnt);
        let view = m.image_dir("top.qcow2");
        let errs = check_chain_views(&view, &top, &base, &t.scratch, seed + 100 * i as u64);
        assert!(errs.is_empty(), "through {url}:\n{}", errs.join("\n\n"));
        let info = m.info("top.qcow2");
        // Where the image was read: the URL redirects led to.
        assert_eq!(info["filename"], ngx.url("vm/top.qcow2").as_str());
        let chain = info["backing_chain"].as_array().cloned().unwrap_or_default();
        assert_eq!(chain.len(), 1, "{info}");
        let base_path = chain[0]["path"].as_str().unwrap_or_default();
        assert!(base_path.starts_with(&ngx.base) && base_path.ends_with("/base/base.qcow2"), "{info}");
    }
    assert!(ngx.gets().iter().any(|g| g.uri == "/base/base.qcow2" && g.status == 206 && !g.is_open_probe()));
    assert_ranged_pinned_gets(&ngx);
}
