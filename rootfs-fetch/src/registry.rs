//! Pull images from registries over the OCI distribution API (through the `oci-client` crate)
//! into the [`Store`]: tag → manifest digest, index → this host's platform, layers fetched
//! concurrently and verified while they stream, layers already stored skipped, interrupted
//! downloads resumed with HTTP Range requests.
//!
//! Transport: plain HTTP only for loopback registries (127.0.0.0/8, ::1, `localhost`), HTTPS
//! (rustls) for every other. Blobs are only ever fetched from the registry itself: descriptor
//! `urls` (foreign layers) are ignored.
//!
//! Credentials: a docker `config.json`-style file, `{"auths": {"REGISTRY": {"auth":
//! base64("user:password")}}}` (or `username`/`password` fields), read from `$SBX_REGISTRY_AUTH`
//! when set, else `<state>/auth.json` ([`credentials_path`]). A registry with no entry is pulled
//! anonymously; oci-client does the bearer-token exchange either way. Credential helpers
//! (`credsStore`, `credHelpers`) and `identitytoken` are not supported.
//!
//! Layer diff_ids come from the config's `rootfs.diff_ids` and are NOT checked here (that needs
//! decompression): the unpacker must hash the uncompressed stream and compare.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::Client;

use crate::oci::{self, ManifestKind, OciError, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST};
use crate::reference::RegistryRef;
use crate::store::{Digest, ImageRecord, Store, StoreError};

/// Layers downloaded at once by default.
pub const DEFAULT_CONCURRENCY: usize = 3;
/// Environment variable naming the credentials file.
pub const AUTH_ENV: &str = "SBX_REGISTRY_AUTH";

/// Where a pull tells how it goes, per layer (for progress bars). Called from blocking threads,
/// several layers at once.
pub trait Progress: Send + Sync {
    /// A layer is about to be fetched (or found in the store).
    fn layer_started(&self, _digest: &Digest, _size: u64) {}
    /// An interrupted download of this layer goes on from `offset` (bytes already stored).
    fn layer_resumed(&self, _digest: &Digest, _offset: u64) {}
    /// `n` more bytes of the layer arrived.
    fn layer_bytes(&self, _digest: &Digest, _n: u64) {}
    /// The layer is complete and verified; `skipped` when it was already in the store.
    fn layer_done(&self, _digest: &Digest, _skipped: bool) {}
}

/// Progress that nobody watches.
pub struct NoProgress;
impl Progress for NoProgress {}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Layers fetched at once (at least 1).
    pub concurrency: usize,
    /// A docker `config.json`-style credentials file; `None`: anonymous only.
    pub credentials: Option<PathBuf>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            concurrency: DEFAULT_CONCURRENCY,
            credentials: None,
        }
    }
}

impl PullOptions {
    /// Defaults, with the credentials file of [`credentials_path`].
    pub fn for_state_dir(state_dir: &Path) -> PullOptions {
        PullOptions {
            credentials: Some(credentials_path(state_dir)),
            ..PullOptions::default()
        }
    }
}

/// The credentials file: `$SBX_REGISTRY_AUTH` when set and not empty, else
/// `<state_dir>/auth.json`.
pub fn credentials_path(state_dir: &Path) -> PathBuf {
    match std::env::var_os(AUTH_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => state_dir.join("auth.json"),
    }
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    pub record: ImageRecord,
    /// Layers fetched from the registry, in manifest order.
    pub downloaded: Vec<Digest>,
    /// Layers that were already in the store, in manifest order.
    pub skipped: Vec<Digest>,
    /// Layers whose download went on from an earlier partial one, with the offset.
    pub resumed: Vec<(Digest, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("failed to {step} for {reference}: {source}")]
    Client {
        step: &'static str,
        reference: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("failed to download blob {digest} of {reference}: {reason}")]
    Download {
        reference: String,
        digest: Digest,
        reason: String,
    },
    #[error("blob {digest} of {reference} failed verification while streaming ({reason}); nothing was kept")]
    Corrupt {
        reference: String,
        digest: Digest,
        reason: String,
    },
    #[error("manifest of {reference} hashes to {actual}, not the pinned {expected}")]
    ManifestMismatch {
        reference: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("credentials file {path}: {reason}")]
    Credentials { path: PathBuf, reason: String },
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a download task of {reference} failed: {reason}")]
    Task { reference: String, reason: String },
}

/// What kind of failure a pull was, for callers that report it with a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The registry has no such repository, tag or manifest.
    NotFound,
    /// The registry refused the credentials (or wants some).
    Denied,
    /// The image or the credentials file is not usable as given (no manifest for this
    /// platform, an unsupported media type, a malformed file).
    Invalid,
    /// The registry could not be reached in time.
    Timeout,
    /// Anything else (network, a corrupt download, the local store).
    Other,
}

impl RegistryError {
    /// The kind of this failure.
    pub fn kind(&self) -> FailureKind {
        use oci_client::errors::OciErrorCode as C;
        match self {
            RegistryError::Client { source, .. } => match source {
                OciDistributionError::ImageManifestNotFoundError(_) => FailureKind::NotFound,
                OciDistributionError::AuthenticationFailure(_)
                | OciDistributionError::UnauthorizedError { .. } => FailureKind::Denied,
                OciDistributionError::ImageIndexParsingNoPlatformResolverError
                | OciDistributionError::UnsupportedMediaTypeError(_)
                | OciDistributionError::IncompatibleLayerMediaTypeError(_) => FailureKind::Invalid,
                OciDistributionError::ServerError { code: 404, .. } => FailureKind::NotFound,
                OciDistributionError::ServerError {
                    code: 401 | 403, ..
                } => FailureKind::Denied,
                OciDistributionError::RequestError(e) if e.is_timeout() => FailureKind::Timeout,
                OciDistributionError::RegistryError { envelope, .. } => {
                    let codes: Vec<&C> = envelope.errors.iter().map(|e| &e.code).collect();
                    if codes.iter().any(|c| {
                        matches!(
                            c,
                            C::ManifestUnknown | C::NameUnknown | C::NotFound | C::BlobUnknown
                        )
                    }) {
                        FailureKind::NotFound
                    } else if codes
                        .iter()
                        .any(|c| matches!(c, C::Unauthorized | C::Denied))
                    {
                        FailureKind::Denied
                    } else {
                        FailureKind::Other
                    }
                }
                _ => FailureKind::Other,
            },
            RegistryError::Credentials { .. } => FailureKind::Invalid,
            RegistryError::Oci(
                OciError::NoPlatform { .. }
                | OciError::UnsupportedMediaType { .. }
                | OciError::TooLarge { .. }
                | OciError::LayerCount { .. },
            ) => FailureKind::Invalid,
            _ => FailureKind::Other,
        }
    }
}

/// Media types asked for when fetching manifests.
const ACCEPT: &[&str] = &[
    oci::OCI_MANIFEST,
    oci::OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// Nested indexes followed at most this deep.
const MAX_INDEX_DEPTH: usize = 4;

/// HTTP for loopback registries only.
fn protocol_for(r: &RegistryRef) -> ClientProtocol {
    if r.is_loopback() {
        ClientProtocol::HttpsExcept(vec![r.registry.clone()])
    } else {
        ClientProtocol::Https
    }
}

/// Basic-auth credentials for a registry from a docker `config.json`-style file; `None` when
/// the file or the entry is missing.
pub fn load_credentials(
    path: &Path,
    registry: &str,
) -> Result<Option<(String, String)>, RegistryError> {
    let bad = |reason: String| RegistryError::Credentials {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(format!("cannot read: {e}"))),
    };
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        auth: Option<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
    }
    let f: File =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let wanted: Vec<&str> = if registry == "docker.io" {
        vec!["docker.io", "index.docker.io", "registry-1.docker.io"]
    } else {
        vec![registry]
    };
    for (key, entry) in &f.auths {
        // Keys may be bare hosts or URLs (`https://index.docker.io/v1/`).
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        if !wanted.contains(&host) {
            continue;
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some((u.clone(), p.clone())));
        }
        let Some(auth) = &entry.auth else {
            return Err(bad(format!("entry {key:?} has no auth")));
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| bad(format!("entry {key:?}: auth is not base64: {e}")))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| bad(format!("entry {key:?}: auth is not UTF-8")))?;
        let (u, p) = decoded
            .split_once(':')
            .ok_or_else(|| bad(format!("entry {key:?}: auth is not user:password")))?;
        return Ok(Some((u.to_string(), p.to_string())));
    }
    Ok(None)
}

/// Pull an image into the store and save its record, tagged under the reference as given and
/// under `registry/repository@<digest>` (the index digest when there is one, else the
/// manifest's). Returns what was downloaded and skipped.
pub async fn pull(
    store: &Store,
    reference: &RegistryRef,
    opts: &PullOptions,
    progress: Arc<dyn Progress>,
) -> Result<PullReport, RegistryError> {
    let refname = reference.to_string();
    let auth = match &opts.credentials {
        Some(path) => match load_credentials(path, &reference.registry)? {
            Some((u, p)) => RegistryAuth::Basic(u, p),
            None => RegistryAuth::Anonymous,
        },
        None => RegistryAuth::Anonymous,
    };
    let client = Arc::new(Client::new(ClientConfig {
        protocol: protocol_for(reference),
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(120)),
        ..ClientConfig::default()
    }));
    let base = match (&reference.tag, &reference.digest) {
        (_, Some(d)) => oci_client::Reference::with_digest(
            reference.registry.clone(),
            reference.repository.clone(),
            d.to_string(),
        ),
        (Some(t), None) => oci_client::Reference::with_tag(
            reference.registry.clone(),
            reference.repository.clone(),
            t.clone(),
        ),
        (None, None) => oci_client::Reference::with_tag(
            reference.registry.clone(),
            reference.repository.clone(),
            crate::reference::DEFAULT_TAG.to_string(),
        ),
    };
    let client_err = |step| {
        let reference = refname.clone();
        move |source| RegistryError::Client {
            step,
            reference,
            source,
        }
    };

    // Manifest (through indexes to this host's platform), kept as raw bytes.
    let mut oref = base.clone();
    let mut index_digest: Option<Digest> = None;
    let mut index_bytes: Option<Vec<u8>> = None;
    let mut pinned = reference.digest.clone();
    let (manifest, manifest_digest, manifest_bytes) = {
        let mut depth = 0;
        loop {
            let (bytes, _) = client
                .pull_manifest_raw(&oref, &auth, ACCEPT)
                .await
                .map_err(client_err("fetch the manifest"))?;
            let actual = Digest::of(&bytes);
            if let Some(expected) = pinned.take() {
                if expected != actual {
                    return Err(RegistryError::ManifestMismatch {
                        reference: refname,
                        expected,
                        actual,
                    });
                }
            }
            let what = format!("{refname} manifest {actual}");
            match oci::parse_manifest(&what, &bytes, None)? {
                ManifestKind::Image(m) => break (*m, actual, bytes.to_vec()),
                ManifestKind::Index(idx) => {
                    depth += 1;
                    if depth > MAX_INDEX_DEPTH {
                        return Err(OciError::UnsupportedMediaType {
                            what,
                            media_type: format!("indexes nested deeper than {MAX_INDEX_DEPTH}"),
                        }
                        .into());
                    }
                    let entry = oci::select_platform(&what, &idx.manifests)?;
                    let d = entry.digest().map_err(|source| OciError::BadDigest {
                        what: format!("{what} entry"),
                        source,
                    })?;
                    if index_digest.is_none() {
                        index_digest = Some(actual);
                        index_bytes = Some(bytes.to_vec());
                    }
                    oref = base.clone_with_digest(d.to_string());
                    pinned = Some(d);
                }
            }
        }
    };
    let what = format!("{refname} manifest {manifest_digest}");
    oci::check_config_media_type(&what, &manifest.config.media_type)?;
    let config_digest = manifest
        .config
        .digest()
        .map_err(|source| OciError::BadDigest {
            what: format!("{what} config"),
            source,
        })?;
    if manifest.config.size > oci::MAX_JSON_BLOB {
        return Err(OciError::TooLarge {
            what: format!("{what} config"),
            size: manifest.config.size,
            limit: oci::MAX_JSON_BLOB,
        }
        .into());
    }
    let mut layers: Vec<(Digest, u64)> = Vec::new();
    for (i, l) in manifest.layers.iter().enumerate() {
        let d = l.digest().map_err(|source| OciError::BadDigest {
            what: format!("{what} layer {i}"),
            source,
        })?;
        oci::check_layer_media_type(&what, &d, &l.media_type)?;
        layers.push((d, l.size));
    }

    let fetcher = Fetcher {
        client: client.clone(),
        oref: oref.clone(),
        store: store.clone(),
        reference: refname.clone(),
        handle: tokio::runtime::Handle::current(),
    };

    // Config first (small, and it must parse before layers are worth fetching).
    fetcher
        .fetch(
            config_digest.clone(),
            manifest.config.size,
            Arc::new(NoProgress),
        )
        .await?;
    let config_bytes = store.read(&config_digest)?;
    let record = oci::build_record(
        &refname,
        manifest_digest.clone(),
        index_digest.clone(),
        &manifest,
        &config_bytes,
    )?;

    // Layers, a few at once; every task is waited for, so that nothing is still writing when
    // this returns.
    let unique: Vec<(Digest, u64)> = {
        let mut seen = BTreeSet::new();
        layers
            .iter()
            .filter(|(d, _)| seen.insert(d.clone()))
            .cloned()
            .collect()
    };
    let results: Vec<(Digest, Result<Fetched, RegistryError>)> = futures_util::stream::iter(unique)
        .map(|(d, size)| {
            let fetcher = &fetcher;
            let progress = progress.clone();
            async move {
                let r = fetcher.fetch(d.clone(), size, progress).await;
                (d, r)
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .collect()
        .await;
    let mut downloaded = Vec::new();
    let mut skipped = Vec::new();
    let mut resumed = Vec::new();
    let mut first_err = None;
    let mut by_digest = std::collections::HashMap::new();
    for (d, r) in results {
        match r {
            Ok(f) => {
                by_digest.insert(d, f);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    for (d, _) in &layers {
        match by_digest.remove(d) {
            Some(Fetched::Skipped) => skipped.push(d.clone()),
            Some(Fetched::Downloaded { resumed_from }) => {
                if resumed_from > 0 {
                    resumed.push((d.clone(), resumed_from));
                }
                downloaded.push(d.clone());
            }
            None => {} // a layer listed twice
        }
    }

    if let (Some(d), Some(b)) = (&index_digest, &index_bytes) {
        store.put_bytes(d, b)?;
    }
    store.put_bytes(&manifest_digest, &manifest_bytes)?;
    store.save_image(&record)?;
    store.set_tag(&refname, &record.id)?;
    let pin = reference.with_digest(index_digest.unwrap_or(manifest_digest));
    let pin = RegistryRef { tag: None, ..pin };
    store.set_tag(&pin.to_string(), &record.id)?;
    Ok(PullReport {
        record,
        downloaded,
        skipped,
        resumed,
    })
}

enum Fetched {
    Skipped,
    Downloaded { resumed_from: u64 },
}

/// Fetches blobs of one repository into the store.
struct Fetcher {
    client: Arc<Client>,
    oref: oci_client::Reference,
    store: Store,
    reference: String,
    handle: tokio::runtime::Handle,
}

/// Whether a stream error is oci-client's digest check failing (the content is wrong, not the
/// connection).
fn is_digest_error(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| {
        inner
            .downcast_ref::<oci_client::errors::DigestError>()
            .is_some()
    })
}

impl Fetcher {
    /// Fetch one blob into the store unless it is there. The store's writer does the locking,
    /// resuming and verification; this runs on a blocking thread and drives the HTTP stream
    /// from there.
    async fn fetch(
        &self,
        digest: Digest,
        size: u64,
        progress: Arc<dyn Progress>,
    ) -> Result<Fetched, RegistryError> {
        progress.layer_started(&digest, size);
        if self.store.has(&digest) {
            progress.layer_done(&digest, true);
            return Ok(Fetched::Skipped);
        }
        let client = self.client.clone();
        let oref = self.oref.clone();
        let store = self.store.clone();
        let reference = self.reference.clone();
        let handle = self.handle.clone();
        let d = digest.clone();
        let p = progress.clone();
        let res = tokio::task::spawn_blocking(move || {
            fetch_blocking(&client, &oref, &store, &reference, &handle, &d, size, &*p)
        })
        .await
        .map_err(|e| RegistryError::Task {
            reference: self.reference.clone(),
            reason: e.to_string(),
        })??;
        progress.layer_done(&digest, matches!(res, Fetched::Skipped));
        Ok(res)
    }
}

#[allow(clippy::too_many_arguments)]
fn fetch_blocking(
    client: &Client,
    oref: &oci_client::Reference,
    store: &Store,
    reference: &str,
    handle: &tokio::runtime::Handle,
    digest: &Digest,
    size: u64,
    progress: &dyn Progress,
) -> Result<Fetched, RegistryError> {
    let digest_str = digest.to_string();
    let download_err = |reason: String| RegistryError::Download {
        reference: reference.to_string(),
        digest: digest.clone(),
        reason,
    };
    // Two rounds at most: a resumed download whose whole fails verification (the partial bytes
    // were bad) is fetched once more from byte 0.
    for round in 0..2 {
        let Some(mut w) = store.writer(digest, Some(size))? else {
            return Ok(Fetched::Skipped);
        };
        let offset = w.offset();
        if offset > 0 {
            progress.layer_resumed(digest, offset);
        }
        if offset < size {
            let resp = handle
                .block_on(client.pull_blob_stream_partial(oref, digest_str.as_str(), offset, None))
                .map_err(|source| RegistryError::Client {
                    step: "fetch a blob",
                    reference: reference.to_string(),
                    source,
                })?;
            let mut stream = match resp {
                BlobResponse::Partial(s) => s,
                BlobResponse::Full(s) => {
                    // The registry ignored the range: start over.
                    w.restart()?;
                    s
                }
            };
            while let Some(chunk) = handle.block_on(stream.next()) {
                match chunk {
                    Ok(bytes) => {
                        w.write_all(&bytes).map_err(|e| match e {
                            StoreError::SizeMismatch { .. } => RegistryError::Corrupt {
                                reference: reference.to_string(),
                                digest: digest.clone(),
                                reason: e.to_string(),
                            },
                            other => other.into(),
                        })?;
                        progress.layer_bytes(digest, bytes.len() as u64);
                    }
                    Err(e) if is_digest_error(&e) => {
                        w.discard();
                        return Err(RegistryError::Corrupt {
                            reference: reference.to_string(),
                            digest: digest.clone(),
                            reason: e.to_string(),
                        });
                    }
                    // The connection failed: the partial file stays for the next pull.
                    Err(e) => return Err(download_err(e.to_string())),
                }
            }
        }
        match w.finish() {
            Ok(_) => {
                return Ok(Fetched::Downloaded {
                    resumed_from: offset,
                })
            }
            Err(StoreError::DigestMismatch { .. }) if offset > 0 && round == 0 => continue,
            Err(e @ (StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. })) => {
                return Err(RegistryError::Corrupt {
                    reference: reference.to_string(),
                    digest: digest.clone(),
                    reason: e.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(download_err("verification failed twice".into()))
}

/// Every descriptor of a manifest that must be in the store for the image to be complete.
pub fn required_blobs(record: &ImageRecord) -> Vec<Digest> {
    let mut v = vec![record.manifest_digest.clone(), record.config_digest.clone()];
    v.extend(record.layers.iter().map(|l| l.digest.clone()));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_only_for_loopback() {
        for (r, http) in [
            ("127.0.0.1:5000/a", true),
            ("127.3.2.1/a", true),
            ("localhost:5000/a", true),
            ("[::1]:5000/a", true),
            ("10.0.0.1:5000/a", false),
            ("ghcr.io/a", false),
            ("busybox", false),
            ("localhost.evil.com/a", false),
        ] {
            let r: RegistryRef = r.parse().unwrap();
            let p = protocol_for(&r);
            assert_eq!(p != ClientProtocol::Https, http, "{r}");
            if http {
                assert_eq!(p, ClientProtocol::HttpsExcept(vec![r.registry.clone()]));
            }
        }
    }

    #[test]
    fn credentials_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        assert_eq!(load_credentials(&path, "x").unwrap(), None);
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{b64}"}},
                "https://index.docker.io/v1/":{{"username":"bob","password":"pw"}},
                "bad.example":{{"auth":"!!"}}}}}}"#
            ),
        )
        .unwrap();
        assert_eq!(
            load_credentials(&path, "127.0.0.1:5000").unwrap(),
            Some(("alice".into(), "s3:cret".into()))
        );
        assert_eq!(
            load_credentials(&path, "docker.io").unwrap(),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(load_credentials(&path, "127.0.0.1:5001").unwrap(), None);
        let e = load_credentials(&path, "bad.example")
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.json") && e.contains("base64"), "{e}");
        std::fs::write(&path, "{").unwrap();
        assert!(load_credentials(&path, "x").is_err());
    }

    #[test]
    fn credentials_path_default() {
        // Only the default: the variable may be set by whoever runs the tests.
        if std::env::var_os(AUTH_ENV).is_none() {
            assert_eq!(
                credentials_path(Path::new("/var/lib/sbx")),
                Path::new("/var/lib/sbx/auth.json")
            );
        }
    }
}
