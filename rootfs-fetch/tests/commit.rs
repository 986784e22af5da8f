//! Making images from files: an overlay upper dir of a (fake) sandbox committed as a layer and
//! derived into an image, unpacked again and checked file by file through a real overlay mount;
//! COPY from a build context; the COPY cache key; host-based images. Runs as root (chown,
//! mknod, trusted xattrs, mount).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{lchown, symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs_fetch::apply::{self, ApplyOptions, Compression, WhiteoutMode};
use rootfs_fetch::commit::{self, CommitError, Derive};
use rootfs_fetch::oci::{self, OciError};
use rootfs_fetch::store::{Digest, ImageConfig, ImageRecord, LayerRef, Store};
use rootfs_fetch::{layers, ImageRef};
use rustix::fs::{self as rfs, FileType, Mode, XattrFlags};
use sha2::{Digest as _, Sha256};

/// The fake sandbox's host id range.
const BASE: u32 = 300_000;
const COUNT: u32 = 65_536;
const MTIME: i64 = 1_600_000_000;

fn tmp(name: &str) -> PathBuf {
    // On the root filesystem (ext4): trusted xattrs, file caps, overlay lowers.
    let d = std::env::temp_dir().join(format!("sbx-commit-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn write(p: &Path, data: &[u8], mode: u32, owner: u32) {
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(p, data).unwrap();
    lchown(p, Some(owner), Some(owner)).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn mkdir(p: &Path, mode: u32, owner: u32) {
    fs::create_dir_all(p).unwrap();
    lchown(p, Some(owner), Some(owner)).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rfs::lsetxattr(p, name, value, XattrFlags::empty()).unwrap();
}

fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rfs::lgetxattr(p, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("getxattr {name} of {}: {e}", p.display()),
    }
}

fn set_mtime(p: &Path, secs: i64) {
    let t = rfs::Timestamps {
        last_access: rfs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        last_modification: rfs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    };
    rfs::utimensat(rfs::CWD, p, &t, rfs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

/// A v3 `security.capability` with cap_net_bind_service (bit 10) permitted and effective,
/// valid for the root of the namespace whose root is host uid `rootid`.
fn caps_v3(rootid: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(0x0300_0000u32 | 1).to_le_bytes());
    v.extend_from_slice(&(1u32 << 10).to_le_bytes()); // permitted[0]
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable[0]
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted[1]
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable[1]
    v.extend_from_slice(&rootid.to_le_bytes());
    v
}

/// One entry of a layer tar as the `tar` crate reads it.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    kind: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    link: Option<String>,
    data: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// The entries of a stored gzip layer in order; checks its digest and diff_id on the way.
fn read_layer(store: &Store, l: &LayerRef) -> Vec<(String, Entry)> {
    assert_eq!(l.media_type, oci::OCI_LAYER_GZIP);
    let blob = fs::read(store.blob_path(&l.digest)).unwrap();
    assert_eq!(Digest::of(&blob), l.digest);
    assert_eq!(blob.len() as u64, l.size);
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&blob[..])
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(
        Digest::of(&tar),
        l.diff_id,
        "diff_id is the uncompressed tar"
    );
    let mut ar = tar::Archive::new(&tar[..]);
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let h = e.header().clone();
        let mut xattrs = BTreeMap::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(k.to_string(), x.value_bytes().to_vec());
                }
            }
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((
            path,
            Entry {
                kind: h.entry_type().as_byte(),
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                link: e
                    .link_name_bytes()
                    .map(|l| String::from_utf8(l.into_owned()).unwrap()),
                data,
                xattrs,
            },
        ));
    }
    out
}

fn names(entries: &[(String, Entry)]) -> Vec<&str> {
    entries.iter().map(|(p, _)| p.as_str()).collect()
}

fn find<'a>(entries: &'a [(String, Entry)], path: &str) -> &'a Entry {
    &entries
        .iter()
        .find(|(p, _)| p == path)
        .unwrap_or_else(|| panic!("{path} not in the layer: {:?}", names(entries)))
        .1
}

/// A read-only overlay of `lowers` (topmost first), unmounted when dropped.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lowers: &[PathBuf], at: &Path) -> Overlay {
        fs::create_dir_all(at).unwrap();
        let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("ro,lowerdir={}", lower.join(":")))
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount the overlay at {}", at.display());
        Overlay(at.to_path_buf())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The parent image: made by COPY of a context into `/`, then derive_image.
fn parent_image(store: &Store, dir: &Path) -> ImageRecord {
    let ctx = dir.join("parent-ctx");
    write(&ctx.join("etc/motd"), b"hello\n", 0o644, 0);
    write(&ctx.join("data/old"), b"old\n", 0o644, 0);
    write(&ctx.join("data/stay"), b"stay\n", 0o644, 0);
    write(&ctx.join("opq/lower-child"), b"lc\n", 0o644, 0);
    write(&ctx.join("opq/sub/deep"), b"deep\n", 0o644, 0);
    let layer = commit::layer_from_context(store, &ctx, &[".".into()], "/").unwrap();
    let config = ImageConfig {
        env: vec!["PATH=/bin".into()],
        cmd: Some(vec!["/bin/sh".into()]),
        ..ImageConfig::default()
    };
    commit::derive_image(
        store,
        Derive {
            parent: None,
            host_base: false,
            layer: Some(layer),
            config,
            created_by: "COPY . /".into(),
            reference: "build".into(),
        },
    )
    .unwrap()
}

/// A fake sandbox upper: host ids `BASE + N` for sandbox id N, whiteouts, an opaque
/// directory, hardlinks, a symlink, setuid, file caps, a fifo, a socket and a long name.
fn fake_upper(dir: &Path) -> PathBuf {
    let up = dir.join("upper");
    mkdir(&up, 0o755, BASE);
    // A whiteout of the parent's data/old.
    mkdir(&up.join("data"), 0o755, BASE);
    rfs::mknodat(
        rfs::CWD,
        up.join("data/old"),
        FileType::CharacterDevice,
        Mode::empty(),
        rfs::makedev(0, 0),
    )
    .unwrap();
    // An opaque directory (removed and recreated in the sandbox).
    mkdir(&up.join("opq"), 0o755, BASE);
    set_xattr(&up.join("opq"), "trusted.overlay.opaque", b"y");
    write(&up.join("opq/new-child"), b"nc\n", 0o644, BASE);
    // Files of sandbox user 1000, of sandbox root, and of a host uid outside the range.
    mkdir(&up.join("home/user"), 0o750, BASE + 1000);
    lchown(up.join("home"), Some(BASE), Some(BASE)).unwrap();
    write(&up.join("home/user/owned"), b"mine\n", 0o640, BASE + 1000);
    write(&up.join("home/user/foreign"), b"host\n", 0o644, 1234);
    set_xattr(&up.join("home/user/owned"), "user.note", b"kept");
    set_xattr(&up.join("home/user/owned"), "trusted.overlay.origin", b"x");
    // Hardlinks and a symlink.
    mkdir(&up.join("links"), 0o755, BASE);
    write(&up.join("links/a"), b"shared\n", 0o644, BASE);
    fs::hard_link(up.join("links/a"), up.join("links/b")).unwrap();
    symlink("../etc/motd", up.join("links/rel")).unwrap();
    lchown(up.join("links/rel"), Some(BASE), Some(BASE)).unwrap();
    // setuid and file caps.
    mkdir(&up.join("bin"), 0o755, BASE);
    write(&up.join("bin/suid"), b"#!/bin/sh\n", 0o4755, BASE);
    write(&up.join("bin/capped"), b"#!/bin/sh\n", 0o755, BASE);
    set_xattr(
        &up.join("bin/capped"),
        "security.capability",
        &caps_v3(BASE),
    );
    // A fifo (kept) and a socket (skipped).
    mkdir(&up.join("run"), 0o755, BASE);
    rustix::fs::mknodat(
        rfs::CWD,
        up.join("run/fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    lchown(up.join("run/fifo"), Some(BASE), Some(BASE)).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(up.join("run/sock")).unwrap();
    // A name longer than a ustar header holds.
    let long = format!("deep/{}/{}", "d".repeat(80), "f".repeat(90));
    write(&up.join(&long), b"long\n", 0o644, BASE);
    lchown(up.join("deep"), Some(BASE), Some(BASE)).unwrap();
    up
}

#[test]
fn an_upper_becomes_a_layer_and_an_image_that_unpacks_to_the_same_tree() {
    let dir = tmp("upper");
    let store = Store::new(dir.join("store")).unwrap();
    let parent = parent_image(&store, &dir);
    let up = fake_upper(&dir);

    let layer = commit::layer_from_upper(&store, &up, BASE, COUNT).unwrap();
    let again = commit::layer_from_upper(&store, &up, BASE, COUNT).unwrap();
    assert_eq!(layer, again, "the same upper gives the same layer");

    // The tar itself: order, whiteout and opaque entries, ids, hardlink, xattrs.
    let entries = read_layer(&store, &layer);
    let n = names(&entries);
    let mut sorted = n.clone();
    sorted.sort_by_key(|p| p.trim_end_matches('/').split('/').collect::<Vec<_>>());
    assert_eq!(n, sorted, "entries in sorted order, parents first");
    assert!(n.contains(&"data/.wh.old"), "{n:?}");
    assert!(!n.contains(&"data/old"));
    assert_eq!(
        n[n.iter().position(|p| *p == "opq/").unwrap() + 1],
        "opq/.wh..wh..opq"
    );
    assert!(!n.contains(&"run/sock"), "sockets are skipped");
    assert!(!n.iter().any(|p| p.starts_with("./") || *p == "./"));
    let owned = find(&entries, "home/user/owned");
    assert_eq!((owned.uid, owned.gid, owned.mode), (1000, 1000, 0o640));
    assert_eq!(owned.xattrs.keys().collect::<Vec<_>>(), vec!["user.note"]);
    let foreign = find(&entries, "home/user/foreign");
    assert_eq!((foreign.uid, foreign.gid), (65534, 65534));
    assert_eq!(find(&entries, "links/b").kind, b'1');
    assert_eq!(find(&entries, "links/b").link.as_deref(), Some("links/a"));
    let caps = &find(&entries, "bin/capped").xattrs["security.capability"];
    assert_eq!(caps.len(), 20, "a v3 cap of the sandbox root becomes v2");
    assert_eq!(&caps[..4], &(0x0200_0000u32 | 1).to_le_bytes());
    assert_eq!(&caps[4..8], &(1u32 << 10).to_le_bytes());

    // The image.
    let config = ImageConfig {
        env: vec!["PATH=/bin".into(), "A=b".into()],
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
        cmd: Some(vec!["echo hi".into()]),
        working_dir: Some("/home/user".into()),
        user: Some("1000:1000".into()),
        exposed_ports: vec!["80/tcp".into()],
    };
    let child = commit::derive_image(
        &store,
        Derive {
            parent: Some(&parent),
            host_base: false,
            layer: Some(layer.clone()),
            config: config.clone(),
            created_by: "snapshot".into(),
            reference: "snapshot:sb-test".into(),
        },
    )
    .unwrap();
    assert_eq!(child.layers.len(), 2);
    assert_eq!(child.layers[0], parent.layers[0]);
    assert_eq!(child.layers[1], layer);
    assert_eq!(child.config, config);
    assert!(!child.host_base);
    assert_eq!(store.load_image(&child.id).unwrap(), child);
    let cfg: serde_json::Value =
        serde_json::from_slice(&store.read(&child.config_digest).unwrap()).unwrap();
    assert_eq!(cfg["rootfs"]["diff_ids"][1], layer.diff_id.to_string());
    assert_eq!(cfg["history"].as_array().unwrap().len(), 2);
    assert_eq!(cfg["history"][1]["created_by"], "snapshot");
    assert_eq!(
        cfg["config"]["ExposedPorts"]["80/tcp"],
        serde_json::json!({})
    );
    assert_eq!(cfg["os"], "linux");
    assert!(cfg["created"].as_str().unwrap().ends_with('Z'));
    let manifest: oci::Manifest =
        serde_json::from_slice(&store.read(&child.manifest_digest).unwrap()).unwrap();
    assert_eq!(manifest.layers.len(), 2);
    assert_eq!(manifest.config.digest().unwrap(), child.config_digest);

    // A config-only step: no layer, an empty_layer history entry.
    let env_only = commit::derive_image(
        &store,
        Derive {
            parent: Some(&child),
            host_base: false,
            layer: None,
            config: ImageConfig::default(),
            created_by: "ENV X=1".into(),
            reference: "build".into(),
        },
    )
    .unwrap();
    assert_eq!(env_only.layers, child.layers);
    let cfg: serde_json::Value =
        serde_json::from_slice(&store.read(&env_only.config_digest).unwrap()).unwrap();
    assert_eq!(cfg["history"][2]["empty_layer"], true);

    // Unpacked as sandboxes get it, and seen through an overlay like theirs.
    let lowers = layers::unpack_image(&store, &child, &dir.join("layers")).unwrap();
    assert_eq!(lowers.len(), 2);
    let top = &lowers[0];
    let wh = fs::symlink_metadata(top.join("data/old")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert_eq!(
        get_xattr(&top.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    let merged = dir.join("merged");
    let _ov = Overlay::mount(&lowers, &merged);
    let m = |p: &str| fs::symlink_metadata(merged.join(p));
    assert!(
        m("data/old").is_err(),
        "the whiteout removed the parent's file"
    );
    assert_eq!(fs::read(merged.join("data/stay")).unwrap(), b"stay\n");
    let mut opq: Vec<String> = fs::read_dir(merged.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    opq.sort();
    assert_eq!(
        opq,
        vec!["new-child"],
        "the opaque dir hides the parent's entries"
    );
    let owned = m("home/user/owned").unwrap();
    assert_eq!(
        (owned.uid(), owned.gid(), owned.mode() & 0o7777),
        (1000, 1000, 0o640)
    );
    assert_eq!(m("home/user").unwrap().uid(), 1000);
    assert_eq!(m("home/user/foreign").unwrap().uid(), 65534);
    assert_eq!(
        get_xattr(&merged.join("home/user/owned"), "user.note").as_deref(),
        Some(&b"kept"[..])
    );
    let a = m("links/a").unwrap();
    assert_eq!(a.nlink(), 2);
    assert_eq!(a.ino(), m("links/b").unwrap().ino());
    assert_eq!(
        fs::read_link(merged.join("links/rel")).unwrap(),
        Path::new("../etc/motd")
    );
    assert_eq!(fs::read(merged.join("links/rel")).unwrap(), b"hello\n");
    let suid = m("bin/suid").unwrap();
    assert_eq!((suid.uid(), suid.mode() & 0o7777), (0, 0o4755));
    let caps = get_xattr(&merged.join("bin/capped"), "security.capability").unwrap();
    assert_eq!(caps.len(), 20);
    assert_eq!(&caps[4..8], &(1u32 << 10).to_le_bytes());
    assert!(m("run/fifo").unwrap().file_type().is_fifo());
    assert!(m("run/sock").is_err());
    let long = format!("deep/{}/{}", "d".repeat(80), "f".repeat(90));
    assert_eq!(fs::read(merged.join(long)).unwrap(), b"long\n");
    drop(_ov);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_walk_never_follows_a_symlink_out_of_the_upper() {
    let dir = tmp("nofollow");
    let store = Store::new(dir.join("store")).unwrap();
    let up = dir.join("upper");
    mkdir(&up, 0o755, BASE);
    let secret = dir.join("secret");
    write(&secret.join("key"), b"host secret\n", 0o600, 0);
    // A directory symlink and a file symlink to host files: copied as links only.
    symlink(&secret, up.join("dirlink")).unwrap();
    symlink(secret.join("key"), up.join("filelink")).unwrap();
    let layer = commit::layer_from_upper(&store, &up, BASE, COUNT).unwrap();
    let entries = read_layer(&store, &layer);
    assert_eq!(names(&entries), vec!["dirlink", "filelink"]);
    assert!(entries
        .iter()
        .all(|(_, e)| e.kind == b'2' && e.data.is_empty()));
    // Ids of the links' host owner (root) are outside the range.
    assert_eq!(find(&entries, "dirlink").uid, 65534);
    fs::remove_dir_all(&dir).unwrap();
}

/// Apply a stored layer alone into a fresh directory (as `layers` does).
fn unpack(store: &Store, l: &LayerRef, at: &Path) {
    fs::create_dir_all(at).unwrap();
    let opts = ApplyOptions {
        whiteouts: WhiteoutMode::OverlayFs,
        ..ApplyOptions::default()
    };
    let stats =
        apply::apply_layer(store.open(&l.digest).unwrap(), Compression::Gzip, at, &opts).unwrap();
    assert_eq!(stats.diff_id.unwrap(), l.diff_id.to_string());
}

fn copy_context(dir: &Path) -> PathBuf {
    let ctx = dir.join("ctx");
    write(&ctx.join("a.txt"), b"A\n", 0o640, 1000);
    write(&ctx.join("dir/x"), b"#!/bin/sh\n", 0o755, 1000);
    write(&ctx.join("dir/sub/y"), b"Y\n", 0o600, 1000);
    symlink("/etc/passwd", ctx.join("dir/out")).unwrap();
    symlink("/etc", ctx.join("etc-link")).unwrap();
    symlink("../../..", ctx.join("up")).unwrap();
    symlink("dir", ctx.join("inside")).unwrap();
    for p in ["a.txt", "dir/x", "dir/sub/y", "dir/sub", "dir"] {
        set_mtime(&ctx.join(p), MTIME);
    }
    ctx
}

#[test]
fn copy_puts_files_dirs_and_symlinks_where_docker_would() {
    let dir = tmp("copy");
    let store = Store::new(dir.join("store")).unwrap();
    let ctx = copy_context(&dir);
    let copy = |sources: &[&str], dest: &str| {
        let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        commit::layer_from_context(&store, &ctx, &sources, dest)
    };
    let layer_names = |l: &LayerRef| {
        read_layer(&store, l)
            .into_iter()
            .map(|(p, _)| p)
            .collect::<Vec<_>>()
    };

    // A file to a path; into a dir with a trailing slash.
    let l = copy(&["a.txt"], "/app/a-renamed").unwrap();
    assert_eq!(layer_names(&l), vec!["app/a-renamed"]);
    let l = copy(&["a.txt"], "/app/").unwrap();
    assert_eq!(layer_names(&l), vec!["app/a.txt"]);
    let e = read_layer(&store, &l);
    let a = find(&e, "app/a.txt");
    assert_eq!(
        (a.uid, a.gid, a.mode, a.data.as_slice()),
        (0, 0, 0o640, &b"A\n"[..])
    );

    // A directory: its contents, symlinks as symlinks (the one pointing out is not followed).
    let l = copy(&["dir/"], "/opt/d").unwrap();
    assert_eq!(
        layer_names(&l),
        vec!["opt/d/out", "opt/d/sub/", "opt/d/sub/y", "opt/d/x"]
    );
    let out = dir.join("out-dir");
    unpack(&store, &l, &out);
    let x = fs::metadata(out.join("opt/d/x")).unwrap();
    assert_eq!((x.uid(), x.mode() & 0o7777, x.mtime()), (0, 0o755, MTIME));
    assert_eq!(fs::metadata(out.join("opt/d/sub")).unwrap().mtime(), MTIME);
    assert_eq!(
        fs::read_link(out.join("opt/d/out")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(fs::read(out.join("opt/d/sub/y")).unwrap(), b"Y\n");

    // Several sources go into dest; a symlink source (pointing outside) stays a symlink.
    let l = copy(&["a.txt", "dir", "etc-link"], "/m").unwrap();
    assert_eq!(
        layer_names(&l),
        vec!["m/a.txt", "m/etc-link", "m/out", "m/sub/", "m/sub/y", "m/x"]
    );
    let e = read_layer(&store, &l);
    assert_eq!(find(&e, "m/etc-link").link.as_deref(), Some("/etc"));
    // Through a symlink that stays inside the context; `.` is the whole context.
    let l = copy(&["inside/x"], "/i").unwrap();
    assert_eq!(layer_names(&l), vec!["i"]);
    let l = copy(&["."], "/all/").unwrap();
    assert!(layer_names(&l).contains(&"all/dir/sub/y".to_string()));

    // Refused: `..`, escaping through a symlink, a relative dest, no sources.
    for bad in [
        "../x",
        "dir/../a.txt",
        "etc-link/passwd",
        "up/etc/passwd",
        "missing",
    ] {
        match copy(&[bad], "/x") {
            Err(CommitError::BadSource { source_path, .. }) => assert_eq!(source_path, bad),
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert!(matches!(
        copy(&["a.txt"], "app"),
        Err(CommitError::BadDest { .. })
    ));
    assert!(matches!(
        copy(&["a.txt"], "/a/../b"),
        Err(CommitError::BadDest { .. })
    ));
    assert!(matches!(copy(&[], "/x"), Err(CommitError::NoSources)));
    let e = copy(&["etc-link/passwd"], "/x").unwrap_err().to_string();
    assert!(
        e.contains("etc-link/passwd") && e.contains("out of the context"),
        "{e}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_copy_cache_key_follows_content_not_mtimes() {
    let dir = tmp("digest");
    let ctx = copy_context(&dir);
    let key = |sources: &[&str]| {
        let s: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        commit::context_digest(&ctx, &s).unwrap()
    };
    let d0 = key(&["a.txt", "dir"]);
    assert_eq!(key(&["a.txt", "dir"]), d0);
    set_mtime(&ctx.join("dir/sub/y"), MTIME + 100);
    assert_eq!(
        key(&["a.txt", "dir"]),
        d0,
        "an mtime alone does not change it"
    );
    fs::write(ctx.join("dir/sub/y"), b"Z\n").unwrap();
    let d1 = key(&["a.txt", "dir"]);
    assert_ne!(d1, d0, "new bytes change it");
    fs::set_permissions(ctx.join("a.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    let d2 = key(&["a.txt", "dir"]);
    assert_ne!(d2, d1, "a new mode changes it");
    fs::remove_file(ctx.join("dir/out")).unwrap();
    symlink("/etc/group", ctx.join("dir/out")).unwrap();
    let d3 = key(&["a.txt", "dir"]);
    assert_ne!(d3, d2, "a new symlink target changes it");
    assert_ne!(key(&["dir", "a.txt"]), d3, "the sources' order counts");
    assert!(matches!(
        commit::context_digest(&ctx, &["../x".into()]),
        Err(CommitError::BadSource { .. })
    ));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn host_based_images_resolve_over_the_host_skeleton_and_are_not_exported() {
    let state = tmp("hostbase");
    let store = rootfs_fetch::image_store(&state).unwrap();
    let ctx = state.join("ctx");
    write(&ctx.join("hello"), b"hi\n", 0o644, 0);
    let layer = commit::layer_from_context(&store, &ctx, &["hello".into()], "/root/").unwrap();
    let derive = |parent: Option<&ImageRecord>, host_base: bool, layer: Option<LayerRef>| {
        commit::derive_image(
            &store,
            Derive {
                parent,
                host_base,
                layer,
                config: ImageConfig::default(),
                created_by: "snapshot".into(),
                reference: "snapshot:sb-x".into(),
            },
        )
    };
    let img = derive(None, true, Some(layer.clone())).unwrap();
    assert!(img.host_base);
    let not_host = derive(None, false, Some(layer.clone())).unwrap();
    assert_ne!(
        img.id, not_host.id,
        "the host-base label keeps the ids apart"
    );

    let host = rootfs_fetch::resolve(&ImageRef::Host, &state).unwrap();
    let r = rootfs_fetch::resolve(&ImageRef::Stored(img.id.clone()), &state).unwrap();
    assert!(r.idmap_lowers);
    assert_eq!(r.lowers.len(), 2);
    assert_eq!(
        r.lowers.last(),
        host.lowers.first(),
        "the skeleton is the last lower"
    );
    assert_eq!(fs::read(r.lowers[0].join("root/hello")).unwrap(), b"hi\n");
    assert_eq!(r.binds, host.binds);
    assert!(r.binds.iter().any(|b| b.target == Path::new("/usr")));
    assert!(r.config.is_some());
    // A config-only host image: the skeleton alone.
    let bare = derive(None, true, None).unwrap();
    let r = rootfs_fetch::resolve(&ImageRef::Stored(bare.id.clone()), &state).unwrap();
    assert_eq!(r.lowers, host.lowers);
    // A stored image that is not host-based: no binds, no skeleton.
    let r = rootfs_fetch::resolve(&ImageRef::Stored(not_host.id.clone()), &state).unwrap();
    assert!(r.binds.is_empty() && r.lowers.len() == 1);

    // Derived from a host-based image, still host-based; host_base over a stored image: no.
    let child = derive(Some(&img), false, None).unwrap();
    assert!(child.host_base);
    match derive(Some(&not_host), true, None) {
        Err(CommitError::HostBaseMismatch { parent }) => assert_eq!(parent, not_host.id),
        other => panic!("{other:?}"),
    }
    // A layer that is not in the store.
    let mut ghost = layer.clone();
    ghost.digest = Digest::of(b"nothing");
    assert!(matches!(
        derive(None, false, Some(ghost)),
        Err(CommitError::LayerMissing { .. })
    ));

    let e = oci::export_oci_layout(&store, &img, &state.join("layout"), "latest").unwrap_err();
    assert!(matches!(e, OciError::HostBase { .. }), "{e}");
    assert!(e.to_string().contains(img.id.as_str()), "{e}");
    oci::export_oci_layout(&store, &not_host, &state.join("layout"), "latest").unwrap();
    fs::remove_dir_all(&state).unwrap();
}

#[test]
fn a_committed_layer_hashes_what_it_stores() {
    // The one-pass digests agree with hashing the blob and the tar afterwards.
    let dir = tmp("hash");
    let store = Store::new(dir.join("store")).unwrap();
    let up = dir.join("upper");
    mkdir(&up, 0o755, BASE);
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    write(&up.join("big"), &big, 0o644, BASE);
    let l = commit::layer_from_upper(&store, &up, BASE, COUNT).unwrap();
    let blob = fs::read(store.blob_path(&l.digest)).unwrap();
    let mut h = Sha256::new();
    h.update(&blob);
    assert_eq!(format!("sha256:{:x}", h.finalize()), l.digest.to_string());
    let e = read_layer(&store, &l);
    assert_eq!(find(&e, "big").data, big);
    fs::remove_dir_all(&dir).unwrap();
}

/// A sandbox cannot keep a snapshot busy or make a layer no sandbox could start from: a sparse
/// file past the layer's byte cap fails at once (nothing is read), and so does a directory
/// nesting past the depth cap; nothing is left in the store.
#[test]
fn an_upper_past_the_layer_limits_fails_fast_with_the_limit_named() {
    let dir = tmp("limits");
    let store = Store::new(dir.join("store")).unwrap();
    let up = dir.join("upper");
    mkdir(&up, 0o755, BASE);
    let huge = up.join("huge");
    fs::File::create(&huge)
        .unwrap()
        .set_len(ApplyOptions::default().max_total_bytes + 1)
        .unwrap();
    let t = std::time::Instant::now();
    let e = commit::layer_from_upper(&store, &up, BASE, COUNT).unwrap_err();
    assert!(
        matches!(&e, CommitError::TooLarge { path, what, .. } if path.ends_with("huge") && what.contains("bytes")),
        "{e}"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    fs::remove_file(&huge).unwrap();

    // 250 levels (under the cap of 256) commit; 300 do not.
    let mut deep = up.clone();
    for _ in 0..250 {
        deep.push("d");
    }
    fs::create_dir_all(&deep).unwrap();
    commit::layer_from_upper(&store, &up, BASE, COUNT).expect("250 nested directories");
    for e in fs::read_dir(dir.join("store/blobs/sha256"))
        .unwrap()
        .flatten()
    {
        fs::remove_file(e.path()).unwrap();
    }
    for _ in 250..300 {
        deep.push("d");
    }
    fs::create_dir_all(&deep).unwrap();
    let e = commit::layer_from_upper(&store, &up, BASE, COUNT).unwrap_err();
    assert!(
        matches!(&e, CommitError::TooLarge { what, .. } if what.contains("nested")),
        "{e}"
    );
    let blobs: Vec<_> = fs::read_dir(dir.join("store/blobs/sha256"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(blobs.is_empty(), "a failed commit left blobs: {blobs:?}");
    let _ = fs::remove_dir_all(&dir);
}
