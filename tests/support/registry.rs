//! A registry on loopback for the image tests (Debian's `docker-registry`, images pushed with
//! `skopeo`), and what the tests make their images from: a small ustar writer, OCI layouts
//! written byte by byte, temporary directories. Only loopback is contacted.
#![allow(dead_code)]

use rootfs_fetch::oci;
use rootfs_fetch::store::Digest;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A directory of this test process, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = PathBuf::from(format!("/tmp/sbx-it-images-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run_tool(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn skopeo(args: &[&str]) -> String {
    run_tool(
        Command::new("skopeo")
            .arg("--insecure-policy")
            .args(args)
            .env("HOME", std::env::temp_dir()),
    )
}

// ---- a registry on loopback ----

/// Debian's docker-registry on a free port of 127.0.0.1 with its storage in a temp dir; killed
/// (by pid) on drop.
pub struct Registry {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Registry {
    pub fn start(name: &str) -> Registry {
        let dir = TempDir::new(&format!("registry-{name}"));
        for _ in 0..5 {
            let port = free_port();
            let config = dir.0.join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: 127.0.0.1:{port}\n",
                    dir.0.join("data").display()
                ),
            )
            .expect("write the registry config");
            let mut child = Command::new("/usr/bin/docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn docker-registry");
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait().expect("poll docker-registry") {
                    eprintln!("docker-registry exited ({status}); retrying on another port");
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Registry {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port of 127.0.0.1 nobody listens on (bound, then let go).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// A small ustar writer (each byte of the layer is chosen here).
#[derive(Default)]
pub struct Tar(Vec<u8>);

impl Tar {
    pub fn entry(&mut self, path: &str, kind: u8, mode: u32, data: &[u8], link: &str) -> &mut Self {
        assert!(path.len() < 100 && link.len() < 100, "{path}");
        let mut h = [0u8; 512];
        h[..path.len()].copy_from_slice(path.as_bytes());
        let octal = |h: &mut [u8], at: usize, len: usize, v: u64| {
            let s = format!("{v:0w$o}\0", w = len - 1);
            h[at..at + len].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, mode as u64);
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, data.len() as u64);
        octal(&mut h, 136, 12, 1_700_000_000);
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
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.entry(path, b'5', mode, b"", "")
    }
    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> &mut Self {
        self.entry(path, b'0', mode, data, "")
    }
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, b'2', 0o777, b"", target)
    }
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.0);
        out.extend_from_slice(&[0u8; 1024]);
        out
    }
}

/// The busybox-static binary of the host.
pub fn busybox() -> Vec<u8> {
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is installed");
    std::fs::read(bb).expect("read busybox")
}

/// Write an OCI layout in `dir` with one image tagged `tag`: uncompressed tar `layers` (base
/// first) and `config` (the image config's `config` object: Env, Cmd, User, …).
pub fn write_layout_with(dir: &Path, tag: &str, layers: &[Vec<u8>], config: serde_json::Value) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("create the layout");
    let put = |bytes: &[u8]| -> (String, usize) {
        let d = Digest::of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes).expect("write a blob");
        (d.to_string(), bytes.len())
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let (digest, size) = put(l);
        diff_ids.push(digest.clone());
        descs.push(
            serde_json::json!({"mediaType": oci::OCI_LAYER_TAR, "digest": digest, "size": size}),
        );
    }
    let platform = oci::host_platform();
    let config = serde_json::json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).expect("config json"));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "config": {"mediaType": oci::OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": descs,
    });
    let (manifest_digest, manifest_size) =
        put(&serde_json::to_vec(&manifest).expect("manifest json"));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_INDEX,
        "manifests": [{
            "mediaType": oci::OCI_MANIFEST, "digest": manifest_digest, "size": manifest_size,
            "annotations": {(oci::REF_NAME): tag},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Push the image `oci:layout:tag` to `registry` as `name` (`test/busybox:1`); returns the
/// full reference.
pub fn push(registry: &Registry, layout: &Path, tag: &str, name: &str) -> String {
    let image = format!("{}/{name}", registry.addr());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{image}"),
    ]);
    image
}
