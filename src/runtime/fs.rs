//! Host-side access into a running sandbox: its filesystem (read, write, list, stat, mkdir,
//! remove — the daemon's file API) and TCP connections inside its network namespace (readiness
//! probes).
//!
//! Every path is resolved by the kernel inside the sandbox's root, as the sandbox itself would
//! resolve it: the root is init's `/` (`/proc/<init>/root`, opened `O_PATH`), and each lookup is
//! an `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` relative to it, so `..` stops at that
//! root, absolute symlinks restart there, and `/proc/*/root`-style magic links are refused. The
//! last component is then created, replaced or removed with `*at` calls on the resolved parent
//! (`O_NOFOLLOW`, `renameat`, `unlinkat`), never by a host path. The work runs on a fresh thread
//! whose file credentials are those of the sandbox's root (host uid/gid = the range base, no
//! supplementary groups, no `CAP_DAC_OVERRIDE`), so files are created owned by sandbox root and
//! host root's privileges never apply. See docs/security.md, "Host-side access".

use super::{lock, sys, wait_readable_for, Inner, Sandbox};
use nix::errno::Errno;
use nix::fcntl::{readlinkat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat as RawStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Longest path accepted (Linux `PATH_MAX`, terminating NUL included).
const PATH_MAX: usize = 4096;
/// Owner and group shown for host ids outside the sandbox's range (the overflow id `nobody`).
pub const OVERFLOW_ID: u32 = 65534;
/// Mode of files written by [`SandboxFs::write_file`].
const FILE_MODE: u32 = 0o644;
/// Mode of directories created by [`SandboxFs::mkdir`] and for missing parents.
const DIR_MODE: u32 = 0o755;

/// What kind of file an entry is (`lstat`: a symlink is reported as a symlink).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    File,
    Directory,
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// A file in a sandbox, as the sandbox sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct FileStat {
    /// The last path component (`/` for the root).
    pub name: String,
    /// Absolute path inside the sandbox.
    pub path: String,
    pub file_type: FileType,
    /// Bytes (for a symlink: the length of its target).
    pub size: u64,
    /// Permission bits, including setuid/setgid/sticky (`0o7777` at most).
    pub mode: u32,
    /// uid and gid inside the sandbox: the host id minus the sandbox's range base; a host id
    /// outside the range (a host-owned image file) is [`OVERFLOW_ID`], as the sandbox sees it.
    pub owner: u32,
    pub group: u32,
    /// Last modification, Unix seconds.
    pub modified_time: f64,
    /// The link's target, unresolved (symlinks only).
    pub symlink_target: Option<String>,
}

/// Why a filesystem call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsErrorKind {
    /// The path, or one of its directories, does not exist (ENOENT).
    NotFound,
    /// A directory where a file was needed (EISDIR).
    IsADirectory,
    /// A component of the path is not a directory (ENOTDIR).
    NotADirectory,
    /// A non-recursive remove of a directory with entries (ENOTEMPTY).
    DirectoryNotEmpty,
    /// The sandbox's root may not do this: EACCES, EPERM, or a read-only mount (EROFS).
    PermissionDenied,
    /// The path exists (EEXIST).
    AlreadyExists,
    /// The request itself is wrong: a relative path, a NUL byte, too long a path, the root where
    /// a name is needed, not a regular file to read, too many symlinks or a magic link.
    Invalid,
    /// The sandbox has finished (its init is gone): there is no filesystem to reach.
    Finished,
    /// Any other failure, with its errno.
    Io(i32),
}

/// A failed filesystem call: its kind, the path as the sandbox sees it, and a message naming the
/// step and that path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FsError {
    pub kind: FsErrorKind,
    pub path: String,
    pub message: String,
}

impl FsError {
    /// `step` on `path` failed with `errno`.
    fn sys(step: &str, path: &str, errno: Errno) -> FsError {
        let kind = match errno {
            Errno::ENOENT => FsErrorKind::NotFound,
            Errno::EISDIR => FsErrorKind::IsADirectory,
            Errno::ENOTDIR => FsErrorKind::NotADirectory,
            Errno::ENOTEMPTY => FsErrorKind::DirectoryNotEmpty,
            Errno::EACCES | Errno::EPERM | Errno::EROFS => FsErrorKind::PermissionDenied,
            Errno::EEXIST => FsErrorKind::AlreadyExists,
            Errno::ELOOP | Errno::ENAMETOOLONG => FsErrorKind::Invalid,
            e => FsErrorKind::Io(e as i32),
        };
        let why = match errno {
            Errno::ELOOP => "too many levels of symbolic links, or a /proc magic link (refused)",
            Errno::EBUSY => "in use (a mount point?)",
            e => e.desc(),
        };
        FsError {
            kind,
            path: path.to_string(),
            message: format!("failed to {step} {path}: {why}"),
        }
    }

    fn new(kind: FsErrorKind, path: &str, message: String) -> FsError {
        FsError {
            kind,
            path: path.to_string(),
            message,
        }
    }

    fn invalid(path: &str, reason: &str) -> FsError {
        FsError::new(
            FsErrorKind::Invalid,
            path,
            format!("invalid path {path:?}: {reason}"),
        )
    }
}

/// Host-side filesystem access to one sandbox ([`Sandbox::fs`]). Cheap to clone; `Send + Sync`.
/// Every call checks that the sandbox is still running ([`FsErrorKind::Finished`] otherwise) and
/// runs its lookups on a short-lived thread with the sandbox root's file credentials.
///
/// Permissions are those of sandbox root *without* its capabilities: it can do what the owner
/// of a file may do (sandbox root owns `/`, `/root`, `/tmp`, … and everything it created), but
/// it cannot override another sandbox user's `0600` file, nor write host-owned image files or
/// read-only mounts.
#[derive(Clone)]
pub struct SandboxFs {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SandboxFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxFs")
            .field("sandbox", &self.inner.id)
            .finish()
    }
}

impl Sandbox {
    /// Filesystem access into this sandbox (see [`SandboxFs`]).
    pub fn fs(&self) -> SandboxFs {
        SandboxFs {
            inner: self.inner.clone(),
        }
    }

    /// A TCP connection to `127.0.0.1:port` inside the sandbox's network namespace (each
    /// sandbox has its own, with only `lo`; the host's listeners are not there). A short-lived
    /// thread joins that namespace and connects there, within `timeout` (a socket stays in the
    /// namespace it was created in, so the stream works from any thread afterwards).
    ///
    /// Errors: `ConnectionRefused` when nothing listens, `TimedOut`, `InvalidInput` for a zero
    /// timeout, and `NotFound` ("sandbox … has finished") once init is gone.
    pub fn tcp_connect(&self, port: u16, timeout: Duration) -> io::Result<TcpStream> {
        let inner = &self.inner;
        let finished = || {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("sandbox {} has finished", inner.id),
            )
        };
        if !running(inner) {
            return Err(finished());
        }
        let ns_path = format!("/proc/{}/ns/net", inner.init_pid);
        let ns = File::open(&ns_path).map_err(|e| {
            if running(inner) {
                io::Error::new(e.kind(), format!("failed to open {ns_path}: {e}"))
            } else {
                finished()
            }
        })?;
        // Init still running after the open: the pid was not reused, the namespace is its.
        if !running(inner) {
            return Err(finished());
        }
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("sbx-netns".into())
                .spawn_scoped(s, move || {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                        io::Error::new(
                            io::Error::from(e).kind(),
                            format!("failed to join the network namespace {ns_path}: {e}"),
                        )
                    })?;
                    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)
                })?
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

/// Whether the sandbox's init still runs (its pidfd is not readable yet). Without a pidfd
/// (an adopted sandbox that had ended) it does not.
fn running(inner: &Inner) -> bool {
    lock(&inner.exit).is_none()
        && inner
            .init_pidfd
            .as_ref()
            .is_some_and(|fd| !wait_readable_for(fd, 0))
}

impl SandboxFs {
    /// Open a regular file for reading (symlinks are followed, inside the sandbox). The file is
    /// opened as the sandbox's root; read it from any thread.
    pub fn read_file(&self, path: &str) -> Result<File, FsError> {
        check(path)?;
        let path = trim(path);
        self.run(path, |root| {
            // O_PATH first: nothing is opened for real (no FIFO that blocks, no device) until
            // the type is known.
            let fd = root.open(path, OFlag::O_PATH, "open")?;
            let st = fstat(fd.as_raw_fd()).map_err(|e| FsError::sys("stat", path, e))?;
            match file_type(&st) {
                FileType::File => {}
                FileType::Directory => return Err(FsError::sys("read", path, Errno::EISDIR)),
                _ => {
                    return Err(FsError::new(
                        FsErrorKind::Invalid,
                        path,
                        format!("failed to read {path}: not a regular file"),
                    ))
                }
            }
            // Reopen that very inode for reading; the permission check happens now, with the
            // sandbox root's credentials. /proc/self/fd (not thread-self): procfs lets a thread
            // group into its own fd directory whatever the thread's fsuid.
            File::options()
                .read(true)
                .custom_flags(libc::O_NOCTTY)
                .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|e| FsError::sys("read", path, io_errno(&e)))
        })
    }

    /// Write `data` to `path`, creating missing parent directories (0755). The target is
    /// replaced, not written through: the bytes go to a new file (0644, owned by sandbox root)
    /// in the same directory, which is then renamed over it, so a symlink at `path` is replaced
    /// and an existing file's other hard links keep the old content.
    pub fn write_file(&self, path: &str, data: &mut dyn Read) -> Result<FileStat, FsError> {
        check(path)?;
        if path.len() > 1 && path.ends_with('/') {
            return Err(FsError::invalid(path, "names a directory (trailing '/')"));
        }
        let (parent, name) = split(path)?;
        let root = self.root(path)?;
        let (base, count) = (root.base, root.count);
        // Step 1, as sandbox root: the parent (made if missing) and a fresh temporary file.
        let (dir, tmp, mut file) = as_sandbox_root(base, path, || {
            let dir = match root.open(parent, OFlag::O_PATH | OFlag::O_DIRECTORY, "open") {
                Err(e) if e.kind == FsErrorKind::NotFound => root.mkdir_all(parent)?,
                r => r?,
            };
            // A directory in the way fails now, before any byte is copied.
            if let Ok(st) = fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                if file_type(&st) == FileType::Directory {
                    return Err(FsError::sys("write", path, Errno::EISDIR));
                }
            }
            let step = "create a temporary file for";
            writable(&dir, step, path)?;
            let (tmp, fd) = create_temp(dir.as_fd())
                .map_err(|e| FsError::sys(step, path, create_errno(&dir, e)))?;
            Ok((dir, tmp, File::from(fd)))
        })?;
        // Step 2, here: the bytes (the descriptor was opened as sandbox root; writes to it are
        // not checked again).
        let copied = io::copy(data, &mut file);
        // Step 3, as sandbox root: rename over the target, or remove the temporary file.
        as_sandbox_root(base, path, move || {
            let dirfd = Some(dir.as_raw_fd());
            let discard = || {
                let _ = unlinkat(dirfd, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
            };
            if let Err(e) = copied {
                discard();
                return Err(FsError::sys("write", path, io_errno(&e)));
            }
            if let Err(e) = renameat(dirfd, tmp.as_os_str(), dirfd, name) {
                discard();
                return Err(FsError::sys("replace", path, e));
            }
            let st = fstat(file.as_raw_fd()).map_err(|e| FsError::sys("stat", path, e))?;
            Ok(stat_of(&st, name, trim(path), None, base, count))
        })
    }

    /// The entries of a directory (symlinks followed to reach it; entries `lstat`ed), sorted by
    /// name, without `.` and `..`.
    pub fn list_dir(&self, path: &str) -> Result<Vec<FileStat>, FsError> {
        check(path)?;
        let path = trim(path);
        self.run(path, |root| {
            let fd = root.open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, "list")?;
            let names = read_names(&fd).map_err(|e| FsError::sys("list", path, e))?;
            let mut out = Vec::with_capacity(names.len());
            for n in names {
                let child = join(path, &n);
                let st = match fstatat(Some(fd.as_raw_fd()), n.as_os_str(), no_follow()) {
                    Ok(st) => st,
                    Err(Errno::ENOENT) => continue, // removed meanwhile
                    Err(e) => return Err(FsError::sys("stat", &child, e)),
                };
                let target = (file_type(&st) == FileType::Symlink)
                    .then(|| readlinkat(Some(fd.as_raw_fd()), n.as_os_str()).ok())
                    .flatten()
                    .map(|t| t.to_string_lossy().into_owned());
                let name = n.to_string_lossy();
                out.push(stat_of(&st, &name, &child, target, root.base, root.count));
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }

    /// Information about `path` itself: a final symlink is not followed (its target is in
    /// `symlink_target`); symlinks in the directories before it are, inside the sandbox.
    pub fn stat(&self, path: &str) -> Result<FileStat, FsError> {
        check(path)?;
        let path = trim(path);
        self.run(path, |root| {
            let fd = root.open(path, OFlag::O_PATH | OFlag::O_NOFOLLOW, "stat")?;
            let st = fstat(fd.as_raw_fd()).map_err(|e| FsError::sys("stat", path, e))?;
            // An empty name reads the link an O_PATH|O_NOFOLLOW descriptor names.
            let target = (file_type(&st) == FileType::Symlink)
                .then(|| readlinkat(Some(fd.as_raw_fd()), "").ok())
                .flatten()
                .map(|t| t.to_string_lossy().into_owned());
            let name = path.rsplit('/').next().filter(|n| !n.is_empty());
            Ok(stat_of(
                &st,
                name.unwrap_or("/"),
                path,
                target,
                root.base,
                root.count,
            ))
        })
    }

    /// Create a directory (0755, owned by sandbox root). `parents`: also every missing parent,
    /// and succeed if it exists already (`mkdir -p`). Otherwise the parent must exist
    /// (`NotFound`) and the path must not (`AlreadyExists`).
    pub fn mkdir(&self, path: &str, parents: bool) -> Result<(), FsError> {
        check(path)?;
        let path = trim(path);
        self.run(path, |root| {
            if parents {
                return root.mkdir_all(path).map(drop);
            }
            if path == "/" {
                return Err(FsError::sys("create directory", path, Errno::EEXIST));
            }
            let (parent, name) = split(path)?;
            let dir = root.open_parent(parent, path)?;
            writable(&dir, "create directory", path)?;
            mkdirat(
                Some(dir.as_raw_fd()),
                name,
                Mode::from_bits_truncate(DIR_MODE),
            )
            .map_err(|e| FsError::sys("create directory", path, create_errno(&dir, e)))
        })
    }

    /// Remove a file, symlink (never its target) or empty directory; with `recursive`, a
    /// directory and everything in it. The walk never follows a symlink: it goes down with
    /// `openat(O_NOFOLLOW)` and back up through `..` checked against the device and inode it
    /// came from, holding two descriptors whatever the depth.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), FsError> {
        check(path)?;
        let path = trim(path);
        if path == "/" {
            return Err(FsError::invalid(
                path,
                "the root directory cannot be removed",
            ));
        }
        let (parent, name) = split(path)?;
        self.run(path, |root| {
            let dir = root.open_parent(parent, path)?;
            let st = fstatat(Some(dir.as_raw_fd()), name, no_follow())
                .map_err(|e| FsError::sys("remove", path, e))?;
            if file_type(&st) != FileType::Directory {
                return unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir)
                    .map_err(|e| FsError::sys("remove", path, e));
            }
            if !recursive {
                return unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir).map_err(
                    |e| {
                        // POSIX allows EEXIST for a non-empty directory.
                        let e = if e == Errno::EEXIST {
                            Errno::ENOTEMPTY
                        } else {
                            e
                        };
                        FsError::sys("remove directory", path, e)
                    },
                );
            }
            remove_tree(&dir, OsStr::new(name), path)
        })
    }

    /// The sandbox's root, opened while init is known to be running.
    fn root(&self, path: &str) -> Result<Root, FsError> {
        let inner = &self.inner;
        let finished = || {
            FsError::new(
                FsErrorKind::Finished,
                path,
                format!("failed to reach {path}: sandbox {} has finished", inner.id),
            )
        };
        if !running(inner) {
            return Err(finished());
        }
        let proc_root = format!("/proc/{}/root", inner.init_pid);
        let fd = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&proc_root)
            .map_err(|e| {
                if running(inner) {
                    FsError::sys(&format!("open {proc_root} to reach"), path, io_errno(&e))
                } else {
                    finished()
                }
            })?;
        // Init still running after the open: the pid was not reused, this root is its.
        if !running(inner) {
            return Err(finished());
        }
        Ok(Root {
            fd: fd.into(),
            base: inner.ids.base,
            count: inner.ids.count,
        })
    }

    /// Open the root, then run `f` with it on a thread acting as sandbox root.
    fn run<T: Send>(
        &self,
        path: &str,
        f: impl FnOnce(&Root) -> Result<T, FsError> + Send,
    ) -> Result<T, FsError> {
        let root = self.root(path)?;
        as_sandbox_root(root.base, path, || f(&root))
    }
}

/// Run `f` on a new thread that acts on files as the sandbox's root and nothing more: fsuid and
/// fsgid `base`, no supplementary groups, and no capabilities at all (the filesystem ones go
/// with the fsuid; the rest — `CAP_SYSLOG`, `CAP_SYS_PTRACE`, … which procfs files consult at
/// open — are cleared too, so a read shows what the sandbox itself would see). It also gets
/// its own umask of 0, so modes are exactly the ones asked for. The thread ends with `f`; the
/// process's other threads keep their credentials.
fn as_sandbox_root<T: Send>(
    base: u32,
    path: &str,
    f: impl FnOnce() -> Result<T, FsError> + Send,
) -> Result<T, FsError> {
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("sbx-fs".into())
            .spawn_scoped(s, move || {
                // Own fs_struct first: the umask is then this thread's alone.
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                    .map_err(|e| FsError::sys("unshare the fs attributes to reach", path, e))?;
                nix::sys::stat::umask(Mode::empty());
                // Ids first: changing them needs CAP_SETUID/CAP_SETGID, cleared next.
                sys::set_thread_fs_ids(base, base)
                    .map_err(|e| FsError::sys("take the sandbox root's ids to reach", path, e))?;
                drop_thread_capabilities().map_err(|e| {
                    FsError::new(
                        FsErrorKind::Io(libc::EPERM),
                        path,
                        format!("failed to drop capabilities to reach {path}: {e}"),
                    )
                })?;
                f()
            })
            .map_err(|e| FsError::sys("start a thread to reach", path, io_errno(&e)))?;
        worker
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Clear the calling thread's effective, permitted and inheritable capability sets (capset(2)
/// is per-thread; the ambient set empties with the permitted one), and check they are empty.
fn drop_thread_capabilities() -> Result<(), caps::errors::CapsError> {
    use caps::CapSet;
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::clear(None, set)?;
    }
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Ambient] {
        if !caps::read(None, set)?.is_empty() {
            return Err(format!("the {set:?} set is not empty after clearing it").into());
        }
    }
    Ok(())
}

/// A sandbox's root directory and its id range, for one call.
struct Root {
    /// `O_PATH` descriptor of init's `/`.
    fd: OwnedFd,
    base: u32,
    count: u32,
}

impl Root {
    /// Resolve `path` inside the root (see the module doc) and open it with `flags`.
    fn open(&self, path: &str, flags: OFlag, step: &str) -> Result<OwnedFd, FsError> {
        let resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        // openat2 fails with EAGAIN when a rename or mount raced with a `..` step (it cannot
        // then prove the walk stayed inside): retry a bounded number of times.
        let mut tries = 0;
        loop {
            match sys::openat2(self.fd.as_fd(), Path::new(path), flags.bits(), resolve) {
                Err(Errno::EAGAIN | Errno::EINTR) if tries < 100 => tries += 1,
                r => return r.map_err(|e| FsError::sys(step, path, e)),
            }
        }
    }

    /// The existing directory `parent` of `path` (for an operation on its last component).
    fn open_parent(&self, parent: &str, path: &str) -> Result<OwnedFd, FsError> {
        self.open(parent, OFlag::O_PATH | OFlag::O_DIRECTORY, "open")
            .map_err(|e| {
                let what = match e.kind {
                    FsErrorKind::NotFound => "does not exist",
                    FsErrorKind::NotADirectory => "is not a directory",
                    _ => return e,
                };
                FsError::new(
                    e.kind,
                    path,
                    format!("failed to reach {path}: its parent {parent} {what}"),
                )
            })
    }

    /// `mkdir -p path`: each missing directory is made (0755) in its parent, resolved from the
    /// root every time. Returns the directory, opened `O_PATH`.
    fn mkdir_all(&self, path: &str) -> Result<OwnedFd, FsError> {
        let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
        match self.open(path, dir_flags, "create directory") {
            Err(e) if e.kind == FsErrorKind::NotFound => {}
            r => return r,
        }
        let mut cur = self
            .fd
            .try_clone()
            .map_err(|e| FsError::sys("create directory", path, io_errno(&e)))?;
        let mut prefix = String::new();
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            prefix.push('/');
            prefix.push_str(comp);
            match self.open(&prefix, dir_flags, "create directory") {
                Ok(fd) => {
                    cur = fd;
                    continue;
                }
                Err(e) if e.kind == FsErrorKind::NotFound && comp != ".." => {}
                Err(e) => return Err(e),
            }
            writable(&cur, "create directory", &prefix)?;
            match mkdirat(
                Some(cur.as_raw_fd()),
                comp,
                Mode::from_bits_truncate(DIR_MODE),
            ) {
                // EEXIST: made meanwhile, or a dangling symlink (the open below then says so).
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => {
                    return Err(FsError::sys(
                        "create directory",
                        &prefix,
                        create_errno(&cur, e),
                    ))
                }
            }
            cur = self.open(&prefix, dir_flags, "create directory")?;
        }
        Ok(cur)
    }
}

/// Remove the directory `name` in `parent` and everything below it, never following a
/// symlink. Descends with `openat(O_NOFOLLOW | O_DIRECTORY)`; comes back up through `..`,
/// checked against the device and inode of the directory it came from (a directory moved
/// meanwhile stops the walk with an error instead of removing elsewhere). Holds two
/// descriptors and the pending names of each level, whatever the depth.
fn remove_tree(parent: &OwnedFd, name: &OsStr, path: &str) -> Result<(), FsError> {
    struct Level {
        name: OsString,
        ident: (u64, u64),
        pending: Vec<OsString>,
    }
    let ident = |fd: &OwnedFd| fstat(fd.as_raw_fd()).map(|st| (st.st_dev, st.st_ino));
    let path_of = |stack: &[Level], child: Option<&OsStr>| {
        let mut p = path.to_string();
        for l in stack.iter().skip(1) {
            p = join(&p, &l.name);
        }
        match child {
            Some(c) => join(&p, c),
            None => p,
        }
    };
    let down = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
    let mut cur = sys::openat(parent.as_fd(), name, down, 0)
        .map_err(|e| FsError::sys("open directory", path, e))?;
    let mut stack = vec![Level {
        name: name.to_os_string(),
        ident: ident(&cur).map_err(|e| FsError::sys("stat", path, e))?,
        pending: read_names(&cur).map_err(|e| FsError::sys("list", path, e))?,
    }];
    loop {
        let next = stack.last_mut().and_then(|l| l.pending.pop());
        if let Some(child) = next {
            // Try it as a non-directory first: a symlink (to a directory or anywhere) is
            // unlinked here, never entered.
            match unlinkat(
                Some(cur.as_raw_fd()),
                child.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) | Err(Errno::ENOENT) => continue,
                Err(Errno::EISDIR) => {}
                Err(e) => return Err(FsError::sys("remove", &path_of(&stack, Some(&child)), e)),
            }
            match sys::openat(cur.as_fd(), child.as_os_str(), down, 0) {
                Ok(fd) => {
                    let p = path_of(&stack, Some(&child));
                    let level = Level {
                        ident: ident(&fd).map_err(|e| FsError::sys("stat", &p, e))?,
                        pending: read_names(&fd).map_err(|e| FsError::sys("list", &p, e))?,
                        name: child,
                    };
                    stack.push(level);
                    cur = fd;
                }
                Err(Errno::ENOENT) => {}
                // Swapped for a symlink or file since the unlink: try again as that.
                Err(Errno::ELOOP | Errno::ENOTDIR) => stack
                    .last_mut()
                    .expect("the level being walked is on the stack")
                    .pending
                    .push(child),
                Err(e) => {
                    return Err(FsError::sys(
                        "open directory",
                        &path_of(&stack, Some(&child)),
                        e,
                    ))
                }
            }
            continue;
        }
        // This level is empty: go up and remove it.
        let done_path = path_of(&stack, None);
        let done = stack.pop().expect("the level being walked is on the stack");
        let up = match stack.last() {
            None => parent
                .try_clone()
                .map_err(|e| FsError::sys("remove directory", path, io_errno(&e)))?,
            Some(above) => {
                let up = sys::openat(cur.as_fd(), "..", OFlag::O_PATH | OFlag::O_DIRECTORY, 0)
                    .map_err(|e| FsError::sys("open the parent of", &done_path, e))?;
                if ident(&up).ok() != Some(above.ident) {
                    return Err(FsError::new(
                        FsErrorKind::Io(libc::ESTALE),
                        &done_path,
                        format!("failed to remove {done_path}: it was moved during the removal"),
                    ));
                }
                up
            }
        };
        match unlinkat(
            Some(up.as_raw_fd()),
            done.name.as_os_str(),
            UnlinkatFlags::RemoveDir,
        ) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => {
                let e = if e == Errno::EEXIST {
                    Errno::ENOTEMPTY
                } else {
                    e
                };
                return Err(FsError::sys("remove directory", &done_path, e));
            }
        }
        if stack.is_empty() {
            return Ok(());
        }
        cur = up;
    }
}

/// The names in a directory opened for reading, without `.` and `..`.
fn read_names(fd: &OwnedFd) -> Result<Vec<OsString>, Errno> {
    let dup = fd.try_clone().map_err(|e| io_errno(&e))?;
    let mut dir = nix::dir::Dir::from(dup)?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name));
        }
    }
    Ok(names)
}

/// A new file `.sbx-write-<random>` in `dir`, mode 0644, opened for writing (`O_EXCL`,
/// `O_NOFOLLOW`: never an existing file or a link).
fn create_temp(dir: BorrowedFd<'_>) -> Result<(OsString, OwnedFd), Errno> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW;
    let mut tries = 0;
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = OsString::from(format!(".sbx-write-{}-{n}-{nanos:08x}", std::process::id()));
        match sys::openat(dir, name.as_os_str(), flags, FILE_MODE) {
            Err(Errno::EEXIST) if tries < 16 => tries += 1,
            r => return r.map(|fd| (name, fd)),
        }
    }
}

/// EROFS before creating anything in `dir` when it is on a read-only mount: some filesystems
/// (procfs: `/proc/sys`) answer a create with ENOENT before the kernel looks at the mount.
fn writable(dir: &OwnedFd, step: &str, path: &str) -> Result<(), FsError> {
    use nix::sys::statvfs::{fstatvfs, FsFlags};
    match fstatvfs(dir) {
        Ok(s) if s.flags().contains(FsFlags::ST_RDONLY) => {
            Err(FsError::sys(step, path, Errno::EROFS))
        }
        _ => Ok(()),
    }
}

/// The errno of a failed create in `dir`: ENOENT while `dir` still exists (it was not removed
/// meanwhile) means the directory takes no new entries (procfs, sysfs): EACCES.
fn create_errno(dir: &OwnedFd, e: Errno) -> Errno {
    let dir_exists = || fstat(dir.as_raw_fd()).is_ok_and(|st| st.st_nlink > 0);
    if e == Errno::ENOENT && dir_exists() {
        Errno::EACCES
    } else {
        e
    }
}

fn no_follow() -> AtFlags {
    AtFlags::AT_SYMLINK_NOFOLLOW
}

fn file_type(st: &RawStat) -> FileType {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => FileType::File,
        SFlag::S_IFDIR => FileType::Directory,
        SFlag::S_IFLNK => FileType::Symlink,
        _ => FileType::Other,
    }
}

/// A host uid or gid as the sandbox sees it.
fn to_sandbox_id(host: u32, base: u32, count: u32) -> u32 {
    match host.checked_sub(base) {
        Some(id) if id < count => id,
        _ => OVERFLOW_ID,
    }
}

fn stat_of(
    st: &RawStat,
    name: &str,
    path: &str,
    symlink_target: Option<String>,
    base: u32,
    count: u32,
) -> FileStat {
    FileStat {
        name: name.to_string(),
        path: path.to_string(),
        file_type: file_type(st),
        size: st.st_size.max(0) as u64,
        mode: st.st_mode & 0o7777,
        owner: to_sandbox_id(st.st_uid, base, count),
        group: to_sandbox_id(st.st_gid, base, count),
        modified_time: st.st_mtime as f64 + st.st_mtime_nsec as f64 / 1e9,
        symlink_target,
    }
}

/// A path the API accepts: absolute, no NUL byte, shorter than `PATH_MAX`.
fn check(path: &str) -> Result<(), FsError> {
    if !path.starts_with('/') {
        return Err(FsError::invalid(path, "must be absolute"));
    }
    if path.contains('\0') {
        return Err(FsError::invalid(path, "contains a NUL byte"));
    }
    if path.len() >= PATH_MAX {
        return Err(FsError::invalid(path, "longer than 4095 bytes"));
    }
    Ok(())
}

/// `path` without trailing slashes (`/` stays `/`).
fn trim(path: &str) -> &str {
    let t = path.trim_end_matches('/');
    if t.is_empty() {
        "/"
    } else {
        t
    }
}

/// The directory and last component of `path`, for calls that create or remove that
/// component. The root, `.` and `..` name no component of their own.
fn split(path: &str) -> Result<(&str, &str), FsError> {
    let t = trim(path);
    if t == "/" {
        return Err(FsError::invalid(path, "names the root directory"));
    }
    let Some((parent, name)) = t.rsplit_once('/') else {
        return Err(FsError::invalid(path, "must be an absolute path"));
    };
    if name == "." || name == ".." {
        return Err(FsError::invalid(
            path,
            "must end in a name, not '.' or '..'",
        ));
    }
    Ok((if parent.is_empty() { "/" } else { parent }, name))
}

/// `dir/name` as a sandbox path.
fn join(dir: &str, name: &OsStr) -> String {
    let name = String::from_utf8_lossy(name.as_bytes());
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn io_errno(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_and_split() {
        assert_eq!(check("etc/passwd").unwrap_err().kind, FsErrorKind::Invalid);
        assert_eq!(check("/a\0b").unwrap_err().kind, FsErrorKind::Invalid);
        assert_eq!(
            check(&format!("/{}", "a".repeat(PATH_MAX)))
                .unwrap_err()
                .kind,
            FsErrorKind::Invalid
        );
        check("/a/../b").unwrap();
        assert_eq!(trim("///"), "/");
        assert_eq!(trim("/a/b//"), "/a/b");
        assert_eq!(split("/a").unwrap(), ("/", "a"));
        assert_eq!(split("/a/b/c/").unwrap(), ("/a/b", "c"));
        assert_eq!(split("/a/../b").unwrap(), ("/a/..", "b"));
        for bad in ["/", "//", "/a/..", "/a/."] {
            assert_eq!(split(bad).unwrap_err().kind, FsErrorKind::Invalid, "{bad}");
        }
        assert_eq!(join("/", OsStr::new("x")), "/x");
        assert_eq!(join("/a", OsStr::new("x")), "/a/x");
    }

    #[test]
    fn host_ids_map_into_the_range_or_to_nobody() {
        let base = 0x4000_0000;
        assert_eq!(to_sandbox_id(base, base, 65536), 0);
        assert_eq!(to_sandbox_id(base + 1000, base, 65536), 1000);
        assert_eq!(to_sandbox_id(base + 65536, base, 65536), OVERFLOW_ID);
        assert_eq!(to_sandbox_id(0, base, 65536), OVERFLOW_ID);
        assert_eq!(to_sandbox_id(base - 1, base, 65536), OVERFLOW_ID);
    }

    #[test]
    fn errnos_map_to_kinds_and_messages_name_the_path() {
        let e = FsError::sys("open", "/x/y", Errno::ENOENT);
        assert_eq!(e.kind, FsErrorKind::NotFound);
        assert_eq!(e.path, "/x/y");
        assert!(e.message.contains("/x/y"), "{}", e.message);
        for (errno, kind) in [
            (Errno::EISDIR, FsErrorKind::IsADirectory),
            (Errno::ENOTDIR, FsErrorKind::NotADirectory),
            (Errno::ENOTEMPTY, FsErrorKind::DirectoryNotEmpty),
            (Errno::EROFS, FsErrorKind::PermissionDenied),
            (Errno::EPERM, FsErrorKind::PermissionDenied),
            (Errno::EACCES, FsErrorKind::PermissionDenied),
            (Errno::EEXIST, FsErrorKind::AlreadyExists),
            (Errno::ELOOP, FsErrorKind::Invalid),
            (Errno::ENOSPC, FsErrorKind::Io(libc::ENOSPC)),
        ] {
            assert_eq!(FsError::sys("x", "/p", errno).kind, kind, "{errno}");
        }
    }
}
