//! What a process inside a sandbox can see and do, checked from the inside, for the `host` image
//! and a busybox rootfs directory. Runs as root; starts real sandboxes.

mod support;

use sbx::runtime::{capabilities, ExecSpec, ImageRef, Limits, SandboxSpec, SeccompProfile, Stdio};
use support::*;

#[test]
fn pid1_is_our_init_and_host_processes_are_invisible() {
    for (name, image) in images() {
        let sb = spawn(image);
        assert_eq!(
            sh_ok(&sb, "cat /proc/1/comm").trim(),
            "sbx:[init]",
            "{name}"
        );
        let pids = sh_ok(&sb, "ls /proc | grep -E '^[0-9]+$' | wc -l");
        let n: usize = pids.trim().parse().unwrap();
        // init, sh, ls, grep, wc at most: no host process.
        assert!(n <= 6, "{name}: {n} pids visible");
        let host_pid = std::process::id();
        let (code, _, _) = sh(
            &sb,
            &format!(
                "test -e /proc/{host_pid}/comm && grep -q sbx_isolation /proc/{host_pid}/comm"
            ),
        );
        assert_ne!(code, 0, "{name}: host test process visible");
    }
}

#[test]
fn hostname_is_set() {
    for (name, image) in images() {
        let sb = spawn_spec(SandboxSpec {
            image,
            hostname: Some("box-7".into()),
            ..Default::default()
        });
        assert_eq!(
            sh_ok(&sb, "cat /proc/sys/kernel/hostname").trim(),
            "box-7",
            "{name}"
        );
    }
}

#[test]
fn root_inside_is_an_unprivileged_host_uid() {
    for (name, image) in images() {
        let sb = spawn(image);
        let map = sh_ok(&sb, "cat /proc/self/uid_map");
        let f: Vec<u64> = map.split_whitespace().map(|x| x.parse().unwrap()).collect();
        assert_eq!(f.len(), 3, "{name}: {map}");
        assert_eq!(f[0], 0, "{name}");
        assert!(
            f[1] >= 65536,
            "{name}: sandbox root maps to host uid {}",
            f[1]
        );
        assert_eq!(f[2], 65536, "{name}");
        assert_eq!(sh_ok(&sb, "id -u").trim(), "0", "{name}");
        // The host sees the sandbox's processes under that uid.
        let status = std::fs::read_to_string(format!("/proc/{}/status", sb.init_pid())).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(uid_line.contains(&f[1].to_string()), "{name}: {uid_line}");
    }
}

#[test]
fn host_files_are_invisible() {
    let marker = format!("/root/.sbx-test-marker-{}", std::process::id());
    std::fs::write(&marker, "secret").unwrap();
    for (name, image) in images() {
        let sb = spawn(image);
        let (code, _, _) = sh(&sb, "test -e /etc/shadow");
        assert_ne!(code, 0, "{name}: /etc/shadow visible");
        let (code, _, _) = sh(&sb, &format!("test -e {marker}"));
        assert_ne!(code, 0, "{name}: host /root visible");
        assert_eq!(
            sh_ok(&sb, "ls -A /root /home")
                .trim()
                .lines()
                .filter(|l| !l.is_empty() && !l.ends_with(':'))
                .count(),
            0,
            "{name}"
        );
        // No host runtime dirs or sockets.
        assert_eq!(
            sh_ok(&sb, "ls -A /run 2>/dev/null; true").trim(),
            "",
            "{name}"
        );
        let (code, _, _) = sh(
            &sb,
            "test -e /var/lib/sbx || test -e /run/sbx || test -e /tmp/sbx-it",
        );
        assert_ne!(code, 0, "{name}: host state visible");
        // /dev holds the minimal set only.
        let dev = sh_ok(&sb, "ls /dev | sort | tr '\\n' ' '");
        assert_eq!(
            dev.trim(),
            "core fd full mqueue null ptmx pts random shm stderr stdin stdout tty urandom zero",
            "{name}"
        );
    }
    std::fs::remove_file(&marker).unwrap();
}

#[test]
fn host_image_has_python_and_minimal_etc() {
    let sb = spawn(ImageRef::Host);
    assert_eq!(sh_ok(&sb, "python3 -c \"print('hello')\"").trim(), "hello");
    let etc = sh_ok(&sb, "ls /etc");
    for want in [
        "passwd",
        "group",
        "hosts",
        "resolv.conf",
        "nsswitch.conf",
        "ld.so.cache",
    ] {
        assert!(etc.lines().any(|l| l == want), "/etc lacks {want}: {etc}");
    }
    // /usr is the host's, read-only.
    let (code, _, err) = sh(&sb, "touch /usr/bin/sbx-should-fail");
    assert_ne!(code, 0);
    assert!(err.contains("Read-only"), "{err}");
}

#[test]
fn writes_land_in_the_writable_layer_and_vanish_with_the_sandbox() {
    for (name, image) in images() {
        let sb = spawn(image.clone());
        sh_ok(
            &sb,
            "echo data > /tmp/f && mkdir -p /root/d && echo x > /root/d/g && echo top > /newfile",
        );
        let upper = config()
            .state_dir
            .join("sandboxes")
            .join(sb.id())
            .join("upper");
        assert_eq!(
            std::fs::read_to_string(upper.join("tmp/f")).unwrap(),
            "data\n",
            "{name}"
        );
        assert!(upper.join("root/d/g").exists(), "{name}");
        assert!(upper.join("newfile").exists(), "{name}");
        let other = spawn(image);
        let (code, _, _) = sh(&other, "test -e /tmp/f");
        assert_ne!(code, 0, "{name}: another sandbox sees the file");
        sb.destroy().unwrap();
        assert!(!upper.exists(), "{name}: writable layer left behind");
    }
}

#[test]
fn proc_and_sys_are_masked_and_read_only() {
    for (name, image) in images() {
        let sb = spawn(image);
        // Masked files read empty (or do not exist on this kernel at all).
        for f in [
            "/proc/kcore",
            "/proc/keys",
            "/proc/timer_list",
            "/proc/sched_debug",
        ] {
            let out = sh_ok(
                &sb,
                &format!("if [ -e {f} ]; then wc -c < {f}; else echo 0; fi"),
            );
            assert_eq!(out.trim(), "0", "{name}: {f} not masked");
        }
        // Compare with the host, where /proc/keys is readable and not empty... at least exists.
        assert!(std::path::Path::new("/proc/keys").exists());
        assert_eq!(sh_ok(&sb, "ls /sys/firmware | wc -l").trim(), "0", "{name}");
        let (code, _, err) = sh(&sb, "echo 1 > /proc/sys/vm/drop_caches");
        assert_ne!(code, 0, "{name}: /proc/sys writable");
        assert!(err.contains("Read-only"), "{name}: {err}");
        let (code, _, _) = sh(&sb, "echo c > /proc/sysrq-trigger");
        assert_ne!(code, 0, "{name}");
        let (code, _, err) = sh(&sb, "mkdir /sys/kernel/sbx-x");
        assert_ne!(code, 0, "{name}: /sys writable");
        assert!(err.contains("Read-only"), "{name}: {err}");
        let mounts = sh_ok(&sb, "grep ' /sys ' /proc/mounts");
        assert!(
            mounts.contains(" ro,") || mounts.contains(" ro "),
            "{name}: {mounts}"
        );
    }
}

#[test]
fn capabilities_no_new_privs_and_seccomp() {
    let want = format!("{:016x}", capabilities::default_mask());
    for (name, image) in images() {
        let sb = spawn(image);
        let status = sh_ok(&sb, "cat /proc/self/status");
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or_else(|| panic!("{name}: no {k} in {status}"))
                .to_string()
        };
        assert_eq!(field("CapEff:"), want, "{name}");
        assert_eq!(field("CapPrm:"), want, "{name}");
        assert_eq!(field("CapBnd:"), want, "{name}");
        assert_eq!(field("CapInh:"), "0000000000000000", "{name}");
        assert_eq!(field("CapAmb:"), "0000000000000000", "{name}");
        assert_eq!(field("NoNewPrivs:"), "1", "{name}");
        assert_eq!(field("Seccomp:"), "2", "{name}");
    }
}

const DENIED: &[&str] = &[
    "mount",
    "umount2",
    "pivot_root",
    "unshare",
    "unshare_ns",
    "clone_newuser",
    "setns",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "open_by_handle_at",
    "name_to_handle_at",
    "kexec_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "syslog",
    "acct",
    "quotactl",
    "userfaultfd",
    "lookup_dcookie",
    "iopl",
    "ioperm",
];

fn probe_all(sb: &sbx::runtime::Sandbox, path: &str) -> Vec<(String, i32)> {
    let script: String = DENIED
        .iter()
        .chain(["clone3", "getpid"].iter())
        .map(|s| format!("echo {s} $({path} {s});"))
        .collect();
    sh_ok(sb, &script)
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next().unwrap().to_string();
            let errno = it.next().unwrap_or("-1").parse().unwrap_or(-1);
            (name, errno)
        })
        .collect()
}

#[test]
fn denied_syscalls_fail_with_eperm() {
    for (name, image) in images() {
        let sb = spawn(image);
        let path = if name == "host" {
            copy_in(&sb, &probe(), "/tmp/probe");
            "/tmp/probe"
        } else {
            "/bin/probe"
        };
        let results = probe_all(&sb, path);
        for (call, errno) in &results {
            match call.as_str() {
                "getpid" => assert_eq!(*errno, 0, "{name}: getpid"),
                "clone3" => assert_eq!(*errno, libc::ENOSYS, "{name}: clone3"),
                _ => assert_eq!(*errno, libc::EPERM, "{name}: {call} gave errno {errno}"),
            }
        }
        assert_eq!(results.len(), DENIED.len() + 2, "{name}: {results:?}");
        // The tools a person would try fail too.
        if name == "host" {
            let (code, _, err) = sh(&sb, "unshare -U true");
            assert_ne!(code, 0);
            assert!(err.contains("Operation not permitted"), "{err}");
        }
        let (code, _, _) = sh(&sb, "mount -t tmpfs none /mnt");
        assert_ne!(code, 0, "{name}: mount worked");
    }
}

#[test]
fn seccomp_is_what_denies_them() {
    // Unconfined, the same probe gets past seccomp (keyctl works, a user namespace can be made):
    // the EPERMs above come from the profile, not from missing capabilities alone.
    let sb = spawn_spec(SandboxSpec {
        image: ImageRef::Dir(busybox_rootfs()),
        seccomp: SeccompProfile::Unconfined,
        ..Default::default()
    });
    let out = sh_ok(
        &sb,
        "/bin/probe keyctl; /bin/probe unshare; grep Seccomp: /proc/self/status",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "keyctl unconfined: {out}");
    assert_eq!(lines[1], "0", "unshare unconfined: {out}");
    assert!(lines[2].ends_with('0'), "{out}");
}

#[test]
fn memory_bomb_is_oom_killed_and_the_sandbox_survives() {
    let sb = spawn_spec(SandboxSpec {
        image: ImageRef::Host,
        limits: Limits {
            memory_bytes: Some(64 << 20),
            ..Default::default()
        },
        ..Default::default()
    });
    let p = sb
        .exec(ExecSpec::new([
            "python3",
            "-c",
            "x = b'a' * (512 << 20); print(len(x))",
        ]))
        .unwrap();
    let (exit, out, _) = p.output().unwrap();
    assert!(exit.oom, "not reported as OOM: {exit:?}");
    assert_eq!(exit.code(), 137);
    assert!(out.is_empty());
    // A normal exit is not an OOM, and the sandbox still works.
    let p = sb.exec(ExecSpec::new(["sh", "-c", "echo alive"])).unwrap();
    let (exit, out, _) = p.output().unwrap();
    assert_eq!((exit.code(), exit.oom), (0, false));
    assert_eq!(out, b"alive\n");
}

#[test]
fn fork_bomb_stops_at_the_pids_limit() {
    let sb = spawn_spec(SandboxSpec {
        image: ImageRef::Dir(busybox_rootfs()),
        limits: Limits {
            pids_max: Some(64),
            ..Default::default()
        },
        ..Default::default()
    });
    // A classic fork bomb: every shell forks two more, then lingers.
    let bomb = sb
        .exec(ExecSpec::new([
            "/bin/sh",
            "-c",
            "b() { b & b & sleep 100; }; b",
        ]))
        .unwrap();
    // Sample the cgroup until the kernel has refused forks (bounded: 15 s on a loaded machine),
    // then a little longer: the sandbox never holds more than its limit.
    let start = std::time::Instant::now();
    let mut refused_at = None;
    while start.elapsed() < std::time::Duration::from_secs(15) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let current = pids_file(sb.id(), "pids.current");
        assert!(current <= 64, "{current} tasks in a 64-pid sandbox");
        match refused_at {
            // pids.events counts the forks refused at the limit.
            None if pids_file(sb.id(), "pids.events") > 0 => {
                refused_at = Some(std::time::Instant::now())
            }
            Some(t) if t.elapsed() > std::time::Duration::from_millis(500) => break,
            _ => {}
        }
    }
    assert!(refused_at.is_some(), "no fork was refused");
    // A refusal happens only at the limit: the peak is the limit itself (where the kernel keeps
    // a peak counter).
    if pids_path(sb.id(), "pids.peak").is_some() {
        assert_eq!(pids_file(sb.id(), "pids.peak"), 64);
    }
    // The host is fine: we can still start processes here.
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
    sb.kill().unwrap();
    let (_, _, err) = bomb.output().unwrap();
    assert!(
        String::from_utf8_lossy(&err).contains("can't fork"),
        "forks were not refused"
    );
    sb.destroy().unwrap();
}

fn pids_path(id: &str, file: &str) -> Option<std::path::PathBuf> {
    ["/sys/fs/cgroup/pids/sbx", "/sys/fs/cgroup/sbx"]
        .iter()
        .map(|b| std::path::Path::new(b).join(id).join(file))
        .find(|p| p.exists())
}

/// A number from the sandbox's pids controller file (`pids.current`, `pids.peak`, or the count
/// in `pids.events`), v1 or v2.
fn pids_file(id: &str, file: &str) -> usize {
    let p = pids_path(id, file).unwrap_or_else(|| panic!("no {file} for {id}"));
    let s = std::fs::read_to_string(p).unwrap();
    s.split_whitespace()
        .last()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

#[test]
fn exit_codes() {
    for (name, image) in images() {
        let sb = spawn(image);
        assert_eq!(sh(&sb, "exit 42").0, 42, "{name}");
        assert_eq!(sh(&sb, "kill -9 $$").0, 128 + 9, "{name}");
        assert_eq!(sh(&sb, "true").0, 0, "{name}");
        // A program that does not exist is an error naming it.
        let e = sb
            .exec(ExecSpec::new(["no-such-program"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-such-program"), "{e}");
    }
}

#[test]
fn fifty_concurrent_execs() {
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..50)
            .map(|i| {
                let sb = &sb;
                s.spawn(move || {
                    sh(
                        sb,
                        &format!("sleep 0.2; echo out-{i}; echo err-{i} >&2; exit {}", i % 7),
                    )
                })
            })
            .collect();
        for (i, h) in hs.into_iter().enumerate() {
            let (code, out, err) = h.join().unwrap();
            assert_eq!(code, (i % 7) as i32);
            assert_eq!(out, format!("out-{i}\n"));
            assert_eq!(err, format!("err-{i}\n"));
        }
    });
}

#[test]
fn stdin_pty_env_cwd_and_users() {
    let sb = spawn(ImageRef::Host);
    let mut spec = ExecSpec::new(["sh", "-c", "pwd; echo $FOO; id -u; id -g; cat"]);
    spec.env = vec![("FOO".into(), "bar baz".into())];
    spec.cwd = Some("/tmp".into());
    spec.uid = 1000;
    spec.gid = 1000;
    spec.stdin = Stdio::Pipe;
    let mut p = sb.exec(spec).unwrap();
    use std::io::Write;
    p.stdin.take().unwrap().write_all(b"from stdin\n").unwrap();
    let (exit, out, _) = p.output().unwrap();
    assert_eq!(exit.code(), 0);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "/tmp\nbar baz\n1000\n1000\nfrom stdin\n"
    );

    // A pty: the process sees a terminal of the requested size.
    let mut spec = ExecSpec::new(["sh", "-c", "tty; stty size"]);
    spec.pty = Some(sbx::runtime::PtySize {
        rows: 33,
        cols: 101,
    });
    let mut p = sb.exec(spec).unwrap();
    let mut master = p.pty.take().expect("pty master");
    let exit = p.wait().unwrap();
    assert_eq!(exit.code(), 0);
    let mut out = Vec::new();
    use std::io::Read;
    let mut buf = [0u8; 4096];
    // After the slave closes, reading the master gives EIO: read what is there.
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("/dev/pts/0"), "{text}");
    assert!(text.contains("33 101"), "{text}");
}

#[test]
fn resource_limits_apply_inside() {
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    assert_eq!(sh_ok(&sb, "ulimit -c").trim(), "0");
    let n: u64 = sh_ok(&sb, "ulimit -n").trim().parse().unwrap();
    assert!(n > 0 && n <= 65536, "nofile {n}");
    // The memory limit is what the cgroup holds (1 GiB by default).
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/sbx/{}/memory.limit_in_bytes",
        sb.id()
    ))
    .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/sbx/{}/memory.max", sb.id())))
    .unwrap();
    assert_eq!(limit.trim(), (1u64 << 30).to_string());
}

#[test]
fn image_symlinks_cannot_redirect_the_kernel_mounts() {
    // A rootfs whose /proc, /dev and /sys are symlinks to host paths: they must not be
    // followed; the sandbox gets real mount points and its own kernel filesystems.
    let root = support::test_root().join(format!("evil-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let st = std::process::Command::new("cp")
        .args(["-a"])
        .arg(busybox_rootfs())
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success());
    for (name, target) in [("proc", "/tmp"), ("dev", "/etc"), ("sys", "/root")] {
        std::fs::remove_dir(root.join(name)).unwrap();
        std::os::unix::fs::symlink(target, root.join(name)).unwrap();
    }
    let sb = spawn(ImageRef::Dir(root.clone()));
    assert_eq!(sh_ok(&sb, "cat /proc/1/comm").trim(), "sbx:[init]");
    assert_eq!(sh_ok(&sb, "ls /dev/null").trim(), "/dev/null");
    let mounts = sh_ok(&sb, "cat /proc/mounts");
    assert!(mounts.contains(" /proc proc "), "{mounts}");
    assert!(mounts.contains(" /sys sysfs "), "{mounts}");
    sb.destroy().unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

/// Count how many of `n` attempts of a python expression succeed inside the sandbox, holding
/// every success open until the count is printed.
fn python_count(sb: &sbx::runtime::Sandbox, setup: &str, expr: &str, n: usize) -> usize {
    let script = format!(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n{setup}\nheld = []\nfor _ in range({n}):\n    try:\n        r = {expr}\n    except OSError:\n        break\n    if isinstance(r, int) and r < 0:\n        break\n    held.append(r)\nprint(len(held))\n"
    );
    sh_ok(
        sb,
        &format!("python3 -c '{}'", script.replace('\'', "'\\''")),
    )
    .trim()
    .parse()
    .unwrap()
}

#[test]
fn per_user_kernel_quotas_are_per_sandbox() {
    // inotify instances are counted per owner of the user namespace at the host level: a
    // sandbox that takes all it may must not take root's or another sandbox's.
    let a = spawn(ImageRef::Host);
    let b = spawn(ImageRef::Host);
    let script = "import ctypes, os, time\nlibc = ctypes.CDLL(None)\nheld = [libc.inotify_init1(0) for _ in range(400)]\nprint(sum(1 for f in held if f >= 0), flush=True)\ntime.sleep(30)\n";
    let mut spec = ExecSpec::new(["python3", "-c", script]);
    spec.stderr = Stdio::Null;
    let mut hog = a.exec(spec).unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(hog.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let took: usize = line.trim().parse().unwrap();
    assert!(took >= 1 && took <= max, "sandbox A took {took} of {max}");
    // Root on the host and sandbox B still get theirs while A holds all of its own.
    let host = nix::sys::inotify::Inotify::init(nix::sys::inotify::InitFlags::IN_CLOEXEC);
    assert!(host.is_ok(), "host root lost inotify: {host:?}");
    let in_b = python_count(&b, "", "libc.inotify_init1(0)", 8);
    assert_eq!(in_b, 8, "sandbox B lost inotify to A");
    a.kill().unwrap();
    let _ = hog.wait();
}

#[test]
fn pseudo_terminals_are_capped_per_sandbox() {
    let sb = spawn(ImageRef::Host);
    let n = python_count(&sb, "", "os.openpty()", 400);
    assert!(n <= 256, "a sandbox opened {n} ptys");
    assert!(n >= 200, "only {n} ptys could be opened");
}

#[test]
fn network_is_loopback_only_and_loopback_is_up() {
    for (name, image) in images() {
        let sb = spawn(image);
        // Only lo exists in the sandbox's network namespace.
        let devs = sh_ok(&sb, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '");
        assert_eq!(devs.trim(), "lo", "{name}");
        if name == "host" {
            // A server on loopback answers a client in the same sandbox.
            let out = sh_ok(
                &sb,
                "python3 -c 'import socket\ns=socket.socket(); s.bind((\"127.0.0.1\", 8080)); s.listen()\nc=socket.create_connection((\"127.0.0.1\", 8080)); a,_=s.accept(); a.sendall(b\"pong\"); print(c.recv(4).decode())'",
            );
            assert_eq!(out.trim(), "pong");
            // Any uid may bind a port below 1024 (as in a Docker container).
            let mut spec = ExecSpec::new([
                "python3",
                "-c",
                "import socket; s=socket.socket(); s.bind((\"127.0.0.1\", 80)); print(\"bound\")",
            ]);
            spec.uid = 1000;
            spec.gid = 1000;
            let (exit, out, err) = sb.exec(spec).unwrap().output().unwrap();
            assert_eq!(exit.code(), 0, "{}", String::from_utf8_lossy(&err));
            assert_eq!(out, b"bound\n");
        } else {
            // Sandbox root cannot reconfigure its network: the namespace is not its own.
            let (code, _, err) = sh(&sb, "ip link set lo down");
            assert_ne!(code, 0, "{name}: lo went down");
            assert!(err.contains("not permitted"), "{name}: {err}");
            let devs = sh_ok(&sb, "cat /sys/class/net/lo/operstate; ls /sys/class/net");
            assert_eq!(devs.split_whitespace().last(), Some("lo"), "{name}: {devs}");
        }
    }
}

/// Running (not zombie) processes named `sleep` in the sandbox.
fn sleeps(sb: &sbx::runtime::Sandbox) -> usize {
    sh_ok(
        sb,
        "ps -eo stat,comm | grep -v '^Z' | grep -c ' sleep$' || true",
    )
    .trim()
    .parse()
    .unwrap()
}

/// Wait (bounded) until `n` sleeps run: a job must have exec'd before it is signalled, or the
/// shell's own pre-exec signal handling decides its fate, not ours.
fn await_sleeps(sb: &sbx::runtime::Sandbox, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sleeps(sb) != n {
        assert!(std::time::Instant::now() < deadline, "expected {n} sleeps");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_process_and_its_jobs_can_be_signalled_and_its_terminal_resized() {
    let sb = spawn(ImageRef::Host);
    // SIGTERM reaches the process, which handles it, and its job.
    let mut p = sb
        .exec(ExecSpec::new([
            "sh",
            "-c",
            "trap 'exit 5' TERM; sleep 100 & wait",
        ]))
        .unwrap();
    await_sleeps(&sb, 1);
    p.signal(libc::SIGTERM).unwrap();
    assert_eq!(p.wait().unwrap().code(), 5);
    await_sleeps(&sb, 0);
    // SIGKILL takes the whole job: the shell and what it started.
    let mut spec = ExecSpec::new(["sh", "-c", "sleep 100 & sleep 100 & wait"]);
    spec.stderr = Stdio::Null;
    let mut p = sb.exec(spec).unwrap();
    await_sleeps(&sb, 2);
    p.signal(libc::SIGKILL).unwrap();
    assert_eq!(p.wait().unwrap().code(), 137);
    // Killed processes may take a moment to exit and be reaped on a loaded machine.
    await_sleeps(&sb, 0);
    // An exited process cannot be signalled: a clear error.
    let e = p.signal(libc::SIGTERM).unwrap_err().to_string();
    assert!(e.contains("No such process"), "{e}");
    // A terminal can be resized while the process runs.
    let mut spec = ExecSpec::new(["sh", "-c", "sleep 0.5; stty size"]);
    spec.pty = Some(sbx::runtime::PtySize { rows: 10, cols: 20 });
    let mut p = sb.exec(spec).unwrap();
    p.resize(40, 120).unwrap();
    let mut master = p.pty.take().unwrap();
    assert_eq!(p.wait().unwrap().code(), 0);
    use std::io::Read;
    let mut out = Vec::new();
    let mut b = [0u8; 1024];
    while let Ok(n) = master.read(&mut b) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[..n]);
    }
    assert!(
        String::from_utf8_lossy(&out).contains("40 120"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}
