//! The GUID partition table (UEFI spec, chapter 5): the header at LBA 1 and
//! its entries, both checked by CRC32; when the primary is damaged, the
//! backup header at the last LBA, as the kernel's `efi` parser does.

use tracing::warn;

use super::{Kind, Partition};
use crate::bytes::{le32, le64};
use crate::error::Result;
use crate::view::View;

const SIGNATURE: &[u8; 8] = b"EFI PART";
/// Entries read at most: 128 are standard; the kernel accepts any count
/// whose array fits, but the partition numbers end at 256 anyway.
const MAX_ENTRIES: u32 = 256;
const MAX_ENTRY_SIZE: u32 = 4096;

struct Header {
    entries_lba: u64,
    entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

/// The header at `lba`, if it is one: signature, size, CRC, and where it
/// says it is.
fn header(disk: &dyn View, lba: u64, sector: u64) -> Result<Option<Header>> {
    let mut b = [0u8; 512];
    disk.read_at(&mut b, lba * sector)?;
    let size = le32(&b, 12) as usize;
    if &b[0..8] != SIGNATURE || !(92..=512).contains(&size) || le64(&b, 24) != lba {
        return Ok(None);
    }
    let crc = le32(&b, 16);
    b[16..20].fill(0);
    if crc32fast::hash(&b[..size]) != crc {
        return Ok(None);
    }
    let h = Header {
        entries_lba: le64(&b, 72),
        entries: le32(&b, 80),
        entry_size: le32(&b, 84),
        entries_crc: le32(&b, 88),
    };
    let fits = h.entry_size >= 128 && h.entry_size.is_power_of_two() && h.entry_size <= MAX_ENTRY_SIZE;
    Ok(fits.then_some(h))
}

/// The entry array of `h`, if its CRC matches.
fn entries(disk: &dyn View, h: &Header, sector: u64) -> Result<Option<Vec<u8>>> {
    let len = h.entries as u64 * h.entry_size as u64;
    let end = h.entries_lba.checked_mul(sector).and_then(|s| s.checked_add(len));
    if h.entries > MAX_ENTRIES * 4 || end.is_none_or(|e| e > disk.size()) {
        return Ok(None);
    }
    let mut raw = vec![0u8; len as usize];
    disk.read_at(&mut raw, h.entries_lba * sector)?;
    Ok((crc32fast::hash(&raw) == h.entries_crc).then_some(raw))
}

/// The GPT of `disk`, read with 512-byte sectors, else with 4096-byte ones
/// (disks of 4Kn drives keep their header at byte 4096).
pub fn read(disk: &dyn View, what: &str) -> Result<Vec<Partition>> {
    let mut table = None;
    'sizes: for sector in [512u64, 4096] {
        if disk.size() < 2 * sector {
            break;
        }
        let last = disk.size() / sector - 1;
        for lba in [1, last] {
            if let Some(h) = header(disk, lba, sector)? {
                if let Some(raw) = entries(disk, &h, sector)? {
                    if lba != 1 {
                        warn!("{what}: the primary GPT is damaged; using the backup");
                    }
                    table = Some((h, raw, sector, last));
                    break 'sizes;
                }
            }
        }
    }
    let Some((h, raw, sector, last)) = table else {
        warn!("{what}: protective MBR, but neither GPT header is valid: no partitions");
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (i, e) in raw.chunks_exact(h.entry_size as usize).enumerate().take(MAX_ENTRIES as usize) {
        let type_guid = &e[0..16];
        if type_guid.iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last_lba) = (le64(e, 32), le64(e, 40));
        if first > last_lba || last_lba > last {
            warn!("{what}: GPT entry {} has a bad range; skipped", i + 1);
            continue;
        }
        let name: Vec<u16> = e[56..128].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        let name = String::from_utf16_lossy(&name).trim_end_matches('\0').to_string();
        out.push(Partition {
            number: i as u32 + 1,
            start: first * sector,
            size: (last_lba - first + 1) * sector,
            kind: Kind::Gpt { type_guid: guid(type_guid), unique_guid: guid(&e[16..32]), name },
        });
    }
    Ok(out)
}

/// A GUID in its usual text form (the first three fields little-endian).
fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10..16].iter().map(|x| format!("{x:02X}")).collect::<String>()
    )
}

/// Readable names of the common GPT partition types.
pub fn type_name(guid: &str) -> &'static str {
    match guid {
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915" => "Linux home",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        _ => "",
    }
}
