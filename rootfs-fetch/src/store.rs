//! The content store of images: blobs by sha256 (`blobs/sha256/<hex>`), verified while they are
//! written, resumable, safe against concurrent writers; image records (`images/<id>.json`) and the
//! tags that name them (`tags/`).
//!
//! Layout under the store root (`<state>/images` in sbxd):
//! - `blobs/sha256/<hex>`: a complete blob whose sha256 was checked when it was written.
//! - `blobs/.partial/<hex>`: the bytes received so far of a blob being written; a later writer
//!   re-hashes them and goes on from their length (registry Range requests).
//! - `blobs/.partial/<hex>.lock`: held (flock) by the one writer of that blob; removed by it.
//! - `images/<id>.json`: an [`ImageRecord`], written atomically.
//! - `tags/<sha256 of the reference, 32 hex>.json`: `{"reference": …, "id": …}`, written atomically.
//!
//! Image ids are `im-` + the first 24 hex digits of the image's **config** digest: the config
//! names the ordered diff_ids (uncompressed layer contents) and the run settings, so the same
//! image gets the same id whichever registry, compression or manifest it came from.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A sha256 content digest, `sha256:<64 lowercase hex>` (the only algorithm images use in
/// practice; others are refused when parsed).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// A string that is not a `sha256:<64 lowercase hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {value:?}: {reason}")]
pub struct DigestError {
    pub value: String,
    pub reason: &'static str,
}

impl Digest {
    /// Parse `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let err = |reason| DigestError {
            value: s.to_string(),
            reason,
        };
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| err("expected ALGORITHM:HEX"))?;
        if alg != "sha256" {
            return Err(err("only sha256 digests are supported"));
        }
        Digest::from_hex(hex).map_err(|_| err("a sha256 digest is 64 lowercase hex digits"))
    }

    /// From the 64 lowercase hex digits alone.
    pub fn from_hex(hex: &str) -> Result<Digest, DigestError> {
        if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Digest(hex.to_string()))
        } else {
            Err(DigestError {
                value: hex.to_string(),
                reason: "a sha256 digest is 64 lowercase hex digits",
            })
        }
    }

    /// The digest of some bytes.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// The digest a finished hasher computed.
    pub(crate) fn from_hasher(h: Sha256) -> Digest {
        Digest(hex(&h.finalize()))
    }

    /// The 64 hex digits, without `sha256:`.
    pub fn hex(&self) -> &str {
        &self.0
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, DigestError> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The id of an image in the store: `im-` followed by 24 lowercase hex digits, the start of the
/// image's config digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId(String);

/// Hex digits of the config digest an image id keeps (96 bits).
pub const IMAGE_ID_HEX_LEN: usize = 24;

impl ImageId {
    /// The id of the image whose config blob has this digest.
    pub fn from_config_digest(config: &Digest) -> ImageId {
        ImageId(format!("im-{}", &config.hex()[..IMAGE_ID_HEX_LEN]))
    }

    /// Parse `im-<24 lowercase hex>`.
    pub fn parse(s: &str) -> Result<ImageId, DigestError> {
        let ok = s.strip_prefix("im-").is_some_and(|h| {
            h.len() == IMAGE_ID_HEX_LEN && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if ok {
            Ok(ImageId(s.to_string()))
        } else {
            Err(DigestError {
                value: s.to_string(),
                reason: "an image id is im- followed by 24 lowercase hex digits",
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ImageId {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, DigestError> {
        ImageId::parse(s)
    }
}

impl Serialize for ImageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ImageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ImageId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One layer of an image, in order from the base up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// Digest of the blob as stored (compressed when the media type says so).
    pub digest: Digest,
    /// Digest of the uncompressed tar, from the config's `rootfs.diff_ids`. Not checked when the
    /// blob is stored: the unpacker must hash the decompressed stream and compare.
    pub diff_id: Digest,
    /// OCI or Docker layer media type (says the compression).
    pub media_type: String,
    /// Size of the stored blob in bytes.
    pub size: u64,
}

/// The settings of the image config that apply to a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=VALUE` entries.
    #[serde(default)]
    pub env: Vec<String>,
    /// `None` when the image sets none (which differs from an explicit empty list).
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// `PORT/PROTO` (`80/tcp`), sorted.
    #[serde(default)]
    pub exposed_ports: Vec<String>,
}

/// What the store knows about one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: ImageId,
    /// The reference it was pulled, imported or built as (`127.0.0.1:5000/test/busybox:1`,
    /// `oci:/path:tag`, `docker-archive:/path`).
    pub reference: String,
    /// The single-platform image manifest (stored as a blob).
    pub manifest_digest: Digest,
    /// The image index / manifest list the manifest was chosen from, when there was one.
    #[serde(default)]
    pub index_digest: Option<Digest>,
    /// The config blob; the image id is derived from it.
    pub config_digest: Digest,
    /// Layers, base first.
    pub layers: Vec<LayerRef>,
    pub config: ImageConfig,
    /// `linux`, from the config.
    #[serde(default)]
    pub os: String,
    /// `amd64`, `arm64`, … from the config.
    #[serde(default)]
    pub architecture: String,
    /// When the record was written, seconds since the Unix epoch.
    pub created_at: u64,
    /// The image is layered on the built-in `host` image (built or snapshotted from it): its
    /// layers go over the host skeleton, and sandboxes also get the host's read-only binds
    /// (/usr, …). Such an image cannot be exported.
    #[serde(default)]
    pub host_base: bool,
    /// The image this one was built or snapshotted from (`None` for pulled and imported
    /// images): listings hide a build's untagged intermediate steps by it.
    #[serde(default)]
    pub parent: Option<ImageId>,
}

impl ImageRecord {
    /// The diff_ids of the layers, base first (the unpack keys).
    pub fn diff_ids(&self) -> impl Iterator<Item = &Digest> {
        self.layers.iter().map(|l| &l.diff_id)
    }
}

/// Seconds since the Unix epoch, for `created_at`.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to {step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob {expected} failed verification: its content hashes to {actual} ({size} bytes); nothing was kept")]
    DigestMismatch {
        expected: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("blob {digest} has {actual} bytes where {expected} were announced; nothing was kept")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest} is not in the store")]
    BlobMissing { digest: Digest },
    #[error("image {id} is not in the store")]
    ImageMissing { id: String },
    #[error("image record {path} is not valid: {source}")]
    BadRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { step, path, source }
}

/// What [`Store::put_stream`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The blob was written (this many bytes in total, including any resumed part).
    Written(u64),
    /// The blob was already in the store; the reader was not read.
    AlreadyPresent,
}

/// A content store rooted at a directory. Cheap to clone; every method is safe to call from
/// several threads and processes at once.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

pub(crate) fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn mkdir_private(path: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err("create directory", path))
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Write `bytes` to `path` atomically: a temp file in the same directory, fsync, rename, fsync
/// the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".tmp-{name}-{}", unique_suffix()));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res?;
    fsync_dir(dir)
}

/// An exclusive lock held as a flock on a lock file (one blob's writing, one layer's
/// unpacking). The holder removes the lock file before letting go; a waiter that wakes on a
/// removed file tries again, so two holders never coexist and no lock files pile up.
pub(crate) struct FileLock {
    path: PathBuf,
    _file: File,
}

impl FileLock {
    pub(crate) fn acquire(path: PathBuf) -> io::Result<FileLock> {
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)?;
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
            let held = file.metadata()?;
            match fs::metadata(&path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(FileLock { path, _file: file })
                }
                // The previous holder removed the file after we opened it: lock the new one.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Removed while still held (the file closes after this), see `acquire`.
        let _ = fs::remove_file(&self.path);
    }
}

/// The one writer of a blob: bytes go to `blobs/.partial/<hex>` while they are hashed;
/// [`BlobWriter::finish`] checks digest and size, fsyncs and renames into place. Dropped without
/// `finish`, the partial file stays for a later writer to resume.
pub struct BlobWriter {
    expected: Digest,
    size: Option<u64>,
    partial: PathBuf,
    final_path: PathBuf,
    file: File,
    hasher: Sha256,
    written: u64,
    _lock: FileLock,
}

impl BlobWriter {
    /// Bytes already in the partial file (and hashed): fetch the rest from this offset.
    pub fn offset(&self) -> u64 {
        self.written
    }

    /// The digest being written.
    pub fn digest(&self) -> &Digest {
        &self.expected
    }

    /// Drop what was resumed and start from byte 0 (the source could not serve a range).
    pub fn restart(&mut self) -> Result<(), StoreError> {
        self.file
            .set_len(0)
            .and_then(|_| self.file.seek(SeekFrom::Start(0)).map(|_| ()))
            .map_err(io_err("truncate", &self.partial))?;
        self.hasher = Sha256::new();
        self.written = 0;
        Ok(())
    }

    /// Append bytes. More bytes than the announced size is an error, and the partial file is
    /// removed (the source is not serving this blob).
    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        let new_len = self.written + buf.len() as u64;
        if let Some(size) = self.size {
            if new_len > size {
                let _ = fs::remove_file(&self.partial);
                return Err(StoreError::SizeMismatch {
                    digest: self.expected.clone(),
                    expected: size,
                    actual: new_len,
                });
            }
        }
        self.file
            .write_all(buf)
            .map_err(io_err("write", &self.partial))?;
        self.hasher.update(buf);
        self.written = new_len;
        Ok(())
    }

    /// Copy a reader to the end; returns the bytes copied.
    pub fn copy_from(&mut self, mut reader: impl Read) -> Result<u64, StoreError> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut n_total = 0;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(n_total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("read the source of", &self.partial)(e)),
            };
            self.write_all(&buf[..n])?;
            n_total += n as u64;
        }
    }

    /// Give up on this blob: the partial file is removed (its bytes are known bad).
    pub fn discard(self) {
        let _ = fs::remove_file(&self.partial);
    }

    /// Verify the digest (and size), fsync, and move the blob into place. On a mismatch the
    /// partial file is removed and nothing is kept.
    pub fn finish(mut self) -> Result<u64, StoreError> {
        if let Some(size) = self.size {
            if self.written != size {
                let _ = fs::remove_file(&self.partial);
                return Err(StoreError::SizeMismatch {
                    digest: self.expected.clone(),
                    expected: size,
                    actual: self.written,
                });
            }
        }
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if actual != self.expected {
            let _ = fs::remove_file(&self.partial);
            return Err(StoreError::DigestMismatch {
                expected: self.expected.clone(),
                actual,
                size: self.written,
            });
        }
        self.file
            .flush()
            .and_then(|_| self.file.sync_all())
            .map_err(io_err("fsync", &self.partial))?;
        fs::rename(&self.partial, &self.final_path)
            .map_err(io_err("rename into place", &self.final_path))?;
        if let Some(dir) = self.final_path.parent() {
            fsync_dir(dir)?;
        }
        Ok(self.written)
    }
}

impl Store {
    /// A store rooted at `root`, creating its directories (mode 0700: image content can be
    /// private) when missing.
    pub fn new(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let store = Store { root: root.into() };
        for dir in [
            store.root.join("blobs/sha256"),
            store.partial_dir(),
            store.root.join("images"),
            store.root.join("tags"),
        ] {
            mkdir_private(&dir)?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn partial_dir(&self) -> PathBuf {
        self.root.join("blobs/.partial")
    }

    /// Where a complete blob lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.partial_dir().join(digest.hex())
    }

    /// Whether the complete blob is in the store (by name; [`Store::verify`] re-hashes).
    pub fn has(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Open a complete blob for reading.
    pub fn open(&self, digest: &Digest) -> Result<File, StoreError> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::BlobMissing {
                    digest: digest.clone(),
                }
            } else {
                io_err("open blob", &path)(e)
            }
        })
    }

    /// The whole content of a (small) blob: manifests, configs.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.open(digest)?
            .read_to_end(&mut out)
            .map_err(io_err("read blob", &self.blob_path(digest)))?;
        Ok(out)
    }

    /// Size of a complete blob.
    pub fn size(&self, digest: &Digest) -> Result<u64, StoreError> {
        Ok(self
            .open(digest)?
            .metadata()
            .map_err(io_err("stat blob", &self.blob_path(digest)))?
            .len())
    }

    /// Re-hash a complete blob; a blob whose content no longer matches its name is an error
    /// (it is left in place: call [`Store::remove`] to fetch it again).
    pub fn verify(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        let mut f = self.open(digest)?;
        let (hasher, size) = hash_reader(&mut f).map_err(io_err("read blob", &path))?;
        let actual = Digest::from_hasher(hasher);
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
                size,
            });
        }
        Ok(())
    }

    /// Remove a complete blob; `false` when it was not there.
    pub fn remove(&self, digest: &Digest) -> Result<bool, StoreError> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("remove blob", &path)(e)),
        }
    }

    /// Bytes of an unfinished write of this blob left by an interrupted writer (0 when none).
    /// Advisory: the writer that resumes re-hashes them under the lock.
    pub fn partial_len(&self, digest: &Digest) -> u64 {
        fs::metadata(self.partial_path(digest))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Become the one writer of a blob, waiting for another writer of the same blob to finish.
    /// `None` when the blob is (by then) complete in the store. An unfinished partial file is
    /// re-hashed and kept: [`BlobWriter::offset`] says where to go on from.
    pub fn writer(
        &self,
        expected: &Digest,
        size: Option<u64>,
    ) -> Result<Option<BlobWriter>, StoreError> {
        if self.has(expected) {
            return Ok(None);
        }
        let partial = self.partial_path(expected);
        let lock_path = self.partial_dir().join(format!("{}.lock", expected.hex()));
        let lock = FileLock::acquire(lock_path.clone()).map_err(io_err("lock", &lock_path))?;
        if self.has(expected) {
            return Ok(None);
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&partial)
            .map_err(io_err("open partial blob", &partial))?;
        let (mut hasher, mut written) =
            hash_reader(&mut file).map_err(io_err("re-hash partial blob", &partial))?;
        if size.is_some_and(|s| written > s) {
            file.set_len(0).map_err(io_err("truncate", &partial))?;
            hasher = Sha256::new();
            written = 0;
        }
        file.seek(SeekFrom::Start(written))
            .map_err(io_err("seek", &partial))?;
        Ok(Some(BlobWriter {
            expected: expected.clone(),
            size,
            final_path: self.blob_path(expected),
            partial,
            file,
            hasher,
            written,
            _lock: lock,
        }))
    }

    /// Store a blob read whole from `reader`, verifying digest and size as it streams. Anything
    /// left by an interrupted writer is dropped first (the reader starts at byte 0). A blob
    /// already present is not read again.
    pub fn put_stream(
        &self,
        expected: &Digest,
        size: Option<u64>,
        reader: impl Read,
    ) -> Result<PutOutcome, StoreError> {
        let Some(mut w) = self.writer(expected, size)? else {
            return Ok(PutOutcome::AlreadyPresent);
        };
        if w.offset() > 0 {
            w.restart()?;
        }
        let copied = w.copy_from(reader);
        if let Err(e) = copied {
            // The source failed mid-way (not the content): keep nothing from a whole-blob copy.
            w.discard();
            return Err(e);
        }
        Ok(PutOutcome::Written(w.finish()?))
    }

    /// Store a small blob held in memory.
    pub fn put_bytes(&self, expected: &Digest, bytes: &[u8]) -> Result<PutOutcome, StoreError> {
        self.put_stream(expected, Some(bytes.len() as u64), bytes)
    }

    /// Store a blob whose digest is not known in advance (docker-archive layers): it is hashed
    /// while written to a temp file and moved under the digest it has. Returns digest and size.
    pub fn put_computed(&self, mut reader: impl Read) -> Result<(Digest, u64), StoreError> {
        let mut w = self.computed_writer()?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("read the source of", &w.tmp)(e)),
            };
            w.write_all(&buf[..n])
                .map_err(|e| io_err("write", &w.tmp)(e))?;
        }
        w.finish()
    }

    /// A writer of a blob whose digest is not known in advance (layers sbx makes itself): the
    /// bytes are hashed as they are written to a temp file, and [`ComputedBlob::finish`] moves
    /// it under the digest it has. Dropped without `finish`, the temp file is removed.
    pub fn computed_writer(&self) -> Result<ComputedBlob, StoreError> {
        let tmp = self.partial_dir().join(format!("tmp-{}", unique_suffix()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        Ok(ComputedBlob {
            file: Some(io::BufWriter::with_capacity(256 * 1024, file)),
            tmp,
            hasher: Sha256::new(),
            size: 0,
            blobs_dir: self.root.join("blobs/sha256"),
        })
    }

    fn record_path(&self, id: &ImageId) -> PathBuf {
        self.root.join("images").join(format!("{id}.json"))
    }

    /// Save (or replace) an image record, atomically.
    pub fn save_image(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.id);
        let json = serde_json::to_vec_pretty(record).map_err(|e| StoreError::BadRecord {
            path: path.clone(),
            source: e,
        })?;
        write_atomic(&path, &json)
    }

    /// Load an image record.
    pub fn load_image(&self, id: &ImageId) -> Result<ImageRecord, StoreError> {
        let path = self.record_path(id);
        let bytes = fs::read(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::ImageMissing { id: id.to_string() }
            } else {
                io_err("read image record", &path)(e)
            }
        })?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::BadRecord { path, source })
    }

    /// Whether a record of this image exists.
    pub fn has_image(&self, id: &ImageId) -> bool {
        self.record_path(id).is_file()
    }

    /// Every image record, sorted by id.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for ent in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let ent = ent.map_err(io_err("list", &dir))?;
            let name = ent.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| ImageId::parse(n).ok())
            else {
                continue;
            };
            out.push(self.load_image(&id)?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Remove an image record and every tag naming it (blobs stay: other images may share
    /// them). `false` when there was no record.
    pub fn remove_image(&self, id: &ImageId) -> Result<bool, StoreError> {
        for (reference, tagged) in self.list_tags()? {
            if &tagged == id {
                self.remove_tag(&reference)?;
            }
        }
        let path = self.record_path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("remove image record", &path)(e)),
        }
    }

    fn tag_path(&self, reference: &str) -> PathBuf {
        let key = Digest::of(reference.as_bytes());
        self.root
            .join("tags")
            .join(format!("{}.json", &key.hex()[..32]))
    }

    /// Point a reference string (as the user writes it, normalized) at an image.
    pub fn set_tag(&self, reference: &str, id: &ImageId) -> Result<(), StoreError> {
        let path = self.tag_path(reference);
        let json = serde_json::to_vec(&TagFile {
            reference: reference.to_string(),
            id: id.clone(),
        })
        .map_err(|source| StoreError::BadRecord {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &json)
    }

    /// The image a reference string points at, if any.
    pub fn resolve_tag(&self, reference: &str) -> Result<Option<ImageId>, StoreError> {
        let path = self.tag_path(reference);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read tag", &path)(e)),
        };
        let tag: TagFile = serde_json::from_slice(&bytes)
            .map_err(|source| StoreError::BadRecord { path, source })?;
        Ok((tag.reference == reference).then_some(tag.id))
    }

    /// Remove a tag; `false` when there was none.
    pub fn remove_tag(&self, reference: &str) -> Result<bool, StoreError> {
        let path = self.tag_path(reference);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("remove tag", &path)(e)),
        }
    }

    /// Every (reference, image id), sorted by reference.
    pub fn list_tags(&self) -> Result<Vec<(String, ImageId)>, StoreError> {
        let dir = self.root.join("tags");
        let mut out = Vec::new();
        for ent in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let ent = ent.map_err(io_err("list", &dir))?;
            let path = ent.path();
            if !ent.file_name().to_string_lossy().ends_with(".json")
                || ent.file_name().to_string_lossy().starts_with('.')
            {
                continue;
            }
            let bytes = fs::read(&path).map_err(io_err("read tag", &path))?;
            let tag: TagFile = serde_json::from_slice(&bytes)
                .map_err(|source| StoreError::BadRecord { path, source })?;
            out.push((tag.reference, tag.id));
        }
        out.sort();
        Ok(out)
    }
}

/// A blob being written whose digest is computed from its bytes; see
/// [`Store::computed_writer`].
pub struct ComputedBlob {
    file: Option<io::BufWriter<File>>,
    tmp: PathBuf,
    hasher: Sha256,
    size: u64,
    blobs_dir: PathBuf,
}

impl Write for ComputedBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob already finished"))?;
        let n = f.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl ComputedBlob {
    /// Flush, fsync and move the blob under its digest. Returns digest and size.
    pub fn finish(mut self) -> Result<(Digest, u64), StoreError> {
        let tmp = self.tmp.clone();
        let file = self
            .file
            .take()
            .expect("finish takes self, so the file is still there");
        let file = file
            .into_inner()
            .map_err(|e| io_err("write", &tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        let digest = Digest::from_hasher(std::mem::take(&mut self.hasher));
        let dest = self.blobs_dir.join(digest.hex());
        // Same content under the same name: a concurrent writer's rename is harmless.
        fs::rename(&tmp, &dest).map_err(io_err("rename into place", &dest))?;
        fsync_dir(&self.blobs_dir)?;
        Ok((digest, self.size))
    }
}

impl Drop for ComputedBlob {
    fn drop(&mut self) {
        // Not finished (an error on the way): keep nothing. After `finish` the temp name is
        // gone already and this is a harmless ENOENT.
        let _ = fs::remove_file(&self.tmp);
    }
}

#[derive(Serialize, Deserialize)]
struct TagFile {
    reference: String,
    id: ImageId,
}

fn hash_reader(r: &mut impl Read) -> io::Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n_total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok((hasher, n_total)),
            Ok(n) => {
                hasher.update(&buf[..n]);
                n_total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_strictly() {
        let hex = "a".repeat(64);
        let d = Digest::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(d.hex(), hex);
        assert_eq!(d.to_string(), format!("sha256:{hex}"));
        for bad in [
            "",
            "sha256:",
            &format!("sha512:{hex}"),
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}", "a".repeat(63)),
            &format!("sha256:{}/../x", "a".repeat(58)),
            &hex,
        ] {
            let e = Digest::parse(bad).unwrap_err();
            assert_eq!(e.value, bad);
        }
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn image_ids_come_from_the_config_digest() {
        let d = Digest::of(b"{}");
        let id = ImageId::from_config_digest(&d);
        assert_eq!(id.as_str(), format!("im-{}", &d.hex()[..24]));
        assert_eq!(ImageId::parse(id.as_str()).unwrap(), id);
        assert!(ImageId::parse("im-abc").is_err());
        assert!(ImageId::parse(&format!("im-{}", "G".repeat(24))).is_err());
    }
}
