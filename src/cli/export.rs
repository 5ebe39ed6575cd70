//! `snapmount export SOURCE[@SNAPSHOT] OUTPUT`: writes one view to a raw
//! file without FUSE, leaving holes where the source is unallocated or zero.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use snapmount::cache::BlockCache;
use snapmount::catalog::{Catalog, Content};
use snapmount::view::View;

use super::password::PasswordFiles;
use super::RuleArgs;

const CHUNK: usize = 4 << 20;

/// Splits `vm.qcow2@before-upgrade` into the file and the snapshot, unless
/// the whole string names an existing file.
fn split_source(source: &str) -> (PathBuf, Option<String>) {
    if Path::new(source).exists() {
        return (source.into(), None);
    }
    match source.rsplit_once('@') {
        Some((file, snap)) => (file.into(), Some(snap.to_string())),
        None => (source.into(), None),
    }
}

/// The view to export: the disk, or the snapshot named by its directory
/// entry, its ID, or its name.
fn select(catalog: &Catalog, source: &Path, snapshot: Option<&str>) -> Result<Arc<dyn View>> {
    let top = catalog.children(snapmount::catalog::ROOT);
    let image = top.first().ok_or_else(|| anyhow!("{}: nothing to export", source.display()))?;
    let path = match snapshot {
        // A disk, or the guest memory of a VM snapshot.
        None if catalog.resolve(&format!("{image}/disk.raw")).is_some() => format!("{image}/disk.raw"),
        None => format!("{image}/memory.raw"),
        Some(snap) => {
            let info = catalog
                .resolve(&format!("{image}/info.json"))
                .and_then(|ino| catalog.node(ino))
                .and_then(|n| match &n.content {
                    Content::Bytes(b) => serde_json::from_slice::<serde_json::Value>(b).ok(),
                    _ => None,
                })
                .unwrap_or_default();
            let snaps = info["snapshots"].as_array().cloned().unwrap_or_default();
            let pick = |key: &str| snaps.iter().find(|s| s[key].as_str() == Some(snap));
            let found = pick("entry").or_else(|| pick("id")).or_else(|| pick("name"));
            let entry = found.and_then(|s| s["entry"].as_str()).ok_or_else(|| {
                let known: Vec<&str> = snaps.iter().filter_map(|s| s["entry"].as_str()).collect();
                anyhow!(
                    "{}: no snapshot '{snap}' (snapshots: {})",
                    source.display(),
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                )
            })?;
            format!("{image}/snapshots/{entry}/disk.raw")
        }
    };
    let node = catalog.resolve(&path).and_then(|ino| catalog.node(ino));
    match node.map(|n| &n.content) {
        Some(Content::View(v)) => Ok(v.clone()),
        _ => bail!("{}: no view {path}", source.display()),
    }
}

pub fn export(
    source: &str,
    output: &Path,
    password_files: &PasswordFiles,
    cache_size: u64,
    rules: &RuleArgs,
) -> Result<()> {
    let (file, snapshot) = split_source(source);
    let cache = Arc::new(BlockCache::new(cache_size));
    let rules = &rules.rules(&cache)?;
    let passwords = |image: &Path| password_files.password_for(image);
    let catalog = Catalog::build(std::slice::from_ref(&file), &cache, &passwords, rules)?;
    let view = select(&catalog, &file, snapshot.as_deref())?;
    let out = File::create(output).with_context(|| format!("{}: cannot create", output.display()))?;
    out.set_len(view.size()).with_context(|| format!("{}: cannot size", output.display()))?;

    let progress = std::io::stderr().is_terminal();
    let started = Instant::now();
    let size = view.size();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    let mut written = 0u64;
    while pos < size {
        let extent = view.extent(pos, u64::MAX)?;
        let end = pos + extent.len;
        if extent.data {
            while pos < end {
                let n = (end - pos).min(CHUNK as u64) as usize;
                view.read_at(&mut buf[..n], pos)?;
                // Zero runs inside data stay holes too.
                if buf[..n].iter().any(|&b| b != 0) {
                    out.write_all_at(&buf[..n], pos).with_context(|| format!("{}: write failed", output.display()))?;
                    written += n as u64;
                }
                pos += n as u64;
                if progress {
                    report(pos, size, started);
                }
            }
        }
        pos = end;
    }
    out.sync_all().with_context(|| format!("{}: sync failed", output.display()))?;
    if progress {
        report(size, size, started);
        eprintln!();
    }
    eprintln!("{}: {} bytes ({} written, the rest left sparse)", output.display(), size, written);
    Ok(())
}

fn report(pos: u64, size: u64, started: Instant) {
    let pct = if size == 0 { 100.0 } else { pos as f64 * 100.0 / size as f64 };
    let secs = started.elapsed().as_secs_f64().max(0.001);
    let mut err = std::io::stderr();
    let _ = write!(err, "\r{pct:5.1}%  {:>8.1} MiB/s ", pos as f64 / secs / (1 << 20) as f64);
    let _ = err.flush();
}
