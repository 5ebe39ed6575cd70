//! VeridianOS migration streams (version 3, `qemu_compat.rs` upstream;
//! `../shared/research/veridian.md` §3): a 24-byte header, a VM-state
//! section (vCPU records) and a device-state section (named blobs). Lists
//! end where an entry would run past its section, as upstream's reader
//! stops; the stream holds no guest memory.

use std::sync::Arc;

use serde_json::json;
use tracing::warn;

use crate::bytes::le32;
use crate::catalog::names;
use crate::error::{Error, Result};
use crate::io::Source;
use crate::tree::{DirBuilder, Tree};
use crate::view::{RawView, SliceView, View};

pub const MAGIC: [u8; 4] = *b"IMEQ";
const HEADER: u64 = 24;
/// Entries listed at most per section (each is a file in the mount).
const MAX_ENTRIES: u32 = 1 << 16;

/// Walks length-prefixed entries of a section held in the file from
/// `start` to `end`.
struct Section<'a> {
    file: &'a Source,
    pos: u64,
    end: u64,
}

impl Section<'_> {
    fn u32(&mut self) -> Result<Option<u32>> {
        if self.end - self.pos < 4 {
            return Ok(None);
        }
        let mut b = [0u8; 4];
        self.file.read_at(&mut b, self.pos)?;
        self.pos += 4;
        Ok(Some(le32(&b, 0)))
    }

    /// `len` bytes from here: their offset, if the section holds them.
    fn take(&mut self, len: u32) -> Option<u64> {
        let at = self.pos;
        (self.end - self.pos >= len as u64).then(|| {
            self.pos += len as u64;
            at
        })
    }
}

pub fn open(file: Arc<Source>) -> Result<Tree> {
    let path = file.path().to_path_buf();
    let bad = |msg: String| Error::open(&path, format!("VeridianOS migration stream: {msg}"));
    let len = file.len();
    if len < HEADER {
        return Err(bad("shorter than its 24-byte header".into()));
    }
    let mut h = [0u8; HEADER as usize];
    file.read_at(&mut h, 0)?;
    let field = |i: usize| le32(&h, 4 * i);
    let (version, vm_size, dev_size, device_count, flags) = (field(1), field(2), field(3), field(4), field(5));
    if version != 3 {
        return Err(bad(format!("version {version}; only version 3 is read")));
    }
    if vm_size < 20 {
        return Err(bad(format!("VM-state section of {vm_size} bytes (at least 20)")));
    }
    let vm_end = HEADER + vm_size as u64;
    let dev_end = vm_end + dev_size as u64;
    if dev_end > len {
        return Err(bad(format!("the sections end at {dev_end}, past the end of the file ({len} bytes)")));
    }
    let mut fixed = [0u8; 20];
    file.read_at(&mut fixed, HEADER)?;
    let num_vcpus = le32(&fixed, 0);
    let memory_size = u64::from_le_bytes(fixed[4..12].try_into().unwrap());
    let memory_hash = u64::from_le_bytes(fixed[12..20].try_into().unwrap());

    let raw: Arc<dyn View> = Arc::new(RawView::new(file.clone()));
    let slice = |at: u64, n: u32| -> Tree { Tree::View(Arc::new(SliceView::new(raw.clone(), at, n as u64))) };
    let mut truncated = false;

    let mut vcpu_dir = DirBuilder::default();
    let mut vcpus = Vec::new();
    let mut s = Section { file: &file, pos: HEADER + 20, end: vm_end };
    for i in 0..num_vcpus.min(MAX_ENTRIES) {
        if s.pos == s.end {
            break;
        }
        let Some((n, at)) = s.u32()?.and_then(|n| s.take(n).map(|at| (n, at))) else {
            truncated = true;
            break;
        };
        vcpu_dir.add(&i.to_string(), ".bin", slice(at, n));
        vcpus.push(json!({"index": i, "size": n, "file": format!("vcpus/{i}.bin")}));
    }

    let mut dev_dir = DirBuilder::default();
    let mut devices = Vec::new();
    let mut s = Section { file: &file, pos: vm_end, end: dev_end };
    for k in 0..device_count.min(MAX_ENTRIES) {
        if s.pos == s.end {
            break;
        }
        let Some(name_len) = s.u32()? else {
            truncated = true;
            break;
        };
        let Some(name_at) = s.take(name_len) else {
            truncated = true;
            break;
        };
        let mut name = vec![0u8; name_len as usize];
        file.read_at(&mut name, name_at)?;
        let Some((n, at)) = s.u32()?.and_then(|n| s.take(n).map(|at| (n, at))) else {
            truncated = true;
            break;
        };
        let file_name = dev_dir.add(&format!("{k}-{}", names::escape(&name)), ".bin", slice(at, n));
        devices.push(json!({
            "index": k,
            "name": String::from_utf8_lossy(&name),
            "size": n,
            "file": format!("devices/{file_name}"),
        }));
    }
    if truncated {
        warn!("{}: an entry runs past the end of its section; the list ends there", path.display());
    }

    let info = json!({
        "filename": path.display().to_string(),
        "format": "veridian-migration",
        "magic": format!("{:#010x}", field(0)),
        "version": version,
        "vm_state_size": vm_size,
        "device_state_size": dev_size,
        "device_count": device_count,
        "flags": flags,
        "num_vcpus": num_vcpus,
        "memory_size": memory_size,
        "memory_hash": memory_hash,
        "vcpus": vcpus,
        "devices": devices,
        "truncated": truncated,
        "trailing_bytes": len - dev_end,
    });
    let mut top = DirBuilder::default();
    top.add("info", ".json", Tree::json(&info));
    if !vcpu_dir.is_empty() {
        top.add("vcpus", "", vcpu_dir.build());
    }
    if !dev_dir.is_empty() {
        top.add("devices", "", dev_dir.build());
    }
    Ok(top.build())
}
