//! A read-only NBD source: [`NbdDev`] serves [`BlockDev`] reads from an NBD server
//! (`nbd://`, `nbd+unix://`), over one connection or, when the server allows it
//! (`CAN_MULTI_CONN`), several, each carrying many requests at once.
//!
//! A source that comes and goes: when connections end, the requests they carried are sent
//! again on the others or, once every connection is gone, wait while a background thread
//! reconnects with bounded exponential backoff; a request that cannot be answered within the
//! timeout fails with `TimedOut` (that request only); a connection on which a request has gone
//! unanswered for the whole timeout is closed (a silent server is a lost one), but never one
//! that merely carried a request whose caller's deadline was shorter, and a request whose
//! deadline has already passed is not sent at all. After a reconnect the export must have the same
//! size, settings and content sample as when it was first opened, or it is refused (and
//! retried): two images are never mixed. Requests keep to the server's block size constraints:
//! none is larger than its maximum, and a read or block status request not aligned to its
//! minimum asks for the whole blocks around it (a server may refuse it otherwise).
//!
//! Invariant: nothing is ever written to the server (no write command exists here); a read is
//! only ever answered with bytes the server sent for exactly that range, or zeroes where it
//! said the range is a hole.

mod conn;
pub mod uri;
mod wire;

use super::{check_range, BlockDev, BlockSizes, LinkDown};
use conn::{Conn, Failure, Reply, Stream};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};
pub use uri::{is_nbd_uri, NbdUri};

/// How an NBD source is used.
#[derive(Clone, Debug)]
pub struct NbdOptions {
    /// How long a read waits for an answer (connected or not) before it fails.
    pub timeout: Duration,
    /// Connections to open when the server allows several (`CAN_MULTI_CONN`); else one.
    pub connections: usize,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            timeout: Duration::from_secs(30),
            connections: 4,
        }
    }
}

/// First and last wait between reconnection attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long connecting plus the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest read sent as one request; larger reads are split into requests of this size,
/// all sent at once.
const PIPELINED_READ: u32 = 1 << 20;
/// Blocks sampled for the content check after a reconnect, and their size.
const SAMPLES: u64 = 16;
const SAMPLE_SIZE: u32 = 4096;

/// A read-only NBD export as a block device.
pub struct NbdDev {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    uri: NbdUri,
    opts: NbdOptions,
    /// The export as first opened: size, flags and block sizes stay what the clone was made
    /// against.
    export: wire::Export,
    /// A checksum of sampled blocks, taken when first opened.
    sample: Vec<u32>,
    link: Mutex<Link>,
    cv: Condvar,
    next: AtomicUsize,
    bytes_read: AtomicU64,
}

struct Link {
    conns: Vec<Arc<Conn>>,
    /// Since when no connection is up, and why.
    down: Option<LinkDown>,
    reconnecting: bool,
    shutdown: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Connects to `uri` and completes the handshake.
fn connect(uri: &NbdUri, timeout: Duration) -> io::Result<Conn> {
    let stream = match &uri.endpoint {
        uri::Endpoint::Tcp { host, port } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address"));
            let mut found = None;
            for a in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or(last)?;
            s.set_nodelay(true)?;
            Stream::Tcp(s)
        }
        uri::Endpoint::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
    };
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let mut s = stream;
    let export = wire::handshake(&mut s, &uri.export)?;
    Conn::start(s, export, &uri.to_string(), timeout)
}

impl NbdDev {
    /// Opens `uri` (see [`uri::parse`]): connects, negotiates, and samples the export.
    pub fn open(uri_text: &str, opts: NbdOptions) -> io::Result<NbdDev> {
        let uri =
            uri::parse(uri_text).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let first = connect(&uri, opts.timeout)
            .map_err(|e| io::Error::new(e.kind(), format!("{uri_text}: cannot connect: {e}")))?;
        let export = first.export.clone();
        if export.size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{uri_text}: the export is empty"),
            ));
        }
        let sample = sample(&first, export.size, Instant::now() + opts.timeout)
            .map_err(|e| io::Error::new(e.kind(), format!("{uri_text}: {e}")))?;
        let inner = Arc::new(Inner {
            name: uri_text.to_string(),
            uri,
            opts,
            export,
            sample,
            link: Mutex::new(Link {
                conns: vec![Arc::new(first)],
                down: None,
                reconnecting: false,
                shutdown: false,
            }),
            cv: Condvar::new(),
            next: AtomicUsize::new(0),
            bytes_read: AtomicU64::new(0),
        });
        // The other connections come up in the background, like any reconnection.
        inner.refill(&mut lock(&inner.link));
        Ok(NbdDev { inner })
    }

    /// Whether the server allows several connections (`CAN_MULTI_CONN`).
    pub fn multi_conn(&self) -> bool {
        self.inner.export.can_multi_conn()
    }

    /// Connections up now.
    pub fn connections(&self) -> usize {
        let mut l = lock(&self.inner.link);
        self.inner.prune(&mut l);
        l.conns.len()
    }

    /// Whether the server reports holes and zeroes (`base:allocation`).
    pub fn reports_zeroes(&self) -> bool {
        self.inner.export.base_allocation.is_some()
    }

    /// Bytes read from the server so far.
    pub fn bytes_read(&self) -> u64 {
        self.inner.bytes_read.load(Ordering::Relaxed)
    }

    /// A read whose offset and length are multiples of the server's minimum block size (the
    /// length may end at the end of the export): sent as requests of at most the server's
    /// maximum size.
    fn read_aligned(&self, buf: &mut [u8], offset: u64, deadline: Instant) -> io::Result<()> {
        let inner = &self.inner;
        let e = &inner.export;
        let chunk = (PIPELINED_READ.min(e.max_block) / e.min_block * e.min_block).max(e.min_block);
        // Every chunk is sent before any is waited for: a large read keeps the server busy
        // on several requests at once (and on several connections when it allows them).
        let mut sent = Vec::new();
        for (i, c) in buf.chunks(chunk as usize).enumerate() {
            let off = offset + (i * chunk as usize) as u64;
            let len = c.len() as u32;
            let c = inner.pick(deadline)?;
            let w = c.read(off, len).ok();
            sent.push((off, len, c, w));
        }
        for (i, (off, len, c, w)) in sent.into_iter().enumerate() {
            let answer = match w.map(|w| w.wait(deadline)) {
                Some(Ok(r)) => r,
                Some(Err(Failure::Server(e))) => return Err(e),
                Some(Err(Failure::TimedOut)) => {
                    inner.timed_out_on(&c);
                    return Err(inner.no_answer());
                }
                // Its connection ended: sent again (and waited for) on its own.
                Some(Err(Failure::Lost(_))) | None => inner.call(deadline, |c| c.read(off, len))?,
            };
            let dst = &mut buf[i * chunk as usize..][..len as usize];
            match answer {
                Reply::Data(d) if d.len() == dst.len() => dst.copy_from_slice(&d),
                _ => {
                    return Err(io::Error::other(format!(
                        "{}: malformed read reply",
                        self.name()
                    )))
                }
            }
            inner
                .bytes_read
                .fetch_add(u64::from(len), Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for NbdDev {
    fn drop(&mut self) {
        let conns = {
            let mut l = lock(&self.inner.link);
            l.shutdown = true;
            std::mem::take(&mut l.conns)
        };
        self.inner.cv.notify_all();
        drop(conns);
    }
}

/// A checksum of `SAMPLES` blocks spread over the export, read on `c`.
fn sample(c: &Conn, size: u64, deadline: Instant) -> io::Result<Vec<u32>> {
    let block = u64::from(c.export.min_block.max(512));
    let n = (u64::from(SAMPLE_SIZE).max(block) / block * block).min(size / block * block);
    let span = size - n;
    let n = n as u32;
    let mut out = Vec::new();
    if n == 0 {
        // Smaller than one block: its size is all there is to compare.
        return Ok(out);
    }
    for k in 0..SAMPLES {
        let off =
            (u128::from(span) * u128::from(k) / u128::from(SAMPLES - 1)) as u64 / block * block;
        let data = match c.read(off, n).and_then(|w| w.wait(deadline)) {
            Ok(Reply::Data(d)) => d,
            Ok(Reply::Extents(_)) => return Err(io::Error::other("block status for a read")),
            Err(f) => return Err(failure_error(f, "reading the content sample")),
        };
        out.push(crc32c::crc32c(&data));
    }
    Ok(out)
}

fn failure_error(f: Failure, what: &str) -> io::Error {
    match f {
        Failure::Lost(why) => io::Error::new(
            io::ErrorKind::NotConnected,
            format!("{what}: connection lost: {why}"),
        ),
        Failure::Server(e) => e,
        Failure::TimedOut => io::Error::new(io::ErrorKind::TimedOut, format!("{what}: no answer")),
    }
}

impl Inner {
    /// `[offset, offset+len)` widened to whole blocks of the server's minimum size (the end
    /// kept at most at the end of the export).
    fn aligned(&self, offset: u64, len: u64) -> (u64, u64) {
        let mb = u64::from(self.export.min_block);
        let end = (offset + len).div_ceil(mb).saturating_mul(mb);
        (offset / mb * mb, end.min(self.export.size))
    }

    /// How many connections to keep.
    fn target(&self) -> usize {
        if self.export.can_multi_conn() {
            self.opts.connections.max(1)
        } else {
            1
        }
    }

    /// Drops the connections that ended, and closes (and drops) those on which a request
    /// has gone unanswered for the whole source timeout.
    fn prune(&self, l: &mut Link) {
        l.conns.retain(|c| match c.unanswered_for() {
            None => false,
            Some(t) if t >= self.opts.timeout => {
                c.abort(&format!(
                    "{}: a request unanswered for {:.1} s",
                    self.name,
                    t.as_secs_f64()
                ));
                false
            }
            Some(_) => true,
        });
    }

    /// A request on `c` was not answered by its caller's deadline: `c` is closed (its other
    /// requests are sent again elsewhere, a reconnect starts) only if a request has waited on
    /// it for the whole source timeout. A caller whose deadline was shorter (a queue read
    /// that waited for a reader thread) says nothing about the server.
    fn timed_out_on(&self, c: &Conn) {
        if let Some(t) = c.unanswered_for() {
            if t >= self.opts.timeout {
                c.abort(&format!(
                    "{}: a request unanswered for {:.1} s",
                    self.name,
                    t.as_secs_f64()
                ));
            }
        }
    }

    /// The error of a request not answered by `deadline`.
    fn no_answer(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{}: no answer in time (source timeout {} s)",
                self.name,
                self.opts.timeout.as_secs_f64()
            ),
        )
    }

    /// Starts the reconnecting thread if connections are missing and none runs.
    fn refill(self: &Arc<Self>, l: &mut Link) {
        self.prune(l);
        if l.conns.len() >= self.target() || l.reconnecting || l.shutdown {
            return;
        }
        l.reconnecting = true;
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("nbd-reconnect".into())
            .spawn(move || reconnect(weak));
        if let Err(e) = spawned {
            log::error!("{}: cannot start the reconnecting thread: {e}", self.name);
            l.reconnecting = false;
        }
    }

    /// A live connection, waiting (until `deadline`) while none is up. Fails at once when
    /// `deadline` has passed: a request sent then could only be abandoned.
    fn pick(self: &Arc<Self>, deadline: Instant) -> io::Result<Arc<Conn>> {
        let mut l = lock(&self.link);
        loop {
            self.refill(&mut l);
            if !l.conns.is_empty() {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{}: the request's deadline passed before it was sent",
                            self.name
                        ),
                    ));
                }
                let i = self.next.fetch_add(1, Ordering::Relaxed) % l.conns.len();
                return Ok(l.conns[i].clone());
            }
            if l.down.is_none() {
                l.down = Some(LinkDown {
                    since: SystemTime::now(),
                    reason: "connection lost".into(),
                });
            }
            let now = Instant::now();
            if now >= deadline || l.shutdown {
                let d = l.down.clone().unwrap_or_else(|| LinkDown {
                    since: SystemTime::now(),
                    reason: "closed".into(),
                });
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{}: source disconnected ({}), not back within {} s",
                        self.name,
                        d.reason,
                        self.opts.timeout.as_secs_f64()
                    ),
                ));
            }
            l = self
                .cv
                .wait_timeout(l, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Sends a request (made by `send` on a connection) until it is answered, the server
    /// answers an error, or `deadline` passes. A request whose connection ended is sent again.
    fn call(
        self: &Arc<Self>,
        deadline: Instant,
        send: impl Fn(&Conn) -> Result<Arc<conn::Waiter>, Failure>,
    ) -> io::Result<Reply> {
        loop {
            let c = self.pick(deadline)?;
            let answer = send(&c).and_then(|w| w.wait(deadline));
            match answer {
                Ok(r) => return Ok(r),
                Err(Failure::Lost(why)) => {
                    log::warn!(
                        "{}: connection lost ({why}); sending the request again",
                        self.name
                    );
                    let mut l = lock(&self.link);
                    if l.down.is_none() && l.conns.iter().all(|c| c.closed().is_some()) {
                        l.down = Some(LinkDown {
                            since: SystemTime::now(),
                            reason: why,
                        });
                    }
                }
                Err(Failure::Server(e)) => return Err(e),
                Err(Failure::TimedOut) => {
                    self.timed_out_on(&c);
                    return Err(self.no_answer());
                }
            }
        }
    }
}

/// The reconnecting thread: opens connections until there are enough, with backoff between
/// failed attempts; checks that the export is still the same image before using it.
fn reconnect(weak: Weak<Inner>) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        {
            let mut l = lock(&inner.link);
            inner.prune(&mut l);
            if l.conns.len() >= inner.target() || l.shutdown {
                l.reconnecting = false;
                inner.cv.notify_all();
                return;
            }
        }
        let attempt = connect(&inner.uri, inner.opts.timeout).and_then(|c| {
            if c.export.size != inner.export.size {
                return Err(io::Error::other(format!(
                    "refused: the export is now {} bytes, not {}: a different image",
                    c.export.size, inner.export.size
                )));
            }
            let (was, now) = (&inner.export, &c.export);
            if now.structured != was.structured
                || now.base_allocation.is_some() != was.base_allocation.is_some()
                || now.min_block != was.min_block
                || now.max_block < was.max_block.min(PIPELINED_READ)
            {
                return Err(io::Error::other(format!(
                    "refused: the export's settings changed (was {was:?}, now {now:?})"
                )));
            }
            let s = sample(&c, c.export.size, Instant::now() + CONNECT_TIMEOUT)?;
            if s != inner.sample {
                return Err(io::Error::other(
                    "refused: the export's content differs from the image the clone was made \
                     from (a different image behind the same URI)",
                ));
            }
            Ok(c)
        });
        let mut l = lock(&inner.link);
        match attempt {
            Ok(c) => {
                l.conns.push(Arc::new(c));
                if let Some(d) = l.down.take() {
                    log::warn!(
                        "{}: source back (down since {}: {})",
                        inner.name,
                        humantime::format_rfc3339_seconds(d.since),
                        d.reason
                    );
                }
                backoff = BACKOFF_FIRST;
                inner.cv.notify_all();
            }
            Err(e) => {
                let live = l.conns.iter().any(|c| c.closed().is_none());
                if live {
                    // The server may allow fewer connections than we asked for: go on with
                    // those up; a reconnect starts again when they end.
                    log::debug!("{}: not adding a connection: {e}", inner.name);
                    l.reconnecting = false;
                    return;
                }
                {
                    let reason = e.to_string();
                    match &mut l.down {
                        Some(d) => d.reason = reason,
                        None => {
                            l.down = Some(LinkDown {
                                since: SystemTime::now(),
                                reason,
                            })
                        }
                    }
                }
                log::debug!("{}: reconnecting: {e}; next try in {backoff:?}", inner.name);
                drop(l);
                drop(inner);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

impl BlockDev for NbdDev {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn size(&self) -> u64 {
        self.inner.export.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_until(buf, offset, Instant::now() + self.inner.opts.timeout)
    }

    fn read_until(&self, buf: &mut [u8], offset: u64, deadline: Instant) -> io::Result<()> {
        check_range(self.name(), self.size(), offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        // A server that sets a minimum block size may refuse requests not aligned to it: an
        // unaligned read reads the whole blocks around it.
        let (a, b) = self.inner.aligned(offset, buf.len() as u64);
        if (a, b) == (offset, offset + buf.len() as u64) {
            return self.read_aligned(buf, offset, deadline);
        }
        let mut whole = vec![0u8; (b - a) as usize];
        self.read_aligned(&mut whole, a, deadline)?;
        buf.copy_from_slice(&whole[(offset - a) as usize..][..buf.len()]);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only(self.name()))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only(self.name()))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only(self.name()))
    }

    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        check_range(self.name(), self.size(), offset, len)?;
        let inner = &self.inner;
        if inner.export.base_allocation.is_none() || len == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + inner.opts.timeout;
        let step = u64::from(u32::MAX / inner.export.min_block * inner.export.min_block);
        let mut out: Vec<(u64, u64)> = Vec::new();
        // Asked for whole blocks (see `read_until`), the answer clipped to the window.
        let (win_start, win_end) = (offset, offset + len);
        let (mut at, end) = inner.aligned(offset, len);
        while at < end {
            let n = (end - at).min(step) as u32;
            let Reply::Extents(ext) = inner.call(deadline, |c| c.block_status(at, n))? else {
                return Err(io::Error::other(format!(
                    "{}: malformed block status",
                    self.name()
                )));
            };
            let before = at;
            for (elen, flags) in ext {
                let e_end = (at + u64::from(elen)).min(end);
                let (z_start, z_end) = (at.max(win_start), e_end.min(win_end));
                if flags & wire::STATE_ZERO != 0 && z_end > z_start {
                    match out.last_mut() {
                        Some((s, l)) if *s + *l == z_start => *l += z_end - z_start,
                        _ => out.push((z_start, z_end - z_start)),
                    }
                }
                at = e_end;
                if at >= end {
                    break;
                }
            }
            if at == before {
                // No progress: the server described nothing; treat the rest as data.
                break;
            }
        }
        Ok(out)
    }

    fn link_down(&self) -> Option<LinkDown> {
        let mut l = lock(&self.inner.link);
        // Connections that ended are replaced even while nobody reads (hydration paused).
        self.inner.refill(&mut l);
        if !l.conns.is_empty() {
            return None;
        }
        Some(
            l.down
                .get_or_insert_with(|| LinkDown {
                    since: SystemTime::now(),
                    reason: "connection lost".into(),
                })
                .clone(),
        )
    }

    fn block_sizes(&self) -> BlockSizes {
        let logical = self.inner.export.min_block.max(512);
        BlockSizes {
            logical,
            physical: self
                .inner
                .export
                .preferred_block
                .clamp(logical, 4096.max(logical)),
        }
    }
}

fn read_only(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{name}: the NBD source is read-only"),
    )
}

#[cfg(test)]
pub(crate) mod tests;
