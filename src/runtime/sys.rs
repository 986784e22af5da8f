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
