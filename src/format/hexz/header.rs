//! The HEXZ header: a bincode struct from byte 0 of a 4096-byte block
//! (research note hexz.md §3).

use super::wire::{Cursor, WireResult};

pub const MAGIC: [u8; 4] = *b"HEXZ";
pub const HEADER_SIZE: usize = 4096;
/// More parent paths than this is not something hexz writes (it writes 0 or 1).
const MAX_PARENTS: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Lz4,
    Zstd,
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Encryption {
    pub salt: [u8; 16],
    pub iterations: u32,
}

#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub block_size: u32,
    pub index_offset: u64,
    pub parent_paths: Vec<String>,
    pub dictionary: Option<(u64, u32)>,
    pub metadata: Option<(u64, u32)>,
    pub signature: Option<(u64, u32)>,
    pub encryption: Option<Encryption>,
    pub codec: Codec,
    pub has_main: bool,
    pub has_auxiliary: bool,
    pub variable_blocks: bool,
    /// (fingerprint bits, min chunk, max chunk)
    pub cdc_params: Option<(u32, u32, u32)>,
}

/// Pairs an offset with a length when both are present.
fn pair<A, B>(a: Option<A>, b: Option<B>) -> Option<(A, B)> {
    Some((a?, b?))
}

impl Header {
    pub fn parse(block: &[u8]) -> WireResult<Header> {
        let mut c = Cursor::new(&block[..block.len().min(HEADER_SIZE)]);
        if c.take(4, "magic")? != MAGIC {
            return Err("not a HEXZ archive (no HEXZ magic)".into());
        }
        let version = c.u32("version")?;
        if version != 1 {
            return Err(format!("unsupported HEXZ format version {version} (only 1 is)"));
        }
        let block_size = c.u32("block size")?;
        let index_offset = c.u64("index offset")?;
        let parents = c.u64("parent path count")?;
        if parents > MAX_PARENTS {
            return Err(format!("{parents} parent paths (at most {MAX_PARENTS} are accepted)"));
        }
        let parent_paths = (0..parents).map(|_| c.string("parent path")).collect::<WireResult<_>>()?;
        let dict_off = c.opt_u64("dictionary offset")?;
        let dict_len = c.opt_u32("dictionary length")?;
        let meta_off = c.opt_u64("metadata offset")?;
        let meta_len = c.opt_u32("metadata length")?;
        let sig_off = c.opt_u64("signature offset")?;
        let sig_len = c.opt_u32("signature length")?;
        let encryption = if c.option("encryption")? {
            let salt = c.take(16, "salt")?.try_into().unwrap();
            let iterations = c.u32("iterations")?;
            Some(Encryption { salt, iterations })
        } else {
            None
        };
        let codec = match c.u32("compression")? {
            0 => Codec::Lz4,
            1 => Codec::Zstd,
            v => return Err(format!("unknown compression type {v}")),
        };
        let has_main = c.bool("has_main")?;
        let has_auxiliary = c.bool("has_auxiliary")?;
        let variable_blocks = c.bool("variable_blocks")?;
        let cdc_params =
            if c.option("cdc parameters")? { Some((c.u32("cdc")?, c.u32("cdc")?, c.u32("cdc")?)) } else { None };
        Ok(Header {
            version,
            block_size,
            index_offset,
            parent_paths,
            dictionary: pair(dict_off, dict_len),
            metadata: pair(meta_off, meta_len),
            signature: pair(sig_off, sig_len),
            encryption,
            codec,
            has_main,
            has_auxiliary,
            variable_blocks,
            cdc_params,
        })
    }
}
