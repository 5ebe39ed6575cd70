//! Change detection for images served under `--force-share`, where a VM may
//! be writing the image while it is mounted (no locks keep it out).
//!
//! The active view must never serve a silent mix of old and new data: its
//! L1 table was read at mount, and L2 tables and clusters sit in caches. So
//! once the image (or its data file) has changed at all (size or mtime,
//! checked after every read), the active view fails its reads with EIO and
//! says why, for good. Dropping caches instead would still mix: the tree's
//! sizes and snapshot list were fixed at mount.
//!
//! Internal snapshot views stay exact while a VM writes: QEMU never rewrites
//! a cluster a snapshot references, it copies on write. The one way a
//! snapshot's clusters change is the snapshot's deletion (then they may be
//! reused), so after a change the snapshot table is read again; a snapshot
//! that is gone, or whose L1 table moved, fails its reads from then on.
//! QEMU writes the new table before it frees anything, so a read that the
//! check after it passes was served from intact clusters.

use std::path::Path;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::io::{Source, Stamp};

use super::snapshot::{self, Snapshot};

pub(super) struct Watch {
    /// The image file's and the data file's stamps when they were opened.
    at_open: Vec<Stamp>,
    /// The image is a block device: its times do not change with writes,
    /// so a change cannot be seen. The current disk is then not served at
    /// all, and snapshots are checked on every read.
    block_device: bool,
    /// The image's stamp when the snapshot table was last found as it was
    /// at open, and which snapshots were still there then.
    checked: Mutex<(Stamp, Vec<bool>)>,
}

impl Watch {
    pub(super) fn new(file: &Source, data: Option<&Source>, snapshots: usize) -> Result<Watch> {
        let stamp = file.stamp()?;
        let mut at_open = vec![stamp];
        if let Some(d) = data {
            at_open.push(d.stamp()?);
        }
        let block_device = file.mode() & libc::S_IFMT == libc::S_IFBLK
            || data.is_some_and(|d| d.mode() & libc::S_IFMT == libc::S_IFBLK);
        Ok(Watch { at_open, block_device, checked: Mutex::new((stamp, vec![true; snapshots])) })
    }

    /// Fails when the image or its data file changed since they were opened
    /// (`files`: the image, then the data file if any, as given to `new`).
    pub(super) fn check_active(&self, path: &Path, files: &[&Source]) -> Result<()> {
        if self.block_device {
            return Err(Error::open(
                path,
                "on a block device a change cannot be seen, so with --force-share its current disk is not \
                 served; snapshots are",
            ));
        }
        for (i, (file, then)) in files.iter().zip(&self.at_open).enumerate() {
            if file.stamp()? != *then {
                let what = if i == 0 { "the image" } else { "its data file" };
                return Err(Error::open(
                    path,
                    format!(
                        "{what} changed since it was mounted with --force-share (a VM writing it?): \
                         the current disk is no longer served; snapshots still are"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Fails when snapshot `index` (as it was at open, one of `snapshots`)
    /// is no longer in the image's snapshot table.
    pub(super) fn check_snapshot(&self, file: &Source, snapshots: &[Snapshot], index: usize) -> Result<()> {
        let now = file.stamp()?;
        let mut checked = self.checked.lock();
        if checked.0 != now || self.block_device {
            let fresh = file.refreshed()?;
            let table =
                super::super::read_header(&fresh)
                    .and_then(|h| snapshot::read_table(file.path(), &fresh, &h))
                    .map_err(|e| Error::open(file.path(), format!("snapshot table unreadable after a change ({e})")))?;
            // Gone stays gone: a deleted snapshot's clusters may be reused.
            let still = |s: &Snapshot| {
                table.iter().any(|t| t.id == s.id && t.l1_table_offset == s.l1_table_offset && t.l1_size == s.l1_size)
            };
            let alive = checked.1.iter().zip(snapshots).map(|(was, s)| *was && still(s)).collect();
            *checked = (now, alive);
        }
        if checked.1.get(index).copied().unwrap_or(false) {
            Ok(())
        } else {
            let id = snapshots.get(index).map_or("?", |s| s.id.as_str());
            Err(Error::open(
                file.path(),
                format!("snapshot {id} was deleted since it was mounted with --force-share; it is no longer served"),
            ))
        }
    }
}
