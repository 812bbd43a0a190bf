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
//!
//! The device advertises the engine's logical block size (the larger of the source's and the
//! destination's), so the kernel never sends a request that the backend's O_DIRECT I/O to a
//! 4Kn source or destination could not serve.

use crate::engine::{DataPath, Engine, Side};
use crate::io::BlockDev;
use crate::logwrites::LoggedSpace;
use io_uring::{opcode, types};
use libublk::ctrl::UblkCtrl;
use libublk::helpers::IoBuf;
use libublk::io::BufDescList;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkFlags, UblkUringData};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

/// Queue threads still serving. When it drops to 0 while the daemon did not ask for it, the
/// device was stopped or deleted from outside (e.g. `ublk del`): the daemon must then exit.
static QUEUES_ALIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Number of queue threads still serving the device.
pub fn queues_alive() -> usize {
    QUEUES_ALIVE.load(std::sync::atomic::Ordering::Acquire)
}

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
    /// Physical block size to advertise (at least the engine's logical block size and 4096).
    pub physical_block_size: u32,
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
        // Discard is a hint: a destination without support keeps its data.
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate_dest(offset, len, mode).await? {
            if let Some(rec) = &self.recording {
                rec.space.discard_completed(offset, len);
            }
        }
        Ok(())
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
        let zeroed = self.fallocate_dest(offset, len, first | keep).await?
            || self.fallocate_dest(offset, len, second | keep).await?;
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
    /// fallocate(`mode`) on the destination. `Ok(false)` when the destination does not
    /// support the mode (EOPNOTSUPP, or EINVAL from a block device that cannot do it, e.g.
    /// some dm targets).
    async fn fallocate_dest(&self, offset: u64, len: u64, mode: i32) -> io::Result<bool> {
        let sqe = opcode::Fallocate::new(types::Fixed(DEST_SLOT), len)
            .offset(offset)
            .mode(mode)
            .build();
        match uring_result(ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await) {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

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

/// user_data of a direct backend I/O: a target I/O (so libublk never takes it for a ublk
/// command) that is not an async future (`NonAsync`), with the tag in the low 16 bits.
const DIRECT_IO: u64 = UblkUringData::Target as u64 | UblkUringData::NonAsync as u64;

/// One queue: libublk's command loop, with a direct path for the common case and the
/// engine's async path for everything else.
///
/// A new request whose whole work is one backend I/O (`Engine::direct_route`: a plain read
/// or write of hydrated regions) is served without the async machinery: its SQE is pushed
/// from the CQE handler and its completion commits the request. Every other request becomes
/// a task on the queue's executor (`handle_one`), which also runs the engine's waits and the
/// eventfd kick task. A direct I/O that does not transfer everything (an error or a short
/// transfer) has completed and is then redone by the full path, which reports errors as
/// the engine does.
struct Queue<'a> {
    q: Rc<UblkQueue<'a>>,
    engine: Arc<Engine>,
    path: Rc<UringPath>,
    bufs: Rc<Vec<IoBuf<u8>>>,
    /// Weak: the executor's tasks hold the queue, and the queue must be dropped (its fixed
    /// files unregistered) when the serving loop ends, not leaked through a cycle.
    exe: std::rc::Weak<smol::LocalExecutor<'a>>,
    /// Direct I/O is off while recording (the recorder logs through `UringPath`).
    direct: bool,
    /// Bytes expected from each tag's direct I/O.
    expected: std::cell::RefCell<Vec<u32>>,
}

impl<'a> Queue<'a> {
    fn buf(&self, tag: u16) -> &[u8] {
        self.bufs[tag as usize].as_slice()
    }

    fn complete(&self, tag: u16, res: i32) {
        let r = self.q.complete_io_cmd_unified(
            tag,
            BufDesc::Slice(self.buf(tag)),
            Ok(libublk::UblkIORes::Result(res)),
        );
        if let Err(e) = r {
            log::error!("queue {} tag {tag}: cannot complete: {e}", self.q.get_qid());
        }
    }

    /// A new request arrived on `tag`.
    fn start(self: &Rc<Self>, tag: u16) {
        let iod = self.q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        let off = iod.start_sector << 9;
        let len = iod.nr_sectors << 9;
        let fua = iod.op_flags & libublk::sys::UBLK_IO_F_FUA != 0;
        let is_rw = op == libublk::sys::UBLK_IO_OP_READ || op == libublk::sys::UBLK_IO_OP_WRITE;
        if self.direct && is_rw && len as usize <= self.buf(tag).len() {
            if let Some(side) = self.engine.direct_route(off, len as u64, fua) {
                let slot = match side {
                    Side::Source => SOURCE_SLOT,
                    Side::Dest => DEST_SLOT,
                };
                let ptr = self.bufs[tag as usize].as_mut_ptr();
                let sqe = if op == libublk::sys::UBLK_IO_OP_READ {
                    opcode::Read::new(types::Fixed(slot), ptr, len)
                        .offset(off)
                        .build()
                } else {
                    opcode::Write::new(types::Fixed(slot), ptr, len)
                        .offset(off)
                        .build()
                };
                self.expected.borrow_mut()[tag as usize] = len;
                let sqe = sqe.user_data(DIRECT_IO | tag as u64);
                if self.q.ublk_submit_sqe_sync(sqe).is_ok() {
                    return;
                }
            }
        }
        self.spawn_full(tag);
    }

    /// The full engine path for the request on `tag`, as a task.
    fn spawn_full(self: &Rc<Self>, tag: u16) {
        let Some(exe) = self.exe.upgrade() else {
            // Only after the serving loop ended, when no request can arrive.
            return;
        };
        let me = self.clone();
        exe.spawn(async move {
            let n = me.buf(tag).len();
            // SAFETY: the buffer belongs to `tag`, which has one request in flight: nothing
            // else reads or writes it until this request is committed below.
            let buf =
                unsafe { std::slice::from_raw_parts_mut(me.bufs[tag as usize].as_mut_ptr(), n) };
            let res = handle_one(&me.engine, &me.path, &me.q, tag, buf).await;
            me.complete(tag, res);
        })
        .detach();
    }

    fn on_cqe(self: &Rc<Self>, user_data: u64, cqe: &io_uring::cqueue::Entry) {
        let tag = (user_data & 0xffff) as u16;
        if user_data & UblkUringData::Target as u64 == 0 {
            // A ublk command completed: a new request, or the queue is going away.
            if cqe.result() == libublk::sys::UBLK_IO_RES_OK as i32 {
                self.start(tag);
            }
        } else if user_data & DIRECT_IO == DIRECT_IO {
            let want = self.expected.borrow()[tag as usize];
            if cqe.result() >= 0 && cqe.result() as u32 == want {
                self.complete(tag, cqe.result());
            } else {
                self.spawn_full(tag);
            }
        } else {
            libublk::uring_async::ublk_wake_task(user_data, cqe);
        }
    }
}

/// Keeps a read pending on the queue's eventfd so that kicks from other threads wake the
/// queue's io_uring wait; the executor then runs whatever tasks the kick's wakers queued.
async fn kick_task(efd: Arc<OwnedFd>) {
    // The read is still pending in the kernel when the task is dropped at the end of the
    // serving loop, and a late kick completes it into this buffer: it must outlive the task,
    // so it is leaked (8 bytes per queue thread).
    let counter: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
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
    serve_queue(engine, recording, qid, dev);
    QUEUES_ALIVE.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
}

fn serve_queue(engine: Arc<Engine>, recording: Option<Arc<Recording>>, qid: u16, dev: &UblkDev) {
    let bufs = Rc::new(dev.alloc_queue_io_bufs());
    let q = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
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
    exe.spawn(kick_task(efd)).detach();
    let depth = q.dev.dev_info.queue_depth as usize;
    let queue = Rc::new(Queue {
        direct: recording.is_none(),
        path: Rc::new(UringPath { recording }),
        q,
        engine,
        bufs,
        exe: Rc::downgrade(&exe),
        expected: std::cell::RefCell::new(vec![0; depth]),
    });
    loop {
        let res = queue
            .q
            .flush_and_wake_io_tasks(|data, cqe, _| queue.on_cqe(data, cqe), 1);
        while exe.try_tick() {}
        match res {
            Ok(_) => {}
            Err(UblkError::QueueIsDown) => break,
            // A signal interrupted the wait (SIGTERM/SIGINT have handlers): wait again.
            Err(UblkError::IOError(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::error!("queue {qid}: {e}");
                // Requests may still be in flight with SQEs writing into the queue's buffers:
                // never free them (a leak on a dying queue, not a use after free).
                std::mem::forget(exe);
                std::mem::forget(queue);
                return;
            }
        }
    }
    // Release the devices before the thread ends: dropping the executor drops its tasks
    // (none serves a request any more: the kernel completed every request before it aborted
    // the queue's commands), and dropping the last reference to the queue unregisters the
    // fixed files from its ring. Left to the ring's teardown at thread exit, the kernel would
    // close them asynchronously, after the process has exited, and a `stop` followed at once
    // by `dmsetup remove` or `losetup -d` of a backing device would find it still busy.
    drop(exe);
    let leaked = Rc::strong_count(&queue) - 1;
    if leaked > 0 {
        log::warn!("queue {qid}: {leaked} references to the queue outlive its loop");
    }
    drop(queue);
}

/// The `logical_bs_shift` and `physical_bs_shift` to advertise for a `logical`-byte logical
/// block size and a `physical`-byte physical one: the physical (which is also the minimum I/O
/// size) never below the logical nor below 4096, libublk's default.
fn block_shifts(logical: u64, physical: u32) -> (u8, u8) {
    let logical = logical.max(crate::io::SECTOR_SIZE).next_power_of_two();
    let physical = (physical as u64).next_power_of_two().max(logical).max(4096);
    (
        logical.trailing_zeros() as u8,
        physical.trailing_zeros() as u8,
    )
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
    let (logical_shift, physical_shift) =
        block_shifts(engine.block_size(), opts.physical_block_size);
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(geo.size);
        let p = &mut dev.tgt.params;
        p.basic.attrs = libublk::sys::UBLK_ATTR_VOLATILE_CACHE | libublk::sys::UBLK_ATTR_FUA;
        p.basic.logical_bs_shift = logical_shift;
        p.basic.physical_bs_shift = physical_shift;
        p.basic.io_min_shift = physical_shift;
        p.basic.io_opt_shift = geo.region_shift.max(physical_shift as u32) as u8;
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
    QUEUES_ALIVE.store(opts.queues as usize, std::sync::atomic::Ordering::Release);
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

#[cfg(test)]
mod tests {
    use super::block_shifts;

    #[test]
    fn advertised_block_sizes_follow_the_devices() {
        // 512-byte sectors: libublk's defaults (512 logical, 4096 physical and minimum I/O).
        assert_eq!(block_shifts(512, 512), (9, 12));
        assert_eq!(block_shifts(512, 4096), (9, 12));
        // A 4Kn source or destination: 4096-byte logical blocks.
        assert_eq!(block_shifts(4096, 4096), (12, 12));
        assert_eq!(block_shifts(4096, 512), (12, 12));
        // A larger physical block is passed on.
        assert_eq!(block_shifts(512, 16384), (9, 14));
    }
}
