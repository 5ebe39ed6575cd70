//! Image formats, found by their magic bytes, and the opening of backing chains.

pub mod hexz;
pub mod qcow2;
pub mod veridian;
mod zstd;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use crate::cache::BlockCache;
use crate::error::{Error, Result};
use crate::io::{resolve_name, OpenRules, Source};
use crate::view::{RawView, View};

use qcow2::{Backing, Crypto, Header, Qcow2Image};

/// A chain deeper than this is refused: each level keeps a file and its L1
/// table open, and a hostile chain must not exhaust either.
pub const MAX_CHAIN_DEPTH: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// qcow2, and qcow version 1 (one magic, told apart by the version).
    Qcow2,
    Hexz,
    VeridianSnapshot,
    VeridianMigration,
}

/// Every format snapmount reads, by the first four bytes of its files.
const MAGICS: [([u8; 4], Format); 4] = [
    (qcow2::MAGIC, Format::Qcow2),
    (hexz::MAGIC, Format::Hexz),
    (veridian::vmsn::MAGIC, Format::VeridianSnapshot),
    (veridian::migration::MAGIC, Format::VeridianMigration),
];

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Hexz => "hexz",
            Format::VeridianSnapshot => "veridian-vmsn",
            Format::VeridianMigration => "veridian-migration",
        }
    }
}

/// The format of a file by its magic bytes, or `None` for anything else.
pub fn probe(file: &Source) -> Result<Option<Format>> {
    let mut magic = [0u8; 4];
    file.read_at(&mut magic, 0)?;
    Ok(MAGICS.iter().find(|(m, _)| *m == magic).map(|&(_, f)| f))
}

/// Supplies the password of an encrypted image or archive (asked once per
/// file, with its path).
pub type PasswordSource<'a> = &'a dyn Fn(&Path) -> std::result::Result<String, String>;

/// Opens a qcow2 image and, recursively, its backing chain (no passwords:
/// an encrypted image in it fails to open).
pub fn open_qcow2(path: &Path, cache: &Arc<BlockCache>, rules: &OpenRules) -> Result<Arc<Qcow2Image>> {
    open_qcow2_with(path, cache, &|_: &Path| Err("no password was given".to_string()), rules)
}

/// Opens a qcow2 image and its backing chain; each encrypted image in it
/// asks `passwords` for its own.
pub fn open_qcow2_with(
    path: &Path,
    cache: &Arc<BlockCache>,
    passwords: PasswordSource,
    rules: &OpenRules,
) -> Result<Arc<Qcow2Image>> {
    let file = Source::open_image(path, rules)?;
    open_qcow2_in_chain(file, cache, &Opening { passwords, rules }, &mut Vec::new())
}

/// What every image of one chain is opened with.
struct Opening<'a> {
    passwords: PasswordSource<'a>,
    rules: &'a OpenRules,
}

fn open_qcow2_in_chain(
    file: Source,
    cache: &Arc<BlockCache>,
    opening: &Opening,
    chain: &mut Vec<PathBuf>,
) -> Result<Arc<Qcow2Image>> {
    let rules = opening.rules;
    let file = Arc::new(file);
    let path = &file.path().to_path_buf();
    let canonical = crate::io::canonical(path)?;
    if chain.contains(&canonical) {
        return Err(Error::open(path, "backing chain loops back to this image"));
    }
    if chain.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::open(path, format!("backing chain deeper than {MAX_CHAIN_DEPTH} images")));
    }
    chain.push(canonical);

    let header = read_header(&file)?;
    if header.incompatible & qcow2::header::INCOMPAT_DIRTY != 0 {
        warn!("{}: image is marked dirty (not cleanly closed); reading it anyway", path.display());
    }
    if header.incompatible & qcow2::header::INCOMPAT_CORRUPT != 0 {
        warn!("{}: image is marked corrupt; reading it read-only anyway", path.display());
    }
    let data = match &header.data_file {
        Some(name) if header.has_data_file() => {
            let data_path = resolve_name(path, name, "external data file", rules)?;
            let what = "external data file";
            let data = Source::open_named(&file, name, &data_path, what, rules)
                .map_err(|e| named_open_error(path, name, &data_path, what, e))?;
            Some(Arc::new(data))
        }
        _ => None,
    };
    let backing = match header.backing_file.clone() {
        Some(name) => {
            // Version 1 has no field for the backing format: probing is its
            // normal way, not worth a warning.
            let quiet = header.version == 1;
            Some(open_backing(&file, &name, header.backing_format.as_deref(), quiet, cache, opening, chain)?)
        }
        None => None,
    };
    let crypto = match header.crypt_method {
        0 => None,
        method => Some(Crypto::open(&file, method, header.fde, opening.passwords, rules.describe_only)?),
    };
    let may_change = rules.force_share;
    Ok(Arc::new(Qcow2Image::new(file, header, data, backing, cache.clone(), crypto, may_change)?))
}

/// ` (PATH)` when the name inside an image resolved to another path.
pub fn resolved(name: &str, path: &Path) -> String {
    if Path::new(name) == path {
        String::new()
    } else {
        format!(" ({})", path.display())
    }
}

/// The one-line error for a file named inside `image` that could not be
/// opened; refusals (already naming both files) pass through.
fn named_open_error(image: &Path, name: &str, path: &Path, what: &str, e: Error) -> Error {
    let reason = match e {
        Error::Open { .. } | Error::Corrupt { .. } => return e,
        Error::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => "not found".to_string(),
        Error::Io { err, .. } => err.to_string(),
    };
    Error::open(image, format!("{what} '{name}'{}: {reason}", resolved(name, path)))
}

pub(crate) fn read_header(file: &Source) -> Result<Header> {
    let mut first = vec![0u8; 104.min(file.len() as usize)];
    file.read_at(&mut first, 0)?;
    if first.len() >= 24 && first[0..4] == qcow2::MAGIC {
        let version = u32::from_be_bytes(first[4..8].try_into().unwrap());
        let bits = u32::from_be_bytes(first[20..24].try_into().unwrap());
        if version == 1 {
            // Version 1 may keep its backing name anywhere: take the first
            // 64 KiB (QEMU writes it right after the 48-byte header).
            first = vec![0u8; (64usize << 10).min(file.len() as usize)];
            file.read_at(&mut first, 0)?;
        } else if (qcow2::header::MIN_CLUSTER_BITS..=qcow2::header::MAX_CLUSTER_BITS).contains(&bits) {
            first = vec![0u8; (1usize << bits).min(file.len() as usize)];
            file.read_at(&mut first, 0)?;
        }
    }
    Header::parse(file.path(), &first)
}

/// Opens the backing file `name` of `referrer`, as `format` or, without
/// one, as its magic says (with a warning unless `probe_quietly`).
fn open_backing(
    referrer: &Source,
    name: &str,
    format: Option<&str>,
    probe_quietly: bool,
    cache: &Arc<BlockCache>,
    opening: &Opening,
    chain: &mut Vec<PathBuf>,
) -> Result<Backing> {
    let rules = opening.rules;
    let image = referrer.path();
    let path = resolve_name(image, name, "backing file", rules)?;
    let file = Source::open_named(referrer, name, &path, "backing file", rules)
        .map_err(|e| named_open_error(image, name, &path, "backing file", e))?;
    let format = match format {
        Some("qcow2") => "qcow2",
        Some("qcow") => "qcow",
        Some("raw") => "raw",
        Some(other) => {
            return Err(Error::open(
                image,
                format!("backing file '{name}' has format '{other}', which snapmount does not read"),
            ))
        }
        None => {
            // Legacy images: probe by magic, as QEMU does, but only ever
            // promote a file to qcow2 on its magic, never demote a qcow2.
            let probed = match probe(&file)? {
                Some(Format::Qcow2) if read_header(&file).is_ok_and(|h| h.version == 1) => "qcow",
                Some(Format::Qcow2) => "qcow2",
                _ => "raw",
            };
            if !probe_quietly {
                warn!("{}: no backing format recorded for '{name}'; probed it as {probed}", image.display());
            }
            probed
        }
    };
    if format == "raw" {
        let file = Arc::new(file);
        let view: Arc<dyn View> =
            Arc::new(if rules.force_share { RawView::watched(file.clone())? } else { RawView::new(file.clone()) });
        return Ok(Backing { name: name.to_string(), path, format, view, file, image: None });
    }
    let img = open_qcow2_in_chain(file, cache, opening, chain)?;
    let view: Arc<dyn View> = Arc::new(img.active_view());
    let file = img.file().clone();
    Ok(Backing { name: name.to_string(), path, format, view, file, image: Some(img) })
}
