//! Wire types shared by sbxd and its clients (JSON over HTTP/1.1 or h2c on a Unix socket).
//!
//! This module is the contract: the daemon serves it, the client library and the CLI speak it,
//! and `docs/openapi.yaml` describes it for other languages. It depends only on serde.
//!
//! # Routes (all under `http://sbx`, on the socket `/run/sbx/sbxd.sock` by default)
//!
//! | method + path | body → reply |
//! |---|---|
//! | `GET /v1/version` | → [`Version`] |
//! | `GET /v1/health` | → [`Health`] |
//! | `GET /metrics` | → Prometheus text |
//! | `POST /v1/sandboxes` | [`CreateSandbox`] → 201 [`SandboxInfo`] (status `pending`: the start is asynchronous) |
//! | `GET /v1/sandboxes?app=&tag=K=V&tag=…&all=true` | → `[`[`SandboxSummary`]`]`, newest first; running (pending or running) only unless `all=true`; `app` absent = every app |
//! | `GET /v1/sandboxes/{id}` | → [`SandboxInfo`] (from_id) |
//! | `GET /v1/apps/{app}/sandboxes/{name}?include_terminated=true` | → [`SandboxInfo`] (from_name) |
//! | `DELETE /v1/sandboxes/{id}` | → 204; terminates if running, then forgets the sandbox, its records and its output |
//! | `POST /v1/sandboxes/{id}/terminate` | [`Terminate`] → [`WaitResult`] (idempotent) |
//! | `GET /v1/sandboxes/{id}/wait?timeout=SECS` | → [`WaitResult`]; long poll: returns when finished or after `timeout` (default 0 = poll, at most 60) |
//! | `POST /v1/sandboxes/{id}/wait_until_ready` | [`WaitUntilReady`] → [`Ready`]; errors: `invalid` (no probe, timeout ≤ 0), `conflict` (finished), `timeout` |
//! | `GET /v1/sandboxes/{id}/tags` / `PUT …/tags` | → / [`Tags`] → [`Tags`] (PUT replaces all) |
//! | `GET /v1/sandboxes/{id}/events?after=SEQ&follow=true` | → `application/x-ndjson`, one [`Event`] per line; `follow` keeps the stream open until the Finished event |
//! | `GET /v1/sandboxes/{id}/stdout?offset=N&follow=true` (and `/stderr`) | → the entrypoint's output as raw bytes from byte `offset` (see [Streams](#streams)) |
//! | `POST /v1/sandboxes/{id}/stdin?offset=N&eof=BOOL` | raw bytes → [`StdinAck`]; the entrypoint's stdin |
//! | `POST /v1/sandboxes/{id}/execs` | [`ExecRequest`] → 201 [`ExecInfo`] (200 with the existing exec when `exec_id` was seen) |
//! | `GET /v1/sandboxes/{id}/execs/{exec_id}` | → [`ExecInfo`] |
//! | `GET /v1/sandboxes/{id}/execs/{exec_id}/wait?timeout=SECS` | → [`ExecInfo`], long poll as for sandboxes |
//! | `GET /v1/sandboxes/{id}/execs/{exec_id}/stdout?offset=N&follow=true` (and `/stderr`) | → raw bytes |
//! | `POST /v1/sandboxes/{id}/execs/{exec_id}/stdin?offset=N&eof=BOOL` | raw bytes → [`StdinAck`] |
//! | `POST /v1/sandboxes/{id}/execs/{exec_id}/resize` | [`PtySize`] → 204 |
//! | `POST /v1/sandboxes/{id}/execs/{exec_id}/signal` | [`SignalRequest`] → 204 |
//! | `GET /v1/sandboxes/{id}/fs/file?path=P` | → raw bytes of the file |
//! | `PUT /v1/sandboxes/{id}/fs/file?path=P` | raw bytes → [`FileInfo`] (creates parents; replaces the file, mode 0644) |
//! | `GET /v1/sandboxes/{id}/fs/list?path=P` | → `[`[`FileInfo`]`]` |
//! | `GET /v1/sandboxes/{id}/fs/stat?path=P` | → [`FileInfo`] (does not follow a final symlink) |
//! | `POST /v1/sandboxes/{id}/fs/mkdir` | [`Mkdir`] → [`FileInfo`] |
//! | `DELETE /v1/sandboxes/{id}/fs?path=P&recursive=BOOL` | → 204 |
//! | `POST /v1/secrets` | [`CreateSecret`] → 201 [`SecretInfo`] |
//! | `GET /v1/secrets` | → `[`[`SecretInfo`]`]` (never the values) |
//! | `DELETE /v1/secrets/{name}` | → 204 |
//! | `GET /v1/volumes` | → `[`[`VolumeInfo`]`]` |
//! | `DELETE /v1/volumes/{name}` | → 204; `conflict` while a running sandbox mounts it |
//! | `/v1/images…`, `POST /v1/sandboxes/{id}/snapshot` | see [`images`] |
//!
//! # Errors
//! Every failure is an HTTP status and a body [`ErrorBody`] `{"error":{"code":…,"message":…}}`;
//! [`ErrorCode::http_status`] gives the status. Unknown JSON fields are rejected (`invalid`).
//!
//! # Streams
//! Output (`…/stdout`, `…/stderr`) is addressed by byte offset. A GET returns the bytes from
//! `offset` on as `application/octet-stream`; the response header `sbx-offset` repeats the
//! start offset. With `follow=true` (the default) the body stays open and carries bytes as the
//! process writes them, and ends at EOF (the process and everything holding the pipe closed it,
//! and every byte was delivered). With `follow=false` it carries what is buffered now and
//! ends; the header `sbx-eof: true` then says whether that was all. A client that loses the
//! connection resumes with `offset` = the bytes it got so far; every byte arrives exactly once.
//! Output is kept (on disk, under the state dir) until the sandbox is deleted; a process that
//! writes faster than anyone reads is paused (back-pressure) once [`OUTPUT_WINDOW`] bytes wait
//! unread, never dropped. A stream the exec did not pipe (`devnull`, or stderr merged into
//! stdout, or any stderr under a pty) is empty with EOF at once.
//!
//! Stdin (`…/stdin`) takes raw bytes with `offset` = the stream position of the first byte.
//! Bytes already written are skipped, so a retried write is harmless; an offset past what was
//! written is `conflict` (a gap). `eof=true` closes stdin after the bytes (idempotent). A write
//! to a finished process or a closed stdin is `conflict`. The reply comes when the bytes are in
//! the pipe: a process that does not read back-pressures the writer.

pub mod dockerfile;
pub mod images;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The socket path sbxd listens on unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/sbx/sbxd.sock";
/// The default app of sandboxes created without one.
pub const DEFAULT_APP: &str = "default";
/// Default sandbox lifetime, seconds (as Modal).
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// Longest sandbox lifetime, seconds (24 h).
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// Default readiness probe interval.
pub const DEFAULT_PROBE_INTERVAL_MS: u64 = 100;
/// Longest a readiness probe keeps trying.
pub const PROBE_DEADLINE_SECS: u64 = 300;
/// Unread output a process may get ahead of its readers before it is paused.
pub const OUTPUT_WINDOW: u64 = 64 << 20;
/// Longest a single long poll (`wait?timeout=`) is held open.
pub const MAX_LONG_POLL_SECS: f64 = 60.0;
/// Sandbox ids are `sb-` and this many base62 characters (as Modal's).
pub const SANDBOX_ID_CHARS: usize = 22;

/// One stable machine code per kind of failure (DESIGN.md, API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    AlreadyExists,
    Invalid,
    Conflict,
    Timeout,
    SandboxTimeout,
    SandboxTerminated,
    ResourceExhausted,
    /// Filesystem: the path is a directory where a file was needed.
    IsADirectory,
    /// Filesystem: a path component is not a directory.
    NotADirectory,
    /// Filesystem: a non-recursive remove of a directory that has entries.
    DirectoryNotEmpty,
    /// Filesystem: the sandbox's user may not do this (a read-only mount, a root-owned file).
    PermissionDenied,
    Internal,
}

impl ErrorCode {
    /// The HTTP status this code travels with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists | ErrorCode::Conflict => 409,
            ErrorCode::Invalid
            | ErrorCode::IsADirectory
            | ErrorCode::NotADirectory
            | ErrorCode::DirectoryNotEmpty => 400,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::Timeout | ErrorCode::SandboxTimeout => 408,
            ErrorCode::SandboxTerminated => 410,
            ErrorCode::ResourceExhausted => 429,
            ErrorCode::Internal => 500,
        }
    }

    /// The snake_case name (`not_found`), as on the wire and in CLI messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Timeout => "timeout",
            ErrorCode::SandboxTimeout => "sandbox_timeout",
            ErrorCode::SandboxTerminated => "sandbox_terminated",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::IsADirectory => "is_a_directory",
            ErrorCode::NotADirectory => "not_a_directory",
            ErrorCode::DirectoryNotEmpty => "directory_not_empty",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"error": {...}}`: the body of every failed call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

/// A failure: its code and a message naming the offending value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// `invalid`, naming the field and the value: `invalid timeout 0: must be 1..=86400 seconds`.
    pub fn invalid(field: &str, value: impl std::fmt::Display, reason: &str) -> Self {
        ApiError::new(
            ErrorCode::Invalid,
            format!("invalid {field} {value}: {reason}"),
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    /// sbxd's version (the crate version).
    pub version: String,
    /// The API generation: `v1`.
    pub api: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Sandboxes pending or running.
    pub sandboxes_running: u64,
    /// `v1` or `v2`: the cgroup hierarchy sbxd drives.
    pub cgroup: String,
}

/// A readiness probe: exactly one of `tcp_port` / `exec_argv`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Probe {
    /// Ready when a TCP connect to this port inside the sandbox succeeds (1..=65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
    /// Ready when this command (run directly, not through a shell) exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_argv: Option<Vec<String>>,
    /// How often to try, milliseconds (default 100, > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
}

/// A named volume mounted at `path` (created on first use, kept under the state dir).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// `^[A-Za-z0-9._-]+$`, shorter than 64 characters.
    pub name: String,
    /// Absolute path inside the sandbox, not `/`.
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Where a secret comes from: a named secret (`sbx secret create`) or an inline map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    Named(String),
    Inline(BTreeMap<String, String>),
}

/// `POST /v1/sandboxes`. Every field is optional.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateSandbox {
    /// `host` (default), `dir:/abs/rootfs`, `im-<24 hex>` (sbxd's store), `oci:/abs/layout[:TAG]`,
    /// `docker-archive:/abs/file.tar`, or a registry reference (`busybox`,
    /// `127.0.0.1:5000/test/busybox:1`, `repo@sha256:…`).
    pub image: Option<String>,
    /// The entrypoint argv; empty: the sandbox stays up until its timeout or terminate.
    pub entrypoint: Vec<String>,
    /// Default `default`. Same rules as `name`.
    pub app: Option<String>,
    /// Unique among the app's running sandboxes.
    pub name: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// Lifetime in seconds (default 300, 1..=86400). Reaching it: returncode 124.
    pub timeout_secs: Option<u64>,
    /// Seconds with no running exec and no stdin write before it finishes (`idle_timeout`).
    pub idle_timeout_secs: Option<u64>,
    /// Absolute working directory of the entrypoint and of execs without their own.
    pub workdir: Option<String>,
    /// Environment of the entrypoint and every exec; wins over secrets.
    pub env: BTreeMap<String, String>,
    /// Applied in order before `env`.
    pub secrets: Vec<SecretSource>,
    pub volumes: Vec<VolumeMount>,
    /// Fractional cores (cpu quota), > 0.
    pub cpu: Option<f64>,
    /// Memory limit in MiB (no swap beyond it), ≥ 1.
    pub memory_mib: Option<u64>,
    /// Most processes/threads at once, ≥ 1.
    pub pids: Option<u64>,
    pub readiness_probe: Option<Probe>,
    /// `default`, `unconfined`, or an absolute path to an OCI seccomp JSON profile on the host.
    pub seccomp: Option<String>,
    /// Give the entrypoint a terminal (stderr merged into stdout).
    pub pty: Option<PtySize>,
    /// Give the entrypoint a stdin pipe (written with `POST …/stdin`); otherwise /dev/null.
    pub stdin: bool,
    /// With no `entrypoint`: run the image's Entrypoint + Cmd as the entrypoint (as `docker
    /// run IMAGE` does). `invalid` when the image sets neither (for a reference still to pull,
    /// the sandbox ends with reason `error` instead). Default false: the sandbox idles.
    pub image_command: bool,
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxStatus {
    /// Created; the start is under way.
    Pending,
    Running,
    Finished,
}

impl SandboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Pending => "pending",
            SandboxStatus::Running => "running",
            SandboxStatus::Finished => "finished",
        }
    }
}

/// Why a sandbox finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The entrypoint exited; returncode is its code (128+N on signal N).
    Exited,
    /// terminate(); returncode 137.
    Terminated,
    /// The lifetime timeout fired; returncode 124.
    Timeout,
    /// Idle longer than idle_timeout; returncode 0 (as Modal: not remapped, not an error).
    IdleTimeout,
    /// The OOM killer ended it; returncode 137.
    Oom,
    /// It could not start (bad image, …) or sbxd lost it; returncode 1, `error` says why.
    Error,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Exited => "exited",
            EndReason::Terminated => "terminated",
            EndReason::Timeout => "timeout",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::Oom => "oom",
            EndReason::Error => "error",
        }
    }
}

/// Lifecycle events, in order: created, scheduled, started, ready (with a probe), finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Created,
    Scheduled,
    Started,
    Ready,
    Finished,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// 1, 2, 3… per sandbox; `events?after=SEQ` resumes after one.
    pub seq: u64,
    pub kind: EventKind,
    /// Unix seconds (fractional).
    pub at: f64,
    /// Finished only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<EndReason>,
    /// Finished only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returncode: Option<i32>,
    /// Finished with reason `error`: what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A sandbox as `GET /v1/sandboxes/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub id: String,
    pub app: String,
    pub name: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub status: SandboxStatus,
    /// Unix seconds.
    pub created_at: f64,
    pub started_at: Option<f64>,
    /// When the readiness probe first succeeded.
    pub ready_at: Option<f64>,
    pub finished_at: Option<f64>,
    /// None while running.
    pub returncode: Option<i32>,
    pub end_reason: Option<EndReason>,
    /// With end_reason `error`: the cause.
    pub error: Option<String>,
    /// The create request as accepted (secret values are not repeated: named secrets by name,
    /// inline ones by key with the value `"***"`).
    pub config: CreateSandbox,
    pub events: Vec<Event>,
}

/// A line of `GET /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxSummary {
    pub id: String,
    pub app: String,
    pub name: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub status: SandboxStatus,
    pub created_at: f64,
    pub returncode: Option<i32>,
    pub end_reason: Option<EndReason>,
}

/// `POST …/terminate`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Terminate {
    /// Reply only once it has finished (the reply then carries the returncode).
    pub wait: bool,
}

/// The reply of wait, poll and terminate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitResult {
    pub finished: bool,
    pub returncode: Option<i32>,
    pub end_reason: Option<EndReason>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WaitUntilReady {
    /// Seconds, > 0 (Modal's default is 300).
    pub timeout_secs: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// Unix seconds when the probe first succeeded.
    pub ready_at: f64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Tags {
    pub tags: BTreeMap<String, String>,
}

/// Where an exec's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamMode {
    /// Kept and readable by offset.
    #[default]
    Pipe,
    /// Discarded at the source (/dev/null).
    Devnull,
    /// stderr only: into the stdout stream (the stderr stream is empty).
    Stdout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

/// `POST …/execs`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecRequest {
    /// Client-chosen id (`^[A-Za-z0-9._-]{1,63}$`, e.g. a UUID): a retry with the same id starts
    /// nothing new and returns the first exec. Absent: sbxd picks `ex-…`.
    pub exec_id: Option<String>,
    pub argv: Vec<String>,
    /// Absolute; default the sandbox's workdir, else `/`.
    pub workdir: Option<String>,
    /// Wins over secrets and over the sandbox's env.
    pub env: BTreeMap<String, String>,
    pub secrets: Vec<SecretSource>,
    /// Seconds (> 0): then the process group is killed and the exec reports `timed_out`.
    pub timeout_secs: Option<u64>,
    /// A terminal of this size (stderr goes into stdout).
    pub pty: Option<PtySize>,
    /// `TERM` with a pty (default `xterm-256color`).
    pub term: Option<String>,
    pub stdout: StreamMode,
    pub stderr: StreamMode,
    /// Give the process a stdin pipe (else /dev/null). Default true.
    pub stdin: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecStatus {
    Running,
    Exited,
}

/// An exec as `GET …/execs/{exec_id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecInfo {
    pub exec_id: String,
    pub sandbox_id: String,
    pub argv: Vec<String>,
    pub status: ExecStatus,
    /// The exit code, or 128+N when killed by signal N; None while running.
    pub returncode: Option<i32>,
    /// Set when it was killed by a signal.
    pub signal: Option<i32>,
    /// Killed because its `timeout_secs` passed.
    pub timed_out: bool,
    /// Killed by the OOM killer.
    pub oom: bool,
    pub started_at: f64,
    pub finished_at: Option<f64>,
    pub stdout: StreamMode,
    pub stderr: StreamMode,
    pub pty: bool,
}

/// The reply of a stdin write: how many bytes stdin has taken in all, and whether it is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdinAck {
    pub offset: u64,
    pub eof: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRequest {
    /// A signal number (1..=64): sent to the process and its process group.
    pub signal: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    File,
    Directory,
    Symlink,
    Other,
}

/// A file inside a sandbox (Modal's FileInfo).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The last path component.
    pub name: String,
    /// Absolute path inside the sandbox.
    pub path: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    pub size: u64,
    /// Permission bits (e.g. 0o644 = 420).
    pub mode: u32,
    /// `rw-r--r--`.
    pub permissions: String,
    /// uid / gid as the sandbox sees them.
    pub owner: u32,
    pub group: u32,
    /// Unix seconds.
    pub modified_time: f64,
    pub symlink_target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mkdir {
    pub path: String,
    /// Create missing parents and succeed if it exists (default true).
    #[serde(default = "yes")]
    pub parents: bool,
}

fn yes() -> bool {
    true
}

/// `POST /v1/secrets`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateSecret {
    /// `^[A-Za-z0-9._-]+$`, shorter than 64 characters.
    pub name: String,
    /// Keys match `^[A-Za-z_][A-Za-z0-9_]*$`.
    pub env: BTreeMap<String, String>,
    /// Replace an existing secret of that name instead of failing with `already_exists`.
    pub overwrite: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretInfo {
    pub name: String,
    /// The variable names (never the values).
    pub keys: Vec<String>,
    pub created_at: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub created_at: f64,
    /// Running sandboxes that mount it now.
    pub in_use_by: Vec<String>,
}

/// Whether `s` is a valid name for a sandbox, app, secret or volume: `^[A-Za-z0-9._-]+$`,
/// shorter than 64 characters, and not `.` or `..`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 64
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `s` is a valid environment variable name: `^[A-Za-z_][A-Za-z0-9_]*$`.
pub fn valid_env_key(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Whether `s` looks like a sandbox id (`sb-` + 22 base62 characters).
pub fn is_sandbox_id(s: &str) -> bool {
    s.len() == 3 + SANDBOX_ID_CHARS
        && s.starts_with("sb-")
        && s[3..].bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("my-sandbox_1.0"));
        assert!(!valid_name(""));
        assert!(!valid_name(".."));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(64)));
        assert!(valid_name(&"x".repeat(63)));
        assert!(valid_env_key("MY_SECRET"));
        assert!(!valid_env_key("1X"));
        assert!(!valid_env_key("A-B"));
        assert!(is_sandbox_id("sb-0123456789abcdefABCDEF"));
        assert!(!is_sandbox_id("sb-short"));
    }

    #[test]
    fn fields_a_newer_sbxd_adds_do_not_break_an_older_client() {
        // sbxd refuses unknown request fields itself (server::parse); the types accept them so
        // that replies carrying fields added later (a create's `config`) still parse.
        let ok: CreateSandbox =
            serde_json::from_str(r#"{"image":"host","added_later":true}"#).unwrap();
        assert_eq!(ok.image.as_deref(), Some("host"));
        let e: ErrorBody = serde_json::from_str(
            r#"{"error":{"code":"invalid","message":"m","details":{}},"request_id":"x"}"#,
        )
        .unwrap();
        assert_eq!(e.error.code, ErrorCode::Invalid);
    }

    #[test]
    fn errors_round_trip() {
        let body = ErrorBody {
            error: ApiError::invalid("timeout_secs", 0, "must be 1..=86400"),
        };
        let s = serde_json::to_string(&body).unwrap();
        assert!(s.contains(r#""code":"invalid""#), "{s}");
        let back: ErrorBody = serde_json::from_str(&s).unwrap();
        assert_eq!(back, body);
        assert_eq!(ErrorCode::NotFound.http_status(), 404);
    }
}
