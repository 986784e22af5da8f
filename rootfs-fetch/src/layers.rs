//! Unpacked layers, shared by every sandbox: each layer of a stored image is applied once, keyed
//! by its diff_id, into `<layers_dir>/<diff_id hex>/` and used read-only as an overlay lower
//! layer from then on.
//!
//! Files keep the uids and gids the layer's tar gives them (no offset): the runtime mounts each
//! layer id-mapped through the sandbox's user namespace, so root-owned files belong to sandbox
//! root in every sandbox, whatever its host uid range. That makes the unpacked tree hold real
//! setuid-root files on the host, which is why `layers_dir` is kept 0700 root.
//!
//! A layer is unpacked into `.tmp-<hex>-<unique>` with whiteouts in overlayfs form, its
//! uncompressed stream is checked against the diff_id (and the blob against its digest), and
//! only then, after a `syncfs`, is it renamed into place. Concurrent unpackers of one layer (threads or processes)
//! serialize on a flock of `.lock-<hex>` and re-check after taking it, so a layer is unpacked
//! once; a temporary directory left by a crash is removed by the next holder of the lock.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::apply::{self, ApplyError, ApplyOptions, Compression, WhiteoutMode};
use crate::store::{
    unique_suffix, Digest, FileLock, ImageId, ImageRecord, LayerRef, Store, StoreError,
};

/// Most layers an image may have: overlayfs stacks at most 500 lower layers.
pub const MAX_LAYERS: usize = 500;

/// The lower layer of an image without layers (an empty directory).
const EMPTY_LAYER: &str = "empty";

/// Why the layers of an image could not be made ready. Each names the layer (blob digest)
/// and, where it matters, its diff_id.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("image {image} has {count} layers; at most {limit} are supported (overlayfs stacks at most {limit} lower layers)")]
    TooManyLayers {
        image: ImageId,
        count: usize,
        limit: usize,
    },
    #[error("failed to {step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer} of image {image}: {source}")]
    Blob {
        image: ImageId,
        layer: Digest,
        #[source]
        source: StoreError,
    },
    #[error("layer {layer} of image {image}: its compression is not supported (media type {media_type:?}; xz and bzip2 are not read)")]
    Compression {
        image: ImageId,
        layer: Digest,
        media_type: String,
    },
    #[error("layer {layer} (diff_id {diff_id}) of image {image} could not be applied: {source}")]
    Apply {
        image: ImageId,
        layer: Digest,
        diff_id: Digest,
        #[source]
        source: Box<ApplyError>,
    },
    #[error("layer {layer} of image {image}: its uncompressed content hashes to {actual}, but the image config says diff_id {expected}; nothing was kept")]
    DiffIdMismatch {
        image: ImageId,
        layer: Digest,
        expected: Digest,
        actual: String,
    },
    #[error("layer {layer} of image {image}: the stored blob hashes to {actual}, not to its name; nothing was kept (remove the blob and pull or import the image again)")]
    BlobCorrupt {
        image: ImageId,
        layer: Digest,
        actual: Digest,
    },
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LayerError {
    let path = path.to_path_buf();
    move |source| LayerError::Io { step, path, source }
}

/// Where the unpacked layer with this diff_id lives (whether or not it is there yet).
pub fn layer_path(layers_dir: &Path, diff_id: &Digest) -> PathBuf {
    layers_dir.join(diff_id.hex())
}

/// Make sure every layer of `record` is unpacked under `layers_dir` (created 0700 if missing)
/// and return the layer directories **topmost first**, as overlayfs's `lowerdir` wants them.
/// Layers already there are reused as they are; an image without layers gets one empty lower.
pub fn unpack_image(
    store: &Store,
    record: &ImageRecord,
    layers_dir: &Path,
) -> Result<Vec<PathBuf>, LayerError> {
    if record.layers.len() > MAX_LAYERS {
        return Err(LayerError::TooManyLayers {
            image: record.id.clone(),
            count: record.layers.len(),
            limit: MAX_LAYERS,
        });
    }
    ensure_private_dir(layers_dir)?;
    if record.layers.is_empty() {
        let empty = layers_dir.join(EMPTY_LAYER);
        match fs::DirBuilder::new().mode(0o755).create(&empty) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create the empty layer", &empty)(e)),
        }
        return Ok(vec![empty]);
    }
    let mut lowers = Vec::with_capacity(record.layers.len());
    for layer in &record.layers {
        lowers.push(unpack_layer(store, &record.id, layer, layers_dir)?);
    }
    lowers.reverse();
    Ok(lowers)
}

/// `layers_dir` exists, is a directory (not a symlink) and is 0700.
fn ensure_private_dir(dir: &Path) -> Result<(), LayerError> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(io_err("create the layers directory", dir)(e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(io_err("stat the layers directory", dir))?;
    if !meta.is_dir() {
        return Err(LayerError::Io {
            step: "use the layers directory",
            path: dir.to_path_buf(),
            source: io::Error::other("not a directory (a symlink?)"),
        });
    }
    if meta.mode() & 0o7777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("make the layers directory 0700", dir))?;
    }
    Ok(())
}

/// Unpack one layer unless it is already there; returns its directory.
fn unpack_layer(
    store: &Store,
    image: &ImageId,
    layer: &LayerRef,
    layers_dir: &Path,
) -> Result<PathBuf, LayerError> {
    let hex = layer.diff_id.hex();
    let dest = layer_path(layers_dir, &layer.diff_id);
    if is_real_dir(&dest) {
        return Ok(dest);
    }
    let lock_path = layers_dir.join(format!(".lock-{hex}"));
    let _lock =
        FileLock::acquire(lock_path.clone()).map_err(io_err("lock the layer", &lock_path))?;
    if is_real_dir(&dest) {
        return Ok(dest); // another unpacker finished while we waited
    }
    remove_stale_tmp(layers_dir, hex)?;
    let tmp = layers_dir.join(format!(".tmp-{hex}-{}", unique_suffix()));
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .map_err(io_err("create the unpack directory", &tmp))?;
    let res = apply_into(store, image, layer, &tmp);
    if let Err(e) = res {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // On disk before it gets its final name: a crash must not leave a half-written layer
    // that every later sandbox would use as complete. One syncfs for the whole tree (cheaper
    // than an fsync per file), then the rename, then the directory entry.
    if let Err(e) = sync_filesystem(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(io_err("sync the unpacked layer to disk", &tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, &dest) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(io_err("rename the unpacked layer into place", &dest)(e));
    }
    fs::File::open(layers_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync the layers directory", layers_dir))?;
    Ok(dest)
}

/// `syncfs(2)` on the filesystem holding `dir`.
fn sync_filesystem(dir: &Path) -> std::io::Result<()> {
    let d = fs::File::open(dir)?;
    rustix::fs::syncfs(&d).map_err(std::io::Error::from)
}

/// Apply the blob of `layer` into the empty directory `root` and check both digests.
fn apply_into(
    store: &Store,
    image: &ImageId,
    layer: &LayerRef,
    root: &Path,
) -> Result<(), LayerError> {
    let blob_err = |source| LayerError::Blob {
        image: image.clone(),
        layer: layer.digest.clone(),
        source,
    };
    let file = store.open(&layer.digest).map_err(blob_err)?;
    let blob_path = store.blob_path(&layer.digest);
    let mut reader = HashingReader {
        inner: file,
        hasher: Sha256::new(),
    };
    // Media type first (the descriptor says it); magic bytes only for a type we do not know.
    let mut head = Vec::with_capacity(8);
    let compression = match Compression::from_media_type(&layer.media_type) {
        Some(c) => c,
        None => {
            (&mut reader)
                .take(8)
                .read_to_end(&mut head)
                .map_err(io_err("read the layer blob", &blob_path))?;
            Compression::sniff(&head).ok_or_else(|| LayerError::Compression {
                image: image.clone(),
                layer: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            })?
        }
    };
    let opts = ApplyOptions {
        whiteouts: WhiteoutMode::OverlayFs,
        id_offset: None,
        compute_diff_id: true,
        ..ApplyOptions::default()
    };
    let stats = apply::apply_layer(
        io::Cursor::new(head).chain(&mut reader),
        compression,
        root,
        &opts,
    )
    .map_err(|source| LayerError::Apply {
        image: image.clone(),
        layer: layer.digest.clone(),
        diff_id: layer.diff_id.clone(),
        source: Box::new(source),
    })?;
    // apply_layer read the stream to its end; whatever trails the compressed data is hashed too.
    io::copy(&mut reader, &mut io::sink()).map_err(io_err("read the layer blob", &blob_path))?;
    let actual = Digest::from_hasher(reader.hasher);
    if actual != layer.digest {
        return Err(LayerError::BlobCorrupt {
            image: image.clone(),
            layer: layer.digest.clone(),
            actual,
        });
    }
    let diff_id = stats.diff_id.unwrap_or_default();
    if diff_id != layer.diff_id.to_string() {
        return Err(LayerError::DiffIdMismatch {
            image: image.clone(),
            layer: layer.digest.clone(),
            expected: layer.diff_id.clone(),
            actual: diff_id,
        });
    }
    Ok(())
}

/// Hashes what is read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn is_real_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// Remove what an unpacker of this layer left when it died (only called under the lock).
fn remove_stale_tmp(layers_dir: &Path, hex: &str) -> Result<(), LayerError> {
    let prefix = format!(".tmp-{hex}-");
    let entries = fs::read_dir(layers_dir).map_err(io_err("list", layers_dir))?;
    for ent in entries {
        let ent = ent.map_err(io_err("list", layers_dir))?;
        if ent.file_name().to_string_lossy().starts_with(&prefix) {
            let p = ent.path();
            fs::remove_dir_all(&p).map_err(io_err("remove the stale unpack directory", &p))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ImageConfig, ImageRecord};
    use std::io::Write;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// Stores `blob` and returns its layer reference with `diff_id` of `tar`.
    fn put_layer(store: &Store, blob: &[u8], tar: &[u8], media_type: &str) -> LayerRef {
        let digest = Digest::of(blob);
        store.put_bytes(&digest, blob).unwrap();
        LayerRef {
            digest,
            diff_id: Digest::of(tar),
            media_type: media_type.into(),
            size: blob.len() as u64,
        }
    }

    fn record(layers: Vec<LayerRef>) -> ImageRecord {
        let config = Digest::of(format!("{layers:?}").as_bytes());
        ImageRecord {
            id: ImageId::from_config_digest(&config),
            reference: "test".into(),
            manifest_digest: config.clone(),
            index_digest: None,
            config_digest: config,
            layers,
            config: ImageConfig::default(),
            os: "linux".into(),
            architecture: "amd64".into(),
            created_at: 0,
            host_base: false,
            parent: None,
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn layers_unpack_once_topmost_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("images")).unwrap();
        let layers_dir = dir.path().join("images/layers");
        let t1 = tar_of(&[("a", b"one"), ("b", b"base")]);
        let t2 = tar_of(&[("a", b"two")]);
        let gz = gzip(&t1);
        let l1 = put_layer(
            &store,
            &gz,
            &t1,
            "application/vnd.oci.image.layer.v1.tar+gzip",
        );
        // An unknown media type: the compression is sniffed.
        let l2 = put_layer(&store, &t2, &t2, "application/x-unknown");
        let rec = record(vec![l1.clone(), l2.clone()]);
        let lowers = unpack_image(&store, &rec, &layers_dir).unwrap();
        assert_eq!(
            lowers,
            vec![
                layer_path(&layers_dir, &l2.diff_id),
                layer_path(&layers_dir, &l1.diff_id)
            ]
        );
        assert_eq!(fs::read(lowers[0].join("a")).unwrap(), b"two");
        assert_eq!(fs::read(lowers[1].join("a")).unwrap(), b"one");
        let mode = fs::metadata(&layers_dir).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        // Second time: nothing is unpacked again (same inode).
        let ino = fs::metadata(&lowers[1]).unwrap().ino();
        let again = unpack_image(&store, &rec, &layers_dir).unwrap();
        assert_eq!(again, lowers);
        assert_eq!(fs::metadata(&lowers[1]).unwrap().ino(), ino);
        assert!(
            leftovers(&layers_dir).is_empty(),
            "{:?}",
            leftovers(&layers_dir)
        );
    }

    #[test]
    fn a_wrong_diff_id_keeps_nothing_and_names_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("images")).unwrap();
        let layers_dir = dir.path().join("images/layers");
        let t = tar_of(&[("x", b"x")]);
        let mut l = put_layer(&store, &t, &t, "application/vnd.oci.image.layer.v1.tar");
        l.diff_id = Digest::of(b"something else");
        let e = unpack_image(&store, &record(vec![l.clone()]), &layers_dir).unwrap_err();
        assert!(matches!(e, LayerError::DiffIdMismatch { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&l.digest.to_string()), "{msg}");
        assert!(msg.contains(&l.diff_id.to_string()), "{msg}");
        assert!(!layer_path(&layers_dir, &l.diff_id).exists());
        assert!(
            leftovers(&layers_dir).is_empty(),
            "{:?}",
            leftovers(&layers_dir)
        );
    }

    #[test]
    fn a_corrupt_blob_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("images")).unwrap();
        let layers_dir = dir.path().join("images/layers");
        let t = tar_of(&[("x", b"x")]);
        let l = put_layer(&store, &t, &t, "application/vnd.oci.image.layer.v1.tar");
        // Bit rot after the blob was stored: same length, other bytes.
        let mut bad = t.clone();
        bad[600] ^= 1;
        fs::write(store.blob_path(&l.digest), &bad).unwrap();
        let e = unpack_image(&store, &record(vec![l.clone()]), &layers_dir).unwrap_err();
        assert!(matches!(e, LayerError::BlobCorrupt { .. }), "{e}");
        assert!(!layer_path(&layers_dir, &l.diff_id).exists());
    }

    #[test]
    fn missing_blobs_and_too_many_layers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("images")).unwrap();
        let layers_dir = dir.path().join("images/layers");
        let t = tar_of(&[("x", b"x")]);
        let l = LayerRef {
            digest: Digest::of(b"not stored"),
            diff_id: Digest::of(&t),
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            size: 1,
        };
        let e = unpack_image(&store, &record(vec![l.clone()]), &layers_dir).unwrap_err();
        assert!(e.to_string().contains(&l.digest.to_string()), "{e}");
        let many = record(vec![l; MAX_LAYERS + 1]);
        let e = unpack_image(&store, &many, &layers_dir).unwrap_err();
        assert!(matches!(e, LayerError::TooManyLayers { count, .. } if count == MAX_LAYERS + 1));
        // No layers: one empty lower.
        let lowers = unpack_image(&store, &record(vec![]), &layers_dir).unwrap();
        assert_eq!(lowers.len(), 1);
        assert_eq!(fs::read_dir(&lowers[0]).unwrap().count(), 0);
    }

    #[test]
    fn concurrent_unpackers_share_one_result_and_stale_tmp_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("images")).unwrap();
        let layers_dir = dir.path().join("images/layers");
        let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let t = tar_of(&[("big", &big), ("small", b"s")]);
        let l = put_layer(&store, &t, &t, "application/vnd.oci.image.layer.v1.tar");
        let rec = record(vec![l.clone()]);
        // A crashed unpacker's leftovers.
        fs::create_dir_all(&layers_dir).unwrap();
        let stale = layers_dir.join(format!(".tmp-{}-1-2-3", l.diff_id.hex()));
        fs::create_dir_all(stale.join("sub")).unwrap();
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (store, rec, layers_dir) = (store.clone(), rec.clone(), layers_dir.clone());
                std::thread::spawn(move || unpack_image(&store, &rec, &layers_dir).unwrap())
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(results.iter().all(|r| r == &results[0]));
        assert_eq!(fs::read(results[0][0].join("big")).unwrap(), big);
        assert!(
            leftovers(&layers_dir).is_empty(),
            "{:?}",
            leftovers(&layers_dir)
        );
    }
}
