//! The ublk frontend: libublk glue only.
//!
//! One thread per queue, one async task per tag (libublk's model: a `UblkQueue` and its
//! io_uring never leave their thread). Each tag task turns a ublk request into an engine call
//! and commits the result. Backend I/O goes through [`UringPath`] on the queue's own ring, on
//! the fixed files 1 (source) and 2 (destination).
//!
//! Each queue also owns an eventfd that a helper task keeps a read pending on; the engine's
//! cross-thread wake-ups (a commit finished, a region lock was released on another queue)
//! write to it, which pulls the queue thread out of its io_uring wait (see `engine::wake`).
//!
//! A FLUSH on any queue is handled by the engine's group commit, whose destination flush covers
//! writes completed on every queue (seed 003). `UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA` are
//! advertised so the kernel sends FLUSH and FUA at all.

use crate::engine::{DataPath, Engine, Side};
use crate::io::BlockDev;
use crate::logwrites::LoggedSpace;
use io_uring::{opcode, types};
use libublk::ctrl::UblkCtrl;
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkFlags, UblkUringData};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

/// Fixed-file slots registered with every queue ring (slot 0 is /dev/ublkcN).
const SOURCE_SLOT: u32 = 1;
const DEST_SLOT: u32 = 2;

#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Requested device id; -1 lets the kernel choose.
    pub id: i32,
    pub queues: u16,
    pub depth: u16,
    pub io_buf_bytes: u32,
}

/// What the kernel granted, read back after the device was added.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub id: u32,
    pub path: String,
    pub queues: u16,
    pub depth: u16,
    pub flags: u64,
    pub max_io_buf_bytes: u32,
}

/// A live dm-log-writes recording of the destination and the metadata (`create
/// --log-writes`): the queue paths log their destination writes and discards into `space`
/// once they completed, and a FLUSH is logged once it completed, after the writes that
/// completed before it was issued (the kernel target's ordering, `docs/log-writes.md`).
pub struct Recording {
    pub space: Arc<LoggedSpace>,
    /// The metadata device itself (not its recorder). It shares the logged space with the
    /// destination, so a FLUSH of the space must cover it too.
    pub metadata: Arc<dyn BlockDev>,
}

/// A data path on the calling queue thread's io_uring.
pub struct UringPath {
    recording: Option<Arc<Recording>>,
}

fn uring_result(res: Result<i32, UblkError>) -> io::Result<usize> {
    match res {
        Ok(n) if n >= 0 => Ok(n as usize),
        Ok(n) => Err(io::Error::from_raw_os_error(-n)),
        Err(e) => Err(io::Error::other(format!("io_uring: {e}"))),
    }
}

impl DataPath for UringPath {
    async fn read(&self, side: Side, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let slot = match side {
            Side::Source => SOURCE_SLOT,
            Side::Dest => DEST_SLOT,
        };
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let sqe = opcode::Read::new(types::Fixed(slot), rest.as_mut_ptr(), rest.len() as u32)
                .offset(offset + done as u64)
                .build();
            let n = uring_result(ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "short read at offset {} of the {side:?} device",
                        offset + done as u64
                    ),
                ));
            }
            done += n;
        }
        Ok(())
    }

    async fn write_dest(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let sqe = opcode::Write::new(types::Fixed(DEST_SLOT), rest.as_ptr(), rest.len() as u32)
                .offset(offset + done as u64)
                .build();
            let n = uring_result(ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "destination write returned 0",
                ));
            }
            done += n;
        }
        if let Some(rec) = &self.recording {
            rec.space.write_completed(offset, buf, false);
        }
        Ok(())
    }

    async fn discard_dest(&self, offset: u64, len: u64) -> io::Result<()> {
        // PUNCH_HOLE on files; on block devices fallocate(PUNCH_HOLE) is a discard too.
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let sqe = opcode::Fallocate::new(types::Fixed(DEST_SLOT), len)
            .offset(offset)
            .mode(mode)
            .build();
        match uring_result(ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await) {
            Ok(_) => {
                if let Some(rec) = &self.recording {
                    rec.space.discard_completed(offset, len);
                }
                Ok(())
            }
            // Discard is a hint: a destination without support (EOPNOTSUPP, or EINVAL from a
            // block device that cannot punch holes, e.g. some dm targets) keeps its data.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn zero_dest(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        // A hole reads back as zeroes (files and block devices alike); ZERO_RANGE keeps the
        // space allocated. Where the destination supports neither mode, zeroes are written.
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let (first, second) = if unmap {
            (libc::FALLOC_FL_PUNCH_HOLE, libc::FALLOC_FL_ZERO_RANGE)
        } else {
            (libc::FALLOC_FL_ZERO_RANGE, libc::FALLOC_FL_PUNCH_HOLE)
        };
        let mut zeroed = false;
        for mode in [first | keep, second | keep] {
            let sqe = opcode::Fallocate::new(types::Fixed(DEST_SLOT), len)
                .offset(offset)
                .mode(mode)
                .build();
            match uring_result(ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await) {
                Ok(_) => {
                    zeroed = true;
                    break;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        let zeroes = crate::io::ZEROES.as_slice();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            if !zeroed {
                // write_dest logs the write itself when recording.
                self.write_dest(&zeroes[..n], offset + done).await?;
            } else if let Some(rec) = &self.recording {
                rec.space
                    .write_completed(offset + done, &zeroes[..n], false);
            }
            done += n as u64;
        }
        Ok(())
    }

    async fn flush_dest(&self) -> io::Result<()> {
        let Some(rec) = &self.recording else {
            return self.fdatasync_dest().await;
        };
        let ticket = rec.space.flush_issued();
        // The metadata is flushed synchronously on the queue thread: recording is a test
        // mode, and the metadata device is small.
        let res = match self.fdatasync_dest().await {
            Ok(()) => rec.metadata.flush(),
            Err(e) => Err(e),
        };
        match &res {
            Ok(()) => rec.space.flush_completed(ticket),
            Err(_) => rec.space.flush_failed(ticket),
        }
        res
    }
}

impl UringPath {
    async fn fdatasync_dest(&self) -> io::Result<()> {
        let sqe = opcode::Fsync::new(types::Fixed(DEST_SLOT))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        uring_result(ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await).map(|_| ())
    }
}

/// The ublk result of an engine call: `ok` on success (bytes for reads and writes, 0 for
/// the others), `-errno` on failure.
fn op_result(
    res: Result<(), crate::engine::IoError>,
    ok: i32,
    what: &str,
    off: u64,
    len: u64,
) -> i32 {
    match res {
        Ok(()) => ok,
        Err(e) => {
            log::error!("{what} at offset {off} length {len}: {e}");
            -e.errno
        }
    }
}

async fn handle_one(
    engine: &Engine,
    path: &UringPath,
    q: &UblkQueue<'_>,
    tag: u16,
    buf: &mut [u8],
) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let off = iod.start_sector << 9;
    let len = (iod.nr_sectors as u64) << 9;
    let fua = iod.op_flags & libublk::sys::UBLK_IO_F_FUA != 0;
    // Only reads and writes carry data; a discard may be far larger than the buffer.
    let data =
        |buf: &mut [u8]| -> Option<usize> { (len as usize <= buf.len()).then_some(len as usize) };
    match op {
        libublk::sys::UBLK_IO_OP_READ | libublk::sys::UBLK_IO_OP_WRITE => {
            let Some(n) = data(buf) else {
                log::error!(
                    "request of {len} bytes exceeds the {}-byte I/O buffer",
                    buf.len()
                );
                return -libc::EINVAL;
            };
            if op == libublk::sys::UBLK_IO_OP_READ {
                op_result(
                    engine.read(path, off, &mut buf[..n]).await,
                    n as i32,
                    "read",
                    off,
                    len,
                )
            } else {
                op_result(
                    engine.write(path, off, &buf[..n], fua).await,
                    n as i32,
                    "write",
                    off,
                    len,
                )
            }
        }
        libublk::sys::UBLK_IO_OP_FLUSH => op_result(engine.flush(path).await, 0, "flush", off, 0),
        libublk::sys::UBLK_IO_OP_WRITE_ZEROES => {
            let unmap = iod.op_flags & libublk::sys::UBLK_IO_F_NOUNMAP == 0;
            op_result(
                engine.write_zeroes(path, off, len, unmap, fua).await,
                0,
                "write zeroes",
                off,
                len,
            )
        }
        libublk::sys::UBLK_IO_OP_DISCARD => {
            op_result(engine.discard(path, off, len).await, 0, "discard", off, len)
        }
        _ => -libc::EOPNOTSUPP,
    }
}

async fn tag_task(
    engine: Arc<Engine>,
    path: Rc<UringPath>,
    q: Rc<UblkQueue<'_>>,
    tag: u16,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let res = handle_one(&engine, &path, &q, tag, buf.as_mut_slice()).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Keeps a read pending on the queue's eventfd so that kicks from other threads wake the
/// queue's io_uring wait; the executor then runs whatever tasks the kick's wakers queued.
async fn kick_task(efd: Arc<OwnedFd>) {
    let mut counter = [0u8; 8];
    loop {
        let sqe = opcode::Read::new(types::Fd(efd.as_raw_fd()), counter.as_mut_ptr(), 8).build();
        match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
            Ok(n) if n >= 0 => {}
            _ => return,
        }
    }
}

fn new_eventfd() -> io::Result<Arc<OwnedFd>> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd: RawFd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor owned by nobody else.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn queue_thread(engine: Arc<Engine>, recording: Option<Arc<Recording>>, qid: u16, dev: &UblkDev) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("queue {qid}: cannot set up: {e}");
            return;
        }
    };
    let efd = match new_eventfd() {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("queue {qid}: cannot create its eventfd: {e}");
            return;
        }
    };
    let kick_fd = efd.clone();
    engine.add_kicker(Arc::new(move || {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we keep open.
        unsafe {
            libc::write(
                kick_fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }));
    let exe = Rc::new(smol::LocalExecutor::new());
    let path = Rc::new(UringPath { recording });
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let (q, engine, path) = (q.clone(), engine.clone(), path.clone());
        tasks.push(exe.spawn(async move {
            match tag_task(engine, path, q, tag).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => log::error!("queue {qid} tag {tag}: {e}"),
            }
        }));
    }
    exe.spawn(kick_task(efd)).detach();
    let exe2 = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while exe2.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            log::error!("queue {qid}: {e}");
        }
    }));
}

/// Adds the device, serves it until it is stopped, and returns after the queues exited.
/// `on_started` runs once the device is live (print its path, start the control socket, ...).
pub fn serve(
    engine: Arc<Engine>,
    source: RawFd,
    dest: RawFd,
    recording: Option<Arc<Recording>>,
    opts: &DeviceOptions,
    on_started: impl FnOnce(&UblkCtrl, DeviceInfo) + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let ctrl = libublk::ctrl::UblkCtrlBuilder::default()
        .name("ublk-clone")
        .id(opts.id)
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .io_buf_bytes(opts.io_buf_bytes)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot add the ublk device (is ublk_drv loaded? try `modprobe ublk_drv`): {e}"
            )
        })?;
    let geo = engine.geometry();
    let region_sectors = (geo.region_size >> 9) as u32;
    let depth = opts.depth;
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(geo.size);
        let p = &mut dev.tgt.params;
        p.basic.attrs = libublk::sys::UBLK_ATTR_VOLATILE_CACHE | libublk::sys::UBLK_ATTR_FUA;
        p.basic.io_opt_shift = geo.region_shift.max(12) as u8;
        p.types |= libublk::sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = libublk::sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: geo.region_size as u32,
            max_discard_sectors: (u32::MAX >> 9) / region_sectors * region_sectors,
            // WRITE_ZEROES is served (Engine::write_zeroes); 128 MiB (at least one region) per
            // request bounds what a recording holds in memory for one.
            max_write_zeroes_sectors: ((128u32 << 20) >> 9).max(region_sectors) / region_sectors
                * region_sectors,
            max_discard_segments: 1,
            reserved0: 0,
        };
        let tgt = &mut dev.tgt;
        tgt.fds[SOURCE_SLOT as usize] = source;
        tgt.fds[DEST_SLOT as usize] = dest;
        tgt.nr_fds = 3;
        // A tag may have a few backend I/Os in flight, plus the kick read.
        tgt.sq_depth = depth.saturating_mul(2).max(64);
        tgt.cq_depth = depth.saturating_mul(4).max(128);
        Ok(())
    };
    let qengine = engine.clone();
    let q_fn =
        move |qid: u16, dev: &UblkDev| queue_thread(qengine.clone(), recording.clone(), qid, dev);
    let dev_fn = move |ctrl: &UblkCtrl| {
        let info = ctrl.dev_info();
        let di = DeviceInfo {
            id: info.dev_id,
            path: format!("/dev/ublkb{}", info.dev_id),
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            flags: info.flags,
            max_io_buf_bytes: info.max_io_buf_bytes,
        };
        on_started(ctrl, di);
    };
    ctrl.run_target(tgt_init, q_fn, dev_fn)
        .map_err(|e| anyhow::anyhow!("ublk device failed: {e}"))?;
    Ok(())
}
