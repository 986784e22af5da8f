//! Image benchmark (issue 4 §8), every peer in the same run:
//!
//! 1. **Unpack** a realistic image — a debootstrap `minbase` Debian bookworm (~100+ MB) as a
//!    one-layer OCI layout — with sbx (import into the content store with every digest checked,
//!    then apply each layer once, as a first `sbx run --image oci:…` does) vs `umoci unpack`
//!    (which also checks the digests), into a fresh loop-mounted ext4, interleaved.
//! 2. **Pull** the same image from Debian's `docker-registry` on 127.0.0.1 into an empty store
//!    (and unpack it) vs `skopeo copy docker://… oci:…` (pull only) and skopeo + `umoci unpack`.
//! 3. **Create latency** (spawn + exec `/bin/true` + teardown) of a sandbox from a 10-layer image
//!    (the Debian base + 9 small layers) vs the built-in `host` image, layers already unpacked.
//!
//! The image is made once and kept in `$SBX_BENCH_CACHE` (default `/var/tmp/sbx-bench-images`):
//! `debootstrap --variant=minbase bookworm` from the host's configured Debian mirror, then GNU
//! tar and `umoci raw add-layer`. Needs root, debootstrap, umoci, skopeo and docker-registry
//! (scripts/setup-images.sh). Run: `cargo bench --bench images` (env `SBX_BENCH_ROUNDS` for the
//! create rounds, default 200; `SBX_BENCH_UNPACK_ROUNDS` for unpack and pull, default 5).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "../tests/support/registry.rs"]
mod registry;

#[path = "common/mod.rs"]
mod common;
use common::*;

use rootfs_fetch::reference::Reference;
use rootfs_fetch::registry::{NoProgress, PullOptions};
use rootfs_fetch::store::Store;
use sbx::runtime::{ExecSpec, ImageRef, Sandbox, SandboxSpec, Stdio};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio as PStdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TAG: &str = "deb";
const TEN: &str = "ten";

fn cache_dir() -> PathBuf {
    std::env::var_os("SBX_BENCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/sbx-bench-images"))
}

fn run(what: &str, cmd: &mut Command) {
    let out = cmd
        .stdin(PStdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Debian mirror apt uses on this host (a debootstrap needs one; no other address is used).
fn debian_mirror() -> String {
    let mut text = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    for line in text.lines() {
        let line = line.trim();
        let uri = line.strip_prefix("URIs:").map(str::trim).or_else(|| {
            line.strip_prefix("deb ")
                .map(|r| r.split_whitespace().next().unwrap_or(""))
        });
        if let Some(u) = uri {
            if u.ends_with("/debian") {
                return u.to_string();
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// The OCI layout with `deb` (the debootstrap rootfs as one layer) and `ten` (deb + 9 layers).
fn layout(cache: &Path) -> PathBuf {
    let layout = cache.join("oci");
    if layout.join("index.json").exists()
        && std::fs::read_to_string(layout.join("index.json"))
            .map(|s| s.contains(&format!("\"{TEN}\"")))
            .unwrap_or(false)
    {
        return layout;
    }
    let rootfs = cache.join("rootfs");
    if !rootfs.join("etc/debian_version").exists() {
        let _ = std::fs::remove_dir_all(&rootfs);
        let mirror = debian_mirror();
        eprintln!("making the bench image: debootstrap --variant=minbase bookworm from {mirror} (a few minutes, once)");
        run(
            "debootstrap",
            Command::new("debootstrap")
                .args(["--variant=minbase", "bookworm"])
                .arg(&rootfs)
                .arg(&mirror),
        );
    }
    let _ = std::fs::remove_dir_all(&layout);
    let l = layout.display().to_string();
    run(
        "umoci init",
        Command::new("umoci").args(["init", "--layout", &l]),
    );
    run(
        "umoci new",
        Command::new("umoci").args(["new", "--image", &format!("{l}:{TAG}")]),
    );
    // GNU tar makes the layers (`umoci insert` writes small layers without the tar trailer,
    // which strict readers — ours, Go's, GNU tar — refuse), umoci adds them to the layout.
    let mut top: Vec<String> = std::fs::read_dir(&rootfs)
        .expect("read the rootfs")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    let tar = cache.join("layer.tar");
    run(
        "tar the rootfs",
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "-C"])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .args(&top),
    );
    run(
        "umoci raw add-layer (rootfs)",
        Command::new("umoci")
            .args(["raw", "add-layer", "--image", &format!("{l}:{TAG}")])
            .arg(&tar),
    );
    run(
        "umoci tag",
        Command::new("umoci").args(["tag", "--image", &format!("{l}:{TAG}"), TEN]),
    );
    let small = cache.join("small");
    for i in 1..10 {
        let _ = std::fs::remove_dir_all(&small);
        std::fs::create_dir_all(small.join("etc/bench")).expect("small layer dir");
        std::fs::write(
            small.join(format!("etc/bench/layer-{i}")),
            format!("layer {i}\n"),
        )
        .expect("small layer file");
        run(
            "tar a small layer",
            Command::new("tar")
                .args(["--numeric-owner", "-C"])
                .arg(&small)
                .arg("-cf")
                .arg(&tar)
                .arg("etc"),
        );
        run(
            "umoci raw add-layer (small)",
            Command::new("umoci")
                .args(["raw", "add-layer", "--image", &format!("{l}:{TEN}")])
                .arg(&tar),
        );
    }
    let _ = std::fs::remove_file(&tar);
    let _ = std::fs::remove_dir_all(&small);
    layout
}

/// A fresh ext4 on a loop device mounted at `mnt` for the run: unpacking next to the inodes a
/// previous run freed is slower on ext4, which would favour whichever tool runs first.
struct Scratch {
    mnt: PathBuf,
    img: PathBuf,
}

impl Scratch {
    fn new(cache: &Path) -> Scratch {
        let img = cache.join("scratch.img");
        let mnt = cache.join("mnt");
        let _ = Command::new("umount")
            .arg(&mnt)
            .stderr(PStdio::null())
            .status();
        std::fs::create_dir_all(&mnt).expect("mnt");
        run(
            "truncate",
            Command::new("truncate").arg("-s").arg("24G").arg(&img),
        );
        run(
            "mkfs.ext4",
            Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img),
        );
        run(
            "mount",
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt),
        );
        Scratch { mnt, img }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = std::fs::remove_file(&self.img);
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// sbx: import the layout's image into an empty store, then apply its layers (each layer
/// synced to disk before it is renamed into place). Returns (import, apply) times.
fn sbx_unpack(layout: &Path, tag: &str, state: &Path) -> (Duration, Duration) {
    let store = rootfs_fetch::image_store(state).expect("store");
    let t = Instant::now();
    let record = rootfs_fetch::oci::import_oci_layout(&store, layout, Some(tag)).expect("import");
    let import = t.elapsed();
    let t = Instant::now();
    rootfs_fetch::layers::unpack_image(&store, &record, &rootfs_fetch::layers_dir(state))
        .expect("unpack");
    (import, t.elapsed())
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("images bench: needs root");
        return;
    }
    for tool in ["debootstrap", "umoci", "skopeo", "docker-registry"] {
        if !Path::new("/usr/bin").join(tool).exists() && !Path::new("/usr/sbin").join(tool).exists()
        {
            eprintln!("images bench: {tool} is missing (scripts/setup-images.sh installs it)");
            return;
        }
    }
    let unpack_rounds: usize = std::env::var("SBX_BENCH_UNPACK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).expect("cache dir");
    let layout = layout(&cache);
    let l = layout.display().to_string();
    let layer_bytes: u64 = std::fs::read_dir(layout.join("blobs/sha256"))
        .expect("blobs")
        .flatten()
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .max()
        .unwrap_or(0);
    println!(
        "sbx images bench: debootstrap minbase bookworm, largest layer {:.0} MB compressed; {unpack_rounds} unpack/pull rounds",
        layer_bytes as f64 / 1e6
    );

    // --- 1. unpack
    let scratch = Scratch::new(&cache);
    let (mut s, mut si, mut sa, mut u, mut us) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..unpack_rounds {
        let state = scratch.mnt.join(format!("sbx-{i}"));
        let (import, apply) = sbx_unpack(&layout, TAG, &state);
        s.push(import + apply);
        si.push(import);
        sa.push(apply);
        run("sync", &mut Command::new("sync"));
        let bundle = scratch.mnt.join(format!("umoci-{i}"));
        let unpack = timed(|| {
            run(
                "umoci unpack",
                Command::new("umoci")
                    .args(["unpack", "--image", &format!("{l}:{TAG}")])
                    .arg(&bundle),
            )
        });
        // umoci does not sync; `sync` right after makes it as durable as sbx's result.
        let flush = timed(|| run("sync", &mut Command::new("sync")));
        u.push(unpack);
        us.push(unpack + flush);
    }
    let (s, si, sa, u, us) = (median(s), median(si), median(sa), median(u), median(us));
    println!();
    println!(
        "unpack (import + verify + apply + sync)  sbx {:>6.2} s (import {:.2} + apply {:.2})",
        secs(s),
        secs(si),
        secs(sa)
    );
    println!(
        "  umoci unpack {:>6.2} s → sbx {:.2}× faster;  umoci unpack + sync {:>6.2} s → sbx {:.2}× faster",
        secs(u),
        secs(u) / secs(s),
        secs(us),
        secs(us) / secs(s)
    );

    // --- 2. pull from a registry on loopback
    let reg = registry::Registry::start("bench");
    let remote = format!("{}/bench/deb:1", reg.addr());
    run(
        "skopeo copy (push)",
        Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{l}:{TAG}"))
            .arg(format!("docker://{remote}")),
    );
    let reference = match Reference::parse(&remote).expect("reference") {
        Reference::Registry(r) => r,
        other => panic!("{remote} parsed as {other:?}"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let (mut sp, mut spu, mut k, mut ku) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..unpack_rounds {
        let state = scratch.mnt.join(format!("pull-{i}"));
        let store = Store::new(state.join("images")).expect("store");
        let mut record = None;
        sp.push(timed(|| {
            let report = rt
                .block_on(rootfs_fetch::registry::pull(
                    &store,
                    &reference,
                    &PullOptions::default(),
                    Arc::new(NoProgress),
                ))
                .expect("pull");
            record = Some(report.record);
        }));
        let record = record.expect("pulled");
        let unpack = timed(|| {
            rootfs_fetch::layers::unpack_image(&store, &record, &rootfs_fetch::layers_dir(&state))
                .expect("unpack pulled");
        });
        spu.push(*sp.last().expect("pull time") + unpack);
        run("sync", &mut Command::new("sync"));
        let dest = scratch.mnt.join(format!("skopeo-{i}"));
        let pull = timed(|| {
            run(
                "skopeo copy (pull)",
                Command::new("skopeo")
                    .args(["copy", "--src-tls-verify=false"])
                    .arg(format!("docker://{remote}"))
                    .arg(format!("oci:{}:{TAG}", dest.display())),
            )
        });
        k.push(pull);
        let bundle = scratch.mnt.join(format!("skopeo-umoci-{i}"));
        let unpack = timed(|| {
            run(
                "umoci unpack (pulled)",
                Command::new("umoci")
                    .args(["unpack", "--image", &format!("{}:{TAG}", dest.display())])
                    .arg(&bundle),
            )
        });
        ku.push(pull + unpack);
        run("sync", &mut Command::new("sync"));
    }
    drop(reg);
    let (sp, spu, k, ku) = (median(sp), median(spu), median(k), median(ku));
    println!(
        "pull from 127.0.0.1 registry        sbx {:>7.2} s   skopeo copy {:>7.2} s    → {:.2}×",
        secs(sp),
        secs(k),
        secs(sp) / secs(k)
    );
    println!(
        "pull + unpack                       sbx {:>7.2} s   skopeo + umoci {:>7.2} s → {:.2}×",
        secs(spu),
        secs(ku),
        secs(spu) / secs(ku)
    );
    drop(scratch);

    // --- 3. create latency: 10-layer image vs host
    let rounds = rounds();
    let mut cfg = support::config();
    cfg.background_cleanup = true;
    let store = rootfs_fetch::image_store(&cfg.state_dir).expect("runtime store");
    let ten = rootfs_fetch::oci::import_oci_layout(&store, &layout, Some(TEN)).expect("import ten");
    assert_eq!(ten.layers.len(), 10, "the ten-layer image");
    let cycle = |image: &ImageRef| {
        let sb = Sandbox::spawn(
            &cfg,
            SandboxSpec {
                image: image.clone(),
                ..Default::default()
            },
        )
        .expect("spawn");
        let mut spec = ExecSpec::new(["/bin/true"]);
        spec.stdin = Stdio::Null;
        spec.stdout = Stdio::Null;
        spec.stderr = Stdio::Null;
        let code = sb.exec(spec).expect("exec").wait().expect("wait").code();
        assert_eq!(code, 0);
        sb.destroy().expect("destroy");
    };
    let stored = ImageRef::Stored(ten.id.clone());
    let host = ImageRef::Host;
    let t = measure(rounds, || cycle(&stored));
    let h = measure(rounds, || cycle(&host));
    println!();
    println!("create + exec /bin/true + teardown ({rounds} rounds, medians)");
    row("10-layer image (debian + 9)", &t);
    row("host image", &h);
    println!(
        "→ 10-layer image {:.2}× the host image",
        ms(t.median) / ms(h.median)
    );
}
