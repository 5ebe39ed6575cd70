//! `snapmount umount`: unmount, and clean up stale mounts of a killed daemon.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

pub fn umount(mountpoint: &Path) -> Result<()> {
    // Only FUSE mounts: as root, this must not unmount anything else.
    // Resolve symlinks in the parent only: the mountpoint itself may be a
    // dead mount that cannot be looked at.
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let abs = match (abs.parent().map(std::fs::canonicalize), abs.file_name()) {
        (Some(Ok(parent)), Some(name)) => parent.join(name),
        _ => abs,
    };
    match super::mountinfo::fs_type(&abs) {
        Some(t) if t == "fuse" || t.starts_with("fuse.") => {}
        Some(t) => bail!("{}: not a snapmount mount (it is {t}); use umount(8) for that", mountpoint.display()),
        None => bail!("{}: not a mountpoint", mountpoint.display()),
    }
    let c = CString::new(abs.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EBUSY) => bail!(
            "{}: mount is busy (a process has files open there; see `fuser -vm {}`)",
            mountpoint.display(),
            mountpoint.display()
        ),
        Some(libc::EINVAL) => bail!("{}: not a mountpoint", mountpoint.display()),
        Some(libc::ENOENT) => bail!("{}: no such directory", mountpoint.display()),
        Some(libc::ENOTCONN) | Some(libc::EIO)
            // A dead daemon's mount: detach it.
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 => {
                return Ok(());
            }
        _ => {}
    }
    // Not root: the setuid helper may unmount our own FUSE mounts.
    for helper in ["fusermount3", "fusermount"] {
        if let Ok(status) = Command::new(helper).arg("-u").arg(mountpoint).status() {
            if status.success() {
                return Ok(());
            }
        }
    }
    bail!("{}: cannot unmount: {err}", mountpoint.display())
}
