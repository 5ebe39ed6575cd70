//! A view is one virtual file: a size, positioned reads, and an allocation map.
//!
//! Formats implement it for their images; backing chains and snapshots are
//! views composed of other views. Nothing here knows about FUSE.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::{Source, Stamp};

/// A run of a view's bytes that share one allocation state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, at least 1 and never past the view's end.
    pub len: u64,
    /// Whether the run holds stored data (`false`: it reads as zeros and takes
    /// no space: unallocated everywhere in the chain, or a zero cluster).
    pub data: bool,
}

pub trait View: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the view's bytes at `offset`. Bytes past `size()` read
    /// as zeros, so a shorter backing file reads as zeros past its end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// The run of equal allocation state that starts at `offset` (< size()),
    /// at most `max` (>= 1) bytes long: callers that need only a short answer
    /// bound the work (a backing file is asked only as far as the overlay
    /// leaves it unallocated).
    fn extent(&self, offset: u64, max: u64) -> Result<Extent>;

    /// Whether the files under this view may change while it is served
    /// (`--force-share`): its reads then check for it, and the kernel must
    /// not keep its pages, so that every read reaches the check.
    fn may_change(&self) -> bool {
        false
    }

    /// Bytes `offset..offset + len` (within `size()`), mapped from a local
    /// file instead of read, when they lie there as they are, in one run,
    /// and cannot change while served: a reply then costs one copy fewer.
    /// None when they don't (compressed, encrypted, remote, spread over
    /// several files, not in the page cache): read them. The bytes are for
    /// the kernel only (a reply): see `Source::mapped`.
    fn mapped(&self, _offset: u64, _len: usize) -> Option<&[u8]> {
        None
    }
}

/// The first offset `>= from` that holds data, or `None` if none does
/// (SEEK_DATA).
pub fn seek_data(view: &dyn View, from: u64) -> Result<Option<u64>> {
    seek(view, from, true)
}

/// The first offset `>= from` that is a hole; the end of the view counts as
/// one (SEEK_HOLE). `None` if `from` is past the end.
pub fn seek_hole(view: &dyn View, from: u64) -> Result<Option<u64>> {
    seek(view, from, false)
}

/// The first offset `>= from` whose extent holds data (`data`) or not.
fn seek(view: &dyn View, from: u64, data: bool) -> Result<Option<u64>> {
    let mut pos = from;
    while pos < view.size() {
        let e = view.extent(pos, u64::MAX)?;
        if e.data == data {
            return Ok(Some(pos));
        }
        pos += e.len;
    }
    // The end of the view is a hole, never data.
    Ok((!data && from < view.size()).then_some(view.size()))
}

/// Bytes of the view that hold data (what `st_blocks` reports), or `None`
/// when the map is too fragmented to walk within `max_steps` extents (a
/// hostile image can describe a petabyte of tiny runs).
pub fn allocated_bytes(view: &dyn View, max_steps: u64) -> Result<Option<u64>> {
    let mut pos = 0;
    let mut total = 0;
    let mut steps = 0;
    while pos < view.size() {
        steps += 1;
        if steps > max_steps {
            return Ok(None);
        }
        let e = view.extent(pos, u64::MAX)?;
        if e.data {
            total += e.len;
        }
        pos += e.len;
    }
    Ok(Some(total))
}

/// A raw file as a view: the file's bytes are the disk. Its size is the file
/// length rounded up to 512, the tail zero-filled, as QEMU does.
pub struct RawView {
    source: Arc<Source>,
    size: u64,
    /// With `watched`: the file's stamp when it was opened; reads fail once
    /// it changed.
    at_open: Option<Stamp>,
}

impl RawView {
    pub fn new(source: Arc<Source>) -> Self {
        let size = source.len().div_ceil(512) * 512;
        RawView { source, size, at_open: None }
    }

    /// A raw file that may change while served (`--force-share`): once it
    /// has, its reads fail rather than mix old and new bytes.
    pub fn watched(source: Arc<Source>) -> Result<Self> {
        let at_open = Some(source.stamp()?);
        Ok(RawView { at_open, ..RawView::new(source) })
    }
}

impl View for RawView {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.source.read_at(buf, offset)?;
        match self.at_open {
            Some(then) if self.source.stamp()? != then => Err(Error::open(
                self.source.path(),
                "changed since it was mounted with --force-share: no longer served",
            )),
            _ => Ok(()),
        }
    }

    fn extent(&self, offset: u64, max: u64) -> Result<Extent> {
        Ok(Extent { len: self.size.saturating_sub(offset).min(max).max(1), data: true })
    }

    fn may_change(&self) -> bool {
        self.at_open.is_some()
    }

    fn mapped(&self, offset: u64, len: usize) -> Option<&[u8]> {
        // A file that may change is read, and checked, by `read_at`. Past
        // its end (the rounding up to 512) `Source::mapped` declines.
        if self.may_change() {
            return None;
        }
        self.source.mapped(offset, len)
    }
}

/// A view that is all zeros (for tests and placeholders).
pub struct ZeroView(pub u64);

impl View for ZeroView {
    fn size(&self) -> u64 {
        self.0
    }

    fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn extent(&self, offset: u64, max: u64) -> Result<Extent> {
        Ok(Extent { len: self.0.saturating_sub(offset).min(max).max(1), data: false })
    }
}

/// A byte range of another view (a file packed inside an archive stream).
pub struct SliceView {
    inner: Arc<dyn View>,
    start: u64,
    len: u64,
}

impl SliceView {
    /// The range is clipped to the inner view's end.
    pub fn new(inner: Arc<dyn View>, start: u64, len: u64) -> Self {
        let len = len.min(inner.size().saturating_sub(start));
        SliceView { inner, start, len }
    }
}

impl View for SliceView {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        self.inner.read_at(&mut buf[..n], self.start + offset)
    }

    fn extent(&self, offset: u64, max: u64) -> Result<Extent> {
        let e = self.inner.extent(self.start + offset, max.min(self.len - offset))?;
        Ok(Extent { len: e.len.min(self.len - offset).min(max), data: e.data })
    }

    fn may_change(&self) -> bool {
        self.inner.may_change()
    }

    fn mapped(&self, offset: u64, len: usize) -> Option<&[u8]> {
        self.inner.mapped(self.start.checked_add(offset)?, len)
    }
}
