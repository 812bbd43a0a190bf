//! [`MemDev`]: an in-memory device with a volatile write cache and fault injection.
//!
//! Reads see every completed write. Only a `flush` makes writes durable: [`MemDev::crash`]
//! returns what a power cut could leave behind (the durable image plus any subset of the
//! unflushed writes, possibly torn at sector granularity). Faults are injected by a hook that
//! inspects every operation before it runs.

use super::{check_range, BlockDev, SECTOR_SIZE};
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;

/// The operation a fault hook is asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64 },
    Flush,
    Discard { offset: u64, len: u64 },
}

/// Returns `Some(error)` to make the operation fail without effect.
pub type FaultHook = Arc<dyn Fn(&Op) -> Option<io::Error> + Send + Sync>;

struct Inner {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Writes (offset, data) completed since the last flush, in completion order.
    unflushed: Vec<(u64, Vec<u8>)>,
    fault: Option<FaultHook>,
    /// A flush that the fault hook fails also loses every unflushed write (a device whose
    /// volatile cache died): reads then see the durable image.
    failed_flush_loses_cache: bool,
    flushes: u64,
    writes: u64,
}

pub struct MemDev {
    name: String,
    size: u64,
    inner: Mutex<Inner>,
}

impl MemDev {
    pub fn new(name: &str, size: u64) -> MemDev {
        Self::from_image(name, vec![0; size as usize])
    }

    /// A device whose current and durable contents are `image`.
    pub fn from_image(name: &str, image: Vec<u8>) -> MemDev {
        MemDev {
            name: name.to_string(),
            size: image.len() as u64,
            inner: Mutex::new(Inner {
                durable: image.clone(),
                current: image,
                unflushed: Vec::new(),
                fault: None,
                failed_flush_loses_cache: false,
                flushes: 0,
                writes: 0,
            }),
        }
    }

    pub fn set_fault(&self, hook: Option<FaultHook>) {
        self.inner.lock().fault = hook;
    }

    /// From now on a flush failed by the fault hook drops the unflushed writes, as a device
    /// whose cache died would ("flush fails and drops unflushed writes").
    pub fn set_failed_flush_loses_cache(&self, on: bool) {
        self.inner.lock().failed_flush_loses_cache = on;
    }

    /// What reads return now.
    pub fn snapshot(&self) -> Vec<u8> {
        self.inner.lock().current.clone()
    }

    /// The image after a crash that lost every unflushed write.
    pub fn durable(&self) -> Vec<u8> {
        self.inner.lock().durable.clone()
    }

    pub fn flush_count(&self) -> u64 {
        self.inner.lock().flushes
    }

    pub fn write_count(&self) -> u64 {
        self.inner.lock().writes
    }

    /// A crash image: the durable image plus the unflushed writes chosen by `keep(i)`, applied
    /// in completion order; `tear(i)` may cut write `i` to its first N sectors.
    pub fn crash(&self, keep: impl Fn(usize) -> bool, tear: impl Fn(usize, u64) -> u64) -> Vec<u8> {
        let inner = self.inner.lock();
        let mut img = inner.durable.clone();
        for (i, (off, data)) in inner.unflushed.iter().enumerate() {
            if !keep(i) {
                continue;
            }
            let sectors = (data.len() as u64).div_ceil(SECTOR_SIZE);
            let kept =
                (tear(i, sectors).min(sectors) * SECTOR_SIZE).min(data.len() as u64) as usize;
            img[*off as usize..*off as usize + kept].copy_from_slice(&data[..kept]);
        }
        img
    }

    fn fault(&self, inner: &Inner, op: Op) -> io::Result<()> {
        match inner.fault.as_ref().and_then(|f| f(&op)) {
            Some(e) => Err(io::Error::new(
                e.kind(),
                format!("{}: injected fault on {op:?}: {e}", self.name),
            )),
            None => Ok(()),
        }
    }
}

impl BlockDev for MemDev {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(&self.name, self.size, offset, buf.len() as u64)?;
        let inner = self.inner.lock();
        self.fault(
            &inner,
            Op::Read {
                offset,
                len: buf.len() as u64,
            },
        )?;
        buf.copy_from_slice(&inner.current[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(&self.name, self.size, offset, buf.len() as u64)?;
        let mut inner = self.inner.lock();
        self.fault(
            &inner,
            Op::Write {
                offset,
                len: buf.len() as u64,
            },
        )?;
        inner.current[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        inner.unflushed.push((offset, buf.to_vec()));
        inner.writes += 1;
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut inner = self.inner.lock();
        if let Err(e) = self.fault(&inner, Op::Flush) {
            if inner.failed_flush_loses_cache {
                inner.current = inner.durable.clone();
                inner.unflushed.clear();
            }
            return Err(e);
        }
        inner.durable = inner.current.clone();
        inner.unflushed.clear();
        inner.flushes += 1;
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(&self.name, self.size, offset, len)?;
        let mut inner = self.inner.lock();
        self.fault(&inner, Op::Discard { offset, len })?;
        let zeroes = vec![0u8; len as usize];
        inner.current[offset as usize..(offset + len) as usize].copy_from_slice(&zeroes);
        inner.unflushed.push((offset, zeroes));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_flushed_and_chosen_unflushed_writes() -> io::Result<()> {
        let d = MemDev::new("m", 4096);
        d.write_at(&[1; 512], 0)?;
        d.flush()?;
        d.write_at(&[2; 1024], 512)?;
        d.write_at(&[3; 512], 2048)?;
        let img = d.crash(|i| i == 0, |_, s| s);
        assert_eq!(&img[..512], &[1; 512]);
        assert_eq!(&img[512..1536], &[2; 1024]);
        assert_eq!(&img[2048..2560], &[0; 512], "write 1 was not kept");
        let torn = d.crash(|_| true, |_, _| 1);
        assert_eq!(&torn[512..1024], &[2; 512]);
        assert_eq!(&torn[1024..1536], &[0; 512], "second sector torn away");
        Ok(())
    }

    #[test]
    fn fault_hook_fails_without_effect() -> io::Result<()> {
        let d = MemDev::new("m", 4096);
        d.set_fault(Some(Arc::new(|op: &Op| {
            matches!(op, Op::Flush).then(|| io::Error::other("boom"))
        })));
        d.write_at(&[9; 512], 0)?;
        assert!(d.flush().is_err());
        assert_eq!(d.durable()[0], 0);
        Ok(())
    }
}
