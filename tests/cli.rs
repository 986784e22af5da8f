//! The `sbx` command as a user (or a script) runs it against a real sbxd: output, exit codes,
//! names, tags, secrets, volumes, files, errors, signals, and starting the daemon on demand.
//! Runs as root; every test starts its own daemon in its own directories and removes what it
//! made (sandboxes first, then the daemon, by pid).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::*;

const SBX: &str = env!("CARGO_BIN_EXE_sbx");
const UNKNOWN_ID: &str = "sb-0000000000000000000000";

/// A sbxd of this test's own, started with `sbx daemon` under /tmp/sbx-it/cli/<name>-<pid>.
/// Dropping it removes every sandbox it knows, stops it (SIGTERM, by pid) and its directory.
struct Daemon {
    root: PathBuf,
    child: Child,
}

impl Daemon {
    fn start(name: &str) -> Daemon {
        let root = fresh_dir(name);
        let log = std::fs::File::create(root.join("sbxd.log")).expect("create daemon log");
        let child = Command::new(SBX)
            .arg("daemon")
            .arg("--socket")
            .arg(root.join("sbxd.sock"))
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg("--run-dir")
            .arg(root.join("run"))
            .env("SBX_INIT", env!("CARGO_BIN_EXE_sbx-init"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn sbx daemon");
        let mut d = Daemon { root, child };
        d.wait_until_serving();
        d
    }

    fn wait_until_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("sbx daemon exited with {st}; log:\n{}", self.log());
            }
            if self
                .sbx()
                .arg("ls")
                .output()
                .expect("run sbx")
                .status
                .success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sbx daemon did not answer within 30 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("sbxd.log")).unwrap_or_default()
    }

    /// `sbx` talking to this daemon only (never starting another).
    fn sbx(&self) -> Command {
        let mut c = Command::new(SBX);
        c.env("SBX_SOCKET", self.root.join("sbxd.sock"))
            .env("SBX_STATE_DIR", self.root.join("state"))
            .env("SBX_RUN_DIR", self.root.join("run"))
            .env("SBX_NO_AUTOSTART", "1")
            .stdin(Stdio::null());
        c
    }

    /// Run `sbx ARGS`, assert exit 0, return stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.sbx().args(args).output().expect("run sbx");
        assert_eq!(
            out.status.code(),
            Some(0),
            "sbx {args:?}: stdout={:?} stderr={:?}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn out(&self, args: &[&str]) -> Output {
        self.sbx().args(args).output().expect("run sbx")
    }

    /// Every sandbox the daemon knows, finished ones too.
    fn all_ids(&self) -> Vec<String> {
        let list = json(&self.ok(&["ls", "--all", "--json"]));
        list.as_array()
            .expect("ls --json is an array")
            .iter()
            .map(|s| s["id"].as_str().expect("id").to_string())
            .collect()
    }

    fn assert_no_sandboxes(&self) {
        assert_eq!(
            self.all_ids(),
            Vec::<String>::new(),
            "sandboxes left behind"
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(out) = self.sbx().args(["ls", "--all", "--json"]).output() {
            if let Ok(serde_json::Value::Array(list)) = serde_json::from_slice(&out.stdout) {
                let ids: Vec<String> = list
                    .iter()
                    .filter_map(|s| s["id"].as_str().map(String::from))
                    .collect();
                for id in ids {
                    let _ = self.sbx().args(["rm", &id]).output();
                }
            }
        }
        stop_pid(self.child.id() as i32);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// SIGTERM, then SIGKILL after 15 s; returns once the process is gone.
fn stop_pid(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(pid);
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if !alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// Whether `pid` is running (a zombie counts as gone).
fn alive(pid: nix::unistd::Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            state != Some("Z")
        }
    }
}

/// An empty directory for one test (its pid in the name: test binaries may run side by side).
fn fresh_dir(name: &str) -> PathBuf {
    let root = test_root()
        .join("cli")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("create test dir");
    root
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
}

/// Assert the exit code and that stderr contains `needle`.
fn assert_fails(out: &Output, code: i32, needle: &str) {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout={:?} stderr={err:?}",
        text(&out.stdout)
    );
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err:?}");
}

fn created(d: &Daemon, args: &[&str]) -> String {
    let id = d.ok(&[&["create"], args].concat()).trim().to_string();
    assert!(sbx::api::is_sandbox_id(&id), "create printed {id:?}");
    id
}

#[test]
fn run_prints_output_and_exits_with_the_command_code() {
    let d = Daemon::start("run");
    let out = d.out(&["run", "--", "python3", "-c", "print('hello')"]);
    assert_eq!(
        text(&out.stdout),
        "hello\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));

    let out = d.out(&["run", "--", "sh", "-c", "echo oops >&2; exit 42"]);
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(text(&out.stderr), "oops\n");
    assert_eq!(text(&out.stdout), "");

    let out = d.out(&["run", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));

    let out = d.out(&["run", "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    // Every run removed its sandbox.
    d.assert_no_sandboxes();
}

#[test]
fn run_streams_output_as_it_is_written_in_order() {
    let d = Daemon::start("stream");
    // The command waits for our input after its first lines: we can only read them if they
    // were streamed while it runs, not delivered at the end.
    let mut child = d
        .sbx()
        .args(["run", "-i", "--", "sh", "-c"])
        .arg("echo first; echo err-first >&2; read x; echo second $x; echo err-second >&2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sbx run");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "first\n");
    line.clear();
    err.read_line(&mut line).unwrap();
    assert_eq!(line, "err-first\n");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let (mut rest_out, mut rest_err) = (String::new(), String::new());
    out.read_to_string(&mut rest_out).unwrap();
    err.read_to_string(&mut rest_err).unwrap();
    assert_eq!(rest_out, "second go\n");
    assert_eq!(rest_err, "err-second\n");
    assert_eq!(child.wait().unwrap().code(), Some(0));

    // Many lines arrive whole and in order.
    let out = d.ok(&[
        "run",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 5000 ]; do echo line-$i; i=$((i+1)); done",
    ]);
    let want: String = (0..5000).map(|i| format!("line-{i}\n")).collect();
    assert!(out == want, "output differs: {} bytes", out.len());
    d.assert_no_sandboxes();
}

#[test]
fn run_with_a_busybox_image_env_workdir_and_stdin() {
    let d = Daemon::start("busybox");
    let image = format!("dir:{}", busybox_rootfs().display());
    let mut child = d
        .sbx()
        .args([
            "run",
            "-i",
            "--image",
            &image,
            "-e",
            "GREETING=hi there",
            "-w",
            "/tmp",
        ])
        .args(["--", "sh", "-c", "echo \"$GREETING\"; pwd; cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped in\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "hi there\n/tmp\npiped in\n");
    assert_eq!(out.status.code(), Some(0));
    d.assert_no_sandboxes();
}

#[test]
fn run_on_sigterm_or_sigint_removes_the_sandbox() {
    let d = Daemon::start("signal");
    for (sig, code) in [
        (nix::sys::signal::Signal::SIGTERM, 143),
        (nix::sys::signal::Signal::SIGINT, 130),
    ] {
        let mut child = d
            .sbx()
            .args(["run", "--", "sh", "-c", "echo ready; sleep 300"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "after {sig}");
        d.assert_no_sandboxes();
    }
}

#[test]
fn create_exec_wait_poll_terminate() {
    let d = Daemon::start("lifecycle");
    let id = created(&d, &["--", "sleep", "300"]);
    assert_eq!(
        d.ok(&["poll", &id]),
        "",
        "poll prints nothing while it runs"
    );

    let out = d.out(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    let out = d.ok(&[
        "exec",
        "-e",
        "A=b c",
        "-w",
        "/tmp",
        &id,
        "--",
        "sh",
        "-c",
        "echo $A; pwd",
    ]);
    assert_eq!(out, "b c\n/tmp\n");

    let mut child = d
        .sbx()
        .args(["exec", "-i", &id, "--", "sh", "-c", "cat; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"piped\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "piped\ndone\n");
    // Without -i the command's stdin is empty (it does not wait for ours).
    assert_eq!(
        d.ok(&["exec", &id, "--", "sh", "-c", "cat; echo eof"]),
        "eof\n"
    );

    let out = d.out(&["exec", &id, "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137));
    let out = d.out(&["exec", "--timeout", "1", &id, "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));

    let out = d.ok(&["exec", "-t", &id, "--", "sh", "-c", "test -t 1 && echo tty"]);
    assert!(out.starts_with("tty"), "{out:?}");
    assert_eq!(
        d.ok(&["exec", &id, "--", "sh", "-c", "test -t 1 || echo pipe"]),
        "pipe\n"
    );

    assert_eq!(d.ok(&["terminate", "--wait", &id]), "137\n");
    assert_eq!(d.ok(&["poll", &id]), "137\n");
    assert_eq!(d.ok(&["wait", &id]), "137\n");
    assert_eq!(d.ok(&["terminate", &id]), "", "terminate is idempotent");
    let out = d.out(&["exec", &id, "--", "true"]);
    assert_fails(&out, 1, "error: ");

    let other = created(&d, &["--", "sh", "-c", "exit 3"]);
    assert_eq!(d.ok(&["wait", &other]), "3\n");
    assert_eq!(
        json(&d.ok(&["--json", "wait", &other]))["returncode"],
        serde_json::json!(3)
    );
    d.ok(&["rm", &id, &other]);
    d.assert_no_sandboxes();
}

#[test]
fn names_are_unique_per_app() {
    let d = Daemon::start("names");
    let web = created(&d, &["--name", "web", "--", "sleep", "300"]);
    let out = d.out(&["create", "--name", "web", "--", "sleep", "300"]);
    assert_fails(&out, 1, "error: already_exists:");
    let other = created(
        &d,
        &["--app", "other", "--name", "web", "--", "sleep", "300"],
    );
    assert_ne!(web, other);

    let info = json(&d.ok(&["inspect", "web"]));
    assert_eq!(info["id"], serde_json::json!(web));
    let info = json(&d.ok(&["inspect", "--app", "other", "web"]));
    assert_eq!(info["id"], serde_json::json!(other));
    assert_eq!(d.ok(&["exec", "web", "--", "echo", "hi"]), "hi\n");
    let out = d.out(&["exec", "--app", "nope", "web", "--", "true"]);
    assert_fails(&out, 1, "error: not_found:");

    assert_eq!(d.ok(&["terminate", "--wait", "web"]), "137\n");
    // The name is free once its sandbox finished; read-only commands still find the old one.
    assert_eq!(d.ok(&["wait", "web"]), "137\n");
    let again = created(&d, &["--name", "web", "--", "sleep", "300"]);
    assert_ne!(again, web);
    assert_eq!(d.ok(&["poll", "web"]), "");
}

#[test]
fn tags_and_ls_filters() {
    let d = Daemon::start("tags");
    let a = created(
        &d,
        &["--tag", "team=a", "--tag", "job=1", "--", "sleep", "300"],
    );
    let b = created(&d, &["--tag", "team=b", "--", "sleep", "300"]);

    let list = json(&d.ok(&["ls", "--json", "--tag", "team=a"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let s = &list[0];
    assert_eq!(s["id"], serde_json::json!(a));
    assert_eq!(s["tags"], serde_json::json!({"team": "a", "job": "1"}));
    assert_eq!(s["app"], serde_json::json!("default"));
    for field in ["name", "status", "created_at", "returncode"] {
        assert!(s.get(field).is_some(), "ls --json lacks {field}: {s}");
    }
    assert_eq!(json(&d.ok(&["ls", "--json"])).as_array().unwrap().len(), 2);
    assert_eq!(
        json(&d.ok(&["ls", "--json", "--app", "elsewhere"])),
        serde_json::json!([])
    );

    d.ok(&["tag", &a, "team=c"]);
    let ids = |args: &[&str]| -> Vec<String> {
        json(&d.ok(&[&["ls", "--json"], args].concat()))
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&["--tag", "team=c"]), vec![a.clone()]);
    assert_eq!(ids(&["--tag", "team=a"]), Vec::<String>::new());
    assert_eq!(
        ids(&["--tag", "job=1"]),
        Vec::<String>::new(),
        "tag replaces all tags"
    );

    let table = d.ok(&["ls"]);
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for col in [
        "ID",
        "NAME",
        "APP",
        "STATUS",
        "CREATED",
        "RETURNCODE",
        "TAGS",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert!(table.contains(&a) && table.contains(&b), "{table}");
    assert!(table.contains("team=c"), "{table}");

    d.ok(&["terminate", "--wait", &a]);
    assert_eq!(ids(&[]), vec![b.clone()], "ls shows running sandboxes only");
    let all = json(&d.ok(&["ls", "--all", "--json"]));
    let fin = all
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == serde_json::json!(a))
        .expect("ls --all lists the finished sandbox");
    assert_eq!(fin["returncode"], serde_json::json!(137));
    assert_eq!(fin["status"], serde_json::json!("finished"));
}

#[test]
fn secrets_reach_the_sandbox_and_are_never_listed() {
    let d = Daemon::start("secrets");
    d.ok(&["secret", "create", "api", "KEY=s3cret", "OTHER=x"]);
    let out = d.out(&["secret", "create", "api", "KEY=y"]);
    assert_fails(&out, 1, "error: already_exists:");
    let list = d.ok(&["secret", "ls", "--json"]);
    assert!(!list.contains("s3cret"), "{list}");
    let list = json(&list);
    assert_eq!(list[0]["name"], serde_json::json!("api"));
    assert_eq!(list[0]["keys"], serde_json::json!(["KEY", "OTHER"]));
    assert!(!d.ok(&["secret", "ls"]).contains("s3cret"));

    assert_eq!(
        d.ok(&["run", "--secret", "api", "--", "sh", "-c", "echo $KEY"]),
        "s3cret\n"
    );
    assert_eq!(
        d.ok(&[
            "run",
            "--secret",
            "api",
            "-e",
            "KEY=mine",
            "--",
            "sh",
            "-c",
            "echo $KEY"
        ]),
        "mine\n",
        "-e wins over a secret"
    );
    let id = created(&d, &["--", "sleep", "300"]);
    assert_eq!(
        d.ok(&[
            "exec",
            "--secret",
            "api",
            &id,
            "--",
            "sh",
            "-c",
            "echo $OTHER"
        ]),
        "x\n"
    );
    d.ok(&["rm", &id]);
    d.ok(&["secret", "rm", "api"]);
    let out = d.out(&["run", "--secret", "api", "--", "true"]);
    assert_fails(&out, 1, "error: not_found:");
    d.assert_no_sandboxes();
}

#[test]
fn a_volume_is_shared_between_runs() {
    let d = Daemon::start("volumes");
    d.ok(&[
        "run",
        "-v",
        "data:/data",
        "--",
        "sh",
        "-c",
        "echo hello > /data/f",
    ]);
    assert_eq!(
        d.ok(&["run", "-v", "data:/data:ro", "--", "cat", "/data/f"]),
        "hello\n"
    );
    let out = d.out(&[
        "run",
        "-v",
        "data:/data:ro",
        "--",
        "sh",
        "-c",
        "echo x > /data/g",
    ]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a read-only volume took a write"
    );
    let vols = json(&d.ok(&["volume", "ls", "--json"]));
    assert!(
        vols.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == serde_json::json!("data")),
        "{vols}"
    );
    assert!(d.ok(&["volume", "ls"]).contains("data"));
    d.ok(&["volume", "rm", "data"]);
    assert_eq!(
        json(&d.ok(&["volume", "ls", "--json"])),
        serde_json::json!([])
    );
    d.assert_no_sandboxes();
}

#[test]
fn files_inside_a_sandbox() {
    let d = Daemon::start("fs");
    let id = created(&d, &["--", "sleep", "300"]);
    let data = b"hello bytes\x00\xff\n";
    let mut child = d
        .sbx()
        .args(["fs", "write", &id, "/tmp/dir/x"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    assert!(child.wait().unwrap().success());
    let out = d.out(&["fs", "read", &id, "/tmp/dir/x"]);
    assert_eq!(out.stdout, data);
    assert_eq!(
        d.ok(&["exec", &id, "--", "wc", "-c", "/tmp/dir/x"]),
        format!("{} /tmp/dir/x\n", data.len())
    );

    let st = json(&d.ok(&["fs", "stat", "--json", &id, "/tmp/dir/x"]));
    assert_eq!(st["size"], serde_json::json!(data.len()));
    assert_eq!(st["type"], serde_json::json!("file"));
    let st = d.ok(&["fs", "stat", &id, "/tmp/dir"]);
    assert!(st.contains("type: directory"), "{st}");
    let ls = json(&d.ok(&["fs", "ls", "--json", &id, "/tmp/dir"]));
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["name"], serde_json::json!("x"));
    let ls = d.ok(&["fs", "ls", &id, "/tmp/dir"]);
    assert!(
        ls.starts_with("-rw-r--r--") && ls.trim_end().ends_with(" x"),
        "{ls}"
    );

    assert_fails(
        &d.out(&["fs", "mkdir", &id, "/tmp/a/b"]),
        1,
        "error: not_found:",
    );
    d.ok(&["fs", "mkdir", "-p", &id, "/tmp/a/b"]);
    assert_eq!(
        d.ok(&[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "test -d /tmp/a/b && echo dir"
        ]),
        "dir\n"
    );
    assert_fails(
        &d.out(&["fs", "rm", &id, "/tmp/dir"]),
        1,
        "error: directory_not_empty:",
    );
    d.ok(&["fs", "rm", "-r", &id, "/tmp/dir"]);
    assert_fails(
        &d.out(&["fs", "stat", &id, "/tmp/dir"]),
        1,
        "error: not_found:",
    );
    assert_fails(
        &d.out(&["fs", "read", &id, "/tmp"]),
        1,
        "error: is_a_directory:",
    );
}

#[test]
fn logs_and_inspect() {
    let d = Daemon::start("logs");
    let id = created(
        &d,
        &["--", "sh", "-c", "echo out1; echo err1 >&2; sleep 300"],
    );
    // Without -f, logs prints what is there and returns while the sandbox runs.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = d.out(&["logs", &id]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        if text(&out.stdout) == "out1\n" && text(&out.stderr) == "err1\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "logs never showed the output: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d.ok(&["terminate", "--wait", &id]);
    let out = d.out(&["logs", "-f", &id]);
    assert_eq!(
        (text(&out.stdout), text(&out.stderr)),
        ("out1\n".into(), "err1\n".into())
    );

    // -f follows a running sandbox to its end.
    created(&d, &["--name", "insp", "--tag", "k=v", "-e", "A=1", "--"]);
    let id = created(&d, &["--", "sh", "-c", "echo a; sleep 1; echo b; exit 5"]);
    assert_eq!(d.ok(&["logs", "-f", &id]), "a\nb\n");
    assert_eq!(d.ok(&["wait", &id]), "5\n");

    let info = json(&d.ok(&["inspect", &id]));
    assert_eq!(info["status"], serde_json::json!("finished"));
    assert_eq!(info["returncode"], serde_json::json!(5));
    assert_eq!(info["end_reason"], serde_json::json!("exited"));
    assert_eq!(
        info["config"]["entrypoint"],
        serde_json::json!(["sh", "-c", "echo a; sleep 1; echo b; exit 5"])
    );
    let kinds: Vec<&str> = info["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(
                e["at"].as_f64().unwrap() > 1e9,
                "event without a timestamp: {e}"
            );
            e["kind"].as_str().unwrap()
        })
        .collect();
    assert_eq!(kinds.first(), Some(&"created"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"finished"), "{kinds:?}");

    let named = json(&d.ok(&["inspect", "insp"]));
    assert_eq!(named["config"]["tags"], serde_json::json!({"k": "v"}));
    assert_eq!(named["config"]["env"], serde_json::json!({"A": "1"}));
    assert_eq!(named["status"], serde_json::json!("running"));
}

#[test]
fn wait_ready_follows_the_probe() {
    let d = Daemon::start("ready");
    let id = created(
        &d,
        &[
            "--probe-exec",
            "test -f /tmp/ready",
            "--probe-interval",
            "50",
            "--",
            "sh",
            "-c",
            "sleep 1; touch /tmp/ready; sleep 300",
        ],
    );
    d.ok(&["wait-ready", "--timeout", "30s", &id]);
    assert!(json(&d.ok(&["inspect", &id]))["ready_at"]
        .as_f64()
        .is_some());
    let plain = created(&d, &["--", "sleep", "300"]);
    assert_fails(&d.out(&["wait-ready", &plain]), 1, "error: invalid:");
    let out = d.out(&["create", "--probe-interval", "50", "--", "true"]);
    assert_fails(&out, 2, "--probe-interval 50");
}

#[test]
fn wrong_input_is_refused_and_the_daemon_still_answers() {
    let d = Daemon::start("bad");
    // Usage errors: exit 2, naming the value.
    for (args, value) in [
        (&["run", "--timeout", "5x", "--", "true"][..], "5x"),
        (
            &["exec", "--timeout", "1y", UNKNOWN_ID, "--", "true"][..],
            "1y",
        ),
        (&["run", "-e", "NOEQUALS", "--", "true"][..], "NOEQUALS"),
        (&["run", "-e", "1BAD=x", "--", "true"][..], "1BAD"),
        (&["create", "--name", "bad name"][..], "bad name"),
        (&["create", "--tag", "novalue"][..], "novalue"),
        (&["run", "-v", "data", "--", "true"][..], "data"),
        (
            &["run", "-v", "data:relative", "--", "true"][..],
            "data:relative",
        ),
        (&["exec", "a/b", "--", "true"][..], "a/b"),
        (&["tag", UNKNOWN_ID, "oops"][..], "oops"),
        (&["secret", "create", "s", "K"][..], "K"),
        (
            &[
                "run",
                "--probe-tcp",
                "1",
                "--probe-exec",
                "true",
                "--",
                "true",
            ][..],
            "--probe-exec",
        ),
        (&["frobnicate"][..], "frobnicate"),
    ] {
        let out = d.out(args);
        assert_fails(&out, 2, value);
    }
    // Errors from the daemon: exit 1, `error: <code>: <message>`.
    assert_fails(
        &d.out(&["exec", UNKNOWN_ID, "--", "true"]),
        1,
        "error: not_found:",
    );
    assert_fails(&d.out(&["inspect", "nosuchname"]), 1, "error: not_found:");
    assert_fails(&d.out(&["terminate", "nosuchname"]), 1, "error: not_found:");
    assert_fails(&d.out(&["secret", "rm", "nosuch"]), 1, "error: not_found:");
    let out = d.out(&["run", "--cpu", "0", "--", "true"]);
    assert_fails(&out, 1, "error: invalid:");
    let out = d.out(&["run", "--image", "nope:x", "--", "true"]);
    assert_fails(&out, 1, "nope:x");
    let out = d.out(&["run", "--seccomp", "/nonexistent.json", "--", "true"]);
    assert_fails(&out, 1, "/nonexistent.json");
    let out = d.out(&["run", "--", "no-such-program-xyz"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("no-such-program-xyz"),
        "{}",
        text(&out.stderr)
    );
    // It still serves.
    assert_eq!(d.ok(&["run", "--", "echo", "still-here"]), "still-here\n");
    d.assert_no_sandboxes();
}

#[test]
fn without_a_daemon_and_no_autostart_it_says_so() {
    let root = fresh_dir("nodaemon");
    let sock = root.join("sbxd.sock");
    for by_flag in [true, false] {
        let mut c = Command::new(SBX);
        c.env("SBX_SOCKET", &sock)
            .env("SBX_STATE_DIR", root.join("state"))
            .env("SBX_RUN_DIR", root.join("run"))
            .env_remove("SBX_NO_AUTOSTART");
        if by_flag {
            c.arg("--no-autostart");
        } else {
            c.env("SBX_NO_AUTOSTART", "1");
        }
        let out = c.args(["ls"]).output().unwrap();
        assert_fails(&out, 1, "no sbxd answers on");
        assert_fails(&out, 1, &sock.display().to_string());
        assert!(!sock.exists(), "a daemon was started");
    }
    // `version` never starts one either.
    let out = Command::new(SBX)
        .env("SBX_SOCKET", &sock)
        .env("SBX_STATE_DIR", root.join("state"))
        .arg("version")
        .output()
        .unwrap();
    assert!(
        text(&out.stdout).starts_with("sbx "),
        "{}",
        text(&out.stdout)
    );
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(&root);
}

/// Stops autostarted daemons (by the pids the CLI reported) even when the test fails.
struct PidGuard(Vec<i32>);

impl Drop for PidGuard {
    fn drop(&mut self) {
        for pid in &self.0 {
            stop_pid(*pid);
        }
    }
}

#[test]
fn autostart_starts_one_daemon_and_reuses_it() {
    let root = fresh_dir("autostart");
    let (sock, state) = (root.join("sbxd.sock"), root.join("state"));
    let sbx = || {
        let mut c = Command::new(SBX);
        c.env("SBX_SOCKET", &sock)
            .env("SBX_STATE_DIR", &state)
            .env("SBX_RUN_DIR", root.join("run"))
            .env("SBX_INIT", env!("CARGO_BIN_EXE_sbx-init"))
            .env_remove("SBX_NO_AUTOSTART")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    // Three at once: exactly one starts sbxd, all of them get an answer.
    let children: Vec<Child> = (0..3)
        .map(|_| sbx().args(["run", "--", "echo", "hi"]).spawn().unwrap())
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let pids: Vec<i32> = outs.iter().filter_map(|o| started_pid(&o.stderr)).collect();
    let guard = PidGuard(pids.clone());
    for o in &outs {
        assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
        assert_eq!(text(&o.stdout), "hi\n");
    }
    assert_eq!(pids.len(), 1, "one daemon started: {outs:?}");
    assert!(state.join("sbxd.log").exists(), "no log in the state dir");
    let out = sbx().args(["ls", "--all", "--json"]).output().unwrap();
    assert_eq!(text(&out.stdout).trim(), "[]");
    assert!(
        started_pid(&out.stderr).is_none(),
        "a second daemon was started"
    );
    drop(guard);
    let _ = std::fs::remove_dir_all(&root);
}

/// The pid in `sbx: started sbxd (pid N, …)`.
fn started_pid(stderr: &[u8]) -> Option<i32> {
    let s = text(stderr);
    let rest = s.split("started sbxd (pid ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn help_teaches_every_command() {
    let out = Command::new(SBX).arg("--help").output().unwrap();
    let help = text(&out.stdout);
    for cmd in [
        "daemon",
        "run",
        "create",
        "exec",
        "wait-ready",
        "wait",
        "poll",
        "terminate",
        "logs",
        "ls",
        "inspect",
        "tag",
        "secret",
        "volume",
        "fs",
        "version",
    ] {
        assert!(
            help.contains(&format!("  {cmd} ")),
            "sbx --help lacks {cmd}"
        );
        let out = Command::new(SBX).args([cmd, "--help"]).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        assert!(
            text(&out.stdout).contains("Example"),
            "sbx {cmd} --help has no example"
        );
    }
    let out = Command::new(SBX).args(["run", "--help"]).output().unwrap();
    let help = text(&out.stdout);
    for flag in [
        "--image",
        "--memory",
        "--timeout",
        "--seccomp",
        "--volume",
        "--probe-tcp",
    ] {
        assert!(help.contains(flag), "run --help lacks {flag}");
    }
}
