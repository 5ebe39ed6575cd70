//! qcow2 (versions 2 and 3), read-only. `../shared/research/qcow2.md` Part A
//! is the reference this follows.

mod crypto;
mod decompress;
pub mod header;
mod image;
pub mod l2;
pub mod snapshot;
mod watch;

pub use crypto::Crypto;
pub use header::{Compression, Header, MAGIC};
pub use image::{Backing, Qcow2Image, Qcow2View};
pub use snapshot::Snapshot;
