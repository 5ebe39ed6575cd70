//! The `info.json` files: what `qemu-img info --backing-chain` would tell.

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::format::hexz::HexzArchive;
use crate::format::qcow2::{Qcow2Image, Snapshot};

pub use crate::tree::json_text;

pub fn hexz_info(a: &HexzArchive) -> Value {
    let h = a.header();
    let st = a.block_stats();
    let mut chain = Vec::new();
    let mut level: Vec<(String, &HexzArchive)> = a.parents().iter().map(|(n, p)| (n.clone(), p.as_ref())).collect();
    while let Some((name, p)) = level.first().cloned() {
        chain.push(json!({ "name": name, "path": p.path().display().to_string(), "format": "hexz" }));
        level = p.parents().iter().map(|(n, q)| (n.clone(), q.as_ref())).collect();
    }
    json!({
        "filename": a.path().display().to_string(),
        "format": "hexz",
        "version": h.version,
        "compression": h.codec.name(),
        "block_size": h.block_size,
        "variable_blocks": h.variable_blocks,
        "cdc": h.cdc_params.map(|(bits, min, max)| json!({
            "fingerprint_bits": bits, "min_chunk": min, "avg_chunk": 1u64 << bits.min(63), "max_chunk": max,
        })),
        "streams": {
            "main_size": a.index().main_size,
            "auxiliary_size": a.index().aux_size,
        },
        "blocks": {
            "entries": st.entries,
            "stored": st.stored,
            "deduplicated": st.deduplicated,
            "sparse": st.sparse,
            "parent_refs": st.parent_refs,
            "stored_bytes": st.stored_bytes,
            "logical_bytes": st.logical_bytes,
            "unreadable_index_pages": st.unreadable_pages,
        },
        "encryption": h.encryption.as_ref().map(|e| json!({
            "cipher": "aes-256-gcm", "kdf": "pbkdf2-hmac-sha256", "iterations": e.iterations,
        })),
        "dictionary": h.dictionary.is_some_and(|(_, len)| len > 0),
        "signature": h.signature.is_some(),
        "files": a.manifest().map(|m| m.files.len()),
        "parent_paths": h.parent_paths,
        "parent_chain": chain,
    })
}

pub fn qcow2_info(image: &Qcow2Image, snapshot_entries: &[String]) -> Value {
    let h = image.header();
    let mut chain = Vec::new();
    let mut link = image.backing();
    while let Some(b) = link {
        chain.push(json!({
            "name": b.name,
            "path": b.path.display().to_string(),
            "format": b.format,
            "virtual_size": b.view.size(),
        }));
        link = b.image.as_ref().and_then(|i| i.backing());
    }
    let snapshots: Vec<Value> = image
        .snapshots()
        .iter()
        .zip(snapshot_entries)
        .map(|(s, entry)| {
            let mut v = snapshot_info(s);
            v["entry"] = json!(entry);
            v
        })
        .collect();
    json!({
        "filename": image.path().display().to_string(),
        "format": if h.version == 1 { "qcow" } else { "qcow2" },
        "virtual_size": h.virtual_size(),
        "cluster_size": h.cluster_size(),
        "version": h.version,
        "compression_type": h.compression.name(),
        "features": h.feature_list(),
        "refcount_bits": 1u64 << h.refcount_order,
        "data_file": image.data_file().map(|p| p.display().to_string()),
        "encryption": image.encryption(),
        "backing_file": image.backing().map(|b| b.name.clone()),
        "backing_chain": chain,
        "snapshots": snapshots,
    })
}

pub fn snapshot_info(s: &Snapshot) -> Value {
    json!({
        "id": s.id,
        "name": String::from_utf8_lossy(&s.name),
        "date": rfc3339(s.date_sec as u64, s.date_nsec),
        "date_sec": s.date_sec,
        "date_nsec": s.date_nsec,
        "vm_clock_nsec": s.vm_clock_nsec,
        "vm_state_size": s.vm_state_size,
        "disk_size": s.disk_size,
        "icount": s.icount,
    })
}

pub fn raw_info(path: &std::path::Path, size: u64) -> Value {
    json!({ "filename": path.display().to_string(), "format": "raw", "virtual_size": size })
}

pub fn snapshot_time(s: &Snapshot) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(s.date_sec as u64, s.date_nsec.min(999_999_999))
}

/// Seconds since the epoch as an RFC 3339 UTC timestamp.
pub fn rfc3339(secs: u64, nsec: u32) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let frac = if nsec == 0 { String::new() } else { format!(".{:09}", nsec.min(999_999_999)) };
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{frac}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(super::rfc3339(4_294_967_295, 0), "2106-02-07T06:28:15Z");
    }
}
