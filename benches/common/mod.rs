//! Shared by the benches: medians, the peers (crun, runc, bwrap) and their OCI bundles.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio as PStdio};
use std::time::{Duration, Instant};

pub struct Stats {
    pub median: Duration,
    pub p90: Duration,
}

pub fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    Stats {
        median: v[v.len() / 2],
        p90: v[v.len() * 9 / 10],
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn measure(rounds: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..rounds.min(10) {
        f(); // warm caches
    }
    let mut v = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    stats(v)
}

pub fn installed(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(PStdio::null())
        .stderr(PStdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// crun on a cgroup v1/hybrid host wants every v1 controller mounted, hugetlb included.
/// Returns true when we mounted it (and so must unmount it).
pub fn ensure_hugetlb_v1() -> bool {
    let p = Path::new("/sys/fs/cgroup/hugetlb");
    let is_v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
    if !is_v1 || p.join("cgroup.procs").exists() {
        return false;
    }
    let _ = std::fs::create_dir(p);
    Command::new("mount")
        .args(["-t", "cgroup", "-o", "hugetlb", "cgroup"])
        .arg(p)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// An OCI bundle whose rootfs is the busybox rootfs, running `args`.
pub fn oci_bundle(dir: &Path, rootfs: &Path, args: &[&str]) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let st = Command::new("crun")
        .arg("spec")
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success());
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["root"]["path"] = serde_json::json!(rootfs);
    cfg["process"]["terminal"] = serde_json::json!(false);
    cfg["process"]["args"] = serde_json::json!(args);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    dir.to_path_buf()
}

pub fn run_quiet(cmd: &mut Command) -> bool {
    cmd.stdin(PStdio::null())
        .stdout(PStdio::null())
        .stderr(PStdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `<rt> run` of /bin/true, and `<rt> exec` of /bin/true into a detached container, on the
/// busybox rootfs; None when the runtime is not installed.
pub fn peer(rt: &str, rootfs: &Path, work: &Path, rounds: usize) -> Option<(Stats, Option<Stats>)> {
    if !installed(rt) {
        println!("{rt}: not installed, skipped");
        return None;
    }
    let bundle = oci_bundle(&work.join(format!("{rt}-true")), rootfs, &["/bin/true"]);
    let mut n = 0;
    let run = measure(rounds, || {
        n += 1;
        let id = format!("sbxbench-{rt}-{}-{n}", std::process::id());
        assert!(
            run_quiet(Command::new(rt).args(["run", "-b"]).arg(&bundle).arg(&id)),
            "{rt} run failed (on a cgroup v1 host it needs the hugetlb hierarchy mounted)"
        );
    });
    let bundle = oci_bundle(
        &work.join(format!("{rt}-sleep")),
        rootfs,
        &["/bin/sleep", "1000"],
    );
    let id = format!("sbxbench-{rt}-exec-{}", std::process::id());
    let exec = if run_quiet(
        Command::new(rt)
            .args(["run", "-d", "-b"])
            .arg(&bundle)
            .arg(&id),
    ) {
        let s = measure(rounds, || {
            assert!(run_quiet(Command::new(rt).args(["exec", &id, "/bin/true"])));
        });
        run_quiet(Command::new(rt).args(["delete", "-f", &id]));
        Some(s)
    } else {
        println!("{rt} run -d failed: exec not measured");
        None
    };
    Some((run, exec))
}

/// Undo [`ensure_hugetlb_v1`] when it mounted.
pub fn release_hugetlb(mounted: bool) {
    if mounted {
        let _ = Command::new("umount")
            .arg("/sys/fs/cgroup/hugetlb")
            .status();
        let _ = std::fs::remove_dir("/sys/fs/cgroup/hugetlb");
    }
}

pub fn row(name: &str, s: &Stats) {
    println!("{:<48} {:>10.2} {:>10.2}", name, ms(s.median), ms(s.p90));
}

/// Rounds per measure: `SBX_BENCH_ROUNDS`, default 200.
pub fn rounds() -> usize {
    std::env::var("SBX_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}
