//! `snapmount umount`: unmount, and clean up stale mounts of a killed daemon.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

pub fn umount(mountpoint: &Path) -> Result<()> {
    let c = CString::new(mountpoint.as_os_str().as_bytes())?;
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
        Some(libc::ENOTCONN) | Some(libc::EIO) => {
            // A dead daemon's mount: detach it.
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                return Ok(());
            }
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
