//! VeridianOS's hypervisor formats: VM snapshots (VMSN version 1, in
//! snapmount's file profile) and migration streams (version 3). Each file
//! becomes a tree of raw files for the binary state and JSON for the small
//! structured state.

pub mod migration;
pub mod vmsn;
