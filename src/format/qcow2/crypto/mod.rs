//! Encrypted qcow2: legacy AES (`crypt_method` 1) and LUKS (2).
//!
//! Data clusters are encrypted per 512-byte sector; compressed clusters,
//! tables and headers never are (research note qcow2-crypto.md §1). LUKS
//! numbers sectors by their offset in the file that holds them (the image or
//! its external data file), legacy AES by the guest offset.

mod luks;
mod sector;

use std::io::IsTerminal;
use std::path::Path;

use serde_json::json;
use tracing::info;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::format::PasswordSource as Password;
use crate::io::Source;

use sector::{Cipher, IvGen, Mode, SectorCipher};

pub use luks::HEADER_LEN as LUKS_HEADER_LEN;
pub use sector::SECTOR;

/// An image's encryption: what `info.json` says, and the key once unlocked.
pub struct Crypto {
    pub description: serde_json::Value,
    /// `None` when opened only to describe it (`snapmount info`).
    decryptor: Option<SectorCipher>,
    /// LUKS: IVs from the host sector; legacy AES: from the guest sector.
    by_host: bool,
}

impl Crypto {
    /// Reads what the image needs to be decrypted and, unless
    /// `describe_only`, asks `password` and unlocks it. `fde` is the LUKS
    /// area (offset, length) from the header extension.
    pub fn open(
        file: &Source,
        method: u32,
        fde: Option<(u64, u64)>,
        password: Password,
        describe_only: bool,
    ) -> Result<Crypto> {
        let path = file.path();
        match method {
            1 => {
                let description = json!({"format": "aes", "cipher": "aes-128", "mode": "cbc", "ivgen": "plain64", "password_checked": false});
                let decryptor = match describe_only {
                    true => None,
                    false => Some(legacy_aes(&ask(path, password)?)),
                };
                Ok(Crypto { description, decryptor, by_host: false })
            }
            2 => {
                let (offset, len) =
                    fde.ok_or_else(|| Error::open(path, "LUKS encryption without its header extension"))?;
                let bad = |msg: String| Error::open(path, msg);
                if offset.checked_add(len).is_none_or(|end| end > file.len()) || (len as usize) < LUKS_HEADER_LEN {
                    return Err(bad(format!("LUKS header area ({len} bytes at {offset:#x}) is out of the file")));
                }
                let mut raw = vec![0u8; LUKS_HEADER_LEN];
                file.read_at(&mut raw, offset)?;
                let header = luks::LuksHeader::parse(&raw, len).map_err(&bad)?;
                let described = header.describe();
                let description = serde_json::to_value(&described).expect("plain data");
                if describe_only {
                    return Ok(Crypto { description, decryptor: None, by_host: true });
                }
                header.essiv_ok().map_err(&bad)?;
                let password = ask(path, password)?;
                let terminal = std::io::stderr().is_terminal();
                let progress = |slot: usize, iterations: u32| {
                    let what = format!(
                        "{}: unlocking (LUKS key slot {slot}, {iterations} PBKDF2-{} iterations)",
                        path.display(),
                        described.hash
                    );
                    if terminal {
                        eprintln!("{what}");
                    } else {
                        info!("{what}");
                    }
                };
                let material = |at: u64, n: usize| {
                    if at.checked_add(n as u64).is_none_or(|end| end > len) {
                        return Err("LUKS key material out of the header area".to_string());
                    }
                    let mut m = vec![0u8; n];
                    file.read_at(&mut m, offset + at).map_err(|e| e.to_string())?;
                    Ok(m)
                };
                match header.unlock(password.as_bytes(), material, progress).map_err(&bad)? {
                    Some((decryptor, _slot)) => Ok(Crypto { description, decryptor: Some(decryptor), by_host: true }),
                    None => Err(bad("wrong password: it opens none of the image's LUKS key slots".into())),
                }
            }
            m => Err(Error::open(path, format!("unknown encryption method {m}"))),
        }
    }

    /// Decrypts `buf`, whole sectors read from `host` in the data's file,
    /// which hold guest bytes from `guest` on.
    pub fn decrypt(&self, path: &Path, buf: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let Some(d) = &self.decryptor else {
            return Err(Error::corrupt(path, guest, "the image is encrypted and was opened without its password"));
        };
        let first = (if self.by_host { host } else { guest }) / SECTOR as u64;
        d.decrypt_sectors(buf, first);
        Ok(())
    }
}

fn ask(path: &Path, password: Password) -> Result<Zeroizing<String>> {
    password(path).map(Zeroizing::new).map_err(|e| Error::open(path, format!("encrypted image: {e}")))
}

/// Legacy AES: AES-128-CBC, the key the password's first 16 bytes padded
/// with zeros, the IV the guest sector number (plain64). Nothing in the
/// image tells a wrong password from a right one.
fn legacy_aes(password: &str) -> SectorCipher {
    let mut key = Zeroizing::new([0u8; 16]);
    let n = password.len().min(16);
    key[..n].copy_from_slice(&password.as_bytes()[..n]);
    SectorCipher::new(Cipher::new("aes", &key[..]).expect("16-byte AES key"), None, Mode::Cbc, IvGen::Plain64)
}
