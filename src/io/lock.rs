//! QEMU's image locks: OFD byte-range locks on the image file, as QEMU's
//! `block/file-posix.c` takes them, so that QEMU and snapmount see each other.
//!
//! QEMU describes what a user of an image does with permission bits
//! (consistent read, write, write-unchanged, resize) and, for each bit, holds
//! a shared lock on byte 100 + bit when it holds the permission and on byte
//! 200 + bit when it does not let others hold it. A user conflicts with
//! another when it holds a permission the other does not share, or does not
//! share one the other holds. Read off qemu-io 10.0.2 in /proc/locks: a
//! read-only user locks bytes 100 (holds consistent read), 201 and 203
//! (shares neither write nor resize); a writer adds 101 and 103.
//!
//! snapmount takes exactly the read-only user's locks, and keeps them for as
//! long as the file is open: a QEMU writer then fails to open the image with
//! its own error ('Failed to get "write" lock'), and a read-only QEMU user
//! (`qemu-img info`, a VM with `readonly=on`) is not disturbed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's permission bits, in bit order, by the names its messages use.
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// Held by a read-only user: the permissions it holds, and those it does
/// not share with others.
const HELD: [i64; 1] = [CONSISTENT_READ];
const UNSHARED: [i64; 2] = [WRITE, RESIZE];

/// Takes the locks a read-only QEMU user holds (consistent read held, write
/// and resize not shared) on `file`; fails, naming the image and the lock,
/// when another process holds the image in a way that conflicts (a writer).
/// As QEMU does, the locks are taken first and the conflicts checked after,
/// so that two processes opening at once see each other.
pub fn lock_shared_read(file: &File, path: &Path) -> Result<()> {
    let bytes = HELD.iter().map(|b| PERM_BASE + b).chain(UNSHARED.iter().map(|b| SHARED_BASE + b));
    for byte in bytes {
        match ofd(file, libc::F_OFD_SETLK, libc::F_RDLCK, byte) {
            Ok(_) => {}
            // Where the filesystem has no OFD locks, QEMU goes on without
            // them; so does snapmount, and says so.
            Err(e) if unsupported(&e) => {
                tracing::warn!(
                    "{}: cannot take QEMU's image locks here ({e}); QEMU will not see this mount",
                    path.display()
                );
                return Ok(());
            }
            Err(e) => return Err(Error::open(path, format!("cannot take QEMU's image lock at byte {byte}: {e}"))),
        }
    }
    // A permission held here conflicts with one another user does not
    // share, and the other way round.
    let checks =
        HELD.iter().map(|&b| (SHARED_BASE + b, b, false)).chain(UNSHARED.iter().map(|&b| (PERM_BASE + b, b, true)));
    for (byte, bit, theirs) in checks {
        let held = ofd(file, libc::F_OFD_GETLK, libc::F_WRLCK, byte)
            .map_err(|e| Error::open(path, format!("cannot test QEMU's image lock at byte {byte}: {e}")))?;
        if held {
            let name = NAMES[bit as usize];
            let what = if theirs {
                format!("another process holds its \"{name}\" lock (a VM or qemu-storage-daemon using it read-write?)")
            } else {
                format!("another process does not share \"{name}\"")
            };
            return Err(Error::open(
                path,
                format!("image is in use: {what}; --force-share serves it anyway, unlocked (see IMAGES IN USE in snapmount(8))"),
            ));
        }
    }
    Ok(())
}

/// One `fcntl` OFD lock call on the single byte `byte`. For `F_OFD_GETLK`,
/// whether another open file description holds a lock there that conflicts
/// with `kind`; for `F_OFD_SETLK`, `false`.
fn ofd(file: &File, cmd: libc::c_int, kind: libc::c_int, byte: i64) -> std::io::Result<bool> {
    // SAFETY: a zeroed flock is a valid value of a plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: fcntl on our own open descriptor with a valid flock pointer.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cmd == libc::F_OFD_GETLK && fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOLCK))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locked_bytes(path: &Path) -> Vec<i64> {
        (0..300).filter(|&b| ofd(&File::open(path).unwrap(), libc::F_OFD_GETLK, libc::F_WRLCK, b).unwrap()).collect()
    }

    #[test]
    fn takes_a_read_only_users_locks_and_refuses_a_writer() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let a = File::open(tmp.path()).unwrap();
        lock_shared_read(&a, tmp.path()).unwrap();
        assert_eq!(locked_bytes(tmp.path()), vec![100, 201, 203]);
        // A second reader shares with the first.
        let b = File::open(tmp.path()).unwrap();
        lock_shared_read(&b, tmp.path()).unwrap();
        // A writer's lock (byte 101, as qemu-io takes it) makes readers refuse.
        drop((a, b));
        let w = File::open(tmp.path()).unwrap();
        ofd(&w, libc::F_OFD_SETLK, libc::F_RDLCK, 101).unwrap();
        let err = lock_shared_read(&File::open(tmp.path()).unwrap(), tmp.path()).unwrap_err().to_string();
        assert!(err.contains("\"write\" lock") && err.contains("--force-share"), "{err}");
    }
}
