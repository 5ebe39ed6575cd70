//! Decoding L1 and L2 entries into "where are this guest offset's bytes"
//! (research note A.4-A.6), exactly as QEMU classifies them.

/// Host offset bits of L1 entries and standard cluster descriptors.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO_FLAG: u64 = 1;

/// What one granule (a cluster, or a subcluster with extended L2) holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Stored uncompressed at this host offset of the data file (the image
    /// itself or its external data file); the offset is the granule's own.
    Data { host: u64 },
    /// The whole cluster is compressed; `coffset`/`csize` locate the stream.
    Compressed { coffset: u64, csize: u64 },
    /// Reads as zeros, never from the backing file.
    Zero,
    /// Not here: read the backing file (or zeros without one).
    Unallocated,
}

/// How an image stores clusters: what the decoder needs to know.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub cluster_bits: u32,
    /// log2 of the entries in an L2 table.
    pub l2_bits: u32,
    pub extended_l2: bool,
    pub version: u32,
    pub external_data: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn entry_bytes(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Bytes of one L2 table (a cluster in qcow2; any power of two in v1).
    pub fn l2_table_bytes(&self) -> u64 {
        self.l2_entries() * self.entry_bytes()
    }

    /// Size of the unit an L2 entry maps independently: a subcluster with
    /// extended L2, else a cluster.
    pub fn granule_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / 32
        } else {
            self.cluster_size()
        }
    }

    /// Guest bytes covered by one L1 entry.
    pub fn l1_coverage(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }
}

/// A version 1 L2 entry: 0 is unallocated, bit 63 marks a compressed
/// cluster (exact byte size above a (63 - cluster_bits)-bit offset), else
/// the cluster's host offset.
fn decode_v1(g: &Geometry, entry: u64, guest: u64) -> Mapping {
    const V1_COMPRESSED: u64 = 1 << 63;
    let cs = g.cluster_size();
    if entry == 0 {
        return Mapping::Unallocated;
    }
    if entry & V1_COMPRESSED != 0 {
        let x = 63 - g.cluster_bits;
        let csize = (entry >> x) & (cs - 1);
        return Mapping::Compressed { coffset: entry & ((1u64 << x) - 1), csize };
    }
    Mapping::Data { host: entry + (guest & (cs - 1)) }
}

/// Decodes the L2 entry (and its bitmap, with extended L2) for the guest
/// offset `guest`. Returns the mapping of the granule holding `guest`, or the
/// reason the entry is corrupt.
pub fn decode(g: &Geometry, entry: u64, bitmap: u64, guest: u64) -> Result<Mapping, String> {
    let cs = g.cluster_size();
    let guest_cluster = guest & !(cs - 1);
    if g.version == 1 {
        return Ok(decode_v1(g, entry, guest));
    }
    if entry & COMPRESSED != 0 {
        if g.external_data {
            return Err("compressed cluster in an image with an external data file".into());
        }
        // The bitmap of a compressed entry is reserved; QEMU ignores it.
        let _ = bitmap;
        // A.6: the sector-count field sits above a (70 - cluster_bits)-bit offset.
        let x = 70 - g.cluster_bits;
        let coffset = entry & ((1u64 << x) - 1);
        let nsec = ((entry >> x) & ((1u64 << (g.cluster_bits - 8)) - 1)) + 1;
        let csize = nsec * 512 - (coffset & 511);
        return Ok(Mapping::Compressed { coffset, csize });
    }

    let offset = entry & OFFSET_MASK;
    let allocated = offset != 0 || (g.external_data && entry & COPIED != 0);
    let check_offset = || -> Result<(), String> {
        if offset & (cs - 1) != 0 {
            return Err(format!("cluster offset {offset:#x} is not cluster-aligned"));
        }
        if g.external_data && offset != guest_cluster {
            return Err(format!(
                "external data file cluster offset {offset:#x} does not match guest offset {guest_cluster:#x}"
            ));
        }
        Ok(())
    };

    if !g.extended_l2 {
        if entry & ZERO_FLAG != 0 {
            if g.version < 3 {
                return Err("zero cluster entry in a version 2 image".into());
            }
            // ZERO_ALLOC only with a real offset; with offset 0 it is
            // ZERO_PLAIN even in a data-file image (COPIED or not).
            if offset != 0 {
                check_offset()?;
            }
            return Ok(Mapping::Zero);
        }
        if !allocated {
            return Ok(Mapping::Unallocated);
        }
        check_offset()?;
        return Ok(Mapping::Data { host: offset + (guest & (cs - 1)) });
    }

    // Extended L2 (A.5): 32 subclusters, allocation bits 0-31, zero bits 32-63.
    let sc = (guest >> (g.cluster_bits - 5)) & 31;
    let alloc_bits = bitmap & 0xffff_ffff;
    let zero_bits = bitmap >> 32;
    if allocated {
        if alloc_bits & zero_bits != 0 {
            return Err(format!("invalid subcluster bitmap {bitmap:#x} (allocated and zero)"));
        }
        check_offset()?;
        if zero_bits & (1 << sc) != 0 {
            Ok(Mapping::Zero)
        } else if alloc_bits & (1 << sc) != 0 {
            Ok(Mapping::Data { host: offset + (guest & (cs - 1)) })
        } else {
            Ok(Mapping::Unallocated)
        }
    } else if alloc_bits != 0 {
        Err(format!("invalid subcluster bitmap {bitmap:#x} (allocated without a host cluster)"))
    } else if zero_bits & (1 << sc) != 0 {
        Ok(Mapping::Zero)
    } else {
        Ok(Mapping::Unallocated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(cluster_bits: u32, extended_l2: bool) -> Geometry {
        let l2_bits = cluster_bits - if extended_l2 { 4 } else { 3 };
        Geometry { cluster_bits, l2_bits, extended_l2, version: 3, external_data: false }
    }

    #[test]
    fn compressed_descriptor_matches_the_worked_example() {
        // Research note A.6: 64 KiB clusters, 0x4340000000050000 -> 0x50000, 14 sectors.
        let m = decode(&geo(16, false), 0x4340_0000_0005_0000, 0, 0).unwrap();
        assert_eq!(m, Mapping::Compressed { coffset: 0x50000, csize: 14 * 512 });
    }

    #[test]
    fn zero_flag_is_corrupt_in_v2() {
        let mut g = geo(16, false);
        assert_eq!(decode(&g, 1, 0, 0).unwrap(), Mapping::Zero);
        g.version = 2;
        assert!(decode(&g, 1, 0, 0).is_err());
    }

    #[test]
    fn extended_l2_bitmap_from_the_research_note() {
        // write 2k@2k + 100 bytes at 4097 over a backing file -> 0x0000001000000006
        let g = geo(16, true);
        let e = 0x8000_0000_0005_0000u64;
        let bm = 0x0000_0010_0000_0006u64;
        assert_eq!(decode(&g, e, bm, 0).unwrap(), Mapping::Unallocated);
        assert_eq!(decode(&g, e, bm, 2048).unwrap(), Mapping::Data { host: 0x50000 + 2048 });
        assert_eq!(decode(&g, e, bm, 4097).unwrap(), Mapping::Data { host: 0x50000 + 4097 });
        assert_eq!(decode(&g, e, bm, 8192).unwrap(), Mapping::Zero);
        assert!(decode(&g, e, 0x1_0000_0001, 0).is_err());
        // A compressed entry's bitmap is ignored, as QEMU does.
        assert!(matches!(decode(&g, 0x4340_0000_0005_0000, 0xff, 0), Ok(Mapping::Compressed { .. })));
        assert!(decode(&g, 0, 1, 0).is_err());
    }

    #[test]
    fn unaligned_offsets_are_corrupt() {
        assert!(decode(&geo(16, false), 0x8000_0000_0005_0200, 0, 0).is_err());
    }
}
