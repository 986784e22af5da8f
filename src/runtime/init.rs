//! Pid 1 of a sandbox: the container setup (one straight-line function in the known-correct
//! order), then a small init that reaps zombies, forwards signals, and forks + execs commands on
//! request from its control socket.

use super::proto::{
    self, ExecEvent, ExecRequest, HelperConfig, Request, SetupMsg, StdioWire, WaitStatus,
};
use super::{capabilities, sys};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// Paths hidden from the sandbox: files get /dev/null bound over them, directories a read-only
/// empty tmpfs (kernel memory, keyrings, timers, hardware details).
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths bound read-only (kernel knobs a sandbox must not turn).
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Device nodes bound from the host into the sandbox's /dev (a user namespace cannot mknod).
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Signals init forwards to every process it started.
const FORWARDED: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

struct SetupError {
    step: String,
    error: String,
}

fn step<T, E: std::fmt::Display>(
    name: impl Into<String>,
    r: Result<T, E>,
) -> Result<T, SetupError> {
    r.map_err(|e| SetupError {
        step: name.into(),
        error: e.to_string(),
    })
}

/// Entry of the cloned child. Never returns.
pub fn main(cfg: &HelperConfig, sync: OwnedFd, listener: OwnedFd) -> ! {
    let _ = nix::sys::prctl::set_name(c"sbx:[init]");
    match setup(cfg, &sync, &listener) {
        Ok(devnull) => {
            if proto::send(sync.as_raw_fd(), "ready", &SetupMsg::Ready, &[]).is_err() {
                sys::exit_now(1);
            }
            drop(sync);
            Init::new(listener, devnull).run()
        }
        Err(e) => {
            let _ = proto::send(
                sync.as_raw_fd(),
                "failed",
                &SetupMsg::Failed {
                    step: e.step,
                    error: e.error,
                },
                &[],
            );
            sys::exit_now(1)
        }
    }
}

/// The setup sequence, in order. Each step says why it is where it is.
fn setup(cfg: &HelperConfig, sync: &OwnedFd, listener: &OwnedFd) -> Result<OwnedFd, SetupError> {
    // 1. Wait until the parent has written our uid/gid maps and put us in the cgroup: before the
    //    maps exist every id is the overflow id and setresuid/mounts fail.
    match step(
        "wait for the id mappings",
        proto::expect::<SetupMsg>(sync.as_raw_fd(), "mapping"),
    )? {
        (SetupMsg::MappingWritten, _) => {}
        (other, _) => {
            return Err(SetupError {
                step: "wait for the id mappings".into(),
                error: format!("unexpected message {other:?}"),
            })
        }
    }
    //    The volumes follow: detached mounts the helper id-mapped through our user namespace
    //    (it needs host privileges for that, and our maps for the mapping).
    let volumes = receive_volumes(cfg, sync)?;
    // 2. Nothing we mount may propagate to the helper's namespace (rslave, as runc).
    step(
        "make / a recursive slave",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&str>,
        ),
    )?;
    // 3. Bind the rootfs onto itself: the overlay came from the helper's namespace and is
    //    locked here (pivot_root refuses a locked new root with EINVAL); a bind made in our
    //    own namespace is not. We run as the sandbox's host uid (the helper cloned us with
    //    it), which may traverse the 0711 run directories; we enter the rootfs now and use
    //    relative paths from here on.
    let merged = &cfg.rootfs.merged;
    step(
        format!("bind the rootfs {} onto itself", merged.display()),
        mount(
            Some(merged),
            merged,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    step(
        format!("chdir to the rootfs {}", merged.display()),
        nix::unistd::chdir(merged),
    )?;
    // 4. Become root of the new user namespace (keep caps across the switch), drop host groups.
    step("keep capabilities", nix::sys::prctl::set_keepcaps(true))?;
    step("switch to uid/gid 0 in the sandbox", sys::set_ids(0, 0))?;
    step("clear supplementary groups", nix::unistd::setgroups(&[]))?;
    // 5. Not dumpable: sandbox processes (same uid) must not ptrace init or open /proc/1/mem;
    //    our mm belongs to the host user namespace, so the kernel refuses them.
    step(
        "mark init non-dumpable",
        nix::sys::prctl::set_dumpable(false),
    )?;
    // 6. New session: a controlling tty needs it, and a dying session leader cannot SIGHUP us.
    step("start a new session", nix::unistd::setsid())?;
    // 7. Join a fresh cgroup namespace now that we are inside our cgroup (it becomes our root).
    step(
        "unshare the cgroup namespace",
        unshare(CloneFlags::CLONE_NEWCGROUP),
    )?;
    let root = Path::new(".");
    // The image decides what proc, dev and sys are in the rootfs: mount only onto real
    // directories, never through a symlink an image planted there (it would resolve against
    // the host's root before pivot_root; GHSA-fh74-hm69-rqjw).
    for dir in ["proc", "dev", "sys"] {
        require_real_dir(root, dir)?;
    }
    // 7a. Volumes, on the mount points the helper made: in our own mount namespace (the mounts
    //    vanish with it), under the new root and before pivot_root, while we still hold
    //    CAP_SYS_ADMIN over this namespace (move_mount; capabilities are cut at step 14 and
    //    seccomp denies the mount calls from step 17 on). Before /proc and /dev, which no
    //    volume may cover.
    attach_volumes(cfg, volumes)?;
    // 8. Kernel filesystems under the new root, before pivot_root: in a user namespace a new
    //    procfs/sysfs is allowed only while a full one is still visible. /proc is mounted by us,
    //    pid 1 of the new pid namespace, so it shows only the sandbox's processes.
    mount_proc(root)?;
    mount_dev(root)?;
    // /sys is the helper's: a sysfs tagged with the network namespace, mounted before clone.
    // 9. pivot_root(".", ".") dance: the host root becomes unreachable.
    pivot(root)?;
    // 10. Mask and make read-only the dangerous parts of /proc and /sys (after pivot, with the
    //    sandbox's own /dev/null, verified to be the null device).
    let devnull = step(
        "open the sandbox /dev/null",
        nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ),
    )?;
    // SAFETY-free: wrap the raw fd we just opened.
    let devnull = owned(devnull);
    verify_dev_null(&devnull)?;
    for p in MASKED_PATHS {
        mask(p)?;
    }
    for p in READONLY_PATHS {
        readonly(p)?;
    }
    // 11. Hostname and loopback were set by the helper, which owns those namespaces.
    // 12. Re-point stdio that still refers to host files to the sandbox's /dev/null.
    for fd in 0..3 {
        step(
            "re-point stdio to /dev/null",
            nix::unistd::dup2(devnull.as_raw_fd(), fd),
        )?;
    }
    // 13. Close every inherited descriptor but ours, late (GHSA-xr7r-f8xq-vfvv).
    step(
        "close inherited descriptors",
        sys::close_all_except(&[sync.as_raw_fd(), listener.as_raw_fd(), devnull.as_raw_fd()]),
    )?;
    // 14. Capabilities: Docker's default set, bounding set cut so no execve regains more.
    step("restrict capabilities", capabilities::restrict_to_default())?;
    // 15. Signals arrive on a signalfd; SIGPIPE would kill us on a vanished client.
    sys::ignore_sigpipe();
    step("chdir /", std::env::set_current_dir("/"))?;
    // 16. Resource limits every process starts with: no core dumps (they would land in the
    //     writable layer), a bounded descriptor table (lowering is always allowed; raising a
    //     hard limit needs CAP_SYS_RESOURCE in the host namespace, which we never have here).
    set_rlimits()?;
    // 17. no_new_privs, then seccomp: the last step of setup, after every privileged one
    //     (mounts, pivot_root, capabilities). Init installs the filter once and every process
    //     it forks inherits it, so an exec pays no filter install (a kernel filter load costs
    //     ~0.1 ms for our ~250-instruction programs, ~1 ms for seccompiler's linear layout).
    //     What init and an exec'd child do under the filter is all in the default allowlist;
    //     a custom profile must allow it too (the list is in docs/security.md).
    step("set no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    if let Some(filter) = &cfg.seccomp {
        step("install the seccomp filter", filter.install())?;
    }
    Ok(devnull)
}

/// A volume as the helper hands it over: the id-mapped detached mount, and the device and
/// inode of the mount point it created for it.
struct Volume {
    mount: OwnedFd,
    dev: u64,
    ino: u64,
}

/// One `SetupMsg::Volume` per configured mount, in order, each with one descriptor.
fn receive_volumes(cfg: &HelperConfig, sync: &OwnedFd) -> Result<Vec<Volume>, SetupError> {
    let mut out = Vec::with_capacity(cfg.mounts.len());
    for (i, m) in cfg.mounts.iter().enumerate() {
        let what = format!("receive the volume {}", m.source.display());
        match step(
            what.clone(),
            proto::expect::<SetupMsg>(sync.as_raw_fd(), "volume"),
        )? {
            (SetupMsg::Volume { index, dev, ino }, mut fds) if index == i && fds.len() == 1 => {
                let mount = fds.pop().expect("one descriptor, checked above");
                out.push(Volume { mount, dev, ino });
            }
            (other, fds) => {
                return Err(SetupError {
                    step: what,
                    error: format!(
                        "unexpected message {other:?} with {} descriptors",
                        fds.len()
                    ),
                })
            }
        }
    }
    Ok(out)
}

/// Attach each volume on its target below the current directory (the new root). The target is
/// resolved as the helper did (`RESOLVE_IN_ROOT`: image symlinks stay inside the rootfs) and
/// must be the very directory the helper created and checked (same device and inode).
fn attach_volumes(cfg: &HelperConfig, volumes: Vec<Volume>) -> Result<(), SetupError> {
    use std::os::unix::fs::OpenOptionsExt;
    if volumes.is_empty() {
        return Ok(());
    }
    let root: OwnedFd = step(
        "open the new root",
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open("."),
    )?
    .into();
    for (m, v) in cfg.mounts.iter().zip(volumes) {
        let what = format!("open the mount point {}", m.target);
        let target = step(
            what.clone(),
            sys::openat2(
                root.as_fd(),
                &super::helper::target_relative(&m.target),
                libc::O_PATH | libc::O_DIRECTORY,
                libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
            ),
        )?;
        let st = step(what.clone(), nix::sys::stat::fstat(target.as_raw_fd()))?;
        if (st.st_dev, st.st_ino) != (v.dev, v.ino) {
            return Err(SetupError {
                step: what,
                error: "it is not the directory the helper created".into(),
            });
        }
        step(
            format!("attach the volume {} on {}", m.source.display(), m.target),
            sys::move_mount_onto(v.mount.as_fd(), target.as_fd()),
        )?;
    }
    Ok(())
}

/// Soft and hard `RLIMIT_NOFILE` for sandbox processes (or less, if ours is lower).
const NOFILE: u64 = 65536;

fn set_rlimits() -> Result<(), SetupError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    step("set RLIMIT_CORE", setrlimit(Resource::RLIMIT_CORE, 0, 0))?;
    let (_, hard) = step("get RLIMIT_NOFILE", getrlimit(Resource::RLIMIT_NOFILE))?;
    let n = hard.min(NOFILE);
    step(
        format!("set RLIMIT_NOFILE to {n}"),
        setrlimit(Resource::RLIMIT_NOFILE, n, n),
    )
}

fn owned(fd: RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn require_real_dir(root: &Path, name: &str) -> Result<(), SetupError> {
    match std::fs::symlink_metadata(root.join(name)) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(SetupError {
            step: format!("check the mount point /{name}"),
            error: "the image has something other than a directory there (a symlink?)".into(),
        }),
        Err(e) => Err(SetupError {
            step: format!("check the mount point /{name}"),
            error: e.to_string(),
        }),
    }
}

fn mount_proc(root: &Path) -> Result<(), SetupError> {
    let target = root.join("proc");
    step(
        format!("mount proc on {}", target.display()),
        mount(
            Some("proc"),
            &target,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )
}

fn mount_dev(root: &Path) -> Result<(), SetupError> {
    let dev = root.join("dev");
    step(
        format!("mount tmpfs on {}", dev.display()),
        mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=755,size=65536k"),
        ),
    )?;
    for name in DEVICES {
        let target = dev.join(name);
        step(
            format!("create {}", target.display()),
            std::fs::File::create(&target),
        )?;
        let source = Path::new("/dev").join(name);
        step(
            format!("bind {} on {}", source.display(), target.display()),
            mount(
                Some(&source),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
        )?;
    }
    let pts = dev.join("pts");
    step("mkdir /dev/pts", std::fs::create_dir(&pts))?;
    step(
        "mount devpts",
        mount(
            Some("devpts"),
            &pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            // max: the pty count is host-wide (kernel.pty.max); one sandbox must not take them all.
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5,max=256"),
        ),
    )?;
    let shm = dev.join("shm");
    step("mkdir /dev/shm", std::fs::create_dir(&shm))?;
    step(
        "mount /dev/shm",
        mount(
            Some("shm"),
            &shm,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=1777,size=65536k"),
        ),
    )?;
    let mq = dev.join("mqueue");
    step("mkdir /dev/mqueue", std::fs::create_dir(&mq))?;
    // mqueue: refused while the IPC namespace is the helper's (mq_open works without the
    // mount, which only lists queues); attempted in case a kernel allows it.
    let _ = mount(
        Some("mqueue"),
        &mq,
        Some("mqueue"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    );
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        step(
            format!("symlink /dev/{link}"),
            std::os::unix::fs::symlink(to, dev.join(link)),
        )?;
    }
    Ok(())
}

fn pivot(root: &Path) -> Result<(), SetupError> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    let flags = OFlag::O_DIRECTORY | OFlag::O_PATH | OFlag::O_CLOEXEC;
    let old = owned(step("open the old root", open("/", flags, Mode::empty()))?);
    let new = owned(step("open the new root", open(root, flags, Mode::empty()))?);
    step(
        "fchdir to the new root",
        nix::unistd::fchdir(new.as_raw_fd()),
    )?;
    step("pivot_root", nix::unistd::pivot_root(".", "."))?;
    step(
        "fchdir to the old root",
        nix::unistd::fchdir(old.as_raw_fd()),
    )?;
    // Slave, not private, before detaching: private would propagate the umount (runc#1500).
    step(
        "make the old root a slave",
        mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    step("detach the old root", umount2(".", MntFlags::MNT_DETACH))?;
    step("chdir to the new root", nix::unistd::chdir("/"))
}

fn verify_dev_null(fd: &OwnedFd) -> Result<(), SetupError> {
    let st = step("stat /dev/null", nix::sys::stat::fstat(fd.as_raw_fd()))?;
    let is_chr = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    if !is_chr || libc::major(st.st_rdev) != 1 || libc::minor(st.st_rdev) != 3 {
        return Err(SetupError {
            step: "verify /dev/null".into(),
            error: "not the null device".into(),
        });
    }
    Ok(())
}

fn mask(path: &str) -> Result<(), SetupError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(()), // absent on this kernel: nothing to hide
    };
    if meta.is_dir() {
        step(
            format!("mask {path}"),
            mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0,mode=0555"),
            ),
        )
    } else {
        step(
            format!("mask {path}"),
            mount(
                Some("/dev/null"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
        )
    }
}

fn readonly(path: &str) -> Result<(), SetupError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    step(
        format!("bind {path}"),
        mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    // The first bind ignores other flags; read-only takes a remount.
    step(
        format!("remount {path} read-only"),
        mount(
            None::<&str>,
            path,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )
}

/// The running init: its listener, the open exec connections, and which pid belongs to which.
///
/// A start waits in the clone for its child's execve (vfork-style, see [`sys::vfork_spawn`]):
/// a child stopped in that window (by sandbox root, which has CAP_KILL, or once it took the
/// exec's uid by any process of that uid) holds up this init until it is continued or killed —
/// only this sandbox, by its own code. Whether the execve worked is read
/// from a pipe that sits in the poll set.
struct Init {
    listener: OwnedFd,
    devnull: OwnedFd,
    /// A spare descriptor, given up to accept-and-close a connection when our descriptor table
    /// is full (sandbox root can lower our RLIMIT_NOFILE): the caller gets an error, not a hang.
    spare: Option<OwnedFd>,
    /// Not even the spare slot let us shed a connection: skip the listener for one round.
    listen_paused: bool,
    /// Exec connections by a unique id (never by fd number, which accept reuses).
    conns: HashMap<u64, OwnedFd>,
    next_conn: u64,
    /// Started process pid → its connection.
    procs: HashMap<i32, u64>,
    /// Forked, execve not yet reported: pid → what to tell the client when it is.
    pending: HashMap<i32, Pending>,
    entrypoint: Option<i32>,
    /// What a new child runs on until its execve (None: could not map it; children fork).
    stack: Option<sys::ChildStack>,
}

/// The stack a child of init uses between clone and execve (it runs a few syscall wrappers).
const CHILD_STACK: usize = 256 * 1024;

struct Pending {
    /// Read end of the child's close-on-exec error pipe: EOF = execve succeeded.
    err: OwnedFd,
    conn: u64,
    master: Option<OwnedFd>,
    entrypoint: bool,
    /// The child was reaped before its pipe was read.
    exited: Option<WaitStatus>,
}

impl Init {
    fn new(listener: OwnedFd, devnull: OwnedFd) -> Self {
        let spare = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()
        .map(owned);
        Init {
            listener,
            devnull,
            spare,
            listen_paused: false,
            conns: HashMap::new(),
            next_conn: 0,
            procs: HashMap::new(),
            pending: HashMap::new(),
            entrypoint: None,
            // A child sharing our memory must not allocate: only when close_range works (its
            // fallback reads /proc into a Vec) do children start vfork-style.
            stack: sys::close_range_cloexec_works()
                .then(|| sys::ChildStack::new(CHILD_STACK).ok())
                .flatten(),
        }
    }

    fn run(&mut self) -> ! {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        for s in FORWARDED {
            mask.add(*s);
        }
        if mask.thread_block().is_err() {
            sys::exit_now(1);
        }
        let sfd = match SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        {
            Ok(s) => s,
            Err(_) => sys::exit_now(1),
        };
        loop {
            let conn_ids: Vec<u64> = self.conns.keys().copied().collect();
            let pending_pids: Vec<i32> = self.pending.keys().copied().collect();
            // Out of descriptors even for shedding: leave the listener alone for a while rather
            // than spin on it (the callers' exec start timeout reports the refusal).
            let (listen_events, timeout) = if std::mem::take(&mut self.listen_paused) {
                (PollFlags::empty(), PollTimeout::from(100u8))
            } else {
                (PollFlags::POLLIN, PollTimeout::NONE)
            };
            let mut fds = vec![
                PollFd::new(self.listener.as_fd(), listen_events),
                PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            ];
            for pid in &pending_pids {
                fds.push(PollFd::new(
                    self.pending[pid].err.as_fd(),
                    PollFlags::POLLIN,
                ));
            }
            for id in &conn_ids {
                fds.push(PollFd::new(self.conns[id].as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(_) => sys::exit_now(1),
            }
            let ready = |p: &PollFd| p.any().unwrap_or(false);
            let listen_ready = ready(&fds[0]);
            let sig_ready = ready(&fds[1]);
            let started: Vec<i32> = pending_pids
                .iter()
                .zip(&fds[2..])
                .filter(|(_, p)| ready(p))
                .map(|(pid, _)| *pid)
                .collect();
            let closed: Vec<u64> = conn_ids
                .iter()
                .zip(&fds[2 + pending_pids.len()..])
                .filter(|(_, p)| ready(p))
                .map(|(id, _)| *id)
                .collect();
            drop(fds);
            // Starts first: a child reaped in this round is then already known as started.
            for pid in started {
                self.finish_start(pid);
            }
            if sig_ready {
                self.on_signals(&sfd);
            }
            for id in closed {
                // The client went away (or sent more than one request): forget the connection;
                // the process keeps running and its exit is reported to nobody.
                self.conns.remove(&id);
            }
            if listen_ready {
                self.accept();
            }
        }
    }

    fn on_signals(&mut self, sfd: &SignalFd) {
        while let Ok(Some(info)) = sfd.read_signal() {
            let sig = info.ssi_signo as i32;
            if sig == libc::SIGCHLD {
                continue;
            }
            if let Ok(s) = Signal::try_from(sig) {
                for pid in self.procs.keys() {
                    // Each started process leads its own session and group.
                    let _ = nix::sys::signal::kill(Pid::from_raw(-pid), s);
                }
            }
        }
        self.reap();
    }

    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => {
                    let (Some(pid), Some(status)) = (s.pid(), WaitStatus::from_nix(s)) else {
                        continue;
                    };
                    self.exited(pid.as_raw(), status);
                }
            }
        }
    }

    fn exited(&mut self, pid: i32, status: WaitStatus) {
        if let Some(p) = self.pending.get_mut(&pid) {
            // Its pipe is read next round; report then.
            p.exited = Some(status);
            return;
        }
        if let Some(conn) = self.procs.remove(&pid) {
            if let Some(c) = self.conns.remove(&conn) {
                let _ = proto::send(c.as_raw_fd(), "exited", &ExecEvent::Exited { status }, &[]);
            }
        }
        if self.entrypoint == Some(pid) {
            // The sandbox ends with its entrypoint; the kernel kills the rest of the pid
            // namespace when we exit.
            sys::exit_now(status.exit_code());
        }
    }

    fn accept(&mut self) {
        use nix::sys::socket::{accept4, SockFlag};
        let raw = match accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(raw) => raw,
            Err(nix::Error::EMFILE) | Err(nix::Error::ENFILE) => {
                // Shed the connection: with the spare slot free, accept it and close it (the
                // caller sees the sandbox refuse), instead of spinning on a listener that
                // stays readable.
                self.spare = None;
                match accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    Ok(raw) => drop(owned(raw)),
                    Err(_) => self.listen_paused = true,
                }
                self.spare = nix::fcntl::open(
                    "/dev/null",
                    nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .ok()
                .map(owned);
                return;
            }
            Err(_) => return,
        };
        let conn = owned(raw);
        let (req, fds) = match proto::recv::<Request>(conn.as_raw_fd(), "request") {
            Ok(Some((Request::Exec(r), fds))) => (r, fds),
            Ok(Some((Request::Signal { pid, sig }, _))) => {
                let reply = self.signal(pid, sig);
                let _ = proto::send(conn.as_raw_fd(), "signal reply", &reply, &[]);
                return;
            }
            Ok(None) => return,
            Err(e) => {
                let _ = proto::send(
                    conn.as_raw_fd(),
                    "failed",
                    &ExecEvent::Failed {
                        step: format!("read the request: {e}"),
                        errno: libc::EINVAL,
                    },
                    &[],
                );
                return;
            }
        };
        match self.start(&req, fds) {
            Ok((pid, err, master)) => {
                // After a vfork the child has usually exec'd (closing the pipe) by now: then
                // report at once instead of after another round of poll.
                let done = {
                    let mut p = [PollFd::new(err.as_fd(), PollFlags::POLLIN)];
                    matches!(poll(&mut p, PollTimeout::ZERO), Ok(n) if n > 0)
                };
                let id = self.next_conn;
                self.next_conn += 1;
                self.conns.insert(id, conn);
                self.pending.insert(
                    pid.as_raw(),
                    Pending {
                        err,
                        conn: id,
                        master,
                        entrypoint: req.entrypoint,
                        exited: None,
                    },
                );
                if done {
                    self.finish_start(pid.as_raw());
                }
            }
            Err((step, errno)) => {
                let _ = proto::send(
                    conn.as_raw_fd(),
                    "failed",
                    &ExecEvent::Failed { step, errno },
                    &[],
                );
            }
        }
    }

    /// Signal the process group of a process we started and still track (never anything else:
    /// the pid must be one of ours, so a stale pid cannot hit a stranger).
    fn signal(&self, pid: i32, sig: i32) -> ExecEvent {
        let fail = |errno: nix::Error| ExecEvent::Failed {
            step: format!("signal {sig} to process {pid}"),
            errno: errno as i32,
        };
        if !self.procs.contains_key(&pid) {
            return fail(nix::Error::ESRCH);
        }
        let Ok(sig) = Signal::try_from(sig) else {
            return fail(nix::Error::EINVAL);
        };
        // Each started process leads its own session and group: the whole job gets it.
        match nix::sys::signal::kill(Pid::from_raw(-pid), sig) {
            Ok(()) => ExecEvent::Signalled,
            Err(e) => fail(e),
        }
    }

    /// The child's error pipe is readable: EOF means execve succeeded (the pipe was
    /// close-on-exec); otherwise it carries the errno and the failed step.
    fn finish_start(&mut self, pid: i32) {
        let Some(p) = self.pending.remove(&pid) else {
            return;
        };
        let mut buf = [0u8; 512];
        let mut n = 0;
        loop {
            match nix::unistd::read(p.err.as_raw_fd(), &mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => {
                    n += k;
                    if n == buf.len() {
                        break;
                    }
                }
                Err(nix::Error::EINTR) => continue,
                Err(_) => break,
            }
        }
        let conn = self.conns.get(&p.conn).map(|c| c.as_raw_fd());
        if n >= 4 {
            let errno = i32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let step = String::from_utf8_lossy(&buf[4..n]).into_owned();
            if let Some(c) = conn {
                let _ = proto::send(c, "failed", &ExecEvent::Failed { step, errno }, &[]);
            }
            self.conns.remove(&p.conn);
            // The child exits 127 right after writing; it is reaped like any other.
            return;
        }
        if let Some(c) = conn {
            let extra: Vec<RawFd> = p.master.iter().map(|m| m.as_raw_fd()).collect();
            let _ = proto::send(c, "started", &ExecEvent::Started { pid }, &extra);
        }
        if p.entrypoint && self.entrypoint.is_none() {
            self.entrypoint = Some(pid);
        }
        self.procs.insert(pid, p.conn);
        if let Some(status) = p.exited {
            self.exited(pid, status);
        }
    }

    /// Start one request's child; returns its pid, the read end of its error pipe and the pty
    /// master. Whether execve worked is learnt from the pipe later ([`Init::finish_start`]).
    fn start(
        &mut self,
        req: &ExecRequest,
        fds: Vec<OwnedFd>,
    ) -> Result<(Pid, OwnedFd, Option<OwnedFd>), (String, i32)> {
        let fail = |s: &str, e: nix::Error| (s.to_string(), e as i32);
        if req.argv.is_empty() {
            return Err(("parse argv: empty".into(), libc::EINVAL));
        }
        // Everything that allocates or may fail is prepared before fork.
        let argv: Vec<CString> = req
            .argv
            .iter()
            .map(|a| CString::new(a.as_str()))
            .collect::<Result<_, _>>()
            .map_err(|_| ("argv holds a NUL byte".to_string(), libc::EINVAL))?;
        let env: Vec<CString> = req
            .env
            .iter()
            .map(|a| CString::new(a.as_str()))
            .collect::<Result<_, _>>()
            .map_err(|_| ("env holds a NUL byte".to_string(), libc::EINVAL))?;
        let path_var = req
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/bin:/usr/bin:/bin");
        let program = resolve_program(&req.argv[0], path_var, &req.cwd)
            .ok_or_else(|| (format!("find {:?}", req.argv[0]), libc::ENOENT))?;
        let program = CString::new(program.into_os_string().into_encoded_bytes())
            .map_err(|_| ("program path".to_string(), libc::EINVAL))?;

        let mut stdio: [Option<RawFd>; 3] = [None, None, None];
        let mut it = fds.iter();
        for (i, w) in [req.stdin, req.stdout, req.stderr].iter().enumerate() {
            stdio[i] = match w {
                StdioWire::Fd => Some(
                    it.next()
                        .map(|f| f.as_raw_fd())
                        .ok_or_else(|| ("stdio: missing descriptor".to_string(), libc::EBADF))?,
                ),
                StdioWire::Null => Some(self.devnull.as_raw_fd()),
                StdioWire::Stdout => None,
            };
        }
        let pty = match req.pty {
            Some((rows, cols)) => Some(open_pty(rows, cols).map_err(|e| fail("open a pty", e))?),
            None => None,
        };

        let cwd = CString::new(req.cwd.as_str())
            .map_err(|_| ("cwd holds a NUL byte".to_string(), libc::EINVAL))?;
        let argv_p: Vec<*const libc::c_char> = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let env_p: Vec<*const libc::c_char> = env
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();

        let (err_r, err_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fail("pipe", e))?;
        // The child: per-process setup, execve; on failure the step and errno go to the error
        // pipe. It allocates nothing (it may share our memory, see below).
        let slave = pty.as_ref().map(|p| &p.1);
        let mut child = || -> i32 {
            let e = exec_child(req, &stdio, slave, &program, &argv_p, &env_p, &cwd);
            let code = e.1 as i32;
            let _ = nix::unistd::write(&err_w, &code.to_ne_bytes());
            let _ = nix::unistd::write(&err_w, e.0.as_bytes());
            sys::exit_now(127)
        };
        // posix_spawn's way first: the child borrows our memory until its execve (no page
        // tables copied, no copy-on-write faults after). If that clone fails (a seccomp
        // profile may refuse CLONE_VM|CLONE_VFORK with any errno) or there is no stack, fork.
        let spawned = self
            .stack
            .as_mut()
            .and_then(|stack| sys::vfork_spawn(stack, &mut child).ok());
        let pid = match spawned {
            Some(pid) => pid,
            None => match sys::fork().map_err(|e| fail("fork", e))? {
                None => sys::exit_now(child()),
                Some(pid) => pid,
            },
        };
        drop(err_w);
        drop(fds);
        Ok((pid, err_r, pty.map(|p| p.0)))
    }
}

/// Find the program like execvp: a name with a slash is taken as is (relative to cwd).
fn resolve_program(name: &str, path_var: &str, cwd: &str) -> Option<PathBuf> {
    use nix::unistd::{access, AccessFlags};
    if name.contains('/') {
        let p = if name.starts_with('/') {
            PathBuf::from(name)
        } else {
            Path::new(cwd).join(name)
        };
        return Some(p);
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file() && access(p.as_path(), AccessFlags::X_OK).is_ok())
}

/// A pty from the sandbox's devpts: (master, slave). The master is verified to be devpts
/// (CVE-2025-52565).
fn open_pty(rows: u16, cols: u16) -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::{open, OFlag};
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    if !sys::is_devpts(master.as_raw_fd()) {
        return Err(nix::Error::EPERM);
    }
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    sys::set_winsize(master.as_raw_fd(), rows, cols)?;
    let slave = owned(open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?);
    let master = owned(std::os::fd::IntoRawFd::into_raw_fd(master));
    Ok((master, slave))
}

/// In the new child: the per-process part of the setup, then execve. It runs under the
/// seccomp filter and no_new_privs that init installed for itself and every descendant, and
/// may share init's memory (see [`sys::vfork_spawn`]): it allocates nothing and only makes
/// syscalls on what [`Init::start`] prepared. Returns only on failure, with the step and errno.
fn exec_child(
    req: &ExecRequest,
    stdio: &[Option<RawFd>; 3],
    pty_slave: Option<&OwnedFd>,
    program: &CStr,
    argv: &[*const libc::c_char],
    env: &[*const libc::c_char],
    cwd: &CStr,
) -> (&'static str, nix::Error) {
    macro_rules! try_step {
        ($name:expr, $e:expr) => {
            if let Err(e) = $e {
                return ($name, e);
            }
        };
    }
    // Signals: init blocks them for its signalfd; the payload starts with defaults.
    sys::reset_signals();
    // Init runs at a raised priority (INIT_NICE); its processes at the normal one. (Raising
    // the nice value needs no privilege; a sandbox still in the background stays there.)
    let _ = sys::set_thread_nice(0);
    // Own session and process group, so signals and a tty apply to the whole job.
    try_step!("setsid", nix::unistd::setsid().map(drop));
    if let Some(slave) = pty_slave {
        try_step!(
            "set the controlling tty",
            sys::set_controlling_tty(slave.as_raw_fd())
        );
        for fd in 0..3 {
            try_step!(
                "dup2 the pty",
                nix::unistd::dup2(slave.as_raw_fd(), fd).map(drop)
            );
        }
    } else {
        // dup2 onto 0..2 in an order that cannot clobber a source: move sources above 2 first.
        let mut moved = [-1; 3];
        for (i, s) in stdio.iter().enumerate() {
            if let Some(fd) = s {
                match nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10)) {
                    Ok(n) => moved[i] = n,
                    Err(e) => return ("dup stdio", e),
                }
            }
        }
        for i in 0..3 {
            let src = if moved[i] >= 0 { moved[i] } else { moved[1] };
            try_step!("dup2 stdio", nix::unistd::dup2(src, i as RawFd).map(drop));
        }
    }
    // cwd before dropping ids (a root-only dir), retried after (a dir only the user can enter).
    let cwd_ok = nix::unistd::chdir(cwd).is_ok();
    if req.uid != 0 || req.gid != 0 {
        try_step!(
            "setgroups",
            nix::unistd::setgroups(&[nix::unistd::Gid::from_raw(req.gid)])
        );
        try_step!("set uid/gid", sys::set_ids(req.uid, req.gid));
    }
    if !cwd_ok {
        try_step!("chdir to the working directory", nix::unistd::chdir(cwd));
    }
    // Nothing of init's leaks into the payload (its listener, other connections).
    try_step!("mark descriptors close-on-exec", sys::cloexec_from(3));
    // no_new_privs and the seccomp filter are inherited from init (setup step 17).
    ("execve", sys::execve_prepared(program, argv, env))
}
