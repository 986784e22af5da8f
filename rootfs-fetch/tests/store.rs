//! The content store and the local image formats: blobs verified while written, resumed,
//! written by several threads and processes at once; image records and tags; OCI layouts and
//! docker archives imported, exported and imported again. No outside tools needed.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rootfs_fetch::oci::{self, OciError};
use rootfs_fetch::store::{
    Digest, ImageConfig, ImageId, ImageRecord, LayerRef, PutOutcome, Store, StoreError,
};

fn partial_dir_entries(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(store.root().join("blobs/.partial"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn blobs_are_verified_and_bad_ones_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path().join("images")).unwrap();
    let body = data(1 << 20, 1);
    let d = Digest::of(&body);

    assert!(!store.has(&d));
    assert_eq!(
        store
            .put_stream(&d, Some(body.len() as u64), &body[..])
            .unwrap(),
        PutOutcome::Written(body.len() as u64)
    );
    assert!(store.has(&d));
    assert_eq!(store.read(&d).unwrap(), body);
    store.verify(&d).unwrap();
    assert_eq!(
        store.blob_path(&d),
        dir.path().join("images/blobs/sha256").join(d.hex())
    );
    // Present: the reader is not even read.
    struct Boom;
    impl Read for Boom {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            panic!("a present blob must not be read again")
        }
    }
    assert_eq!(
        store.put_stream(&d, None, Boom).unwrap(),
        PutOutcome::AlreadyPresent
    );

    // Wrong content for a digest: typed error, nothing kept.
    let other = Digest::of(b"something else");
    let e = store.put_stream(&other, None, &body[..]).unwrap_err();
    match &e {
        StoreError::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &other);
            assert_eq!(actual, &d);
        }
        e => panic!("{e}"),
    }
    assert!(e.to_string().contains(&other.to_string()), "{e}");
    assert!(!store.has(&other));
    assert_eq!(store.partial_len(&other), 0);

    // Wrong size, both ways.
    let small = b"small".to_vec();
    let sd = Digest::of(&small);
    assert!(matches!(
        store.put_stream(&sd, Some(4), &small[..]),
        Err(StoreError::SizeMismatch { .. })
    ));
    assert!(matches!(
        store.put_stream(&sd, Some(6), &small[..]),
        Err(StoreError::SizeMismatch { .. })
    ));
    assert!(!store.has(&sd));
    assert_eq!(partial_dir_entries(&store), Vec::<String>::new());

    // A source that fails mid-way keeps nothing either (put_stream starts from 0 anyway).
    struct Fails(usize);
    impl Read for Fails {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("connection reset"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(7);
            self.0 -= n;
            Ok(n)
        }
    }
    let e = store.put_stream(&sd, None, Fails(1000)).unwrap_err();
    assert!(e.to_string().contains("connection reset"), "{e}");
    assert!(!store.has(&sd));

    // Rot on disk is found by verify, and remove lets it be fetched again.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(store.blob_path(&d))
        .unwrap();
    f.write_all(b"X").unwrap();
    drop(f);
    assert!(matches!(
        store.verify(&d),
        Err(StoreError::DigestMismatch { .. })
    ));
    assert!(store.remove(&d).unwrap());
    assert!(!store.remove(&d).unwrap());
    assert!(matches!(
        store.open(&d),
        Err(StoreError::BlobMissing { .. })
    ));
}

#[test]
fn interrupted_writes_resume_from_their_length() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path()).unwrap();
    let body = data(300_000, 2);
    let d = Digest::of(&body);
    let size = Some(body.len() as u64);

    let mut w = store.writer(&d, size).unwrap().unwrap();
    assert_eq!(w.offset(), 0);
    w.write_all(&body[..123_456]).unwrap();
    drop(w); // interrupted
    assert_eq!(store.partial_len(&d), 123_456);
    assert!(!store.has(&d));

    let mut w = store.writer(&d, size).unwrap().unwrap();
    assert_eq!(w.offset(), 123_456);
    w.copy_from(&body[123_456..]).unwrap();
    assert_eq!(w.finish().unwrap(), body.len() as u64);
    store.verify(&d).unwrap();
    assert_eq!(store.partial_len(&d), 0);
    assert!(store.writer(&d, size).unwrap().is_none());

    // Bad bytes in a partial file: the resumed whole does not verify and is dropped.
    let body2 = data(50_000, 3);
    let d2 = Digest::of(&body2);
    let mut w = store.writer(&d2, None).unwrap().unwrap();
    w.write_all(&[0u8; 1000]).unwrap();
    drop(w);
    let mut w = store.writer(&d2, None).unwrap().unwrap();
    assert_eq!(w.offset(), 1000);
    w.write_all(&body2[1000..]).unwrap();
    assert!(matches!(w.finish(), Err(StoreError::DigestMismatch { .. })));
    assert_eq!(store.partial_len(&d2), 0);
    // A partial file longer than the blob is dropped when the size is known.
    let mut w = store.writer(&d2, None).unwrap().unwrap();
    w.write_all(&data(60_000, 9)).unwrap();
    drop(w);
    let mut w = store
        .writer(&d2, Some(body2.len() as u64))
        .unwrap()
        .unwrap();
    assert_eq!(w.offset(), 0);
    w.write_all(&body2).unwrap();
    w.finish().unwrap();
    store.verify(&d2).unwrap();
    // restart() drops resumed bytes (a source that cannot serve ranges).
    let body3 = data(10_000, 4);
    let d3 = Digest::of(&body3);
    let mut w = store.writer(&d3, None).unwrap().unwrap();
    w.write_all(&body3[..5000]).unwrap();
    drop(w);
    let mut w = store.writer(&d3, None).unwrap().unwrap();
    assert_eq!(w.offset(), 5000);
    w.restart().unwrap();
    assert_eq!(w.offset(), 0);
    w.write_all(&body3).unwrap();
    w.finish().unwrap();
    assert_eq!(store.read(&d3).unwrap(), body3);
    assert_eq!(partial_dir_entries(&store), Vec::<String>::new());
}

/// A reader that hands out its bytes slowly, so that writers overlap.
struct Slow<'a> {
    data: &'a [u8],
    pos: usize,
}
impl Read for Slow<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.data.len() {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(2));
        let n = buf.len().min(4096).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn concurrent_writers_of_one_blob_do_not_corrupt_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path()).unwrap();
    let body = data(200_000, 5);
    let d = Digest::of(&body);
    let outcomes: Vec<PutOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    store
                        .put_stream(
                            &d,
                            Some(body.len() as u64),
                            Slow {
                                data: &body,
                                pos: 0,
                            },
                        )
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let written = outcomes
        .iter()
        .filter(|o| matches!(o, PutOutcome::Written(_)))
        .count();
    assert_eq!(written, 1, "{outcomes:?}");
    store.verify(&d).unwrap();
    assert_eq!(partial_dir_entries(&store), Vec::<String>::new());
}

const CHILD_ENV: &str = "SBX_STORE_TEST_CHILD_ROOT";

/// Not a test on its own: the body of each child process of
/// `writers_in_several_processes_do_not_corrupt_a_blob`.
#[test]
fn child_writer_process() {
    let Some(root) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = Store::new(PathBuf::from(root)).unwrap();
    let body = data(400_000, 6);
    let d = Digest::of(&body);
    let out = store
        .put_stream(
            &d,
            Some(body.len() as u64),
            Slow {
                data: &body,
                pos: 0,
            },
        )
        .unwrap();
    println!("OUTCOME {out:?}");
}

#[test]
fn writers_in_several_processes_do_not_corrupt_a_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", "child_writer_process", "--nocapture"])
                .env(CHILD_ENV, dir.path())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut written = 0;
    for c in children {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        assert!(stdout.contains("OUTCOME"), "{stdout}");
        if stdout.contains("OUTCOME Written") {
            written += 1;
        }
    }
    assert_eq!(written, 1);
    let d = Digest::of(&data(400_000, 6));
    store.verify(&d).unwrap();
    assert_eq!(partial_dir_entries(&store), Vec::<String>::new());
}

#[test]
fn computed_blobs_are_named_by_their_content() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path()).unwrap();
    let body = data(70_000, 7);
    let (d, size) = store.put_computed(&body[..]).unwrap();
    assert_eq!(d, Digest::of(&body));
    assert_eq!(size, body.len() as u64);
    store.verify(&d).unwrap();
    // Twice is harmless.
    assert_eq!(store.put_computed(&body[..]).unwrap().0, d);
    assert_eq!(partial_dir_entries(&store), Vec::<String>::new());
}

fn record(config: &[u8], reference: &str) -> ImageRecord {
    let cd = Digest::of(config);
    ImageRecord {
        id: ImageId::from_config_digest(&cd),
        reference: reference.to_string(),
        manifest_digest: Digest::of(b"manifest"),
        index_digest: None,
        config_digest: cd,
        layers: vec![LayerRef {
            digest: Digest::of(b"l"),
            diff_id: Digest::of(b"d"),
            media_type: oci::OCI_LAYER_GZIP.into(),
            size: 1,
        }],
        config: ImageConfig {
            env: vec!["A=1".into()],
            entrypoint: Some(vec![]),
            cmd: None,
            working_dir: Some("/w".into()),
            user: None,
            exposed_ports: vec!["80/tcp".into()],
        },
        os: "linux".into(),
        architecture: "amd64".into(),
        created_at: 1,
        host_base: false,
        parent: None,
    }
}

#[test]
fn image_records_and_tags() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path()).unwrap();
    let a = record(b"config a", "127.0.0.1:5000/a:1");
    let b = record(b"config b", "oci:/x:b");
    assert!(a.id.as_str().starts_with("im-") && a.id.as_str().len() == 27);
    assert_eq!(&a.id.as_str()[3..], &a.config_digest.hex()[..24]);
    store.save_image(&a).unwrap();
    store.save_image(&b).unwrap();
    assert!(dir.path().join(format!("images/{}.json", a.id)).is_file());
    assert_eq!(store.load_image(&a.id).unwrap(), a);
    assert_eq!(
        store
            .list_images()
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        {
            let mut v = vec![a.id.clone(), b.id.clone()];
            v.sort();
            v
        }
    );
    let long = format!(
        "reg.example.com/{}:{}",
        "x/".repeat(100) + "y",
        "t".repeat(128)
    );
    for r in [
        "127.0.0.1:5000/a:1",
        "127.0.0.1:5000/a@sha256:00",
        long.as_str(),
    ] {
        store.set_tag(r, &a.id).unwrap();
    }
    store.set_tag("oci:/x:b", &b.id).unwrap();
    assert_eq!(
        store.resolve_tag("127.0.0.1:5000/a:1").unwrap(),
        Some(a.id.clone())
    );
    assert_eq!(store.resolve_tag(&long).unwrap(), Some(a.id.clone()));
    assert_eq!(store.resolve_tag("nope").unwrap(), None);
    // Re-tag moves it.
    store.set_tag("127.0.0.1:5000/a:1", &b.id).unwrap();
    assert_eq!(
        store.resolve_tag("127.0.0.1:5000/a:1").unwrap(),
        Some(b.id.clone())
    );
    assert_eq!(store.list_tags().unwrap().len(), 4);
    // Removing an image removes its tags, not the others'.
    assert!(store.remove_image(&a.id).unwrap());
    assert!(!store.remove_image(&a.id).unwrap());
    assert!(matches!(
        store.load_image(&a.id),
        Err(StoreError::ImageMissing { .. })
    ));
    let tags = store.list_tags().unwrap();
    assert_eq!(tags.len(), 2, "{tags:?}");
    assert!(tags.iter().all(|(_, id)| id == &b.id));
    // No temp files are left behind by the atomic writes.
    for sub in ["images", "tags"] {
        for e in fs::read_dir(dir.path().join(sub)).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.starts_with(".tmp"), "{n}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Local image formats, built here by hand.

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *content).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn config_json(arch: &str, diff_ids: &[&Digest]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/srv",
                   "ExposedPorts": {"8080/tcp": {}}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>()},
    }))
    .unwrap()
}

fn put_blob(layout: &Path, bytes: &[u8]) -> Digest {
    let d = Digest::of(bytes);
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::write(layout.join("blobs/sha256").join(d.hex()), bytes).unwrap();
    d
}

fn desc(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": Digest::of(bytes).to_string(), "size": bytes.len()})
}

fn manifest_json(config: &[u8], layers: &[(&str, &[u8])]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "config": desc(oci::OCI_CONFIG, config),
        "layers": layers.iter().map(|(mt, b)| desc(mt, b)).collect::<Vec<_>>(),
    }))
    .unwrap()
}

fn host_arch() -> String {
    oci::host_platform().architecture
}

fn other_arch() -> &'static str {
    if host_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    }
}

struct TestLayout {
    dir: PathBuf,
    tar1: Vec<u8>,
    gz1: Vec<u8>,
    tar2: Vec<u8>,
    plain_manifest: Digest,
    host_manifest: Digest,
    index: Digest,
}

/// A layout with three names: `plain` (two layers, gzip + uncompressed), `nested` (an index of
/// the host's platform and another one), and `other` (only the other platform).
fn build_layout(dir: &Path) -> TestLayout {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let tar1 = tar_of(&[("etc/one", b"one\n")]);
    let gz1 = gzip(&tar1);
    let tar2 = tar_of(&[("etc/two", b"two\n")]);
    let (d1, d2) = (Digest::of(&tar1), Digest::of(&tar2));
    put_blob(dir, &gz1);
    put_blob(dir, &tar2);
    let cfg_host = config_json(&host_arch(), &[&d1, &d2]);
    let cfg_other = config_json(other_arch(), &[&d1]);
    put_blob(dir, &cfg_host);
    put_blob(dir, &cfg_other);
    let m_host = manifest_json(
        &cfg_host,
        &[(oci::OCI_LAYER_GZIP, &gz1), (oci::OCI_LAYER_TAR, &tar2)],
    );
    let m_other = manifest_json(&cfg_other, &[(oci::OCI_LAYER_GZIP, &gz1)]);
    let host_manifest = put_blob(dir, &m_host);
    put_blob(dir, &m_other);
    let with_platform = |m: &[u8], arch: &str| {
        let mut d = desc(oci::OCI_MANIFEST, m);
        d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        d
    };
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": oci::OCI_INDEX,
        "manifests": [with_platform(&m_other, other_arch()), with_platform(&m_host, &host_arch())],
    }))
    .unwrap();
    let index = put_blob(dir, &nested);
    let named = |mut d: serde_json::Value, name: &str| {
        d["annotations"] = serde_json::json!({ oci::REF_NAME: name });
        d
    };
    let index_json = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [
            named(desc(oci::OCI_MANIFEST, &m_host), "plain"),
            named(desc(oci::OCI_INDEX, &nested), "nested"),
            named(desc(oci::OCI_MANIFEST, &m_other), "other"),
        ],
    });
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index_json).unwrap(),
    )
    .unwrap();
    TestLayout {
        dir: dir.to_path_buf(),
        tar1,
        gz1,
        tar2,
        plain_manifest: host_manifest.clone(),
        host_manifest,
        index,
    }
}

#[test]
fn oci_layouts_import_by_tag_through_nested_indexes() {
    let tmp = tempfile::tempdir().unwrap();
    let l = build_layout(&tmp.path().join("layout"));
    let store = Store::new(tmp.path().join("store")).unwrap();

    let r = oci::import_oci_layout(&store, &l.dir, Some("plain")).unwrap();
    assert_eq!(r.reference, format!("oci:{}:plain", l.dir.display()));
    assert_eq!(r.manifest_digest, l.plain_manifest);
    assert_eq!(r.index_digest, None);
    assert_eq!(
        r.diff_ids().cloned().collect::<Vec<_>>(),
        vec![Digest::of(&l.tar1), Digest::of(&l.tar2)]
    );
    assert_eq!(r.layers[0].digest, Digest::of(&l.gz1));
    assert_eq!(r.layers[0].media_type, oci::OCI_LAYER_GZIP);
    assert_eq!(r.layers[1].digest, Digest::of(&l.tar2));
    assert_eq!(r.config.env, vec!["PATH=/bin"]);
    assert_eq!(r.config.cmd, Some(vec!["/bin/sh".to_string()]));
    assert_eq!(r.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(r.config.exposed_ports, vec!["8080/tcp"]);
    assert_eq!(r.architecture, host_arch());
    assert_eq!(r.id, ImageId::from_config_digest(&r.config_digest));
    for d in [
        &r.manifest_digest,
        &r.config_digest,
        &r.layers[0].digest,
        &r.layers[1].digest,
    ] {
        store.verify(d).unwrap();
    }
    assert_eq!(store.load_image(&r.id).unwrap(), r);
    assert_eq!(store.resolve_tag(&r.reference).unwrap(), Some(r.id.clone()));

    // The nested index resolves to this host's platform: the same image.
    let n = oci::import_oci_layout(&store, &l.dir, Some("nested")).unwrap();
    assert_eq!(n.id, r.id);
    assert_eq!(n.manifest_digest, l.host_manifest);
    assert_eq!(n.index_digest, Some(l.index.clone()));
    store.verify(&l.index).unwrap();

    // Errors name the layout and what is there.
    let e = oci::import_oci_layout(&store, &l.dir, Some("missing")).unwrap_err();
    assert!(matches!(e, OciError::TagNotFound { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("missing") && msg.contains("plain") && msg.contains("nested"),
        "{msg}"
    );
    let e = oci::import_oci_layout(&store, &l.dir, None).unwrap_err();
    assert!(matches!(e, OciError::NeedTag { count: 3, .. }), "{e}");
    let e = oci::import_oci_layout(&store, tmp.path(), None).unwrap_err();
    assert!(matches!(e, OciError::NotALayout { .. }), "{e}");
}

#[test]
fn a_corrupt_layout_blob_is_refused_and_nothing_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let l = build_layout(&tmp.path().join("layout"));
    let store = Store::new(tmp.path().join("store")).unwrap();
    // Same size, different bytes.
    let p = l.dir.join("blobs/sha256").join(Digest::of(&l.tar2).hex());
    let mut bytes = fs::read(&p).unwrap();
    bytes[600] ^= 0xff;
    fs::write(&p, &bytes).unwrap();
    let e = oci::import_oci_layout(&store, &l.dir, Some("plain")).unwrap_err();
    assert!(
        matches!(e, OciError::Store(StoreError::DigestMismatch { .. })),
        "{e}"
    );
    assert!(!store.has(&Digest::of(&l.tar2)));
    assert_eq!(store.partial_len(&Digest::of(&l.tar2)), 0);
    assert!(store.list_images().unwrap().is_empty());

    // A tampered manifest (its digest no longer matches index.json).
    let l = build_layout(&tmp.path().join("layout2"));
    let p = l.dir.join("blobs/sha256").join(l.host_manifest.hex());
    let m = fs::read_to_string(&p)
        .unwrap()
        .replace("\"size\"", "\"size\" ");
    fs::write(&p, m).unwrap();
    let e = oci::import_oci_layout(&store, &l.dir, Some("plain")).unwrap_err();
    assert!(matches!(e, OciError::BlobMismatch { .. }), "{e}");
}

#[test]
fn export_then_import_gives_the_same_image() {
    let tmp = tempfile::tempdir().unwrap();
    let l = build_layout(&tmp.path().join("layout"));
    let store = Store::new(tmp.path().join("store")).unwrap();
    let r = oci::import_oci_layout(&store, &l.dir, Some("plain")).unwrap();

    let out = tmp.path().join("export");
    let md = oci::export_oci_layout(&store, &r, &out, "v1").unwrap();
    // An OCI manifest is exported as stored.
    assert_eq!(md, r.manifest_digest);
    let md2 = oci::export_oci_layout(&store, &r, &out, "v2").unwrap();
    assert_eq!(md2, md);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap();
    let names: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["annotations"][oci::REF_NAME].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["v1", "v2"]);
    // Re-exporting a name replaces it.
    oci::export_oci_layout(&store, &r, &out, "v1").unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);

    let store2 = Store::new(tmp.path().join("store2")).unwrap();
    let r2 = oci::import_oci_layout(&store2, &out, Some("v2")).unwrap();
    assert_eq!(r2.id, r.id);
    assert_eq!(r2.layers, r.layers);
    assert_eq!(r2.config, r.config);

    assert!(matches!(
        oci::export_oci_layout(&store, &r, &out, "bad tag"),
        Err(OciError::BadTag { .. })
    ));
}

/// A `docker save`-style archive in the old format: `<id>/layer.tar` (one a symlink to
/// another, as docker writes repeated layers), `<hex>.json` config, plus a gzip layer.
fn build_docker_archive(path: &Path, tar1: &[u8], gz2: &[u8], cfg: &[u8]) {
    let f = fs::File::create(path).unwrap();
    let mut b = tar::Builder::new(f);
    let mut add = |name: &str, content: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, content).unwrap();
    };
    add("aaa/layer.tar", tar1);
    add("ccc/layer.tar", gz2);
    let cfg_name = format!("{}.json", Digest::of(cfg).hex());
    add(&cfg_name, cfg);
    let manifest = serde_json::json!([{
        "Config": cfg_name,
        "RepoTags": ["test/busybox:1"],
        "Layers": ["aaa/layer.tar", "ccc/layer.tar", "bbb/layer.tar"],
    }]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "bbb/layer.tar", "../aaa/layer.tar")
        .unwrap();
    b.into_inner().unwrap().sync_all().unwrap();
}

#[test]
fn docker_archives_import() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("store")).unwrap();
    let tar1 = tar_of(&[("etc/one", b"one\n")]);
    let tar2 = tar_of(&[("etc/two", b"two\n")]);
    let gz2 = gzip(&tar2);
    let (d1, d2) = (Digest::of(&tar1), Digest::of(&tar2));
    let cfg = config_json(&host_arch(), &[&d1, &d2, &d1]);
    let path = tmp.path().join("image.tar");
    build_docker_archive(&path, &tar1, &gz2, &cfg);

    let r = oci::import_docker_archive(&store, &path).unwrap();
    assert_eq!(r.reference, format!("docker-archive:{}", path.display()));
    assert_eq!(r.config_digest, Digest::of(&cfg));
    let got: Vec<(Digest, Digest, &str)> = r
        .layers
        .iter()
        .map(|l| (l.digest.clone(), l.diff_id.clone(), l.media_type.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (d1.clone(), d1.clone(), oci::OCI_LAYER_TAR),
            (Digest::of(&gz2), d2.clone(), oci::OCI_LAYER_GZIP),
            (d1.clone(), d1.clone(), oci::OCI_LAYER_TAR),
        ]
    );
    assert_eq!(r.config.working_dir.as_deref(), Some("/srv"));
    for l in &r.layers {
        store.verify(&l.digest).unwrap();
    }
    // A manifest was made for it: the image exports (and imports back the same).
    store.verify(&r.manifest_digest).unwrap();
    let out = tmp.path().join("export");
    oci::export_oci_layout(&store, &r, &out, "latest").unwrap();
    let store2 = Store::new(tmp.path().join("store2")).unwrap();
    assert_eq!(
        oci::import_oci_layout(&store2, &out, Some("latest"))
            .unwrap()
            .id,
        r.id
    );

    // An uncompressed layer that is not what the config says is refused.
    let bad_cfg = config_json(&host_arch(), &[&d2, &d2, &d1]);
    let bad = tmp.path().join("bad.tar");
    build_docker_archive(&bad, &tar1, &gz2, &bad_cfg);
    let store3 = Store::new(tmp.path().join("store3")).unwrap();
    let e = oci::import_docker_archive(&store3, &bad).unwrap_err();
    assert!(
        matches!(e, OciError::Store(StoreError::DigestMismatch { .. })),
        "{e}"
    );
    assert!(store3.list_images().unwrap().is_empty());
    let e = oci::import_docker_archive(&store3, &tmp.path().join("nope.tar")).unwrap_err();
    assert!(e.to_string().contains("nope.tar"), "{e}");
}

#[test]
fn records_survive_json_round_trips_with_unknown_optional_fields_absent() {
    // Records written before a field existed still load (serde defaults).
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path()).unwrap();
    let r = record(b"cfg", "x");
    let mut v = serde_json::to_value(&r).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.remove("index_digest");
    obj.remove("os");
    let map: BTreeMap<String, serde_json::Value> = obj.clone().into_iter().collect();
    fs::write(
        dir.path().join(format!("images/{}.json", r.id)),
        serde_json::to_vec(&map).unwrap(),
    )
    .unwrap();
    let back = store.load_image(&r.id).unwrap();
    assert_eq!(back.index_digest, None);
    assert_eq!(back.os, "");
    assert_eq!(back.layers, r.layers);
}
