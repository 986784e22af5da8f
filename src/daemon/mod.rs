//! sbxd: the HTTP server over a Unix socket ([`server`]), the sandbox registry and supervisor
//! (this module), the SQLite store ([`store`]) and output spools ([`output`]).
//!
//! Each sandbox has a supervisor task: it starts the sandbox (the runtime's spawn runs on a
//! blocking thread), records the lifecycle events, fires the lifetime and idle timeouts, runs
//! the readiness probe, and on the end records the reason and tears the sandbox down. Output
//! of the entrypoint and of every exec is spooled to files under `<state>/output/<id>/` and
//! read back by offset; metadata lives in `<state>/sbx.db`.

pub(crate) mod build;
pub mod fs;
pub(crate) mod images;
pub mod output;
pub mod server;
pub mod store;
mod warm;
mod writer;

use crate::api::{
    self, ApiError, CreateSandbox, EndReason, ErrorCode, Event, EventKind, ExecInfo, ExecRequest,
    ExecStatus, SandboxStatus, SecretSource, StreamMode,
};
use crate::runtime::{self, ExecSpec, RuntimeConfig, Stdio};
pub(crate) use fs::fs_routes;
use output::{Spool, Stdin};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::Store;
use tokio::sync::watch;

/// Where sbxd listens and keeps its state.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Warm sandboxes kept per recent shape (image + seccomp profile); 0 = none.
    pub warm: usize,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: PathBuf::from(api::DEFAULT_SOCKET),
            state_dir: PathBuf::from("/var/lib/sbx"),
            run_dir: PathBuf::from("/run/sbx"),
            warm: DEFAULT_WARM,
        }
    }
}

/// Warm sandboxes per shape unless `--warm`/`SBX_WARM` says otherwise.
pub const DEFAULT_WARM: usize = 2;

pub(crate) fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn internal(what: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, what.to_string())
}

/// A fresh sandbox id: `sb-` + 22 random base62 characters.
fn new_sandbox_id() -> String {
    random_id("sb-", api::SANDBOX_ID_CHARS)
}

/// `prefix` + `n` random base62 characters.
fn random_id(prefix: &str, n: usize) -> String {
    use std::io::Read;
    const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut raw = vec![0u8; n * 2];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut raw);
    }
    let mut s = String::from(prefix);
    // Rejection sampling keeps the characters uniform (248 = 4 × 62).
    let mut it = raw.into_iter().filter(|b| *b < 248);
    while s.len() < prefix.len() + n {
        match it.next() {
            Some(b) => s.push(B62[(b % 62) as usize] as char),
            None => {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                s.push(B62[(t % 62) as usize] as char)
            }
        }
    }
    s
}

/// Run `f` on its own small thread and await its result. For waits that may last as long as a
/// sandbox or a process lives: tokio's blocking pool is bounded (512), so parking one of its
/// threads per running sandbox and exec would starve every other blocking call under load.
fn waiter_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = Result<T, String>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(256 << 10)
        .spawn(move || {
            let _ = tx.send(f());
        });
    async move {
        match spawned {
            Ok(_) => rx.await.map_err(|_| "the waiting thread died".to_string()),
            Err(e) => Err(format!("start a waiting thread: {e}")),
        }
    }
}

/// Start an exec in `sb` from the async side: the request goes out on a non-blocking
/// connection and the reply is awaited on the reactor (no thread hop); only when init's queue
/// is full does the rest run on a blocking thread. Errors as `Sandbox::exec`'s; the outer
/// error is a blocking task that panicked.
async fn start_runtime_exec(
    sb: Arc<runtime::Sandbox>,
    spec: runtime::ExecSpec,
) -> Result<Result<runtime::Process, runtime::RuntimeError>, tokio::task::JoinError> {
    let mut pending = match sb.exec_begin(spec) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    if pending.sent() {
        // Readiness through a duplicate registered with tokio (already non-blocking).
        let watched = pending
            .reply_fd()
            .map(|fd| fd.try_clone_to_owned())
            .transpose()
            .and_then(|fd| match fd {
                Some(fd) => {
                    tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
                        .map(Some)
                }
                None => Ok(None),
            });
        if let Ok(Some(sock)) = watched {
            let deadline = tokio::time::Instant::now() + EXEC_START_WAIT;
            loop {
                match tokio::time::timeout_at(deadline, sock.readable()).await {
                    Ok(Ok(())) => {}
                    // Timed out or the registration failed: the blocking path decides.
                    _ => break,
                }
                match pending.try_finish() {
                    Ok(Ok(p)) => return Ok(Ok(p)),
                    Ok(Err(p)) => {
                        pending = p;
                        // Spurious readiness: clear it and wait again — unless a reply came
                        // since the receive above (peeked, not read: a seqpacket read would
                        // eat it), which must keep its wake-up.
                        let _ = sock.try_io(tokio::io::Interest::READABLE, || {
                            use nix::sys::socket::{recv, MsgFlags};
                            use std::os::fd::AsRawFd;
                            let mut b = [0u8; 1];
                            match recv(
                                sock.as_raw_fd(),
                                &mut b,
                                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
                            ) {
                                Err(nix::Error::EAGAIN) => {
                                    Err(std::io::ErrorKind::WouldBlock.into())
                                }
                                _ => Ok(()),
                            }
                        });
                    }
                    Err(e) => return Ok(Err(e)),
                }
            }
        }
    }
    tokio::task::spawn_blocking(move || pending.finish_blocking()).await
}

/// How long an exec's start is awaited on the reactor before the blocking path (which has
/// its own 30 s limit) takes over.
const EXEC_START_WAIT: Duration = Duration::from_secs(5);

/// The exec's exit (None if its report was lost: init died, so it was killed) and whether its
/// timeout fired (then it was SIGKILLed). Readiness of the exit connection is awaited on the
/// reactor; signal and resize stay possible meanwhile (no lock is held while waiting).
async fn wait_exit(
    pr: Arc<std::sync::RwLock<runtime::Process>>,
    timeout: Option<Duration>,
) -> (Option<runtime::Exit>, bool) {
    // A duplicate descriptor watched through a tokio socket: only readiness is awaited, the
    // report itself is read by `Process::wait` on the original.
    let watched = pr
        .read()
        .unwrap_or_else(|x| x.into_inner())
        .exit_watch_fd()
        .and_then(|fd| {
            // Non-blocking as tokio requires; the flag is shared with the original, which is
            // read only once it is readable (so `wait` never meets EAGAIN).
            let sock = std::os::unix::net::UnixStream::from(fd);
            sock.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(sock)
        });
    let mut timed_out = false;
    match watched {
        Ok(afd) => {
            // Readable means the report (or EOF) is there; nothing reads it before `wait`.
            let ready = async {
                let _ = afd.readable().await;
            };
            match timeout {
                Some(t) => {
                    if tokio::time::timeout(t, ready).await.is_err() {
                        timed_out = true;
                        let p = pr.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            let g = p.read().unwrap_or_else(|x| x.into_inner());
                            g.signal(libc::SIGKILL)
                        })
                        .await;
                        let _ = afd.readable().await;
                    }
                }
                None => ready.await,
            }
            drop(afd);
            let there = pr
                .read()
                .unwrap_or_else(|x| x.into_inner())
                .exit_ready(Some(Duration::ZERO));
            let r = if there {
                pr.write().unwrap_or_else(|x| x.into_inner()).wait().ok()
            } else {
                // The reactor failed us (it should not): wait off the worker. The descriptor is
                // non-blocking now, so block in poll first (a bare read would see EAGAIN).
                tokio::task::spawn_blocking(move || {
                    pr.read()
                        .unwrap_or_else(|x| x.into_inner())
                        .exit_ready(None);
                    pr.write().unwrap_or_else(|x| x.into_inner()).wait().ok()
                })
                .await
                .ok()
                .flatten()
            };
            (r, timed_out)
        }
        Err(err) => {
            // Not watchable (should not happen for a socket): a thread waits instead.
            tracing::warn!(error = %err, "watch an exec's exit on the reactor");
            let r = waiter_thread("sbx-exec-wait", move || {
                let mut timed_out = false;
                {
                    let p = pr.read().unwrap_or_else(|x| x.into_inner());
                    if !p.exit_ready(timeout) {
                        timed_out = true;
                        let _ = p.signal(libc::SIGKILL);
                        p.exit_ready(None);
                    }
                }
                let r = pr.write().unwrap_or_else(|x| x.into_inner()).wait();
                (r.ok(), timed_out)
            })
            .await;
            r.unwrap_or((None, false))
        }
    }
}

/// Latency histogram for /metrics (seconds).
pub(crate) struct Histogram {
    buckets: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: LATENCY_BUCKETS,
            counts: LATENCY_BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in self.buckets.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.buckets.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// The daemon: configuration, store and the live sandboxes.
pub struct Daemon {
    pub cfg: DaemonConfig,
    rt: RuntimeConfig,
    pub(crate) store: Arc<Store>,
    /// Store writes that need not delay a reply (exec records), applied in order.
    writer: writer::StoreWriter,
    live: Mutex<HashMap<String, Arc<Live>>>,
    pub(crate) warm: Arc<warm::Warm>,
    pub(crate) create_latency: Histogram,
    pub(crate) exec_latency: Histogram,
    pub(crate) cgroup_version: String,
    /// Supervisor tasks still running (shutdown waits for them to tear their sandboxes down).
    supervisors: tokio::sync::watch::Sender<usize>,
    /// One gate per image reference being imported or pulled (keyed by the normalized
    /// reference): creates and pulls of the same reference wait for the first one's fetch
    /// instead of downloading again.
    resolving: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held shared by everything that writes blobs or records into the image store (pulls,
    /// imports, snapshots, builds) and exclusively by the garbage collection after an image
    /// removal, so it never deletes a blob a write has stored but not yet recorded.
    pub(crate) image_gc: Arc<tokio::sync::RwLock<()>>,
}

/// What a watcher sees of a sandbox.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LiveState {
    pub status: SandboxStatus,
    pub ready_at: Option<f64>,
    pub returncode: Option<i32>,
    pub end_reason: Option<EndReason>,
    /// Events recorded so far (the last seq).
    pub events: u64,
}

/// A sandbox sbxd supervises (pending, running, or finished but still draining).
pub(crate) struct Live {
    pub id: String,
    pub config: CreateSandbox,
    /// The env every process gets (secrets, then env), resolved at create.
    env: BTreeMap<String, String>,
    /// The defaults of a stored image (its Env, WorkingDir, User, command): known at create
    /// for `im-…`, once the image is fetched for references to import or pull; never for host
    /// and dir.
    image: std::sync::OnceLock<ImageDefaults>,
    /// The image the sandbox runs (`im-…` once a reference to fetch is in the store): what
    /// image removal checks and a snapshot starts from.
    pub(crate) image_ref: std::sync::OnceLock<runtime::ImageRef>,
    /// The uid and gid its processes run as (the image's User, resolved in the sandbox's
    /// /etc/passwd and /etc/group once it runs); unset means root (0, 0).
    ids: std::sync::OnceLock<(u32, u32)>,
    pub volumes: Vec<String>,
    pub state: watch::Sender<LiveState>,
    /// The first reason asked for ends it (terminate, timeout, idle).
    end_req: watch::Sender<Option<EndReason>>,
    sandbox: Mutex<Option<Arc<runtime::Sandbox>>>,
    pub entry_stdout: Mutex<Arc<Spool>>,
    pub entry_stderr: Mutex<Arc<Spool>>,
    pub entry_stdin: Mutex<Arc<Stdin>>,
    execs: Mutex<HashMap<String, Arc<ExecSlot>>>,
    active_execs: AtomicU64,
    last_activity: Mutex<Instant>,
    activity: tokio::sync::Notify,
}

impl Live {
    pub(crate) fn touch(&self) {
        *lock(&self.last_activity) = Instant::now();
        self.activity.notify_waiters();
    }

    pub(crate) fn sandbox(&self) -> Option<Arc<runtime::Sandbox>> {
        lock(&self.sandbox).clone()
    }

    /// The env of every process before its own: the image's Env, under the create's secrets
    /// and env (which win on conflicts).
    fn base_env(&self) -> BTreeMap<String, String> {
        let mut env = self.image.get().map(|i| i.env.clone()).unwrap_or_default();
        env.extend(self.env.clone());
        env
    }

    /// The uid and gid of its processes (the image's User; root without one).
    fn user_ids(&self) -> (u32, u32) {
        self.ids.get().copied().unwrap_or((0, 0))
    }

    /// The create's workdir, else the image's WorkingDir.
    fn workdir(&self) -> Option<String> {
        self.config
            .workdir
            .clone()
            .or_else(|| self.image.get().and_then(|i| i.workdir.clone()))
    }

    fn request_end(&self, reason: EndReason) {
        self.end_req.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

/// An exec being started or started: concurrent requests with one exec_id share it.
type ExecSlot = tokio::sync::OnceCell<Result<Arc<ExecLive>, ApiError>>;

/// A running (or recently finished) exec.
pub(crate) struct ExecLive {
    pub info: watch::Sender<ExecInfo>,
    pub stdout: Arc<Spool>,
    pub stderr: Arc<Spool>,
    pub stdin: Stdin,
    process: Arc<std::sync::RwLock<runtime::Process>>,
}

impl ExecLive {
    pub(crate) fn signal(&self, sig: i32) -> Result<(), ApiError> {
        self.process
            .read()
            .unwrap_or_else(|x| x.into_inner())
            .signal(sig)
            .map_err(|e| ApiError::new(ErrorCode::Conflict, format!("signal {sig}: {e}")))
    }

    pub(crate) fn resize(&self, rows: u16, cols: u16) -> Result<(), ApiError> {
        self.process
            .read()
            .unwrap_or_else(|x| x.into_inner())
            .resize(rows, cols)
            .map_err(|e| ApiError::new(ErrorCode::Invalid, e.to_string()))
    }
}

fn check_name(field: &str, v: &str) -> Result<(), ApiError> {
    if api::valid_name(v) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("{v:?}"),
            "must match ^[A-Za-z0-9._-]+$ and be shorter than 64 characters",
        ))
    }
}

fn check_env(field: &str, env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (k, v) in env {
        if !api::valid_env_key(k) {
            return Err(ApiError::invalid(
                field,
                format!("{k:?}"),
                "keys must match ^[A-Za-z_][A-Za-z0-9_]*$",
            ));
        }
        if v.contains('\0') {
            return Err(ApiError::invalid(
                field,
                k,
                "values must not contain NUL bytes",
            ));
        }
    }
    Ok(())
}

/// What argv and environment of one process may total, in bytes as init's request carries
/// them (each string plus a little framing): well below the control message limit.
const MAX_PROCESS_BYTES: usize = runtime::proto::MAX_MESSAGE / 2;

fn process_bytes(argv: &[String], env: &BTreeMap<String, String>) -> usize {
    argv.iter().map(|a| a.len() + 8).sum::<usize>()
        + env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 16)
            .sum::<usize>()
}

fn check_process_size(argv: &[String], env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let n = process_bytes(argv, env);
    if n > MAX_PROCESS_BYTES {
        return Err(ApiError::invalid(
            "argv and env",
            format!("({n} bytes with framing)"),
            &format!("together they may take at most {MAX_PROCESS_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn check_argv(field: &str, argv: &[String], required: bool) -> Result<(), ApiError> {
    if required && argv.is_empty() {
        return Err(ApiError::invalid(field, "[]", "must name a program"));
    }
    if let Some(a) = argv.iter().find(|a| a.contains('\0')) {
        return Err(ApiError::invalid(field, format!("{a:?}"), "NUL byte"));
    }
    let total: usize = argv.iter().map(|a| a.len()).sum();
    if total > 65536 {
        return Err(ApiError::invalid(
            field,
            format!("({total} bytes)"),
            "the arguments may total at most 65536 bytes (ARG_MAX)",
        ));
    }
    Ok(())
}

fn check_workdir(field: &str, w: &Option<String>) -> Result<(), ApiError> {
    if let Some(w) = w {
        if !w.starts_with('/') || w.contains('\0') {
            return Err(ApiError::invalid(
                field,
                format!("{w:?}"),
                "must be an absolute path",
            ));
        }
    }
    Ok(())
}

/// What a stored image gives every process of its sandboxes by default.
#[derive(Debug, Clone, Default)]
struct ImageDefaults {
    /// The image's Env (`KEY=VALUE` entries; malformed ones are left out).
    env: BTreeMap<String, String>,
    /// The image's WorkingDir, when absolute.
    workdir: Option<String>,
    /// The image's User (`NAME`, `UID`, `NAME:GROUP`, `UID:GID`), when set.
    user: Option<String>,
    /// Entrypoint + Cmd: what `image_command` runs (empty when the image sets neither).
    command: Vec<String>,
}

impl ImageDefaults {
    fn of(c: &rootfs_fetch::store::ImageConfig) -> ImageDefaults {
        let env = c
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, v)| api::valid_env_key(k) && !v.contains('\0'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let workdir = c
            .working_dir
            .clone()
            .filter(|w| w.starts_with('/') && !w.contains('\0'));
        let user = c.user.clone().filter(|u| !u.is_empty());
        let command = c
            .entrypoint
            .iter()
            .flatten()
            .chain(c.cmd.iter().flatten())
            .cloned()
            .collect();
        ImageDefaults {
            env,
            workdir,
            user,
            command,
        }
    }
}

/// The longest /etc/passwd or /etc/group read to resolve an image's User.
const MAX_ID_FILE: u64 = 4 << 20;

/// An image's User (`NAME`, `UID`, `NAME:GROUP`, `UID:GID`) as uid and gid, names looked up
/// in the sandbox's own /etc/passwd and /etc/group (read inside its root: a symlink cannot
/// reach the host). A uid without a group takes its passwd entry's group, else 0 (as Docker).
fn resolve_user(sb: &runtime::Sandbox, user: &str) -> Result<(u32, u32), String> {
    use std::io::Read;
    let read = |path: &str| -> Result<String, String> {
        let mut s = String::new();
        match sb.fs().read_file(path) {
            Ok(f) => {
                f.take(MAX_ID_FILE)
                    .read_to_string(&mut s)
                    .map_err(|e| format!("read {path}: {e}"))?;
                Ok(s)
            }
            // No such file: names cannot be looked up (numeric ids still work).
            Err(_) => Ok(String::new()),
        }
    };
    // name:x:uid:gid:… (passwd) / name:x:gid:… (group)
    let entries = |text: &str| -> Vec<Vec<String>> {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| l.split(':').map(str::to_string).collect())
            .collect()
    };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = entries(&read("/etc/passwd")?);
    let (uid, passwd_gid) = match u.parse::<u32>() {
        Ok(uid) => {
            let gid = passwd
                .iter()
                .find(|e| e.get(2).and_then(|x| x.parse::<u32>().ok()) == Some(uid))
                .and_then(|e| e.get(3)?.parse::<u32>().ok());
            (uid, gid)
        }
        Err(_) => {
            let e = passwd
                .iter()
                .find(|e| e.first().map(String::as_str) == Some(u) && e.len() >= 4)
                .ok_or_else(|| format!("image user {user:?}: no user {u:?} in /etc/passwd"))?;
            let uid = e[2]
                .parse::<u32>()
                .map_err(|_| format!("image user {user:?}: bad uid {:?} in /etc/passwd", e[2]))?;
            (uid, e[3].parse::<u32>().ok())
        }
    };
    let gid = match g {
        None => passwd_gid.unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let group = entries(&read("/etc/group")?);
                let e = group
                    .iter()
                    .find(|e| e.first().map(String::as_str) == Some(g) && e.len() >= 3)
                    .ok_or_else(|| format!("image user {user:?}: no group {g:?} in /etc/group"))?;
                e[2].parse::<u32>()
                    .map_err(|_| format!("image user {user:?}: bad gid {:?} in /etc/group", e[2]))?
            }
        },
    };
    let (_, count) = sb.id_range();
    if uid >= count || gid >= count {
        return Err(format!(
            "image user {user:?}: uid {uid} / gid {gid} outside the sandbox's {count} ids"
        ));
    }
    Ok((uid, gid))
}

/// An image reference to bring into the content store before the sandbox starts.
#[derive(Debug, Clone)]
pub(crate) struct FetchImage {
    /// The reference as the create or pull gave it (the name in messages).
    pub text: String,
    /// The normalized reference: the key that serializes fetches of one image.
    pub key: String,
    source: FetchSource,
}

#[derive(Debug, Clone)]
enum FetchSource {
    Oci { path: PathBuf, tag: Option<String> },
    DockerArchive(PathBuf),
    Registry(rootfs_fetch::reference::RegistryRef),
}

/// What a create's `image` names.
enum ImageChoice {
    /// Startable as it is (host, dir:, an image in the store with its defaults).
    Ready(runtime::ImageRef, Option<ImageDefaults>),
    /// To import or pull first (in the supervisor, after create has answered).
    Fetch(FetchImage),
}

/// Run blocking store work on tokio's blocking pool.
async fn off_thread<T: Send + 'static>(
    job: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| format!("the image store task panicked: {e}"))?
}

/// Pull progress in the daemon log, a line per layer.
pub(crate) struct PullLog {
    sandbox: String,
    image: String,
}

impl rootfs_fetch::registry::Progress for PullLog {
    fn layer_resumed(&self, digest: &rootfs_fetch::store::Digest, offset: u64) {
        tracing::info!(sandbox = %self.sandbox, image = %self.image, layer = %digest, offset, "resuming layer download");
    }

    fn layer_done(&self, digest: &rootfs_fetch::store::Digest, skipped: bool) {
        if skipped {
            tracing::info!(sandbox = %self.sandbox, image = %self.image, layer = %digest, "layer already in the store");
        } else {
            tracing::info!(sandbox = %self.sandbox, image = %self.image, layer = %digest, "layer downloaded");
        }
    }
}

impl Daemon {
    /// Parse a create's `image`: `host` (default), `dir:PATH` and `im-…` as the runtime takes
    /// them (an `im-…` must be in the store), `oci:PATH[:TAG]`, `docker-archive:PATH` and
    /// registry references to fetch first.
    fn choose_image(&self, image: Option<&str>) -> Result<ImageChoice, ApiError> {
        use rootfs_fetch::reference::Reference;
        let text = image.unwrap_or("host");
        let invalid = |why: &str| ApiError::invalid("image", format!("{text:?}"), why);
        let stored = |id: rootfs_fetch::store::ImageId| {
            let store = rootfs_fetch::image_store(&self.cfg.state_dir)
                .map_err(|e| internal(format!("open the image store: {e}")))?;
            match store.load_image(&id) {
                Ok(rec) => Ok(ImageChoice::Ready(
                    runtime::ImageRef::Stored(id),
                    Some(ImageDefaults::of(&rec.config)),
                )),
                Err(rootfs_fetch::store::StoreError::ImageMissing { .. }) => Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("image {id} is not in the store (pull, import or build it first)"),
                )),
                Err(e) => Err(internal(format!("read image {id} from the store: {e}"))),
            }
        };
        match text.parse::<runtime::ImageRef>() {
            Ok(runtime::ImageRef::Stored(id)) => return stored(id),
            Ok(r) => return Ok(ImageChoice::Ready(r, None)),
            // host and dir: keep the runtime's own rules and messages.
            Err(e) if text == "host" || text.starts_with("dir:") => {
                return Err(invalid(&e.to_string()))
            }
            Err(_) => {}
        }
        let parsed = Reference::parse(text).map_err(|e| invalid(&e.reason))?;
        let key = parsed.to_string();
        let source = match parsed {
            Reference::Built(id) => return stored(id),
            Reference::Host => return Ok(ImageChoice::Ready(runtime::ImageRef::Host, None)),
            Reference::Dir(p) => return Ok(ImageChoice::Ready(runtime::ImageRef::Dir(p), None)),
            Reference::OciLayout { path, tag } => FetchSource::Oci { path, tag },
            Reference::DockerArchive { path } => FetchSource::DockerArchive(path),
            Reference::Registry(r) => FetchSource::Registry(r),
        };
        Ok(ImageChoice::Fetch(FetchImage {
            text: text.to_string(),
            key,
            source,
        }))
    }

    /// What `POST /v1/images/pull` fetches: a registry reference, `oci:` or
    /// `docker-archive:`; `Err(Ok(id))` for an `im-…` id (already in the store, or not).
    pub(crate) fn pull_source(
        &self,
        text: &str,
    ) -> Result<FetchImage, Result<rootfs_fetch::store::ImageId, ApiError>> {
        use rootfs_fetch::reference::Reference;
        let invalid = |why: &str| Err(ApiError::invalid("reference", format!("{text:?}"), why));
        let parsed = match Reference::parse(text) {
            Ok(p) => p,
            Err(e) => return Err(invalid(&e.reason)),
        };
        let key = parsed.to_string();
        let source = match parsed {
            Reference::Built(id) => return Err(Ok(id)),
            Reference::Host | Reference::Dir(_) => {
                return Err(invalid(
                    "is used as it is by sandboxes: only registry references, oci: and \
                     docker-archive: are pulled",
                ))
            }
            Reference::OciLayout { path, tag } => FetchSource::Oci { path, tag },
            Reference::DockerArchive { path } => FetchSource::DockerArchive(path),
            Reference::Registry(r) => FetchSource::Registry(r),
        };
        Ok(FetchImage {
            text: text.to_string(),
            key,
            source,
        })
    }

    /// Bring an image into the store, one fetch per reference at a time: a create that finds
    /// the same reference being fetched waits for it, then finds the image in the store.
    ///
    /// `progress` hears of every layer; `repull`: a registry tag is resolved against the
    /// registry even when the store has it (an explicit pull), shared layers still not
    /// downloaded again.
    pub(crate) async fn resolve_image(
        &self,
        who: &str,
        f: &FetchImage,
        progress: Arc<dyn rootfs_fetch::registry::Progress>,
        repull: bool,
    ) -> Result<rootfs_fetch::store::ImageRecord, ApiError> {
        let gate = lock(&self.resolving)
            .entry(f.key.clone())
            .or_default()
            .clone();
        let held = gate.lock().await;
        let r = {
            // Blobs stored by the fetch are recorded before a garbage collection may look.
            let _writing = self.image_gc.read().await;
            self.fetch_image(who, f, progress, repull).await
        };
        drop(held);
        let mut m = lock(&self.resolving);
        // Nobody else holds or waits on the gate (the map and we are its only holders).
        if Arc::strong_count(&gate) == 2 {
            m.remove(&f.key);
        }
        r
    }

    async fn fetch_image(
        &self,
        sandbox: &str,
        f: &FetchImage,
        progress: Arc<dyn rootfs_fetch::registry::Progress>,
        repull: bool,
    ) -> Result<rootfs_fetch::store::ImageRecord, ApiError> {
        let state_dir = self.cfg.state_dir.clone();
        let store = rootfs_fetch::image_store(&state_dir)
            .map_err(|e| internal(format!("open the image store: {e}")))?;
        match &f.source {
            FetchSource::Oci { path, tag } => {
                let (path, tag) = (path.clone(), tag.clone());
                tracing::info!(sandbox = %sandbox, image = %f.text, "importing the OCI layout");
                off_thread(move || {
                    rootfs_fetch::oci::import_oci_layout(&store, &path, tag.as_deref())
                        .map_err(|e| format!("import failed: {e}"))
                })
                .await
                .map_err(|e| ApiError::new(ErrorCode::Invalid, e))
            }
            FetchSource::DockerArchive(path) => {
                let path = path.clone();
                tracing::info!(sandbox = %sandbox, image = %f.text, "importing the docker archive");
                off_thread(move || {
                    rootfs_fetch::oci::import_docker_archive(&store, &path)
                        .map_err(|e| format!("import failed: {e}"))
                })
                .await
                .map_err(|e| ApiError::new(ErrorCode::Invalid, e))
            }
            FetchSource::Registry(r) => {
                // Pulled before (by this create's twin or an earlier one): used as it is, as
                // `docker run` does with an image it has.
                let name = r.to_string();
                let s = store.clone();
                let have = off_thread(move || {
                    Ok(match s.resolve_tag(&name) {
                        Ok(Some(id)) if !repull => s.load_image(&id).ok(),
                        _ => None,
                    })
                })
                .await
                .map_err(internal)?;
                if let Some(rec) = have {
                    tracing::info!(sandbox = %sandbox, image = %f.text, image_id = %rec.id, "image already in the store, not pulling");
                    return Ok(rec);
                }
                tracing::info!(sandbox = %sandbox, image = %f.text, "pulling");
                let opts = rootfs_fetch::registry::PullOptions::for_state_dir(&state_dir);
                let report = rootfs_fetch::registry::pull(&store, r, &opts, progress)
                    .await
                    .map_err(|e| {
                        use rootfs_fetch::registry::FailureKind;
                        let code = match e.kind() {
                            FailureKind::NotFound => ErrorCode::NotFound,
                            FailureKind::Denied => ErrorCode::PermissionDenied,
                            FailureKind::Invalid => ErrorCode::Invalid,
                            FailureKind::Timeout => ErrorCode::Timeout,
                            FailureKind::Other => ErrorCode::Internal,
                        };
                        ApiError::new(code, format!("pull failed: {e}"))
                    })?;
                tracing::info!(
                    sandbox = %sandbox,
                    image = %f.text,
                    image_id = %report.record.id,
                    downloaded = report.downloaded.len(),
                    skipped = report.skipped.len(),
                    "pulled"
                );
                Ok(report.record)
            }
        }
    }
}

impl Daemon {
    /// Open the store, sweep what a previous sbxd left, and get ready to serve.
    pub fn open(cfg: DaemonConfig) -> Result<Arc<Daemon>, String> {
        for d in [&cfg.state_dir, &cfg.run_dir] {
            std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        for d in ["output", "volumes", "secrets"] {
            let p = cfg.state_dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
        }
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(
            cfg.state_dir.join("secrets"),
            std::fs::Permissions::from_mode(0o700),
        );
        let mut rt = RuntimeConfig::from_env();
        rt.state_dir = cfg.state_dir.clone();
        rt.run_dir = cfg.run_dir.clone();
        rt.background_cleanup = true;
        let store =
            Arc::new(Store::open(&cfg.state_dir.join("sbx.db")).map_err(|e| e.to_string())?);
        let writer = writer::StoreWriter::start(store.clone())?;
        let cgroup_version = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            "v2"
        } else {
            "v1"
        }
        .to_string();
        let warm = Arc::new(warm::Warm::new(cfg.warm, rt.clone()));
        let d = Arc::new(Daemon {
            cfg,
            rt,
            store,
            writer,
            live: Mutex::new(HashMap::new()),
            warm,
            create_latency: Histogram::new(),
            exec_latency: Histogram::new(),
            cgroup_version,
            supervisors: tokio::sync::watch::Sender::new(0),
            resolving: Mutex::new(HashMap::new()),
            image_gc: Arc::new(tokio::sync::RwLock::new(())),
        });
        d.sweep();
        Ok(d)
    }

    /// A previous sbxd that died left sandboxes: adoption across restarts is not built yet,
    /// so they are torn down and recorded as ended by an error.
    fn sweep(&self) {
        for id in runtime::Sandbox::list(&self.rt) {
            tracing::warn!(sandbox = %id, "removing a sandbox left by a previous sbxd");
            if let Err(e) = runtime::Sandbox::remove_leftover(&self.rt, &id) {
                tracing::error!(sandbox = %id, error = %e, "could not remove leftover sandbox");
            }
        }
        if let Ok(ids) = self.store.unfinished() {
            for id in ids {
                let at = now();
                let _ = self.store.add_event(
                    &id,
                    &Event {
                        seq: 0,
                        kind: EventKind::Finished,
                        at,
                        reason: Some(EndReason::Error),
                        returncode: Some(1),
                        message: Some("sbxd restarted and the sandbox was lost".into()),
                    },
                );
                let _ = self.store.end_running_execs(&id, at);
            }
        }
    }

    /// Queue a store write behind the earlier ones (see [`Daemon::store_flush`]).
    fn store_later(&self, job: impl FnOnce(&Store) + Send + 'static) {
        if let Err(job) = self.writer.later(Box::new(job)) {
            // The writer has ended (sbxd is stopping): write here.
            job(&self.store);
        }
    }

    /// Wait until every write queued so far is in the store.
    async fn store_flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done: writer::StoreJob = Box::new(move |_| {
            let _ = tx.send(());
        });
        if let Err(job) = self.writer.urgent(done) {
            job(&self.store);
        }
        let _ = rx.await;
    }

    pub(crate) fn live(&self, id: &str) -> Option<Arc<Live>> {
        lock(&self.live).get(id).cloned()
    }

    pub(crate) fn running_count(&self) -> u64 {
        lock(&self.live)
            .values()
            .filter(|l| l.state.borrow().status != SandboxStatus::Finished)
            .count() as u64
    }

    fn output_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("output").join(id)
    }

    fn secret_path(&self, name: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("secrets")
            .join(format!("{name}.json"))
    }

    pub(crate) fn volume_path(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("volumes").join(name)
    }

    /// Resolve secret sources (in order) into env.
    fn resolve_secrets(
        &self,
        sources: &[SecretSource],
        into: &mut BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        for s in sources {
            match s {
                SecretSource::Inline(m) => {
                    check_env("secrets", m)?;
                    into.extend(m.clone());
                }
                SecretSource::Named(name) => {
                    check_name("secret", name)?;
                    let p = self.secret_path(name);
                    let text = std::fs::read(&p).map_err(|_| {
                        ApiError::new(ErrorCode::NotFound, format!("no secret named {name:?}"))
                    })?;
                    let m: BTreeMap<String, String> = serde_json::from_slice(&text)
                        .map_err(|e| internal(format!("secret {name:?} is unreadable: {e}")))?;
                    into.extend(m);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn create_secret(
        &self,
        req: api::CreateSecret,
    ) -> Result<api::SecretInfo, ApiError> {
        check_name("name", &req.name)?;
        check_env("env", &req.env)?;
        let info = api::SecretInfo {
            name: req.name.clone(),
            keys: req.env.keys().cloned().collect(),
            created_at: now(),
        };
        self.store.put_secret(&info, req.overwrite)?;
        if let Err(e) = runtime::proto::write_atomic(&self.secret_path(&req.name), &req.env) {
            let _ = self.store.delete_secret(&req.name);
            return Err(internal(format!("store secret {:?}: {e}", req.name)));
        }
        Ok(info)
    }

    pub(crate) fn delete_secret(&self, name: &str) -> Result<(), ApiError> {
        check_name("name", name)?;
        if !self.store.delete_secret(name)? {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no secret named {name:?}"),
            ));
        }
        let _ = std::fs::remove_file(self.secret_path(name));
        Ok(())
    }

    pub(crate) fn volumes(&self) -> Result<Vec<api::VolumeInfo>, ApiError> {
        let live: Vec<Arc<Live>> = lock(&self.live).values().cloned().collect();
        Ok(self
            .store
            .volumes()?
            .into_iter()
            .map(|(name, created_at)| api::VolumeInfo {
                in_use_by: live
                    .iter()
                    .filter(|l| {
                        l.state.borrow().status != SandboxStatus::Finished
                            && l.volumes.contains(&name)
                    })
                    .map(|l| l.id.clone())
                    .collect(),
                name,
                created_at,
            })
            .collect())
    }

    pub(crate) fn delete_volume(&self, name: &str) -> Result<(), ApiError> {
        check_name("name", name)?;
        let users: Vec<String> = lock(&self.live)
            .values()
            .filter(|l| {
                l.state.borrow().status != SandboxStatus::Finished
                    && l.volumes.iter().any(|v| v == name)
            })
            .map(|l| l.id.clone())
            .collect();
        if !users.is_empty() {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "volume {name:?} is mounted by running sandbox(es) {}",
                    users.join(", ")
                ),
            ));
        }
        let known = self.store.delete_volume(name)?;
        let p = self.volume_path(name);
        let existed = p.exists();
        if existed {
            std::fs::remove_dir_all(&p)
                .map_err(|e| internal(format!("remove volume {}: {e}", p.display())))?;
        }
        if !known && !existed {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no volume named {name:?}"),
            ));
        }
        Ok(())
    }

    /// Validate a create request and start the sandbox (asynchronously).
    pub(crate) fn create(
        self: &Arc<Self>,
        mut req: CreateSandbox,
    ) -> Result<api::SandboxInfo, ApiError> {
        let app = req.app.clone().unwrap_or_else(|| api::DEFAULT_APP.into());
        check_name("app", &app)?;
        if let Some(n) = &req.name {
            check_name("name", n)?;
            if n.len() == 25 && n.starts_with("sb-") && api::is_sandbox_id(n) {
                return Err(ApiError::invalid(
                    "name",
                    format!("{n:?}"),
                    "must not look like a sandbox id",
                ));
            }
        }
        let image = self.choose_image(req.image.as_deref())?;
        check_argv("entrypoint", &req.entrypoint, false)?;
        // The image's command as the entrypoint: known now for host, dir: and stored images
        // (a reference still to fetch is checked once it is in the store).
        if req.image_command && req.entrypoint.is_empty() {
            if let ImageChoice::Ready(r, d) = &image {
                let command = d.as_ref().map(|d| d.command.clone()).unwrap_or_default();
                if command.is_empty() {
                    return Err(ApiError::invalid(
                        "image_command",
                        "true",
                        &format!("image {r} has no Entrypoint or Cmd to run"),
                    ));
                }
                check_argv("image_command", &command, true)?;
            }
        }
        let timeout = req.timeout_secs.unwrap_or(api::DEFAULT_TIMEOUT_SECS);
        if timeout == 0 || timeout > api::MAX_TIMEOUT_SECS {
            return Err(ApiError::invalid(
                "timeout_secs",
                timeout,
                "must be 1..=86400 seconds (24 h)",
            ));
        }
        if let Some(i) = req.idle_timeout_secs {
            if i == 0 || i > api::MAX_TIMEOUT_SECS {
                return Err(ApiError::invalid(
                    "idle_timeout_secs",
                    i,
                    "must be 1..=86400 seconds",
                ));
            }
        }
        check_workdir("workdir", &req.workdir)?;
        check_env("env", &req.env)?;
        for (k, v) in &req.tags {
            if k.is_empty() || k.len() > 256 || v.len() > 1024 {
                return Err(ApiError::invalid(
                    "tags",
                    format!("{k:?}"),
                    "keys must be 1..=256 bytes and values at most 1024",
                ));
            }
        }
        if let Some(c) = req.cpu {
            if !(c.is_finite() && c > 0.0 && c <= 1024.0) {
                return Err(ApiError::invalid(
                    "cpu",
                    c,
                    "must be a positive number of cores",
                ));
            }
        }
        if let Some(m) = req.memory_mib {
            if m == 0 || m > (1 << 30) {
                return Err(ApiError::invalid("memory_mib", m, "must be at least 1 MiB"));
            }
        }
        if let Some(p) = req.pids {
            if p == 0 {
                return Err(ApiError::invalid("pids", p, "must be at least 1"));
            }
        }
        if let Some(p) = &req.readiness_probe {
            match (&p.tcp_port, &p.exec_argv) {
                (Some(0), _) => {
                    return Err(ApiError::invalid(
                        "readiness_probe.tcp_port",
                        0,
                        "must be 1..=65535",
                    ))
                }
                (Some(_), None) => {}
                (None, Some(argv)) => check_argv("readiness_probe.exec_argv", argv, true)?,
                _ => {
                    return Err(ApiError::invalid(
                        "readiness_probe",
                        serde_json::to_string(p).unwrap_or_default(),
                        "exactly one of tcp_port and exec_argv",
                    ))
                }
            }
            if p.interval_ms == Some(0) {
                return Err(ApiError::invalid(
                    "readiness_probe.interval_ms",
                    0,
                    "must be > 0",
                ));
            }
        }
        let seccomp = match req.seccomp.as_deref() {
            None | Some("default") => runtime::SeccompProfile::Default,
            Some("unconfined") => runtime::SeccompProfile::Unconfined,
            Some(p) if p.starts_with('/') => runtime::SeccompProfile::File(p.into()),
            Some(p) => {
                return Err(ApiError::invalid(
                    "seccomp",
                    format!("{p:?}"),
                    "must be default, unconfined or an absolute path to an OCI seccomp profile",
                ))
            }
        };
        if let Some(pty) = &req.pty {
            if pty.rows == 0 || pty.cols == 0 {
                return Err(ApiError::invalid(
                    "pty",
                    format!("{}x{}", pty.rows, pty.cols),
                    "rows and cols must be > 0",
                ));
            }
        }
        let mut mounts = Vec::new();
        let mut seen_paths = std::collections::HashSet::new();
        for v in &req.volumes {
            check_name("volumes.name", &v.name)?;
            if !v.path.starts_with('/')
                || v.path == "/"
                || v.path.split('/').any(|c| c == "..")
                || v.path.contains('\0')
            {
                return Err(ApiError::invalid(
                    "volumes.path",
                    format!("{:?}", v.path),
                    "must be an absolute path other than / without ..",
                ));
            }
            if !seen_paths.insert(v.path.trim_end_matches('/').to_string()) {
                return Err(ApiError::invalid(
                    "volumes.path",
                    format!("{:?}", v.path),
                    "two volumes at one path",
                ));
            }
            mounts.push(runtime::BindMount {
                source: self.volume_path(&v.name),
                target: v.path.clone(),
                read_only: v.read_only,
            });
        }
        let mut env = BTreeMap::new();
        self.resolve_secrets(&req.secrets, &mut env)?;
        env.extend(req.env.clone());
        check_process_size(&req.entrypoint, &env)?;

        // Volumes are created on first use, owned by the canonical sandbox root (uid 0).
        for v in &req.volumes {
            let p = self.volume_path(&v.name);
            if !p.exists() {
                std::fs::create_dir_all(&p)
                    .map_err(|e| internal(format!("create volume {}: {e}", p.display())))?;
            }
            self.store.touch_volume(&v.name, now())?;
        }

        req.app = Some(app.clone());
        req.timeout_secs = Some(timeout);
        // Keep secret values out of the stored config.
        let mut shown = req.clone();
        shown.secrets = req
            .secrets
            .iter()
            .map(|s| match s {
                SecretSource::Named(n) => SecretSource::Named(n.clone()),
                SecretSource::Inline(m) => {
                    SecretSource::Inline(m.keys().map(|k| (k.clone(), "***".to_string())).collect())
                }
            })
            .collect();
        // A reference still to import or pull starts from what supervise resolves it to; until
        // then the spec holds no image of its own and is never a warm shape.
        let (image, image_defaults, fetch) = match image {
            ImageChoice::Ready(r, d) => (r, d, None),
            ImageChoice::Fetch(f) => (runtime::ImageRef::Host, None, Some(f)),
        };
        let image_ref = match fetch {
            None => std::sync::OnceLock::from(image.clone()),
            Some(_) => std::sync::OnceLock::new(),
        };
        let mut spec = runtime::SandboxSpec {
            id: None,
            image,
            hostname: None,
            limits: runtime::Limits {
                memory_bytes: req.memory_mib.map(|m| m << 20),
                cpu_cores: req.cpu,
                pids_max: req.pids,
                ..Default::default()
            },
            seccomp,
            entrypoint: None,
            mounts,
            background: false,
        };
        // A warm sandbox of this shape, if one is ready: its id becomes the sandbox's.
        let warm = match fetch {
            None => warm::Shape::of(&spec).and_then(|s| self.warm.take(&s, new_sandbox_id)),
            Some(_) => None,
        };
        let id = match &warm {
            Some(w) => w.id.clone(),
            None => new_sandbox_id(),
        };
        spec.id = Some(id.clone());
        let created_at = now();
        let inserted = self.store.insert_sandbox(&store::NewSandbox {
            id: &id,
            app: &app,
            name: req.name.as_deref(),
            tags: &req.tags,
            config: &shown,
            created_at,
        });
        if let Err(e) = inserted {
            // Refused (a name taken): the warm sandbox ran nothing and nobody saw its id.
            if let (Some(w), Some(shape)) = (warm, warm::Shape::of(&spec)) {
                self.warm.put_back(&shape, w);
            }
            return Err(e);
        }
        // What the store now holds, without reading it back.
        let event = |seq, kind| Event {
            seq,
            kind,
            at: created_at,
            reason: None,
            returncode: None,
            message: None,
        };
        let info = api::SandboxInfo {
            id: id.clone(),
            app: app.clone(),
            name: req.name.clone(),
            tags: req.tags.clone(),
            status: SandboxStatus::Pending,
            created_at,
            started_at: None,
            ready_at: None,
            finished_at: None,
            returncode: None,
            end_reason: None,
            error: None,
            config: shown,
            events: vec![event(1, EventKind::Created), event(2, EventKind::Scheduled)],
        };
        let live = Arc::new(Live {
            id: id.clone(),
            volumes: req.volumes.iter().map(|v| v.name.clone()).collect(),
            config: req,
            env,
            image: match image_defaults {
                Some(d) => std::sync::OnceLock::from(d),
                None => std::sync::OnceLock::new(),
            },
            image_ref,
            ids: std::sync::OnceLock::new(),
            state: watch::Sender::new(LiveState {
                status: SandboxStatus::Pending,
                ready_at: None,
                returncode: None,
                end_reason: None,
                events: 2,
            }),
            end_req: watch::Sender::new(None),
            sandbox: Mutex::new(None),
            entry_stdout: Mutex::new(Spool::pending(
                self.output_dir(&id).join("entrypoint.stdout"),
            )),
            entry_stderr: Mutex::new(Spool::pending(
                self.output_dir(&id).join("entrypoint.stderr"),
            )),
            entry_stdin: Mutex::new(Arc::new(Stdin::none())),
            execs: Mutex::new(HashMap::new()),
            active_execs: AtomicU64::new(0),
            last_activity: Mutex::new(Instant::now()),
            activity: tokio::sync::Notify::new(),
        });
        lock(&self.live).insert(id.clone(), live.clone());
        let d = self.clone();
        let t0 = Instant::now();
        self.supervisors.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            d.clone()
                .supervise(live, spec, fetch, warm.map(|w| w.sandbox), t0)
                .await;
            d.supervisors.send_modify(|n| *n -= 1);
        });
        Ok(info)
    }

    fn event(
        &self,
        live: &Live,
        kind: EventKind,
        reason: Option<EndReason>,
        rc: Option<i32>,
        msg: Option<String>,
    ) -> f64 {
        let at = now();
        let ev = Event {
            seq: 0,
            kind,
            at,
            reason,
            returncode: rc,
            message: msg,
        };
        match self.store.add_event(&live.id, &ev) {
            Ok(seq) => {
                live.state.send_modify(|s| s.events = seq);
            }
            Err(e) => tracing::error!(sandbox = %live.id, error = %e, "could not record an event"),
        }
        at
    }

    fn process_env(&self, live: &Live, extra: &BTreeMap<String, String>) -> Vec<(String, String)> {
        let mut env = live.base_env();
        env.extend(extra.clone());
        env.into_iter().collect()
    }

    async fn supervise(
        self: Arc<Self>,
        live: Arc<Live>,
        mut spec: runtime::SandboxSpec,
        fetch: Option<FetchImage>,
        warm: Option<runtime::Sandbox>,
        t0: Instant,
    ) {
        // Subscribed before the start, so a terminate while pending is seen after it.
        let mut end_rx = live.end_req.subscribe();
        // An image to import or pull first; a terminate meanwhile ends the wait (a pull left
        // behind goes on from its partial blobs next time).
        if let Some(f) = fetch {
            let log = Arc::new(PullLog {
                sandbox: live.id.clone(),
                image: f.text.clone(),
            });
            let resolved = tokio::select! {
                r = self.resolve_image(&live.id, &f, log, false) => Some(r),
                _ = end_rx.wait_for(|r| r.is_some()) => None,
            };
            let Some(resolved) = resolved else {
                let reason = (*end_rx.borrow()).unwrap_or(EndReason::Terminated);
                let rc = match reason {
                    EndReason::Timeout => 124,
                    EndReason::IdleTimeout => 0,
                    _ => 137,
                };
                self.finish(&live, reason, rc, None).await;
                return;
            };
            match resolved {
                Ok(rec) => {
                    tracing::info!(sandbox = %live.id, image = %f.text, image_id = %rec.id, "image resolved");
                    let _ = live.image.set(ImageDefaults::of(&rec.config));
                    let _ = live
                        .image_ref
                        .set(runtime::ImageRef::Stored(rec.id.clone()));
                    spec.image = runtime::ImageRef::Stored(rec.id);
                }
                Err(e) => {
                    self.finish(
                        &live,
                        EndReason::Error,
                        1,
                        Some(format!("image {}: {}", f.text, e.message)),
                    )
                    .await;
                    return;
                }
            }
        }
        let out_dir = self.output_dir(&live.id);
        if let Err(e) = std::fs::create_dir_all(&out_dir) {
            self.finish(
                &live,
                EndReason::Error,
                1,
                Some(format!("create {}: {e}", out_dir.display())),
            )
            .await;
            return;
        }
        // The create's entrypoint, else (image_command) the image's Entrypoint + Cmd.
        let entry_argv = if !live.config.entrypoint.is_empty() {
            live.config.entrypoint.clone()
        } else if live.config.image_command {
            let command = live
                .image
                .get()
                .map(|d| d.command.clone())
                .unwrap_or_default();
            let image = live.config.image.as_deref().unwrap_or("host");
            let bad = if command.is_empty() {
                Some(format!(
                    "image_command: image {image} has no Entrypoint or Cmd to run"
                ))
            } else {
                check_argv("image_command", &command, true)
                    .and_then(|_| check_process_size(&command, &live.base_env()))
                    .err()
                    .map(|e| e.message)
            };
            if let Some(msg) = bad {
                self.finish(&live, EndReason::Error, 1, Some(msg)).await;
                return;
            }
            command
        } else {
            Vec::new()
        };
        let user = live.image.get().and_then(|d| d.user.clone());
        let mut entry_spec = None;
        if !entry_argv.is_empty() {
            entry_spec = Some(ExecSpec {
                argv: entry_argv,
                env: self.process_env(&live, &BTreeMap::new()),
                cwd: live.workdir(),
                stdin: if live.config.stdin {
                    Stdio::Pipe
                } else {
                    Stdio::Null
                },
                pty: live.config.pty.map(|p| runtime::PtySize {
                    rows: p.rows,
                    cols: p.cols,
                }),
                ..Default::default()
            });
        }
        let rt = self.rt.clone();
        let workdir = live.workdir();
        // The workdir is made (as sandbox root, mkdir -p) before the entrypoint starts in it, as
        // Docker and runc do for a missing working directory.
        // A warm sandbox with nothing to change needs no blocking work at all.
        let trivial = spec.limits == runtime::Limits::default()
            && workdir.is_none()
            && entry_spec.is_none()
            && user.is_none();
        let live2 = live.clone();
        let spawned = match warm {
            Some(sb) if trivial => Ok(Ok(Ok(sb))),
            warm => tokio::task::spawn_blocking(move || {
            let sb = match warm {
                // Started ahead of time with default limits: this create's go into its cgroup.
                Some(sb) => {
                    if spec.limits != runtime::Limits::default() {
                        if let Err(e) = sb.set_limits(&spec.limits) {
                            let _ = sb.destroy();
                            return Err(e);
                        }
                    }
                    sb
                }
                None => runtime::Sandbox::spawn(&rt, spec)?,
            };
            // The image's User, looked up in the image's own /etc/passwd and /etc/group:
            // the entrypoint, execs and probes run as it.
            if let Some(u) = &user {
                match resolve_user(&sb, u) {
                    Ok(ids) => {
                        let _ = live2.ids.set(ids);
                    }
                    Err(msg) => {
                        let _ = sb.destroy();
                        return Ok(Err(msg));
                    }
                }
            }
            if let Some(w) = &workdir {
                if let Err(e) = sb.fs().mkdir(w, true) {
                    tracing::warn!(sandbox = %sb.id(), workdir = %w, error = %e, "could not create the workdir");
                }
            }
            if let Some(mut e) = entry_spec {
                (e.uid, e.gid) = live2.user_ids();
                sb.start_entrypoint(e)?;
            }
            Ok::<_, runtime::RuntimeError>(Ok(sb))
        })
        .await,
        };
        let sb = match spawned {
            Ok(Ok(Ok(sb))) => Arc::new(sb),
            Ok(Ok(Err(msg))) => {
                self.finish(&live, EndReason::Error, 1, Some(msg)).await;
                return;
            }
            Ok(Err(e)) => {
                self.finish(
                    &live,
                    EndReason::Error,
                    1,
                    Some(format!("start failed: {e}")),
                )
                .await;
                return;
            }
            Err(e) => {
                self.finish(
                    &live,
                    EndReason::Error,
                    1,
                    Some(format!("start panicked: {e}")),
                )
                .await;
                return;
            }
        };
        let entry_out = lock(&live.entry_stdout).clone();
        let entry_err = lock(&live.entry_stderr).clone();
        if let Some(mut p) = sb.take_entrypoint() {
            let pumped = (|| -> Result<(), ApiError> {
                if let Some(master) = p.pty.as_ref() {
                    let m = master.try_clone().map_err(internal)?;
                    let w = master.try_clone().map_err(internal)?;
                    entry_out.attach(m)?;
                    entry_err.close();
                    if live.config.stdin {
                        *lock(&live.entry_stdin) = Arc::new(Stdin::new(w)?);
                    }
                } else {
                    match p.stdout.take() {
                        Some(o) => entry_out.attach(o)?,
                        None => entry_out.close(),
                    }
                    match p.stderr.take() {
                        Some(e) => entry_err.attach(e)?,
                        None => entry_err.close(),
                    }
                    if let Some(i) = p.stdin.take() {
                        *lock(&live.entry_stdin) = Arc::new(Stdin::new(i)?);
                    }
                }
                Ok(())
            })();
            if let Err(e) = pumped {
                tracing::error!(sandbox = %live.id, error = %e, "entrypoint output");
                entry_out.close();
                entry_err.close();
            }
            // Keep the process (its exit report feeds the sandbox's OOM attribution).
            let pr = Arc::new(Mutex::new(p));
            let pr2 = pr.clone();
            drop(waiter_thread("sbx-entry-wait", move || {
                let _ = lock(&pr2).wait();
            }));
        } else {
            entry_out.close();
            entry_err.close();
        }
        *lock(&live.sandbox) = Some(sb.clone());
        self.create_latency.observe(t0.elapsed());
        live.touch();
        // Running first (a waiting exec goes ahead), then the record; readers of the store
        // see the live status meanwhile (see `Daemon::info`).
        live.state
            .send_modify(|s| s.status = SandboxStatus::Running);
        self.event(&live, EventKind::Started, None, None, None);
        tracing::info!(sandbox = %live.id, ms = t0.elapsed().as_secs_f64() * 1e3, "started");

        if let Some(p) = live.config.readiness_probe.clone() {
            let d = self.clone();
            let l = live.clone();
            let s = sb.clone();
            tokio::spawn(async move { d.probe(l, s, p).await });
        }

        let sbw = sb.clone();
        let waited = waiter_thread("sbx-sandbox-wait", move || sbw.wait());
        tokio::pin!(waited);
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(
                live.config
                    .timeout_secs
                    .unwrap_or(api::DEFAULT_TIMEOUT_SECS),
            );
        let idle = live.config.idle_timeout_secs.map(Duration::from_secs);
        let mut requested: Option<EndReason> = None;
        let exit = loop {
            // A reason asked for at any time (also while the sandbox was still starting)
            // ends it once: kill, then wait for the exit below.
            if requested.is_none() {
                let asked = *end_rx.borrow_and_update();
                if let Some(reason) = asked {
                    requested = Some(reason);
                    let s = sb.clone();
                    let _ = tokio::task::spawn_blocking(move || s.kill()).await;
                }
            }
            // While an exec runs the sandbox is active: look again in a second (an exec's end
            // also wakes us through `activity`); idle, the deadline is last activity + idle.
            let idle_at = idle.map(|i| {
                if live.active_execs.load(Ordering::SeqCst) > 0 {
                    tokio::time::Instant::now() + Duration::from_secs(1)
                } else {
                    tokio::time::Instant::from_std(*lock(&live.last_activity) + i)
                }
            });
            tokio::select! {
                r = &mut waited => break r,
                _ = tokio::time::sleep_until(deadline), if requested.is_none() => {
                    live.request_end(EndReason::Timeout);
                }
                _ = end_rx.changed(), if requested.is_none() => {}
                _ = async {
                    match idle_at {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                }, if requested.is_none() => {
                    if live.active_execs.load(Ordering::SeqCst) == 0
                        && lock(&live.last_activity).elapsed() >= idle.unwrap_or_default()
                    {
                        live.request_end(EndReason::IdleTimeout);
                    }
                }
                _ = live.activity.notified(), if idle.is_some() && requested.is_none() => {}
            }
        };
        let (reason, rc, msg) = match (requested, exit) {
            (Some(EndReason::Timeout), _) => (EndReason::Timeout, 124, None),
            (Some(EndReason::IdleTimeout), _) => (EndReason::IdleTimeout, 0, None),
            (Some(r), _) => (r, 137, None),
            (None, Ok(Ok(e))) if e.oom => (EndReason::Oom, e.code(), None),
            (None, Ok(Ok(e))) => (EndReason::Exited, e.code(), None),
            (None, Ok(Err(e))) => (EndReason::Error, 1, Some(format!("wait failed: {e}"))),
            (None, Err(e)) => (EndReason::Error, 1, Some(format!("wait panicked: {e}"))),
        };
        // Let go of our handle, so finish() holds the last one and tears down right away.
        drop(sb);
        self.finish(&live, reason, rc, msg).await;
    }

    async fn finish(&self, live: &Arc<Live>, reason: EndReason, rc: i32, msg: Option<String>) {
        if live.sandbox().is_none() {
            // It never started: its entrypoint streams end empty.
            lock(&live.entry_stdout).close();
            lock(&live.entry_stderr).close();
        }
        if let Some(m) = &msg {
            tracing::warn!(sandbox = %live.id, reason = reason.as_str(), message = %m, "finished");
        } else {
            tracing::info!(sandbox = %live.id, reason = reason.as_str(), returncode = rc, "finished");
        }
        let at = self.event(live, EventKind::Finished, Some(reason), Some(rc), msg);
        let _ = at;
        live.state.send_modify(|s| {
            s.status = SandboxStatus::Finished;
            s.returncode = Some(rc);
            s.end_reason = Some(reason);
        });
        // Its processes are dead or about to be: nobody is left to back-pressure, so every
        // pump drains its pipe to EOF whether or not anyone reads.
        let spools: Vec<Arc<Spool>> = {
            let mut v = vec![
                lock(&live.entry_stdout).clone(),
                lock(&live.entry_stderr).clone(),
            ];
            for cell in lock(&live.execs).values() {
                if let Some(Ok(e)) = cell.get() {
                    v.push(e.stdout.clone());
                    v.push(e.stderr.clone());
                }
            }
            v
        };
        for sp in &spools {
            sp.release();
        }
        // Tear down. Other holders of the handle (an exec starting, a probe) let go within
        // moments; if one does not, the last holder's drop tears it down.
        let sb = lock(&live.sandbox).take();
        if let Some(mut sb) = sb {
            let id = live.id.clone();
            let mut tries = 0;
            let owned = loop {
                match Arc::try_unwrap(sb) {
                    Ok(s) => break Some(s),
                    Err(shared) if tries < 100 => {
                        sb = shared;
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(shared) => {
                        tracing::warn!(sandbox = %id, "still in use: its last holder tears it down");
                        drop(shared);
                        break None;
                    }
                }
            };
            if let Some(owned) = owned {
                let r = tokio::task::spawn_blocking(move || owned.destroy()).await;
                if let Ok(Err(e)) = r {
                    tracing::error!(sandbox = %id, error = %e, "teardown");
                }
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::future::join_all(spools.iter().map(|s| s.wait_eof())),
        )
        .await;
        // Exec records still running ended with the sandbox (their waiters record the exact
        // status as the pipes close; this covers any that never will). Queued exec records
        // land first, so none is left `running` behind this.
        self.store_flush().await;
        let _ = self.store.end_running_execs(&live.id, now());
    }

    async fn probe(self: Arc<Self>, live: Arc<Live>, sb: Arc<runtime::Sandbox>, p: api::Probe) {
        let interval =
            Duration::from_millis(p.interval_ms.unwrap_or(api::DEFAULT_PROBE_INTERVAL_MS));
        let give_up = Instant::now() + Duration::from_secs(api::PROBE_DEADLINE_SECS);
        let mut state = live.state.subscribe();
        while Instant::now() < give_up {
            if state.borrow_and_update().status == SandboxStatus::Finished {
                return;
            }
            let s = sb.clone();
            let ok = if let Some(port) = p.tcp_port {
                tokio::task::spawn_blocking(move || {
                    s.tcp_connect(port, Duration::from_millis(500)).is_ok()
                })
                .await
                .unwrap_or(false)
            } else if let Some(argv) = p.exec_argv.clone() {
                let env = self.process_env(&live, &BTreeMap::new());
                let cwd = live.workdir();
                let (uid, gid) = live.user_ids();
                waiter_thread("sbx-probe", move || {
                    let spec = ExecSpec {
                        argv,
                        env,
                        cwd,
                        uid,
                        gid,
                        stdin: Stdio::Null,
                        stdout: Stdio::Null,
                        stderr: Stdio::Null,
                        ..Default::default()
                    };
                    match s.exec(spec) {
                        Ok(mut pr) => matches!(pr.wait(), Ok(e) if e.code() == 0),
                        Err(_) => false,
                    }
                })
                .await
                .unwrap_or(false)
            } else {
                return;
            };
            if ok {
                let at = self.event(&live, EventKind::Ready, None, None, None);
                live.state.send_modify(|s| s.ready_at = Some(at));
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = state.changed() => {}
            }
        }
        tracing::warn!(sandbox = %live.id, "readiness probe gave up after 5 minutes");
    }

    /// Wait (up to `timeout`) for a pending sandbox to start; the live handle if it runs.
    /// A sandbox's record, with the live status when the store has not caught up yet (a
    /// sandbox is marked running before its Started event is written).
    pub(crate) fn info(&self, id: &str) -> Result<api::SandboxInfo, ApiError> {
        let mut info = self.store.sandbox(id)?;
        if info.status == SandboxStatus::Pending {
            if let Some(l) = self.live(id) {
                let st = l.state.borrow().status;
                if st == SandboxStatus::Running {
                    info.status = st;
                }
            }
        }
        Ok(info)
    }

    pub(crate) async fn running(&self, id: &str, what: &str) -> Result<Arc<Live>, ApiError> {
        let Some(live) = self.live(id) else {
            self.store.sandbox(id)?;
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("sandbox {id} has finished: cannot {what}"),
            ));
        };
        let mut rx = live.state.subscribe();
        let st = rx
            .wait_for(|s| s.status != SandboxStatus::Pending)
            .await
            .map(|s| s.status)
            .unwrap_or(SandboxStatus::Finished);
        if st == SandboxStatus::Finished {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("sandbox {id} has finished: cannot {what}"),
            ));
        }
        Ok(live)
    }

    pub(crate) async fn terminate(
        &self,
        id: &str,
        wait: bool,
    ) -> Result<api::WaitResult, ApiError> {
        if let Some(live) = self.live(id) {
            live.request_end(EndReason::Terminated);
            if wait {
                return self.wait(id, api::MAX_LONG_POLL_SECS * 10.0).await;
            }
        }
        self.wait(id, 0.0).await
    }

    pub(crate) async fn wait(&self, id: &str, timeout: f64) -> Result<api::WaitResult, ApiError> {
        if let Some(live) = self.live(id) {
            let mut rx = live.state.subscribe();
            let dur = Duration::from_secs_f64(timeout.clamp(0.0, 3600.0));
            let _ = tokio::time::timeout(dur, rx.wait_for(|s| s.status == SandboxStatus::Finished))
                .await;
            let s = live.state.borrow().clone();
            return Ok(api::WaitResult {
                finished: s.status == SandboxStatus::Finished,
                returncode: s.returncode,
                end_reason: s.end_reason,
            });
        }
        let info = self.store.sandbox(id)?;
        Ok(api::WaitResult {
            finished: info.status == SandboxStatus::Finished,
            returncode: info.returncode,
            end_reason: info.end_reason,
        })
    }

    pub(crate) async fn wait_until_ready(
        &self,
        id: &str,
        timeout: f64,
    ) -> Result<api::Ready, ApiError> {
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(ApiError::invalid("timeout_secs", timeout, "must be > 0"));
        }
        let info = self.store.sandbox(id)?;
        if info.config.readiness_probe.is_none() {
            return Err(ApiError::new(
                ErrorCode::Invalid,
                format!("sandbox {id} has no readiness probe"),
            ));
        }
        if let Some(r) = info.ready_at {
            return Ok(api::Ready { ready_at: r });
        }
        let Some(live) = self.live(id) else {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("sandbox {id} has finished"),
            ));
        };
        let mut rx = live.state.subscribe();
        let r = tokio::time::timeout(
            Duration::from_secs_f64(timeout.min(86400.0)),
            rx.wait_for(|s| s.ready_at.is_some() || s.status == SandboxStatus::Finished),
        )
        .await
        .map(|r| r.map(|_| ()));
        let s = live.state.borrow().clone();
        match (r, s.ready_at) {
            (_, Some(at)) => Ok(api::Ready { ready_at: at }),
            (Ok(_), None) => Err(ApiError::new(
                ErrorCode::Conflict,
                format!("sandbox {id} finished before it was ready"),
            )),
            (Err(_), None) => Err(ApiError::new(
                ErrorCode::Timeout,
                format!("sandbox {id} was not ready within {timeout} s"),
            )),
        }
    }

    /// Delete a sandbox: terminate it if running, then forget it and its output.
    pub(crate) async fn delete(&self, id: &str) -> Result<(), ApiError> {
        if let Some(live) = self.live(id) {
            live.request_end(EndReason::Terminated);
            let mut rx = live.state.subscribe();
            let _ = rx.wait_for(|s| s.status == SandboxStatus::Finished).await;
            lock(&self.live).remove(id);
        } else {
            self.store.sandbox(id)?;
        }
        // Exec records still queued would land after the delete, as orphans.
        self.store_flush().await;
        self.store.delete_sandbox(id)?;
        let dir = self.output_dir(id);
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    /// Start an exec (or return the one with the same exec_id).
    pub(crate) async fn exec(
        self: &Arc<Self>,
        id: &str,
        req: ExecRequest,
    ) -> Result<(ExecInfo, bool), ApiError> {
        if let Some(e) = &req.exec_id {
            if e.is_empty() || e.len() > 63 || !api::valid_name(e) {
                return Err(ApiError::invalid(
                    "exec_id",
                    format!("{e:?}"),
                    "must match ^[A-Za-z0-9._-]{1,63}$",
                ));
            }
        }
        check_argv("argv", &req.argv, true)?;
        check_workdir("workdir", &req.workdir)?;
        check_env("env", &req.env)?;
        if req.timeout_secs == Some(0) {
            return Err(ApiError::invalid("timeout_secs", 0, "must be > 0"));
        }
        if req.stdout == StreamMode::Stdout {
            return Err(ApiError::invalid(
                "stdout",
                "\"stdout\"",
                "only stderr can go to stdout",
            ));
        }
        if let Some(p) = &req.pty {
            if p.rows == 0 || p.cols == 0 {
                return Err(ApiError::invalid(
                    "pty",
                    format!("{}x{}", p.rows, p.cols),
                    "rows and cols must be > 0",
                ));
            }
        }
        // A retry of an exec that started already returns it, even once the sandbox ended.
        // While the sandbox lives, every exec it started is in its live map (the store is
        // only asked once it ended: clients send an exec id with every exec).
        if let Some(x) = &req.exec_id {
            match self.live(id) {
                Some(live) => {
                    if let Some(Ok(e)) = lock(&live.execs).get(x).and_then(|c| c.get()) {
                        return Ok((e.info.borrow().clone(), false));
                    }
                }
                None => {
                    if let Ok(info) = self.store.exec(id, x) {
                        return Ok((info, false));
                    }
                }
            }
        }
        let live = self.running(id, "exec").await?;
        let exec_id = req.exec_id.clone().unwrap_or_else(|| random_id("ex-", 16));
        let (cell, fresh) = {
            let mut m = lock(&live.execs);
            match m.get(&exec_id) {
                Some(c) => (c.clone(), false),
                None => {
                    let c = Arc::new(tokio::sync::OnceCell::new());
                    m.insert(exec_id.clone(), c.clone());
                    (c, true)
                }
            }
        };
        let r = cell
            .get_or_init(|| self.start_exec(live.clone(), exec_id.clone(), req))
            .await
            .clone();
        match r {
            Ok(e) => Ok((e.info.borrow().clone(), fresh)),
            Err(err) => {
                if fresh {
                    lock(&live.execs).remove(&exec_id);
                }
                Err(err)
            }
        }
    }

    async fn start_exec(
        self: &Arc<Self>,
        live: Arc<Live>,
        exec_id: String,
        req: ExecRequest,
    ) -> Result<Arc<ExecLive>, ApiError> {
        let sb = live.sandbox().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Conflict,
                format!("sandbox {} has finished", live.id),
            )
        })?;
        let mut extra = BTreeMap::new();
        self.resolve_secrets(&req.secrets, &mut extra)?;
        extra.extend(req.env.clone());
        if req.pty.is_some() {
            extra.insert(
                "TERM".into(),
                req.term.clone().unwrap_or_else(|| "xterm-256color".into()),
            );
        }
        let mut all_env = live.base_env();
        all_env.extend(extra.clone());
        check_process_size(&req.argv, &all_env)?;
        let env = self.process_env(&live, &extra);
        let want_stdin = req.stdin.unwrap_or(true);
        let (uid, gid) = live.user_ids();
        let spec = ExecSpec {
            argv: req.argv.clone(),
            env,
            cwd: req.workdir.clone().or_else(|| live.workdir()),
            uid,
            gid,
            stdin: if want_stdin { Stdio::Pipe } else { Stdio::Null },
            stdout: match req.stdout {
                StreamMode::Devnull => Stdio::Null,
                _ => Stdio::Pipe,
            },
            stderr: match req.stderr {
                StreamMode::Devnull => Stdio::Null,
                StreamMode::Stdout => Stdio::MergeWithStdout,
                StreamMode::Pipe => Stdio::Pipe,
            },
            pty: req.pty.map(|p| runtime::PtySize {
                rows: p.rows,
                cols: p.cols,
            }),
        };
        let t0 = Instant::now();
        live.active_execs.fetch_add(1, Ordering::SeqCst);
        live.touch();
        self.warm.touch();
        let started = start_runtime_exec(sb, spec).await;
        tracing::debug!(
            us = t0.elapsed().as_micros() as u64,
            "exec started (with hop)"
        );
        let mut p = match started {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                live.touch();
                live.active_execs.fetch_sub(1, Ordering::SeqCst);
                live.touch();
                let code = match e {
                    runtime::RuntimeError::Finished(_) => ErrorCode::Conflict,
                    runtime::RuntimeError::Invalid { .. } => ErrorCode::Invalid,
                    runtime::RuntimeError::Exec { errno, .. }
                        if errno == libc::ENOENT
                            || errno == libc::EACCES
                            || errno == libc::ENOTDIR =>
                    {
                        ErrorCode::NotFound
                    }
                    // fork failed: the sandbox is at its pids (or memory) limit.
                    runtime::RuntimeError::Exec { errno, .. }
                        if errno == libc::EAGAIN || errno == libc::ENOMEM =>
                    {
                        ErrorCode::ResourceExhausted
                    }
                    _ => ErrorCode::Internal,
                };
                return Err(ApiError::new(code, e.to_string()));
            }
            Err(e) => {
                live.touch();
                live.active_execs.fetch_sub(1, Ordering::SeqCst);
                live.touch();
                return Err(internal(format!("exec panicked: {e}")));
            }
        };
        self.exec_latency.observe(t0.elapsed());
        let dir = self.output_dir(&live.id);
        let pty = p.pty.is_some();
        // The master stays in the Process too (resize needs it); the pump and stdin get copies.
        // If that fails, the process runs with nobody to read it: kill it and report.
        let plumbed = (|| -> Result<(Arc<Spool>, Arc<Spool>, Stdin), ApiError> {
            Ok(if let Some(master) = p.pty.as_ref() {
                let m = master.try_clone().map_err(internal)?;
                let w = master.try_clone().map_err(internal)?;
                (
                    Spool::pump(dir.join(format!("exec-{exec_id}.stdout")), m)?,
                    Spool::empty(),
                    if want_stdin {
                        Stdin::new(w)?
                    } else {
                        Stdin::none()
                    },
                )
            } else {
                (
                    match p.stdout.take() {
                        Some(o) => Spool::pump(dir.join(format!("exec-{exec_id}.stdout")), o)?,
                        None => Spool::empty(),
                    },
                    match p.stderr.take() {
                        Some(e) => Spool::pump(dir.join(format!("exec-{exec_id}.stderr")), e)?,
                        None => Spool::empty(),
                    },
                    match p.stdin.take() {
                        Some(i) => Stdin::new(i)?,
                        None => Stdin::none(),
                    },
                )
            })
        })();
        let (stdout, stderr, stdin) = match plumbed {
            Ok(x) => x,
            Err(e) => {
                let _ = p.signal(libc::SIGKILL);
                live.touch();
                live.active_execs.fetch_sub(1, Ordering::SeqCst);
                live.touch();
                return Err(e);
            }
        };
        let info = ExecInfo {
            exec_id: exec_id.clone(),
            sandbox_id: live.id.clone(),
            argv: req.argv.clone(),
            status: ExecStatus::Running,
            returncode: None,
            signal: None,
            timed_out: false,
            oom: false,
            started_at: now(),
            finished_at: None,
            stdout: if pty { StreamMode::Pipe } else { req.stdout },
            stderr: if pty { StreamMode::Stdout } else { req.stderr },
            pty,
        };
        // Recorded behind the reply: while the sandbox lives its execs are answered from
        // memory, and its end flushes the queue before the store is asked.
        let rec = info.clone();
        self.store_later(move |st| {
            if let Err(err) = st.insert_exec(&rec) {
                tracing::error!(error = %err, exec = %rec.exec_id, "record exec start");
            }
        });
        let e = Arc::new(ExecLive {
            info: watch::Sender::new(info),
            stdout,
            stderr,
            stdin,
            process: Arc::new(std::sync::RwLock::new(p)),
        });
        // The waiter: the exit report arrives on the process's connection to init, watched by
        // the async reactor (no thread per exec).
        let d = self.clone();
        let ex = e.clone();
        let timeout = req.timeout_secs.map(Duration::from_secs);
        tokio::spawn(async move {
            let (exit, timed_out) = wait_exit(ex.process.clone(), timeout).await;
            let (rc, sig, oom) = match exit {
                Some(x) => (
                    x.code(),
                    match x.status {
                        runtime::WaitStatus::Signal(s) => Some(s),
                        _ => None,
                    },
                    x.oom,
                ),
                None => (137, Some(9), false),
            };
            let mut info = ex.info.borrow().clone();
            info.status = ExecStatus::Exited;
            info.returncode = Some(rc);
            info.signal = sig;
            info.timed_out = timed_out;
            info.oom = oom;
            info.finished_at = Some(now());
            ex.info.send_replace(info.clone());
            d.store_later(move |st| {
                if let Err(err) = st.finish_exec(&info) {
                    tracing::error!(error = %err, exec = %info.exec_id, "record exec exit");
                }
            });
            // After the exit is recorded: a stdin write blocked on this process gives up.
            ex.stdin.close();
            // Activity first: the supervisor must never see no exec running with an old
            // last-activity time (it would end the sandbox the moment this exec exits).
            live.touch();
            live.active_execs.fetch_sub(1, Ordering::SeqCst);
            live.touch();
            d.warm.touch();
        });
        Ok(e)
    }

    /// The live exec, if sbxd still has it.
    pub(crate) fn exec_live(&self, id: &str, exec_id: &str) -> Option<Arc<ExecLive>> {
        let live = self.live(id)?;
        let m = lock(&live.execs);
        match m.get(exec_id)?.get() {
            Some(Ok(e)) => Some(e.clone()),
            _ => None,
        }
    }

    pub(crate) async fn exec_wait(
        &self,
        id: &str,
        exec_id: &str,
        timeout: f64,
    ) -> Result<ExecInfo, ApiError> {
        if let Some(e) = self.exec_live(id, exec_id) {
            let mut rx = e.info.subscribe();
            let _ = tokio::time::timeout(
                Duration::from_secs_f64(timeout.clamp(0.0, 3600.0)),
                rx.wait_for(|i| i.status == ExecStatus::Exited),
            )
            .await;
            return Ok(e.info.borrow().clone());
        }
        self.store.exec(id, exec_id)
    }

    /// An output stream of an exec or (exec_id None) of the entrypoint. A finished one that
    /// sbxd no longer holds is read from its spool file, complete.
    pub(crate) fn stream(
        &self,
        id: &str,
        exec_id: Option<&str>,
        stderr: bool,
    ) -> Result<Arc<Spool>, ApiError> {
        match exec_id {
            None => {
                if let Some(live) = self.live(id) {
                    return Ok(if stderr {
                        lock(&live.entry_stderr).clone()
                    } else {
                        lock(&live.entry_stdout).clone()
                    });
                }
                self.store.sandbox(id)?;
                Ok(Spool::finished(self.output_dir(id).join(if stderr {
                    "entrypoint.stderr"
                } else {
                    "entrypoint.stdout"
                })))
            }
            Some(x) => {
                if let Some(e) = self.exec_live(id, x) {
                    return Ok(if stderr {
                        e.stderr.clone()
                    } else {
                        e.stdout.clone()
                    });
                }
                self.store.exec(id, x)?;
                Ok(Spool::finished(self.output_dir(id).join(format!(
                    "exec-{x}.{}",
                    if stderr { "stderr" } else { "stdout" }
                ))))
            }
        }
    }

    /// Terminate every running sandbox (sbxd is stopping; adoption across restarts comes later).
    pub async fn shutdown(&self) {
        let all: Vec<Arc<Live>> = lock(&self.live).values().cloned().collect();
        for l in &all {
            l.request_end(EndReason::Terminated);
        }
        // Every supervisor tears its sandbox down before it ends.
        let mut rx = self.supervisors.subscribe();
        if tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::error!("sandboxes still tearing down after 30 s; stopping anyway");
        }
        self.warm.close().await;
        self.store_flush().await;
        let _ = tokio::task::spawn_blocking(|| {
            for e in runtime::janitor::flush() {
                tracing::error!(error = %e, "cleanup");
            }
        })
        .await;
    }
}

/// Run sbxd in the foreground until SIGINT/SIGTERM.
pub fn run(cfg: DaemonConfig) -> Result<(), String> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SBX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sbxd")
        .build()
        .map_err(|e| format!("start the async runtime: {e}"))?;
    let r = rt.block_on(async move {
        let d = Daemon::open(cfg)?;
        server::serve(d).await
    });
    drop(rt);
    // Teardown work queued by the last sandboxes (cgroup and directory removal).
    for e in runtime::janitor::flush() {
        tracing::error!(error = %e, "cleanup");
    }
    r
}

/// Entry point of the `sbxd` binary: `sbxd [--socket PATH] [--state-dir DIR] [--run-dir DIR]`
/// (also `SBX_SOCKET`, `SBX_STATE_DIR`, `SBX_RUN_DIR`).
pub fn main_from_args(args: Vec<std::ffi::OsString>) -> std::process::ExitCode {
    let mut cfg = DaemonConfig::default();
    if let Some(s) = std::env::var_os("SBX_SOCKET") {
        cfg.socket = s.into();
    }
    if let Some(s) = std::env::var_os("SBX_STATE_DIR") {
        cfg.state_dir = s.into();
    }
    if let Some(s) = std::env::var_os("SBX_RUN_DIR") {
        cfg.run_dir = s.into();
    }
    match std::env::var("SBX_WARM").map(|v| (v.parse::<usize>(), v)) {
        Ok((Ok(n), _)) if n <= 64 => cfg.warm = n,
        Ok((_, v)) => {
            eprintln!("sbxd: SBX_WARM={v:?}: must be a number of sandboxes from 0 to 64");
            return std::process::ExitCode::from(2);
        }
        Err(_) => {}
    }
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let a = a.to_string_lossy().into_owned();
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().map(|v| v.to_string_lossy().into_owned()))
        };
        match flag.as_str() {
            "--socket" => cfg.socket = value().unwrap_or_default().into(),
            "--state-dir" => cfg.state_dir = value().unwrap_or_default().into(),
            "--run-dir" => cfg.run_dir = value().unwrap_or_default().into(),
            "--warm" => match value().map(|v| (v.parse::<usize>(), v)) {
                Some((Ok(n), _)) if n <= 64 => cfg.warm = n,
                other => {
                    eprintln!(
                        "sbxd: --warm {:?}: must be a number of sandboxes from 0 to 64",
                        other.map(|(_, v)| v).unwrap_or_default()
                    );
                    return std::process::ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("sbxd: the sbx sandbox daemon\n\nUsage: sbxd [--socket PATH] [--state-dir DIR] [--run-dir DIR] [--warm N]\n\n  --socket PATH     Unix socket to serve (env SBX_SOCKET; default {})\n  --state-dir DIR   persistent state (env SBX_STATE_DIR; default /var/lib/sbx)\n  --run-dir DIR     runtime files (env SBX_RUN_DIR; default /run/sbx)\n  --warm N          sandboxes started ahead of time for each of the 2 most recent\n                    shapes (image + seccomp profile) of creates (env SBX_WARM; default {}; 0 = off)\n\nLogs go to stderr; SBX_LOG sets the filter (e.g. debug).", api::DEFAULT_SOCKET, DEFAULT_WARM);
                return std::process::ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("sbxd {}", env!("CARGO_PKG_VERSION"));
                return std::process::ExitCode::SUCCESS;
            }
            other => {
                eprintln!("sbxd: unknown argument {other:?} (see sbxd --help)");
                return std::process::ExitCode::from(2);
            }
        }
    }
    match run(cfg) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sbxd: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
