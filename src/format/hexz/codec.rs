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
