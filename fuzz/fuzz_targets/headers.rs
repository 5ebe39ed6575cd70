//! The small parsers on their own, straight from bytes: qcow2 header,
//! HEXZ header, master index, index page entries and manifest, and the
//! partition tables (GPT, MBR with logical chains) of the input as a disk. Faster than
//! the whole-image targets, so they go deeper into each parser.
#![no_main]
use std::path::Path;

use snapmount::format::hexz::{header, index, manifest};
use snapmount::format::qcow2::Header;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = Header::parse(Path::new("fuzz.qcow2"), data);
    let _ = header::Header::parse(data);
    let _ = index::parse_master(data);
    let _ = manifest::Manifest::parse(data);
    for entry in data.chunks_exact(52) {
        let _ = index::BlockInfo::parse(entry);
    }
    let _ = snapmount::partition::read(&snapmount_fuzz::BytesView(data), "fuzz");
});
