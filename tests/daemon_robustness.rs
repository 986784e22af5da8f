//! sbxd under bad input and hostile sandboxes: every case sends something wrong (malformed or
//! huge bodies, invalid UTF-8 and percent tricks, unknown ids, oversized argv/env, stalled or
//! idle connections, floods of output, blocked stdin, forking entrypoints, a SIGTERM with many
//! sandboxes) and then proves the daemon still serves: `GET /v1/health` answers within 1 s.
//!
//! Each test runs its own sbxd under `/tmp/sbx-it-robust-<pid>/<test>/` and talks plain HTTP/1.1
//! over a `std` Unix socket (one request per connection, `Connection: close`), so it can send
//! what no client library would. The daemon is stopped by pid with SIGTERM at the end (a drop
//! guard); it must exit within 15 s and leave no per-sandbox run directory and no cgroup named
//! after any sandbox it made. Tests run one at a time: several measure memory and latency.
//!
//! Tests marked `#[ignore = "bug: …"]` reproduce daemon bugs that are reported, not yet fixed;
//! run them with `cargo test --release --test daemon_robustness -- --ignored`.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A well-formed sandbox id that no daemon made.
const UNKNOWN_ID: &str = "sb-0000000000000000000000";
/// How long sbxd may take to exit after SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// How long a health check may take.
const HEALTH_DEADLINE: Duration = Duration::from_secs(1);
/// Default read/write timeout of a request (a hung daemon fails the test, not the run).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// One test at a time: the memory and latency measurements must not see another test's load.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn process_root() -> PathBuf {
    PathBuf::from(format!("/tmp/sbx-it-robust-{}", std::process::id()))
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 by hand.

/// A whole reply.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body[..self.body.len().min(500)])
            )
        })
    }

    /// The `error.code` of an [`sbx::api::ErrorBody`], if the body is one.
    fn error_code(&self) -> Option<String> {
        serde_json::from_slice::<sbx::api::ErrorBody>(&self.body)
            .ok()
            .map(|b| b.error.code.as_str().to_string())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(600)]).into_owned()
    }
}

/// The request line, headers and body of one request (`path` may hold any bytes).
fn request_bytes(method: &str, path: &[u8], body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(body.len() + 256);
    r.extend_from_slice(method.as_bytes());
    r.push(b' ');
    r.extend_from_slice(path);
    r.extend_from_slice(b" HTTP/1.1\r\nHost: sbx\r\nConnection: close\r\n");
    if !body.is_empty() || matches!(method, "POST" | "PUT") {
        r.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        r.extend_from_slice(b"Content-Type: application/json\r\n");
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

/// The body of a reply being read: by Content-Length, chunked, or until the connection closes.
struct BodyReader {
    inner: BufReader<UnixStream>,
    mode: BodyMode,
}

enum BodyMode {
    Length(u64),
    /// Bytes left in the current chunk; `None` before the next chunk header; done at the end.
    Chunked {
        left: Option<u64>,
        done: bool,
    },
    UntilClose,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.mode {
            BodyMode::Length(0) => Ok(0),
            BodyMode::Length(n) => {
                let want = (*n).min(buf.len() as u64) as usize;
                let got = self.inner.read(&mut buf[..want])?;
                if got == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the body ended {n} bytes short of its Content-Length"),
                    ));
                }
                *n -= got as u64;
                Ok(got)
            }
            BodyMode::UntilClose => self.inner.read(buf),
            BodyMode::Chunked { left, done } => loop {
                if *done {
                    return Ok(0);
                }
                match left {
                    Some(0) => {
                        let mut crlf = [0u8; 2];
                        self.inner.read_exact(&mut crlf)?;
                        *left = None;
                    }
                    Some(n) => {
                        let want = (*n).min(buf.len() as u64) as usize;
                        let got = self.inner.read(&mut buf[..want])?;
                        if got == 0 {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the connection closed inside a chunk",
                            ));
                        }
                        *n -= got as u64;
                        return Ok(got);
                    }
                    None => {
                        let mut line = String::new();
                        if self.inner.read_line(&mut line)? == 0 {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the connection closed before the last chunk",
                            ));
                        }
                        let size = line.trim().split(';').next().unwrap_or("");
                        let size = u64::from_str_radix(size, 16).map_err(|e| {
                            std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("bad chunk size {line:?}: {e}"),
                            )
                        })?;
                        if size == 0 {
                            // Trailers, then the empty line.
                            loop {
                                let mut t = String::new();
                                if self.inner.read_line(&mut t)? == 0 || t == "\r\n" {
                                    break;
                                }
                            }
                            *done = true;
                        } else {
                            *left = Some(size);
                        }
                    }
                }
            },
        }
    }
}

/// A reply whose body is still to be read.
struct Streaming {
    status: u16,
    headers: Vec<(String, String)>,
    body: BodyReader,
}

impl Streaming {
    fn finish(mut self) -> std::io::Result<Reply> {
        let mut body = Vec::new();
        self.body.read_to_end(&mut body)?;
        Ok(Reply {
            status: self.status,
            headers: self.headers,
            body,
        })
    }
}

/// Send one request on a fresh connection and read the status line and headers.
fn open(
    sock: &Path,
    method: &str,
    path: &[u8],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<Streaming> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let req = request_bytes(method, path, body);
    if req.len() > 256 << 10 {
        // The daemon may answer (e.g. 413, or a stdin conflict) before it read the whole body:
        // write from another thread and read the reply meanwhile; a failed write shows there.
        let mut w = s.try_clone()?;
        std::thread::spawn(move || {
            let _ = w.write_all(&req);
        });
    } else {
        s.write_all(&req)?;
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mode = if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        BodyMode::Chunked {
            left: None,
            done: false,
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse().ok()) {
        BodyMode::Length(n)
    } else if method == "HEAD" || status == 204 || status == 304 {
        BodyMode::Length(0)
    } else {
        BodyMode::UntilClose
    };
    Ok(Streaming {
        status,
        headers,
        body: BodyReader { inner: r, mode },
    })
}

fn try_request(
    sock: &Path,
    method: &str,
    path: &[u8],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<Reply> {
    open(sock, method, path, body, timeout)?.finish()
}

// ---------------------------------------------------------------------------------------------
// One sbxd per test.

struct Daemon {
    name: String,
    root: PathBuf,
    child: Option<Child>,
    /// Every sandbox id this test's daemon handed out (for the cgroup check at the end).
    ids: Mutex<Vec<String>>,
}

impl Daemon {
    fn start(name: &str) -> Daemon {
        Daemon::start_with(name, &[])
    }

    /// `wrapper`: a command line sbxd runs under (e.g. `prlimit --nofile=…`).
    fn start_with(name: &str, wrapper: &[&str]) -> Daemon {
        let root = process_root().join(name);
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create the test directory");
        let log = std::fs::File::create(root.join("sbxd.log")).expect("create the sbxd log");
        let sbxd = env!("CARGO_BIN_EXE_sbxd");
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(sbxd);
                c
            }
            None => Command::new(sbxd),
        };
        let child = cmd
            .arg("--socket")
            .arg(root.join("sbxd.sock"))
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg("--run-dir")
            .arg(root.join("run"))
            .env("SBX_INIT", env!("CARGO_BIN_EXE_sbx-init"))
            .env_remove("SBX_SOCKET")
            .env_remove("SBX_STATE_DIR")
            .env_remove("SBX_RUN_DIR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log)
            .spawn()
            .expect("spawn sbxd");
        let mut d = Daemon {
            name: name.to_string(),
            root,
            child: Some(child),
            ids: Mutex::new(Vec::new()),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "sbxd exited with {st} before serving; log:\n{}",
                    d.log_tail()
                );
            }
            if let Ok(r) = try_request(&d.sock(), "GET", b"/v1/health", b"", Duration::from_secs(2))
            {
                if r.status == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "sbxd did not serve within 30 s; log:\n{}",
                d.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn sock(&self) -> PathBuf {
        self.root.join("sbxd.sock")
    }

    fn pid(&self) -> i32 {
        let c = self.child.as_ref().expect("sbxd is running");
        i32::try_from(c.id()).expect("a pid fits in i32")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.root.join("sbxd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// One request; panics when the daemon does not answer.
    fn req(&self, method: &str, path: impl AsRef<[u8]>, body: &[u8]) -> Reply {
        let path = path.as_ref();
        try_request(&self.sock(), method, path, body, REQUEST_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "{method} {}: no answer: {e}; log:\n{}",
                String::from_utf8_lossy(path),
                self.log_tail()
            )
        })
    }

    fn req_json(&self, method: &str, path: &str, body: &Value) -> Reply {
        self.req(
            method,
            path,
            &serde_json::to_vec(body).expect("encode JSON"),
        )
    }

    /// `GET /v1/health` must answer 200 within [`HEALTH_DEADLINE`]; returns how long it took.
    fn healthy(&self) -> Duration {
        let t = Instant::now();
        let r = try_request(&self.sock(), "GET", b"/v1/health", b"", HEALTH_DEADLINE)
            .unwrap_or_else(|e| {
                panic!(
                    "health did not answer within {HEALTH_DEADLINE:?}: {e}; log:\n{}",
                    self.log_tail()
                )
            });
        let took = t.elapsed();
        assert_eq!(r.status, 200, "health: {}", r.text());
        assert_eq!(r.json()["status"], "ok");
        assert!(took <= HEALTH_DEADLINE, "health took {took:?}");
        took
    }

    fn running_count(&self) -> u64 {
        self.req("GET", "/v1/health", b"").json()["sandboxes_running"]
            .as_u64()
            .expect("sandboxes_running")
    }

    /// Create a sandbox (201 expected); records its id.
    fn create(&self, body: Value) -> String {
        let r = self.req_json("POST", "/v1/sandboxes", &body);
        assert_eq!(r.status, 201, "create {body}: {}", r.text());
        let id = r.json()["id"].as_str().expect("id").to_string();
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.clone());
        id
    }

    fn status(&self, id: &str) -> String {
        let r = self.req("GET", format!("/v1/sandboxes/{id}"), b"");
        assert_eq!(r.status, 200, "info {id}: {}", r.text());
        r.json()["status"].as_str().expect("status").to_string()
    }

    fn wait_running(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.status(id).as_str() {
                "running" => return,
                "pending" => {}
                other => panic!(
                    "sandbox {id} is {other}, not running: {}",
                    self.req("GET", format!("/v1/sandboxes/{id}"), b"").text()
                ),
            }
            assert!(Instant::now() < deadline, "sandbox {id} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A running sandbox (host image) that stays up until deleted.
    fn running_sandbox(&self) -> String {
        let id = self.create(json!({"timeout_secs": 600}));
        self.wait_running(&id);
        id
    }

    /// Start an exec; returns its info.
    fn exec(&self, id: &str, body: Value) -> Value {
        let r = self.req_json("POST", &format!("/v1/sandboxes/{id}/execs"), &body);
        assert_eq!(r.status, 201, "exec {body}: {}", r.text());
        r.json()
    }

    /// Run `sh -c script` to the end; returns (returncode, stdout).
    fn sh(&self, id: &str, script: &str) -> (i64, Vec<u8>) {
        let info = self.exec(id, json!({"argv": ["/bin/sh", "-c", script]}));
        let x = info["exec_id"].as_str().expect("exec_id").to_string();
        let deadline = Instant::now() + Duration::from_secs(120);
        let rc = loop {
            let w = self.req(
                "GET",
                format!("/v1/sandboxes/{id}/execs/{x}/wait?timeout=30"),
                b"",
            );
            assert_eq!(w.status, 200, "exec wait: {}", w.text());
            let w = w.json();
            if w["status"] == "exited" {
                break w["returncode"].as_i64().expect("returncode");
            }
            assert!(Instant::now() < deadline, "{script:?} did not end");
        };
        let out = self.req(
            "GET",
            format!("/v1/sandboxes/{id}/execs/{x}/stdout?follow=true"),
            b"",
        );
        assert_eq!(out.status, 200);
        (rc, out.body)
    }

    fn delete(&self, id: &str) {
        let r = self.req("DELETE", format!("/v1/sandboxes/{id}"), b"");
        assert_eq!(r.status, 204, "delete {id}: {}", r.text());
    }

    /// Resident memory of sbxd, KiB (and its peak).
    fn rss_kib(&self) -> (u64, u64) {
        let st = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read sbxd's /proc status");
        let field = |name: &str| {
            st.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Descriptors sbxd holds on deleted files under its state dir.
    fn deleted_state_fds(&self) -> Vec<String> {
        let state = self.root.join("state");
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|t| t.to_string_lossy().into_owned())
                    .filter(|t| {
                        t.starts_with(&*state.to_string_lossy()) && t.ends_with("(deleted)")
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGTERM by pid; sbxd must exit 0 within [`STOP_DEADLINE`] and leave no per-sandbox run
    /// directory and no cgroup named after its sandboxes. Returns how long it took to exit.
    fn stop(&mut self) -> Duration {
        let Some(mut child) = self.child.take() else {
            return Duration::ZERO;
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let t = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM sbxd");
        let status = loop {
            if let Some(st) = child.try_wait().expect("poll sbxd") {
                break Some(st);
            }
            if t.elapsed() > STOP_DEADLINE {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = t.elapsed();
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "sbxd (pid {pid}) did not exit within {STOP_DEADLINE:?} of SIGTERM; log:\n{}",
                self.log_tail()
            );
        };
        assert!(
            status.success(),
            "sbxd exited with {status}; log:\n{}",
            self.log_tail()
        );
        let run = self.root.join("run/sandboxes");
        let left: Vec<String> = std::fs::read_dir(&run)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "sbxd left sandbox directories in {}: {left:?}",
            run.display()
        );
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let cgroups = cgroups_of(&ids);
        // Empty leftovers are removed here (the host stays clean), and fail the test.
        let t = Instant::now();
        for c in &cgroups {
            // Its last processes may still be exiting: retry for a moment.
            while std::fs::remove_dir(c).is_err()
                && c.exists()
                && t.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let mut leaked: Vec<&String> = ids
            .iter()
            .filter(|id| cgroups.iter().any(|c| c.ends_with(id.as_str())))
            .collect();
        leaked.dedup();
        assert!(
            leaked.is_empty(),
            "sbxd left the cgroups of {} of its {} sandboxes (e.g. {:?}): {leaked:?}",
            leaked.len(),
            ids.len(),
            cgroups.first()
        );
        let procs = processes_in(&ids);
        assert!(
            procs.is_empty(),
            "processes of its sandboxes remain: {procs:?}"
        );
        took
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: stop sbxd by pid and show its log; keep the directory.
            if let Some(mut c) = self.child.take() {
                if let Ok(pid) = i32::try_from(c.id()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                let t = Instant::now();
                while matches!(c.try_wait(), Ok(None)) && t.elapsed() < STOP_DEADLINE {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if matches!(c.try_wait(), Ok(None)) {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            eprintln!(
                "--- sbxd log of {} ({}) ---\n{}",
                self.name,
                self.root.display(),
                self.log_tail()
            );
            return;
        }
        if self.child.is_some() {
            let took = self.stop();
            eprintln!("[{}] sbxd exited {took:?} after SIGTERM", self.name);
        }
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir(process_root());
    }
}

/// Cgroup directories named after any of `ids` (`/sys/fs/cgroup/*/sbx/<id>`, or v2's
/// `/sys/fs/cgroup/sbx/<id>`).
fn cgroups_of(ids: &[String]) -> Vec<PathBuf> {
    let mut bases = vec![PathBuf::from("/sys/fs/cgroup/sbx")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        bases.extend(rd.flatten().map(|e| e.path().join("sbx")));
    }
    let mut out = Vec::new();
    for b in bases {
        for id in ids {
            let p = b.join(id);
            if p.exists() {
                out.push(p);
            }
        }
    }
    out
}

/// Host processes whose cgroup path names one of `ids`.
fn processes_in(ids: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cg) = std::fs::read_to_string(e.path().join("cgroup")) else {
            continue;
        };
        if let Some(id) = ids.iter().find(|id| cg.contains(id.as_str())) {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            out.push(format!("{name} ({}) in {id}", comm.trim()));
        }
    }
    out
}

/// Run `f` on a thread; its result within `limit`, or None.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

fn assert_error(r: &Reply, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert_eq!(
        r.error_code().as_deref(),
        Some(code),
        "{what}: expected an error body with code {code}: {}",
        r.text()
    );
}

/// Deterministic pseudo-random bytes (xorshift), so a corrupted copy shows.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

// ---------------------------------------------------------------------------------------------
// Bad request bodies.

#[test]
fn malformed_json_unknown_fields_and_wrong_types_are_invalid() {
    let _s = serial();
    let d = Daemon::start("malformed");
    let id = d.running_sandbox();
    let x = d.exec(&id, json!({"argv": ["/bin/sleep", "600"]}))["exec_id"]
        .as_str()
        .expect("exec_id")
        .to_string();
    let sb = format!("/v1/sandboxes/{id}");
    let ex = format!("{sb}/execs/{x}");
    let routes: Vec<(&str, String)> = vec![
        ("POST", "/v1/sandboxes".into()),
        ("POST", format!("{sb}/terminate")),
        ("POST", format!("{sb}/wait_until_ready")),
        ("PUT", format!("{sb}/tags")),
        ("POST", format!("{sb}/execs")),
        ("POST", format!("{ex}/resize")),
        ("POST", format!("{ex}/signal")),
        ("POST", format!("{sb}/fs/mkdir")),
        ("POST", "/v1/secrets".into()),
    ];
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", b"{\"image\": \"ho".to_vec()),
        ("not json", b"hello".to_vec()),
        ("bare key", b"{image: 1}".to_vec()),
        ("trailing garbage", b"{} {}".to_vec()),
        ("number", b"42".to_vec()),
        ("unknown field", br#"{"imgae": "host", "signal": 9, "rows": 1, "cols": 1, "path": "/x", "timeout_secs": 1, "tags": {}, "name": "n", "argv": ["/bin/true"], "wait": true}"#.to_vec()),
        ("wrong types", br#"{"timeout_secs": "x", "argv": "ls", "signal": "KILL", "rows": -1, "cols": 1e9, "path": 7, "tags": [1], "name": 5, "wait": "yes", "env": {"A": 1}}"#.to_vec()),
        ("nested 100k deep", deep.into_bytes()),
        ("invalid utf-8", b"{\"name\": \"\xff\xfe\"}".to_vec()),
        ("NUL in key", b"{\"na\x00me\": 1}".to_vec()),
    ];
    for (method, path) in &routes {
        for (what, body) in &bodies {
            let r = d.req(method, path, body);
            assert_error(&r, 400, "invalid", &format!("{method} {path} with {what}"));
        }
        d.healthy();
    }
    // The sandbox and its exec are unharmed.
    assert_eq!(d.status(&id), "running");
    let w = d.req("GET", format!("{ex}/wait"), b"").json();
    assert_eq!(w["status"], "running", "{w}");
    d.delete(&id);
    d.healthy();
}

#[test]
fn json_arrays_are_not_accepted_as_request_objects() {
    let _s = serial();
    let d = Daemon::start("arrays");
    let id = d.running_sandbox();
    for (m, path, body) in [
        ("POST", "/v1/sandboxes".to_string(), "[]"),
        (
            "POST",
            "/v1/sandboxes".to_string(),
            r#"["host", ["/bin/echo", "positional"]]"#,
        ),
        (
            "POST",
            "/v1/secrets".to_string(),
            r#"["s1", {"K": "v"}, false]"#,
        ),
        ("POST", format!("/v1/sandboxes/{id}/terminate"), "[true]"),
        (
            "POST",
            format!("/v1/sandboxes/{id}/execs"),
            r#"[null, ["/bin/true"]]"#,
        ),
    ] {
        let r = d.req(m, &path, body.as_bytes());
        assert_error(&r, 400, "invalid", &format!("{m} {path} {body}"));
    }
    d.healthy();
    d.delete(&id);
}

#[test]
fn huge_json_body_is_refused_and_the_daemon_serves_on() {
    let _s = serial();
    let d = Daemon::start("huge-body");
    let (rss0, _) = d.rss_kib();
    // 3 MiB of valid JSON, and 3 MiB of whitespace.
    let big = json!({"tags": {"k": "v".repeat(3 << 20)}});
    let blank = vec![b' '; 3 << 20];
    for body in [serde_json::to_vec(&big).expect("json"), blank] {
        for path in ["/v1/sandboxes", "/v1/secrets"] {
            let r = d.req("POST", path, &body);
            assert_eq!(
                r.status,
                413,
                "POST {path} with {} bytes: {}",
                body.len(),
                r.text()
            );
            d.healthy();
        }
    }
    // 20 MiB announced, then the connection is dropped after 1 MiB.
    let mut s = UnixStream::connect(d.sock()).expect("connect");
    s.write_all(b"POST /v1/sandboxes HTTP/1.1\r\nHost: sbx\r\nContent-Length: 20971520\r\n\r\n")
        .expect("write");
    let _ = s.write_all(&vec![b' '; 1 << 20]);
    drop(s);
    d.healthy();
    let (rss1, _) = d.rss_kib();
    eprintln!("huge bodies: sbxd RSS {rss0} KiB -> {rss1} KiB");
    assert!(
        rss1 < rss0 + 32 * 1024,
        "RSS grew from {rss0} to {rss1} KiB"
    );
    assert_eq!(d.running_count(), 0);
}

#[test]
fn every_error_is_an_error_body() {
    let _s = serial();
    let d = Daemon::start("error-bodies");
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("POST", b"/v1/sandboxes".to_vec(), vec![b' '; 3 << 20]),
        ("PUT", b"/v1/health".to_vec(), Vec::new()),
        ("DELETE", b"/v1/sandboxes".to_vec(), Vec::new()),
        ("GET", b"/v1/sandboxes/%FF".to_vec(), Vec::new()),
        ("GET", b"/v1/sandboxes/%FF/execs/x".to_vec(), Vec::new()),
    ];
    let mut wrong = Vec::new();
    for (m, p, b) in &cases {
        let r = d.req(m, p, b);
        if r.error_code().is_none() {
            wrong.push(format!(
                "{m} {} -> {} {:?}",
                String::from_utf8_lossy(p),
                r.status,
                r.text()
            ));
        }
        d.healthy();
    }
    assert!(
        wrong.is_empty(),
        "replies without an ErrorBody:\n{}",
        wrong.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Paths, queries, ids.

#[test]
fn invalid_utf8_in_paths_and_query_strings() {
    let _s = serial();
    let d = Daemon::start("utf8");
    let id = d.running_sandbox();
    let raw: Vec<Vec<u8>> = vec![
        b"/v1/sandboxes/\xff\xfe".to_vec(),
        b"/v1/sandboxes/%FF%FE".to_vec(),
        b"/v1/sandboxes/%C0%AE%C0%AE".to_vec(),
        b"/v1/sandboxes?app=%FF&tag=%FF=%FE".to_vec(),
        b"/v1/sandboxes?app=\xff".to_vec(),
        b"/v1/apps/%FF/sandboxes/%FE".to_vec(),
        format!("/v1/sandboxes/{id}/stdout?offset=%FF&follow=false").into_bytes(),
        format!("/v1/sandboxes/{id}/wait?timeout=%FF").into_bytes(),
        [
            format!("/v1/sandboxes/{id}/events?after=").as_bytes(),
            b"\xff",
        ]
        .concat(),
        format!("/v1/sandboxes/{id}/execs/%FF").into_bytes(),
        format!("/v1/sandboxes/{id}/fs/stat?path=/%FF").into_bytes(),
        [
            format!("/v1/sandboxes/{id}/fs/list?path=/").as_bytes(),
            b"\xff",
        ]
        .concat(),
        format!("/v1/sandboxes/{id}/fs/file?path=/tmp/%FF%FE").into_bytes(),
        b"/v1/secrets/%FF".to_vec(),
        b"/v1/volumes/%FF".to_vec(),
    ];
    for p in &raw {
        for m in ["GET", "DELETE"] {
            match try_request(&d.sock(), m, p, b"", Duration::from_secs(10)) {
                Ok(r) => assert!(
                    (400..500).contains(&r.status) || r.status == 200,
                    "{m} {}: {} {}",
                    String::from_utf8_lossy(p),
                    r.status,
                    r.text()
                ),
                // hyper may refuse a request line with raw non-ASCII bytes outright.
                Err(e) => eprintln!("{m} {}: connection closed: {e}", String::from_utf8_lossy(p)),
            }
            d.healthy();
        }
    }
    // Still there, still running.
    assert_eq!(d.status(&id), "running");
    d.delete(&id);
}

#[test]
fn non_utf8_fs_path_does_not_alias_the_replacement_character() {
    let _s = serial();
    let d = Daemon::start("utf8-alias");
    let id = d.running_sandbox();
    let put = d.req(
        "PUT",
        format!("/v1/sandboxes/{id}/fs/file?path=/tmp/%EF%BF%BD"),
        b"replacement char",
    );
    assert_eq!(put.status, 200, "{}", put.text());
    let r = d.req(
        "GET",
        format!("/v1/sandboxes/{id}/fs/file?path=/tmp/%FF"),
        b"",
    );
    assert_error(&r, 400, "invalid", "read of a non-UTF-8 path");
    d.delete(&id);
}

#[test]
fn percent_encoding_tricks_in_ids_and_fs_paths() {
    let _s = serial();
    let d = Daemon::start("percent");
    // A host file the sandbox must not reach, whatever the path spelling.
    let secret = d.root.join("host-secret");
    std::fs::write(&secret, "host only").expect("write the host marker");
    let host = secret.to_string_lossy().into_owned();
    let id = d.running_sandbox();
    let put = d.req(
        "PUT",
        format!("/v1/sandboxes/{id}/fs/file?path=/tmp/inside"),
        b"inside",
    );
    assert_eq!(put.status, 200, "{}", put.text());

    // Ids: none of these may name a sandbox or reach another route.
    for bad in [
        "..",
        "%2e%2e",
        "%2E%2E%2Fhealth",
        "..%2f..%2fv1%2fhealth",
        "sb-%00000000000000000000000",
        "%00",
        "sb-0000000000000000000000%00",
        &format!("{id}%00"),
        &format!("{id}%2F..%2F{id}"),
        &format!("{}%2e", &id[..id.len() - 1]),
    ] {
        for (m, suffix) in [
            ("GET", ""),
            ("DELETE", ""),
            ("GET", "/stdout"),
            ("POST", "/terminate"),
        ] {
            let r = d.req(m, format!("/v1/sandboxes/{bad}{suffix}"), b"");
            assert!(
                r.status == 404 || r.status == 400,
                "{m} /v1/sandboxes/{bad}{suffix}: {} {}",
                r.status,
                r.text()
            );
            assert!(r.error_code().is_some() || r.status == 400, "{}", r.text());
        }
        d.healthy();
    }
    assert_eq!(
        d.status(&id),
        "running",
        "a trick id touched the real sandbox"
    );

    // Fs paths: `..` stops at the sandbox root; NUL is refused.
    let up = "/..".repeat(12);
    let enc_up = "/%2e%2e".repeat(12);
    let escapes = [
        format!("{up}{host}"),
        format!("{enc_up}{host}"),
        format!("/tmp/..%2f..%2f..%2f..%2f..{host}"),
        format!("/tmp/%2e%2e/%2E%2E/{}", host.trim_start_matches('/')),
    ];
    for p in &escapes {
        for route in ["fs/file", "fs/stat", "fs/list"] {
            let r = d.req("GET", format!("/v1/sandboxes/{id}/{route}?path={p}"), b"");
            assert_error(&r, 404, "not_found", &format!("{route} {p}"));
        }
        d.healthy();
    }
    for p in &escapes {
        let w = d.req(
            "PUT",
            format!("/v1/sandboxes/{id}/fs/file?path={p}"),
            b"overwritten?",
        );
        assert_eq!(
            w.status,
            200,
            "write {p} creates it inside the sandbox: {}",
            w.text()
        );
        let r = d.req("GET", format!("/v1/sandboxes/{id}/fs/file?path={p}"), b"");
        assert_eq!(r.body, b"overwritten?", "read back {p}");
        let r = d.req("DELETE", format!("/v1/sandboxes/{id}/fs?path={p}"), b"");
        assert_eq!(r.status, 204, "remove {p}: {}", r.text());
        d.healthy();
    }
    assert_eq!(
        std::fs::read_to_string(&secret).expect("the host file"),
        "host only",
        "a write or remove escaped the sandbox"
    );
    // `..` inside the sandbox resolves as the sandbox would.
    let r = d.req(
        "GET",
        format!("/v1/sandboxes/{id}/fs/file?path=/tmp/../../../tmp/./inside"),
        b"",
    );
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"inside"[..]),
        "{}",
        r.text()
    );
    for p in [
        "/tmp/inside%00",
        "/tmp/%00/inside",
        "%00",
        "/tmp/inside%00.txt",
    ] {
        for (m, route) in [
            ("GET", "fs/file"),
            ("GET", "fs/stat"),
            ("GET", "fs/list"),
            ("PUT", "fs/file"),
            ("DELETE", "fs"),
        ] {
            let r = d.req(m, format!("/v1/sandboxes/{id}/{route}?path={p}"), b"x");
            assert_error(&r, 400, "invalid", &format!("{m} {route} {p}"));
        }
        let r = d.req_json(
            "POST",
            &format!("/v1/sandboxes/{id}/fs/mkdir"),
            &json!({"path": p.replace("%00", "\0")}),
        );
        assert_error(&r, 400, "invalid", &format!("mkdir {p}"));
        d.healthy();
    }
    // Relative and empty paths.
    for p in ["", "tmp/inside", "./tmp", "%2Ftmp%2Finside"] {
        let r = d.req("GET", format!("/v1/sandboxes/{id}/fs/stat?path={p}"), b"");
        if p.starts_with("%2F") {
            assert_eq!(
                r.status,
                200,
                "an encoded absolute path is a path: {}",
                r.text()
            );
        } else {
            assert_error(&r, 400, "invalid", &format!("stat {p:?}"));
        }
    }
    let r = d.req("GET", format!("/v1/sandboxes/{id}/fs/stat"), b"");
    assert_error(&r, 400, "invalid", "stat without path");
    d.delete(&id);
    d.healthy();
}

/// Every route under `/v1/sandboxes/{id}`: method, the path after the id, and a body that would
/// be valid for a real sandbox (so the only thing wrong is the id).
const SANDBOX_ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "", ""),
    ("DELETE", "", ""),
    ("POST", "/terminate", "{}"),
    ("GET", "/wait?timeout=0", ""),
    ("POST", "/wait_until_ready", r#"{"timeout_secs": 1}"#),
    ("GET", "/tags", ""),
    ("PUT", "/tags", r#"{"tags": {}}"#),
    ("GET", "/events?follow=true", ""),
    ("GET", "/stdout?follow=true", ""),
    ("GET", "/stderr?follow=true", ""),
    ("POST", "/stdin?offset=0", "data"),
    ("POST", "/execs", r#"{"argv": ["/bin/true"]}"#),
    ("GET", "/execs/ex-1", ""),
    ("GET", "/execs/ex-1/wait?timeout=1", ""),
    ("GET", "/execs/ex-1/stdout?follow=true", ""),
    ("GET", "/execs/ex-1/stderr?follow=true", ""),
    ("POST", "/execs/ex-1/stdin?offset=0", "data"),
    ("POST", "/execs/ex-1/resize", r#"{"rows": 24, "cols": 80}"#),
    ("POST", "/execs/ex-1/signal", r#"{"signal": 15}"#),
    ("GET", "/fs/file?path=/tmp/x", ""),
    ("PUT", "/fs/file?path=/tmp/x", "data"),
    ("GET", "/fs/list?path=/", ""),
    ("GET", "/fs/stat?path=/", ""),
    ("POST", "/fs/mkdir", r#"{"path": "/tmp/x"}"#),
    ("DELETE", "/fs?path=/tmp/x", ""),
];

#[test]
fn every_route_with_an_unknown_id_or_a_non_id() {
    let _s = serial();
    let d = Daemon::start("unknown-ids");
    // One real sandbox, so "unknown" is not just "the registry is empty".
    let real = d.running_sandbox();
    let long = "x".repeat(5000);
    let ids = [
        UNKNOWN_ID,
        "nope",
        "sb-",
        "sb-000000000000000000000!",
        "SB-0000000000000000000000",
        "sb-00000000000000000000000",
        long.as_str(),
    ];
    let every_route = |id: &str, when: &str| {
        for (m, route, body) in SANDBOX_ROUTES {
            let path = format!("/v1/sandboxes/{id}{route}");
            let short = &path[..path.len().min(90)];
            let t = Instant::now();
            let r = d.req(m, &path, body.as_bytes());
            assert_error(&r, 404, "not_found", &format!("{m} {short} {when}"));
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "{m} {short} took {:?}",
                t.elapsed()
            );
        }
        d.healthy();
    };
    for id in ids {
        every_route(id, "(no such sandbox)");
    }
    // An unknown exec of the real sandbox.
    for (m, route, body) in SANDBOX_ROUTES.iter().filter(|r| r.1.starts_with("/execs/")) {
        let path = format!(
            "/v1/sandboxes/{real}{}",
            route.replace("ex-1", "ex-unknown")
        );
        let r = d.req(m, &path, body.as_bytes());
        assert_error(&r, 404, "not_found", &format!("{m} {path}"));
    }
    // Names, secrets, volumes and routes that do not exist.
    for (m, p) in [
        ("GET", "/v1/apps/nope/sandboxes/nope"),
        (
            "GET",
            "/v1/apps/default/sandboxes/..?include_terminated=true",
        ),
        ("DELETE", "/v1/secrets/nope"),
        ("DELETE", "/v1/volumes/nope"),
        ("GET", "/v1/nope"),
        ("GET", "/v2/sandboxes"),
    ] {
        let r = d.req(m, p, b"");
        assert_eq!(r.status, 404, "{m} {p}: {}", r.text());
    }
    for (m, p) in [("DELETE", "/v1/secrets/.."), ("DELETE", "/v1/volumes/..")] {
        let r = d.req(m, p, b"");
        assert!(r.status == 400 || r.status == 404, "{m} {p}: {}", r.text());
    }
    d.healthy();
    assert_eq!(d.status(&real), "running");
    d.delete(&real);
    // The deleted one is unknown now, on every route.
    every_route(&real, "after its delete");
}

// ---------------------------------------------------------------------------------------------
// Oversized and malformed exec/create parameters.

#[test]
fn exec_with_huge_argv_or_env_is_refused_and_the_sandbox_still_works() {
    let _s = serial();
    let d = Daemon::start("argv");
    let id = d.running_sandbox();
    let execs = format!("/v1/sandboxes/{id}/execs");
    let mut argv = vec!["/bin/true".to_string()];
    argv.extend(std::iter::repeat_n("a".to_string(), 100_000));
    let cases: Vec<(&str, Value)> = vec![
        ("100k args", json!({"argv": argv})),
        (
            "1 MB arg",
            json!({"argv": ["/bin/echo", "x".repeat(1 << 20)]}),
        ),
        ("NUL in an arg", json!({"argv": ["/bin/echo", "a\u{0}b"]})),
        ("empty argv", json!({"argv": []})),
        (
            "relative workdir",
            json!({"argv": ["/bin/true"], "workdir": "tmp"}),
        ),
    ];
    for (what, body) in &cases {
        let t = Instant::now();
        let r = d.req_json("POST", &execs, body);
        assert_error(&r, 400, "invalid", what);
        eprintln!("{what}: refused in {:?}", t.elapsed());
        d.healthy();
    }
    // Whatever the outcome for argv/env the runtime cannot carry, the daemon and the sandbox
    // survive it (see the ignored test below for the expected code).
    let mut empties = vec!["/bin/true".to_string()];
    empties.extend(std::iter::repeat_n(String::new(), 100_000));
    for (what, body) in [
        ("100k empty args", json!({"argv": empties})),
        (
            "1.5 MB env value",
            json!({"argv": ["/bin/true"], "env": {"BIG": "y".repeat(1_500_000)}}),
        ),
    ] {
        let r = d.req_json("POST", &execs, &body);
        assert!(
            r.status >= 400 && r.error_code().is_some(),
            "{what}: {} {}",
            r.status,
            r.text()
        );
        eprintln!("{what}: {} {}", r.status, r.text());
        d.healthy();
    }
    let (rc, out) = d.sh(&id, "echo still-here");
    assert_eq!((rc, out.as_slice()), (0, &b"still-here\n"[..]));
    // Entrypoints are checked the same way.
    for (what, body) in [
        (
            "entrypoint 1 MB arg",
            json!({"entrypoint": ["/bin/echo", "x".repeat(1 << 20)]}),
        ),
        ("entrypoint 100k args", json!({"entrypoint": argv})),
    ] {
        let r = d.req_json("POST", "/v1/sandboxes", &body);
        assert_error(&r, 400, "invalid", what);
        d.healthy();
    }
    d.delete(&id);
    assert_eq!(d.running_count(), 0);
}

#[test]
fn exec_argv_and_env_beyond_the_message_size_are_invalid() {
    let _s = serial();
    let d = Daemon::start("argv-msgsize");
    let id = d.running_sandbox();
    let execs = format!("/v1/sandboxes/{id}/execs");
    let mut empties = vec!["/bin/true".to_string()];
    empties.extend(std::iter::repeat_n(String::new(), 100_000));
    let r = d.req_json("POST", &execs, &json!({"argv": empties}));
    assert_error(&r, 400, "invalid", "100k empty args");
    let r = d.req_json(
        "POST",
        &execs,
        &json!({"argv": ["/bin/true"], "env": {"BIG": "y".repeat(1_500_000)}}),
    );
    assert_error(&r, 400, "invalid", "1.5 MB env value");
    // A sandbox env that large makes every later exec fail: refuse it at create.
    let r = d.req_json(
        "POST",
        "/v1/sandboxes",
        &json!({"env": {"BIG": "y".repeat(1_500_000)}}),
    );
    assert_error(&r, 400, "invalid", "create with a 1.5 MB env value");
    d.delete(&id);
}

#[test]
fn env_keys_with_equals_or_nul_and_bad_values_are_invalid() {
    let _s = serial();
    let d = Daemon::start("env");
    let id = d.running_sandbox();
    let bad: Vec<(&str, Value)> = vec![
        ("= in key", json!({"A=B": "x"})),
        ("leading = key", json!({"=A": "x"})),
        ("NUL in key", json!({"A\u{0}B": "x"})),
        ("NUL in value", json!({"A": "x\u{0}y"})),
        ("empty key", json!({"": "x"})),
        ("digit first", json!({"1A": "x"})),
        ("space in key", json!({"A B": "x"})),
        ("non-ASCII key", json!({"Ä": "x"})),
    ];
    for (what, env) in &bad {
        let r = d.req_json("POST", "/v1/sandboxes", &json!({"env": env}));
        assert_error(&r, 400, "invalid", &format!("create env {what}"));
        let r = d.req_json(
            "POST",
            "/v1/sandboxes",
            &json!({"secrets": [{"inline": env}]}),
        );
        assert_error(&r, 400, "invalid", &format!("create inline secret {what}"));
        let r = d.req_json(
            "POST",
            &format!("/v1/sandboxes/{id}/execs"),
            &json!({"argv": ["/bin/true"], "env": env}),
        );
        assert_error(&r, 400, "invalid", &format!("exec env {what}"));
        let r = d.req_json(
            "POST",
            &format!("/v1/sandboxes/{id}/execs"),
            &json!({"argv": ["/bin/true"], "secrets": [{"inline": env}]}),
        );
        assert_error(&r, 400, "invalid", &format!("exec inline secret {what}"));
        let r = d.req_json("POST", "/v1/secrets", &json!({"name": "s", "env": env}));
        assert_error(&r, 400, "invalid", &format!("secret {what}"));
        d.healthy();
    }
    // Values may hold '=' and newlines; they arrive intact.
    let r = d.exec(
        &id,
        json!({"argv": ["/bin/sh", "-c", "printf %s \"$V\""], "env": {"V": "a=b\nc"}}),
    );
    let x = r["exec_id"].as_str().expect("exec_id");
    let out = d.req(
        "GET",
        format!("/v1/sandboxes/{id}/execs/{x}/stdout?follow=true"),
        b"",
    );
    assert_eq!(out.body, b"a=b\nc");
    assert_eq!(d.running_count(), 1, "a refused create left a sandbox");
    d.delete(&id);
    d.healthy();
}

#[test]
fn names_of_63_and_64_characters() {
    let _s = serial();
    let d = Daemon::start("names");
    let n63 = "n".repeat(63);
    let n64 = "n".repeat(64);
    let id = d.create(json!({"name": n63, "app": n63, "timeout_secs": 60}));
    d.wait_running(&id);
    let r = d.req("GET", format!("/v1/apps/{n63}/sandboxes/{n63}"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], id.as_str());
    // The same name again while it runs.
    let r = d.req_json("POST", "/v1/sandboxes", &json!({"name": n63, "app": n63}));
    assert_error(
        &r,
        409,
        "already_exists",
        "a second sandbox with a live name",
    );
    for (what, body) in [
        ("name", json!({"name": n64})),
        ("app", json!({"app": n64})),
        ("name looking like an id", json!({"name": UNKNOWN_ID})),
        ("name ..", json!({"name": ".."})),
        ("name with /", json!({"name": "a/b"})),
        ("empty name", json!({"name": ""})),
        (
            "volume name",
            json!({"volumes": [{"name": n64, "path": "/data"}]}),
        ),
        (
            "volume path ..",
            json!({"volumes": [{"name": "v", "path": "/data/../etc"}]}),
        ),
        ("named secret", json!({"secrets": [{"named": n64}]})),
    ] {
        let r = d.req_json("POST", "/v1/sandboxes", &body);
        assert_error(&r, 400, "invalid", what);
    }
    // Exec ids: 63 characters is the longest.
    let x = d.exec(&id, json!({"exec_id": n63, "argv": ["/bin/true"]}));
    assert_eq!(x["exec_id"], n63.as_str());
    let r = d.req_json(
        "POST",
        &format!("/v1/sandboxes/{id}/execs"),
        &json!({"exec_id": n64, "argv": ["/bin/true"]}),
    );
    assert_error(&r, 400, "invalid", "64-character exec_id");
    // Secrets.
    let r = d.req_json(
        "POST",
        "/v1/secrets",
        &json!({"name": n63, "env": {"K": "v"}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = d.req_json(
        "POST",
        "/v1/secrets",
        &json!({"name": n64, "env": {"K": "v"}}),
    );
    assert_error(&r, 400, "invalid", "64-character secret name");
    let r = d.req("DELETE", format!("/v1/secrets/{n64}"), b"");
    assert_error(&r, 400, "invalid", "delete a 64-character secret");
    let r = d.req("DELETE", format!("/v1/secrets/{n63}"), b"");
    assert_eq!(r.status, 204, "{}", r.text());
    d.healthy();
    d.delete(&id);
    assert_eq!(d.running_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Lifecycle races.

#[test]
fn two_hundred_parallel_creates_and_deletes_leave_nothing_running() {
    let _s = serial();
    let d = std::sync::Arc::new(Daemon::start("churn"));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..20)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                for i in 0..10 {
                    // Some with an entrypoint, some idle; delete at once (mostly while pending).
                    let body = if i % 2 == 0 {
                        json!({"entrypoint": ["/bin/sleep", "600"], "tags": {"t": t.to_string()}})
                    } else {
                        json!({"timeout_secs": 600})
                    };
                    let c = Instant::now();
                    let id = d.create(body);
                    lat.push(c.elapsed());
                    if i % 3 == 0 {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    d.delete(&id);
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = Vec::new();
    let mut worst_health = Duration::ZERO;
    while !threads.iter().all(|t| t.is_finished()) {
        worst_health = worst_health.max(d.healthy());
        std::thread::sleep(Duration::from_millis(100));
    }
    for t in threads {
        lat.extend(t.join().expect("a create/delete thread panicked"));
    }
    lat.sort();
    eprintln!(
        "200 creates+deletes in {:?}; create reply median {:?}, max {:?}; worst health {worst_health:?}",
        t0.elapsed(),
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
    d.healthy();
    assert_eq!(d.running_count(), 0);
    let all = d.req("GET", "/v1/sandboxes?all=true", b"").json();
    assert_eq!(
        all.as_array().map(|a| a.len()),
        Some(0),
        "deleted sandboxes listed: {all}"
    );
    // Torn down: no run directory, no cgroup, no process (background cleanup may lag a bit).
    let ids = d.ids.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(ids.len(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Warm sandboxes (started ahead for the next creates) are not the test's.
        let dirs = std::fs::read_dir(d.root.join("run/sandboxes"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| ids.iter().any(|id| e.file_name().to_string_lossy() == *id))
                    .count()
            })
            .unwrap_or(0);
        let (cg, procs) = (cgroups_of(&ids), processes_in(&ids));
        if dirs == 0 && cg.is_empty() && procs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "30 s after the deletes: {dirs} run dirs, cgroups {cg:?}, processes {procs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And it still creates.
    let id = d.running_sandbox();
    assert_eq!(d.sh(&id, "echo ok").1, b"ok\n");
    d.delete(&id);
    match std::sync::Arc::try_unwrap(d) {
        Ok(mut d) => {
            d.stop();
        }
        Err(_) => panic!("a thread still holds the daemon"),
    }
}

#[test]
fn delete_while_an_exec_streams_output_ends_the_reader() {
    let _s = serial();
    let d = Daemon::start("delete-streaming");
    let id = d.running_sandbox();
    let x = d.exec(&id, json!({"argv": ["/usr/bin/yes", "streaming"]}))["exec_id"]
        .as_str()
        .expect("exec_id")
        .to_string();
    let sock = d.sock();
    let path = format!("/v1/sandboxes/{id}/execs/{x}/stdout?follow=true");
    let (progress_tx, progress_rx) = mpsc::channel::<u64>();
    let reader = std::thread::spawn(move || -> (u64, Result<(), String>) {
        let mut s = match open(&sock, "GET", path.as_bytes(), b"", Duration::from_secs(30)) {
            Ok(s) => s,
            Err(e) => return (0, Err(e.to_string())),
        };
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            match s.body.read(&mut buf) {
                Ok(0) => return (total, Ok(())),
                Ok(n) => {
                    total += n as u64;
                    let _ = progress_tx.send(total);
                }
                Err(e) => return (total, Err(e.to_string())),
            }
        }
    });
    // Streaming for real before the delete.
    let t = Instant::now();
    loop {
        let got = progress_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no output");
        if got > 4 << 20 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10));
    }
    let t = Instant::now();
    d.delete(&id);
    let deleted_in = t.elapsed();
    let ended = within(Duration::from_secs(15), move || reader.join());
    let (total, how) = ended
        .expect("the reader did not end within 15 s of the delete")
        .expect("reader panicked");
    eprintln!(
        "delete while streaming: delete took {deleted_in:?}; reader ended after {total} bytes ({how:?})"
    );
    d.healthy();
    let r = d.req("GET", format!("/v1/sandboxes/{id}"), b"");
    assert_error(&r, 404, "not_found", "info after delete");
    assert_eq!(d.running_count(), 0);
}

#[test]
fn terminate_while_pending() {
    let _s = serial();
    let d = Daemon::start("terminate-pending");
    for i in 0..5 {
        let id = d.create(json!({"entrypoint": ["/bin/sleep", "600"]}));
        let t = Instant::now();
        let r = d.req_json(
            "POST",
            &format!("/v1/sandboxes/{id}/terminate"),
            &json!({"wait": true}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let w = r.json();
        eprintln!("terminate while pending #{i}: {w} in {:?}", t.elapsed());
        assert_eq!(w["finished"], true, "{w}");
        assert_eq!(w["end_reason"], "terminated", "{w}");
        assert_eq!(w["returncode"], 137, "{w}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
        // Idempotent, and everything else answers "finished".
        let again = d.req_json("POST", &format!("/v1/sandboxes/{id}/terminate"), &json!({}));
        assert_eq!(again.json()["end_reason"], "terminated");
        let x = d.req_json(
            "POST",
            &format!("/v1/sandboxes/{id}/execs"),
            &json!({"argv": ["/bin/true"]}),
        );
        assert_error(&x, 409, "conflict", "exec after terminate");
        d.healthy();
    }
    assert_eq!(d.running_count(), 0);
}

#[test]
fn wait_until_ready_while_pending_then_terminate() {
    let _s = serial();
    let d = Daemon::start("ready-terminate");
    let id = d.create(json!({
        "entrypoint": ["/bin/sleep", "600"],
        "readiness_probe": {"exec_argv": ["/bin/false"], "interval_ms": 50}
    }));
    let sock = d.sock();
    let path = format!("/v1/sandboxes/{id}/wait_until_ready");
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let r = try_request(
            &sock,
            "POST",
            path.as_bytes(),
            br#"{"timeout_secs": 120}"#,
            Duration::from_secs(60),
        );
        (t.elapsed(), r)
    });
    std::thread::sleep(Duration::from_millis(300));
    d.healthy();
    let t = Instant::now();
    let r = d.req_json("POST", &format!("/v1/sandboxes/{id}/terminate"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, r) = within(Duration::from_secs(15), move || waiter.join())
        .expect("wait_until_ready did not return within 15 s of terminate")
        .expect("waiter panicked");
    let r = r.expect("wait_until_ready answered");
    eprintln!(
        "wait_until_ready returned {:?} after terminate: {}",
        t.elapsed(),
        r.text()
    );
    assert_error(
        &r,
        409,
        "conflict",
        "wait_until_ready of a terminated sandbox",
    );
    // A timeout reply for one that stays unready, promptly.
    let id2 = d.create(json!({"readiness_probe": {"exec_argv": ["/bin/false"]}}));
    let t = Instant::now();
    let r = d.req_json(
        "POST",
        &format!("/v1/sandboxes/{id2}/wait_until_ready"),
        &json!({"timeout_secs": 0.5}),
    );
    assert_error(&r, 408, "timeout", "unready within 0.5 s");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    for bad in [
        json!({"timeout_secs": 0}),
        json!({"timeout_secs": -1}),
        json!({"timeout_secs": "1"}),
        json!({}),
    ] {
        let r = d.req_json(
            "POST",
            &format!("/v1/sandboxes/{id2}/wait_until_ready"),
            &bad,
        );
        assert_error(&r, 400, "invalid", &format!("wait_until_ready {bad}"));
    }
    d.delete(&id2);
    d.healthy();
    assert_eq!(d.running_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Output floods and back-pressure.

/// Sum of the sizes of the spool files of a sandbox.
fn spool_bytes(d: &Daemon, id: &str) -> u64 {
    std::fs::read_dir(d.root.join("state/output").join(id))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn output_nobody_reads_is_backpressured_and_memory_stays_flat() {
    let _s = serial();
    let d = Daemon::start("backpressure");
    // Warm up (first sandbox, first exec) before the baseline.
    let warm = d.running_sandbox();
    d.sh(&warm, "true");
    d.delete(&warm);
    let (rss0, _) = d.rss_kib();

    let id = d.create(json!({"entrypoint": ["/usr/bin/yes", "0123456789abcdef0123456789abcdef"], "timeout_secs": 600}));
    d.wait_running(&id);
    // Nobody reads: the spool stops near OUTPUT_WINDOW.
    let window = sbx::api::OUTPUT_WINDOW;
    let deadline = Instant::now() + Duration::from_secs(30);
    while spool_bytes(&d, &id) < window {
        assert!(
            Instant::now() < deadline,
            "only {} bytes spooled",
            spool_bytes(&d, &id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let paused = spool_bytes(&d, &id);
    std::thread::sleep(Duration::from_secs(1));
    let paused2 = spool_bytes(&d, &id);
    eprintln!("unread output paused at {paused} bytes (window {window})");
    assert!(
        paused <= window + (1 << 20),
        "spooled {paused} bytes past the window"
    );
    assert_eq!(paused, paused2, "the producer was not paused");
    let mut lat = vec![d.healthy()];
    // Other requests stay fast meanwhile.
    let other = d.running_sandbox();
    let t = Instant::now();
    assert_eq!(d.sh(&other, "echo fast").1, b"fast\n");
    let exec_rt = t.elapsed();
    d.delete(&other);

    // Now read ~200 MB through the follow stream while measuring health latency.
    let sock = d.sock();
    let path = format!("/v1/sandboxes/{id}/stdout?follow=true");
    let target: u64 = 200 << 20;
    let reader = std::thread::spawn(move || -> Result<u64, String> {
        let mut s = open(&sock, "GET", path.as_bytes(), b"", Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        while total < target {
            let n = s.body.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("stream ended after {total} bytes"));
            }
            // Spot-check content: `yes` lines of 33 bytes.
            if total == 0 {
                assert_eq!(&buf[..33], b"0123456789abcdef0123456789abcdef\n");
            }
            total += n as u64;
        }
        Ok(total)
    });
    let t = Instant::now();
    let mut peak_rss = 0;
    while !reader.is_finished() {
        lat.push(d.healthy());
        peak_rss = peak_rss.max(d.rss_kib().0);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "200 MB took over 2 minutes"
        );
    }
    let read = reader
        .join()
        .expect("reader panicked")
        .expect("read 200 MB");
    let secs = t.elapsed().as_secs_f64();
    let (rss1, hwm) = d.rss_kib();
    lat.sort();
    eprintln!(
        "read {read} bytes in {secs:.2} s ({:.0} MB/s); sbxd RSS {rss0} KiB before, {rss1} KiB after, \
         peak while reading {peak_rss} KiB (VmHWM {hwm} KiB); health median {:?} max {:?} over {} checks; \
         exec round trip while paused {exec_rt:?}",
        read as f64 / secs / 1e6,
        lat[lat.len() / 2],
        lat[lat.len() - 1],
        lat.len()
    );
    assert!(
        peak_rss < rss0 + 48 * 1024,
        "sbxd's memory grew from {rss0} KiB to {peak_rss} KiB while 200 MB streamed"
    );
    d.delete(&id);
    d.healthy();
}

#[test]
fn delete_releases_a_backpressured_spool() {
    let _s = serial();
    let d = Daemon::start("stalled-spool");
    let id = d.create(json!({"entrypoint": ["/usr/bin/yes"], "timeout_secs": 600}));
    d.wait_running(&id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while spool_bytes(&d, &id) < sbx::api::OUTPUT_WINDOW {
        assert!(Instant::now() < deadline, "the spool did not fill");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.delete(&id);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = d.deleted_state_fds();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after the delete sbxd still holds {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d.healthy();
}

// ---------------------------------------------------------------------------------------------
// Hostile connections.

#[test]
fn five_hundred_idle_connections_do_not_starve_new_clients() {
    let _s = serial();
    let d = Daemon::start("idle-connections");
    let idle: Vec<UnixStream> = (0..500)
        .map(|i| UnixStream::connect(d.sock()).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut lat = Vec::new();
    for _ in 0..20 {
        lat.push(d.healthy());
    }
    let id = d.running_sandbox();
    assert_eq!(d.sh(&id, "echo served").1, b"served\n");
    d.delete(&id);
    lat.sort();
    eprintln!(
        "with 500 idle connections: health median {:?}, max {:?}",
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
    drop(idle);
    d.healthy();
}

#[test]
fn idle_connections_cannot_exhaust_descriptors() {
    let _s = serial();
    let d = Daemon::start_with("idle-fd-limit", &["prlimit", "--nofile=1024:1024", "--"]);
    let mut idle = Vec::new();
    for _ in 0..1100 {
        match UnixStream::connect(d.sock()) {
            Ok(s) => idle.push(s),
            Err(_) => break,
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    d.healthy();
    drop(idle);
}

#[test]
fn half_sent_requests_do_not_block_others() {
    let _s = serial();
    let d = Daemon::start("half-requests");
    let id = d.running_sandbox();
    let partials: Vec<Vec<u8>> = vec![
        b"GE".to_vec(),
        b"GET /v1/heal".to_vec(),
        b"GET /v1/health HTTP/1.1\r\nHost: sb".to_vec(),
        b"POST /v1/sandboxes HTTP/1.1\r\nHost: sbx\r\nContent-Length: 100\r\n\r\n{\"entry".to_vec(),
        format!("PUT /v1/sandboxes/{id}/fs/file?path=/tmp/half HTTP/1.1\r\nHost: sbx\r\nContent-Length: 1000000\r\n\r\npartial").into_bytes(),
        format!("POST /v1/sandboxes/{id}/execs HTTP/1.1\r\nHost: sbx\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{{\"arg").into_bytes(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
    ];
    let mut held = Vec::new();
    for p in &partials {
        let mut s = UnixStream::connect(d.sock()).expect("connect");
        s.write_all(p).expect("write a partial request");
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    d.healthy();
    // Every route still works, including the ones whose requests are half-sent.
    let created = d.create(json!({"timeout_secs": 60}));
    d.wait_running(&created);
    let put = d.req(
        "PUT",
        format!("/v1/sandboxes/{id}/fs/file?path=/tmp/other"),
        b"whole",
    );
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(d.sh(&id, "cat /tmp/other").1, b"whole");
    // The stalled file write wrote nothing visible.
    let r = d.req(
        "GET",
        format!("/v1/sandboxes/{id}/fs/stat?path=/tmp/half"),
        b"",
    );
    assert_error(&r, 404, "not_found", "a half-uploaded file");
    // Deleting the sandbox a stalled upload targets does not wait for that upload.
    let t = Instant::now();
    d.delete(&id);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "delete took {:?}",
        t.elapsed()
    );
    d.delete(&created);
    drop(held);
    d.healthy();
    assert_eq!(d.running_count(), 0);
}

#[test]
fn stalled_uploads_do_not_starve_exec_and_terminate() {
    let _s = serial();
    let d = Daemon::start("stalled-uploads");
    let id = d.running_sandbox();
    let stalled: Vec<UnixStream> = (0..520)
        .map(|i| {
            let mut s = UnixStream::connect(d.sock()).expect("connect");
            s.write_all(
                format!(
                    "PUT /v1/sandboxes/{id}/fs/file?path=/tmp/upload-{i} HTTP/1.1\r\nHost: sbx\r\n\
                     Content-Length: 1000\r\n\r\nx"
                )
                .as_bytes(),
            )
            .expect("send the start of an upload");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    d.healthy();
    let sock = d.sock();
    let path = format!("/v1/sandboxes/{id}/execs");
    let exec = within(Duration::from_secs(10), move || {
        try_request(
            &sock,
            "POST",
            path.as_bytes(),
            br#"{"argv": ["/bin/true"]}"#,
            Duration::from_secs(10),
        )
    });
    let sock = d.sock();
    let path = format!("/v1/sandboxes/{id}/terminate");
    let terminate = within(Duration::from_secs(10), move || {
        try_request(
            &sock,
            "POST",
            path.as_bytes(),
            br#"{"wait": true}"#,
            Duration::from_secs(10),
        )
    });
    drop(stalled);
    let exec = exec.and_then(|r| r.ok()).map(|r| r.status);
    let terminate = terminate.and_then(|r| r.ok()).map(|r| r.status);
    assert_eq!(
        (exec, terminate),
        (Some(201), Some(200)),
        "with 520 stalled uploads: exec and terminate must still answer within 10 s"
    );
}

#[test]
fn fork_bomb_inside_a_sandbox_does_not_wedge_the_daemon() {
    let _s = serial();
    let d = Daemon::start("fork-bomb");
    let id = d.create(json!({"pids": 64, "cpu": 0.5, "timeout_secs": 600}));
    d.wait_running(&id);
    d.exec(
        &id,
        json!({"argv": ["/bin/sh", "-c", "b() { b | b & }; b; sleep 600"], "stdout": "devnull", "stderr": "devnull"}),
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut lat = Vec::new();
    for _ in 0..5 {
        lat.push(d.healthy());
        // An exec may fail (no pid left for it) but must answer promptly, with an error body.
        let sock = d.sock();
        let path = format!("/v1/sandboxes/{id}/execs");
        let t = Instant::now();
        let r = within(Duration::from_secs(10), move || {
            try_request(
                &sock,
                "POST",
                path.as_bytes(),
                br#"{"argv": ["/bin/true"]}"#,
                Duration::from_secs(10),
            )
        })
        .expect("exec into a fork-bombed sandbox hung")
        .expect("exec answered");
        eprintln!(
            "exec during a fork bomb: {} in {:?}: {}",
            r.status,
            t.elapsed(),
            r.text()
        );
        assert!(r.status == 201 || r.error_code().is_some(), "{}", r.text());
        let other = d.req("GET", format!("/v1/sandboxes/{id}/fs/stat?path=/tmp"), b"");
        assert_eq!(other.status, 200, "{}", other.text());
    }
    let t = Instant::now();
    let r = d.req_json(
        "POST",
        &format!("/v1/sandboxes/{id}/terminate"),
        &json!({"wait": true}),
    );
    assert_eq!(r.json()["end_reason"], "terminated", "{}", r.text());
    eprintln!(
        "fork bomb: health max {:?}; terminate took {:?}",
        lat.iter().max(),
        t.elapsed()
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "terminate took {:?}",
        t.elapsed()
    );
    let ids = vec![id.clone()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_in(&ids).is_empty() {
        assert!(
            Instant::now() < deadline,
            "bomb processes survived: {:?}",
            processes_in(&ids).len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d.healthy();
}

// ---------------------------------------------------------------------------------------------
// Stdin.

#[test]
fn stdin_write_to_a_process_that_never_reads_blocks_only_itself() {
    let _s = serial();
    let d = Daemon::start("stdin-blocked");
    let id = d.running_sandbox();
    let x = d.exec(
        &id,
        json!({"exec_id": "deaf", "argv": ["/bin/sleep", "600"]}),
    )["exec_id"]
        .as_str()
        .expect("exec_id")
        .to_string();
    let sock = d.sock();
    let path = format!("/v1/sandboxes/{id}/execs/{x}/stdin?offset=0");
    let writer = std::thread::spawn(move || {
        let body = vec![b'z'; 4 << 20];
        try_request(
            &sock,
            "POST",
            path.as_bytes(),
            &body,
            Duration::from_secs(120),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !writer.is_finished(),
        "a 4 MiB write to a process that never reads returned"
    );
    // Others are not blocked: health, another exec, the same exec's info and output.
    d.healthy();
    assert_eq!(d.sh(&id, "echo other").1, b"other\n");
    let info = d.req("GET", format!("/v1/sandboxes/{id}/execs/{x}"), b"");
    assert_eq!(info.json()["status"], "running");
    let out = d.req(
        "GET",
        format!("/v1/sandboxes/{id}/execs/{x}/stdout?follow=false"),
        b"",
    );
    assert_eq!((out.status, out.header("sbx-eof")), (200, Some("false")));
    // Ending the process ends the write (a conflict: nobody reads any more).
    let t = Instant::now();
    let r = d.req_json(
        "POST",
        &format!("/v1/sandboxes/{id}/execs/{x}/signal"),
        &json!({"signal": 9}),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = within(Duration::from_secs(10), move || writer.join())
        .expect("the blocked stdin write did not end within 10 s of SIGKILL")
        .expect("writer panicked")
        .expect("the write got an answer");
    eprintln!(
        "blocked stdin write ended {:?} after SIGKILL: {} {}",
        t.elapsed(),
        r.status,
        r.text()
    );
    assert_error(&r, 409, "conflict", "stdin write to a killed process");
    let w = d
        .req(
            "GET",
            format!("/v1/sandboxes/{id}/execs/{x}/wait?timeout=10"),
            b"",
        )
        .json();
    assert_eq!(
        (w["status"].as_str(), w["returncode"].as_i64()),
        (Some("exited"), Some(137)),
        "{w}"
    );
    d.delete(&id);
    d.healthy();
}

#[test]
fn exec_exit_is_recorded_while_a_stdin_write_is_blocked() {
    let _s = serial();
    let d = Daemon::start("stdin-wedge");
    let id = d.running_sandbox();
    // Hostile sandbox: the exec exits after 1 s, but a child keeps stdin open and never reads.
    let x = d.exec(
        &id,
        json!({"exec_id": "leaver", "argv": ["/bin/sh", "-c", "sleep 600 & sleep 1; exit 7"]}),
    )["exec_id"]
        .as_str()
        .expect("exec_id")
        .to_string();
    let sock = d.sock();
    let path = format!("/v1/sandboxes/{id}/execs/{x}/stdin?offset=0");
    let _writer = std::thread::spawn(move || {
        let body = vec![b'z'; 4 << 20];
        try_request(
            &sock,
            "POST",
            path.as_bytes(),
            &body,
            Duration::from_secs(60),
        )
    });
    // A stalled client: half a stdin body to a second exec that exits at once.
    let y = d.exec(
        &id,
        json!({"exec_id": "quick", "argv": ["/bin/sleep", "1"]}),
    )["exec_id"]
        .as_str()
        .expect("exec_id")
        .to_string();
    let mut stalled = UnixStream::connect(d.sock()).expect("connect");
    stalled
        .write_all(
            format!(
                "POST /v1/sandboxes/{id}/execs/{y}/stdin?offset=0 HTTP/1.1\r\nHost: sbx\r\n\
                 Content-Length: 100\r\n\r\n0123456789"
            )
            .as_bytes(),
        )
        .expect("write half a stdin body");
    let mut failures = Vec::new();
    for (ex, rc) in [(&x, 7), (&y, 0)] {
        let w = d
            .req(
                "GET",
                format!("/v1/sandboxes/{id}/execs/{ex}/wait?timeout=10"),
                b"",
            )
            .json();
        if w["status"] != "exited" || w["returncode"] != rc {
            failures.push(format!("exec {ex}: {w}"));
        }
    }
    drop(stalled);
    d.healthy();
    d.delete(&id);
    assert!(
        failures.is_empty(),
        "exits not recorded:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Filesystem routes.

#[test]
fn fs_write_of_50_mb_and_read_back() {
    let _s = serial();
    let d = Daemon::start("fs-50mb");
    let id = d.running_sandbox();
    let (rss0, _) = d.rss_kib();
    let data = noise(50 << 20, 0x9e37_79b9_7f4a_7c15);
    let t = Instant::now();
    let r = d.req(
        "PUT",
        format!("/v1/sandboxes/{id}/fs/file?path=/tmp/big/file.bin"),
        &data,
    );
    let up = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["size"], data.len() as u64);
    let (rss1, _) = d.rss_kib();
    let t = Instant::now();
    let r = d.req(
        "GET",
        format!("/v1/sandboxes/{id}/fs/file?path=/tmp/big/file.bin"),
        b"",
    );
    let down = t.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), data.len());
    assert!(r.body == data, "the 50 MB file came back different");
    let (rss2, hwm) = d.rss_kib();
    eprintln!(
        "50 MB: upload {up:?}, download {down:?}; sbxd RSS {rss0} -> {rss1} -> {rss2} KiB (peak {hwm} KiB)"
    );
    assert!(
        rss2 < rss0 + 32 * 1024,
        "sbxd kept {} KiB after a 50 MB round trip",
        rss2 - rss0
    );
    // The sandbox sees the same bytes.
    let (rc, out) = d.sh(&id, "wc -c < /tmp/big/file.bin");
    assert_eq!((rc, String::from_utf8_lossy(&out).trim()), (0, "52428800"));
    d.healthy();
    d.delete(&id);
}

#[test]
fn fs_read_of_devices_and_fifos_does_not_hang() {
    let _s = serial();
    let d = Daemon::start("fs-special");
    let id = d.running_sandbox();
    let (rc, _) = d.sh(
        &id,
        "mkfifo /tmp/fifo && ln -s /dev/zero /tmp/zero-link && ln -s /tmp/fifo /tmp/fifo-link \
         && mkdir /tmp/dir",
    );
    assert_eq!(rc, 0);
    for p in [
        "/dev/zero",
        "/dev/urandom",
        "/dev/random",
        "/dev/null",
        "/dev/tty",
        "/dev/ptmx",
        "/tmp/fifo",
        "/tmp/zero-link",
        "/tmp/fifo-link",
        "/proc/1/fd/0",
        "/proc/self/fd/0",
        "/proc/kmsg",
        "/tmp/dir",
    ] {
        let sock = d.sock();
        let path = format!("/v1/sandboxes/{id}/fs/file?path={p}");
        let t = Instant::now();
        let r = within(Duration::from_secs(10), move || {
            try_request(&sock, "GET", path.as_bytes(), b"", Duration::from_secs(10))
        })
        .unwrap_or_else(|| panic!("reading {p} hung"))
        .unwrap_or_else(|e| panic!("reading {p}: {e}"));
        eprintln!("read {p}: {} in {:?}: {}", r.status, t.elapsed(), r.text());
        assert!(
            (400..500).contains(&r.status) || (r.status == 200 && r.body.is_empty()),
            "read {p}: {} ({} bytes)",
            r.status,
            r.body.len()
        );
        d.healthy();
    }
    // Writing over a FIFO replaces it (rename), never writes into it.
    let w = d.req(
        "PUT",
        format!("/v1/sandboxes/{id}/fs/file?path=/tmp/fifo"),
        b"replaced",
    );
    assert_eq!(w.status, 200, "{}", w.text());
    assert_eq!(d.sh(&id, "cat /tmp/fifo").1, b"replaced");
    let st = d
        .req(
            "GET",
            format!("/v1/sandboxes/{id}/fs/stat?path=/dev/zero"),
            b"",
        )
        .json();
    assert_eq!(st["type"], "other", "{st}");
    d.delete(&id);
    d.healthy();
}

#[test]
fn fs_read_of_a_proc_file_returns_its_content() {
    let _s = serial();
    let d = Daemon::start("fs-proc");
    let id = d.running_sandbox();
    let r = d.req(
        "GET",
        format!("/v1/sandboxes/{id}/fs/file?path=/proc/1/status"),
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        String::from_utf8_lossy(&r.body).contains("Pid:"),
        "/proc/1/status read as {} bytes: {:?}",
        r.body.len(),
        r.text()
    );
    d.delete(&id);
}

#[test]
#[ignore = "bug: fs/list builds the whole listing (Vec + JSON) in memory; a sandbox with 300k \
            files makes one list call cost sbxd ~130 MB (no limit, no streaming)"]
fn fs_list_of_a_huge_directory_keeps_memory_bounded() {
    let _s = serial();
    let d = Daemon::start("fs-list-huge");
    let id = d.running_sandbox();
    let (rc, _) = d.sh(
        &id,
        "mkdir /tmp/many && cd /tmp/many && seq 1 300000 | xargs touch",
    );
    assert_eq!(rc, 0);
    let (_, hwm0) = d.rss_kib();
    let r = d.req(
        "GET",
        format!("/v1/sandboxes/{id}/fs/list?path=/tmp/many"),
        b"",
    );
    let (rss1, hwm1) = d.rss_kib();
    eprintln!(
        "list of 300k entries: {} bytes; sbxd peak {hwm0} -> {hwm1} KiB, RSS after {rss1} KiB",
        r.body.len()
    );
    assert!(
        r.status != 200 || hwm1 < hwm0 + 64 * 1024,
        "one listing raised sbxd's peak memory by {} KiB",
        hwm1 - hwm0
    );
    d.healthy();
    d.delete(&id);
}

// ---------------------------------------------------------------------------------------------
// Process trees and shutdown.

#[test]
fn entrypoint_that_forks_1000_sleepers_and_exits() {
    let _s = serial();
    let d = Daemon::start("fork-sleepers");
    let t = Instant::now();
    let id = d.create(json!({
        "entrypoint": ["/bin/sh", "-c",
            "i=0; while [ $i -lt 1000 ]; do sleep 600 & i=$((i+1)); done; echo forked; exit 3"],
        "pids": 4000,
        "timeout_secs": 600
    }));
    let w = d
        .req("GET", format!("/v1/sandboxes/{id}/wait?timeout=60"), b"")
        .json();
    let took = t.elapsed();
    eprintln!("1000 sleepers: finished {w} {took:?} after create");
    assert_eq!(w["finished"], true, "{w}");
    assert_eq!(
        (w["end_reason"].as_str(), w["returncode"].as_i64()),
        (Some("exited"), Some(3)),
        "{w}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    // Every sleeper is gone, and so is the cgroup.
    let ids = vec![id.clone()];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (procs, cg) = (processes_in(&ids), cgroups_of(&ids));
        if procs.is_empty() && cg.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after the end: {} processes left ({:?}…), cgroups {cg:?}",
            procs.len(),
            procs.first()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its output is complete (every holder of the pipe is dead).
    let out = within(Duration::from_secs(10), {
        let sock = d.sock();
        let path = format!("/v1/sandboxes/{id}/stdout?follow=true");
        move || try_request(&sock, "GET", path.as_bytes(), b"", Duration::from_secs(10))
    })
    .expect("the entrypoint's stdout did not end")
    .expect("stdout");
    assert_eq!(out.body, b"forked\n");
    d.healthy();
    assert_eq!(d.running_count(), 0);
}

/// Start `n` sandboxes of the given kinds (cycled), wait until all run, SIGTERM sbxd and check
/// it exits cleanly within 15 s leaving nothing of them (see [`Daemon::stop`]).
fn sigterm_with(name: &str, kinds: &[Value], n: usize) {
    let mut d = Daemon::start(name);
    let ids: Vec<String> = (0..n)
        .map(|i| d.create(kinds[i % kinds.len()].clone()))
        .collect();
    for id in &ids {
        d.wait_running(id);
    }
    // Live activity too: an exec whose output is being streamed, one whose stdin write blocks.
    let x = d.exec(&ids[0], json!({"argv": ["/usr/bin/yes"]}))["exec_id"]
        .as_str()
        .expect("exec_id")
        .to_string();
    let sock = d.sock();
    let p = format!("/v1/sandboxes/{}/execs/{x}/stdout?follow=true", ids[0]);
    let _reader = std::thread::spawn(move || {
        if let Ok(mut s) = open(&sock, "GET", p.as_bytes(), b"", Duration::from_secs(30)) {
            let mut buf = vec![0u8; 1 << 16];
            while matches!(s.body.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    let y = d.exec(&ids[1], json!({"argv": ["/bin/sleep", "600"]}))["exec_id"]
        .as_str()
        .expect("exec_id")
        .to_string();
    let sock = d.sock();
    let p = format!("/v1/sandboxes/{}/execs/{y}/stdin?offset=0", ids[1]);
    let _writer = std::thread::spawn(move || {
        try_request(
            &sock,
            "POST",
            p.as_bytes(),
            &vec![b'z'; 4 << 20],
            Duration::from_secs(30),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.running_count(), n as u64);
    d.healthy();
    let took = d.stop();
    eprintln!("SIGTERM with {n} sandboxes: sbxd exited after {took:?}");
}

#[test]
fn sigterm_with_twenty_sandboxes_running_terminates_them_all() {
    let _s = serial();
    sigterm_with(
        "sigterm-20",
        &[
            json!({"timeout_secs": 600}),
            json!({"entrypoint": ["/bin/sleep", "600"]}),
            json!({"entrypoint": ["/bin/sh", "-c", "trap '' TERM INT HUP; sleep 600 & sleep 600"]}),
            json!({"entrypoint": ["/bin/cat"], "stdin": true}),
        ],
        20,
    );
}

#[test]
fn sigterm_with_twenty_sandboxes_printing_unread_output() {
    let _s = serial();
    sigterm_with(
        "sigterm-20-unread",
        &[json!({"entrypoint": ["/usr/bin/yes"]})],
        20,
    );
}
