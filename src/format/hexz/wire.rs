//! A strict reader of bincode 1.3 (legacy, fixint, little-endian) values, as
//! hexz 0.8.2 writes them: bools must be 0 or 1, Option tags 0 or 1, and no
//! length may reach past the bytes at hand (research note hexz.md §2).

pub struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

pub type WireResult<T> = Result<T, String>;

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }

    pub fn take(&mut self, n: usize, what: &str) -> WireResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("{what} runs past the end of its section"))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub fn u8(&mut self, what: &str) -> WireResult<u8> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u32(&mut self, what: &str) -> WireResult<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    pub fn u64(&mut self, what: &str) -> WireResult<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    pub fn bool(&mut self, what: &str) -> WireResult<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("{what}: invalid bool byte {b}")),
        }
    }

    /// An `Option<T>` tag: `Ok(true)` for Some.
    pub fn option(&mut self, what: &str) -> WireResult<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            t => Err(format!("{what}: invalid option tag {t}")),
        }
    }

    pub fn opt_u64(&mut self, what: &str) -> WireResult<Option<u64>> {
        Ok(if self.option(what)? { Some(self.u64(what)?) } else { None })
    }

    pub fn opt_u32(&mut self, what: &str) -> WireResult<Option<u32>> {
        Ok(if self.option(what)? { Some(self.u32(what)?) } else { None })
    }

    pub fn string(&mut self, what: &str) -> WireResult<String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| format!("{what}: length {len} out of range"))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }
}
