//! Little-endian encoding helpers for the binary formats in `storage-format.md`.
//! Decoding is bounds-checked: a short or malformed buffer is an error, never a panic.

use roaring::RoaringBitmap;

/// Appends fixed-width little-endian values to a byte vector.
#[derive(Default)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A string as `u32` byte length then UTF-8 bytes.
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v.as_bytes());
        self
    }
    /// A bitmap as `u32` byte length then the portable Roaring serialization.
    pub fn bitmap(&mut self, b: &RoaringBitmap) -> &mut Self {
        self.u32(b.serialized_size() as u32);
        b.serialize_into(&mut self.buf)
            .expect("writing to a Vec cannot fail");
        self
    }
}

/// Reads what [`Enc`] wrote. Errors carry the offset within the buffer.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A decoding failure: what was expected, and where.
#[derive(Debug)]
pub struct DecodeError {
    pub offset: usize,
    pub reason: String,
}

pub type DecResult<T> = std::result::Result<T, DecodeError>;

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn err<T>(&self, reason: impl Into<String>) -> DecResult<T> {
        Err(DecodeError {
            offset: self.pos,
            reason: reason.into(),
        })
    }
    pub fn bytes(&mut self, n: usize) -> DecResult<&'a [u8]> {
        if self.remaining() < n {
            return self.err(format!(
                "needed {n} bytes, only {} remain",
                self.remaining()
            ));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    fn array<const N: usize>(&mut self) -> DecResult<[u8; N]> {
        let b = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }
    pub fn u8(&mut self) -> DecResult<u8> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u32(&mut self) -> DecResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> DecResult<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> DecResult<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub fn str(&mut self) -> DecResult<&'a str> {
        let n = self.u32()? as usize;
        let at = self.pos;
        let b = self.bytes(n)?;
        std::str::from_utf8(b).map_err(|_| DecodeError {
            offset: at,
            reason: "string is not valid UTF-8".into(),
        })
    }
    pub fn bitmap(&mut self) -> DecResult<RoaringBitmap> {
        let n = self.u32()? as usize;
        let at = self.pos;
        let b = self.bytes(n)?;
        RoaringBitmap::deserialize_from(b).map_err(|e| DecodeError {
            offset: at,
            reason: format!("invalid roaring bitmap: {e}"),
        })
    }
    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> DecResult<()> {
        if self.remaining() != 0 {
            return self.err(format!("{} unexpected trailing bytes", self.remaining()));
        }
        Ok(())
    }
}

/// Reads a little-endian u32 at `at` from a slice known to be long enough.
#[inline]
pub fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Reads a little-endian u64 at `at`.
#[inline]
pub fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// 64-bit FNV-1a, the stable hash of customer keys in dictionary sections.
#[inline]
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_short_reads() {
        let mut e = Enc::new();
        let bm: RoaringBitmap = [1u32, 5, 70000].into_iter().collect();
        e.u8(7).u32(9).u64(u64::MAX).i64(-3).str("标签").bitmap(&bm);
        let mut d = Dec::new(&e.buf);
        assert_eq!(d.u8().unwrap(), 7);
        assert_eq!(d.u32().unwrap(), 9);
        assert_eq!(d.u64().unwrap(), u64::MAX);
        assert_eq!(d.i64().unwrap(), -3);
        assert_eq!(d.str().unwrap(), "标签");
        assert_eq!(d.bitmap().unwrap(), bm);
        assert!(d.finish().is_ok());
        assert!(d.u8().is_err());
        let mut short = Dec::new(&e.buf[..3]);
        assert!(short.u32().is_err());
    }

    #[test]
    fn fnv_known_value() {
        // Published FNV-1a test vector.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
