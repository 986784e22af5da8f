//! Unpacks an image from an OCI layout with `apply_layer`, doing the checks `umoci unpack` does
//! (blob digests and diff_ids verified while streaming), to time it against umoci:
//!
//! ```text
//! cargo build --release -p rootfs-fetch --example apply_bench
//! target/release/examples/apply_bench LAYOUT TAG DEST [--overlay]
//! ```
//!
//! Without `--overlay` the layers are flattened into DEST (like `umoci unpack`'s rootfs); with
//! it each layer goes to DEST/<n> with overlayfs whiteouts. Devices are created (as umoci does
//! as root). Prints the time and the stats of each layer.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rootfs_fetch::apply::{apply_layer, ApplyOptions, Compression, DevicePolicy, WhiteoutMode};
use sha2::{Digest, Sha256};

/// Hashes what is read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    layout.join("blobs/sha256").join(hex)
}

fn read_json(path: &Path) -> serde_json::Value {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&data).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: apply_bench LAYOUT TAG DEST [--overlay]");
        std::process::exit(2);
    }
    let layout = Path::new(&args[1]);
    let tag = &args[2];
    let dest = Path::new(&args[3]);
    let overlay = args.get(4).map(String::as_str) == Some("--overlay");

    let start = Instant::now();
    let index = read_json(&layout.join("index.json"));
    let manifest_desc = index["manifests"]
        .as_array()
        .expect("index manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag.as_str())
        .unwrap_or_else(|| panic!("no manifest tagged {tag}"));
    let manifest = read_json(&blob_path(
        layout,
        manifest_desc["digest"].as_str().unwrap(),
    ));
    let config = read_json(&blob_path(
        layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");

    let opts = ApplyOptions {
        whiteouts: if overlay {
            WhiteoutMode::OverlayFs
        } else {
            WhiteoutMode::Apply
        },
        devices: DevicePolicy::Create,
        ..ApplyOptions::default()
    };
    std::fs::create_dir_all(dest).expect("create DEST");
    for (n, layer) in manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .enumerate()
    {
        let digest = layer["digest"].as_str().unwrap();
        let media_type = layer["mediaType"].as_str().unwrap();
        let compression = Compression::from_media_type(media_type)
            .unwrap_or_else(|| panic!("not a layer media type: {media_type}"));
        let root = if overlay {
            dest.join(n.to_string())
        } else {
            dest.to_path_buf()
        };
        std::fs::create_dir_all(&root).expect("create layer dir");
        let mut src = Hashing {
            inner: File::open(blob_path(layout, digest)).expect("open blob"),
            hasher: Sha256::new(),
        };
        let t = Instant::now();
        let stats = apply_layer(&mut src, compression, &root, &opts)
            .unwrap_or_else(|e| panic!("layer {digest}: {e}"));
        let got = format!("sha256:{:x}", src.hasher.finalize());
        assert_eq!(got, digest, "blob digest");
        assert_eq!(stats.diff_id.as_deref(), diff_ids[n].as_str(), "diff_id");
        eprintln!(
            "layer {n}: {:.3}s {} entries, {} files, {} dirs, {} MB contents, {} MB stream",
            t.elapsed().as_secs_f64(),
            stats.entries,
            stats.files,
            stats.dirs,
            stats.bytes >> 20,
            stats.stream_bytes >> 20
        );
    }
    println!("{:.3}", start.elapsed().as_secs_f64());
}
