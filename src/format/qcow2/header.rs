//! The qcow2 header (first cluster): fixed fields, feature bits and header
//! extensions, validated the way QEMU 10 validates them (research note A.1-A.3).

use std::path::Path;

use crate::bytes::{be32, be64};
use crate::error::{Error, Result};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Incompatible feature bits (A.2).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;

pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_FDE: u32 = 0x0537_BE77;

/// QEMU's limits, copied so that a hostile header cannot make us allocate or
/// loop more than QEMU would.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on a version 1 image's size (block/qcow.c: 2^63 / 512
/// sectors would overflow; it refuses sizes its L1 arithmetic cannot hold).
const MAX_V1_SIZE: u64 = 1 << 56;
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
const MAX_BACKING_NAME: u32 = 1023;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Deflate => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// log2 of the entries in an L2 table: stored in a version 1 header;
    /// in qcow2 a table fills a cluster.
    pub l2_bits: u32,
    /// Virtual size as stored (QEMU rounds it down to 512 when it uses it).
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    /// LUKS: where the encryption header area is (offset, length), from the
    /// full-disk-encryption header extension.
    pub fde: Option<(u64, u64)>,
    /// (type, bit, name) from the feature-name table, for messages.
    pub feature_names: Vec<(u8, u8, String)>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }

    /// Virtual size in bytes as QEMU sees it: rounded down to 512.
    pub fn virtual_size(&self) -> u64 {
        self.size & !511
    }

    /// Bytes of guest data one L2 table covers.
    pub fn l2_coverage(&self) -> u64 {
        1u64 << (self.l2_bits + self.cluster_bits)
    }

    /// A header with nothing in it but its version and cluster size (and
    /// the L2 size that follows in qcow2); `parse` fills in the rest.
    fn plain(version: u32, cluster_bits: u32) -> Header {
        Header {
            version,
            cluster_bits,
            l2_bits: cluster_bits - 3,
            size: 0,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Deflate,
            backing_file: None,
            backing_format: None,
            data_file: None,
            fde: None,
            feature_names: Vec::new(),
        }
    }

    /// Parses and validates the header. `first` holds the start of the file:
    /// at least the whole first cluster, or the whole file if shorter.
    pub fn parse(path: &Path, first: &[u8]) -> Result<Header> {
        let bad = |msg: String| Error::open(path, msg);
        if first.len() < 72 || first[0..4] != MAGIC {
            return Err(bad("not a qcow2 image (no QFI\\xfb magic)".into()));
        }
        let version = be32(first, 4);
        if version == 1 {
            return Header::parse_v1(path, first);
        }
        if version != 2 && version != 3 {
            return Err(bad(format!("unsupported qcow version {version} (only 1, 2 and 3 are)")));
        }
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!("bad header: cluster_bits {cluster_bits} outside 9..21 (512 B to 2 MiB)")));
        }
        let cluster_size = 1u64 << cluster_bits;
        if (first.len() as u64) < cluster_size.min(104) {
            return Err(bad("truncated header".into()));
        }
        let mut h = Header {
            size: be64(first, 24),
            crypt_method: be32(first, 32),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
            ..Header::plain(version, cluster_bits)
        };
        if version == 3 {
            if first.len() < 104 {
                return Err(bad("truncated v3 header".into()));
            }
            h.incompatible = be64(first, 72);
            h.compatible = be64(first, 80);
            h.autoclear = be64(first, 88);
            h.refcount_order = be32(first, 96);
            h.header_length = be32(first, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
                return Err(bad(format!("bad header: header_length {}", h.header_length)));
            }
            if h.header_length as u64 > cluster_size || h.header_length as usize > first.len() {
                return Err(bad(format!("bad header: header_length {} larger than a cluster", h.header_length)));
            }
            if h.header_length > 104 {
                h.compression = match first[104] {
                    0 => Compression::Deflate,
                    1 => Compression::Zstd,
                    t => return Err(bad(format!("unknown compression type {t}"))),
                };
            }
            if h.refcount_order > 6 {
                return Err(bad(format!("bad header: refcount_order {}", h.refcount_order)));
            }
        }

        let backing_offset = be64(first, 8);
        let backing_len = be32(first, 16);
        let ext_end = if backing_offset != 0 { backing_offset } else { cluster_size };
        h.parse_extensions(path, first, ext_end.min(first.len() as u64) as usize)?;

        // Refused features come after the feature table is known, so the message
        // can use its names.
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(bad(format!("unsupported qcow2 feature(s): {}", h.describe_unknown(unknown))));
        }
        let compression_bit = h.incompatible & INCOMPAT_COMPRESSION != 0;
        if compression_bit != (h.compression != Compression::Deflate) {
            return Err(bad(format!(
                "bad header: compression type {} does not match the compression feature bit",
                h.compression.name()
            )));
        }
        if h.extended_l2() {
            h.l2_bits = cluster_bits - 4;
        }
        if h.extended_l2() && cluster_bits < 14 {
            // QEMU refuses these too ("Unsupported subcluster size").
            return Err(bad(format!(
                "extended L2 entries with {} byte clusters (subclusters under 512 bytes) are not supported",
                1u64 << cluster_bits
            )));
        }
        match (h.crypt_method, h.fde) {
            (0, _) => {}
            (1, None) => {}
            (1, Some(_)) => return Err(bad("bad header: LUKS header extension on a legacy AES image".into())),
            (2, Some((offset, _))) if offset % cluster_size != 0 => {
                return Err(bad(format!("bad header: LUKS header offset {offset:#x} is not cluster aligned")))
            }
            (2, Some(_)) => {}
            (2, None) => return Err(bad("bad header: LUKS encryption without its header extension".into())),
            (m, _) => return Err(bad(format!("unknown encryption method {m}"))),
        }

        if backing_offset != 0 {
            if backing_len > MAX_BACKING_NAME
                || backing_offset > cluster_size
                || backing_offset + backing_len as u64 > cluster_size
                || backing_offset + backing_len as u64 > first.len() as u64
            {
                return Err(bad("bad header: backing file name out of the first cluster".into()));
            }
            let name = &first[backing_offset as usize..(backing_offset + backing_len as u64) as usize];
            // QEMU treats it as a C string: a NUL ends it.
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            let name =
                String::from_utf8(name.to_vec()).map_err(|_| bad("backing file name is not valid UTF-8".into()))?;
            if !name.is_empty() {
                h.backing_file = Some(name);
            }
        }
        if h.has_data_file() && h.data_file.is_none() {
            return Err(bad("external data file feature set but no data file name".into()));
        }

        // Table placement (A.1, A.12).
        if !h.l1_table_offset.is_multiple_of(cluster_size) {
            return Err(bad(format!("bad header: L1 table offset {:#x} unaligned", h.l1_table_offset)));
        }
        if h.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(bad(format!("bad header: L1 table of {} entries is too large", h.l1_size)));
        }
        if h.l1_table_offset.checked_add(h.l1_size as u64 * 8).is_none_or(|e| e > i64::MAX as u64) {
            return Err(bad("bad header: L1 table offset out of range".into()));
        }
        let needed = h.virtual_size().div_ceil(h.l2_coverage());
        if (h.l1_size as u64) < needed {
            return Err(bad(format!(
                "bad header: L1 table is too small ({} entries for a {} byte disk)",
                h.l1_size,
                h.virtual_size()
            )));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad(format!("bad header: {} snapshots (limit {MAX_SNAPSHOTS})", h.nb_snapshots)));
        }
        if h.nb_snapshots > 0 && h.snapshots_offset > i64::MAX as u64 {
            return Err(bad("bad header: snapshot table offset out of range".into()));
        }
        if h.nb_snapshots > 0 && !h.snapshots_offset.is_multiple_of(cluster_size) {
            return Err(bad("bad header: snapshot table offset unaligned".into()));
        }
        Ok(h)
    }

    /// The version 1 header (research note qcow2-crypto.md §8): 48 bytes,
    /// L1 size computed from the disk size, no refcounts, snapshots,
    /// extensions or zero clusters; the backing name is stored anywhere
    /// `first` holds.
    fn parse_v1(path: &Path, first: &[u8]) -> Result<Header> {
        let bad = |msg: String| Error::open(path, format!("qcow version 1: {msg}"));
        if first.len() < 48 {
            return Err(bad("truncated header".into()));
        }
        let (cluster_bits, l2_bits) = (first[32] as u32, first[33] as u32);
        // QEMU's limits (block/qcow.c).
        if !(9..=16).contains(&cluster_bits) || !(6..=13).contains(&l2_bits) {
            return Err(bad(format!("cluster_bits {cluster_bits} / l2_bits {l2_bits} out of range")));
        }
        let size = be64(first, 24);
        if size <= 1 || size > MAX_V1_SIZE {
            return Err(bad(format!("disk size {size} out of range")));
        }
        let l1_size = size.div_ceil(1u64 << (cluster_bits + l2_bits));
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(bad("L1 table too large".into()));
        }
        let mut h = Header {
            l2_bits,
            size,
            crypt_method: be32(first, 36),
            l1_size: l1_size as u32,
            l1_table_offset: be64(first, 40),
            header_length: 48,
            ..Header::plain(1, cluster_bits)
        };
        if h.crypt_method > 1 {
            return Err(bad(format!("unknown encryption method {}", h.crypt_method)));
        }
        if !h.l1_table_offset.is_multiple_of(8)
            || h.l1_table_offset.checked_add(l1_size * 8).is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(bad(format!("L1 table offset {:#x} out of range", h.l1_table_offset)));
        }
        let (offset, len) = (be64(first, 8), be32(first, 16) as u64);
        if offset != 0 && len > 0 {
            if len > 1023 || offset.checked_add(len).is_none_or(|e| e > first.len() as u64) {
                return Err(bad("backing file name out of range".into()));
            }
            let name = &first[offset as usize..(offset + len) as usize];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            h.backing_file =
                Some(String::from_utf8(name.to_vec()).map_err(|_| bad("backing file name is not UTF-8".into()))?);
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, path: &Path, first: &[u8], end: usize) -> Result<()> {
        let bad = |msg: &str| Error::open(path, format!("bad header extension: {msg}"));
        let mut at = self.header_length as usize;
        let mut seen = Vec::new();
        while at + 8 <= end {
            let kind = be32(first, at);
            let len = be32(first, at + 4) as usize;
            at += 8;
            if kind == EXT_END {
                break;
            }
            if len > end - at {
                return Err(bad(&format!("extension {kind:#x} runs past the header area")));
            }
            if seen.contains(&kind) {
                return Err(bad(&format!("extension {kind:#x} appears twice")));
            }
            seen.push(kind);
            let data = &first[at..at + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    if len > 15 {
                        return Err(bad("backing format name too long"));
                    }
                    let data = &data[..data.iter().position(|&b| b == 0).unwrap_or(data.len())];
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_DATA_FILE => {
                    let data = &data[..data.iter().position(|&b| b == 0).unwrap_or(data.len())];
                    let name =
                        String::from_utf8(data.to_vec()).map_err(|_| bad("data file name is not valid UTF-8"))?;
                    self.data_file = Some(name);
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name = &entry[2..];
                        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                        self.feature_names.push((entry[0], entry[1], String::from_utf8_lossy(name).into_owned()));
                    }
                }
                EXT_FDE => {
                    if len != 16 {
                        return Err(bad("encryption header pointer is not 16 bytes"));
                    }
                    self.fde = Some((be64(data, 0), be64(data, 8)));
                }
                _ => {} // bitmaps, unknown: not needed to read
            }
            at += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Names the unknown incompatible bits, from the image's own feature table
    /// when it has them, as QEMU does.
    fn describe_unknown(&self, bits: u64) -> String {
        let mut parts = Vec::new();
        let mut unnamed = 0u64;
        for bit in 0..64u8 {
            if bits & (1 << bit) == 0 {
                continue;
            }
            match self.feature_names.iter().find(|(t, b, _)| *t == 0 && *b == bit) {
                Some((_, _, name)) => parts.push(format!("{name} (incompatible bit {bit})")),
                None => unnamed |= 1 << bit,
            }
        }
        if unnamed != 0 {
            parts.push(format!("unknown incompatible feature {unnamed:#x}"));
        }
        parts.join(", ")
    }

    /// Feature names for info.json.
    pub fn feature_list(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let flags = [
            (self.incompatible, INCOMPAT_DIRTY, "dirty"),
            (self.incompatible, INCOMPAT_CORRUPT, "corrupt"),
            (self.incompatible, INCOMPAT_DATA_FILE, "external_data_file"),
            (self.incompatible, INCOMPAT_COMPRESSION, "compression_type"),
            (self.incompatible, INCOMPAT_EXTL2, "extended_l2"),
            (self.compatible, COMPAT_LAZY_REFCOUNTS, "lazy_refcounts"),
            (self.autoclear, AUTOCLEAR_BITMAPS, "bitmaps"),
            (self.autoclear, AUTOCLEAR_DATA_FILE_RAW, "data_file_raw"),
        ];
        for (word, bit, name) in flags {
            if word & bit != 0 {
                out.push(name);
            }
        }
        out
    }
}
