//! One NBD connection in the transmission phase: requests are written by any thread (one
//! header at a time, under the writer's lock) and a reader thread matches replies to them by
//! cookie, so many requests are in flight at once on one socket.
//!
//! Invariants: a request is in `pending` from before its header is sent until its reply has
//! been read whole (or the connection ended), so every reply byte the server sends is read and
//! a request that gave up waiting never desynchronises the stream (and still counts in
//! [`Conn::unanswered_for`]: a caller giving up is not the server answering); when the
//! connection ends, every pending request learns it (`Failure::Lost`) and may be sent again
//! elsewhere: reads are idempotent and the source is never written.

use super::wire::{self, Export};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

    pub fn set_write_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// TCP keepalive, and a bound on unacknowledged data (`TCP_USER_TIMEOUT`): a peer that
    /// vanished (a host down, a cable pulled) ends the connection. Best effort.
    fn keepalive(&self, timeout: std::time::Duration) {
        use std::os::fd::AsRawFd;
        let Stream::Tcp(s) = self else { return };
        let fd = s.as_raw_fd();
        let set = |level: i32, opt: i32, v: i32| {
            // SAFETY: setsockopt on a valid socket with a pointer to an i32 and its size.
            unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    opt,
                    &v as *const i32 as *const libc::c_void,
                    std::mem::size_of::<i32>() as libc::socklen_t,
                )
            };
        };
        let secs = timeout.as_secs().clamp(1, 3600) as i32;
        set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, (secs / 3).max(1));
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
        set(
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            secs.saturating_mul(1000),
        );
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

/// A request in flight. Only its outcome is shared with the reader thread: the reply's bytes
/// are assembled by the reader in buffers of its own ([`Partial`]), so a request that stops
/// waiting is never held up by a reply arriving slowly.
pub struct Waiter {
    kind: Kind,
    offset: u64,
    len: u32,
    /// When it was sent.
    sent: Instant,
    outcome: Mutex<Option<Result<Reply, Failure>>>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Waiter {
    fn finish(&self, out: Result<Reply, Failure>) {
        *lock(&self.outcome) = Some(out);
        self.cv.notify_all();
    }

    /// Waits for the answer until `deadline`.
    pub fn wait(&self, deadline: Instant) -> Result<Reply, Failure> {
        let mut st = lock(&self.outcome);
        loop {
            if let Some(out) = st.take() {
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

/// A structured reply being assembled by the reader thread.
struct Partial {
    data: Vec<u8>,
    /// The parts of the read covered by data and hole chunks so far, as `[start, end)` from
    /// the read's offset: sorted, not overlapping, touching ones joined.
    covered: Vec<(u64, u64)>,
    extents: Vec<(u32, u32)>,
    error: Option<io::Error>,
}

impl Partial {
    fn new(w: &Waiter) -> Partial {
        Partial {
            data: if w.kind == Kind::Read {
                // Zeroed: hole chunks leave their range as it is.
                vec![0; w.len as usize]
            } else {
                Vec::new()
            },
            covered: Vec::new(),
            extents: Vec::new(),
            error: None,
        }
    }

    /// Records that a chunk covers `[at, at+n)` of the read. False, recording nothing, if it
    /// overlaps a chunk already received (the NBD spec forbids that: counted twice, a part
    /// of the read never sent would pass for covered and read as zeroes).
    fn cover(&mut self, at: u64, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        let end = at + n;
        // The first range that ends after `at`: the only one that can overlap or follow.
        let i = self.covered.partition_point(|&(_, e)| e <= at);
        if self.covered.get(i).is_some_and(|&(s, _)| s < end) {
            return false;
        }
        let joins_prev = i > 0 && self.covered[i - 1].1 == at;
        let joins_next = self.covered.get(i).is_some_and(|&(s, _)| s == end);
        match (joins_prev, joins_next) {
            (true, true) => {
                self.covered[i - 1].1 = self.covered[i].1;
                self.covered.remove(i);
            }
            (true, false) => self.covered[i - 1].1 = end,
            (false, true) => self.covered[i].0 = at,
            (false, false) => self.covered.insert(i, (at, end)),
        }
        true
    }

    /// Bytes of the read covered so far.
    fn covered_bytes(&self) -> u64 {
        self.covered.iter().map(|&(s, e)| e - s).sum()
    }

    /// The reply, once its last chunk came.
    fn into_reply(self, w: &Waiter) -> Result<Reply, Failure> {
        if let Some(e) = self.error {
            return Err(Failure::Server(e));
        }
        match w.kind {
            Kind::Read if self.covered_bytes() != u64::from(w.len) => {
                Err(Failure::Server(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the server's reply covered {} of the {} bytes read at {}",
                        self.covered_bytes(),
                        w.len,
                        w.offset
                    ),
                )))
            }
            Kind::Read => Ok(Reply::Data(self.data)),
            Kind::BlockStatus => Ok(Reply::Extents(self.extents)),
        }
    }
}

struct Shared {
    pending: Mutex<Pending>,
    next_cookie: AtomicU64,
}

struct Pending {
    /// By cookie: cookies are handed out in increasing order, so the first is the oldest.
    map: BTreeMap<u64, Arc<Waiter>>,
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
    pub fn start(
        stream: Stream,
        export: Export,
        name: &str,
        timeout: std::time::Duration,
    ) -> io::Result<Conn> {
        stream.set_read_timeout(None)?;
        // A server that stops reading must not hold a request's sender forever.
        stream.set_write_timeout(Some(timeout))?;
        stream.keepalive(timeout);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                map: BTreeMap::new(),
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
                let mut partial = HashMap::new();
                let why = loop {
                    if let Err(e) = read_reply(&mut r, &sh, ctx, &mut partial) {
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

    /// Ends the connection (`why` is logged): its pending requests fail with `Lost` and are
    /// sent again on other connections.
    pub fn abort(&self, why: &str) {
        log::warn!("nbd: closing a connection: {why}");
        self.stream.shutdown();
    }

    /// Why the connection ended, if it has.
    pub fn closed(&self) -> Option<String> {
        lock(&self.shared.pending).closed.clone()
    }

    /// How long the oldest request still waiting for its reply on this connection has waited
    /// (zero when none waits), or `None` once the connection has ended.
    pub fn unanswered_for(&self) -> Option<Duration> {
        let p = lock(&self.shared.pending);
        if p.closed.is_some() {
            return None;
        }
        Some(
            p.map
                .first_key_value()
                .map_or(Duration::ZERO, |(_, w)| w.sent.elapsed()),
        )
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
            sent: Instant::now(),
            outcome: Mutex::new(None),
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

fn done(sh: &Shared, cookie: u64, w: &Waiter, out: Result<Reply, Failure>) {
    lock(&sh.pending).map.remove(&cookie);
    w.finish(out);
}

/// Reads one reply (a simple reply, or one chunk of a structured reply) and files it;
/// `partial` holds the structured replies not complete yet.
fn read_reply(
    r: &mut impl Read,
    sh: &Shared,
    ctx: Option<u32>,
    partial: &mut HashMap<u64, Partial>,
) -> io::Result<()> {
    match wire::read_u32(r)? {
        wire::SIMPLE_REPLY_MAGIC => {
            let error = wire::read_u32(r)?;
            let cookie = wire::read_u64(r)?;
            let w = waiter(sh, cookie)?;
            let out = if error != 0 {
                Err(Failure::Server(wire::nbd_error(error, "")))
            } else if w.kind == Kind::Read {
                let mut data = vec![0u8; w.len as usize];
                r.read_exact(&mut data)?;
                Ok(Reply::Data(data))
            } else {
                Ok(Reply::Extents(Vec::new()))
            };
            partial.remove(&cookie);
            done(sh, cookie, &w, out);
            Ok(())
        }
        wire::STRUCTURED_REPLY_MAGIC => {
            let flags = wire::read_u16(r)?;
            let kind = wire::read_u16(r)?;
            let cookie = wire::read_u64(r)?;
            let len = wire::read_u32(r)?;
            let w = waiter(sh, cookie)?;
            let p = partial.entry(cookie).or_insert_with(|| Partial::new(&w));
            read_chunk(r, &w, p, kind, len, ctx)?;
            if flags & wire::REPLY_FLAG_DONE != 0 {
                if let Some(p) = partial.remove(&cookie) {
                    done(sh, cookie, &w, p.into_reply(&w));
                }
            }
            Ok(())
        }
        m => Err(bad(format!("bad reply magic {m:#x}"))),
    }
}

/// Whether `off + n` lies inside `start..end` (no overflow for any server values).
fn inside(off: u64, n: u64, start: u64, end: u64) -> bool {
    off >= start && off <= end && n <= end - off
}

/// The error of a read whose reply has a `what` chunk at `off+n` overlapping another chunk.
fn overlap(what: &str, off: u64, n: u64, start: u64, end: u64) -> io::Error {
    bad(format!(
        "{what} chunk {off}+{n} overlaps another chunk of the reply to the read {start}..{end} \
         (a server bug: the read fails)"
    ))
}

/// One structured reply chunk of `len` payload bytes for `w`, assembled into `p`.
fn read_chunk(
    r: &mut impl Read,
    w: &Waiter,
    p: &mut Partial,
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
            if !inside(off, n, start, end) {
                return Err(bad(format!(
                    "data chunk {off}+{n} outside the read {start}..{end}"
                )));
            }
            if !p.cover(off - start, n) {
                // The stream stays in step; the read fails.
                wire::skip(r, n)?;
                p.error.get_or_insert(overlap("data", off, n, start, end));
                return Ok(());
            }
            let at = (off - start) as usize;
            r.read_exact(&mut p.data[at..at + n as usize])?;
            Ok(())
        }
        wire::REPLY_TYPE_OFFSET_HOLE if w.kind == Kind::Read && len == 12 => {
            let off = wire::read_u64(r)?;
            let n = u64::from(wire::read_u32(r)?);
            if !inside(off, n, start, end) {
                return Err(bad(format!(
                    "hole chunk {off}+{n} outside the read {start}..{end}"
                )));
            }
            // The buffer was zeroed when the reply's first chunk came.
            if !p.cover(off - start, n) {
                p.error.get_or_insert(overlap("hole", off, n, start, end));
            }
            Ok(())
        }
        wire::REPLY_TYPE_BLOCK_STATUS
            if w.kind == Kind::BlockStatus && len >= 4 && (len - 4) % 8 == 0 =>
        {
            let id = wire::read_u32(r)?;
            let count = (len - 4) / 8;
            let mut ext = Vec::with_capacity(count.min(4096) as usize);
            for _ in 0..count {
                ext.push((wire::read_u32(r)?, wire::read_u32(r)?));
            }
            if Some(id) == ctx {
                p.extents.extend(ext);
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
            let code = if code == 0 { libc::EIO as u32 } else { code };
            let e = wire::nbd_error(code, &String::from_utf8_lossy(&msg));
            p.error.get_or_insert(e);
            Ok(())
        }
        k => Err(bad(format!(
            "unexpected reply chunk type {k} of {len} bytes"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A structured reply chunk as a server sends it.
    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(wire::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        v.extend(flags.to_be_bytes());
        v.extend(kind.to_be_bytes());
        v.extend(cookie.to_be_bytes());
        v.extend((payload.len() as u32).to_be_bytes());
        v.extend(payload);
        v
    }

    fn data(off: u64, bytes: &[u8]) -> Vec<u8> {
        let mut v = off.to_be_bytes().to_vec();
        v.extend(bytes);
        v
    }

    fn hole(off: u64, len: u32) -> Vec<u8> {
        let mut v = off.to_be_bytes().to_vec();
        v.extend(len.to_be_bytes());
        v
    }

    /// Feeds `stream` (replies to one read of `len` bytes at `offset`, cookie 1) to the reply
    /// reader; returns the read's outcome and whether the stream was read to its end.
    fn feed(offset: u64, len: u32, stream: Vec<u8>) -> (Result<Reply, Failure>, bool) {
        let w = Arc::new(Waiter {
            kind: Kind::Read,
            offset,
            len,
            sent: Instant::now(),
            outcome: Mutex::new(None),
            cv: Condvar::new(),
        });
        let sh = Shared {
            pending: Mutex::new(Pending {
                map: BTreeMap::from([(1, w.clone())]),
                closed: None,
            }),
            next_cookie: AtomicU64::new(2),
        };
        let end = stream.len() as u64;
        let mut r = Cursor::new(stream);
        let mut partial = HashMap::new();
        while r.position() < end {
            if let Err(e) = read_reply(&mut r, &sh, None, &mut partial) {
                return (Err(Failure::Lost(e.to_string())), false);
            }
        }
        let out = lock(&w.outcome)
            .take()
            .unwrap_or(Err(Failure::Lost("no outcome".into())));
        (out, true)
    }

    const DATA: u16 = wire::REPLY_TYPE_OFFSET_DATA;
    const HOLE: u16 = wire::REPLY_TYPE_OFFSET_HOLE;
    const DONE: u16 = wire::REPLY_FLAG_DONE;

    #[test]
    fn data_and_hole_chunks_in_any_order_assemble_the_read() {
        let a = [7u8; 1024];
        let mut s = chunk(0, DATA, 1, &data(4096 + 3072, &a));
        s.extend(chunk(0, HOLE, 1, &hole(4096 + 1024, 2048)));
        s.extend(chunk(DONE, DATA, 1, &data(4096, &a)));
        let (out, whole) = feed(4096, 4096, s);
        assert!(whole);
        let Ok(Reply::Data(d)) = out else {
            panic!("not data: {:?}", out.err())
        };
        assert_eq!(d[..1024], a);
        assert!(d[1024..3072].iter().all(|b| *b == 0));
        assert_eq!(d[3072..], a);
    }

    #[test]
    fn the_same_data_chunk_twice_is_refused_not_counted_twice() {
        // Two copies of the first half cover 4096 bytes by count, but the second half was
        // never sent: it would read as zeroes.
        let half = [9u8; 2048];
        let mut s = chunk(0, DATA, 1, &data(0, &half));
        s.extend(chunk(DONE, DATA, 1, &data(0, &half)));
        let (out, whole) = feed(0, 4096, s);
        assert!(
            whole,
            "the stream stays in step: the chunk's bytes were read"
        );
        match out {
            Err(Failure::Server(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                assert!(e.to_string().contains("overlaps"), "{e}");
            }
            Ok(_) => panic!("an overlapping reply was accepted"),
            Err(f) => panic!("{f:?}"),
        }
    }

    #[test]
    fn a_hole_overlapping_data_and_a_gap_are_refused() {
        let mut s = chunk(0, DATA, 1, &data(0, &[1u8; 3072]));
        s.extend(chunk(DONE, HOLE, 1, &hole(2048, 2048)));
        let (out, _) = feed(0, 4096, s);
        assert!(matches!(out, Err(Failure::Server(_))), "{out:?}");
        // A reply that leaves a gap.
        let mut s = chunk(0, DATA, 1, &data(0, &[1u8; 1024]));
        s.extend(chunk(DONE, HOLE, 1, &hole(2048, 2048)));
        let (out, _) = feed(0, 4096, s);
        match out {
            Err(Failure::Server(e)) => assert!(e.to_string().contains("covered 3072"), "{e}"),
            Ok(_) => panic!("a reply with a gap was accepted"),
            Err(f) => panic!("{f:?}"),
        }
    }
}
