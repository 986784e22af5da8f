//! Warm sandboxes: sbxd keeps a few sandboxes started ahead of time for the shapes (image and
//! seccomp profile) of recent creates, so a create of that shape takes one at once instead of
//! waiting for namespaces, mounts and a cgroup. A taken sandbox gets its own limits written
//! into its cgroup; creates with volumes or a seccomp profile file are always started cold.
//!
//! A warm sandbox has never run anything but init: nobody held its id, exec'd in it or saw
//! it. Its id is the daemon's sandbox id from the start (chosen here), so run directories and
//! cgroups carry the id the user gets.

use crate::runtime::{self, RuntimeConfig};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shapes kept warm at once (the most recently created ones).
const MAX_SHAPES: usize = 2;
/// A shape nobody created for this long is let go (its warm sandboxes torn down).
const IDLE_DRAIN: Duration = Duration::from_secs(600);

/// While a shape still has a warm sandbox ready, its refill waits until creates and execs have
/// left the daemon alone this long: a create that took a warm sandbox is mostly followed at
/// once by an exec into it, and starting the next warm sandbox right then (helper, mounts,
/// cgroup: milliseconds of CPU) would compete with it. A shape with none left refills at once.
const REFILL_QUIET: Duration = Duration::from_millis(3);

/// ... but never longer than this after it became due (a daemon that is never quiet still
/// refills).
const REFILL_MAX_DEFER: Duration = Duration::from_millis(25);

/// What a warm sandbox must match to be handed to a create.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shape {
    pub image: runtime::ImageRef,
    pub seccomp: runtime::SeccompProfile,
}

impl Shape {
    /// The shape of a create, if it can be served warm: no volumes (they are mounted at spawn)
    /// and no profile file (it could change between the warm start and the create).
    pub fn of(spec: &runtime::SandboxSpec) -> Option<Shape> {
        let poolable = spec.mounts.is_empty()
            && spec.hostname.is_none()
            && spec.entrypoint.is_none()
            && !matches!(spec.seccomp, runtime::SeccompProfile::File(_));
        poolable.then(|| Shape {
            image: spec.image.clone(),
            seccomp: spec.seccomp.clone(),
        })
    }
}

/// A sandbox started ahead of time, with the id it was started under.
pub(crate) struct Ready {
    pub id: String,
    pub sandbox: runtime::Sandbox,
}

struct Slot {
    shape: Shape,
    ready: Vec<Ready>,
    used: Instant,
    failures: u32,
    retry_at: Instant,
}

/// The warm sandboxes, most recently used shape first, and the task that refills them.
pub(crate) struct Warm {
    per_shape: usize,
    rt: RuntimeConfig,
    slots: Mutex<Vec<Slot>>,
    wake: tokio::sync::Notify,
    filler: AtomicBool,
    closed: AtomicBool,
    /// True while the filler is starting a sandbox (close waits for it).
    busy: tokio::sync::watch::Sender<bool>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// When a create or an exec last started or ended (see [`REFILL_QUIET`]).
    activity: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tear sandboxes down off the async workers.
fn destroy_later(doomed: Vec<Ready>) {
    if doomed.is_empty() {
        return;
    }
    tokio::task::spawn_blocking(move || {
        for r in doomed {
            if let Err(e) = r.sandbox.destroy() {
                tracing::error!(sandbox = %r.id, error = %e, "tear down a warm sandbox");
            }
        }
    });
}

impl Warm {
    /// `per_shape` warm sandboxes for each recent shape; 0 turns warm starts off.
    pub fn new(per_shape: usize, rt: RuntimeConfig) -> Warm {
        Warm {
            per_shape,
            rt,
            slots: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            filler: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            busy: tokio::sync::watch::Sender::new(false),
            hits: AtomicU64::new(0),
            activity: Mutex::new(Instant::now()),
            misses: AtomicU64::new(0),
        }
    }

    /// A create or exec started or ended now: refills wait for a quiet moment.
    pub fn touch(&self) {
        *lock(&self.activity) = Instant::now();
    }

    /// Before refilling `shape`: wait (at most [`REFILL_MAX_DEFER`]) until nothing happened
    /// for [`REFILL_QUIET`] — unless or until the shape has no warm sandbox left.
    async fn quiet(&self, shape: &Shape) {
        let give_up = Instant::now() + REFILL_MAX_DEFER;
        loop {
            let none_left = lock(&self.slots)
                .iter()
                .find(|s| s.shape == *shape)
                .is_none_or(|s| s.ready.is_empty());
            let since = lock(&self.activity).elapsed();
            let now = Instant::now();
            if none_left
                || since >= REFILL_QUIET
                || now >= give_up
                || self.closed.load(Ordering::SeqCst)
            {
                return;
            }
            tokio::time::sleep((REFILL_QUIET - since).min(give_up - now)).await;
        }
    }

    /// Sandboxes ready now (all shapes).
    pub fn ready(&self) -> usize {
        lock(&self.slots).iter().map(|s| s.ready.len()).sum()
    }

    /// A warm sandbox of `shape` if one is ready; either way the shape is remembered as wanted
    /// and refilled in the background. Must run inside the tokio runtime.
    pub fn take(self: &Arc<Self>, shape: &Shape, new_id: fn() -> String) -> Option<Ready> {
        if self.per_shape == 0 || self.closed.load(Ordering::SeqCst) {
            return None;
        }
        let mut doomed = Vec::new();
        let got = {
            let mut slots = lock(&self.slots);
            let mut slot = match slots.iter().position(|s| s.shape == *shape) {
                Some(i) => slots.remove(i),
                None => Slot {
                    shape: shape.clone(),
                    ready: Vec::new(),
                    used: Instant::now(),
                    failures: 0,
                    retry_at: Instant::now(),
                },
            };
            slot.used = Instant::now();
            // The oldest first: it has waited longest. One that died meanwhile is dropped.
            let mut got = None;
            while !slot.ready.is_empty() {
                let r = slot.ready.remove(0);
                if r.sandbox.alive() {
                    got = Some(r);
                    break;
                }
                tracing::warn!(sandbox = %r.id, "a warm sandbox died while waiting");
                doomed.push(r);
            }
            slots.insert(0, slot);
            while slots.len() > MAX_SHAPES {
                if let Some(old) = slots.pop() {
                    doomed.extend(old.ready);
                }
            }
            got
        };
        destroy_later(doomed);
        self.touch();
        if let Some(r) = &got {
            // It waited at background priority; from now on it is someone's sandbox.
            r.sandbox.set_foreground();
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        if !self.filler.swap(true, Ordering::SeqCst) {
            let me = self.clone();
            tokio::spawn(async move { me.fill(new_id).await });
        }
        self.wake.notify_one();
        got
    }

    /// Forget the shape of `image` and hand back its warm sandboxes for the caller to tear
    /// down (the image is being removed: its layers must not stay mounted).
    pub fn drain_image(&self, image: &runtime::ImageRef) -> Vec<Ready> {
        let mut slots = lock(&self.slots);
        let mut out = Vec::new();
        slots.retain_mut(|s| {
            if s.shape.image == *image {
                out.append(&mut s.ready);
                false
            } else {
                true
            }
        });
        out
    }

    /// Return a sandbox taken by a create that was then refused (before its id was revealed).
    pub fn put_back(&self, shape: &Shape, r: Ready) {
        let rejected = {
            let mut slots = lock(&self.slots);
            match slots.iter_mut().find(|s| s.shape == *shape) {
                Some(slot) if !self.closed.load(Ordering::SeqCst) => {
                    slot.ready.insert(0, r);
                    None
                }
                _ => Some(r),
            }
        };
        if let Some(r) = rejected {
            destroy_later(vec![r]);
        }
    }

    /// Refill: one sandbox at a time, most recent shape first; let go of idle shapes.
    async fn fill(self: Arc<Self>, new_id: fn() -> String) {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let now = Instant::now();
            let (job, doomed) = {
                let mut slots = lock(&self.slots);
                let mut doomed = Vec::new();
                slots.retain_mut(|s| {
                    if now.duration_since(s.used) > IDLE_DRAIN {
                        doomed.append(&mut s.ready);
                        false
                    } else {
                        true
                    }
                });
                let job = slots
                    .iter()
                    .find(|s| s.ready.len() < self.per_shape && s.retry_at <= now)
                    .map(|s| s.shape.clone());
                (job, doomed)
            };
            destroy_later(doomed);
            let Some(shape) = job else {
                // Nothing to do until a create wants something (or a retry or drain is due).
                let _ = tokio::time::timeout(Duration::from_secs(5), self.wake.notified()).await;
                continue;
            };
            // Busy from here: close() waits for us, or we see it closed after the wait.
            self.busy.send_replace(true);
            self.quiet(&shape).await;
            let still_wanted = !self.closed.load(Ordering::SeqCst)
                && lock(&self.slots)
                    .iter()
                    .any(|s| s.shape == shape && s.ready.len() < self.per_shape);
            if !still_wanted {
                // Closed, drained (an image removal) or filled meanwhile.
                self.busy.send_replace(false);
                continue;
            }
            let id = new_id();
            let spec = runtime::SandboxSpec {
                id: Some(id.clone()),
                image: shape.image.clone(),
                seccomp: shape.seccomp.clone(),
                background: true,
                ..Default::default()
            };
            let rt = self.rt.clone();
            let started = tokio::task::spawn_blocking(move || {
                // The host-side setup too runs behind the sandboxes in use; the pool thread
                // goes back to normal priority for whatever it runs next.
                runtime::set_thread_background(true);
                let r = runtime::Sandbox::spawn(&rt, spec);
                runtime::set_thread_background(false);
                r
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            let mut doomed = Vec::new();
            {
                let mut slots = lock(&self.slots);
                let slot = slots.iter_mut().find(|s| s.shape == shape);
                match (started, slot) {
                    (Ok(sandbox), Some(slot)) if !self.closed.load(Ordering::SeqCst) => {
                        slot.failures = 0;
                        slot.ready.push(Ready { id, sandbox });
                    }
                    (Ok(sandbox), _) => doomed.push(Ready { id, sandbox }),
                    (Err(e), slot) => {
                        tracing::warn!(image = %shape.image, error = %e, "start a warm sandbox");
                        if let Some(slot) = slot {
                            slot.failures += 1;
                            let backoff = Duration::from_secs(1 << slot.failures.min(6));
                            slot.retry_at = Instant::now() + backoff;
                        }
                    }
                }
            }
            if self.closed.load(Ordering::SeqCst) {
                // sbxd is stopping: tear it down before close() returns.
                let _ = tokio::task::spawn_blocking(move || {
                    for r in doomed {
                        let _ = r.sandbox.destroy();
                    }
                })
                .await;
            } else {
                destroy_later(doomed);
            }
            self.busy.send_replace(false);
        }
    }

    /// Stop refilling and tear every warm sandbox down (sbxd is stopping).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let mut busy = self.busy.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(30), busy.wait_for(|b| !*b)).await;
        let doomed: Vec<Ready> = lock(&self.slots).drain(..).flat_map(|s| s.ready).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for r in doomed {
                if let Err(e) = r.sandbox.destroy() {
                    tracing::error!(sandbox = %r.id, error = %e, "tear down a warm sandbox");
                }
            }
        })
        .await;
    }
}
