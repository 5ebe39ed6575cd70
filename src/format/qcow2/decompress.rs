//! Decompressing one qcow2 cluster (research note A.6).
//!
//! Both decoders stop once they have produced exactly one cluster and ignore
//! the bytes after it: the stored extent is only an upper bound and often holds
//! the start of the next compressed cluster. Contexts are kept per thread and
//! reused, so a read does not allocate decoder state.

use std::cell::RefCell;

use flate2::{Decompress, FlushDecompress, Status};
use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer};

use crate::format::zstd::{error_name, with_dctx};

use super::header::Compression;

/// Largest zstd window we accept: QEMU's frames never exceed one cluster
/// (2 MiB at most); refusing bigger windows bounds a hostile frame's memory.
const ZSTD_MAX_WINDOW_LOG: u32 = 23;

thread_local! {
    static INFLATE: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Decompresses `input` into `out`, which must be filled exactly.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        Compression::Deflate => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    INFLATE.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        // Like QEMU: Z_FINISH, and a buffer error is fine once the output is full.
        match d.decompress(input, out, FlushDecompress::Finish) {
            Ok(Status::StreamEnd) | Ok(Status::Ok) | Ok(Status::BufError) => {}
            Err(e) => return Err(format!("deflate stream is damaged: {e}")),
        }
        let produced = d.total_out() as usize;
        if produced != out.len() {
            return Err(format!("deflate stream decompressed to {produced} bytes, not one cluster ({})", out.len()));
        }
        Ok(())
    })
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    with_dctx(ZSTD_MAX_WINDOW_LOG, |ctx| zstd_loop(ctx, input, out))
}

/// QEMU's loop (qcow2-threads.c): decompress until the cluster is full, fail
/// on no progress, and fail if the last frame is unfinished when it is full.
fn zstd_loop(ctx: &mut DCtx<'static>, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let want = out.len();
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let (in_before, out_before) = (inb.pos, outb.pos());
        let hint = ctx
            .decompress_stream(&mut outb, &mut inb)
            .map_err(|c| format!("zstd stream is damaged: {}", error_name(c)))?;
        if outb.pos() == want {
            if hint != 0 {
                return Err("zstd frame does not end at the cluster end".into());
            }
            return Ok(());
        }
        if inb.pos == in_before && outb.pos() == out_before {
            return Err(format!("zstd stream ended after {} bytes, not one cluster ({want})", outb.pos()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut stream = enc.finish().unwrap();
        stream.extend_from_slice(&[0xAB; 700]);
        let mut out = vec![0; 65536];
        decompress(Compression::Deflate, &stream, &mut out).unwrap();
        assert_eq!(out, data);
        let mut short = vec![0; 65537];
        assert!(decompress(Compression::Deflate, &stream, &mut short).is_err());
    }

    #[test]
    fn zstd_with_trailing_garbage_and_short_frames() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 253) as u8).collect();
        let mut stream = zstd::bulk::compress(&data, 3).unwrap();
        stream.extend_from_slice(&[0x11; 300]);
        let mut out = vec![0; 65536];
        decompress(Compression::Zstd, &stream, &mut out).unwrap();
        assert_eq!(out, data);
        let mut longer = vec![0; 65536 * 2];
        assert!(decompress(Compression::Zstd, &stream, &mut longer).is_err());
        // And the context is still usable afterwards.
        decompress(Compression::Zstd, &stream, &mut out).unwrap();
        assert!(decompress(Compression::Zstd, &[0x28, 0xb5, 0x2f, 0xfd, 0xff], &mut out).is_err());
    }
}
