//! Reads of a remote source (NBD) for the queue threads. A remote source is a blocking
//! [`BlockDev`] (its reads wait on a socket, and while it is away, on its reconnection), and a
//! queue thread must never block: its read is handed to a pool of threads, and the task
//! waits for it on the queue's executor. The pool thread then wakes the task and kicks the
//! queue's eventfd, which pulls the queue thread out of its io_uring wait (as the engine's
//! cross-thread wake-ups do).
//!
//! Invariant: the task's buffer is filled on the queue thread, from a copy the pool thread
//! returns, so no other thread ever touches the queue's I/O buffers.

use crate::engine::wake::Kick;
use crate::io::BlockDev;
use event_listener::Event;
use parking_lot::Mutex;
use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Threads reading the remote source: the most source reads the queues have in flight at
/// once (a 4k random read at queue depth 32 keeps 32 busy).
const READERS: usize = 32;

type Job = Box<dyn FnOnce(&dyn BlockDev) + Send>;

/// The remote source and its reader threads, shared by every queue.
pub struct RemoteSource {
    jobs: Mutex<Sender<Job>>,
    /// How long a read may wait, from when the queue asked for it (not from when a reader
    /// thread took it: with every reader busy during an outage, it would wait several times
    /// over).
    timeout: Duration,
}

impl RemoteSource {
    /// Starts the reader threads for `dev`; they end when the last queue dropped it.
    pub fn start(dev: Arc<dyn BlockDev>, timeout: Duration) -> io::Result<Arc<RemoteSource>> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..READERS {
            let (rx, dev) = (rx.clone(), dev.clone());
            std::thread::Builder::new()
                .name(format!("source-read-{i}"))
                .spawn(move || reader(&rx, dev.as_ref()))?;
        }
        Ok(Arc::new(RemoteSource {
            jobs: Mutex::new(tx),
            timeout,
        }))
    }

    /// Reads `buf.len()` bytes at `offset` without blocking the calling queue thread; `kick`
    /// wakes that thread.
    pub async fn read(&self, buf: &mut [u8], offset: u64, kick: &Kick) -> io::Result<()> {
        struct Done {
            result: Mutex<Option<io::Result<Vec<u8>>>>,
            event: Event,
        }
        let done = Arc::new(Done {
            result: Mutex::new(None),
            event: Event::new(),
        });
        let (d, k, len) = (done.clone(), kick.clone(), buf.len());
        let deadline = Instant::now() + self.timeout;
        let job: Job = Box::new(move |dev| {
            let mut v = vec![0u8; len];
            let r = dev.read_until(&mut v, offset, deadline).map(|()| v);
            *d.result.lock() = Some(r);
            d.event.notify(usize::MAX);
            k();
        });
        self.jobs
            .lock()
            .send(job)
            .map_err(|_| io::Error::other("the source's reader threads are gone"))?;
        let data = loop {
            if let Some(r) = done.result.lock().take() {
                break r?;
            }
            let listener = done.event.listen();
            if let Some(r) = done.result.lock().take() {
                break r?;
            }
            listener.await;
        };
        buf.copy_from_slice(&data);
        Ok(())
    }
}

fn reader(rx: &std::sync::Mutex<Receiver<Job>>, dev: &dyn BlockDev) {
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(dev),
            Err(_) => return,
        }
    }
}
