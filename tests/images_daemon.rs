//! Sandboxes of sbxd started from image references: a registry on loopback (Debian's
//! `docker-registry`, images pushed with `skopeo`), an OCI layout and a docker archive, all made
//! here from busybox-static and a file of known content. Checked through the client library:
//! the file's bytes, the image's Env under the create's env, its WorkingDir, the image's Cmd
//! not run, one pull for two creates, and the errors of bad references (invalid at create, an
//! unreachable registry ending the sandbox with reason `error`). Only loopback is contacted.
//! Runs as root; the image tools come from scripts/setup-images.sh.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/registry.rs"]
mod registry;

use daemon::{run_ok, TestDaemon};
use registry::{free_port, skopeo, Registry, Tar, TempDir};
use rootfs_fetch::oci::{self, host_platform};
use rootfs_fetch::store::Digest;
use sbx::client::{Client, CreateSandbox, EndReason, ErrorCode, Sandbox, SandboxStatus};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The file the test image carries, and its content.
const FILE: &str = "/etc/sbx-test-file";
const CONTENT: &str = "hello from the test image\n";

fn image_layer() -> Vec<u8> {
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is installed");
    Tar::default()
        .dir("bin/", 0o755)
        .file(
            "bin/busybox",
            &std::fs::read(bb).expect("read busybox"),
            0o755,
        )
        .symlink("bin/sh", "busybox")
        .dir("etc/", 0o755)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
        .file(&FILE[1..], CONTENT.as_bytes(), 0o644)
        .dir("srv/", 0o755)
        .dir("tmp/", 0o1777)
        .dir("proc/", 0o555)
        .dir("sys/", 0o555)
        .dir("dev/", 0o755)
        .finish()
}

/// Write the test image as an OCI layout in `dir`, tagged `1`.
fn write_layout(dir: &Path) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("create the layout");
    let put = |bytes: &[u8]| -> (String, usize) {
        let d = Digest::of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes).expect("write a blob");
        (d.to_string(), bytes.len())
    };
    let layer = image_layer();
    let (layer_digest, layer_size) = put(&layer);
    let platform = host_platform();
    // Its Cmd would end the sandbox at once with code 3: sbx does not run it.
    let config = serde_json::json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {
            "Env": ["PATH=/bin", "GREETING=hello from the image", "OVERRIDE=image"],
            "Cmd": ["/bin/sh", "-c", "exit 3"],
            "WorkingDir": "/srv",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).expect("config json"));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "config": {"mediaType": oci::OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": oci::OCI_LAYER_TAR, "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) =
        put(&serde_json::to_vec(&manifest).expect("manifest json"));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_INDEX,
        "manifests": [{
            "mediaType": oci::OCI_MANIFEST, "digest": manifest_digest, "size": manifest_size,
            "annotations": {(oci::REF_NAME): "1"},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

// ---- sandboxes ----

async fn create(c: &Client, image: &str, env: &[(&str, &str)]) -> Sandbox {
    Sandbox::create(
        c,
        CreateSandbox {
            image: Some(image.to_string()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("create with image {image}: {e}"))
}

/// The image's file, Env (under the create's env), WorkingDir, and its Cmd not run.
async fn check_image_sandbox(sb: &Sandbox, image: &str) {
    assert_eq!(
        run_ok(sb, &["/bin/busybox", "cat", FILE]).await,
        CONTENT,
        "{image}"
    );
    let env = run_ok(sb, &["/bin/busybox", "env"]).await;
    let lines: Vec<&str> = env.lines().collect();
    assert!(
        lines.contains(&"GREETING=hello from the image"),
        "{image}: {env}"
    );
    assert!(lines.contains(&"OVERRIDE=create"), "{image}: {env}");
    assert!(!lines.contains(&"OVERRIDE=image"), "{image}: {env}");
    assert_eq!(
        run_ok(sb, &["/bin/busybox", "pwd"]).await,
        "/srv\n",
        "{image}"
    );
    // Running, not ended by the image's Cmd (`exit 3`).
    let info = sb.info().await.expect("info");
    assert_eq!(info.status, SandboxStatus::Running, "{image}: {info:?}");
}

async fn terminate(sb: &Sandbox) {
    sb.terminate(true).await.expect("terminate");
    sb.detach();
}

/// The daemon's log without its colour escapes.
fn plain_log(d: &TestDaemon) -> String {
    let mut out = String::new();
    let mut it = d.log().chars().collect::<Vec<char>>().into_iter();
    while let Some(ch) = it.next() {
        if ch == '\x1b' {
            // CSI: ESC [ parameters final-byte
            for c in it.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

fn image_records(d: &TestDaemon) -> usize {
    rootfs_fetch::image_store(&d.root().join("state"))
        .expect("open the daemon's image store")
        .list_images()
        .expect("list images")
        .len()
}

/// Pushed to a loopback registry and pulled by sbxd for two concurrent creates: one pull, one
/// image record; both sandboxes see the image's file, Env and WorkingDir.
#[tokio::test]
async fn registry_image_pulled_once_for_two_sandboxes() {
    let tmp = TempDir::new("registry-image");
    let layout = tmp.0.join("layout");
    write_layout(&layout);
    let reg = Registry::start("pull");
    let image = format!("{}/test/busybox:1", reg.addr());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:1", layout.display()),
        &format!("docker://{image}"),
    ]);

    let d = TestDaemon::start("registry-image").await;
    let c = d.client().await;
    let env = [("OVERRIDE", "create")];
    let (a, b) = tokio::join!(create(&c, &image, &env), create(&c, &image, &env));
    check_image_sandbox(&a, &image).await;
    check_image_sandbox(&b, &image).await;
    assert_eq!(image_records(&d), 1, "two creates, one image in the store");
    let log = plain_log(&d);
    let pulls = log
        .lines()
        .filter(|l| l.contains(" pulled") && l.contains(&image))
        .count();
    assert_eq!(pulls, 1, "one pull for two creates; log:\n{log}");
    assert!(
        log.contains("layer downloaded"),
        "pull progress is logged; log:\n{log}"
    );
    assert!(
        log.contains("image_id=im-"),
        "the image id is logged; log:\n{log}"
    );
    // A third create later finds the image in the store.
    let e = create(&c, &image, &env).await;
    assert_eq!(run_ok(&e, &["/bin/busybox", "cat", FILE]).await, CONTENT);
    let log = plain_log(&d);
    assert_eq!(
        log.lines()
            .filter(|l| l.contains(" pulled") && l.contains(&image))
            .count(),
        1,
        "no pull for an image in the store; log:\n{log}"
    );
    for sb in [&a, &b, &e] {
        terminate(sb).await;
    }
    d.finish().await;
    drop(reg);
}

/// `oci:PATH:TAG` and `docker-archive:PATH` are imported into the store and run.
#[tokio::test]
async fn oci_layout_and_docker_archive() {
    let tmp = TempDir::new("local-images");
    let layout = tmp.0.join("layout");
    write_layout(&layout);
    let archive = tmp.0.join("busybox.tar");
    skopeo(&[
        "copy",
        &format!("oci:{}:1", layout.display()),
        &format!("docker-archive:{}:test/busybox:1", archive.display()),
    ]);
    let d = TestDaemon::start("local-images").await;
    let c = d.client().await;
    let env = [("OVERRIDE", "create")];
    for image in [
        format!("oci:{}:1", layout.display()),
        format!("oci:{}", layout.display()),
        format!("docker-archive:{}", archive.display()),
    ] {
        let sb = create(&c, &image, &env).await;
        check_image_sandbox(&sb, &image).await;
        terminate(&sb).await;
    }
    assert!(image_records(&d) >= 1);
    // The id the store gave it starts sandboxes too.
    let id = rootfs_fetch::image_store(&d.root().join("state"))
        .unwrap()
        .list_images()
        .unwrap()[0]
        .id
        .to_string();
    let sb = create(&c, &id, &env).await;
    check_image_sandbox(&sb, &id).await;
    terminate(&sb).await;
    d.finish().await;
}

/// Bad references are refused at create; an unknown image id is not found; an unreachable
/// registry ends the sandbox with reason error naming the image; so does a missing layout.
#[tokio::test]
async fn bad_references() {
    let d = TestDaemon::start("bad-references").await;
    let c = d.client().await;
    for bad in [
        "test//busybox",
        "oci:relative/layout",
        "docker-archive:",
        "http://127.0.0.1:5000/x",
        "busybox:",
        "dir:relative",
    ] {
        let r = Sandbox::create(
            &c,
            CreateSandbox {
                image: Some(bad.into()),
                ..Default::default()
            },
        )
        .await;
        match r {
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::Invalid), "{bad}: {e:?}");
                let msg = e.to_string();
                assert!(msg.contains("image"), "{bad}: {msg}");
            }
            Ok(sb) => panic!("{bad}: created {}", sb.id()),
        }
    }
    let missing = format!("im-{}", "0".repeat(24));
    match Sandbox::create(
        &c,
        CreateSandbox {
            image: Some(missing.clone()),
            ..Default::default()
        },
    )
    .await
    {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::NotFound), "{missing}: {e:?}"),
        Ok(sb) => panic!("{missing}: created {}", sb.id()),
    }

    let closed = format!("127.0.0.1:{}/test/none:1", free_port());
    let nowhere = format!("oci:/nonexistent/sbx-test-layout-{}", std::process::id());
    for image in [closed, nowhere] {
        let sb = create(&c, &image, &[]).await;
        let rc = tokio::time::timeout(Duration::from_secs(120), sb.wait_returncode())
            .await
            .unwrap_or_else(|_| panic!("{image}: the sandbox did not end"))
            .expect("wait");
        assert_eq!(rc, 1, "{image}");
        let info = sb.info().await.expect("info");
        assert_eq!(info.end_reason, Some(EndReason::Error), "{image}: {info:?}");
        let err = info.error.clone().unwrap_or_default();
        assert!(err.contains(&image), "{image}: {err}");
        sb.detach();
    }
    d.finish().await;
}
