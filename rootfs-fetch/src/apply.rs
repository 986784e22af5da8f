//! Applying one OCI image layer (a tar stream, plain, gzip or zstd) onto a directory the way
//! umoci and containerd do — whiteouts, opaque directories, hardlinks, ownership, directory times
//! last — without ever creating, changing or removing anything outside that directory.
//!
//! # How it stays inside the root
//! The root is opened once as a directory fd. Every entry's *parent* is resolved from that fd
//! with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`, so absolute paths,
//! `..` and symlinks (absolute or relative) met on the way resolve as if the root were `/`. The
//! last component is then made with `*at` calls relative to that parent fd that never follow a
//! symlink in it: `openat(O_CREAT|O_EXCL|O_NOFOLLOW)`, `mkdirat`, `symlinkat`, `linkat` (both
//! sides resolved in the root, flags 0), `mknodat`, `unlinkat`, `fchownat`/`utimensat` with
//! `AT_SYMLINK_NOFOLLOW` (the one exception: `fchmodat` on a device node or fifo that `mknodat`
//! made an instant before, as there is no `AT_SYMLINK_NOFOLLOW` for it before Linux 6.6). Entry
//! paths are first cleaned lexically as if rooted at `/`, the way umoci's `CleanPath` and
//! containerd do, so `../../x` lands at `ROOT/x` (contained, not an error); a `./` entry gives
//! its metadata to the root itself. Missing parent directories are created (mode 0755, owned by
//! root plus the id offset), following symlinks inside the root like umoci's `SecureJoin` +
//! `MkdirAll`. Hardlink targets are resolved the same way, so a link to `/etc/shadow` links
//! `ROOT/etc/shadow` or fails; links to directories are refused, links to devices that
//! [`DevicePolicy::Skip`] left out are left out too.
//!
//! # Tar parsing
//! The tar framing is read here (header fields are decoded with the `tar` crate's `Header`),
//! because `tar::Archive` reads GNU long names and PAX headers into memory without a bound: a
//! crafted layer could make the daemon allocate gigabytes. Here each extension header is capped
//! at 1 MiB (as Go's `archive/tar` does), a PAX `size` overrides the header's (files of 8 GiB and
//! more), and old-GNU sparse files (`tar --sparse`) are written with their holes. PAX sparse
//! formats (`GNU.sparse.*`) and unknown entry types are refused as [`ApplyError::Unsupported`].
//!
//! # Whiteouts
//! [`WhiteoutMode::Apply`] flattens: `.wh.NAME` removes `NAME` (recursively) and
//! `.wh..wh..opq` removes what lower layers put in its directory — but, per the image spec,
//! never what this same layer created, whether before or after the marker (the paths this layer
//! touched are tracked, like umoci's `upperPaths`). [`WhiteoutMode::OverlayFs`] writes the layer
//! the way overlayfs reads a lower or upper directory: `.wh.NAME` becomes a 0/0 character device
//! and `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory (a directory that this
//! layer both creates and whiteouts, or creates over a whiteout, is made opaque too). Other
//! `.wh..wh.*` names are AUFS metadata and are skipped, like containerd does.
//!
//! # Metadata
//! Ownership comes from the tar (plus [`ApplyOptions::id_offset`]); chown comes before chmod
//! (chown clears setuid/setgid) and before xattrs (chown clears `security.capability`); times are
//! set last on each file, and directories' times after the whole layer (creating children
//! changes them). Extended attributes (PAX `SCHILY.xattr.*`) are filtered: kept are `user.*`
//! (except `user.overlay.*`, which overlayfs in `userxattr` mode would obey),
//! `security.capability` (regular files) and `system.posix_acl_access`/`_default` (ids inside
//! the ACL shifted by the id offset); dropped are `trusted.*` (overlayfs and other kernel
//! metadata), every other `security.*` (SELinux labels, IMA/EVM) and every other `system.*`.
//! Symlinks, devices and fifos get no xattrs (the kernel refuses `user.*` on them).
//!
//! # Caps and errors
//! The uncompressed stream is counted while it is read, so a decompression bomb stops after
//! [`ApplyOptions::max_total_bytes`] (an entry that declares more than what is left fails at its
//! header, before anything is written). Entry count and path length are capped too. On any error
//! the root is left partially written: **the caller must remove it** (unpack into a fresh
//! private directory, apply, and rename into place only on success).

use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags,
};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

/// Size of the read buffer between the decompressor and the files written (one `write` per
/// file up to this size).
const BUF_SIZE: usize = 1 << 20;
/// Zero runs this long (and aligned to it in the file) are left as holes when unpacking.
const ZERO_RUN: usize = 64 << 10;
/// Largest GNU long name / long link / PAX header accepted (Go's archive/tar uses the same).
const MAX_EXTENSION: u64 = 1 << 20;
/// Symlinks followed while creating missing parent directories before giving up (ELOOP).
const MAX_SYMLINK_HOPS: u32 = 40;
const BLOCK: u64 = 512;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression a layer descriptor's media type declares (OCI and Docker v2 schema 2,
    /// including the non-distributable/foreign variants). `None` for a media type that is not
    /// a layer (or a compression we do not read). Parameters after `;` are ignored.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        let media_type = media_type.split(';').next().unwrap_or("").trim();
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    /// The compression of a blob judged by its first bytes (pass at least 6): gzip and zstd by
    /// their magic numbers, anything else is taken as a plain tar (docker-archive layers usually
    /// are). `None` for formats that are recognised but not supported (xz, bzip2).
    pub fn sniff(head: &[u8]) -> Option<Self> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(Compression::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00])
            || head.starts_with(b"BZh")
        {
            None
        } else {
            Some(Compression::None)
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// What to do with character and block device entries (fifos are always created).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicePolicy {
    /// Leave them out and count them in [`ApplyStats::skipped_devices`]. A sandbox gets its
    /// devices from the runtime, not from the image.
    #[default]
    Skip,
    /// Create them with `mknodat` (needs CAP_MKNOD).
    Create,
}

/// How whiteout entries are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhiteoutMode {
    /// Flatten: delete what the whiteouts name from `root` (which holds the lower layers).
    Apply,
    /// Keep the layer on its own for an overlayfs stack: whiteouts become 0/0 character devices
    /// and opaque markers the `trusted.overlay.opaque=y` xattr (overlay mounted by root, without
    /// `userxattr`). `root` is expected to start empty.
    #[default]
    OverlayFs,
}

/// Limits and policies for [`apply_layer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Cap on the uncompressed tar stream, counted while reading (default 8 GiB).
    pub max_total_bytes: u64,
    /// Cap on the number of entries, counting the missing parent directories created for them
    /// (default 1 000 000).
    pub max_entries: u64,
    /// Cap on the byte length of an entry's path and of a link's target (default 4096).
    pub max_path_len: usize,
    /// Character and block devices (default [`DevicePolicy::Skip`]).
    pub devices: DevicePolicy,
    /// Whiteout handling (default [`WhiteoutMode::OverlayFs`]: layers kept apart, each
    /// unpacked once and stacked by overlayfs).
    pub whiteouts: WhiteoutMode,
    /// Added to every uid and gid of the layer (default `None`: ids kept as in the tar, for
    /// id-mapped mounts to shift).
    pub id_offset: Option<(u32, u32)>,
    /// Hash the uncompressed stream into [`ApplyStats::diff_id`] (default true) so the caller
    /// can check it against the image config's `rootfs.diff_ids`.
    pub compute_diff_id: bool,
    /// Cap on the memory kept about paths while applying (directory times, the paths a layer
    /// touched, skipped devices; default 256 MiB). Real layers need a few MB; many deep
    /// paths are refused as [`ApplyError::TooManyEntries`] rather than exhausting memory.
    pub max_bookkeeping_bytes: usize,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            max_total_bytes: 8 << 30,
            max_entries: 1_000_000,
            max_path_len: 4096,
            devices: DevicePolicy::Skip,
            whiteouts: WhiteoutMode::OverlayFs,
            id_offset: None,
            compute_diff_id: true,
            max_bookkeeping_bytes: 256 << 20,
        }
    }
}

/// What one [`apply_layer`] call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Tar entries read (extension headers not counted).
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub fifos: u64,
    pub devices_created: u64,
    pub skipped_devices: u64,
    /// Missing parent directories created (they count against [`ApplyOptions::max_entries`]).
    pub implicit_dirs: u64,
    /// `.wh.NAME` entries handled.
    pub whiteouts: u64,
    /// `.wh..wh..opq` entries handled.
    pub opaque_dirs: u64,
    /// Bytes of regular-file contents written.
    pub bytes: u64,
    /// Bytes of the uncompressed tar stream read (including padding after the end marker).
    pub stream_bytes: u64,
    pub xattrs_set: u64,
    /// Extended attributes left out by the filter, on entries that cannot carry them, or
    /// refused by the filesystem as unsupported.
    pub xattrs_dropped: u64,
    /// `sha256:<hex>` of the uncompressed stream when [`ApplyOptions::compute_diff_id`].
    pub diff_id: Option<String>,
}

/// Why a layer could not be applied. `entry` is the tar path (lossy UTF-8); on any error the
/// root holds a partial layer and must be removed by the caller.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot open the unpack root {root}: {source}")]
    OpenRoot {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "reading the {compression} layer stream failed at uncompressed offset {offset}: {source}"
    )]
    Decompress {
        compression: Compression,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("malformed tar stream at offset {offset}: {reason}")]
    Tar { offset: u64, reason: String },
    #[error("layer exceeds the cap of {limit} uncompressed bytes{}", at_entry(.entry))]
    TooLarge { limit: u64, entry: Option<String> },
    #[error("layer has more than {limit} entries (implicit parent directories included)")]
    TooManyEntries { limit: u64 },
    #[error(
        "layer paths need more than {limit} bytes of bookkeeping (too many or too deep paths)"
    )]
    Bookkeeping { limit: usize },
    #[error("path of {len} bytes exceeds the {limit}-byte cap: {entry}")]
    PathTooLong {
        entry: String,
        len: usize,
        limit: usize,
    },
    #[error("entry {entry}: {reason}")]
    Invalid { entry: String, reason: String },
    #[error("entry {entry}: unsupported {what}")]
    Unsupported { entry: String, what: String },
    #[error("entry {entry}: resolving {path} would leave the unpack root")]
    Escape { entry: String, path: String },
    #[error("hardlink {entry} points to directory {target}")]
    HardlinkToDir { entry: String, target: String },
    #[error("entry {entry}: {step} failed: {source}")]
    Io {
        step: &'static str,
        entry: String,
        #[source]
        source: io::Error,
    },
}

fn at_entry(entry: &Option<String>) -> String {
    match entry {
        Some(e) => format!(" at entry {e}"),
        None => String::new(),
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn io_err(step: &'static str, entry: &[u8], errno: Errno) -> ApplyError {
    ApplyError::Io {
        step,
        entry: lossy(entry),
        source: errno.into(),
    }
}

/// Applies one layer (`reader` yields the blob, compressed as `compression`) on top of what is
/// already in `root`. See the module documentation for the rules; on error the caller removes
/// `root`.
pub fn apply_layer(
    reader: impl Read,
    compression: Compression,
    root: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyStats, ApplyError> {
    let root_fd = rfs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ApplyError::OpenRoot {
        root: root.to_path_buf(),
        source: e.into(),
    })?;
    let decoder = match compression {
        Compression::None => Decoder::Plain(reader),
        Compression::Gzip => Decoder::Gzip(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => {
            Decoder::Zstd(zstd::stream::read::Decoder::new(reader).map_err(|source| {
                ApplyError::Decompress {
                    compression,
                    offset: 0,
                    source,
                }
            })?)
        }
    };
    let mut input = Input::new(decoder, compression, opts);
    let mut applier = Applier::new(root_fd, opts);
    while let Some(entry) = next_entry(&mut input, opts, applier.stats.entries)? {
        applier.stats.entries += 1;
        applier.apply(entry, &mut input)?;
    }
    // Read to the end (tar padding, compression trailer) so that the caller's digest check over
    // the blob, and the diff_id here, cover every byte.
    input.drain()?;
    applier.finish()?;
    let mut stats = applier.stats;
    stats.stream_bytes = input.read;
    stats.diff_id = input.hasher.take().map(|h| {
        let digest = h.finalize();
        let mut s = String::with_capacity(7 + 64);
        s.push_str("sha256:");
        for b in digest {
            s.push_str(&format!("{b:02x}"));
        }
        s
    });
    Ok(stats)
}

// ---------------------------------------------------------------------------------------------
// The uncompressed stream: a counted, hashed, buffered reader.

enum Decoder<R: Read> {
    Plain(R),
    Gzip(flate2::read::MultiGzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<R>>),
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        }
    }
}

struct Input<R: Read> {
    src: R,
    compression: Compression,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes consumed by the parser (its offset in the tar stream).
    offset: u64,
    /// Bytes pulled from the decompressor (offset + what is buffered).
    read: u64,
    limit: u64,
    eof: bool,
    hasher: Option<Sha256>,
    /// Data bytes of the current entry not consumed yet, then its padding to 512.
    entry_left: u64,
    entry_pad: u64,
}

impl<R: Read> Input<R> {
    fn new(src: R, compression: Compression, opts: &ApplyOptions) -> Self {
        Input {
            src,
            compression,
            buf: vec![0; BUF_SIZE],
            start: 0,
            end: 0,
            offset: 0,
            read: 0,
            limit: opts.max_total_bytes,
            eof: false,
            hasher: opts.compute_diff_id.then(Sha256::new),
            entry_left: 0,
            entry_pad: 0,
        }
    }

    fn chunk(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
        self.offset += n as u64;
    }

    /// Buffers at least `want` bytes (at most the buffer size) unless the stream ends first;
    /// returns how many are buffered.
    fn fill(&mut self, want: usize) -> Result<usize, ApplyError> {
        let want = want.min(self.buf.len());
        if self.end - self.start >= want || self.eof {
            return Ok(self.end - self.start);
        }
        if self.buf.len() - self.start < want {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end - self.start < want {
            let n = match self.src.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ApplyError::Decompress {
                        compression: self.compression,
                        offset: self.read,
                        source,
                    })
                }
            };
            if let Some(h) = &mut self.hasher {
                h.update(&self.buf[self.end..self.end + n]);
            }
            self.end += n;
            self.read += n as u64;
            if self.read > self.limit {
                return Err(ApplyError::TooLarge {
                    limit: self.limit,
                    entry: None,
                });
            }
        }
        Ok(self.end - self.start)
    }

    /// Reads one 512-byte block; `None` at a clean end of stream.
    fn block(&mut self) -> Result<Option<[u8; 512]>, ApplyError> {
        let n = self.fill(512)?;
        if n == 0 {
            return Ok(None);
        }
        if n < 512 {
            return Err(self.truncated());
        }
        let mut b = [0u8; 512];
        b.copy_from_slice(&self.chunk()[..512]);
        self.consume(512);
        Ok(Some(b))
    }

    fn truncated(&self) -> ApplyError {
        ApplyError::Tar {
            offset: self.offset,
            reason: "unexpected end of the stream".into(),
        }
    }

    fn skip(&mut self, mut n: u64) -> Result<(), ApplyError> {
        while n > 0 {
            let avail = self.fill(n.min(BUF_SIZE as u64) as usize)?;
            if avail == 0 {
                return Err(self.truncated());
            }
            let k = (avail as u64).min(n) as usize;
            self.consume(k);
            n -= k as u64;
        }
        Ok(())
    }

    /// Reads exactly `n` bytes of an extension header's data into a vector.
    fn read_vec(&mut self, n: u64) -> Result<Vec<u8>, ApplyError> {
        let mut out = Vec::with_capacity(n as usize);
        while (out.len() as u64) < n {
            let want = (n - out.len() as u64).min(BUF_SIZE as u64) as usize;
            let avail = self.fill(want)?;
            if avail == 0 {
                return Err(self.truncated());
            }
            let k = avail.min(want);
            out.extend_from_slice(&self.chunk()[..k]);
            self.consume(k);
        }
        Ok(out)
    }

    /// Skips what is left of the current entry's data and its padding.
    fn finish_entry(&mut self) -> Result<(), ApplyError> {
        let n = self.entry_left + self.entry_pad;
        self.entry_left = 0;
        self.entry_pad = 0;
        self.skip(n)
    }

    /// Copies the next `n` bytes of the current entry's data to `file` at `pos` (or at the
    /// current position when `pos` is `None`).
    fn copy_to(
        &mut self,
        file: &File,
        mut n: u64,
        mut pos: Option<u64>,
        entry: &[u8],
    ) -> Result<(), ApplyError> {
        debug_assert!(n <= self.entry_left);
        while n > 0 {
            let k = self.next_chunk(n, entry)?;
            let data = &self.buf[self.start..self.start + k];
            let res = match pos {
                Some(p) => file.write_all_at(data, p),
                None => (&*file).write_all(data),
            };
            res.map_err(|source| ApplyError::Io {
                step: "write file contents",
                entry: lossy(entry),
                source,
            })?;
            self.consume(k);
            self.entry_left -= k as u64;
            n -= k as u64;
            if let Some(p) = &mut pos {
                *p += k as u64;
            }
        }
        Ok(())
    }

    /// Buffers the next piece (at most `n` bytes, at most a buffer) of the entry's data at
    /// `self.buf[self.start..]`; how many bytes it is. A stream that ends first is truncated.
    fn next_chunk(&mut self, n: u64, entry: &[u8]) -> Result<usize, ApplyError> {
        let want = n.min(BUF_SIZE as u64) as usize;
        let avail = self.fill(want).map_err(|e| with_entry(e, entry))?;
        if avail == 0 {
            return Err(self.truncated());
        }
        Ok(avail.min(want))
    }

    /// Copies the entry's `n` data bytes to the start of the empty file `file`, leaving holes
    /// where whole [`ZERO_RUN`]-byte pieces are zero (a file that was sparse where it came
    /// from stays sparse on disk: `truncate -s 8G` in a sandbox does not cost 8 GB per
    /// unpacked layer). The caller sets the length afterwards.
    fn copy_sparse(&mut self, file: &File, mut n: u64, entry: &[u8]) -> Result<(), ApplyError> {
        static ZEROS: [u8; ZERO_RUN] = [0; ZERO_RUN];
        let mut pos = 0u64;
        while n > 0 {
            let k = self.next_chunk(n, entry)?;
            let data = &self.buf[self.start..self.start + k];
            let mut at = 0;
            while at < k {
                let piece = &data[at..k.min(at + ZERO_RUN)];
                if piece.len() < ZERO_RUN || piece != &ZEROS[..] {
                    file.write_all_at(piece, pos + at as u64)
                        .map_err(|source| ApplyError::Io {
                            step: "write file contents",
                            entry: lossy(entry),
                            source,
                        })?;
                }
                at += piece.len();
            }
            self.consume(k);
            self.entry_left -= k as u64;
            n -= k as u64;
            pos += k as u64;
        }
        Ok(())
    }

    /// Reads the rest of the stream, counting and hashing it.
    fn drain(&mut self) -> Result<(), ApplyError> {
        loop {
            let avail = self.fill(BUF_SIZE)?;
            if avail == 0 {
                return Ok(());
            }
            self.consume(avail);
        }
    }
}

fn with_entry(e: ApplyError, entry: &[u8]) -> ApplyError {
    match e {
        ApplyError::TooLarge { limit, entry: None } => ApplyError::TooLarge {
            limit,
            entry: Some(lossy(entry)),
        },
        e => e,
    }
}

// ---------------------------------------------------------------------------------------------
// Tar framing.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

struct Entry {
    kind: Kind,
    path: Vec<u8>,
    link: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: Timespec,
    dev: (u32, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Old-GNU sparse map: (offset, length) chunks and the file's real size.
    sparse: Option<(Vec<(u64, u64)>, u64)>,
    /// Data bytes that follow the header in the stream.
    size: u64,
}

#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<Timespec>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse: bool,
}

fn tar_err(offset: u64, reason: impl Into<String>) -> ApplyError {
    ApplyError::Tar {
        offset,
        reason: reason.into(),
    }
}

/// Parses PAX extended header records (`"%d %s=%s\n"`).
fn parse_pax(data: &[u8], offset: u64) -> Result<Pax, ApplyError> {
    let mut pax = Pax::default();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| tar_err(offset, "PAX record without a length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| tar_err(offset, "PAX record with a bad length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(tar_err(offset, "PAX record with a bad length"));
        }
        let record = &rest[sp + 1..len - 1];
        rest = &rest[len..];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| tar_err(offset, "PAX record without '='"))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        let number = |v: &[u8]| -> Result<u64, ApplyError> {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| tar_err(offset, format!("PAX {} is not a number", lossy(key))))
        };
        match key {
            b"path" => pax.path = Some(value.to_vec()),
            b"linkpath" => pax.linkpath = Some(value.to_vec()),
            b"size" => pax.size = Some(number(value)?),
            b"uid" => pax.uid = Some(number(value)?),
            b"gid" => pax.gid = Some(number(value)?),
            b"mtime" => {
                pax.mtime = Some(
                    parse_pax_time(value)
                        .ok_or_else(|| tar_err(offset, "PAX mtime is not a time"))?,
                )
            }
            _ if key.starts_with(b"SCHILY.xattr.") => {
                pax.xattrs
                    .push((key[b"SCHILY.xattr.".len()..].to_vec(), value.to_vec()));
            }
            _ if key.starts_with(b"GNU.sparse.") => pax.sparse = true,
            _ => {} // atime, ctime, uname, gname, comment, charset, vendor keys: not used
        }
    }
    Ok(pax)
}

/// `SECONDS[.FRACTION]`, possibly negative.
fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(s) => (true, s),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos: i64 = 0;
    for i in 0..9 {
        nanos = nanos * 10 + frac.as_bytes().get(i).map_or(0, |d| i64::from(d - b'0'));
    }
    Some(if neg && nanos > 0 {
        Timespec {
            tv_sec: -secs - 1,
            tv_nsec: 1_000_000_000 - nanos,
        }
    } else {
        Timespec {
            tv_sec: if neg { -secs } else { secs },
            tv_nsec: nanos,
        }
    })
}

fn checksum_ok(block: &[u8; 512]) -> bool {
    let field = &block[148..156];
    let stored = std::str::from_utf8(field)
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let Some(stored) = stored else { return false };
    let (mut unsigned, mut signed) = (0u32, 0i32);
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u32::from(b);
        signed += i32::from(b as i8);
    }
    // Some old tars summed signed chars; Go's archive/tar accepts both too.
    stored == unsigned || i64::from(stored) == i64::from(signed)
}

/// Reads the next entry (after any extension headers), skipping what is left of the previous
/// one. `None` at the end-of-archive marker or at the end of the stream.
fn next_entry<R: Read>(
    input: &mut Input<R>,
    opts: &ApplyOptions,
    entries_so_far: u64,
) -> Result<Option<Entry>, ApplyError> {
    input.finish_entry()?;
    let mut longname: Option<Vec<u8>> = None;
    let mut longlink: Option<Vec<u8>> = None;
    let mut pax: Option<Pax> = None;
    loop {
        let offset = input.offset;
        let Some(block) = input.block()? else {
            if longname.is_some() || longlink.is_some() || pax.is_some() {
                return Err(tar_err(
                    offset,
                    "extension header without an entry after it",
                ));
            }
            return Ok(None);
        };
        if block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if !checksum_ok(&block) {
            return Err(tar_err(offset, "header checksum mismatch"));
        }
        let hdr = tar::Header::from_byte_slice(&block);
        let old = hdr.as_old();
        // An empty numeric field (all NULs or spaces) reads as 0, as in Go's archive/tar.
        let field = |raw: &[u8], r: io::Result<u64>, what: &str| {
            if raw.iter().all(|&b| b == 0 || b == b' ') {
                return Ok(0);
            }
            r.map_err(|_| tar_err(offset, format!("header field {what} is not a number")))
        };
        let header_size = field(&old.size, hdr.entry_size(), "size")?;
        let flag = block[156];
        match flag {
            b'L' | b'K' | b'x' | b'g' => {
                if header_size > MAX_EXTENSION {
                    return Err(tar_err(
                        offset,
                        format!("extension header of {header_size} bytes (cap {MAX_EXTENSION})"),
                    ));
                }
                let data = input.read_vec(header_size)?;
                input.skip(pad(header_size))?;
                let slot_taken = match flag {
                    b'L' => longname.replace(trim_nul(data)).is_some(),
                    b'K' => longlink.replace(trim_nul(data)).is_some(),
                    b'x' => pax.replace(parse_pax(&data, offset)?).is_some(),
                    _ => false, // global PAX headers carry nothing a layer needs
                };
                if slot_taken {
                    return Err(tar_err(
                        offset,
                        "two extension headers of one kind for one entry",
                    ));
                }
                continue;
            }
            _ => {}
        }
        let pax = pax.unwrap_or_default();
        let mut path = pax
            .path
            .or(longname)
            .unwrap_or_else(|| hdr.path_bytes().into_owned());
        let link = pax
            .linkpath
            .or(longlink)
            .or_else(|| hdr.link_name_bytes().map(|l| l.into_owned()))
            .unwrap_or_default();
        let entry_name = || lossy(&path);
        if entries_so_far >= opts.max_entries {
            return Err(ApplyError::TooManyEntries {
                limit: opts.max_entries,
            });
        }
        for p in [&path, &link] {
            if p.len() > opts.max_path_len {
                let mut shown = lossy(&p[..opts.max_path_len.min(p.len()).min(200)]);
                shown.push_str("...");
                return Err(ApplyError::PathTooLong {
                    entry: shown,
                    len: p.len(),
                    limit: opts.max_path_len,
                });
            }
            if p.contains(&0) {
                return Err(ApplyError::Invalid {
                    entry: entry_name(),
                    reason: "path or link target contains a NUL byte".into(),
                });
            }
        }
        if pax.sparse {
            return Err(ApplyError::Unsupported {
                entry: entry_name(),
                what: "PAX sparse file (GNU.sparse.*)".into(),
            });
        }
        let kind = match flag {
            b'0' | b'7' => Kind::File,
            // Old V7 archives mark directories with a trailing slash only.
            b'\0' if path.ends_with(b"/") => Kind::Dir,
            b'\0' | b'S' => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            other => {
                return Err(ApplyError::Unsupported {
                    entry: entry_name(),
                    what: format!("entry type {:?}", char::from(other)),
                })
            }
        };
        let size = pax.size.unwrap_or(header_size);
        let mut sparse = None;
        if flag == b'S' {
            sparse = Some(read_sparse_map(input, hdr, size, offset)?);
        }
        let dev = if matches!(kind, Kind::Char | Kind::Block) {
            // dev_major and dev_minor sit at the same offsets in ustar and GNU headers.
            let ustar = hdr.as_ustar().map(|u| (&u.dev_major, &u.dev_minor));
            let gnu = hdr.as_gnu().map(|g| (&g.dev_major, &g.dev_minor));
            let Some((raw_major, raw_minor)) = ustar.or(gnu) else {
                return Err(tar_err(offset, "device entry in a pre-ustar header"));
            };
            let num = |raw: &[u8], r: io::Result<Option<u32>>| {
                field(raw, r.map(|v| u64::from(v.unwrap_or(0))), "device number").map(|v| v as u32)
            };
            (
                num(raw_major, hdr.device_major())?,
                num(raw_minor, hdr.device_minor())?,
            )
        } else {
            (0, 0)
        };
        let mtime = match pax.mtime {
            Some(t) => t,
            None => Timespec {
                tv_sec: i64::try_from(field(&old.mtime, hdr.mtime(), "mtime")?).unwrap_or(i64::MAX),
                tv_nsec: 0,
            },
        };
        let entry = Entry {
            kind,
            mode: field(&old.mode, hdr.mode().map(u64::from), "mode")? as u32 & 0o7777,
            uid: match pax.uid {
                Some(u) => u,
                None => field(&old.uid, hdr.uid(), "uid")?,
            },
            gid: match pax.gid {
                Some(g) => g,
                None => field(&old.gid, hdr.gid(), "gid")?,
            },
            mtime,
            dev,
            xattrs: pax.xattrs,
            sparse,
            size,
            link,
            path: std::mem::take(&mut path),
        };
        // Refuse early what cannot fit, before writing a byte of it.
        let real = entry.sparse.as_ref().map_or(size, |s| s.1.max(size));
        if real > opts.max_total_bytes.saturating_sub(input.offset) {
            return Err(ApplyError::TooLarge {
                limit: opts.max_total_bytes,
                entry: Some(lossy(&entry.path)),
            });
        }
        input.entry_left = size;
        input.entry_pad = pad(size);
        return Ok(Some(entry));
    }
}

fn pad(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// The chunk list of an old-GNU sparse entry: 4 slots in the header, then 21 per extension
/// block while `isextended` is set. The chunks must be in order, inside the real size, and add
/// up to the data stored.
fn read_sparse_map<R: Read>(
    input: &mut Input<R>,
    hdr: &tar::Header,
    size: u64,
    offset: u64,
) -> Result<(Vec<(u64, u64)>, u64), ApplyError> {
    let gnu = hdr
        .as_gnu()
        .ok_or_else(|| tar_err(offset, "sparse entry without a GNU header"))?;
    let bad = |what: &str| tar_err(offset, format!("sparse map: {what}"));
    let real = gnu
        .real_size()
        .map_err(|_| bad("real size is not a number"))?;
    let mut chunks = Vec::new();
    let mut push = |s: &tar::GnuSparseHeader| -> Result<(), ApplyError> {
        if s.is_empty() {
            return Ok(());
        }
        let off = s.offset().map_err(|_| bad("offset is not a number"))?;
        let len = s.length().map_err(|_| bad("length is not a number"))?;
        chunks.push((off, len));
        Ok(())
    };
    for s in &gnu.sparse {
        push(s)?;
    }
    let mut extended = gnu.is_extended();
    let mut blocks = 0u32;
    while extended {
        blocks += 1;
        if blocks > 2048 {
            return Err(bad("too many extension blocks"));
        }
        let block = input.block()?.ok_or_else(|| input.truncated())?;
        let mut ext = tar::GnuExtSparseHeader::new();
        ext.as_mut_bytes().copy_from_slice(&block);
        for s in ext.sparse() {
            push(s)?;
        }
        extended = ext.is_extended();
    }
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in &chunks {
        let stop = off.checked_add(len).ok_or_else(|| bad("chunk overflows"))?;
        if off < end || stop > real {
            return Err(bad("chunks out of order or past the real size"));
        }
        end = stop;
        total += len;
    }
    if total != size {
        return Err(bad("chunks do not add up to the stored size"));
    }
    Ok((chunks, real))
}

// ---------------------------------------------------------------------------------------------
// Paths.

/// Lexically cleans `path` as if rooted at `/`: empty and `.` components dropped, `..` pops
/// (never above the root).
fn clean(path: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(comps.iter().map(|c| c.len() + 1).sum());
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            v.push(b'/');
        }
        v.extend_from_slice(c);
    }
    v
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV
}

/// Opens directory `path` (relative, cleaned or not) inside `root`, resolving it as if `root`
/// were `/`.
fn open_in_root(root: BorrowedFd<'_>, path: &[u8], nofollow: bool) -> Result<OwnedFd, Errno> {
    let mut flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    if nofollow {
        flags |= OFlags::NOFOLLOW;
    }
    let path: &[u8] = if path.is_empty() { b"." } else { path };
    let mut tries = 0;
    loop {
        match rfs::openat2(root, path, flags, Mode::empty(), resolve_flags()) {
            // RESOLVE_IN_ROOT returns EAGAIN when a concurrent rename could have let `..`
            // escape; nothing else renames in our root, so retrying a few times is enough.
            Err(Errno::AGAIN) if tries < 16 => tries += 1,
            Err(Errno::INTR) => {}
            r => return r,
        }
    }
}

fn is_dir(st: &rfs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

fn is_whiteout_device(st: &rfs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Removes `name` in `dir`, recursively if it is a directory. Missing is fine.
fn remove_all(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    match rfs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e),
    }
    let mut sub = rfs::Dir::new(open_child_dir(dir, name)?)?;
    let children = read_names(&mut sub)?;
    let sub_fd = sub.fd()?;
    for child in children {
        remove_all(sub_fd, &child)?;
    }
    drop(sub);
    match rfs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens directory `name` in `dir`, refusing a symlink.
fn open_child_dir(dir: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd, Errno> {
    rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Names in a directory stream (without `.` and `..`).
fn read_names(d: &mut rfs::Dir) -> Result<Vec<Vec<u8>>, Errno> {
    let mut names = Vec::new();
    while let Some(ent) = d.read() {
        let ent = ent?;
        let name = ent.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// [`WhiteoutMode::Apply`]: removes `name` in `dir` (whose cleaned path is `path`) as far as
/// lower layers made it. Paths this layer touched stay; directories among them are searched
/// for lower children.
fn remove_lower(
    touched: &HashSet<Box<[u8]>>,
    dir: BorrowedFd<'_>,
    path: &mut Vec<u8>,
    name: &[u8],
) -> Result<(), Errno> {
    let len = path.len();
    if !path.is_empty() {
        path.push(b'/');
    }
    path.extend_from_slice(name);
    let res = if !touched.contains(path.as_slice()) {
        remove_all(dir, name)
    } else {
        match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e),
            Ok(st) if !is_dir(&st) => Ok(()),
            Ok(_) => (|| {
                let mut sub = rfs::Dir::new(open_child_dir(dir, name)?)?;
                let children = read_names(&mut sub)?;
                for child in children {
                    remove_lower(touched, sub.fd()?, path, &child)?;
                }
                Ok(())
            })(),
        }
    };
    path.truncate(len);
    res
}

fn set_opaque(fd: BorrowedFd<'_>, entry: &[u8]) -> Result<(), ApplyError> {
    rfs::fsetxattr(fd, OVERLAY_OPAQUE_XATTR, b"y", XattrFlags::empty())
        .map_err(|err| io_err("set trusted.overlay.opaque", entry, err))
}

// ---------------------------------------------------------------------------------------------
// Applying entries.

/// Where an entry's parent directory lives.
enum Parent {
    Root,
    Fd(OwnedFd),
}

fn pfd<'a>(root: &'a OwnedFd, p: &'a Parent) -> BorrowedFd<'a> {
    match p {
        Parent::Root => root.as_fd(),
        Parent::Fd(fd) => fd.as_fd(),
    }
}

struct DirTime {
    path: Vec<u8>,
    ino: u64,
    time: Timespec,
}

struct Applier<'o> {
    root: OwnedFd,
    opts: &'o ApplyOptions,
    stats: ApplyStats,
    /// The last parent directory resolved, by its cleaned path. It only ever holds fds opened
    /// through `openat2(RESOLVE_IN_ROOT)` in the root (or `openat(O_NOFOLLOW)` under one), and
    /// is valid only while `epoch` (bumped by every removal) is what it was when stored.
    cache_key: Vec<u8>,
    cache_fd: Option<OwnedFd>,
    cache_epoch: u64,
    epoch: Cell<u64>,
    /// [`WhiteoutMode::Apply`]: every path this layer created (and their ancestors), which
    /// whiteouts and opaque markers of the same layer must leave alone.
    touched: HashSet<Box<[u8]>>,
    /// Devices left out by [`DevicePolicy::Skip`]: hardlinks to them are left out too.
    skipped: HashSet<Box<[u8]>>,
    /// Directory times, applied after the last entry.
    dir_times: Vec<DirTime>,
    /// Bytes held in `touched`, `skipped` and `dir_times`.
    retained: usize,
    xattr_buf: Vec<u8>,
}

impl<'o> Applier<'o> {
    fn new(root: OwnedFd, opts: &'o ApplyOptions) -> Self {
        Applier {
            root,
            opts,
            stats: ApplyStats::default(),
            cache_key: Vec::new(),
            cache_fd: None,
            cache_epoch: 0,
            epoch: Cell::new(0),
            touched: HashSet::new(),
            skipped: HashSet::new(),
            dir_times: Vec::new(),
            retained: 0,
            xattr_buf: Vec::new(),
        }
    }

    fn ids(&self, e: &Entry) -> Result<(rfs::Uid, rfs::Gid), ApplyError> {
        let (du, dg) = self.opts.id_offset.unwrap_or((0, 0));
        let shift = |id: u64, off: u32| {
            id.checked_add(u64::from(off))
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| v != u32::MAX)
        };
        match (shift(e.uid, du), shift(e.gid, dg)) {
            (Some(u), Some(g)) => Ok((
                rfs::Uid::from_raw_unchecked(u),
                rfs::Gid::from_raw_unchecked(g),
            )),
            _ => Err(ApplyError::Invalid {
                entry: lossy(&e.path),
                reason: format!(
                    "owner {}:{} (plus offset {du}:{dg}) is not a valid id",
                    e.uid, e.gid
                ),
            }),
        }
    }

    /// Something was removed: every cached parent fd is suspect.
    fn removed(&self) {
        self.epoch.set(self.epoch.get() + 1);
    }

    /// Accounts for `n` more bytes of path bookkeeping.
    fn retain(&mut self, n: usize) -> Result<(), ApplyError> {
        // Per-item overhead of the set or vector slot and the allocation.
        self.retained += n + 48;
        if self.retained > self.opts.max_bookkeeping_bytes {
            return Err(ApplyError::Bookkeeping {
                limit: self.opts.max_bookkeeping_bytes,
            });
        }
        Ok(())
    }

    fn mark_touched(&mut self, full: &[u8]) -> Result<(), ApplyError> {
        if self.opts.whiteouts != WhiteoutMode::Apply {
            return Ok(());
        }
        let mut end = full.len();
        loop {
            if !self.touched.insert(full[..end].into()) {
                return Ok(());
            }
            self.retain(end)?;
            match full[..end].iter().rposition(|&b| b == b'/') {
                Some(i) => end = i,
                None => return Ok(()),
            }
        }
    }

    fn cached(&mut self, key: &[u8]) -> Option<Parent> {
        if key.is_empty() {
            return Some(Parent::Root);
        }
        if self.cache_key == key && self.cache_epoch == self.epoch.get() {
            return self.cache_fd.take().map(Parent::Fd);
        }
        None
    }

    /// The parent directory `key` (cleaned, relative to the root), from the cache or resolved
    /// in the root; created with its missing ancestors if need be.
    fn parent(&mut self, key: &[u8], entry: &[u8]) -> Result<Parent, ApplyError> {
        if let Some(p) = self.cached(key) {
            return Ok(p);
        }
        match open_in_root(self.root.as_fd(), key, false) {
            Ok(fd) => Ok(Parent::Fd(fd)),
            Err(Errno::NOENT) => self.create_dirs(key, entry),
            Err(e) => Err(self.resolve_error(e, key, entry)),
        }
    }

    /// Like [`Applier::parent`] but never creates: `None` when it does not exist.
    fn existing_parent(&mut self, key: &[u8], entry: &[u8]) -> Result<Option<Parent>, ApplyError> {
        if let Some(p) = self.cached(key) {
            return Ok(Some(p));
        }
        match open_in_root(self.root.as_fd(), key, false) {
            Ok(fd) => Ok(Some(Parent::Fd(fd))),
            Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
            Err(e) => Err(self.resolve_error(e, key, entry)),
        }
    }

    /// Keeps `parent` as the cached fd for `key` unless something was removed since `epoch`.
    fn put_parent(&mut self, key: &[u8], parent: Parent, epoch: u64) {
        if let Parent::Fd(fd) = parent {
            if epoch == self.epoch.get() {
                self.cache_key.clear();
                self.cache_key.extend_from_slice(key);
                self.cache_fd = Some(fd);
                self.cache_epoch = epoch;
            }
        }
    }

    fn resolve_error(&self, e: Errno, path: &[u8], entry: &[u8]) -> ApplyError {
        if e == Errno::XDEV {
            ApplyError::Escape {
                entry: lossy(entry),
                path: lossy(path),
            }
        } else {
            io_err("resolve parent directory", entry, e)
        }
    }

    /// Creates the missing directories of `path` inside the root (mode 0755, owned by root
    /// plus the id offset). A dangling symlink on the way is followed inside the root, the way
    /// umoci's SecureJoin + MkdirAll do, up to 40 hops.
    fn create_dirs(&mut self, path: &[u8], entry: &[u8]) -> Result<Parent, ApplyError> {
        let split = |p: &[u8]| -> Vec<Vec<u8>> {
            p.split(|&b| b == b'/')
                .filter(|c| !c.is_empty() && *c != b".")
                .map(<[u8]>::to_vec)
                .collect()
        };
        let mut comps = split(path);
        let mut hops = 0;
        'restart: loop {
            let mut prev = Parent::Root;
            let mut prefix: Vec<u8> = Vec::new();
            for i in 0..comps.len() {
                if i > 0 {
                    prefix.push(b'/');
                }
                prefix.extend_from_slice(&comps[i]);
                let dir = pfd(&self.root, &prev);
                let name = comps[i].as_slice();
                // A plain subdirectory of the previous one opens directly (linear in the
                // depth); a symlink or `..` (ELOOP, EXDEV) is resolved from the root.
                let opened = match rfs::openat2(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::NO_SYMLINKS
                        | ResolveFlags::BENEATH
                        | ResolveFlags::NO_MAGICLINKS
                        | ResolveFlags::NO_XDEV,
                ) {
                    Err(Errno::LOOP | Errno::XDEV | Errno::AGAIN) => {
                        open_in_root(self.root.as_fd(), &prefix, false)
                    }
                    r => r,
                };
                match opened {
                    Ok(fd) => {
                        prev = Parent::Fd(fd);
                        continue;
                    }
                    Err(Errno::NOENT) => {}
                    Err(e) => return Err(self.resolve_error(e, &prefix, entry)),
                }
                match rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) => {
                        // Implicit directories count as entries: a layer cannot make the
                        // applier create more objects than the cap by nesting paths.
                        self.stats.implicit_dirs += 1;
                        if self.stats.entries + self.stats.implicit_dirs > self.opts.max_entries {
                            return Err(ApplyError::TooManyEntries {
                                limit: self.opts.max_entries,
                            });
                        }
                        let fd = open_child_dir(dir, name)
                            .map_err(|e| io_err("open created parent directory", entry, e))?;
                        let (du, dg) = self.opts.id_offset.unwrap_or((0, 0));
                        rfs::fchown(
                            &fd,
                            Some(rfs::Uid::from_raw_unchecked(du)),
                            Some(rfs::Gid::from_raw_unchecked(dg)),
                        )
                        .map_err(|e| io_err("chown created parent directory", entry, e))?;
                        rfs::fchmod(&fd, Mode::from_raw_mode(0o755))
                            .map_err(|e| io_err("chmod created parent directory", entry, e))?;
                        prev = Parent::Fd(fd);
                    }
                    Err(Errno::EXIST) => {
                        // It exists but does not resolve: a dangling symlink. Follow it.
                        hops += 1;
                        if hops > MAX_SYMLINK_HOPS {
                            return Err(io_err("create parent directories", entry, Errno::LOOP));
                        }
                        let target = rfs::readlinkat(dir, name, Vec::new())
                            .map_err(|e| io_err("read symlink in parent path", entry, e))?
                            .into_bytes();
                        let mut next: Vec<Vec<u8>> = Vec::new();
                        if !target.starts_with(b"/") {
                            next.extend(comps[..i].iter().cloned());
                        }
                        // `..` stays in the list: openat2 resolves it physically, clamped at
                        // the root.
                        next.extend(split(&target));
                        next.extend(comps[i + 1..].iter().cloned());
                        comps = next;
                        continue 'restart;
                    }
                    Err(e) => return Err(io_err("create parent directory", entry, e)),
                }
            }
            return Ok(prev);
        }
    }

    fn apply<R: Read>(&mut self, e: Entry, input: &mut Input<R>) -> Result<(), ApplyError> {
        let comps = clean(&e.path);
        let Some((&name, parent_comps)) = comps.split_last() else {
            return self.apply_root(&e);
        };
        if comps[0].starts_with(WHITEOUT_META_PREFIX) && comps[0] != WHITEOUT_OPAQUE {
            return Ok(()); // AUFS metadata directories (/.wh..wh.plnk, /.wh..wh.aufs, ...)
        }
        let parent_key = join(parent_comps);

        if name.starts_with(WHITEOUT_PREFIX) {
            if name == WHITEOUT_OPAQUE {
                return self.opaque(&parent_key, &e.path);
            }
            if name.starts_with(WHITEOUT_META_PREFIX) {
                return Ok(()); // AUFS metadata (.wh..wh.plnk and friends)
            }
            let target = &name[WHITEOUT_PREFIX.len()..];
            if target.is_empty() || target == b"." || target == b".." {
                return Err(ApplyError::Invalid {
                    entry: lossy(&e.path),
                    reason: "whiteout without a valid name".into(),
                });
            }
            return self.whiteout(&parent_key, target, &e.path);
        }

        if matches!(e.kind, Kind::Char | Kind::Block) && self.opts.devices == DevicePolicy::Skip {
            self.stats.skipped_devices += 1;
            let path = join(&comps);
            self.retain(path.len())?;
            self.skipped.insert(path.into());
            return Ok(());
        }

        let epoch = self.epoch.get();
        let parent = self.parent(&parent_key, &e.path)?;
        let full = join(&comps);
        self.mark_touched(&full)?;

        match e.kind {
            Kind::File => self.file(&parent, name, &e, input)?,
            Kind::Dir => {
                let fd = self.dir(&parent, name, &full, &e)?;
                // The new directory is the likely parent of the next entries.
                self.put_parent(&full, Parent::Fd(fd), epoch);
                return Ok(());
            }
            Kind::Symlink => self.symlink(&parent, name, &e)?,
            Kind::Hardlink => self.hardlink(&parent, name, &comps, &e)?,
            Kind::Char | Kind::Block | Kind::Fifo => self.node(&parent, name, &e)?,
        }
        self.put_parent(&parent_key, parent, epoch);
        Ok(())
    }

    /// An entry for the root itself (`./`): only a directory, whose metadata the root takes.
    fn apply_root(&mut self, e: &Entry) -> Result<(), ApplyError> {
        if e.kind != Kind::Dir {
            return Err(ApplyError::Invalid {
                entry: lossy(&e.path),
                reason: "a non-directory entry for the root of the layer".into(),
            });
        }
        let fd = self.root.try_clone().map_err(|source| ApplyError::Io {
            step: "duplicate the root fd",
            entry: lossy(&e.path),
            source,
        })?;
        self.dir_metadata(fd.as_fd(), e, true)?;
        self.record_dir_time(Vec::new(), fd.as_fd(), e)
    }

    /// Removes what is at `name` (a directory recursively) so a new entry can take its place.
    fn replace(&self, dir: BorrowedFd<'_>, name: &[u8], entry: &[u8]) -> Result<(), ApplyError> {
        let res = remove_all(dir, name);
        self.removed();
        res.map_err(|e| io_err("remove the existing path", entry, e))
    }

    fn file<R: Read>(
        &mut self,
        parent: &Parent,
        name: &[u8],
        e: &Entry,
        input: &mut Input<R>,
    ) -> Result<(), ApplyError> {
        let dir = pfd(&self.root, parent);
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mode = Mode::from_raw_mode(0o600);
        let fd = match rfs::openat(dir, name, flags, mode) {
            Err(Errno::EXIST) => {
                self.replace(dir, name, &e.path)?;
                rfs::openat(dir, name, flags, mode)
            }
            r => r,
        }
        .map_err(|err| io_err("create file", &e.path, err))?;
        let file = File::from(fd);
        match &e.sparse {
            None => {
                input.copy_sparse(&file, e.size, &e.path)?;
                file.set_len(e.size).map_err(|source| ApplyError::Io {
                    step: "set the file size",
                    entry: lossy(&e.path),
                    source,
                })?;
            }
            Some((chunks, real)) => {
                for &(off, len) in chunks {
                    input.copy_to(&file, len, Some(off), &e.path)?;
                }
                file.set_len(*real).map_err(|source| ApplyError::Io {
                    step: "set sparse file size",
                    entry: lossy(&e.path),
                    source,
                })?;
            }
        }
        self.owner_mode(file.as_fd(), e)?;
        self.set_xattrs(file.as_fd(), Kind::File, e)?;
        rfs::futimens(&file, &times(e.mtime)).map_err(|err| io_err("set times", &e.path, err))?;
        self.stats.bytes += e.size;
        self.stats.files += 1;
        Ok(())
    }

    /// chown, then chmod (chown clears setuid and setgid).
    fn owner_mode(&self, fd: BorrowedFd<'_>, e: &Entry) -> Result<(), ApplyError> {
        let (uid, gid) = self.ids(e)?;
        rfs::fchown(fd, Some(uid), Some(gid)).map_err(|err| io_err("chown", &e.path, err))?;
        rfs::fchmod(fd, Mode::from_raw_mode(e.mode)).map_err(|err| io_err("chmod", &e.path, err))
    }

    fn dir(
        &mut self,
        parent: &Parent,
        name: &[u8],
        full: &[u8],
        e: &Entry,
    ) -> Result<OwnedFd, ApplyError> {
        let dir = pfd(&self.root, parent);
        let mode = Mode::from_raw_mode(0o700);
        let mut existed = false;
        let mut over_whiteout = false;
        match rfs::mkdirat(dir, name, mode) {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|err| io_err("stat the existing path", &e.path, err))?;
                if is_dir(&st) {
                    existed = true;
                } else {
                    over_whiteout = is_whiteout_device(&st);
                    self.replace(dir, name, &e.path)?;
                    rfs::mkdirat(dir, name, mode)
                        .map_err(|err| io_err("create directory", &e.path, err))?;
                }
            }
            Err(err) => return Err(io_err("create directory", &e.path, err)),
        }
        let fd = open_child_dir(dir, name).map_err(|err| io_err("open directory", &e.path, err))?;
        self.dir_metadata(fd.as_fd(), e, existed)?;
        if over_whiteout && self.opts.whiteouts == WhiteoutMode::OverlayFs {
            // A directory over a whiteout of the same layer: lower contents stay hidden.
            set_opaque(fd.as_fd(), &e.path)?;
        }
        self.record_dir_time(full.to_vec(), fd.as_fd(), e)?;
        self.stats.dirs += 1;
        Ok(fd)
    }

    fn dir_metadata(
        &mut self,
        fd: BorrowedFd<'_>,
        e: &Entry,
        existed: bool,
    ) -> Result<(), ApplyError> {
        self.owner_mode(fd, e)?;
        if existed {
            self.clear_xattrs(fd, e)?;
        }
        self.set_xattrs(fd, Kind::Dir, e)
    }

    fn record_dir_time(
        &mut self,
        path: Vec<u8>,
        fd: BorrowedFd<'_>,
        e: &Entry,
    ) -> Result<(), ApplyError> {
        let st = rfs::fstat(fd).map_err(|err| io_err("stat directory", &e.path, err))?;
        self.retain(path.len())?;
        self.dir_times.push(DirTime {
            path,
            ino: st.st_ino,
            time: e.mtime,
        });
        Ok(())
    }

    fn symlink(&mut self, parent: &Parent, name: &[u8], e: &Entry) -> Result<(), ApplyError> {
        let dir = pfd(&self.root, parent);
        match rfs::symlinkat(e.link.as_slice(), dir, name) {
            Err(Errno::EXIST) => {
                self.replace(dir, name, &e.path)?;
                rfs::symlinkat(e.link.as_slice(), dir, name)
            }
            r => r,
        }
        .map_err(|err| io_err("create symlink", &e.path, err))?;
        let (uid, gid) = self.ids(e)?;
        rfs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| io_err("chown symlink", &e.path, err))?;
        rfs::utimensat(dir, name, &times(e.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| io_err("set symlink times", &e.path, err))?;
        self.stats.xattrs_dropped += e.xattrs.len() as u64;
        self.stats.symlinks += 1;
        Ok(())
    }

    fn hardlink(
        &mut self,
        parent: &Parent,
        name: &[u8],
        comps: &[&[u8]],
        e: &Entry,
    ) -> Result<(), ApplyError> {
        let target = clean(&e.link);
        let Some((&tname, tparent)) = target.split_last() else {
            return Err(hardlink_to_dir(e));
        };
        if target == comps {
            return Ok(()); // a link to itself: nothing to do
        }
        if !self.skipped.is_empty() && self.skipped.contains(join(&target).as_slice()) {
            self.stats.skipped_devices += 1;
            return Ok(());
        }
        let tdir = open_in_root(self.root.as_fd(), &join(tparent), false)
            .map_err(|err| self.hardlink_error(err, e))?;
        let st = rfs::statat(&tdir, tname, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| self.hardlink_error(err, e))?;
        if is_dir(&st) {
            return Err(hardlink_to_dir(e));
        }
        let dir = pfd(&self.root, parent);
        // Flags 0: a link to a symlink links the symlink itself.
        match rfs::linkat(&tdir, tname, dir, name, AtFlags::empty()) {
            Err(Errno::EXIST) => {
                self.replace(dir, name, &e.path)?;
                rfs::linkat(&tdir, tname, dir, name, AtFlags::empty())
            }
            r => r,
        }
        .map_err(|err| self.hardlink_error(err, e))?;
        self.stats.hardlinks += 1;
        Ok(())
    }

    fn hardlink_error(&self, err: Errno, e: &Entry) -> ApplyError {
        if err == Errno::XDEV {
            return ApplyError::Escape {
                entry: lossy(&e.path),
                path: lossy(&e.link),
            };
        }
        ApplyError::Io {
            step: "hardlink to its target",
            entry: format!("{} -> {}", lossy(&e.path), lossy(&e.link)),
            source: err.into(),
        }
    }

    fn node(&mut self, parent: &Parent, name: &[u8], e: &Entry) -> Result<(), ApplyError> {
        let (ftype, dev) = match e.kind {
            Kind::Fifo => (FileType::Fifo, 0),
            kind => {
                let (major, minor) = e.dev;
                // The kernel's dev_t from user space has 12 major and 20 minor bits; larger
                // numbers would be silently truncated to another device.
                if major > 0xfff || minor > 0xfffff {
                    return Err(ApplyError::Invalid {
                        entry: lossy(&e.path),
                        reason: format!("device number {major}:{minor} out of range"),
                    });
                }
                let ftype = if kind == Kind::Char {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                (ftype, rfs::makedev(major, minor))
            }
        };
        let dir = pfd(&self.root, parent);
        let mode = Mode::from_raw_mode(0o600);
        match rfs::mknodat(dir, name, ftype, mode, dev) {
            Err(Errno::EXIST) => {
                self.replace(dir, name, &e.path)?;
                rfs::mknodat(dir, name, ftype, mode, dev)
            }
            r => r,
        }
        .map_err(|err| io_err("create device or fifo", &e.path, err))?;
        let (uid, gid) = self.ids(e)?;
        rfs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| io_err("chown", &e.path, err))?;
        // fchmodat has no AT_SYMLINK_NOFOLLOW before fchmodat2 (Linux 6.6) and these nodes
        // cannot be opened without side effects; the name was made by mknodat just above in
        // our private root, so it is not a symlink.
        rfs::chmodat(dir, name, Mode::from_raw_mode(e.mode), AtFlags::empty())
            .map_err(|err| io_err("chmod", &e.path, err))?;
        rfs::utimensat(dir, name, &times(e.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| io_err("set times", &e.path, err))?;
        self.stats.xattrs_dropped += e.xattrs.len() as u64;
        if e.kind == Kind::Fifo {
            self.stats.fifos += 1;
        } else {
            self.stats.devices_created += 1;
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        parent_key: &[u8],
        target: &[u8],
        entry: &[u8],
    ) -> Result<(), ApplyError> {
        self.stats.whiteouts += 1;
        let epoch = self.epoch.get();
        match self.opts.whiteouts {
            WhiteoutMode::Apply => {
                let Some(parent) = self.existing_parent(parent_key, entry)? else {
                    return Ok(()); // nothing below to hide
                };
                let mut path = parent_key.to_vec();
                let res = remove_lower(&self.touched, pfd(&self.root, &parent), &mut path, target);
                self.removed();
                res.map_err(|err| io_err("remove the whited-out path", entry, err))
            }
            WhiteoutMode::OverlayFs => {
                let parent = self.parent(parent_key, entry)?;
                let dir = pfd(&self.root, &parent);
                match rfs::mknodat(dir, target, FileType::CharacterDevice, Mode::empty(), 0) {
                    Ok(()) => {}
                    Err(Errno::EXIST) => {
                        // This layer already has `target`: it stays (a whiteout only hides
                        // lower layers), and a directory of ours must hide the lower one's
                        // contents.
                        let st = rfs::statat(dir, target, AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(|err| io_err("stat the whiteout target", entry, err))?;
                        if is_dir(&st) {
                            let fd = open_child_dir(dir, target)
                                .map_err(|err| io_err("open the whiteout target", entry, err))?;
                            set_opaque(fd.as_fd(), entry)?;
                        }
                    }
                    Err(err) => return Err(io_err("create whiteout device", entry, err)),
                }
                self.put_parent(parent_key, parent, epoch);
                Ok(())
            }
        }
    }

    fn opaque(&mut self, parent_key: &[u8], entry: &[u8]) -> Result<(), ApplyError> {
        self.stats.opaque_dirs += 1;
        let epoch = self.epoch.get();
        let parent = self.parent(parent_key, entry)?;
        match self.opts.whiteouts {
            WhiteoutMode::Apply => {
                self.mark_touched(parent_key)?;
                let dir = pfd(&self.root, &parent);
                let res = (|| {
                    let mut path = parent_key.to_vec();
                    let mut d = rfs::Dir::read_from(dir)?;
                    for child in read_names(&mut d)? {
                        remove_lower(&self.touched, dir, &mut path, &child)?;
                    }
                    Ok(())
                })();
                self.removed();
                res.map_err(|err| io_err("empty the opaque directory", entry, err))
            }
            WhiteoutMode::OverlayFs => {
                set_opaque(pfd(&self.root, &parent), entry)?;
                self.put_parent(parent_key, parent, epoch);
                Ok(())
            }
        }
    }

    /// Sets the entry's extended attributes that pass the filter (see the module docs).
    fn set_xattrs(&mut self, fd: BorrowedFd<'_>, kind: Kind, e: &Entry) -> Result<(), ApplyError> {
        for (name, value) in &e.xattrs {
            let value = match xattr_policy(name, kind) {
                XattrPolicy::Drop => None,
                XattrPolicy::Keep => Some(value.clone()),
                XattrPolicy::Acl => shift_acl(value, self.opts.id_offset),
            };
            let Some(value) = value else {
                self.stats.xattrs_dropped += 1;
                continue;
            };
            match rfs::fsetxattr(fd, name.as_slice(), &value, XattrFlags::empty()) {
                Ok(()) => self.stats.xattrs_set += 1,
                Err(Errno::OPNOTSUPP) => self.stats.xattrs_dropped += 1,
                Err(err) => return Err(io_err("set xattr", &e.path, err)),
            }
        }
        Ok(())
    }

    /// An existing directory redeclared by this layer takes the layer's xattrs only: the ones
    /// the filter manages (`user.*`, `security.capability`, POSIX ACLs) are removed first.
    fn clear_xattrs(&mut self, fd: BorrowedFd<'_>, e: &Entry) -> Result<(), ApplyError> {
        let len = match rfs::flistxattr_query(fd) {
            Ok(0) | Err(Errno::OPNOTSUPP) => return Ok(()),
            Ok(n) => n,
            Err(err) => return Err(io_err("list xattrs", &e.path, err)),
        };
        let mut buf = std::mem::take(&mut self.xattr_buf);
        buf.resize(len + 1024, 0);
        let n =
            rfs::flistxattr(fd, &mut buf[..]).map_err(|err| io_err("list xattrs", &e.path, err))?;
        for name in buf[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if xattr_policy(name, Kind::Dir) != XattrPolicy::Drop || name == b"security.capability"
            {
                match rfs::fremovexattr(fd, name) {
                    Ok(()) | Err(Errno::NODATA) => {}
                    Err(err) => return Err(io_err("remove xattr", &e.path, err)),
                }
            }
        }
        self.xattr_buf = buf;
        Ok(())
    }

    /// Sets the directories' times after every entry of the layer: a directory still at its
    /// path (the same inode as when it was made) gets the time of its last entry.
    fn finish(&mut self) -> Result<(), ApplyError> {
        let dirs = std::mem::take(&mut self.dir_times);
        for d in &dirs {
            let fd = match open_in_root(self.root.as_fd(), &d.path, true) {
                Ok(fd) => fd,
                // Replaced or removed by a later entry of the layer.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                Err(err) => return Err(io_err("reopen a directory for its times", &d.path, err)),
            };
            let st = rfs::fstat(&fd).map_err(|err| io_err("stat directory", &d.path, err))?;
            if st.st_ino != d.ino {
                continue;
            }
            rfs::futimens(&fd, &times(d.time))
                .map_err(|err| io_err("set directory times", &d.path, err))?;
        }
        Ok(())
    }
}

fn hardlink_to_dir(e: &Entry) -> ApplyError {
    ApplyError::HardlinkToDir {
        entry: lossy(&e.path),
        target: lossy(&e.link),
    }
}

fn times(t: Timespec) -> Timestamps {
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XattrPolicy {
    Keep,
    Acl,
    Drop,
}

fn xattr_policy(name: &[u8], kind: Kind) -> XattrPolicy {
    if name.contains(&0) || name.is_empty() {
        return XattrPolicy::Drop;
    }
    if name.starts_with(b"user.") {
        if name.starts_with(b"user.overlay.") {
            XattrPolicy::Drop
        } else {
            XattrPolicy::Keep
        }
    } else if name == b"security.capability" {
        if kind == Kind::File {
            XattrPolicy::Keep
        } else {
            XattrPolicy::Drop
        }
    } else if name == b"system.posix_acl_access"
        || (name == b"system.posix_acl_default" && kind == Kind::Dir)
    {
        XattrPolicy::Acl
    } else {
        XattrPolicy::Drop
    }
}

/// A POSIX ACL xattr (`posix_acl_xattr_header` version 2, then 8-byte entries of tag, perm,
/// id) with the ids of named users and groups shifted by the id offset. `None` when it is
/// malformed or an id does not fit.
fn shift_acl(value: &[u8], offset: Option<(u32, u32)>) -> Option<Vec<u8>> {
    const ACL_USER: u16 = 0x02;
    const ACL_GROUP: u16 = 0x08;
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) || value[..4] != 2u32.to_le_bytes() {
        return None;
    }
    let mut out = value.to_vec();
    let Some((du, dg)) = offset else {
        return Some(out);
    };
    for ent in out[4..].chunks_exact_mut(8) {
        let tag = u16::from_le_bytes([ent[0], ent[1]]);
        let delta = match tag {
            ACL_USER => du,
            ACL_GROUP => dg,
            _ => continue,
        };
        let id = u32::from_le_bytes([ent[4], ent[5], ent[6], ent[7]]);
        let shifted = id.checked_add(delta).filter(|&v| v != u32::MAX)?;
        ent[4..8].copy_from_slice(&shifted.to_le_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        let cases = [
            (
                "application/vnd.oci.image.layer.v1.tar",
                Some(Compression::None),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Some(Compression::Zstd),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Some(Compression::Gzip),
            ),
            ("application/vnd.oci.image.config.v1+json", None),
            ("application/vnd.oci.image.layer.v1.tar+bzip2", None),
        ];
        for (mt, want) in cases {
            assert_eq!(Compression::from_media_type(mt), want, "{mt}");
        }
    }

    #[test]
    fn sniffing() {
        assert_eq!(
            Compression::sniff(&[0x1f, 0x8b, 8, 0]),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::sniff(b"etc/\0\0\0\0"), Some(Compression::None));
        assert_eq!(Compression::sniff(b"BZh91AY"), None);
        assert_eq!(Compression::sniff(&[0xfd, b'7', b'z', b'X', b'Z', 0]), None);
    }

    #[test]
    fn cleaning_keeps_paths_rooted() {
        let show = |p: &[u8]| join(&clean(p));
        assert_eq!(show(b"../../x"), b"x");
        assert_eq!(show(b"/etc/x"), b"etc/x");
        assert_eq!(show(b"./a/./b/../c/"), b"a/c");
        assert_eq!(show(b"a/../../.."), b"");
        assert_eq!(show(b"./"), b"");
    }

    fn pax_record(k: &str, v: &str) -> String {
        let body = format!(" {k}={v}\n");
        let mut len = body.len() + 1;
        loop {
            let s = format!("{len}{body}");
            if s.len() == len {
                return s;
            }
            len = s.len();
        }
    }

    #[test]
    fn pax_records() {
        let mut data = Vec::new();
        for (k, v) in [
            ("path", "a/b"),
            ("mtime", "1700000000.25"),
            ("SCHILY.xattr.user.x", "v=1"),
            ("uid", "1000"),
        ] {
            data.extend_from_slice(pax_record(k, v).as_bytes());
        }
        let pax = parse_pax(&data, 0).expect("valid records");
        assert_eq!(pax.path.as_deref(), Some(&b"a/b"[..]));
        assert_eq!(pax.uid, Some(1000));
        let t = pax.mtime.expect("mtime");
        assert_eq!((t.tv_sec, t.tv_nsec), (1_700_000_000, 250_000_000));
        assert_eq!(pax.xattrs, vec![(b"user.x".to_vec(), b"v=1".to_vec())]);
        assert!(parse_pax(b"5 a=b\n9", 0).is_err());
        assert!(parse_pax(b"99 path=x\n", 0).is_err());
    }

    #[test]
    fn negative_pax_time() {
        let t = parse_pax_time(b"-1.5").expect("time");
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 500_000_000));
    }

    #[test]
    fn xattr_filter() {
        assert_eq!(xattr_policy(b"user.mime", Kind::File), XattrPolicy::Keep);
        assert_eq!(
            xattr_policy(b"user.overlay.opaque", Kind::Dir),
            XattrPolicy::Drop
        );
        assert_eq!(
            xattr_policy(b"security.capability", Kind::File),
            XattrPolicy::Keep
        );
        assert_eq!(
            xattr_policy(b"security.capability", Kind::Dir),
            XattrPolicy::Drop
        );
        assert_eq!(
            xattr_policy(b"security.selinux", Kind::File),
            XattrPolicy::Drop
        );
        assert_eq!(
            xattr_policy(b"trusted.overlay.opaque", Kind::Dir),
            XattrPolicy::Drop
        );
        assert_eq!(
            xattr_policy(b"system.posix_acl_access", Kind::File),
            XattrPolicy::Acl
        );
        assert_eq!(
            xattr_policy(b"system.posix_acl_default", Kind::File),
            XattrPolicy::Drop
        );
        assert_eq!(
            xattr_policy(b"system.nfs4_acl", Kind::File),
            XattrPolicy::Drop
        );
    }

    #[test]
    fn acl_ids_shift() {
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [(0x01u16, 6u16, u32::MAX), (0x02, 4, 1000), (0x08, 4, 50)] {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&perm.to_le_bytes());
            acl.extend_from_slice(&id.to_le_bytes());
        }
        let out = shift_acl(&acl, Some((100_000, 200_000))).expect("valid acl");
        let id =
            |i: usize| u32::from_le_bytes(out[4 + 8 * i + 4..4 + 8 * i + 8].try_into().unwrap());
        assert_eq!((id(0), id(1), id(2)), (u32::MAX, 101_000, 200_050));
        assert_eq!(shift_acl(&acl[..7], None), None);
    }
}
