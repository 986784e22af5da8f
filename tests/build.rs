//! Image builds through a real sbxd (`POST /v1/images/build`, read as NDJSON): a build on the
//! host image with RUN, ENV, WORKDIR, COPY, USER and CMD whose result a sandbox sees; a rebuild
//! taken whole from the cache (same image id); a changed step re-running only from there; a
//! failing RUN reporting its code and leaving no sandbox behind; a client that goes away in the
//! middle of a RUN; a build on an imported busybox OCI image; ARG substitution with build args;
//! and requests refused before the stream starts. Runs as root.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/registry.rs"]
mod registry;

use bytes::Bytes;
use daemon::{run, run_ok, TestDaemon};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use registry::{busybox, write_layout_with, Tar, TempDir};
use sbx::api::images::{BuildEvent, ImageInfo};
use sbx::client::{Client, CreateSandbox, Sandbox};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// POST a build and read its whole stream: (HTTP status, events; or the error body).
async fn build(d: &TestDaemon, req: &Value) -> (u16, Vec<BuildEvent>, String) {
    let body = serde_json::to_vec(req).expect("encode the build request");
    let (status, bytes) = d.raw("POST", "/v1/images/build", &body).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if status != 200 {
        return (status, Vec::new(), text);
    }
    let events = text
        .lines()
        .map(|l| {
            serde_json::from_str::<BuildEvent>(l)
                .unwrap_or_else(|e| panic!("a build event line {l:?}: {e}"))
        })
        .collect();
    (status, events, text)
}

/// A build that must succeed: its events and the image of its `done` line.
async fn build_ok(d: &TestDaemon, req: &Value) -> (Vec<BuildEvent>, ImageInfo) {
    let (status, events, text) = build(d, req).await;
    assert_eq!(status, 200, "build refused: {text}");
    match events.last() {
        Some(BuildEvent::Done { image }) => {
            let image = image.clone();
            (events, image)
        }
        other => panic!("the build did not end with done: {other:?}\n{text}"),
    }
}

/// `(index, cached)` of every `step` event.
fn steps(events: &[BuildEvent]) -> Vec<(usize, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Step { index, cached, .. } => Some((*index, *cached)),
            _ => None,
        })
        .collect()
}

/// Everything a stream (`stdout` or `stderr`) of the RUN steps printed.
fn output(events: &[BuildEvent], stream: &str) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Output { stream: s, data } if s == stream => Some(data.as_str()),
            _ => None,
        })
        .collect()
}

fn sh(script: &str) -> Value {
    json!({"run": {"argv": ["/bin/sh", "-c", script]}})
}

async fn create(c: &Client, image: &str) -> Sandbox {
    Sandbox::create(
        c,
        CreateSandbox {
            image: Some(image.to_string()),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("create a sandbox of {image}: {e}"))
}

async fn terminate(sb: Sandbox) {
    sb.terminate(true).await.expect("terminate");
    sb.detach();
}

/// Entries of the daemon's per-sandbox directories (run and state).
fn sandbox_dirs(d: &TestDaemon) -> Vec<String> {
    let mut v = Vec::new();
    for dir in ["run/sandboxes", "state/sandboxes"] {
        if let Ok(rd) = std::fs::read_dir(d.root().join(dir)) {
            v.extend(
                rd.flatten()
                    .map(|e| format!("{dir}/{}", e.file_name().to_string_lossy())),
            );
        }
    }
    v
}

/// Waits (up to 15 s) until no per-sandbox directory is left.
async fn assert_no_sandbox_left(d: &TestDaemon, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = sandbox_dirs(d);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: sandbox directories left: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The host-image recipe of the first test; `greeting` is its 2nd step's value.
fn host_recipe(context: &Path, greeting: &str) -> Value {
    json!({
        "base": "host",
        "context": context.to_str().unwrap(),
        "tag": "buildtest:dev",
        "steps": [
            sh("mkdir -p /home/app /home/data && echo one > /home/app/a && echo two > /home/app/b \
                && rm /home/app/b && chown 1000:1000 /home/data && echo run-out && echo run-err >&2"),
            {"env": {"vars": {"GREETING": greeting, "PLAIN": "p"}}},
            {"workdir": {"path": "/home/app"}},
            {"copy": {"sources": ["hello.txt", "tree"], "dest": "/opt/ctx/"}},
            {"user": {"user": "1000"}},
            sh("touch /home/data/mine && id -u > /home/data/uid && pwd > /home/data/pwd \
                && echo \"$GREETING\" > /home/data/greeting"),
            {"cmd": {"argv": ["/bin/sh", "-c", "echo from cmd"]}},
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_build_is_seen_by_sandboxes_and_cached() {
    let d = TestDaemon::start("host-build").await;
    let ctx = TempDir::new("host-ctx");
    std::fs::write(ctx.0.join("hello.txt"), "hello from the context\n").unwrap();
    std::fs::create_dir_all(ctx.0.join("tree/sub")).unwrap();
    std::fs::write(ctx.0.join("tree/sub/x"), "x in the tree\n").unwrap();

    let recipe = host_recipe(&ctx.0, "hi there");
    let (events, image) = build_ok(&d, &recipe).await;
    assert_eq!(
        steps(&events),
        (0..7).map(|i| (i, false)).collect::<Vec<_>>(),
        "{events:?}"
    );
    assert!(output(&events, "stdout").contains("run-out"), "{events:?}");
    assert!(output(&events, "stderr").contains("run-err"), "{events:?}");
    let done: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::StepDone { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(done, (0..7).collect::<Vec<_>>());
    assert!(image.id.starts_with("im-"), "{image:?}");
    assert!(image.host_base, "{image:?}");
    assert_eq!(image.config.user.as_deref(), Some("1000"));
    assert_eq!(image.config.working_dir.as_deref(), Some("/home/app"));
    assert_eq!(
        image.config.cmd,
        Some(vec!["/bin/sh".into(), "-c".into(), "echo from cmd".into()])
    );
    assert!(
        image.config.env.contains(&"GREETING=hi there".to_string()),
        "{image:?}"
    );
    assert!(
        image.references.iter().any(|r| r.contains("buildtest:dev")),
        "{image:?}"
    );
    assert_no_sandbox_left(&d, "after the build").await;

    // A sandbox of the result sees every step.
    let c = d.client().await;
    let sb = create(&c, &image.id).await;
    assert_eq!(run_ok(&sb, &["cat", "/home/app/a"]).await, "one\n");
    let (rc, _, _) = run(&sb, &["test", "-e", "/home/app/b"]).await;
    assert_eq!(rc, 1, "/home/app/b was removed by the RUN step");
    assert_eq!(
        run_ok(&sb, &["cat", "/opt/ctx/hello.txt"]).await,
        "hello from the context\n"
    );
    // A directory source: its contents go into dest (as Docker).
    assert_eq!(
        run_ok(&sb, &["cat", "/opt/ctx/sub/x"]).await,
        "x in the tree\n"
    );
    assert_eq!(
        run_ok(&sb, &["stat", "-c", "%u:%g", "/opt/ctx/hello.txt"]).await,
        "0:0\n"
    );
    // The second RUN ran as uid 1000 in the WORKDIR with the ENV.
    assert_eq!(
        run_ok(&sb, &["stat", "-c", "%u", "/home/data/mine"]).await,
        "1000\n"
    );
    assert_eq!(run_ok(&sb, &["cat", "/home/data/uid"]).await, "1000\n");
    assert_eq!(run_ok(&sb, &["cat", "/home/data/pwd"]).await, "/home/app\n");
    assert_eq!(
        run_ok(&sb, &["cat", "/home/data/greeting"]).await,
        "hi there\n"
    );
    let env = run_ok(&sb, &["env"]).await;
    assert!(env.lines().any(|l| l == "GREETING=hi there"), "{env}");
    assert_eq!(run_ok(&sb, &["pwd"]).await, "/home/app\n");
    terminate(sb).await;

    // The same recipe again: every step from the cache, the same image.
    let t0 = Instant::now();
    let (again, image2) = build_ok(&d, &recipe).await;
    eprintln!("cached rebuild took {:?}", t0.elapsed());
    assert_eq!(
        steps(&again),
        (0..7).map(|i| (i, true)).collect::<Vec<_>>(),
        "{again:?}"
    );
    assert!(
        output(&again, "stdout").is_empty(),
        "nothing ran: {again:?}"
    );
    assert_eq!(image2.id, image.id);

    // The 2nd step changed: the 1st is reused, everything from the 2nd on runs again.
    let changed = host_recipe(&ctx.0, "changed");
    let (third, image3) = build_ok(&d, &changed).await;
    let mut want = vec![(0, true)];
    want.extend((1..7).map(|i| (i, false)));
    assert_eq!(steps(&third), want, "{third:?}");
    assert_ne!(image3.id, image.id);
    let first_layer = |i: &ImageInfo| i.layers.first().map(|l| l.digest.clone());
    assert_eq!(first_layer(&image3), first_layer(&image));
    // The tag follows the latest build.
    assert!(
        image3
            .references
            .iter()
            .any(|r| r.contains("buildtest:dev")),
        "{image3:?}"
    );
    let sb = create(&c, &image3.id).await;
    assert_eq!(
        run_ok(&sb, &["cat", "/home/data/greeting"]).await,
        "changed\n"
    );
    terminate(sb).await;

    // no_cache runs everything again.
    let mut forced = changed.clone();
    forced["no_cache"] = json!(true);
    let (fourth, _) = build_ok(&d, &forced).await;
    assert!(
        steps(&fourth).iter().all(|(_, cached)| !cached),
        "{fourth:?}"
    );
    drop(c);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_run_reports_its_code_and_leaves_nothing() {
    let d = TestDaemon::start("build-fail").await;
    let (status, events, text) = build(
        &d,
        &json!({
            "base": "host",
            "steps": [
                sh("echo fine > /tmp/ok"),
                sh("echo about to fail; exit 7"),
                sh("echo never"),
            ],
        }),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(steps(&events), vec![(0, false), (1, false)], "{events:?}");
    assert!(output(&events, "stdout").contains("about to fail"));
    match events.last() {
        Some(BuildEvent::Error(error)) => {
            assert!(error.message.contains("7"), "{error:?}");
            assert!(
                error.message.contains("RUN echo about to fail; exit 7"),
                "{error:?}"
            );
            assert!(error.message.contains("step 2/3"), "{error:?}");
        }
        other => panic!("expected an error line: {other:?}"),
    }
    assert_no_sandbox_left(&d, "after the failed RUN").await;

    // A program that does not exist fails the step too.
    let (_, events, _) = build(
        &d,
        &json!({"base": "host", "steps": [{"run": {"argv": ["/no/such/program"]}}]}),
    )
    .await;
    match events.last() {
        Some(BuildEvent::Error(error)) => {
            assert!(error.message.contains("/no/such/program"), "{error:?}")
        }
        other => panic!("expected an error line: {other:?}"),
    }
    assert_no_sandbox_left(&d, "after the missing program").await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_going_away_stops_the_build() {
    let d = TestDaemon::start("build-gone").await;
    let stream = tokio::net::UnixStream::connect(d.socket())
        .await
        .expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let driver = tokio::spawn(conn);
    let body = serde_json::to_vec(&json!({
        "base": "host",
        "steps": [sh("echo st\"\"arted; sleep 600")],
    }))
    .unwrap();
    let req = hyper::Request::builder()
        .method("POST")
        .uri("http://sbx/v1/images/build")
        .header(hyper::header::HOST, "sbx")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.expect("send the build");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    // The output line (the step's text spells it differently).
    while !seen.contains("\"data\":\"started") {
        assert!(Instant::now() < deadline, "no output: {seen}");
        match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Some(b) = f.data_ref() {
                    seen.push_str(&String::from_utf8_lossy(b));
                }
            }
            other => panic!("the stream ended early: {other:?} {seen}"),
        }
    }
    assert!(!sandbox_dirs(&d).is_empty(), "the RUN sandbox runs");
    drop(body);
    drop(send);
    driver.abort();
    assert_no_sandbox_left(&d, "after the client went away").await;
    d.finish().await;
}

/// A busybox-static OCI layout (tag `1`) with /etc/passwd naming user `app` (uid 1234).
fn write_busybox_layout(dir: &Path) {
    let mut tar = Tar::default();
    tar.dir("bin/", 0o755)
        .file("bin/busybox", &busybox(), 0o755)
        .symlink("bin/sh", "busybox")
        .dir("etc/", 0o755)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:app:/home/app:/bin/sh\n",
            0o644,
        )
        .file("etc/group", b"root:x:0:\napp:x:2345:\n", 0o644)
        .file("etc/base-file", b"from the base\n", 0o644)
        .dir("tmp/", 0o1777)
        .dir("proc/", 0o555)
        .dir("sys/", 0o555)
        .dir("dev/", 0o755);
    write_layout_with(
        dir,
        "1",
        &[tar.finish()],
        json!({"Env": ["PATH=/bin", "FROM_BASE=yes"], "Cmd": ["/bin/sh"]}),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_on_a_stored_image_with_args() {
    let d = TestDaemon::start("build-stored").await;
    let layout = TempDir::new("layout");
    write_busybox_layout(&layout.0);
    let recipe = |v: Option<&str>| {
        let mut r = json!({
            "base": format!("oci:{}:1", layout.0.display()),
            "steps": [
                {"arg": {"name": "V", "default": "dflt"}},
                {"arg": {"name": "W", "default": "w-${V}"}},
                sh("echo \"$V $W $FROM_BASE\" > /etc/args && mkdir -p /home/app && chown app:app /home/app"),
                {"env": {"vars": {"FROM_ARG": "$V", "BOTH": "${V}-${W}"}}},
                {"workdir": {"path": "/srv/${V}"}},
                {"user": {"user": "app"}},
                sh("id -u > /home/app/uid; id -g > /home/app/gid; pwd > /home/app/pwd"),
            ],
        });
        if let Some(v) = v {
            r["build_args"] = json!({"V": v});
        }
        r
    };
    let (_, image) = build_ok(&d, &recipe(Some("given"))).await;
    assert!(!image.host_base, "{image:?}");
    assert!(image.layers.len() >= 3, "base + 2 RUN layers: {image:?}");
    assert!(
        image.config.env.contains(&"FROM_BASE=yes".to_string()),
        "{image:?}"
    );
    assert!(
        image.config.env.contains(&"FROM_ARG=given".to_string()),
        "{image:?}"
    );
    assert!(
        image.config.env.contains(&"BOTH=given-w-given".to_string()),
        "{image:?}"
    );
    assert_eq!(image.config.working_dir.as_deref(), Some("/srv/given"));
    let c = d.client().await;
    let sb = create(&c, &image.id).await;
    assert_eq!(
        run_ok(&sb, &["/bin/busybox", "cat", "/etc/base-file"]).await,
        "from the base\n"
    );
    assert_eq!(
        run_ok(&sb, &["/bin/busybox", "cat", "/etc/args"]).await,
        "given w-given yes\n"
    );
    assert_eq!(
        run_ok(&sb, &["/bin/busybox", "cat", "/home/app/uid"]).await,
        "1234\n"
    );
    assert_eq!(
        run_ok(&sb, &["/bin/busybox", "cat", "/home/app/gid"]).await,
        "2345\n"
    );
    assert_eq!(
        run_ok(&sb, &["/bin/busybox", "cat", "/home/app/pwd"]).await,
        "/srv/given\n"
    );
    // ARG values are not part of the image's Env.
    let env = run_ok(&sb, &["/bin/busybox", "env"]).await;
    assert!(!env.lines().any(|l| l.starts_with("V=")), "{env}");
    terminate(sb).await;

    // Another build-arg value.
    let (events, other) = build_ok(&d, &recipe(None)).await;
    let s = steps(&events);
    // ARG V is reused; W's default (substituted) and the RUN that sees them are not.
    assert_eq!(&s[..3], &[(0, true), (1, false), (2, false)], "{events:?}");
    assert!(
        other.config.env.contains(&"FROM_ARG=dflt".to_string()),
        "{other:?}"
    );
    drop(c);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_before_the_stream() {
    let d = TestDaemon::start("build-bad").await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "build"),
        (
            serde_json::to_vec(&json!({"base": "host", "steps": [], "bogus": 1})).unwrap(),
            "bogus",
        ),
        (
            serde_json::to_vec(&json!({"base": "host", "steps": []})).unwrap(),
            "steps",
        ),
        (
            serde_json::to_vec(&json!({"base": "not a ref!", "steps": [sh("true")]})).unwrap(),
            "base",
        ),
        (
            serde_json::to_vec(
                &json!({"base": "host", "steps": [{"copy": {"sources": ["a"], "dest": "/a"}}]}),
            )
            .unwrap(),
            "context",
        ),
        (
            serde_json::to_vec(&json!({"base": "host", "context": "/tmp",
                "steps": [{"copy": {"sources": ["../etc/passwd"], "dest": "/a"}}]}))
            .unwrap(),
            "steps[0].sources",
        ),
        (
            serde_json::to_vec(&json!({"base": "host", "steps": [{"run": {"argv": []}}]})).unwrap(),
            "steps[0].argv",
        ),
        (
            serde_json::to_vec(&json!({"base": "host", "steps": [sh("true")], "tag": "im-x y"}))
                .unwrap(),
            "tag",
        ),
        (
            serde_json::to_vec(
                &json!({"base": "host", "steps": [{"env": {"vars": {"1BAD": "x"}}}]}),
            )
            .unwrap(),
            "steps[0].vars",
        ),
    ];
    for (body, field) in cases {
        let (status, bytes) = d.raw("POST", "/v1/images/build", &body).await;
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(status, 400, "{}: {text}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&bytes).expect("an error body");
        assert_eq!(v["error"]["code"], "invalid", "{text}");
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(field),
            "{field}: {text}"
        );
    }
    assert!(sandbox_dirs(&d).is_empty());
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_builds_of_one_recipe_agree() {
    let d = TestDaemon::start("build-twice").await;
    let recipe = json!({
        "base": "host",
        "steps": [
            sh("echo ran > /tmp/ran; sleep 1"),
            {"env": {"vars": {"X": "1"}}},
        ],
    });
    let (a, b) = tokio::join!(build_ok(&d, &recipe), build_ok(&d, &recipe));
    assert_eq!(a.1.id, b.1.id, "one recipe, one image");
    // The RUN ran once: the second build waited for the first and took its result.
    let ran = [&a.0, &b.0]
        .iter()
        .filter(|ev| steps(ev)[0] == (0, false))
        .count();
    assert_eq!(ran, 1, "{:?}\n{:?}", a.0, b.0);
    assert_no_sandbox_left(&d, "after two builds").await;
    let c = d.client().await;
    let sb = create(&c, &a.1.id).await;
    assert_eq!(run_ok(&sb, &["cat", "/tmp/ran"]).await, "ran\n");
    terminate(sb).await;
    drop(c);
    d.finish().await;
}

/// Modal's `Sandbox.create(image=recipe)`: the client library builds the recipe first,
/// streaming the build to the caller, then starts the sandbox from the result; the second
/// create of the same recipe finds every step cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_with_a_recipe_builds_it_first_and_streams_the_build() {
    use sbx::client::Image;
    use std::sync::{Arc, Mutex};
    let d = TestDaemon::start("create-recipe").await;
    let c = d.client().await;
    let recipe = Image::host()
        .env([("GREETING", "from the recipe")])
        .run_commands(["echo building now; echo \"$GREETING\" > /home/greeting"]);
    let seen: Arc<Mutex<Vec<BuildEvent>>> = Arc::default();
    let log = seen.clone();
    let sb = Sandbox::create(
        &c,
        CreateSandbox::default()
            .with_image(recipe.clone())
            .on_build(move |ev| log.lock().unwrap().push(ev.clone())),
    )
    .await
    .expect("create from a recipe");
    assert_eq!(
        run_ok(&sb, &["cat", "/home/greeting"]).await,
        "from the recipe\n"
    );
    let events = seen.lock().unwrap().clone();
    assert_eq!(steps(&events), vec![(0, false), (1, false)], "{events:?}");
    assert!(
        output(&events, "stdout").contains("building now"),
        "{events:?}"
    );
    terminate(sb).await;

    // Again: nothing runs, every step says cached.
    let seen: Arc<Mutex<Vec<BuildEvent>>> = Arc::default();
    let log = seen.clone();
    let sb = Sandbox::create(
        &c,
        CreateSandbox::default()
            .with_image(recipe)
            .on_build(move |ev| log.lock().unwrap().push(ev.clone())),
    )
    .await
    .expect("create from the cached recipe");
    let events = seen.lock().unwrap().clone();
    assert_eq!(steps(&events), vec![(0, true), (1, true)], "{events:?}");
    assert_eq!(output(&events, "stdout"), "", "{events:?}");
    assert_eq!(
        run_ok(&sb, &["cat", "/home/greeting"]).await,
        "from the recipe\n"
    );
    terminate(sb).await;
    d.finish().await;
}
