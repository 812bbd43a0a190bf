//! One NBD connection in the transmission phase: requests are written by any thread (one
//! header at a time, under the writer's lock) and a reader thread matches replies to them by
//! cookie, so many requests are in flight at once on one socket.
//!
//! Invariants: a request is in `pending` from before its header is sent until its reply has
//! been read whole (or the connection ended), so every reply byte the server sends is read and
//! a request that gave up waiting never desynchronises the stream; when the connection ends,
//! every pending request learns it (`Failure::Lost`) and may be sent again elsewhere: reads
//! are idempotent and the source is never written.

use super::wire::{self, Export};
use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// A socket to the server.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Why a request has no answer.
#[derive(Debug)]
pub enum Failure {
    /// The connection ended before the reply: send it again on another connection.
    Lost(String),
    /// The server answered with an error.
    Server(io::Error),
    /// No reply before the deadline (the request stays pending on the connection).
    TimedOut,
}

/// A request's answer.
#[derive(Debug)]
pub enum Reply {
    Data(Vec<u8>),
    /// Block status descriptors of the `base:allocation` context: (length, flags).
    Extents(Vec<(u32, u32)>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    BlockStatus,
}

/// A request in flight.
pub struct Waiter {
    kind: Kind,
    offset: u64,
    len: u32,
    st: Mutex<WaitState>,
    cv: Condvar,
}

struct WaitState {
    /// A read's data, zeroed first (holes are left as they are).
    data: Vec<u8>,
    extents: Vec<(u32, u32)>,
    error: Option<io::Error>,
    outcome: Option<Result<Reply, Failure>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Waiter {
    fn finish(&self, r: Result<(), Failure>) {
        let mut st = lock(&self.st);
        let out = match r {
            Err(f) => Err(f),
            Ok(()) => match st.error.take() {
                Some(e) => Err(Failure::Server(e)),
                None => Ok(match self.kind {
                    Kind::Read => Reply::Data(std::mem::take(&mut st.data)),
                    Kind::BlockStatus => Reply::Extents(std::mem::take(&mut st.extents)),
                }),
            },
        };
        st.outcome = Some(out);
        self.cv.notify_all();
    }

    /// Waits for the answer until `deadline`.
    pub fn wait(&self, deadline: Instant) -> Result<Reply, Failure> {
        let mut st = lock(&self.st);
        loop {
            if let Some(out) = st.outcome.take() {
                return out;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Failure::TimedOut);
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

struct Shared {
    pending: Mutex<Pending>,
    next_cookie: AtomicU64,
}

struct Pending {
    map: HashMap<u64, Arc<Waiter>>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

/// A connection after a successful handshake.
pub struct Conn {
    pub export: Export,
    stream: Stream,
    writer: Mutex<Stream>,
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Conn {
    /// Starts the transmission phase on `stream` (handshake done, `export` agreed).
    pub fn start(stream: Stream, export: Export, name: &str) -> io::Result<Conn> {
        stream.set_read_timeout(None)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                map: HashMap::new(),
                closed: None,
            }),
            next_cookie: AtomicU64::new(1),
        });
        let rd = stream.try_clone()?;
        let writer = Mutex::new(stream.try_clone()?);
        let sh = shared.clone();
        let ctx = export.base_allocation;
        let reader = std::thread::Builder::new()
            .name("nbd-reply".into())
            .spawn(move || {
                let mut r = BufReader::with_capacity(256 << 10, rd);
                let why = loop {
                    if let Err(e) = read_reply(&mut r, &sh, ctx) {
                        break e.to_string();
                    }
                };
                let drained = {
                    let mut p = lock(&sh.pending);
                    p.closed = Some(why.clone());
                    std::mem::take(&mut p.map)
                };
                for w in drained.into_values() {
                    w.finish(Err(Failure::Lost(why.clone())));
                }
            })?;
        log::debug!("{name}: connected ({export:?})");
        Ok(Conn {
            export,
            stream,
            writer,
            shared,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Why the connection ended, if it has.
    pub fn closed(&self) -> Option<String> {
        lock(&self.shared.pending).closed.clone()
    }

    /// Sends a read of `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: u32) -> Result<Arc<Waiter>, Failure> {
        self.submit(Kind::Read, wire::CMD_READ, offset, len)
    }

    /// Sends a block status request for `len` bytes at `offset` (`base:allocation`).
    pub fn block_status(&self, offset: u64, len: u32) -> Result<Arc<Waiter>, Failure> {
        self.submit(Kind::BlockStatus, wire::CMD_BLOCK_STATUS, offset, len)
    }

    fn submit(&self, kind: Kind, cmd: u16, offset: u64, len: u32) -> Result<Arc<Waiter>, Failure> {
        let cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        let w = Arc::new(Waiter {
            kind,
            offset,
            len,
            st: Mutex::new(WaitState {
                data: if kind == Kind::Read {
                    vec![0; len as usize]
                } else {
                    Vec::new()
                },
                extents: Vec::new(),
                error: None,
                outcome: None,
            }),
            cv: Condvar::new(),
        });
        {
            let mut p = lock(&self.shared.pending);
            if let Some(why) = &p.closed {
                return Err(Failure::Lost(why.clone()));
            }
            p.map.insert(cookie, w.clone());
        }
        let header = wire::request(0, cmd, cookie, offset, len);
        let sent = lock(&self.writer).write_all(&header);
        if let Err(e) = sent {
            // The reader sees the end too and tells every pending request, this one included.
            log::debug!("nbd: sending a request failed: {e}");
            self.stream.shutdown();
        }
        Ok(w)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.closed().is_none() {
            let _ = lock(&self.writer).write_all(&wire::request(0, wire::CMD_DISC, 0, 0, 0));
        }
        self.stream.shutdown();
        if let Some(h) = lock(&self.reader).take() {
            let _ = h.join();
        }
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn waiter(sh: &Shared, cookie: u64) -> io::Result<Arc<Waiter>> {
    lock(&sh.pending)
        .map
        .get(&cookie)
        .cloned()
        .ok_or_else(|| bad(format!("reply for unknown cookie {cookie}")))
}

fn done(sh: &Shared, cookie: u64, w: &Waiter) {
    lock(&sh.pending).map.remove(&cookie);
    w.finish(Ok(()));
}

/// Reads one reply (a simple reply, or one chunk of a structured reply) and files it.
fn read_reply(r: &mut impl Read, sh: &Shared, ctx: Option<u32>) -> io::Result<()> {
    match wire::read_u32(r)? {
        wire::SIMPLE_REPLY_MAGIC => {
            let error = wire::read_u32(r)?;
            let cookie = wire::read_u64(r)?;
            let w = waiter(sh, cookie)?;
            if error != 0 {
                lock(&w.st).error = Some(wire::nbd_error(error, ""));
            } else if w.kind == Kind::Read {
                r.read_exact(&mut lock(&w.st).data)?;
            }
            done(sh, cookie, &w);
            Ok(())
        }
        wire::STRUCTURED_REPLY_MAGIC => {
            let flags = wire::read_u16(r)?;
            let kind = wire::read_u16(r)?;
            let cookie = wire::read_u64(r)?;
            let len = wire::read_u32(r)?;
            let w = waiter(sh, cookie)?;
            read_chunk(r, &w, kind, len, ctx)?;
            if flags & wire::REPLY_FLAG_DONE != 0 {
                done(sh, cookie, &w);
            }
            Ok(())
        }
        m => Err(bad(format!("bad reply magic {m:#x}"))),
    }
}

/// One structured reply chunk of `len` payload bytes for `w`.
fn read_chunk(
    r: &mut impl Read,
    w: &Waiter,
    kind: u16,
    len: u32,
    ctx: Option<u32>,
) -> io::Result<()> {
    let (start, end) = (w.offset, w.offset + u64::from(w.len));
    match kind {
        wire::REPLY_TYPE_NONE if len == 0 => Ok(()),
        wire::REPLY_TYPE_OFFSET_DATA if w.kind == Kind::Read && len >= 8 => {
            let off = wire::read_u64(r)?;
            let n = u64::from(len - 8);
            if off < start || off + n > end {
                return Err(bad(format!(
                    "data chunk {off}+{n} outside the read {start}..{end}"
                )));
            }
            let at = (off - start) as usize;
            r.read_exact(&mut lock(&w.st).data[at..at + n as usize])
        }
        wire::REPLY_TYPE_OFFSET_HOLE if w.kind == Kind::Read && len == 12 => {
            let off = wire::read_u64(r)?;
            let n = u64::from(wire::read_u32(r)?);
            if off < start || off + n > end {
                return Err(bad(format!(
                    "hole chunk {off}+{n} outside the read {start}..{end}"
                )));
            }
            // The buffer was zeroed when the request was made.
            Ok(())
        }
        wire::REPLY_TYPE_BLOCK_STATUS
            if w.kind == Kind::BlockStatus && len >= 4 && (len - 4) % 8 == 0 =>
        {
            let id = wire::read_u32(r)?;
            let mut ext = Vec::with_capacity(((len - 4) / 8) as usize);
            for _ in 0..(len - 4) / 8 {
                ext.push((wire::read_u32(r)?, wire::read_u32(r)?));
            }
            if Some(id) == ctx {
                lock(&w.st).extents.extend(ext);
            }
            Ok(())
        }
        k if k & wire::REPLY_TYPE_ERROR_BIT != 0 && len >= 6 => {
            let code = wire::read_u32(r)?;
            let mlen = u32::from(wire::read_u16(r)?);
            if 6 + mlen > len {
                return Err(bad("error chunk message longer than the chunk".into()));
            }
            let mut msg = vec![0u8; mlen as usize];
            r.read_exact(&mut msg)?;
            wire::skip(r, u64::from(len - 6 - mlen))?;
            let e = wire::nbd_error(
                if code == 0 { libc::EIO as u32 } else { code },
                &String::from_utf8_lossy(&msg),
            );
            lock(&w.st).error.get_or_insert(e);
            Ok(())
        }
        k => Err(bad(format!(
            "unexpected reply chunk type {k} of {len} bytes"
        ))),
    }
}
