//! Latency benchmark: sandbox spawn + exec `/bin/true` + teardown, and the exec round trip into a
//! running sandbox, as medians; with crun, runc and bubblewrap on the same busybox rootfs measured
//! in the same run when they are installed, and the ratios printed.
//!
//! The same through sbxd's socket is `benches/daemon.rs`.
//!
//! Run as root: `cargo bench --bench latency` (env `SBX_BENCH_ROUNDS`, default 200).

#[path = "../tests/support/mod.rs"]
mod support;

use sbx::runtime::{ExecSpec, ImageRef, Sandbox, SandboxSpec, Stdio};
use std::process::Command;

#[path = "common/mod.rs"]
mod common;
use common::*;

fn quiet_exec(sb: &Sandbox, argv: &[&str]) -> i32 {
    let mut spec = ExecSpec::new(argv.iter().copied());
    spec.stdin = Stdio::Null;
    spec.stdout = Stdio::Null;
    spec.stderr = Stdio::Null;
    let mut p = sb.exec(spec).expect("exec");
    p.wait().expect("wait").code()
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("latency bench: needs root");
        return;
    }
    let rounds = rounds();
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
    // --- exec round trip into a running sandbox
    let sb = spawn();
    let sbx_exec = measure(rounds * 5, || {
        assert_eq!(quiet_exec(&sb, &["/bin/true"]), 0);
    });
    sb.destroy().expect("destroy");

    sbx::runtime::janitor::flush();
    println!("{:<48} {:>10} {:>10}", "measure", "median ms", "p90 ms");
    row("sbx spawn+exec+teardown (library)", &sbx_cycle);
    row("sbx exec /bin/true round trip (library)", &sbx_exec);

    let work = support::test_root().join("bench");
    let mounted_hugetlb = ensure_hugetlb_v1();
    let mut peers: Vec<(String, Stats, Option<Stats>)> = Vec::new();
    for rt in ["crun", "runc"] {
        if let Some((run, exec)) = peer(rt, &rootfs, &work, rounds) {
            row(&format!("{rt} run /bin/true"), &run);
            if let Some(e) = &exec {
                row(&format!("{rt} exec /bin/true"), e);
            }
            peers.push((rt.to_string(), run, exec));
        }
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
    release_hugetlb(mounted_hugetlb);
    let _ = std::fs::remove_dir_all(&work);

    println!();
    println!("ratios (sbx / peer; below 1.0 is faster):");
    for (name, run, exec) in &peers {
        println!(
            "  spawn+exec+teardown (library) vs {name} run: {:.2}x",
            ms(sbx_cycle.median) / ms(run.median)
        );
        if let Some(e) = exec {
            println!(
                "  exec round trip (library) vs {name} exec: {:.2}x",
                ms(sbx_exec.median) / ms(e.median)
            );
        }
    }
}
