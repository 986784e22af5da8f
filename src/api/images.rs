//! Wire types of the image calls: pull, list, inspect, remove, export, build, snapshot.
//!
//! | method + path | body → reply |
//! |---|---|
//! | `POST /v1/images/pull` | [`PullImage`] → `application/x-ndjson`, one [`PullEvent`] per line, the last `done` or `error` |
//! | `GET /v1/images` | → `[`[`ImageInfo`]`]`, newest first |
//! | `GET /v1/images/{ref}` | → [`ImageInfo`]; `ref` (percent-encoded) is an `im-…` id or a reference the store has (`127.0.0.1:5000/test/busybox:1`, a build tag) |
//! | `DELETE /v1/images/{ref}` | → 204; with a reference, removes that tag (and the image when no tag is left); with an id, the image and its tags. `conflict` while a running sandbox uses it |
//! | `POST /v1/images/export` | [`ExportImage`] → [`ExportResult`] |
//! | `POST /v1/images/build` | [`BuildImage`] → `application/x-ndjson`, one [`BuildEvent`] per line, the last `done` or `error` |
//! | `POST /v1/sandboxes/{id}/snapshot` | → 201 [`ImageInfo`]: the sandbox's filesystem (image + writable layer) as a new image |
//!
//! A streamed call that fails before its stream starts answers with an error status and an
//! [`super::ErrorBody`] as every call; once the stream has started, a failure is its last
//! line (`{"error": {...}}`), and the HTTP status stays 200.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::ApiError;

/// `POST /v1/images/pull`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullImage {
    /// A registry reference (`[REGISTRY/]REPO[:TAG|@sha256:…]`), `oci:PATH[:TAG]` or
    /// `docker-archive:PATH` (imported).
    pub reference: String,
}

/// One line of a pull's progress stream.
// `Done` is large next to the progress lines; a line is built, serialized and dropped, so
// boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullEvent {
    /// A layer is about to be fetched; `size` is the blob's size in bytes.
    LayerStarted { digest: String, size: u64 },
    /// Bytes of that layer stored so far (sent at most every ~100 ms per layer).
    LayerProgress {
        digest: String,
        done: u64,
        size: u64,
    },
    /// The layer is stored and verified; `cached` when it was already in the store.
    LayerDone { digest: String, cached: bool },
    /// The image is in the store.
    Done { image: ImageInfo },
    /// The pull failed (the last line): `{"error": {"code": …, "message": …}}`.
    Error(ApiError),
}

/// One image in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// `im-` + 24 hex digits (from the config digest).
    pub id: String,
    /// The references (registry tags, `oci:`/`docker-archive:` sources, build tags) that
    /// name this image in the store, sorted.
    pub references: Vec<String>,
    /// Where it came from: the reference it was pulled or imported as, `build`, or
    /// `snapshot:sb-…`.
    pub source: String,
    /// Seconds since the Unix epoch.
    pub created_at: f64,
    /// The stored (compressed) size of all layers, bytes.
    pub size: u64,
    pub os: String,
    pub architecture: String,
    /// Base first.
    pub layers: Vec<LayerInfo>,
    pub config: ImageConfigInfo,
    /// The image is layered on top of the built-in `host` image (built from or snapshotted
    /// from it): sandboxes also get the host's read-only /usr; it cannot be exported.
    #[serde(default)]
    pub host_base: bool,
    /// The image it was built or snapshotted from (`None` for pulled and imported images).
    #[serde(default)]
    pub parent: Option<String>,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Digest of the stored blob.
    pub digest: String,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
    pub size: u64,
}

/// The run settings of an image (OCI image config).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ImageConfigInfo {
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// `PORT/PROTO`, sorted.
    pub exposed_ports: Vec<String>,
}

/// `POST /v1/images/export`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportImage {
    /// An `im-…` id or a reference the store has.
    pub image: String,
    /// `oci:/absolute/path[:TAG]` (created or added to; TAG defaults to `latest`).
    pub destination: String,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportResult {
    pub image: String,
    pub destination: String,
    /// The manifest digest in the layout.
    pub manifest_digest: String,
}

/// `POST /v1/images/build`: a base and steps, each cached by its parent image and itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildImage {
    /// `host` or any image reference `create` accepts (pulled or imported when missing).
    pub base: String,
    pub steps: Vec<BuildStep>,
    /// Absolute directory that COPY sources are relative to (read by sbxd on this host).
    #[serde(default)]
    pub context: Option<String>,
    /// A name to tag the result with in the store (`myapp:dev`).
    #[serde(default)]
    pub tag: Option<String>,
    /// Run every step even when cached.
    #[serde(default)]
    pub no_cache: bool,
    /// `ARG` values given from outside (`--build-arg K=V`).
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
}

/// One build step (a Dockerfile instruction after FROM).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStep {
    /// Run argv in a sandbox of the image so far; its filesystem changes become a layer.
    /// The shell form is `["/bin/sh", "-c", CMD]`.
    Run { argv: Vec<String> },
    /// Set environment variables (image Env).
    Env { vars: BTreeMap<String, String> },
    /// Set the working directory (created when missing).
    Workdir { path: String },
    /// Copy files or directories from the context (relative paths, no `..`) to `dest` (absolute,
    /// or relative to the working directory); a trailing `/` on dest means into that directory.
    Copy { sources: Vec<String>, dest: String },
    /// Set the user (`NAME`, `UID`, `UID:GID`) later RUN steps and sandboxes run as.
    User { user: String },
    /// Set the image Cmd.
    Cmd { argv: Vec<String> },
    /// Set the image Entrypoint.
    Entrypoint { argv: Vec<String> },
    /// Declare a build argument usable as `$NAME` in later steps.
    Arg {
        name: String,
        #[serde(default)]
        default: Option<String>,
    },
}

/// One line of a build's stream.
#[allow(clippy::large_enum_variant)] // as PullEvent
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildEvent {
    /// Step `index` (0-based) of `total` begins; `cached` when its result is reused.
    Step {
        index: usize,
        total: usize,
        /// The step as a Dockerfile line (`RUN pip install x`).
        text: String,
        cached: bool,
    },
    /// Output of a RUN step as it arrives (`stream` is `stdout` or `stderr`; lossy UTF-8).
    Output { stream: String, data: String },
    /// The step produced this image.
    StepDone { index: usize, image: String },
    /// The build finished.
    Done { image: ImageInfo },
    /// The build failed (the last line): `{"error": {"code": …, "message": …}}`; a RUN
    /// that exits non-zero names its code.
    Error(ApiError),
}

/// `im-` ids: the prefix and this many lowercase hex digits.
pub const IMAGE_ID_HEX: usize = 24;
