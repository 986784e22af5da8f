//! The async client library for sbxd, shaped like Modal's Sandbox API: a [`Client`] holds one
//! HTTP/2 connection to the daemon's Unix socket; [`Sandbox`] handles create, exec, wait,
//! terminate, tags, files, output and snapshots; [`Process`] is one exec with its streams;
//! [`Image`] is an image recipe (base + build steps, Modal's `modal.Image`) and the calls on
//! sbxd's image store (pull, list, inspect, remove, export).
//!
//! Built with the cargo feature `client` alone (tokio + hyper), without the runtime or daemon:
//! `sbx = { default-features = false, features = ["client"] }`. The wire contract is
//! [`crate::api`].
//!
//! ```no_run
//! use sbx::client::{Client, CreateSandbox, Probe, Sandbox};
//! use std::time::Duration;
//!
//! # async fn demo() -> sbx::client::Result<()> {
//! let client = Client::connect().await?; // $SBX_SOCKET or /run/sbx/sbxd.sock
//! let sb = Sandbox::create(&client, CreateSandbox {
//!     entrypoint: vec!["python3".into(), "-m".into(), "http.server".into(), "8000".into()],
//!     timeout_secs: Some(600),
//!     readiness_probe: Some(Probe::tcp(8000)),
//!     ..Default::default()
//! }).await?;
//! sb.wait_until_ready(Duration::from_secs(30)).await?;
//!
//! let p = sb.exec(["python3", "-c", "print('hello'); print('world')"]).await?;
//! while let Some(line) = p.stdout().next_line().await? {
//!     print!("{line}");
//! }
//! assert_eq!(p.wait().await?, 0);
//!
//! let cat = sb.exec(["cat"]).await?;
//! cat.stdin().write(b"piped\n")?;
//! cat.stdin().close().await?; // drain + EOF
//! assert_eq!(cat.stdout().read_text().await?, "piped\n");
//!
//! sb.filesystem().write_text("/tmp/notes.txt", "hi").await?;
//! assert_eq!(sb.filesystem().read_text("/tmp/notes.txt").await?, "hi");
//!
//! sb.terminate(false).await?;
//! assert!(matches!(sb.wait().await, Err(sbx::client::Error::SandboxTerminated(_))));
//! # Ok(()) }
//! ```
//!
//! # Transport and retries
//! Every call shares one h2c connection (authority `sbx`), reopened on the next call after it
//! broke. A call that never reached sbxd is retried (8 times, backoff 50 ms…1 s, about 4.5 s
//! in all: long enough to ride out a daemon restart); calls that are safe to repeat (reads,
//! long polls, offset-addressed stdin writes, execs — their ids are chosen here — terminate,
//! PUTs) are retried after any transport failure. Creates, deletes and signals are not
//! retried once sent: their failure is reported as [`Error::Transport`].
//!
//! Output readers ([`StreamReader`]) count bytes and, when a response breaks off, reopen at
//! their offset, so each byte arrives once. Stdin writers ([`StreamWriter`]) send
//! offset-addressed chunks; sbxd skips bytes it already has.

mod builders;
mod image;
mod stream;
mod transport;

pub use image::{is_image_id, BuildCallback, BuiltImage, Image, NewSandbox};
pub use stream::{EventStream, StreamReader, StreamWriter};

pub use crate::api::images::{
    BuildEvent, BuildImage, BuildStep, ExportResult, ImageConfigInfo, ImageInfo, LayerInfo,
    PullEvent,
};

pub use crate::api::{
    CreateSandbox, CreateSecret, EndReason, ErrorCode, Event, EventKind, ExecInfo, ExecRequest,
    ExecStatus, FileInfo, FileType, Health, Probe, PtySize, SandboxInfo, SandboxStatus,
    SandboxSummary, SecretInfo, SecretSource, StreamMode, VolumeInfo, VolumeMount, WaitResult,
};

use crate::api;
use hyper::Method;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use stream::Guard;
use transport::{enc, Conn, Payload, Retry, LONG_POLL_SECS};

/// The result of every client call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed call. Daemon errors keep the daemon's code (see [`Error::code`]) and display as
/// `<code>: <message>`, e.g. `not_found: no sandbox sb-…`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not_found: {0}")]
    NotFound(String),
    #[error("already_exists: {0}")]
    AlreadyExists(String),
    /// A bad request, refused by sbxd or already by the client (a relative path, a write after
    /// EOF, output that is not UTF-8 read as text).
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("conflict: {0}")]
    Conflict(String),
    /// An operation's own deadline passed (`wait_until_ready`).
    #[error("timeout: {0}")]
    Timeout(String),
    /// The sandbox reached its lifetime timeout (from [`Sandbox::wait`]).
    #[error("sandbox_timeout: {0}")]
    SandboxTimeout(String),
    /// The sandbox was terminated (from [`Sandbox::wait`]).
    #[error("sandbox_terminated: {0}")]
    SandboxTerminated(String),
    #[error("resource_exhausted: {0}")]
    ResourceExhausted(String),
    /// A filesystem failure: `code` is one of `is_a_directory`, `not_a_directory`,
    /// `directory_not_empty`, `permission_denied` (a missing path is [`Error::NotFound`]).
    #[error("{code}: {message}")]
    Filesystem {
        code: api::ErrorCode,
        message: String,
    },
    #[error("internal: {0}")]
    Internal(String),
    /// An operation on a detached [`Sandbox`] handle (Modal's `ClientClosed`).
    #[error("client_closed: {0}")]
    ClientClosed(String),
    /// No daemon answers on the socket.
    #[error("cannot connect to sbxd at {}: {source} (is sbxd running? $SBX_SOCKET names its socket)", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The connection failed after connecting, or sbxd's reply could not be read.
    #[error("transport: {0}")]
    Transport(String),
}

impl Error {
    /// The machine code of this error: the daemon's, or the one sbxd would give for the same
    /// mistake when the client caught it first. `None` for client-side failures (`ClientClosed`,
    /// `Connect`, `Transport`).
    pub fn code(&self) -> Option<api::ErrorCode> {
        use api::ErrorCode as C;
        Some(match self {
            Error::NotFound(_) => C::NotFound,
            Error::AlreadyExists(_) => C::AlreadyExists,
            Error::Invalid(_) => C::Invalid,
            Error::Conflict(_) => C::Conflict,
            Error::Timeout(_) => C::Timeout,
            Error::SandboxTimeout(_) => C::SandboxTimeout,
            Error::SandboxTerminated(_) => C::SandboxTerminated,
            Error::ResourceExhausted(_) => C::ResourceExhausted,
            Error::Filesystem { code, .. } => *code,
            Error::Internal(_) => C::Internal,
            Error::ClientClosed(_) | Error::Connect { .. } | Error::Transport(_) => return None,
        })
    }
}

impl From<api::ApiError> for Error {
    fn from(e: api::ApiError) -> Error {
        use api::ErrorCode as C;
        let m = e.message;
        match e.code {
            C::NotFound => Error::NotFound(m),
            C::AlreadyExists => Error::AlreadyExists(m),
            C::Invalid => Error::Invalid(m),
            C::Conflict => Error::Conflict(m),
            C::Timeout => Error::Timeout(m),
            C::SandboxTimeout => Error::SandboxTimeout(m),
            C::SandboxTerminated => Error::SandboxTerminated(m),
            C::ResourceExhausted => Error::ResourceExhausted(m),
            code @ (C::IsADirectory
            | C::NotADirectory
            | C::DirectoryNotEmpty
            | C::PermissionDenied) => Error::Filesystem { code, message: m },
            C::Internal => Error::Internal(m),
        }
    }
}

/// A connection to sbxd. Cheap to clone: every clone and every concurrent call share one
/// HTTP/2 connection over the Unix socket, which is redialed on the next call if it broke.
/// Needs a tokio runtime (the connection is driven by a spawned task).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Conn>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("socket", &self.socket())
            .finish()
    }
}

impl Client {
    /// Connects to `$SBX_SOCKET`, else [`api::DEFAULT_SOCKET`].
    pub async fn connect() -> Result<Client> {
        match std::env::var_os("SBX_SOCKET") {
            Some(s) if !s.is_empty() => Client::connect_to(PathBuf::from(s)).await,
            _ => Client::connect_to(api::DEFAULT_SOCKET).await,
        }
    }

    /// Connects to the daemon's socket at `socket` (`Connect` at once when nothing listens).
    pub async fn connect_to(socket: impl AsRef<Path>) -> Result<Client> {
        let client = Client {
            inner: Arc::new(Conn::new(socket.as_ref().to_path_buf())),
        };
        client.inner.sender().await?;
        Ok(client)
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        self.conn().socket()
    }

    pub async fn version(&self) -> Result<api::Version> {
        self.get("/v1/version").await
    }

    pub async fn health(&self) -> Result<api::Health> {
        self.get("/v1/health").await
    }

    /// Stores a named secret (`already_exists` unless `overwrite`).
    pub async fn create_secret(&self, req: api::CreateSecret) -> Result<api::SecretInfo> {
        self.json(
            Method::POST,
            "/v1/secrets",
            &Payload::json(&req)?,
            Retry::IfUnsent,
        )
        .await
    }

    /// Every named secret (names and keys, never the values).
    pub async fn list_secrets(&self) -> Result<Vec<api::SecretInfo>> {
        self.get("/v1/secrets").await
    }

    pub async fn delete_secret(&self, name: &str) -> Result<()> {
        let path = format!("/v1/secrets/{}", enc(name));
        self.unit(Method::DELETE, &path, &Payload::Empty, Retry::IfUnsent)
            .await
    }

    pub async fn list_volumes(&self) -> Result<Vec<api::VolumeInfo>> {
        self.get("/v1/volumes").await
    }

    /// Deletes a volume and its files (`conflict` while a running sandbox mounts it).
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let path = format!("/v1/volumes/{}", enc(name));
        self.unit(Method::DELETE, &path, &Payload::Empty, Retry::IfUnsent)
            .await
    }
}

/// A fresh exec id: `ex-` and 32 hex digits from /dev/urandom. Chosen by the client so that a
/// create retried after a transport failure starts the process once.
fn new_exec_id() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::Internal(format!("reading /dev/urandom for an exec id: {e}")))?;
    let mut id = String::with_capacity(35);
    id.push_str("ex-");
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    Ok(id)
}

struct SandboxInner {
    id: String,
    client: Client,
    /// `/v1/sandboxes/{id}`.
    path: String,
    guard: Guard,
    stdin: StreamWriter,
}

/// A handle on one sandbox (Modal's `Sandbox`). Cheap to clone; clones share the detached flag
/// and the entrypoint's stdin position.
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<SandboxInner>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("id", &self.id()).finish()
    }
}

impl Sandbox {
    /// `stdin_start`: the entrypoint's stdin position when known (0 for one just created).
    fn handle(client: &Client, id: &str, stdin_start: Option<u64>) -> Sandbox {
        let path = format!("/v1/sandboxes/{}", enc(id));
        let guard = Guard::new(id);
        let stdin = StreamWriter::new(
            client.clone(),
            format!("{path}/stdin"),
            guard.clone(),
            stdin_start,
        );
        Sandbox {
            inner: Arc::new(SandboxInner {
                id: id.to_string(),
                client: client.clone(),
                path,
                guard,
                stdin,
            }),
        }
    }

    fn client(&self) -> &Client {
        &self.inner.client
    }

    fn path(&self) -> &str {
        &self.inner.path
    }

    fn check(&self, what: &str) -> Result<()> {
        self.inner.guard.check(what)
    }

    /// Creates a sandbox. It starts asynchronously: the handle comes back while it is
    /// `pending`; use [`wait_until_ready`](Self::wait_until_ready) or just exec (which waits).
    ///
    /// `params` is a [`CreateSandbox`] (its `image` a reference string or an `im-…` id), or
    /// `CreateSandbox { … }.with_image(image)` with an [`Image`] recipe: a recipe with steps
    /// is built first (each step cached) and the sandbox starts from the result.
    pub async fn create(client: &Client, params: impl Into<NewSandbox>) -> Result<Sandbox> {
        let params = params.into().request(client).await?;
        let info: api::SandboxInfo = client
            .json(
                Method::POST,
                "/v1/sandboxes",
                &Payload::json(&params)?,
                Retry::IfUnsent,
            )
            .await?;
        Ok(Sandbox::handle(client, &info.id, Some(0)))
    }

    /// A handle on an existing sandbox (`NotFound` if sbxd does not know the id).
    pub async fn from_id(client: &Client, id: &str) -> Result<Sandbox> {
        let sb = Sandbox::handle(client, id, None);
        let info = sb.info().await?;
        Ok(Sandbox::handle(client, &info.id, None))
    }

    /// The sandbox named `name` in `app`: the running one, or with `include_terminated` the
    /// newest finished one when none runs.
    pub async fn from_name(
        client: &Client,
        app: &str,
        name: &str,
        include_terminated: bool,
    ) -> Result<Sandbox> {
        let path = format!(
            "/v1/apps/{}/sandboxes/{}?include_terminated={include_terminated}",
            enc(app),
            enc(name)
        );
        let info: api::SandboxInfo = client.get(&path).await?;
        Ok(Sandbox::handle(client, &info.id, None))
    }

    /// Sandboxes, newest first: of `app` (every app when `None`), carrying every tag in `tags`
    /// (a subset match), and only pending or running ones unless `all`.
    pub async fn list(
        client: &Client,
        app: Option<&str>,
        tags: &BTreeMap<String, String>,
        all: bool,
    ) -> Result<Vec<api::SandboxSummary>> {
        let mut query = Vec::new();
        if let Some(app) = app {
            query.push(format!("app={}", enc(app)));
        }
        for (k, v) in tags {
            query.push(format!("tag={}={}", enc(k), enc(v)));
        }
        if all {
            query.push("all=true".to_string());
        }
        let path = if query.is_empty() {
            "/v1/sandboxes".to_string()
        } else {
            format!("/v1/sandboxes?{}", query.join("&"))
        };
        client.get(&path).await
    }

    /// Saves its whole filesystem (image + everything written since) as a new image in
    /// sbxd's store (Modal's `snapshot_filesystem`); start new sandboxes from it. The sandbox
    /// keeps running.
    pub async fn snapshot_filesystem(&self) -> Result<Image> {
        self.check("snapshot_filesystem")?;
        let info: ImageInfo = self
            .client()
            .json(
                Method::POST,
                &format!("{}/snapshot", self.path()),
                &Payload::Empty,
                Retry::IfUnsent,
            )
            .await?;
        Ok(Image::from_id(info.id))
    }

    /// The sandbox id (`sb-…`).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Its configuration, status, events and returncode. Works when detached.
    pub async fn info(&self) -> Result<api::SandboxInfo> {
        self.client().get(self.path()).await
    }

    /// Runs `argv` in the sandbox (Modal's `sandbox.exec(*args)`), stdout and stderr piped,
    /// with a stdin pipe.
    pub async fn exec<I, S>(&self, argv: I) -> Result<Process>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.exec_with(api::ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        })
        .await
    }

    /// Runs a process as `req` describes. Without an `exec_id` a fresh random one is chosen
    /// here, so the request is retried safely: sbxd starts it once.
    pub async fn exec_with(&self, mut req: api::ExecRequest) -> Result<Process> {
        self.check("exec")?;
        if req.exec_id.is_none() {
            req.exec_id = Some(new_exec_id()?);
        }
        let info: api::ExecInfo = self
            .client()
            .json(
                Method::POST,
                &format!("{}/execs", self.path()),
                &Payload::json(&req)?,
                Retry::Always,
            )
            .await?;
        Ok(self.process_at(&info.exec_id, Some(0)))
    }

    /// A handle on an exec started earlier (by this or another client); no request is made.
    pub fn process(&self, exec_id: &str) -> Process {
        self.process_at(exec_id, None)
    }

    fn process_at(&self, exec_id: &str, stdin_start: Option<u64>) -> Process {
        let path = format!("{}/execs/{}", self.path(), enc(exec_id));
        let guard = self.inner.guard.clone();
        let client = self.client().clone();
        Process {
            exec_id: exec_id.to_string(),
            sandbox_id: self.id().to_string(),
            stdout: StreamReader::new(client.clone(), format!("{path}/stdout"), guard.clone()),
            stderr: StreamReader::new(client.clone(), format!("{path}/stderr"), guard.clone()),
            stdin: StreamWriter::new(
                client.clone(),
                format!("{path}/stdin"),
                guard.clone(),
                stdin_start,
            ),
            client,
            path,
            guard,
        }
    }

    /// Long-polls until the sandbox finished.
    async fn finished(&self) -> Result<api::WaitResult> {
        let path = format!("{}/wait?timeout={LONG_POLL_SECS}", self.path());
        loop {
            let r: api::WaitResult = self.client().get(&path).await?;
            if r.finished {
                return Ok(r);
            }
        }
    }

    fn returncode_of(&self, r: &api::WaitResult) -> Result<i32> {
        r.returncode.ok_or_else(|| {
            Error::Transport(format!(
                "sbxd reports sandbox {} finished without a returncode",
                self.id()
            ))
        })
    }

    /// Waits for the end (Modal's `wait(raise_on_termination=True)`): `Ok(returncode)` when
    /// it exited (also after an OOM kill, an idle timeout or a start error);
    /// `Err(SandboxTimeout)` when its lifetime ran out; `Err(SandboxTerminated)` after
    /// [`terminate`](Self::terminate). Works when detached.
    pub async fn wait(&self) -> Result<i32> {
        let r = self.finished().await?;
        let rc = self.returncode_of(&r)?;
        match r.end_reason {
            Some(api::EndReason::Timeout) => Err(Error::SandboxTimeout(format!(
                "sandbox {} reached its timeout (returncode {rc})",
                self.id()
            ))),
            Some(api::EndReason::Terminated) => Err(Error::SandboxTerminated(format!(
                "sandbox {} was terminated (returncode {rc})",
                self.id()
            ))),
            _ => Ok(rc),
        }
    }

    /// Waits for the end (Modal's `wait(raise_on_termination=False)`): always the returncode
    /// (124 after the timeout, 137 after terminate). Works when detached.
    pub async fn wait_returncode(&self) -> Result<i32> {
        let r = self.finished().await?;
        self.returncode_of(&r)
    }

    /// The returncode if it finished, else `None`, without waiting. Works when detached.
    pub async fn poll(&self) -> Result<Option<i32>> {
        let r: api::WaitResult = self
            .client()
            .get(&format!("{}/wait?timeout=0", self.path()))
            .await?;
        if r.finished {
            self.returncode_of(&r).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Same as [`poll`](Self::poll) (Modal's `returncode` property). Works when detached.
    pub async fn returncode(&self) -> Result<Option<i32>> {
        self.poll().await
    }

    /// Stops the sandbox (idempotent). With `wait`, returns once it finished, with its
    /// returncode (137 unless it had already ended otherwise).
    pub async fn terminate(&self, wait: bool) -> Result<Option<i32>> {
        self.check("terminate")?;
        let r: api::WaitResult = self
            .client()
            .json(
                Method::POST,
                &format!("{}/terminate", self.path()),
                &Payload::json(&api::Terminate { wait })?,
                Retry::Always,
            )
            .await?;
        if !wait {
            return Ok(None);
        }
        let r = if r.finished {
            r
        } else {
            self.finished().await?
        };
        self.returncode_of(&r).map(Some)
    }

    /// Disconnects this handle (and its clones, processes and streams): later calls fail with
    /// `ClientClosed`, except `wait`, `wait_returncode`, `wait_until_ready`, `poll`,
    /// `returncode` and `info`. Idempotent; the sandbox keeps running.
    pub fn detach(&self) {
        self.inner.guard.detach();
    }

    /// Replaces all of its tags.
    pub async fn set_tags(&self, tags: BTreeMap<String, String>) -> Result<()> {
        self.check("set_tags")?;
        let _: api::Tags = self
            .client()
            .json(
                Method::PUT,
                &format!("{}/tags", self.path()),
                &Payload::json(&api::Tags { tags })?,
                Retry::Always,
            )
            .await?;
        Ok(())
    }

    pub async fn get_tags(&self) -> Result<BTreeMap<String, String>> {
        self.check("get_tags")?;
        let t: api::Tags = self.client().get(&format!("{}/tags", self.path())).await?;
        Ok(t.tags)
    }

    /// Waits until the readiness probe first succeeded; returns when that was (Unix seconds).
    /// `Invalid` without a probe, `Conflict` when it finished first, `Timeout` after `timeout`.
    pub async fn wait_until_ready(&self, timeout: Duration) -> Result<f64> {
        let r: api::Ready = self
            .client()
            .json(
                Method::POST,
                &format!("{}/wait_until_ready", self.path()),
                &Payload::json(&api::WaitUntilReady {
                    timeout_secs: timeout.as_secs_f64(),
                })?,
                Retry::Always,
            )
            .await?;
        Ok(r.ready_at)
    }

    /// The entrypoint's stdout, from offset 0 (a new reader each call).
    pub fn stdout(&self) -> StreamReader {
        StreamReader::new(
            self.client().clone(),
            format!("{}/stdout", self.path()),
            self.inner.guard.clone(),
        )
    }

    /// The entrypoint's stderr, from offset 0 (a new reader each call).
    pub fn stderr(&self) -> StreamReader {
        StreamReader::new(
            self.client().clone(),
            format!("{}/stderr", self.path()),
            self.inner.guard.clone(),
        )
    }

    /// The entrypoint's stdin (create the sandbox with `stdin: true`). Every call returns the
    /// same writer: one buffer and position per handle and its clones. A handle from
    /// `from_id`/`from_name` asks sbxd for the position on its first drain.
    pub fn stdin(&self) -> StreamWriter {
        self.inner.stdin.clone()
    }

    /// Its lifecycle events in order (created, scheduled, started, ready, finished). With
    /// `follow` the stream stays open until the finished event; without, it ends after the
    /// events so far. It resumes after the last event seen when the connection breaks; an
    /// `Err` item ends it. Errors of the first request (`not_found`) come back here.
    pub async fn events(&self, follow: bool) -> Result<EventStream> {
        self.check("events")?;
        stream::events(
            self.client().clone(),
            format!("{}/events", self.path()),
            follow,
        )
        .await
    }

    /// Its files (Modal's `sandbox.filesystem`).
    pub fn filesystem(&self) -> Filesystem {
        Filesystem {
            client: self.client().clone(),
            path: format!("{}/fs", self.path()),
            guard: self.inner.guard.clone(),
        }
    }

    /// Terminates it if it runs, then makes sbxd forget it: its records and its output.
    pub async fn delete(&self) -> Result<()> {
        self.check("delete")?;
        self.client()
            .unit(
                Method::DELETE,
                self.path(),
                &Payload::Empty,
                Retry::IfUnsent,
            )
            .await
    }
}

/// One process started by [`Sandbox::exec`] (Modal's `ContainerProcess`).
///
/// Its streams are borrowed (`&StreamReader`, `&StreamWriter`): read stdout and stderr at once
/// with `tokio::join!(p.stdout().read_to_end(), p.stderr().read_to_end())`.
#[derive(Debug)]
pub struct Process {
    exec_id: String,
    sandbox_id: String,
    client: Client,
    /// `/v1/sandboxes/{id}/execs/{exec_id}`.
    path: String,
    stdout: StreamReader,
    stderr: StreamReader,
    stdin: StreamWriter,
    guard: Guard,
}

impl Process {
    /// The exec id (`ex-…`).
    pub fn id(&self) -> &str {
        &self.exec_id
    }

    /// The sandbox it runs in.
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    pub fn stdout(&self) -> &StreamReader {
        &self.stdout
    }

    /// Empty (EOF at once) under a pty or when stderr was merged into stdout.
    pub fn stderr(&self) -> &StreamReader {
        &self.stderr
    }

    pub fn stdin(&self) -> &StreamWriter {
        &self.stdin
    }

    /// Waits for the exit code; 128+N when killed by signal N (137 when its timeout killed it).
    pub async fn wait(&self) -> Result<i32> {
        let path = format!("{}/wait?timeout={LONG_POLL_SECS}", self.path);
        loop {
            let info: api::ExecInfo = self.client.get(&path).await?;
            if let Some(rc) = self.returncode_of(&info)? {
                return Ok(rc);
            }
        }
    }

    /// The exit code if it exited, else `None`, without waiting.
    pub async fn poll(&self) -> Result<Option<i32>> {
        let info = self.info().await?;
        self.returncode_of(&info)
    }

    fn returncode_of(&self, info: &api::ExecInfo) -> Result<Option<i32>> {
        match (info.status, info.returncode) {
            (api::ExecStatus::Running, _) => Ok(None),
            (api::ExecStatus::Exited, Some(rc)) => Ok(Some(rc)),
            (api::ExecStatus::Exited, None) => Err(Error::Transport(format!(
                "sbxd reports exec {} exited without a returncode",
                self.exec_id
            ))),
        }
    }

    pub async fn info(&self) -> Result<api::ExecInfo> {
        self.client.get(&self.path).await
    }

    /// Sends signal `sig` (1..=64) to the process and its process group.
    pub async fn signal(&self, sig: i32) -> Result<()> {
        self.guard.check("signal")?;
        self.client
            .unit(
                Method::POST,
                &format!("{}/signal", self.path),
                &Payload::json(&api::SignalRequest { signal: sig })?,
                Retry::IfUnsent,
            )
            .await
    }

    /// Resizes its terminal (execs started with a pty).
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.guard.check("resize")?;
        self.client
            .unit(
                Method::POST,
                &format!("{}/resize", self.path),
                &Payload::json(&api::PtySize { rows, cols })?,
                Retry::Always,
            )
            .await
    }
}

/// The files of a sandbox (Modal's `sandbox.filesystem`). Paths must be absolute (`Invalid`
/// otherwise, before any request); a missing path is `NotFound`, other failures
/// [`Error::Filesystem`].
#[derive(Debug, Clone)]
pub struct Filesystem {
    client: Client,
    /// `/v1/sandboxes/{id}/fs`.
    path: String,
    guard: Guard,
}

impl Filesystem {
    /// `…/fs/{route}?path=P`, after checking the guard and that `path` is absolute.
    fn route(&self, what: &str, route: &str, path: &str) -> Result<String> {
        self.guard.check(what)?;
        if !path.starts_with('/') {
            return Err(Error::Invalid(format!(
                "{what}: path {path:?} is not absolute"
            )));
        }
        Ok(format!("{}{route}?path={}", self.path, enc(path)))
    }

    pub async fn read_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let url = self.route("read_bytes", "/file", path)?;
        let body = self
            .client
            .call(Method::GET, &url, &Payload::Empty, Retry::Always)
            .await?;
        Ok(body.to_vec())
    }

    /// The file as strict UTF-8 (`Invalid` naming the first bad byte).
    pub async fn read_text(&self, path: &str) -> Result<String> {
        String::from_utf8(self.read_bytes(path).await?).map_err(|e| {
            Error::Invalid(format!(
                "{path} is not UTF-8 at byte {}",
                e.utf8_error().valid_up_to()
            ))
        })
    }

    /// Creates or replaces the file (mode 0644), creating missing parent directories.
    pub async fn write_bytes(&self, path: &str, data: impl Into<bytes::Bytes>) -> Result<()> {
        let url = self.route("write_bytes", "/file", path)?;
        let _: api::FileInfo = self
            .client
            .json(Method::PUT, &url, &Payload::Raw(data.into()), Retry::Always)
            .await?;
        Ok(())
    }

    pub async fn write_text(&self, path: &str, text: &str) -> Result<()> {
        self.write_bytes(path, bytes::Bytes::copy_from_slice(text.as_bytes()))
            .await
    }

    /// The entries of a directory.
    pub async fn list_files(&self, path: &str) -> Result<Vec<api::FileInfo>> {
        let url = self.route("list_files", "/list", path)?;
        self.client.get(&url).await
    }

    /// One path (a final symlink is described, not followed).
    pub async fn stat(&self, path: &str) -> Result<api::FileInfo> {
        let url = self.route("stat", "/stat", path)?;
        self.client.get(&url).await
    }

    /// Creates a directory; with `create_parents`, also missing parents, and an existing
    /// directory is fine.
    pub async fn make_directory(&self, path: &str, create_parents: bool) -> Result<()> {
        // Checks only; the path travels in the body.
        self.route("make_directory", "/mkdir", path)?;
        let retry = if create_parents {
            Retry::Always // idempotent: an existing directory is success
        } else {
            Retry::IfUnsent
        };
        let _: api::FileInfo = self
            .client
            .json(
                Method::POST,
                &format!("{}/mkdir", self.path),
                &Payload::json(&api::Mkdir {
                    path: path.to_string(),
                    parents: create_parents,
                })?,
                retry,
            )
            .await?;
        Ok(())
    }

    /// Removes a file or an empty directory; with `recursive`, a directory and its contents.
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let url = format!("{}&recursive={recursive}", self.route("remove", "", path)?);
        self.client
            .unit(Method::DELETE, &url, &Payload::Empty, Retry::IfUnsent)
            .await
    }
}

#[cfg(all(test, feature = "daemon"))]
mod tests;

#[cfg(test)]
mod assertions {
    use super::*;

    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}

    /// Handles can be shared across tasks and their futures spawned on a multi-threaded runtime.
    #[test]
    fn handles_and_futures_are_send() {
        send_sync::<Client>();
        send_sync::<Sandbox>();
        send_sync::<Process>();
        send_sync::<StreamReader>();
        send_sync::<StreamWriter>();
        send_sync::<Filesystem>();
        send_sync::<Image>();
        send_sync::<Error>();
        if false {
            // Never run: only the futures' types are checked.
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let client = rt.block_on(Client::connect()).unwrap();
            let sb = Sandbox::handle(&client, "sb-x", None);
            send(&sb.exec(["true"]));
            send(&sb.wait());
            send(&sb.events(true));
            send(&sb.stdout().next_line());
            send(&sb.stdin().drain());
            send(&sb.filesystem().read_bytes("/x"));
            send(&sb.snapshot_filesystem());
            send(&Sandbox::create(
                &client,
                Image::host().run_commands(["true"]),
            ));
            send(&Image::pull(&client, "busybox", |_| {}));
        }
    }
}
