//! WRITE_ZEROES and DISCARD: whole regions are hydrated without a copy (zeroed, or marked
//! hydrated), partially covered regions at the edges go through the write path.
//!
//! Invariant: the same as for writes (see `readwrite`): the regions are locked with
//! [`RegionLocks::lock_unhydrated`](super::regions::RegionLocks), a bounded number at a time, and
//! their bits are set before the locks are released.

use super::error::IoError;
use super::path::DataPath;
use super::{Engine, Mode};

/// Most region locks one WRITE_ZEROES holds at a time (a DISCARD holds one).
const LOCK_CHUNK_REGIONS: u64 = 1024;

impl Engine {
    //--------------------------------------------------------------------------------------
    // Write zeroes

    /// WRITE_ZEROES: afterwards the range reads back as zeroes. Whole regions are zeroed on
    /// the destination without a copy (a hole or an allocated zero range, as the destination
    /// allows; `unmap` permits the hole) and then marked hydrated, like a write that covers
    /// them; partially covered regions at the edges go through the write path.
    pub async fn write_zeroes<P: DataPath>(
        &self,
        p: &P,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), IoError> {
        self.validate(offset, len)?;
        self.committer.await_settled_map().await;
        match self.committer.mode() {
            Mode::Fail => return Err(IoError::eio("device is in fail mode")),
            Mode::ReadOnly if fua => {
                return Err(IoError::eio(
                    "device is read-only after a failure; FUA refused",
                ))
            }
            _ => {}
        }
        if len == 0 {
            return Ok(());
        }
        let (edges, rs, re) = self.split_edges(offset, len);
        for (a, b) in edges {
            if self.all_hydrated(a, b) {
                p.zero_dest(a, b - a, unmap)
                    .await
                    .map_err(|e| IoError::eio(e.to_string()))?;
            } else {
                self.zero_edge(p, a, b).await?;
            }
        }
        // Whole regions, a bounded number of region locks at a time, in ascending order.
        let mut r = rs;
        while r < re {
            let chunk_end = re.min(r + LOCK_CHUNK_REGIONS);
            let guards = self
                .locks
                .lock_unhydrated(r..chunk_end, |x| self.map.is_hydrated(x))
                .await;
            if !guards.is_empty() && self.committer.mode() != Mode::ReadWrite {
                return Err(IoError::eio(
                    "device is read-only after a failure; cannot hydrate for this write",
                ));
            }
            let (a, l) = self.geo.regions_span(r, chunk_end - r);
            p.zero_dest(a, l, unmap)
                .await
                .map_err(|e| IoError::eio(e.to_string()))?;
            // The zeroes of every locked region are now on the destination.
            self.set_written(&guards)?;
            drop(guards);
            r = chunk_end;
        }
        // A worker waiting for these regions' locks (or for anything left to copy) looks again.
        self.hydrator.progress.notify();
        self.map.check_fully_hydrated();
        if fua {
            self.committer.flush(p).await?;
        }
        Ok(())
    }

    /// Writes zeroes over the partially covered edge `[a, b)` through the copy path, a piece
    /// of the shared aligned ZEROES at a time (no buffer of the edge's size: with large
    /// regions an edge can be nearly a whole region). Aligned matters: if the region is
    /// hydrated meanwhile, the buffer goes to the destination as it is, and O_DIRECT refuses
    /// unaligned buffers (EINVAL).
    async fn zero_edge<P: DataPath>(&self, p: &P, a: u64, b: u64) -> Result<(), IoError> {
        let zeroes = crate::io::ZEROES.as_slice();
        let mut pos = a;
        while pos < b {
            let n = (b - pos).min(zeroes.len() as u64);
            self.write_inner(p, pos, &zeroes[..n as usize]).await?;
            pos += n;
        }
        Ok(())
    }

    /// Whether every region touched by `[a, b)` is hydrated. (An edge range may span the end
    /// of one region and the start of the next.)
    fn all_hydrated(&self, a: u64, b: u64) -> bool {
        (self.geo.region_of(a)..=self.geo.region_of(b - 1)).all(|r| self.map.is_hydrated(r))
    }

    /// Splits `[offset, offset+len)` into partially covered edge ranges and the whole
    /// regions `[rs, re)` between them (empty when `rs >= re`).
    fn split_edges(&self, offset: u64, len: u64) -> (Vec<(u64, u64)>, u64, u64) {
        let end = offset + len;
        let rs = offset.div_ceil(self.geo.region_size);
        let re = if end == self.geo.size {
            self.geo.nr_regions
        } else {
            end >> self.geo.region_shift
        };
        let full_start = self.geo.region_start(rs).min(end);
        let full_end = if re > rs {
            self.geo.region_end(re - 1)
        } else {
            full_start
        };
        let mut edges = Vec::new();
        if rs >= re {
            edges.push((offset, end));
        } else {
            if offset < full_start {
                edges.push((offset, full_start));
            }
            if full_end < end {
                edges.push((full_end, end));
            }
        }
        (edges, rs, re)
    }

    //--------------------------------------------------------------------------------------
    // Discards

    /// Discard: whole covered regions that are not hydrated are marked hydrated without a
    /// copy; the range is passed down to the destination unless disabled. Partially covered
    /// unhydrated regions at the edges get zeroes written (through the copy path), so that no
    /// part of a discarded range reads back stale source data.
    pub async fn discard<P: DataPath>(&self, p: &P, offset: u64, len: u64) -> Result<(), IoError> {
        self.validate(offset, len)?;
        self.committer.await_settled_map().await;
        match self.committer.mode() {
            Mode::Fail => return Err(IoError::eio("device is in fail mode")),
            Mode::ReadOnly => return Ok(()),
            Mode::ReadWrite => {}
        }
        if len == 0 {
            return Ok(());
        }
        let (edges, rs, re) = self.split_edges(offset, len);
        for (a, b) in edges {
            if !self.all_hydrated(a, b) {
                self.zero_edge(p, a, b).await?;
            } else if self.config.discard_passdown {
                p.discard_dest(a, b - a)
                    .await
                    .map_err(|e| IoError::eio(e.to_string()))?;
            }
        }
        if rs >= re {
            return Ok(());
        }
        // Whole regions are marked hydrated without a copy, one region lock at a time (a
        // discard never makes a user write wait for a lock it holds for a later region).
        for r in rs..re {
            let guards = self
                .locks
                .lock_unhydrated(r..r + 1, |x| self.map.is_hydrated(x))
                .await;
            for g in &guards {
                self.map
                    .md()
                    .set_hydrated(g.region())
                    .map_err(|e| self.bit_not_recorded(g.region(), e))?;
            }
        }
        self.hydrator.progress.notify();
        self.map.check_fully_hydrated();
        if self.config.discard_passdown {
            let (full_start, full_len) = self.geo.regions_span(rs, re - rs);
            p.discard_dest(full_start, full_len)
                .await
                .map_err(|e| IoError::eio(e.to_string()))?;
        }
        Ok(())
    }
}
