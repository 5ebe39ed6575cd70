//! The MBR partition table: four primary entries, and logical partitions in
//! a chain of extended boot records (EBRs) inside an extended partition,
//! numbered 5 and up as the kernel's `msdos` parser does.

use tracing::warn;

use super::{Kind, Partition, SECTOR};
use crate::bytes::le32;
use crate::error::Result;
use crate::view::View;

pub const PROTECTIVE: u8 = 0xEE;
const EXTENDED: [u8; 3] = [0x05, 0x0F, 0x85];
/// Logical partitions followed at most (the kernel's DISK_MAX_PARTS is 256).
const MAX_LOGICAL: u32 = 252;

#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub kind: u8,
    /// In sectors, relative to what the entry's table is relative to.
    pub start: u64,
    pub sectors: u64,
}

/// The four entries of the table in `sector`, or `None` when the sector is
/// not a partition table (no 55 AA signature, or a boot flag other than 0
/// or 0x80: a filesystem's boot sector, as the kernel tells them apart).
pub fn primary(sector: &[u8]) -> Option<[Entry; 4]> {
    if sector[510..512] != [0x55, 0xAA] {
        return None;
    }
    let mut out = [Entry { kind: 0, start: 0, sectors: 0 }; 4];
    for (i, e) in out.iter_mut().enumerate() {
        let raw = &sector[446 + 16 * i..462 + 16 * i];
        if raw[0] != 0 && raw[0] != 0x80 {
            return None;
        }
        *e = Entry { kind: raw[4], start: le32(raw, 8) as u64, sectors: le32(raw, 12) as u64 };
    }
    Some(out)
}

pub fn read(disk: &dyn View, entries: &[Entry; 4], what: &str) -> Result<Vec<Partition>> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        if EXTENDED.contains(&e.kind) {
            logical(disk, e, &mut out, what)?;
        } else {
            out.push(partition(i as u32 + 1, e.start, e.sectors, e.kind));
        }
    }
    out.sort_by_key(|p| p.number);
    Ok(out)
}

fn partition(number: u32, start: u64, sectors: u64, kind: u8) -> Partition {
    Partition { number, start: start * SECTOR, size: sectors * SECTOR, kind: Kind::Mbr { type_byte: kind } }
}

/// Follows the EBR chain of the extended partition `ext`: each EBR's first
/// entry is a logical partition (relative to the EBR), its second the next
/// EBR (relative to the extended partition). A chain that loops or runs
/// long stops there, with a log line.
fn logical(disk: &dyn View, ext: &Entry, out: &mut Vec<Partition>, what: &str) -> Result<()> {
    let mut ebr = ext.start;
    let mut seen = Vec::new();
    let mut number = 5;
    loop {
        if seen.contains(&ebr) || number > 4 + MAX_LOGICAL {
            warn!("{what}: the chain of logical partitions loops or runs too long; stopped at partition {number}");
            return Ok(());
        }
        seen.push(ebr);
        let Some(at) = ebr.checked_mul(SECTOR).filter(|a| a.saturating_add(SECTOR) <= disk.size()) else {
            return Ok(());
        };
        let mut sector = [0u8; SECTOR as usize];
        disk.read_at(&mut sector, at)?;
        let Some(entries) = primary(&sector) else { return Ok(()) };
        let (part, next) = (entries[0], entries[1]);
        if part.kind != 0 && part.sectors != 0 && !EXTENDED.contains(&part.kind) {
            out.push(partition(number, ebr + part.start, part.sectors, part.kind));
            number += 1;
        }
        if next.kind == 0 || next.sectors == 0 || !EXTENDED.contains(&next.kind) {
            return Ok(());
        }
        ebr = ext.start + next.start;
    }
}

/// Readable names of the common MBR types.
pub fn type_name(kind: u8) -> &'static str {
    match kind {
        0x01 | 0x04 | 0x06 | 0x0E => "FAT",
        0x07 => "NTFS/exFAT",
        0x0B | 0x0C => "FAT32",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8E => "Linux LVM",
        0xA5 => "FreeBSD",
        0xEF => "EFI System",
        0xFD => "Linux RAID",
        _ => "",
    }
}
