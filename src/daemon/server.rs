//! The HTTP API (routes in [`crate::api`]'s module doc) served over a Unix socket with
//! HTTP/1.1 and HTTP/2 (h2c, prior knowledge) on the same socket.

use super::{Daemon, SandboxStatus};
use crate::api::{self, ApiError, ErrorBody, ErrorCode};
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use std::sync::Arc;

/// An API failure as an HTTP response.
pub struct Fail(pub ApiError);

impl From<ApiError> for Fail {
    fn from(e: ApiError) -> Self {
        Fail(e)
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorBody { error: self.0 })).into_response()
    }
}

type R<T> = Result<T, Fail>;
type D = State<Arc<Daemon>>;

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    what: &str,
    body: &[u8],
) -> Result<T, ApiError> {
    // Objects only: serde would also read a JSON array field by field.
    if let Some(b) = body.iter().find(|b| !b.is_ascii_whitespace()) {
        if *b != b'{' {
            return Err(ApiError::new(
                ErrorCode::Invalid,
                format!("invalid {what} body: expected a JSON object"),
            ));
        }
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return serde_json::from_slice(b"{}")
            .map_err(|e| ApiError::new(ErrorCode::Invalid, format!("{what}: empty body: {e}")));
    }
    // Unknown fields are refused here, not by the types: the wire types accept fields they do
    // not know so that a client reading a newer sbxd's replies keeps working.
    let bad = |e: serde_json::Error| {
        ApiError::new(ErrorCode::Invalid, format!("invalid {what} body: {e}"))
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut unknown: Option<String> = None;
    let v: T = serde_ignored::deserialize(&mut de, |path| {
        unknown.get_or_insert_with(|| path.to_string());
    })
    .map_err(bad)?;
    de.end().map_err(bad)?;
    if let Some(field) = unknown {
        return Err(ApiError::new(
            ErrorCode::Invalid,
            format!("invalid {what} body: unknown field `{field}`"),
        ));
    }
    Ok(v)
}

/// Percent-decoding (`+` stays a `+`); None when the result is not UTF-8.
pub(crate) fn pct_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |h: &[u8]| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        };
        match (b[i], b.get(i + 1..i + 3).and_then(hex)) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The query string as (key, value) pairs, percent-decoded, repeats kept.
pub(crate) struct Q(pub(crate) Vec<(String, String)>);

impl Q {
    /// `invalid` when a key or value is not UTF-8 once decoded (it would name another file).
    pub(crate) fn new(raw: Option<String>) -> Result<Q, ApiError> {
        let mut v = Vec::new();
        for p in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, val) = p.split_once('=').unwrap_or((p, ""));
            match (pct_decode(k), pct_decode(val)) {
                (Some(k), Some(val)) => v.push((k, val)),
                _ => {
                    return Err(ApiError::invalid(
                        "query",
                        format!("{p:?}"),
                        "parameters must be percent-encoded UTF-8",
                    ))
                }
            }
        }
        Ok(Q(v))
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, k: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
    }

    fn bool(&self, k: &str, default: bool) -> Result<bool, ApiError> {
        match self.get(k) {
            None => Ok(default),
            Some("" | "true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(v) => Err(ApiError::invalid(
                k,
                format!("{v:?}"),
                "must be true or false",
            )),
        }
    }

    fn u64(&self, k: &str, default: u64) -> Result<u64, ApiError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ApiError::invalid(k, format!("{v:?}"), "must be a whole number ≥ 0")),
        }
    }

    fn secs(&self, k: &str) -> Result<f64, ApiError> {
        match self.get(k) {
            None => Ok(0.0),
            Some(v) => match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => Ok(x.min(api::MAX_LONG_POLL_SECS)),
                _ => Err(ApiError::invalid(
                    k,
                    format!("{v:?}"),
                    "must be seconds ≥ 0",
                )),
            },
        }
    }
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if api::is_sandbox_id(id) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no sandbox {id:?} (ids look like sb- and 22 letters or digits)"),
        ))
    }
}

pub fn router(d: Arc<Daemon>) -> Router {
    let sb = "/v1/sandboxes/{id}";
    let ex = "/v1/sandboxes/{id}/execs/{exec_id}";
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/sandboxes", post(create).get(list))
        .route(sb, get(info).delete(delete))
        .route("/v1/apps/{app}/sandboxes/{name}", get(from_name))
        .route(&format!("{sb}/terminate"), post(terminate))
        .route(&format!("{sb}/wait"), get(wait))
        .route(&format!("{sb}/wait_until_ready"), post(wait_until_ready))
        .route(&format!("{sb}/tags"), get(get_tags).put(put_tags))
        .route(&format!("{sb}/events"), get(events))
        .route(&format!("{sb}/stdout"), get(entry_stdout))
        .route(&format!("{sb}/stderr"), get(entry_stderr))
        .route(&format!("{sb}/stdin"), post(entry_stdin))
        .route(&format!("{sb}/execs"), post(exec))
        .route(ex, get(exec_info))
        .route(&format!("{ex}/wait"), get(exec_wait))
        .route(&format!("{ex}/stdout"), get(exec_stdout))
        .route(&format!("{ex}/stderr"), get(exec_stderr))
        .route(&format!("{ex}/stdin"), post(exec_stdin))
        .route(&format!("{ex}/resize"), post(exec_resize))
        .route(&format!("{ex}/signal"), post(exec_signal))
        .merge(super::fs_routes())
        .merge(super::images::image_routes())
        .route("/v1/images/build", post(super::build::build_route))
        .route("/v1/secrets", post(create_secret).get(list_secrets))
        .route("/v1/secrets/{name}", axum::routing::delete(delete_secret))
        .route("/v1/volumes", get(list_volumes))
        .route("/v1/volumes/{name}", axum::routing::delete(delete_volume))
        .fallback(|| async {
            Fail(ApiError::new(
                ErrorCode::NotFound,
                "no such route (see docs/openapi.yaml)",
            ))
        })
        .layer(axum::middleware::map_response(error_bodies))
        .with_state(d)
}

/// Every failure carries an `ErrorBody`, also those axum answers itself (wrong method, a body
/// over the limit, a path segment that is not UTF-8).
async fn error_bodies(resp: Response) -> Response {
    use http_body_util::BodyExt;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match body.collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            ErrorCode::Invalid,
            "method not allowed on this route (see docs/openapi.yaml)".to_string(),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            ErrorCode::Invalid,
            "request body too large: JSON bodies are limited to 2 MiB".to_string(),
        ),
        s if s.is_server_error() => (ErrorCode::Internal, text),
        _ => (ErrorCode::Invalid, text),
    };
    let mut out = Fail(ApiError::new(code, message)).into_response();
    *out.status_mut() = status;
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

async fn version() -> Json<api::Version> {
    Json(api::Version {
        version: env!("CARGO_PKG_VERSION").into(),
        api: "v1".into(),
    })
}

async fn health(State(d): D) -> Json<api::Health> {
    Json(api::Health {
        status: "ok".into(),
        sandboxes_running: d.running_count(),
        cgroup: d.cgroup_version.clone(),
    })
}

async fn metrics(State(d): D) -> Response {
    use std::fmt::Write;
    let mut out = String::new();
    let counts = d.store.count_by_status().unwrap_or_default();
    let _ = writeln!(
        out,
        "# HELP sbx_sandboxes Sandboxes sbxd knows, by status.\n# TYPE sbx_sandboxes gauge"
    );
    for st in ["pending", "running", "finished"] {
        let _ = writeln!(
            out,
            "sbx_sandboxes{{status=\"{st}\"}} {}",
            counts.get(st).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(
        out,
        "# HELP sbx_warm_sandboxes Sandboxes started ahead of time, ready for a create.\n# TYPE sbx_warm_sandboxes gauge\nsbx_warm_sandboxes {}",
        d.warm.ready()
    );
    let _ = writeln!(
        out,
        "# HELP sbx_teardowns_pending Teardowns of ended sandboxes queued or running in the background (cgroup and directory removal).\n# TYPE sbx_teardowns_pending gauge\nsbx_teardowns_pending {}",
        crate::runtime::janitor::pending()
    );
    let _ = writeln!(
        out,
        "# HELP sbx_warm_creates_total Creates that could use a warm sandbox, by whether one was ready.\n# TYPE sbx_warm_creates_total counter\nsbx_warm_creates_total{{result=\"hit\"}} {}\nsbx_warm_creates_total{{result=\"miss\"}} {}",
        d.warm.hits.load(std::sync::atomic::Ordering::Relaxed),
        d.warm.misses.load(std::sync::atomic::Ordering::Relaxed)
    );
    d.create_latency.render(
        "sbx_sandbox_create_seconds",
        "Time from a create request until the sandbox runs.",
        &mut out,
    );
    d.exec_latency.render(
        "sbx_exec_start_seconds",
        "Time to start an exec'd process in a running sandbox.",
        &mut out,
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        out,
    )
        .into_response()
}

async fn create(State(d): D, body: Bytes) -> R<Response> {
    let req: api::CreateSandbox = parse("create", &body)?;
    let info = d.create(req)?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list(State(d): D, RawQuery(q): RawQuery) -> R<Json<Vec<api::SandboxSummary>>> {
    let q = Q::new(q)?;
    let mut tags = std::collections::BTreeMap::new();
    for t in q.all("tag") {
        let (k, v) = t
            .split_once('=')
            .ok_or_else(|| ApiError::invalid("tag", format!("{t:?}"), "expected K=V"))?;
        tags.insert(k.to_string(), v.to_string());
    }
    let app = q.get("app").filter(|a| !a.is_empty());
    Ok(Json(d.store.list(app, &tags, q.bool("all", false)?)?))
}

async fn info(State(d): D, Path(id): Path<String>) -> R<Json<api::SandboxInfo>> {
    check_id(&id)?;
    Ok(Json(d.info(&id)?))
}

async fn from_name(
    State(d): D,
    Path((app, name)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> R<Json<api::SandboxInfo>> {
    let q = Q::new(q)?;
    let id = d
        .store
        .by_name(&app, &name, q.bool("include_terminated", false)?)?;
    Ok(Json(d.info(&id)?))
}

async fn delete(State(d): D, Path(id): Path<String>) -> R<StatusCode> {
    check_id(&id)?;
    d.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn terminate(State(d): D, Path(id): Path<String>, body: Bytes) -> R<Json<api::WaitResult>> {
    check_id(&id)?;
    let t: api::Terminate = parse("terminate", &body)?;
    d.store.sandbox(&id)?;
    Ok(Json(d.terminate(&id, t.wait).await?))
}

async fn wait(
    State(d): D,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> R<Json<api::WaitResult>> {
    check_id(&id)?;
    let q = Q::new(q)?;
    Ok(Json(d.wait(&id, q.secs("timeout")?).await?))
}

async fn wait_until_ready(State(d): D, Path(id): Path<String>, body: Bytes) -> R<Json<api::Ready>> {
    check_id(&id)?;
    let w: api::WaitUntilReady = parse("wait_until_ready", &body)?;
    Ok(Json(d.wait_until_ready(&id, w.timeout_secs).await?))
}

async fn get_tags(State(d): D, Path(id): Path<String>) -> R<Json<api::Tags>> {
    check_id(&id)?;
    Ok(Json(api::Tags {
        tags: d.store.sandbox(&id)?.tags,
    }))
}

async fn put_tags(State(d): D, Path(id): Path<String>, body: Bytes) -> R<Json<api::Tags>> {
    check_id(&id)?;
    let t: api::Tags = parse("tags", &body)?;
    for (k, v) in &t.tags {
        if k.is_empty() || k.len() > 256 || v.len() > 1024 {
            return Err(ApiError::invalid(
                "tags",
                format!("{k:?}"),
                "keys must be 1..=256 bytes and values at most 1024",
            )
            .into());
        }
    }
    d.store.set_tags(&id, &t.tags)?;
    Ok(Json(t))
}

async fn events(State(d): D, Path(id): Path<String>, RawQuery(q): RawQuery) -> R<Response> {
    check_id(&id)?;
    let q = Q::new(q)?;
    let after = q.u64("after", 0)?;
    let follow = q.bool("follow", false)?;
    d.store.sandbox(&id)?;
    let live = d.live(&id);
    struct St {
        d: Arc<Daemon>,
        id: String,
        after: u64,
        rx: Option<tokio::sync::watch::Receiver<super::LiveState>>,
        follow: bool,
        done: bool,
    }
    let st = St {
        d: d.clone(),
        id,
        after,
        rx: live.map(|l| l.state.subscribe()),
        follow,
        done: false,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let evs = match st.d.store.events(&st.id, st.after) {
                Ok(e) => e,
                Err(e) => return Some((Err(std::io::Error::other(e.to_string())), st)),
            };
            if !evs.is_empty() {
                let mut out = Vec::new();
                for e in &evs {
                    st.after = e.seq;
                    if e.kind == api::EventKind::Finished {
                        st.done = true;
                    }
                    if let Ok(line) = serde_json::to_vec(e) {
                        out.extend_from_slice(&line);
                        out.push(b'\n');
                    }
                }
                return Some((Ok(Bytes::from(out)), st));
            }
            if !st.follow {
                return None;
            }
            let rx = st.rx.as_mut()?;
            let after = st.after;
            if rx.wait_for(|s| s.events > after).await.is_err() {
                // The sandbox left memory: read what the store has, then end.
                st.follow = false;
            }
        }
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        Body::from_stream(stream),
    )
        .into_response())
}

fn stream_response(spool: Arc<super::output::Spool>, q: &Q) -> R<Response> {
    let offset = q.u64("offset", 0)?;
    let follow = q.bool("follow", true)?;
    let st = spool.state();
    let body = Body::from_stream(spool.read_from(offset, follow));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("sbx-offset", HeaderValue::from(offset));
    if !follow {
        h.insert(
            "sbx-eof",
            HeaderValue::from_static(if st.eof { "true" } else { "false" }),
        );
    }
    Ok(resp)
}

async fn entry_stdout(State(d): D, Path(id): Path<String>, RawQuery(q): RawQuery) -> R<Response> {
    check_id(&id)?;
    stream_response(d.stream(&id, None, false)?, &Q::new(q)?)
}

async fn entry_stderr(State(d): D, Path(id): Path<String>, RawQuery(q): RawQuery) -> R<Response> {
    check_id(&id)?;
    stream_response(d.stream(&id, None, true)?, &Q::new(q)?)
}

fn body_stream(body: Body) -> impl futures_util::Stream<Item = Result<Bytes, String>> + Unpin {
    body.into_data_stream()
        .map(|r| r.map_err(|e| e.to_string()))
}

async fn entry_stdin(
    State(d): D,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Body,
) -> R<Json<api::StdinAck>> {
    check_id(&id)?;
    let q = Q::new(q)?;
    let offset = q.u64("offset", 0)?;
    let eof = q.bool("eof", false)?;
    let live = d.running(&id, "write stdin").await?;
    if !live.config.stdin {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("sandbox {id} was created without stdin (create with \"stdin\": true)"),
        )
        .into());
    }
    live.touch();
    let stdin = super::lock(&live.entry_stdin).clone();
    let (offset, eof) = stdin.write(offset, body_stream(body), eof).await?;
    live.touch();
    Ok(Json(api::StdinAck { offset, eof }))
}

async fn exec(State(d): D, Path(id): Path<String>, body: Bytes) -> R<Response> {
    check_id(&id)?;
    let req: api::ExecRequest = parse("exec", &body)?;
    // Hot path: a live sandbox exists; only an unknown one costs a store read (not_found).
    if d.live(&id).is_none() {
        d.store.sandbox(&id)?;
    }
    let (info, fresh) = d.exec(&id, req).await?;
    let status = if fresh {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)).into_response())
}

async fn exec_info(State(d): D, Path((id, x)): Path<(String, String)>) -> R<Json<api::ExecInfo>> {
    check_id(&id)?;
    Ok(Json(d.exec_wait(&id, &x, 0.0).await?))
}

async fn exec_wait(
    State(d): D,
    Path((id, x)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> R<Json<api::ExecInfo>> {
    check_id(&id)?;
    let q = Q::new(q)?;
    Ok(Json(d.exec_wait(&id, &x, q.secs("timeout")?).await?))
}

async fn exec_stdout(
    State(d): D,
    Path((id, x)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> R<Response> {
    check_id(&id)?;
    stream_response(d.stream(&id, Some(&x), false)?, &Q::new(q)?)
}

async fn exec_stderr(
    State(d): D,
    Path((id, x)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> R<Response> {
    check_id(&id)?;
    stream_response(d.stream(&id, Some(&x), true)?, &Q::new(q)?)
}

fn exec_live(d: &Daemon, id: &str, x: &str) -> Result<Arc<super::ExecLive>, ApiError> {
    match d.exec_live(id, x) {
        Some(e) => Ok(e),
        None => {
            d.store.exec(id, x)?;
            Err(ApiError::new(
                ErrorCode::Conflict,
                format!("exec {x} has finished"),
            ))
        }
    }
}

async fn exec_stdin(
    State(d): D,
    Path((id, x)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: Body,
) -> R<Json<api::StdinAck>> {
    check_id(&id)?;
    let q = Q::new(q)?;
    let offset = q.u64("offset", 0)?;
    let eof = q.bool("eof", false)?;
    let e = exec_live(&d, &id, &x)?;
    let live = d.live(&id);
    if let Some(l) = &live {
        l.touch();
    }
    if e.info.borrow().status == api::ExecStatus::Exited {
        let (pos, closed) = e.stdin.position().await;
        // A retried write of bytes already taken (or a repeated EOF) still succeeds.
        if offset >= pos && !(eof && closed && offset == pos) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("exec {x} has finished: its stdin is closed"),
            )
            .into());
        }
    }
    let (offset, eof) = e.stdin.write(offset, body_stream(body), eof).await?;
    if let Some(l) = &live {
        l.touch();
    }
    Ok(Json(api::StdinAck { offset, eof }))
}

async fn exec_resize(
    State(d): D,
    Path((id, x)): Path<(String, String)>,
    body: Bytes,
) -> R<StatusCode> {
    check_id(&id)?;
    let p: api::PtySize = parse("resize", &body)?;
    if p.rows == 0 || p.cols == 0 {
        return Err(
            ApiError::invalid("size", format!("{}x{}", p.rows, p.cols), "must be > 0").into(),
        );
    }
    exec_live(&d, &id, &x)?.resize(p.rows, p.cols)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn exec_signal(
    State(d): D,
    Path((id, x)): Path<(String, String)>,
    body: Bytes,
) -> R<StatusCode> {
    check_id(&id)?;
    let s: api::SignalRequest = parse("signal", &body)?;
    if !(1..=64).contains(&s.signal) {
        return Err(ApiError::invalid("signal", s.signal, "must be 1..=64").into());
    }
    let e = exec_live(&d, &id, &x)?;
    if e.info.borrow().status == api::ExecStatus::Exited {
        return Err(ApiError::new(ErrorCode::Conflict, format!("exec {x} has finished")).into());
    }
    e.signal(s.signal)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_secret(State(d): D, body: Bytes) -> R<Response> {
    let req: api::CreateSecret = parse("secret", &body)?;
    let info = d.create_secret(req)?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list_secrets(State(d): D) -> R<Json<Vec<api::SecretInfo>>> {
    Ok(Json(d.store.secrets()?))
}

async fn delete_secret(State(d): D, Path(name): Path<String>) -> R<StatusCode> {
    d.delete_secret(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_volumes(State(d): D) -> R<Json<Vec<api::VolumeInfo>>> {
    Ok(Json(d.volumes()?))
}

async fn delete_volume(State(d): D, Path(name): Path<String>) -> R<StatusCode> {
    d.delete_volume(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Connections served at once, at most.
const MAX_CONNECTIONS: usize = 4096;

/// The cap: [`MAX_CONNECTIONS`], or fewer so that 256 descriptors stay for sandboxes
/// (pipes, spools, sockets) under a low open-files limit.
fn connection_cap() -> usize {
    use nix::sys::resource::{getrlimit, Resource};
    let soft = getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s as usize)
        .unwrap_or(1024);
    MAX_CONNECTIONS.min(soft.saturating_sub(256)).max(16)
}

/// Open connections, oldest first, and whether each has sent a request yet. At the cap, a
/// new connection takes the place of the oldest one that never sent anything (so idle
/// connections cannot lock clients out); when every connection is busy it is refused.
struct Connections {
    cap: usize,
    next: std::sync::atomic::AtomicU64,
    open: std::sync::Mutex<std::collections::BTreeMap<u64, OpenConn>>,
}

/// Whether the connection has sent a request, and how to close it.
type OpenConn = (
    Arc<std::sync::atomic::AtomicBool>,
    Option<tokio::task::AbortHandle>,
);

impl Connections {
    fn new(cap: usize) -> Self {
        Connections {
            cap,
            next: std::sync::atomic::AtomicU64::new(0),
            open: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    fn admit(&self) -> Option<(u64, Arc<std::sync::atomic::AtomicBool>)> {
        use std::sync::atomic::Ordering;
        let mut open = super::lock(&self.open);
        if open.len() >= self.cap {
            let idle = open
                .iter()
                .find(|(_, (served, _))| !served.load(Ordering::Relaxed))
                .map(|(id, _)| *id)?;
            if let Some((_, Some(h))) = open.remove(&idle) {
                h.abort();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
        open.insert(id, (served.clone(), None));
        Some((id, served))
    }

    fn started(&self, id: u64, h: tokio::task::AbortHandle) {
        if let Some(e) = super::lock(&self.open).get_mut(&id) {
            e.1 = Some(h);
        }
    }
}

/// Removes a connection from [`Connections`] when its task ends (or is aborted).
struct ConnGuard(Arc<Connections>, u64);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        super::lock(&self.0.open).remove(&self.1);
    }
}

/// Raise the soft open-files limit to the hard one (allowed without privileges): every
/// connection, pipe and spool is a descriptor.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, "could not raise the open-files limit to {hard}");
            }
        }
    }
}

/// Bind the socket (0660), serve until SIGINT/SIGTERM, then stop the sandboxes.
pub async fn serve(d: Arc<Daemon>) -> Result<(), String> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use std::os::unix::fs::PermissionsExt;
    let sock = d.cfg.socket.clone();
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    if sock.exists() {
        // A live daemon answers; a stale socket file is replaced.
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            return Err(format!(
                "another sbxd is already serving {}",
                sock.display()
            ));
        }
        std::fs::remove_file(&sock).map_err(|e| format!("remove stale {}: {e}", sock.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| format!("bind {}: {e}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("chmod {}: {e}", sock.display()))?;
    // Its pid, for scripts and operators that stop it (removed on a clean stop).
    let pid_file = d.cfg.state_dir.join("sbxd.pid");
    let _ = std::fs::write(&pid_file, format!("{}\n", std::process::id()));
    tracing::info!(socket = %sock.display(), state = %d.cfg.state_dir.display(), "sbxd serving");
    let app = router(d.clone());
    raise_nofile();
    // Every connection holds a descriptor: past this many, new ones are refused at once so
    // the daemon keeps the descriptors it needs for sandboxes.
    let conns = Arc::new(Connections::new(connection_cap()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("install SIGTERM handler: {e}"))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| format!("install SIGINT handler: {e}"))?;
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (stream, _) = match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some((conn_id, served)) = conns.admit() else {
                    tracing::warn!("{} connections open, all busy: refusing another", conns.cap);
                    drop(stream);
                    continue;
                };
                let flag = served.clone();
                let svc = hyper_util::service::TowerToHyperService::new(
                    tower::ServiceExt::map_request(app.clone(), move |req: axum::extract::Request<hyper::body::Incoming>| {
                        flag.store(true, std::sync::atomic::Ordering::Relaxed);
                        req
                    }),
                );
                let registry = conns.clone();
                let task = tokio::spawn(async move {
                    let _gone = ConnGuard(registry, conn_id);
                    let mut b = auto::Builder::new(TokioExecutor::new());
                    // A client that never finishes its request headers is cut off.
                    b.http1()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(30));
                    b.http2()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .keep_alive_interval(std::time::Duration::from_secs(60))
                        .keep_alive_timeout(std::time::Duration::from_secs(30))
                        .initial_stream_window_size(4 << 20)
                        .initial_connection_window_size(16 << 20)
                        .max_concurrent_streams(1024);
                    if let Err(e) = b.serve_connection(TokioIo::new(stream), svc).await {
                        tracing::debug!(error = %e, "connection ended");
                    }
                });
                conns.started(conn_id, task.abort_handle());
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("sbxd stopping: terminating sandboxes");
    drop(listener);
    let _ = std::fs::remove_file(&sock);
    d.shutdown().await;
    let _ = std::fs::remove_file(&pid_file);
    let _ = SandboxStatus::Finished;
    Ok(())
}
