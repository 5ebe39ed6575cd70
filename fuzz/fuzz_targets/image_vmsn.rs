//! VeridianOS snapshots (header, region table, offsets, page numbering) opened and read through every file of their tree.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| snapmount_fuzz::exercise(&snapmount::format::veridian::vmsn::MAGIC, data));
