//! Latency benchmark: sandbox spawn + exec `/bin/true` + teardown, and the exec round trip into a
//! running sandbox, as medians; with crun, runc and bubblewrap on the same busybox rootfs measured
//! in the same run when they are installed, and the ratios printed.
//!
//! Run as root: `cargo bench --bench latency` (env `SBX_BENCH_ROUNDS`, default 200).

#[path = "../tests/support/mod.rs"]
mod support;

use sbx::runtime::{ExecSpec, ImageRef, Sandbox, SandboxSpec, Stdio};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio as PStdio};
use std::time::{Duration, Instant};

struct Stats {
    median: Duration,
    p90: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    Stats {
        median: v[v.len() / 2],
        p90: v[v.len() * 9 / 10],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn measure(rounds: usize, mut f: impl FnMut()) -> Stats {
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

fn quiet_exec(sb: &Sandbox, argv: &[&str]) -> i32 {
    let mut spec = ExecSpec::new(argv.iter().copied());
    spec.stdin = Stdio::Null;
    spec.stdout = Stdio::Null;
    spec.stderr = Stdio::Null;
    let mut p = sb.exec(spec).expect("exec");
    p.wait().expect("wait").code()
}

fn installed(cmd: &str) -> bool {
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
fn ensure_hugetlb_v1() -> bool {
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
fn oci_bundle(dir: &Path, rootfs: &Path, args: &[&str]) -> PathBuf {
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

fn run_quiet(cmd: &mut Command) -> bool {
    cmd.stdin(PStdio::null())
        .stdout(PStdio::null())
        .stderr(PStdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("latency bench: needs root");
        return;
    }
    let rounds: usize = std::env::var("SBX_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let rootfs = support::busybox_rootfs();
    // As a long-running daemon runs it: warm helpers, cleanup after death off the caller's path
    // (flushed before the figures are printed).
    let mut cfg = support::config();
    cfg.background_cleanup = true;
    let image = ImageRef::Dir(rootfs.clone());
    println!(
        "sbx latency bench: {rounds} rounds, busybox rootfs {}",
        rootfs.display()
    );
    println!();

    let spawn = || {
        Sandbox::spawn(
            &cfg,
            SandboxSpec {
                image: image.clone(),
                ..Default::default()
            },
        )
        .expect("spawn")
    };

    // --- spawn + exec /bin/true + teardown
    let sbx_cycle = measure(rounds, || {
        let sb = spawn();
        assert_eq!(quiet_exec(&sb, &["/bin/true"]), 0);
        sb.destroy().expect("destroy");
    });
    let sbx_bin = PathBuf::from(env!("CARGO_BIN_EXE_sbx"));
    let image_arg = format!("dir:{}", rootfs.display());
    let sbx_cli = measure(rounds, || {
        assert!(run_quiet(
            Command::new(&sbx_bin)
                .arg("--state-dir")
                .arg(&cfg.state_dir)
                .arg("--run-dir")
                .arg(&cfg.run_dir)
                .args(["run", "--image", &image_arg, "--", "/bin/true"])
                .env("SBX_INIT", &cfg.init_binary)
        ));
    });

    // --- exec round trip into a running sandbox
    let sb = spawn();
    let sbx_exec = measure(rounds * 5, || {
        assert_eq!(quiet_exec(&sb, &["/bin/true"]), 0);
    });
    sb.destroy().expect("destroy");

    sbx::runtime::janitor::flush();
    println!("{:<44} {:>10} {:>10}", "measure", "median ms", "p90 ms");
    let row = |name: &str, s: &Stats| {
        println!("{:<44} {:>10.2} {:>10.2}", name, ms(s.median), ms(s.p90));
    };
    row("sbx spawn+exec+teardown (library)", &sbx_cycle);
    row("sbx run /bin/true (CLI, end to end)", &sbx_cli);
    row("sbx exec /bin/true round trip", &sbx_exec);

    let work = support::test_root().join("bench");
    let mounted_hugetlb = ensure_hugetlb_v1();
    let mut peers: Vec<(String, Stats, Option<Stats>)> = Vec::new();
    for rt in ["crun", "runc"] {
        if !installed(rt) {
            println!("{rt}: not installed, skipped");
            continue;
        }
        let bundle = oci_bundle(&work.join(format!("{rt}-true")), &rootfs, &["/bin/true"]);
        let mut n = 0;
        let run = measure(rounds, || {
            n += 1;
            let id = format!("sbxbench-{rt}-{}-{n}", std::process::id());
            assert!(
                run_quiet(Command::new(rt).args(["run", "-b"]).arg(&bundle).arg(&id)),
                "{rt} run failed (on a cgroup v1 host it needs the hugetlb hierarchy mounted)"
            );
        });
        // exec: a detached container running sleep, then `<rt> exec id /bin/true`.
        let bundle = oci_bundle(
            &work.join(format!("{rt}-sleep")),
            &rootfs,
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
        row(&format!("{rt} run /bin/true"), &run);
        if let Some(e) = &exec {
            row(&format!("{rt} exec /bin/true"), e);
        }
        peers.push((rt.to_string(), run, exec));
    }
    if installed("bwrap") {
        let bw = measure(rounds, || {
            assert!(run_quiet(
                Command::new("bwrap")
                    .arg("--ro-bind")
                    .arg(&rootfs)
                    .arg("/")
                    .args([
                        "--proc",
                        "/proc",
                        "--dev",
                        "/dev",
                        "--unshare-all",
                        "/bin/true"
                    ])
            ));
        });
        row("bwrap --unshare-all /bin/true", &bw);
        peers.push(("bwrap".into(), bw, None));
    } else {
        println!("bwrap: not installed, skipped");
    }
    if mounted_hugetlb {
        let _ = Command::new("umount")
            .arg("/sys/fs/cgroup/hugetlb")
            .status();
        let _ = std::fs::remove_dir("/sys/fs/cgroup/hugetlb");
    }
    let _ = std::fs::remove_dir_all(&work);

    println!();
    println!("ratios (sbx / peer; below 1.0 is faster):");
    for (name, run, exec) in &peers {
        println!(
            "  spawn+exec+teardown vs {name} run: library {:.2}x, CLI {:.2}x",
            ms(sbx_cycle.median) / ms(run.median),
            ms(sbx_cli.median) / ms(run.median)
        );
        if let Some(e) = exec {
            println!(
                "  exec round trip vs {name} exec: {:.2}x",
                ms(sbx_exec.median) / ms(e.median)
            );
        }
    }
}
