//! Sandboxes started from images in the content store: layers unpacked once each and shared as
//! overlay lower layers, id-mapped so the image's ownership is canonical inside every sandbox.
//! The images are made here (hand-written tars in an OCI layout, imported into the store) and
//! checked file by file from inside real sandboxes. Runs as root.

mod support;

use rootfs_fetch::oci::{self, host_platform};
use rootfs_fetch::store::{Digest, ImageId, Store};
use sbx::runtime::{ExecSpec, ImageRef, Sandbox, SandboxSpec};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use support::*;

// ---- a small tar writer (ustar), so that every byte of a test layer is chosen here ----

/// Fixed mtime: the same layer content gives the same diff_id in every run.
const MTIME: u64 = 1_700_000_000;

#[derive(Default)]
struct Tar(Vec<u8>);

impl Tar {
    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        path: &str,
        kind: u8,
        mode: u32,
        uid: u32,
        gid: u32,
        data: &[u8],
        link: &str,
    ) -> &mut Self {
        assert!(path.len() < 100 && link.len() < 100, "{path}");
        let mut h = [0u8; 512];
        h[..path.len()].copy_from_slice(path.as_bytes());
        let octal = |h: &mut [u8], at: usize, len: usize, v: u64| {
            let s = format!("{v:0w$o}\0", w = len - 1);
            h[at..at + len].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, mode as u64);
        octal(&mut h, 108, 8, uid as u64);
        octal(&mut h, 116, 8, gid as u64);
        octal(&mut h, 124, 12, data.len() as u64);
        octal(&mut h, 136, 12, MTIME);
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.0.extend_from_slice(&h);
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }
    fn dir(&mut self, path: &str, mode: u32, uid: u32) -> &mut Self {
        self.entry(path, b'5', mode, uid, uid, b"", "")
    }
    fn file(&mut self, path: &str, data: &[u8], mode: u32, uid: u32) -> &mut Self {
        self.entry(path, b'0', mode, uid, uid, data, "")
    }
    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, b'2', 0o777, 0, 0, b"", target)
    }
    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, b'1', 0o644, 0, 0, b"", target)
    }
    fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.0);
        out.extend_from_slice(&[0u8; 1024]);
        out
    }
}

/// The base layer: busybox-static with its applets, /etc/passwd and the usual directories.
fn busybox_layer() -> Vec<u8> {
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is installed by scripts/setup.sh");
    let list = std::process::Command::new(bb)
        .arg("--list")
        .output()
        .expect("busybox --list");
    let mut t = Tar::default();
    t.dir("./", 0o755, 0).dir("bin/", 0o755, 0).file(
        "bin/busybox",
        &std::fs::read(bb).unwrap(),
        0o755,
        0,
    );
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            t.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    t.dir("etc/", 0o755, 0)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
            0o644,
            0,
        )
        .file("etc/group", b"root:x:0:\nuser:x:1000:\n", 0o644, 0)
        .dir("tmp/", 0o1777, 0)
        .dir("root/", 0o700, 0)
        .dir("proc/", 0o555, 0)
        .dir("sys/", 0o555, 0)
        .dir("dev/", 0o755, 0);
    t.finish()
}

/// What an image is made of: layer tars, base first, and what its config says.
struct ImageSpec {
    layers: Vec<Vec<u8>>,
    /// Replaces the diff_id of layer `.0` in the config (a lying config).
    wrong_diff_id: Option<(usize, Digest)>,
}

/// Write an OCI layout with the image, import it into the store of the test runtime, and
/// remove the layout. Returns the image id.
fn import(name: &str, spec: &ImageSpec) -> ImageId {
    let dir = test_root().join(format!("layout-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let d = Digest::of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes).unwrap();
        (d.to_string(), bytes.len())
    };
    let mut diff_ids = Vec::new();
    let mut layer_descs = Vec::new();
    for (i, tar) in spec.layers.iter().enumerate() {
        let (digest, size) = put(tar);
        let diff_id = match &spec.wrong_diff_id {
            Some((at, d)) if *at == i => d.to_string(),
            _ => digest.clone(),
        };
        diff_ids.push(diff_id);
        layer_descs.push(serde_json::json!({
            "mediaType": oci::OCI_LAYER_TAR, "digest": digest, "size": size,
        }));
    }
    let platform = host_platform();
    let config = serde_json::json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {
            "Env": ["PATH=/bin", "GREETING=hello"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/home/user",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "config": {"mediaType": oci::OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layer_descs,
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_INDEX,
        "manifests": [{
            "mediaType": oci::OCI_MANIFEST, "digest": manifest_digest, "size": manifest_size,
            "annotations": {(oci::REF_NAME): name},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let record = oci::import_oci_layout(&store(), &dir, Some(name)).expect("import the layout");
    std::fs::remove_dir_all(&dir).unwrap();
    record.id
}

fn store() -> Store {
    rootfs_fetch::image_store(&config().state_dir).expect("open the image store")
}

fn layers_dir() -> PathBuf {
    rootfs_fetch::layers_dir(&config().state_dir)
}

/// The three-layer test image: busybox; then files of every kind with their owners and modes;
/// then a whiteout, an opaque directory and a hardlink pair of its own.
fn three_layer_image() -> ImageId {
    let app = Tar::default()
        .dir("etc/", 0o755, 0)
        .file("etc/motd", b"hello\n", 0o644, 0)
        .dir("usr/", 0o755, 0)
        .dir("usr/bin/", 0o755, 0)
        .file("usr/bin/suid", b"#!/bin/sh\necho suid\n", 0o4755, 0)
        .file("usr/bin/sgid", b"#!/bin/sh\necho sgid\n", 0o2755, 0)
        .dir("home/", 0o755, 0)
        .dir("home/user/", 0o750, 1000)
        .file("home/user/owned", b"mine\n", 0o644, 1000)
        .dir("data/", 0o755, 0)
        .file("data/old", b"old\n", 0o644, 0)
        .file("data/stay", b"stay\n", 0o644, 0)
        .dir("opq/", 0o755, 0)
        .file("opq/lower-child", b"lc\n", 0o644, 0)
        .dir("opq/sub/", 0o755, 0)
        .file("opq/sub/deep", b"deep\n", 0o644, 0)
        .dir("links/", 0o755, 0)
        .file("links/a", b"shared\n", 0o644, 0)
        .hardlink("links/b", "links/a")
        .symlink("links/rel", "../etc/motd")
        .symlink("links/abs", "/etc/motd")
        .finish();
    let top = Tar::default()
        .dir("data/", 0o755, 0)
        .file("data/.wh.old", b"", 0o644, 0)
        .dir("opq/", 0o755, 0)
        .file("opq/.wh..wh..opq", b"", 0o644, 0)
        .file("opq/new-child", b"nc\n", 0o644, 0)
        .dir("top/", 0o755, 0)
        .file("top/x", b"xy\n", 0o640, 1000)
        .hardlink("top/y", "top/x")
        .finish();
    import(
        "three",
        &ImageSpec {
            layers: vec![busybox_layer(), app, top],
            wrong_diff_id: None,
        },
    )
}

fn spawn_image(id: &ImageId) -> Sandbox {
    spawn_spec(SandboxSpec {
        image: ImageRef::Stored(id.clone()),
        ..Default::default()
    })
}

/// Run `sh -c script` as sandbox uid/gid `id`; returns (exit code, stdout, stderr).
fn sh_as(sb: &Sandbox, id: u32, script: &str) -> (i32, String, String) {
    let mut spec = ExecSpec::new(["/bin/sh", "-c", script]);
    spec.uid = id;
    spec.gid = id;
    let (exit, out, err) = sb.exec(spec).expect("exec").output().expect("output");
    (
        exit.code(),
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// The host uid sandbox root maps to (first line of init's uid_map).
fn host_root_of(sb: &Sandbox) -> u32 {
    let map = std::fs::read_to_string(format!("/proc/{}/uid_map", sb.init_pid())).unwrap();
    map.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Processes on the host whose mount table mentions `needle` (any mount namespace).
fn processes_mounting(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().into_string().unwrap_or_default();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(mi) = std::fs::read_to_string(e.path().join("mountinfo")) {
            if mi.contains(needle) {
                out.push(name);
            }
        }
    }
    out
}

/// Destroy the sandbox and check that no mount of it is left in any namespace.
fn destroy(sb: Sandbox) {
    let id = sb.id().to_string();
    sb.destroy().expect("destroy");
    assert!(host_mounts_with(&id).is_empty(), "{id}: host mounts left");
    assert!(
        processes_mounting(&id).is_empty(),
        "{id}: processes still mount it"
    );
    let run = config().run_dir.join("sandboxes").join(&id);
    assert!(!run.exists(), "{} left", run.display());
}

/// Unpack directories of the layers (`.tmp-…`) and lock files left behind.
fn leftovers() -> Vec<String> {
    std::fs::read_dir(layers_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// The checks of the three-layer image, from inside a sandbox, as root and as uid 1000.
fn check_three_layer_image(sb: &Sandbox) {
    // Whiteout: the lower file is gone, the marker never shows.
    assert_eq!(sh_ok(sb, "ls -a /data"), ".\n..\nstay\n");
    let (code, _, _) = sh(sb, "test -e /data/old");
    assert_ne!(code, 0, "/data/old must be hidden by the whiteout");
    // Opaque directory: lower children hidden (deep ones too), its own kept.
    assert_eq!(sh_ok(sb, "ls -a /opq"), ".\n..\nnew-child\n");
    assert_eq!(sh_ok(sb, "cat /opq/new-child"), "nc\n");
    // Hardlinks share an inode, in the lower layer and in the top one.
    for (a, b) in [("/links/a", "/links/b"), ("/top/x", "/top/y")] {
        let out = sh_ok(sb, &format!("stat -c '%i %h' {a} {b}"));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0], lines[1], "{a} and {b} differ: {out}");
        assert!(lines[0].ends_with(" 2"), "{a}: link count: {out}");
    }
    // Canonical ownership: image root is sandbox root, image uid 1000 is sandbox 1000.
    assert_eq!(
        sh_ok(sb, "stat -c '%u %g %a' /etc/motd /bin/busybox / /etc"),
        "0 0 644\n0 0 755\n0 0 755\n0 0 755\n"
    );
    assert_eq!(
        sh_ok(sb, "stat -c '%u %g %a' /home/user /home/user/owned /top/x"),
        "1000 1000 750\n1000 1000 644\n1000 1000 640\n"
    );
    // Setuid and setgid bits kept.
    assert_eq!(
        sh_ok(sb, "stat -c '%u %g %a' /usr/bin/suid /usr/bin/sgid"),
        "0 0 4755\n0 0 2755\n"
    );
    assert_eq!(sh_ok(sb, "/usr/bin/suid"), "suid\n");
    // Symlinks as they were written.
    assert_eq!(
        sh_ok(sb, "readlink /links/rel; readlink /links/abs"),
        "../etc/motd\n/etc/motd\n"
    );
    assert_eq!(sh_ok(sb, "cat /links/abs /links/rel"), "hello\nhello\n");
    // Sandbox root may write image root's files (copy-up); uid 1000 may not, but may write
    // its own.
    assert_eq!(
        sh_ok(
            sb,
            "echo more >> /etc/motd && cat /etc/motd && stat -c '%u %g' /etc/motd"
        ),
        "hello\nmore\n0 0\n"
    );
    let (code, _, err) = sh_as(sb, 1000, "echo no >> /etc/motd");
    assert_ne!(code, 0, "uid 1000 wrote root's file");
    assert!(err.contains("Permission denied"), "{err}");
    let (code, out, err) = sh_as(
        sb,
        1000,
        "echo too >> /home/user/owned && cat /home/user/owned && touch /home/user/new && \
         stat -c '%u %g' /home/user/new",
    );
    assert_eq!((code, out.as_str()), (0, "mine\ntoo\n1000 1000\n"), "{err}");
    let (code, _, _) = sh_as(sb, 1000, "ls /root");
    assert_ne!(code, 0, "uid 1000 listed root's 0700 /root");
    // A new file of sandbox root, and /tmp of the image.
    assert_eq!(
        sh_ok(sb, "touch /new && stat -c '%u %g' /new && stat -c %a /tmp"),
        "0 0\n1777\n"
    );
}

#[test]
fn a_three_layer_image_is_exact_inside_and_shared_between_sandboxes() {
    let id = three_layer_image();
    let resolved = rootfs_fetch::resolve(&ImageRef::Stored(id.clone()), &config().state_dir)
        .expect("resolve the stored image");
    assert!(resolved.idmap_lowers);
    assert_eq!(resolved.lowers.len(), 3);
    let image_config = resolved.config.expect("a stored image carries its config");
    assert_eq!(image_config.cmd, Some(vec!["/bin/sh".to_string()]));
    assert_eq!(image_config.working_dir.as_deref(), Some("/home/user"));
    // The record says the layers, topmost first in `lowers`.
    let record = store().load_image(&id).unwrap();
    let expected: Vec<PathBuf> = record
        .layers
        .iter()
        .rev()
        .map(|l| layers_dir().join(l.diff_id.hex()))
        .collect();
    assert_eq!(resolved.lowers, expected);
    let ldir = std::fs::metadata(layers_dir()).unwrap();
    assert_eq!(ldir.mode() & 0o7777, 0o700, "layers dir must be private");
    assert_eq!(ldir.uid(), 0);

    let a = spawn_image(&id);
    check_three_layer_image(&a);
    // The layers on the host keep the image's own ids and are untouched by the copy-up.
    let app = &resolved.lowers[1];
    let motd = std::fs::metadata(app.join("etc/motd")).unwrap();
    assert_eq!(
        (motd.uid(), motd.gid(), motd.mode() & 0o7777),
        (0, 0, 0o644)
    );
    assert_eq!(std::fs::read(app.join("etc/motd")).unwrap(), b"hello\n");
    assert_eq!(
        std::fs::metadata(app.join("home/user/owned"))
            .unwrap()
            .uid(),
        1000
    );
    // The copy-up is in a's upper, owned by a's own host uid for root.
    let upper_motd = config()
        .state_dir
        .join("sandboxes")
        .join(a.id())
        .join("upper/etc/motd");
    assert_eq!(
        std::fs::metadata(&upper_motd).unwrap().uid(),
        host_root_of(&a)
    );
    let stamps = |lowers: &[PathBuf]| -> Vec<(u64, i64, i64)> {
        lowers
            .iter()
            .map(|l| {
                let m = std::fs::metadata(l).unwrap();
                (m.ino(), m.mtime(), m.mtime_nsec())
            })
            .collect()
    };
    let before = stamps(&resolved.lowers);

    // A second sandbox, alive at the same time with another uid range: the same view, and
    // nothing is unpacked again.
    let b = spawn_image(&id);
    assert_ne!(host_root_of(&a), host_root_of(&b));
    check_three_layer_image(&b);
    assert_eq!(
        stamps(&resolved.lowers),
        before,
        "layers were unpacked again"
    );
    // a's write is a's own.
    assert_eq!(sh_ok(&a, "cat /etc/motd"), "hello\nmore\n");
    destroy(a);
    assert_eq!(sh_ok(&b, "cat /etc/motd"), "hello\nmore\n");
    destroy(b);
    let c = spawn_image(&id);
    assert_eq!(
        sh_ok(&c, "cat /etc/motd"),
        "hello\n",
        "a write leaked into the layers"
    );
    destroy(c);
    assert_eq!(stamps(&resolved.lowers), before);
    assert!(
        !leftovers().iter().any(|n| n.starts_with(".tmp-")),
        "{:?}",
        leftovers()
    );
}

#[test]
fn an_image_with_sixty_layers_starts() {
    let mut layers = vec![busybox_layer()];
    for i in 0..60 {
        layers.push(
            Tar::default()
                .dir("many/", 0o755, 0)
                .file(
                    &format!("many/f{i:02}"),
                    format!("{i}\n").as_bytes(),
                    0o644,
                    0,
                )
                .file("many/top", format!("{i}\n").as_bytes(), 0o644, 0)
                .finish(),
        );
    }
    let id = import(
        "sixty",
        &ImageSpec {
            layers,
            wrong_diff_id: None,
        },
    );
    let sb = spawn_image(&id);
    assert_eq!(sh_ok(&sb, "ls /many | wc -l").trim(), "61");
    assert_eq!(sh_ok(&sb, "cat /many/f00 /many/f59"), "0\n59\n");
    // The topmost layer wins.
    assert_eq!(sh_ok(&sb, "cat /many/top"), "59\n");
    // No layer is reachable by path in the sandbox's mount table.
    let mounts = sh_ok(&sb, "cat /proc/self/mountinfo");
    assert!(
        !mounts.contains(&layers_dir().display().to_string()),
        "{mounts}"
    );
    destroy(sb);
}

#[test]
fn a_layer_that_does_not_match_its_diff_id_fails_the_spawn_and_leaves_nothing() {
    // Content unique to this run, so that its layer cannot be there from before.
    let unique = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
    let bad = Tar::default()
        .file("unique", unique.as_bytes(), 0o644, 0)
        .finish();
    let bad_digest = Digest::of(&bad);
    let claimed = Digest::of(format!("not the content {unique}").as_bytes());
    let id = import(
        "liar",
        &ImageSpec {
            layers: vec![busybox_layer(), bad],
            wrong_diff_id: Some((1, claimed.clone())),
        },
    );
    let err = match Sandbox::spawn(
        &config(),
        SandboxSpec {
            image: ImageRef::Stored(id.clone()),
            ..Default::default()
        },
    ) {
        Ok(sb) => {
            let _ = sb.destroy();
            panic!("a layer with a wrong diff_id was accepted");
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&bad_digest.to_string()), "{err}");
    assert!(err.contains(&claimed.to_string()), "{err}");
    assert!(err.contains("diff_id"), "{err}");
    assert!(!layers_dir().join(claimed.hex()).exists());
    assert!(!layers_dir().join(bad_digest.hex()).exists());
    assert!(
        !leftovers()
            .iter()
            .any(|n| n.contains(claimed.hex()) || n.contains(bad_digest.hex())),
        "{:?}",
        leftovers()
    );
    // This image is this run's only: take it out of the store again.
    let store = store();
    let record = store.load_image(&id).unwrap();
    store.remove_image(&id).unwrap();
    for d in [&bad_digest, &record.config_digest, &record.manifest_digest] {
        store.remove(d).unwrap();
    }
}

#[test]
fn a_missing_image_is_a_clear_error() {
    let id = ImageId::parse("im-000000000000000000000001").unwrap();
    let err = Sandbox::spawn(
        &config(),
        SandboxSpec {
            image: ImageRef::Stored(id.clone()),
            ..Default::default()
        },
    )
    .err()
    .expect("spawn of an image that is not in the store")
    .to_string();
    assert!(
        err.contains(id.as_str()) && err.contains("not in the store"),
        "{err}"
    );
    assert_eq!(
        id.as_str().parse::<ImageRef>().unwrap(),
        ImageRef::Stored(id.clone())
    );
}
