//! What a server or a remote image says, straight from bytes: S3 listing
//! pages, Content-Range and Retry-After headers, and names written inside a
//! remote image. Checks the rule that matters beyond not crashing: a name
//! resolved against a remote image never leaves its server or bucket.
#![no_main]
use std::path::Path;

use snapmount::io::remote::{http, s3, Location};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = s3::parse_listing(data);
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = http::parse_content_range(text);
    let _ = http::parse_retry_after(text);
    let _ = Location::parse(Path::new(text)).map(|l| (l.url(), l.name(), l.is_prefix()));
    for base in ["http://h:8080/a/b/top.qcow2?x=1", "s3://bucket/a/b/top.qcow2"] {
        let base = Location::parse(Path::new(base)).unwrap();
        let Ok(joined) = base.join(text) else { continue };
        assert!(same_place(&base, &joined), "{text:?} left {base:?} for {joined:?}");
        // What is opened is the URL: it must name the same place again.
        let again = Location::parse(Path::new(&joined.url())).expect("a joined URL parses");
        assert!(same_place(&base, &again), "{text:?}: {joined:?} reparsed as {again:?}");
    }
});

/// The same server (scheme and authority) or the same bucket.
fn same_place(a: &Location, b: &Location) -> bool {
    match (a, b) {
        (Location::Http { scheme: a, authority: b, .. }, Location::Http { scheme: c, authority: d, .. }) => {
            a == c && b.eq_ignore_ascii_case(d)
        }
        (Location::S3 { bucket: a, .. }, Location::S3 { bucket: b, .. }) => a == b,
        _ => false,
    }
}
