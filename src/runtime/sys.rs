//! The one seam for raw syscalls: every `unsafe` of the runtime lives here, each with the reason it
//! is sound. Safe wrappers from `nix` are used directly elsewhere.

use nix::sched::CloneFlags;
use nix::unistd::Pid;
use std::os::fd::RawFd;

/// `clone(2)` with fork semantics (no new stack, SIGCHLD on exit) into new namespaces.
/// Returns `None` in the child.
///
/// Callers must be single-threaded: the helper and init are (they were exec'd, not forked from
/// the daemon), which is what makes running arbitrary code in the child sound.
pub fn clone_fork(flags: CloneFlags) -> nix::Result<Option<Pid>> {
    let raw = flags.bits() as libc::c_ulong | libc::SIGCHLD as libc::c_ulong;
    // SAFETY: with a NULL stack, clone behaves like fork: the child gets a copy-on-write copy of
    // the caller's address space and returns 0. The caller is single-threaded, so no lock can be
    // held by another thread in the child's copy. The pointer arguments are NULL (unused).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            raw,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            0usize,
        )
    };
    match ret {
        -1 => Err(nix::Error::last()),
        0 => Ok(None),
        pid => Ok(Some(Pid::from_raw(pid as i32))),
    }
}

/// `fork(2)`. Returns `None` in the child. Callers must be single-threaded (init is).
pub fn fork() -> nix::Result<Option<Pid>> {
    use nix::unistd::ForkResult;
    // SAFETY: only called from init, a single-threaded process, so the child may run any code.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => Ok(None),
        ForkResult::Parent { child } => Ok(Some(child)),
    }
}

/// Memory for a [`vfork_spawn`] child to run on: an anonymous mapping with a guard page
/// below it (a child that overflows it faults instead of writing into our memory).
pub struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

impl ChildStack {
    /// A stack of `size` bytes (rounded up to whole pages) plus the guard page.
    pub fn new(size: usize) -> nix::Result<ChildStack> {
        const PAGE: usize = 4096;
        let len = size.div_ceil(PAGE) * PAGE + PAGE;
        // SAFETY: an anonymous private mapping at an address the kernel picks: no existing
        // memory is touched; the result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(nix::Error::last());
        }
        let stack = ChildStack { base, len };
        // SAFETY: the first page of the mapping made above; nothing refers to it yet.
        if unsafe { libc::mprotect(base, PAGE, libc::PROT_NONE) } != 0 {
            return Err(nix::Error::last()); // `stack` unmaps it
        }
        Ok(stack)
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length; no child runs on it any more
        // (a vfork child has exec'd or exited before `vfork_spawn` returned).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Start a process the way posix_spawn does: `clone(CLONE_VM | CLONE_VFORK | SIGCHLD)` runs
/// `child` on `stack` in a new process that shares our memory (no page tables copied, no
/// copy-on-write faults afterwards) while we are suspended until it has exec'd or exited.
/// It has its own copy of the descriptor table and of the signal dispositions.
///
/// `child` must not allocate or otherwise change state that we share (the heap, statics): it
/// may only make syscalls on values prepared before, then execve or `exit_now`. Callers must be
/// single-threaded (init is), so no other thread can run on the shared memory meanwhile, and
/// must have every signal with a handler blocked (init's are all routed to a signalfd).
pub fn vfork_spawn<F: FnMut() -> i32>(stack: &mut ChildStack, child: &mut F) -> nix::Result<Pid> {
    extern "C" fn trampoline<F: FnMut() -> i32>(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `&mut F` passed to clone below; the parent stays suspended in
        // clone (CLONE_VFORK) until this child has exec'd or exited, so the closure outlives
        // every use here and nothing else touches it meanwhile.
        let f = unsafe { &mut *(arg as *mut F) };
        f()
    }
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    // The top of the mapping: 16-byte aligned (its length is whole pages).
    let top = (stack.base as *mut u8).wrapping_add(stack.len) as *mut libc::c_void;
    let arg = child as *mut F as *mut libc::c_void;
    // SAFETY: `top` ends a live mapping `stack` owns, borrowed until clone returns (CLONE_VFORK:
    // the child is done with it by then); the callback keeps this function's documented contract.
    let pid = unsafe { libc::clone(trampoline::<F>, top, flags, arg) };
    if pid == -1 {
        Err(nix::Error::last())
    } else {
        Ok(Pid::from_raw(pid))
    }
}

/// execve(2) with argv and envp already NULL-terminated pointer arrays, built before a
/// [`vfork_spawn`]: nothing here allocates. Returns (the error) only on failure.
pub fn execve_prepared(
    program: &std::ffi::CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> nix::Error {
    if argv.last().is_none_or(|p| !p.is_null()) || envp.last().is_none_or(|p| !p.is_null()) {
        return nix::Error::EINVAL;
    }
    // SAFETY: `program` is NUL-terminated; both arrays end with NULL (checked above) and the
    // caller keeps the strings they point to alive (they come from live CStrings).
    unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    nix::Error::last()
}

/// Whether `close_range(2)` with `CLOSE_RANGE_CLOEXEC` works here (kernel 5.11+, and not refused
/// by the seccomp filter in force): [`cloexec_from`] then needs no fallback, which allocates.
pub fn close_range_cloexec_works() -> bool {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range takes plain integers; descriptors this high are never open, so
    // nothing changes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            libc::c_uint::MAX - 1,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    ret == 0
}

/// Mark every descriptor from `first` up close-on-exec (`close_range(2)` with
/// `CLOSE_RANGE_CLOEXEC`), falling back to walking /proc/self/fd.
pub fn cloexec_from(first: RawFd) -> nix::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range takes plain integers and touches only our descriptor table.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    for fd in open_fds()? {
        if fd >= first {
            use nix::fcntl::{fcntl, FcntlArg, FdFlag};
            let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        }
    }
    Ok(())
}

/// The descriptors open in this process.
pub fn open_fds() -> nix::Result<Vec<RawFd>> {
    let mut out = Vec::new();
    let dir = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    for ent in dir.flatten() {
        if let Some(fd) = ent.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(fd);
        }
    }
    Ok(out)
}

/// Close every descriptor from 3 up except those in `keep`.
pub fn close_all_except(keep: &[RawFd]) -> nix::Result<()> {
    for fd in open_fds()? {
        if fd > 2 && !keep.contains(&fd) {
            let _ = nix::unistd::close(fd);
        }
    }
    Ok(())
}

/// Make `fd` (a terminal) our controlling terminal (`TIOCSCTTY`). Needs a prior `setsid`.
pub fn set_controlling_tty(fd: RawFd) -> nix::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal); no memory is passed.
    let ret = unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) };
    nix::errno::Errno::result(ret).map(drop)
}

/// Set a terminal's window size.
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> nix::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a `struct winsize` from the pointer, which points to a live local.
    let ret = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws as *const libc::winsize) };
    nix::errno::Errno::result(ret).map(drop)
}

/// Bring the loopback interface of the current network namespace up.
pub fn loopback_up() -> nix::Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: an all-zero ifreq is a valid value (a C struct of integers and arrays).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS writes into the ifreq we own; the name is NUL-terminated.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) };
    nix::errno::Errno::result(ret)?;
    // SAFETY: after SIOCGIFFLAGS the union holds the flags; we read and update that member.
    unsafe {
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) };
    nix::errno::Errno::result(ret).map(drop)
}

/// `_exit(2)`: leave now, without running destructors or atexit handlers (forked children).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// Reset every signal's disposition to the default and unblock all signals (before execve).
pub fn reset_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if sig == Signal::SIGKILL || sig == Signal::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL has no handler code to be unsound.
        let _ = unsafe { sigaction(sig, &dfl) };
    }
    let _ = SigSet::empty().thread_set_mask();
}

/// Set SIGPIPE to be ignored in this process (init writes to sockets that may be gone).
pub fn ignore_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_IGN installs no handler code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
}

/// Set the calling thread's nice value (Linux keeps it per thread; threads and processes it
/// forks from now on inherit it). Lowering it below the current value needs CAP_SYS_NICE.
pub fn set_thread_nice(value: i32) -> nix::Result<()> {
    // SAFETY: setpriority takes plain integers; who = 0 with PRIO_PROCESS names the calling
    // thread on Linux.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, value) };
    nix::errno::Errno::result(r).map(drop)
}

/// Put thread `tid` (0: the calling thread) in or out of the SCHED_IDLE class: an idle-class
/// thread never preempts a normal one when it wakes and runs when a CPU has nothing else to
/// do; out of it, it is a normal thread again.
pub fn set_thread_idle_class(tid: i32, idle: bool) -> nix::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: `param` is a valid sched_param for the call's duration; the other arguments are
    // plain integers.
    let r = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    nix::errno::Errno::result(r).map(drop)
}

/// Set the nice value of thread/process `pid` (its main thread; what it forks from now on
/// inherits it). Lowering it needs CAP_SYS_NICE.
pub fn set_process_nice(pid: i32, value: i32) -> nix::Result<()> {
    let who = libc::id_t::try_from(pid).map_err(|_| nix::errno::Errno::ESRCH)?;
    // SAFETY: setpriority takes plain integers.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, value) };
    nix::errno::Errno::result(r).map(drop)
}

/// `setresuid`/`setresgid` as raw syscalls: per-thread, which is what we want in a
/// single-threaded process (glibc's wrappers broadcast to all threads with signals).
pub fn set_ids(uid: u32, gid: u32) -> nix::Result<()> {
    // SAFETY: plain integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
    nix::errno::Errno::result(r)?;
    // SAFETY: plain integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    nix::errno::Errno::result(r).map(drop)
}

/// Set only the effective uid and gid (real and saved stay), per thread: gid first, and back
/// to 0 uid first. With a saved uid of 0 the switch back needs no capability.
pub fn set_effective_ids(uid: u32, gid: u32) -> nix::Result<()> {
    const KEEP: libc::c_long = -1;
    let set = |nr: libc::c_long, id: u32| {
        // SAFETY: plain integer arguments.
        let r = unsafe { libc::syscall(nr, KEEP, id as libc::c_long, KEEP) };
        nix::errno::Errno::result(r).map(drop)
    };
    if uid == 0 {
        set(libc::SYS_setresuid, uid)?;
        set(libc::SYS_setresgid, gid)
    } else {
        set(libc::SYS_setresgid, gid)?;
        set(libc::SYS_setresuid, uid)
    }
}

/// `DEVPTS_SUPER_MAGIC`: a pty master must come from a real devpts (CVE-2025-52565).
pub fn is_devpts(fd: RawFd) -> bool {
    // SAFETY: an all-zero statfs is a valid value for fstatfs to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into the struct we own.
    let ret = unsafe { libc::fstatfs(fd, &mut st) };
    ret == 0 && st.f_type == 0x1cd1
}

/// `pidfd_open(2)`: a descriptor that names one process for good (no pid reuse race).
pub fn pidfd_open(pid: i32) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain integer arguments; on success the kernel returns a new descriptor we own.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = nix::errno::Errno::result(ret)?;
    // SAFETY: `fd` was just created for us and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)`: signal the process a pidfd names; ESRCH once it has exited.
pub fn pidfd_kill(pidfd: &std::os::fd::OwnedFd, sig: i32) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid pidfd we own, a signal number, a NULL siginfo (the kernel fills in a
    // default one) and no flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    nix::errno::Errno::result(ret).map(drop)
}

// ---- idmapped mounts (volumes) ----

/// `mount_attr` flags (linux/mount.h): what [`mount_setattr`] sets on a detached mount.
pub const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
pub const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
pub const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
/// Set by [`mount_setattr`] itself when it is given a user namespace.
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` (linux/mount.h, `MOUNT_ATTR_SIZE_VER0` = 32 bytes).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn path_cstring(path: &std::path::Path) -> nix::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| nix::Error::EINVAL)
}

/// `openat2(2)`: open `path` relative to `dir` with `flags` (`O_*`) and `resolve`
/// (`libc::RESOLVE_*`), e.g. `RESOLVE_IN_ROOT` so that `..` and absolute symlinks stay below
/// `dir`, as if `dir` were `/`.
pub fn openat2(
    dir: std::os::fd::BorrowedFd<'_>,
    path: &std::path::Path,
    flags: libc::c_int,
    resolve: u64,
) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let path = path_cstring(path)?;
    // SAFETY: an all-zero open_how is valid (no flags, mode 0, no resolve flags).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    // SAFETY: `path` is a NUL-terminated string and `how` a live open_how whose size we pass;
    // the kernel only reads both. On success it returns a new descriptor that we own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    let fd = nix::errno::Errno::result(ret)?;
    // SAFETY: `fd` was just created for us and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `open_tree(2)` with `OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC`: a detached copy of the mount that
/// holds `path`, rooted at `path`. Not recursive: mounts below `path` are not part of the copy.
pub fn open_tree_clone(path: &std::path::Path) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let path = path_cstring(path)?;
    // SAFETY: a NUL-terminated path the kernel only reads, AT_FDCWD and integer flags; on
    // success the kernel returns a new descriptor that we own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    let fd = nix::errno::Errno::result(ret)?;
    // SAFETY: `fd` was just created for us and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `mount_setattr(2)` on the mount `mnt` (from [`open_tree_clone`], not attached yet): set the
/// `MOUNT_ATTR_*` flags in `attr_set`, make it private (`MS_PRIVATE`: a clone of a shared or
/// slave mount would otherwise stay in its peer group, and mount events would travel between
/// the host and wherever it is attached) and, with `userns`, id-map it through that user
/// namespace (`MOUNT_ATTR_IDMAP`; only a detached mount that was never id-mapped qualifies).
pub fn mount_setattr(
    mnt: std::os::fd::BorrowedFd<'_>,
    attr_set: u64,
    userns: Option<std::os::fd::BorrowedFd<'_>>,
) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let mut attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    if let Some(ns) = userns {
        attr.attr_set |= MOUNT_ATTR_IDMAP;
        attr.userns_fd = ns.as_raw_fd() as u64;
    }
    // SAFETY: an empty NUL-terminated path with AT_EMPTY_PATH (the descriptor itself is the
    // mount), and a live mount_attr whose size we pass; the kernel only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    nix::errno::Errno::result(ret).map(drop)
}

/// `move_mount(2)` of the detached mount `mnt` onto the directory `target` (an `O_PATH`
/// descriptor in the caller's mount namespace): the mount is attached there.
pub fn move_mount_onto(
    mnt: std::os::fd::BorrowedFd<'_>,
    target: std::os::fd::BorrowedFd<'_>,
) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x0000_0004;
    const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x0000_0040;
    // SAFETY: two descriptors with empty NUL-terminated paths (the *_EMPTY_PATH flags make
    // the descriptors themselves the source and the target); the kernel only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    nix::errno::Errno::result(ret).map(drop)
}

// ---- the new mount API (overlay over id-mapped image layers) ----

/// `fsconfig(2)` commands (linux/mount.h).
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_SET_FD: libc::c_uint = 5;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;

/// `fsopen(2)`: a new, close-on-exec filesystem context for `fstype` (`"overlay"`), to be
/// configured with [`fsconfig_set_string`]/[`fsconfig_set_fd`] and created with
/// [`fsconfig_create`]. Reading it (`read(2)`) yields the filesystem's error messages.
pub fn fsopen(fstype: &str) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    let fstype = std::ffi::CString::new(fstype).map_err(|_| nix::Error::EINVAL)?;
    // SAFETY: a NUL-terminated string the kernel only reads and integer flags; on success the
    // kernel returns a new descriptor that we own.
    let ret = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    let fd = nix::errno::Errno::result(ret)?;
    // SAFETY: `fd` was just created for us and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `fsconfig(FSCONFIG_SET_STRING)`: set option `key` to `value` (the kernel takes values of
/// at most 255 bytes; longer ones fail with EINVAL).
pub fn fsconfig_set_string(
    fs: std::os::fd::BorrowedFd<'_>,
    key: &str,
    value: &std::ffi::OsStr,
) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let key = std::ffi::CString::new(key).map_err(|_| nix::Error::EINVAL)?;
    let value = std::ffi::CString::new(value.as_bytes()).map_err(|_| nix::Error::EINVAL)?;
    // SAFETY: a live fs-context descriptor, two NUL-terminated strings the kernel only reads,
    // and aux 0 (unused for strings).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    };
    nix::errno::Errno::result(ret).map(drop)
}

/// `fsconfig(FSCONFIG_SET_FD)`: set option `key` to the file or mount `fd` names (overlayfs
/// takes its layers this way since Linux 6.13, detached mounts included since 6.15).
pub fn fsconfig_set_fd(
    fs: std::os::fd::BorrowedFd<'_>,
    key: &str,
    fd: std::os::fd::BorrowedFd<'_>,
) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let key = std::ffi::CString::new(key).map_err(|_| nix::Error::EINVAL)?;
    // SAFETY: a live fs-context descriptor, a NUL-terminated key the kernel only reads, a NULL
    // value (unused for FSCONFIG_SET_FD) and a live descriptor as aux.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_FD,
            key.as_ptr(),
            std::ptr::null::<libc::c_char>(),
            fd.as_raw_fd(),
        )
    };
    nix::errno::Errno::result(ret).map(drop)
}

/// `fsconfig(FSCONFIG_CMD_CREATE)`: create the superblock from the options set so far.
pub fn fsconfig_create(fs: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a live fs-context descriptor; key and value are NULL and aux 0, as the command
    // requires.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    nix::errno::Errno::result(ret).map(drop)
}

/// `fsmount(2)`: a detached, close-on-exec mount of the created filesystem context, with the
/// `MOUNT_ATTR_*` flags in `attrs`; attach it with [`move_mount_onto`].
pub fn fsmount(fs: std::os::fd::BorrowedFd<'_>, attrs: u64) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    // SAFETY: a live fs-context descriptor and integer flags; on success the kernel returns a
    // new descriptor that we own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            attrs as libc::c_uint,
        )
    };
    let fd = nix::errno::Errno::result(ret)?;
    // SAFETY: `fd` was just created for us and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
}

// ---- host-side access into a sandbox (fs, probes) ----

/// `openat(2)` of `name` in `dir`, close-on-exec, returning an owned descriptor. `mode` matters
/// only with `O_CREAT`. For one path component in a directory already resolved safely (pass
/// `O_NOFOLLOW`); for whole paths inside a sandbox use [`openat2`] with `RESOLVE_IN_ROOT`.
pub fn openat<P: ?Sized + nix::NixPath>(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &P,
    flags: nix::fcntl::OFlag,
    mode: libc::mode_t,
) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let flags = (flags | nix::fcntl::OFlag::O_CLOEXEC).bits();
    let ret = name.with_nix_path(|name| {
        // SAFETY: `name` is a NUL-terminated string the kernel only reads; `dir` is a live
        // descriptor; `mode` is an integer (read only with O_CREAT).
        unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) }
    })?;
    let fd = nix::errno::Errno::result(ret)?;
    // SAFETY: `fd` was just created for us and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Make the calling thread — only it — act on files as host `uid`/`gid` with no supplementary
/// groups: raw `setgroups(0)`, `setfsgid`, `setfsuid`. They are per-thread syscalls (glibc's
/// `setgroups` wrapper would change every thread of the process). Moving the fsuid from 0 to
/// another id also clears the filesystem capabilities (`CAP_DAC_OVERRIDE`,
/// `CAP_DAC_READ_SEARCH`, `CAP_FOWNER`, `CAP_FSETID`, `CAP_CHOWN`, …) from the thread's
/// effective set, so its permission checks are those of an ordinary owner. `setfsuid` reports
/// no errors, so the ids are read back; EPERM if they did not take. Call it on a thread that
/// ends afterwards: nothing here switches back.
pub fn set_thread_fs_ids(uid: u32, gid: u32) -> nix::Result<()> {
    // SAFETY: a zero-length list with a NULL pointer: the kernel reads no memory.
    let ret = unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) };
    nix::errno::Errno::result(ret)?;
    // An id of -1 is invalid: the kernel then changes nothing and returns the current id,
    // which is the read-back below.
    // SAFETY: integer arguments only.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid) };
    // SAFETY: integer arguments only.
    unsafe { libc::syscall(libc::SYS_setfsuid, uid) };
    // SAFETY: integer arguments only.
    let now_gid = unsafe { libc::syscall(libc::SYS_setfsgid, u32::MAX) } as u32;
    // SAFETY: integer arguments only.
    let now_uid = unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) } as u32;
    if now_uid != uid || now_gid != gid {
        return Err(nix::errno::Errno::EPERM);
    }
    Ok(())
}
