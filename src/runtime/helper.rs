//! The helper: a single-threaded process the library fork+execs (never a fork of the daemon) that
//! assembles the rootfs in a private mount namespace, clones init into fresh namespaces, writes
//! its id maps and cgroup, and then supervises it: it reports init's exit to the library.
//!
//! Its process name is `sbx:[helper]`; init's is `sbx:[init]`.

use super::init;
use super::proto::{self, HelperConfig, HelperEvent, SetupMsg, VolumeMount, WaitStatus};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::Pid;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

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
    #[error(
        "the kernel refused an id-mapped mount of the volume {path} on its {fstype} filesystem \
         ({errno}); volumes need a filesystem with id-mapped mount support (ext4, xfs, btrfs, \
         tmpfs on Linux 6.3+)"
    )]
    IdmapUnsupported {
        path: PathBuf,
        fstype: String,
        errno: nix::Error,
    },
    #[error(
        "the kernel refused an id-mapped mount of the image layer {path} on its {fstype} \
         filesystem ({errno}); stored images need a state directory on a filesystem with \
         id-mapped mount support (ext4, xfs, btrfs, tmpfs on Linux 6.3+)"
    )]
    LayerIdmapUnsupported {
        path: PathBuf,
        fstype: String,
        errno: nix::Error,
    },
    #[error("failed to {step}: {source}{}", kernel_said(.log))]
    Overlay {
        step: String,
        source: nix::Error,
        /// What overlayfs logged on the filesystem context, if anything.
        log: String,
    },
    #[error(transparent)]
    Proto(#[from] proto::ProtoError),
}

fn kernel_said(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!(" (kernel: {log})")
    }
}

impl HelperError {
    fn step(&self) -> String {
        match self {
            HelperError::Config(_) => "read config".into(),
            HelperError::Sys { step, .. } | HelperError::Io { step, .. } => step.clone(),
            HelperError::Init { step, .. } => format!("init: {step}"),
            HelperError::IdmapUnsupported { path, .. } => {
                format!("id-map the volume {}", path.display())
            }
            HelperError::LayerIdmapUnsupported { path, .. } => {
                format!("id-map the image layer {}", path.display())
            }
            HelperError::Overlay { step, .. } => step.clone(),
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
    // The library hands the control socket over as stdin (see `pool::spawn`): move it to
    // CONTROL_FD and put /dev/null on stdin.
    if nix::unistd::dup2(0, CONTROL_FD).is_err() {
        std::process::exit(2);
    }
    if let Ok(null) = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        let _ = nix::unistd::dup2(null, 0);
        let _ = nix::unistd::close(null);
    }
    // SAFETY: CONTROL_FD was just made a duplicate of the socket the library passed, and
    // nothing else in this process owns it.
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
    // A pre-forked helper waited at background priority; the sandbox it now builds runs at
    // INIT_NICE (helper and init; the processes init starts go back to 0) — unless it is
    // started ahead of need (`background`): then it stays niced until `Sandbox::set_foreground`
    // renices helper and init. (Needs CAP_SYS_NICE, which host root has; without it the
    // sandbox stays niced rather than failing.)
    if !cfg.background {
        let _ = super::sys::set_thread_nice(super::INIT_NICE);
    }

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
    // Volume mount points, created while no sandbox process exists yet (init attaches the
    // volumes on them, after the id maps exist).
    let mount_points = make_mount_points(&cfg)?;

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

    // The volumes are id-mapped through init's user namespace, so after its maps exist; init
    // gets them as detached mounts right behind the go-ahead and attaches them itself.
    let released = write_mappings(&cfg, child)
        .and_then(|()| idmap_volumes(&cfg, child))
        .and_then(|volumes| {
            proto::send(
                parent_sock.as_raw_fd(),
                "mapping written",
                &SetupMsg::MappingWritten,
                &[],
            )?;
            for (index, (fd, &(dev, ino))) in volumes.iter().zip(&mount_points).enumerate() {
                proto::send(
                    parent_sock.as_raw_fd(),
                    "volume",
                    &SetupMsg::Volume { index, dev, ino },
                    &[fd.as_raw_fd()],
                )?;
            }
            Ok(())
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
        Some((SetupMsg::MappingWritten | SetupMsg::Volume { .. }, _)) | None => {
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
    if plan.idmap_lowers {
        mount_idmapped_overlay(cfg)?;
    } else {
        mount_plain_overlay(plan)?;
    }
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

/// The `host` and `dir:` images: lowers used as they are, in one `lowerdir=` option.
fn mount_plain_overlay(plan: &proto::RootfsPlan) -> Result<(), HelperError> {
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
    )
}

/// Mount attributes of each id-mapped image layer: read-only, no devices, no setuid for
/// whoever would reach it by path. (Overlayfs takes private clones of its layers and judges
/// exec and devices by the overlay mount's own flags: nodev, and setuid allowed as on the
/// `host` image — it yields at most sandbox root, an unprivileged host uid, and every
/// sandbox process runs with no_new_privs anyway.)
const LAYER_ATTRS: u64 =
    super::sys::MOUNT_ATTR_RDONLY | super::sys::MOUNT_ATTR_NOSUID | super::sys::MOUNT_ATTR_NODEV;

/// The overlay of a stored image, whose layers hold canonical ids: every layer is mounted
/// id-mapped through a user namespace with the sandbox's maps (host uid/gid N is sandbox N,
/// as for volumes), so image root's files belong to sandbox root in every sandbox and a
/// copy-up lands in the upper owned by the sandbox's own host uids.
///
/// Where the id-mapped layers are: nowhere. Each is a detached clone of the layer directory
/// (`open_tree`), id-mapped (`mount_setattr`) and handed to overlayfs by descriptor,
/// `fsconfig(FSCONFIG_SET_FD, "lowerdir+")` (layers by descriptor since Linux 6.13, detached
/// mounts among them since 6.15); overlayfs keeps private clones, the descriptors are closed
/// right after. Nothing is attached anywhere, so no path reaches a layer's setuid files and
/// no mount table (the sandbox's included) lists them. One `lowerdir+` per layer also lifts
/// the one-page limit of a `lowerdir=` option: overlayfs's own cap of 500 layers applies.
///
/// A kernel that refuses a layer by descriptor (EINVAL) gets them attached under
/// `<sandbox run dir>/lowers/<n>` in this private mount namespace instead, named by path with
/// `lowerdir+` (6.8+) or, before that, in one `lowerdir=` option given relative to that
/// directory (`0:1:2…`, short) while it is our working directory. Those attachments are
/// detached as soon as the overlay exists, before init's namespace is copied from ours.
///
/// Ordering: the layers are id-mapped before init exists (the overlay must be in our mount
/// namespace when init's is copied from it), so the user namespace used for the mapping is a
/// short-lived one of our own with the same maps (see [`mapping_userns`]).
fn mount_idmapped_overlay(cfg: &HelperConfig) -> Result<(), HelperError> {
    let plan = &cfg.rootfs;
    let userns = mapping_userns(cfg)?;
    let overlay = match overlay_by_fd(plan, &userns) {
        Ok(mnt) => Some(mnt),
        Err(ByFd::Unsupported) => overlay_by_path(plan, &userns)?,
        Err(ByFd::Failed(e)) => return Err(e),
    };
    if let Some(mnt) = overlay {
        let step = format!("attach the overlay on {}", plan.merged.display());
        let target = open_dir_path(&plan.merged).map_err(|source| HelperError::Io {
            step: step.clone(),
            source,
        })?;
        sys(
            step,
            super::sys::move_mount_onto(mnt.as_fd(), target.as_fd()),
        )?;
    }
    Ok(())
}

/// How the by-descriptor attempt ended when it did not give an overlay.
enum ByFd {
    /// The kernel does not take layers by descriptor (EINVAL): attach them and use paths.
    Unsupported,
    Failed(HelperError),
}

impl From<HelperError> for ByFd {
    fn from(e: HelperError) -> Self {
        ByFd::Failed(e)
    }
}

/// The overlay as a detached mount, every layer, the upper and the work dir given by
/// descriptor.
fn overlay_by_fd(plan: &proto::RootfsPlan, userns: &OwnedFd) -> Result<OwnedFd, ByFd> {
    use super::sys::{fsconfig_create, fsconfig_set_fd, fsconfig_set_string};
    let fs = overlay_context()?;
    // The detached layer mounts stay open until the overlay exists: closing one dissolves
    // its anonymous mount namespace, and overlayfs (which clones them at create time) would
    // then refuse it with EINVAL.
    raise_nofile_limit(plan.lowers.len());
    let mut trees = Vec::with_capacity(plan.lowers.len());
    for lower in &plan.lowers {
        let tree = idmapped_layer(lower, userns)?;
        match fsconfig_set_fd(fs.as_fd(), "lowerdir+", tree.as_fd()) {
            Ok(()) => trees.push(tree),
            Err(nix::Error::EINVAL) => return Err(ByFd::Unsupported),
            Err(source) => {
                return Err(ByFd::Failed(overlay_err(
                    format!("add the image layer {} to the overlay", lower.display()),
                    source,
                    &fs,
                )))
            }
        }
    }
    for (key, dir) in [("upperdir", &plan.upper), ("workdir", &plan.work)] {
        let step = format!("give the overlay its {key} {}", dir.display());
        let fd = open_dir_path(dir).map_err(|source| HelperError::Io {
            step: step.clone(),
            source,
        })?;
        fsconfig_set_fd(fs.as_fd(), key, fd.as_fd())
            .map_err(|source| overlay_err(step, source, &fs))?;
    }
    for (key, value) in [("index", "off"), ("xino", "off")] {
        fsconfig_set_string(fs.as_fd(), key, value.as_ref()).map_err(|source| {
            overlay_err(format!("set the overlay option {key}={value}"), source, &fs)
        })?;
    }
    match fsconfig_create(fs.as_fd()) {
        Ok(()) => {}
        // Before 6.15 a detached layer mount is refused only here.
        Err(nix::Error::EINVAL) => return Err(ByFd::Unsupported),
        Err(source) => {
            return Err(ByFd::Failed(overlay_err(
                format!("create the overlay of {} layers", plan.lowers.len()),
                source,
                &fs,
            )))
        }
    }
    let overlay = finish_overlay(&fs)?;
    drop(trees);
    Ok(overlay)
}

/// Room for one descriptor per layer (at most 500) besides our few: raise the soft
/// `RLIMIT_NOFILE` towards the hard one if needed. Init sets its own limits later.
fn raise_nofile_limit(layers: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = layers as u64 + 64;
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
        }
    }
}

/// The fallback: layers attached under `<run dir>/lowers/<n>` and named by path. Returns the
/// overlay as a detached mount, or `None` when it was mounted on `merged` directly (the
/// `lowerdir=` option of kernels before 6.8).
fn overlay_by_path(
    plan: &proto::RootfsPlan,
    userns: &OwnedFd,
) -> Result<Option<OwnedFd>, HelperError> {
    let dir = plan
        .merged
        .parent()
        .unwrap_or(Path::new("/"))
        .join("lowers");
    let io = |step: String| move |source| HelperError::Io { step, source };
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(io(format!("create {}", dir.display()))(e))
        }
        _ => {}
    }
    let mut attached: Vec<PathBuf> = Vec::with_capacity(plan.lowers.len());
    let result = (|| {
        for (i, lower) in plan.lowers.iter().enumerate() {
            let at = dir.join(i.to_string());
            std::fs::create_dir(&at).map_err(io(format!("create {}", at.display())))?;
            let tree = idmapped_layer(lower, userns)?;
            let step = format!(
                "attach the image layer {} on {}",
                lower.display(),
                at.display()
            );
            let target = open_dir_path(&at).map_err(io(step.clone()))?;
            sys(
                step,
                super::sys::move_mount_onto(tree.as_fd(), target.as_fd()),
            )?;
            attached.push(at);
        }
        overlay_of_attached(plan, &dir, &attached)
    })();
    // The overlay holds its own clones of the layers: the attachments can go now.
    for at in attached.iter().rev() {
        let _ = nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(at);
    }
    let _ = std::fs::remove_dir(&dir);
    result
}

fn overlay_of_attached(
    plan: &proto::RootfsPlan,
    dir: &Path,
    attached: &[PathBuf],
) -> Result<Option<OwnedFd>, HelperError> {
    use super::sys::{fsconfig_create, fsconfig_set_string};
    let fs = overlay_context()?;
    for (i, at) in attached.iter().enumerate() {
        match fsconfig_set_string(fs.as_fd(), "lowerdir+", at.as_os_str()) {
            Ok(()) => {}
            // No `lowerdir+` before 6.8: one `lowerdir=` option through mount(2).
            Err(nix::Error::EINVAL) if i == 0 => {
                return mount_lowerdir_option(plan, dir).map(|()| None)
            }
            Err(source) => {
                return Err(overlay_err(
                    format!("add the image layer {} to the overlay", at.display()),
                    source,
                    &fs,
                ))
            }
        }
    }
    for (key, value) in [
        ("upperdir", plan.upper.as_os_str()),
        ("workdir", plan.work.as_os_str()),
        ("index", "off".as_ref()),
        ("xino", "off".as_ref()),
    ] {
        fsconfig_set_string(fs.as_fd(), key, value).map_err(|source| {
            overlay_err(
                format!("set the overlay option {key}={}", value.to_string_lossy()),
                source,
                &fs,
            )
        })?;
    }
    fsconfig_create(fs.as_fd()).map_err(|source| {
        overlay_err(
            format!("create the overlay of {} layers", attached.len()),
            source,
            &fs,
        )
    })?;
    finish_overlay(&fs).map(Some)
}

/// Kernels before 6.8: `lowerdir=0:1:2…` relative to `dir` (where the layers are attached,
/// made our working directory for the call), in one mount(2) option of at most a page.
fn mount_lowerdir_option(plan: &proto::RootfsPlan, dir: &Path) -> Result<(), HelperError> {
    let names: Vec<String> = (0..plan.lowers.len()).map(|i| i.to_string()).collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},index=off,xino=off",
        names.join(":"),
        escape_overlay_path(&plan.upper.to_string_lossy()),
        escape_overlay_path(&plan.work.to_string_lossy()),
    );
    // copy_mount_options() takes at most one page.
    if opts.len() >= 4096 {
        return Err(HelperError::Io {
            step: format!("mount the overlay of {} layers", plan.lowers.len()),
            source: std::io::Error::other(format!(
                "this kernel (before Linux 6.8) takes the layers in one option of at most 4095                  bytes, and {} layers need {}",
                plan.lowers.len(),
                opts.len()
            )),
        });
    }
    let step = format!("enter {}", dir.display());
    let back = open_dir_path(Path::new(".")).map_err(|source| HelperError::Io {
        step: step.clone(),
        source,
    })?;
    sys(step, nix::unistd::chdir(dir))?;
    let mounted = mount(
        Some("overlay"),
        &plan.merged,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(opts.as_str()),
    );
    sys(
        "return to the previous directory",
        nix::unistd::fchdir(back.as_raw_fd()),
    )?;
    sys(
        format!(
            "mount the overlay of {} layers on {}",
            plan.lowers.len(),
            plan.merged.display()
        ),
        mounted,
    )
}

fn overlay_context() -> Result<OwnedFd, HelperError> {
    sys(
        "open an overlay filesystem context (is overlayfs available?)",
        super::sys::fsopen("overlay"),
    )
}

/// The created overlay as a detached mount: nodev, like the `host` image's overlay.
fn finish_overlay(fs: &OwnedFd) -> Result<OwnedFd, HelperError> {
    super::sys::fsmount(fs.as_fd(), super::sys::MOUNT_ATTR_NODEV)
        .map_err(|source| overlay_err("mount the overlay".into(), source, fs))
}

fn overlay_err(step: String, source: nix::Error, fs: &OwnedFd) -> HelperError {
    HelperError::Overlay {
        step,
        source,
        log: fs_context_log(fs),
    }
}

/// The messages a filesystem context logged (`e overlayfs: …` lines), joined.
fn fs_context_log(fs: &OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        match nix::unistd::read(fs.as_raw_fd(), &mut buf) {
            Ok(n) if n > 0 => out.push(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
            _ => break,
        }
    }
    out.join("; ")
}

/// A directory opened `O_PATH`, not through a symlink in its last component.
fn open_dir_path(dir: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map(OwnedFd::from)
}

/// A detached clone of the layer directory `lower`, read-only, id-mapped through `userns`.
fn idmapped_layer(lower: &Path, userns: &OwnedFd) -> Result<OwnedFd, HelperError> {
    let tree = sys(
        format!("open the image layer {}", lower.display()),
        super::sys::open_tree_clone(lower),
    )?;
    match super::sys::mount_setattr(tree.as_fd(), LAYER_ATTRS, Some(userns.as_fd())) {
        Ok(()) => Ok(tree),
        Err(errno @ (nix::Error::EINVAL | nix::Error::EOPNOTSUPP)) => {
            Err(HelperError::LayerIdmapUnsupported {
                path: lower.to_path_buf(),
                fstype: fs_name(&tree),
                errno,
            })
        }
        Err(source) => Err(HelperError::Sys {
            step: format!("id-map the image layer {}", lower.display()),
            source,
        }),
    }
}

/// A user namespace with the sandbox's maps (sandbox 0..count is host id_base..), for
/// id-mapping the image layers before init — and its own user namespace — exists. A child is
/// cloned into a new user namespace and waits on a pipe while we write its maps and open the
/// namespace; it then exits, and the namespace lives on as long as the descriptor (and every
/// mount id-mapped through it) does. Costs one fork of this small process.
fn mapping_userns(cfg: &HelperConfig) -> Result<OwnedFd, HelperError> {
    let (rd, wr) = sys(
        "create a pipe",
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC),
    )?;
    let cloned = sys(
        "clone a process into a user namespace for the layer mappings",
        super::sys::clone_fork(CloneFlags::CLONE_NEWUSER),
    )?;
    let Some(child) = cloned else {
        // The child: wait for the parent to be done with us (EOF), then leave.
        drop(wr);
        let mut b = [0u8; 1];
        let _ = nix::unistd::read(rd.as_raw_fd(), &mut b);
        super::sys::exit_now(0)
    };
    drop(rd);
    let res = write_id_maps(cfg, child).and_then(|()| {
        let ns_path = format!("/proc/{}/ns/user", child.as_raw());
        std::fs::File::open(&ns_path)
            .map(OwnedFd::from)
            .map_err(|source| HelperError::Io {
                step: format!("open the layer mapping user namespace {ns_path}"),
                source,
            })
    });
    drop(wr);
    let _ = wait_for(child);
    res
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
    let io = |step: String| move |source| HelperError::Io { step, source };
    write_id_maps(cfg, child)?;
    for procs in &cfg.cgroup_procs {
        std::fs::write(procs, child.as_raw().to_string())
            .map_err(io(format!("add init to {}", procs.display())))?;
    }
    Ok(())
}

/// Write the uid and gid maps of `child`'s user namespace: sandbox 0..count is the host range.
fn write_id_maps(cfg: &HelperConfig, child: Pid) -> Result<(), HelperError> {
    let map = format!("0 {} {}\n", cfg.id_base, cfg.id_count);
    let io = |step: String| move |source| HelperError::Io { step, source };
    // We are privileged in the parent user namespace, so setgroups may stay allowed
    // (CVE-2014-8989 concerns unprivileged writers); exec uses it for supplementary groups.
    let base = format!("/proc/{}", child.as_raw());
    std::fs::write(format!("{base}/uid_map"), &map)
        .map_err(io(format!("write uid_map {map:?}")))?;
    std::fs::write(format!("{base}/gid_map"), &map)
        .map_err(io(format!("write gid_map {map:?}")))?;
    Ok(())
}

/// The directories under `/` that hold kernel filesystems: no volume goes there.
const KERNEL_DIRS: &[&str] = &["proc", "sys", "dev"];

/// The components of a volume target, without empty and `.` components (`"/a//./b"` gives
/// `["a", "b"]`). `..` components are kept (validation refuses them).
pub fn target_components(target: &str) -> Vec<&str> {
    target
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect()
}

/// The target as a path relative to the sandbox root (for `openat2` from the rootfs).
pub fn target_relative(target: &str) -> PathBuf {
    target_components(target).iter().collect()
}

/// Check the volumes of a spec before anything is created: absolute targets that are not
/// `/`, with no `..`, nothing under `/proc`, `/sys` or `/dev`, no two that overlap; sources
/// that are existing host directories.
pub fn validate_mounts(mounts: &[VolumeMount]) -> Result<(), super::RuntimeError> {
    let bad = |value: String, reason: &'static str| super::RuntimeError::Invalid {
        field: "mounts",
        value,
        reason,
    };
    for (i, m) in mounts.iter().enumerate() {
        let t = &m.target;
        if !t.starts_with('/') {
            return Err(bad(t.clone(), "the target must be an absolute path"));
        }
        if t.contains('\0') || t.len() >= libc::PATH_MAX as usize {
            return Err(bad(
                t.clone(),
                "the target must be shorter than PATH_MAX and free of NUL",
            ));
        }
        let comps = target_components(t);
        if comps.contains(&"..") {
            return Err(bad(t.clone(), "the target must not contain '..'"));
        }
        match comps.first() {
            None => return Err(bad(t.clone(), "the target must not be /")),
            Some(first) if KERNEL_DIRS.contains(first) => {
                return Err(bad(
                    t.clone(),
                    "targets under /proc, /sys and /dev are refused",
                ))
            }
            Some(_) => {}
        }
        for other in &mounts[..i] {
            let o = target_components(&other.target);
            if comps.starts_with(&o) || o.starts_with(&comps) {
                return Err(bad(
                    t.clone(),
                    "the target overlaps another mount's target (the same path, or one inside the other)",
                ));
            }
        }
        let s = &m.source;
        if !s.is_absolute() {
            return Err(bad(
                s.display().to_string(),
                "the source must be an absolute host path",
            ));
        }
        if !std::fs::metadata(s).is_ok_and(|md| md.is_dir()) {
            return Err(bad(
                s.display().to_string(),
                "the source must be an existing host directory",
            ));
        }
    }
    Ok(())
}

/// Where an open descriptor points, as a path in our mount namespace.
fn fd_path(fd: &OwnedFd) -> std::io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Create each volume's mount point in the rootfs, like `mkdir -p`, and return the device and
/// inode of each (init checks that it attaches on the same directory).
///
/// We are host root in the helper's mount namespace, and the image is not ours: every lookup
/// is `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` from the rootfs, so an image symlink
/// (`/data -> /etc`) resolves inside the rootfs (to its own `/etc`), never on the host. Missing
/// directories are made with `mkdirat` in the directory resolved so far (the overlay puts them
/// in the writable layer), owned by the sandbox's root. Where each lookup ended up is checked
/// before anything is created there: nothing under `/proc`, `/sys` or `/dev`, and the target
/// itself is not the root.
fn make_mount_points(cfg: &HelperConfig) -> Result<Vec<(u64, u64)>, HelperError> {
    use std::os::unix::fs::OpenOptionsExt;
    if cfg.mounts.is_empty() {
        return Ok(Vec::new());
    }
    let merged = &cfg.rootfs.merged;
    let root: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(merged)
        .map_err(|source| HelperError::Io {
            step: format!("open the rootfs {}", merged.display()),
            source,
        })?
        .into();
    let root_path = fd_path(&root).map_err(|source| HelperError::Io {
        step: format!("find where the rootfs {} is", merged.display()),
        source,
    })?;
    let root = RootDir {
        fd: root,
        path: root_path,
    };
    let mut out = Vec::with_capacity(cfg.mounts.len());
    for m in &cfg.mounts {
        let dir = make_dirs_in_root(&root, &m.target, cfg.id_base)?;
        let step = format!("check the mount point {}", m.target);
        if root.inside(&dir, &step)?.as_os_str().is_empty() {
            return Err(HelperError::Io {
                step,
                source: std::io::Error::other(
                    "it resolves to the sandbox's / (through a symlink?)",
                ),
            });
        }
        let st = sys(step, nix::sys::stat::fstat(dir.as_raw_fd()))?;
        out.push((st.st_dev, st.st_ino));
    }
    Ok(out)
}

/// The rootfs, open, and where it is in our mount namespace.
struct RootDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl RootDir {
    /// Where `dir` is, relative to the root; an error naming `step` if it is outside it or
    /// under `/proc`, `/sys` or `/dev` (reached through an image symlink).
    fn inside(&self, dir: &OwnedFd, step: &str) -> Result<PathBuf, HelperError> {
        let err = |msg: String| HelperError::Io {
            step: step.to_string(),
            source: std::io::Error::other(msg),
        };
        let at = fd_path(dir).map_err(|source| HelperError::Io {
            step: step.to_string(),
            source,
        })?;
        let rel = at
            .strip_prefix(&self.path)
            .map_err(|_| err(format!("it resolves outside the rootfs, to {at:?}")))?;
        if let Some(first) = rel.components().next() {
            if KERNEL_DIRS.iter().any(|k| first.as_os_str() == *k) {
                return Err(err(format!(
                    "it resolves under /proc, /sys or /dev (through a symlink?): /{}",
                    rel.display()
                )));
            }
        }
        Ok(rel.to_path_buf())
    }
}

/// `mkdir -p` of `target` below the root, resolving every prefix inside it; returns the
/// target directory (`O_PATH`). New directories are 0755 and owned by `owner` (uid and gid).
fn make_dirs_in_root(root: &RootDir, target: &str, owner: u32) -> Result<OwnedFd, HelperError> {
    use nix::sys::stat::{mkdirat, Mode};
    let resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    let lookup = |p: &Path| {
        super::sys::openat2(
            root.fd.as_fd(),
            p,
            libc::O_PATH | libc::O_DIRECTORY,
            resolve,
        )
    };
    let mut prefix = PathBuf::new();
    let mut parent: Option<OwnedFd> = None;
    for comp in target_components(target) {
        prefix.push(comp);
        let step = format!("create the mount point {target} (at /{})", prefix.display());
        let dir = match lookup(&prefix) {
            Ok(fd) => fd,
            Err(nix::Error::ENOENT) => {
                // Missing: make it in the directory resolved so far. `comp` is one plain name,
                // so mkdirat cannot leave that directory. EEXIST here means a symlink that
                // leads nowhere, which we do not follow.
                let at = parent.as_ref().unwrap_or(&root.fd);
                match mkdirat(Some(at.as_raw_fd()), comp, Mode::from_bits_truncate(0o755)) {
                    Ok(()) => {}
                    Err(nix::Error::EEXIST) => {
                        return Err(HelperError::Io {
                            step,
                            source: std::io::Error::other(
                                "a symlink of the image is in the way and leads nowhere",
                            ),
                        })
                    }
                    Err(source) => return Err(HelperError::Sys { step, source }),
                }
                let made = sys(
                    step.clone(),
                    super::sys::openat2(
                        at.as_fd(),
                        Path::new(comp),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        libc::RESOLVE_NO_SYMLINKS,
                    ),
                )?;
                let uid = Some(nix::unistd::Uid::from_raw(owner));
                let gid = Some(nix::unistd::Gid::from_raw(owner));
                sys(
                    step.clone(),
                    nix::unistd::fchown(made.as_raw_fd(), uid, gid),
                )?;
                made
            }
            Err(source) => return Err(HelperError::Sys { step, source }),
        };
        // Checked before anything is created in it.
        root.inside(&dir, &step)?;
        parent = Some(dir);
    }
    // Reopen the last one through the same resolution, as init will.
    sys(format!("open the mount point {target}"), lookup(&prefix))
}

/// Each volume as a detached mount, id-mapped through init's user namespace (whose maps are
/// written), with nosuid, nodev and, if asked, read-only.
///
/// A clone of the source's mount (`open_tree(OPEN_TREE_CLONE)`, this mount only: submounts
/// below the source are not included) is id-mapped with `mount_setattr(MOUNT_ATTR_IDMAP)`.
/// That needs host privileges (`CAP_SYS_ADMIN` over the filesystem's user namespace), which
/// is why the helper does it; init only attaches the result. A filesystem without id-mapped
/// mount support fails the spawn: a plain bind would show every other sandbox's files as
/// nobody's, so there is no fallback.
fn idmap_volumes(cfg: &HelperConfig, child: Pid) -> Result<Vec<OwnedFd>, HelperError> {
    use super::sys::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
    if cfg.mounts.is_empty() {
        return Ok(Vec::new());
    }
    let ns_path = format!("/proc/{}/ns/user", child.as_raw());
    let userns: OwnedFd = std::fs::File::open(&ns_path)
        .map_err(|source| HelperError::Io {
            step: format!("open the sandbox's user namespace {ns_path}"),
            source,
        })?
        .into();
    let mut out = Vec::with_capacity(cfg.mounts.len());
    for m in &cfg.mounts {
        let src = m.source.display();
        let tree = sys(
            format!("open the volume {src}"),
            super::sys::open_tree_clone(&m.source),
        )?;
        let st = sys(
            format!("stat the volume {src}"),
            nix::sys::stat::fstat(tree.as_raw_fd()),
        )?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(HelperError::Io {
                step: format!("open the volume {src}"),
                source: std::io::Error::other("not a directory"),
            });
        }
        let mut attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        if m.read_only {
            attrs |= MOUNT_ATTR_RDONLY;
        }
        match super::sys::mount_setattr(tree.as_fd(), attrs, Some(userns.as_fd())) {
            Ok(()) => out.push(tree),
            Err(errno @ (nix::Error::EINVAL | nix::Error::EOPNOTSUPP)) => {
                return Err(HelperError::IdmapUnsupported {
                    path: m.source.clone(),
                    fstype: fs_name(&tree),
                    errno,
                })
            }
            Err(source) => {
                return Err(HelperError::Sys {
                    step: format!("id-map the volume {src}"),
                    source,
                })
            }
        }
    }
    Ok(out)
}

/// The name of the filesystem an open descriptor is on (by its magic number).
fn fs_name(fd: &OwnedFd) -> String {
    let Ok(st) = nix::sys::statfs::fstatfs(fd) else {
        return "unknown".into();
    };
    let magic = st.filesystem_type().0 as u64 & 0xffff_ffff;
    let name = match magic {
        0xef53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0x0102_1994 => "tmpfs",
        0x8584_58f6 => "ramfs",
        0x794c_7630 => "overlay",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0xff53_4d42 | 0xfe53_4d42 => "cifs/smb",
        0x0102_1997 => "9p",
        0x4d44 => "vfat",
        0x2011_bab0 => "exfat",
        0x5346_544e => "ntfs",
        0x7371_7368 => "squashfs",
        0xf2f5_2010 => "f2fs",
        0x9fa0 => "proc",
        0x6265_6572 => "sysfs",
        _ => return format!("unknown (magic {magic:#x})"),
    };
    name.into()
}
