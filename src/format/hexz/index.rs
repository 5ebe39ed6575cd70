//! The HEXZ index: a master index of page entries per stream, and index pages
//! of 52-byte block entries (research note hexz.md §4).

use super::wire::{Cursor, WireResult};

pub const PAGE_ENTRY_SIZE: u64 = 28;
pub const BLOCK_INFO_SIZE: u64 = 52;
/// Block entries of hexz before 0.5: no hash field.
pub const LEGACY_BLOCK_INFO_SIZE: u64 = 20;
/// `offset` of a block that lives in a parent archive.
pub const PARENT_REF: u64 = u64::MAX;

#[derive(Clone, Copy, Debug)]
pub struct PageEntry {
    pub offset: u64,
    pub length: u32,
    /// Archive-global index of the page's first block.
    pub start_block: u64,
    /// Logical stream offset where the page's first block starts.
    pub start_logical: u64,
}

#[derive(Clone, Debug)]
pub struct MasterIndex {
    pub main_pages: Vec<PageEntry>,
    pub aux_pages: Vec<PageEntry>,
    pub main_size: u64,
    pub aux_size: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct BlockInfo {
    pub offset: u64,
    pub length: u32,
    pub logical_len: u32,
    pub checksum: u32,
    pub hash: [u8; 32],
}

impl BlockInfo {
    pub fn is_parent_ref(&self) -> bool {
        self.offset == PARENT_REF
    }

    /// Zero blocks: hexz writes (0, 0); any other empty non-parent block is
    /// read as zeros too (hexz.md §4.3).
    pub fn is_sparse(&self) -> bool {
        self.length == 0 && !self.is_parent_ref()
    }

    pub fn parse(bytes: &[u8]) -> BlockInfo {
        let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        BlockInfo {
            offset: u64::from_le_bytes(bytes[0..8].try_into().unwrap()),
            length: le32(8),
            logical_len: le32(12),
            checksum: le32(16),
            hash: bytes[20..52].try_into().unwrap(),
        }
    }
}

/// Parses the master index from the bytes at `index_offset`, stopping after
/// its last field (metadata and a signature may follow). Page counts are
/// bounded by the bytes available, so a hostile count cannot allocate.
pub fn parse_master(bytes: &[u8]) -> WireResult<MasterIndex> {
    let mut c = Cursor::new(bytes);
    let pages = |what: &str, c: &mut Cursor| -> WireResult<Vec<PageEntry>> {
        let n = c.u64(what)?;
        let raw = c.take(usize::try_from(n.saturating_mul(PAGE_ENTRY_SIZE)).unwrap_or(usize::MAX), what)?;
        Ok(raw
            .chunks_exact(PAGE_ENTRY_SIZE as usize)
            .map(|e| PageEntry {
                offset: u64::from_le_bytes(e[0..8].try_into().unwrap()),
                length: u32::from_le_bytes(e[8..12].try_into().unwrap()),
                start_block: u64::from_le_bytes(e[12..20].try_into().unwrap()),
                start_logical: u64::from_le_bytes(e[20..28].try_into().unwrap()),
            })
            .collect())
    };
    let main_pages = pages("main page list", &mut c)?;
    let aux_pages = pages("auxiliary page list", &mut c)?;
    let main_size = c.u64("main stream size")?;
    let aux_size = c.u64("auxiliary stream size")?;
    for (name, list) in [("main", &main_pages), ("auxiliary", &aux_pages)] {
        if list.windows(2).any(|w| w[0].start_logical > w[1].start_logical) {
            return Err(format!("{name} index pages are not in logical order"));
        }
    }
    Ok(MasterIndex { main_pages, aux_pages, main_size, aux_size })
}
