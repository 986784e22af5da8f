//! Client tests against a small scripted HTTP/2 server on a Unix socket (hyper's server API;
//! built with the `daemon` feature, which enables it). The server plays sbxd's wire contract
//! for the routes each test needs and can cut connections mid-body or before replying.

use super::*;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

type TBody = UnsyncBoxBody<Bytes, std::io::Error>;
type Chunk = std::result::Result<Bytes, std::io::Error>;

/// A request as the scripted server hands it to a test's handler.
struct Req {
    method: Method,
    path: String,
    /// The raw query string, as sent.
    raw_query: String,
    query: Vec<(String, String)>,
    body: Bytes,
    /// The connection it came on: aborting it cuts the socket (a lost reply).
    conn: AbortHandle,
}

impl Req {
    fn q(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn offset(&self) -> usize {
        self.q("offset")
            .expect("offset=")
            .parse()
            .expect("offset is a number")
    }
}

type Handler =
    Arc<dyn Fn(Req) -> Pin<Box<dyn Future<Output = Response<TBody>> + Send>> + Send + Sync>;

struct Server {
    dir: PathBuf,
    socket: PathBuf,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    accept: AbortHandle,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("ascii");
            out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("utf-8 after decoding")
}

impl Server {
    fn start<F, Fut>(handler: F) -> Server
    where
        F: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TBody>> + Send + 'static,
    {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sbx-client-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create the test dir");
        let socket = dir.join("sbxd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind the test socket");
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn({
            let (conns, accepted, requests) = (conns.clone(), accepted.clone(), requests.clone());
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let me: Arc<OnceLock<AbortHandle>> = Arc::new(OnceLock::new());
                    let svc = hyper::service::service_fn({
                        let (handler, me, requests) =
                            (handler.clone(), me.clone(), requests.clone());
                        move |req: Request<Incoming>| {
                            let (handler, me, requests) =
                                (handler.clone(), me.clone(), requests.clone());
                            async move {
                                requests.fetch_add(1, Ordering::SeqCst);
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let raw_query = parts.uri.query().unwrap_or("").to_string();
                                let query = raw_query
                                    .split('&')
                                    .filter(|p| !p.is_empty())
                                    .map(|p| {
                                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                                        (percent_decode(k), percent_decode(v))
                                    })
                                    .collect();
                                let conn = me.get().expect("set right after spawn").clone();
                                let req = Req {
                                    method: parts.method,
                                    path: parts.uri.path().to_string(),
                                    raw_query,
                                    query,
                                    body,
                                    conn,
                                };
                                Ok::<_, std::convert::Infallible>(handler(req).await)
                            }
                        }
                    });
                    let task = tokio::spawn(async move {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                    let _ = me.set(task.abort_handle());
                    conns.lock().unwrap().push(task.abort_handle());
                }
            }
        })
        .abort_handle();
        Server {
            dir,
            socket,
            conns,
            accepted,
            requests,
            accept,
        }
    }

    async fn client(&self) -> Client {
        Client::connect_to(&self.socket)
            .await
            .expect("connect to the test server")
    }

    /// Drops every open connection (the client sees its bodies break).
    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<TBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(body.into())
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .expect("a valid response")
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<TBody> {
    full(status, "application/json", value.to_string())
}

fn api_error(code: api::ErrorCode, message: &str) -> Response<TBody> {
    let status = StatusCode::from_u16(code.http_status()).expect("a valid status");
    json(
        status,
        serde_json::json!({"error": {"code": code, "message": message}}),
    )
}

/// Resets the stream a little later, once the data sent before has left the server (a reset
/// discards what the server still had queued).
fn reset_later(tx: mpsc::UnboundedSender<Chunk>) {
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = tx.send(Err(std::io::Error::other("stream cut")));
    });
}

/// A streaming reply: the chunks sent on the channel, then its end (or an error: a reset).
fn streaming(offset: usize, rx: mpsc::UnboundedReceiver<Chunk>) -> Response<TBody> {
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(Frame::data), rx))
    });
    Response::builder()
        .header("content-type", "application/octet-stream")
        .header("sbx-offset", offset.to_string())
        .body(StreamBody::new(frames).boxed_unsync())
        .expect("a valid response")
}

fn exec_info(sandbox: &str, exec_id: &str, returncode: Option<i32>) -> serde_json::Value {
    serde_json::to_value(api::ExecInfo {
        exec_id: exec_id.to_string(),
        sandbox_id: sandbox.to_string(),
        argv: vec!["true".into()],
        status: if returncode.is_some() {
            api::ExecStatus::Exited
        } else {
            api::ExecStatus::Running
        },
        returncode,
        signal: None,
        timed_out: false,
        oom: false,
        started_at: 1.0,
        finished_at: returncode.map(|_| 2.0),
        stdout: api::StreamMode::Pipe,
        stderr: api::StreamMode::Pipe,
        pty: false,
    })
    .expect("ExecInfo serializes")
}

fn file_info(path: &str, size: u64) -> serde_json::Value {
    serde_json::to_value(api::FileInfo {
        name: path.rsplit('/').next().unwrap_or("").to_string(),
        path: path.to_string(),
        file_type: api::FileType::File,
        size,
        mode: 0o644,
        permissions: "rw-r--r--".into(),
        owner: 0,
        group: 0,
        modified_time: 1.0,
        symlink_target: None,
    })
    .expect("FileInfo serializes")
}

#[tokio::test]
async fn reader_resumes_at_its_offset_after_breaks_and_gets_every_byte_once() {
    let data: Arc<Vec<u8>> = Arc::new((0..100_000u32).map(|i| (i * 7 % 251) as u8).collect());
    let offsets = Arc::new(Mutex::new(Vec::new()));
    let held = Arc::new(Mutex::new(Vec::new()));
    let server = Server::start({
        let (data, offsets, held) = (data.clone(), offsets.clone(), held.clone());
        move |req: Req| {
            let (data, offsets, held) = (data.clone(), offsets.clone(), held.clone());
            async move {
                assert_eq!(req.method, Method::GET);
                assert_eq!(req.path, "/v1/sandboxes/sb-1/execs/ex-1/stdout");
                assert_eq!(req.q("follow"), Some("true"));
                let off = req.offset();
                let n = {
                    let mut o = offsets.lock().unwrap();
                    o.push(off);
                    o.len()
                };
                let (tx, rx) = mpsc::unbounded_channel();
                // 1st reply: 30000 bytes, then it stalls (the test cuts the connection);
                // 2nd: up to 60000, then the stream is reset; 3rd: the rest and a clean end.
                let end = match n {
                    1 => 30_000,
                    2 => 60_000,
                    _ => data.len(),
                };
                for c in data[off..end].chunks(7000) {
                    tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
                }
                match n {
                    1 => held.lock().unwrap().push(tx),
                    2 => reset_later(tx),
                    _ => drop(tx),
                }
                streaming(off, rx)
            }
        }
    });
    let client = server.client().await;
    let sb = Sandbox::handle(&client, "sb-1", None);
    let p = sb.process("ex-1");
    let mut got = Vec::new();
    while got.len() < 30_000 {
        got.extend_from_slice(&p.stdout().next_chunk().await.unwrap().expect("more data"));
    }
    assert_eq!(p.stdout().offset(), 30_000);
    server.cut(); // the whole connection goes away mid-body
    while let Some(c) = p.stdout().next_chunk().await.unwrap() {
        assert!(!c.is_empty(), "never an empty chunk");
        got.extend_from_slice(&c);
    }
    assert_eq!(got.len(), data.len());
    assert!(got == *data, "every byte once, in order");
    assert_eq!(*offsets.lock().unwrap(), [0, 30_000, 60_000]);
    assert_eq!(p.stdout().offset(), data.len() as u64);
    assert_eq!(
        p.stdout().next_chunk().await.unwrap(),
        None,
        "EOF stays EOF"
    );
    assert_eq!(server.accepted(), 2, "one reconnect after the cut");
}

/// A server that streams `chunks` (cut at `offset` when resumed) on the entrypoint's stdout.
fn chunked_stdout(chunks: &'static [&'static [u8]]) -> Server {
    Server::start(move |req: Req| async move {
        assert_eq!(req.path, "/v1/sandboxes/sb-1/stdout");
        let off = req.offset();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut pos = 0;
        for c in chunks {
            let (start, end) = (pos, pos + c.len());
            pos = end;
            if end > off {
                tx.send(Ok(Bytes::copy_from_slice(&c[off.saturating_sub(start)..])))
                    .unwrap();
            }
        }
        streaming(off, rx)
    })
}

#[tokio::test]
async fn lines_split_across_chunks_keep_the_final_unterminated_line() {
    let server = chunked_stdout(&[b"h\xc3", b"\xa9llo\nwor", b"ld\n", b"\n", b"tail"]);
    let client = server.client().await;
    let sb = Sandbox::handle(&client, "sb-1", None);
    let out = sb.stdout();
    let mut lines = Vec::new();
    while let Some(l) = out.next_line().await.unwrap() {
        lines.push(l);
    }
    assert_eq!(lines, ["héllo\n", "world\n", "\n", "tail"]);
    assert_eq!(out.offset(), 18);
    // A reader placed mid-stream starts there.
    let rest = sb.stdout().at(13);
    assert_eq!(rest.read_text().await.unwrap(), "\ntail");
}

#[tokio::test]
async fn text_mode_rejects_invalid_utf8_and_keeps_the_bytes() {
    let server = chunked_stdout(&[b"ok\n", b"bad \xff\n", b"end"]);
    let client = server.client().await;
    let sb = Sandbox::handle(&client, "sb-1", None);
    let out = sb.stdout();
    assert_eq!(out.next_line().await.unwrap().as_deref(), Some("ok\n"));
    let e = out.next_line().await.unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("offset 7")),
        "{e}"
    );
    assert_eq!(e.code(), Some(api::ErrorCode::Invalid));
    assert_eq!(out.offset(), 3, "the bad line is not consumed");
    // The raw bytes are still there for next_chunk.
    let mut raw = Vec::new();
    while let Some(c) = out.next_chunk().await.unwrap() {
        raw.extend_from_slice(&c);
    }
    assert_eq!(raw, b"bad \xff\nend");
    let e = sb.stdout().read_text().await.unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("offset 7")),
        "{e}"
    );
}

#[tokio::test]
async fn error_bodies_map_to_typed_errors() {
    use api::ErrorCode as C;
    let server = Server::start(|req: Req| async move {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/v1/sandboxes/sb-missing") => api_error(C::NotFound, "no sandbox sb-missing"),
            ("POST", "/v1/sandboxes") => {
                api_error(C::Invalid, "invalid timeout_secs 0: must be 1..=86400")
            }
            ("POST", "/v1/secrets") => api_error(C::AlreadyExists, "secret db exists"),
            ("DELETE", "/v1/volumes/data") => {
                api_error(C::Conflict, "volume data is mounted by sb-1")
            }
            ("POST", "/v1/sandboxes/sb-1/wait_until_ready") => {
                api_error(C::Timeout, "not ready after 1s")
            }
            ("POST", "/v1/sandboxes/sb-1/execs") => {
                api_error(C::SandboxTerminated, "sandbox sb-1 finished")
            }
            ("POST", "/v1/sandboxes/sb-2/execs") => {
                api_error(C::ResourceExhausted, "pids limit of sb-2 reached")
            }
            ("GET", "/v1/sandboxes/sb-1/fs/file") => {
                api_error(C::IsADirectory, "/etc is a directory")
            }
            ("DELETE", "/v1/sandboxes/sb-1/fs") => {
                api_error(C::DirectoryNotEmpty, "/d has entries")
            }
            ("GET", "/v1/sandboxes/sb-1/fs/stat") => api_error(C::NotFound, "no file /nope"),
            ("GET", "/v1/volumes") => full(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "boom"),
            _ => full(StatusCode::NOT_FOUND, "text/plain", "no such route"),
        }
    });
    let client = server.client().await;

    let e = Sandbox::from_id(&client, "sb-missing").await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    assert_eq!(e.to_string(), "not_found: no sandbox sb-missing");
    assert_eq!(e.code(), Some(C::NotFound));

    let e = Sandbox::create(
        &client,
        CreateSandbox {
            timeout_secs: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid: invalid timeout_secs 0: must be 1..=86400"
    );

    let e = client
        .create_secret(CreateSecret {
            name: "db".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
    let e = client.delete_volume("data").await.unwrap_err();
    assert!(matches!(e, Error::Conflict(_)), "{e:?}");

    let sb = Sandbox::handle(&client, "sb-1", None);
    let e = sb
        .wait_until_ready(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e:?}");
    let e = sb.exec(["true"]).await.unwrap_err();
    assert!(matches!(e, Error::SandboxTerminated(_)), "{e:?}");
    let e = Sandbox::handle(&client, "sb-2", None)
        .exec(["true"])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");

    let fs = sb.filesystem();
    let e = fs.read_bytes("/etc").await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Filesystem {
                code: C::IsADirectory,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "is_a_directory: /etc is a directory");
    let e = fs.remove("/d", false).await.unwrap_err();
    assert_eq!(e.code(), Some(C::DirectoryNotEmpty));
    let e = fs.stat("/nope").await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");

    // Replies without the JSON error body map by status.
    let e = client.list_volumes().await.unwrap_err();
    assert!(
        matches!(&e, Error::Internal(m) if m.contains("boom")),
        "{e:?}"
    );
    let e = client.version().await.unwrap_err();
    assert!(
        matches!(&e, Error::NotFound(m) if m.contains("GET /v1/version")),
        "{e:?}"
    );
}

#[tokio::test]
async fn stdin_writes_are_offset_addressed_and_retried_without_duplicates() {
    #[derive(Default)]
    struct Stdin {
        written: Vec<u8>,
        eof: bool,
        posts: usize,
    }
    let state = Arc::new(Mutex::new(Stdin::default()));
    let server = Server::start({
        let state = state.clone();
        move |req: Req| {
            let state = state.clone();
            async move {
                assert_eq!(
                    (req.method.as_str(), req.path.as_str()),
                    ("POST", "/v1/sandboxes/sb-1/execs/ex-1/stdin")
                );
                let off = req.offset();
                let eof = req.q("eof") == Some("true");
                let (ack, lose_reply) = {
                    let mut st = state.lock().unwrap();
                    st.posts += 1;
                    if off > st.written.len() {
                        return api_error(api::ErrorCode::Conflict, "gap");
                    }
                    if st.eof && (!req.body.is_empty() || !eof) {
                        return api_error(api::ErrorCode::Conflict, "stdin is closed");
                    }
                    let skip = st.written.len() - off;
                    if skip < req.body.len() {
                        st.written.extend_from_slice(&req.body[skip..]);
                    }
                    st.eof |= eof;
                    (
                        api::StdinAck {
                            offset: st.written.len() as u64,
                            eof: st.eof,
                        },
                        st.posts == 1,
                    )
                };
                if lose_reply {
                    // The bytes are in; the reply is lost with the connection.
                    req.conn.abort();
                    std::future::pending::<()>().await;
                }
                json(StatusCode::OK, serde_json::to_value(ack).unwrap())
            }
        }
    });
    let client = server.client().await;
    let sb = Sandbox::handle(&client, "sb-1", None);
    let p = sb.process_at("ex-1", Some(0)); // as exec returns it: a fresh stdin
    let first: Vec<u8> = (0..3000u32).map(|i| (i % 256) as u8).collect();
    p.stdin().write(&first).unwrap();
    p.stdin().drain().await.unwrap();
    assert_eq!(
        state.lock().unwrap().written,
        first,
        "the retried write did not duplicate"
    );
    assert_eq!(state.lock().unwrap().posts, 2);

    // A second handle learns the position first, then appends.
    let other = sb.process("ex-1");
    other.stdin().write_all(b"more").await.unwrap();
    assert_eq!(state.lock().unwrap().written.len(), 3004);
    // The first writer still thinks stdin is at 3000: sbxd skips its bytes as already
    // written and answers 3004, not 3003; that is a conflict. (Had it written exactly 4
    // bytes the skip would look like a retry: offsets cannot tell writers apart.)
    let e = p.stdin().write_all(b"xyz").await.unwrap_err();
    assert!(
        matches!(&e, Error::Conflict(m) if m.contains("another writer")),
        "{e}"
    );

    other.stdin().close().await.unwrap();
    other.stdin().close().await.unwrap(); // idempotent: nothing left to send
    let st = state.lock().unwrap();
    assert!(st.eof);
    assert_eq!(&st.written[3000..], b"more");
    drop(st);
    let e = other.stdin().write(b"late").unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
}

#[tokio::test]
async fn exec_retried_after_a_lost_reply_keeps_its_id() {
    let ids = Arc::new(Mutex::new(Vec::<String>::new()));
    let server = Server::start({
        let ids = ids.clone();
        move |req: Req| {
            let ids = ids.clone();
            async move {
                assert_eq!(req.path, "/v1/sandboxes/sb-1/execs");
                let r: api::ExecRequest =
                    serde_json::from_slice(&req.body).expect("an ExecRequest");
                assert_eq!(r.argv, ["echo", "hi"]);
                let id = r.exec_id.expect("the client picks the id");
                let n = {
                    let mut ids = ids.lock().unwrap();
                    ids.push(id.clone());
                    ids.len()
                };
                if n == 1 {
                    req.conn.abort();
                    std::future::pending::<()>().await;
                }
                json(StatusCode::OK, exec_info("sb-1", &id, None))
            }
        }
    });
    let client = server.client().await;
    let p = Sandbox::handle(&client, "sb-1", None)
        .exec(["echo", "hi"])
        .await
        .unwrap();
    let ids = ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], ids[1], "the retry carried the same exec id");
    assert_eq!(p.id(), ids[0]);
    assert!(
        p.id().starts_with("ex-") && p.id().len() == 35,
        "{}",
        p.id()
    );
    assert!(p.id()[3..].bytes().all(|b| b.is_ascii_hexdigit()));
}

#[tokio::test]
async fn wait_long_polls_and_maps_how_the_sandbox_ended() {
    let polls = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let server = Server::start({
        let polls = polls.clone();
        move |req: Req| {
            let polls = polls.clone();
            async move {
                let id = req.path.split('/').nth(3).unwrap().to_string();
                if req.path.ends_with("/terminate") {
                    let t: api::Terminate = serde_json::from_slice(&req.body).unwrap();
                    return json(
                        StatusCode::OK,
                        serde_json::json!({
                        "finished": t.wait, "returncode": t.wait.then_some(137),
                        "end_reason": t.wait.then_some("terminated")}),
                    );
                }
                assert!(req.path.ends_with("/wait"), "{}", req.path);
                let timeout = req.q("timeout").unwrap().to_string();
                let n = {
                    let mut p = polls.lock().unwrap();
                    let n = p.entry(id.clone()).or_default();
                    *n += 1;
                    *n
                };
                let (rc, reason) = match id.as_str() {
                    "sb-timeout" => (124, "timeout"),
                    "sb-term" => (137, "terminated"),
                    "sb-oom" => (137, "oom"),
                    "sb-exit" => (3, "exited"),
                    _ => {
                        return json(
                            StatusCode::OK,
                            serde_json::json!({"finished": false, "returncode": null, "end_reason": null}),
                        )
                    }
                };
                // Long polls come back unfinished twice before the end.
                if timeout == "55" && n <= 2 {
                    return json(
                        StatusCode::OK,
                        serde_json::json!({"finished": false, "returncode": null, "end_reason": null}),
                    );
                }
                json(
                    StatusCode::OK,
                    serde_json::json!({"finished": true, "returncode": rc, "end_reason": reason}),
                )
            }
        }
    });
    let client = server.client().await;
    let h = |id: &str| Sandbox::handle(&client, id, None);
    let e = h("sb-timeout").wait().await.unwrap_err();
    assert!(matches!(e, Error::SandboxTimeout(_)), "{e:?}");
    assert_eq!(h("sb-timeout").wait_returncode().await.unwrap(), 124);
    let e = h("sb-term").wait().await.unwrap_err();
    assert!(matches!(e, Error::SandboxTerminated(_)), "{e:?}");
    assert_eq!(h("sb-oom").wait().await.unwrap(), 137);
    assert_eq!(h("sb-exit").wait().await.unwrap(), 3);
    assert_eq!(
        polls.lock().unwrap()["sb-exit"],
        3,
        "two unfinished long polls, then the end"
    );
    assert_eq!(h("sb-run").poll().await.unwrap(), None);
    assert_eq!(h("sb-exit").returncode().await.unwrap(), Some(3));
    assert_eq!(h("sb-run").terminate(false).await.unwrap(), None);
    assert_eq!(h("sb-run").terminate(true).await.unwrap(), Some(137));
}

#[tokio::test]
async fn detached_handles_refuse_all_but_waits_and_info() {
    let server = Server::start(|req: Req| async move {
        match req.path.as_str() {
            "/v1/sandboxes/sb-1/wait" => json(
                StatusCode::OK,
                serde_json::json!({"finished": true, "returncode": 0, "end_reason": "exited"}),
            ),
            "/v1/sandboxes/sb-1/execs/ex-1/wait" => {
                json(StatusCode::OK, exec_info("sb-1", "ex-1", Some(0)))
            }
            p => panic!("a detached handle sent {} {p}", req.method),
        }
    });
    let client = server.client().await;
    let sb = Sandbox::handle(&client, "sb-1", None);
    let p = sb.process("ex-1");
    let clone = sb.clone();
    sb.detach();
    sb.detach(); // idempotent
    assert!(matches!(
        clone.exec(["true"]).await,
        Err(Error::ClientClosed(_))
    ));
    assert!(matches!(
        sb.terminate(false).await,
        Err(Error::ClientClosed(_))
    ));
    assert!(matches!(
        sb.set_tags(BTreeMap::new()).await,
        Err(Error::ClientClosed(_))
    ));
    assert!(matches!(
        sb.stdout().next_chunk().await,
        Err(Error::ClientClosed(_))
    ));
    assert!(matches!(
        sb.stdin().write(b"x"),
        Err(Error::ClientClosed(_))
    ));
    assert!(matches!(
        sb.filesystem().stat("/").await,
        Err(Error::ClientClosed(_))
    ));
    assert!(matches!(sb.delete().await, Err(Error::ClientClosed(_))));
    assert!(matches!(p.signal(15).await, Err(Error::ClientClosed(_))));
    let Err(e) = sb.events(false).await else {
        panic!("events on a detached handle")
    };
    assert_eq!(e.code(), None);
    assert!(e.to_string().starts_with("client_closed: "), "{e}");
    assert_eq!(sb.wait().await.unwrap(), 0);
    assert_eq!(sb.poll().await.unwrap(), Some(0));
    assert_eq!(p.wait().await.unwrap(), 0);
}

#[tokio::test]
async fn calls_share_one_connection_and_reconnect_after_it_broke() {
    let server = Server::start(|req: Req| async move {
        assert_eq!(req.path, "/v1/version");
        json(
            StatusCode::OK,
            serde_json::json!({"version": "0.1.0", "api": "v1"}),
        )
    });
    let client = server.client().await;
    let calls = (0..20).map(|_| {
        let c = client.clone();
        async move { c.version().await }
    });
    for v in futures_util::future::join_all(calls).await {
        assert_eq!(v.unwrap().api, "v1");
    }
    assert_eq!(server.accepted(), 1, "20 concurrent calls, one connection");
    server.cut();
    assert_eq!(client.version().await.unwrap().version, "0.1.0");
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn no_daemon_is_a_connect_error_naming_the_socket() {
    let path = std::env::temp_dir().join(format!("sbx-no-daemon-{}.sock", std::process::id()));
    let e = Client::connect_to(&path).await.unwrap_err();
    match &e {
        Error::Connect { path: p, source } => {
            assert_eq!(p, &path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Connect, got {other:?}"),
    }
    assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
}

#[tokio::test]
async fn events_resume_after_the_last_event_seen() {
    let afters = Arc::new(Mutex::new(Vec::new()));
    let server = Server::start({
        let afters = afters.clone();
        move |req: Req| {
            let afters = afters.clone();
            async move {
                assert_eq!(req.path, "/v1/sandboxes/sb-1/events");
                let after: u64 = req.q("after").unwrap().parse().unwrap();
                let n = {
                    let mut a = afters.lock().unwrap();
                    a.push((after, req.q("follow").unwrap().to_string()));
                    a.len()
                };
                let kinds = ["created", "scheduled", "started", "ready", "finished"];
                let line = |seq: u64| {
                    let mut e = serde_json::json!({"seq": seq, "kind": kinds[seq as usize - 1], "at": seq as f64});
                    if seq == 5 {
                        e["reason"] = "exited".into();
                        e["returncode"] = 0.into();
                    }
                    format!("{e}\n")
                };
                let (tx, rx) = mpsc::unbounded_channel();
                if n == 1 {
                    tx.send(Ok(Bytes::from(line(1) + &line(2)))).unwrap();
                    let third = line(3);
                    tx.send(Ok(Bytes::copy_from_slice(&third.as_bytes()[..10])))
                        .unwrap();
                    reset_later(tx);
                } else {
                    for seq in after + 1..=5 {
                        tx.send(Ok(Bytes::from(line(seq)))).unwrap();
                    }
                }
                streaming(0, rx)
            }
        }
    });
    let client = server.client().await;
    let sb = Sandbox::handle(&client, "sb-1", None);
    let events: Vec<api::Event> = sb
        .events(true)
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    assert_eq!(events[4].kind, api::EventKind::Finished);
    assert_eq!(events[4].returncode, Some(0));
    assert_eq!(
        *afters.lock().unwrap(),
        [(0, "true".to_string()), (2, "true".to_string())]
    );
}

#[tokio::test]
async fn files_paths_and_list_queries_are_encoded() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = Server::start({
        let seen = seen.clone();
        move |req: Req| {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .push(format!("{} {}?{}", req.method, req.path, req.raw_query));
                match (req.method.as_str(), req.path.as_str()) {
                    ("PUT", "/v1/sandboxes/sb-1/fs/file") => {
                        let path = req.q("path").unwrap().to_string();
                        json(StatusCode::OK, file_info(&path, req.body.len() as u64))
                    }
                    ("GET", "/v1/sandboxes/sb-1/fs/file") => {
                        assert_eq!(req.q("path"), Some("/tmp/a b&c=d#é"));
                        full(
                            StatusCode::OK,
                            "application/octet-stream",
                            &b"caf\xc3\xa9"[..],
                        )
                    }
                    ("POST", "/v1/sandboxes/sb-1/fs/mkdir") => {
                        let m: api::Mkdir = serde_json::from_slice(&req.body).unwrap();
                        json(StatusCode::OK, file_info(&m.path, 0))
                    }
                    ("DELETE", "/v1/sandboxes/sb-1/fs") => {
                        full(StatusCode::NO_CONTENT, "text/plain", "")
                    }
                    ("GET", "/v1/sandboxes") => json(StatusCode::OK, serde_json::json!([])),
                    (m, p) => panic!("unexpected {m} {p}"),
                }
            }
        }
    });
    let client = server.client().await;
    let fs = Sandbox::handle(&client, "sb-1", None).filesystem();
    let e = fs.read_text("relative/path").await.unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("\"relative/path\"")),
        "{e}"
    );
    assert!(fs.make_directory("x", true).await.is_err());
    assert_eq!(
        server.requests(),
        0,
        "relative paths are refused before any request"
    );

    fs.write_text("/tmp/a b&c=d#é", "hello").await.unwrap();
    assert_eq!(fs.read_text("/tmp/a b&c=d#é").await.unwrap(), "café");
    fs.make_directory("/tmp/d", false).await.unwrap();
    fs.remove("/tmp/d", true).await.unwrap();
    let tags: BTreeMap<String, String> = [("k 1".to_string(), "v=1".to_string())].into();
    let list = Sandbox::list(&client, Some("my-app"), &tags, true)
        .await
        .unwrap();
    assert!(list.is_empty());
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "PUT /v1/sandboxes/sb-1/fs/file?path=%2Ftmp%2Fa%20b%26c%3Dd%23%C3%A9",
            "GET /v1/sandboxes/sb-1/fs/file?path=%2Ftmp%2Fa%20b%26c%3Dd%23%C3%A9",
            "POST /v1/sandboxes/sb-1/fs/mkdir?",
            "DELETE /v1/sandboxes/sb-1/fs?path=%2Ftmp%2Fd&recursive=true",
            "GET /v1/sandboxes?app=my-app&tag=k%201=v%3D1&all=true",
        ]
    );
}
