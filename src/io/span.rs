//! [`SpanDev`]: several devices mapped at byte offsets of one address space and seen as one
//! device, like dm-linear slices of one device.
//!
//! Invariant: every byte of an I/O goes to the one member that covers it, at its offset in
//! that member; an I/O touching a byte no member covers fails as a whole, before any member
//! is written. A flush flushes every member.

use super::BlockDev;
use std::io;
use std::sync::Arc;

/// A piece of a [`SpanDev`] I/O: (member, offset in the member, position in the I/O, length).
type Piece<'a> = (&'a dyn BlockDev, u64, u64, u64);

/// Several devices at byte offsets of one address space, seen as one device (the replay target
/// of a log that recorded several devices in one address space). I/O that touches bytes no
/// member covers fails.
pub struct SpanDev {
    name: String,
    parts: Vec<(u64, Arc<dyn BlockDev>)>,
    size: u64,
}

impl SpanDev {
    pub fn new(parts: Vec<(u64, Arc<dyn BlockDev>)>) -> SpanDev {
        let name = parts
            .iter()
            .map(|(b, d)| format!("{}@{b}", d.name()))
            .collect::<Vec<_>>()
            .join("+");
        let size = parts.iter().map(|(b, d)| b + d.size()).max().unwrap_or(0);
        SpanDev { name, parts, size }
    }

    /// Splits `[offset, offset+len)` into (member, member offset, position in the range,
    /// length) pieces, failing if a byte is not covered.
    fn split(&self, offset: u64, len: u64) -> io::Result<Vec<Piece<'_>>> {
        let mut pieces = Vec::new();
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end {
            let part = self
                .parts
                .iter()
                .find(|(b, d)| *b <= at && at < b + d.size());
            let Some((base, dev)) = part else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{}: byte {at} (of I/O at {offset}, length {len}) is outside every member device",
                        self.name
                    ),
                ));
            };
            let n = (base + dev.size()).min(end) - at;
            pieces.push((dev.as_ref(), at - base, at - offset, n));
            at += n;
        }
        Ok(pieces)
    }
}

impl BlockDev for SpanDev {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for (dev, off, pos, n) in self.split(offset, buf.len() as u64)? {
            dev.read_at(&mut buf[pos as usize..(pos + n) as usize], off)?;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        for (dev, off, pos, n) in self.split(offset, buf.len() as u64)? {
            dev.write_at(&buf[pos as usize..(pos + n) as usize], off)?;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        for (_, d) in &self.parts {
            d.flush()?;
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        for (dev, off, _, n) in self.split(offset, len)? {
            dev.discard(off, n)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemDev;

    #[test]
    fn members_are_addressed_at_their_offsets_and_gaps_are_refused() -> io::Result<()> {
        let a: Arc<dyn BlockDev> = Arc::new(MemDev::new("a", 1024));
        let b: Arc<dyn BlockDev> = Arc::new(MemDev::new("b", 1024));
        let span = SpanDev::new(vec![(0, a), (2048, b)]);
        assert_eq!(span.size(), 3072);
        span.write_at(&[7; 512], 2048)?;
        let err = span.write_at(&[7; 1024], 512).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("byte 1024") && e.contains("outside")));
        Ok(())
    }
}
