//! A qcow2 image opened for reading, and the views over it: the current disk
//! (the active L1 table) and, for internal snapshots, their own L1 tables.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::{block_mut, new_block, BlockCache, BlockKey, BlockKind};
use crate::error::{Error, Result};
use crate::io::{with_scratch, Source};
use crate::view::{Extent, View};

use super::crypto::{Crypto, SECTOR};
use super::decompress::decompress;
use super::header::{Compression, Header};
use super::l2::{self, Geometry, Mapping};
use super::snapshot::{self, Snapshot};
use super::watch::Watch;

/// Files larger than this cannot be described to the kernel (offsets are
/// signed 64-bit); hostile sizes are clipped to it.
const MAX_VIEW_SIZE: u64 = i64::MAX as u64 & !511;

/// The image a qcow2 file reads through for unallocated clusters.
pub struct Backing {
    /// The name as stored in the header.
    pub name: String,
    /// Where it was found (the referencing image's directory joined with a
    /// relative name).
    pub path: PathBuf,
    /// "qcow2", "qcow" (version 1) or "raw".
    pub format: &'static str,
    /// The backing file itself (its times stand for its views').
    pub file: Arc<Source>,
    /// Its resolved content (its own backing chain included).
    pub view: Arc<dyn View>,
    /// Set when the backing file is itself qcow2.
    pub image: Option<Arc<Qcow2Image>>,
}

pub struct Qcow2Image {
    path: PathBuf,
    file: Arc<Source>,
    /// Where guest data clusters live: the image itself or its external data file.
    data: Arc<Source>,
    header: Header,
    geo: Geometry,
    cache: Arc<BlockCache>,
    backing: Option<Backing>,
    /// The active L1 table, raw big-endian entries, kept for the image's life.
    active_l1: Arc<[u8]>,
    /// Snapshot L1 tables are read on a view's first use and kept in the block
    /// cache, so that thousands of snapshots cannot pin unbounded memory.
    snapshots: Vec<Snapshot>,
    /// Set under `--force-share`: the image may change while served.
    watch: Option<Watch>,
    /// Set for an encrypted image.
    crypto: Option<Crypto>,
}

impl Qcow2Image {
    /// Opens the image with an already-opened file and header; `data` is the
    /// external data file when the image has one; `backing` the opened backing.
    pub(crate) fn new(
        file: Arc<Source>,
        header: Header,
        data: Option<Arc<Source>>,
        backing: Option<Backing>,
        cache: Arc<BlockCache>,
        crypto: Option<Crypto>,
        may_change: bool,
    ) -> Result<Self> {
        let path = file.path().to_path_buf();
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            l2_bits: header.l2_bits,
            extended_l2: header.extended_l2(),
            version: header.version,
            external_data: header.has_data_file(),
        };
        let active_l1 = read_l1(&file, header.l1_table_offset, header.l1_size)?.into();
        let snapshots = snapshot::read_table(&path, &file, &header)?;
        let watch = match may_change {
            true => Some(Watch::new(&file, data.as_deref(), snapshots.len())?),
            false => None,
        };
        Ok(Qcow2Image {
            watch,
            crypto,
            data: data.unwrap_or_else(|| file.clone()),
            path,
            file,
            header,
            geo,
            cache,
            backing,
            active_l1,
            snapshots,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &Arc<Source> {
        &self.file
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Every file this image reads by itself: the image, and its external
    /// data file when it has one (not the backing chain).
    pub fn own_files(&self) -> Vec<&Arc<Source>> {
        if self.header.has_data_file() {
            vec![&self.file, &self.data]
        } else {
            vec![&self.file]
        }
    }

    pub fn data_file(&self) -> Option<&Path> {
        self.header.has_data_file().then(|| self.data.path())
    }

    /// The image's current content.
    pub fn active_view(self: &Arc<Self>) -> Qcow2View {
        Qcow2View {
            image: self.clone(),
            table: Table::Active,
            base: 0,
            size: self.header.virtual_size().min(MAX_VIEW_SIZE),
        }
    }

    /// The disk as it was when snapshot `index` was taken.
    pub fn snapshot_view(self: &Arc<Self>, index: usize) -> Qcow2View {
        let s = &self.snapshots[index];
        Qcow2View {
            image: self.clone(),
            table: Table::Snapshot(index),
            base: 0,
            size: s.disk_size.min(MAX_VIEW_SIZE) & !511,
        }
    }

    /// The VM state saved with snapshot `index`: stored in the snapshot's L1
    /// view at the first L1 index past the disk (research note A.8).
    pub fn vmstate_view(self: &Arc<Self>, index: usize) -> Qcow2View {
        let s = &self.snapshots[index];
        let cover = self.geo.l1_coverage();
        let base = s.disk_size.div_ceil(cover).saturating_mul(cover);
        let size = s.vm_state_size.min(MAX_VIEW_SIZE.saturating_sub(base));
        Qcow2View { image: self.clone(), table: Table::Snapshot(index), base, size }
    }

    fn l1(&self, table: Table) -> Result<Arc<[u8]>> {
        match table {
            Table::Active => Ok(self.active_l1.clone()),
            Table::Snapshot(i) => {
                let s = &self.snapshots[i];
                if let Some(why) = &s.l1_error {
                    return Err(Error::corrupt(&self.path, 0, format!("snapshot {}: {why}", s.id)));
                }
                // Two snapshots may share one table offset with different
                // sizes (in a hostile image): the size is part of the key.
                let key = BlockKey {
                    file: self.file.id(),
                    kind: BlockKind::L1 { entries: s.l1_size },
                    offset: s.l1_table_offset,
                };
                self.cache.get_or_load(key, || read_l1(&self.file, s.l1_table_offset, s.l1_size).map(Arc::from))
            }
        }
    }

    /// After a read through `table`: fails it when, under `--force-share`,
    /// the image changed in a way that makes what was read untrustworthy
    /// (see `watch`).
    fn still_served(&self, table: Table) -> Result<()> {
        let Some(watch) = &self.watch else { return Ok(()) };
        match table {
            Table::Active => {
                let files: &[&Source] = &[&self.file, &self.data];
                watch.check_active(&self.path, &files[..if self.header.has_data_file() { 2 } else { 1 }])
            }
            Table::Snapshot(i) => watch.check_snapshot(&self.file, &self.snapshots, i),
        }
    }

    fn l2_table(&self, offset: u64) -> Result<Arc<[u8]>> {
        let key = BlockKey { file: self.file.id(), kind: BlockKind::Table, offset };
        self.cache.get_or_load(key, || {
            let mut table = new_block(self.geo.l2_table_bytes() as usize);
            self.file.read_at(block_mut(&mut table), offset)?;
            Ok(table)
        })
    }

    /// Maps the granule holding `guest`: what it holds, and how many bytes
    /// from `guest` on share that mapping (to the granule's end, or the end
    /// of an L1 entry's range when no L2 table is there).
    fn lookup(&self, l1: &[u8], guest: u64) -> Result<(Mapping, u64)> {
        let cover = self.geo.l1_coverage();
        let index = guest / cover;
        let rest_of_l1 = cover - guest % cover;
        let Some(raw) = l1.get(index as usize * 8..index as usize * 8 + 8) else {
            // Past the table everything is unallocated: one run to the end, so
            // walking a huge sparse view takes one step, not one per L1 entry.
            return Ok((Mapping::Unallocated, u64::MAX - guest));
        };
        // Masking also drops the stale COPIED bits of snapshot tables.
        let l2_offset = u64::from_be_bytes(raw.try_into().unwrap()) & l2::OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((Mapping::Unallocated, rest_of_l1));
        }
        let cs = self.geo.cluster_size();
        if !l2_offset.is_multiple_of(cs) {
            return Err(Error::corrupt(
                &self.path,
                guest,
                format!("L2 table offset {l2_offset:#x} unaligned (L1 index {index})"),
            ));
        }
        let table = self.l2_table(l2_offset)?;
        let slot = ((guest >> self.geo.cluster_bits) & (self.geo.l2_entries() - 1)) as usize;
        let at = slot * self.geo.entry_bytes() as usize;
        let entry = u64::from_be_bytes(table[at..at + 8].try_into().unwrap());
        let bitmap =
            if self.geo.extended_l2 { u64::from_be_bytes(table[at + 8..at + 16].try_into().unwrap()) } else { 0 };
        let mapping =
            l2::decode(&self.geo, entry, bitmap, guest).map_err(|msg| Error::corrupt(&self.path, guest, msg))?;
        let granule = match mapping {
            Mapping::Compressed { .. } => cs,
            _ => self.geo.granule_size(),
        };
        Ok((mapping, granule - guest % granule))
    }

    /// The cache key of a decompressed cluster (two entries naming one
    /// offset with different stored sizes stay apart).
    fn cluster_key(&self, coffset: u64, csize: u64) -> BlockKey {
        BlockKey { file: self.file.id(), kind: BlockKind::Cluster { stored: csize }, offset: coffset }
    }

    /// Reads a compressed cluster's stored bytes into `stored` (csize long)
    /// and decodes the first `out.len()` bytes of the cluster into `out`.
    fn decode(&self, coffset: u64, stored: &mut [u8], guest: u64, out: &mut [u8]) -> Result<()> {
        self.file.read_at(stored, coffset)?;
        decompress(self.header.compression, stored, out)
            .map_err(|msg| Error::corrupt(&self.path, guest, format!("compressed cluster at {coffset:#x}: {msg}")))
    }

    /// The decompressed cluster, from the cache or from disk.
    fn compressed_cluster(&self, coffset: u64, csize: u64, guest: u64) -> Result<Arc<[u8]>> {
        self.cache.get_or_load(self.cluster_key(coffset, csize), || {
            let mut cluster = new_block(self.geo.cluster_size() as usize);
            with_scratch(csize as usize, |stored| self.decode(coffset, stored, guest, block_mut(&mut cluster)))?;
            Ok(cluster)
        })
    }

    /// Bytes `within..within + out.len()` of a compressed cluster, into
    /// `out`. From the cache when it has the cluster; for deflate, when the
    /// read ends before the cluster does, by decoding only up to the read's
    /// end (deflate is a stream; QEMU's zstd clusters are one zstd block,
    /// which is decoded whole whatever is asked), and such a partial cluster
    /// is not cached; else the whole cluster, which is cached.
    fn read_compressed(&self, coffset: u64, csize: u64, guest: u64, within: usize, out: &mut [u8]) -> Result<()> {
        let end = within + out.len();
        let partial = end < self.geo.cluster_size() as usize && self.header.compression == Compression::Deflate;
        if partial && self.cache.get(&self.cluster_key(coffset, csize)).is_none() {
            return with_scratch(csize as usize + end, |scratch| {
                let (stored, prefix) = scratch.split_at_mut(csize as usize);
                self.decode(coffset, stored, guest, prefix)?;
                out.copy_from_slice(&prefix[within..]);
                Ok(())
            });
        }
        let cluster = self.compressed_cluster(coffset, csize, guest)?;
        out.copy_from_slice(&cluster[within..end]);
        Ok(())
    }

    /// Decodes compressed clusters straight into the slices of a read's
    /// buffer that they fill, on several threads when there are several:
    /// `jobs` holds (slice, guest offset, coffset, csize) of clusters the read
    /// covers whole and the cache lacks. A large read then costs no copy
    /// through the cache, and takes no cache space from what smaller reads
    /// will read again.
    fn decode_into(&self, jobs: Vec<(&mut [u8], u64, u64, u64)>) -> Result<()> {
        let mut jobs: Vec<_> = jobs.into_iter().map(|job| (job, Ok(()))).collect();
        crate::spread_mut(&mut jobs, |((out, guest, coffset, csize), result)| {
            *result = with_scratch(*csize as usize, |stored| self.decode(*coffset, stored, *guest, out));
        });
        jobs.into_iter().try_for_each(|(_, result)| result)
    }

    /// Reads data stored at `host` (guest bytes from `guest` on) and
    /// decrypts it: whole 512-byte sectors around the range, each with its
    /// own IV. Host and guest offsets agree modulo the sector size.
    fn read_encrypted(&self, crypto: &Crypto, buf: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let sector = SECTOR as u64;
        let skew = (host % sector) as usize;
        let total = (skew + buf.len()).div_ceil(SECTOR) * SECTOR;
        with_scratch(total, |sectors| {
            self.data.read_at(sectors, host - skew as u64)?;
            crypto.decrypt(&self.path, sectors, host - skew as u64, guest - skew as u64)?;
            buf.copy_from_slice(&sectors[skew..skew + buf.len()]);
            Ok(())
        })
    }

    /// What `info.json` says of the image's encryption, when it has any.
    pub fn encryption(&self) -> Option<&serde_json::Value> {
        self.crypto.as_ref().map(|c| &c.description)
    }

    fn read_backing(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        match &self.backing {
            Some(b) => b.view.read_at(buf, guest),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

/// Reads an L1 table as stored (big-endian entries). A table that would run
/// past the end of the file is refused before anything is allocated for it,
/// so a header cannot make us allocate more than the file holds.
fn read_l1(file: &Source, offset: u64, entries: u32) -> Result<Vec<u8>> {
    let bytes = entries as u64 * 8;
    if offset.checked_add(bytes).is_none_or(|end| end > file.len()) {
        return Err(Error::open(
            file.path(),
            format!("L1 table ({entries} entries at {offset:#x}) runs past the end of the file"),
        ));
    }
    let mut raw = vec![0u8; bytes as usize];
    file.read_at(&mut raw, offset)?;
    Ok(raw)
}

#[derive(Clone, Copy, Debug)]
enum Table {
    Active,
    Snapshot(usize),
}

/// One virtual file over a qcow2 image: a range of the guest address space
/// seen through one L1 table.
pub struct Qcow2View {
    image: Arc<Qcow2Image>,
    table: Table,
    /// Guest offset of byte 0 of this view (non-zero for VM state).
    base: u64,
    size: u64,
}

/// A run of a read being assembled: neighbouring granules of one kind are
/// served with one call (one `pread` for contiguous host clusters).
enum Pending {
    Data { host: u64 },
    Zero,
    Unallocated,
}

impl Qcow2View {
    pub fn image(&self) -> &Arc<Qcow2Image> {
        &self.image
    }

    fn flush(&self, run: &Pending, buf: &mut [u8], guest: u64) -> Result<()> {
        match *run {
            Pending::Data { host } => match &self.image.crypto {
                None => self.image.data.read_at(buf, host),
                Some(crypto) => self.image.read_encrypted(crypto, buf, host, guest),
            },
            Pending::Zero => {
                buf.fill(0);
                Ok(())
            }
            Pending::Unallocated => self.image.read_backing(buf, guest),
        }
    }
}

impl View for Qcow2View {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        let l1 = self.image.l1(self.table)?;
        let cs = self.image.geo.cluster_size();
        // Compressed clusters this read covers whole and the cache lacks, as
        // (start in buf, guest, coffset, csize): decoded last, together.
        let mut whole = Vec::new();
        let mut pending: Option<(Pending, usize)> = None; // (run, start in buf)
        let mut pos = 0usize;
        while pos < n {
            let guest = self.base + offset + pos as u64;
            let (mapping, run) = self.image.lookup(&l1, guest)?;
            let len = run.min((n - pos) as u64) as usize;
            // Extend the pending run when this granule continues it.
            if let Some((p, start)) = &pending {
                let continues = match (p, &mapping) {
                    (Pending::Data { host }, Mapping::Data { host: h }) => *h == host + (pos - start) as u64,
                    (Pending::Zero, Mapping::Zero) => true,
                    (Pending::Unallocated, Mapping::Unallocated) => true,
                    _ => false,
                };
                if !continues {
                    let (p, start) = pending.take().unwrap();
                    self.flush(&p, &mut buf[start..pos], self.base + offset + start as u64)?;
                }
            }
            match mapping {
                Mapping::Compressed { coffset, csize } => {
                    let within = guest & (cs - 1);
                    if len as u64 == cs && self.image.cache.get(&self.image.cluster_key(coffset, csize)).is_none() {
                        whole.push((pos, guest, coffset, csize));
                    } else {
                        let out = &mut buf[pos..pos + len];
                        self.image.read_compressed(coffset, csize, guest, within as usize, out)?;
                    }
                }
                _ if pending.is_some() => {}
                Mapping::Data { host } => pending = Some((Pending::Data { host }, pos)),
                Mapping::Zero => pending = Some((Pending::Zero, pos)),
                Mapping::Unallocated => pending = Some((Pending::Unallocated, pos)),
            }
            pos += len;
        }
        if let Some((p, start)) = pending {
            self.flush(&p, &mut buf[start..n], self.base + offset + start as u64)?;
        }
        if !whole.is_empty() {
            // Each cluster's own slice of `buf` (they are in ascending order).
            let mut jobs = Vec::with_capacity(whole.len());
            let (mut rest, mut rest_at) = (&mut buf[..n], 0);
            for (pos, guest, coffset, csize) in whole {
                let (_, tail) = rest.split_at_mut(pos - rest_at);
                let (cluster, tail) = tail.split_at_mut(cs as usize);
                jobs.push((cluster, guest, coffset, csize));
                (rest, rest_at) = (tail, pos + cs as usize);
            }
            self.image.decode_into(jobs)?;
        }
        self.image.still_served(self.table)
    }

    fn extent(&self, offset: u64, max: u64) -> Result<Extent> {
        let end = offset + (self.size - offset).min(max.max(1));
        let l1 = self.image.l1(self.table)?;
        // Some(data?) for what this image decides; None where the backing
        // file does.
        let class = |m: &Mapping| match m {
            Mapping::Data { .. } | Mapping::Compressed { .. } => Some(true),
            Mapping::Zero => Some(false),
            Mapping::Unallocated => None,
        };
        let (mapping, run) = self.image.lookup(&l1, self.base + offset)?;
        let first = class(&mapping);
        let mut len = run.min(end - offset);
        // Merge the following granules of the same class, up to `max`.
        while offset + len < end {
            let (m, r) = self.image.lookup(&l1, self.base + offset + len)?;
            if class(&m) != first {
                break;
            }
            len = len.saturating_add(r).min(end - offset);
        }
        let extent = match first {
            Some(data) => Extent { len, data },
            None => match self.image.backing.as_ref() {
                // The backing file is asked only about this unallocated run.
                Some(b) if self.base + offset < b.view.size() => {
                    let e = b.view.extent(self.base + offset, len)?;
                    Extent { len: e.len.min(len), data: e.data }
                }
                _ => Extent { len, data: false },
            },
        };
        self.image.still_served(self.table)?;
        Ok(extent)
    }

    fn may_change(&self) -> bool {
        self.image.watch.is_some()
    }

    fn mapped(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let image = &self.image;
        if image.watch.is_some() || image.crypto.is_some() {
            return None;
        }
        // One run of data clusters, contiguous in the data file.
        let l1 = image.l1(self.table).ok()?;
        let start = self.base.checked_add(offset)?;
        let (Mapping::Data { host }, mut run) = image.lookup(&l1, start).ok()? else { return None };
        while run < len as u64 {
            match image.lookup(&l1, start + run).ok()? {
                (Mapping::Data { host: h }, more) if h == host + run => run += more,
                _ => return None,
            }
        }
        image.data.mapped(host, len)
    }
}
