//! One ublk queue: its thread's command loop, the direct path for the common request, and the
//! local executor that runs every other request as a task.
//!
//! A request is decoded once when its ublk command completes ([`Request::decode`]). One whose
//! whole work is one backend I/O (`Engine::direct_route`: a plain read or write of hydrated
//! regions) is served without the async machinery: its SQE is pushed from the CQE handler and
//! its completion commits the request. Every other request becomes a task on the queue's
//! executor ([`request::handle`]), spawned when it arrives and ended once it is committed; the
//! executor also runs the engine's waits and the eventfd kick task. A direct I/O that does not
//! transfer everything (an error or a short transfer) has completed and is then redone by the
//! full path, which reports errors as the engine does.
//!
//! On a zero-copy device (`UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY`, kernel 6.16 and later) the
//! kernel registers each request's own pages in the queue ring's buffer table at the index of
//! its tag before it hands the request over, and unregisters them when it is committed. The
//! direct path then reads and writes those pages in place (`ReadFixed`/`WriteFixed`): no copy
//! through the daemon. So does the full path's backend I/O for a read or a write (`pages`):
//! only what must be merged or comes from a remote source is copied, through `/dev/ublkcN` at
//! the request's user-copy offset (fixed file 0). A request whose pages the kernel could not
//! register (`UBLK_IO_F_NEED_REG_BUF`), and one whose direct I/O failed, works on the tag's
//! buffer: its data is copied into it (a write) or out of it (a read) whole.
//!
//! Invariant: a tag has at most one request in flight, so its I/O buffer, its registered
//! pages and its entry in `requests` belong to that request alone until it is committed.

use super::pages::{user_copy, RequestPages};
use super::remote::RemoteSource;
use super::request::{self, Op, Request};
use super::uring_path::{self, UringPath};
use crate::engine::wake::Kick;
use crate::engine::Engine;
use crate::io::observe::IoObserver;
use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::UblkIOCtx;
use libublk::io::{BufDescList, UblkDev, UblkQueue};
use libublk::sys::ublk_auto_buf_reg;
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Queue threads still serving. When it drops to 0 while the daemon did not ask for it, the
/// device was stopped or deleted from outside (e.g. `ublk del`): the daemon must then exit.
static QUEUES_ALIVE: AtomicUsize = AtomicUsize::new(0);

/// Number of queue threads still serving the device.
pub fn queues_alive() -> usize {
    QUEUES_ALIVE.load(Ordering::Acquire)
}

/// Sets the number of queue threads about to serve the device.
pub(super) fn set_queues_alive(n: usize) {
    QUEUES_ALIVE.store(n, Ordering::Release);
}

/// user_data of a direct backend I/O: a target I/O (so libublk never takes it for a ublk
/// command) that is not an async future (`NonAsync`), with the tag in the low 16 bits.
const DIRECT_IO: u64 = UblkUringData::Target as u64 | UblkUringData::NonAsync as u64;

/// One queue's state, shared by its CQE handler and its tasks (all on the queue's thread).
struct Queue<'a> {
    q: Rc<UblkQueue<'a>>,
    engine: Arc<Engine>,
    path: Rc<UringPath>,
    bufs: Rc<Vec<IoBuf<u8>>>,
    /// Weak: the executor's tasks hold the queue, and the queue must be dropped (its fixed
    /// files unregistered) when the serving loop ends, not leaked through a cycle.
    exe: std::rc::Weak<smol::LocalExecutor<'a>>,
    /// Direct I/O is off while an observer watches the destination (it is told of I/O
    /// through `UringPath` only); so is the full path's I/O on a zero-copy request's pages.
    direct: bool,
    /// The source is remote (NBD): its reads arrive in memory.
    remote_source: bool,
    /// Zero copy: each tag's registration (its buffer-table index and flags), given back
    /// with every commit; `None` when the kernel copies request data into the tag buffers.
    zero_copy: Option<Vec<ublk_auto_buf_reg>>,
    /// Each tag's request as decoded when it arrived. An entry is set before the tag's direct
    /// I/O is submitted and read when it completes (initially the decoding of an all-zero
    /// descriptor, which no completion ever reads).
    requests: RefCell<Vec<Request>>,
    /// Requests taken ([`Queue::start`]) and not yet completed ([`Queue::complete`]).
    in_service_tags: Cell<usize>,
}

impl<'a> Queue<'a> {
    /// Requests of this queue taken and not yet completed (each tag holds at most one).
    fn in_service(&self) -> usize {
        self.in_service_tags.get()
    }

    fn buf(&self, tag: u16) -> &[u8] {
        self.bufs[tag as usize].as_slice()
    }

    fn complete(&self, tag: u16, res: i32) {
        let in_service = self.in_service_tags.get();
        if in_service > 0 {
            self.in_service_tags.set(in_service - 1);
            self.engine.user_io().ended(self.q.get_qid() as usize);
        }
        let desc = match &self.zero_copy {
            Some(regs) => BufDesc::AutoReg(regs[tag as usize]),
            None => BufDesc::Slice(self.buf(tag)),
        };
        let r = self
            .q
            .complete_io_cmd_unified(tag, desc, Ok(libublk::UblkIORes::Result(res)));
        if let Err(e) = r {
            log::error!("queue {} tag {tag}: cannot complete: {e}", self.q.get_qid());
        }
    }

    /// A new request arrived on `tag`.
    fn start(self: &Rc<Self>, tag: u16) {
        self.in_service_tags.set(self.in_service_tags.get() + 1);
        self.engine.user_io().started(self.q.get_qid() as usize);
        let req = Request::decode(self.q.get_iod(tag));
        if let Some(op) = req.op.kind() {
            self.engine.metrics().count_op(op, req.len);
        }
        if req.op == Op::Read {
            self.engine.trace_read(req.offset, req.len);
        }
        let in_place = self.zero_copy.is_none() || !req.unregistered;
        if self.direct && in_place && req.carries_data() && self.try_direct(tag, req) {
            return;
        }
        self.spawn_full(tag, req, true);
    }

    /// Submits `req` (a read or a write) as one direct backend I/O if the engine routes it
    /// to one side as it is; `false` if the request must take the full path.
    fn try_direct(&self, tag: u16, req: Request) -> bool {
        let Some(len) = req.fits(self.buf(tag).len()) else {
            return false;
        };
        let Some(side) = self.engine.direct_route(req.offset, req.len, req.fua) else {
            return false;
        };
        let slot = types::Fixed(uring_path::slot(side));
        // `len` fits the tag's buffer, whose size is a u32 (the device's io_buf_bytes).
        let len = len as u32;
        let sqe = match (&self.zero_copy, req.op == Op::Read) {
            // The request's registered pages, from their start (a kernel buffer's address
            // is its offset).
            (Some(regs), true) => {
                opcode::ReadFixed::new(slot, std::ptr::null_mut(), len, regs[tag as usize].index)
                    .offset(req.offset)
                    .build()
            }
            (Some(regs), false) => {
                opcode::WriteFixed::new(slot, std::ptr::null(), len, regs[tag as usize].index)
                    .offset(req.offset)
                    .build()
            }
            (None, true) => opcode::Read::new(slot, self.bufs[tag as usize].as_mut_ptr(), len)
                .offset(req.offset)
                .build(),
            (None, false) => opcode::Write::new(slot, self.bufs[tag as usize].as_mut_ptr(), len)
                .offset(req.offset)
                .build(),
        };
        self.requests.borrow_mut()[tag as usize] = req;
        let sqe = sqe.user_data(DIRECT_IO | tag as u64);
        self.q.ublk_submit_sqe_sync(sqe).is_ok()
    }

    /// The full engine path for `req` on `tag`, as a task. `in_place`: on a zero-copy device
    /// its backend I/O may use the request's pages (not for a request whose direct I/O on
    /// them failed: it is redone through the tag's buffer).
    fn spawn_full(self: &Rc<Self>, tag: u16, req: Request, in_place: bool) {
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
            let res = if me.zero_copy.is_some() {
                me.handle_user_copy(tag, req, buf, in_place).await
            } else {
                request::handle(&me.engine, &me.path, req, buf).await
            };
            me.complete(tag, res);
        })
        .detach();
    }

    /// The full path on a zero-copy device. A read or a write whose pages are registered
    /// leaves its data there: the engine's backend I/O uses them in place (see `pages`).
    /// Otherwise the request's data is copied into the tag's buffer before a write and out of
    /// it after a read, through `/dev/ublkcN`.
    async fn handle_user_copy(
        &self,
        tag: u16,
        req: Request,
        buf: &mut [u8],
        in_place: bool,
    ) -> i32 {
        let data = match (req.op, req.fits(buf.len())) {
            (Op::Read | Op::Write, Some(n)) => n,
            // No data to move, or too large for the buffer (which `handle` reports).
            _ => return request::handle(&self.engine, &self.path, req, buf).await,
        };
        let pos = UblkIOCtx::ublk_user_copy_pos(self.q.get_qid(), tag, 0);
        if let (true, true, false, Some(regs)) =
            (in_place, self.direct, req.unregistered, &self.zero_copy)
        {
            let m = self.engine.metrics();
            m.in_place_ios.fetch_add(1, Ordering::Relaxed);
            let redone = &m.direct_redone;
            let mut pages = RequestPages::new(
                regs[tag as usize].index,
                pos,
                &mut buf[..data],
                self.remote_source,
                redone,
            );
            return request::read_write(&self.engine, &self.path, req, &mut pages).await;
        }
        let failed = |e: io::Error| {
            log::error!(
                "{:?} at offset {} length {}: cannot move its data through /dev/ublkcN: {e}",
                req.op,
                req.offset,
                req.len
            );
            -libc::EIO
        };
        if req.op == Op::Write {
            if let Err(e) = user_copy(&mut buf[..data], pos, true).await {
                return failed(e);
            }
        }
        let res = request::handle(&self.engine, &self.path, req, buf).await;
        if req.op == Op::Read && res > 0 {
            if let Err(e) = user_copy(&mut buf[..data], pos, false).await {
                return failed(e);
            }
        }
        res
    }

    fn on_cqe(self: &Rc<Self>, user_data: u64, cqe: &io_uring::cqueue::Entry) {
        let tag = (user_data & 0xffff) as u16;
        if user_data & UblkUringData::Target as u64 == 0 {
            // A ublk command completed: a new request, or the queue is going away.
            if cqe.result() == libublk::sys::UBLK_IO_RES_OK as i32 {
                self.start(tag);
            }
        } else if user_data & DIRECT_IO == DIRECT_IO {
            let req = self.requests.borrow()[tag as usize];
            let m = self.engine.metrics();
            m.direct_ios.fetch_add(1, Ordering::Relaxed);
            if cqe.result() >= 0 && cqe.result() as u64 == req.len {
                self.complete(tag, cqe.result());
            } else {
                let n = m.direct_redone.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    log::warn!(
                        "direct {:?} at offset {} length {} returned {} (zero copy: {}); \
                         redone through the daemon's buffer ({n} so far)",
                        req.op,
                        req.offset,
                        req.len,
                        cqe.result(),
                        self.zero_copy.is_some()
                    );
                }
                self.spawn_full(tag, req, false);
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

/// A kick of this queue: a write to `efd`, which pulls the queue's thread out of its
/// io_uring wait (the engine's cross-thread wake-ups and remote source reads use it).
fn kicker(efd: Arc<OwnedFd>) -> Kick {
    Arc::new(move || {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we keep open.
        unsafe {
            libc::write(
                efd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    })
}

/// The body of queue `qid`'s thread: serves the queue until it goes down.
pub(super) fn queue_thread(
    engine: Arc<Engine>,
    observer: Option<Arc<dyn IoObserver>>,
    remote: Option<Arc<RemoteSource>>,
    qid: u16,
    dev: &UblkDev,
) {
    serve_queue(engine, observer, remote, qid, dev);
    QUEUES_ALIVE.fetch_sub(1, Ordering::AcqRel);
}

fn serve_queue(
    engine: Arc<Engine>,
    observer: Option<Arc<dyn IoObserver>>,
    remote: Option<Arc<RemoteSource>>,
    qid: u16,
    dev: &UblkDev,
) {
    let bufs = Rc::new(dev.alloc_queue_io_bufs());
    let zero_copy = super::device::zero_copy(dev.dev_info.flags).then(|| {
        (0..dev.dev_info.queue_depth)
            .map(|tag| ublk_auto_buf_reg {
                index: tag,
                // A request whose pages cannot be registered still comes, flagged.
                flags: libublk::sys::UBLK_AUTO_BUF_REG_FALLBACK as u8,
                ..Default::default()
            })
            .collect::<Vec<_>>()
    });
    let fetch = match &zero_copy {
        Some(regs) => BufDescList::AutoRegs(regs),
        None => BufDescList::Slices(Some(&bufs)),
    };
    let q = match UblkQueue::new(qid, dev).and_then(|q| q.submit_fetch_commands_unified(fetch)) {
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
    let kick = kicker(efd.clone());
    engine.add_kicker(kick.clone());
    let exe = Rc::new(smol::LocalExecutor::new());
    exe.spawn(kick_task(efd)).detach();
    let depth = q.dev.dev_info.queue_depth as usize;
    let idle = Request::decode(&libublk::sys::ublksrv_io_desc::default());
    let queue = Rc::new(Queue {
        direct: observer.is_none(),
        remote_source: remote.is_some(),
        zero_copy,
        path: Rc::new(UringPath::new(observer, remote.map(|r| (r, kick)))),
        q,
        engine,
        bufs,
        exe: Rc::downgrade(&exe),
        requests: RefCell::new(vec![idle; depth]),
        in_service_tags: Cell::new(0),
    });
    run_loop(qid, queue, exe);
}

/// The queue's command loop: waits for completions, hands them to the queue, and runs the
/// tasks they woke, until the queue goes down.
fn run_loop<'a>(qid: u16, queue: Rc<Queue<'a>>, exe: Rc<smol::LocalExecutor<'a>>) {
    loop {
        let res = queue
            .q
            .flush_and_wake_io_tasks(|data, cqe, _| queue.on_cqe(data, cqe), 1);
        while exe.try_tick() {}
        match res {
            Ok(_) => {}
            Err(UblkError::QueueIsDown) if queue.in_service() > 0 => {
                // The kernel ended the queue's idle commands while requests are still in
                // service here: a handover's quiesce (`UBLK_U_CMD_QUIESCE_DEV`) waits for
                // one idle tag per queue, not for every request. libublk no longer commits
                // them; the kernel re-issues them to the next daemon. Their backend I/O may
                // still be in flight into the queue's buffers and the tasks' memory: never
                // free them (the process is about to exit).
                log::warn!(
                    "queue {qid}: ended with {} requests in service; the next daemon \
                     serves them again",
                    queue.in_service()
                );
                std::mem::forget(exe);
                std::mem::forget(queue);
                return;
            }
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
