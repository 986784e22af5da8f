//! The helper: a single-threaded process the library fork+execs (never a fork of the daemon) that
//! assembles the rootfs in a private mount namespace, clones init into fresh namespaces, writes
//! its id maps and cgroup, and then supervises it: it reports init's exit to the library.
//!
//! Its process name is `sbx:[helper]`; init's is `sbx:[init]`.

use super::init;
use super::proto::{self, HelperConfig, HelperEvent, SetupMsg, WaitStatus};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::Pid;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// The descriptor on which the library hands the helper its config and hears back.
pub const CONTROL_FD: RawFd = 3;

/// Errors of the helper, one per step; the step name travels to the library.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("failed to read the helper config: {0}")]
    Config(#[source] proto::ProtoError),
    #[error("failed to {step}: {source}")]
    Sys {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("failed to {step}: {source}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("init failed to {step}: {error}")]
    Init { step: String, error: String },
    #[error(transparent)]
    Proto(#[from] proto::ProtoError),
}

impl HelperError {
    fn step(&self) -> String {
        match self {
            HelperError::Config(_) => "read config".into(),
            HelperError::Sys { step, .. } | HelperError::Io { step, .. } => step.clone(),
            HelperError::Init { step, .. } => format!("init: {step}"),
            HelperError::Proto(_) => "talk to init".into(),
        }
    }
}

fn sys<T>(step: impl Into<String>, r: nix::Result<T>) -> Result<T, HelperError> {
    r.map_err(|source| HelperError::Sys {
        step: step.into(),
        source,
    })
}

/// Entry point of `sbx-init` when exec'd by the library. Never returns.
pub fn main() -> ! {
    let _ = nix::sys::prctl::set_name(c"sbx:[helper]");
    sys_ignore_sigpipe();
    // SAFETY: the library passes exactly one socket on fd 3 (dup2'd in its pre_exec) and nothing
    // else in this process owns it.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let code = match prepare_namespaces().and_then(|()| run(&control)) {
        Ok(status) => {
            let _ = proto::send(
                control.as_raw_fd(),
                "exited",
                &HelperEvent::Exited { status },
                &[],
            );
            0
        }
        Err(e) => {
            let _ = proto::send(
                control.as_raw_fd(),
                "failed",
                &HelperEvent::Failed {
                    step: e.step(),
                    error: e.to_string(),
                },
                &[],
            );
            1
        }
    };
    std::process::exit(code)
}

fn sys_ignore_sigpipe() {
    super::sys::ignore_sigpipe();
}

/// Network, IPC and UTS namespaces for the sandbox, made before the config arrives (a warm
/// helper has them ready; creating a network namespace costs ~0.5 ms, and tearing an IPC one
/// down another ~0.5 ms when its last process exits — this helper, after the sandbox is gone,
/// off everyone's path). They are owned by the host's user namespace, so sandbox root holds
/// no capability over them: it cannot reconfigure its network or IPC limits at all (stricter
/// than namespaces owned by its own user namespace). What a container expects is set here
/// instead: loopback up, any uid may bind ports below 1024 and open ICMP echo sockets (as
/// Docker sets per container).
fn prepare_namespaces() -> Result<(), HelperError> {
    sys(
        "unshare the network, IPC and UTS namespaces",
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS),
    )?;
    sys("bring up loopback", super::sys::loopback_up())?;
    for (knob, value) in [
        ("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"),
        ("/proc/sys/net/ipv4/ping_group_range", "0 2147483647"),
    ] {
        std::fs::write(knob, value).map_err(|source| HelperError::Io {
            step: format!("set {knob} to {value:?}"),
            source,
        })?;
    }
    Ok(())
}

fn run(control: &OwnedFd) -> Result<WaitStatus, HelperError> {
    let (cfg, _): (HelperConfig, _) =
        proto::expect(control.as_raw_fd(), "helper config").map_err(HelperError::Config)?;

    // A private mount namespace for the helper: the overlay and binds exist only here and in the
    // sandbox, so they vanish with the last process even if everything is SIGKILLed.
    sys(
        "unshare the helper mount namespace",
        unshare(CloneFlags::CLONE_NEWNS),
    )?;
    // rslave: host mount events still reach us, nothing of ours propagates back (runc#1500).
    sys(
        "make / a recursive slave",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&str>,
        ),
    )?;
    mount_rootfs(&cfg)?;
    // The hostname, and a sysfs of our network namespace: both need capabilities over
    // namespaces the sandbox does not own, so they are set up here, as root.
    sys(
        format!("set the hostname {:?}", cfg.hostname),
        nix::unistd::sethostname(&cfg.hostname),
    )?;
    mount_sysfs(&cfg.rootfs.merged)?;

    // Init's control socket, bound on the host before clone; init inherits the listener.
    let listener = bind_control_socket(&cfg.control_socket)?;

    let (parent_sock, child_sock) = sys("create the setup socketpair", proto::seqpacket_pair())?;
    // With one clone the kernel creates the user namespace first, so the pid and mount
    // namespaces are owned by it. Network, IPC and UTS are ours already (prepare_namespaces).
    // CLONE_NEWCGROUP comes later, from inside, once init is in its cgroup.
    let flags = CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS;
    // The new user namespace is owned by the euid that creates it, and the kernel charges
    // per-user counts (inotify instances, pending signals, message queues) to that owner at
    // the host level: create it as the sandbox's own host uid, not as root, so sandboxes never
    // share — or exhaust — root's quotas. Our saved uid stays 0, so we switch back right after.
    sys(
        "take the sandbox's uid to create its user namespace",
        super::sys::set_effective_ids(cfg.id_base, cfg.id_base),
    )?;
    let cloned = super::sys::clone_fork(flags);
    if matches!(cloned, Ok(Some(_)) | Err(_)) {
        sys("return to uid 0", super::sys::set_effective_ids(0, 0))?;
    }
    let child = match sys("clone init", cloned)? {
        None => {
            drop(parent_sock);
            init::main(&cfg, child_sock, listener)
        }
        Some(pid) => pid,
    };
    drop(child_sock);
    drop(listener);

    let released = write_mappings(&cfg, child).and_then(|()| {
        proto::send(
            parent_sock.as_raw_fd(),
            "mapping written",
            &SetupMsg::MappingWritten,
            &[],
        )
        .map_err(HelperError::from)
    });
    if let Err(e) = released {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child, None);
        return Err(e);
    }
    match proto::recv::<SetupMsg>(parent_sock.as_raw_fd(), "init ready")? {
        Some((SetupMsg::Ready, _)) => {}
        Some((SetupMsg::Failed { step, error }, _)) => {
            let _ = nix::sys::wait::waitpid(child, None);
            return Err(HelperError::Init { step, error });
        }
        Some((SetupMsg::MappingWritten, _)) | None => {
            let status = wait_for(child);
            return Err(HelperError::Init {
                step: "set up the sandbox".into(),
                error: format!("init died during setup ({status:?})"),
            });
        }
    }
    drop(parent_sock);
    proto::send(
        control.as_raw_fd(),
        "ready",
        &HelperEvent::Ready {
            pid: child.as_raw(),
        },
        &[],
    )?;
    let status = wait_for(child);
    // The exit status outlives us and whoever spawned the sandbox: a process that re-adopts it
    // (Sandbox::adopt) reads it here.
    if let Some(dir) = cfg.control_socket.parent() {
        let _ = proto::write_atomic(&dir.join(proto::EXIT_FILE), &status);
    }
    Ok(status)
}

fn wait_for(child: Pid) -> WaitStatus {
    loop {
        match nix::sys::wait::waitpid(child, None) {
            Ok(s) => {
                if let Some(st) = WaitStatus::from_nix(s) {
                    return st;
                }
            }
            Err(nix::Error::EINTR) => continue,
            Err(_) => return WaitStatus::Signal(libc::SIGKILL),
        }
    }
}

/// Overlay of the image layers with the sandbox's upper, then read-only host binds on top.
fn mount_rootfs(cfg: &HelperConfig) -> Result<(), HelperError> {
    let plan = &cfg.rootfs;
    let lowers: Vec<String> = plan
        .lowers
        .iter()
        .map(|p| escape_overlay_path(&p.to_string_lossy()))
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},index=off,xino=off",
        lowers.join(":"),
        escape_overlay_path(&plan.upper.to_string_lossy()),
        escape_overlay_path(&plan.work.to_string_lossy()),
    );
    sys(
        format!("mount the overlay on {}", plan.merged.display()),
        mount(
            Some("overlay"),
            &plan.merged,
            Some("overlay"),
            MsFlags::MS_NODEV,
            Some(opts.as_str()),
        ),
    )?;
    for b in &plan.binds {
        let rel = b.target.strip_prefix("/").unwrap_or(&b.target);
        let target = plan.merged.join(rel);
        sys(
            format!("bind {} on {}", b.source.display(), target.display()),
            mount(
                Some(&b.source),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            ),
        )?;
        // The first bind ignores other flags; read-only takes a remount.
        sys(
            format!("remount {} read-only", target.display()),
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND
                    | MsFlags::MS_REMOUNT
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV,
                None::<&str>,
            ),
        )?;
    }
    Ok(())
}

/// A read-only sysfs at `<rootfs>/sys`, tagged with our network namespace (so /sys/class/net
/// shows only the sandbox's loopback). The image decides what `sys` is: only a real directory
/// is mounted on (a symlink would be followed on the host side).
fn mount_sysfs(rootfs: &Path) -> Result<(), HelperError> {
    let target = rootfs.join("sys");
    let is_dir = std::fs::symlink_metadata(&target)
        .map(|m| m.is_dir())
        .unwrap_or(false);
    if !is_dir {
        return Err(HelperError::Io {
            step: "check the mount point /sys".into(),
            source: std::io::Error::other(
                "the image has something other than a directory there (a symlink?)",
            ),
        });
    }
    sys(
        "mount sysfs on /sys",
        mount(
            Some("sysfs"),
            &target,
            Some("sysfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )
}

/// overlayfs splits options on ',' and lowerdir on ':'; escape both.
fn escape_overlay_path(p: &str) -> String {
    p.replace('\\', "\\\\")
        .replace(':', "\\:")
        .replace(',', "\\,")
}

fn bind_control_socket(path: &Path) -> Result<OwnedFd, HelperError> {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let _ = std::fs::remove_file(path);
    let fd = sys(
        "create the control socket",
        socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        ),
    )?;
    let addr = sys(
        format!("address the control socket {}", path.display()),
        UnixAddr::new(path),
    )?;
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = bind(fd.as_raw_fd(), &addr);
    nix::sys::stat::umask(old);
    sys(format!("bind the control socket {}", path.display()), bound)?;
    sys(
        "listen on the control socket",
        listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN)),
    )?;
    Ok(fd)
}

/// Map sandbox uid/gid 0..count to the host range, and put init in its cgroup, before it runs.
fn write_mappings(cfg: &HelperConfig, child: Pid) -> Result<(), HelperError> {
    let map = format!("0 {} {}\n", cfg.id_base, cfg.id_count);
    let io = |step: String| move |source| HelperError::Io { step, source };
    // We are privileged in the parent user namespace, so setgroups may stay allowed
    // (CVE-2014-8989 concerns unprivileged writers); exec uses it for supplementary groups.
    let base = format!("/proc/{}", child.as_raw());
    std::fs::write(format!("{base}/uid_map"), &map)
        .map_err(io(format!("write uid_map {map:?}")))?;
    std::fs::write(format!("{base}/gid_map"), &map)
        .map_err(io(format!("write gid_map {map:?}")))?;
    for procs in &cfg.cgroup_procs {
        std::fs::write(procs, child.as_raw().to_string())
            .map_err(io(format!("add init to {}", procs.display())))?;
    }
    Ok(())
}
