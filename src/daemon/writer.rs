//! The store writer: one thread that applies deferred store writes (exec start and exit
//! records) in the order they were queued, off the request path.
//!
//! It is scheduled so that it never costs an exec its latency:
//! - Nobody wakes it per job. After a batch it naps ([`NAP`]); jobs queued meanwhile wait for
//!   it to wake by itself. Only once a nap found nothing does it sleep until the next job wakes
//!   it. An exec loop thus pays no wake-up (futex, IPI) per record.
//! - It runs in the SCHED_IDLE class while its queue is short and nobody waits for it, so a
//!   record never preempts the thread about to reply to a client (measured: ~0.15 ms of every
//!   exec round trip on 2 CPUs).
//!
//! It is woken and lifted to the normal class (going back once its queue is empty) when a
//! [`StoreWriter::flush`] waits, when its queue grows long ([`BACKLOG_BOOST`]), when anyone
//! waits for the store connection it may hold, and when it made no progress for a tick of the
//! watchdog ([`WATCHDOG_TICK`]): a busy machine delays the records a little, never starves them
//! or the threads that read the store.

use super::store::Store;
use crate::runtime;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

/// A deferred write.
pub(crate) type StoreJob = Box<dyn FnOnce(&Store) + Send>;

/// How long the writer naps after a batch before it looks for more.
const NAP: Duration = Duration::from_millis(2);

/// A queue this long wakes the writer and lifts it to the normal class.
const BACKLOG_BOOST: u64 = 64;

/// How often the watchdog checks that a writer with work makes progress.
const WATCHDOG_TICK: Duration = Duration::from_millis(50);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Queue {
    jobs: VecDeque<StoreJob>,
    /// The writer sleeps until woken (a push must wake it); false while it works or naps.
    parked: bool,
    /// The daemon is gone: finish the queue and end.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The writer thread's id (0 until it runs).
    tid: AtomicI32,
    /// Jobs queued and not yet done.
    backlog: AtomicU64,
    /// Jobs done.
    done: AtomicU64,
    /// Flushes waiting.
    urgent: AtomicU64,
    /// Whether the writer is in the idle class. No lock: the writer never holds one that a
    /// normal thread could then wait for while it is starved.
    idle: AtomicBool,
}

impl Shared {
    fn quiet(&self) -> bool {
        self.backlog.load(Ordering::SeqCst) == 0 && self.urgent.load(Ordering::SeqCst) == 0
    }

    /// Back to the normal class (from any thread). Callers count their job or wait first, so
    /// a writer going idle at the same moment sees them in [`Self::settle`] and comes back.
    fn boost(&self) {
        let tid = self.tid.load(Ordering::SeqCst);
        if self.idle.load(Ordering::SeqCst)
            && tid != 0
            && runtime::sys::set_thread_idle_class(tid, false).is_ok()
        {
            self.idle.store(false, Ordering::SeqCst);
        }
    }

    /// On the writer: idle class again once nothing is queued and nobody waits.
    fn settle(&self) {
        if !self.quiet() || self.idle.load(Ordering::SeqCst) {
            return;
        }
        if runtime::sys::set_thread_idle_class(0, true).is_ok() {
            self.idle.store(true, Ordering::SeqCst);
            // A job or a flush that came meanwhile may have found us not yet idle.
            if !self.quiet() && runtime::sys::set_thread_idle_class(0, false).is_ok() {
                self.idle.store(false, Ordering::SeqCst);
            }
        }
    }

    /// The next batch: after a nap, or once a push wakes us; None once closed and drained.
    fn next_batch(&self) -> Option<VecDeque<StoreJob>> {
        let mut q = lock(&self.queue);
        if q.jobs.is_empty() && !q.closed {
            q = self
                .wake
                .wait_timeout(q, NAP)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        while q.jobs.is_empty() && !q.closed {
            q.parked = true;
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        q.parked = false;
        if q.jobs.is_empty() {
            return None; // closed
        }
        Some(std::mem::take(&mut q.jobs))
    }

    fn run(&self, store: &Store) {
        /// However the loop ends, queue closed, jobs dropped (a flush waiting on one wakes)
        /// and the thread id forgotten (it may be reused).
        struct Ended<'a>(&'a Shared);
        impl Drop for Ended<'_> {
            fn drop(&mut self) {
                self.0.tid.store(0, Ordering::SeqCst);
                let mut q = lock(&self.0.queue);
                q.closed = true;
                q.jobs.clear();
            }
        }
        let _ended = Ended(self);
        self.tid
            .store(nix::unistd::gettid().as_raw(), Ordering::SeqCst);
        self.settle();
        while let Some(batch) = self.next_batch() {
            for job in batch {
                // A job that panics loses its record, not the writer.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(store)));
                if run.is_err() {
                    tracing::error!("a store write panicked; its record is lost");
                }
                self.done.fetch_add(1, Ordering::SeqCst);
                self.backlog.fetch_sub(1, Ordering::SeqCst);
            }
            self.settle();
        }
    }
}

/// The daemon's handle on the writer; dropping it lets the writer finish the queue and end.
pub(crate) struct StoreWriter {
    shared: Arc<Shared>,
}

impl StoreWriter {
    /// Start the writer thread for `store` (and, inside a tokio runtime, its watchdog).
    pub fn start(store: Arc<Store>) -> Result<StoreWriter, String> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                parked: false,
                closed: false,
            }),
            wake: Condvar::new(),
            tid: AtomicI32::new(0),
            backlog: AtomicU64::new(0),
            done: AtomicU64::new(0),
            urgent: AtomicU64::new(0),
            idle: AtomicBool::new(false),
        });
        let s = shared.clone();
        store.set_on_contention(move || s.boost());
        let s = shared.clone();
        std::thread::Builder::new()
            .name("sbx-store-writer".into())
            .spawn(move || s.run(&store))
            .map_err(|e| format!("start the store writer thread: {e}"))?;
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(watchdog(Arc::downgrade(&shared)));
        }
        Ok(StoreWriter { shared })
    }

    /// Queue `job` behind the earlier ones; the job back if the writer has ended.
    pub fn later(&self, job: StoreJob) -> Result<(), StoreJob> {
        let s = &self.shared;
        let queued = s.backlog.fetch_add(1, Ordering::SeqCst) + 1;
        let urgent = queued >= BACKLOG_BOOST || s.urgent.load(Ordering::SeqCst) > 0;
        let wake = {
            // The writer may hold the queue lock while starved in the idle class: lift it
            // rather than wait behind it.
            let mut q = match s.queue.try_lock() {
                Ok(q) => q,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    s.boost();
                    lock(&s.queue)
                }
            };
            if q.closed {
                drop(q);
                s.backlog.fetch_sub(1, Ordering::SeqCst);
                return Err(job);
            }
            q.jobs.push_back(job);
            q.parked || urgent
        };
        if urgent {
            s.boost();
        }
        if wake {
            s.wake.notify_one();
        }
        Ok(())
    }

    /// Queue `job` and wake the writer at once, in the normal class: someone waits for it.
    pub fn urgent(&self, job: StoreJob) -> Result<(), StoreJob> {
        let s = self.shared.clone();
        s.urgent.fetch_add(1, Ordering::SeqCst);
        // Never queued (the writer ended): the caller runs the wrapped job, which undoes the
        // count itself.
        self.later(Box::new(move |st: &Store| {
            s.urgent.fetch_sub(1, Ordering::SeqCst);
            job(st);
        }))
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.wake.notify_one();
    }
}

/// Lifts the writer to the normal class when it had work but did none for a whole tick
/// (starved of CPU in the idle class). Ends when the writer is gone.
async fn watchdog(shared: Weak<Shared>) {
    let mut last_done = 0;
    let mut tick = tokio::time::interval(WATCHDOG_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else {
            return;
        };
        let done = s.done.load(Ordering::SeqCst);
        if s.backlog.load(Ordering::SeqCst) > 0 && done == last_done {
            s.boost();
            s.wake.notify_one();
        }
        last_done = done;
    }
}
