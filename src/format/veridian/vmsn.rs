//! VeridianOS VM snapshots (VMSN version 1) in snapmount's file profile
//! (`../shared/research/veridian.md` §4; upstream never writes these files,
//! so the layout rules for offsets and page numbers are ours, documented in
//! the README).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};
use tracing::warn;

use crate::bytes::{le32, le64};
use crate::error::{Error, Result};
use crate::io::Source;
use crate::tree::{DirBuilder, Tree};
use crate::view::{Extent, RawView, SliceView, View};

pub const MAGIC: [u8; 4] = *b"NSMV";
const HEADER: u64 = 64;
const DESCRIPTOR: u64 = 24;
const PAGE: u64 = 4096;
const REGISTERS: [&str; 18] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
];
/// Payload bytes turned into JSON at most (MSR and VMCS lists).
const MAX_JSON_PAYLOAD: u64 = 1 << 20;

#[derive(Clone, Copy, Debug)]
struct Region {
    index: usize,
    kind: u32,
    vcpu: u32,
    offset: u64,
    size: u64,
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        1 => "vmcs",
        2 => "registers",
        3 => "msrs",
        4 => "memory_page",
        5 => "device",
        6 => "lapic",
        7 => "vcpu_state",
        _ => "unknown",
    }
}

/// Opens a snapshot file: the tree of its views.
pub fn open(file: Arc<Source>) -> Result<Tree> {
    let path = file.path().to_path_buf();
    let bad = |msg: String| Error::open(&path, format!("VeridianOS snapshot: {msg}"));
    let len = file.len();
    if len < HEADER {
        return Err(bad("shorter than its 64-byte header".into()));
    }
    let mut h = [0u8; HEADER as usize];
    file.read_at(&mut h, 0)?;
    let version = le32(&h, 4);
    if version != 1 {
        return Err(bad(format!("version {version}; only version 1 is read")));
    }
    let (vm_id, vcpu_count, memory_pages) = (le64(&h, 8), le32(&h, 16), le64(&h, 24));
    let (region_count, total_size, timestamp, checksum) = (le32(&h, 32), le64(&h, 40), le64(&h, 48), le64(&h, 56));
    let expected = [le32(&h, 0) as u64, version as u64, vm_id, vcpu_count as u64, memory_pages]
        .into_iter()
        .chain([region_count as u64, total_size, timestamp])
        .fold(0, |a, b| a ^ b);
    let checksum_ok = checksum == expected;
    let table_end = HEADER + region_count as u64 * DESCRIPTOR;
    if table_end > len {
        return Err(bad(format!("{region_count} region descriptors run past the end of the file")));
    }
    let mut table = vec![0u8; (table_end - HEADER) as usize];
    file.read_at(&mut table, HEADER)?;
    let mut regions: Vec<Region> = table
        .chunks_exact(DESCRIPTOR as usize)
        .enumerate()
        .map(|(index, d)| Region { index, kind: le32(d, 0), vcpu: le32(d, 4), offset: le64(d, 8), size: le64(d, 16) })
        .collect();

    // Offsets: all zero means back to back after the table; else absolute.
    let sequential = regions.iter().all(|r| r.offset == 0);
    let mut next = table_end;
    for r in &mut regions {
        if sequential {
            r.offset = next;
            next = next.saturating_add(r.size);
        } else if r.offset == 0 && r.size != 0 {
            return Err(bad(format!(
                "region {} ({}) has no offset in a file with offsets",
                r.index,
                kind_name(r.kind)
            )));
        }
        if r.offset.checked_add(r.size).is_none_or(|end| end > len) {
            return Err(bad(format!(
                "region {} ({}, {} bytes at {:#x}) runs past the end of the file",
                r.index,
                kind_name(r.kind),
                r.size,
                r.offset
            )));
        }
    }
    let pages = page_numbers(&regions, memory_pages).map_err(&bad)?;
    let memory_size = memory_pages
        .checked_mul(PAGE)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| bad("memory size out of range".into()))?;
    // Warnings only once the file is known to mount.
    if !checksum_ok {
        warn!("{}: header checksum {checksum:#x} does not match {expected:#x}; reading it anyway", path.display());
    }
    let sum = regions.iter().fold(0u64, |a, r| a.saturating_add(r.size));
    if total_size != table_end.saturating_add(sum) {
        warn!("{}: total_size {total_size} is not 64 + 24 x {region_count} + {sum}", path.display());
    }

    let raw: Arc<dyn View> = Arc::new(RawView::new(file.clone()));
    let slice = |r: &Region| -> Arc<dyn View> { Arc::new(SliceView::new(raw.clone(), r.offset, r.size)) };
    let mut top = DirBuilder::default();
    let mut vcpus: BTreeMap<u32, DirBuilder> = BTreeMap::new();
    let mut devices = DirBuilder::default();
    let mut others = DirBuilder::default();
    let mut listed = Vec::new();
    let mut page_map = BTreeMap::new();
    let mut device_index = 0;
    for r in &regions {
        let mut entry =
            json!({"index": r.index, "type": r.kind, "kind": kind_name(r.kind), "offset": r.offset, "size": r.size});
        match r.kind {
            4 => {
                let page = pages[&r.index];
                entry["page"] = json!(page);
                page_map.insert(page, r.offset);
            }
            5 => {
                entry["file"] =
                    json!(format!("devices/{}", devices.add(&device_index.to_string(), ".bin", Tree::View(slice(r)))));
                device_index += 1;
            }
            1 | 2 | 3 | 6 | 7 => {
                entry["vcpu"] = json!(r.vcpu);
                let dir = vcpus.entry(r.vcpu).or_default();
                let stem = match r.kind {
                    1 => "vmcs",
                    2 => "registers",
                    3 => "msrs",
                    6 => "lapic",
                    _ => "state",
                };
                let name = dir.add(stem, ".bin", Tree::View(slice(r)));
                entry["file"] = json!(format!("vcpu{}/{name}", r.vcpu));
                if let Some(decode) = decoder(r.kind, r.size) {
                    let (file, offset, size) = (file.clone(), r.offset, r.size);
                    let json_name = format!("{}.json", name.trim_end_matches(".bin"));
                    let make = move || {
                        let mut bytes = vec![0u8; size as usize];
                        let v = match file.read_at(&mut bytes, offset) {
                            Ok(()) => decode(&bytes),
                            Err(e) => json!({"error": e.to_string()}),
                        };
                        crate::tree::json_text(&v)
                    };
                    dir.add(json_name.trim_end_matches(".json"), ".json", Tree::Lazy(Box::new(make)));
                }
            }
            _ => {
                let name = others.add(&format!("{}-type{}", r.index, r.kind), ".bin", Tree::View(slice(r)));
                entry["file"] = json!(format!("regions/{name}"));
            }
        }
        listed.push(entry);
    }

    let info = json!({
        "filename": path.display().to_string(),
        "format": "veridian-vmsn",
        "magic": format!("{:#010x}", le32(&h, 0)),
        "version": version,
        "vm_id": vm_id,
        "vcpu_count": vcpu_count,
        "memory_pages": memory_pages,
        "region_count": region_count,
        "total_size": total_size,
        "timestamp": timestamp,
        "checksum": checksum,
        "checksum_ok": checksum_ok,
        "offsets": if sequential { "sequential" } else { "absolute" },
        "saved_pages": page_map.len(),
        "regions": listed,
    });
    top.add("info", ".json", Tree::json(&info));
    top.add("memory", ".raw", Tree::View(Arc::new(Pages { raw, pages: page_map, size: memory_size })));
    for (n, dir) in vcpus {
        top.add(&format!("vcpu{n}"), "", dir.build());
    }
    if !devices.is_empty() {
        top.add("devices", "", devices.build());
    }
    if !others.is_empty() {
        top.add("regions", "", others.build());
    }
    Ok(top.build())
}

/// The guest page of each memory-page region (by region index): the
/// regions' `vcpu_index` when those are pairwise distinct, the k-th region
/// page k when they are all equal (as upstream writes them: 0); anything
/// else is ambiguous.
fn page_numbers(regions: &[Region], memory_pages: u64) -> std::result::Result<BTreeMap<usize, u64>, String> {
    let page_regions: Vec<&Region> = regions.iter().filter(|r| r.kind == 4).collect();
    if let Some(r) = page_regions.iter().find(|r| r.size != PAGE) {
        return Err(format!("memory page region {} is {} bytes, not 4096", r.index, r.size));
    }
    let mut ids: Vec<u32> = page_regions.iter().map(|r| r.vcpu).collect();
    ids.sort_unstable();
    let distinct = ids.windows(2).all(|w| w[0] != w[1]);
    let equal = ids.windows(2).all(|w| w[0] == w[1]);
    let mut out = BTreeMap::new();
    for (k, r) in page_regions.iter().enumerate() {
        let page =
            match (distinct, equal) {
                (true, _) => r.vcpu as u64,
                (false, true) => k as u64,
                (false, false) => return Err(
                    "memory page regions number their pages ambiguously (some vcpu_index values repeat, others differ)"
                        .into(),
                ),
            };
        if page >= memory_pages {
            return Err(format!("memory page region {} holds page {page}, past memory_pages {memory_pages}", r.index));
        }
        out.insert(r.index, page);
    }
    Ok(out)
}

type Decode = fn(&[u8]) -> Value;

/// How a per-vCPU region of `kind` and `size` becomes JSON, when it can.
fn decoder(kind: u32, size: u64) -> Option<Decode> {
    match kind {
        2 if size == 18 * 8 => Some(|b| {
            let regs = REGISTERS.iter().enumerate().map(|(i, n)| (n.to_string(), json!(le64(b, i * 8))));
            Value::Object(regs.collect())
        }),
        3 if size.is_multiple_of(16) && size <= MAX_JSON_PAYLOAD => {
            Some(|b| b.chunks_exact(16).map(|e| json!({"index": le32(e, 0), "value": le64(e, 8)})).collect())
        }
        1 if size.is_multiple_of(12) && size <= MAX_JSON_PAYLOAD => {
            Some(|b| b.chunks_exact(12).map(|e| json!({"encoding": le32(e, 0), "value": le64(e, 4)})).collect())
        }
        _ => None,
    }
}

/// Guest memory: the saved pages at their guest offsets, holes elsewhere.
struct Pages {
    raw: Arc<dyn View>,
    /// Guest page → file offset of its 4096 bytes.
    pages: BTreeMap<u64, u64>,
    size: u64,
}

impl View for Pages {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        buf.fill(0);
        let end = offset.saturating_add(buf.len() as u64).min(self.size);
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let within = pos % PAGE;
            let n = (PAGE - within).min(end - pos) as usize;
            let at = (pos - offset) as usize;
            if let Some(&file_offset) = self.pages.get(&page) {
                self.raw.read_at(&mut buf[at..at + n], file_offset + within)?;
            }
            pos += n as u64;
        }
        Ok(())
    }

    fn extent(&self, offset: u64, max: u64) -> Result<Extent> {
        let page = offset / PAGE;
        let limit = (self.size - offset).min(max).max(1);
        let len = if self.pages.contains_key(&page) {
            // Saved pages in a row.
            let mut p = page + 1;
            while self.pages.contains_key(&p) && (p * PAGE - offset) < limit {
                p += 1;
            }
            Extent { len: (p * PAGE - offset).min(limit), data: true }
        } else {
            let next = self.pages.range(page..).next().map_or(self.size, |(&p, _)| p * PAGE);
            Extent { len: (next - offset).min(limit), data: false }
        };
        Ok(Extent { len: len.len.max(1), ..len })
    }
}
