//! Shared helpers for the integration tests: a runtime config under /tmp, a busybox rootfs, the
//! syscall probe, and one-call exec. Tests run as root and start real sandboxes.
#![allow(dead_code)]

use sbx::runtime::{ExecSpec, ImageRef, RuntimeConfig, Sandbox, SandboxSpec, Stdio};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Root of everything the tests create (removed pieces per sandbox by teardown).
pub fn test_root() -> PathBuf {
    PathBuf::from("/tmp/sbx-it")
}

pub fn config() -> RuntimeConfig {
    RuntimeConfig {
        state_dir: test_root().join("state"),
        run_dir: test_root().join("run"),
        init_binary: PathBuf::from(env!("CARGO_BIN_EXE_sbx-init")),
        warm_helpers: 2,
        // Test processes exit without a final janitor::flush: clean up synchronously (the
        // background mode has its own test).
        background_cleanup: false,
    }
}

/// The syscall probe (tests/support/probe.c), built static once.
pub fn probe() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = test_root().join("bin");
        std::fs::create_dir_all(&dir).expect("mkdir test bin");
        let out = dir.join("probe");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/probe.c");
        let fresh = |o: &Path| {
            let (Ok(a), Ok(b)) = (std::fs::metadata(o), std::fs::metadata(&src)) else {
                return false;
            };
            a.modified().ok() >= b.modified().ok()
        };
        if !fresh(&out) {
            // Build aside and rename: test processes running at once never see half a binary.
            let tmp = dir.join(format!("probe.{}", std::process::id()));
            let st = Command::new("cc")
                .args(["-static", "-O2", "-o"])
                .arg(&tmp)
                .arg(&src)
                .status()
                .expect("run cc (gcc and libc6-dev are installed by scripts/setup.sh)");
            assert!(st.success(), "building the syscall probe failed");
            std::fs::rename(&tmp, &out).expect("rename probe");
        }
        out
    })
    .clone()
}

/// A rootfs directory from busybox-static (plus the probe), built once per test process.
pub fn busybox_rootfs() -> PathBuf {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        // Shared by every test process: built aside and renamed into place once.
        let root = test_root().join("busybox-rootfs");
        if root.join(".complete").exists() {
            return root;
        }
        let tmp = test_root().join(format!("busybox-rootfs.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        for d in ["bin", "etc", "tmp", "root", "proc", "sys", "dev", "usr/bin"] {
            std::fs::create_dir_all(tmp.join(d)).expect("mkdir rootfs");
        }
        let bb = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static is installed by scripts/setup.sh");
        std::fs::copy(bb, tmp.join("bin/busybox")).expect("copy busybox");
        let list = Command::new(tmp.join("bin/busybox"))
            .arg("--list")
            .output()
            .expect("busybox --list");
        assert!(list.status.success());
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", tmp.join("bin").join(applet))
                    .expect("symlink applet");
            }
        }
        std::fs::copy(probe(), tmp.join("bin/probe")).expect("copy probe");
        std::fs::write(tmp.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(tmp.join("etc/group"), "root:x:0:\n").unwrap();
        std::fs::write(tmp.join(".complete"), "").unwrap();
        if std::fs::rename(&tmp, &root).is_err() {
            // Another test process finished first: use theirs.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        root
    })
    .clone()
}

pub fn images() -> Vec<(&'static str, ImageRef)> {
    vec![
        ("host", ImageRef::Host),
        ("busybox", ImageRef::Dir(busybox_rootfs())),
    ]
}

pub fn spawn(image: ImageRef) -> Sandbox {
    spawn_spec(SandboxSpec {
        image,
        ..Default::default()
    })
}

pub fn spawn_spec(spec: SandboxSpec) -> Sandbox {
    Sandbox::spawn(&config(), spec).expect("spawn sandbox")
}

/// Run `sh -c script`; returns (exit code, stdout, stderr).
pub fn sh(sb: &Sandbox, script: &str) -> (i32, String, String) {
    let p = sb
        .exec(ExecSpec::new(["/bin/sh", "-c", script]))
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    let (exit, out, err) = p.output().expect("output");
    (
        exit.code(),
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// Run `sh -c script` and return its stdout, asserting exit 0.
pub fn sh_ok(sb: &Sandbox, script: &str) -> String {
    let (code, out, err) = sh(sb, script);
    assert_eq!(code, 0, "{script:?} failed: stdout={out:?} stderr={err:?}");
    out
}

/// Copy a host file into the sandbox (through stdin of `cat`, as a user would) and chmod +x.
pub fn copy_in(sb: &Sandbox, host: &Path, inside: &str) {
    let mut spec = ExecSpec::new([
        "/bin/sh",
        "-c",
        &format!("cat > {inside} && chmod 755 {inside}"),
    ]);
    spec.stdin = Stdio::Pipe;
    let mut p = sb.exec(spec).expect("exec cat");
    let data = std::fs::read(host).expect("read host file");
    p.stdin
        .take()
        .expect("stdin")
        .write_all(&data)
        .expect("write");
    let (exit, _, err) = p.output().expect("output");
    assert_eq!(exit.code(), 0, "copy_in: {}", String::from_utf8_lossy(&err));
}

/// Every line of /proc/self/mountinfo that mentions `needle`.
pub fn host_mounts_with(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

/// Cgroup directories of a sandbox that still exist (v1 controllers and v2).
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for c in rd.flatten() {
            let p = c.path().join("sbx").join(id);
            if p.exists() {
                out.push(p);
            }
        }
    }
    let p = Path::new("/sys/fs/cgroup/sbx").join(id);
    if p.exists() {
        out.push(p);
    }
    out
}
