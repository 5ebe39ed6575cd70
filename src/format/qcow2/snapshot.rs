//! The internal snapshot table (research note A.8). Read at open; the
//! snapshots' L1 tables are read only when a view first needs them.

use std::path::Path;

use crate::bytes::{be16, be32, be64};
use crate::error::{Error, Result};
use crate::io::Source;

use super::header::{Header, MAX_L1_BYTES};

/// QEMU's limits on the table and on one entry's extra data.
const MAX_TABLE_BYTES: u64 = 64 << 20;
const MAX_EXTRA: u32 = 1024;

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    /// Raw name bytes: names need not be UTF-8 nor unique.
    pub name: Vec<u8>,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// The snapshot's disk size; the image's current size when the entry
    /// lacks the field.
    pub disk_size: u64,
    /// `None` when the entry lacks the field.
    pub icount: Option<u64>,
    /// Why this snapshot's L1 table cannot be used (its views then fail
    /// their reads; the image and its other snapshots still work, as in QEMU).
    pub l1_error: Option<String>,
}

/// Reads the whole table. The table's length is not stored, so it is read in
/// growing chunks, each entry checked before it is used.
pub fn read_table(path: &Path, file: &Source, h: &Header) -> Result<Vec<Snapshot>> {
    let bad = |i: u32, msg: String| Error::open(path, format!("bad snapshot table entry {i}: {msg}"));
    let mut out = Vec::with_capacity(h.nb_snapshots.min(4096) as usize);
    let mut buf = Vec::new();
    let mut buf_start = h.snapshots_offset;
    let mut pos = h.snapshots_offset;
    // Makes sure bytes [pos, pos + n) are in `buf`.
    let need = |buf: &mut Vec<u8>, buf_start: &mut u64, pos: u64, n: u64| -> Result<()> {
        if pos + n - h.snapshots_offset > MAX_TABLE_BYTES {
            return Err(Error::open(path, "snapshot table larger than 64 MiB"));
        }
        if pos >= *buf_start && pos + n <= *buf_start + buf.len() as u64 {
            return Ok(());
        }
        // Past the end of the file QEMU reads zeros, and so does this: the
        // end of a table can fall past it (an image copied to a block
        // device rounds its size down to 512). But an entry that starts
        // there is damage: zeros would let a few bytes claim 65536 snapshots.
        if pos >= file.len() {
            return Err(Error::open(path, "snapshot table runs past the end of the file"));
        }
        let len = n.max(64 << 10);
        buf.resize(len as usize, 0);
        *buf_start = pos;
        file.read_at(buf, pos)
    };
    for i in 0..h.nb_snapshots {
        pos = pos.div_ceil(8) * 8;
        need(&mut buf, &mut buf_start, pos, 40)?;
        let e = &buf[(pos - buf_start) as usize..];
        let l1_table_offset = be64(e, 0);
        let l1_size = be32(e, 8);
        let id_len = be16(e, 12) as u64;
        let name_len = be16(e, 14) as u64;
        let date_sec = be32(e, 16);
        let date_nsec = be32(e, 20);
        let vm_clock_nsec = be64(e, 24);
        let mut vm_state_size = be32(e, 32) as u64;
        let extra = be32(e, 36);
        if extra > MAX_EXTRA {
            return Err(bad(i, format!("too much extra data ({extra} bytes)")));
        }
        let total = 40 + extra as u64 + id_len + name_len;
        need(&mut buf, &mut buf_start, pos, total)?;
        let e = &buf[(pos - buf_start) as usize..];
        let mut disk_size = h.size;
        let mut icount = None;
        if extra >= 8 {
            vm_state_size = be64(e, 40);
        }
        if extra >= 16 {
            disk_size = be64(e, 48);
        }
        if extra >= 24 {
            icount = Some(be64(e, 56));
        }
        let ids = 40 + extra as usize;
        let id = String::from_utf8_lossy(&e[ids..ids + id_len as usize]).into_owned();
        let names = ids + id_len as usize;
        let name = e[names..names + name_len as usize].to_vec();
        let l1_error = if !l1_table_offset.is_multiple_of(h.cluster_size()) {
            Some(format!("L1 table offset {l1_table_offset:#x} unaligned"))
        } else if l1_size as u64 * 8 > MAX_L1_BYTES {
            Some(format!("L1 table of {l1_size} entries is too large"))
        } else {
            None
        };
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            icount,
            l1_error,
        });
        pos += total;
    }
    Ok(out)
}
