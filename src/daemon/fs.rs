//! Filesystem routes: read, write, list, stat, mkdir and remove inside a running sandbox.
//! Paths resolve inside the sandbox's root (the runtime's [`crate::runtime::SandboxFs`]:
//! openat2 RESOLVE_IN_ROOT with the sandbox root's file credentials), so neither `..` nor a
//! symlink planted by the sandbox reaches the host. Each call counts as activity for the idle
//! timeout, as an exec would.

use super::server::Fail;
use super::Daemon;
use crate::api::{self, ApiError, ErrorCode};
use crate::runtime::{FileStat, FileType, FsError, FsErrorKind, SandboxFs};
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use std::sync::Arc;

type R<T> = Result<T, Fail>;

/// An upload that sends nothing for this long is abandoned.
const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

pub(crate) fn fs_routes() -> Router<Arc<Daemon>> {
    let base = "/v1/sandboxes/{id}/fs";
    Router::new()
        .route(&format!("{base}/file"), get(read).put(write))
        .route(&format!("{base}/list"), get(list))
        .route(&format!("{base}/stat"), get(stat))
        .route(&format!("{base}/mkdir"), post(mkdir))
        .route(base, axum::routing::delete(remove))
}

fn fs_error(e: FsError) -> ApiError {
    let code = match e.kind {
        FsErrorKind::NotFound => ErrorCode::NotFound,
        FsErrorKind::IsADirectory => ErrorCode::IsADirectory,
        FsErrorKind::NotADirectory => ErrorCode::NotADirectory,
        FsErrorKind::DirectoryNotEmpty => ErrorCode::DirectoryNotEmpty,
        FsErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        FsErrorKind::AlreadyExists => ErrorCode::AlreadyExists,
        FsErrorKind::Invalid => ErrorCode::Invalid,
        FsErrorKind::Finished => ErrorCode::Conflict,
        FsErrorKind::Io(_) => ErrorCode::Internal,
    };
    ApiError::new(code, e.message)
}

fn permissions(mode: u32) -> String {
    let mut s = String::with_capacity(9);
    for shift in [6, 3, 0] {
        let b = (mode >> shift) & 7;
        s.push(if b & 4 != 0 { 'r' } else { '-' });
        s.push(if b & 2 != 0 { 'w' } else { '-' });
        s.push(if b & 1 != 0 { 'x' } else { '-' });
    }
    s
}

pub(crate) fn file_info(f: FileStat) -> api::FileInfo {
    api::FileInfo {
        name: f.name,
        path: f.path,
        file_type: match f.file_type {
            FileType::File => api::FileType::File,
            FileType::Directory => api::FileType::Directory,
            FileType::Symlink => api::FileType::Symlink,
            FileType::Other => api::FileType::Other,
        },
        size: f.size,
        permissions: permissions(f.mode),
        mode: f.mode,
        owner: f.owner,
        group: f.group,
        modified_time: f.modified_time,
        symlink_target: f.symlink_target,
    }
}

fn query(raw: Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    Ok(super::server::Q::new(raw)?.0)
}

fn path_param(q: &[(String, String)]) -> Result<String, ApiError> {
    let p = q
        .iter()
        .rev()
        .find(|(k, _)| k == "path")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| ApiError::new(ErrorCode::Invalid, "missing query parameter path"))?;
    if !p.starts_with('/') {
        return Err(ApiError::invalid(
            "path",
            format!("{p:?}"),
            "must be an absolute path",
        ));
    }
    Ok(p)
}

/// The running sandbox's filesystem, touching it for the idle timeout.
async fn sandbox_fs(d: &Daemon, id: &str) -> Result<SandboxFs, ApiError> {
    if !api::is_sandbox_id(id) {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no sandbox {id:?}"),
        ));
    }
    if d.live(id).is_none() {
        d.store.sandbox(id)?;
    }
    let live = d.running(id, "use its filesystem").await?;
    live.touch();
    let sb = live.sandbox().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Conflict,
            format!("sandbox {id} has finished: cannot use its filesystem"),
        )
    })?;
    Ok(sb.fs())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("filesystem call: {e}")))?
        .map_err(fs_error)
}

async fn read(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> R<Response> {
    let path = path_param(&query(q)?)?;
    let fs = sandbox_fs(&d, &id).await?;
    let file = blocking(move || fs.read_file(&path)).await?;
    let f = tokio::fs::File::from_std(file);
    let body = futures_util::stream::unfold(Some(f), |f| async move {
        use tokio::io::AsyncReadExt;
        let mut f = f?;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // No Content-Length: /proc files report size 0, and a file may change while it is read.
    Ok(resp)
}

/// A blocking reader over an async body (for the runtime's write_file on a blocking thread).
struct BodyReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
}

impl std::io::Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

async fn write(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Body,
) -> R<Json<api::FileInfo>> {
    let path = path_param(&query(q)?)?;
    let fs = sandbox_fs(&d, &id).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let feeder = tokio::spawn(async move {
        let mut s = body.into_data_stream();
        loop {
            // A client that stops sending is cut off (the write fails, the old file stays).
            let item = match tokio::time::timeout(BODY_IDLE, s.next()).await {
                Ok(Some(chunk)) => chunk.map_err(|e| e.to_string()),
                Ok(None) => break,
                Err(_) => Err(format!(
                    "the request body sent nothing for {} s",
                    BODY_IDLE.as_secs()
                )),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    // Its own thread, not the bounded blocking pool: an upload lasts as long as the client
    // takes to send it.
    let st = super::waiter_thread("sbx-fs-write", move || {
        let mut r = BodyReader {
            rx,
            cur: Bytes::new(),
        };
        fs.write_file(&path, &mut r)
    })
    .await;
    feeder.abort();
    let st = st
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("filesystem write: {e}")))?
        .map_err(fs_error)?;
    Ok(Json(file_info(st)))
}

async fn list(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> R<Json<Vec<api::FileInfo>>> {
    let path = path_param(&query(q)?)?;
    let fs = sandbox_fs(&d, &id).await?;
    let v = blocking(move || fs.list_dir(&path)).await?;
    Ok(Json(v.into_iter().map(file_info).collect()))
}

async fn stat(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> R<Json<api::FileInfo>> {
    let path = path_param(&query(q)?)?;
    let fs = sandbox_fs(&d, &id).await?;
    Ok(Json(file_info(blocking(move || fs.stat(&path)).await?)))
}

async fn mkdir(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    body: Bytes,
) -> R<Json<api::FileInfo>> {
    let req: api::Mkdir = super::server::parse("mkdir", &body)?;
    if !req.path.starts_with('/') {
        return Err(ApiError::invalid(
            "path",
            format!("{:?}", req.path),
            "must be an absolute path",
        )
        .into());
    }
    let fs = sandbox_fs(&d, &id).await?;
    let p = req.path.clone();
    let st = blocking(move || {
        fs.mkdir(&p, req.parents)?;
        fs.stat(&p)
    })
    .await?;
    Ok(Json(file_info(st)))
}

async fn remove(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> R<Response> {
    let q = query(q)?;
    let path = path_param(&q)?;
    let recursive = match q.iter().rev().find(|(k, _)| k == "recursive") {
        None => false,
        Some((_, v)) => match v.as_str() {
            "" | "true" | "1" => true,
            "false" | "0" => false,
            v => {
                return Err(ApiError::invalid(
                    "recursive",
                    format!("{v:?}"),
                    "must be true or false",
                )
                .into())
            }
        },
    };
    let fs = sandbox_fs(&d, &id).await?;
    blocking(move || fs.remove(&path, recursive)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn permission_strings() {
        assert_eq!(super::permissions(0o644), "rw-r--r--");
        assert_eq!(super::permissions(0o755), "rwxr-xr-x");
        assert_eq!(super::permissions(0o4700), "rwx------");
    }
}
