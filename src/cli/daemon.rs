//! `snapmount mount`: open everything, mount, then serve in the background
//! (like sshfs) or in the foreground.
//!
//! Order matters: every image is opened and checked before anything is
//! mounted, so a bad image fails the command with nothing left behind; the
//! parent exits 0 only once the child reports the mount live (fuser's session
//! has done the FUSE handshake by then).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use fuser::{Config, MountOption, Session, SessionACL};
use tracing::info;

use snapmount::cache::BlockCache;
use snapmount::catalog::Catalog;
use snapmount::fs::{Ownership, SnapFs};

use super::MountArgs;

pub fn mount(args: MountArgs) -> Result<()> {
    let (mountpoint, sources) = args.paths.split_last().expect("clap requires two paths");
    let mountpoint = check_mountpoint(mountpoint)?;
    check_fuse_device()?;
    if args.allow_other {
        check_allow_other()?;
    }

    limit_heap_slack();
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
        MountOption::FSName(fsname(sources)),
        subtype(),
    ];
    config.acl = if args.allow_other { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(args.threads.unwrap_or((2 * cpus).clamp(4, 16)).max(1));
    config.clone_fd = true;

    if args.foreground {
        block_signals();
        let fs = open_sources(&args, sources, &mountpoint)?;
        let session = Session::new(fs, &mountpoint, &config).map_err(|e| mount_error(&mountpoint, e))?;
        return serve(session, &mountpoint);
    }

    // Background: fork; the child mounts and tells the parent through a pipe.
    let (read_end, write_end) = pipe()?;
    // SAFETY: no other thread runs yet (nothing above spawns one). The
    // images are opened in the child, after the fork: remote sources start
    // threads (read-ahead, the AWS credential runtime) that a fork would
    // not carry over.
    match unsafe { libc::fork() } {
        -1 => bail!("cannot fork: {}", std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            let mut status = write_end;
            block_signals();
            // Still on the terminal, in its process group: a password can
            // be asked here.
            let fs = match open_sources(&args, sources, &mountpoint) {
                Ok(fs) => fs,
                Err(e) => {
                    let _ = write!(status, "{e:#}");
                    std::process::exit(1);
                }
            };
            // SAFETY: detach from the terminal's session.
            unsafe { libc::setsid() };
            let session = match Session::new(fs, &mountpoint, &config) {
                Ok(s) => s,
                Err(e) => {
                    let _ = write!(status, "{}", mount_error(&mountpoint, e));
                    std::process::exit(1);
                }
            };
            redirect_stdio(args.log_file.as_deref());
            if args.log_file.is_none() {
                super::log::to_syslog();
            }
            let _ = status.write_all(b"\0ok");
            drop(status);
            let _ = std::env::set_current_dir("/");
            let code = match serve(session, &mountpoint) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("snapmount: {e:#}");
                    1
                }
            };
            std::process::exit(code);
        }
        _child => {
            drop(write_end);
            let mut msg = String::new();
            let mut r = read_end;
            r.read_to_string(&mut msg)?;
            if msg == "\0ok" {
                Ok(())
            } else if msg.is_empty() {
                bail!("{}: the mount daemon died before the mount was live", mountpoint.display())
            } else {
                Err(anyhow!(msg))
            }
        }
    }
}

/// Opens every source and lays out the files to serve.
fn open_sources(args: &MountArgs, sources: &[PathBuf], mountpoint: &Path) -> Result<SnapFs> {
    let cache = Arc::new(BlockCache::new(args.cache_size));
    let files = super::password::PasswordFiles::from_args(&args.password_file);
    let passwords = move |image: &Path| files.password_for(image);
    let rules = args.rules.rules(&cache)?;
    let catalog = Arc::new(Catalog::build(sources, &cache, &passwords, &rules)?);
    if args.rules.force_share {
        tracing::warn!(
            "--force-share: images are read without QEMU's image locks; a VM may write them while mounted: \
             a current disk that changes fails its reads from then on (EIO), snapshots stay exact"
        );
    }
    tracing::debug!("{} entries ready; mounting on {}", catalog.len(), mountpoint.display());
    let owner = Ownership { uid: args.uid, gid: args.gid, umask: args.umask.unwrap_or(0) };
    Ok(SnapFs::new(catalog, owner))
}

/// The subtype that makes the mount show as `fuse.snapmount` in mountinfo
/// and findmnt. fuser hands `Subtype` only to fusermount3 (the path taken
/// without root); its direct mount(2), taken as root, passes fstype "fuse"
/// and drops it, so as root it goes to the kernel as a plain option, which
/// the kernel's FUSE accepts.
fn subtype() -> MountOption {
    // SAFETY: a plain getter.
    if unsafe { libc::geteuid() } == 0 {
        MountOption::CUSTOM("subtype=snapmount".into())
    } else {
        MountOption::Subtype("snapmount".into())
    }
}

/// Every FUSE worker thread would otherwise get its own malloc arena; blocks
/// freed by one thread and allocated by another then leave the arenas
/// fragmented, and the daemon grows well past the cache bound. Two arenas
/// keep it near the bound (measured: 314 MiB instead of 466 MiB peak with a
/// 256 MiB cache under 4-thread random reads) at no cost in speed.
fn limit_heap_slack() {
    // SAFETY: mallopt only tunes glibc's allocator.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

/// Serves until unmounted (`umount`, `snapmount umount`) or signalled.
fn serve(mut session: Session<SnapFs>, mountpoint: &Path) -> Result<()> {
    let mut unmounter = session.unmount_callable();
    let target = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let sig = wait_for_signal();
            info!("signal {sig}: unmounting");
            if let Err(e) = unmounter.unmount() {
                // Busy (a file is open): detach it now; the kernel finishes
                // the unmount when the last user goes, and the session ends.
                tracing::warn!("unmount failed ({e}); detaching the mount");
                // SAFETY: a valid NUL-terminated path.
                if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                    tracing::error!("detaching failed: {}", std::io::Error::last_os_error());
                }
            }
        })
        .context("cannot start the signal thread")?;
    raise_readahead_when_live(mountpoint);
    session.run().with_context(|| format!("{}: FUSE session ended with an error", mountpoint.display()))?;
    info!("{} unmounted", mountpoint.display());
    Ok(())
}

/// The kernel's read-ahead for the mount (KiB): buffered sequential readers
/// then keep several 1 MiB requests in flight, which the FUSE threads decode
/// in parallel, instead of one 128 KiB window at a time.
const READAHEAD_KB: u64 = 4096;

/// Raises the mount's read-ahead once FUSE's INIT is done (the kernel sets
/// it from INIT's reply, at most the 128 KiB it offered; its sysfs knob,
/// root's to write, has no such cap). A `stat` of the mountpoint returns
/// only after INIT. Best effort: a reader is merely slower without it.
fn raise_readahead_when_live(mountpoint: &Path) {
    let mountpoint = mountpoint.to_path_buf();
    let spawned = std::thread::Builder::new().name("readahead".into()).spawn(move || {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(&mountpoint) else { return };
        let dev = meta.dev();
        let knob = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
        match std::fs::write(&knob, READAHEAD_KB.to_string()) {
            Ok(()) => tracing::debug!("{knob}: {READAHEAD_KB}"),
            Err(e) => tracing::debug!("{knob}: read-ahead left as the kernel set it ({e})"),
        }
    });
    if let Err(e) = spawned {
        tracing::debug!("no read-ahead thread: {e}");
    }
}

const SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the termination signals in this thread and every thread it starts,
/// so that only the signal thread receives them (with sigwait).
fn block_signals() {
    let set = signal_set();
    // SAFETY: valid set pointer.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn wait_for_signal() -> i32 {
    let set = signal_set();
    let mut sig = 0;
    // SAFETY: valid pointers; the signals are blocked in every thread.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}

fn pipe() -> Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("cannot create a pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we own.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn redirect_stdio(log: Option<&Path>) {
    let null = File::options().read(true).write(true).open("/dev/null");
    let out = match log {
        Some(p) => {
            File::options().create(true).append(true).open(p).or_else(|_| File::options().write(true).open("/dev/null"))
        }
        None => File::options().write(true).open("/dev/null"),
    };
    if let (Ok(null), Ok(out)) = (null, out) {
        // SAFETY: duplicating valid descriptors onto 0, 1, 2.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(out.as_raw_fd(), 1);
            libc::dup2(out.as_raw_fd(), 2);
        }
    }
}

fn check_mountpoint(path: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("{}: mountpoint does not exist (create it with mkdir)", path.display()),
        _ if e.raw_os_error() == Some(libc::ENOTCONN) => anyhow!(
            "{}: a dead daemon's mount is still there (Transport endpoint is not connected); clean it with: snapmount umount {}",
            path.display(),
            path.display()
        ),
        _ => anyhow!("{}: mountpoint: {e}", path.display()),
    })?;
    if !meta.is_dir() {
        bail!("{}: mountpoint is not a directory", path.display());
    }
    let path = std::fs::canonicalize(path).with_context(|| format!("{}: mountpoint", path.display()))?;
    // A directory that is already a mountpoint would be hidden under ours.
    if super::mountinfo::fs_type(&path).is_some() {
        bail!(
            "{}: something is already mounted there (unmount it first: snapmount umount {})",
            path.display(),
            path.display()
        );
    }
    Ok(path)
}

/// Non-root users may use allow_other only when /etc/fuse.conf says so.
fn check_allow_other() -> Result<()> {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    let allowed = conf.lines().any(|l| l.trim() == "user_allow_other");
    if !allowed {
        bail!(
            "allow_other needs 'user_allow_other' in /etc/fuse.conf (ask an administrator to add it), or mount as root"
        );
    }
    Ok(())
}

fn check_fuse_device() -> Result<()> {
    match File::options().read(true).write(true).open("/dev/fuse") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("/dev/fuse: missing; load the fuse module (modprobe fuse) or install fuse3")
        }
        Err(e) => bail!("/dev/fuse: {e} (is the user allowed to use FUSE?)"),
    }
}

fn mount_error(mountpoint: &Path, e: std::io::Error) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::EBUSY) => anyhow!("{}: mountpoint is busy (already mounted?)", mountpoint.display()),
        Some(libc::EPERM) | Some(libc::EACCES) => anyhow!(
            "{}: not permitted to mount ({e}); run as root, or install fuse3 for fusermount3",
            mountpoint.display()
        ),
        _ => anyhow!("{}: cannot mount: {e}", mountpoint.display()),
    }
}

/// The name shown in the mount table: the single source, or the first and a count.
fn fsname(sources: &[PathBuf]) -> String {
    let mut first = sources[0].display().to_string().replace(',', "_");
    // /proc/mounts is world-readable: no query string of a URL there (a
    // presigned URL's is a credential).
    if snapmount::io::remote::is_url(&sources[0]) {
        first.truncate(first.find('?').unwrap_or(first.len()));
    }
    match sources.len() {
        1 => first,
        n => format!("{first}+{}", n - 1),
    }
}
