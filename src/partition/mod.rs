//! Partition tables inside a disk view (GPT and MBR with logical
//! partitions), so that every partition of every disk can be served as a
//! file of its own: `partitions/N.raw`, numbered as the kernel numbers them.
//!
//! Written here rather than taken from the `gpt` and `mbrman` crates: those
//! read from a `Read + Seek` device and size their allocations from the
//! header (`gpt` allocates what `num_entries × entry_size` claims), while
//! here the disk is a view of a hostile image and every read must be
//! bounded up front. The two formats need about two hundred lines.

mod gpt;
mod mbr;

use serde_json::{json, Value};
use tracing::warn;

use crate::error::Result;
use crate::view::View;

/// Sector size MBR tables are read with (the loop device's default); GPT
/// also tries 4096 (`gpt::read`).
pub const SECTOR: u64 = 512;

/// One partition: kernel number, byte range, and what the table says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub size: u64,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Gpt { type_guid: String, unique_guid: String, name: String },
    Mbr { type_byte: u8 },
}

impl Partition {
    pub fn file_name(&self) -> String {
        format!("{}.raw", self.number)
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "number": self.number,
            "start": self.start,
            "size": self.size,
            "file": format!("partitions/{}", self.file_name()),
        });
        match &self.kind {
            Kind::Gpt { type_guid, unique_guid, name } => {
                v["table"] = json!("gpt");
                v["type"] = json!(type_guid);
                v["type_name"] = json!(gpt::type_name(type_guid));
                v["uuid"] = json!(unique_guid);
                v["name"] = json!(name);
            }
            Kind::Mbr { type_byte } => {
                v["table"] = json!("mbr");
                v["type"] = json!(format!("{type_byte:#04x}"));
                v["type_name"] = json!(mbr::type_name(*type_byte));
            }
        }
        v
    }
}

/// The partitions of `disk` (`what` names it in log lines): GPT when a
/// protective MBR points to one, else MBR; empty when there is no table.
/// Partitions that start past the end of the disk are skipped and those
/// that run past it are clipped to it, as the kernel does, with a log line.
pub fn read(disk: &dyn View, what: &str) -> Result<Vec<Partition>> {
    let size = disk.size();
    if size < 2 * SECTOR {
        return Ok(Vec::new());
    }
    let mut sector0 = [0u8; SECTOR as usize];
    disk.read_at(&mut sector0, 0)?;
    let Some(entries) = mbr::primary(&sector0) else { return Ok(Vec::new()) };
    let found = if entries.iter().any(|e| e.kind == mbr::PROTECTIVE) {
        gpt::read(disk, what)?
    } else {
        mbr::read(disk, &entries, what)?
    };
    let mut out = Vec::new();
    for mut p in found {
        if p.size == 0 {
            continue;
        }
        if p.start >= size {
            warn!("{what}: partition {} starts at {:#x}, past the end of the disk: skipped", p.number, p.start);
            continue;
        }
        if p.start.saturating_add(p.size) > size {
            warn!("{what}: partition {} runs past the end of the disk: clipped", p.number);
            p.size = size - p.start;
        }
        out.push(p);
    }
    Ok(out)
}
