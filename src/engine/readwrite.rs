//! User reads and writes: where each goes, and the copy-on-write hydration of a write to
//! regions that are not hydrated.
//!
//! Invariant (kept by [`RegionLocks::lock_unhydrated`](super::regions::RegionLocks)): a write
//! to a region that is not hydrated holds the region's lock from before it checks the bit until
//! after the bit is set, so a background copy can never land over it; a region's bit is set
//! only after the destination write that completed its data has finished.

use super::error::IoError;
use super::path::{DataPath, Side};
use super::regions::RegionGuard;
use super::userdata::{ReadData, WriteData};
use super::{budget, Engine, Mode};
use crate::metadata::MetadataError;
use std::sync::atomic::Ordering;

impl Engine {
    /// The one backend I/O that serves a plain read or write completely, when the engine
    /// has nothing else to do for it: the device is read-write, it is not FUA, and every
    /// region it touches is hydrated, so it goes to the destination as it is. `None` sends it
    /// through [`Engine::read`] / [`Engine::write`]. The frontend uses this to serve the
    /// common case without the async machinery; what it does must equal what those would do.
    pub fn direct_route(&self, offset: u64, len: u64, fua: bool) -> Option<Side> {
        if len == 0 || fua || self.validate(offset, len).is_err() {
            return None;
        }
        if self.committer.mode() != Mode::ReadWrite {
            return None;
        }
        if self.map.is_fully_hydrated() {
            return Some(Side::Dest);
        }
        let (first, last) = (
            self.geo.region_of(offset),
            self.geo.region_of(offset + len - 1),
        );
        (first..=last)
            .all(|r| self.map.md().is_hydrated(r))
            .then_some(Side::Dest)
    }

    //--------------------------------------------------------------------------------------
    // Reads

    pub async fn read<P: DataPath>(
        &self,
        p: &P,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), IoError> {
        self.read_into(p, offset, buf).await
    }

    /// [`Engine::read`] into `buf` wherever its bytes live.
    pub async fn read_into<P: DataPath, B: ReadData + ?Sized>(
        &self,
        p: &P,
        offset: u64,
        buf: &mut B,
    ) -> Result<(), IoError> {
        let len = buf.len();
        self.validate(offset, len as u64)?;
        self.committer.await_settled_map().await;
        if self.committer.mode() == Mode::Fail {
            return Err(IoError::eio("device is in fail mode"));
        }
        if self.map.is_fully_hydrated() {
            return buf
                .read_from(p, Side::Dest, offset, 0, len)
                .await
                .map_err(|e| IoError::eio(e.to_string()));
        }
        let end = offset + len as u64;
        let mut pos = offset;
        while pos < end {
            let r = self.geo.region_of(pos);
            let hydrated = self.map.is_hydrated(r);
            if !hydrated && self.hydrator.is_failed(r) {
                return Err(IoError::eio(format!(
                    "region {r} could not be hydrated: source read errors"
                )));
            }
            // Extend the run over regions in the same state.
            let mut run_end = self.geo.region_end(r).min(end);
            while run_end < end {
                let next = self.geo.region_of(run_end);
                if self.map.is_hydrated(next) != hydrated
                    || (!hydrated && self.hydrator.is_failed(next))
                {
                    break;
                }
                run_end = self.geo.region_end(next).min(end);
            }
            let (at, n) = ((pos - offset) as usize, (run_end - pos) as usize);
            let read = if hydrated {
                buf.read_from(p, Side::Dest, pos, at, n).await
            } else {
                let r = buf.read_from(p, Side::Source, pos, at, n).await;
                self.count_source_error(&r);
                r
            };
            read.map_err(|e| IoError::eio(e.to_string()))?;
            if !hydrated && self.knobs.lock().hydrate_on_read {
                self.hydrator.hint(r);
            }
            pos = run_end;
        }
        Ok(())
    }

    //--------------------------------------------------------------------------------------
    // Writes

    /// A write. With `fua` it completes only once it and the metadata that makes it visible
    /// are durable.
    pub async fn write<P: DataPath>(
        &self,
        p: &P,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), IoError> {
        self.write_from(p, offset, data, fua).await
    }

    /// [`Engine::write`] of `data` wherever its bytes live.
    pub async fn write_from<P: DataPath, D: WriteData + ?Sized>(
        &self,
        p: &P,
        offset: u64,
        data: &D,
        fua: bool,
    ) -> Result<(), IoError> {
        self.validate(offset, data.len() as u64)?;
        self.committer.await_settled_map().await;
        let mode = self.committer.mode();
        match mode {
            Mode::Fail => return Err(IoError::eio("device is in fail mode")),
            Mode::ReadOnly if fua => {
                return Err(IoError::eio(
                    "device is read-only after a failure; FUA refused",
                ))
            }
            _ => {}
        }
        if data.len() == 0 {
            return Ok(());
        }
        self.write_inner(p, offset, data).await?;
        if mode == Mode::ReadWrite && self.committer.mode() != Mode::ReadWrite {
            // The clone failed while this write was in flight: its region may have been
            // hydrated after the last commit, and the revert to the committed bitmap makes it
            // invisible. Say so rather than acknowledge it.
            return Err(IoError::eio(
                "the device failed during this write (read-only now); the write may be lost",
            ));
        }
        if fua {
            self.committer.flush(p).await?;
        }
        Ok(())
    }

    pub(super) async fn write_inner<P: DataPath, D: WriteData + ?Sized>(
        &self,
        p: &P,
        offset: u64,
        data: &D,
    ) -> Result<(), IoError> {
        let end = offset + data.len() as u64;
        let first = self.geo.region_of(offset);
        let last = self.geo.region_of(end - 1);
        // Fast path: every touched region is hydrated.
        if (first..=last).all(|r| self.map.is_hydrated(r)) {
            return data
                .write_dest(p, offset)
                .await
                .map_err(|e| IoError::eio(e.to_string()));
        }
        let guards = self
            .locks
            .lock_unhydrated(first..last + 1, |r| self.map.is_hydrated(r))
            .await;
        if guards.is_empty() {
            return data
                .write_dest(p, offset)
                .await
                .map_err(|e| IoError::eio(e.to_string()));
        }
        if self.committer.mode() != Mode::ReadWrite {
            return Err(IoError::eio(
                "device is read-only after a failure; cannot hydrate for this write",
            ));
        }
        let locked = |r: u64| guards.iter().any(|g| g.region() == r);
        // Extend the write to whole regions for a partially covered unhydrated head or tail,
        // filling the uncovered parts from the source (copy-on-write hydration).
        let start = if locked(first) {
            self.geo.region_start(first)
        } else {
            offset
        };
        let stop = if locked(last) {
            self.geo.region_end(last)
        } else {
            end
        };
        // Write-triggered hydrations count against the hydration threshold, like dm-clone.
        self.hydrator.begin_hydrations(guards.len() as u64);
        #[cfg(test)]
        if self.config.bugs.bit_before_copy {
            // BUG (test only): the bits become durable before the data is written.
            for g in &guards {
                let _ = self.map.md().set_hydrated(g.region());
            }
            let _ = self.committer.commit_flush().await;
        }
        let result = match self.write_hydrating(p, (start, stop), offset, data).await {
            Ok(()) => {
                if (start, stop) != (offset, end) {
                    super::pause::point(super::pause::Point::CopyOnWrite);
                }
                // The data of every locked region is now complete on the destination.
                self.set_written(&guards)
            }
            Err(e) => Err(IoError::eio(e.to_string())),
        };
        // Ended once the bits are set: a worker waiting for writers to finish their regions
        // finds them hydrated when it wakes.
        self.hydrator.end_hydrations(guards.len() as u64);
        result?;
        drop(guards);
        self.map.check_fully_hydrated();
        Ok(())
    }

    /// Writes `data` at `offset` as part of hydrating `[start, stop)` (whole regions for the
    /// locked head and tail): the parts of the span the write does not cover are filled from
    /// the source. The caller holds the region locks.
    async fn write_hydrating<P: DataPath, D: WriteData + ?Sized>(
        &self,
        p: &P,
        (start, stop): (u64, u64),
        offset: u64,
        data: &D,
    ) -> std::io::Result<()> {
        let end = offset + data.len() as u64;
        if start == offset && stop == end {
            // Whole regions overwritten: no copy needed.
            return data.write_dest(p, offset).await;
        }
        if stop - start > budget::COPY_CHUNK as u64 {
            // Large regions: the uncovered head and tail are copied a chunk at a time, then
            // the data is written; the bits are set only after all of it.
            self.copy_source_range(p, start, offset).await?;
            self.copy_source_range(p, end, stop).await?;
            return data.write_dest(p, offset).await;
        }
        // One source read of the whole span: the part the write covers is read too and
        // overwritten, as one I/O costs less than a head and a tail. Data that is not in
        // memory yet (a zero-copy request's) is fetched meanwhile.
        let mut buf = self.copy_budget.take((stop - start) as usize).await;
        let (at, n) = ((offset - start) as usize, data.len());
        let (read, fetched) = match data.bytes() {
            Some(_) => (self.read_source(p, &mut buf, start).await, None),
            None => {
                let mut fetched = vec![0u8; n];
                let (read, copy) = futures_lite::future::zip(
                    self.read_source(p, &mut buf, start),
                    data.copy_into(&mut fetched),
                )
                .await;
                copy?;
                (read, Some(fetched))
            }
        };
        if let Err(e) = read {
            // A source that is away (a remote one timed out or disconnected) fails the write
            // now rather than after a second wait.
            if !localised(&e) || self.source.link_down().is_some() {
                return Err(e);
            }
            // Only the head and the tail, then: a bad block may lie under the write.
            if start < offset {
                self.read_source(p, &mut buf[..at], start).await?;
            }
            if stop > end {
                self.read_source(p, &mut buf[at + n..], end).await?;
            }
        }
        match fetched.as_deref().or(data.bytes()) {
            Some(bytes) => buf[at..at + n].copy_from_slice(bytes),
            None => data.copy_into(&mut buf[at..at + n]).await?,
        }
        p.write_dest(&buf, start).await
    }

    /// A source read for user I/O (a read of an unhydrated region, a copy-on-write); a
    /// failure counts in the source-error metric, as background hydration's do.
    async fn read_source<P: DataPath>(
        &self,
        p: &P,
        buf: &mut [u8],
        offset: u64,
    ) -> std::io::Result<()> {
        let r = p.read(Side::Source, buf, offset).await;
        self.count_source_error(&r);
        r
    }

    fn count_source_error<T>(&self, r: &std::io::Result<T>) {
        if r.is_err() {
            self.metrics
                .source_read_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Copies `[a, b)` from the source to the destination, a budgeted chunk at a time (the
    /// caller holds the region locks).
    async fn copy_source_range<P: DataPath>(&self, p: &P, a: u64, b: u64) -> std::io::Result<()> {
        let mut pos = a;
        while pos < b {
            let n = (b - pos).min(budget::COPY_CHUNK as u64) as usize;
            let mut buf = self.copy_budget.take(n).await;
            self.read_source(p, &mut buf[..], pos).await?;
            p.write_dest(&buf, pos).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Marks the regions of `guards` hydrated after a user write (or zeroing) made their data
    /// complete on the destination; called before the guards are released.
    pub(super) fn set_written(&self, guards: &[RegionGuard<'_>]) -> Result<(), IoError> {
        #[cfg(test)]
        if self.config.bugs.survival_after_ack {
            // BUG (test only): the bits reach the survival copy only later (with a
            // neighbour's, or not at all before the next commit).
            for g in guards {
                self.map
                    .md()
                    .set_hydrated_unmirrored(g.region())
                    .map_err(|e| self.bit_not_recorded(g.region(), e))?;
            }
            self.regions_hydrated_write
                .fetch_add(guards.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        // One bitmap update (and one survival write) per run of consecutive regions: a large
        // write over cold regions sets its bits at once.
        let mut i = 0;
        while i < guards.len() {
            let first = guards[i].region();
            let mut n = 1;
            while i + (n as usize) < guards.len() && guards[i + n as usize].region() == first + n {
                n += 1;
            }
            self.map
                .md()
                .set_range_hydrated(first, n)
                .map_err(|e| self.bit_not_recorded(first, e))?;
            i += n as usize;
        }
        self.regions_hydrated_write
            .fetch_add(guards.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The error for a region bit that could not be set. If it could not be written to the
    /// survival copy, a later write to the region would be acknowledged with nothing that
    /// outlives the daemon to make it visible: the clone degrades to read-only.
    pub(super) fn bit_not_recorded(&self, region: u64, e: MetadataError) -> IoError {
        let msg = format!("recording region {region} hydrated: {e}");
        if matches!(e, MetadataError::Survival { .. }) {
            self.committer.degrade(Mode::ReadOnly, &msg);
        }
        IoError::eio(msg)
    }
}

/// A source read error that concerns the blocks read (a bad block), not the source as a whole
/// (a remote source that did not answer, or a lost connection): reading fewer blocks may then
/// succeed.
fn localised(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    !matches!(
        e.kind(),
        TimedOut | NotConnected | BrokenPipe | ConnectionReset | ConnectionAborted | Interrupted
    )
}
