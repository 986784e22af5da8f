//! A real sbxd for the client-level integration tests (tests/guide.rs, tests/streams.rs): one
//! daemon per test, in its own directories under /tmp/sbx-it-guide-<pid>/<test>/, reached with
//! the client library. [`TestDaemon::finish`] asserts the test left nothing behind (no running
//! sandbox, no per-sandbox run directory, no mount) and stops the daemon by pid; dropping an
//! unfinished one (a failed test) stops it too and shows the tail of its log.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sbx::client::{Client, Sandbox};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long sbxd may take to answer after it was started, and to exit after SIGTERM.
const START_DEADLINE: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// The directory of this test process's daemons.
pub fn process_root() -> PathBuf {
    PathBuf::from(format!("/tmp/sbx-it-guide-{}", std::process::id()))
}

/// A sbxd serving `<root>/sbxd.sock` with state in `<root>/state` and runtime files in
/// `<root>/run`; its log is `<root>/sbxd.log`.
pub struct TestDaemon {
    name: String,
    root: PathBuf,
    child: Option<Child>,
}

impl TestDaemon {
    /// Starts a daemon for the test `name` and waits until `GET /v1/health` answers.
    pub async fn start(name: &str) -> TestDaemon {
        let root = process_root().join(name);
        if root.exists() {
            assert_no_mounts_under(&root);
            std::fs::remove_dir_all(&root)
                .unwrap_or_else(|e| panic!("remove the old {}: {e}", root.display()));
        }
        std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        let child = spawn_sbxd(&root);
        let mut d = TestDaemon {
            name: name.to_string(),
            root,
            child: Some(child),
        };
        d.wait_until_serving().await;
        d
    }

    /// Stops sbxd (SIGTERM; asserts a clean exit) and starts a new one on the same directories
    /// and state, as an operator restarting it would; waits until it serves.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.child = Some(spawn_sbxd(&self.root));
        self.wait_until_serving().await;
    }

    /// A series of /metrics (`name` includes its labels), as a number.
    pub async fn metric(&self, name: &str) -> u64 {
        let (status, body) = self.raw("GET", "/metrics", b"").await;
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    /// SIGTERM by pid; asserts sbxd exits cleanly within [`STOP_DEADLINE`].
    async fn stop(&mut self) {
        let pid = self.pid();
        kill(pid, Signal::SIGTERM).expect("SIGTERM sbxd");
        let deadline = Instant::now() + STOP_DEADLINE;
        let status = loop {
            if let Some(st) = self.child_exited() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "sbxd (pid {pid}) did not exit within {STOP_DEADLINE:?} of SIGTERM; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.child = None;
        assert!(
            status.success(),
            "sbxd exited with {status}; log:\n{}",
            self.log()
        );
    }

    async fn wait_until_serving(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(st) = self.child_exited() {
                panic!("sbxd exited with {st} before serving; log:\n{}", self.log());
            }
            if let Ok(c) = Client::connect_to(self.socket()).await {
                if let Ok(h) = c.health().await {
                    assert_eq!(h.status, "ok", "sbxd health: {h:?}");
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "sbxd did not answer on {} within {START_DEADLINE:?}; log:\n{}",
                self.socket().display(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn child_exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("poll sbxd"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("sbxd.sock")
    }

    /// A new client (a new connection) to this daemon.
    pub async fn client(&self) -> Client {
        Client::connect_to(self.socket())
            .await
            .unwrap_or_else(|e| panic!("connect to the test sbxd: {e}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("sbxd.log")).unwrap_or_default()
    }

    /// One request without the client library (HTTP/1.1 on a fresh connection), for what the
    /// library deliberately does not do (e.g. send a stdin chunk twice). Returns the status
    /// and the whole body.
    pub async fn raw(&self, method: &str, path_and_query: &str, body: &[u8]) -> (u16, Bytes) {
        let stream = tokio::net::UnixStream::connect(self.socket())
            .await
            .expect("connect to the test sbxd");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake with sbxd");
        let driver = tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://sbx{path_and_query}"))
            .header(hyper::header::HOST, "sbx")
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("a well-formed request");
        let resp = send
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("{method} {path_and_query}: {e}"));
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{method} {path_and_query}: reading the body: {e}"))
            .to_bytes();
        drop(send);
        driver.abort();
        (status, bytes)
    }

    /// Asserts the test left no sandbox running, stops sbxd (SIGTERM, by pid) and asserts it
    /// exited cleanly and left no per-sandbox directory (run or state) and no mount; then removes
    /// the test's directory.
    pub async fn finish(mut self) {
        let client = self.client().await;
        // A `terminate(wait=false)` just before may still be under way: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let running = Sandbox::list(&client, None, &BTreeMap::new(), false)
                .await
                .expect("list running sandboxes");
            if running.is_empty() {
                break;
            }
            let ids: Vec<&str> = running.iter().map(|s| s.id.as_str()).collect();
            assert!(
                Instant::now() < deadline,
                "test {} left sandboxes running: {ids:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(client);
        self.stop().await;
        for dir in ["run/sandboxes", "state/sandboxes"] {
            let sandboxes = self.root.join(dir);
            let left: Vec<String> = std::fs::read_dir(&sandboxes)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            assert!(
                left.is_empty(),
                "sbxd left per-sandbox directories in {}: {left:?}; log:\n{}",
                sandboxes.display(),
                self.log()
            );
        }
        assert_no_mounts_under(&self.root);
        remove_root(&self.root);
    }

    fn pid(&self) -> Pid {
        let id = self.child.as_ref().expect("sbxd is running").id();
        Pid::from_raw(i32::try_from(id).expect("a pid fits in i32"))
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // A test failed before finish(): stop sbxd (it terminates its sandboxes), by pid.
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("--- last lines of the sbxd log of test {} ---", self.name);
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
        if mounts_under(&self.root).is_empty() {
            remove_root(&self.root);
        } else {
            eprintln!(
                "not removing {}: mounts are left under it",
                self.root.display()
            );
        }
    }
}

/// Starts sbxd on `<root>` (socket, state, run dirs; log appended to `<root>/sbxd.log`).
fn spawn_sbxd(root: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("sbxd.log"))
        .expect("open the sbxd log");
    Command::new(env!("CARGO_BIN_EXE_sbxd"))
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
        .stdout(log.try_clone().expect("dup the sbxd log"))
        .stderr(log)
        .spawn()
        .expect("spawn sbxd")
}

/// Runs `argv` in `sb` to the end: (exit code, stdout, stderr).
pub async fn run(sb: &Sandbox, a: &[&str]) -> (i32, String, String) {
    let p = sb
        .exec(a.iter().copied())
        .await
        .unwrap_or_else(|e| panic!("exec {a:?}: {e}"));
    let (out, err) = tokio::join!(p.stdout().read_text(), p.stderr().read_text());
    let rc = p.wait().await.unwrap_or_else(|e| panic!("wait {a:?}: {e}"));
    (
        rc,
        out.unwrap_or_else(|e| panic!("stdout of {a:?}: {e}")),
        err.unwrap_or_else(|e| panic!("stderr of {a:?}: {e}")),
    )
}

/// Runs `argv` in `sb`, asserts exit 0 and returns stdout.
pub async fn run_ok(sb: &Sandbox, a: &[&str]) -> String {
    let (rc, out, err) = run(sb, a).await;
    assert_eq!(rc, 0, "{a:?} failed: stdout={out:?} stderr={err:?}");
    out
}

/// Runs `sh -c script` in `sb`; its exit code and stdout.
pub async fn sh(sb: &Sandbox, script: &str) -> (i32, String) {
    let p = sb.exec(["/bin/sh", "-c", script]).await.expect("exec");
    let out = p.stdout().read_text().await.expect("read stdout");
    (p.wait().await.expect("wait"), out)
}

/// Mount points at or below `root` (from /proc/self/mountinfo).
fn mounts_under(root: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let prefix = root.to_string_lossy().into_owned();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .map(str::to_string)
        .collect()
}

fn assert_no_mounts_under(root: &Path) {
    let m = mounts_under(root);
    assert!(m.is_empty(), "mounts left under {}: {m:?}", root.display());
}

/// Removes a test's directory, and the process directory once it is empty.
fn remove_root(root: &Path) {
    if let Err(e) = std::fs::remove_dir_all(root) {
        eprintln!("could not remove {}: {e}", root.display());
    }
    // Fails (harmlessly) while other tests of this process still have their directories.
    let _ = std::fs::remove_dir(process_root());
}
