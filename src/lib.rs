//! snapmount: VM disk images and their snapshots, read-only, as raw files.
//!
//! The format readers (`format`) and views (`view`) know nothing of FUSE, so
//! tests and `snapmount export` drive them directly; `fs` adapts the catalog
//! of views to FUSE.

pub mod cache;
pub mod catalog;
pub mod error;
pub mod format;
pub mod fs;
pub mod io;
pub mod view;

pub use error::{Error, Result};
