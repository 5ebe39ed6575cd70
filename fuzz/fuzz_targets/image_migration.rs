//! VeridianOS migration streams (header, VM-state and device sections) opened and read through every file of their tree.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| snapmount_fuzz::exercise(&snapmount::format::veridian::migration::MAGIC, data));
