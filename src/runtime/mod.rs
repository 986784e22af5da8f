//! The isolation runtime: spawn a sandbox (fresh namespaces, overlay rootfs, cgroup limits,
//! seccomp, Docker's capability set), exec processes in it, and tear it down without leaks.
//!
//! Process model: the caller (the daemon, a test) spawns `sbx-init` as a single-threaded
//! helper; the helper builds the rootfs in a private mount namespace and clones init (pid 1) into
//! new user/pid/mount/net/uts/ipc namespaces; init joins a new cgroup namespace, pivots into the
//! rootfs and serves exec requests on a control socket bound at a host path. Execs connect to
//! that socket directly, so an exec is one connect + one clone (vfork-style) + one execve.

pub mod capabilities;
pub mod cgroups;
pub mod fs;
pub mod helper;
pub mod idmap;
pub mod init;
pub mod janitor;
pub mod pool;
pub mod proto;
pub mod seccomp;
pub mod sys;

pub use cgroups::Limits;

/// Nice value of work done ahead of time or after the fact (pre-forking helpers, teardown).
pub const BACKGROUND_NICE: i32 = 10;

/// Nice value of a sandbox's helper and init while the sandbox is in use. Every process init
/// starts goes back to nice 0 before its execve, so init — which only accepts, starts and
/// reaps — runs first when it wakes on a CPU where one of its processes runs (otherwise an
/// exec's start or exit report waits for that process's time slice; measured up to 0.6 ms).
/// Inside the sandbox's cgroup this only orders init before its own processes.
pub const INIT_NICE: i32 = -5;

/// Put the calling thread at background priority ([`BACKGROUND_NICE`]) or back to normal
/// (nice 0, needs CAP_SYS_NICE). Linux keeps nice per thread; what the thread forks inherits it.
pub fn set_thread_background(background: bool) {
    let _ = sys::set_thread_nice(if background { BACKGROUND_NICE } else { 0 });
}

pub use fs::{FileStat, FileType, FsError, FsErrorKind, SandboxFs};
pub use proto::VolumeMount as BindMount;
pub use proto::WaitStatus;
pub use rootfs_fetch::ImageRef;
pub use seccomp::SeccompProfile;

use proto::{ExecEvent, ExecRequest, HelperConfig, HelperEvent, Request, RootfsPlan, StdioWire};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};

/// Where a runtime keeps its files and finds its helper binary.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Persistent state: image skeletons, per-sandbox writable layers. Default `/var/lib/sbx`.
    pub state_dir: PathBuf,
    /// Runtime files: control sockets, rootfs mount points, uid range slots. Default `/run/sbx`.
    pub run_dir: PathBuf,
    /// The `sbx-init` binary (helper and init).
    pub init_binary: PathBuf,
    /// Helpers exec'd ahead of time and kept idle, so a spawn skips that step; 0 disables.
    /// The first spawn for a given `init_binary` and `run_dir` fixes the pool's size.
    pub warm_helpers: usize,
    /// Let `destroy` return as soon as every process of the sandbox is dead, and finish the
    /// rest (reap the helper, remove the cgroup and directories, release the uid range) on a
    /// background thread. A program that turns this on must call [`janitor::flush`] before it
    /// exits, or that cleanup is left undone. Off by default.
    pub background_cleanup: bool,
}

impl RuntimeConfig {
    /// Defaults: `/var/lib/sbx`, `/run/sbx`, and `sbx-init` from `$SBX_INIT` or next to the
    /// running executable.
    pub fn from_env() -> Self {
        let init_binary = std::env::var_os("SBX_INIT")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("sbx-init")))
            })
            .unwrap_or_else(|| PathBuf::from("/usr/local/bin/sbx-init"));
        RuntimeConfig {
            state_dir: PathBuf::from("/var/lib/sbx"),
            run_dir: PathBuf::from("/run/sbx"),
            init_binary,
            warm_helpers: 2,
            background_cleanup: false,
        }
    }
}

/// What to start.
#[derive(Debug, Default)]
pub struct SandboxSpec {
    /// `sb-` + 12 hex digits when not given.
    pub id: Option<String>,
    pub image: ImageRef,
    /// Default: `sandbox`.
    pub hostname: Option<String>,
    pub limits: Limits,
    pub seccomp: SeccompProfile,
    /// Started right after setup; the sandbox ends when it exits, with its status.
    pub entrypoint: Option<ExecSpec>,
    /// Host directories mounted into the sandbox, id-mapped (see [`BindMount`]).
    pub mounts: Vec<BindMount>,
    /// Start it at background priority (nice [`BACKGROUND_NICE`]: its setup and init) so that
    /// starting it ahead of need does not compete with sandboxes in use; raise it with
    /// [`Sandbox::set_foreground`] when it is put to use.
    pub background: bool,
}

/// Where a standard stream of a process goes.
#[derive(Debug, Default)]
pub enum Stdio {
    /// A pipe whose other end the caller gets in [`Process`].
    #[default]
    Pipe,
    /// The sandbox's /dev/null.
    Null,
    /// A descriptor the caller already has (a file, a socket, a pipe end).
    Fd(OwnedFd),
    /// stderr only: the same pipe or descriptor as stdout.
    MergeWithStdout,
}

/// Terminal size for a process on a pseudo-terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

/// A process to run in a sandbox.
#[derive(Debug, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    /// Added to the defaults (PATH, HOME, TERM with a pty); later entries win.
    pub env: Vec<(String, String)>,
    /// Absolute; default `/`.
    pub cwd: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
    /// Run on a pseudo-terminal (stdio options are then ignored; the master is in
    /// [`Process::pty`]).
    pub pty: Option<PtySize>,
}

impl ExecSpec {
    /// `argv` with piped stdio and defaults otherwise.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// How a process (or a sandbox) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: WaitStatus,
    /// Killed by the kernel's OOM killer in the sandbox's cgroup (read from the cgroup's
    /// counters, not guessed from the signal).
    pub oom: bool,
}

impl Exit {
    /// The code, or 128+N after signal N (so an OOM kill is 137).
    pub fn code(&self) -> i32 {
        self.status.exit_code()
    }
}

/// Errors of the runtime, each naming the step and the value.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid {field}: {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(transparent)]
    Image(#[from] rootfs_fetch::ImageError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    IdMap(#[from] idmap::IdMapError),
    #[error(transparent)]
    Cgroup(#[from] cgroups::CgroupError),
    #[error("failed to {step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start the helper {path}: {source}")]
    SpawnHelper {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox setup failed at {step}: {error}")]
    Setup { step: String, error: String },
    #[error(transparent)]
    Proto(#[from] proto::ProtoError),
    #[error("failed to {step}: {source}")]
    Sys {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("exec of {argv0:?} failed at {step}: {}", nix::Error::from_raw(*.errno))]
    Exec {
        argv0: String,
        step: String,
        errno: i32,
    },
    #[error("sandbox {0} has finished")]
    Finished(String),
    #[error("sandbox id {id:?} is taken ({path} exists)")]
    AlreadyExists { id: String, path: PathBuf },
    #[error("{run}; and cleanup also failed: {cleanup}")]
    WithCleanup {
        run: Box<RuntimeError>,
        cleanup: Box<RuntimeError>,
    },
    #[error("teardown of {id} failed: {}", .errors.join("; "))]
    Teardown { id: String, errors: Vec<String> },
}

/// A running (or finished, not yet destroyed) sandbox. Dropping it destroys it.
pub struct Sandbox {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    init_pid: i32,
    /// Names init for good: killing init through it kills the whole pid namespace at once.
    init_pidfd: Option<OwnedFd>,
    control_socket: PathBuf,
    run_dir: PathBuf,
    sandbox_state: PathBuf,
    ids: idmap::IdRange,
    background_cleanup: bool,
    cgroup: Mutex<Option<cgroups::SandboxCgroup>>,
    helper: Mutex<Option<Child>>,
    /// An adopted sandbox's helper (not our child): pid and start time.
    adopted_helper: Option<(i32, u64)>,
    /// The helper's end of the control pair: it reports init's exit here. None for an
    /// adopted sandbox (its helper reports to whoever spawned it, and to `exit.json`).
    control: Option<OwnedFd>,
    exit: Mutex<Option<Exit>>,
    /// Held by the thread blocked in [`Sandbox::wait`].
    waiter: Mutex<()>,
    /// How the entrypoint ended, as its [`Process::wait`] saw it (exact OOM attribution).
    entrypoint_exit: Mutex<Option<Exit>>,
    /// Set once kill() or signal(SIGKILL) was asked: a SIGKILL after it is ours, not the OOM
    /// killer's, for the sandbox's end and for every process it ends.
    killed: std::sync::atomic::AtomicBool,
    entrypoint: Mutex<Option<Process>>,
}

/// How long exec() waits for init to report that the process started.
const EXEC_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Switch `O_NONBLOCK` on or off for the open file description of `fd` (shared by its dups).
fn set_nonblocking(fd: &OwnedFd, on: bool) -> Result<(), RuntimeError> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let err = |source| RuntimeError::Sys {
        step: "set the exec connection's blocking mode",
        source,
    };
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(err)?);
    let want = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    if want != flags {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(want)).map_err(err)?;
    }
    Ok(())
}

fn set_recv_timeout(conn: &OwnedFd, t: Option<std::time::Duration>) -> Result<(), RuntimeError> {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
    use nix::sys::time::{TimeVal, TimeValLike};
    let tv = TimeVal::milliseconds(t.map(|d| d.as_millis() as i64).unwrap_or(0));
    setsockopt(conn, ReceiveTimeout, &tv).map_err(|source| RuntimeError::Sys {
        step: "set the exec connection's receive timeout",
        source,
    })
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Sandbox {
    /// Start a sandbox. Returns once init is serving execs (and the entrypoint, if any, runs).
    pub fn spawn(cfg: &RuntimeConfig, mut spec: SandboxSpec) -> Result<Sandbox, RuntimeError> {
        let id = match spec.id.take() {
            Some(id) => validate_id(id)?,
            None => new_id()?,
        };
        let hostname = spec.hostname.take().unwrap_or_else(|| "sandbox".into());
        if hostname.is_empty()
            || hostname.len() > 63
            || !hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(RuntimeError::Invalid {
                field: "hostname",
                value: hostname,
                reason: "1 to 63 letters, digits, '-' or '.'",
            });
        }
        helper::validate_mounts(&spec.mounts)?;
        let image = rootfs_fetch::resolve(&spec.image, &cfg.state_dir)?;
        let seccomp = seccomp::compile(&spec.seccomp)?;
        let ids = idmap::IdRange::allocate(&cfg.run_dir, &id)?;

        let mut cleanup = Cleanup::new(id.clone(), ids.clone());
        let result = Self::spawn_prepared(
            cfg,
            &id,
            hostname,
            image,
            seccomp,
            &ids,
            &spec,
            &mut cleanup,
        );
        let (inner, entry_spec) = match result {
            Ok(inner) => (inner, spec.entrypoint.take()),
            Err(e) => {
                return Err(match cleanup.run() {
                    Ok(()) => e,
                    Err(c) => RuntimeError::WithCleanup {
                        run: Box::new(e),
                        cleanup: Box::new(c),
                    },
                })
            }
        };
        let sandbox = Sandbox {
            inner: Arc::new(inner),
        };
        if let Some(entry) = entry_spec {
            let p = sandbox.start(entry, true)?;
            *lock(&sandbox.inner.entrypoint) = Some(p);
        }
        Ok(sandbox)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_prepared(
        cfg: &RuntimeConfig,
        id: &str,
        hostname: String,
        image: rootfs_fetch::Resolved,
        seccomp: Option<seccomp::CompiledSeccomp>,
        ids: &idmap::IdRange,
        spec: &SandboxSpec,
        cleanup: &mut Cleanup,
    ) -> Result<Inner, RuntimeError> {
        // Runtime dir (socket, records, rootfs mount point).
        // The id is taken by creating its directories (not "create if missing"): a second spawn
        // with a live or leftover id must fail before it touches anything of the other's — its
        // upper holds whatever that sandbox's root planted there (symlinks included).
        // 0711: init, which starts as the sandbox's owner uid, must traverse to the rootfs
        // mount point; nothing in here is readable by others (the socket and records are 0600).
        let run_dir = cfg.run_dir.join("sandboxes").join(id);
        mkdir(&cfg.run_dir, 0o711)?;
        ensure_searchable(&cfg.run_dir)?;
        mkdir_exact(&cfg.run_dir.join("sandboxes"), 0o711)?;
        reserve_dir(&run_dir, id, 0o711)?;
        cleanup.dirs.push(run_dir.clone());
        let merged = run_dir.join("rootfs");
        mkdir(&merged, 0o755)?;
        // Writable layer: the upper and overlay's work dir, on the same filesystem.
        let sandbox_state = cfg.state_dir.join("sandboxes").join(id);
        mkdir(&cfg.state_dir.join("sandboxes"), 0o700)?;
        reserve_dir(&sandbox_state, id, 0o700)?;
        cleanup.dirs.push(sandbox_state.clone());
        let upper = sandbox_state.join("upper");
        let work = sandbox_state.join("work");
        mkdir(&upper, 0o755)?;
        mkdir(&work, 0o700)?;
        // The sandbox's root owns its / and the usual writable dirs (an overlay directory
        // present in the upper shows the upper's owner and mode). A stored image keeps its
        // own (its root's dirs are sandbox root's through the id-mapped layers): only those
        // whose top directory it lacks are made.
        chown_to(&upper, ids.base)?;
        for (rel, mode) in rootfs_fetch::UPPER_DIRS {
            let top = rel.split('/').next().unwrap_or(rel);
            if image.idmap_lowers && top_entry(&image.lowers, top).is_some() {
                continue;
            }
            let p = upper.join(rel);
            mkdir(&p, *mode)?;
            chown_to(&p, ids.base)?;
        }
        // Mount points the image lacks (a bare rootfs directory may have no /proc). An
        // image's symlink named proc must not count (it would be followed on the host); a
        // real directory in the upper hides it.
        for rel in rootfs_fetch::MOUNT_POINTS {
            if !top_entry(&image.lowers, rel).is_some_and(|m| m.is_dir()) {
                mkdir(&upper.join(rel), 0o755)?;
            }
        }

        let cgroup = cgroups::SandboxCgroup::create(&format!("sbx/{id}"), &spec.limits)?;
        let cgroup_procs = cgroup.procs_files();
        cleanup.cgroup = Some(cgroup);

        let control_socket = run_dir.join("init.sock");
        let config = HelperConfig {
            id: id.to_string(),
            hostname,
            id_base: ids.base,
            id_count: ids.count,
            rootfs: RootfsPlan {
                lowers: image.lowers,
                upper,
                work,
                merged,
                binds: image
                    .binds
                    .into_iter()
                    .map(|b| proto::BindMount {
                        source: b.source,
                        target: b.target,
                    })
                    .collect(),
                idmap_lowers: image.idmap_lowers,
            },
            cgroup_procs,
            control_socket: control_socket.clone(),
            seccomp,
            mounts: spec.mounts.clone(),
            background: spec.background,
        };

        let log = cfg.run_dir.join("helper.log");
        let pool::Helper {
            child,
            control: ours,
        } = pool::take(&cfg.init_binary, &log, cfg.warm_helpers).map_err(|source| {
            RuntimeError::SpawnHelper {
                path: cfg.init_binary.clone(),
                source,
            }
        })?;
        cleanup.helper = Some(child);

        proto::send(ours.as_raw_fd(), "helper config", &config, &[])?;
        match proto::expect::<HelperEvent>(ours.as_raw_fd(), "helper ready")?.0 {
            HelperEvent::Ready { pid } => {
                let helper_pid = cleanup.helper.as_ref().map(|c| c.id() as i32).unwrap_or(0);
                let record = proto::SandboxRecord {
                    id: id.to_string(),
                    init_pid: pid,
                    init_start_time: proto::start_time(pid).unwrap_or(0),
                    id_slot: ids.slot,
                    id_base: ids.base,
                    id_count: ids.count,
                    state_dir: cfg.state_dir.clone(),
                    helper_pid,
                    helper_start_time: proto::start_time(helper_pid).unwrap_or(0),
                };
                let record_path = run_dir.join(proto::STATE_FILE);
                proto::write_atomic(&record_path, &record).map_err(|source| RuntimeError::Io {
                    step: "write the sandbox record",
                    path: record_path,
                    source,
                })?;
                Ok(Inner {
                    id: id.to_string(),
                    init_pid: pid,
                    init_pidfd: open_init_pidfd(pid, id),
                    control_socket,
                    run_dir,
                    sandbox_state,
                    ids: ids.clone(),
                    background_cleanup: cfg.background_cleanup,
                    cgroup: Mutex::new(cleanup.cgroup.take()),
                    helper: Mutex::new(cleanup.helper.take()),
                    adopted_helper: None,
                    control: Some(ours),
                    exit: Mutex::new(None),
                    waiter: Mutex::new(()),
                    entrypoint_exit: Mutex::new(None),
                    killed: std::sync::atomic::AtomicBool::new(false),
                    entrypoint: Mutex::new(None),
                })
            }
            HelperEvent::Failed { step, error } => Err(RuntimeError::Setup { step, error }),
            HelperEvent::Exited { status } => Err(RuntimeError::Setup {
                step: "start init".into(),
                error: format!("init exited during setup: {status:?}"),
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Bring a sandbox started with [`SandboxSpec::background`] to normal priority: its helper
    /// and init get [`INIT_NICE`] (every process init starts from now on runs at nice 0).
    /// Processes already running inside keep their priority. Best effort: needs CAP_SYS_NICE.
    pub fn set_foreground(&self) {
        // The helper is our child (its pid stays ours until we reap it); init's pid is only
        // ours while init lives, which its pidfd tells (a raised priority must never reach a
        // process that reused the pid).
        let helper = lock(&self.inner.helper).as_ref().map(|c| c.id() as i32);
        let init = self.inner.init_alive().then_some(self.inner.init_pid);
        for pid in helper.into_iter().chain(init) {
            // Fails only without CAP_SYS_NICE or when the process is gone (then nothing
            // runs at background priority any more either).
            let _ = sys::set_process_nice(pid, INIT_NICE);
        }
    }

    /// The overlay's writable layer on the host (under the state dir): every file the
    /// sandbox created or changed, overlayfs whiteouts (0/0 character devices) for what it
    /// removed, owned by host ids `id_range().0 + N` for sandbox id N. What a snapshot reads.
    pub fn upper_dir(&self) -> PathBuf {
        self.inner.sandbox_state.join("upper")
    }

    /// The sandbox's host uid/gid range: (first, count); sandbox id N is host id first + N.
    pub fn id_range(&self) -> (u32, u32) {
        (self.inner.ids.base, self.inner.ids.count)
    }

    /// Whether the helper still runs (our child, or an adopted sandbox's recorded one).
    fn helper_alive(&self) -> bool {
        if let Some(c) = lock(&self.inner.helper).as_ref() {
            return nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), None).is_ok();
        }
        self.inner
            .adopted_helper
            .is_some_and(|(pid, st)| process_is(pid, st))
    }

    /// Ids of the sandboxes whose runtime directories exist under `cfg.run_dir` (running, or
    /// left behind by a process that died before tearing them down).
    pub fn list(cfg: &RuntimeConfig) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(cfg.run_dir.join("sandboxes"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Remove what is left of sandbox `id` under `cfg`, whatever state it is in: a running
    /// sandbox whose spawner died is adopted and destroyed; one whose spawner died before it
    /// was up (no `state.json`) is torn down piece by piece — its cgroup killed and removed,
    /// its directories deleted, its uid range released. For a daemon's start-up sweep: only
    /// call it for ids no live process is spawning.
    pub fn remove_leftover(cfg: &RuntimeConfig, id: &str) -> Result<(), RuntimeError> {
        let id = validate_id(id.to_string())?;
        let run_dir = cfg.run_dir.join("sandboxes").join(&id);
        if run_dir.join(proto::STATE_FILE).exists() {
            return Sandbox::adopt(cfg, &id)?.destroy();
        }
        let mut cleanup = Cleanup::new(
            id.clone(),
            idmap::IdRange::find(&cfg.run_dir, &id)
                .unwrap_or_else(|| idmap::IdRange::adopt(&cfg.run_dir, u32::MAX, 0, 0)),
        );
        cleanup.cgroup = cgroups::SandboxCgroup::load(&format!("sbx/{id}")).ok();
        cleanup.dirs = vec![run_dir, cfg.state_dir.join("sandboxes").join(&id)];
        cleanup.run()
    }

    /// Take over a sandbox another process spawned (after that process died, or to tear down
    /// what it left behind): exec, wait, kill and destroy work as for one we spawned. Its exit
    /// status comes from the record the helper leaves when init exits.
    pub fn adopt(cfg: &RuntimeConfig, id: &str) -> Result<Sandbox, RuntimeError> {
        let id = validate_id(id.to_string())?;
        let run_dir = cfg.run_dir.join("sandboxes").join(&id);
        let record_path = run_dir.join(proto::STATE_FILE);
        let record: proto::SandboxRecord =
            proto::read_record(&record_path).map_err(|source| RuntimeError::Io {
                step: "read the sandbox record",
                path: record_path.clone(),
                source,
            })?;
        // Init counts only if it is the very process recorded (same pid, same start time).
        let alive = proto::start_time(record.init_pid) == Some(record.init_start_time);
        let init_pidfd = if alive {
            open_init_pidfd(record.init_pid, &id)
        } else {
            None
        };
        let cgroup = cgroups::SandboxCgroup::load(&format!("sbx/{id}")).ok();
        let exit = if alive {
            None
        } else {
            let status = proto::read_record::<WaitStatus>(&run_dir.join(proto::EXIT_FILE))
                .unwrap_or(WaitStatus::Signal(libc::SIGKILL));
            Some(Exit { status, oom: false })
        };
        Ok(Sandbox {
            inner: Arc::new(Inner {
                id: id.clone(),
                init_pid: record.init_pid,
                init_pidfd,
                control_socket: run_dir.join("init.sock"),
                sandbox_state: record.state_dir.join("sandboxes").join(&id),
                run_dir,
                ids: idmap::IdRange::adopt(
                    &cfg.run_dir,
                    record.id_slot,
                    record.id_base,
                    record.id_count,
                ),
                background_cleanup: cfg.background_cleanup,
                cgroup: Mutex::new(cgroup),
                helper: Mutex::new(None),
                adopted_helper: (record.helper_pid > 0)
                    .then_some((record.helper_pid, record.helper_start_time)),
                control: None,
                exit: Mutex::new(exit),
                waiter: Mutex::new(()),
                entrypoint_exit: Mutex::new(None),
                killed: std::sync::atomic::AtomicBool::new(false),
                entrypoint: Mutex::new(None),
            }),
        })
    }

    /// Init's pid on the host.
    pub fn init_pid(&self) -> i32 {
        self.inner.init_pid
    }

    /// Start the entrypoint of a sandbox spawned without one (e.g. after preparing its files):
    /// the sandbox then ends when it exits, as if it had been in the spec. Take it with
    /// [`Sandbox::take_entrypoint`]. A sandbox has one entrypoint: a second is `Invalid`.
    pub fn start_entrypoint(&self, spec: ExecSpec) -> Result<(), RuntimeError> {
        let mut slot = lock(&self.inner.entrypoint);
        if slot.is_some() || lock(&self.inner.entrypoint_exit).is_some() {
            return Err(RuntimeError::Invalid {
                field: "entrypoint",
                value: spec.argv.join(" "),
                reason: "the sandbox already has an entrypoint",
            });
        }
        *slot = Some(self.start(spec, true)?);
        Ok(())
    }

    /// The entrypoint process, if the spec had one (taken once).
    pub fn take_entrypoint(&self) -> Option<Process> {
        lock(&self.inner.entrypoint).take()
    }

    /// Whether init still runs (nothing waited for its end and its pidfd is not readable).
    pub fn alive(&self) -> bool {
        if lock(&self.inner.exit).is_some() {
            return false;
        }
        match &self.inner.init_pidfd {
            Some(fd) => !wait_readable_for(fd, 0),
            None => self.helper_alive(),
        }
    }

    /// Replace the sandbox's resource limits while it runs (a sandbox started ahead of time
    /// and handed to a create with its own limits). Fields left `None` get the defaults.
    pub fn set_limits(&self, limits: &Limits) -> Result<(), RuntimeError> {
        match lock(&self.inner.cgroup).as_ref() {
            Some(c) => Ok(c.update(limits)?),
            None => Err(RuntimeError::Finished(self.inner.id.clone())),
        }
    }

    /// Start a process in the sandbox.
    pub fn exec(&self, spec: ExecSpec) -> Result<Process, RuntimeError> {
        self.start(spec, false)
    }

    fn start(&self, spec: ExecSpec, entrypoint: bool) -> Result<Process, RuntimeError> {
        self.begin(spec, entrypoint, false)?.finish_blocking()
    }

    /// Start `spec` without blocking the calling thread: the request goes to init over a
    /// non-blocking connection and the reply is left to read. Wait until
    /// [`PendingExec::reply_fd`] is readable (an event loop), then [`PendingExec::try_finish`].
    /// When init's queue was full the request is not sent yet ([`PendingExec::sent`] is false):
    /// then [`PendingExec::finish_blocking`] (on a thread that may block) does the rest.
    pub fn exec_begin(&self, spec: ExecSpec) -> Result<PendingExec, RuntimeError> {
        self.begin(spec, false, true)
    }

    /// Validate `spec`, make its pipes and the request; with `nonblocking`, also connect and
    /// send (a connection that would block leaves the request unsent).
    fn begin(
        &self,
        spec: ExecSpec,
        entrypoint: bool,
        nonblocking: bool,
    ) -> Result<PendingExec, RuntimeError> {
        if lock(&self.inner.exit).is_some() {
            return Err(RuntimeError::Finished(self.inner.id.clone()));
        }
        let argv0 = spec.argv.first().cloned().unwrap_or_default();
        if spec.argv.is_empty() {
            return Err(RuntimeError::Invalid {
                field: "argv",
                value: String::new(),
                reason: "must name a program",
            });
        }
        let cwd = spec.cwd.clone().unwrap_or_else(|| "/".into());
        if !cwd.starts_with('/') {
            return Err(RuntimeError::Invalid {
                field: "cwd",
                value: cwd,
                reason: "must be absolute",
            });
        }
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            (
                "HOME".into(),
                if spec.uid == 0 { "/root" } else { "/" }.into(),
            ),
        ];
        if spec.pty.is_some() {
            env.push(("TERM".into(), "xterm".into()));
        }
        for (k, v) in spec.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(RuntimeError::Invalid {
                    field: "env",
                    value: k,
                    reason: "names must be non-empty without '=' or NUL",
                });
            }
            env.retain(|(e, _)| *e != k);
            env.push((k, v));
        }

        // Pipes: the child's ends travel with the request, ours stay in Process.
        let mut send: Vec<OwnedFd> = Vec::new();
        let mut keep: [Option<File>; 3] = [None, None, None];
        let mut wires = [StdioWire::Null; 3];
        if spec.pty.is_none() {
            for (i, s) in [spec.stdin, spec.stdout, spec.stderr]
                .into_iter()
                .enumerate()
            {
                wires[i] = match s {
                    Stdio::Null => StdioWire::Null,
                    Stdio::Fd(fd) => {
                        send.push(fd);
                        StdioWire::Fd
                    }
                    Stdio::MergeWithStdout if i == 2 => StdioWire::Stdout,
                    Stdio::MergeWithStdout => {
                        return Err(RuntimeError::Invalid {
                            field: "stdio",
                            value: "merge".into(),
                            reason: "only stderr can merge with stdout",
                        })
                    }
                    Stdio::Pipe => {
                        let (r, w) =
                            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|source| {
                                RuntimeError::Sys {
                                    step: "create a stdio pipe",
                                    source,
                                }
                            })?;
                        if i == 0 {
                            send.push(r);
                            keep[i] = Some(File::from(w));
                        } else {
                            send.push(w);
                            keep[i] = Some(File::from(r));
                        }
                        StdioWire::Fd
                    }
                };
            }
        }
        let req = ExecRequest {
            argv: spec.argv,
            env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd,
            uid: spec.uid,
            gid: spec.gid,
            stdin: wires[0],
            stdout: wires[1],
            stderr: wires[2],
            pty: spec.pty.map(|p| (p.rows, p.cols)),
            entrypoint,
        };
        let mut pending = PendingExec {
            sandbox: self.inner.clone(),
            req,
            send,
            conn: None,
            keep,
            // On the async path the cgroup lock may be held by a kill (seconds): then the
            // count is taken on the blocking path instead, and nothing is sent from here.
            oom_base: if nonblocking {
                self.try_oom_kills()
            } else {
                Some(self.oom_kills())
            },
            argv0,
        };
        if nonblocking && pending.oom_base.is_some() {
            pending.send_nonblocking()?;
        }
        Ok(pending)
    }

    fn oom_kills(&self) -> u64 {
        self.inner.oom_kills()
    }

    /// [`Self::oom_kills`] unless the cgroup lock is busy (a kill or teardown holds it).
    fn try_oom_kills(&self) -> Option<u64> {
        match self.inner.cgroup.try_lock() {
            Ok(g) => Some(g.as_ref().map(|c| c.oom_kills()).unwrap_or(0)),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                Some(p.into_inner().as_ref().map(|c| c.oom_kills()).unwrap_or(0))
            }
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Send `sig` to the sandbox's init, which forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1
    /// and SIGUSR2 to every process it started (a polite stop); SIGKILL ends the sandbox.
    pub fn signal(&self, sig: i32) -> Result<(), RuntimeError> {
        if sig == libc::SIGKILL {
            self.inner
                .killed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        match &self.inner.init_pidfd {
            Some(fd) => match sys::pidfd_kill(fd, sig) {
                Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
                Err(source) => Err(RuntimeError::Sys {
                    step: "signal the sandbox's init",
                    source,
                }),
            },
            None => Err(RuntimeError::Finished(self.inner.id.clone())),
        }
    }

    /// Kill every process of the sandbox. Idempotent.
    pub fn kill(&self) -> Result<(), RuntimeError> {
        self.inner
            .killed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        kill_sandbox(
            self.inner.init_pidfd.as_ref(),
            lock(&self.inner.cgroup).as_ref(),
        )?;
        Ok(())
    }

    /// Block until the sandbox ends (init exited: its entrypoint finished, or it was killed).
    pub fn wait(&self) -> Result<Exit, RuntimeError> {
        // One waiter reads the helper's report; others queue here. `exit` itself is held only
        // for an instant, so exec() from other threads is never blocked by a waiter.
        let _waiter = lock(&self.inner.waiter);
        if let Some(e) = *lock(&self.inner.exit) {
            return Ok(e);
        }
        let reported = match &self.inner.control {
            Some(c) => match proto::recv::<HelperEvent>(c.as_raw_fd(), "init exit")? {
                Some((HelperEvent::Exited { status }, _)) => Some(status),
                _ => None,
            },
            None => None,
        };
        let status = match reported {
            Some(s) => s,
            // Adopted, or the helper died (killed by someone): init does not depend on it and
            // may still be serving. Wait for init itself, then read the status the helper
            // recorded; if the helper died first, the status died with it: report a kill.
            None => {
                if let Some(fd) = &self.inner.init_pidfd {
                    wait_readable(fd);
                }
                let exit_file = self.inner.run_dir.join(proto::EXIT_FILE);
                let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
                loop {
                    if let Ok(s) = proto::read_record::<WaitStatus>(&exit_file) {
                        break s;
                    }
                    if !self.helper_alive() || std::time::Instant::now() > deadline {
                        break WaitStatus::Signal(libc::SIGKILL);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            }
        };
        let oom = self.ended_by_oom(status);
        let e = Exit { status, oom };
        *lock(&self.inner.exit) = Some(e);
        Ok(e)
    }

    /// Whether a sandbox that ended with `status` ended because of the OOM killer: the
    /// entrypoint's own report when it was waited for, else a 137 that no kill() of ours
    /// explains in a cgroup where the OOM killer struck.
    fn ended_by_oom(&self, status: WaitStatus) -> bool {
        if self.inner.killed.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        if let Some(entry) = *lock(&self.inner.entrypoint_exit) {
            if entry.status.exit_code() == status.exit_code() {
                return entry.oom;
            }
        }
        status.exit_code() == 128 + libc::SIGKILL && self.oom_kills() > 0
    }

    /// Kill everything, wait for it, unmount (the mounts live only in the sandbox's namespaces),
    /// remove the cgroup and the directories, release the uid range. Reports every failure.
    pub fn destroy(self) -> Result<(), RuntimeError> {
        self.inner.teardown()
    }
}

impl Inner {
    fn teardown(&self) -> Result<(), RuntimeError> {
        let mut cleanup = Cleanup::new(self.id.clone(), self.ids.clone());
        cleanup.init_pidfd = self.init_pidfd.as_ref().and_then(|f| f.try_clone().ok());
        cleanup.adopted_helper = self.adopted_helper;
        cleanup.cgroup = lock(&self.cgroup).take();
        cleanup.helper = lock(&self.helper).take();
        cleanup.dirs = vec![self.run_dir.clone(), self.sandbox_state.clone()];
        cleanup.background = self.background_cleanup;
        if cleanup.cgroup.is_none() && cleanup.helper.is_none() && !self.run_dir.exists() {
            return Ok(()); // already torn down
        }
        cleanup.run()
    }
}

impl Inner {
    /// OOM kills in the sandbox's cgroup so far (0 without a cgroup).
    fn oom_kills(&self) -> u64 {
        lock(&self.cgroup)
            .as_ref()
            .map(|c| c.oom_kills())
            .unwrap_or(0)
    }

    /// Whether init still runs (its pidfd is not readable yet).
    fn init_alive(&self) -> bool {
        self.init_pidfd
            .as_ref()
            .is_some_and(|fd| !wait_readable_for(fd, 0))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.inner.teardown();
    }
}

/// Teardown of whatever exists so far; used after a failed spawn and by destroy.
struct Cleanup {
    id: String,
    ids: idmap::IdRange,
    cgroup: Option<cgroups::SandboxCgroup>,
    init_pidfd: Option<OwnedFd>,
    helper: Option<Child>,
    adopted_helper: Option<(i32, u64)>,
    dirs: Vec<PathBuf>,
    background: bool,
}

impl Cleanup {
    fn new(id: String, ids: idmap::IdRange) -> Self {
        Cleanup {
            id,
            ids,
            cgroup: None,
            init_pidfd: None,
            helper: None,
            adopted_helper: None,
            dirs: Vec::new(),
            background: false,
        }
    }

    fn run(mut self) -> Result<(), RuntimeError> {
        let mut errors = Vec::new();
        // Kill first (through init's pidfd, then the cgroup): that reaches init even if the
        // helper is gone.
        let mut all_dead = true;
        if let Err(e) = kill_sandbox(self.init_pidfd.as_ref(), self.cgroup.as_ref()) {
            errors.push(e.to_string());
            all_dead = false;
        }
        // An adopted sandbox's helper is not our child: let it finish writing the exit record
        // (it exits right after init) before its directory goes.
        if let Some((pid, st)) = self.adopted_helper {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while process_is(pid, st) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let (helper, cgroup) = (self.helper.take(), self.cgroup.take());
        if self.background && all_dead {
            // Nothing of the sandbox runs any more: the rest is bookkeeping, done off the
            // caller's path. The directories leave their names at once.
            let dirs: Vec<PathBuf> = self.dirs.iter().map(|d| janitor::to_trash(d)).collect();
            let (id, ids) = (self.id, self.ids);
            janitor::submit(move || {
                finish(helper, cgroup, &dirs, &ids, true)
                    .into_iter()
                    .map(|e| format!("teardown of {id}: {e}"))
                    .collect()
            });
            return Ok(());
        }
        errors.extend(finish(helper, cgroup, &self.dirs, &self.ids, all_dead));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::Teardown {
                id: self.id,
                errors,
            })
        }
    }
}

/// The part of teardown after every process is dead (or could not be killed: `all_dead`):
/// reap the helper, remove the cgroup and the directories, release the uid range.
fn finish(
    helper: Option<Child>,
    cgroup: Option<cgroups::SandboxCgroup>,
    dirs: &[PathBuf],
    ids: &idmap::IdRange,
    all_dead: bool,
) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(mut child) = helper {
        // The helper reaps init and exits on its own once init is dead; give it a moment
        // (killing it first would leave init a zombie for the host's init to reap). A helper
        // stuck in setup is killed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut nap = std::time::Duration::from_micros(50);
        while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(nap);
            nap = (nap * 2).min(std::time::Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Some(cg) = cgroup {
        if let Err(e) = cg.destroy() {
            errors.push(e.to_string());
        }
    }
    for d in dirs {
        if let Err(e) = janitor::remove(d) {
            errors.push(format!("remove {}: {e}", d.display()));
        }
    }
    // A range still used by a process that would not die must not go to a new sandbox: keep
    // it taken (its slot file names the sandbox) and say so.
    if !all_dead {
        errors.push(format!(
            "uid range {} stays reserved: processes of the sandbox survived the kill",
            ids.slot
        ));
    } else if let Err(e) = ids.release() {
        errors.push(format!("release uid range {}: {e}", ids.slot));
    }
    errors
}

/// An exec on its way to init (see [`Sandbox::exec_begin`]).
pub struct PendingExec {
    sandbox: Arc<Inner>,
    req: ExecRequest,
    /// The child's ends of its stdio, sent with the request (then closed here).
    send: Vec<OwnedFd>,
    /// The connection the request went out on; `None` while unsent.
    conn: Option<OwnedFd>,
    keep: [Option<File>; 3],
    /// OOM kills before the start; `None` until read (then on the blocking path).
    oom_base: Option<u64>,
    argv0: String,
}

impl std::fmt::Debug for PendingExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingExec")
            .field("argv0", &self.argv0)
            .field("sent", &self.conn.is_some())
            .finish()
    }
}

impl PendingExec {
    /// Whether the request is with init (its reply is then awaited on [`Self::reply_fd`]).
    pub fn sent(&self) -> bool {
        self.conn.is_some()
    }

    /// The connection to await readability on, once sent.
    pub fn reply_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.conn.as_ref().map(|c| c.as_fd())
    }

    fn finished_err(&self) -> RuntimeError {
        RuntimeError::Finished(self.sandbox.id.clone())
    }

    fn connect_err(&self, source: nix::Error) -> RuntimeError {
        if lock(&self.sandbox.exit).is_some() || !self.sandbox.control_socket.exists() {
            self.finished_err()
        } else {
            RuntimeError::Sys {
                step: "connect to the sandbox's init",
                source,
            }
        }
    }

    /// Connect and send without blocking; on EAGAIN (init's accept queue or the socket
    /// buffer is full) the request stays unsent for [`Self::finish_blocking`].
    fn send_nonblocking(&mut self) -> Result<(), RuntimeError> {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|source| RuntimeError::Sys {
            step: "create the exec connection",
            source,
        })?;
        let addr = UnixAddr::new(&self.sandbox.control_socket)
            .map_err(|source| self.connect_err(source))?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(nix::Error::EAGAIN) => return Ok(()),
            Err(source) => return Err(self.connect_err(source)),
        }
        let raw: Vec<RawFd> = self.send.iter().map(|f| f.as_raw_fd()).collect();
        match proto::send(
            fd.as_raw_fd(),
            "exec request",
            &proto::RequestRef::Exec(&self.req),
            &raw,
        ) {
            Ok(()) => {}
            // A seqpacket message goes whole or not at all: nothing was sent.
            Err(proto::ProtoError::Send {
                source: nix::Error::EAGAIN,
                ..
            }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        self.send.clear();
        self.conn = Some(fd);
        Ok(())
    }

    /// Read init's reply if it is there: `Ok(Err(self))` when not yet (await readability
    /// again). Call only once sent.
    pub fn try_finish(self) -> Result<Result<Process, PendingExec>, RuntimeError> {
        let Some(conn) = &self.conn else {
            return Ok(Err(self));
        };
        match proto::recv::<ExecEvent>(conn.as_raw_fd(), "exec started") {
            Err(proto::ProtoError::Recv(nix::Error::EAGAIN)) => Ok(Err(self)),
            received => {
                // The Process's connection blocks, as one from `exec` does.
                set_nonblocking(conn, false)?;
                self.complete(received).map(Ok)
            }
        }
    }

    /// Finish on a thread that may block: connect and send if not done yet, then wait for
    /// the reply (at most [`EXEC_START_TIMEOUT`]).
    pub fn finish_blocking(mut self) -> Result<Process, RuntimeError> {
        if self.oom_base.is_none() {
            self.oom_base = Some(self.sandbox.oom_kills());
        }
        let conn = match self.conn.take() {
            Some(c) => {
                set_nonblocking(&c, false)?;
                c
            }
            None => {
                let conn = connect(&self.sandbox.control_socket)
                    .map_err(|source| self.connect_err(source))?;
                let raw: Vec<RawFd> = self.send.iter().map(|f| f.as_raw_fd()).collect();
                proto::send(
                    conn.as_raw_fd(),
                    "exec request",
                    &proto::RequestRef::Exec(&self.req),
                    &raw,
                )?;
                self.send.clear();
                conn
            }
        };
        // A start normally takes about a millisecond. Code in the sandbox can stall it (stop
        // the child before execve, starve init of descriptors): never wait forever.
        set_recv_timeout(&conn, Some(EXEC_START_TIMEOUT))?;
        let received = proto::recv::<ExecEvent>(conn.as_raw_fd(), "exec started");
        set_recv_timeout(&conn, None)?;
        self.conn = Some(conn);
        self.complete(received)
    }

    /// The reply (or its absence) as a started process or the error.
    #[allow(clippy::type_complexity)]
    fn complete(
        mut self,
        received: Result<Option<(ExecEvent, Vec<OwnedFd>)>, proto::ProtoError>,
    ) -> Result<Process, RuntimeError> {
        let argv0 = std::mem::take(&mut self.argv0);
        let (ev, mut fds) = match received {
            Ok(Some(x)) => x,
            Ok(None) if self.sandbox.init_alive() => {
                return Err(RuntimeError::Exec {
                    argv0,
                    step: "be accepted by init (it closed the connection: out of descriptors?)"
                        .into(),
                    errno: libc::ECONNRESET,
                })
            }
            Ok(None) => return Err(self.finished_err()),
            Err(proto::ProtoError::Recv(nix::Error::EAGAIN)) => {
                return Err(RuntimeError::Exec {
                    argv0,
                    step: format!("start within {} s", EXEC_START_TIMEOUT.as_secs()),
                    errno: libc::ETIMEDOUT,
                })
            }
            Err(e) => return Err(e.into()),
        };
        let Some(conn) = self.conn.take() else {
            return Err(self.finished_err());
        };
        match ev {
            ExecEvent::Started { pid } => {
                let [stdin, stdout, stderr] = std::mem::take(&mut self.keep);
                Ok(Process {
                    pid,
                    conn,
                    stdin,
                    stdout,
                    stderr,
                    pty: if self.req.pty.is_some() {
                        fds.pop().map(File::from)
                    } else {
                        None
                    },
                    oom_base: self.oom_base.unwrap_or(0),
                    sandbox: self.sandbox.clone(),
                    exit: None,
                    entrypoint: self.req.entrypoint,
                })
            }
            ExecEvent::Failed { step, errno } => Err(RuntimeError::Exec { argv0, step, errno }),
            ExecEvent::Exited { .. } | ExecEvent::Signalled => Err(RuntimeError::Exec {
                argv0,
                step: "start".into(),
                errno: libc::EPROTO,
            }),
        }
    }
}

/// A process started in a sandbox.
pub struct Process {
    pid: i32,
    conn: OwnedFd,
    /// Write end of the process's stdin pipe (`Stdio::Pipe`); drop it to send EOF.
    pub stdin: Option<File>,
    /// Read end of the stdout pipe.
    pub stdout: Option<File>,
    /// Read end of the stderr pipe.
    pub stderr: Option<File>,
    /// The pty master when run with a terminal.
    pub pty: Option<File>,
    oom_base: u64,
    sandbox: Arc<Inner>,
    exit: Option<Exit>,
    entrypoint: bool,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process").field("pid", &self.pid).finish()
    }
}

impl Process {
    /// Its pid inside the sandbox's pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The connection on which init reports the exit (readable when it has); for event loops.
    pub fn exit_fd(&self) -> RawFd {
        self.conn.as_raw_fd()
    }

    /// A duplicate of the exit connection for an event loop to watch (readable once the exit
    /// report is there; read it with [`Process::wait`]). Closing it leaves the process alone.
    pub fn exit_watch_fd(&self) -> std::io::Result<OwnedFd> {
        self.conn.try_clone()
    }

    /// Block until the exit report is there to read (then [`Process::wait`] returns at once)
    /// or `timeout` passed; true if it is there. Callers that must not hold `&mut` while
    /// waiting (to signal meanwhile) poll with this first.
    pub fn exit_ready(&self, timeout: Option<std::time::Duration>) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let left = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let ms = d
                        .saturating_duration_since(std::time::Instant::now())
                        .as_millis();
                    PollTimeout::try_from(ms.min(i32::MAX as u128) as i32)
                        .unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.conn.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, left) {
                Ok(0) => return false,
                Ok(_) => return true,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return true,
            }
        }
    }

    /// Send `sig` to the process and everything in its process group (it leads its own group:
    /// a shell and the jobs it started). An exited process is an error naming it.
    pub fn signal(&self, sig: i32) -> Result<(), RuntimeError> {
        let conn = connect(&self.sandbox.control_socket).map_err(|source| RuntimeError::Sys {
            step: "connect to the sandbox's init",
            source,
        })?;
        let req = Request::Signal { pid: self.pid, sig };
        proto::send(conn.as_raw_fd(), "signal request", &req, &[])?;
        set_recv_timeout(&conn, Some(EXEC_START_TIMEOUT))?;
        match proto::expect::<ExecEvent>(conn.as_raw_fd(), "signal reply")?.0 {
            ExecEvent::Signalled => Ok(()),
            ExecEvent::Failed { step, errno } => Err(RuntimeError::Exec {
                argv0: format!("pid {}", self.pid),
                step,
                errno,
            }),
            _ => Err(RuntimeError::Exec {
                argv0: format!("pid {}", self.pid),
                step: "signal".into(),
                errno: libc::EPROTO,
            }),
        }
    }

    /// Change the size of the process's terminal (with a pty); it gets SIGWINCH.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), RuntimeError> {
        let Some(master) = &self.pty else {
            return Err(RuntimeError::Invalid {
                field: "pty",
                value: format!("pid {}", self.pid),
                reason: "the process has no terminal",
            });
        };
        sys::set_winsize(master.as_raw_fd(), rows, cols).map_err(|source| RuntimeError::Sys {
            step: "set the terminal size",
            source,
        })
    }

    /// Block until the process exits. Closes our stdin end first so a reader sees EOF.
    pub fn wait(&mut self) -> Result<Exit, RuntimeError> {
        if let Some(e) = self.exit {
            return Ok(e);
        }
        self.stdin = None;
        let status = match proto::recv::<ExecEvent>(self.conn.as_raw_fd(), "exec exit")? {
            Some((ExecEvent::Exited { status }, _)) => status,
            // Init is gone, so the whole pid namespace was killed.
            _ => WaitStatus::Signal(libc::SIGKILL),
        };
        // A SIGKILL while the OOM killer struck in the cgroup, unless we killed the sandbox
        // ourselves (then another process's OOM kill must not be blamed for this one).
        let oom = status == WaitStatus::Signal(libc::SIGKILL)
            && !self
                .sandbox
                .killed
                .load(std::sync::atomic::Ordering::SeqCst)
            && lock(&self.sandbox.cgroup)
                .as_ref()
                .map(|c| c.oom_kills() > self.oom_base)
                .unwrap_or(false);
        let e = Exit { status, oom };
        self.exit = Some(e);
        if self.entrypoint {
            *lock(&self.sandbox.entrypoint_exit) = Some(e);
        }
        Ok(e)
    }

    /// Read all of stdout and stderr (concurrently, so neither pipe can fill and stall the
    /// process), then wait. Convenient for tests and one-shot commands.
    pub fn output(mut self) -> Result<(Exit, Vec<u8>, Vec<u8>), RuntimeError> {
        use std::io::Read;
        self.stdin = None;
        let err_reader = self.stderr.take().map(|mut f| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = f.read_to_end(&mut v);
                v
            })
        });
        let mut out = Vec::new();
        if let Some(mut f) = self.stdout.take() {
            let _ = f.read_to_end(&mut out);
        }
        let err = err_reader
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let exit = self.wait()?;
        Ok((exit, out, err))
    }
}

/// Kill every process of a sandbox. Fast path: SIGKILL init through its pidfd — the kernel then
/// kills every process of the pid namespace and refuses new ones, so nothing can fork away —
/// and wait for the cgroup to empty. Anything left after that (it should not happen) is killed
/// through the cgroup: freeze, SIGKILL every member, thaw (v1) or `cgroup.kill` (v2).
fn kill_sandbox(
    init_pidfd: Option<&OwnedFd>,
    cgroup: Option<&cgroups::SandboxCgroup>,
) -> Result<(), cgroups::CgroupError> {
    if let Some(fd) = init_pidfd {
        let _ = sys::pidfd_kill(fd, libc::SIGKILL);
        // Init's exit completes only after every other process of its pid namespace is gone,
        // so its pidfd turning readable means the sandbox is dead; the cgroup is then empty.
        let dead = wait_readable_for(fd, 2000);
        match cgroup {
            Some(cg) if dead && cg.wait_empty(std::time::Duration::from_millis(100)) => {
                return Ok(())
            }
            None if dead => return Ok(()),
            _ => {}
        }
    }
    match cgroup {
        Some(cg) => cg.kill_all(),
        None => Ok(()),
    }
}

/// Whether `pid` is still the process that started at `start_time`, and has not exited (a
/// zombie waiting for its parent counts as gone).
fn process_is(pid: i32, start_time: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let mut fields = stat.rsplit(')').next().unwrap_or("").split_whitespace();
    let state = fields.next();
    let started = fields.nth(18).and_then(|v| v.parse::<u64>().ok());
    state != Some("Z") && started == Some(start_time)
}

/// Block until the process behind `pidfd` has exited (a pidfd polls readable then).
fn wait_readable(pidfd: &OwnedFd) {
    while !wait_readable_for(pidfd, -1) {}
}

/// Like [`wait_readable`], for at most `ms` milliseconds (-1: no limit); true if it exited.
fn wait_readable_for(pidfd: &OwnedFd, ms: i32) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::NONE);
    loop {
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Err(nix::Error::EINTR) => continue,
            Ok(n) => return n > 0,
            Err(_) => return true,
        }
    }
}

/// A pidfd for init, only if the process behind `pid` is really in this sandbox's cgroup (so a
/// recycled pid can never be mistaken for it).
fn open_init_pidfd(pid: i32, id: &str) -> Option<OwnedFd> {
    let fd = sys::pidfd_open(pid).ok()?;
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    // Lines are `hierarchy:controllers:path`; the path must be exactly ours (not a prefix).
    let ours = format!("/sbx/{id}");
    cg.lines()
        .any(|l| l.rsplit(':').next() == Some(ours.as_str()))
        .then_some(fd)
}

/// What the overlay of `lowers` (topmost first) shows at `/name` (one component): the topmost
/// layer's entry, not followed if it is a symlink; `None` when absent or whited out (a 0/0
/// character device).
fn top_entry(lowers: &[PathBuf], name: &str) -> Option<std::fs::Metadata> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = lowers
        .iter()
        .find_map(|l| std::fs::symlink_metadata(l.join(name)).ok())?;
    (!(m.file_type().is_char_device() && m.rdev() == 0)).then_some(m)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn connect(path: &Path) -> nix::Result<OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

fn mkdir(p: &Path, mode: u32) -> Result<(), RuntimeError> {
    let err = |source| RuntimeError::Io {
        step: "create directory",
        path: p.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)
    {
        Ok(()) => {}
        Err(e) => return Err(err(e)),
    }
    // The umask may have cleared bits we want (tmp's 1777): only then is a chmod needed.
    if mode & umask() != 0 {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(())
}

/// This process's umask, read once from /proc (reading it with umask(2) would change it for
/// an instant under every other thread). Assumed 0o022 if unreadable.
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022)
    })
}

/// [`mkdir`], and the mode set even when the directory already existed (older versions made
/// it 0700).
fn mkdir_exact(p: &Path, mode: u32) -> Result<(), RuntimeError> {
    mkdir(p, mode)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        RuntimeError::Io {
            step: "chmod",
            path: p.to_path_buf(),
            source,
        }
    })
}

/// Make sure others may traverse `p` (init reaches its rootfs mount point as the sandbox's
/// uid): add the search bits if they are missing, change nothing else.
fn ensure_searchable(p: &Path) -> Result<(), RuntimeError> {
    let err = |source| RuntimeError::Io {
        step: "make searchable",
        path: p.to_path_buf(),
        source,
    };
    let mode = std::fs::metadata(p).map_err(err)?.permissions().mode();
    if mode & 0o011 != 0o011 {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode((mode | 0o011) & 0o7777))
            .map_err(err)?;
    }
    Ok(())
}

/// Create `p` (one level, never reusing an existing one): the atomic claim of a sandbox id.
fn reserve_dir(p: &Path, id: &str, mode: u32) -> Result<(), RuntimeError> {
    match std::fs::DirBuilder::new().mode(mode).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(RuntimeError::AlreadyExists {
                id: id.to_string(),
                path: p.to_path_buf(),
            })
        }
        Err(source) => Err(RuntimeError::Io {
            step: "create directory",
            path: p.to_path_buf(),
            source,
        }),
    }
}

fn chown_to(p: &Path, id: u32) -> Result<(), RuntimeError> {
    std::os::unix::fs::lchown(p, Some(id), Some(id)).map_err(|source| RuntimeError::Io {
        step: "chown",
        path: p.to_path_buf(),
        source,
    })
}

fn validate_id(id: String) -> Result<String, RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(id)
    } else {
        Err(RuntimeError::Invalid {
            field: "id",
            value: id,
            reason: "1 to 64 letters, digits, '-' or '_'",
        })
    }
}

/// `sb-` + 12 random hex digits.
fn new_id() -> Result<String, RuntimeError> {
    use std::io::Read;
    let mut b = [0u8; 6];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|source| RuntimeError::Io {
            step: "read",
            path: "/dev/urandom".into(),
            source,
        })?;
    Ok(format!(
        "sb-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}
