//! The examples of Modal's Sandboxes guide (reference/modal-sandboxes-guide.md), each run through
//! the client library (`sbx::client`) against a real sbxd, asserting what the guide says they do:
//! output, streaming as printed, timeouts and idle timeouts, readiness probes, return codes,
//! secrets, volumes, workdir, entrypoint output, reattaching by id and by name, tags, lifecycle
//! events, the filesystem API and retried execs. The last test runs the programs in examples/
//! (one per guide example) against a daemon of its own. Runs as root; every test starts its own
//! sbxd (tests/support/daemon.rs) and asserts it left nothing behind.

#[path = "support/daemon.rs"]
mod daemon;

use daemon::{run, run_ok, TestDaemon};
use futures_util::StreamExt;
use sbx::client::{
    Client, CreateSandbox, CreateSecret, EndReason, Error, ErrorCode, EventKind, ExecRequest,
    FileType, Probe, Sandbox, SandboxStatus, SecretSource, VolumeMount,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Generous upper bound for anything that should take a second or two.
const LONG: Duration = Duration::from_secs(60);

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

async fn create(c: &Client, params: CreateSandbox) -> Sandbox {
    Sandbox::create(c, params.clone())
        .await
        .unwrap_or_else(|e| panic!("create {params:?}: {e}"))
}

/// A sandbox with no entrypoint (it stays up until terminated).
async fn idle_sandbox(c: &Client) -> Sandbox {
    create(c, CreateSandbox::default()).await
}

async fn terminate(sb: &Sandbox) {
    let rc = sb.terminate(true).await.expect("terminate");
    assert!(rc.is_some(), "terminate(wait=true) gave no returncode");
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, Error>, code: ErrorCode, what: &str) {
    match r {
        Err(e) => assert_eq!(e.code(), Some(code), "{what}: wrong error {e:?}"),
        Ok(v) => panic!("{what}: expected {code}, got Ok({v:?})"),
    }
}

/// Guide, first example: `exec("python", "-c", "print('hello')", timeout=3)` prints hello; the
/// same as an entrypoint.
#[tokio::test]
async fn hello_exec_and_entrypoint() {
    let d = TestDaemon::start("hello").await;
    let c = d.client().await;
    let sb = idle_sandbox(&c).await;
    let p = sb
        .exec_with(ExecRequest {
            argv: argv(&["python3", "-c", "print('hello')"]),
            timeout_secs: Some(3),
            ..Default::default()
        })
        .await
        .expect("exec");
    assert_eq!(p.stdout().read_text().await.expect("read"), "hello\n");
    assert_eq!(p.wait().await.expect("wait"), 0);
    terminate(&sb).await;
    sb.detach();

    let sb = create(
        &c,
        CreateSandbox {
            entrypoint: argv(&["python3", "-c", "print('hello')"]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(sb.wait().await.expect("wait"), 0);
    assert_eq!(sb.stdout().read_text().await.expect("read"), "hello\n");
    assert_eq!(sb.stderr().read_text().await.expect("read"), "");
    d.finish().await;
}

/// Guide, first example: lines of a slow loop arrive as they are printed, not at the end.
#[tokio::test]
async fn output_streams_as_printed() {
    let d = TestDaemon::start("streaming").await;
    let c = d.client().await;
    let sb = idle_sandbox(&c).await;
    let p = sb
        .exec_with(ExecRequest {
            argv: argv(&[
                "python3",
                "-c",
                "import time\nfor i in range(10):\n    print(i, flush=True)\n    time.sleep(0.2)",
            ]),
            timeout_secs: Some(30),
            ..Default::default()
        })
        .await
        .expect("exec");
    let mut lines = Vec::new();
    let mut arrivals = Vec::new();
    while let Some(line) = p.stdout().next_line().await.expect("next_line") {
        arrivals.push(Instant::now());
        if lines.is_empty() {
            assert_eq!(
                p.poll().await.expect("poll"),
                None,
                "the first line arrived only after the process ended"
            );
        }
        lines.push(line);
    }
    let want: Vec<String> = (0..10).map(|i| format!("{i}\n")).collect();
    assert_eq!(lines, want);
    let spread = arrivals[9].duration_since(arrivals[0]);
    assert!(
        spread >= Duration::from_secs(1),
        "10 lines printed 0.2 s apart arrived within {spread:?}: output was not streamed"
    );
    assert_eq!(p.wait().await.expect("wait"), 0);
    terminate(&sb).await;
    d.finish().await;
}

/// Guide, Timeouts: the lifetime timeout ends the sandbox with 124 and `wait()` raises
/// SandboxTimeout.
#[tokio::test]
async fn sandbox_timeout_is_124() {
    let d = TestDaemon::start("timeout").await;
    let c = d.client().await;
    let t0 = Instant::now();
    let sb = create(
        &c,
        CreateSandbox {
            timeout_secs: Some(1),
            ..Default::default()
        },
    )
    .await;
    let _long = sb.exec(["sleep", "60"]).await.expect("exec sleep");
    match sb.wait().await {
        Err(Error::SandboxTimeout(_)) => {}
        other => panic!("wait after the timeout: {other:?}"),
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(30),
        "a 1 s timeout fired after {took:?}"
    );
    assert_eq!(sb.wait_returncode().await.expect("wait_returncode"), 124);
    assert_eq!(sb.poll().await.expect("poll"), Some(124));
    let info = sb.info().await.expect("info");
    assert_eq!(info.status, SandboxStatus::Finished);
    assert_eq!(info.end_reason, Some(EndReason::Timeout));
    assert_eq!(info.returncode, Some(124));
    d.finish().await;
}

/// Guide, Idle Timeouts: an idle sandbox ends (idle_timeout); a running exec or stdin writes
/// keep it alive.
#[tokio::test]
async fn idle_timeout_fires_only_when_idle() {
    let d = TestDaemon::start("idle").await;
    let c = d.client().await;

    let idle_alone = async {
        let t0 = Instant::now();
        let sb = create(
            &c,
            CreateSandbox {
                idle_timeout_secs: Some(1),
                timeout_secs: Some(120),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(sb.wait().await.expect("wait"), 0);
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(30),
            "idle timeout of 1 s fired after {took:?}"
        );
        let info = sb.info().await.expect("info");
        assert_eq!(info.end_reason, Some(EndReason::IdleTimeout));
    };

    let busy_exec = async {
        let sb = create(
            &c,
            CreateSandbox {
                idle_timeout_secs: Some(2),
                timeout_secs: Some(120),
                ..Default::default()
            },
        )
        .await;
        let p = sb.exec(["sleep", "4"]).await.expect("exec sleep");
        // Past the idle timeout, but the exec runs: the sandbox stays.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            sb.poll().await.expect("poll"),
            None,
            "the sandbox idled out while an exec ran"
        );
        assert_eq!(p.poll().await.expect("exec poll"), None);
        assert_eq!(p.wait().await.expect("wait exec"), 0);
        assert_eq!(sb.wait_returncode().await.expect("wait"), 0);
        let info = sb.info().await.expect("info");
        assert_eq!(info.end_reason, Some(EndReason::IdleTimeout));
    };

    let busy_stdin = async {
        let sb = create(
            &c,
            CreateSandbox {
                entrypoint: argv(&["cat"]),
                stdin: true,
                idle_timeout_secs: Some(2),
                timeout_secs: Some(120),
                ..Default::default()
            },
        )
        .await;
        let mut sent = String::new();
        for i in 0..8 {
            let line = format!("keepalive {i}\n");
            sb.stdin().write_all(&line).await.expect("write stdin");
            sent.push_str(&line);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(
            sb.poll().await.expect("poll"),
            None,
            "the sandbox idled out while its stdin was written"
        );
        assert_eq!(sb.wait_returncode().await.expect("wait"), 0);
        let info = sb.info().await.expect("info");
        assert_eq!(info.end_reason, Some(EndReason::IdleTimeout));
        assert_eq!(sb.stdout().read_text().await.expect("stdout"), sent);
    };

    tokio::join!(idle_alone, busy_exec, busy_stdin);
    d.finish().await;
}

/// Guide, Idle Timeouts: the idle time counts from the end of the last exec, so the sandbox is
/// still there right after a long exec and ends `idle_timeout` later.
#[tokio::test]
async fn idle_timeout_counts_from_the_end_of_an_exec() {
    let d = TestDaemon::start("idle-after-exec").await;
    let c = d.client().await;
    let sb = create(
        &c,
        CreateSandbox {
            idle_timeout_secs: Some(2),
            timeout_secs: Some(120),
            ..Default::default()
        },
    )
    .await;
    let p = sb.exec(["sleep", "4"]).await.expect("exec sleep");
    assert_eq!(p.wait().await.expect("wait exec"), 0);
    assert_eq!(
        sb.poll().await.expect("poll"),
        None,
        "the sandbox ended as the exec ended, not idle_timeout later"
    );
    assert_eq!(sb.wait_returncode().await.expect("wait"), 0);
    let info = sb.info().await.expect("info");
    assert_eq!(info.end_reason, Some(EndReason::IdleTimeout));
    let exec_end = p
        .info()
        .await
        .expect("exec info")
        .finished_at
        .expect("ended");
    let end = info.finished_at.expect("finished_at");
    assert!(
        end - exec_end >= 1.5,
        "idle timeout of 2 s fired {} s after the exec ended",
        end - exec_end
    );
    d.finish().await;
}

/// Guide, TCP readiness probe: `python3 -m http.server 8080` with `Probe.with_tcp(8080)`.
#[tokio::test]
async fn readiness_tcp_probe() {
    let d = TestDaemon::start("ready-tcp").await;
    let c = d.client().await;
    let sb = create(
        &c,
        CreateSandbox {
            entrypoint: argv(&["python3", "-m", "http.server", "8080"]),
            readiness_probe: Some(Probe::tcp(8080)),
            ..Default::default()
        },
    )
    .await;
    let ready_at = sb.wait_until_ready(LONG).await.expect("wait_until_ready");
    assert!(
        ready_at <= unix_now(),
        "ready_at {ready_at} is in the future"
    );
    // The server is now ready: it answers.
    let out = run_ok(
        &sb,
        &[
            "python3",
            "-c",
            "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/').status)",
        ],
    )
    .await;
    assert_eq!(out, "200\n");
    let info = sb.info().await.expect("info");
    assert_eq!(info.ready_at, Some(ready_at));
    let kinds: Vec<EventKind> = info.events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Created,
            EventKind::Scheduled,
            EventKind::Started,
            EventKind::Ready
        ]
    );
    assert_eq!(sb.terminate(true).await.expect("terminate"), Some(137));
    sb.detach();
    d.finish().await;
}

/// Guide, exec readiness probe: `test -f /tmp/ready` every 250 ms; ready only once an exec
/// created the file; a short wait before that times out without ending the sandbox.
#[tokio::test]
async fn readiness_exec_probe() {
    let d = TestDaemon::start("ready-exec").await;
    let c = d.client().await;
    let sb = create(
        &c,
        CreateSandbox {
            readiness_probe: Some(Probe::exec(["sh", "-c", "test -f /tmp/ready"]).interval_ms(250)),
            ..Default::default()
        },
    )
    .await;
    let t0 = Instant::now();
    match sb.wait_until_ready(Duration::from_millis(1500)).await {
        Err(Error::Timeout(_)) => {}
        other => panic!("wait_until_ready before /tmp/ready exists: {other:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(1400));
    assert_eq!(
        sb.poll().await.expect("poll"),
        None,
        "the probe timeout ended it"
    );
    assert_eq!(sb.info().await.expect("info").ready_at, None);

    let before = unix_now();
    run_ok(&sb, &["sh", "-c", "echo done > /tmp/ready"]).await;
    let ready_at = sb.wait_until_ready(LONG).await.expect("wait_until_ready");
    assert!(
        ready_at >= before - 0.05,
        "ready at {ready_at}, before /tmp/ready was written at {before}"
    );
    // The sandbox is now ready.
    assert_eq!(run_ok(&sb, &["cat", "/tmp/ready"]).await, "done\n");
    let kinds: Vec<EventKind> = sb
        .info()
        .await
        .expect("info")
        .events
        .iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&EventKind::Ready), "events: {kinds:?}");
    terminate(&sb).await;
    sb.detach();
    d.finish().await;
}

/// Guide, readiness rules: no probe → error; finished → error; already ready → at once; not
/// ready in time → TimeoutError (and the sandbox keeps running).
#[tokio::test]
async fn wait_until_ready_rules() {
    let d = TestDaemon::start("ready-rules").await;
    let c = d.client().await;

    let plain = idle_sandbox(&c).await;
    assert_code(
        plain.wait_until_ready(Duration::from_secs(1)).await,
        ErrorCode::Invalid,
        "wait_until_ready without a probe",
    );
    terminate(&plain).await;

    let never = create(
        &c,
        CreateSandbox {
            readiness_probe: Some(Probe::exec(["false"])),
            ..Default::default()
        },
    )
    .await;
    assert_code(
        never.wait_until_ready(Duration::ZERO).await,
        ErrorCode::Invalid,
        "wait_until_ready(0)",
    );
    let t0 = Instant::now();
    assert_code(
        never.wait_until_ready(Duration::from_millis(500)).await,
        ErrorCode::Timeout,
        "wait_until_ready on a probe that never succeeds",
    );
    assert!(t0.elapsed() >= Duration::from_millis(450));
    assert_eq!(never.poll().await.expect("poll"), None);
    terminate(&never).await;
    assert_code(
        never.wait_until_ready(Duration::from_secs(1)).await,
        ErrorCode::Conflict,
        "wait_until_ready on a terminated sandbox",
    );

    // Finishing while someone waits is a conflict too.
    let short = create(
        &c,
        CreateSandbox {
            entrypoint: argv(&["sleep", "1"]),
            readiness_probe: Some(Probe::exec(["false"])),
            ..Default::default()
        },
    )
    .await;
    assert_code(
        short.wait_until_ready(LONG).await,
        ErrorCode::Conflict,
        "wait_until_ready when the sandbox ends first",
    );

    let ready = create(
        &c,
        CreateSandbox {
            readiness_probe: Some(Probe::exec(["true"])),
            ..Default::default()
        },
    )
    .await;
    let at = ready.wait_until_ready(LONG).await.expect("ready");
    let t0 = Instant::now();
    let again = ready
        .wait_until_ready(Duration::from_millis(1))
        .await
        .expect("wait_until_ready once ready");
    assert_eq!(again, at);
    assert!(t0.elapsed() < Duration::from_secs(1));
    terminate(&ready).await;
    d.finish().await;
}

/// Guide, Return Codes: `exit 42` → 42; `terminate(wait=True)` → 137; an entrypoint's code is
/// the sandbox's.
#[tokio::test]
async fn return_codes() {
    let d = TestDaemon::start("returncodes").await;
    let c = d.client().await;
    let sb = idle_sandbox(&c).await;
    let p = sb.exec(["sh", "-c", "exit 42"]).await.expect("exec");
    assert_eq!(p.wait().await.expect("wait"), 42);
    assert_eq!(p.poll().await.expect("poll"), Some(42));
    assert_eq!(sb.poll().await.expect("poll"), None);
    assert_eq!(sb.terminate(true).await.expect("terminate"), Some(137));
    assert_eq!(sb.returncode().await.expect("returncode"), Some(137));
    assert!(matches!(sb.wait().await, Err(Error::SandboxTerminated(_))));
    assert_eq!(sb.wait_returncode().await.expect("wait_returncode"), 137);
    // terminate is idempotent.
    assert_eq!(
        sb.terminate(true).await.expect("terminate again"),
        Some(137)
    );
    assert_eq!(
        sb.info().await.expect("info").end_reason,
        Some(EndReason::Terminated)
    );

    let sb = create(
        &c,
        CreateSandbox {
            entrypoint: argv(&["sh", "-c", "exit 42"]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(sb.wait().await.expect("wait"), 42);
    let info = sb.info().await.expect("info");
    assert_eq!(info.end_reason, Some(EndReason::Exited));
    assert_eq!(info.returncode, Some(42));
    d.finish().await;
}

/// Guide, Environment variables: an inline secret reaches `echo $MY_SECRET`; so does a named
/// one; later secrets win over earlier ones and env wins over secrets.
#[tokio::test]
async fn env_and_secrets() {
    let d = TestDaemon::start("secrets").await;
    let c = d.client().await;
    let info = c
        .create_secret(CreateSecret {
            name: "my-secret".into(),
            env: map(&[("MY_SECRET", "named"), ("OTHER", "other")]),
            overwrite: false,
        })
        .await
        .expect("create secret");
    assert_eq!(info.keys, ["MY_SECRET", "OTHER"]);
    assert_code(
        c.create_secret(CreateSecret {
            name: "my-secret".into(),
            env: map(&[("MY_SECRET", "x")]),
            overwrite: false,
        })
        .await,
        ErrorCode::AlreadyExists,
        "creating a secret twice",
    );
    let listed = c.list_secrets().await.expect("list secrets");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "my-secret");

    let echo = ["bash", "-c", "echo $MY_SECRET"];
    let inline = SecretSource::Inline(map(&[("MY_SECRET", "hello")]));
    let named = SecretSource::Named("my-secret".into());

    let sb = create(
        &c,
        CreateSandbox {
            secrets: vec![inline.clone()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(run_ok(&sb, &echo).await, "hello\n");
    // The stored config does not repeat the value.
    let shown = sb.info().await.expect("info").config.secrets;
    assert_eq!(shown, [SecretSource::Inline(map(&[("MY_SECRET", "***")]))]);
    terminate(&sb).await;

    let sb = create(
        &c,
        CreateSandbox {
            secrets: vec![named.clone()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        run_ok(&sb, &["bash", "-c", "echo $MY_SECRET $OTHER"]).await,
        "named other\n"
    );
    terminate(&sb).await;

    let sb = create(
        &c,
        CreateSandbox {
            secrets: vec![named.clone(), inline.clone()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(run_ok(&sb, &echo).await, "hello\n", "the later secret wins");
    terminate(&sb).await;

    let sb = create(
        &c,
        CreateSandbox {
            secrets: vec![inline, named],
            env: map(&[("MY_SECRET", "from-env")]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        run_ok(&sb, &echo).await,
        "from-env\n",
        "env wins over secrets"
    );
    let p = sb
        .exec_with(ExecRequest {
            argv: argv(&echo),
            env: map(&[("MY_SECRET", "from-exec")]),
            ..Default::default()
        })
        .await
        .expect("exec");
    assert_eq!(p.stdout().read_text().await.expect("read"), "from-exec\n");
    terminate(&sb).await;

    c.delete_secret("my-secret").await.expect("delete secret");
    assert_code(
        c.delete_secret("my-secret").await,
        ErrorCode::NotFound,
        "deleting a deleted secret",
    );
    assert_code(
        Sandbox::create(
            &c,
            CreateSandbox {
                secrets: vec![SecretSource::Named("my-secret".into())],
                ..Default::default()
            },
        )
        .await,
        ErrorCode::NotFound,
        "create with a missing named secret",
    );
    d.finish().await;
}

/// Guide, Configuration: `volumes={"/data": Volume.from_name("data-volume")}` — what one
/// sandbox writes, the next one reads; a read-only mount refuses writes.
#[tokio::test]
async fn volumes_persist_across_sandboxes() {
    let d = TestDaemon::start("volumes").await;
    let c = d.client().await;
    let vol = |read_only| VolumeMount {
        name: "data-volume".into(),
        path: "/data".into(),
        read_only,
    };
    let sb1 = create(
        &c,
        CreateSandbox {
            volumes: vec![vol(false)],
            ..Default::default()
        },
    )
    .await;
    run_ok(&sb1, &["sh", "-c", "echo written by one > /data/note"]).await;
    let vols = c.list_volumes().await.expect("list volumes");
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].name, "data-volume");
    assert_eq!(vols[0].in_use_by, [sb1.id().to_string()]);
    assert_code(
        c.delete_volume("data-volume").await,
        ErrorCode::Conflict,
        "deleting a mounted volume",
    );
    terminate(&sb1).await;

    let sb2 = create(
        &c,
        CreateSandbox {
            volumes: vec![vol(false)],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        run_ok(&sb2, &["cat", "/data/note"]).await,
        "written by one\n"
    );
    assert_eq!(
        sb2.filesystem()
            .read_text("/data/note")
            .await
            .expect("fs read"),
        "written by one\n"
    );
    terminate(&sb2).await;

    let ro = create(
        &c,
        CreateSandbox {
            volumes: vec![vol(true)],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        run_ok(&ro, &["cat", "/data/note"]).await,
        "written by one\n"
    );
    let (rc, _, err) = run(&ro, &["sh", "-c", "echo more > /data/other"]).await;
    assert_ne!(rc, 0, "a write to a read-only volume succeeded");
    assert!(err.contains("Read-only file system"), "stderr: {err:?}");
    assert_code(
        ro.filesystem().write_text("/data/other", "more").await,
        ErrorCode::PermissionDenied,
        "filesystem write to a read-only volume",
    );
    terminate(&ro).await;

    c.delete_volume("data-volume").await.expect("delete volume");
    assert!(c.list_volumes().await.expect("list").is_empty());
    d.finish().await;
}

/// Guide, Configuration (`workdir="/repo"`): the entrypoint and execs start there; an exec can
/// pick its own; a relative workdir is refused.
#[tokio::test]
async fn workdir() {
    let d = TestDaemon::start("workdir").await;
    let c = d.client().await;
    let sb = create(
        &c,
        CreateSandbox {
            volumes: vec![VolumeMount {
                name: "my-volume".into(),
                path: "/repo".into(),
                read_only: false,
            }],
            workdir: Some("/repo".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(run_ok(&sb, &["pwd"]).await, "/repo\n");
    let p = sb
        .exec_with(ExecRequest {
            argv: argv(&["pwd"]),
            workdir: Some("/usr".into()),
            ..Default::default()
        })
        .await
        .expect("exec");
    assert_eq!(p.stdout().read_text().await.expect("read"), "/usr\n");
    assert_code(
        sb.exec_with(ExecRequest {
            argv: argv(&["pwd"]),
            workdir: Some("usr".into()),
            ..Default::default()
        })
        .await,
        ErrorCode::Invalid,
        "exec with a relative workdir",
    );
    terminate(&sb).await;

    let sb = create(
        &c,
        CreateSandbox {
            entrypoint: argv(&["pwd"]),
            workdir: Some("/tmp".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(sb.wait().await.expect("wait"), 0);
    assert_eq!(sb.stdout().read_text().await.expect("read"), "/tmp\n");

    assert_code(
        Sandbox::create(
            &c,
            CreateSandbox {
                workdir: Some("repo".into()),
                ..Default::default()
            },
        )
        .await,
        ErrorCode::Invalid,
        "create with a relative workdir",
    );
    d.finish().await;
}

/// Guide, Configuration (JavaScript tab): `workdir: "/repo"` on an image without /repo works in
/// Modal, as with runc and Docker, which create a missing working directory.
#[tokio::test]
async fn missing_workdir_is_created() {
    let d = TestDaemon::start("workdir-missing").await;
    let c = d.client().await;
    let sb = create(
        &c,
        CreateSandbox {
            workdir: Some("/repo".into()),
            ..Default::default()
        },
    )
    .await;
    let r = sb.exec(["pwd"]).await;
    terminate(&sb).await;
    let p = r.expect("exec in a sandbox whose workdir was missing from the image");
    assert_eq!(p.stdout().read_text().await.expect("read"), "/repo\n");
    d.finish().await;
}

/// Guide, Running a Sandbox with an entrypoint: `python -m http.server 8080` with timeout;
/// `for line in sb.stdout` streams its output, which stays readable after the end.
#[tokio::test]
async fn entrypoint_output() {
    let d = TestDaemon::start("entrypoint").await;
    let c = d.client().await;
    let sb = create(
        &c,
        CreateSandbox {
            entrypoint: argv(&["python3", "-m", "http.server", "8080"]),
            env: map(&[("PYTHONUNBUFFERED", "1")]),
            timeout_secs: Some(5),
            readiness_probe: Some(Probe::tcp(8080)),
            ..Default::default()
        },
    )
    .await;
    sb.wait_until_ready(LONG).await.expect("ready");
    run_ok(
        &sb,
        &[
            "python3",
            "-c",
            "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/')",
        ],
    )
    .await;
    let reader = sb.stdout();
    let mut text = String::new();
    while let Some(line) = reader.next_line().await.expect("next_line") {
        text.push_str(&line);
    }
    assert!(
        text.starts_with("Serving HTTP on 0.0.0.0 port 8080"),
        "entrypoint stdout: {text:?}"
    );
    assert!(matches!(sb.wait().await, Err(Error::SandboxTimeout(_))));
    // Readable after the end, from any reader and any client.
    assert_eq!(sb.stdout().read_text().await.expect("reread"), text);
    let other = d.client().await;
    let again = Sandbox::from_id(&other, sb.id()).await.expect("from_id");
    assert_eq!(again.stdout().read_text().await.expect("read"), text);
    let err = again.stderr().read_text().await.expect("stderr");
    assert!(err.contains("\"GET / HTTP/1.1\" 200"), "stderr: {err:?}");
    sb.detach();
    d.finish().await;
}

/// Guide, Referencing Sandboxes from other code: detach, then `from_id` gives a working handle;
/// the detached handle refuses work (ClientClosed) but can still wait.
#[tokio::test]
async fn from_id_after_detach() {
    let d = TestDaemon::start("from-id").await;
    let c = d.client().await;
    let sb = idle_sandbox(&c).await;
    let sb_id = sb.id().to_string();
    sb.detach();
    sb.detach(); // idempotent
    assert!(matches!(
        sb.exec(["echo", "hello"]).await,
        Err(Error::ClientClosed(_))
    ));
    assert!(matches!(
        sb.filesystem().read_text("/etc/hostname").await,
        Err(Error::ClientClosed(_))
    ));
    assert!(matches!(
        sb.set_tags(BTreeMap::new()).await,
        Err(Error::ClientClosed(_))
    ));
    assert!(matches!(
        sb.terminate(false).await,
        Err(Error::ClientClosed(_))
    ));
    assert_eq!(sb.poll().await.expect("poll when detached"), None);

    let sb2 = Sandbox::from_id(&c, &sb_id).await.expect("from_id");
    assert_eq!(sb2.id(), sb_id);
    let p = sb2.exec(["echo", "hello"]).await.expect("exec");
    assert_eq!(p.stdout().read_text().await.expect("read"), "hello\n");
    // The detached handle still waits; the live one terminates.
    let (waited, _) = tokio::join!(sb.wait(), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sb2.terminate(false).await.expect("terminate")
    });
    assert!(
        matches!(waited, Err(Error::SandboxTerminated(_))),
        "{waited:?}"
    );
    assert_eq!(sb.returncode().await.expect("returncode"), Some(137));
    sb2.detach();

    assert_code(
        Sandbox::from_id(&c, "sb-0000000000000000000000").await,
        ErrorCode::NotFound,
        "from_id of an unknown id",
    );
    assert_code(
        Sandbox::from_id(&c, "not-an-id").await,
        ErrorCode::NotFound,
        "from_id of a malformed id",
    );
    d.finish().await;
}

/// Guide, Named Sandboxes: a second running sandbox with the name is AlreadyExists; from_name
/// finds the running one; the name is free again once it stopped.
#[tokio::test]
async fn named_sandboxes() {
    let d = TestDaemon::start("names").await;
    let c = d.client().await;
    let named = |app: &str, name: &str| CreateSandbox {
        app: Some(app.into()),
        name: Some(name.into()),
        ..Default::default()
    };
    let sb1 = create(&c, named("my-app", "my-name")).await;
    assert_code(
        Sandbox::create(&c, named("my-app", "my-name")).await,
        ErrorCode::AlreadyExists,
        "a second sandbox with the same name",
    );
    let elsewhere = create(&c, named("other-app", "my-name")).await;
    let sb2 = Sandbox::from_name(&c, "my-app", "my-name", false)
        .await
        .expect("from_name");
    assert_eq!(sb1.id(), sb2.id());
    let info = sb2.info().await.expect("info");
    assert_eq!(info.app, "my-app");
    assert_eq!(info.name.as_deref(), Some("my-name"));

    terminate(&sb1).await;
    assert_code(
        Sandbox::from_name(&c, "my-app", "my-name", false).await,
        ErrorCode::NotFound,
        "from_name after the sandbox stopped",
    );
    let old = Sandbox::from_name(&c, "my-app", "my-name", true)
        .await
        .expect("from_name include_terminated");
    assert_eq!(old.id(), sb1.id());
    let sb3 = create(&c, named("my-app", "my-name")).await;
    assert_ne!(sb3.id(), sb1.id());
    assert_eq!(
        Sandbox::from_name(&c, "my-app", "my-name", true)
            .await
            .expect("from_name")
            .id(),
        sb3.id(),
        "the running sandbox comes before a finished one"
    );
    for bad in ["bad/name", "with space", &"x".repeat(64)] {
        assert_code(
            Sandbox::create(&c, named("my-app", bad)).await,
            ErrorCode::Invalid,
            &format!("create with name {bad:?}"),
        );
    }
    terminate(&sb3).await;
    terminate(&elsewhere).await;
    sb1.detach();
    sb2.detach();
    d.finish().await;
}

/// Guide, Tagging: set_tags, then list filters by a subset of tags, newest first, running only
/// unless all.
#[tokio::test]
async fn tags_and_list() {
    let d = TestDaemon::start("tags").await;
    let c = d.client().await;
    let sleeper = |secs: &str| CreateSandbox {
        app: Some("tag-app".into()),
        entrypoint: argv(&["sleep", secs]),
        ..Default::default()
    };
    let v1_1 = create(&c, sleeper("10")).await;
    let v1_2 = create(&c, sleeper("20")).await;
    let other = create(&c, CreateSandbox::default()).await;
    v1_1.set_tags(map(&[("major_version", "1"), ("minor_version", "1")]))
        .await
        .expect("set_tags");
    v1_2.set_tags(map(&[("major_version", "1"), ("minor_version", "2")]))
        .await
        .expect("set_tags");
    assert_eq!(
        v1_1.get_tags().await.expect("get_tags"),
        map(&[("major_version", "1"), ("minor_version", "1")])
    );
    let ids = |list: Vec<sbx::client::SandboxSummary>| -> Vec<String> {
        list.into_iter().map(|s| s.id).collect()
    };
    let both = [v1_2.id().to_string(), v1_1.id().to_string()];
    let all_of_app = Sandbox::list(&c, Some("tag-app"), &BTreeMap::new(), false)
        .await
        .expect("list");
    assert_eq!(ids(all_of_app), both, "all sandboxes, newest first");
    let major = Sandbox::list(&c, Some("tag-app"), &map(&[("major_version", "1")]), false)
        .await
        .expect("list");
    assert_eq!(ids(major), both, "also all sandboxes");
    let latest = Sandbox::list(
        &c,
        Some("tag-app"),
        &map(&[("major_version", "1"), ("minor_version", "2")]),
        false,
    )
    .await
    .expect("list");
    assert_eq!(ids(latest), [v1_2.id().to_string()], "just the latest");
    let everywhere = Sandbox::list(&c, None, &BTreeMap::new(), false)
        .await
        .expect("list");
    assert_eq!(everywhere.len(), 3, "every app: {everywhere:?}");

    // set_tags replaces them all.
    v1_1.set_tags(map(&[("stage", "old")]))
        .await
        .expect("set_tags");
    assert_eq!(
        v1_1.get_tags().await.expect("get"),
        map(&[("stage", "old")])
    );
    let major = Sandbox::list(&c, Some("tag-app"), &map(&[("major_version", "1")]), false)
        .await
        .expect("list");
    assert_eq!(ids(major), [v1_2.id().to_string()]);

    // Finished sandboxes are listed only with `all`.
    terminate(&v1_1).await;
    let running = Sandbox::list(&c, Some("tag-app"), &BTreeMap::new(), false)
        .await
        .expect("list");
    assert_eq!(ids(running), [v1_2.id().to_string()]);
    let all = Sandbox::list(&c, Some("tag-app"), &BTreeMap::new(), true)
        .await
        .expect("list all");
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].id, v1_1.id());
    assert_eq!(all[1].status, SandboxStatus::Finished);
    assert_eq!(all[1].returncode, Some(137));
    terminate(&v1_2).await;
    terminate(&other).await;
    d.finish().await;
}

/// Guide, Lifecycle events: Created, Scheduled, Started, (Ready), Finished, in order, with
/// non-decreasing times; streamed with follow until Finished.
#[tokio::test]
async fn lifecycle_events() {
    let d = TestDaemon::start("events").await;
    let c = d.client().await;
    let created_before = unix_now();
    let sb = create(
        &c,
        CreateSandbox {
            entrypoint: argv(&["sleep", "3"]),
            readiness_probe: Some(Probe::exec(["true"])),
            ..Default::default()
        },
    )
    .await;
    let streamed: Vec<_> = sb
        .events(true)
        .await
        .expect("events")
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|e| e.expect("event"))
        .collect();
    let kinds: Vec<EventKind> = streamed.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Created,
            EventKind::Scheduled,
            EventKind::Started,
            EventKind::Ready,
            EventKind::Finished
        ]
    );
    let seqs: Vec<u64> = streamed.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    assert!(streamed[0].at >= created_before - 0.05);
    for w in streamed.windows(2) {
        assert!(w[0].at <= w[1].at, "events out of time order: {streamed:?}");
    }
    let fin = &streamed[4];
    assert_eq!(fin.reason, Some(EndReason::Exited));
    assert_eq!(fin.returncode, Some(0));
    let info = sb.info().await.expect("info");
    assert_eq!(info.events, streamed);
    assert_eq!(info.ready_at, Some(streamed[3].at));

    // Without a probe there is no Ready; terminate shows as the reason.
    let sb = idle_sandbox(&c).await;
    run_ok(&sb, &["true"]).await;
    terminate(&sb).await;
    let evs: Vec<_> = sb
        .events(false)
        .await
        .expect("events")
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|e| e.expect("event"))
        .collect();
    let kinds: Vec<EventKind> = evs.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Created,
            EventKind::Scheduled,
            EventKind::Started,
            EventKind::Finished
        ]
    );
    assert_eq!(evs[3].reason, Some(EndReason::Terminated));
    assert_eq!(evs[3].returncode, Some(137));
    for w in evs.windows(2) {
        assert!(w[0].at <= w[1].at, "events out of time order: {evs:?}");
    }
    d.finish().await;
}

/// `sandbox.filesystem`: write/read/list/stat/mkdir/remove with typed errors; files are shared
/// with the processes inside.
#[tokio::test]
async fn filesystem_calls() {
    let d = TestDaemon::start("filesystem").await;
    let c = d.client().await;
    let sb = idle_sandbox(&c).await;
    let fs = sb.filesystem();

    fs.write_text("/tmp/work/notes.txt", "hello from the host\n")
        .await
        .expect("write (creating parents)");
    assert_eq!(
        fs.read_text("/tmp/work/notes.txt").await.expect("read"),
        "hello from the host\n"
    );
    assert_eq!(
        run_ok(&sb, &["cat", "/tmp/work/notes.txt"]).await,
        "hello from the host\n"
    );
    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    fs.write_bytes("/tmp/work/blob.bin", binary.clone())
        .await
        .expect("write bytes");
    assert_eq!(
        fs.read_bytes("/tmp/work/blob.bin").await.expect("read"),
        binary
    );
    run_ok(
        &sb,
        &["sh", "-c", "echo from inside > /tmp/work/inside.txt"],
    )
    .await;
    assert_eq!(
        fs.read_text("/tmp/work/inside.txt").await.expect("read"),
        "from inside\n"
    );

    let mut names: Vec<String> = fs
        .list_files("/tmp/work")
        .await
        .expect("list")
        .into_iter()
        .map(|f| f.name)
        .collect();
    names.sort();
    assert_eq!(names, ["blob.bin", "inside.txt", "notes.txt"]);

    let st = fs.stat("/tmp/work/blob.bin").await.expect("stat");
    assert_eq!(st.file_type, FileType::File);
    assert_eq!(st.size, 300_000);
    assert_eq!(st.mode & 0o777, 0o644);
    assert_eq!(st.permissions, "rw-r--r--");
    assert_eq!(st.path, "/tmp/work/blob.bin");
    assert_eq!(st.name, "blob.bin");
    assert_eq!(
        fs.stat("/tmp/work").await.expect("stat dir").file_type,
        FileType::Directory
    );

    fs.make_directory("/tmp/a/b/c", true)
        .await
        .expect("mkdir -p");
    fs.make_directory("/tmp/a/b/c", true)
        .await
        .expect("mkdir -p of an existing directory");
    assert_eq!(
        run_ok(&sb, &["sh", "-c", "test -d /tmp/a/b/c && echo yes"]).await,
        "yes\n"
    );
    assert_code(
        fs.make_directory("/tmp/x/y", false).await,
        ErrorCode::NotFound,
        "mkdir without parents under a missing one",
    );

    assert_code(
        fs.remove("/tmp/work", false).await,
        ErrorCode::DirectoryNotEmpty,
        "non-recursive remove of a non-empty directory",
    );
    assert_code(
        fs.read_bytes("/tmp/work").await,
        ErrorCode::IsADirectory,
        "reading a directory",
    );
    assert_code(
        fs.read_bytes("/tmp/work/notes.txt/x").await,
        ErrorCode::NotADirectory,
        "a path through a file",
    );
    assert_code(
        fs.read_bytes("/tmp/missing").await,
        ErrorCode::NotFound,
        "reading a missing file",
    );
    assert_code(
        fs.stat("/tmp/missing").await,
        ErrorCode::NotFound,
        "stat of a missing file",
    );
    assert_code(
        fs.read_text("tmp/relative").await,
        ErrorCode::Invalid,
        "a relative path",
    );
    assert_code(
        fs.write_text("/usr/sbx-guide-test", "x").await,
        ErrorCode::PermissionDenied,
        "writing into the read-only host image",
    );
    assert!(
        !Path::new("/usr/sbx-guide-test").exists(),
        "the write reached the host"
    );

    fs.remove("/tmp/work/notes.txt", false)
        .await
        .expect("remove a file");
    assert_code(
        fs.stat("/tmp/work/notes.txt").await,
        ErrorCode::NotFound,
        "stat after remove",
    );
    fs.remove("/tmp/work", true).await.expect("remove -r");
    assert_code(
        fs.list_files("/tmp/work").await,
        ErrorCode::NotFound,
        "list after remove -r",
    );
    terminate(&sb).await;
    assert_code(
        fs.read_text("/etc/hostname").await,
        ErrorCode::Conflict,
        "the filesystem of a finished sandbox",
    );
    d.finish().await;
}

/// Guide, Lifecycle: "Once finished, no further commands can be executed inside the Sandbox".
#[tokio::test]
async fn exec_on_finished_sandbox_is_conflict() {
    let d = TestDaemon::start("exec-finished").await;
    let c = d.client().await;
    let sb = create(
        &c,
        CreateSandbox {
            entrypoint: argv(&["true"]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(sb.wait().await.expect("wait"), 0);
    assert_code(
        sb.exec(["echo", "hi"]).await,
        ErrorCode::Conflict,
        "exec after the entrypoint exited",
    );
    let sb = idle_sandbox(&c).await;
    terminate(&sb).await;
    assert_code(
        sb.exec(["echo", "hi"]).await,
        ErrorCode::Conflict,
        "exec after terminate",
    );
    d.finish().await;
}

/// A client-chosen exec id makes exec safe to retry: the process runs once.
#[tokio::test]
async fn exec_id_retry_runs_once() {
    let d = TestDaemon::start("exec-once").await;
    let c = d.client().await;
    let sb = idle_sandbox(&c).await;
    let req = ExecRequest {
        exec_id: Some("append-once".into()),
        argv: argv(&["sh", "-c", "echo ran >> /tmp/runs; echo out"]),
        ..Default::default()
    };
    // Three concurrent "retries", then one after it finished.
    let (a, b, c2) = tokio::join!(
        sb.exec_with(req.clone()),
        sb.exec_with(req.clone()),
        sb.exec_with(req.clone())
    );
    for p in [a, b, c2] {
        let p = p.expect("exec");
        assert_eq!(p.id(), "append-once");
        assert_eq!(p.wait().await.expect("wait"), 0);
    }
    let p = sb.exec_with(req.clone()).await.expect("exec retried late");
    assert_eq!(p.wait().await.expect("wait"), 0);
    assert_eq!(p.stdout().read_text().await.expect("read"), "out\n");
    assert_eq!(run_ok(&sb, &["cat", "/tmp/runs"]).await, "ran\n");
    assert_code(
        sb.exec_with(ExecRequest {
            exec_id: Some("not a valid id".into()),
            argv: argv(&["true"]),
            ..Default::default()
        })
        .await,
        ErrorCode::Invalid,
        "an exec id with spaces",
    );
    terminate(&sb).await;
    d.finish().await;
}

/// The examples/ programs (one per guide example) and a fragment of what each prints.
const EXAMPLES: &[(&str, &[&str])] = &[
    ("hello", &["hello\n"]),
    ("timeouts", &["sandbox sb-"]),
    ("idle_timeout", &["returncode 0", "idle_timeout"]),
    ("readiness_tcp", &["ready at"]),
    ("readiness_exec", &["ready at", "cat /tmp/ready exited 0"]),
    ("readiness_timeout", &["Sandbox failed to become ready"]),
    ("returncodes", &["42\n137\n"]),
    ("volumes", &["hello from the first sandbox"]),
    ("env_and_secrets", &["hello\n"]),
    ("workdir", &["/repo\n"]),
    ("entrypoint", &["Serving HTTP on 0.0.0.0 port 8080"]),
    ("from_id", &["hello\n"]),
    ("named", &["AlreadyExistsError", "same sandbox: true"]),
    ("tags", &["sb-"]),
    (
        "events",
        &["created", "scheduled", "started", "ready", "finished"],
    ),
    ("filesystem", &["hello from the filesystem API"]),
    ("detach", &["detached sb-"]),
];

/// target/<profile>/examples, next to the binaries this test was built with.
fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_sbxd"))
        .parent()
        .expect("the binaries have a directory")
        .join("examples")
}

/// Builds the examples (same profile as this test) unless every binary is newer than its
/// source. `cargo test` without target filters builds them already; `cargo test --test guide`
/// does not, so this fills in.
fn ensure_examples_built() -> PathBuf {
    let dir = examples_dir();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = EXAMPLES.iter().any(|(name, _)| {
        let bin = mtime(&dir.join(name));
        bin.is_none() || bin < mtime(&src.join(format!("{name}.rs")))
    });
    if stale {
        let release = dir
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.arg("build")
            .arg("--examples")
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build --examples");
        assert!(
            out.status.success(),
            "cargo build --examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// Every example program runs against a real sbxd, exits 0, prints what its guide example
/// prints, and leaves no sandbox running.
#[tokio::test]
async fn examples_run() {
    let dir = tokio::task::spawn_blocking(ensure_examples_built)
        .await
        .expect("build examples");
    let d = TestDaemon::start("examples").await;
    let socket = d.socket();
    let runs: Vec<_> = EXAMPLES
        .iter()
        .map(|(name, want)| {
            let bin = dir.join(name);
            let socket = socket.clone();
            let name = *name;
            tokio::task::spawn_blocking(move || {
                let t0 = Instant::now();
                let out = std::process::Command::new(&bin)
                    .env("SBX_SOCKET", &socket)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
                (name, *want, out, t0.elapsed())
            })
        })
        .collect();
    let mut failures = Vec::new();
    for r in runs {
        let (name, want, out, took) = r.await.expect("example thread");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let missing: Vec<&&str> = want.iter().filter(|w| !stdout.contains(**w)).collect();
        if !out.status.success() || !missing.is_empty() {
            failures.push(format!(
                "example {name} ({took:?}): {}; missing {missing:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
                out.status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    d.finish().await;
}
