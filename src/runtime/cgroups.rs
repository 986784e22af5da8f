//! Per-sandbox cgroups: one cgroup per sandbox carrying its memory (with no swap beyond it), CPU
//! quota/weight and pids limits, plus listing, killing and removing what runs in it. Works on pure
//! cgroup v2 hosts and on v1/hybrid hosts (one directory per controller hierarchy).
//!
//! Lifecycle: the daemon side calls [`SandboxCgroup::create`] *before* the sandbox process exists
//! (limits must be in place before untrusted code runs); the spawn helper writes the child's pid into
//! every file of [`SandboxCgroup::procs_files`] before releasing it (`clone3(CLONE_INTO_CGROUP)`
//! on v2 would save that write; not used yet); teardown is [`SandboxCgroup::destroy`] (freeze → SIGKILL all → thaw, or
//! `cgroup.kill`, then `rmdir`). After a daemon crash, [`SandboxCgroup::load`] re-adopts a cgroup by
//! name so it can be destroyed. Dropping a `SandboxCgroup` does nothing: the cgroup outlives the
//! handle on purpose (a restarted daemon re-adopts running sandboxes).
//!
//! cgroups-rs supplies mode detection, v1 mount discovery and the per-controller limit writers;
//! this module writes raw files where cgroups-rs hardcodes `/sys/fs/cgroup` or reads before it
//! writes (v2 `cgroup.subtree_control`, `cpu.max`, `cgroup.kill`, `cgroup.events`), and parses the
//! event counters itself.

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::freezer::FreezerController;
use cgroups_rs::fs::hierarchies::{self, UNIFIED_MOUNTPOINT};
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Controllers, MaxValue};
use cgroups_rs::FreezerState;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::fmt::Display;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Default memory limit when [`Limits::memory_bytes`] is `None`: 1 GiB of RAM, and no swap on
/// top of it.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;
/// Default CPU bandwidth when [`Limits::cpu_cores`] is `None`: one core's worth of CPU time
/// (100 ms of run time per 100 ms period, spread over any number of CPUs).
pub const DEFAULT_CPU_CORES: f64 = 1.0;
/// Default relative CPU weight when [`Limits::cpu_weight`] is `None`: 100, the kernel's v2
/// default (`cpu.weight`); on v1 it becomes `cpu.shares` 1024, the v1 default.
pub const DEFAULT_CPU_WEIGHT: u64 = 100;
/// Default `pids.max` when [`Limits::pids_max`] is `None`: 1024 tasks. Note the pids controller
/// counts threads, not just processes.
pub const DEFAULT_PIDS_MAX: u64 = 1024;

/// Smallest accepted memory limit (1 MiB): below it not even a shell can start.
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;
/// CFS period used for the CPU quota, in microseconds (the kernel default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest CPU quota the kernel accepts is 1 ms per period, i.e. 0.01 core.
pub const MIN_CPU_CORES: f64 = 0.01;
/// Largest accepted CPU quota, in cores (keeps the quota arithmetic far from overflow).
pub const MAX_CPU_CORES: f64 = 100_000.0;
/// Largest `cpu.weight` (v2); the smallest is 1.
pub const MAX_CPU_WEIGHT: u64 = 10_000;
/// Largest `pids.max` the kernel accepts (`PID_MAX_LIMIT`, 4 Mi).
pub const MAX_PIDS_MAX: u64 = 4 * 1024 * 1024;
/// How long [`SandboxCgroup::kill_all`] keeps killing before it reports the survivors.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(2);

/// v1 `cpu.shares` bounds (kernel `MIN_SHARES` / `MAX_SHARES`).
const V1_MIN_SHARES: u64 = 2;
const V1_MAX_SHARES: u64 = cgroups_rs::CPU_SHARES_V1_MAX;
/// The v2 controllers every sandbox cgroup needs.
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// How long `destroy` retries an `rmdir` that fails with `EBUSY` (tasks still leaving).
const RMDIR_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the freeze step waits for the kernel to report the group frozen before killing
/// anyway (SIGKILL works on a half-frozen group; freezing only closes fork races).
const FREEZE_WAIT: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(10);

/// Resource limits for one sandbox. `None` = the documented default (`DEFAULT_*`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// RAM limit in bytes; swap is never allowed on top of it. Default [`DEFAULT_MEMORY_BYTES`].
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in cores (0.5 = half a core). Default [`DEFAULT_CPU_CORES`].
    pub cpu_cores: Option<f64>,
    /// Relative CPU weight, 1..=10000 (v2 scale). Default [`DEFAULT_CPU_WEIGHT`].
    pub cpu_weight: Option<u64>,
    /// Maximum number of tasks (processes and threads). Default [`DEFAULT_PIDS_MAX`].
    pub pids_max: Option<u64>,
}

/// Limits with defaults filled in, validated and converted to kernel units.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Resolved {
    memory_bytes: i64,
    cpu_quota_us: u64,
    cpu_weight: u64,
    pids_max: i64,
}

impl Limits {
    /// Check every limit (with defaults filled in) against what the kernel accepts, so a bad
    /// request is refused at the API edge rather than half-way through `create`.
    pub fn validate(&self) -> Result<(), CgroupError> {
        self.resolve().map(|_| ())
    }

    fn resolve(&self) -> Result<Resolved, CgroupError> {
        let memory = self.memory_bytes.unwrap_or(DEFAULT_MEMORY_BYTES);
        if memory < MIN_MEMORY_BYTES {
            return Err(invalid_limit(
                "memory_bytes",
                memory,
                "must be at least 1 MiB",
            ));
        }
        let memory_bytes = i64::try_from(memory)
            .map_err(|_| invalid_limit("memory_bytes", memory, "must fit in an i64"))?;

        let cores = self.cpu_cores.unwrap_or(DEFAULT_CPU_CORES);
        if !cores.is_finite() || !(MIN_CPU_CORES..=MAX_CPU_CORES).contains(&cores) {
            return Err(invalid_limit(
                "cpu_cores",
                cores,
                "must be between 0.01 and 100000",
            ));
        }
        // In range [1000, 1e10] after the check above, so the cast cannot saturate or truncate.
        let cpu_quota_us = (cores * CPU_PERIOD_US as f64).round() as u64;

        let cpu_weight = self.cpu_weight.unwrap_or(DEFAULT_CPU_WEIGHT);
        if !(1..=MAX_CPU_WEIGHT).contains(&cpu_weight) {
            return Err(invalid_limit(
                "cpu_weight",
                cpu_weight,
                "must be between 1 and 10000",
            ));
        }

        let pids = self.pids_max.unwrap_or(DEFAULT_PIDS_MAX);
        if !(1..=MAX_PIDS_MAX).contains(&pids) {
            return Err(invalid_limit(
                "pids_max",
                pids,
                "must be between 1 and 4194304",
            ));
        }
        let pids_max = i64::try_from(pids)
            .map_err(|_| invalid_limit("pids_max", pids, "must fit in an i64"))?;

        Ok(Resolved {
            memory_bytes,
            cpu_quota_us,
            cpu_weight,
            pids_max,
        })
    }
}

fn invalid_limit(field: &'static str, value: impl Display, reason: &'static str) -> CgroupError {
    CgroupError::InvalidLimit {
        field,
        value: value.to_string(),
        reason,
    }
}

/// v2 `cpu.weight` (1..=10000, default 100) to v1 `cpu.shares` (2..=262144, default 1024).
fn weight_to_shares(weight: u64) -> u64 {
    (weight.saturating_mul(1024) / 100).clamp(V1_MIN_SHARES, V1_MAX_SHARES)
}

/// Which cgroup hierarchy the host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupMode {
    /// Legacy or hybrid: one hierarchy per controller under `/sys/fs/cgroup/<controller>` (a
    /// controller-less cgroup2 at `/sys/fs/cgroup/unified` is ignored).
    V1,
    /// Unified: one cgroup2 hierarchy mounted at `/sys/fs/cgroup`.
    V2,
}

/// Detect the host's mode: `statfs("/sys/fs/cgroup")` reporting `CGROUP2_SUPER_MAGIC` means v2;
/// anything else (tmpfs holding v1 mounts, with or without a `unified/` cgroup2) means v1.
pub fn detect() -> CgroupMode {
    if hierarchies::is_cgroup2_unified_mode() {
        CgroupMode::V2
    } else {
        CgroupMode::V1
    }
}

/// Errors of cgroup setup and teardown; each names the step, the path and the value involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid limit {field} = {value}: {reason}")]
    InvalidLimit {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("cgroup v1 controller {controller} is not mounted (looked in {})", .path.display())]
    ControllerNotMounted {
        controller: &'static str,
        path: PathBuf,
    },
    #[error(
        "cgroup v2 controller {controller} is not available in {} (it lists {available:?})",
        .path.display()
    )]
    ControllerUnavailable {
        controller: &'static str,
        path: PathBuf,
        available: String,
    },
    #[error(
        "cgroup {} holds processes {pids:?}, so it cannot delegate controllers to sandbox \
         cgroups; move those processes into a leaf cgroup",
        .path.display()
    )]
    ProcessesInParent { path: PathBuf, pids: Vec<i32> },
    #[error("failed to enable controllers {value:?} in {}", .path.display())]
    EnableControllers {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to create cgroup directory {}", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {} already exists (a leftover? load() and destroy() it first)", .path.display())]
    AlreadyExists { path: PathBuf },
    #[error("no cgroup named {name:?} under {}", .root.display())]
    NotFound { name: String, root: PathBuf },
    #[error("failed to read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to parse {} (content {content:?})", .path.display())]
    Parse { path: PathBuf, content: String },
    #[error("failed to write {value:?} to {}", .path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to write {value:?} to {}", .path.display())]
    SetLimit {
        path: PathBuf,
        value: String,
        #[source]
        source: cgroups_rs::fs::error::Error,
    },
    #[error("failed to thaw {} (its processes stay frozen)", .path.display())]
    Thaw {
        path: PathBuf,
        #[source]
        source: cgroups_rs::fs::error::Error,
    },
    #[error("failed to send SIGKILL to pid {pid} of {}", .path.display())]
    Signal {
        pid: i32,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("processes {pids:?} still in {} after {waited:?} of killing", .path.display())]
    KillTimeout {
        path: PathBuf,
        pids: Vec<i32>,
        waited: Duration,
    },
    #[error("failed to remove cgroup directory {}", .path.display())]
    RemoveDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A step failed and undoing the earlier steps failed too; both are reported.
    #[error("{cause}; cleanup also failed: {cleanup}")]
    WithCleanup {
        #[source]
        cause: Box<CgroupError>,
        cleanup: Box<CgroupError>,
    },
}

impl CgroupError {
    fn with_cleanup(cause: CgroupError, cleanup: Result<(), CgroupError>) -> CgroupError {
        match cleanup {
            Ok(()) => cause,
            Err(cleanup) => CgroupError::WithCleanup {
                cause: Box::new(cause),
                cleanup: Box::new(cleanup),
            },
        }
    }
}

/// Reject names that could leave the cgroup tree or confuse it: only relative paths of
/// `[A-Za-z0-9._-]` components, none of them empty, `.` or `..`.
fn validate_name(name: &str) -> Result<(), CgroupError> {
    let bad = |reason| {
        Err(CgroupError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.starts_with('/') {
        return bad("must be relative to the cgroup root");
    }
    if name.len() > 1024 {
        return bad("must be at most 1024 bytes");
    }
    for component in name.split('/') {
        if component.is_empty() {
            return bad("must not contain empty components (\"//\" or a trailing \"/\")");
        }
        if component == "." || component == ".." {
            return bad("must not contain \".\" or \"..\" components");
        }
        if component.len() > 255 {
            return bad("components must be at most 255 bytes");
        }
        if !component
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return bad("components may only contain ASCII letters, digits, '.', '_' and '-'");
        }
    }
    Ok(())
}

/// Mount points of the v1 hierarchies we use (canonical paths).
#[derive(Debug, Clone)]
struct V1Mounts {
    memory: PathBuf,
    cpu: PathBuf,
    /// Only when cpuacct is a hierarchy of its own (not co-mounted with cpu).
    cpuacct: Option<PathBuf>,
    pids: PathBuf,
    freezer: PathBuf,
}

impl V1Mounts {
    /// Find the hierarchies of the running system through `/proc/self/mountinfo`.
    fn from_mountinfo() -> Result<Self, CgroupError> {
        let v1 = hierarchies::V1::new();
        let find = |controller: Controllers, name: &'static str| {
            v1.get_mount_point(controller)
                .map(|(mount_point, _root)| canonical(mount_point))
                .ok_or_else(|| CgroupError::ControllerNotMounted {
                    controller: name,
                    path: PathBuf::from("/proc/self/mountinfo"),
                })
        };
        let cpuacct = v1
            .get_mount_point(Controllers::CpuAcct)
            .map(|(mount_point, _root)| canonical(mount_point));
        Ok(Self::new(
            find(Controllers::Mem, "memory")?,
            find(Controllers::Cpu, "cpu")?,
            cpuacct,
            find(Controllers::Pids, "pids")?,
            find(Controllers::Freezer, "freezer")?,
        ))
    }

    /// Hierarchies laid out as `<root>/<controller>` (the usual `/sys/fs/cgroup` layout, where
    /// co-mounted controllers appear as symlinks such as `cpu -> cpu,cpuacct`).
    fn under(root: &Path) -> Result<Self, CgroupError> {
        let find = |name: &'static str| {
            let path = root.join(name);
            if path.is_dir() {
                Ok(canonical(path))
            } else {
                Err(CgroupError::ControllerNotMounted {
                    controller: name,
                    path,
                })
            }
        };
        let cpuacct = root.join("cpuacct");
        let cpuacct = cpuacct.is_dir().then(|| canonical(cpuacct));
        Ok(Self::new(
            find("memory")?,
            find("cpu")?,
            cpuacct,
            find("pids")?,
            find("freezer")?,
        ))
    }

    fn new(
        memory: PathBuf,
        cpu: PathBuf,
        cpuacct: Option<PathBuf>,
        pids: PathBuf,
        freezer: PathBuf,
    ) -> Self {
        // Co-mounted with cpu (`cpu,cpuacct`): the cpu directory already covers it.
        let cpuacct = cpuacct.filter(|acct| *acct != cpu);
        V1Mounts {
            memory,
            cpu,
            cpuacct,
            pids,
            freezer,
        }
    }
}

fn canonical(path: PathBuf) -> PathBuf {
    fs::canonicalize(&path).unwrap_or(path)
}

/// Where the hierarchies live, before a sandbox name is chosen.
#[derive(Debug, Clone)]
enum Base {
    V1(V1Mounts),
    V2(PathBuf),
}

impl Base {
    fn system() -> Result<Self, CgroupError> {
        match detect() {
            CgroupMode::V1 => Ok(Base::V1(V1Mounts::from_mountinfo()?)),
            CgroupMode::V2 => Ok(Base::V2(PathBuf::from(UNIFIED_MOUNTPOINT))),
        }
    }

    fn under(root: &Path, mode: CgroupMode) -> Result<Self, CgroupError> {
        match mode {
            CgroupMode::V1 => Ok(Base::V1(V1Mounts::under(root)?)),
            CgroupMode::V2 => Ok(Base::V2(root.to_path_buf())),
        }
    }

    fn root_for_errors(&self) -> PathBuf {
        match self {
            Base::V1(m) => m.memory.parent().unwrap_or(&m.memory).to_path_buf(),
            Base::V2(root) => root.clone(),
        }
    }

    fn layout(&self, name: &str) -> Layout {
        match self {
            Base::V1(m) => Layout::V1(V1Dirs {
                memory: (m.memory.clone(), m.memory.join(name)),
                cpu: (m.cpu.clone(), m.cpu.join(name)),
                cpuacct: m.cpuacct.as_ref().map(|a| (a.clone(), a.join(name))),
                pids: (m.pids.clone(), m.pids.join(name)),
                freezer: (m.freezer.clone(), m.freezer.join(name)),
            }),
            Base::V2(root) => Layout::V2 {
                root: root.clone(),
                dir: root.join(name),
            },
        }
    }
}

/// The sandbox's directories: `(mount point, cgroup dir)` per v1 hierarchy, or the v2 dir.
#[derive(Debug, Clone)]
enum Layout {
    V1(V1Dirs),
    V2 { root: PathBuf, dir: PathBuf },
}

#[derive(Debug, Clone)]
struct V1Dirs {
    memory: (PathBuf, PathBuf),
    cpu: (PathBuf, PathBuf),
    cpuacct: Option<(PathBuf, PathBuf)>,
    pids: (PathBuf, PathBuf),
    freezer: (PathBuf, PathBuf),
}

/// One cgroup per sandbox. See the module docs for the lifecycle.
#[derive(Debug, Clone)]
pub struct SandboxCgroup {
    name: String,
    layout: Layout,
    /// The file [`Self::oom_kills`] reads, opened on first use and then read with pread: it
    /// is read at every exec's start, and open + read + close cost several syscalls.
    oom_file: std::sync::Arc<std::sync::OnceLock<fs::File>>,
}

impl SandboxCgroup {
    /// Create the cgroup `name` (e.g. `"sbx/sb-abc123"`, relative to the hierarchy roots) on the
    /// running system and write `limits` into it. Fails with `AlreadyExists` if a cgroup of that
    /// name exists in any hierarchy (leftovers are `load`ed and destroyed, never silently reused).
    pub fn create(name: &str, limits: &Limits) -> Result<Self, CgroupError> {
        validate_name(name)?;
        let resolved = limits.resolve()?;
        Self::create_in(Base::system()?, name, &resolved)
    }

    /// Like [`create`](Self::create) against an explicit tree: `root` is the cgroup2 mount point
    /// (v2) or a directory holding one directory per v1 controller (v1). Used for tests against a
    /// fake tree.
    pub fn create_at(
        root: &Path,
        mode: CgroupMode,
        name: &str,
        limits: &Limits,
    ) -> Result<Self, CgroupError> {
        validate_name(name)?;
        let resolved = limits.resolve()?;
        Self::create_in(Base::under(root, mode)?, name, &resolved)
    }

    /// Re-adopt an existing cgroup by name (for teardown after a crash). Succeeds if the cgroup
    /// exists in at least one hierarchy.
    pub fn load(name: &str) -> Result<Self, CgroupError> {
        validate_name(name)?;
        Self::load_in(Base::system()?, name)
    }

    /// Like [`load`](Self::load) against an explicit tree (see [`create_at`](Self::create_at)).
    pub fn load_at(root: &Path, mode: CgroupMode, name: &str) -> Result<Self, CgroupError> {
        validate_name(name)?;
        Self::load_in(Base::under(root, mode)?, name)
    }

    fn load_in(base: Base, name: &str) -> Result<Self, CgroupError> {
        let cgroup = SandboxCgroup {
            name: name.to_string(),
            layout: base.layout(name),
            oom_file: Default::default(),
        };
        if cgroup.dirs().iter().any(|dir| dir.is_dir()) {
            Ok(cgroup)
        } else {
            Err(CgroupError::NotFound {
                name: name.to_string(),
                root: base.root_for_errors(),
            })
        }
    }

    fn create_in(base: Base, name: &str, limits: &Resolved) -> Result<Self, CgroupError> {
        if let Base::V2(root) = &base {
            // Controllers must be delegated by every ancestor before the leaf can use them.
            prepare_v2_ancestors(root, name)?;
        }
        let cgroup = SandboxCgroup {
            name: name.to_string(),
            layout: base.layout(name),
            oom_file: Default::default(),
        };
        cgroup.make_dirs()?;
        if let Err(cause) = cgroup.apply(limits) {
            // Nothing runs in the fresh cgroup yet, so removing it is all the undo there is.
            return Err(CgroupError::with_cleanup(cause, cgroup.remove_dirs()));
        }
        Ok(cgroup)
    }

    /// The name this cgroup was created or loaded with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this cgroup lives in v1 hierarchies or in the v2 one.
    pub fn mode(&self) -> CgroupMode {
        match self.layout {
            Layout::V1(_) => CgroupMode::V1,
            Layout::V2 { .. } => CgroupMode::V2,
        }
    }

    /// The cgroup's directories: one per v1 hierarchy we use, or the single v2 directory.
    pub fn dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V1(d) => {
                let mut dirs = vec![d.memory.1.clone(), d.cpu.1.clone()];
                dirs.extend(d.cpuacct.as_ref().map(|(_, dir)| dir.clone()));
                dirs.push(d.pids.1.clone());
                dirs.push(d.freezer.1.clone());
                // Co-mounted controllers share a directory; list it once.
                let mut unique: Vec<PathBuf> = Vec::with_capacity(dirs.len());
                for dir in dirs {
                    if !unique.contains(&dir) {
                        unique.push(dir);
                    }
                }
                unique
            }
            Layout::V2 { dir, .. } => vec![dir.clone()],
        }
    }

    /// Every `cgroup.procs` file a process must be written into to join the sandbox (v1: one
    /// per hierarchy we use; v2: one). Write the pid *before* the process runs untrusted code.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    /// Pids (in the caller's pid namespace) of every process in the cgroup or any cgroup below
    /// it, sorted. Missing directories count as empty.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs()
            .iter()
            .flat_map(|dir| subtree(dir))
            .flat_map(|dir| read_procs(&dir))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kill every process in the cgroup and wait until it is empty, for at most
    /// [`KILL_TIMEOUT`]. See [`kill_all_within`](Self::kill_all_within).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.kill_all_within(KILL_TIMEOUT)
    }

    /// Kill every process in the cgroup (and below), retrying until it is empty or `timeout`
    /// has passed. v2: write `cgroup.kill` (kernel 5.14+), which kills atomically, forks in
    /// flight included; without it, and on v1, freeze the group so nothing can fork, send
    /// SIGCONT then SIGKILL to every listed pid (nsjail: stopped tasks in a namespace may
    /// otherwise not die), then thaw so the signals are delivered.
    pub fn kill_all_within(&self, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(CgroupError::KillTimeout {
                    path: self.main_dir().to_path_buf(),
                    pids,
                    waited: start.elapsed(),
                });
            }
            match &self.layout {
                Layout::V2 { dir, .. } if dir.join("cgroup.kill").exists() => {
                    write_file(&dir.join("cgroup.kill"), "1")?;
                }
                Layout::V2 { root, dir } => freeze_kill_thaw(
                    &FreezerController::new(dir.clone(), root.clone(), true),
                    || self.pids(),
                )?,
                // Every hierarchy's members, not only the freezer's: a process that joined only
                // some hierarchies (crash half-way through a join) is killed too, just unfrozen.
                Layout::V1(d) => freeze_kill_thaw(
                    &FreezerController::new(d.freezer.1.clone(), d.freezer.0.clone(), false),
                    || self.pids(),
                )?,
            }
            // Killed tasks leave the cgroup within microseconds to a few milliseconds: look
            // often at first, then back off to POLL.
            let round = Instant::now();
            let mut nap = Duration::from_micros(50);
            while round.elapsed() < POLL && !self.pids().is_empty() {
                sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(2));
            }
        }
    }

    /// Wait until the cgroup is empty, for at most `timeout`; true if it is.
    pub fn wait_empty(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        let mut nap = Duration::from_micros(50);
        loop {
            if self.pids().is_empty() {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(2));
        }
    }

    /// How many processes the kernel OOM killer killed in this cgroup (v1: `oom_kill` of
    /// `memory.oom_control`; v2: `oom_kill` of `memory.events`). 0 if unknown.
    pub fn oom_kills(&self) -> u64 {
        use std::os::unix::fs::FileExt;
        if self.oom_file.get().is_none() {
            // Not cached on failure (no memory controller, out of descriptors): tried again.
            let path = match &self.layout {
                Layout::V1(d) => d.memory.1.join("memory.oom_control"),
                Layout::V2 { dir, .. } => dir.join("memory.events"),
            };
            if let Ok(f) = fs::File::open(path) {
                let _ = self.oom_file.set(f);
            }
        }
        // Both files are a few short `key value` lines: well under a page.
        let mut buf = [0u8; 1024];
        self.oom_file
            .get()
            .and_then(|f| f.read_at(&mut buf, 0).ok())
            .and_then(|n| std::str::from_utf8(&buf[..n]).ok())
            .and_then(|content| keyed_value(content, "oom_kill"))
            .unwrap_or(0)
    }

    /// Current memory use in bytes (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub fn memory_usage(&self) -> Option<u64> {
        match &self.layout {
            Layout::V1(d) => read_u64(&d.memory.1.join("memory.usage_in_bytes")),
            Layout::V2 { dir, .. } => read_u64(&dir.join("memory.current")),
        }
    }

    /// Peak memory use in bytes (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`, kernel
    /// 5.19+).
    pub fn memory_peak(&self) -> Option<u64> {
        match &self.layout {
            Layout::V1(d) => read_u64(&d.memory.1.join("memory.max_usage_in_bytes")),
            Layout::V2 { dir, .. } => read_u64(&dir.join("memory.peak")),
        }
    }

    /// Kill everything inside, wait until empty, and remove every directory of the cgroup
    /// (sub-cgroups first, retrying `EBUSY` briefly). Directories already gone are fine, so
    /// destroying twice, or after a partial create, succeeds. A kill failure and a removal
    /// failure are reported together.
    pub fn destroy(self) -> Result<(), CgroupError> {
        let killed = self.kill_all();
        let removed = self.remove_dirs();
        match killed {
            Ok(()) => removed,
            Err(cause) => Err(CgroupError::with_cleanup(cause, removed)),
        }
    }

    /// The directory named in errors that concern the whole cgroup.
    fn main_dir(&self) -> &Path {
        match &self.layout {
            Layout::V1(d) => &d.freezer.1,
            Layout::V2 { dir, .. } => dir,
        }
    }

    /// Create the leaf directory in every hierarchy (ancestors as needed). Refuses to adopt an
    /// existing leaf; on failure removes the leaves it created.
    fn make_dirs(&self) -> Result<(), CgroupError> {
        let mut created = Vec::new();
        for dir in self.dirs() {
            if let Err(cause) = make_leaf(&dir) {
                let cleanup = created.iter().try_for_each(|d: &PathBuf| remove_tree(d));
                return Err(CgroupError::with_cleanup(cause, cleanup));
            }
            created.push(dir);
        }
        Ok(())
    }

    fn remove_dirs(&self) -> Result<(), CgroupError> {
        let mut first_error = None;
        for dir in self.dirs() {
            // Keep going so one stuck hierarchy does not leak the others.
            if let Err(e) = remove_tree(&dir) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Replace the limits of a live cgroup (defaults for what `limits` leaves out). Lowering
    /// memory below what the group uses fails with the kernel's error, naming the file.
    pub fn update(&self, limits: &Limits) -> Result<(), CgroupError> {
        let resolved = limits.resolve()?;
        self.apply(&resolved)
    }

    /// Write the limits into the (fresh) cgroup.
    fn apply(&self, limits: &Resolved) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V1(d) => apply_v1(d, limits),
            Layout::V2 { root, dir } => apply_v2(root, dir, limits),
        }
    }
}

fn apply_v1(d: &V1Dirs, limits: &Resolved) -> Result<(), CgroupError> {
    let (mount, dir) = &d.memory;
    let memory = MemController::new(dir.clone(), mount.clone(), false);
    let bytes = limits.memory_bytes;
    // memory.memsw.limit_in_bytes (RAM + swap) must never be below memory.limit_in_bytes, or
    // the kernel refuses the write: raise memsw first when growing, lower the limit first when
    // shrinking. Equal values mean no swap at all. The file is missing when swap accounting is
    // off (`swapaccount=0`); then swappiness 0 keeps the group's memory out of swap instead.
    let memsw_file = dir.join("memory.memsw.limit_in_bytes");
    let write_limit = || {
        set_limit(dir, "memory.limit_in_bytes", bytes, || {
            memory.set_limit(bytes)
        })
    };
    let write_memsw = || {
        set_limit(dir, "memory.memsw.limit_in_bytes", bytes, || {
            memory.set_memswap_limit(bytes)
        })
    };
    if memsw_file.exists() {
        let current = read_u64(&memsw_file).unwrap_or(u64::MAX);
        if u64::try_from(bytes).unwrap_or(u64::MAX) > current {
            write_memsw()?;
            write_limit()?;
        } else {
            write_limit()?;
            write_memsw()?;
        }
    } else {
        write_limit()?;
        if write_memsw().is_err() {
            set_limit(dir, "memory.swappiness", 0, || memory.set_swappiness(0))?;
        }
    }

    let (mount, dir) = &d.cpu;
    let cpu = CpuController::new(dir.clone(), mount.clone(), false);
    // Period before quota: a fresh group has quota -1 (unlimited), valid with any period.
    set_limit(dir, "cpu.cfs_period_us", CPU_PERIOD_US, || {
        cpu.set_cfs_period(CPU_PERIOD_US)
    })?;
    let quota = i64::try_from(limits.cpu_quota_us).unwrap_or(i64::MAX);
    set_limit(dir, "cpu.cfs_quota_us", quota, || cpu.set_cfs_quota(quota))?;
    let shares = weight_to_shares(limits.cpu_weight);
    set_limit(dir, "cpu.shares", shares, || cpu.set_shares(shares))?;

    let (mount, dir) = &d.pids;
    let pids = PidController::new(dir.clone(), mount.clone(), false);
    let max = limits.pids_max;
    set_limit(dir, "pids.max", max, || {
        pids.set_pid_max(MaxValue::Value(max))
    })
}

fn apply_v2(root: &Path, dir: &Path, limits: &Resolved) -> Result<(), CgroupError> {
    let memory = MemController::new(dir.to_path_buf(), root.to_path_buf(), true);
    let bytes = limits.memory_bytes;
    set_limit(dir, "memory.max", bytes, || memory.set_limit(bytes))?;
    // memory.swap.max 0: no swap on top of memory.max. The file is absent when swap
    // accounting is off; a failed write to a file that was not there means exactly that.
    let swap_file = dir.join("memory.swap.max");
    let swap_existed = swap_file.exists();
    let swap = set_limit(dir, "memory.swap.max", 0, || memory.set_memswap_limit(0));
    if swap_existed {
        swap?;
    }

    // cgroups-rs reads cpu.max before writing it; write "quota period" directly instead.
    write_file(
        &dir.join("cpu.max"),
        &format!("{} {}", limits.cpu_quota_us, CPU_PERIOD_US),
    )?;
    let cpu = CpuController::new(dir.to_path_buf(), root.to_path_buf(), true);
    let weight = limits.cpu_weight;
    // On v2, `set_shares` writes cpu.weight verbatim.
    set_limit(dir, "cpu.weight", weight, || cpu.set_shares(weight))?;

    let pids = PidController::new(dir.to_path_buf(), root.to_path_buf(), true);
    let max = limits.pids_max;
    set_limit(dir, "pids.max", max, || {
        pids.set_pid_max(MaxValue::Value(max))
    })
}

/// Run a cgroups-rs setter and name the file and value if it fails.
fn set_limit<T: Display>(
    dir: &Path,
    file: &str,
    value: T,
    set: impl FnOnce() -> cgroups_rs::fs::error::Result<()>,
) -> Result<(), CgroupError> {
    set().map_err(|source| CgroupError::SetLimit {
        path: dir.join(file),
        value: value.to_string(),
        source,
    })
}

/// v2: make sure `root` and every ancestor of the leaf `name` exist and delegate the cpu,
/// memory and pids controllers (`cgroup.subtree_control`). Only controllers listed in each
/// level's `cgroup.controllers` can be enabled; a missing one is an error, not a silent
/// unlimited sandbox. The leaf itself gets no `subtree_control`: processes may only live in
/// leaves ("no internal processes", EBUSY otherwise).
fn prepare_v2_ancestors(root: &Path, name: &str) -> Result<(), CgroupError> {
    let mut dir = root.to_path_buf();
    enable_v2_controllers(&dir, true)?;
    let components: Vec<&str> = name.split('/').collect();
    let ancestors = components.len().saturating_sub(1);
    for component in &components[..ancestors] {
        dir.push(component);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::CreateDir { path: dir, source }),
        }
        enable_v2_controllers(&dir, false)?;
    }
    Ok(())
}

fn enable_v2_controllers(dir: &Path, is_root: bool) -> Result<(), CgroupError> {
    let controllers_file = dir.join("cgroup.controllers");
    let available = read_file(&controllers_file)?;
    let available_set: Vec<&str> = available.split_whitespace().collect();
    for controller in V2_CONTROLLERS {
        if !available_set.contains(&controller) {
            return Err(CgroupError::ControllerUnavailable {
                controller,
                path: controllers_file,
                available: available.trim().to_string(),
            });
        }
    }

    let subtree_file = dir.join("cgroup.subtree_control");
    let enabled = read_file(&subtree_file)?;
    let enabled: Vec<&str> = enabled
        .split_whitespace()
        .map(|c| c.trim_start_matches('+'))
        .collect();
    let missing: Vec<String> = V2_CONTROLLERS
        .iter()
        .filter(|c| !enabled.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root {
        // The root cgroup is exempt from the no-internal-processes rule; others are not.
        let pids = read_procs(dir);
        if !pids.is_empty() {
            return Err(CgroupError::ProcessesInParent {
                path: dir.to_path_buf(),
                pids,
            });
        }
    }
    let value = missing.join(" ");
    fs::write(&subtree_file, &value).map_err(|source| CgroupError::EnableControllers {
        path: subtree_file,
        value,
        source,
    })
}

/// Create `dir` (and its missing ancestors); an existing `dir` is an error.
fn make_leaf(dir: &Path) -> Result<(), CgroupError> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(|source| CgroupError::CreateDir {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    fs::create_dir(dir).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            CgroupError::AlreadyExists {
                path: dir.to_path_buf(),
            }
        } else {
            CgroupError::CreateDir {
                path: dir.to_path_buf(),
                source,
            }
        }
    })
}

/// `dir` and every cgroup directory below it, parents before children. Unreadable or vanished
/// directories are skipped (the kernel removes them under us during teardown).
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if !d.is_dir() {
            continue;
        }
        if let Ok(entries) = fs::read_dir(&d) {
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(entry.path());
                }
            }
        }
        out.push(d);
    }
    out
}

/// Remove `dir` and its sub-cgroups, deepest first. `EBUSY` (tasks still exiting) is retried
/// for [`RMDIR_TIMEOUT`]; a directory that is already gone is fine.
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let mut dirs = subtree(dir);
    // `subtree` lists parents before children; every child path is longer than its parent.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.as_os_str().len()));
    for d in dirs {
        let start = Instant::now();
        let mut delay = POLL;
        loop {
            match fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < RMDIR_TIMEOUT =>
                {
                    sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
                Err(source) => return Err(CgroupError::RemoveDir { path: d, source }),
            }
        }
    }
    Ok(())
}

/// Freeze the group (no forks can race the kill), SIGCONT+SIGKILL every member, thaw. A group
/// that cannot be frozen (freezer dir gone, v2 without `cgroup.freeze`) is killed unfrozen; a
/// failed thaw is an error because frozen tasks never act on their SIGKILL.
fn freeze_kill_thaw(
    freezer: &FreezerController,
    members: impl FnOnce() -> Vec<i32>,
) -> Result<(), CgroupError> {
    let dir = cgroups_rs::fs::Controller::path(freezer).to_path_buf();
    let frozen = freezer.freeze().is_ok();
    if frozen {
        wait_frozen(freezer, &dir);
    }
    // Read the members only once frozen: nothing can fork a new one from here on.
    let killed = members()
        .into_iter()
        .try_for_each(|pid| signal_kill(pid, &dir));
    if frozen {
        // Thaw even when a kill failed: frozen tasks never act on their pending SIGKILL.
        freezer
            .thaw()
            .map_err(|source| CgroupError::Thaw { path: dir, source })?;
    }
    killed
}

/// Wait up to [`FREEZE_WAIT`] for the kernel to finish freezing (v1 `freezer.state` leaves
/// FREEZING; v2 `cgroup.events` says `frozen 1`).
fn wait_frozen(freezer: &FreezerController, dir: &Path) {
    let start = Instant::now();
    while start.elapsed() < FREEZE_WAIT {
        let done = if cgroups_rs::fs::Controller::v2(freezer) {
            fs::read_to_string(dir.join("cgroup.events"))
                .ok()
                .and_then(|events| keyed_value(&events, "frozen"))
                == Some(1)
        } else {
            matches!(freezer.state(), Ok(FreezerState::Frozen))
        };
        if done {
            return;
        }
        sleep(Duration::from_millis(1));
    }
}

/// SIGCONT then SIGKILL `pid` (a member of the cgroup at `dir`); a pid that is already gone
/// is fine.
fn signal_kill(pid: i32, dir: &Path) -> Result<(), CgroupError> {
    let target = Pid::from_raw(pid);
    // Best effort: a stopped task still dies of SIGKILL on current kernels; SIGCONT is for
    // the cases nsjail documents where it otherwise would not.
    let _ = kill(target, Signal::SIGCONT);
    match kill(target, Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(source) => Err(CgroupError::Signal {
            pid,
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Pids listed in `dir/cgroup.procs`; a missing or unreadable file lists none.
fn read_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|content| {
            content
                .lines()
                .filter_map(|line| line.trim().parse::<i32>().ok())
                .filter(|pid| *pid > 0)
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `key` in a flat-keyed file ("key value" per line).
fn keyed_value(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(key))
            .then(|| fields.next())
            .flatten()
            .and_then(|value| value.parse().ok())
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_file(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    /// A name no other test (or test run) uses: `sbx-test-<pid>-<n>-<case>`.
    fn unique(case: &str) -> String {
        format!(
            "sbx-test-{}-{}-{case}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            .trim()
            .to_string()
    }

    // ----- pure logic -----

    #[test]
    fn names_that_could_escape_are_rejected() {
        for bad in [
            "",
            "/abs",
            "..",
            "sbx/../etc",
            "sbx/./x",
            "a//b",
            "a/",
            "a b",
            "a\0b",
            "é",
        ] {
            assert!(
                matches!(validate_name(bad), Err(CgroupError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
        for good in ["sbx/sb-abc123", "sb_1", "a.b/c-d"] {
            validate_name(good).unwrap_or_else(|e| panic!("{good:?} rejected: {e}"));
        }
    }

    #[test]
    fn limits_default_and_validate() {
        let r = Limits::default().resolve().expect("defaults are valid");
        assert_eq!(r.memory_bytes, 1 << 30);
        assert_eq!(r.cpu_quota_us, 100_000);
        assert_eq!(r.cpu_weight, 100);
        assert_eq!(r.pids_max, 1024);
        assert_eq!(weight_to_shares(100), 1024);
        assert_eq!(weight_to_shares(1), 10);
        assert_eq!(weight_to_shares(10_000), 102_400);

        let bad = [
            Limits {
                memory_bytes: Some(4096),
                ..Limits::default()
            },
            Limits {
                memory_bytes: Some(u64::MAX),
                ..Limits::default()
            },
            Limits {
                cpu_cores: Some(0.001),
                ..Limits::default()
            },
            Limits {
                cpu_cores: Some(f64::NAN),
                ..Limits::default()
            },
            Limits {
                cpu_weight: Some(0),
                ..Limits::default()
            },
            Limits {
                cpu_weight: Some(10_001),
                ..Limits::default()
            },
            Limits {
                pids_max: Some(0),
                ..Limits::default()
            },
        ];
        for limits in bad {
            let err = limits.validate().expect_err("accepted a bad limit");
            assert!(matches!(err, CgroupError::InvalidLimit { .. }), "{err}");
        }
        let err = Limits {
            cpu_weight: Some(0),
            ..Limits::default()
        }
        .validate()
        .expect_err("weight 0");
        assert!(err.to_string().contains("cpu_weight = 0"), "{err}");
    }

    #[test]
    fn limits_json_rejects_unknown_fields() {
        let l: Limits =
            serde_json::from_str(r#"{"memory_bytes":1048576,"cpu_cores":0.5}"#).expect("parse");
        assert_eq!(l.memory_bytes, Some(1 << 20));
        assert_eq!(l.cpu_cores, Some(0.5));
        assert!(serde_json::from_str::<Limits>(r#"{"memory":1}"#).is_err());
    }

    #[test]
    fn keyed_value_matches_whole_keys() {
        let events = "low 0\nhigh 0\nmax 7\noom 3\noom_kill 2\noom_group_kill 9\n";
        assert_eq!(keyed_value(events, "oom_kill"), Some(2));
        assert_eq!(keyed_value(events, "oom"), Some(3));
        assert_eq!(keyed_value(events, "nope"), None);
    }

    // ----- fake v2 tree -----

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(case: &str) -> Self {
            let path = std::env::temp_dir().join(unique(case));
            fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A cgroup2 root as the kernel shows it, with `sbx` already created below it. A plain
    /// filesystem cannot populate a directory on mkdir, so the intermediate cgroup's
    /// interface files are pre-created the way the kernel would show them.
    fn fake_v2(case: &str, root_controllers: &str) -> TempDir {
        let tmp = TempDir::new(case);
        fs::write(tmp.0.join("cgroup.controllers"), root_controllers).expect("write");
        fs::write(tmp.0.join("cgroup.subtree_control"), "").expect("write");
        fs::create_dir(tmp.0.join("sbx")).expect("mkdir");
        fs::write(tmp.0.join("sbx/cgroup.controllers"), "cpu memory pids").expect("write");
        fs::write(tmp.0.join("sbx/cgroup.subtree_control"), "").expect("write");
        fs::write(tmp.0.join("sbx/cgroup.procs"), "").expect("write");
        tmp
    }

    fn strip_files(dir: &Path) {
        for entry in fs::read_dir(dir).expect("read_dir").flatten() {
            if entry.file_type().expect("type").is_file() {
                fs::remove_file(entry.path()).expect("remove");
            }
        }
    }

    #[test]
    fn v2_fake_tree_gets_limits_and_delegation() {
        let tmp = fake_v2("v2-limits", "cpuset cpu io memory hugetlb pids rdma misc");
        let limits = Limits {
            memory_bytes: Some(32 << 20),
            cpu_cores: Some(1.5),
            cpu_weight: Some(300),
            pids_max: Some(100),
        };
        let cg = SandboxCgroup::create_at(&tmp.0, CgroupMode::V2, "sbx/sb-1", &limits)
            .expect("create_at");
        let leaf = tmp.0.join("sbx/sb-1");
        assert_eq!(cg.mode(), CgroupMode::V2);
        assert_eq!(cg.procs_files(), vec![leaf.join("cgroup.procs")]);

        // Only the wanted controllers are delegated, at every level above the leaf.
        assert_eq!(
            read(&tmp.0.join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(
            read(&tmp.0.join("sbx/cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert!(!leaf.join("cgroup.subtree_control").exists());

        assert_eq!(read(&leaf.join("memory.max")), "33554432");
        assert_eq!(read(&leaf.join("memory.swap.max")), "0");
        assert_eq!(read(&leaf.join("cpu.max")), "150000 100000");
        assert_eq!(read(&leaf.join("cpu.weight")), "300");
        assert_eq!(read(&leaf.join("pids.max")), "100");

        assert_eq!(cg.oom_kills(), 0);
        fs::write(
            leaf.join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n",
        )
        .expect("write");
        assert_eq!(cg.oom_kills(), 2);

        // A second sandbox of the same name is refused, not merged.
        let again = SandboxCgroup::create_at(&tmp.0, CgroupMode::V2, "sbx/sb-1", &limits);
        assert!(matches!(again, Err(CgroupError::AlreadyExists { .. })));

        // load() finds it again.
        let loaded = SandboxCgroup::load_at(&tmp.0, CgroupMode::V2, "sbx/sb-1").expect("load");
        assert_eq!(loaded.procs_files(), cg.procs_files());

        // On a plain filesystem the interface files make rmdir fail; destroy says where.
        let err = loaded.destroy().expect_err("fake files block rmdir");
        assert!(err.to_string().contains("sb-1"), "{err}");
        // With the files gone (as the kernel does on rmdir), destroy removes the leaf only.
        strip_files(&leaf);
        cg.destroy().expect("destroy");
        assert!(!leaf.exists());
        assert!(tmp.0.join("sbx").is_dir(), "shared parent must stay");
        // Destroying what is already gone is fine; loading it is NotFound.
        let gone = SandboxCgroup::load_at(&tmp.0, CgroupMode::V2, "sbx/sb-1");
        assert!(matches!(gone, Err(CgroupError::NotFound { .. })));
    }

    #[test]
    fn v2_only_missing_controllers_are_enabled() {
        let tmp = fake_v2("v2-partial", "cpu memory pids");
        fs::write(tmp.0.join("cgroup.subtree_control"), "cpu memory").expect("write");
        SandboxCgroup::create_at(&tmp.0, CgroupMode::V2, "sbx/sb-2", &Limits::default())
            .expect("create_at");
        assert_eq!(read(&tmp.0.join("cgroup.subtree_control")), "+pids");
        let leaf = tmp.0.join("sbx/sb-2");
        assert_eq!(read(&leaf.join("memory.max")), "1073741824");
        assert_eq!(read(&leaf.join("cpu.max")), "100000 100000");
        assert_eq!(read(&leaf.join("cpu.weight")), "100");
        assert_eq!(read(&leaf.join("pids.max")), "1024");
    }

    #[test]
    fn v2_missing_controller_is_an_error_naming_it() {
        let tmp = fake_v2("v2-missing", "memory pids");
        let err = SandboxCgroup::create_at(&tmp.0, CgroupMode::V2, "sbx/sb-3", &Limits::default())
            .expect_err("cpu is unavailable");
        assert!(
            matches!(
                err,
                CgroupError::ControllerUnavailable {
                    controller: "cpu",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!tmp.0.join("sbx/sb-3").exists());
    }

    #[test]
    fn v2_parent_with_processes_is_refused() {
        let tmp = fake_v2("v2-busy", "cpu memory pids");
        // A pid that surely is not ours to touch; nothing signals it (creation stops first).
        fs::write(tmp.0.join("sbx/cgroup.procs"), "1\n").expect("write");
        let err = SandboxCgroup::create_at(&tmp.0, CgroupMode::V2, "sbx/sb-4", &Limits::default())
            .expect_err("parent has processes");
        assert!(
            matches!(err, CgroupError::ProcessesInParent { ref pids, .. } if pids == &[1]),
            "{err}"
        );
    }

    #[test]
    fn v2_fallback_kill_signals_listed_pids_and_is_bounded() {
        let tmp = fake_v2("v2-kill", "cpu memory pids");
        let cg = SandboxCgroup::create_at(&tmp.0, CgroupMode::V2, "sbx/sb-5", &Limits::default())
            .expect("create_at");
        let leaf = tmp.0.join("sbx/sb-5");
        // No cgroup.kill in this fake: the freeze → SIGKILL → thaw path runs. The fake
        // cgroup.procs never empties, so kill_all must give up at its deadline.
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        fs::write(leaf.join("cgroup.procs"), format!("{pid}\n")).expect("write");
        let err = cg
            .kill_all_within(Duration::from_millis(200))
            .expect_err("fake procs never empty");
        assert!(
            matches!(err, CgroupError::KillTimeout { ref pids, .. } if pids == &[pid]),
            "{err}"
        );
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert_eq!(
            read(&leaf.join("cgroup.freeze")),
            "0",
            "thawed after the kill"
        );
    }

    // ----- fake v1 tree -----

    #[test]
    fn v1_fake_tree_with_comounted_cpu_cpuacct() {
        let tmp = TempDir::new("v1-fake");
        for dir in ["memory", "cpu,cpuacct", "pids", "freezer", "cpuset"] {
            fs::create_dir(tmp.0.join(dir)).expect("mkdir");
        }
        std::os::unix::fs::symlink("cpu,cpuacct", tmp.0.join("cpu")).expect("symlink");
        std::os::unix::fs::symlink("cpu,cpuacct", tmp.0.join("cpuacct")).expect("symlink");
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_cores: Some(0.5),
            cpu_weight: Some(200),
            pids_max: Some(64),
        };
        let cg = SandboxCgroup::create_at(&tmp.0, CgroupMode::V1, "sbx/sb-1", &limits)
            .expect("create_at");
        let root = fs::canonicalize(&tmp.0).expect("canonicalize");
        let files = cg.procs_files();
        assert_eq!(files.len(), 4, "{files:?}");
        for ctl in ["memory", "cpu,cpuacct", "pids", "freezer"] {
            assert!(files.contains(&root.join(ctl).join("sbx/sb-1/cgroup.procs")));
        }
        assert!(
            !root.join("cpuset/sbx").exists(),
            "cpuset must not be touched"
        );
        let dir = |ctl: &str| root.join(ctl).join("sbx/sb-1");
        assert_eq!(
            read(&dir("memory").join("memory.limit_in_bytes")),
            "67108864"
        );
        assert_eq!(
            read(&dir("memory").join("memory.memsw.limit_in_bytes")),
            "67108864"
        );
        assert_eq!(
            read(&dir("cpu,cpuacct").join("cpu.cfs_period_us")),
            "100000"
        );
        assert_eq!(read(&dir("cpu,cpuacct").join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(&dir("cpu,cpuacct").join("cpu.shares")), "2048");
        assert_eq!(read(&dir("pids").join("pids.max")), "64");

        fs::write(
            dir("memory").join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n",
        )
        .expect("write");
        assert_eq!(cg.oom_kills(), 4);
    }

    #[test]
    fn v1_missing_controller_is_an_error_naming_it() {
        let tmp = TempDir::new("v1-missing");
        for dir in ["memory", "cpu", "freezer"] {
            fs::create_dir(tmp.0.join(dir)).expect("mkdir");
        }
        let err = SandboxCgroup::create_at(&tmp.0, CgroupMode::V1, "sb", &Limits::default())
            .expect_err("pids is missing");
        assert!(
            matches!(
                err,
                CgroupError::ControllerNotMounted {
                    controller: "pids",
                    ..
                }
            ),
            "{err}"
        );
    }

    // ----- the real host (root; v1 here, v2 on most machines) -----

    /// Creates a real cgroup under a unique parent and removes both however the test ends.
    struct RealCgroup {
        cg: Option<SandboxCgroup>,
        parents: Vec<PathBuf>,
    }

    impl RealCgroup {
        /// `None` (test skipped) when not root or when the host lacks the controllers.
        fn create(case: &str, limits: &Limits) -> Option<Self> {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("skipping: needs root");
                return None;
            }
            let name = format!("{}/sb", unique(case));
            let cg = match SandboxCgroup::create(&name, limits) {
                Ok(cg) => cg,
                Err(e @ CgroupError::ControllerNotMounted { .. })
                | Err(e @ CgroupError::ControllerUnavailable { .. }) => {
                    eprintln!("skipping: {e}");
                    return None;
                }
                Err(e) => panic!("create {name}: {e}"),
            };
            let parents = cg
                .dirs()
                .iter()
                .filter_map(|d| d.parent().map(Path::to_path_buf))
                .collect();
            Some(RealCgroup {
                cg: Some(cg),
                parents,
            })
        }

        fn cg(&self) -> &SandboxCgroup {
            self.cg.as_ref().expect("not destroyed yet")
        }

        fn join(&self, child: &Child) {
            for file in self.cg().procs_files() {
                fs::write(&file, child.id().to_string())
                    .unwrap_or_else(|e| panic!("join {}: {e}", file.display()));
            }
        }

        fn destroy(&mut self) {
            let cg = self.cg.take().expect("destroy once");
            let dirs = cg.dirs();
            cg.destroy().expect("destroy");
            for dir in dirs {
                assert!(!dir.exists(), "{} survived destroy", dir.display());
            }
        }
    }

    impl Drop for RealCgroup {
        fn drop(&mut self) {
            if let Some(cg) = self.cg.take() {
                let _ = cg.destroy();
            }
            for parent in &self.parents {
                let _ = fs::remove_dir(parent);
            }
        }
    }

    #[test]
    fn real_limits_join_kill_destroy() {
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_cores: Some(0.5),
            cpu_weight: Some(200),
            pids_max: Some(64),
        };
        let Some(mut real) = RealCgroup::create("real", &limits) else {
            return;
        };
        let cg = real.cg();
        match &cg.layout {
            Layout::V1(d) => {
                let mem = &d.memory.1;
                assert_eq!(read(&mem.join("memory.limit_in_bytes")), "67108864");
                if mem.join("memory.memsw.limit_in_bytes").exists() {
                    assert_eq!(read(&mem.join("memory.memsw.limit_in_bytes")), "67108864");
                }
                assert_eq!(read(&d.cpu.1.join("cpu.cfs_period_us")), "100000");
                assert_eq!(read(&d.cpu.1.join("cpu.cfs_quota_us")), "50000");
                assert_eq!(read(&d.cpu.1.join("cpu.shares")), "2048");
                assert_eq!(read(&d.pids.1.join("pids.max")), "64");
                assert!(d.freezer.1.is_dir());
            }
            Layout::V2 { dir, .. } => {
                assert_eq!(read(&dir.join("memory.max")), "67108864");
                if dir.join("memory.swap.max").exists() {
                    assert_eq!(read(&dir.join("memory.swap.max")), "0");
                }
                assert_eq!(read(&dir.join("cpu.max")), "50000 100000");
                assert_eq!(read(&dir.join("cpu.weight")), "200");
                assert_eq!(read(&dir.join("pids.max")), "64");
            }
        }

        // load() re-adopts it by name.
        let loaded = SandboxCgroup::load(cg.name()).expect("load");
        assert_eq!(loaded.procs_files(), cg.procs_files());

        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        real.join(&child);
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        assert_eq!(real.cg().pids(), vec![pid]);

        real.cg().kill_all().expect("kill_all");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert!(real.cg().pids().is_empty());

        real.destroy();
        assert!(matches!(
            SandboxCgroup::load(loaded.name()),
            Err(CgroupError::NotFound { .. })
        ));
        // Destroying again (dirs gone) is fine.
        loaded.destroy().expect("second destroy");
    }

    #[test]
    fn real_destroy_reaches_sub_cgroups() {
        let Some(mut real) = RealCgroup::create("nested", &Limits::default()) else {
            return;
        };
        // A sub-cgroup inside the sandbox's (as a delegated sandbox could make) with a process.
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        for dir in real.cg().dirs() {
            let inner = dir.join("inner");
            fs::create_dir(&inner).expect("mkdir inner");
            fs::write(inner.join("cgroup.procs"), child.id().to_string()).expect("join inner");
        }
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        assert_eq!(real.cg().pids(), vec![pid]);
        real.destroy();
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    /// Start `sh -c script` that waits for a line on stdin, so it can be put in the cgroup
    /// before it forks anything.
    fn spawn_gated(script: &str) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!("read _go; {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh")
    }

    fn release(child: &mut Child) {
        let stdin = child.stdin.as_mut().expect("stdin piped");
        stdin.write_all(b"go\n").expect("release child");
    }

    #[test]
    fn real_memory_hog_is_oom_killed() {
        let limits = Limits {
            memory_bytes: Some(32 << 20),
            ..Limits::default()
        };
        let Some(mut real) = RealCgroup::create("oom", &limits) else {
            return;
        };
        // `tail` keeps the last 10 lines; /dev/zero has no newline, so it buffers all 200 MiB.
        let mut child = spawn_gated("head -c 200M /dev/zero | tail");
        real.join(&child);
        release(&mut child);
        let status = child.wait().expect("wait");
        assert!(
            !status.success(),
            "the hog finished within 32 MiB: {status:?}"
        );
        assert!(real.cg().oom_kills() >= 1, "no OOM kill recorded");
        if let Some(peak) = real.cg().memory_peak() {
            assert!(peak <= 32 << 20, "peak {peak} above the limit");
        }
        real.destroy();
    }

    #[test]
    fn real_pids_max_caps_forks() {
        let limits = Limits {
            pids_max: Some(5),
            ..Limits::default()
        };
        let Some(mut real) = RealCgroup::create("pids", &limits) else {
            return;
        };
        let mut child = spawn_gated("for i in 1 2 3 4 5 6 7 8 9 10; do sleep 30 & done; wait");
        real.join(&child);
        release(&mut child);
        // Let the loop run into the limit; the shell gives up ("Cannot fork") and exits, its
        // sleeps stay behind in the cgroup.
        sleep(Duration::from_millis(500));
        let n = real.cg().pids().len();
        assert!((1..=5).contains(&n), "{n} processes with pids.max 5");
        real.destroy();
        let status = child.wait().expect("wait");
        // Either the shell hit the limit and failed, or destroy killed it; never a clean exit.
        assert!(!status.success(), "{status:?}");
    }
}
