//! Making images from files: an overlay upper dir (a snapshot, a build's RUN step) or files of a
//! build context (COPY) become a gzip OCI layer in the [`Store`], and [`derive_image`] writes the
//! config and manifest of a new image on top of a parent and saves its record.
//!
//! Layers are written in one pass: tar → sha256 (the diff_id) → gzip → sha256 (the blob digest)
//! → a temp file in the store, renamed under its digest at the end. Entries are in a fixed order
//! (each directory before its children, names sorted bytewise), tar headers hold no user or
//! group names, and gzip no name or time, so the same files give the same layer.
//!
//! The upper dir may belong to a sandbox that is still running: every file is reached through
//! directory fds with `*at` calls that never follow a symlink (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`),
//! and what is written is what the opened fd says (`fstat`), so a file swapped for a symlink
//! mid-walk never makes this read something outside the upper.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::oci::{self, Descriptor, Manifest, OciError};
use crate::store::{
    ComputedBlob, Digest, ImageConfig, ImageId, ImageRecord, LayerRef, Store, StoreError,
};

/// The id files get whose host owner is outside the sandbox's id range (`nobody`).
pub const NOBODY: u32 = 65534;

/// The label that marks the config of an image layered on the built-in `host` image (so it
/// never gets the id of an image with the same layers that is not).
pub const HOST_BASE_LABEL: &str = "dev.sbx.host-base";

/// Why a layer or an image could not be made. Each names the step and the path or value.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("failed to {step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to {step}: {source}")]
    Store {
        step: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("COPY source {source_path:?}: {reason}")]
    BadSource { source_path: String, reason: String },
    #[error("COPY destination {dest:?}: {reason}")]
    BadDest { dest: String, reason: String },
    #[error("COPY needs at least one source")]
    NoSources,
    #[error("{path} changed while it was being copied ({reason}); try again")]
    Changed { path: PathBuf, reason: String },
    #[error("{path} cannot be put in a layer: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error(
        "{path}: the layer would exceed its limit of {limit} {what} (a layer must stay applicable)"
    )]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        limit: u64,
    },
    #[error("image {parent} is not layered on the host image: an image derived from it cannot be (host_base was asked)")]
    HostBaseMismatch { parent: ImageId },
    #[error("layer {digest} is not in the store (make it with layer_from_upper or layer_from_context first)")]
    LayerMissing { digest: Digest },
    #[error("failed to read the config of the parent image {parent}: {reason}")]
    ParentConfig { parent: ImageId, reason: String },
    #[error("failed to encode the {what} of image {reference:?}: {source}")]
    Json {
        what: &'static str,
        reference: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to make the record of image {reference:?}: {source}")]
    Record {
        reference: String,
        #[source]
        source: Box<OciError>,
    },
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CommitError {
    let path = path.to_path_buf();
    move |source| CommitError::Io { step, path, source }
}

fn errno(step: &'static str, path: &Path) -> impl FnOnce(Errno) -> CommitError {
    let path = path.to_path_buf();
    move |e| CommitError::Io {
        step,
        path,
        source: e.into(),
    }
}

fn store_err(step: &'static str) -> impl FnOnce(StoreError) -> CommitError {
    move |source| CommitError::Store { step, source }
}

// ---------------------------------------------------------------------------------------------
// The layer writer: tar → diff_id → gzip → blob digest → store.

/// Hashes and counts what goes through it.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Tar entry types written here.
mod kind {
    pub const FILE: u8 = b'0';
    pub const HARDLINK: u8 = b'1';
    pub const SYMLINK: u8 = b'2';
    pub const CHAR: u8 = b'3';
    pub const BLOCK: u8 = b'4';
    pub const DIR: u8 = b'5';
    pub const FIFO: u8 = b'6';
    pub const PAX: u8 = b'x';
}

/// Extended attributes of an entry: (name, value), sorted by name.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The metadata of one tar entry.
#[derive(Debug, Clone, Default)]
struct Meta {
    kind: u8,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    link: Vec<u8>,
    dev: (u32, u32),
    xattrs: Xattrs,
}

const BLOCK: usize = 512;
/// Largest value of an 11-digit octal header field (size, mtime).
const MAX_OCTAL_11: u64 = (1 << 33) - 1;
/// Largest value of a 7-digit octal header field (uid, gid).
const MAX_OCTAL_7: u64 = (1 << 21) - 1;

/// Writes a tar stream: ustar headers, PAX (`x`) headers for long names, long link targets,
/// sizes of 8 GiB and more, and xattrs (`SCHILY.xattr.*`).
struct TarWriter<W: Write> {
    out: W,
    /// What the layer is made of (for error messages).
    path: PathBuf,
}

fn octal(field: &mut [u8], v: u64) {
    let n = field.len() - 1;
    // Values that do not fit are clamped (the caller also writes them in a PAX record).
    let max = (1u64 << (3 * n)) - 1;
    let s = format!("{:0n$o}", v.min(max));
    field[..n].copy_from_slice(s.as_bytes());
    field[n] = 0;
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "%d %s=%s\n", the length counting itself.
    let rest = key.len() + value.len() + 3;
    let mut len = rest + rest.to_string().len();
    if len.to_string().len() + rest != len {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> TarWriter<W> {
    fn block(name: &[u8], m: &Meta, size_field: u64) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        octal(&mut h[100..108], u64::from(m.mode & 0o7777));
        octal(&mut h[108..116], u64::from(m.uid));
        octal(&mut h[116..124], u64::from(m.gid));
        octal(&mut h[124..136], size_field);
        octal(&mut h[136..148], (m.mtime.max(0) as u64).min(MAX_OCTAL_11));
        h[156] = m.kind;
        let l = m.link.len().min(100);
        h[157..157 + l].copy_from_slice(&m.link[..l]);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        if matches!(m.kind, kind::CHAR | kind::BLOCK) {
            octal(&mut h[329..337], u64::from(m.dev.0));
            octal(&mut h[337..345], u64::from(m.dev.1));
        }
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        octal(&mut h[148..155], u64::from(sum));
        h[155] = b' ';
        h
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), CommitError> {
        self.out
            .write_all(bytes)
            .map_err(io_err("write the layer of", &self.path))
    }

    fn pad(&mut self, size: u64) -> Result<(), CommitError> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    /// Write the header(s) of an entry named `name` (a relative path, `/`-terminated for a
    /// directory). The caller then writes exactly `m.size` bytes with [`TarWriter::data`].
    fn header(&mut self, name: &[u8], m: &Meta) -> Result<(), CommitError> {
        let mut pax = Vec::new();
        if name.len() > 100 {
            pax_record(&mut pax, b"path", name);
        }
        if m.link.len() > 100 {
            pax_record(&mut pax, b"linkpath", &m.link);
        }
        for (key, id) in [(&b"uid"[..], m.uid), (&b"gid"[..], m.gid)] {
            if u64::from(id) > MAX_OCTAL_7 {
                pax_record(&mut pax, key, id.to_string().as_bytes());
            }
        }
        if m.size > MAX_OCTAL_11 {
            pax_record(&mut pax, b"size", m.size.to_string().as_bytes());
        }
        for (k, v) in &m.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
        if !pax.is_empty() {
            let pm = Meta {
                kind: kind::PAX,
                mode: 0o644,
                size: pax.len() as u64,
                mtime: m.mtime,
                ..Meta::default()
            };
            let h = Self::block(b"././@PaxHeader", &pm, pax.len() as u64);
            self.write_all(&h)?;
            self.write_all(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        let h = Self::block(name, m, m.size.min(MAX_OCTAL_11));
        self.write_all(&h)
    }

    /// Write exactly `size` bytes of an entry's data from `r`, then the padding. A file that
    /// shrank since its header was written is padded with zeros (its header is already out).
    fn data(&mut self, r: &mut impl Read, size: u64, what: &Path) -> Result<(), CommitError> {
        let mut left = size;
        let mut buf = vec![0u8; 256 * 1024];
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = match r.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("read", what)(e)),
            };
            self.write_all(&buf[..n])?;
            left -= n as u64;
        }
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            self.write_all(&buf[..n])?;
            left -= n as u64;
        }
        self.pad(size)
    }
}

/// A layer being written into the store.
struct LayerSink {
    tar: TarWriter<HashWriter<GzEncoder<ComputedBlob>>>,
}

impl LayerSink {
    fn new(store: &Store, what: &Path) -> Result<LayerSink, CommitError> {
        let blob = store
            .computed_writer()
            .map_err(store_err("create a layer blob"))?;
        Ok(LayerSink {
            tar: TarWriter {
                out: HashWriter {
                    inner: GzEncoder::new(blob, flate2::Compression::default()),
                    hasher: Sha256::new(),
                },
                path: what.to_path_buf(),
            },
        })
    }

    /// End the tar (two zero blocks), the gzip stream and the blob.
    fn finish(mut self) -> Result<LayerRef, CommitError> {
        self.tar.write_all(&[0u8; 2 * BLOCK])?;
        let path = self.tar.path.clone();
        let HashWriter { inner, hasher } = self.tar.out;
        let diff_id = Digest::from_hasher(hasher);
        let blob = inner
            .finish()
            .map_err(io_err("compress the layer of", &path))?;
        let (digest, size) = blob.finish().map_err(store_err("store the layer blob"))?;
        Ok(LayerRef {
            digest,
            diff_id,
            media_type: oci::OCI_LAYER_GZIP.to_string(),
            size,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Upper dir → layer.

/// The opaque-directory marker overlayfs sets. Only the `trusted.` form counts: sbx mounts its
/// overlays as host root without `userxattr`, so `user.overlay.*` are ordinary xattrs that the
/// sandbox's root may set itself (honouring them would let it hide its parent image's files
/// from its own snapshot, or fail it); they are left out of the layer like overlay's own.
const OPAQUE_XATTRS: [&str; 1] = ["trusted.overlay.opaque"];
/// Set on an upper file that holds only metadata (its data is in a lower layer).
const METACOPY_XATTRS: [&str; 1] = ["trusted.overlay.metacopy"];
const CAPS_XATTR: &[u8] = b"security.capability";
const VFS_CAP_REVISION_MASK: u32 = 0xff00_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
/// How many times an entry that changes under the walk is looked at again.
const RACE_RETRIES: u32 = 8;

/// Turn an overlay upper dir (of a running or stopped sandbox) into a gzip OCI layer in the
/// store.
///
/// - Ownership: host ids `id_base..id_base+id_count` (the sandbox's range) are shifted to
///   `0..id_count`; **any other id becomes 65534** ([`NOBODY`]): a file a sandbox could not own
///   (host root's, another range's) must not become the image root's.
/// - Overlay whiteouts (0/0 character devices) become `.wh.NAME` entries; directories marked
///   opaque (`trusted.overlay.opaque` = `y`; a `user.overlay.*` xattr means nothing) get a `.wh..wh..opq`
///   entry right after their own; overlayfs's other xattrs are left out.
/// - Hardlinks inside the upper stay hardlinks (the first path in walk order holds the data).
/// - Xattrs kept: `user.*` and, on regular files, `security.capability` (a v3 capability whose
///   rootid is `id_base` — the sandbox's root — becomes v2; another rootid in the range is
///   shifted; one outside it is dropped).
/// - Fifos and other device nodes are kept; sockets are skipped (they mean nothing on disk).
/// - The upper's own root directory is not an entry (the runtime makes it).
///
/// The sandbox may still be running: files are opened by `*at` calls relative to their
/// directory's fd, never following a symlink; a name that vanishes mid-walk is skipped, one that
/// changes type is looked at again; a file that shrinks while read is padded with zeros.
pub fn layer_from_upper(
    store: &Store,
    upper: &Path,
    id_base: u32,
    id_count: u32,
) -> Result<LayerRef, CommitError> {
    let root = rfs::open(
        upper,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("open the upper dir", upper))?;
    let mut walk = UpperWalk {
        sink: LayerSink::new(store, upper)?,
        upper: upper.to_path_buf(),
        id_base,
        id_count,
        links: HashMap::new(),
        limits: crate::apply::ApplyOptions::default(),
        entries: 0,
        bytes: 0,
        depth: 0,
    };
    // The walk recurses once per directory level: on its own thread with a stack sized for
    // MAX_DEPTH levels (debug builds' frames included), not the caller's (2 MiB for tokio's
    // blocking threads).
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("sbx-commit".into())
            .stack_size(WALK_STACK)
            .spawn_scoped(scope, move || {
                walk.dir(root.as_fd(), b"")?;
                walk.sink.finish()
            })
            .map_err(io_err("start the commit thread for", upper))?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Stack of the thread that walks an upper dir.
const WALK_STACK: usize = 64 << 20;

struct UpperWalk {
    sink: LayerSink,
    upper: PathBuf,
    id_base: u32,
    id_count: u32,
    /// (dev, ino) of files with more than one link → the tar path of the first one written.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// The applier's caps (bytes, entries, path length): a layer past them could never be
    /// applied, and a sandbox could otherwise keep a snapshot busy without end (a sparse
    /// file of terabytes, a tree that grows ahead of the walk).
    limits: crate::apply::ApplyOptions,
    entries: u64,
    bytes: u64,
    /// Directories open on the way down (one descriptor each).
    depth: usize,
}

/// Deepest directory nesting a snapshot follows (one open descriptor per level).
const MAX_DEPTH: usize = 256;

/// What happened to one name of the upper.
enum Step {
    Done,
    /// It changed type between stat and open: look again.
    Again,
}

fn file_type(st: &rfs::Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// The names in a directory (without `.` and `..`), sorted bytewise.
fn read_names(dir: BorrowedFd<'_>, path: &Path) -> Result<Vec<Vec<u8>>, CommitError> {
    let mut d = rfs::Dir::read_from(dir).map_err(errno("list", path))?;
    let mut names = Vec::new();
    while let Some(ent) = d.read() {
        let ent = ent.map_err(errno("list", path))?;
        let name = ent.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    names.sort();
    Ok(names)
}

/// The value of an xattr of an open file, `None` when it has none by that name.
fn get_xattr(fd: BorrowedFd<'_>, name: &[u8], path: &Path) -> Result<Option<Vec<u8>>, CommitError> {
    let name = OsStr::from_bytes(name);
    loop {
        let len = match rfs::fgetxattr_query(fd, name) {
            Ok(n) => n,
            Err(Errno::NODATA | Errno::OPNOTSUPP) => return Ok(None),
            Err(e) => return Err(errno("read an xattr of", path)(e)),
        };
        let mut buf = vec![0u8; len];
        if len == 0 {
            return Ok(Some(buf));
        }
        match rfs::fgetxattr(fd, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            // Grew between the two calls.
            Err(Errno::RANGE) => continue,
            Err(Errno::NODATA) => return Ok(None),
            Err(e) => return Err(errno("read an xattr of", path)(e)),
        }
    }
}

/// The names of the xattrs of an open file.
fn list_xattrs(fd: BorrowedFd<'_>, path: &Path) -> Result<Vec<Vec<u8>>, CommitError> {
    loop {
        let len = match rfs::flistxattr_query(fd) {
            Ok(0) | Err(Errno::OPNOTSUPP) => return Ok(Vec::new()),
            Ok(n) => n,
            Err(e) => return Err(errno("list the xattrs of", path)(e)),
        };
        let mut buf = vec![0u8; len];
        match rfs::flistxattr(fd, &mut buf[..]) {
            Ok(n) => {
                return Ok(buf[..n]
                    .split(|&b| b == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect())
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(errno("list the xattrs of", path)(e)),
        }
    }
}

impl UpperWalk {
    /// Host id → image id; see [`layer_from_upper`].
    fn map_id(&self, id: u32) -> u32 {
        match id.checked_sub(self.id_base) {
            Some(n) if n < self.id_count => n,
            _ => NOBODY,
        }
    }

    fn host_path(&self, rel: &[u8]) -> PathBuf {
        self.upper.join(OsStr::from_bytes(rel))
    }

    fn meta(&self, st: &rfs::Stat, kind: u8) -> Meta {
        Meta {
            kind,
            mode: st.st_mode & 0o7777,
            uid: self.map_id(st.st_uid),
            gid: self.map_id(st.st_gid),
            mtime: st.st_mtime,
            ..Meta::default()
        }
    }

    /// The xattrs of an upper file that go into the layer.
    fn xattrs(
        &self,
        fd: BorrowedFd<'_>,
        regular: bool,
        path: &Path,
    ) -> Result<Xattrs, CommitError> {
        let mut out = Vec::new();
        for name in list_xattrs(fd, path)? {
            let keep = (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
                || (regular && name == CAPS_XATTR);
            if !keep {
                continue;
            }
            let Some(mut value) = get_xattr(fd, &name, path)? else {
                continue;
            };
            if name == CAPS_XATTR {
                match self.caps(&value) {
                    Some(v) => value = v,
                    None => continue,
                }
            }
            out.push((name, value));
        }
        out.sort();
        Ok(out)
    }

    /// A `security.capability` value as the image should hold it: v3 with the sandbox root as
    /// rootid → v2 (valid for the root of whatever namespace uses the image); another rootid of
    /// the range → shifted; outside the range → dropped. v2 is kept; anything else dropped.
    fn caps(&self, v: &[u8]) -> Option<Vec<u8>> {
        let magic = u32::from_le_bytes(v.get(..4)?.try_into().ok()?);
        match magic & VFS_CAP_REVISION_MASK {
            VFS_CAP_REVISION_2 if v.len() == 20 => Some(v.to_vec()),
            VFS_CAP_REVISION_3 if v.len() == 24 => {
                let rootid = u32::from_le_bytes(v[20..24].try_into().ok()?);
                match rootid.checked_sub(self.id_base) {
                    Some(0) => {
                        let mut v2 = v[..20].to_vec();
                        let flags = magic & !VFS_CAP_REVISION_MASK;
                        v2[..4].copy_from_slice(&(VFS_CAP_REVISION_2 | flags).to_le_bytes());
                        Some(v2)
                    }
                    Some(n) if n < self.id_count => {
                        let mut v3 = v.to_vec();
                        v3[20..24].copy_from_slice(&n.to_le_bytes());
                        Some(v3)
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Write the entries of directory `dir` (tar path `prefix`, empty or `/`-terminated).
    fn dir(&mut self, dir: BorrowedFd<'_>, prefix: &[u8]) -> Result<(), CommitError> {
        let names = read_names(dir, &self.host_path(prefix))?;
        for name in names {
            let mut tries = 0;
            loop {
                match self.entry(dir, prefix, &name)? {
                    Step::Done => break,
                    Step::Again if tries < RACE_RETRIES => tries += 1,
                    Step::Again => {
                        let mut rel = prefix.to_vec();
                        rel.extend_from_slice(&name);
                        return Err(CommitError::Changed {
                            path: self.host_path(&rel),
                            reason: "it kept changing type".into(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        prefix: &[u8],
        name: &[u8],
    ) -> Result<Step, CommitError> {
        let mut rel = prefix.to_vec();
        rel.extend_from_slice(name);
        let path = self.host_path(&rel);
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(CommitError::TooLarge {
                path,
                what: "entries",
                limit: self.limits.max_entries,
            });
        }
        if rel.len() >= self.limits.max_path_len {
            return Err(CommitError::TooLarge {
                path,
                what: "bytes of path",
                limit: self.limits.max_path_len as u64,
            });
        }
        let name_os = OsStr::from_bytes(name);
        let st = match rfs::statat(dir, name_os, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(Step::Done), // removed meanwhile
            Err(e) => return Err(errno("stat", &path)(e)),
        };
        let open = |flags: OFlags| {
            rfs::openat(
                dir,
                name_os,
                flags | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
                Mode::empty(),
            )
        };
        match file_type(&st) {
            FileType::Directory => {
                let fd = match open(OFlags::DIRECTORY) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => return Ok(Step::Done),
                    Err(Errno::LOOP | Errno::NOTDIR) => return Ok(Step::Again),
                    Err(e) => return Err(errno("open", &path)(e)),
                };
                let st = rfs::fstat(&fd).map_err(errno("stat", &path))?;
                let mut m = self.meta(&st, kind::DIR);
                m.xattrs = self.xattrs(fd.as_fd(), false, &path)?;
                let mut opaque = false;
                for x in OPAQUE_XATTRS {
                    opaque |= get_xattr(fd.as_fd(), x.as_bytes(), &path)?.as_deref() == Some(b"y");
                }
                rel.push(b'/');
                self.sink.tar.header(&rel, &m)?;
                if opaque {
                    let mut marker = rel.clone();
                    marker.extend_from_slice(b".wh..wh..opq");
                    let mm = Meta {
                        kind: kind::FILE,
                        mode: 0o644,
                        mtime: st.st_mtime,
                        ..Meta::default()
                    };
                    self.sink.tar.header(&marker, &mm)?;
                }
                if self.depth >= MAX_DEPTH {
                    return Err(CommitError::TooLarge {
                        path,
                        what: "nested directories",
                        limit: MAX_DEPTH as u64,
                    });
                }
                self.depth += 1;
                let r = self.dir(fd.as_fd(), &rel);
                self.depth -= 1;
                r?;
            }
            FileType::RegularFile => {
                // O_NONBLOCK: a fifo swapped in must not block the open.
                let fd = match open(OFlags::NONBLOCK) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => return Ok(Step::Done),
                    Err(Errno::LOOP) => return Ok(Step::Again),
                    Err(e) => return Err(errno("open", &path)(e)),
                };
                let st = rfs::fstat(&fd).map_err(errno("stat", &path))?;
                if file_type(&st) != FileType::RegularFile {
                    return Ok(Step::Again);
                }
                for x in METACOPY_XATTRS {
                    if get_xattr(fd.as_fd(), x.as_bytes(), &path)?.is_some() {
                        return Err(CommitError::Unsupported {
                            path,
                            reason: format!(
                                "it is an overlayfs metacopy file ({x}): its data is in a lower \
                                 layer (mount the overlay without metacopy)"
                            ),
                        });
                    }
                }
                if self.hardlink(&st, &rel)? {
                    return Ok(Step::Done);
                }
                let mut m = self.meta(&st, kind::FILE);
                m.size = st.st_size as u64;
                // Checked on the size before reading: a sparse file of terabytes fails at once.
                self.bytes = self.bytes.saturating_add(m.size);
                if self.bytes > self.limits.max_total_bytes {
                    return Err(CommitError::TooLarge {
                        path,
                        what: "bytes of file data",
                        limit: self.limits.max_total_bytes,
                    });
                }
                m.xattrs = self.xattrs(fd.as_fd(), true, &path)?;
                self.sink.tar.header(&rel, &m)?;
                let mut file = File::from(fd);
                self.sink.tar.data(&mut file, m.size, &path)?;
            }
            FileType::Symlink => {
                let target = match rfs::readlinkat(dir, name_os, Vec::new()) {
                    Ok(t) => t.into_bytes(),
                    Err(Errno::NOENT) => return Ok(Step::Done),
                    Err(Errno::INVAL) => return Ok(Step::Again),
                    Err(e) => return Err(errno("read the symlink", &path)(e)),
                };
                let mut m = self.meta(&st, kind::SYMLINK);
                m.mode = 0o777;
                m.link = target;
                self.sink.tar.header(&rel, &m)?;
            }
            FileType::CharacterDevice if st.st_rdev == 0 => {
                // An overlay whiteout: NAME was removed.
                let mut wh = prefix.to_vec();
                wh.extend_from_slice(b".wh.");
                wh.extend_from_slice(name);
                let m = Meta {
                    kind: kind::FILE,
                    mode: 0o644,
                    mtime: st.st_mtime,
                    ..Meta::default()
                };
                self.sink.tar.header(&wh, &m)?;
            }
            t @ (FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo) => {
                if self.hardlink(&st, &rel)? {
                    return Ok(Step::Done);
                }
                let k = match t {
                    FileType::CharacterDevice => kind::CHAR,
                    FileType::BlockDevice => kind::BLOCK,
                    _ => kind::FIFO,
                };
                let mut m = self.meta(&st, k);
                m.dev = (rfs::major(st.st_rdev), rfs::minor(st.st_rdev));
                self.sink.tar.header(&rel, &m)?;
            }
            // Sockets (and anything unknown) mean nothing once the process that bound them is
            // gone.
            _ => {}
        }
        Ok(Step::Done)
    }

    /// For a file with several links: write a hardlink entry to the first path seen and return
    /// true, or remember this path as the first and return false.
    fn hardlink(&mut self, st: &rfs::Stat, rel: &[u8]) -> Result<bool, CommitError> {
        if st.st_nlink <= 1 {
            return Ok(false);
        }
        let key = (st.st_dev, st.st_ino);
        if let Some(first) = self.links.get(&key) {
            let mut m = self.meta(st, kind::HARDLINK);
            m.link = first.clone();
            self.sink.tar.header(rel, &m)?;
            return Ok(true);
        }
        self.links.insert(key, rel.to_vec());
        Ok(false)
    }
}

// ---------------------------------------------------------------------------------------------
// Build context → layer (COPY).

/// What one item found under a COPY source is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ItemKind {
    File { size: u64 },
    Dir,
    Symlink(Vec<u8>),
}

/// One file, directory or symlink COPY copies.
#[derive(Debug, Clone)]
struct CopyItem {
    /// Index of the source it was found under.
    source: usize,
    /// Path below the context (`/`-separated, no leading `/`; empty for the context itself).
    rel: Vec<u8>,
    /// Path below the source (empty for the source itself).
    sub: Vec<Vec<u8>>,
    kind: ItemKind,
    mode: u32,
    mtime: i64,
    /// (dev, ino) when it was found: reopened later, it must be the same file.
    id: (u64, u64),
}

/// Check one source: relative (a leading `/` means the context root, as in Docker), no `..`.
/// Returns it cleaned (no `.` or empty components; empty for the context root).
fn clean_source(s: &str) -> Result<Vec<u8>, CommitError> {
    let bad = |reason: &str| CommitError::BadSource {
        source_path: s.to_string(),
        reason: reason.to_string(),
    };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.as_bytes().contains(&0) {
        return Err(bad("contains a NUL byte"));
    }
    let mut out = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(bad("`..` is not allowed: sources are inside the context")),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c.as_bytes());
            }
        }
    }
    Ok(out)
}

/// `dest` as components; it must be absolute and have no `..`.
fn clean_dest(dest: &str) -> Result<Vec<Vec<u8>>, CommitError> {
    let bad = |reason: &str| CommitError::BadDest {
        dest: dest.to_string(),
        reason: reason.to_string(),
    };
    if !dest.starts_with('/') {
        return Err(bad("must be an absolute path in the image"));
    }
    if dest.as_bytes().contains(&0) {
        return Err(bad("contains a NUL byte"));
    }
    let mut out = Vec::new();
    for c in dest.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(bad("`..` is not allowed")),
            c => out.push(c.as_bytes().to_vec()),
        }
    }
    Ok(out)
}

fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS
}

/// Open `rel` below the context fd without leaving it (`RESOLVE_BENEATH`: absolute symlinks
/// and `..` that would climb out fail) and without following a last-component symlink.
fn open_beneath(ctx: BorrowedFd<'_>, rel: &[u8], flags: OFlags) -> Result<OwnedFd, Errno> {
    let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
    loop {
        match rfs::openat2(
            ctx,
            OsStr::from_bytes(rel),
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            beneath(),
        ) {
            Err(Errno::AGAIN | Errno::INTR) => continue,
            r => return r,
        }
    }
}

fn join_rel(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut v = a.to_vec();
    if !v.is_empty() && !b.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(b);
    v
}

/// Everything COPY `sources` would copy, per source in order, each source's items sorted
/// (a directory before what is in it).
fn plan_copy(context: &Path, sources: &[String]) -> Result<(OwnedFd, Vec<CopyItem>), CommitError> {
    if sources.is_empty() {
        return Err(CommitError::NoSources);
    }
    let ctx = rfs::open(
        context,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("open the build context", context))?;
    let mut items = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let rel = clean_source(s)?;
        let fd =
            open_beneath(ctx.as_fd(), &rel, OFlags::PATH).map_err(|e| CommitError::BadSource {
                source_path: s.clone(),
                reason: match e {
                    Errno::NOENT => format!("not found in the context {}", context.display()),
                    Errno::XDEV => "leads out of the context (through `..` or a symlink)".into(),
                    Errno::LOOP => "too many symlinks".into(),
                    e => format!("cannot be opened in {}: {e}", context.display()),
                },
            })?;
        let st = rfs::fstat(&fd).map_err(errno("stat", &context.join(OsStr::from_bytes(&rel))))?;
        walk_source(context, ctx.as_fd(), i, &rel, Vec::new(), &st, &mut items)?;
    }
    Ok((ctx, items))
}

/// Add `rel` (already stat'ed as `st`) and, for a directory, everything under it.
fn walk_source(
    context: &Path,
    ctx: BorrowedFd<'_>,
    source: usize,
    rel: &[u8],
    sub: Vec<Vec<u8>>,
    st: &rfs::Stat,
    items: &mut Vec<CopyItem>,
) -> Result<(), CommitError> {
    let path = context.join(OsStr::from_bytes(rel));
    let kind = match file_type(st) {
        FileType::RegularFile => ItemKind::File {
            size: st.st_size as u64,
        },
        FileType::Directory => ItemKind::Dir,
        FileType::Symlink => {
            // The link itself (an O_PATH fd of it): its target is read, never followed.
            let parent_rel = rel.rsplit_once_byte(b'/').map_or(&b""[..], |(p, _)| p);
            let name = rel.rsplit_once_byte(b'/').map_or(rel, |(_, n)| n);
            let dir = open_beneath(ctx, parent_rel, OFlags::PATH | OFlags::DIRECTORY)
                .map_err(errno("open", &path))?;
            let t = rfs::readlinkat(&dir, OsStr::from_bytes(name), Vec::new())
                .map_err(errno("read the symlink", &path))?;
            ItemKind::Symlink(t.into_bytes())
        }
        // A socket of a running program in the context: nothing to copy.
        FileType::Socket => return Ok(()),
        other => {
            return Err(CommitError::Unsupported {
                path,
                reason: format!("COPY copies files, directories and symlinks, not a {other:?}"),
            })
        }
    };
    items.push(CopyItem {
        source,
        rel: rel.to_vec(),
        sub: sub.clone(),
        kind: kind.clone(),
        mode: st.st_mode & 0o7777,
        mtime: st.st_mtime,
        id: (st.st_dev, st.st_ino),
    });
    if kind == ItemKind::Dir {
        let fd = open_beneath(ctx, rel, OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(errno("open", &path))?;
        let now = rfs::fstat(&fd).map_err(errno("stat", &path))?;
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
            return Err(CommitError::Changed {
                path,
                reason: "replaced by another directory".into(),
            });
        }
        for name in read_names(fd.as_fd(), &path)? {
            let child_rel = join_rel(rel, &name);
            let cst = match rfs::statat(&fd, OsStr::from_bytes(&name), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(s) => s,
                Err(Errno::NOENT) => continue,
                Err(e) => {
                    return Err(errno("stat", &context.join(OsStr::from_bytes(&child_rel)))(
                        e,
                    ))
                }
            };
            let mut csub = sub.clone();
            csub.push(name);
            walk_source(context, ctx, source, &child_rel, csub, &cst, items)?;
        }
    }
    Ok(())
}

/// `rsplit_once` on bytes.
trait RsplitOnceByte {
    fn rsplit_once_byte(&self, b: u8) -> Option<(&[u8], &[u8])>;
}

impl RsplitOnceByte for [u8] {
    fn rsplit_once_byte(&self, b: u8) -> Option<(&[u8], &[u8])> {
        let i = self.iter().rposition(|&c| c == b)?;
        Some((&self[..i], &self[i + 1..]))
    }
}

/// Open a planned regular file again (beneath the context, not following a symlink) and check
/// it is the one planned.
fn reopen_file(context: &Path, ctx: BorrowedFd<'_>, item: &CopyItem) -> Result<File, CommitError> {
    let path = context.join(OsStr::from_bytes(&item.rel));
    let fd = open_beneath(ctx, &item.rel, OFlags::RDONLY | OFlags::NONBLOCK).map_err(|e| {
        CommitError::Changed {
            path: path.clone(),
            reason: format!("cannot be opened again: {e}"),
        }
    })?;
    let st = rfs::fstat(&fd).map_err(errno("stat", &path))?;
    if file_type(&st) != FileType::RegularFile || (st.st_dev, st.st_ino) != item.id {
        return Err(CommitError::Changed {
            path,
            reason: "replaced by another file".into(),
        });
    }
    Ok(File::from(fd))
}

/// COPY: files/dirs `sources` (relative to `context`, no `..`, no escaping through symlinks)
/// copied to `dest` (absolute in the image; trailing '/' or several sources = into that dir),
/// owned by 0:0, modes and mtimes kept; as a gzip OCI layer in the store.
///
/// As in Docker: a source directory's *contents* are copied into `dest` (the directory itself
/// is not); a source file goes to `dest`, or into it as `dest/NAME` when `dest` ends with `/` or
/// there are several sources; `.` is the whole context; a leading `/` on a source means the
/// context root. Symlinks are copied as symlinks (never followed, whether they point inside or
/// outside the context); sockets are skipped; other special files are refused. Hardlinked files
/// become separate copies. When two sources give the same path, the later wins. Missing parent
/// directories of `dest` are not entries of the layer (the unpacker makes them 0755 root, and an
/// existing one keeps its owner and mode), so an empty source directory adds nothing.
pub fn layer_from_context(
    store: &Store,
    context: &Path,
    sources: &[String],
    dest: &str,
) -> Result<LayerRef, CommitError> {
    let dest_comps = clean_dest(dest)?;
    let into_dir = dest.ends_with('/') || sources.len() > 1;
    let (ctx, items) = plan_copy(context, sources)?;
    // Target path (components) → the item; later sources replace earlier ones.
    let mut targets: BTreeMap<Vec<Vec<u8>>, &CopyItem> = BTreeMap::new();
    let mut source_is_dir = vec![false; sources.len()];
    for item in items.iter().filter(|i| i.sub.is_empty()) {
        source_is_dir[item.source] = item.kind == ItemKind::Dir;
    }
    for item in &items {
        let mut t = dest_comps.clone();
        if source_is_dir[item.source] {
            if item.sub.is_empty() {
                continue; // the directory itself: its contents go to dest
            }
            t.extend(item.sub.iter().cloned());
        } else if into_dir {
            let name = item
                .rel
                .rsplit_once_byte(b'/')
                .map_or(&item.rel[..], |(_, n)| n);
            t.push(name.to_vec());
        }
        if t.is_empty() {
            return Err(CommitError::BadDest {
                dest: dest.to_string(),
                reason: format!(
                    "source {:?} is not a directory: it cannot replace /",
                    sources[item.source]
                ),
            });
        }
        targets.insert(t, item);
    }
    let mut sink = LayerSink::new(store, context)?;
    for (t, item) in targets {
        let mut name = t.join(&b'/');
        let mut m = Meta {
            mode: item.mode,
            mtime: item.mtime,
            ..Meta::default()
        };
        match &item.kind {
            ItemKind::Dir => {
                m.kind = kind::DIR;
                name.push(b'/');
                sink.tar.header(&name, &m)?;
            }
            ItemKind::Symlink(target) => {
                m.kind = kind::SYMLINK;
                m.mode = 0o777;
                m.link = target.clone();
                sink.tar.header(&name, &m)?;
            }
            ItemKind::File { size } => {
                m.kind = kind::FILE;
                m.size = *size;
                let mut f = reopen_file(context, ctx.as_fd(), item)?;
                sink.tar.header(&name, &m)?;
                let path = context.join(OsStr::from_bytes(&item.rel));
                sink.tar.data(&mut f, *size, &path)?;
            }
        }
    }
    sink.finish()
}

/// Content hash of what COPY would copy (paths, modes, symlink targets, file bytes; not mtimes)
/// — the build cache key part for COPY. The sources are hashed as given, in order, then every
/// item under each with its path below the source; owners are not hashed (COPY makes them 0:0).
pub fn context_digest(context: &Path, sources: &[String]) -> Result<Digest, CommitError> {
    let (ctx, items) = plan_copy(context, sources)?;
    let mut h = Sha256::new();
    let field = |h: &mut Sha256, b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(&mut h, b"sbx-copy-v1");
    for (i, s) in sources.iter().enumerate() {
        field(&mut h, b"source");
        field(&mut h, s.as_bytes());
        for item in items.iter().filter(|it| it.source == i) {
            field(&mut h, &item.sub.join(&b'/'));
            field(&mut h, &item.mode.to_le_bytes());
            match &item.kind {
                ItemKind::Dir => field(&mut h, b"dir"),
                ItemKind::Symlink(t) => {
                    field(&mut h, b"symlink");
                    field(&mut h, t);
                }
                ItemKind::File { size } => {
                    field(&mut h, b"file");
                    h.update(size.to_le_bytes());
                    let mut f = reopen_file(context, ctx.as_fd(), item)?;
                    let path = context.join(OsStr::from_bytes(&item.rel));
                    let n = io::copy(&mut (&mut f).take(*size), &mut h)
                        .map_err(io_err("read", &path))?;
                    if n != *size {
                        return Err(CommitError::Changed {
                            path,
                            reason: format!("{n} bytes read, {size} expected"),
                        });
                    }
                }
            }
        }
    }
    Ok(Digest::from_hasher(h))
}

// ---------------------------------------------------------------------------------------------
// Images.

/// A new image: a parent (or nothing), maybe a new top layer, and the full new config.
pub struct Derive<'a> {
    /// `None`: start from nothing (the host base when `host_base`, else an empty image).
    pub parent: Option<&'a ImageRecord>,
    /// The result is layered on the built-in `host` image. A parent that is host-based makes
    /// the result host-based too; asking it over a parent that is not is an error.
    pub host_base: bool,
    /// A new top layer (in the store), or `None` (a config-only step).
    pub layer: Option<LayerRef>,
    /// The full new config (not merged with the parent's).
    pub config: ImageConfig,
    /// The history entry (`RUN pip install x`).
    pub created_by: String,
    /// The record's reference (`build`, `snapshot:sb-…`).
    pub reference: String,
}

#[derive(Serialize)]
struct ConfigFile {
    created: String,
    architecture: String,
    os: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
    config: RunConfig,
    rootfs: RootFs,
    history: Vec<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    env: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entrypoint: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmd: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    working_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    exposed_ports: BTreeMap<String, serde_json::Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<Digest>,
}

/// UTC `YYYY-MM-DDTHH:MM:SSZ` of seconds since the epoch.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What the parent's config blob says that the new config keeps.
struct ParentBits {
    architecture: String,
    os: String,
    variant: Option<String>,
    history: Vec<serde_json::Value>,
}

fn parent_bits(store: &Store, parent: &ImageRecord) -> Result<ParentBits, CommitError> {
    let err = |reason: String| CommitError::ParentConfig {
        parent: parent.id.clone(),
        reason,
    };
    let bytes = store
        .read(&parent.config_digest)
        .map_err(|e| err(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    Ok(ParentBits {
        architecture: s("architecture").unwrap_or_else(|| parent.architecture.clone()),
        os: s("os").unwrap_or_else(|| parent.os.clone()),
        variant: s("variant"),
        history: v
            .get("history")
            .and_then(|h| h.as_array())
            .cloned()
            .unwrap_or_default(),
    })
}

/// Write the OCI config + manifest blobs and save the new ImageRecord (id from config digest).
///
/// The config has the parent's architecture/os (else this host's), the given run settings, the
/// parent's diff_ids plus the new layer's, the parent's history plus one entry
/// (`empty_layer` when there is no new layer), and `created` = now (so every call makes a new
/// image id). A host-based image carries the label [`HOST_BASE_LABEL`].
pub fn derive_image(store: &Store, d: Derive<'_>) -> Result<ImageRecord, CommitError> {
    let host_base = match d.parent {
        Some(p) if d.host_base && !p.host_base => {
            return Err(CommitError::HostBaseMismatch {
                parent: p.id.clone(),
            })
        }
        Some(p) => p.host_base || d.host_base,
        None => d.host_base,
    };
    if let Some(l) = &d.layer {
        if !store.has(&l.digest) {
            return Err(CommitError::LayerMissing {
                digest: l.digest.clone(),
            });
        }
    }
    let now = crate::store::now_secs();
    let created = rfc3339(now);
    let (mut history, architecture, os, variant) = match d.parent {
        Some(p) => {
            let b = parent_bits(store, p)?;
            (b.history, b.architecture, b.os, b.variant)
        }
        None => {
            let h = oci::host_platform();
            (Vec::new(), h.architecture, h.os, h.variant)
        }
    };
    let mut entry = serde_json::json!({"created": created, "created_by": d.created_by});
    if d.layer.is_none() {
        entry["empty_layer"] = serde_json::Value::Bool(true);
    }
    history.push(entry);

    let parent_layers: &[LayerRef] = d.parent.map_or(&[], |p| &p.layers);
    let mut layers: Vec<LayerRef> = parent_layers.to_vec();
    layers.extend(d.layer.clone());
    let c = &d.config;
    let mut labels = BTreeMap::new();
    if host_base {
        labels.insert(HOST_BASE_LABEL.to_string(), "true".to_string());
    }
    let config = ConfigFile {
        created,
        architecture,
        os,
        variant,
        config: RunConfig {
            env: c.env.clone(),
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            working_dir: c.working_dir.clone(),
            user: c.user.clone(),
            exposed_ports: c
                .exposed_ports
                .iter()
                .map(|p| (p.clone(), serde_json::json!({})))
                .collect(),
            labels,
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
        },
        history,
    };
    let json_err = |what| {
        let reference = d.reference.clone();
        move |source| CommitError::Json {
            what,
            reference,
            source,
        }
    };
    let config_bytes = serde_json::to_vec(&config).map_err(json_err("config"))?;
    let config_digest = Digest::of(&config_bytes);
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(oci::OCI_MANIFEST.to_string()),
        config: Descriptor::new(oci::OCI_CONFIG, &config_digest, config_bytes.len() as u64),
        layers: layers
            .iter()
            .map(|l| {
                // An OCI manifest lists OCI media types (a pulled Docker layer is the same blob).
                let mt: &str = match oci::layer_compression(&l.media_type) {
                    Some(c) => oci::oci_layer_media_type(c),
                    None => &l.media_type,
                };
                Descriptor::new(mt, &l.digest, l.size)
            })
            .collect(),
        annotations: None,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(json_err("manifest"))?;
    let manifest_digest = Digest::of(&manifest_bytes);
    let mut record = oci::build_record(
        &d.reference,
        manifest_digest.clone(),
        None,
        &manifest,
        &config_bytes,
    )
    .map_err(|e| CommitError::Record {
        reference: d.reference.clone(),
        source: Box::new(e),
    })?;
    record.host_base = host_base;
    record.parent = d.parent.map(|p| p.id.clone());
    store
        .put_bytes(&config_digest, &config_bytes)
        .map_err(store_err("store the image config"))?;
    store
        .put_bytes(&manifest_digest, &manifest_bytes)
        .map_err(store_err("store the image manifest"))?;
    store
        .save_image(&record)
        .map_err(store_err("save the image record"))?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for n in [0usize, 1, 5, 6, 7, 90, 95, 96, 97, 994, 995, 996, 1000] {
            let mut out = Vec::new();
            pax_record(&mut out, b"path", &vec![b'a'; n]);
            let (len, _) = out.split_at(out.iter().position(|&b| b == b' ').unwrap());
            let len: usize = std::str::from_utf8(len).unwrap().parse().unwrap();
            assert_eq!(len, out.len(), "value of {n} bytes");
        }
    }

    #[test]
    fn sources_and_dests_are_checked() {
        assert_eq!(clean_source("./a//b/").unwrap(), b"a/b");
        assert_eq!(clean_source("/a").unwrap(), b"a");
        assert_eq!(clean_source(".").unwrap(), b"");
        assert!(clean_source("a/../b").is_err());
        assert!(clean_source("").is_err());
        assert_eq!(
            clean_dest("/app/./x/").unwrap(),
            vec![b"app".to_vec(), b"x".to_vec()]
        );
        assert!(clean_dest("app").is_err());
        assert!(clean_dest("/a/../b").is_err());
    }
}
