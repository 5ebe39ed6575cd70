//! A FUSE filesystem with one read-only file, `zero`, whose reads return
//! zeros: the cost of the FUSE transport alone, with snapmount's settings
//! (1 MiB requests, several worker threads with cloned /dev/fuse fds,
//! FOPEN_KEEP_CACHE). `benches/compare.sh` uses it as the ceiling any FUSE
//! daemon can reach on this machine.
//!
//! Build: `cargo build --release --example zerofs`
//! Run:   `target/release/examples/zerofs MOUNTPOINT [SIZE_BYTES] [THREADS]`
//! (foreground; unmount with `umount MOUNTPOINT` or SIGTERM/SIGINT).

use std::ffi::OsStr;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request, Session,
};

/// Same request size snapmount asks for (src/fs.rs MAX_READ).
const MAX_READ: u32 = 1 << 20;
/// Zeros served by every read (a read is never longer than MAX_READ).
static ZEROS: [u8; MAX_READ as usize] = [0; MAX_READ as usize];
const TTL: Duration = Duration::from_secs(24 * 3600);
const FILE_INO: u64 = 2;

struct ZeroFs {
    size: u64,
}

impl ZeroFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == 1;
        FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { self.size },
            blocks: if dir { 0 } else { self.size.div_ceil(512) },
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm: if dir { 0o555 } else { 0o444 },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 128 << 10,
            flags: 0,
        }
    }
}

impl Filesystem for ZeroFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_READ);
        let _ = config.set_max_write(MAX_READ);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == "zero" {
            reply.entry(&TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            1 | FILE_INO => reply.attr(&TTL, &self.attr(ino.0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = self.size.saturating_sub(offset).min(size as u64) as usize;
        reply.data(&ZEROS[..len.min(ZEROS.len())]);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino.0 != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let entries =
            [(1, FileType::Directory, "."), (1, FileType::Directory, ".."), (FILE_INO, FileType::RegularFile, "zero")];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mountpoint = args.next().expect("usage: zerofs MOUNTPOINT [SIZE_BYTES] [THREADS]");
    let size = args.next().map_or(1 << 30, |s| s.parse().expect("SIZE_BYTES is a number"));
    // Same default as snapmount: 2 per CPU, 4 to 16.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads = args.next().map_or((2 * cpus).clamp(4, 16), |s| s.parse().expect("THREADS is a number"));

    let mut config = Config::default();
    config.mount_options =
        vec![MountOption::RO, MountOption::FSName("zerofs".into()), MountOption::Subtype("zerofs".into())];
    config.n_threads = Some(threads);
    config.clone_fd = true;
    let mut session = Session::new(ZeroFs { size }, &mountpoint, &config).expect("mount");
    // SIGTERM/SIGINT: unmount from a helper thread so run() returns. The
    // signals are blocked before run() starts its workers, so only the
    // helper (sigwait) receives them.
    let mut unmounter = session.unmount_callable();
    let set = {
        // SAFETY: sigset manipulation on a local.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: valid pointers; the signals are blocked in every thread.
        unsafe { libc::sigwait(&set, &mut sig) };
        let _ = unmounter.unmount();
    });
    session.run().expect("FUSE session");
}
