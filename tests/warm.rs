//! Warm sandboxes (sbxd starts a few ahead of time for the shapes of recent creates): the next
//! create of that shape takes one, and what the user gets is indistinguishable from a cold
//! start — a fresh filesystem, only its own processes, the limits it asked for, its own id and
//! events. Creates with volumes start cold. At shutdown nothing is left (checked by `finish`).
//!
//! Run as root: `cargo test --test warm`.

#[path = "support/daemon.rs"]
mod daemon;

use daemon::{sh, TestDaemon};
use sbx::api::{EventKind, VolumeMount};
use sbx::client::{CreateSandbox, Sandbox};
use std::path::Path;
use std::time::{Duration, Instant};

/// Wait until sbxd has at least `n` warm sandboxes ready.
async fn until_warm(d: &TestDaemon, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.metric("sbx_warm_sandboxes").await < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} warm sandboxes after 30 s; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cgroup file `file` of sandbox `id` (`v1` controller dir, or the v2 group).
fn cgroup_file(controller: &str, v1: &str, v2: &str, id: &str) -> String {
    let p1 = Path::new("/sys/fs/cgroup")
        .join(controller)
        .join("sbx")
        .join(id)
        .join(v1);
    let p2 = Path::new("/sys/fs/cgroup/sbx").join(id).join(v2);
    std::fs::read_to_string(&p1)
        .or_else(|_| std::fs::read_to_string(&p2))
        .unwrap_or_else(|e| panic!("read {} or {}: {e}", p1.display(), p2.display()))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_sandbox_is_fresh_and_gets_the_limits_asked_for() {
    let d = TestDaemon::start("warm-fresh").await;
    let c = d.client().await;

    // The first create of a shape starts cold and leaves sandboxes of its shape warming.
    let a = Sandbox::create(&c, CreateSandbox::default())
        .await
        .expect("create a");
    let (rc, _) = sh(
        &a,
        "echo secret > /tmp/mark && echo x > /root/mark && sleep 300 >/dev/null 2>&1 &",
    )
    .await;
    assert_eq!(rc, 0);
    until_warm(&d, 1).await;
    let hits = d.metric("sbx_warm_creates_total{result=\"hit\"}").await;

    let b = Sandbox::create(
        &c,
        CreateSandbox {
            memory_mib: Some(300),
            pids: Some(77),
            cpu: Some(0.5),
            ..Default::default()
        },
    )
    .await
    .expect("create b");
    assert_eq!(
        d.metric("sbx_warm_creates_total{result=\"hit\"}").await,
        hits + 1,
        "the second create of the shape did not take a warm sandbox"
    );
    assert_ne!(a.id(), b.id());

    // Nothing of a's: no files, no processes; its own writable layer.
    let (rc, out) = sh(
        &b,
        "ls -A /tmp /root; for p in /proc/[0-9]*; do cat $p/comm; done | sort | tr '\\n' ' '",
    )
    .await;
    assert_eq!(rc, 0);
    assert!(!out.contains("mark"), "a's files in b: {out}");
    assert!(!out.contains("sleep"), "a's processes in b: {out}");
    let (rc, _) = sh(&b, "echo mine > /tmp/b && test \"$(cat /tmp/b)\" = mine").await;
    assert_eq!(rc, 0);

    // The limits of b's create, not the defaults it was started with.
    assert_eq!(
        cgroup_file("memory", "memory.limit_in_bytes", "memory.max", b.id()),
        (300u64 << 20).to_string()
    );
    assert_eq!(cgroup_file("pids", "pids.max", "pids.max", b.id()), "77");
    let quota = cgroup_file("cpu", "cpu.cfs_quota_us", "cpu.max", b.id());
    assert!(
        quota == "50000" || quota.starts_with("50000 "),
        "cpu quota {quota:?}"
    );
    // The pids limit holds inside: of 100 forks, those past 77 tasks fail.
    let p = b
        .exec([
            "python3",
            "-c",
            "import os, time\n\
             kids = []\n\
             for i in range(100):\n\
             \x20   try:\n\
             \x20       k = os.fork()\n\
             \x20   except OSError:\n\
             \x20       break\n\
             \x20   if k == 0:\n\
             \x20       time.sleep(30)\n\
             \x20       os._exit(0)\n\
             \x20   kids.append(k)\n\
             print(len(kids))\n\
             for k in kids:\n\
             \x20   os.kill(k, 9)\n",
        ])
        .await
        .expect("exec python3");
    let out = p.stdout().read_text().await.expect("read");
    assert_eq!(p.wait().await.expect("wait"), 0);
    let n: u32 = out.trim().parse().expect("a count");
    assert!((40..77).contains(&n), "{n} forks under pids.max 77");

    // Normal priority, although it was prepared ahead of time at background priority.
    let p = b
        .exec(["python3", "-c", "import os; print(os.nice(0))"])
        .await
        .expect("exec python3");
    assert_eq!(p.stdout().read_text().await.expect("read"), "0\n");
    assert_eq!(p.wait().await.expect("wait"), 0);

    // Its lifecycle reads like a cold start.
    let info = b.info().await.expect("info");
    let kinds: Vec<EventKind> = info.events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![EventKind::Created, EventKind::Scheduled, EventKind::Started]
    );
    a.delete().await.expect("delete a");
    b.delete().await.expect("delete b");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_with_volumes_start_cold() {
    let d = TestDaemon::start("warm-volumes").await;
    let c = d.client().await;
    let first = Sandbox::create(&c, CreateSandbox::default())
        .await
        .expect("create");
    // All of them, so the count below can only change by a create taking one.
    until_warm(&d, sbx::daemon::DEFAULT_WARM as u64).await;
    let hits = d.metric("sbx_warm_creates_total{result=\"hit\"}").await;
    let ready = d.metric("sbx_warm_sandboxes").await;
    let v = Sandbox::create(
        &c,
        CreateSandbox {
            volumes: vec![VolumeMount {
                name: "warmvol".into(),
                path: "/data".into(),
                read_only: false,
            }],
            ..Default::default()
        },
    )
    .await
    .expect("create with a volume");
    let (rc, _) = sh(&v, "echo hi > /data/f && test -s /data/f").await;
    assert_eq!(rc, 0);
    assert_eq!(
        d.metric("sbx_warm_creates_total{result=\"hit\"}").await,
        hits
    );
    assert_eq!(d.metric("sbx_warm_sandboxes").await, ready);
    v.delete().await.expect("delete");
    first.delete().await.expect("delete");
    d.finish().await;
}
