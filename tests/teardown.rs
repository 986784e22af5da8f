//! Teardown: nothing of a sandbox survives it (mounts, cgroups, directories, uid ranges,
//! descriptors), also when its helper or init was SIGKILLed, and after many sandboxes.

mod support;

use sbx::runtime::{ExecSpec, ImageRef, Sandbox, SandboxSpec, Stdio, WaitStatus};
use support::*;

fn assert_gone(id: &str) {
    // With background cleanup, destroy() returns once nothing of the sandbox runs and the
    // janitor finishes the rest: wait for it (a no-op when cleanup was synchronous).
    let errors = sbx::runtime::janitor::flush();
    assert!(errors.is_empty(), "background teardown failed: {errors:?}");
    assert!(
        host_mounts_with(id).is_empty(),
        "mounts left: {:?}",
        host_mounts_with(id)
    );
    assert!(
        cgroup_dirs(id).is_empty(),
        "cgroups left: {:?}",
        cgroup_dirs(id)
    );
    let cfg = config();
    assert!(
        !cfg.run_dir.join("sandboxes").join(id).exists(),
        "run dir left"
    );
    assert!(
        !cfg.state_dir.join("sandboxes").join(id).exists(),
        "state dir left"
    );
    let slots = std::fs::read_dir(cfg.run_dir.join("uids")).unwrap();
    for s in slots.flatten() {
        let owner = std::fs::read_to_string(s.path()).unwrap_or_default();
        assert_ne!(owner, id, "uid range still held");
    }
}

#[test]
fn teardown_leaves_nothing() {
    for (_, image) in images() {
        let sb = spawn(image);
        let id = sb.id().to_string();
        let init = sb.init_pid();
        let started = start_time(init).unwrap();
        // The rootfs is mounted only in the sandbox's own namespaces, never on the host.
        assert!(host_mounts_with(&id).is_empty());
        assert!(!cgroup_dirs(&id).is_empty());
        sh_ok(
            &sb,
            "sleep 1000 >/dev/null 2>&1 & sleep 1000 >/dev/null 2>&1 & echo started",
        );
        sb.destroy().unwrap();
        assert_gone(&id);
        // Gone (pid_max may be small: a recycled pid is another process, with another start).
        assert_ne!(start_time(init), Some(started), "init survived");
    }
}

#[test]
fn teardown_after_the_helper_or_init_was_sigkilled() {
    // Init killed: the sandbox ends with SIGKILL and teardown is clean.
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let id = sb.id().to_string();
    sh_ok(&sb, "sleep 1000 >/dev/null 2>&1 & echo ok");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sb.init_pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exit = sb.wait().unwrap();
    assert_eq!(exit.status, WaitStatus::Signal(9));
    assert!(sb.exec(ExecSpec::new(["true"])).is_err());
    sb.destroy().unwrap();
    assert_gone(&id);

    // Helper killed: init and its children are orphans still in the cgroup; teardown kills them.
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let id = sb.id().to_string();
    let init = sb.init_pid();
    sh_ok(&sb, "sleep 1000 >/dev/null 2>&1 & echo ok");
    let helper = parent_of(init);
    let comm = std::fs::read_to_string(format!("/proc/{helper}/comm")).unwrap();
    assert_eq!(comm.trim(), "sbx:[helper]");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Init keeps serving: the sandbox does not depend on the helper being alive.
    assert_eq!(sh_ok(&sb, "echo still").trim(), "still");
    sb.destroy().unwrap();
    assert_gone(&id);
    // Orphaned by the helper's death, init was re-parented to the host's init, which reaps it in
    // its own time: dead (a zombie at most) is what teardown guarantees.
    assert!(dead(init), "init {init} survived teardown");
}

use sbx::runtime::proto::start_time;

/// A process's parent pid (the helper, for init).
fn parent_of(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("PPid:").map(|p| p.trim().parse().unwrap()))
        .unwrap()
}

fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                == Some("Z")
        }
    }
}

#[test]
fn entrypoint_decides_the_sandbox_exit() {
    let mut entry = ExecSpec::new(["/bin/sh", "-c", "echo from-entry; exit 7"]);
    entry.stderr = Stdio::Null;
    let sb = Sandbox::spawn(
        &config(),
        SandboxSpec {
            image: ImageRef::Dir(busybox_rootfs()),
            entrypoint: Some(entry),
            ..Default::default()
        },
    )
    .unwrap();
    let p = sb.take_entrypoint().unwrap();
    let (exit, out, _) = p.output().unwrap();
    assert_eq!(exit.code(), 7);
    assert_eq!(out, b"from-entry\n");
    assert_eq!(sb.wait().unwrap().code(), 7);
    // A finished sandbox refuses execs with a clear error.
    let e = sb.exec(ExecSpec::new(["true"])).unwrap_err().to_string();
    assert!(e.contains("finished"), "{e}");
    let id = sb.id().to_string();
    sb.destroy().unwrap();
    assert_gone(&id);
}

#[test]
fn kill_ends_the_sandbox_with_sigkill() {
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let mut p = sb.exec(ExecSpec::new(["sleep", "1000"])).unwrap();
    sb.kill().unwrap();
    assert_eq!(p.wait().unwrap().code(), 137);
    assert_eq!(sb.wait().unwrap().code(), 137);
    sb.kill().unwrap(); // idempotent
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn many_sandboxes_leak_nothing() {
    // Serial spawn + exec + destroy; descriptors, memory, mounts and cgroups stay flat.
    let n: usize = std::env::var("SBX_LEAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let image = ImageRef::Dir(busybox_rootfs());
    let round = |i: usize| {
        let sb = spawn(image.clone());
        assert_eq!(sh_ok(&sb, &format!("echo {i}")).trim(), i.to_string());
        let id = sb.id().to_string();
        sb.destroy().unwrap();
        id
    };
    for i in 0..10 {
        round(i);
    }
    let (fds0, rss0) = (open_fds(), rss_kib());
    let mounts0 = host_mounts_with("").len();
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(round(i));
    }
    for id in &ids {
        assert_gone(id);
    }
    // Other tests run concurrently in this process, so allow some slack on descriptors.
    assert!(
        open_fds() <= fds0 + 16,
        "fds grew from {fds0} to {}",
        open_fds()
    );
    assert!(
        rss_kib() < rss0 + 16 * 1024,
        "rss grew from {rss0} KiB to {} KiB",
        rss_kib()
    );
    assert!(host_mounts_with("").len() <= mounts0, "host mounts grew");
}

#[test]
fn a_waiter_does_not_block_exec_and_helper_death_is_not_sandbox_death() {
    let sb = std::sync::Arc::new(spawn(ImageRef::Dir(busybox_rootfs())));
    let waiter = {
        let sb = sb.clone();
        std::thread::spawn(move || sb.wait().unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    // exec from another thread while wait() blocks.
    assert_eq!(sh_ok(&sb, "echo during-wait").trim(), "during-wait");
    // Kill the helper: the waiter must not report the end while init still serves.
    let init = sb.init_pid();
    let helper = parent_of(init);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !waiter.is_finished(),
        "wait() returned while init was alive"
    );
    assert_eq!(
        sh_ok(&sb, "echo after-helper-death").trim(),
        "after-helper-death"
    );
    sb.kill().unwrap();
    let exit = waiter.join().unwrap();
    assert_eq!((exit.code(), exit.oom), (137, false));
}

#[test]
fn oom_is_attributed_to_the_end_it_caused() {
    // The entrypoint is OOM-killed: the sandbox's end is an OOM end.
    let mut entry = ExecSpec::new(["python3", "-c", "x = b'a' * (512 << 20)"]);
    entry.stdout = Stdio::Null;
    entry.stderr = Stdio::Null;
    let sb = Sandbox::spawn(
        &config(),
        SandboxSpec {
            image: ImageRef::Host,
            limits: sbx::runtime::Limits {
                memory_bytes: Some(64 << 20),
                ..Default::default()
            },
            entrypoint: Some(entry),
            ..Default::default()
        },
    )
    .unwrap();
    let e = sb.take_entrypoint().unwrap().wait().unwrap();
    assert!(e.oom && e.code() == 137, "{e:?}");
    let e = sb.wait().unwrap();
    assert!(e.oom && e.code() == 137, "{e:?}");

    // An exec was OOM-killed earlier, then we kill the sandbox: that end is not an OOM.
    let sb = spawn_spec(SandboxSpec {
        image: ImageRef::Host,
        limits: sbx::runtime::Limits {
            memory_bytes: Some(64 << 20),
            ..Default::default()
        },
        ..Default::default()
    });
    let mut sleeper = sb.exec(ExecSpec::new(["sleep", "100"])).unwrap();
    let p = sb
        .exec(ExecSpec::new(["python3", "-c", "x = b'a' * (512 << 20)"]))
        .unwrap();
    assert!(p.output().unwrap().0.oom);
    sb.kill().unwrap();
    let e = sb.wait().unwrap();
    assert_eq!((e.code(), e.oom), (137, false));
    // The sleeper died of our kill, not of the OOM killer that struck its neighbour.
    let e = sleeper.wait().unwrap();
    assert_eq!((e.code(), e.oom), (137, false));
}

#[test]
fn background_cleanup_finishes_after_destroy_returns() {
    let mut cfg = config();
    cfg.background_cleanup = true;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let sb = Sandbox::spawn(
            &cfg,
            SandboxSpec {
                image: ImageRef::Dir(busybox_rootfs()),
                ..Default::default()
            },
        )
        .unwrap();
        let init = sb.init_pid();
        let started = start_time(init).unwrap();
        sh_ok(&sb, "echo x > /tmp/f; sleep 100 >/dev/null 2>&1 & echo ok");
        ids.push(sb.id().to_string());
        sb.destroy().unwrap();
        // When destroy returns, nothing of the sandbox runs (init may be a zombie until its
        // helper reaps it).
        assert!(
            start_time(init) != Some(started) || dead(init),
            "init still running"
        );
    }
    // After flush, nothing at all is left (assert_gone flushes and checks for errors).
    for id in &ids {
        assert_gone(id);
    }
    for trash in [cfg.state_dir.join("trash"), cfg.run_dir.join("trash")] {
        let left: Vec<String> = std::fs::read_dir(&trash)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().into_string().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        for id in &ids {
            assert!(!left.contains(id), "{id} still in {}", trash.display());
        }
    }
}

/// Start sbxd, create a sandbox running `script` on the busybox image through its socket (plain
/// HTTP/1.1), wait until the sandbox is up, SIGKILL sbxd, and return the sandbox's id.
fn sandbox_of_a_killed_daemon(cfg: &sbx::runtime::RuntimeConfig, script: &str) -> String {
    use std::io::{Read, Write};
    let sock = cfg.run_dir.join("sbxd.sock");
    let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_sbxd"))
        .arg("--socket")
        .arg(&sock)
        .arg("--state-dir")
        .arg(&cfg.state_dir)
        .arg("--run-dir")
        .arg(&cfg.run_dir)
        .env("SBX_INIT", env!("CARGO_BIN_EXE_sbx-init"))
        .env("SBX_LOG", "warn")
        // Only the sandbox under test: no warm ones left behind by the kill.
        .env("SBX_WARM", "0")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut conn = loop {
        if let Ok(c) = std::os::unix::net::UnixStream::connect(&sock) {
            break c;
        }
        assert!(std::time::Instant::now() < deadline, "sbxd did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let body = serde_json::json!({
        "image": format!("dir:{}", busybox_rootfs().display()),
        "entrypoint": ["sh", "-c", script],
    })
    .to_string();
    write!(
        conn,
        "POST /v1/sandboxes HTTP/1.1\r\nHost: sbx\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    let json = &reply[reply.find("\r\n\r\n").unwrap() + 4..];
    let info: serde_json::Value = serde_json::from_str(json).unwrap();
    let id = info["id"].as_str().unwrap().to_string();
    let state = cfg.run_dir.join("sandboxes").join(&id).join("state.json");
    while !state.exists() {
        assert!(std::time::Instant::now() < deadline, "no sandbox appeared");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    id
}

#[test]
fn a_sandbox_outlives_its_spawner_and_can_be_adopted() {
    // sbxd spawns a sandbox and is SIGKILLed: the sandbox keeps running; another process
    // adopts it by id, execs in it, sees its end, and tears it down completely.
    let dirs = test_root().join("adopt");
    let cfg = sbx::runtime::RuntimeConfig {
        state_dir: dirs.join("state"),
        run_dir: dirs.join("run"),
        ..config()
    };
    let id = sandbox_of_a_killed_daemon(&cfg, "echo up > /tmp/up; sleep 1000");

    let sb = Sandbox::adopt(&cfg, &id).unwrap();
    // The entrypoint may need a moment to write its file.
    let mut up = String::new();
    for _ in 0..100 {
        up = sh(&sb, "cat /tmp/up 2>/dev/null").1;
        if !up.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(up, "up\n");
    sb.kill().unwrap();
    assert_eq!(sb.wait().unwrap().code(), 137);
    sb.destroy().unwrap();
    assert!(host_mounts_with(&id).is_empty());
    assert!(cgroup_dirs(&id).is_empty(), "{:?}", cgroup_dirs(&id));
    assert!(!cfg.run_dir.join("sandboxes").join(&id).exists());
    assert!(!cfg.state_dir.join("sandboxes").join(&id).exists());
    assert_eq!(
        std::fs::read_dir(cfg.run_dir.join("uids")).unwrap().count(),
        0
    );
    // Adopting what is gone is a clear error.
    let e = Sandbox::adopt(&cfg, &id).err().unwrap().to_string();
    assert!(e.contains("state.json"), "{e}");

    // An adopted sandbox whose entrypoint exits on its own reports that exit code.
    let id = sandbox_of_a_killed_daemon(&cfg, "sleep 1; exit 42");
    let sb = Sandbox::adopt(&cfg, &id).unwrap();
    assert_eq!(sb.wait().unwrap().code(), 42);
    sb.destroy().unwrap();
    assert!(!cfg.run_dir.join("sandboxes").join(&id).exists());
}

#[test]
fn a_taken_id_is_refused_before_anything_of_the_other_sandbox_is_touched() {
    let victim = test_root().join(format!("victim-{}", std::process::id()));
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let id = format!("sb-taken-{}", std::process::id());
    let a = spawn_spec(SandboxSpec {
        id: Some(id.clone()),
        image: ImageRef::Dir(busybox_rootfs()),
        ..Default::default()
    });
    // Inside A, its /tmp becomes a symlink to a host path (as seen from the upper dir).
    sh_ok(
        &a,
        &format!("rm -rf /tmp && ln -s {} /tmp && echo ok", victim.display()),
    );
    let e = Sandbox::spawn(
        &config(),
        SandboxSpec {
            id: Some(id.clone()),
            image: ImageRef::Dir(busybox_rootfs()),
            ..Default::default()
        },
    )
    .err()
    .expect("a second sandbox with a taken id");
    assert!(e.to_string().contains("is taken"), "{e}");
    // Nothing of A was touched, nor the host path its symlink points to.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755);
    assert_eq!(sh_ok(&a, "echo still").trim(), "still");
    a.destroy().unwrap();
    std::fs::remove_dir_all(&victim).unwrap();
}

#[test]
fn an_exit_reaches_only_its_own_exec() {
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    // A's client goes away; A exits while B, on a new connection, still runs.
    drop(
        sb.exec(ExecSpec::new(["sh", "-c", "sleep 0.5; exit 42"]))
            .unwrap(),
    );
    let mut b = sb
        .exec(ExecSpec::new(["sh", "-c", "sleep 1.5; exit 7"]))
        .unwrap();
    let t = std::time::Instant::now();
    assert_eq!(b.wait().unwrap().code(), 7);
    assert!(t.elapsed() >= std::time::Duration::from_millis(1200));
}

#[test]
fn a_sandbox_that_starves_init_gets_errors_not_hangs() {
    let sb = spawn(ImageRef::Host);
    // Sandbox root lowers init's descriptor limit (allowed: same uid).
    sh_ok(&sb, "prlimit --pid 1 --nofile=6:6 && echo done");
    let t = std::time::Instant::now();
    let mut errors = 0;
    for _ in 0..5 {
        if sb.exec(ExecSpec::new(["true"])).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 0, "init kept accepting with 6 descriptors");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "exec hung"
    );
    // Teardown still works.
    let id = sb.id().to_string();
    sb.destroy().unwrap();
    assert_gone(&id);
}

#[test]
fn a_very_deep_tree_in_the_writable_layer_is_removed() {
    // Deeper than our descriptor limit: a remover holding one descriptor per level would fail
    // and leave the layer on disk.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let depth = 2500usize;
    let sb = spawn(ImageRef::Host);
    let id = sb.id().to_string();
    sh_ok(
        &sb,
        &format!(
            "python3 -c 'import os\nos.chdir(\"/tmp\")\nfor _ in range({depth}):\n    os.mkdir(\"d\"); os.chdir(\"d\")\nopen(\"f\", \"w\").write(\"x\")' && echo ok"
        ),
    );
    // Run the teardown with a descriptor limit below the depth, as a busy daemon might have.
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        1024.min(hard),
        hard,
    )
    .unwrap();
    let r = sb.destroy();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    r.unwrap();
    assert_gone(&id);
}

#[test]
fn leftovers_of_a_dead_spawner_are_removed_by_id() {
    // A spawner that died before its sandbox was up leaves no state.json: the sweep still
    // kills what runs and removes every piece.
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let id = sb.id().to_string();
    let init = sb.init_pid();
    let started = start_time(init).unwrap();
    sh_ok(&sb, "sleep 1000 >/dev/null 2>&1 & echo ok");
    std::fs::remove_file(
        config()
            .run_dir
            .join("sandboxes")
            .join(&id)
            .join("state.json"),
    )
    .unwrap();
    std::mem::forget(sb); // the spawner "dies" without tearing down
    assert!(Sandbox::list(&config()).contains(&id));
    Sandbox::remove_leftover(&config(), &id).unwrap();
    assert_gone(&id);
    assert!(
        start_time(init) != Some(started) || dead(init),
        "init survived"
    );

    // With state.json (the spawner died after the sandbox was up), the same call adopts it.
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let id = sb.id().to_string();
    std::mem::forget(sb);
    Sandbox::remove_leftover(&config(), &id).unwrap();
    assert_gone(&id);
}

#[test]
fn init_starved_of_every_descriptor_does_not_spin() {
    let sb = std::sync::Arc::new(spawn(ImageRef::Host));
    sh_ok(&sb, "prlimit --pid 1 --nofile=3:3 && echo done");
    let ticks = |pid: i32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    // An exec that init cannot even accept waits (bounded) in the background.
    let waiter = {
        let sb = sb.clone();
        std::thread::spawn(move || sb.exec(ExecSpec::new(["true"])).is_err())
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = ticks(sb.init_pid());
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used = ticks(sb.init_pid()) - before;
    assert!(used < 30, "init used {used} ticks in 1 s while starved");
    sb.kill().unwrap();
    assert!(waiter.join().unwrap(), "the exec did not fail");
}
