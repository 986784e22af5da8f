//! Typed messages between the library, the helper (supervisor) and init, carried as JSON over
//! close-on-exec `SOCK_SEQPACKET` sockets, with file descriptors passed by `SCM_RIGHTS`.
//!
//! One datagram is one message, so there is no framing to get wrong.

use super::seccomp::CompiledSeccomp;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

/// Largest message we accept. The helper config with a compiled seccomp profile is ~40 KiB.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Most descriptors one message carries (stdin, stdout, stderr).
const MAX_FDS: usize = 4;

/// Errors moving a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("failed to send {what} message: {source}")]
    Send {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("failed to receive a message: {0}")]
    Recv(#[source] nix::Error),
    #[error("peer closed the socket while we waited for {0}")]
    Closed(&'static str),
    #[error("malformed message (expected {what}): {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("message truncated: larger than {MAX_MESSAGE} bytes")]
    Truncated,
}

/// Send `msg` (and `fds`) as one datagram.
pub fn send<T: Serialize>(
    sock: RawFd,
    what: &'static str,
    msg: &T,
    fds: &[RawFd],
) -> Result<(), ProtoError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let bytes = serde_json::to_vec(msg).map_err(|source| ProtoError::Encode { what, source })?;
    let iov = [IoSlice::new(&bytes)];
    let cmsgs_storage;
    let cmsgs: &[ControlMessage] = if fds.is_empty() {
        &[]
    } else {
        cmsgs_storage = [ControlMessage::ScmRights(fds)];
        &cmsgs_storage
    };
    loop {
        match sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(source) => return Err(ProtoError::Send { what, source }),
        }
    }
}

/// Receive one datagram; `Ok(None)` on orderly close.
pub fn recv<T: DeserializeOwned>(
    sock: RawFd,
    what: &'static str,
) -> Result<Option<(T, Vec<OwnedFd>)>, ProtoError> {
    thread_local! {
        // One receive buffer per thread, reused: exec requests are on the hot path.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_MESSAGE]);
    }
    BUF.with(|b| recv_into(sock, what, &mut b.borrow_mut()))
}

fn recv_into<T: DeserializeOwned>(
    sock: RawFd,
    what: &'static str,
    buf: &mut [u8],
) -> Result<Option<(T, Vec<OwnedFd>)>, ProtoError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => {
                let mut fds = Vec::new();
                for c in m.cmsgs().map_err(ProtoError::Recv)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed this descriptor in our table for us
                            // (SCM_RIGHTS); nothing else owns it.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                let truncated = m.flags.contains(MsgFlags::MSG_TRUNC);
                break (m.bytes, fds, truncated);
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(ProtoError::Recv(e)),
        }
    };
    if truncated {
        return Err(ProtoError::Truncated);
    }
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[..len])
        .map_err(|source| ProtoError::Decode { what, source })?;
    Ok(Some((msg, fds)))
}

/// Like [`recv`] but a close is an error naming what we waited for.
pub fn expect<T: DeserializeOwned>(
    sock: RawFd,
    what: &'static str,
) -> Result<(T, Vec<OwnedFd>), ProtoError> {
    recv(sock, what)?.ok_or(ProtoError::Closed(what))
}

/// A `SOCK_SEQPACKET` pair, both ends close-on-exec.
pub fn seqpacket_pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// Everything the helper needs, resolved by the library before it spawns the helper.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperConfig {
    pub id: String,
    pub hostname: String,
    /// First host uid/gid of the sandbox's range; sandbox uid 0 maps to it.
    pub id_base: u32,
    pub id_count: u32,
    pub rootfs: RootfsPlan,
    /// `cgroup.procs` files init is written into before it runs anything.
    pub cgroup_procs: Vec<PathBuf>,
    /// Where init's control socket is bound (host path, 0600, root only).
    pub control_socket: PathBuf,
    pub seccomp: Option<CompiledSeccomp>,
    /// Host directories mounted into the sandbox (id-mapped), in order.
    #[serde(default)]
    pub mounts: Vec<VolumeMount>,
    /// Keep the helper, init and what init starts at background priority (nice
    /// [`super::BACKGROUND_NICE`]) until [`super::Sandbox::set_foreground`].
    #[serde(default)]
    pub background: bool,
}

/// A host directory mounted into the sandbox (`sbx::runtime::BindMount`): a volume that
/// sandboxes with different uid ranges can share.
///
/// The mount is id-mapped through the sandbox's user namespace, so ownership on disk is
/// canonical: host uid/gid N (0..65535) is sandbox uid/gid N in every sandbox, whatever its
/// range. The target is created (like `mkdir -p`) in the writable layer if it is missing;
/// symlinks of the image on the way are resolved inside the rootfs, never on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// An existing host directory, absolute. Its filesystem must support id-mapped mounts
    /// (ext4, xfs, btrfs, tmpfs on Linux 6.3+, …); mounts below it are not included.
    pub source: PathBuf,
    /// Absolute path inside the sandbox: not `/`, no `..`, nothing under `/proc`, `/sys` or
    /// `/dev`, and not the same as or inside another mount's target.
    pub target: String,
    /// Mount read-only: writes fail with `EROFS`.
    pub read_only: bool,
}

/// How the helper assembles the sandbox root: an overlay of read-only lowers and a writable upper,
/// plus read-only binds of host directories (the `host` image).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsPlan {
    /// Lower layers, topmost first.
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// The overlay mount point (host path, seen only in the helper's private mount namespace).
    pub merged: PathBuf,
    pub binds: Vec<BindMount>,
    /// The lowers hold canonical ids (a stored image's layers, shared by every sandbox): the
    /// helper mounts each one id-mapped through a user namespace with the sandbox's maps, so
    /// host uid/gid N shows as sandbox uid/gid N, and builds the overlay over those mounts.
    #[serde(default)]
    pub idmap_lowers: bool,
}

/// A read-only bind of a host path into the rootfs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindMount {
    pub source: PathBuf,
    /// Path inside the sandbox, absolute.
    pub target: PathBuf,
}

/// Helper → library.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum HelperEvent {
    /// Init is set up and serving its control socket. `pid` is its host pid.
    Ready { pid: i32 },
    /// Setup failed at `step`.
    Failed { step: String, error: String },
    /// Init exited (the sandbox is over).
    Exited { status: WaitStatus },
}

/// Helper → init, and init → helper, during setup.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum SetupMsg {
    /// Parent wrote the id maps and the cgroup: go on.
    MappingWritten,
    /// Helper → init, right after `MappingWritten`, once per entry of `HelperConfig::mounts` in
    /// order: the id-mapped, detached volume mount (one descriptor) and the device and inode
    /// of the mount point the helper created and checked, which init must find again.
    Volume {
        index: usize,
        dev: u64,
        ino: u64,
    },
    /// Init is ready.
    Ready,
    Failed {
        step: String,
        error: String,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitStatus {
    Code(i32),
    Signal(i32),
}

impl WaitStatus {
    /// Shell convention: the code, or 128+N for signal N.
    pub fn exit_code(self) -> i32 {
        match self {
            WaitStatus::Code(c) => c,
            WaitStatus::Signal(s) => 128 + s,
        }
    }

    pub fn from_nix(status: nix::sys::wait::WaitStatus) -> Option<Self> {
        use nix::sys::wait::WaitStatus as W;
        match status {
            W::Exited(_, c) => Some(WaitStatus::Code(c)),
            W::Signaled(_, s, _) => Some(WaitStatus::Signal(s as i32)),
            _ => None,
        }
    }
}

/// What a standard stream of an exec'd process is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StdioWire {
    /// The next descriptor passed with the request.
    Fd,
    /// The sandbox's own /dev/null.
    Null,
    /// stderr only: the same as stdout.
    Stdout,
}

/// Library → init: one request per connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Request {
    /// Start a process; the connection then waits for its exit.
    Exec(ExecRequest),
    /// Send `sig` to the process group of `pid`, a process this init started that still runs.
    Signal { pid: i32, sig: i32 },
}

/// [`Request::Exec`] by reference: the same JSON, without cloning the request to send it.
#[derive(Debug, Serialize)]
pub enum RequestRef<'a> {
    Exec(&'a ExecRequest),
}

/// Library → init: start a process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub stdin: StdioWire,
    pub stdout: StdioWire,
    pub stderr: StdioWire,
    /// Run on a new pseudo-terminal of the sandbox's devpts (rows, cols); the master comes back.
    pub pty: Option<(u16, u16)>,
    /// When this process exits, the sandbox ends with its status.
    pub entrypoint: bool,
}

/// Init → library, on an exec connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum ExecEvent {
    /// Running (after a successful execve). The pty master, if any, comes with it.
    Started {
        pid: i32,
    },
    /// A signal request was carried out.
    Signalled,
    /// Could not start (or signal): errno and where.
    Failed {
        step: String,
        errno: i32,
    },
    Exited {
        status: WaitStatus,
    },
}

/// File (in a sandbox's run directory) holding its [`SandboxRecord`].
pub const STATE_FILE: &str = "state.json";
/// File (in a sandbox's run directory) holding init's [`WaitStatus`] once it exited.
pub const EXIT_FILE: &str = "exit.json";

/// What another process needs to re-adopt a running sandbox: written when the sandbox is up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    pub id: String,
    pub init_pid: i32,
    /// Init's start time (field 22 of /proc/PID/stat): tells a recycled pid apart.
    pub init_start_time: u64,
    pub id_slot: u32,
    pub id_base: u32,
    pub id_count: u32,
    pub state_dir: PathBuf,
    /// The helper (it writes the exit record when init exits) and its start time.
    #[serde(default)]
    pub helper_pid: i32,
    #[serde(default)]
    pub helper_start_time: u64,
}

/// Write `value` as JSON to `path` atomically (a temporary file, then rename).
pub fn write_atomic<T: Serialize>(path: &std::path::Path, value: &T) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Read a JSON record written by [`write_atomic`].
pub fn read_record<T: DeserializeOwned>(path: &std::path::Path) -> std::io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

/// A process's start time (field 22 of /proc/PID/stat), or None if it is gone.
pub fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}
