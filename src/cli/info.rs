//! `snapmount info IMAGE [--json]`: what the mount's info.json would say,
//! without mounting.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use serde_json::Value;

use snapmount::cache::BlockCache;
use snapmount::catalog::{rfc3339, Catalog, Content, ROOT};
use snapmount::io::OpenRules;

use super::password::PasswordFiles;
use super::RuleArgs;

pub fn info(image: &Path, json: bool, password_files: &PasswordFiles, rules: &RuleArgs) -> Result<()> {
    let cache = Arc::new(BlockCache::new(64 << 20));
    let rules = &OpenRules { describe_only: true, ..rules.rules(&cache)? };
    let passwords = |image: &Path| password_files.password_for(image);
    let catalog = Catalog::build(&[image.to_path_buf()], &cache, &passwords, rules)?;
    let dir = catalog.children(ROOT).into_iter().next().ok_or_else(|| anyhow!("{}: nothing found", image.display()))?;
    let node = catalog.resolve(&format!("{dir}/info.json")).and_then(|i| catalog.node(i));
    let bytes = match node.map(|n| &n.content) {
        Some(Content::Bytes(b)) => b.clone(),
        Some(Content::Lazy(l)) => l.bytes().clone(),
        _ => return Err(anyhow!("{}: no information", image.display())),
    };
    if json {
        print!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let v: Value = serde_json::from_slice(&bytes)?;
    print!("{}", human(&v));
    Ok(())
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {} ({bytes} bytes)", UNITS[unit])
    }
}

/// The info as lines for a person.
fn human(v: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, val: String| out.push_str(&format!("{k:<16}{val}\n"));
    let s = |x: &Value| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string());
    line("file:", s(&v["filename"]));
    line("format:", s(&v["format"]));
    if v["format"] == "qcow2" {
        line("virtual size:", size(v["virtual_size"].as_u64().unwrap_or(0)));
        line("cluster size:", s(&v["cluster_size"]));
        line("version:", s(&v["version"]));
        line("compression:", s(&v["compression_type"]));
        let features: Vec<String> = v["features"].as_array().into_iter().flatten().map(s).collect();
        line("features:", if features.is_empty() { "-".into() } else { features.join(", ") });
        if !v["data_file"].is_null() {
            line("data file:", s(&v["data_file"]));
        }
        let e = &v["encryption"];
        match e["format"].as_str() {
            Some("luks") => {
                let iv = match e["ivgen_hash"].as_str() {
                    Some(h) => format!("{}:{h}", s(&e["ivgen"])),
                    None => s(&e["ivgen"]),
                };
                let slots: Vec<String> = e["key_slots_active"].as_array().into_iter().flatten().map(s).collect();
                line(
                    "encryption:",
                    format!(
                        "LUKS {}-{}-{iv}, {}, key slots {}",
                        s(&e["cipher"]),
                        s(&e["mode"]),
                        s(&e["hash"]),
                        slots.join(" ")
                    ),
                );
            }
            Some(_) => line("encryption:", "AES-128-CBC (legacy; a wrong password cannot be detected)".into()),
            None => {}
        }
        for (i, b) in v["backing_chain"].as_array().into_iter().flatten().enumerate() {
            line(
                if i == 0 { "backing chain:" } else { "" },
                format!("{} ({}) -> {}", s(&b["name"]), s(&b["format"]), s(&b["path"])),
            );
        }
        let snaps = v["snapshots"].as_array().cloned().unwrap_or_default();
        line("snapshots:", snaps.len().to_string());
        if !snaps.is_empty() {
            out.push_str(&format!(
                "  {:<6} {:<24} {:<22} {:>12} {:>12}\n",
                "ID", "NAME", "DATE", "DISK SIZE", "VM STATE"
            ));
            for sn in &snaps {
                let date = rfc3339(sn["date_sec"].as_u64().unwrap_or(0), 0);
                out.push_str(&format!(
                    "  {:<6} {:<24} {:<22} {:>12} {:>12}\n",
                    s(&sn["id"]),
                    s(&sn["name"]),
                    date,
                    sn["disk_size"].as_u64().unwrap_or(0),
                    sn["vm_state_size"].as_u64().unwrap_or(0)
                ));
            }
        }
    } else if v["format"].as_str().is_some_and(|f| f.starts_with("veridian")) {
        // Every scalar field as it is; the lists are in --json.
        for (k, val) in v.as_object().into_iter().flatten() {
            if !val.is_array() && !val.is_object() && k != "filename" && k != "format" {
                line(&format!("{}:", k.replace('_', " ")), s(val));
            }
        }
        for list in ["regions", "vcpus", "devices"] {
            if let Some(items) = v[list].as_array() {
                line(&format!("{list}:"), format!("{} (see --json)", items.len()));
            }
        }
    } else {
        line("version:", s(&v["version"]));
        line("main stream:", size(v["streams"]["main_size"].as_u64().unwrap_or(0)));
        line("aux stream:", size(v["streams"]["auxiliary_size"].as_u64().unwrap_or(0)));
        line("compression:", s(&v["compression"]));
        line("block size:", s(&v["block_size"]));
        if !v["cdc"].is_null() {
            let c = &v["cdc"];
            line(
                "chunking:",
                format!("content-defined, {}..{} bytes, avg {}", c["min_chunk"], c["max_chunk"], c["avg_chunk"]),
            );
        }
        let b = &v["blocks"];
        line(
            "blocks:",
            format!(
                "{} entries: {} stored, {} deduplicated, {} sparse, {} in parents",
                b["entries"], b["stored"], b["deduplicated"], b["sparse"], b["parent_refs"]
            ),
        );
        line(
            "encryption:",
            if v["encryption"].is_null() {
                "none".into()
            } else {
                format!("{} ({} PBKDF2 iterations)", s(&v["encryption"]["cipher"]), v["encryption"]["iterations"])
            },
        );
        line("signed:", s(&v["signature"]));
        for (i, p) in v["parent_chain"].as_array().into_iter().flatten().enumerate() {
            line(if i == 0 { "parent chain:" } else { "" }, format!("{} -> {}", s(&p["name"]), s(&p["path"])));
        }
    }
    out
}
