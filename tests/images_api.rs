//! The image calls of sbxd over its HTTP API, with a real registry on loopback (images made
//! here from busybox-static and pushed with skopeo): a pull streams layer events and ends with
//! the image, a second image sharing a layer finds it cached; list / inspect / remove by tag and
//! by id; removal refused while a sandbox runs the image, and the blobs and unpacked layers no
//! image needs removed after it; export to an OCI layout that skopeo and umoci read; snapshots
//! of sandboxes (host and stored images) that new sandboxes start from; the image's User and
//! its command (`image_command`) applied. Runs as root; only loopback is contacted.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/registry.rs"]
mod registry;

use daemon::{run, TestDaemon};
use registry::{busybox, push, run_tool, skopeo, write_layout_with, Registry, Tar, TempDir};
use sbx::api::images::{ExportResult, ImageInfo, PullEvent};
use sbx::client::{Client, CreateSandbox, Sandbox};
use std::path::Path;
use std::process::Command;

/// The base layer: busybox with a few applets, /etc/passwd and /etc/group with a user `app`.
fn base_layer() -> Vec<u8> {
    let mut t = Tar::default();
    t.dir("bin/", 0o755)
        .file("bin/busybox", &busybox(), 0o755)
        .symlink("bin/sh", "busybox")
        .dir("etc/", 0o755)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n",
            0o644,
        )
        .file(
            "etc/group",
            b"root:x:0:\nappgrp:x:1001:\nstaff:x:50:\n",
            0o644,
        )
        .file("etc/base-file", b"from the base layer\n", 0o644)
        .dir("srv/", 0o755)
        .dir("tmp/", 0o1777)
        .dir("proc/", 0o555)
        .dir("sys/", 0o555)
        .dir("dev/", 0o755);
    t.finish()
}

/// A second layer with one file.
fn extra_layer(name: &str) -> Vec<u8> {
    Tar::default()
        .dir("srv/", 0o755)
        .file(&format!("srv/{name}"), name.as_bytes(), 0o644)
        .finish()
}

fn layout(dir: &Path, layers: &[Vec<u8>], config: serde_json::Value) -> String {
    write_layout_with(dir, "1", layers, config);
    format!("oci:{}:1", dir.display())
}

/// The ndjson lines of a pull, parsed; asserts the HTTP status is 200.
async fn pull(d: &TestDaemon, reference: &str) -> Vec<PullEvent> {
    let body = serde_json::json!({ "reference": reference }).to_string();
    let (status, bytes) = d.raw("POST", "/v1/images/pull", body.as_bytes()).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    assert_eq!(status, 200, "pull {reference}: {text}");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("pull line {l:?}: {e}")))
        .collect()
}

/// The image a pull ended with (its last line must be `done`).
fn done(events: &[PullEvent]) -> ImageInfo {
    match events.last() {
        Some(PullEvent::Done { image }) => image.clone(),
        other => panic!("a pull must end with done: {other:?} (all: {events:?})"),
    }
}

/// (digest, cached) of every layer_done line.
fn layers_done(events: &[PullEvent]) -> Vec<(String, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            PullEvent::LayerDone { digest, cached } => Some((digest.clone(), *cached)),
            _ => None,
        })
        .collect()
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn get_json<T: serde::de::DeserializeOwned>(d: &TestDaemon, path: &str) -> (u16, T) {
    let (status, bytes) = d.raw("GET", path, b"").await;
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("GET {path}: {e}: {}", String::from_utf8_lossy(&bytes)));
    (status, v)
}

async fn inspect(d: &TestDaemon, r: &str) -> (u16, serde_json::Value) {
    get_json(d, &format!("/v1/images/{}", enc(r))).await
}

async fn list(d: &TestDaemon) -> Vec<ImageInfo> {
    let (status, v) = get_json(d, "/v1/images").await;
    assert_eq!(status, 200);
    v
}

async fn rm(d: &TestDaemon, r: &str) -> (u16, String) {
    let (status, body) = d
        .raw("DELETE", &format!("/v1/images/{}", enc(r)), b"")
        .await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

async fn create(c: &Client, req: CreateSandbox) -> Sandbox {
    Sandbox::create(c, req.clone())
        .await
        .unwrap_or_else(|e| panic!("create {req:?}: {e}"))
}

async fn create_image(c: &Client, image: &str) -> Sandbox {
    create(
        c,
        CreateSandbox {
            image: Some(image.into()),
            ..Default::default()
        },
    )
    .await
}

async fn sh_ok(sb: &Sandbox, script: &str) -> String {
    let (rc, out, err) = run(sb, &["/bin/sh", "-c", script]).await;
    assert_eq!(rc, 0, "{script:?}: stdout={out:?} stderr={err:?}");
    out
}

async fn terminate(sb: &Sandbox) {
    sb.terminate(true).await.expect("terminate");
    sb.detach();
}

/// Hex names of the unpacked layer directories of the daemon.
fn layer_dirs(d: &TestDaemon) -> Vec<String> {
    std::fs::read_dir(rootfs_fetch::layers_dir(&d.root().join("state")))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.len() == 64)
                .collect()
        })
        .unwrap_or_default()
}

fn blob_exists(d: &TestDaemon, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    d.root()
        .join("state/images/blobs/sha256")
        .join(hex)
        .exists()
}

fn hex(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_string()
}

/// Pull streams, cached layers, ls / inspect / rm by tag and id, conflict while in use, GC.
#[tokio::test]
async fn pull_list_inspect_remove() {
    let tmp = TempDir::new("api-pull");
    let reg = Registry::start("api-pull");
    let base = base_layer();
    let a_dir = tmp.0.join("a");
    let b_dir = tmp.0.join("b");
    let cfg = serde_json::json!({"Env": ["PATH=/bin"]});
    layout(&a_dir, std::slice::from_ref(&base), cfg.clone());
    layout(&b_dir, &[base.clone(), extra_layer("b-file")], cfg);
    let a = push(&reg, &a_dir, "1", "test/a:1");
    let a2 = push(&reg, &a_dir, "1", "test/a2:1");
    let b = push(&reg, &b_dir, "1", "test/b:1");

    let d = TestDaemon::start("api-pull").await;
    let c = d.client().await;

    // Invalid before the stream starts.
    let (status, body) = d
        .raw("POST", "/v1/images/pull", br#"{"reference":"test//x"}"#)
        .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert_eq!(error_code(&String::from_utf8_lossy(&body)), "invalid");
    // A tag the registry does not have: the stream's last line is `not_found`, naming it.
    let missing = format!("{}/test/a:no-such-tag", reg.addr());
    let events = pull(&d, &missing).await;
    match events.last() {
        Some(PullEvent::Error(e)) => {
            assert_eq!(e.code, sbx::api::ErrorCode::NotFound, "{e:?}");
            assert!(e.message.contains("no-such-tag"), "{e:?}");
        }
        other => panic!("a pull of a missing tag ended with {other:?}"),
    }

    // First pull: the layer starts, is downloaded (not cached), then done.
    let ev = pull(&d, &a).await;
    assert!(
        matches!(ev.first(), Some(PullEvent::LayerStarted { size, .. }) if *size > 0),
        "{ev:?}"
    );
    assert_eq!(layers_done(&ev).len(), 1, "{ev:?}");
    assert!(!layers_done(&ev)[0].1, "first pull downloads: {ev:?}");
    let img_a = done(&ev);
    assert!(img_a.id.starts_with("im-"), "{img_a:?}");
    assert!(img_a.references.contains(&a), "{img_a:?}");
    assert_eq!(img_a.source, a);
    assert_eq!(img_a.layers.len(), 1);

    // B shares the base layer: cached; its own layer downloaded.
    let ev = pull(&d, &b).await;
    let img_b = done(&ev);
    let ld = layers_done(&ev);
    assert_eq!(ld.len(), 2, "{ev:?}");
    for (digest, cached) in &ld {
        let shared = *digest == img_a.layers[0].digest;
        assert_eq!(*cached, shared, "{digest}: {ev:?}");
    }
    // A pull of a tag the store has goes to the registry again: the layer is cached.
    let ev = pull(&d, &a).await;
    assert_eq!(done(&ev).id, img_a.id);
    assert!(layers_done(&ev).iter().all(|(_, c)| *c), "{ev:?}");
    // The same image under a second name.
    assert_eq!(done(&pull(&d, &a2).await).id, img_a.id);

    // ls: both, newest first; inspect by reference (percent-encoded) and by id.
    let all = list(&d).await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all.windows(2).all(|w| w[0].created_at >= w[1].created_at));
    let (st, v) = inspect(&d, &b).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["id"], img_b.id.as_str());
    let (st, v) = inspect(&d, &img_a.id).await;
    assert_eq!(st, 200, "{v}");
    let refs: Vec<String> = serde_json::from_value(v["references"].clone()).unwrap();
    assert!(refs.contains(&a) && refs.contains(&a2), "{refs:?}");
    let (st, v) = inspect(&d, "nothing:here").await;
    assert_eq!(st, 404, "{v}");

    // A sandbox of B: B cannot be removed (by id or by its only name) while it runs.
    let sb = create_image(&c, &b).await;
    assert_eq!(sh_ok(&sb, "cat /srv/b-file").await, "b-file");
    for r in [img_b.id.as_str(), b.as_str()] {
        let (st, body) = rm(&d, r).await;
        assert_eq!(st, 409, "{r}: {body}");
        assert!(
            body.contains(sb.id()),
            "the conflict names the sandbox: {body}"
        );
    }
    let b_layer = hex(&img_b.layers[1].diff_id);
    let base_layer = hex(&img_b.layers[0].diff_id);
    assert!(layer_dirs(&d).contains(&b_layer));
    terminate(&sb).await;

    // Removed by its name (the last one): the image, its own blob and unpacked layer go;
    // the shared layer stays (A needs it).
    let (st, body) = rm(&d, &b).await;
    assert_eq!(st, 204, "{body}");
    assert_eq!(inspect(&d, &img_b.id).await.0, 404);
    let dirs = layer_dirs(&d);
    assert!(!dirs.contains(&b_layer), "{dirs:?}");
    assert!(dirs.contains(&base_layer), "{dirs:?}");
    assert!(!blob_exists(&d, &img_b.layers[1].digest));
    assert!(blob_exists(&d, &img_a.layers[0].digest));

    // A tag of A removed: the image stays under its other name; then removed by id.
    let (st, body) = rm(&d, &a).await;
    assert_eq!(st, 204, "{body}");
    let (st, v) = inspect(&d, &img_a.id).await;
    assert_eq!(st, 200, "{v}");
    let refs: Vec<String> = serde_json::from_value(v["references"].clone()).unwrap();
    assert!(!refs.contains(&a) && refs.contains(&a2), "{refs:?}");
    assert_eq!(inspect(&d, &a).await.0, 404);
    let (st, body) = rm(&d, &img_a.id).await;
    assert_eq!(st, 204, "{body}");
    assert_eq!(inspect(&d, &a2).await.0, 404);
    assert!(list(&d).await.is_empty());
    assert!(layer_dirs(&d).is_empty(), "{:?}", layer_dirs(&d));
    assert!(!blob_exists(&d, &img_a.layers[0].digest));
    let (st, body) = rm(&d, &img_a.id).await;
    assert_eq!((st, error_code(&body)), (404, "not_found".into()), "{body}");
    d.finish().await;
    drop(reg);
}

async fn snapshot(d: &TestDaemon, sb: &str) -> (u16, serde_json::Value) {
    let (st, body) = d
        .raw("POST", &format!("/v1/sandboxes/{sb}/snapshot"), b"")
        .await;
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("snapshot {sb}: {e}: {}", String::from_utf8_lossy(&body)));
    (st, v)
}

async fn export(d: &TestDaemon, image: &str, dest: &str) -> (u16, Vec<u8>) {
    let body = serde_json::json!({"image": image, "destination": dest}).to_string();
    let (st, b) = d.raw("POST", "/v1/images/export", body.as_bytes()).await;
    (st, b.to_vec())
}

/// Import by pull of an OCI layout; export that skopeo and umoci read; snapshots of a stored
/// image's sandbox and of a host sandbox, started again.
#[tokio::test]
async fn export_and_snapshot() {
    let tmp = TempDir::new("api-snap");
    let src = layout(
        &tmp.0.join("src"),
        &[base_layer()],
        serde_json::json!({"Env": ["PATH=/bin"], "WorkingDir": "/srv"}),
    );
    let d = TestDaemon::start("api-snap").await;
    let c = d.client().await;
    let img = done(&pull(&d, &src).await);

    // Export: a layout skopeo inspects and umoci unpacks, with the image's file.
    let out = tmp.0.join("out");
    let (st, body) = export(&d, &img.id, &format!("oci:{}:v1", out.display())).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    let res: ExportResult = serde_json::from_slice(&body).unwrap();
    assert_eq!(res.image, img.id);
    let inspected = skopeo(&["inspect", &format!("oci:{}:v1", out.display())]);
    assert!(
        inspected.contains(&hex(&img.layers[0].digest)),
        "{inspected}"
    );
    let bundle = tmp.0.join("bundle");
    run_tool(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:v1", out.display()))
            .arg(&bundle),
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/etc/base-file")).unwrap(),
        "from the base layer\n"
    );
    // Default tag latest; a relative destination is invalid.
    let (st, body) = export(&d, &src, &format!("oci:{}", out.display())).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    skopeo(&["inspect", &format!("oci:{}:latest", out.display())]);
    let (st, _) = export(&d, &img.id, "oci:relative/dir").await;
    assert_eq!(st, 400);

    // Snapshot of a stored image's sandbox: a new file, a removed one, the config kept.
    let sb = create_image(&c, &img.id).await;
    sh_ok(&sb, "echo snap > /srv/new-file && rm /etc/base-file").await;
    let (st, snap) = snapshot(&d, sb.id()).await;
    assert_eq!(st, 201, "{snap}");
    assert_eq!(snap["source"], format!("snapshot:{}", sb.id()).as_str());
    assert_eq!(snap["host_base"], false);
    assert_eq!(snap["layers"].as_array().unwrap().len(), 2, "{snap}");
    assert_eq!(snap["config"]["working_dir"], "/srv");
    terminate(&sb).await;
    // Finished: conflict.
    let (st, v) = snapshot(&d, sb.id()).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{v}"
    );
    let snap_id = snap["id"].as_str().unwrap().to_string();
    let sb2 = create_image(&c, &snap_id).await;
    assert_eq!(sh_ok(&sb2, "cat /srv/new-file").await, "snap\n");
    assert_eq!(sh_ok(&sb2, "pwd").await, "/srv\n");
    let (rc, _, _) = run(&sb2, &["/bin/sh", "-c", "test -e /etc/base-file"]).await;
    assert_ne!(rc, 0, "the removed file stays removed in the snapshot");
    terminate(&sb2).await;
    // The snapshot exports too (it is not host based).
    let (st, body) = export(&d, &snap_id, &format!("oci:{}:snap", out.display())).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));

    // Snapshot of a host sandbox: host based, with the host's /usr; a snapshot of a sandbox of
    // that one (a stored, host-based parent) keeps a removal.
    let hs = create(&c, CreateSandbox::default()).await;
    sh_ok(&hs, "echo host-snap > /root/note && echo x > /root/gone").await;
    let (st, hsnap) = snapshot(&d, hs.id()).await;
    assert_eq!(st, 201, "{hsnap}");
    assert_eq!(hsnap["host_base"], true);
    terminate(&hs).await;
    let hid1 = hsnap["id"].as_str().unwrap().to_string();
    let hs2 = create_image(&c, &hid1).await;
    assert_eq!(
        sh_ok(&hs2, "cat /root/note /root/gone").await,
        "host-snap\nx\n"
    );
    sh_ok(&hs2, "rm /root/gone && test -x /usr/bin/env").await;
    let (st, hsnap2) = snapshot(&d, hs2.id()).await;
    assert_eq!(st, 201, "{hsnap2}");
    assert_eq!(hsnap2["host_base"], true);
    terminate(&hs2).await;
    let hid = hsnap2["id"].as_str().unwrap().to_string();
    let hs3 = create_image(&c, &hid).await;
    assert_eq!(sh_ok(&hs3, "cat /root/note").await, "host-snap\n");
    sh_ok(&hs3, "test ! -e /root/gone && test -x /usr/bin/env").await;
    terminate(&hs3).await;
    // Host-based images cannot be exported; the message names the image.
    let (st, body) = export(&d, &hid, &format!("oci:{}:host", out.display())).await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!((st, error_code(&body)), (400, "invalid".into()), "{body}");
    assert!(body.contains(&hid), "{body}");

    // A dir: sandbox (umoci's unpacked rootfs) cannot be snapshotted.
    let rootfs = bundle.join("rootfs");
    let ds = create_image(&c, &format!("dir:{}", rootfs.display())).await;
    sh_ok(&ds, "true").await;
    let (st, v) = snapshot(&d, ds.id()).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid")),
        "{v}"
    );
    terminate(&ds).await;
    d.finish().await;
}

/// The image's User (a name and numeric ids) for the entrypoint and execs; its Entrypoint +
/// Cmd run with `image_command`; ExposedPorts shown.
#[tokio::test]
async fn image_user_and_command() {
    let tmp = TempDir::new("api-user");
    let named = layout(
        &tmp.0.join("named"),
        &[base_layer()],
        serde_json::json!({
            "Env": ["PATH=/bin"],
            "User": "app",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["/bin/busybox id -u > /tmp/entry-ids; /bin/busybox id -g >> /tmp/entry-ids; exec /bin/busybox sleep 600"],
            "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        }),
    );
    let numeric = layout(
        &tmp.0.join("numeric"),
        &[base_layer()],
        serde_json::json!({"Env": ["PATH=/bin"], "User": "1234:staff"}),
    );
    let d = TestDaemon::start("api-user").await;
    let c = d.client().await;
    let named_img = done(&pull(&d, &named).await);
    assert_eq!(
        named_img.config.exposed_ports,
        vec!["53/udp".to_string(), "8080/tcp".to_string()]
    );
    assert_eq!(named_img.config.user.as_deref(), Some("app"));
    let numeric_img = done(&pull(&d, &numeric).await);

    // image_command: the image's Entrypoint + Cmd run as the entrypoint, as the image's user.
    let sb = create(
        &c,
        CreateSandbox {
            image: Some(named_img.id.clone()),
            image_command: true,
            ..Default::default()
        },
    )
    .await;
    let mut ids = String::new();
    for _ in 0..100 {
        let (_, out, _) = run(&sb, &["/bin/busybox", "cat", "/tmp/entry-ids"]).await;
        ids = out;
        if ids.lines().count() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(ids, "1000\n1001\n", "entrypoint ids");
    assert_eq!(
        sh_ok(&sb, "/bin/busybox id -u; /bin/busybox id -g").await,
        "1000\n1001\n"
    );
    terminate(&sb).await;

    // Without image_command the Cmd does not run; a numeric uid with a group name.
    let sb = create_image(&c, &numeric_img.id).await;
    assert_eq!(
        sh_ok(&sb, "/bin/busybox id -u; /bin/busybox id -g").await,
        "1234\n50\n"
    );
    terminate(&sb).await;

    // The create's entrypoint wins over the image's command.
    let sb = create(
        &c,
        CreateSandbox {
            image: Some(named_img.id.clone()),
            image_command: true,
            entrypoint: vec!["/bin/busybox".into(), "sleep".into(), "600".into()],
            ..Default::default()
        },
    )
    .await;
    let (rc, _, _) = run(&sb, &["/bin/busybox", "test", "-e", "/tmp/entry-ids"]).await;
    assert_ne!(rc, 0, "the image's command did not run");
    terminate(&sb).await;

    // An image with neither Entrypoint nor Cmd, and host: invalid.
    for image in [numeric_img.id.as_str(), "host"] {
        let e = Sandbox::create(
            &c,
            CreateSandbox {
                image: Some(image.into()),
                image_command: true,
                ..Default::default()
            },
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{image}: image_command with no command was accepted"));
        assert_eq!(
            e.code(),
            Some(sbx::client::ErrorCode::Invalid),
            "{image}: {e}"
        );
    }
    d.finish().await;
}
