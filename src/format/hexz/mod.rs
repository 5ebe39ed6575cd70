//! HEXZ archives (`.hxz`) as hexz-cli 0.8.2 writes them, read-only.
//! `../shared/research/hexz.md` is the reference this follows.

mod archive;
mod codec;
pub mod header;
pub mod index;
pub mod manifest;
mod wire;

pub use archive::{open_hexz, BlockStats, HexzArchive, PasswordSource, Stream, StreamView, MAX_CHAIN};
pub use header::MAGIC;
