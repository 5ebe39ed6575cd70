//! Shared helpers for the snapmount integration tests.
//!
//! Everything here drives real tools: `qemu-img` / `qemu-io` build the images and
//! produce the expected bytes (the oracle), and the real `snapmount` binary mounts them.
#![allow(dead_code)]

pub mod proxy;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub mod remote;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_snapmount")
}

// ---------------------------------------------------------------------------
// Preflight
// ---------------------------------------------------------------------------

fn find_in_path(cmd: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.into_iter().map(|d| d.join(cmd)).find(|p| p.is_file())
}

/// Panics (never skips) when a tool the tests need is missing.
pub fn preflight() {
    let needs = [
        ("qemu-img", "qemu-utils"),
        ("qemu-io", "qemu-utils"),
        ("mkfs.ext4", "e2fsprogs"),
        ("mkfs.vfat", "dosfstools"),
        ("mtype", "mtools"),
        ("sfdisk", "fdisk"),
        ("cmp", "diffutils"),
        ("dd", "coreutils"),
        ("timeout", "coreutils"),
        ("pgrep", "procps"),
        ("umount", "mount"),
    ];
    let mut missing = Vec::new();
    for (cmd, pkg) in needs {
        if find_in_path(cmd).is_none() {
            missing.push(format!("`{cmd}` (Debian package {pkg})"));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse (load the fuse kernel module; Debian package fuse3)".into());
    }
    if !missing.is_empty() {
        panic!(
            "snapmount integration tests need: {}. Install with `apt-get install qemu-utils e2fsprogs fuse3`.",
            missing.join(", ")
        );
    }
}

/// The HEXZ oracle: hexz-cli 0.8.2 as `scripts/test.sh` installs it, under
/// `target/tools` (or `$SNAPMOUNT_HEXZ`). Never taken from PATH, so a copy
/// installed by hand on one machine cannot decide what the tests do. Panics
/// (never skips) when it is missing or another version.
pub fn hexz_bin() -> PathBuf {
    let path = std::env::var_os("SNAPMOUNT_HEXZ")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/hexz"));
    let version = Command::new(&path).arg("--version").output();
    match version {
        Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "hexz 0.8.2" => path,
        Ok(o) => panic!(
            "{} is not hexz 0.8.2 ({}); scripts/test.sh installs the right one",
            path.display(),
            String::from_utf8_lossy(&o.stdout).trim()
        ),
        Err(e) => {
            panic!("hexz-cli 0.8.2 not found at {} ({e}); run scripts/test.sh, which installs it", path.display())
        }
    }
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct Outcome {
    pub cmdline: String,
    /// None when the command was killed by the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status.map(|s| s.success()).unwrap_or(false)
    }
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
            self.cmdline,
            match self.status {
                Some(s) => format!("{s}"),
                None => "TIMED OUT (killed)".into(),
            },
            self.stdout,
            self.stderr
        )
    }
}

fn shell_quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=,:@%+".contains(c)) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Runs a command with a timeout. stdout/stderr go to anonymous temp files, not pipes,
/// so a daemon that forks and keeps the inherited descriptors open cannot make us hang.
pub fn exec<S: AsRef<OsStr>>(cmd: &str, args: &[S], cwd: Option<&Path>, timeout: Duration) -> Outcome {
    let mut cmdline = String::new();
    if let Some(d) = cwd {
        cmdline.push_str(&format!("(cd {} && ", shell_quote(d.as_os_str())));
    }
    cmdline.push_str(cmd);
    for a in args {
        cmdline.push(' ');
        cmdline.push_str(&shell_quote(a.as_ref()));
    }
    if cwd.is_some() {
        cmdline.push(')');
    }
    let out = tempfile::tempfile().expect("tempfile");
    let err = tempfile::tempfile().expect("tempfile");
    let mut c = Command::new(cmd);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(err.try_clone().unwrap()));
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{cmdline}`: {e} (run the preflight: is the tool installed?)"));
    let start = Instant::now();
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(st) => break Some(st),
            None => {
                if start.elapsed() > timeout {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    };
    let read_all = |mut f: File| {
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        String::from_utf8_lossy(&v).into_owned()
    };
    Outcome { cmdline, status, stdout: read_all(out), stderr: read_all(err) }
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs a command, panics with its stderr if it fails; returns stdout.
pub fn run<S: AsRef<OsStr>>(cmd: &str, args: &[S]) -> String {
    run_in(None, cmd, args)
}

pub fn run_in<S: AsRef<OsStr>>(cwd: Option<&Path>, cmd: &str, args: &[S]) -> String {
    let o = exec(cmd, args, cwd, DEFAULT_TIMEOUT);
    if !o.success() {
        panic!("command failed\n{}", o.describe());
    }
    o.stdout
}

pub fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> String {
    run("qemu-img", args)
}

pub fn qemu_img_in<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> String {
    run_in(Some(dir), "qemu-img", args)
}

/// `qemu-io -c CMD1 -c CMD2 ... IMG` (read-write, format probed from the file).
pub fn qemu_io<S: AsRef<str>>(img: &Path, cmds: &[S]) -> String {
    if cmds.is_empty() {
        return String::new();
    }
    let mut args: Vec<OsString> = Vec::new();
    for c in cmds {
        args.push("-c".into());
        args.push(c.as_ref().into());
    }
    args.push(img.as_os_str().to_owned());
    let o = exec("qemu-io", &args, img.parent(), DEFAULT_TIMEOUT);
    if !o.success() || o.stdout.contains(" failed") || o.stderr.contains(" failed") {
        panic!("qemu-io failed\n{}", o.describe());
    }
    o.stdout
}

/// `qemu-img create -q -f qcow2 [-o OPTS] [-b BACKING -F FMT] PATH SIZE`, run in PATH's directory.
pub fn create_qcow2(path: &Path, size: &str, opts: &str, backing: Option<(&str, &str)>) {
    let mut args: Vec<OsString> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.into());
    }
    if let Some((b, f)) = backing {
        args.push("-b".into());
        args.push(b.into());
        args.push("-F".into());
        args.push(f.into());
    }
    args.push(path.as_os_str().to_owned());
    if !size.is_empty() {
        args.push(size.into());
    }
    qemu_img_in(path.parent().unwrap(), &args);
}

/// Writes the expected content of `img` (qcow2) as raw to `out`, using `qemu-img convert`
/// with cwd = the image's directory (needed for external data files).
pub fn oracle_raw(img: &Path, out: &Path) {
    let dir = img.parent().unwrap();
    let out_abs = if out.is_absolute() { out.to_path_buf() } else { std::env::current_dir().unwrap().join(out) };
    let o = exec(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            img.file_name().unwrap(),
            out_abs.as_os_str(),
        ],
        Some(dir),
        Duration::from_secs(120),
    );
    if !o.success() {
        panic!("oracle (qemu-img convert) failed\n{}", o.describe());
    }
}

// ---------------------------------------------------------------------------
// Comparing files
// ---------------------------------------------------------------------------

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

/// Compares two files in 1 MiB chunks. `a` is "got", `b` is "expected".
pub fn files_equal(a: &Path, b: &Path) -> Result<(), String> {
    let mut fa = File::open(a).map_err(|e| format!("open {}: {e}", a.display()))?;
    let mut fb = File::open(b).map_err(|e| format!("open {}: {e}", b.display()))?;
    let la = fa.metadata().map_err(|e| format!("stat {}: {e}", a.display()))?.len();
    let lb = fb.metadata().map_err(|e| format!("stat {}: {e}", b.display()))?.len();
    if la != lb {
        return Err(format!("size differs: {} is {la} bytes, expected {} is {lb} bytes", a.display(), b.display()));
    }
    const CH: usize = 1 << 20;
    let mut ba = vec![0u8; CH];
    let mut bb = vec![0u8; CH];
    let mut off: u64 = 0;
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(|e| format!("read {} at ~{off}: {e}", a.display()))?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| format!("read {} at ~{off}: {e}", b.display()))?;
        let n = na.min(nb);
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            let end = (i + 16).min(n);
            // Also report where the differing run ends (within this chunk), helps diagnosis.
            let mut j = i;
            while j < n && ba[j] != bb[j] {
                j += 1;
            }
            return Err(format!(
                "{} differs from expected {} at byte offset {} (0x{:x}); first differing run is {} bytes\n  got:      {}\n  expected: {}",
                a.display(),
                b.display(),
                off + i as u64,
                off + i as u64,
                j - i,
                hex(&ba[i..end]),
                hex(&bb[i..end])
            ));
        }
        if na != nb {
            return Err(format!(
                "short read: got {na} bytes from {} and {nb} from {} at offset {off} (sizes {la})",
                a.display(),
                b.display()
            ));
        }
        if n == 0 {
            return Ok(());
        }
        off += n as u64;
    }
}

pub fn assert_files_equal(a: &Path, b: &Path) {
    if let Err(e) = files_equal(a, b) {
        panic!("{e}");
    }
}

/// Produces the oracle for `img` into `scratch`, compares it with `got`, removes the oracle.
pub fn check_against_oracle(got: &Path, img: &Path, scratch: &Path) -> Result<(), String> {
    std::fs::create_dir_all(scratch).unwrap();
    let exp = scratch.join(format!("{}.expected.raw", img.file_name().unwrap().to_string_lossy()));
    oracle_raw(img, &exp);
    let r = files_equal(got, &exp).map_err(|e| format!("image {}: {e}", img.display()));
    let _ = std::fs::remove_file(&exp);
    r
}

// ---------------------------------------------------------------------------
// Mount points
// ---------------------------------------------------------------------------

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Absolute path without following the last component (works on a dead FUSE mount).
pub fn abs_path(p: &Path) -> PathBuf {
    let p = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().unwrap().join(p) };
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(c) => c.join(name),
            Err(_) => p,
        },
        _ => p,
    }
}

/// Mount entries (mount point, fs type, source) from /proc/self/mountinfo.
pub fn mounts() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let mut v = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 {
            continue;
        }
        let mp = unescape_mountinfo(fields[4]);
        let (fstype, source) = match fields.iter().position(|f| *f == "-") {
            Some(i) if i + 2 < fields.len() => (fields[i + 1].to_string(), unescape_mountinfo(fields[i + 2])),
            _ => (String::new(), String::new()),
        };
        v.push((mp, fstype, source));
    }
    v
}

/// True when `p` is a mount point according to /proc/self/mountinfo.
pub fn is_mountpoint(p: &Path) -> bool {
    let want = abs_path(p).to_string_lossy().into_owned();
    mounts().iter().any(|(mp, _, _)| *mp == want)
}

/// True if anything is mounted at or below `p`.
pub fn anything_mounted_under(p: &Path) -> bool {
    let want = abs_path(p).to_string_lossy().into_owned();
    let prefix = format!("{want}/");
    mounts().iter().any(|(mp, _, _)| *mp == want || mp.starts_with(&prefix))
}

/// Pids of processes whose command line mentions `needle` (our unique temp paths).
pub fn pids_mentioning(needle: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let o = exec(
        "pgrep",
        &[OsStr::new("-f"), OsStr::new("--"), abs_path(needle).as_os_str()],
        None,
        Duration::from_secs(10),
    );
    o.stdout.split_whitespace().filter_map(|s| s.parse::<i32>().ok()).filter(|&p| p != me).collect()
}

/// Waits up to `timeout` for `cond`; returns its last value.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `snapmount ARGS...` (60 s timeout).
pub fn snapmount<S: AsRef<OsStr>>(args: &[S]) -> Outcome {
    exec(bin(), args, None, Duration::from_secs(60))
}

/// Best-effort unmount: `snapmount umount`, then `umount -l`; then make sure the daemon for
/// this mount point (a process we started, found by the unique path) is gone.
pub fn force_unmount(mnt: &Path) {
    let mnt = abs_path(mnt);
    if is_mountpoint(&mnt) {
        let _ = exec(bin(), &[OsStr::new("umount"), mnt.as_os_str()], None, Duration::from_secs(20));
        if !wait_for(Duration::from_secs(5), || !is_mountpoint(&mnt)) {
            let _ = exec("umount", &[OsStr::new("-l"), mnt.as_os_str()], None, Duration::from_secs(20));
        }
    }
    // The daemon should exit on its own once unmounted; kill it by pid if it lingers.
    if !wait_for(Duration::from_secs(5), || pids_mentioning(&mnt).is_empty()) {
        for pid in pids_mentioning(&mnt) {
            eprintln!(
                "snapmount test cleanup: process {pid} for {} still alive after unmount, killing it",
                mnt.display()
            );
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    if is_mountpoint(&mnt) {
        let _ = exec("umount", &[OsStr::new("-l"), mnt.as_os_str()], None, Duration::from_secs(20));
    }
}

fn watchdog_secs() -> u64 {
    std::env::var("SNAPMOUNT_TEST_WATCHDOG_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(240)
}

/// A live snapmount mount. Dropping it ALWAYS unmounts (also when the test panics).
/// A watchdog kills the daemon if the mount is still alive after SNAPMOUNT_TEST_WATCHDOG_SECS
/// (default 240 s), so a hung FUSE read fails the test instead of hanging CI.
pub struct Mount {
    pub dir: PathBuf,
    done: Arc<AtomicBool>,
}

impl Mount {
    /// `snapmount mount SOURCES... MNT` in background mode; panics if it fails.
    pub fn new<P: AsRef<Path>>(sources: &[P], mnt: &Path) -> Mount {
        Self::with_args(&[], sources, mnt)
    }

    pub fn with_args<P: AsRef<Path>>(extra: &[&str], sources: &[P], mnt: &Path) -> Mount {
        Mount::started_by(extra, sources, mnt, snapmount)
    }

    /// `snapmount mount EXTRA... SOURCES... MNT`, run by `run` (which may
    /// set its environment).
    pub fn started_by<P: AsRef<Path>>(
        extra: &[&str],
        sources: &[P],
        mnt: &Path,
        run: impl FnOnce(&[OsString]) -> Outcome,
    ) -> Mount {
        std::fs::create_dir_all(mnt).unwrap();
        let mnt = abs_path(mnt);
        let mut args: Vec<OsString> = vec!["mount".into()];
        for e in extra {
            args.push(e.into());
        }
        for s in sources {
            args.push(s.as_ref().as_os_str().to_owned());
        }
        args.push(mnt.as_os_str().to_owned());
        let done = Arc::new(AtomicBool::new(false));
        // Guard first, so that even a failing mount command gets cleaned up.
        let m = Mount { dir: mnt.clone(), done: done.clone() };
        let o = run(&args);
        if !o.success() {
            panic!("snapmount mount failed\n{}", o.describe());
        }
        if !is_mountpoint(&mnt) {
            panic!(
                "snapmount mount exited 0 but {} is not a mount point (the binary must return only once the mount is live)\n{}",
                mnt.display(),
                o.describe()
            );
        }
        let secs = watchdog_secs();
        let wd_mnt = mnt.clone();
        thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(secs) {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                thread::sleep(Duration::from_millis(200));
            }
            if done.load(Ordering::SeqCst) {
                return;
            }
            eprintln!(
                "WATCHDOG: mount {} alive for more than {secs}s; killing its processes (hung FUSE request?)",
                wd_mnt.display()
            );
            for pid in pids_mentioning(&wd_mnt) {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = exec("umount", &[OsStr::new("-l"), wd_mnt.as_os_str()], None, Duration::from_secs(20));
        });
        m
    }

    /// `MNT/<name>`
    pub fn image_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `MNT/<name>/disk.raw`
    pub fn disk(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("disk.raw")
    }

    /// Parsed `MNT/<name>/info.json`.
    pub fn info(&self, name: &str) -> serde_json::Value {
        let p = self.dir.join(name).join("info.json");
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not valid JSON: {e}\n{text}", p.display()))
    }

    /// Names of the entries directly under the mount point, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", self.dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Compares `MNT/<image name>/disk.raw` with the qemu-img oracle of `img`.
    pub fn check(&self, img: &Path, scratch: &Path) -> Result<(), String> {
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        check_against_oracle(&self.disk(&name), img, scratch)
    }

    /// Like `check`, plus `reads` random unaligned O_DIRECT reads.
    pub fn check_thoroughly(&self, img: &Path, scratch: &Path, seed: u64, reads: usize) -> Result<(), String> {
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        check_thoroughly(&self.disk(&name), img, scratch, seed, reads)
    }

    /// `check_thoroughly` on every image; panics once listing all failures.
    pub fn assert_all_match_thoroughly<P: AsRef<Path>>(&self, imgs: &[P], scratch: &Path, reads: usize) {
        let mut errs = Vec::new();
        for (i, img) in imgs.iter().enumerate() {
            if let Err(e) = self.check_thoroughly(img.as_ref(), scratch, 1000 + i as u64, reads) {
                errs.push(e);
            }
        }
        if !errs.is_empty() {
            panic!("{} of {} images differ from qemu-img:\n{}", errs.len(), imgs.len(), errs.join("\n\n"));
        }
    }

    pub fn assert_matches(&self, img: &Path, scratch: &Path) {
        if let Err(e) = self.check(img, scratch) {
            panic!("{e}");
        }
    }

    /// Checks every image, collects all failures, panics once with all of them.
    pub fn assert_all_match<P: AsRef<Path>>(&self, imgs: &[P], scratch: &Path) {
        let mut errs = Vec::new();
        for img in imgs {
            if let Err(e) = self.check(img.as_ref(), scratch) {
                errs.push(e);
            }
        }
        if !errs.is_empty() {
            panic!("{} of {} images differ from qemu-img:\n{}", errs.len(), imgs.len(), errs.join("\n\n"));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        force_unmount(&self.dir);
    }
}

/// A loop mount (`mount -o loop,ro FILE DIR`), unmounted on drop.
pub struct LoopMount {
    pub dir: PathBuf,
}

impl LoopMount {
    pub fn new(file: &Path, dir: &Path) -> LoopMount {
        std::fs::create_dir_all(dir).unwrap();
        let lm = LoopMount { dir: abs_path(dir) };
        run("mount", &[OsStr::new("-o"), OsStr::new("loop,ro"), file.as_os_str(), lm.dir.as_os_str()]);
        lm
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if is_mountpoint(&self.dir) {
            let o = exec("umount", &[self.dir.as_os_str()], None, Duration::from_secs(30));
            if !o.success() {
                let _ = exec("umount", &[OsStr::new("-l"), self.dir.as_os_str()], None, Duration::from_secs(30));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------

/// SplitMix64: tiny, seeded, reproducible.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for ch in buf.chunks_mut(8) {
            let x = self.next_u64().to_le_bytes();
            ch.copy_from_slice(&x[..ch.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "cluster",
    "snapshot",
    "backing",
    "qcow2",
    "image",
    "read",
    "only",
    "daemon",
    "fuse",
    "kernel",
    "block",
    "offset",
    "table",
    "zero",
    "data",
    "compressed",
    "virtual",
    "disk",
    "guest",
    "host",
    "header",
    "refcount",
    "extent",
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "\n",
];

/// Deterministic "half compressible" bytes: 4 KiB blocks that are text-ish, pseudo-random,
/// zero, or half text / half random, chosen by the seeded PRNG.
pub fn gen_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let kind = rng.below(4);
        let blk = 4096.min(len - v.len());
        let start = v.len();
        match kind {
            0 => {
                while v.len() < start + blk {
                    let w = rng.pick(WORDS).as_bytes();
                    for &b in w.iter().chain(b" ".iter()) {
                        if v.len() < start + blk {
                            v.push(b);
                        }
                    }
                }
            }
            1 => {
                v.resize(start + blk, 0);
                rng.fill(&mut v[start..]);
            }
            2 => v.resize(start + blk, 0),
            _ => {
                let half = blk / 2;
                while v.len() < start + half {
                    let w = rng.pick(WORDS).as_bytes();
                    for &b in w.iter().chain(b" ".iter()) {
                        if v.len() < start + half {
                            v.push(b);
                        }
                    }
                }
                let cur = v.len();
                v.resize(start + blk, 0);
                rng.fill(&mut v[cur..]);
            }
        }
    }
    v
}

/// Writes `len` bytes of `gen_bytes` data to `path`.
pub fn gen_data(path: &Path, len: u64, seed: u64) {
    let mut f = File::create(path).unwrap();
    let mut off = 0u64;
    let mut s = seed;
    while off < len {
        let n = (len - off).min(4 * MIB) as usize;
        f.write_all(&gen_bytes(n, s)).unwrap();
        s = s.wrapping_add(1);
        off += n as u64;
    }
}

// ---------------------------------------------------------------------------
// Raw header patching
// ---------------------------------------------------------------------------

pub fn read_be64(path: &Path, off: u64) -> u64 {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut b = [0u8; 8];
    f.read_exact(&mut b).unwrap();
    u64::from_be_bytes(b)
}

pub fn read_be32(path: &Path, off: u64) -> u32 {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut b = [0u8; 4];
    f.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}

pub fn write_bytes_at(path: &Path, off: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(bytes).unwrap();
}

pub fn write_be64(path: &Path, off: u64, v: u64) {
    write_bytes_at(path, off, &v.to_be_bytes());
}

/// OR `mask` into the byte at `off` (for feature bits).
pub fn or_byte(path: &Path, off: u64, mask: u8) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut b = [0u8; 1];
    f.read_exact(&mut b).unwrap();
    b[0] |= mask;
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&b).unwrap();
}

pub const L2_OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;

/// Host offset of the L2 entry for guest cluster `idx` (standard L2, idx within L1[0]).
pub fn l2_entry_pos(img: &Path, idx: u64) -> u64 {
    let l1_off = read_be64(img, 40);
    let l1_0 = read_be64(img, l1_off);
    let l2_off = l1_0 & L2_OFFSET_MASK;
    assert!(l2_off != 0, "L1[0] of {} is unallocated", img.display());
    l2_off + idx * 8
}

/// `count` O_DIRECT preads at arbitrary (unaligned) offsets and lengths, some crossing EOF,
/// compared with the same ranges of `expected` (a raw oracle file). O_DIRECT makes the kernel
/// pass the exact offsets/lengths through to the daemon instead of page-sized requests.
pub fn random_direct_reads(disk: &Path, expected: &Path, seed: u64, count: usize) -> Result<(), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(disk)
        .map_err(|e| format!("open {} with O_DIRECT: {e}", disk.display()))?;
    let exp = File::open(expected).unwrap();
    let size = exp.metadata().unwrap().len();
    let mut rng = Rng::new(seed);
    for i in 0..count {
        let len = if rng.chance(50) { rng.range(1, 4096) } else { rng.range(1, 300 * 1024) } as usize;
        let off = match rng.below(5) {
            0 => size.saturating_sub(rng.below(len as u64 + 1)), // crosses or touches EOF
            1 => rng.below(size / 512 + 1) * 512,
            _ => rng.below(size + 1),
        };
        let want_len = (size.saturating_sub(off)).min(len as u64) as usize;
        let mut want = vec![0u8; want_len];
        exp.read_exact_at(&mut want, off).unwrap();
        let mut got = vec![0u8; len];
        let mut n = 0;
        while n < len {
            match f.read_at(&mut got[n..], off + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("O_DIRECT pread #{i} {len}@{off} of {}: {e}", disk.display())),
            }
        }
        if n != want_len {
            return Err(format!(
                "O_DIRECT pread #{i} {len}@{off} of {} returned {n} bytes, expected {want_len} (size {size})",
                disk.display()
            ));
        }
        if got[..n] != want[..] {
            let j = (0..n).find(|&j| got[j] != want[j]).unwrap();
            return Err(format!(
                "O_DIRECT pread #{i} {len}@{off} of {}: byte {} (0x{:x}) differs: got {:02x}, expected {:02x}",
                disk.display(),
                off + j as u64,
                off + j as u64,
                got[j],
                want[j]
            ));
        }
    }
    Ok(())
}

/// Oracle + whole-file compare + random unaligned O_DIRECT reads, oracle removed afterwards.
pub fn check_thoroughly(got: &Path, img: &Path, scratch: &Path, seed: u64, reads: usize) -> Result<(), String> {
    std::fs::create_dir_all(scratch).unwrap();
    let exp = scratch.join(format!("{}.expected.raw", img.file_name().unwrap().to_string_lossy()));
    oracle_raw(img, &exp);
    let r = files_equal(got, &exp)
        .and_then(|_| random_direct_reads(got, &exp, seed, reads))
        .map_err(|e| format!("image {}: {e}", img.display()));
    let _ = std::fs::remove_file(&exp);
    r
}

/// The seed of a randomized test: SNAPMOUNT_TEST_SEED, else `default`;
/// printed, so that a failure can be run again.
pub fn test_seed(default: u64) -> u64 {
    let seed =
        std::env::var("SNAPMOUNT_TEST_SEED").map_or(default, |s| s.parse().expect("SNAPMOUNT_TEST_SEED is a number"));
    eprintln!("seed {seed} (SNAPMOUNT_TEST_SEED)");
    seed
}

/// Runs a bash script (`-euo pipefail`) in `dir`; panics with its output
/// when it fails; returns its stdout.
pub fn bash(dir: &Path, script: &str) -> String {
    let o = exec("bash", &["-euo", "pipefail", "-c", script], Some(dir), DEFAULT_TIMEOUT);
    assert!(o.success(), "{}", o.describe());
    o.stdout
}

/// `qemu-img convert -f raw -O qcow2 RAW QCOW2`.
pub fn raw_to_qcow2(raw: &Path, qcow2: &Path) {
    qemu_img(&[
        OsStr::new("convert"),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        raw.as_os_str(),
        qcow2.as_os_str(),
    ]);
}
