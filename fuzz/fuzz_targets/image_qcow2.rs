//! qcow2 images (header, extensions, L1/L2, snapshot table, compressed and
//! subcluster-mapped clusters, backing chains) opened and read through
//! every view.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| snapmount_fuzz::exercise(&snapmount::format::qcow2::MAGIC, data));
