//! OCI and Docker image formats: manifests, indexes and configs (parsed into typed structs and
//! checked against their digests), import of OCI image layouts and `docker save` tarballs into the
//! [`Store`], and export of a stored image as an OCI image layout (`skopeo`/`umoci` read it).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::store::{
    now_secs, write_atomic, Digest, DigestError, ImageConfig, ImageId, ImageRecord, LayerRef,
    Store, StoreError,
};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// The annotation that names a manifest in an OCI layout's index.json.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Manifests, indexes and configs bigger than this are refused (they are read into memory).
pub const MAX_JSON_BLOB: u64 = 16 << 20;
/// Nested indexes followed at most this deep.
const MAX_INDEX_DEPTH: usize = 4;

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

/// The compression of a layer media type; `None` for a media type that is not a layer sbx can
/// apply (foreign/non-distributable layers, artifacts).
pub fn layer_compression(media_type: &str) -> Option<LayerCompression> {
    match media_type {
        OCI_LAYER_TAR | DOCKER_LAYER_TAR => Some(LayerCompression::None),
        OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Some(LayerCompression::Gzip),
        OCI_LAYER_ZSTD => Some(LayerCompression::Zstd),
        _ => None,
    }
}

/// The OCI media type of a layer with this compression.
pub fn oci_layer_media_type(c: LayerCompression) -> &'static str {
    match c {
        LayerCompression::None => OCI_LAYER_TAR,
        LayerCompression::Gzip => OCI_LAYER_GZIP,
        LayerCompression::Zstd => OCI_LAYER_ZSTD,
    }
}

/// A content descriptor (OCI image spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    /// Kept as a string so that a bad digest is reported with its context; see
    /// [`Descriptor::digest`].
    #[serde(rename = "digest")]
    pub digest_str: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: &Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest_str: digest.to_string(),
            size,
            urls: None,
            annotations: None,
            platform: None,
        }
    }

    pub fn digest(&self) -> Result<Digest, DigestError> {
        Digest::parse(&self.digest_str)
    }

    /// The `org.opencontainers.image.ref.name` annotation.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A single-platform image manifest (OCI or Docker v2 schema 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A manifest-ish document: which one is told by its media type, else by its fields.
#[derive(Debug, Clone)]
pub enum ManifestKind {
    Image(Box<Manifest>),
    Index(Index),
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("failed to {step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} is not valid JSON of its kind: {source}")]
    BadJson {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}: {source}")]
    BadDigest {
        what: String,
        #[source]
        source: DigestError,
    },
    #[error("{what} ({digest}) does not match its digest: the content hashes to {actual}")]
    BlobMismatch {
        what: String,
        digest: Digest,
        actual: Digest,
    },
    #[error("{what} is {size} bytes, more than the {limit} bytes allowed")]
    TooLarge { what: String, size: u64, limit: u64 },
    #[error("{path} is not an OCI image layout: {reason}")]
    NotALayout { path: PathBuf, reason: String },
    #[error("no image tagged {tag:?} in the OCI layout {path} (tags: {available:?})")]
    TagNotFound {
        path: PathBuf,
        tag: String,
        available: Vec<String>,
    },
    #[error("the OCI layout {path} holds {count} images: name one as oci:{path}:TAG (tags: {available:?})")]
    NeedTag {
        path: PathBuf,
        count: usize,
        available: Vec<String>,
    },
    #[error("{what} has no image for this host's platform {wanted} (it has: {available:?})")]
    NoPlatform {
        what: String,
        wanted: String,
        available: Vec<String>,
    },
    #[error("{what} has media type {media_type:?}, which sbx cannot use")]
    UnsupportedMediaType { what: String, media_type: String },
    #[error("{what} has {layers} layers but its config lists {diff_ids} diff_ids")]
    LayerCount {
        what: String,
        layers: usize,
        diff_ids: usize,
    },
    #[error("docker archive {path}: {reason}")]
    Archive { path: PathBuf, reason: String },
    #[error("invalid OCI tag {tag:?} for export")]
    BadTag { tag: String },
    #[error("image {image} is layered on the built-in host image (its /usr and libraries are this host's, not in the image) and cannot be exported")]
    HostBase { image: ImageId },
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> OciError {
    let path = path.to_path_buf();
    move |source| OciError::Io { step, path, source }
}

fn bad_json(what: impl Into<String>) -> impl FnOnce(serde_json::Error) -> OciError {
    let what = what.into();
    move |source| OciError::BadJson { what, source }
}

/// Parse a manifest, index or manifest list. `media_type` is the one announced (descriptor or
/// HTTP Content-Type), if any.
pub fn parse_manifest(
    what: &str,
    bytes: &[u8],
    media_type: Option<&str>,
) -> Result<ManifestKind, OciError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        schema_version: Option<u32>,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(bad_json(what))?;
    if probe.schema_version != Some(2) {
        return Err(OciError::UnsupportedMediaType {
            what: what.to_string(),
            media_type: format!(
                "schemaVersion {:?} (only schema 2 manifests are supported)",
                probe.schema_version
            ),
        });
    }
    let mt = probe
        .media_type
        .as_deref()
        .or(media_type)
        .filter(|m| !m.is_empty());
    let is_index = match mt {
        Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) if other.starts_with("application/json") || other == "text/plain" => {
            probe.manifests.is_some()
        }
        Some(other) => {
            return Err(OciError::UnsupportedMediaType {
                what: what.to_string(),
                media_type: other.to_string(),
            })
        }
        None => probe.manifests.is_some(),
    };
    if is_index {
        Ok(ManifestKind::Index(
            serde_json::from_slice(bytes).map_err(bad_json(what))?,
        ))
    } else {
        Ok(ManifestKind::Image(
            serde_json::from_slice(bytes).map_err(bad_json(what))?,
        ))
    }
}

/// The platform this host runs: `linux` and the Go name of `std::env::consts::ARCH`.
pub fn host_platform() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    };
    Platform {
        architecture: arch.to_string(),
        os: "linux".to_string(),
        variant: None,
        os_version: None,
    }
}

/// Pick the entry of an index for this host's platform. On arm64 an entry without a variant or
/// with `v8` is preferred; attestation entries (`unknown/unknown`) never match.
pub fn select_platform<'a>(
    what: &str,
    entries: &'a [Descriptor],
) -> Result<&'a Descriptor, OciError> {
    let host = host_platform();
    let mut best: Option<(&Descriptor, u8)> = None;
    for e in entries {
        let Some(p) = &e.platform else { continue };
        if p.os != host.os || p.architecture != host.architecture {
            continue;
        }
        let score = match p.variant.as_deref() {
            None => 2,
            Some("v8") if host.architecture == "arm64" => 2,
            Some(_) => 1,
        };
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((e, score));
        }
    }
    best.map(|(e, _)| e).ok_or_else(|| OciError::NoPlatform {
        what: what.to_string(),
        wanted: host.to_string(),
        available: entries
            .iter()
            .map(|e| {
                e.platform
                    .as_ref()
                    .map_or_else(|| "(no platform)".to_string(), |p| p.to_string())
            })
            .collect(),
    })
}

/// What an image config says, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedConfig {
    pub config: ImageConfig,
    /// Digests of the uncompressed layer tars, base first.
    pub diff_ids: Vec<Digest>,
    pub os: String,
    pub architecture: String,
}

/// Parse an image config (`application/vnd.oci.image.config.v1+json` or Docker's): Env,
/// Entrypoint, Cmd, WorkingDir, User, ExposedPorts and rootfs.diff_ids.
pub fn parse_config(what: &str, bytes: &[u8]) -> Result<ParsedConfig, OciError> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        os: String,
        #[serde(default)]
        config: Option<Container>,
        rootfs: RootFs,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Container {
        #[serde(default)]
        env: Option<Vec<String>>,
        #[serde(default)]
        entrypoint: Option<Vec<String>>,
        #[serde(default)]
        cmd: Option<Vec<String>>,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    }
    #[derive(Deserialize)]
    struct RootFs {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        diff_ids: Vec<String>,
    }
    let f: File = serde_json::from_slice(bytes).map_err(bad_json(what))?;
    if f.rootfs.kind != "layers" {
        return Err(OciError::UnsupportedMediaType {
            what: format!("{what} rootfs"),
            media_type: f.rootfs.kind,
        });
    }
    let diff_ids = f
        .rootfs
        .diff_ids
        .iter()
        .map(|d| {
            Digest::parse(d).map_err(|source| OciError::BadDigest {
                what: format!("{what} rootfs.diff_ids"),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let c = f.config.unwrap_or(Container {
        env: None,
        entrypoint: None,
        cmd: None,
        working_dir: None,
        user: None,
        exposed_ports: None,
    });
    Ok(ParsedConfig {
        config: ImageConfig {
            env: c.env.unwrap_or_default(),
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            working_dir: c.working_dir.filter(|w| !w.is_empty()),
            user: c.user.filter(|u| !u.is_empty()),
            exposed_ports: c
                .exposed_ports
                .map(|m| m.into_keys().collect())
                .unwrap_or_default(),
        },
        diff_ids,
        os: f.os,
        architecture: f.architecture,
    })
}

/// Build the record of an image from its manifest and config (both already in the store).
/// Checks that every layer has a usable media type and a diff_id.
pub fn build_record(
    reference: &str,
    manifest_digest: Digest,
    index_digest: Option<Digest>,
    manifest: &Manifest,
    config_bytes: &[u8],
) -> Result<ImageRecord, OciError> {
    let what = format!("image {reference}");
    let config_digest = manifest
        .config
        .digest()
        .map_err(|source| OciError::BadDigest {
            what: format!("{what} config descriptor"),
            source,
        })?;
    let parsed = parse_config(&format!("{what} config"), config_bytes)?;
    if parsed.diff_ids.len() != manifest.layers.len() {
        return Err(OciError::LayerCount {
            what,
            layers: manifest.layers.len(),
            diff_ids: parsed.diff_ids.len(),
        });
    }
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, (l, diff_id)) in manifest.layers.iter().zip(&parsed.diff_ids).enumerate() {
        let digest = l.digest().map_err(|source| OciError::BadDigest {
            what: format!("{what} layer {i}"),
            source,
        })?;
        check_layer_media_type(&what, &digest, &l.media_type)?;
        layers.push(LayerRef {
            digest,
            diff_id: diff_id.clone(),
            media_type: l.media_type.clone(),
            size: l.size,
        });
    }
    Ok(ImageRecord {
        id: ImageId::from_config_digest(&config_digest),
        reference: reference.to_string(),
        manifest_digest,
        index_digest,
        config_digest,
        layers,
        config: parsed.config,
        os: parsed.os,
        architecture: parsed.architecture,
        created_at: now_secs(),
        host_base: false,
        parent: None,
    })
}

/// A layer media type sbx can apply, or an error naming the layer.
pub fn check_layer_media_type(
    what: &str,
    digest: &Digest,
    media_type: &str,
) -> Result<(), OciError> {
    match layer_compression(media_type) {
        Some(_) => Ok(()),
        None => Err(OciError::UnsupportedMediaType {
            what: format!("{what} layer {digest}"),
            media_type: media_type.to_string(),
        }),
    }
}

/// A config media type an image can have.
pub fn check_config_media_type(what: &str, media_type: &str) -> Result<(), OciError> {
    match media_type {
        OCI_CONFIG | DOCKER_CONFIG => Ok(()),
        other => Err(OciError::UnsupportedMediaType {
            what: format!("{what} config"),
            media_type: other.to_string(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// OCI image layout: import

/// A read-only OCI image layout directory.
struct Layout {
    path: PathBuf,
}

impl Layout {
    fn open(path: &Path) -> Result<Layout, OciError> {
        let not = |reason: String| OciError::NotALayout {
            path: path.to_path_buf(),
            reason,
        };
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct OciLayoutFile {
            image_layout_version: String,
        }
        let marker = path.join("oci-layout");
        let bytes = fs::read(&marker).map_err(|e| not(format!("cannot read oci-layout: {e}")))?;
        let f: OciLayoutFile = serde_json::from_slice(&bytes)
            .map_err(|e| not(format!("oci-layout is not valid: {e}")))?;
        if !f.image_layout_version.starts_with("1.") {
            return Err(not(format!(
                "imageLayoutVersion {:?} is not 1.x",
                f.image_layout_version
            )));
        }
        Ok(Layout {
            path: path.to_path_buf(),
        })
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.path.join("blobs/sha256").join(d.hex())
    }

    fn index(&self) -> Result<Index, OciError> {
        let p = self.path.join("index.json");
        let bytes = read_capped(&p, MAX_JSON_BLOB, &format!("{}", p.display()))?;
        serde_json::from_slice(&bytes).map_err(bad_json(p.display().to_string()))
    }

    /// A small blob, checked against its descriptor (digest and size).
    fn json_blob(&self, what: &str, desc: &Descriptor) -> Result<(Digest, Vec<u8>), OciError> {
        let digest = desc.digest().map_err(|source| OciError::BadDigest {
            what: what.to_string(),
            source,
        })?;
        if desc.size > MAX_JSON_BLOB {
            return Err(OciError::TooLarge {
                what: what.to_string(),
                size: desc.size,
                limit: MAX_JSON_BLOB,
            });
        }
        let bytes = read_capped(&self.blob_path(&digest), MAX_JSON_BLOB, what)?;
        let actual = Digest::of(&bytes);
        if actual != digest || bytes.len() as u64 != desc.size {
            return Err(OciError::BlobMismatch {
                what: what.to_string(),
                digest,
                actual,
            });
        }
        Ok((digest, bytes))
    }
}

/// Read at most `limit` bytes; more is an error.
fn read_capped(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, OciError> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let mut out = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(io_err("read", path))?;
    if out.len() as u64 > limit {
        return Err(OciError::TooLarge {
            what: what.to_string(),
            size: out.len() as u64,
            limit,
        });
    }
    Ok(out)
}

/// Import the image `tag` (or the only image) of an OCI layout into the store: every blob is
/// copied into the store with its digest checked; the record is saved and the reference
/// `oci:PATH[:TAG]` tagged to it. A nested index is resolved to this host's platform.
pub fn import_oci_layout(
    store: &Store,
    path: &Path,
    tag: Option<&str>,
) -> Result<ImageRecord, OciError> {
    let layout = Layout::open(path)?;
    let index = layout.index()?;
    let tags: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| d.ref_name().map(str::to_string))
        .collect();
    let candidates: Vec<Descriptor> = match tag {
        Some(t) => index
            .manifests
            .iter()
            .filter(|d| d.ref_name() == Some(t))
            .cloned()
            .collect(),
        None => index.manifests.clone(),
    };
    let top = match candidates.len() {
        0 if tag.is_some() => {
            return Err(OciError::TagNotFound {
                path: path.to_path_buf(),
                tag: tag.unwrap_or_default().to_string(),
                available: tags,
            })
        }
        0 => {
            return Err(OciError::NotALayout {
                path: path.to_path_buf(),
                reason: "index.json lists no manifests".into(),
            })
        }
        1 => candidates[0].clone(),
        // Several entries under one name (or none named): they must be platforms of one image.
        _ if candidates.iter().all(|d| d.platform.is_some()) => {
            select_platform(&path.display().to_string(), &candidates)?.clone()
        }
        n => {
            return Err(OciError::NeedTag {
                path: path.to_path_buf(),
                count: n,
                available: tags,
            })
        }
    };
    let reference = match tag {
        Some(t) => format!("oci:{}:{t}", path.display()),
        None => format!("oci:{}", path.display()),
    };
    let mut desc = top;
    let mut index_digest = None;
    for depth in 0.. {
        let what = format!("{reference} manifest {}", desc.digest_str);
        let (digest, bytes) = layout.json_blob(&what, &desc)?;
        let media = (!desc.media_type.is_empty()).then_some(desc.media_type.as_str());
        match parse_manifest(&what, &bytes, media)? {
            ManifestKind::Index(idx) => {
                if depth >= MAX_INDEX_DEPTH {
                    return Err(OciError::NotALayout {
                        path: path.to_path_buf(),
                        reason: format!("indexes nested deeper than {MAX_INDEX_DEPTH}"),
                    });
                }
                store.put_bytes(&digest, &bytes)?;
                index_digest.get_or_insert(digest);
                desc = select_platform(&what, &idx.manifests)?.clone();
            }
            ManifestKind::Image(m) => {
                let record = import_manifest(
                    store,
                    &reference,
                    &what,
                    digest,
                    &bytes,
                    index_digest,
                    &m,
                    |d, desc| {
                        let p = layout.blob_path(d);
                        let f = File::open(&p).map_err(io_err("open layer", &p))?;
                        store.put_stream(d, Some(desc.size), f)?;
                        Ok(())
                    },
                    |what, desc| layout.json_blob(what, desc).map(|(_, b)| b),
                )?;
                return Ok(record);
            }
        }
    }
    unreachable!("the loop returns or fails")
}

/// Store manifest, config and layers of one image and save its record.
#[allow(clippy::too_many_arguments)]
fn import_manifest(
    store: &Store,
    reference: &str,
    what: &str,
    manifest_digest: Digest,
    manifest_bytes: &[u8],
    index_digest: Option<Digest>,
    m: &Manifest,
    mut put_layer: impl FnMut(&Digest, &Descriptor) -> Result<(), OciError>,
    read_config: impl FnOnce(&str, &Descriptor) -> Result<Vec<u8>, OciError>,
) -> Result<ImageRecord, OciError> {
    check_config_media_type(what, &m.config.media_type)?;
    let config_what = format!("{what} config");
    let config_bytes = read_config(&config_what, &m.config)?;
    let record = build_record(
        reference,
        manifest_digest.clone(),
        index_digest,
        m,
        &config_bytes,
    )?;
    store.put_bytes(&record.config_digest, &config_bytes)?;
    for (l, desc) in record.layers.iter().zip(&m.layers) {
        put_layer(&l.digest, desc)?;
    }
    store.put_bytes(&manifest_digest, manifest_bytes)?;
    store.save_image(&record)?;
    store.set_tag(reference, &record.id)?;
    Ok(record)
}

// ---------------------------------------------------------------------------------------------
// Docker archive: import

/// One file of a tar archive: where its data is.
#[derive(Debug, Clone)]
enum TarItem {
    File { offset: u64, size: u64 },
    Link(String),
}

/// `manifest.json` of a `docker save` tarball.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn norm_tar_path(p: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

struct Archive {
    path: PathBuf,
    file: File,
    items: HashMap<String, TarItem>,
}

impl Archive {
    fn open(path: &Path) -> Result<Archive, OciError> {
        let bad = |reason: String| OciError::Archive {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(io_err("open", path))?;
        let mut items = HashMap::new();
        {
            let mut ar = tar::Archive::new(&file);
            let entries = ar
                .entries_with_seek()
                .map_err(|e| bad(format!("not a tar archive: {e}")))?;
            for entry in entries {
                let entry = entry.map_err(|e| bad(format!("bad tar entry: {e}")))?;
                let name = entry
                    .path()
                    .map_err(|e| bad(format!("bad tar entry name: {e}")))?
                    .to_string_lossy()
                    .into_owned();
                let Some(key) = norm_tar_path(&name) else {
                    continue;
                };
                let kind = entry.header().entry_type();
                let item = if kind.is_file() {
                    TarItem::File {
                        offset: entry.raw_file_position(),
                        size: entry.size(),
                    }
                } else if kind.is_symlink() || kind.is_hard_link() {
                    let target = entry
                        .link_name()
                        .ok()
                        .flatten()
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    // Symlinks are relative to their directory, hard links to the archive root.
                    let joined = if kind.is_symlink() && !target.starts_with('/') {
                        match key.rsplit_once('/') {
                            Some((dir, _)) => format!("{dir}/{target}"),
                            None => target,
                        }
                    } else {
                        target
                    };
                    match norm_tar_path(&joined) {
                        Some(t) => TarItem::Link(t),
                        None => continue,
                    }
                } else {
                    continue;
                };
                items.insert(key, item);
            }
        }
        Ok(Archive {
            path: path.to_path_buf(),
            file,
            items,
        })
    }

    fn bad(&self, reason: String) -> OciError {
        OciError::Archive {
            path: self.path.clone(),
            reason,
        }
    }

    /// Offset and size of a file, following links inside the archive.
    fn locate(&self, name: &str) -> Result<(u64, u64), OciError> {
        let mut key = norm_tar_path(name).ok_or_else(|| self.bad(format!("bad path {name:?}")))?;
        for _ in 0..16 {
            match self.items.get(&key) {
                Some(TarItem::File { offset, size }) => return Ok((*offset, *size)),
                Some(TarItem::Link(t)) => key = t.clone(),
                None => return Err(self.bad(format!("{name:?} is not in the archive"))),
            }
        }
        Err(self.bad(format!("{name:?}: too many links")))
    }

    fn reader(&self, name: &str) -> Result<(impl Read + '_, u64), OciError> {
        let (offset, size) = self.locate(name)?;
        let mut f = &self.file;
        f.seek(SeekFrom::Start(offset))
            .map_err(io_err("seek in", &self.path))?;
        Ok((f.take(size), size))
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>, OciError> {
        let (r, size) = self.reader(name)?;
        if size > MAX_JSON_BLOB {
            return Err(OciError::TooLarge {
                what: format!("{}: {name}", self.path.display()),
                size,
                limit: MAX_JSON_BLOB,
            });
        }
        let mut out = Vec::with_capacity(size as usize);
        let mut r = r;
        r.read_to_end(&mut out)
            .map_err(io_err("read", &self.path))?;
        Ok(out)
    }
}

/// The digest a path names, for `blobs/sha256/<hex>` (new docker/OCI format) and `<hex>.json`
/// (old docker format configs).
fn digest_in_name(name: &str) -> Option<Digest> {
    let n = norm_tar_path(name)?;
    if let Some(h) = n.strip_prefix("blobs/sha256/") {
        return Digest::from_hex(h).ok();
    }
    n.strip_suffix(".json")
        .and_then(|h| Digest::from_hex(h).ok())
}

/// Import the image of a `docker save` tarball (or `skopeo copy … docker-archive:`) into the
/// store. Old (`<id>/layer.tar`) and new (`blobs/sha256/<hex>`) layouts both work; layers are
/// stored as they are in the archive (usually uncompressed tars, whose digest is their diff_id
/// and is checked against the config). An OCI manifest is made for the image and stored too.
pub fn import_docker_archive(store: &Store, path: &Path) -> Result<ImageRecord, OciError> {
    let ar = Archive::open(path)?;
    let manifest_json = ar.read_small("manifest.json")?;
    let entries: Vec<DockerArchiveEntry> = serde_json::from_slice(&manifest_json)
        .map_err(bad_json(format!("{}: manifest.json", path.display())))?;
    let entry = match entries.as_slice() {
        [e] => e,
        [] => return Err(ar.bad("manifest.json lists no image".into())),
        many => {
            return Err(ar.bad(format!(
                "holds {} images ({:?}); only single-image archives are supported",
                many.len(),
                many.iter()
                    .map(|e| e.repo_tags.clone().unwrap_or_default())
                    .collect::<Vec<_>>()
            )))
        }
    };
    let reference = format!("docker-archive:{}", path.display());
    let config_bytes = ar.read_small(&entry.config)?;
    let config_digest = Digest::of(&config_bytes);
    if let Some(named) = digest_in_name(&entry.config) {
        if named != config_digest {
            return Err(OciError::BlobMismatch {
                what: format!("{reference} config {}", entry.config),
                digest: named,
                actual: config_digest,
            });
        }
    }
    let parsed = parse_config(&format!("{reference} config"), &config_bytes)?;
    if parsed.diff_ids.len() != entry.layers.len() {
        return Err(OciError::LayerCount {
            what: reference,
            layers: entry.layers.len(),
            diff_ids: parsed.diff_ids.len(),
        });
    }
    store.put_bytes(&config_digest, &config_bytes)?;
    let mut layer_descs = Vec::new();
    for (name, diff_id) in entry.layers.iter().zip(&parsed.diff_ids) {
        let (mut r, size) = ar.reader(name)?;
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut r, &mut magic).map_err(io_err("read", path))?;
        let compression = match &magic[..n] {
            [0x1f, 0x8b, ..] => LayerCompression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd] => LayerCompression::Zstd,
            _ => LayerCompression::None,
        };
        let (r, _) = ar.reader(name)?;
        let named = digest_in_name(name);
        let digest = match (named, compression) {
            (Some(d), _) => {
                store.put_stream(&d, Some(size), r)?;
                d
            }
            // An uncompressed layer's digest is its diff_id: checked while it is stored.
            (None, LayerCompression::None) => {
                store.put_stream(diff_id, Some(size), r)?;
                diff_id.clone()
            }
            (None, _) => store.put_computed(r)?.0,
        };
        if compression == LayerCompression::None && &digest != diff_id {
            return Err(OciError::BlobMismatch {
                what: format!("{reference} layer {name} (uncompressed, so its diff_id)"),
                digest: diff_id.clone(),
                actual: digest,
            });
        }
        layer_descs.push(Descriptor::new(
            oci_layer_media_type(compression),
            &digest,
            size,
        ));
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.to_string()),
        config: Descriptor::new(OCI_CONFIG, &config_digest, config_bytes.len() as u64),
        layers: layer_descs,
        annotations: None,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(bad_json("manifest"))?;
    let manifest_digest = Digest::of(&manifest_bytes);
    let record = build_record(
        &reference,
        manifest_digest.clone(),
        None,
        &manifest,
        &config_bytes,
    )?;
    store.put_bytes(&manifest_digest, &manifest_bytes)?;
    store.save_image(&record)?;
    store.set_tag(&reference, &record.id)?;
    Ok(record)
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// OCI image layout: export

/// Write a stored image into an OCI image layout at `dir` under the name `tag`
/// (`org.opencontainers.image.ref.name`). An existing layout keeps its other images; an image
/// already under `tag` is replaced. Blobs are copied from the store and re-hashed on the way.
/// The stored manifest is kept when it is an OCI manifest (same digest as pulled); otherwise an
/// OCI manifest is written for the same config and layers. Returns the manifest digest.
pub fn export_oci_layout(
    store: &Store,
    record: &ImageRecord,
    dir: &Path,
    tag: &str,
) -> Result<Digest, OciError> {
    if record.host_base {
        return Err(OciError::HostBase {
            image: record.id.clone(),
        });
    }
    crate::reference::validate_oci_ref_name(tag).map_err(|_| OciError::BadTag {
        tag: tag.to_string(),
    })?;
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io_err("create", &blobs))?;
    let marker = dir.join("oci-layout");
    if marker.exists() {
        Layout::open(dir)?;
    } else {
        write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }
    let (manifest_digest, manifest_bytes) = export_manifest(store, record)?;
    copy_blob(store, &record.config_digest, &blobs)?;
    for l in &record.layers {
        copy_blob(store, &l.digest, &blobs)?;
    }
    write_blob_bytes(&blobs, &manifest_digest, &manifest_bytes)?;

    let index_path = dir.join("index.json");
    let mut index = if index_path.exists() {
        Layout { path: dir.into() }.index()?
    } else {
        Index {
            schema_version: 2,
            media_type: Some(OCI_INDEX.to_string()),
            manifests: Vec::new(),
            annotations: None,
        }
    };
    index.manifests.retain(|d| d.ref_name() != Some(tag));
    let mut desc = Descriptor::new(OCI_MANIFEST, &manifest_digest, manifest_bytes.len() as u64);
    desc.annotations = Some(BTreeMap::from([(REF_NAME.to_string(), tag.to_string())]));
    if !record.os.is_empty() && !record.architecture.is_empty() {
        desc.platform = Some(Platform {
            architecture: record.architecture.clone(),
            os: record.os.clone(),
            variant: None,
            os_version: None,
        });
    }
    index.manifests.push(desc);
    let json = serde_json::to_vec(&index).map_err(bad_json("index.json"))?;
    write_atomic(&index_path, &json)?;
    // write_atomic makes 0600 files: a layout is meant to be read by the user's tools.
    for p in [&index_path, &marker] {
        set_mode_644(p)?;
    }
    Ok(manifest_digest)
}

fn set_mode_644(p: &Path) -> Result<(), OciError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(0o644)).map_err(io_err("chmod", p))
}

/// The OCI manifest to export: the stored one when it is OCI and matches the record.
fn export_manifest(store: &Store, record: &ImageRecord) -> Result<(Digest, Vec<u8>), OciError> {
    if let Ok(bytes) = store.read(&record.manifest_digest) {
        if Digest::of(&bytes) == record.manifest_digest {
            if let Ok(ManifestKind::Image(m)) = parse_manifest("stored manifest", &bytes, None) {
                let is_oci = m.media_type.as_deref().unwrap_or(OCI_MANIFEST) == OCI_MANIFEST
                    && m.config.media_type == OCI_CONFIG
                    && m.layers
                        .iter()
                        .all(|l| l.media_type.starts_with("application/vnd.oci."));
                let same = m.config.digest().ok().as_ref() == Some(&record.config_digest)
                    && m.layers.len() == record.layers.len()
                    && m.layers
                        .iter()
                        .zip(&record.layers)
                        .all(|(a, b)| a.digest().ok().as_ref() == Some(&b.digest));
                if is_oci && same {
                    return Ok((record.manifest_digest.clone(), bytes));
                }
            }
        }
    }
    let layers = record
        .layers
        .iter()
        .map(|l| {
            let c =
                layer_compression(&l.media_type).ok_or_else(|| OciError::UnsupportedMediaType {
                    what: format!("image {} layer {}", record.id, l.digest),
                    media_type: l.media_type.clone(),
                })?;
            Ok(Descriptor::new(oci_layer_media_type(c), &l.digest, l.size))
        })
        .collect::<Result<Vec<_>, OciError>>()?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.to_string()),
        config: Descriptor::new(
            OCI_CONFIG,
            &record.config_digest,
            store.size(&record.config_digest)?,
        ),
        layers,
        annotations: None,
    };
    let bytes = serde_json::to_vec(&manifest).map_err(bad_json("manifest"))?;
    Ok((Digest::of(&bytes), bytes))
}

/// Copy a blob from the store into a layout's `blobs/sha256`, hashing it on the way (a store
/// blob that rotted is not exported). A blob already there with the right content is kept.
fn copy_blob(store: &Store, digest: &Digest, blobs: &Path) -> Result<(), OciError> {
    let dest = blobs.join(digest.hex());
    if let Ok(mut f) = File::open(&dest) {
        let mut h = Sha256::new();
        if io::copy(&mut f, &mut h).is_ok() && Digest::from_hasher(h) == *digest {
            return Ok(());
        }
    }
    let mut src = store.open(digest)?;
    let tmp = blobs.join(format!(".tmp-{}-{}", digest.hex(), std::process::id()));
    let res = (|| {
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("read", &store.blob_path(digest))(e)),
            };
            h.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err("write", &tmp))?;
        }
        let actual = Digest::from_hasher(h);
        if actual != *digest {
            return Err(OciError::Store(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
                size: out.metadata().map(|m| m.len()).unwrap_or(0),
            }));
        }
        out.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, &dest).map_err(io_err("rename into place", &dest))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

fn write_blob_bytes(blobs: &Path, digest: &Digest, bytes: &[u8]) -> Result<(), OciError> {
    let dest = blobs.join(digest.hex());
    write_atomic(&dest, bytes)?;
    set_mode_644(&dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse() {
        let d = Digest::of(b"layer");
        let json = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin","A=b"],
            "Entrypoint":null,"Cmd":["sh"],"WorkingDir":"/w","User":"1000:1000",
            "ExposedPorts":{{"80/tcp":{{}},"53/udp":{{}}}}}},
            "rootfs":{{"type":"layers","diff_ids":["{d}"]}},"history":[]}}"#
        );
        let p = parse_config("test", json.as_bytes()).unwrap();
        assert_eq!(p.diff_ids, vec![d]);
        assert_eq!(p.config.env, vec!["PATH=/bin", "A=b"]);
        assert_eq!(p.config.entrypoint, None);
        assert_eq!(p.config.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(p.config.working_dir.as_deref(), Some("/w"));
        assert_eq!(p.config.user.as_deref(), Some("1000:1000"));
        assert_eq!(p.config.exposed_ports, vec!["53/udp", "80/tcp"]);
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "amd64"));

        let minimal = r#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let p = parse_config("test", minimal.as_bytes()).unwrap();
        assert_eq!(p.config, ImageConfig::default());

        let e = parse_config(
            "cfg",
            br#"{"rootfs":{"type":"layers","diff_ids":["md5:x"]}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("cfg rootfs.diff_ids"), "{e}");
        assert!(parse_config("cfg", b"{}").is_err());
    }

    fn entry(os: &str, arch: &str, variant: Option<&str>, n: u8) -> Descriptor {
        let mut d = Descriptor::new(OCI_MANIFEST, &Digest::of(&[n]), 1);
        d.platform = Some(Platform {
            architecture: arch.into(),
            os: os.into(),
            variant: variant.map(str::to_string),
            os_version: None,
        });
        d
    }

    #[test]
    fn platform_selection() {
        let host = host_platform();
        let entries = vec![
            entry("unknown", "unknown", None, 0),
            entry("windows", &host.architecture, None, 1),
            entry("linux", "s390x", None, 2),
            entry("linux", &host.architecture, Some("v7"), 3),
            entry("linux", &host.architecture, None, 4),
        ];
        assert_eq!(select_platform("x", &entries).unwrap(), &entries[4]);
        assert_eq!(select_platform("x", &entries[..4]).unwrap(), &entries[3]);
        let e = select_platform("idx", &entries[..3])
            .unwrap_err()
            .to_string();
        assert!(e.contains("idx") && e.contains("linux/s390x"), "{e}");
    }

    #[test]
    fn manifests_are_told_apart() {
        let d = Digest::of(b"c");
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{d}","size":1}},"layers":[]}}"#
        );
        assert!(matches!(
            parse_manifest("m", m.as_bytes(), None).unwrap(),
            ManifestKind::Image(_)
        ));
        let i = r#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            parse_manifest("i", i.as_bytes(), None).unwrap(),
            ManifestKind::Index(_)
        ));
        let v1 = r#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(parse_manifest("v1", v1.as_bytes(), None).is_err());
        let art =
            r#"{"schemaVersion":2,"mediaType":"application/vnd.cncf.helm.chart","layers":[]}"#;
        let e = parse_manifest("art", art.as_bytes(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("helm"), "{e}");
    }

    #[test]
    fn tar_paths_normalize() {
        assert_eq!(norm_tar_path("./a/b").as_deref(), Some("a/b"));
        assert_eq!(norm_tar_path("a/../b").as_deref(), Some("b"));
        assert_eq!(norm_tar_path("../b"), None);
        assert_eq!(
            digest_in_name(&format!("blobs/sha256/{}", "a".repeat(64))),
            Some(Digest::from_hex(&"a".repeat(64)).unwrap())
        );
        assert_eq!(
            digest_in_name(&format!("{}.json", "b".repeat(64))),
            Some(Digest::from_hex(&"b".repeat(64)).unwrap())
        );
        assert_eq!(digest_in_name("abc/layer.tar"), None);
    }
}
