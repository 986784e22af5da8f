//! The image calls of sbxd (see [`crate::api::images`]): pull with a streamed progress line per
//! layer event, list, inspect, remove (then garbage-collect blobs and unpacked layers no image
//! needs any more), export to an OCI layout, and snapshot a running sandbox into a new image.
//! The content store itself is rootfs-fetch's (`<state>/images`).

use super::server::{parse, Fail};
use super::{internal, lock, off_thread, Daemon, FetchImage};
use crate::api::images::{
    ExportImage, ExportResult, ImageConfigInfo, ImageInfo, LayerInfo, PullEvent, PullImage,
};
use crate::api::{self, ApiError, ErrorCode, SandboxStatus};
use crate::runtime;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rootfs_fetch::store::{Digest, ImageId, ImageRecord, Store};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type R<T> = Result<T, Fail>;
type D = State<Arc<Daemon>>;

/// How often a layer's byte count is reported while it downloads, at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Where the build cache keeps one file per step key holding the resulting `im-…` id.
const BUILD_CACHE: &str = "build-cache";

pub(crate) fn image_routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/images", get(list))
        .route("/v1/images/pull", post(pull))
        .route("/v1/images/export", post(export))
        .route("/v1/images/{*reference}", get(inspect).delete(remove))
        .route("/v1/sandboxes/{id}/snapshot", post(snapshot))
}

fn open_store(d: &Daemon) -> Result<Store, ApiError> {
    rootfs_fetch::image_store(&d.cfg.state_dir)
        .map_err(|e| internal(format!("open the image store: {e}")))
}

fn store_err(what: &str) -> impl FnOnce(rootfs_fetch::store::StoreError) -> ApiError + '_ {
    move |e| internal(format!("{what}: {e}"))
}

/// The wire form of a stored image; `tags` are the store's (reference, id) pairs.
pub(crate) fn image_info(rec: &ImageRecord, tags: &[(String, ImageId)]) -> ImageInfo {
    let mut references: Vec<String> = tags
        .iter()
        .filter(|(_, id)| *id == rec.id)
        .map(|(r, _)| r.clone())
        .collect();
    references.sort();
    let c = &rec.config;
    ImageInfo {
        id: rec.id.to_string(),
        references,
        source: rec.reference.clone(),
        created_at: rec.created_at as f64,
        size: rec.layers.iter().map(|l| l.size).sum(),
        os: rec.os.clone(),
        architecture: rec.architecture.clone(),
        layers: rec
            .layers
            .iter()
            .map(|l| LayerInfo {
                digest: l.digest.to_string(),
                diff_id: l.diff_id.to_string(),
                size: l.size,
            })
            .collect(),
        config: ImageConfigInfo {
            env: c.env.clone(),
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            working_dir: c.working_dir.clone(),
            user: c.user.clone(),
            exposed_ports: c.exposed_ports.clone(),
        },
        host_base: rec.host_base,
        parent: rec.parent.as_ref().map(|p| p.to_string()),
    }
}

/// The info of one image, with its references read from the store.
pub(crate) fn info_of(store: &Store, rec: &ImageRecord) -> Result<ImageInfo, ApiError> {
    let tags = store.list_tags().map_err(store_err("list image tags"))?;
    Ok(image_info(rec, &tags))
}

/// The store's tag that `text` names: as written (a build tag, `oci:…`), else in the
/// normalized form of a registry reference (`busybox` → `docker.io/library/busybox:latest`).
fn find_tag(store: &Store, text: &str) -> Result<Option<(String, ImageId)>, ApiError> {
    if let Some(id) = store
        .resolve_tag(text)
        .map_err(store_err("read an image tag"))?
    {
        return Ok(Some((text.to_string(), id)));
    }
    if let Ok(parsed) = rootfs_fetch::reference::Reference::parse(text) {
        let norm = parsed.to_string();
        if norm != text {
            if let Some(id) = store
                .resolve_tag(&norm)
                .map_err(store_err("read an image tag"))?
            {
                return Ok(Some((norm, id)));
            }
        }
    }
    Ok(None)
}

fn no_image(text: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!(
            "no image {text:?} in the store (an im-… id or a reference it has; see GET /v1/images)"
        ),
    )
}

/// An image by `im-…` id or by a reference the store has.
fn find_image(store: &Store, text: &str) -> Result<ImageRecord, ApiError> {
    let id = match ImageId::parse(text) {
        Ok(id) => id,
        Err(_) => match find_tag(store, text)? {
            Some((_, id)) => id,
            None => return Err(no_image(text)),
        },
    };
    store.load_image(&id).map_err(|e| match e {
        rootfs_fetch::store::StoreError::ImageMissing { .. } => no_image(text),
        e => internal(format!("read image {id}: {e}")),
    })
}

// ---- pull ----

/// Turns rootfs-fetch's per-layer callbacks (called from blocking threads) into pull events,
/// byte counts at most every [`PROGRESS_EVERY`] per layer; also logs as a create's pull does.
struct PullEvents {
    tx: tokio::sync::mpsc::UnboundedSender<PullEvent>,
    /// Per layer: (bytes so far, size, when the count was last sent).
    layers: Mutex<HashMap<Digest, (u64, u64, Instant)>>,
    log: super::PullLog,
}

impl rootfs_fetch::registry::Progress for PullEvents {
    fn layer_started(&self, digest: &Digest, size: u64) {
        lock(&self.layers).insert(digest.clone(), (0, size, Instant::now()));
        let _ = self.tx.send(PullEvent::LayerStarted {
            digest: digest.to_string(),
            size,
        });
    }

    fn layer_resumed(&self, digest: &Digest, offset: u64) {
        if let Some(l) = lock(&self.layers).get_mut(digest) {
            l.0 = offset;
        }
        self.log.layer_resumed(digest, offset);
    }

    fn layer_bytes(&self, digest: &Digest, n: u64) {
        let due = {
            let mut m = lock(&self.layers);
            match m.get_mut(digest) {
                Some(l) => {
                    l.0 += n;
                    if l.2.elapsed() >= PROGRESS_EVERY {
                        l.2 = Instant::now();
                        Some((l.0, l.1))
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        if let Some((done, size)) = due {
            let _ = self.tx.send(PullEvent::LayerProgress {
                digest: digest.to_string(),
                done,
                size,
            });
        }
    }

    fn layer_done(&self, digest: &Digest, skipped: bool) {
        let last = lock(&self.layers).remove(digest);
        if let (Some((_, size, _)), false) = (last, skipped) {
            let _ = self.tx.send(PullEvent::LayerProgress {
                digest: digest.to_string(),
                done: size,
                size,
            });
        }
        let _ = self.tx.send(PullEvent::LayerDone {
            digest: digest.to_string(),
            cached: skipped,
        });
        self.log.layer_done(digest, skipped);
    }
}

fn ndjson(rx: tokio::sync::mpsc::UnboundedReceiver<PullEvent>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).unwrap_or_else(|e| {
            format!("{{\"error\":{{\"code\":\"internal\",\"message\":\"encode an event: {e}\"}}}}")
                .into_bytes()
        });
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(Bytes::from(line)), rx))
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn pull(State(d): D, body: Bytes) -> R<Response> {
    let req: PullImage = parse("pull", &body)?;
    let f: FetchImage = match d.pull_source(&req.reference) {
        Ok(f) => f,
        Err(Err(e)) => return Err(e.into()),
        // An id: nothing to fetch; it is in the store or it is not.
        Err(Ok(id)) => {
            let store = open_store(&d)?;
            let rec = find_image(&store, id.as_str())?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let _ = tx.send(PullEvent::Done {
                image: info_of(&store, &rec)?,
            });
            return Ok(ndjson(rx));
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let progress = Arc::new(PullEvents {
        tx: tx.clone(),
        layers: Mutex::new(HashMap::new()),
        log: super::PullLog {
            sandbox: "-".into(),
            image: f.text.clone(),
        },
    });
    // The pull goes on if the client goes away (as `docker pull`): its layers are kept.
    tokio::spawn(async move {
        tracing::info!(image = %f.text, "pull requested");
        let r = d.resolve_image("-", &f, progress, true).await;
        let last = match r {
            Ok(rec) => {
                let d2 = d.clone();
                match off_thread(move || {
                    let store = rootfs_fetch::image_store(&d2.cfg.state_dir)
                        .map_err(|e| format!("open the image store: {e}"))?;
                    info_of(&store, &rec).map_err(|e| e.message)
                })
                .await
                {
                    Ok(image) => PullEvent::Done { image },
                    Err(e) => PullEvent::Error(internal(e)),
                }
            }
            Err(e) => {
                tracing::warn!(image = %f.text, error = %e.message, "pull failed");
                PullEvent::Error(ApiError::new(
                    e.code,
                    format!("image {}: {}", f.text, e.message),
                ))
            }
        };
        let _ = tx.send(last);
    });
    Ok(ndjson(rx))
}

// ---- list, inspect ----

async fn list(State(d): D) -> R<Json<Vec<ImageInfo>>> {
    let d2 = d.clone();
    let v = off_thread(move || {
        let store = open_store(&d2).map_err(|e| e.message)?;
        let recs = store
            .list_images()
            .map_err(|e| format!("list images: {e}"))?;
        let tags = store
            .list_tags()
            .map_err(|e| format!("list image tags: {e}"))?;
        let mut v: Vec<ImageInfo> = recs.iter().map(|r| image_info(r, &tags)).collect();
        v.sort_by(|a, b| {
            b.created_at
                .total_cmp(&a.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(v)
    })
    .await
    .map_err(internal)?;
    Ok(Json(v))
}

async fn inspect(State(d): D, Path(reference): Path<String>) -> R<Json<ImageInfo>> {
    let store = open_store(&d)?;
    let rec = find_image(&store, &reference)?;
    Ok(Json(info_of(&store, &rec)?))
}

// ---- remove and garbage collection ----

/// A reference that names an image (not a `…@sha256:` pin recorded beside it).
fn is_name(reference: &str) -> bool {
    !reference.contains("@sha256:")
}

/// Running (or starting) sandboxes of an image.
fn users_of(d: &Daemon, id: &ImageId) -> Vec<String> {
    let mut v: Vec<String> = lock(&d.live)
        .values()
        .filter(|l| {
            l.state.borrow().status != SandboxStatus::Finished
                && matches!(l.image_ref.get(), Some(runtime::ImageRef::Stored(i)) if i == id)
        })
        .map(|l| l.id.clone())
        .collect();
    v.sort();
    v
}

/// How long an image removal waits for the store's writers to finish.
const GC_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

async fn remove(State(d): D, Path(reference): Path<String>) -> R<StatusCode> {
    // Exclusive: no pull, import, snapshot or build is storing blobs meanwhile. Bounded: a
    // waiting writer holds back every new reader (tokio's lock is fair), and a build step may
    // hold a reader for as long as its RUN runs.
    let _gc = match tokio::time::timeout(GC_LOCK_WAIT, d.image_gc.write()).await {
        Ok(g) => g,
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "cannot remove image {reference:?} now: a pull, import, build or snapshot                      is writing to the image store; try again when it is done"
                ),
            )
            .into())
        }
    };
    let store = open_store(&d)?;
    let tags = store.list_tags().map_err(store_err("list image tags"))?;
    // By id: the image and all its references. By reference: that reference, and the image
    // once no name is left for it.
    let (id, untag) = match ImageId::parse(&reference) {
        Ok(id) => {
            if !store.has_image(&id) {
                return Err(no_image(&reference).into());
            }
            (id, None)
        }
        Err(_) => match find_tag(&store, &reference)? {
            Some((tag, id)) => (id, Some(tag)),
            None => return Err(no_image(&reference).into()),
        },
    };
    let names_left = tags
        .iter()
        .filter(|(r, i)| *i == id && is_name(r) && Some(r) != untag.as_ref())
        .count();
    let remove_image = untag.is_none() || names_left == 0;
    if remove_image {
        let users = users_of(&d, &id);
        if !users.is_empty() {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "image {id} ({reference}) is used by running sandbox(es) {}",
                    users.join(", ")
                ),
            )
            .into());
        }
    }
    // Warm sandboxes of the image hold its layers mounted: torn down first.
    let warm = if remove_image {
        d.warm.drain_image(&runtime::ImageRef::Stored(id.clone()))
    } else {
        Vec::new()
    };
    let state_dir = d.cfg.state_dir.clone();
    off_thread(move || {
        for r in warm {
            if let Err(e) = r.sandbox.destroy() {
                tracing::error!(sandbox = %r.id, error = %e, "tear down a warm sandbox");
            }
        }
        if let Some(t) = &untag {
            store
                .remove_tag(t)
                .map_err(|e| format!("remove tag {t:?}: {e}"))?;
        }
        if remove_image {
            store
                .remove_image(&id)
                .map_err(|e| format!("remove image {id}: {e}"))?;
            tracing::info!(image = %id, "image removed");
            let g = collect_garbage(&store, &state_dir)?;
            tracing::info!(
                blobs = g.blobs,
                layers = g.layers,
                cache_entries = g.cache_entries,
                "image store garbage collected"
            );
        } else {
            tracing::info!(image = %id, reference = ?untag, "image reference removed");
        }
        Ok(())
    })
    .await
    .map_err(internal)?;
    Ok(StatusCode::NO_CONTENT)
}

/// What a garbage collection removed.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    pub blobs: usize,
    pub layers: usize,
    pub cache_entries: usize,
}

/// Remove the blobs and unpacked layer directories no image record refers to any more, and
/// build-cache entries naming images that are gone. The caller holds `image_gc` exclusively
/// and no running sandbox uses a removed image (its layers would be mounted).
pub(crate) fn collect_garbage(
    store: &Store,
    state_dir: &std::path::Path,
) -> Result<Collected, String> {
    let records = store
        .list_images()
        .map_err(|e| format!("list images: {e}"))?;
    let mut keep_blobs: HashSet<String> = HashSet::new();
    let mut keep_layers: HashSet<String> = HashSet::new();
    let mut ids: HashSet<String> = HashSet::new();
    for r in &records {
        ids.insert(r.id.to_string());
        for b in rootfs_fetch::registry::required_blobs(r) {
            keep_blobs.insert(b.hex().to_string());
        }
        if let Some(i) = &r.index_digest {
            keep_blobs.insert(i.hex().to_string());
        }
        for l in r.diff_ids() {
            keep_layers.insert(l.hex().to_string());
        }
    }
    let is_hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut out = Collected::default();
    let blobs = store.root().join("blobs/sha256");
    for ent in std::fs::read_dir(&blobs)
        .map_err(|e| format!("list {}: {e}", blobs.display()))?
        .flatten()
    {
        let name = ent.file_name().to_string_lossy().into_owned();
        if !is_hex64(&name) || keep_blobs.contains(&name) {
            continue;
        }
        let Ok(digest) = Digest::from_hex(&name) else {
            continue;
        };
        match store.remove(&digest) {
            Ok(true) => out.blobs += 1,
            Ok(false) => {}
            Err(e) => return Err(format!("remove blob {digest}: {e}")),
        }
    }
    let layers = rootfs_fetch::layers_dir(state_dir);
    if let Ok(rd) = std::fs::read_dir(&layers) {
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let path = ent.path();
            if name.starts_with(".gc-") {
                // Left by an interrupted collection.
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            if !is_hex64(&name) || keep_layers.contains(&name) {
                continue;
            }
            // Renamed away first: an unpacker never takes a half-removed directory for the
            // layer (it unpacks it again instead).
            let aside = layers.join(format!(".gc-{name}-{}", std::process::id()));
            std::fs::rename(&path, &aside)
                .map_err(|e| format!("move {} aside: {e}", path.display()))?;
            std::fs::remove_dir_all(&aside)
                .map_err(|e| format!("remove {}: {e}", aside.display()))?;
            out.layers += 1;
        }
    }
    let cache = store.root().join(BUILD_CACHE);
    if let Ok(rd) = std::fs::read_dir(&cache) {
        for ent in rd.flatten() {
            let Ok(text) = std::fs::read_to_string(ent.path()) else {
                continue;
            };
            if let Some(id) = find_image_id(&text) {
                if !ids.contains(&id) && std::fs::remove_file(ent.path()).is_ok() {
                    out.cache_entries += 1;
                }
            }
        }
    }
    Ok(out)
}

/// The first `im-…` id in a text (a build-cache entry).
fn find_image_id(text: &str) -> Option<String> {
    let n = api::images::IMAGE_ID_HEX;
    text.match_indices("im-").find_map(|(i, _)| {
        let cand = text.get(i..i + 3 + n)?;
        ImageId::parse(cand).ok().map(|_| cand.to_string())
    })
}

// ---- export ----

async fn export(State(d): D, body: Bytes) -> R<Json<ExportResult>> {
    use rootfs_fetch::reference::Reference;
    let req: ExportImage = parse("export", &body)?;
    let bad_dest =
        |why: &str| ApiError::invalid("destination", format!("{:?}", req.destination), why);
    if !req.destination.starts_with("oci:") {
        return Err(bad_dest("must be oci:/absolute/path[:TAG]").into());
    }
    let (path, tag): (PathBuf, String) = match Reference::parse(&req.destination) {
        Ok(Reference::OciLayout { path, tag }) => {
            (path, tag.unwrap_or_else(|| "latest".to_string()))
        }
        Ok(_) => return Err(bad_dest("must be oci:/absolute/path[:TAG]").into()),
        Err(e) => return Err(bad_dest(&e.reason).into()),
    };
    // Owned, and moved into the blocking work: it outlives a client that hangs up.
    let reading = d.image_gc.clone().read_owned().await;
    let store = open_store(&d)?;
    let rec = find_image(&store, &req.image)?;
    if rec.host_base {
        return Err(ApiError::invalid(
            "image",
            format!("{:?} ({})", req.image, rec.id),
            "is layered on the built-in host image (its /usr is the host's): it cannot be exported",
        )
        .into());
    }
    let destination = format!("oci:{}:{tag}", path.display());
    let (id, p, t) = (rec.id.to_string(), path.clone(), tag.clone());
    let digest = tokio::task::spawn_blocking(move || {
        let _reading = reading;
        rootfs_fetch::oci::export_oci_layout(&store, &rec, &p, &t)
    })
    .await
    .map_err(|e| internal(format!("export panicked: {e}")))?
    .map_err(|e| match e {
        rootfs_fetch::oci::OciError::BadTag { .. } => ApiError::invalid(
            "destination",
            format!("{:?}", req.destination),
            &e.to_string(),
        ),
        e => internal(format!("export {id} to {destination}: {e}")),
    })?;
    tracing::info!(image = %id, destination = %destination, manifest = %digest, "image exported");
    Ok(Json(ExportResult {
        image: id,
        destination,
        manifest_digest: digest.to_string(),
    }))
}

// ---- snapshot ----

async fn snapshot(State(d): D, Path(id): Path<String>) -> R<Response> {
    if !api::is_sandbox_id(&id) {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no sandbox {id:?} (ids look like sb- and 22 letters or digits)"),
        )
        .into());
    }
    let live = d.running(&id, "snapshot").await?;
    let sb = live.sandbox().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Conflict,
            format!("sandbox {id} has finished: cannot snapshot"),
        )
    })?;
    // Owned, and moved into the blocking work: it outlives a client that hangs up.
    let writing = d.image_gc.clone().read_owned().await;
    let store = open_store(&d)?;
    let (parent, host_base) = match live.image_ref.get() {
        Some(runtime::ImageRef::Stored(i)) => {
            let rec = store
                .load_image(i)
                .map_err(|e| internal(format!("read image {i} of sandbox {id}: {e}")))?;
            let hb = rec.host_base;
            (Some(rec), hb)
        }
        Some(runtime::ImageRef::Host) => (None, true),
        Some(runtime::ImageRef::Dir(p)) => {
            return Err(ApiError::invalid(
                "sandbox",
                &id,
                &format!(
                    "runs the plain directory dir:{}: only sandboxes of host or a stored image can be snapshotted",
                    p.display()
                ),
            )
            .into())
        }
        None => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("sandbox {id} has no image yet"),
            )
            .into())
        }
    };
    let sid = id.clone();
    let started = Instant::now();
    let rec = tokio::task::spawn_blocking(move || {
        let _writing = writing;
        let (base, count) = sb.id_range();
        let upper = sb.upper_dir();
        let layer =
            rootfs_fetch::commit::layer_from_upper(&store, &upper, base, count).map_err(|e| {
                use rootfs_fetch::commit::CommitError;
                // What the sandbox put in its filesystem, not sbxd's fault: `invalid`.
                let code = match e {
                    CommitError::TooLarge { .. }
                    | CommitError::Unsupported { .. }
                    | CommitError::Changed { .. } => ErrorCode::Invalid,
                    _ => ErrorCode::Internal,
                };
                ApiError::new(code, format!("commit the writable layer of {sid}: {e}"))
            })?;
        let config = parent
            .as_ref()
            .map(|p| p.config.clone())
            .unwrap_or_default();
        let rec = rootfs_fetch::commit::derive_image(
            &store,
            rootfs_fetch::commit::Derive {
                parent: parent.as_ref(),
                host_base,
                layer: Some(layer),
                config,
                created_by: format!("sbx snapshot {sid}"),
                reference: format!("snapshot:{sid}"),
            },
        )
        .map_err(|e| internal(format!("write the snapshot image of {sid}: {e}")))?;
        let info = info_of(&store, &rec)?;
        drop(sb);
        Ok::<_, ApiError>((rec.id.clone(), info))
    })
    .await
    .map_err(|e| internal(format!("snapshot panicked: {e}")))??;
    tracing::info!(sandbox = %id, image = %rec.0, ms = started.elapsed().as_millis() as u64, "snapshot");
    Ok((StatusCode::CREATED, Json(rec.1)).into_response())
}
