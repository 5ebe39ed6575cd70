//! The JSON manifest hexz stores as metadata when it packs a directory:
//! which bytes of the main stream are which file (hexz.md §8).

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub offset: u64,
    pub size: u64,
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub mtime: i64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Manifest {
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// `None` for metadata that is not a manifest (e.g. from `hexz convert tar`).
    pub fn parse(raw: &[u8]) -> Option<Manifest> {
        serde_json::from_slice(raw).ok()
    }
}
