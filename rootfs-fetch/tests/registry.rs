//! Pulls from a real registry: Debian's `docker-registry` on 127.0.0.1 with a temporary storage
//! dir, test images built here from busybox-static and pushed with `skopeo`; exports checked
//! with `umoci unpack` and `skopeo`. Only loopback is ever contacted.
//!
//! Without docker-registry/skopeo/umoci/htpasswd (scripts/setup-images.sh installs them) the
//! tests print why and pass, unless `CI` is set: then they fail.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rootfs_fetch::oci;
use rootfs_fetch::reference::{Reference, RegistryRef};
use rootfs_fetch::registry::{self, Progress, PullOptions, RegistryError};
use rootfs_fetch::store::{Digest, Store, StoreError};

// ---------------------------------------------------------------------------------------------
// Tools

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether the tools are there; under CI their absence is a failure.
fn have_tools(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| which(n).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !ci,
        "CI is set but {missing:?} are not installed: run scripts/setup-images.sh"
    );
    // Straight to stderr: the test harness would swallow eprintln! of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {missing:?} not installed (scripts/setup-images.sh installs them)"
    );
    false
}

fn run(cmd: &mut Command) -> String {
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

fn skopeo(args: &[&str]) -> String {
    run(Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .env("HOME", std::env::temp_dir()))
}

/// Push an image of a layout into the registry (plain HTTP on loopback).
fn push(layout: &Path, tag: &str, dest: &str, extra: &[&str]) {
    let src = format!("oci:{}:{tag}", layout.display());
    let dst = format!("docker://{dest}");
    let mut args = vec!["copy", "--dest-tls-verify=false"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[&src, &dst]);
    skopeo(&args);
}

// ---------------------------------------------------------------------------------------------
// A registry on loopback

struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Start docker-registry on a free port of 127.0.0.1, with basic auth when `auth` is given.
    fn start(auth: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let auth_yaml = match auth {
            Some((user, pass)) => {
                let htpasswd = run(Command::new("htpasswd").args(["-Bbn", user, pass]));
                let p = dir.path().join("htpasswd");
                fs::write(&p, htpasswd).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: sbx-test\n    path: {}\n",
                    p.display()
                )
            }
            None => String::new(),
        };
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = dir.path().join("config.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: 127.0.0.1:{port}\n{auth_yaml}",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait().unwrap() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    eprintln!("docker-registry exited ({status}): {err}; retrying");
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Registry { child, port, dir };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start");
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the registry keeps a blob's bytes.
    fn blob_data(&self, d: &Digest) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&d.hex()[..2])
            .join(d.hex())
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Test images, built from busybox-static

#[derive(Clone)]
enum Node {
    File(Vec<u8>, u32),
    Dir,
    Symlink(&'static str),
}

fn tar_of(entries: &[(&str, Node)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, node) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match node {
            Node::File(content, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(content.len() as u64);
                b.append_data(&mut h, name, &content[..]).unwrap();
            }
            Node::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, name, &[][..]).unwrap();
            }
            Node::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, name, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn zstd(b: &[u8]) -> Vec<u8> {
    zstd::encode_all(b, 3).unwrap()
}

struct Layer {
    tar: Vec<u8>,
    blob: Vec<u8>,
    media_type: &'static str,
}

impl Layer {
    fn diff_id(&self) -> Digest {
        Digest::of(&self.tar)
    }
    fn digest(&self) -> Digest {
        Digest::of(&self.blob)
    }
}

fn busybox() -> Vec<u8> {
    fs::read(which("busybox").expect("busybox-static is installed")).unwrap()
}

/// The base layer: busybox and a few links to it, gzip.
fn base_layer() -> Layer {
    let tar = tar_of(&[
        ("bin", Node::Dir),
        ("bin/busybox", Node::File(busybox(), 0o755)),
        ("bin/sh", Node::Symlink("busybox")),
        ("bin/cat", Node::Symlink("busybox")),
        ("etc", Node::Dir),
        (
            "etc/passwd",
            Node::File(b"root:x:0:0:root:/root:/bin/sh\n".to_vec(), 0o644),
        ),
    ]);
    Layer {
        blob: gzip(&tar),
        tar,
        media_type: oci::OCI_LAYER_GZIP,
    }
}

/// A second layer, compressed as asked.
fn app_layer(zstd_compressed: bool) -> Layer {
    let tar = tar_of(&[
        ("etc", Node::Dir),
        (
            "etc/hello",
            Node::File(b"hello from layer 2\n".to_vec(), 0o644),
        ),
        ("srv", Node::Dir),
    ]);
    if zstd_compressed {
        Layer {
            blob: zstd(&tar),
            tar,
            media_type: oci::OCI_LAYER_ZSTD,
        }
    } else {
        Layer {
            blob: gzip(&tar),
            tar,
            media_type: oci::OCI_LAYER_GZIP,
        }
    }
}

fn config(arch: &str, layers: &[&Layer]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "GREETING=hi"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/srv",
            "User": "0",
            "ExposedPorts": {"8080/tcp": {}},
        },
        "rootfs": {"type": "layers",
                   "diff_ids": layers.iter().map(|l| l.diff_id().to_string()).collect::<Vec<_>>()},
    }))
    .unwrap()
}

struct LayoutWriter {
    dir: PathBuf,
    index: Vec<serde_json::Value>,
}

fn desc(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": Digest::of(bytes).to_string(),
                       "size": bytes.len()})
}

impl LayoutWriter {
    fn new(dir: &Path) -> LayoutWriter {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        LayoutWriter {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        }
    }

    fn blob(&self, bytes: &[u8]) -> Digest {
        let d = Digest::of(bytes);
        fs::write(self.dir.join("blobs/sha256").join(d.hex()), bytes).unwrap();
        d
    }

    /// Write an image; returns (manifest bytes, config bytes).
    fn image(&self, arch: &str, layers: &[&Layer]) -> (Vec<u8>, Vec<u8>) {
        let cfg = config(arch, layers);
        self.blob(&cfg);
        for l in layers {
            self.blob(&l.blob);
        }
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci::OCI_MANIFEST,
            "config": desc(oci::OCI_CONFIG, &cfg),
            "layers": layers.iter().map(|l| desc(l.media_type, &l.blob)).collect::<Vec<_>>(),
        }))
        .unwrap();
        self.blob(&m);
        (m, cfg)
    }

    fn tag(&mut self, media_type: &str, bytes: &[u8], name: &str) {
        let mut d = desc(media_type, bytes);
        d["annotations"] = serde_json::json!({ oci::REF_NAME: name });
        self.index.push(d);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.index});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}

fn host_arch() -> String {
    oci::host_platform().architecture
}

/// The test images: `base` (busybox, gzip), `app` (base + a zstd layer), `app-gz` (base + the
/// same files gzip), `multi` (an index: the host's platform and another).
struct Images {
    _tmp: tempfile::TempDir,
    layout: PathBuf,
    base: Layer,
    app: Layer,
    base_manifest: Digest,
    base_config: Vec<u8>,
}

fn build_images() -> Images {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let mut w = LayoutWriter::new(&layout);
    let base = base_layer();
    let app = app_layer(true);
    let app_gz = app_layer(false);
    let (bm, base_config) = w.image(&host_arch(), &[&base]);
    w.tag(oci::OCI_MANIFEST, &bm, "base");
    let (am, _) = w.image(&host_arch(), &[&base, &app]);
    w.tag(oci::OCI_MANIFEST, &am, "app");
    let (agm, _) = w.image(&host_arch(), &[&base, &app_gz]);
    w.tag(oci::OCI_MANIFEST, &agm, "app-gz");
    let other = if host_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let (om, _) = w.image(other, &[&base]);
    let platform = |m: &[u8], arch: &str| {
        let mut d = desc(oci::OCI_MANIFEST, m);
        d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        d
    };
    let idx = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": oci::OCI_INDEX,
        "manifests": [platform(&om, other), platform(&bm, &host_arch())],
    }))
    .unwrap();
    w.blob(&idx);
    w.tag(oci::OCI_INDEX, &idx, "multi");
    Images {
        _tmp: tmp,
        layout,
        base,
        app,
        base_manifest: Digest::of(&bm),
        base_config,
    }
}

// ---------------------------------------------------------------------------------------------
// Progress that remembers

#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Started(Digest, u64),
    Resumed(Digest, u64),
    Bytes(Digest, u64),
    Done(Digest, bool),
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Ev>>);

impl Progress for Recorder {
    fn layer_started(&self, d: &Digest, size: u64) {
        self.0.lock().unwrap().push(Ev::Started(d.clone(), size));
    }
    fn layer_resumed(&self, d: &Digest, offset: u64) {
        self.0.lock().unwrap().push(Ev::Resumed(d.clone(), offset));
    }
    fn layer_bytes(&self, d: &Digest, n: u64) {
        self.0.lock().unwrap().push(Ev::Bytes(d.clone(), n));
    }
    fn layer_done(&self, d: &Digest, skipped: bool) {
        self.0.lock().unwrap().push(Ev::Done(d.clone(), skipped));
    }
}

impl Recorder {
    fn done(&self) -> BTreeMap<Digest, bool> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Ev::Done(d, s) => Some((d.clone(), *s)),
                _ => None,
            })
            .collect()
    }
    fn bytes(&self, d: &Digest) -> u64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|e| match e {
                Ev::Bytes(x, n) if x == d => *n,
                _ => 0,
            })
            .sum()
    }
}

fn rref(s: &str) -> RegistryRef {
    match Reference::parse(s).unwrap() {
        Reference::Registry(r) => r,
        other => panic!("{other:?}"),
    }
}

async fn pull(
    store: &Store,
    r: &str,
    opts: &PullOptions,
) -> (Result<registry::PullReport, RegistryError>, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let res = registry::pull(store, &rref(r), opts, rec.clone()).await;
    (res, rec)
}

fn no_partials(store: &Store) {
    let left: Vec<_> = fs::read_dir(store.root().join("blobs/.partial"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left in .partial: {left:?}");
}

const ALL: &[&str] = &["docker-registry", "skopeo", "busybox"];

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_verifies_shares_layers_and_pins_digests() {
    if !have_tools(ALL) {
        return;
    }
    let img = build_images();
    let reg = Registry::start(None);
    let a = reg.addr();
    push(&img.layout, "base", &format!("{a}/test/busybox:1"), &[]);
    push(&img.layout, "app", &format!("{a}/test/app:1"), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("images")).unwrap();
    let opts = PullOptions::default();

    let (res, rec) = pull(&store, &format!("{a}/test/busybox:1"), &opts).await;
    let rep = res.unwrap();
    let r = &rep.record;
    assert_eq!(rep.downloaded, vec![img.base.digest()]);
    assert!(rep.skipped.is_empty());
    assert_eq!(rec.done(), BTreeMap::from([(img.base.digest(), false)]));
    assert_eq!(rec.bytes(&img.base.digest()), img.base.blob.len() as u64);
    assert!(rec
        .0
        .lock()
        .unwrap()
        .contains(&Ev::Started(img.base.digest(), img.base.blob.len() as u64)));
    // The record: diff_ids, config, the manifest digest skopeo pushed (tag resolved to it).
    assert_eq!(r.reference, format!("{a}/test/busybox:1"));
    assert_eq!(
        r.diff_ids().cloned().collect::<Vec<_>>(),
        vec![img.base.diff_id()]
    );
    assert_eq!(r.layers[0].media_type, oci::OCI_LAYER_GZIP);
    assert_eq!(r.layers[0].size, img.base.blob.len() as u64);
    assert_eq!(r.config_digest, Digest::of(&img.base_config));
    assert_eq!(r.manifest_digest, img.base_manifest);
    assert_eq!(r.config.env, vec!["PATH=/bin", "GREETING=hi"]);
    assert_eq!(r.config.cmd, Some(vec!["/bin/sh".to_string()]));
    assert_eq!(r.config.entrypoint, None);
    assert_eq!(r.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(r.config.user.as_deref(), Some("0"));
    assert_eq!(r.config.exposed_ports, vec!["8080/tcp"]);
    assert_eq!(r.architecture, host_arch());
    for d in registry::required_blobs(r) {
        store.verify(&d).unwrap();
    }
    assert_eq!(store.load_image(&r.id).unwrap(), *r);
    assert_eq!(
        store.resolve_tag(&format!("{a}/test/busybox:1")).unwrap(),
        Some(r.id.clone())
    );
    assert_eq!(
        store
            .resolve_tag(&format!("{a}/test/busybox@{}", img.base_manifest))
            .unwrap(),
        Some(r.id.clone())
    );
    no_partials(&store);

    // A second image on the same base downloads only its own layer.
    let (res, rec) = pull(&store, &format!("{a}/test/app:1"), &opts).await;
    let rep = res.unwrap();
    assert_eq!(rep.skipped, vec![img.base.digest()]);
    assert_eq!(rep.downloaded, vec![img.app.digest()]);
    assert_eq!(
        rec.done(),
        BTreeMap::from([(img.base.digest(), true), (img.app.digest(), false)])
    );
    assert_eq!(rec.bytes(&img.base.digest()), 0);
    assert_eq!(rep.record.layers[1].media_type, oci::OCI_LAYER_ZSTD);
    assert_eq!(
        rep.record.diff_ids().cloned().collect::<Vec<_>>(),
        vec![img.base.diff_id(), img.app.diff_id()]
    );
    store.verify(&img.app.digest()).unwrap();

    // Pinned by digest: the same image, nothing downloaded.
    let pinned = format!("{a}/test/busybox@{}", img.base_manifest);
    let (res, _) = pull(&store, &pinned, &opts).await;
    let rep = res.unwrap();
    assert_eq!(rep.record.id, r.id);
    assert_eq!(rep.record.manifest_digest, img.base_manifest);
    assert!(rep.downloaded.is_empty());
    // Tag and digest together: the digest wins and is checked.
    let (res, _) = pull(
        &store,
        &format!("{a}/test/busybox:1@{}", img.base_manifest),
        &opts,
    )
    .await;
    assert_eq!(res.unwrap().record.id, r.id);

    // A digest the registry does not have, a tag it does not have: errors naming the reference.
    let missing = format!("{a}/test/busybox@{}", Digest::of(b"no such manifest"));
    let (res, _) = pull(&store, &missing, &opts).await;
    let e = res.unwrap_err().to_string();
    assert!(e.contains(&missing), "{e}");
    let (res, _) = pull(&store, &format!("{a}/test/busybox:nope"), &opts).await;
    let e = res.unwrap_err().to_string();
    assert!(e.contains("test/busybox:nope"), "{e}");
    assert_eq!(store.list_images().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_schema2_and_multi_platform_indexes() {
    if !have_tools(&["docker-registry", "skopeo", "busybox", "umoci"]) {
        return;
    }
    let img = build_images();
    let reg = Registry::start(None);
    let a = reg.addr();
    // skopeo converts the OCI image to Docker v2 schema 2 on the way.
    push(
        &img.layout,
        "base",
        &format!("{a}/test/v2s2:1"),
        &["--format", "v2s2"],
    );
    push(
        &img.layout,
        "multi",
        &format!("{a}/test/multi:1"),
        &["--all"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("images")).unwrap();
    let opts = PullOptions::default();

    let rep = pull(&store, &format!("{a}/test/v2s2:1"), &opts)
        .await
        .0
        .unwrap();
    let r = rep.record;
    assert_eq!(r.layers[0].media_type, oci::DOCKER_LAYER_GZIP);
    assert_eq!(r.layers[0].diff_id, img.base.diff_id());
    let manifest: serde_json::Value =
        serde_json::from_slice(&store.read(&r.manifest_digest).unwrap()).unwrap();
    assert_eq!(manifest["mediaType"], oci::DOCKER_MANIFEST);
    assert_eq!(r.config.cmd, Some(vec!["/bin/sh".to_string()]));

    // Exported, a Docker image becomes an OCI one that umoci unpacks.
    let out = tmp.path().join("export");
    let md = oci::export_oci_layout(&store, &r, &out, "v2s2").unwrap();
    assert_ne!(md, r.manifest_digest);
    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:v2s2", out.display()))
        .arg(&bundle));
    assert_eq!(
        fs::read(bundle.join("rootfs/bin/busybox")).unwrap(),
        busybox()
    );

    // An index: this host's platform is chosen; the index digest is recorded and pins too.
    let rep = pull(&store, &format!("{a}/test/multi:1"), &opts)
        .await
        .0
        .unwrap();
    let r = rep.record;
    assert_eq!(r.architecture, host_arch());
    assert_eq!(r.manifest_digest, img.base_manifest);
    let index = r.index_digest.clone().expect("pulled through an index");
    store.verify(&index).unwrap();
    let rep = pull(&store, &format!("{a}/test/multi@{index}"), &opts)
        .await
        .0
        .unwrap();
    assert_eq!(rep.record.id, r.id);
    assert_eq!(rep.record.index_digest, Some(index));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_blob_fails_and_nothing_is_kept() {
    if !have_tools(ALL) {
        return;
    }
    let img = build_images();
    let reg = Registry::start(None);
    let a = reg.addr();
    push(&img.layout, "app", &format!("{a}/test/app:1"), &[]);
    // Flip a byte of the base layer where the registry keeps it (same size).
    let data = reg.blob_data(&img.base.digest());
    let mut bytes = fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&data, &bytes).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("images")).unwrap();
    let (res, rec) = pull(&store, &format!("{a}/test/app:1"), &PullOptions::default()).await;
    let e = res.unwrap_err();
    match &e {
        RegistryError::Corrupt { digest, .. } => assert_eq!(digest, &img.base.digest()),
        other => panic!("expected a verification failure, got {other}"),
    }
    assert!(
        e.to_string().contains(&img.base.digest().to_string()),
        "{e}"
    );
    assert!(!store.has(&img.base.digest()));
    assert_eq!(store.partial_len(&img.base.digest()), 0);
    assert!(!rec.done().contains_key(&img.base.digest()));
    assert!(store.list_images().unwrap().is_empty());
    assert!(store.list_tags().unwrap().is_empty());
    no_partials(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_pull_resumes_with_a_range_request() {
    if !have_tools(ALL) {
        return;
    }
    let img = build_images();
    let reg = Registry::start(None);
    let a = reg.addr();
    push(&img.layout, "base", &format!("{a}/test/busybox:1"), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("images")).unwrap();
    let d = img.base.digest();
    let size = img.base.blob.len() as u64;

    // What an interrupted download leaves: the first bytes under .partial.
    let half = img.base.blob.len() / 2;
    let mut w = store.writer(&d, Some(size)).unwrap().unwrap();
    w.write_all(&img.base.blob[..half]).unwrap();
    drop(w);
    assert_eq!(store.partial_len(&d), half as u64);

    let (res, rec) = pull(
        &store,
        &format!("{a}/test/busybox:1"),
        &PullOptions::default(),
    )
    .await;
    let rep = res.unwrap();
    assert_eq!(rep.resumed, vec![(d.clone(), half as u64)]);
    assert!(rec
        .0
        .lock()
        .unwrap()
        .contains(&Ev::Resumed(d.clone(), half as u64)));
    // Only the rest came over the wire.
    assert_eq!(rec.bytes(&d), size - half as u64);
    store.verify(&d).unwrap();
    no_partials(&store);

    // Garbage in the partial file: the resumed blob fails verification, is fetched again whole.
    let store = Store::new(tmp.path().join("images2")).unwrap();
    let mut w = store.writer(&d, Some(size)).unwrap().unwrap();
    w.write_all(&vec![0u8; 4096]).unwrap();
    drop(w);
    let (res, rec) = pull(
        &store,
        &format!("{a}/test/busybox:1"),
        &PullOptions::default(),
    )
    .await;
    res.unwrap();
    assert_eq!(rec.bytes(&d), size - 4096 + size);
    store.verify(&d).unwrap();
    no_partials(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_from_a_credentials_file() {
    if !have_tools(&["docker-registry", "skopeo", "busybox", "htpasswd"]) {
        return;
    }
    let img = build_images();
    let reg = Registry::start(Some(("sbx", "s3cret")));
    let a = reg.addr();
    push(
        &img.layout,
        "base",
        &format!("{a}/test/private:1"),
        &["--dest-creds", "sbx:s3cret"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("images")).unwrap();
    let r = format!("{a}/test/private:1");

    // Anonymous: refused.
    let (res, _) = pull(&store, &r, &PullOptions::default()).await;
    let e = res.unwrap_err().to_string();
    assert!(e.contains(&r), "{e}");
    assert!(e.to_lowercase().contains("authoriz"), "{e}");

    // Wrong password: refused.
    let creds = tmp.path().join("auth.json");
    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    fs::write(
        &creds,
        format!(r#"{{"auths":{{"{a}":{{"auth":"{}"}}}}}}"#, b64("sbx:wrong")),
    )
    .unwrap();
    let opts = PullOptions {
        credentials: Some(creds.clone()),
        ..PullOptions::default()
    };
    assert!(pull(&store, &r, &opts).await.0.is_err());
    assert!(store.list_images().unwrap().is_empty());

    // The right one, from the docker config.json format.
    fs::write(
        &creds,
        format!(
            r#"{{"auths":{{"http://{a}":{{"auth":"{}"}}}}}}"#,
            b64("sbx:s3cret")
        ),
    )
    .unwrap();
    let rep = pull(&store, &r, &opts).await.0.unwrap();
    assert_eq!(
        rep.record.diff_ids().cloned().collect::<Vec<_>>(),
        vec![img.base.diff_id()]
    );
    store.verify(&img.base.digest()).unwrap();

    // The default place of the file under a state dir.
    let o = PullOptions::for_state_dir(Path::new("/var/lib/sbx"));
    if std::env::var_os(registry::AUTH_ENV).is_none() {
        assert_eq!(
            o.credentials.as_deref(),
            Some(Path::new("/var/lib/sbx/auth.json"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_unpack_with_umoci_and_push_with_skopeo() {
    if !have_tools(&["docker-registry", "skopeo", "busybox", "umoci"]) {
        return;
    }
    let img = build_images();
    let reg = Registry::start(None);
    let a = reg.addr();
    push(&img.layout, "app-gz", &format!("{a}/test/app:1"), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("images")).unwrap();
    let r = pull(&store, &format!("{a}/test/app:1"), &PullOptions::default())
        .await
        .0
        .unwrap()
        .record;

    let out = tmp.path().join("export");
    let md = oci::export_oci_layout(&store, &r, &out, "exported").unwrap();
    assert_eq!(
        md, r.manifest_digest,
        "a pulled OCI manifest is exported as is"
    );
    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:exported", out.display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    assert_eq!(fs::read(rootfs.join("bin/busybox")).unwrap(), busybox());
    assert_eq!(
        fs::read_link(rootfs.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/hello")).unwrap(),
        "hello from layer 2\n"
    );
    let runtime: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(runtime["process"]["cwd"], "/srv");

    // skopeo reads the layout and pushes it; pulled back it is the same image.
    push(&out, "exported", &format!("{a}/test/exported:1"), &[]);
    let rep = pull(
        &store,
        &format!("{a}/test/exported:1"),
        &PullOptions::default(),
    )
    .await
    .0
    .unwrap();
    assert_eq!(rep.record.id, r.id);
    assert_eq!(rep.record.manifest_digest, md);
    assert!(rep.downloaded.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_archives_from_skopeo_import() {
    if !have_tools(&["skopeo", "busybox", "umoci"]) {
        return;
    }
    let img = build_images();
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("busybox.tar");
    skopeo(&[
        "copy",
        // Docker archives cannot hold zstd layers: the gzip twin of `app`.
        &format!("oci:{}:app-gz", img.layout.display()),
        &format!("docker-archive:{}:test/busybox:1", archive.display()),
    ]);
    let store = Store::new(tmp.path().join("images")).unwrap();
    let r = oci::import_docker_archive(&store, &archive).unwrap();
    assert_eq!(
        r.diff_ids().cloned().collect::<Vec<_>>(),
        vec![img.base.diff_id(), img.app.diff_id()]
    );
    for l in &r.layers {
        store.verify(&l.digest).unwrap();
        // docker-archive layers are stored as they come: uncompressed tars (digest = diff_id)
        // or compressed ones whose media type says so.
        assert!(
            oci::layer_compression(&l.media_type).is_some(),
            "{}",
            l.media_type
        );
        if l.media_type == oci::OCI_LAYER_TAR {
            assert_eq!(l.digest, l.diff_id);
        }
    }
    assert_eq!(r.config.env, vec!["PATH=/bin", "GREETING=hi"]);
    assert_eq!(r.config.exposed_ports, vec!["8080/tcp"]);
    assert_eq!(store.resolve_tag(&r.reference).unwrap(), Some(r.id.clone()));

    let out = tmp.path().join("export");
    oci::export_oci_layout(&store, &r, &out, "archived").unwrap();
    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:archived", out.display()))
        .arg(&bundle));
    assert_eq!(
        fs::read_to_string(bundle.join("rootfs/etc/hello")).unwrap(),
        "hello from layer 2\n"
    );

    // Rotten store blobs are not exported.
    let l0 = &r.layers[0].digest;
    let p = store.blob_path(l0);
    let mut bytes = fs::read(&p).unwrap();
    bytes[100] ^= 1;
    fs::write(&p, bytes).unwrap();
    let e = oci::export_oci_layout(&store, &r, &tmp.path().join("export2"), "x").unwrap_err();
    assert!(
        matches!(e, oci::OciError::Store(StoreError::DigestMismatch { .. })),
        "{e}"
    );
}

/// The pull drives HTTP streams from blocking threads: that must also work when the caller's
/// runtime has a single thread.
#[tokio::test(flavor = "current_thread")]
async fn pull_works_on_a_current_thread_runtime() {
    if !have_tools(ALL) {
        return;
    }
    let img = build_images();
    let reg = Registry::start(None);
    let a = reg.addr();
    push(&img.layout, "app", &format!("{a}/test/app:1"), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("images")).unwrap();
    let opts = PullOptions {
        concurrency: 1,
        ..PullOptions::default()
    };
    let rep = pull(&store, &format!("{a}/test/app:1"), &opts)
        .await
        .0
        .unwrap();
    assert_eq!(rep.downloaded, vec![img.base.digest(), img.app.digest()]);
    for l in &rep.record.layers {
        store.verify(&l.digest).unwrap();
    }
}
