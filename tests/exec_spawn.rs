//! How sandbox processes are started, as a user notices it: init starts each exec vfork-style
//! (clone CLONE_VM|CLONE_VFORK on its own stack) and forks when a seccomp profile refuses that
//! clone; a start that fails reports its step and errno and leaves the sandbox serving; init's
//! memory does not grow over many large execs; concurrent execs keep their own output and exit
//! codes; init runs at nice -5 and its processes at 0 (also in a sandbox taken from sbxd's warm
//! pool); exec records reach sbxd's store before a graceful stop. Runs as root; starts real
//! sandboxes (and real sbxd daemons) and checks each leaves nothing behind.

mod support;

#[path = "support/daemon.rs"]
mod daemon;

use daemon::TestDaemon;
use sbx::client::{CreateSandbox, Sandbox as ClientSandbox};
use sbx::runtime::{ExecSpec, ImageRef, RuntimeError, Sandbox, SandboxSpec, SeccompProfile};
use std::time::{Duration, Instant};
use support::*;

// ---------------------------------------------------------------------------------------------
// Shared checks.

/// Destroy `sb` and assert nothing of it is left: mounts, cgroups, run and state directories,
/// its uid range.
fn destroy_and_check(sb: Sandbox) {
    let id = sb.id().to_string();
    sb.destroy().expect("destroy the sandbox");
    let errors = sbx::runtime::janitor::flush();
    assert!(errors.is_empty(), "background teardown failed: {errors:?}");
    assert!(
        host_mounts_with(&id).is_empty(),
        "mounts left: {:?}",
        host_mounts_with(&id)
    );
    assert!(
        cgroup_dirs(&id).is_empty(),
        "cgroups left: {:?}",
        cgroup_dirs(&id)
    );
    let cfg = config();
    for dir in [
        cfg.run_dir.join("sandboxes"),
        cfg.state_dir.join("sandboxes"),
    ] {
        assert!(!dir.join(&id).exists(), "{} left", dir.join(&id).display());
    }
    if let Ok(slots) = std::fs::read_dir(cfg.run_dir.join("uids")) {
        for s in slots.flatten() {
            let owner = std::fs::read_to_string(s.path()).unwrap_or_default();
            assert_ne!(owner, id, "uid range {} still held", s.path().display());
        }
    }
}

/// Start `spec`, which must fail before its program runs; returns the step, the errno and the
/// error's message.
fn start_failure(sb: &Sandbox, spec: ExecSpec) -> (String, i32, String) {
    let argv = spec.argv.clone();
    match sb.exec(spec) {
        Ok(p) => {
            let (exit, out, err) = p.output().expect("output");
            panic!(
                "{argv:?} started (exit {}, stdout {:?}, stderr {:?}); expected a start error",
                exit.code(),
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            )
        }
        Err(e) => {
            let msg = e.to_string();
            match e {
                RuntimeError::Exec { argv0, step, errno } => {
                    assert_eq!(argv0, argv[0], "the error names another program: {msg}");
                    (step, errno, msg)
                }
                other => panic!("{argv:?}: not an exec start error: {other:?}"),
            }
        }
    }
}

/// The sandbox still runs an ordinary exec, with its output and exit code.
fn still_serves(sb: &Sandbox, after: &str) {
    let (code, out, err) = sh(sb, "echo alive; exit 5");
    assert_eq!(
        (code, out.as_str()),
        (5, "alive\n"),
        "after {after}: stderr {err:?}"
    );
}

/// The CRC-32 of zlib (reflected polynomial 0xEDB88320): what busybox's `crc32` prints in hex.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data
        .iter()
        .fold(!0u32, |c, &b| (c >> 8) ^ TABLE[((c as u8) ^ b) as usize])
}

/// A field of /proc/<pid>/status in kB (`VmRSS`, `RssAnon`).
fn status_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{status}"))
}

// ---------------------------------------------------------------------------------------------
// 1. Fork fallback.

/// An allow-by-default profile whose only rule refuses `clone` with CLONE_VM (0x100) set, with
/// EPERM: init's vfork-style clone fails, plain fork (clone without CLONE_VM) still works.
const NO_CLONE_VM_PROFILE: &str = r#"{
  "defaultAction": "SCMP_ACT_ALLOW",
  "syscalls": [{
    "comment": "clone with CLONE_VM (threads, vfork, posix_spawn) fails with EPERM",
    "names": ["clone"],
    "action": "SCMP_ACT_ERRNO",
    "errnoRet": 1,
    "args": [{"index": 0, "value": 256, "valueTwo": 256, "op": "SCMP_CMP_MASKED_EQ"}]
  }]
}"#;

#[test]
fn execs_still_run_when_seccomp_refuses_clone_with_clone_vm() {
    let profile = test_root().join(format!("no-clone-vm-{}.json", std::process::id()));
    std::fs::create_dir_all(test_root()).expect("mkdir test root");
    std::fs::write(&profile, NO_CLONE_VM_PROFILE).expect("write the profile");
    let sb = spawn_spec(SandboxSpec {
        image: ImageRef::Host,
        seccomp: SeccompProfile::File(profile.clone()),
        ..Default::default()
    });

    // The profile holds inside: clone(CLONE_VM|CLONE_THREAD) is refused by the filter (EPERM)
    // before the kernel could call the flags invalid (EINVAL, as it does without CLONE_VM).
    let errnos = sh_ok(
        &sb,
        &format!(
            "python3 -c 'import ctypes\n\
             l = ctypes.CDLL(None, use_errno=True)\n\
             r = []\n\
             for f in (0x10100, 0x10000):\n\
             \x20   l.syscall({}, f, 0, 0, 0, 0)\n\
             \x20   r.append(ctypes.get_errno())\n\
             print(*r)'",
            libc::SYS_clone
        ),
    );
    assert_eq!(
        errnos.trim(),
        format!("{} {}", libc::EPERM, libc::EINVAL),
        "clone with and without CLONE_VM under the profile"
    );

    // So init cannot start processes vfork-style; it forks them, and users see no difference.
    for i in 0..20 {
        let (code, out, err) = sh(&sb, "echo ok; exit 3");
        assert_eq!(
            (code, out.as_str(), err.as_str()),
            (3, "ok\n", ""),
            "exec {i} in the fork-fallback sandbox"
        );
    }
    // Start failures in a forked child are reported with their step, too.
    let (step, errno, msg) = start_failure(&sb, ExecSpec::new(["/no/such/program"]));
    assert_eq!((step.as_str(), errno), ("execve", libc::ENOENT), "{msg}");
    let mut spec = ExecSpec::new(["/bin/true"]);
    spec.cwd = Some("/no/such/dir".into());
    let (step, errno, msg) = start_failure(&sb, spec);
    assert_eq!(
        (step.as_str(), errno),
        ("chdir to the working directory", libc::ENOENT),
        "{msg}"
    );
    still_serves(&sb, "start failures in the fork-fallback sandbox");

    destroy_and_check(sb);
    std::fs::remove_file(&profile).expect("remove the profile");
}

// ---------------------------------------------------------------------------------------------
// 2. Start failures.

#[test]
fn start_failures_name_their_step_and_the_sandbox_serves_on() {
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    sh_ok(
        &sb,
        "mkdir -m 700 /tmp/private && echo x > /tmp/private/f && \
         printf '#!/no/such/interpreter\\n' > /tmp/badshebang && chmod 755 /tmp/badshebang && \
         printf '#!/bin/sh\\necho hi\\n' > /tmp/noexec && chmod 644 /tmp/noexec",
    );

    // An absolute program that does not exist: execve, ENOENT, naming the program.
    let (step, errno, msg) = start_failure(&sb, ExecSpec::new(["/no/such/program", "arg"]));
    assert_eq!((step.as_str(), errno), ("execve", libc::ENOENT), "{msg}");
    assert!(
        msg.contains("/no/such/program") && msg.contains("execve") && msg.contains("ENOENT"),
        "{msg}"
    );
    still_serves(&sb, "a missing program");

    // A directory as the program: execve, EACCES.
    let (step, errno, msg) = start_failure(&sb, ExecSpec::new(["/tmp"]));
    assert_eq!((step.as_str(), errno), ("execve", libc::EACCES), "{msg}");
    assert!(msg.contains("EACCES"), "{msg}");
    still_serves(&sb, "a directory as the program");

    // A file without the execute bit: execve, EACCES; a script whose interpreter is missing:
    // execve, ENOENT.
    let (step, errno, msg) = start_failure(&sb, ExecSpec::new(["/tmp/noexec"]));
    assert_eq!((step.as_str(), errno), ("execve", libc::EACCES), "{msg}");
    let (step, errno, msg) = start_failure(&sb, ExecSpec::new(["/tmp/badshebang"]));
    assert_eq!((step.as_str(), errno), ("execve", libc::ENOENT), "{msg}");
    still_serves(&sb, "non-executable files");

    // A working directory that does not exist (as root and as another user), or is a file.
    for uid in [0, 1000] {
        let mut spec = ExecSpec::new(["/bin/echo", "never"]);
        spec.cwd = Some("/no/such/dir".into());
        spec.uid = uid;
        spec.gid = uid;
        let (step, errno, msg) = start_failure(&sb, spec);
        assert_eq!(
            (step.as_str(), errno),
            ("chdir to the working directory", libc::ENOENT),
            "uid {uid}: {msg}"
        );
        assert!(msg.contains("chdir"), "{msg}");
        still_serves(&sb, &format!("a missing cwd as uid {uid}"));
    }
    let mut spec = ExecSpec::new(["/bin/echo", "never"]);
    spec.cwd = Some("/tmp/private/f".into());
    let (step, errno, msg) = start_failure(&sb, spec);
    assert_eq!(
        (step.as_str(), errno),
        ("chdir to the working directory", libc::ENOTDIR),
        "{msg}"
    );
    still_serves(&sb, "a file as the cwd");

    // A uid that cannot enter its cwd (root's 0700 directory): as with runc, the directory is
    // entered before the ids are dropped, so the process starts there but cannot read it.
    let mut spec = ExecSpec::new(["/bin/sh", "-c", "pwd; id -u; ls . || exit 7"]);
    spec.cwd = Some("/tmp/private".into());
    spec.uid = 1000;
    spec.gid = 1000;
    let (exit, out, err) = sb
        .exec(spec)
        .expect("exec as uid 1000 in root's 0700 dir")
        .output()
        .expect("output");
    assert_eq!(
        (exit.code(), &*String::from_utf8_lossy(&out)),
        (7, "/tmp/private\n1000\n"),
        "stderr {:?}",
        String::from_utf8_lossy(&err)
    );
    assert!(
        String::from_utf8_lossy(&err).contains("Permission denied"),
        "{:?}",
        String::from_utf8_lossy(&err)
    );

    // Nothing of the failed starts lingers: no zombie, and init's only child is this shell.
    let procs = sh_ok(
        &sb,
        "echo $$; for s in /proc/[0-9]*/stat; do cat $s 2>/dev/null && echo; done",
    );
    let mut lines = procs.lines();
    let me: i32 = lines.next().and_then(|l| l.parse().ok()).expect("$$");
    for l in lines.filter(|l| !l.is_empty()) {
        let pid: i32 = l
            .split(' ')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("pid");
        // After the command name (which may hold spaces): state, ppid.
        let rest: Vec<&str> = l
            .rsplit_once(')')
            .expect("comm")
            .1
            .split_whitespace()
            .collect();
        let (state, ppid) = (rest[0], rest[1]);
        assert_ne!(state, "Z", "a zombie is left: {l}");
        assert!(
            ppid != "1" || pid == me,
            "init has a child left besides the shell: {l}"
        );
    }
    destroy_and_check(sb);
}

// ---------------------------------------------------------------------------------------------
// 3. Init's memory over many large execs.

#[test]
fn five_hundred_large_execs_do_not_grow_init_and_arrive_intact() {
    const EXECS: usize = 500;
    const WARMUP: usize = 20;
    const ARGS: usize = 1000;
    const VARS: usize = 300;
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let init = sb.init_pid();
    let filler: Vec<u8> = (b' '..=b'~').filter(|c| *c != b'=').collect();
    let script = "echo $#; printf '%s\\n' \"$@\" | crc32; \
                  env | grep '^V' | sort | crc32; env | grep -c '^V'";

    let run = |n: usize| {
        let args: Vec<String> = (0..ARGS)
            .map(|j| format!("{n}/{j} {}", filler[(n + j) % filler.len()] as char))
            .collect();
        // Each variable is 100 bytes: `Vjjj=` and a 95-byte value that differs per exec.
        let vars: Vec<(String, String)> = (0..VARS)
            .map(|j| {
                let head = format!("{n:05}.{j:03}:");
                let tail: String = (0..95 - head.len())
                    .map(|k| filler[(n * 7 + j + k) % filler.len()] as char)
                    .collect();
                (format!("V{j:03}"), head + &tail)
            })
            .collect();
        let mut arg_text = Vec::new();
        for a in &args {
            arg_text.extend_from_slice(a.as_bytes());
            arg_text.push(b'\n');
        }
        let mut env_text = Vec::new();
        for (k, v) in &vars {
            assert_eq!(k.len() + 1 + v.len(), 100);
            env_text.extend_from_slice(format!("{k}={v}\n").as_bytes());
        }
        let (a_crc, e_crc) = (crc32(&arg_text), crc32(&env_text));

        let mut spec = ExecSpec::new(["/bin/sh", "-c", script, "sh"]);
        spec.argv.extend(args);
        spec.env = vars;
        let (exit, out, err) = sb
            .exec(spec)
            .unwrap_or_else(|e| panic!("exec {n}: {e}"))
            .output()
            .expect("output");
        let out = String::from_utf8_lossy(&out).into_owned();
        let got: Vec<String> = out.lines().map(|l| l.trim().to_string()).collect();
        let want = vec![
            ARGS.to_string(),
            format!("{a_crc:08x}"),
            format!("{e_crc:08x}"),
            VARS.to_string(),
        ];
        assert_eq!(
            (exit.code(), got),
            (0, want),
            "exec {n}: stdout {out:?} stderr {:?}",
            String::from_utf8_lossy(&err)
        );
    };

    // Warm-up: init's receive buffer and code paths are touched once.
    for n in 0..WARMUP {
        run(n);
    }
    let (rss_before, anon_before) = (status_kb(init, "VmRSS"), status_kb(init, "RssAnon"));
    for n in WARMUP..WARMUP + EXECS {
        run(n);
    }
    let (rss_after, anon_after) = (status_kb(init, "VmRSS"), status_kb(init, "RssAnon"));
    eprintln!(
        "init VmRSS {rss_before} -> {rss_after} kB, RssAnon {anon_before} -> {anon_after} kB \
         over {EXECS} execs"
    );
    assert!(
        rss_after <= rss_before + 1024,
        "init's VmRSS grew from {rss_before} kB to {rss_after} kB over {EXECS} execs \
         (RssAnon {anon_before} kB -> {anon_after} kB)"
    );
    destroy_and_check(sb);
}

// ---------------------------------------------------------------------------------------------
// 4. Concurrent execs.

#[test]
fn forty_concurrent_execs_get_their_own_output_and_exit_code() {
    const N: usize = 40;
    const LINES: usize = 10_000;
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let start = std::sync::Barrier::new(N);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let (sb, start) = (&sb, &start);
                s.spawn(move || {
                    let spec = ExecSpec::new([
                        "/bin/sh",
                        "-c",
                        "yes \"line-$1\" | head -n $2; echo \"err-$1\" >&2; exit $(($1 + 10))",
                        "sh",
                        &i.to_string(),
                        &LINES.to_string(),
                    ]);
                    start.wait();
                    let p = sb.exec(spec).unwrap_or_else(|e| panic!("exec {i}: {e}"));
                    p.output()
                        .unwrap_or_else(|e| panic!("output of exec {i}: {e}"))
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let (exit, out, err) = h.join().expect("exec thread");
            let want = format!("line-{i}\n").repeat(LINES);
            assert_eq!(exit.code(), i as i32 + 10, "exit code of exec {i}");
            assert!(
                out == want.as_bytes(),
                "exec {i}: {} bytes of stdout, want {} (first line {:?})",
                out.len(),
                want.len(),
                String::from_utf8_lossy(&out).lines().next()
            );
            assert_eq!(String::from_utf8_lossy(&err), format!("err-{i}\n"));
        }
    });
    still_serves(&sb, "40 concurrent execs");
    destroy_and_check(sb);
}

// ---------------------------------------------------------------------------------------------
// 5. Priorities.

/// The nice value (field 19 of /proc/<who>/stat) as `cut` inside the sandbox reads it.
fn nice_inside(sb: &Sandbox, who: &str) -> String {
    let p = sb
        .exec(ExecSpec::new([
            "cut",
            "-d",
            " ",
            "-f19",
            &format!("/proc/{who}/stat"),
        ]))
        .expect("exec cut");
    let (exit, out, err) = p.output().expect("output");
    assert_eq!(exit.code(), 0, "cut: {}", String::from_utf8_lossy(&err));
    String::from_utf8_lossy(&out).trim().to_string()
}

#[test]
fn init_runs_at_nice_minus_5_and_its_processes_at_0() {
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    for round in 0..3 {
        assert_eq!(
            nice_inside(&sb, "self"),
            "0",
            "an exec's nice, round {round}"
        );
        assert_eq!(nice_inside(&sb, "1"), "-5", "init's nice, round {round}");
    }
    // Processes of processes inherit 0, not init's -5.
    assert_eq!(
        sh_ok(&sb, "sh -c \"cut -d' ' -f19 /proc/self/stat\"").trim(),
        "0"
    );
    destroy_and_check(sb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_taken_from_the_warm_pool_has_the_same_priorities() {
    let d = TestDaemon::start("exec-spawn-warm-nice").await;
    let c = d.client().await;
    let cold = ClientSandbox::create(&c, CreateSandbox::default())
        .await
        .expect("create the first sandbox");
    let deadline = Instant::now() + Duration::from_secs(15);
    while d.metric("sbx_warm_sandboxes").await < 1 {
        assert!(
            Instant::now() < deadline,
            "no warm sandbox after 15 s; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hits = d.metric("sbx_warm_creates_total{result=\"hit\"}").await;
    let warm = ClientSandbox::create(&c, CreateSandbox::default())
        .await
        .expect("create the second sandbox");
    assert_eq!(
        d.metric("sbx_warm_creates_total{result=\"hit\"}").await,
        hits + 1,
        "the second create did not take a warm sandbox"
    );
    for (name, sb) in [("cold", &cold), ("warm", &warm)] {
        let (rc, out) = daemon::sh(
            sb,
            "cut -d' ' -f19 /proc/self/stat; cut -d' ' -f19 /proc/1/stat",
        )
        .await;
        assert_eq!((rc, out.as_str()), (0, "0\n-5\n"), "{name} sandbox");
    }
    cold.delete().await.expect("delete");
    warm.delete().await.expect("delete");
    d.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Exec records survive a quick graceful stop.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_records_are_in_the_store_after_a_quick_graceful_stop() {
    const EXECS: usize = 100;
    let mut d = TestDaemon::start("exec-spawn-store-flush").await;
    let c = d.client().await;
    let sb = ClientSandbox::create(&c, CreateSandbox::default())
        .await
        .expect("create");
    let sandbox_id = sb.id().to_string();

    // 100 quick execs, ten at a time, each with its own exit code.
    let mut execs: Vec<(usize, String)> = Vec::new();
    for wave in 0..EXECS / 10 {
        let mut set = tokio::task::JoinSet::new();
        for k in 0..10 {
            let i = wave * 10 + k;
            let sb = sb.clone();
            set.spawn(async move {
                let p = sb
                    .exec(["sh", "-c", &format!("exit {}", i % 7)])
                    .await
                    .unwrap_or_else(|e| panic!("exec {i}: {e}"));
                let rc = p.wait().await.unwrap_or_else(|e| panic!("wait {i}: {e}"));
                assert_eq!(rc, (i % 7) as i32, "exec {i} as sbxd reports it live");
                (i, p.id().to_string())
            });
        }
        while let Some(r) = set.join_next().await {
            execs.push(r.expect("exec task"));
        }
    }
    // Stop right away (whatever the store writer still has queued must be written first), and
    // a new sbxd on the same state reads every exec as exited with its code.
    drop(sb);
    drop(c);
    d.restart().await;
    let c = d.client().await;
    let sb = ClientSandbox::from_id(&c, &sandbox_id)
        .await
        .expect("the sandbox of the previous sbxd is known");
    let mut wrong = Vec::new();
    for (i, x) in &execs {
        let info = match sb.process(x).info().await {
            Ok(info) => info,
            Err(e) => {
                wrong.push(format!("exec {i} ({x}): {e}"));
                continue;
            }
        };
        assert_eq!(info.exec_id, *x);
        let want = format!("exit {}", i % 7);
        if info.status != sbx::api::ExecStatus::Exited
            || info.returncode != Some((i % 7) as i32)
            || info.argv.last() != Some(&want)
        {
            wrong.push(format!(
                "exec {i} ({x}): {:?} returncode {:?} argv {:?}",
                info.status, info.returncode, info.argv
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {EXECS} execs read back wrong after a graceful stop:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    sb.delete().await.expect("delete the sandbox");
    drop(sb);
    drop(c);
    assert!(
        cgroup_dirs(&sandbox_id).is_empty(),
        "cgroups left: {:?}",
        cgroup_dirs(&sandbox_id)
    );
    d.finish().await;
}
