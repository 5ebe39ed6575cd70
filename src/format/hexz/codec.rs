//! Turning a stored HEXZ block back into its bytes: CRC32 of the stored
//! bytes, AES-256-GCM decryption, then LZ4 or zstd into exactly `logical_len`
//! bytes (research note hexz.md §6).

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use zstd::zstd_safe::DDict;

use crate::format::zstd::{error_name, with_dctx};

use super::header::Codec;

/// hexz's largest chunks (`--dcam-optimal`) are 64 MiB; a block claiming
/// more is refused rather than allocated.
pub const MAX_BLOCK: u32 = 64 << 20;
const ZSTD_MAX_WINDOW_LOG: u32 = 27;

/// The key of an encrypted archive, derived once when it is opened.
pub struct Key(Aes256Gcm);

impl Key {
    /// PBKDF2-HMAC-SHA256 of the password with the header's salt.
    pub fn derive(password: &[u8], salt: &[u8; 16], iterations: u32) -> Key {
        let mut key = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, &mut key);
        Key(Aes256Gcm::new_from_slice(&key).expect("32-byte key"))
    }

    /// The nonce is four zero bytes and the archive-global block index, big-endian.
    pub fn decrypt(&self, global_index: u64, stored: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&global_index.to_be_bytes());
        self.0
            .decrypt(Nonce::from_slice(&nonce), stored)
            .map_err(|_| "decryption failed (wrong password or damaged block)".to_string())
    }
}

/// Decodes a stored block (CRC already checked, already decrypted).
pub fn decompress(codec: Codec, dict: Option<&DDict<'static>>, data: &[u8], out: &mut [u8]) -> Result<(), String> {
    match codec {
        Codec::Lz4 => {
            // A 4-byte little-endian size prefix, then one raw LZ4 block.
            let body = data.get(4..).ok_or("LZ4 block shorter than its size prefix")?;
            let n = lz4_flex::block::decompress_into(body, out).map_err(|e| format!("LZ4 block is damaged: {e}"))?;
            if n != out.len() {
                return Err(format!("LZ4 block decompressed to {n} bytes, not {}", out.len()));
            }
            Ok(())
        }
        Codec::Zstd => with_dctx(ZSTD_MAX_WINDOW_LOG, |ctx| {
            let result = match dict {
                Some(d) => ctx.decompress_using_ddict(out, data, d),
                None => ctx.decompress(out, data),
            };
            match result {
                Ok(n) if n == out.len() => Ok(()),
                Ok(n) => Err(format!("zstd block decompressed to {n} bytes, not {}", out.len())),
                Err(c) => Err(format!("zstd block is damaged: {}", error_name(c))),
            }
        }),
    }
}

/// What `decompress_part` produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Part {
    /// The whole block, checked to be exactly `out.len()` bytes: cacheable.
    Whole,
    /// Only the first this many bytes (at least the `need` asked for) are
    /// decoded; the rest of `out` is not. Never to be cached.
    Prefix(usize),
}

/// Decodes at least the first `need` bytes of a stored block (CRC already
/// checked, already decrypted) into `out`, which is the block's full
/// length. Stops early where the codec allows it: LZ4 at the end of the
/// literals that reach `need`, zstd after the zstd block that reaches it.
/// Decodes whole (and says so) where stopping early saves nothing: a need
/// near the end of the block, a single-block zstd frame, or anything that
/// does not parse as expected (the whole decode then reports the damage).
pub fn decompress_part(
    codec: Codec,
    dict: Option<&DDict<'static>>,
    data: &[u8],
    out: &mut [u8],
    need: usize,
) -> Result<Part, String> {
    if need < out.len() {
        match codec {
            Codec::Lz4 => {
                if let Some(cut) = data.get(4..).and_then(|body| lz4_cut(body, need, out.len())) {
                    let n = lz4_flex::block::decompress_into(&data[4..4 + cut.input], &mut out[..cut.output])
                        .map_err(|e| format!("LZ4 block is damaged: {e}"))?;
                    if n != cut.output {
                        return Err(format!("LZ4 block prefix decompressed to {n} bytes, not {}", cut.output));
                    }
                    return Ok(Part::Prefix(n));
                }
            }
            Codec::Zstd => {
                if zstd_blocks_after_first(data) {
                    return zstd_prefix(dict, data, &mut out[..need]).map(Part::Prefix);
                }
            }
        }
    }
    decompress(codec, dict, data, out).map(|()| Part::Whole)
}

/// Where to cut an LZ4 block to decode only a prefix.
#[derive(Debug, PartialEq, Eq)]
struct Lz4Cut {
    /// Bytes of the block (after the size prefix) to give the decoder.
    input: usize,
    /// Bytes they decode to.
    output: usize,
}

/// Walks the sequences of a raw LZ4 block (token; literal length, extended
/// by bytes while they are 255; literals; then, unless the block ends, a
/// 2-byte offset and a match length of 4 + the token's low nibble, extended
/// the same way) to the end of the first literal run at which the output
/// reaches `need`. lz4_flex stops cleanly where the input ends right after
/// literals, as a block's last sequence does. `None`: the cut would not
/// save anything (it reaches the last quarter of the block), or the block
/// does not walk cleanly (then the whole decode reports it).
fn lz4_cut(body: &[u8], need: usize, len: usize) -> Option<Lz4Cut> {
    // Decoding the last quarter too costs little more than walking to it.
    let worth = len - len / 4;
    if need > worth {
        return None;
    }
    let mut i = 0usize;
    let mut out = 0usize;
    let ext = |i: &mut usize, mut n: usize| -> Option<usize> {
        loop {
            let b = *body.get(*i)?;
            *i += 1;
            n = n.checked_add(b as usize)?;
            if b != 255 {
                return Some(n);
            }
        }
    };
    loop {
        let token = *body.get(i)?;
        i += 1;
        let mut lit = (token >> 4) as usize;
        if lit == 15 {
            lit = ext(&mut i, lit)?;
        }
        i = i.checked_add(lit).filter(|&e| e <= body.len())?;
        out = out.checked_add(lit).filter(|&o| o <= len)?;
        if out >= need {
            return (out <= worth && i < body.len()).then_some(Lz4Cut { input: i, output: out });
        }
        if i >= body.len() {
            return None; // the block ends short of `need`: let the whole decode say so
        }
        let offset = u16::from_le_bytes([*body.get(i)?, *body.get(i + 1)?]) as usize;
        i += 2;
        if offset == 0 || offset > out {
            return None;
        }
        let mut m = 4 + (token & 15) as usize;
        if m == 19 {
            m = ext(&mut i, m)?;
        }
        out = out.checked_add(m).filter(|&o| o <= len)?;
    }
}

/// Whether a stored zstd block is one frame of several zstd blocks (a
/// 64 KiB chunk is one zstd block; stopping early saves only when it is
/// not). Also checks that the frame's window is small enough for the
/// streaming decoder's buffer (it allocates one window); frames that do not
/// parse are decoded whole.
fn zstd_blocks_after_first(data: &[u8]) -> bool {
    const MAX_STREAM_WINDOW: u64 = 8 << 20;
    let Some(&[m0, m1, m2, m3, fhd]) = data.get(..5).map(|s| <&[u8; 5]>::try_from(s).unwrap()) else {
        return false;
    };
    if u32::from_le_bytes([m0, m1, m2, m3]) != 0xFD2F_B528 {
        return false;
    }
    let single_segment = fhd & 0x20 != 0;
    let mut at = 5;
    if !single_segment {
        let Some(&wd) = data.get(at) else { return false };
        at += 1;
        let log = 10 + (wd >> 3) as u64;
        let base = 1u64 << log;
        if base + (base / 8) * (wd & 7) as u64 > MAX_STREAM_WINDOW {
            return false;
        }
    }
    at += [0, 1, 2, 4][(fhd & 3) as usize];
    let fcs = [if single_segment { 1 } else { 0 }, 2, 4, 8][(fhd >> 6) as usize];
    if single_segment {
        // The window is the content size.
        let Some(raw) = data.get(at..at + fcs) else { return false };
        let mut v = [0u8; 8];
        v[..fcs].copy_from_slice(raw);
        let size = u64::from_le_bytes(v) + if fcs == 2 { 256 } else { 0 };
        if size > MAX_STREAM_WINDOW {
            return false;
        }
    }
    at += fcs;
    let Some(h) = data.get(at..at + 3) else { return false };
    let last = h[0] & 1 != 0;
    !last
}

/// Stream-decodes a zstd frame until `out` is full.
fn zstd_prefix(dict: Option<&DDict<'static>>, data: &[u8], out: &mut [u8]) -> Result<usize, String> {
    with_dctx(ZSTD_MAX_WINDOW_LOG, |ctx| {
        if let Some(d) = dict {
            ctx.ref_ddict(d).map_err(error_name)?;
        }
        let mut input = zstd::zstd_safe::InBuffer::around(data);
        let mut output = zstd::zstd_safe::OutBuffer::around(out);
        loop {
            let before = (input.pos(), output.pos());
            let left = ctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|c| format!("zstd block is damaged: {}", error_name(c)))?;
            if output.pos() == output.capacity() {
                return Ok(output.pos());
            }
            if left == 0 || (input.pos(), output.pos()) == before {
                // The frame ended, or nothing moves: short of what was asked.
                return Err(format!("zstd block decompressed to fewer than {} bytes", output.capacity()));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        (0..len)
            .map(|i| {
                if (i / 3000) % 2 == 0 {
                    b"lorem ipsum dolor sit amet, "[i % 28]
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn lz4_prefixes_match_the_whole_block() {
        for len in [1, 100, 5000, 65536, 200_000] {
            let plain = sample(len);
            let stored = lz4_flex::block::compress_prepend_size(&plain);
            for need in (1..=len).step_by(len / 37 + 1).chain([len / 2, len - 1, len]) {
                let mut out = vec![0u8; len];
                match decompress_part(Codec::Lz4, None, &stored, &mut out, need).unwrap() {
                    Part::Whole => assert_eq!(out, plain),
                    Part::Prefix(n) => {
                        assert!(n >= need && n < len, "{n} for {need} of {len}");
                        assert_eq!(out[..n], plain[..n], "need {need} of {len}");
                    }
                }
            }
        }
    }

    #[test]
    fn zstd_prefixes_match_the_whole_block() {
        for len in [10, 65536, 300_000] {
            let plain = sample(len);
            let stored = zstd::stream::encode_all(&plain[..], 3).unwrap();
            let mut saw_prefix = false;
            for need in [1, len / 3, len / 2, len - 1, len] {
                let mut out = vec![0u8; len];
                match decompress_part(Codec::Zstd, None, &stored, &mut out, need).unwrap() {
                    Part::Whole => assert_eq!(out, plain),
                    Part::Prefix(n) => {
                        saw_prefix = true;
                        assert_eq!(n, need);
                        assert_eq!(out[..n], plain[..n]);
                    }
                }
            }
            assert_eq!(saw_prefix, len > 128 << 10, "multi-block frames only, {len}");
        }
    }

    #[test]
    fn damaged_blocks_are_errors_not_panics() {
        let plain = sample(70_000);
        let lz4 = lz4_flex::block::compress_prepend_size(&plain);
        let zst = zstd::stream::encode_all(&plain[..], 3).unwrap();
        let mut x = 1u64;
        for (codec, good) in [(Codec::Lz4, &lz4), (Codec::Zstd, &zst)] {
            for round in 0..2000 {
                let mut bad = good.clone();
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let at = (x >> 33) as usize % bad.len();
                bad[at] ^= 1 << (x % 8);
                if round % 3 == 0 {
                    bad.truncate((x >> 20) as usize % bad.len());
                }
                let mut out = vec![0u8; plain.len()];
                let need = (x >> 40) as usize % plain.len() + 1;
                let _ = decompress_part(codec, None, &bad, &mut out, need);
            }
        }
    }
}
