//! Latency through sbxd's socket, as a client program sees it: create a sandbox → first exec
//! of `/bin/true` → its exit (with warm sandboxes, as sbxd runs by default, at a steady pace
//! and in a back-to-back burst that drains them; and cold, `--warm 0`); a sandbox whose entrypoint is `/bin/true` from create to its
//! returncode; the exec round trip into a running sandbox; 100 concurrent execs over one HTTP/2
//! connection; and `sbx run /bin/true` end to end. `crun run` / `crun exec` on the same busybox
//! rootfs are measured in the same run, and the ratios printed. Before each timed phase sbxd
//! settles: the previous phase's teardowns are done and its warm sandboxes ready again (both
//! read from /metrics), so a phase measures its own work.
//!
//! Run as root: `cargo bench --bench daemon` (env `SBX_BENCH_ROUNDS`, default 200).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;
use common::*;

use sbx::api::{CreateSandbox, ExecRequest, StreamMode};
use sbx::client::{Client, Sandbox};
use std::process::Command;
use std::time::{Duration, Instant};

/// sbxd on its own socket and dirs, stopped (SIGTERM) when dropped.
struct Daemon {
    child: std::process::Child,
    dir: std::path::PathBuf,
    run: std::path::PathBuf,
}

impl Daemon {
    /// sbxd keeping `warm` sandboxes per shape (0: every create starts one cold).
    fn start(warm: usize) -> Daemon {
        let dir = support::test_root().join(format!("bench-daemon-{}-{warm}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The run dir (sockets, mount points) on tmpfs under /run, as sbxd's default /run/sbx.
        let run =
            std::path::Path::new("/run").join(format!("sbx-bench-{}-{warm}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let child = Command::new(env!("CARGO_BIN_EXE_sbxd"))
            .arg("--socket")
            .arg(dir.join("sbxd.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(&run)
            .env("SBX_INIT", env!("CARGO_BIN_EXE_sbx-init"))
            .env("SBX_LOG", "warn")
            .env("SBX_WARM", warm.to_string())
            .stdin(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("sbxd.log")).unwrap())
            .spawn()
            .expect("start sbxd");
        let sock = dir.join("sbxd.sock");
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "sbxd did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { child, dir, run }
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.join("sbxd.sock")
    }

    /// A series of /metrics (its first sample starting with `series `), 0 if absent.
    fn metric(&self, series: &str) -> u64 {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.socket()).expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: sbx\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body.lines()
            .find(|l| l.starts_with(&format!("{series} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// (hits, misses) of warm sandboxes so far.
    fn warm_counts(&self) -> (u64, u64) {
        (
            self.metric("sbx_warm_creates_total{result=\"hit\"}"),
            self.metric("sbx_warm_creates_total{result=\"miss\"}"),
        )
    }

    /// Wait (at most 20 s) until the previous phase's sandboxes are torn down and `warm`
    /// sandboxes are ready again: a phase measures its own work, not the background work the
    /// one before left behind.
    fn settle(&self, warm: u64) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20)
            && (self.metric("sbx_teardowns_pending") > 0
                || self.metric("sbx_warm_sandboxes") < warm)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

fn quiet(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        stdout: StreamMode::Devnull,
        stderr: StreamMode::Devnull,
        stdin: Some(false),
        ..Default::default()
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("daemon bench: needs root");
        return;
    }
    let rounds = rounds();
    let rootfs = support::busybox_rootfs();
    let image = format!("dir:{}", rootfs.display());
    let daemon = Daemon::start(sbx::daemon::DEFAULT_WARM);
    let cold_daemon = Daemon::start(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(Client::connect_to(daemon.socket()))
        .expect("connect");
    let cold_client = rt
        .block_on(Client::connect_to(cold_daemon.socket()))
        .expect("connect");
    println!(
        "sbx daemon bench: {rounds} rounds, busybox rootfs {}, sbxd on {} ({} warm sandboxes per shape) and {} (warm off)",
        rootfs.display(),
        daemon.socket().display(),
        sbx::daemon::DEFAULT_WARM,
        cold_daemon.socket().display()
    );
    println!();
    let params = || CreateSandbox {
        image: Some(image.clone()),
        ..Default::default()
    };

    // create → first exec of /bin/true → exit. Each sandbox is deleted after its round,
    // untimed; `pause` (untimed) comes before each round: a steady rate of creates. After 10
    // rounds of warm-up the daemon settles (`warm` ready again, teardowns done).
    let first_exec = |client: &Client, d: &Daemon, warm: u64, pause: Duration, rounds: usize| {
        let mut v = Vec::with_capacity(rounds);
        for i in 0..rounds + 10 {
            if i == 10 {
                d.settle(warm);
            }
            std::thread::sleep(pause);
            let t = Instant::now();
            let sb = rt.block_on(async {
                let sb = Sandbox::create(client, params()).await.expect("create");
                let p = sb.exec_with(quiet(&["/bin/true"])).await.expect("exec");
                assert_eq!(p.wait().await.expect("wait"), 0);
                sb
            });
            if i >= 10 {
                v.push(t.elapsed());
            }
            rt.block_on(sb.delete()).expect("delete");
        }
        stats(v)
    };
    let pace = Duration::from_millis(30);
    let (h0, m0) = daemon.warm_counts();
    let warm = sbx::daemon::DEFAULT_WARM as u64;
    let warm_paced = first_exec(&client, &daemon, warm, pace, rounds);
    let (h1, m1) = daemon.warm_counts();
    let warm_burst = first_exec(&client, &daemon, warm, Duration::ZERO, rounds);
    let (h2, m2) = daemon.warm_counts();
    let cold = first_exec(&cold_client, &cold_daemon, 0, pace, rounds);
    drop(cold_client);
    drop(cold_daemon);

    // An entrypoint /bin/true: create → returncode.
    daemon.settle(warm);
    let entry = measure(rounds, || {
        rt.block_on(async {
            let sb = Sandbox::create(
                &client,
                CreateSandbox {
                    entrypoint: vec!["/bin/true".into()],
                    ..params()
                },
            )
            .await
            .expect("create");
            assert_eq!(sb.wait().await.expect("wait"), 0);
            sb.delete().await.expect("delete");
        })
    });

    // Exec round trip into one running sandbox.
    let sb = rt
        .block_on(Sandbox::create(&client, params()))
        .expect("create");
    daemon.settle(warm);
    let exec = measure(rounds * 5, || {
        rt.block_on(async {
            let p = sb.exec_with(quiet(&["/bin/true"])).await.expect("exec");
            assert_eq!(p.wait().await.expect("wait"), 0);
        })
    });

    // 100 concurrent execs over the one connection.
    let conc_rounds = (rounds / 10).max(5);
    let concurrent = measure(conc_rounds, || {
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..100 {
                let sb = sb.clone();
                set.spawn(async move {
                    let p = sb
                        .exec(["/bin/echo", &format!("n{i}")])
                        .await
                        .expect("exec");
                    let out = p.stdout().read_text().await.expect("read");
                    assert_eq!(out, format!("n{i}\n"));
                    assert_eq!(p.wait().await.expect("wait"), 0);
                });
            }
            while let Some(r) = set.join_next().await {
                r.expect("task");
            }
        })
    });
    rt.block_on(sb.delete()).expect("delete");

    // `sbx run` end to end, the CLI talking to the running daemon.
    let sbx = env!("CARGO_BIN_EXE_sbx");
    let cli = measure(rounds, || {
        assert!(run_quiet(
            Command::new(sbx)
                .arg("--socket")
                .arg(daemon.socket())
                .arg("--no-autostart")
                .args(["run", "--image", &image, "--", "/bin/true"])
        ));
    });

    println!("{:<48} {:>10} {:>10}", "measure", "median ms", "p90 ms");
    row("create → first exec → exit, warm, 1 per 30 ms", &warm_paced);
    row(
        "create → first exec → exit, warm, back to back",
        &warm_burst,
    );
    row("create → first exec → exit, cold (--warm 0)", &cold);
    row("create with entrypoint /bin/true → returncode", &entry);
    row("exec /bin/true round trip", &exec);
    row("100 concurrent execs (echo, read, wait)", &concurrent);
    row("sbx run /bin/true (CLI, end to end)", &cli);
    println!(
        "  100 concurrent execs: {:.0} execs/s",
        100.0 / concurrent.median.as_secs_f64()
    );
    println!(
        "  warm sandboxes taken: {}/{} creates at 1 per 30 ms, {}/{} back to back",
        h1 - h0,
        (h1 - h0) + (m1 - m0),
        h2 - h1,
        (h2 - h1) + (m2 - m1)
    );

    let work = support::test_root().join("bench-daemon-peers");
    let mounted = ensure_hugetlb_v1();
    if let Some((run, exec_peer)) = peer("crun", &rootfs, &work, rounds) {
        row("crun run /bin/true", &run);
        if let Some(e) = &exec_peer {
            row("crun exec /bin/true", e);
        }
        println!();
        println!("ratios (sbx through the socket / crun; below 1.0 is faster):");
        println!(
            "  create+first exec vs crun run: warm {:.2}x (target ≤ 0.5), back to back {:.2}x, cold {:.2}x",
            ms(warm_paced.median) / ms(run.median),
            ms(warm_burst.median) / ms(run.median),
            ms(cold.median) / ms(run.median)
        );
        println!(
            "  create with entrypoint vs crun run: {:.2}x",
            ms(entry.median) / ms(run.median)
        );
        println!(
            "  sbx run (CLI) vs crun run: {:.2}x",
            ms(cli.median) / ms(run.median)
        );
        if let Some(e) = &exec_peer {
            println!(
                "  exec round trip vs crun exec: {:.2}x (target ≤ 0.25)",
                ms(exec.median) / ms(e.median)
            );
        }
    }
    release_hugetlb(mounted);
    let _ = std::fs::remove_dir_all(&work);
    drop(daemon);
}
