//! The one HTTP/2 (h2c, prior knowledge) connection to sbxd over its Unix socket, shared by every
//! clone of a [`Client`] and every concurrent call, and the request helpers built on it: retries
//! with backoff, error bodies mapped to [`Error`], query-string encoding.

use super::{Client, Error, Result};
use crate::api;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// How many times a failed transport step is retried before the error is returned.
pub(crate) const MAX_RETRIES: u32 = 8;
/// Seconds a long poll (`…/wait?timeout=`) asks sbxd to hold the request (under its 60 s cap).
pub(crate) const LONG_POLL_SECS: u32 = 55;
/// Per-stream HTTP/2 receive window: how much of one unread stream may wait in the client.
const STREAM_WINDOW: u32 = 2 << 20;
/// Connection receive window: large, so one stream nobody reads never stalls the others (each
/// stream is still flow-controlled by its own window).
const CONNECTION_WINDOW: u32 = 1 << 30;
/// Largest HTTP/2 frame sbxd may send us (bigger frames, fewer wakeups on bulk output).
const MAX_FRAME: u32 = 1 << 20;

/// The wait before retry number `attempt` (1-based): 50 ms doubling, at most 1 s; the 8 retries
/// span about 4.5 s, long enough to ride out a restart of sbxd.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let ms = 50u64 << attempt.saturating_sub(1).min(5);
    Duration::from_millis(ms.min(1000))
}

/// Whether a request may be sent again after a transport failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Only if it provably never left this process (creates, deletes, signals).
    IfUnsent,
    /// Always: repeating it is harmless (reads, long polls, offset-addressed writes, PUTs,
    /// execs with a client-chosen id, terminate).
    Always,
}

/// A request body.
#[derive(Debug, Clone)]
pub(crate) enum Payload {
    Empty,
    Json(Bytes),
    Raw(Bytes),
}

impl Payload {
    pub(crate) fn json<T: Serialize>(value: &T) -> Result<Payload> {
        serde_json::to_vec(value)
            .map(|v| Payload::Json(v.into()))
            .map_err(|e| Error::Invalid(format!("cannot encode the request as JSON: {e}")))
    }
}

/// The shared connection: a cached `SendRequest` (cloned per request; HTTP/2 multiplexes) and
/// a lock that lets one caller at a time dial a new connection when the old one died.
pub(crate) struct Conn {
    socket: PathBuf,
    current: Mutex<Option<SendRequest<Full<Bytes>>>>,
    connecting: tokio::sync::Mutex<()>,
}

impl Conn {
    pub(crate) fn new(socket: PathBuf) -> Conn {
        Conn {
            socket,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    fn cached(&self) -> Option<SendRequest<Full<Bytes>>> {
        let guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// A sender on a live connection, dialing a new one if there is none or it closed.
    pub(crate) async fn sender(&self) -> Result<SendRequest<Full<Bytes>>> {
        if let Some(s) = self.cached() {
            return Ok(s);
        }
        let _dialing = self.connecting.lock().await;
        if let Some(s) = self.cached() {
            return Ok(s); // another caller dialed while we waited
        }
        let sender = dial(&self.socket).await?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
        Ok(sender)
    }
}

/// Connects to the socket and runs the HTTP/2 handshake; the connection is driven by a task on
/// the caller's tokio runtime until every sender is dropped or the peer goes away.
async fn dial(socket: &Path) -> Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| Error::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            Error::Transport(format!(
                "HTTP/2 handshake with sbxd at {}: {}",
                socket.display(),
                chain(&e)
            ))
        })?;
    tokio::spawn(async move {
        // The error (peer gone) reaches every in-flight request and the next call reconnects.
        let _ = conn.await;
    });
    Ok(sender)
}

/// An error and its sources, joined with `: ` (hyper's own message alone is terse).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// A failed attempt: whether the request provably never left, and the error.
struct Failure {
    unsent: bool,
    error: Error,
}

impl Client {
    pub(crate) fn conn(&self) -> &Conn {
        &self.inner
    }

    /// One try: get a sender (dialing if needed) and send.
    async fn attempt(
        &self,
        method: &Method,
        path: &str,
        payload: &Payload,
    ) -> std::result::Result<Response<Incoming>, Failure> {
        let mut sender = self.inner.sender().await.map_err(|error| Failure {
            unsent: true,
            error,
        })?;
        let builder = Request::builder()
            .method(method.clone())
            .uri(format!("http://sbx{path}"));
        let built = match payload {
            Payload::Empty => builder.body(Full::new(Bytes::new())),
            Payload::Json(b) => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(b.clone())),
            Payload::Raw(b) => builder
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(Full::new(b.clone())),
        };
        let request = built.map_err(|e| Failure {
            unsent: true,
            error: Error::Invalid(format!("cannot build the request {method} {path}: {e}")),
        })?;
        match sender.try_send_request(request).await {
            Ok(response) => Ok(response),
            Err(mut e) => {
                let unsent = e.take_message().is_some();
                Err(Failure {
                    unsent,
                    error: Error::Transport(format!("{method} {path}: {}", chain(e.error()))),
                })
            }
        }
    }

    /// Sends a request, retrying transport failures as `retry` allows, and returns the response
    /// when its status is a success; an error status becomes the daemon's typed error.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        payload: &Payload,
        retry: Retry,
    ) -> Result<Response<Incoming>> {
        let mut failures = 0;
        loop {
            match self.attempt(&method, path, payload).await {
                Ok(response) => return check_status(&method, path, response).await,
                Err(f) => {
                    let again = f.unsent || retry == Retry::Always;
                    if !again || failures >= MAX_RETRIES {
                        return Err(f.error);
                    }
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }

    /// Sends a request and collects the whole reply body. With [`Retry::Always`] a body that
    /// breaks off is fetched again.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        payload: &Payload,
        retry: Retry,
    ) -> Result<Bytes> {
        let mut failures = 0;
        loop {
            let response = self.send(method.clone(), path, payload, retry).await?;
            match response.into_body().collect().await {
                Ok(body) => return Ok(body.to_bytes()),
                Err(e) => {
                    let error = Error::Transport(format!(
                        "{method} {path}: reading the reply: {}",
                        chain(&e)
                    ));
                    if retry != Retry::Always || failures >= MAX_RETRIES {
                        return Err(error);
                    }
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }

    /// A call whose reply is JSON.
    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        payload: &Payload,
        retry: Retry,
    ) -> Result<T> {
        let body = self.call(method.clone(), path, payload, retry).await?;
        serde_json::from_slice(&body).map_err(|e| {
            Error::Transport(format!(
                "{method} {path}: sbxd's reply is not the expected JSON: {e}: {}",
                preview(&body)
            ))
        })
    }

    /// `GET path` → JSON.
    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(Method::GET, path, &Payload::Empty, Retry::Always)
            .await
    }

    /// A call whose reply has no body worth reading (204).
    pub(crate) async fn unit(
        &self,
        method: Method,
        path: &str,
        payload: &Payload,
        retry: Retry,
    ) -> Result<()> {
        self.call(method, path, payload, retry).await.map(drop)
    }
}

/// Passes a success through; turns an error status and its body into the typed error.
async fn check_status(
    method: &Method,
    path: &str,
    response: Response<Incoming>,
) -> Result<Response<Incoming>> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = match response.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Err(Error::Transport(format!(
                "{method} {path}: HTTP {status}, and reading its error body failed: {}",
                chain(&e)
            )))
        }
    };
    Err(error_from_reply(method, path, status, &body))
}

/// The typed error for a failed reply: the `{"error":{"code","message"}}` body when there is
/// one, else a variant chosen by the status (a proxy or an older sbxd may answer in plain text).
pub(crate) fn error_from_reply(
    method: &Method,
    path: &str,
    status: StatusCode,
    body: &[u8],
) -> Error {
    if let Ok(b) = serde_json::from_slice::<api::ErrorBody>(body) {
        return Error::from(b.error);
    }
    let text = format!("{method} {path}: HTTP {status}: {}", preview(body));
    match status.as_u16() {
        404 => Error::NotFound(text),
        400 | 405 | 411 | 413 | 415 | 422 => Error::Invalid(text),
        408 => Error::Timeout(text),
        409 => Error::Conflict(text),
        410 => Error::SandboxTerminated(text),
        429 => Error::ResourceExhausted(text),
        500..=599 => Error::Internal(text),
        _ => Error::Transport(text),
    }
}

/// The first few hundred bytes of a body, for messages.
fn preview(body: &[u8]) -> String {
    const MAX: usize = 300;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    let text = text.trim();
    if body.len() > MAX {
        format!("{text}…")
    } else if text.is_empty() {
        "(empty body)".to_string()
    } else {
        text.to_string()
    }
}

/// Percent-encodes `s` for a path segment or a query value: everything but RFC 3986's
/// unreserved characters (`A-Z a-z 0-9 - . _ ~`) becomes `%XX` (UTF-8 bytes).
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_query_values() {
        assert_eq!(enc("/tmp/a b&c=d#e%f"), "%2Ftmp%2Fa%20b%26c%3Dd%23e%25f");
        assert_eq!(enc("héllo"), "h%C3%A9llo");
        assert_eq!(enc("sb-AZaz09._~"), "sb-AZaz09._~");
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(5), Duration::from_millis(800));
        assert_eq!(backoff(6), Duration::from_millis(1000));
        assert_eq!(backoff(40), Duration::from_millis(1000));
    }

    #[test]
    fn plain_error_bodies_map_by_status() {
        let e = error_from_reply(&Method::GET, "/v1/nope", StatusCode::NOT_FOUND, b"no route");
        assert!(
            matches!(&e, Error::NotFound(m) if m.contains("/v1/nope") && m.contains("no route")),
            "{e}"
        );
        let e = error_from_reply(&Method::POST, "/v1/x", StatusCode::BAD_GATEWAY, b"");
        assert!(matches!(&e, Error::Internal(m) if m.contains("502")), "{e}");
        let body = br#"{"error":{"code":"directory_not_empty","message":"/a has entries"}}"#;
        let e = error_from_reply(&Method::DELETE, "/v1/x", StatusCode::BAD_REQUEST, body);
        assert!(
            matches!(
                &e,
                Error::Filesystem {
                    code: api::ErrorCode::DirectoryNotEmpty,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.to_string(), "directory_not_empty: /a has entries");
    }
}
