//! Image references for sbx: turn an image reference into the read-only layers (and host binds)
//! a sandbox rootfs is assembled from: the built-in `host` image, plain rootfs directories
//! (`dir:PATH`) and images in the content store (`im-…`: pulled, imported or built), whose
//! layers are unpacked once each and shared.

pub mod apply;
pub mod commit;
pub mod layers;
pub mod oci;
pub mod reference;
pub mod registry;
pub mod store;

use std::fmt;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{symlink, DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// An image a sandbox starts from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ImageRef {
    /// The host's /usr (and /bin, /lib*, /sbin) read-only, a minimal /etc, fresh writable dirs.
    #[default]
    Host,
    /// A rootfs directory on the host, used read-only as the lower layer.
    Dir(PathBuf),
    /// An image in the content store under `<state_dir>/images` (`im-` + 24 hex digits).
    Stored(store::ImageId),
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Host => write!(f, "host"),
            ImageRef::Dir(p) => write!(f, "dir:{}", p.display()),
            ImageRef::Stored(id) => write!(f, "{id}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "invalid image reference {0:?}: expected `host`, `dir:/absolute/path` or an image id \
         `im-` followed by 24 lowercase hex digits"
    )]
    InvalidRef(String),
    #[error("image directory {path} is not usable: {reason}")]
    BadDir { path: PathBuf, reason: String },
    #[error("failed to build the host image skeleton at {path}: {source}")]
    Skeleton {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {id} is not in the store (pull, import or build it first)")]
    NotInStore { id: store::ImageId },
    #[error("reading image {id} from the store failed: {source}")]
    Store {
        id: store::ImageId,
        #[source]
        source: store::StoreError,
    },
    #[error(transparent)]
    Layers(#[from] layers::LayerError),
}

impl FromStr for ImageRef {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, ImageError> {
        if s == "host" {
            return Ok(ImageRef::Host);
        }
        if let Some(p) = s.strip_prefix("dir:") {
            let path = PathBuf::from(p);
            if !path.is_absolute() || p.split('/').any(|c| c == "..") {
                return Err(ImageError::InvalidRef(s.to_string()));
            }
            return Ok(ImageRef::Dir(path));
        }
        if s.starts_with("im-") {
            if let Ok(reference::Reference::Built(id)) = reference::Reference::parse(s) {
                return Ok(ImageRef::Stored(id));
            }
        }
        Err(ImageError::InvalidRef(s.to_string()))
    }
}

/// A read-only bind of a host directory into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
}

/// What a sandbox rootfs is assembled from.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Read-only lower layers, topmost first.
    pub lowers: Vec<PathBuf>,
    /// Host directories bound read-only on top of the overlay (for `host` and stored images
    /// layered on it).
    pub binds: Vec<HostBind>,
    /// The lowers hold canonical ids (uid 0 is the image's root) and must be mounted id-mapped
    /// through the sandbox's user namespace, so that host uid/gid N shows as N inside. True
    /// for stored images (the host skeleton under a host-based one included); false for
    /// `host` and `dir:` (used as they are on the host).
    pub idmap_lowers: bool,
    /// The run settings of a stored image (Env, Entrypoint, Cmd, WorkingDir, User,
    /// ExposedPorts) for the caller to apply; `None` for `host` and `dir:`.
    pub config: Option<store::ImageConfig>,
}

/// The content store of images under a state directory (`<state_dir>/images`).
pub fn image_store(state_dir: &Path) -> Result<store::Store, store::StoreError> {
    store::Store::new(state_dir.join("images"))
}

/// Where the unpacked layers of stored images live (`<state_dir>/images/layers`, 0700).
pub fn layers_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("images").join("layers")
}

/// Directories every sandbox upper layer starts with, owned by the sandbox's root, with their
/// modes: they make the rootfs writable where programs expect it.
pub const UPPER_DIRS: &[(&str, u32)] = &[
    ("root", 0o700),
    ("tmp", 0o1777),
    ("home", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("run", 0o755),
];

/// Mount points a sandbox needs; created in its upper layer when the image has none.
pub const MOUNT_POINTS: &[&str] = &["proc", "sys", "dev"];

/// Resolve an image to its layers, building what is built-in on first use.
pub fn resolve(image: &ImageRef, state_dir: &Path) -> Result<Resolved, ImageError> {
    match image {
        ImageRef::Host => host_image(state_dir, Path::new("/")),
        ImageRef::Dir(path) => {
            let meta = fs::metadata(path).map_err(|e| ImageError::BadDir {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if !meta.is_dir() {
                return Err(ImageError::BadDir {
                    path: path.clone(),
                    reason: "not a directory".into(),
                });
            }
            Ok(Resolved {
                lowers: vec![path.clone()],
                binds: vec![],
                idmap_lowers: false,
                config: None,
            })
        }
        ImageRef::Stored(id) => {
            let store_err = |source| ImageError::Store {
                id: id.clone(),
                source,
            };
            let store = image_store(state_dir).map_err(store_err)?;
            let record = store.load_image(id).map_err(|e| match e {
                store::StoreError::ImageMissing { .. } => ImageError::NotInStore { id: id.clone() },
                e => store_err(e),
            })?;
            if !record.host_base {
                let lowers = layers::unpack_image(&store, &record, &layers_dir(state_dir))?;
                return Ok(Resolved {
                    lowers,
                    binds: vec![],
                    idmap_lowers: true,
                    config: Some(record.config),
                });
            }
            // Layered on the host image: its layers over the host skeleton (all id-mapped: the
            // skeleton's root-owned files are the sandbox root's, as the layers' are), and the
            // host's program directories bound on top as for `host`.
            let mut lowers = if record.layers.is_empty() {
                Vec::new()
            } else {
                layers::unpack_image(&store, &record, &layers_dir(state_dir))?
            };
            let host = host_image(state_dir, Path::new("/"))?;
            lowers.extend(host.lowers);
            Ok(Resolved {
                lowers,
                binds: host.binds,
                idmap_lowers: true,
                config: Some(record.config),
            })
        }
    }
}

/// Top-level host directories that hold programs and libraries: bound read-only when they are
/// directories, recreated as the same symlink when they are symlinks (merged /usr).
const HOST_PROGRAM_DIRS: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Host /etc entries a program needs to run; copied (symlinks kept as symlinks) into the skeleton.
/// Nothing secret: no shadow, no ssh keys, no machine-id.
const HOST_ETC: &[&str] = &[
    "resolv.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "alternatives",
    "localtime",
    "timezone",
    "os-release",
    "debian_version",
    "protocols",
    "services",
    "mime.types",
    "bash.bashrc",
    "profile",
    "inputrc",
    "environment",
    "python3",
    "python3.11",
];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\ntty:x:5:\nusers:x:100:\nnogroup:x:65534:\n";
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n\
networks: files\nprotocols: files\nservices: files\nethers: files\nrpc: files\n";

/// The host image: a small skeleton directory (minimal /etc, mount points) as the only lower
/// layer, plus read-only binds of the host's program directories. The skeleton is keyed by a hash
/// of the host files it copies, so a host upgrade (a new ld.so.cache) yields a fresh one.
fn host_image(state_dir: &Path, host_root: &Path) -> Result<Resolved, ImageError> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    "skeleton-v4".hash(&mut hasher);
    for name in HOST_ETC {
        let p = host_root.join("etc").join(name);
        if let Ok(m) = fs::symlink_metadata(&p) {
            (name, m.mtime(), m.mtime_nsec(), m.size(), m.ino()).hash(&mut hasher);
        }
    }
    let mut binds = Vec::new();
    let mut links = Vec::new();
    for name in HOST_PROGRAM_DIRS {
        let p = host_root.join(name);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(t) = fs::read_link(&p) {
                    (name, "link", &t).hash(&mut hasher);
                    links.push((name.to_string(), t));
                }
            }
            Ok(m) if m.is_dir() => {
                (name, "dir").hash(&mut hasher);
                binds.push(HostBind {
                    source: p,
                    target: Path::new("/").join(name),
                });
            }
            _ => {}
        }
    }
    binds.insert(
        0,
        HostBind {
            source: host_root.join("usr"),
            target: PathBuf::from("/usr"),
        },
    );
    let dir = state_dir
        .join("images")
        .join(format!("host-{:016x}", hasher.finish()));
    if !dir.is_dir() {
        build_skeleton(&dir, host_root, &binds, &links)?;
    }
    Ok(Resolved {
        lowers: vec![dir],
        binds,
        idmap_lowers: false,
        config: None,
    })
}

fn build_skeleton(
    dir: &Path,
    host_root: &Path,
    binds: &[HostBind],
    links: &[(String, PathBuf)],
) -> Result<(), ImageError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Skeleton { path, source }
    };
    fs::create_dir_all(parent).map_err(err(parent))?;
    // Build aside, then rename: a crash leaves no half skeleton under the final name.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = parent.join(format!(
        ".tmp-{}-{seq}-{}",
        std::process::id(),
        dir.file_name().and_then(|s| s.to_str()).unwrap_or("host")
    ));
    let _ = fs::remove_dir_all(&tmp);
    let mkdir = |rel: &str, mode: u32| -> Result<(), ImageError> {
        let p = tmp.join(rel);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&p)
            .map_err(err(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(err(&p))
    };
    mkdir("", 0o755)?;
    for (rel, mode) in UPPER_DIRS {
        mkdir(rel, *mode)?;
    }
    for rel in MOUNT_POINTS {
        mkdir(rel, 0o555)?;
    }
    for rel in ["etc", "usr", "mnt", "opt", "srv", "media"] {
        mkdir(rel, 0o755)?;
    }
    for b in binds {
        let rel = b.target.strip_prefix("/").unwrap_or(&b.target);
        mkdir(&rel.to_string_lossy(), 0o755)?;
    }
    for (name, target) in links {
        let p = tmp.join(name);
        symlink(target, &p).map_err(err(&p))?;
    }
    let etc = tmp.join("etc");
    for (name, content) in [
        ("passwd", PASSWD),
        ("group", GROUP),
        ("hosts", HOSTS),
        ("nsswitch.conf", NSSWITCH),
    ] {
        let p = etc.join(name);
        fs::write(&p, content).map_err(err(&p))?;
    }
    for name in HOST_ETC {
        let src = host_root.join("etc").join(name);
        if fs::symlink_metadata(&src).is_ok() {
            copy_tree(&src, &etc.join(name))?;
        }
    }
    // Host private keys never go into an image, readable or not. Only a real directory of
    // our copy is removed: if the host's /etc/ssl is a symlink, so is our copy, and its
    // private/ is the host's own (copy_tree copied the link, not the keys).
    let is_real_dir = |p: &Path| fs::symlink_metadata(p).map(|m| m.is_dir()).unwrap_or(false);
    let private = etc.join("ssl/private");
    if is_real_dir(&etc.join("ssl")) && is_real_dir(&private) {
        fs::remove_dir_all(&private).map_err(err(&private))?;
    }
    match fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another process built the same skeleton first: use theirs.
        Err(_) if dir.is_dir() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(ImageError::Skeleton {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// Copy a file, a symlink (as a symlink) or a directory tree; modes kept, owners left as root.
fn copy_tree(src: &Path, dst: &Path) -> Result<(), ImageError> {
    let err = |source| ImageError::Skeleton {
        path: src.to_path_buf(),
        source,
    };
    let meta = fs::symlink_metadata(src).map_err(err)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        symlink(fs::read_link(src).map_err(err)?, dst).map_err(err)?;
    } else if ft.is_dir() {
        fs::create_dir(dst).map_err(err)?;
        for ent in fs::read_dir(src).map_err(err)? {
            let ent = ent.map_err(err)?;
            copy_tree(&ent.path(), &dst.join(ent.file_name()))?;
        }
        fs::set_permissions(dst, meta.permissions()).map_err(err)?;
    } else if ft.is_file() {
        fs::copy(src, dst).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert_eq!("host".parse::<ImageRef>().ok(), Some(ImageRef::Host));
        assert_eq!(
            "dir:/srv/rootfs".parse::<ImageRef>().ok(),
            Some(ImageRef::Dir("/srv/rootfs".into()))
        );
        let id = format!("im-{}", "0123456789abcdef01234567");
        let parsed: ImageRef = id.parse().unwrap();
        assert!(matches!(&parsed, ImageRef::Stored(i) if i.as_str() == id));
        assert_eq!(parsed.to_string(), id);
        assert_eq!(parsed.to_string().parse::<ImageRef>().ok(), Some(parsed));
        for bad in [
            "",
            "dir:relative",
            "dir:/a/../b",
            "docker://x",
            "im-abc",
            "im-0123456789ABCDEF01234567",
            "busybox:1",
        ] {
            let e = bad.parse::<ImageRef>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn host_skeleton_is_minimal_and_reused() {
        let state = std::env::temp_dir().join(format!("sbx-skel-test-{}", std::process::id()));
        let r1 = resolve(&ImageRef::Host, &state).unwrap();
        let r2 = resolve(&ImageRef::Host, &state).unwrap();
        assert_eq!(r1.lowers, r2.lowers);
        let skel = &r1.lowers[0];
        assert!(skel.join("etc/passwd").is_file());
        assert!(skel.join("etc/ld.so.cache").exists());
        assert!(!skel.join("etc/shadow").exists());
        assert!(!skel.join("etc/ssl/private").exists());
        assert!(!skel.join("etc/machine-id").exists());
        assert!(r1.binds.iter().any(|b| b.target == Path::new("/usr")));
        fs::remove_dir_all(&state).unwrap();
    }
}
