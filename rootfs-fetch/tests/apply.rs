//! Layer application as a user of the image store sees it: layers built here with the `tar`
//! crate (raw header bytes where the crate refuses a malicious name), applied with
//! `apply_layer`, and the resulting trees — and the host around them — checked file by file.
//! These tests run as root (chown, mknod, trusted xattrs, overlay mounts).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs_fetch::apply::{
    apply_layer, ApplyError, ApplyOptions, ApplyStats, Compression, DevicePolicy, WhiteoutMode,
};
use sha2::{Digest, Sha256};

const T1: u64 = 1_500_000_000;
const T2: u64 = 1_600_000_000;
const T3: u64 = 1_650_000_000;

/// A layer under construction: every header is written with raw name bytes, so `..`,
/// absolute paths and whiteout names go in exactly as an attacker would write them.
struct Layer {
    b: tar::Builder<Vec<u8>>,
    mtime: u64,
}

impl Layer {
    fn new(mtime: u64) -> Self {
        Layer {
            b: tar::Builder::new(Vec::new()),
            mtime,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn raw(
        &mut self,
        name: &[u8],
        kind: u8,
        mode: u32,
        owner: (u64, u64),
        link: &[u8],
        data: &[u8],
        pax: &[(&str, &[u8])],
    ) -> &mut Self {
        let mut records: Vec<(&str, &[u8])> = pax.to_vec();
        if name.len() > 100 {
            records.push(("path", name));
        }
        if link.len() > 100 {
            records.push(("linkpath", link));
        }
        if !records.is_empty() {
            self.pax(&records);
        }
        let mut h = tar::Header::new_ustar();
        let n = name.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(100);
        h.as_old_mut().linkname[..l].copy_from_slice(&link[..l]);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(self.mtime);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        self.b.append(&h, data).expect("append to a Vec");
        self
    }

    /// A PAX extended header for the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            data.extend_from_slice(&pax_record(k, v));
        }
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..10].copy_from_slice(b"PaxHeaders");
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_cksum();
        self.b.append(&h, data.as_slice()).expect("append to a Vec");
        self
    }

    fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(name.as_bytes(), b'5', 0o755, (0, 0), b"", b"", &[])
    }
    fn dir_meta(&mut self, name: &str, mode: u32, owner: (u64, u64)) -> &mut Self {
        self.raw(name.as_bytes(), b'5', mode, owner, b"", b"", &[])
    }
    fn file(&mut self, name: &str, data: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            b'0',
            0o644,
            (0, 0),
            b"",
            data.as_bytes(),
            &[],
        )
    }
    fn file_meta(&mut self, name: &str, data: &str, mode: u32, owner: (u64, u64)) -> &mut Self {
        self.raw(
            name.as_bytes(),
            b'0',
            mode,
            owner,
            b"",
            data.as_bytes(),
            &[],
        )
    }
    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            b'2',
            0o777,
            (0, 0),
            target.as_bytes(),
            b"",
            &[],
        )
    }
    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            b'1',
            0o644,
            (0, 0),
            target.as_bytes(),
            b"",
            &[],
        )
    }
    fn device(&mut self, name: &str, kind: u8, major: u32, minor: u32) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_mode(0o666);
        h.set_mtime(self.mtime);
        h.set_size(0);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_device_major(major).expect("ustar");
        h.set_device_minor(minor).expect("ustar");
        h.set_cksum();
        self.b.append(&h, io::empty()).expect("append to a Vec");
        self
    }

    /// Takes the finished archive (the layer starts over empty).
    fn bytes(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().expect("finish the archive")
    }
}

fn pax_record(k: &str, v: &[u8]) -> Vec<u8> {
    let body_len = 1 + k.len() + 1 + v.len() + 1;
    let mut len = body_len + 1;
    while len.to_string().len() + body_len != len {
        len = len.to_string().len() + body_len;
    }
    let mut rec = format!("{len} {k}=").into_bytes();
    rec.extend_from_slice(v);
    rec.push(b'\n');
    assert_eq!(rec.len(), len);
    rec
}

fn flat() -> ApplyOptions {
    ApplyOptions {
        whiteouts: WhiteoutMode::Apply,
        ..ApplyOptions::default()
    }
}

fn apply(tar: &[u8], root: &Path, opts: &ApplyOptions) -> Result<ApplyStats, ApplyError> {
    apply_layer(tar, Compression::None, root, opts)
}

/// A temporary top dir holding the unpack root and, next to it, host files that no layer may
/// touch. Everything outside the root is listed before and compared after.
struct Scene {
    _tmp: tempfile::TempDir,
    top: PathBuf,
    root: PathBuf,
    host: PathBuf,
    before: BTreeMap<PathBuf, String>,
}

impl Scene {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let top = tmp.path().to_path_buf();
        let root = top.join("root");
        let host = top.join("host");
        fs::create_dir(&root).expect("mkdir root");
        fs::create_dir_all(host.join("hostdir")).expect("mkdir host");
        fs::write(host.join("HOSTFILE"), "host data").expect("write host file");
        fs::write(host.join("hostdir/inner"), "inner").expect("write host file");
        let before = tree(&top, Some(&root));
        Scene {
            _tmp: tmp,
            top,
            root,
            host,
            before,
        }
    }

    fn host_untouched(&self) {
        assert_eq!(
            tree(&self.top, Some(&self.root)),
            self.before,
            "something outside the unpack root changed"
        );
        assert_eq!(
            fs::read_to_string(self.host.join("HOSTFILE")).unwrap(),
            "host data"
        );
        assert_eq!(fs::metadata(self.host.join("HOSTFILE")).unwrap().nlink(), 1);
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }
}

/// Path → description (type, mode, owner, size, mtime for non-dirs, content digest or link
/// target, rdev) of everything under `dir`, without following symlinks.
fn tree(dir: &Path, skip: Option<&Path>) -> BTreeMap<PathBuf, String> {
    fn walk(base: &Path, dir: &Path, skip: Option<&Path>, out: &mut BTreeMap<PathBuf, String>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("dirent").path())
            .collect();
        names.sort();
        for p in names {
            if Some(p.as_path()) == skip {
                continue;
            }
            let m = fs::symlink_metadata(&p).expect("lstat");
            let ft = m.file_type();
            let what = if ft.is_dir() {
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("link->{}", fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                let data = fs::read(&p).unwrap();
                format!("file:{:x} mtime={}", Sha256::digest(&data), m.mtime())
            } else if ft.is_char_device() {
                format!("chr:{}", m.rdev())
            } else if ft.is_block_device() {
                format!("blk:{}", m.rdev())
            } else {
                "fifo".to_string()
            };
            let mode = m.mode() & 0o7777;
            let mode = if ft.is_symlink() { 0 } else { mode };
            out.insert(
                p.strip_prefix(base).unwrap().to_path_buf(),
                format!("{what} mode={mode:o} owner={}:{}", m.uid(), m.gid()),
            );
            if ft.is_dir() {
                walk(base, &p, skip, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, skip, &mut out);
    out
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

fn getxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(p, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

// ---------------------------------------------------------------------------------------------
// A three-layer image.

fn layer1() -> Vec<u8> {
    let mut l = Layer::new(T1);
    l.dir("./")
        .dir("etc/")
        .file("etc/passwd", "root:x:0:0")
        .file_meta("etc/shadow", "secret", 0o640, (0, 42))
        .dir("usr/")
        .dir("usr/bin/")
        .file_meta("usr/bin/su", "su-binary", 0o4755, (0, 0))
        .file_meta("usr/bin/newgrp", "newgrp", 0o2755, (0, 42))
        .file_meta("usr/bin/tool", "tool v1", 0o755, (1000, 1000))
        .hardlink("usr/bin/hl", "usr/bin/tool")
        .dir("usr/lib/")
        .file("usr/lib/libx.so.1", "lib")
        .symlink("usr/lib/libx.so", "libx.so.1")
        .symlink("bin", "usr/bin")
        .dir("var/")
        .dir("var/cache/")
        .dir("var/cache/apt/")
        .file("var/cache/apt/a.bin", "a")
        .file("var/cache/apt/b.bin", "b")
        .dir("var/cache/apt/sub/")
        .file("var/cache/apt/sub/c", "c")
        .dir("opt/")
        .dir("opt/app/")
        .file("opt/app/old.txt", "old")
        .dir_meta("home/", 0o755, (0, 0))
        .dir_meta("home/user/", 0o750, (1000, 1000))
        .file_meta("home/user/.bashrc", "alias ll='ls -l'", 0o644, (1000, 1000))
        .dir_meta("tmp/", 0o1777, (0, 0))
        .dir("data/")
        .dir("data/dirA/")
        .file("data/dirA/x", "x")
        .file("data/fileB", "b")
        .dir("data/dirC/")
        .file("data/dirC/old", "old C")
        .dir("data/dirD/")
        .file("data/dirD/old2", "old D");
    l.bytes()
}

fn layer2() -> Vec<u8> {
    let mut l = Layer::new(T2);
    l.dir("etc/")
        .file("etc/.wh.shadow", "")
        // Opaque: what layer 1 put in apt/ goes; this layer's entries before and after the
        // marker stay.
        .file("var/cache/apt/keep-before", "kb")
        .file("var/cache/apt/.wh..wh..opq", "")
        .file("var/cache/apt/new-after", "na")
        .file(".wh.opt", "")
        .file("data/dirA", "now a file")
        .dir("data/fileB/")
        .file("data/fileB/inner", "inner")
        .file_meta("usr/bin/tool", "tool v2", 0o755, (1000, 1000))
        // Whiteout then the same name as a directory of this layer.
        .file("data/.wh.dirC", "")
        .dir("data/dirC/")
        .file("data/dirC/new", "new C")
        // A directory of this layer, then a whiteout of the same name.
        .dir("data/dirD/")
        .file("data/dirD/new2", "new D")
        .file("data/.wh.dirD", "")
        // AUFS metadata is ignored.
        .file(".wh..wh.plnk/123.456", "");
    l.bytes()
}

fn layer3() -> Vec<u8> {
    let mut l = Layer::new(T3);
    l.dir("opt/")
        .file("opt/new.txt", "new")
        .file(".wh.bin", "")
        .file("usr/bin/.wh.su", "");
    l.bytes()
}

fn expect_image(root: &Path) {
    let read = |p: &str| fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert!(!exists(&root.join("etc/shadow")), "whited-out file stays");
    assert_eq!(read("etc/passwd"), "root:x:0:0");
    let names = |p: &str| {
        let mut v: Vec<String> = fs::read_dir(root.join(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("var/cache/apt"), ["keep-before", "new-after"]);
    assert_eq!(names("opt"), ["new.txt"]);
    assert_eq!(read("data/dirA"), "now a file");
    assert_eq!(read("data/fileB/inner"), "inner");
    assert_eq!(names("data/dirC"), ["new"]);
    assert_eq!(names("data/dirD"), ["new2"]);
    assert!(!exists(&root.join("bin")));
    assert!(!exists(&root.join("usr/bin/su")));
    assert!(!exists(&root.join(".wh..wh.plnk")));
    assert_eq!(read("usr/bin/tool"), "tool v2");
    assert_eq!(
        read("usr/bin/hl"),
        "tool v1",
        "the hardlink keeps the layer-1 inode"
    );
    assert_eq!(
        fs::read_link(root.join("usr/lib/libx.so")).unwrap(),
        Path::new("libx.so.1")
    );
    let newgrp = fs::metadata(root.join("usr/bin/newgrp")).unwrap();
    assert_eq!((newgrp.mode() & 0o7777, newgrp.gid()), (0o2755, 42));
    let home = fs::metadata(root.join("home/user")).unwrap();
    assert_eq!(
        (home.mode() & 0o7777, home.uid(), home.gid()),
        (0o750, 1000, 1000)
    );
    assert_eq!(
        fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
}

#[test]
fn multi_layer_image_flattened() {
    let s = Scene::new();
    let opts = flat();
    let st1 = apply(&layer1(), &s.root, &opts).expect("layer 1");
    assert_eq!((st1.files, st1.hardlinks, st1.symlinks), (15, 1, 2));

    // After layer 1 alone: metadata as in the tar, directory times set after their children.
    let su = fs::metadata(s.at("usr/bin/su")).unwrap();
    assert_eq!((su.mode() & 0o7777, su.uid()), (0o4755, 0), "setuid kept");
    let tool = fs::metadata(s.at("usr/bin/tool")).unwrap();
    let hl = fs::metadata(s.at("usr/bin/hl")).unwrap();
    assert_eq!((tool.uid(), tool.gid(), tool.ino()), (1000, 1000, hl.ino()));
    assert_eq!(tool.nlink(), 2);
    for d in ["usr/bin", "var/cache/apt", "home/user", ""] {
        assert_eq!(
            fs::metadata(s.at(d)).unwrap().mtime(),
            T1 as i64,
            "mtime of dir {d:?}"
        );
    }
    assert_eq!(fs::metadata(s.at("etc/passwd")).unwrap().mtime(), T1 as i64);
    let link = fs::symlink_metadata(s.at("usr/lib/libx.so")).unwrap();
    assert_eq!(
        link.mtime(),
        T1 as i64,
        "symlink times set with AT_SYMLINK_NOFOLLOW"
    );

    let st2 = apply(&layer2(), &s.root, &opts).expect("layer 2");
    assert_eq!((st2.whiteouts, st2.opaque_dirs), (4, 1));
    assert_eq!(fs::metadata(s.at("etc")).unwrap().mtime(), T2 as i64);
    apply(&layer3(), &s.root, &opts).expect("layer 3");
    expect_image(&s.root);
    s.host_untouched();
}

#[test]
fn overlayfs_layers_merge_like_the_flattened_image() {
    let s = Scene::new();
    let layers = [layer1(), layer2(), layer3()];
    let flat_root = s.root.join("flat");
    fs::create_dir(&flat_root).unwrap();
    let mut dirs = Vec::new();
    for (i, tar) in layers.iter().enumerate() {
        apply(tar, &flat_root, &flat()).expect("flatten");
        let d = s.root.join(format!("l{i}"));
        fs::create_dir(&d).unwrap();
        apply(tar, &d, &ApplyOptions::default()).expect("overlay layer");
        dirs.push(d);
    }
    // How overlayfs sees them: whiteouts are 0/0 character devices, opaque dirs have the xattr.
    let l2 = &dirs[1];
    for w in ["etc/shadow", "opt"] {
        let m = fs::symlink_metadata(l2.join(w)).unwrap();
        assert!(
            m.file_type().is_char_device() && m.rdev() == 0,
            "{w} is a whiteout"
        );
    }
    for d in ["var/cache/apt", "data/dirC", "data/dirD"] {
        assert_eq!(
            getxattr(&l2.join(d), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..]),
            "{d}"
        );
    }
    assert!(exists(&l2.join("var/cache/apt/keep-before")));
    assert!(!exists(&l2.join("data/.wh.dirC")));

    let merged = s.root.join("merged");
    fs::create_dir(&merged).unwrap();
    let lower = format!(
        "lowerdir={}:{}:{}",
        dirs[2].display(),
        dirs[1].display(),
        dirs[0].display()
    );
    let out = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &lower])
        .arg(&merged)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "overlay mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = std::panic::catch_unwind(|| {
        expect_image(&merged);
        tree(&merged, None)
    });
    let umount = Command::new("umount")
        .arg(&merged)
        .status()
        .expect("run umount");
    assert!(umount.success());
    let view = view.expect("merged view as expected");
    assert_eq!(view, tree(&flat_root, None));
    s.host_untouched();
}

#[test]
fn ownership_offset_and_xattrs() {
    let s = Scene::new();
    let mut cap = vec![0u8; 20]; // VFS_CAP_REVISION_2, CAP_NET_BIND_SERVICE permitted
    cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
    let mut l = Layer::new(T1);
    l.dir_meta("srv/", 0o755, (0, 0))
        .raw(
            b"srv/ping",
            b'0',
            0o4711,
            (1000, 2000),
            b"",
            b"ping",
            &[
                ("SCHILY.xattr.user.origin", b"layer"),
                ("SCHILY.xattr.security.capability", &cap),
                ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                ("SCHILY.xattr.security.selinux", b"system_u:object_r:bin_t"),
                ("SCHILY.xattr.user.overlay.redirect", b"/etc"),
            ],
        )
        .raw(
            b"srv/d/",
            b'5',
            0o700,
            (5, 6),
            b"",
            b"",
            &[("SCHILY.xattr.trusted.overlay.opaque", b"y")],
        )
        .symlink("srv/l", "/nowhere");
    let tar = l.bytes();
    let opts = ApplyOptions {
        id_offset: Some((100_000, 200_000)),
        ..ApplyOptions::default()
    };
    let st = apply(&tar, &s.root, &opts).expect("apply");
    let ping = s.at("srv/ping");
    let m = fs::metadata(&ping).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (101_000, 202_000, 0o4711)
    );
    assert_eq!(
        getxattr(&ping, "user.origin").as_deref(),
        Some(&b"layer"[..])
    );
    assert_eq!(getxattr(&ping, "security.capability"), Some(cap.clone()));
    assert_eq!(getxattr(&ping, "trusted.overlay.opaque"), None);
    assert_eq!(getxattr(&ping, "security.selinux"), None);
    assert_eq!(getxattr(&ping, "user.overlay.redirect"), None);
    assert_eq!(getxattr(&s.at("srv/d"), "trusted.overlay.opaque"), None);
    let d = fs::metadata(s.at("srv/d")).unwrap();
    assert_eq!((d.uid(), d.gid()), (100_005, 200_006));
    let l = fs::symlink_metadata(s.at("srv/l")).unwrap();
    assert_eq!((l.uid(), l.gid()), (100_000, 200_000));
    assert_eq!(fs::metadata(s.at("srv")).unwrap().uid(), 100_000);
    assert_eq!((st.xattrs_set, st.xattrs_dropped), (2, 4));
    s.host_untouched();
}

#[test]
fn gzip_and_zstd_layers_with_diff_id() {
    let tar = layer1();
    let diff_id = format!("sha256:{:x}", Sha256::digest(&tar));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(tar.as_slice(), 3).unwrap();
    for (blob, media_type) in [
        (gz, "application/vnd.docker.image.rootfs.diff.tar.gzip"),
        (zst, "application/vnd.oci.image.layer.v1.tar+zstd"),
        (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
    ] {
        let s = Scene::new();
        let c = Compression::from_media_type(media_type).expect("layer media type");
        assert_eq!(Compression::sniff(&blob[..8]), Some(c), "{media_type}");
        let st = apply_layer(blob.as_slice(), c, &s.root, &flat()).expect(media_type);
        assert_eq!(st.diff_id.as_deref(), Some(diff_id.as_str()));
        assert_eq!(st.stream_bytes, tar.len() as u64);
        assert_eq!(fs::read_to_string(s.at("usr/bin/su")).unwrap(), "su-binary");
    }
}

#[test]
fn gnu_sparse_file_keeps_holes() {
    let s = Scene::new();
    let src = s.top.join("sparse-src");
    {
        let f = fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    }
    let mut b = tar::Builder::new(Vec::new());
    b.sparse(true);
    b.append_path_with_name(&src, "big.img").unwrap();
    let tar = b.into_inner().unwrap();
    fs::remove_file(&src).unwrap();
    assert!(tar.len() < 1 << 20, "the tar stores the data chunks only");
    let st = apply(&tar, &s.root, &flat()).expect("apply sparse");
    let out = s.at("big.img");
    let m = fs::metadata(&out).unwrap();
    assert_eq!(m.len(), 64 << 20);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "holes kept: {} blocks",
        m.blocks()
    );
    let data = fs::read(&out).unwrap();
    assert_eq!(&data[..4], b"head");
    assert_eq!(&data[32 << 20..(32 << 20) + 6], b"middle");
    assert_eq!(&data[(64 << 20) - 4..], b"tail");
    assert!(data[4..32 << 20].iter().all(|&b| b == 0));
    assert_eq!(st.files, 1);
}

#[test]
fn pax_sparse_and_unknown_types_are_refused() {
    let s = Scene::new();
    let mut l = Layer::new(T1);
    l.raw(
        b"s",
        b'0',
        0o644,
        (0, 0),
        b"",
        b"",
        &[("GNU.sparse.major", b"1")],
    );
    match apply(&l.bytes(), &s.root, &flat()) {
        Err(ApplyError::Unsupported { entry, .. }) => assert_eq!(entry, "s"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let mut l = Layer::new(T1);
    l.raw(b"vol", b'V', 0o644, (0, 0), b"", b"", &[]);
    assert!(matches!(
        apply(&l.bytes(), &s.root, &flat()),
        Err(ApplyError::Unsupported { .. })
    ));
}

#[test]
fn replacing_entries_never_follow_symlinks() {
    let s = Scene::new();
    let host = s.host.display().to_string();
    let mut l = Layer::new(T1);
    l.symlink("f", &format!("{host}/HOSTFILE"))
        .symlink("d", &format!("{host}/hostdir"))
        .symlink("s", &format!("{host}/HOSTFILE"))
        .symlink("h", &format!("{host}/HOSTFILE"))
        .dir("a/")
        .file("a/x", "x");
    apply(&l.bytes(), &s.root, &flat()).expect("layer 1");
    let mut l = Layer::new(T2);
    l.file("f", "replaced the link") // a file over a symlink to a host file
        .dir("d/") // a directory over a symlink to a host dir
        .file("d/inner", "mine")
        .symlink("s", "elsewhere") // a symlink over a symlink
        .hardlink("h", "a/x") // a hardlink over a symlink
        .file("a", "file over dir");
    apply(&l.bytes(), &s.root, &flat()).expect("layer 2");
    assert_eq!(fs::read_to_string(s.at("f")).unwrap(), "replaced the link");
    assert!(fs::symlink_metadata(s.at("d")).unwrap().is_dir());
    assert_eq!(fs::read_to_string(s.at("d/inner")).unwrap(), "mine");
    assert_eq!(fs::read_link(s.at("s")).unwrap(), Path::new("elsewhere"));
    assert_eq!(fs::read_to_string(s.at("h")).unwrap(), "x");
    assert_eq!(fs::read_to_string(s.at("a")).unwrap(), "file over dir");
    s.host_untouched();
}

#[test]
fn parent_cache_follows_replacements() {
    // a/b is the cached parent when `a` becomes a symlink; the next entry under a/b must go
    // where the new `a` leads, not into the removed directory.
    let s = Scene::new();
    let mut l = Layer::new(T1);
    l.dir("a/")
        .dir("a/b/")
        .file("a/b/x", "x")
        .symlink("a", "target")
        .file("a/b/y", "y")
        .dir("c/")
        .file("c/1", "1")
        .file("c", "c is a file now");
    apply(&l.bytes(), &s.root, &flat()).expect("apply");
    assert!(fs::symlink_metadata(s.at("a"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_to_string(s.at("target/b/y")).unwrap(), "y");
    assert!(!exists(&s.at("target/b/x")));
    assert_eq!(fs::read_to_string(s.at("c")).unwrap(), "c is a file now");
    let mut l = Layer::new(T1);
    l.file("c/2", "2");
    let r = apply(&l.bytes(), &s.root, &flat());
    assert!(
        matches!(&r, Err(ApplyError::Io { source, .. }) if source.raw_os_error() == Some(20)),
        "a file as a parent is ENOTDIR: {r:?}"
    );
    s.host_untouched();
}

// ---------------------------------------------------------------------------------------------
// Malicious layers.

#[test]
fn dotdot_and_absolute_paths_stay_inside() {
    let s = Scene::new();
    let unique = format!("sbx-apply-test-{}", std::process::id());
    let abs_host = format!("{}/HOSTFILE", s.host.display());
    let mut l = Layer::new(T1);
    l.file("../../escaped", "1")
        .file("./../../../../../escaped2", "2")
        .file(&format!("/etc/{unique}"), "3")
        .file(&abs_host, "4")
        .file("a/b/../../../../escaped3", "5")
        .dir("../../../")
        .file("../host/HOSTFILE", "6");
    let st = apply(&l.bytes(), &s.root, &flat()).expect("contained, not refused");
    assert_eq!(st.files, 6);
    assert_eq!(fs::read_to_string(s.at("escaped")).unwrap(), "1");
    assert_eq!(fs::read_to_string(s.at("escaped2")).unwrap(), "2");
    assert_eq!(
        fs::read_to_string(s.at(&format!("etc/{unique}"))).unwrap(),
        "3"
    );
    assert_eq!(fs::read_to_string(s.at(&abs_host)).unwrap(), "4");
    assert_eq!(fs::read_to_string(s.at("escaped3")).unwrap(), "5");
    assert_eq!(fs::read_to_string(s.at("host/HOSTFILE")).unwrap(), "6");
    assert!(!exists(&s.top.join("escaped")) && !exists(&s.top.parent().unwrap().join("escaped")));
    assert!(!exists(&Path::new("/etc").join(&unique)));
    s.host_untouched();
}

#[test]
fn absolute_symlink_then_writes_through_it() {
    let s = Scene::new();
    let host = s.host.display().to_string();
    let mut l = Layer::new(T1);
    // evil -> the host dir (absolute): resolved inside the root, it names ROOT/<host path>.
    l.symlink("evil", &host)
        .file("evil/HOSTFILE", "overwritten?")
        .file("evil/hostdir/new", "created?")
        // A relative symlink climbing out, then a write through it.
        .symlink("up", "../../../../../../..")
        .file(&format!("up{host}/HOSTFILE"), "through up")
        // A symlink to / used as a parent of an absolute host path.
        .symlink("slash", "/")
        .file(&format!("slash{host}/hostdir/inner"), "through slash")
        // A file written over the symlink itself replaces the link, not its target.
        .symlink("over", &format!("{host}/HOSTFILE"))
        .file("over", "replaced");
    let st = apply(&l.bytes(), &s.root, &flat()).expect("contained");
    assert_eq!(st.files, 5);
    let inside = s.at(&host);
    assert_eq!(
        fs::read_to_string(inside.join("HOSTFILE")).unwrap(),
        "through up"
    );
    assert_eq!(
        fs::read_to_string(inside.join("hostdir/new")).unwrap(),
        "created?"
    );
    assert_eq!(
        fs::read_to_string(inside.join("hostdir/inner")).unwrap(),
        "through slash"
    );
    assert_eq!(fs::read_to_string(s.at("over")).unwrap(), "replaced");
    assert!(fs::symlink_metadata(s.at("evil"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!exists(&s.host.join("hostdir/new")));
    s.host_untouched();
}

#[test]
fn symlink_loops_in_parents_fail_cleanly() {
    let s = Scene::new();
    let mut l = Layer::new(T1);
    l.symlink("a", "b").symlink("b", "a").file("a/x", "x");
    match apply(&l.bytes(), &s.root, &flat()) {
        Err(ApplyError::Io { entry, source, .. }) => {
            assert_eq!(entry, "a/x");
            assert_eq!(source.raw_os_error(), Some(40), "ELOOP: {source}");
        }
        other => panic!("expected an ELOOP error, got {other:?}"),
    }
    s.host_untouched();
}

#[test]
fn hardlinks_to_host_files_are_refused() {
    let s = Scene::new();
    let host_file = format!("{}/HOSTFILE", s.host.display());
    let depth = s.root.components().count();
    let dotdots = "../".repeat(depth + 2);
    let cases = [
        host_file.clone(),
        format!("{dotdots}{}", host_file.trim_start_matches('/')),
        "../host/HOSTFILE".to_string(),
    ];
    for target in cases {
        let mut l = Layer::new(T1);
        l.hardlink("stolen", &target);
        match apply(&l.bytes(), &s.root, &flat()) {
            Err(ApplyError::Io { step, source, .. }) => {
                assert_eq!(step, "hardlink to its target");
                assert_eq!(source.kind(), io::ErrorKind::NotFound, "{target}");
            }
            other => panic!("link to {target}: expected not found, got {other:?}"),
        }
        assert!(!exists(&s.at("stolen")));
    }
    // Through a symlinked parent: slash -> / then slash/<host path>.
    let mut l = Layer::new(T1);
    l.symlink("slash", "/")
        .hardlink("stolen", &format!("slash{host_file}"));
    assert!(matches!(
        apply(&l.bytes(), &s.root, &flat()),
        Err(ApplyError::Io { .. })
    ));
    // A hardlink to a file inside the root that shares the host file's path works, and links
    // the root's copy.
    let mut l = Layer::new(T1);
    l.file(&host_file, "root copy").hardlink("ok", &host_file);
    apply(&l.bytes(), &s.root, &flat()).expect("link inside the root");
    assert_eq!(fs::read_to_string(s.at("ok")).unwrap(), "root copy");
    assert_eq!(fs::metadata(s.at("ok")).unwrap().nlink(), 2);
    s.host_untouched();
}

#[test]
fn hardlink_to_a_directory_is_refused() {
    let s = Scene::new();
    let mut l = Layer::new(T1);
    l.dir("d/").hardlink("x", "d");
    match apply(&l.bytes(), &s.root, &flat()) {
        Err(ApplyError::HardlinkToDir { entry, target }) => {
            assert_eq!((entry.as_str(), target.as_str()), ("x", "d"))
        }
        other => panic!("expected HardlinkToDir, got {other:?}"),
    }
    let mut l = Layer::new(T1);
    l.hardlink("y", "/");
    assert!(matches!(
        apply(&l.bytes(), &s.root, &flat()),
        Err(ApplyError::HardlinkToDir { .. })
    ));
}

#[test]
fn devices_skipped_by_default_and_created_on_request() {
    let s = Scene::new();
    let mut l = Layer::new(T1);
    l.dir("dev/")
        .device("dev/null", b'3', 1, 3)
        .device("dev/sda", b'4', 8, 0)
        .device("dev/fifo", b'6', 0, 0)
        .hardlink("dev/null2", "dev/null");
    let tar = l.bytes();
    let st = apply(&tar, &s.root, &flat()).expect("apply");
    assert_eq!(
        (st.skipped_devices, st.fifos, st.devices_created),
        (3, 1, 0)
    );
    assert!(
        !exists(&s.at("dev/null2")),
        "a hardlink to a skipped device is skipped"
    );
    assert!(!exists(&s.at("dev/null")) && !exists(&s.at("dev/sda")));
    assert!(fs::symlink_metadata(s.at("dev/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());

    let other = s.root.join("created");
    fs::create_dir(&other).unwrap();
    let opts = ApplyOptions {
        devices: DevicePolicy::Create,
        ..flat()
    };
    let st = apply(&tar, &other, &opts).expect("apply with devices");
    assert_eq!((st.devices_created, st.hardlinks), (2, 1), "{st:?}");
    let null = fs::symlink_metadata(other.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(
        (null.rdev(), null.mode() & 0o7777),
        (rustix::fs::makedev(1, 3), 0o666)
    );
    assert!(fs::symlink_metadata(other.join("dev/sda"))
        .unwrap()
        .file_type()
        .is_block_device());

    // Out-of-range device numbers would be truncated by the kernel to another device.
    let mut l = Layer::new(T1);
    l.device("bad", b'3', 0x1000, 0);
    let third = s.root.join("third");
    fs::create_dir(&third).unwrap();
    assert!(matches!(
        apply(&l.bytes(), &third, &opts),
        Err(ApplyError::Invalid { .. })
    ));
}

/// Reads through to `inner` and counts the bytes.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// A tar header for `name` declaring `size` bytes.
fn header_bytes(name: &str, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_mode(0o644);
    h.set_size(size);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

#[test]
fn gzip_bomb_is_refused_at_its_header() {
    // 20 GiB of zeros behind a header declaring them, as concatenated gzip members: ~20 MB.
    let s = Scene::new();
    let chunk = gzip(&vec![0u8; 8 << 20]);
    let mut blob = gzip(&header_bytes("bomb", 20 << 30));
    for _ in 0..(20u64 << 30) / (8 << 20) {
        blob.extend_from_slice(&chunk);
    }
    assert!(blob.len() < 40 << 20, "bomb is {} bytes", blob.len());
    let mut src = Counted {
        inner: blob.as_slice(),
        n: 0,
    };
    let opts = ApplyOptions {
        compute_diff_id: false,
        ..flat()
    };
    match apply_layer(&mut src, Compression::Gzip, &s.root, &opts) {
        Err(ApplyError::TooLarge { limit, entry }) => {
            assert_eq!((limit, entry.as_deref()), (8 << 30, Some("bomb")));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(
        src.n < 1 << 20,
        "read {} compressed bytes before refusing",
        src.n
    );
    assert!(!exists(&s.at("bomb")), "nothing written");
    s.host_untouched();
}

#[test]
fn bombs_stop_at_the_cap_while_streaming() {
    // Data past the end marker (20 GiB of zeros after a small valid layer), then many entries
    // that each fit: both are counted as they are read, and reading stops at the cap.
    let s = Scene::new();
    let mut l = Layer::new(T1);
    l.file("small", "ok");
    let tar = l.bytes();
    let cap = 128 << 20;
    let opts = ApplyOptions {
        max_total_bytes: cap,
        compute_diff_id: false,
        ..flat()
    };
    // gzip: ~20 MB of concatenated members; a few hundred KB are read before the refusal.
    let chunk = gzip(&vec![0u8; 8 << 20]);
    let mut blob = gzip(&tar);
    for _ in 0..(20u64 << 30) / (8 << 20) {
        blob.extend_from_slice(&chunk);
    }
    let mut src = Counted {
        inner: blob.as_slice(),
        n: 0,
    };
    match apply_layer(&mut src, Compression::Gzip, &s.root, &opts) {
        Err(ApplyError::TooLarge { limit, .. }) => assert_eq!(limit, cap),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(src.n < 1 << 20, "read {} of {} bytes", src.n, blob.len());
    // zstd: 20 GiB of zeros is only ~660 KB and the decoder reads 128 KiB at a time.
    let zeros = zstd::encode_all(&vec![0u8; 64 << 20][..], 1).unwrap();
    let mut blob = zstd::encode_all(tar.as_slice(), 3).unwrap();
    for _ in 0..(20u64 << 30) / (64 << 20) {
        blob.extend_from_slice(&zeros);
    }
    let mut src = Counted {
        inner: blob.as_slice(),
        n: 0,
    };
    let other = s.root.join("zstd");
    fs::create_dir(&other).unwrap();
    match apply_layer(&mut src, Compression::Zstd, &other, &opts) {
        Err(ApplyError::TooLarge { limit, .. }) => assert_eq!(limit, cap),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(
        src.n < blob.len() as u64 / 3,
        "read {} of {} bytes",
        src.n,
        blob.len()
    );

    // Entries of 8 MiB each, all zeros, gzip: the one that no longer fits in 64 MiB is
    // refused at its header.
    let opts = ApplyOptions {
        max_total_bytes: 64 << 20,
        ..opts
    };
    let body = gzip(&vec![0u8; 8 << 20]);
    let mut gz = Vec::new();
    for i in 0..16 {
        gz.extend_from_slice(&gzip(&header_bytes(&format!("z{i}"), 8 << 20)));
        gz.extend_from_slice(&body);
    }
    let other = s.root.join("other");
    fs::create_dir(&other).unwrap();
    match apply_layer(gz.as_slice(), Compression::Gzip, &other, &opts) {
        Err(ApplyError::TooLarge { entry, .. }) => assert_eq!(entry.as_deref(), Some("z7")),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let written: u64 = fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(written, 7 * (8 << 20), "the entries that fit were written");
    s.host_untouched();
}

#[test]
fn entry_count_and_path_length_caps() {
    let s = Scene::new();
    let mut l = Layer::new(T1);
    for i in 0..11 {
        l.file(&format!("f{i}"), "x");
    }
    let opts = ApplyOptions {
        max_entries: 10,
        ..flat()
    };
    assert!(matches!(
        apply(&l.bytes(), &s.root, &opts),
        Err(ApplyError::TooManyEntries { limit: 10 })
    ));

    // Missing parent directories count too: nesting cannot multiply what the layer creates.
    let mut l = Layer::new(T1);
    l.file("a/b/c/d/e/f/g/h/i/j/k/file", "x");
    let nested = s.root.join("nested");
    fs::create_dir(&nested).unwrap();
    assert!(matches!(
        apply(&l.bytes(), &nested, &opts),
        Err(ApplyError::TooManyEntries { limit: 10 })
    ));
    // A deep path is fine within the caps (and its parents are made in one pass).
    let deep = format!("{}f", "d/".repeat(1500));
    let mut l = Layer::new(T1);
    l.file(&deep, "deep");
    let st = apply(&l.bytes(), &nested, &flat()).expect("deep path");
    assert_eq!(st.implicit_dirs, 1500);
    assert_eq!(fs::read_to_string(nested.join(&deep)).unwrap(), "deep");
    // Path bookkeeping is capped.
    let mut l = Layer::new(T1);
    for i in 0..100 {
        l.file(&format!("x{i}/{}f", "y/".repeat(100)), "");
    }
    let small = ApplyOptions {
        max_bookkeeping_bytes: 64 << 10,
        ..flat()
    };
    let r = apply(&l.bytes(), &nested, &small);
    assert!(matches!(r, Err(ApplyError::Bookkeeping { .. })), "{r:?}");

    let long = format!("{}/f", "d".repeat(200).repeat(25)); // 5002 bytes, via PAX path
    let mut l = Layer::new(T1);
    l.file(&long, "x");
    match apply(&l.bytes(), &s.root, &flat()) {
        Err(ApplyError::PathTooLong { len, limit, .. }) => {
            assert_eq!((len, limit), (long.len(), 4096))
        }
        other => panic!("expected PathTooLong, got {other:?}"),
    }
    let mut l = Layer::new(T1);
    l.symlink("l", &"x/".repeat(3000));
    assert!(matches!(
        apply(&l.bytes(), &s.root, &flat()),
        Err(ApplyError::PathTooLong { .. })
    ));

    // An extension header larger than 1 MiB is refused before it is buffered.
    let mut l = Layer::new(T1);
    l.raw(
        b"f",
        b'0',
        0o644,
        (0, 0),
        b"",
        b"",
        &[("comment", &vec![b'a'; 2 << 20])],
    );
    assert!(matches!(
        apply(&l.bytes(), &s.root, &flat()),
        Err(ApplyError::Tar { .. })
    ));
    s.host_untouched();
}

#[test]
fn whiteouts_cannot_reach_outside() {
    let s = Scene::new();
    fs::create_dir(s.at("host")).unwrap();
    fs::write(s.at("host/HOSTFILE"), "root's copy").unwrap();
    let mut l = Layer::new(T1);
    l.file("../../host/.wh.HOSTFILE", "")
        .file("../../.wh.host", "");
    apply(&l.bytes(), &s.root, &flat()).expect("whiteouts inside the root");
    assert!(!exists(&s.at("host")));
    // `.wh..` would name `.`, `.wh.` nothing and `.wh...` the parent: refused.
    for bad in ["a/.wh..", "a/.wh.", "a/.wh..."] {
        let mut l = Layer::new(T1);
        l.raw(bad.as_bytes(), b'0', 0o644, (0, 0), b"", b"", &[]);
        let r = apply(&l.bytes(), &s.root, &flat());
        assert!(matches!(r, Err(ApplyError::Invalid { .. })), "{bad}: {r:?}");
    }
    s.host_untouched();
}

#[test]
fn malformed_streams_are_errors() {
    let s = Scene::new();
    let mut l = Layer::new(T1);
    l.file("a", "hello");
    let good = l.bytes();
    let mut bad_sum = good.clone();
    bad_sum[0] = b'b';
    assert!(matches!(
        apply(&bad_sum, &s.root, &flat()),
        Err(ApplyError::Tar { offset: 0, .. })
    ));
    assert!(matches!(
        apply(&good[..515], &s.root, &flat()),
        Err(ApplyError::Tar { .. })
    ));
    let gz = gzip(&good);
    assert!(matches!(
        apply_layer(&gz[..gz.len() / 2], Compression::Gzip, &s.root, &flat()),
        Err(ApplyError::Decompress { .. })
    ));
    let mut l = Layer::new(T1);
    l.file("./", "root as a file");
    assert!(matches!(
        apply(&l.bytes(), &s.root, &flat()),
        Err(ApplyError::Invalid { .. })
    ));
    match apply_layer(
        &good[..],
        Compression::None,
        &s.top.join("missing"),
        &flat(),
    ) {
        Err(ApplyError::OpenRoot { .. }) => {}
        other => panic!("expected OpenRoot, got {other:?}"),
    }
}

#[test]
fn long_names_and_unicode_paths() {
    let s = Scene::new();
    let deep = format!("{}/{}", "é".repeat(60), "n".repeat(150));
    let mut l = Layer::new(T1);
    l.file(&deep, "deep").symlink("ln", &format!("/{deep}"));
    apply(&l.bytes(), &s.root, &flat()).expect("apply");
    assert_eq!(fs::read_to_string(s.at(&deep)).unwrap(), "deep");
    assert!(
        fs::read_to_string(s.at("ln")).is_err(),
        "the absolute link points nowhere on the host"
    );
    assert_eq!(
        fs::read_link(s.at("ln")).unwrap(),
        Path::new(&format!("/{deep}"))
    );
    let m = fs::metadata(s.at(&deep)).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o644);
}
