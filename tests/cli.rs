//! The `sbx` command as a user runs it: output, exit codes, errors, timeouts, signals, and no
//! sandbox left behind. Runs as root; starts real sandboxes.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// `sbx` with its own state and run dirs (per test, so "nothing left" is checkable).
fn sbx(dirs: &str) -> Command {
    let root = test_root().join("cli").join(dirs);
    let mut c = Command::new(env!("CARGO_BIN_EXE_sbx"));
    c.arg("--state-dir")
        .arg(root.join("state"))
        .arg("--run-dir")
        .arg(root.join("run"))
        .env("SBX_INIT", env!("CARGO_BIN_EXE_sbx-init"))
        .stdin(Stdio::null());
    c
}

fn run(c: &mut Command) -> Output {
    c.output().expect("run sbx")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Nothing of any sandbox remains under these dirs.
fn assert_clean(dirs: &str) {
    let root = test_root().join("cli").join(dirs);
    for sub in ["run/sandboxes", "state/sandboxes", "run/uids"] {
        let p: PathBuf = root.join(sub);
        let left: Vec<_> = std::fs::read_dir(&p)
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{} still holds {left:?}", p.display());
    }
}

#[test]
fn run_prints_hello_and_exits_with_the_command_code() {
    let out = run(sbx("hello").args(["run", "--", "python3", "-c", "print('hello')"]));
    assert_eq!(
        text(&out.stdout),
        "hello\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
    let out = run(sbx("hello").args(["run", "--", "sh", "-c", "echo oops >&2; exit 42"]));
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(text(&out.stderr), "oops\n");
    let out = run(sbx("hello").args(["run", "--", "sh", "-c", "kill -9 $$"]));
    assert_eq!(out.status.code(), Some(137));
    assert_clean("hello");
}

#[test]
fn run_with_a_busybox_image_env_workdir_and_stdin() {
    let image = format!("dir:{}", busybox_rootfs().display());
    let mut c = sbx("busybox");
    c.args([
        "run",
        "-i",
        "--image",
        &image,
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "--",
    ])
    .args(["sh", "-c", "echo \"$GREETING\"; pwd; cat"])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped in\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "hi there\n/tmp\npiped in\n");
    assert_eq!(out.status.code(), Some(0));
    assert_clean("busybox");
}

#[test]
fn timeout_kills_with_124_and_leaves_nothing() {
    for _ in 0..3 {
        let t = Instant::now();
        let out = run(sbx("timeout").args(["run", "--timeout", "1", "--", "sleep", "30"]));
        assert_eq!(
            out.status.code(),
            Some(124),
            "stderr: {}",
            text(&out.stderr)
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_clean("timeout");
    }
}

#[test]
fn bad_input_is_an_error_naming_the_value() {
    let out = run(sbx("bad").args(["run", "--image", "nope:x", "--", "true"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("\"nope:x\""),
        "{}",
        text(&out.stderr)
    );
    let out = run(sbx("bad").args(["run", "--timeout", "5x", "--", "true"]));
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    assert!(text(&out.stderr).contains("5x"), "{}", text(&out.stderr));
    let out = run(sbx("bad").args(["run", "--", "no-such-program-xyz"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no-such-program-xyz"),
        "{}",
        text(&out.stderr)
    );
    let out = run(sbx("bad").args(["run", "--cpu", "0", "--", "true"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--cpu 0"),
        "{}",
        text(&out.stderr)
    );
    let out = run(sbx("bad").args(["run", "--seccomp", "/nonexistent.json", "--", "true"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent.json"),
        "{}",
        text(&out.stderr)
    );
    assert_clean("bad");
}

#[test]
fn sigterm_is_forwarded_to_the_command() {
    let mut child = sbx("signal")
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "trap 'echo got-term; exit 3' TERM; echo ready; sleep 30 & wait",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the trap is set, then signal the CLI as a shell or supervisor would.
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    use std::io::Read;
    stdout.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(rest, "got-term\n");
    assert_eq!(status.code(), Some(3));
    assert_clean("signal");
}

#[test]
fn version_and_help() {
    let out = run(sbx("meta").arg("version"));
    assert!(
        text(&out.stdout).starts_with("sbx "),
        "{}",
        text(&out.stdout)
    );
    let out = run(sbx("meta").args(["run", "--help"]));
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for flag in ["--image", "--memory", "--timeout", "--seccomp"] {
        assert!(help.contains(flag), "help lacks {flag}");
    }
}
