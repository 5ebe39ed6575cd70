//! The LUKS1 header QEMU keeps inside an encrypted qcow2 image (pointed at
//! by the full-disk-encryption header extension), its checks, and the
//! unlocking of its key slots: PBKDF2, the anti-forensic merge and the
//! master-key digest (research note qcow2-crypto.md §3).

use serde::Serialize;
use zeroize::Zeroizing;

use crate::bytes::{be16, be32};

use super::sector::{Cipher, IvGen, Mode, SectorCipher, SECTOR};

const MAGIC: [u8; 6] = [b'L', b'U', b'K', b'S', 0xBA, 0xBE];
pub const HEADER_LEN: usize = 592;
const SLOTS: usize = 8;
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
const DIGEST_LEN: usize = 20;
/// PBKDF2 iterations accepted per slot or digest: QEMU calibrates about two
/// seconds' worth (8 million SHA-256 rounds on a fast core); a hostile header
/// must not make the mount spin for hours.
#[cfg(not(fuzzing))]
pub const MAX_ITERATIONS: u32 = 1 << 27;
/// Fuzzing: key derivations within the one-second budget per input.
#[cfg(fuzzing)]
pub const MAX_ITERATIONS: u32 = 1 << 14;
/// Key material of one slot: QEMU writes key_bytes × 4000 stripes (256 KiB
/// for a 64-byte key); anything far beyond is refused before allocation.
const MAX_MATERIAL: u64 = 16 << 20;

/// A hash QEMU's LUKS accepts, for PBKDF2, the AF merge and ESSIV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
    Ripemd160,
    Sm3,
}

macro_rules! with_digest {
    ($hash:expr, $D:ident => $body:expr) => {
        match $hash {
            Hash::Md5 => {
                type $D = md5::Md5;
                $body
            }
            Hash::Sha1 => {
                type $D = sha1::Sha1;
                $body
            }
            Hash::Sha224 => {
                type $D = sha2::Sha224;
                $body
            }
            Hash::Sha256 => {
                type $D = sha2::Sha256;
                $body
            }
            Hash::Sha384 => {
                type $D = sha2::Sha384;
                $body
            }
            Hash::Sha512 => {
                type $D = sha2::Sha512;
                $body
            }
            Hash::Ripemd160 => {
                type $D = ripemd::Ripemd160;
                $body
            }
            Hash::Sm3 => {
                type $D = sm3::Sm3;
                $body
            }
        }
    };
}

impl Hash {
    pub fn parse(name: &str) -> Option<Hash> {
        Some(match name {
            "md5" => Hash::Md5,
            "sha1" => Hash::Sha1,
            "sha224" => Hash::Sha224,
            "sha256" => Hash::Sha256,
            "sha384" => Hash::Sha384,
            "sha512" => Hash::Sha512,
            "ripemd160" => Hash::Ripemd160,
            "sm3" => Hash::Sm3,
            _ => return None,
        })
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        with_digest!(self, D => D::digest(data).to_vec())
    }

    fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        with_digest!(self, D => pbkdf2::pbkdf2_hmac::<D>(password, salt, rounds, out))
    }

    /// One AF diffusion: each digest-sized piece `p_j` (the last may be
    /// short) becomes `H(BE32(j) || p_j)`, cut to its length.
    fn diffuse(self, buf: &mut [u8]) {
        use sha2::Digest;
        with_digest!(self, D => {
            let size = <D as Digest>::output_size();
            for (j, piece) in buf.chunks_mut(size).enumerate() {
                let mut h = D::new();
                h.update((j as u32).to_be_bytes());
                h.update(&*piece);
                let out = h.finalize();
                let n = piece.len();
                piece.copy_from_slice(&out[..n]);
            }
        })
    }
}

/// The anti-forensic merge: XOR each stripe into the running value and
/// diffuse it, for all but the last stripe; the key is that XOR the last.
fn af_merge(material: &[u8], key_bytes: usize, stripes: usize, hash: Hash) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_bytes]);
    for stripe in material.chunks_exact(key_bytes).take(stripes - 1) {
        d.iter_mut().zip(stripe).for_each(|(a, b)| *a ^= b);
        hash.diffuse(&mut d);
    }
    let last = &material[(stripes - 1) * key_bytes..stripes * key_bytes];
    d.iter_mut().zip(last).for_each(|(a, b)| *a ^= b);
    d
}

#[derive(Clone, Debug)]
pub struct Slot {
    pub active: bool,
    pub iterations: u32,
    salt: [u8; 32],
    /// Sectors from the start of the LUKS header.
    key_offset: u32,
    stripes: u32,
}

/// What `info.json` says about a LUKS image (never key material).
#[derive(Clone, Debug, Serialize)]
pub struct Description {
    pub format: &'static str,
    pub cipher: String,
    pub mode: String,
    pub ivgen: String,
    pub ivgen_hash: Option<String>,
    pub hash: String,
    pub key_bytes: u32,
    pub key_slots_active: Vec<usize>,
    pub iterations: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct LuksHeader {
    cipher: String,
    mode: Mode,
    ivgen: String,
    ivgen_hash: Option<Hash>,
    hash: Hash,
    key_bytes: u32,
    mk_digest: [u8; DIGEST_LEN],
    mk_salt: [u8; 32],
    mk_iterations: u32,
    pub slots: Vec<Slot>,
    spec: (String, String, String),
}

fn c_string(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]).into_owned()
}

impl LuksHeader {
    /// Parses and checks the header as QEMU does (`qcrypto_block_luks_
    /// check_header` and the cipher lookup): `area_len` is the length the
    /// qcow2 extension gives the whole LUKS area. Settings snapmount cannot
    /// decrypt are refused here, by name.
    pub fn parse(b: &[u8], area_len: u64) -> Result<LuksHeader, String> {
        if b.len() < HEADER_LEN || b[0..6] != MAGIC {
            return Err("LUKS header: bad magic".into());
        }
        match be16(b, 6) {
            1 => {}
            2 => return Err("LUKS version 2 is not supported (QEMU does not support it inside qcow2 either)".into()),
            v => return Err(format!("LUKS header: unknown version {v}")),
        }
        let (cipher, mode_spec, hash_spec) = (c_string(&b[8..40]), c_string(&b[40..72]), c_string(&b[72..104]));
        let payload_offset = be32(b, 104) as u64;
        let key_bytes = be32(b, 108);
        let hash = Hash::parse(&hash_spec).ok_or(format!("LUKS hash '{hash_spec}' is not supported"))?;
        let (mode_name, iv_spec) =
            mode_spec.split_once('-').ok_or(format!("LUKS cipher mode '{mode_spec}' has no IV generator"))?;
        let mode = match mode_name {
            "xts" => Mode::Xts,
            "cbc" => Mode::Cbc,
            "ecb" => Mode::Ecb,
            "ctr" => Mode::Ctr,
            m => return Err(format!("LUKS cipher mode '{m}' is not supported")),
        };
        let (ivgen, ivgen_hash) = match iv_spec.split_once(':') {
            Some((g, h)) => (g.to_string(), Some(Hash::parse(h).ok_or(format!("ESSIV hash '{h}' is not supported"))?)),
            None => (iv_spec.to_string(), None),
        };
        match (ivgen.as_str(), ivgen_hash) {
            ("plain" | "plain64", _) => {}
            ("essiv", Some(_)) => {}
            ("essiv", None) => return Err("LUKS IV generator essiv needs a hash".into()),
            (g, _) => return Err(format!("LUKS IV generator '{g}' is not supported")),
        }
        // The key length must fit the cipher (XTS: two keys).
        let half = if mode == Mode::Xts { key_bytes / 2 } else { key_bytes };
        let probe = vec![0u8; half as usize];
        if key_bytes == 0 || key_bytes > 64 || Cipher::new(&cipher, &probe).is_none() {
            return Err(format!("LUKS cipher {cipher}-{mode_spec} with a {}-bit key is not supported", key_bytes * 8));
        }
        if mode == Mode::Xts
            && (!key_bytes.is_multiple_of(2) || Cipher::new(&cipher, &probe).unwrap().block_size() != 16)
        {
            return Err(format!("LUKS cipher {cipher}-{mode_spec}: XTS needs a 128-bit block cipher and two keys"));
        }
        if payload_offset.saturating_mul(SECTOR as u64) > area_len {
            return Err("LUKS header: payload offset past the encryption header area".into());
        }
        let mk_iterations = be32(b, 164);
        if mk_iterations == 0 || mk_iterations > MAX_ITERATIONS {
            return Err(format!("LUKS header: {mk_iterations} master key digest iterations"));
        }
        let mut slots = Vec::with_capacity(SLOTS);
        for i in 0..SLOTS {
            let at = 208 + 48 * i;
            let active = match be32(b, at) {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                x => return Err(format!("LUKS key slot {i}: bad state {x:#x}")),
            };
            let slot = Slot {
                active,
                iterations: be32(b, at + 4),
                salt: b[at + 8..at + 40].try_into().unwrap(),
                key_offset: be32(b, at + 40),
                stripes: be32(b, at + 44),
            };
            if slot.stripes == 0 {
                return Err(format!("LUKS key slot {i}: no stripes"));
            }
            let material = key_bytes as u64 * slot.stripes as u64;
            let end = slot.key_offset as u64 + material.div_ceil(SECTOR as u64).div_ceil(8) * 8;
            if material > MAX_MATERIAL || end > payload_offset {
                return Err(format!("LUKS key slot {i}: key material out of the header area"));
            }
            if active && (slot.iterations == 0 || slot.iterations > MAX_ITERATIONS) {
                return Err(format!("LUKS key slot {i}: {} iterations", slot.iterations));
            }
            slots.push(slot);
        }
        Ok(LuksHeader {
            cipher,
            mode,
            ivgen,
            ivgen_hash,
            hash,
            key_bytes,
            mk_digest: b[112..132].try_into().unwrap(),
            mk_salt: b[132..164].try_into().unwrap(),
            mk_iterations,
            slots,
            spec: (c_string(&b[8..40]), mode_spec, hash_spec),
        })
    }

    pub fn describe(&self) -> Description {
        let (cipher, mode, hash) = self.spec.clone();
        let active: Vec<usize> = (0..SLOTS).filter(|&i| self.slots[i].active).collect();
        Description {
            format: "luks",
            cipher: format!(
                "{cipher}-{}",
                if self.mode == Mode::Xts { self.key_bytes * 4 } else { self.key_bytes * 8 }
            ),
            mode: mode.split('-').next().unwrap_or("").to_string(),
            ivgen: self.ivgen.clone(),
            ivgen_hash: self.ivgen_hash.map(|h| format!("{h:?}").to_lowercase()),
            hash,
            key_bytes: self.key_bytes,
            iterations: active.iter().map(|&i| self.slots[i].iterations).collect(),
            key_slots_active: active,
        }
    }

    /// The sector cipher for master key `mk`.
    fn sector_cipher(&self, mk: &[u8]) -> SectorCipher {
        let (key, tweak) = match self.mode {
            Mode::Xts => {
                let (a, b) = mk.split_at(mk.len() / 2);
                (a, Some(Cipher::new(&self.cipher, b).expect("checked at parse")))
            }
            _ => (mk, None),
        };
        let cipher = Cipher::new(&self.cipher, key).expect("checked at parse");
        let ivgen = match (self.ivgen.as_str(), self.ivgen_hash) {
            ("plain", _) => IvGen::Plain,
            ("essiv", Some(h)) => {
                let salt = Zeroizing::new(h.digest(mk));
                // The ESSIV cipher is the payload's algorithm keyed by the
                // digest (QEMU: sha256 gives AES-256).
                IvGen::Essiv(Box::new(Cipher::new(&self.cipher, &salt).expect("checked by essiv_ok")))
            }
            _ => IvGen::Plain64,
        };
        SectorCipher::new(cipher, tweak, self.mode, ivgen)
    }

    /// Whether the ESSIV hash gives a key the cipher takes (QEMU refuses the
    /// others: "No AES cipher with key size 20 available").
    pub fn essiv_ok(&self) -> Result<(), String> {
        if let Some(h) = self.ivgen_hash.filter(|_| self.ivgen == "essiv") {
            let len = h.digest(b"").len();
            if Cipher::new(&self.cipher, &vec![0u8; len]).is_none() {
                return Err(format!("ESSIV with a {}-bit hash has no {} cipher", len * 8, self.cipher));
            }
        }
        Ok(())
    }

    /// Tries every active slot in order with `password`; `material(slot)`
    /// reads that slot's encrypted key material. The unlocked sector cipher,
    /// with the slot that opened it.
    pub fn unlock(
        &self,
        password: &[u8],
        mut material: impl FnMut(u64, usize) -> Result<Vec<u8>, String>,
        mut progress: impl FnMut(usize, u32),
    ) -> Result<Option<(SectorCipher, usize)>, String> {
        self.essiv_ok()?;
        let kb = self.key_bytes as usize;
        for (i, slot) in self.slots.iter().enumerate().filter(|(_, s)| s.active) {
            progress(i, slot.iterations);
            let mut slot_key = Zeroizing::new(vec![0u8; kb]);
            self.hash.pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
            let len = kb * slot.stripes as usize;
            let mut m =
                Zeroizing::new(material(slot.key_offset as u64 * SECTOR as u64, len.div_ceil(SECTOR) * SECTOR)?);
            // The material is encrypted like the payload, with the slot key,
            // sectors numbered from 0.
            self.sector_cipher(&slot_key).decrypt_sectors(&mut m, 0);
            let mk = af_merge(&m[..len], kb, slot.stripes as usize, self.hash);
            let mut digest = [0u8; DIGEST_LEN];
            self.hash.pbkdf2(&mk, &self.mk_salt, self.mk_iterations, &mut digest);
            if digest == self.mk_digest {
                return Ok(Some((self.sector_cipher(&mk), i)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The merge undoes LUKS's split (stripes 0..n-1 random, the last one
    /// the running diffusion XOR the key), for each hash and for key sizes
    /// that are and are not multiples of the digest size. Real images from
    /// qemu-img are the end-to-end check (tests/crypto.rs).
    #[test]
    fn af_merge_undoes_the_split() {
        for hash in [Hash::Sha1, Hash::Sha256, Hash::Sha512, Hash::Md5, Hash::Ripemd160, Hash::Sm3] {
            for (kb, stripes) in [(16usize, 4000usize), (32, 5), (64, 3), (24, 1)] {
                let key: Vec<u8> = (0..kb).map(|i| (i * 7 + 3) as u8).collect();
                let mut material: Vec<u8> = (0..kb * stripes).map(|i| (i * 31 % 251) as u8).collect();
                let mut d = vec![0u8; kb];
                for s in 0..stripes - 1 {
                    d.iter_mut().zip(&material[s * kb..(s + 1) * kb]).for_each(|(a, b)| *a ^= b);
                    hash.diffuse(&mut d);
                }
                let last = &mut material[(stripes - 1) * kb..];
                last.iter_mut().zip(d.iter().zip(&key)).for_each(|(l, (d, k))| *l = d ^ k);
                assert_eq!(&af_merge(&material, kb, stripes, hash)[..], &key[..], "{hash:?} {kb}x{stripes}");
            }
        }
    }
}
