//! HEXZ archives (header, master index, index pages, blocks, manifest,
//! encryption, parent chains) opened and read through every view.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| snapmount_fuzz::exercise(&snapmount::format::hexz::MAGIC, data));
