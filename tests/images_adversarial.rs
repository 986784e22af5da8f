//! Break-out attempts through snapshots and builds, against a real sbxd (as root): a sandbox
//! that plants symlinks to host paths, hardlink attempts, a fifo, a socket, a very deep path,
//! locked / setuid / xattr'd files, then is snapshotted and started again; a sandbox that keeps
//! swapping a directory and a symlink to `/` while it is snapshotted twenty times; a build
//! writing 50k files and a big sparse file; a build context with symlinks to `/etc/shadow` and
//! to a host-only file; a file appended to while the snapshot reads it; overlayfs's own xattr
//! names set by the sandbox. Each test checks what an operator would notice: the host did not
//! change, no host-only bytes reached any layer blob, sbxd stays healthy, and a sandbox of the
//! snapshot sees what the first one saw.

#[path = "support/daemon.rs"]
mod daemon;

use daemon::{run, run_ok, TestDaemon};
use sbx::api::images::{BuildEvent, ImageInfo};
use sbx::client::{Client, CreateSandbox, Sandbox};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A host-only directory of this test process (never visible inside a sandbox), removed on drop.
struct HostDir(PathBuf);

impl HostDir {
    fn new(name: &str) -> HostDir {
        let p = PathBuf::from(format!("/tmp/sbx-it-adv-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        HostDir(p)
    }

    /// Writes the secret file `secret` holding `marker` (and a sub directory with another
    /// copy): what a followed symlink would leak.
    fn with_secret(name: &str, marker: &str) -> HostDir {
        let d = HostDir::new(name);
        std::fs::write(d.0.join("secret"), format!("{marker}\n")).unwrap();
        std::fs::create_dir_all(d.0.join("sub")).unwrap();
        std::fs::write(d.0.join("sub/inner"), format!("inner {marker}\n")).unwrap();
        d
    }

    fn secret(&self) -> PathBuf {
        self.0.join("secret")
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A marker no file on the host holds by chance.
fn marker(what: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("SBX-HOST-ONLY-{what}-{}-{t}", std::process::id())
}

/// What [`fingerprint`] keeps of one file: mode, uid, size, mtime (s, ns), content or link text.
type FileState = (u32, u32, u64, i64, i64, Vec<u8>);

/// Every file below `dir` (not following symlinks) with its mode, owner, size, mtime and bytes:
/// equal before and after means nothing changed there.
fn fingerprint(dir: &Path) -> BTreeMap<PathBuf, FileState> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let bytes = if m.is_file() {
            std::fs::read(&p).unwrap()
        } else if m.file_type().is_symlink() {
            std::fs::read_link(&p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        } else {
            Vec::new()
        };
        out.insert(
            p.clone(),
            (
                m.mode(),
                m.uid(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                bytes,
            ),
        );
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
    }
    out
}

/// The host's /etc/shadow (bytes and metadata), to check it is unchanged and never stored.
fn host_shadow() -> Option<(Vec<u8>, u32, i64, i64)> {
    let m = std::fs::metadata("/etc/shadow").ok()?;
    let bytes = std::fs::read("/etc/shadow").ok()?;
    Some((bytes, m.mode(), m.mtime(), m.mtime_nsec()))
}

/// The uncompressed content of every blob of the daemon's store (gzip layers through `gzip -dc`).
fn blobs(d: &TestDaemon) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = d.root().join("state/images/blobs/sha256");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if !p.is_file() {
            continue;
        }
        let raw = std::fs::read(&p).unwrap();
        let data = if raw.starts_with(&[0x1f, 0x8b]) {
            let o = Command::new("gzip")
                .arg("-dc")
                .arg(&p)
                .output()
                .expect("run gzip");
            assert!(o.status.success(), "gunzip {}", p.display());
            o.stdout
        } else {
            raw
        };
        out.push((p, data));
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Asserts no blob of the store holds any of `needles` (uncompressed), and that the store has
/// at least `min_blobs` blobs (so the scan looked at something).
fn assert_no_blob_holds(d: &TestDaemon, needles: &[&[u8]], min_blobs: usize) {
    let all = blobs(d);
    assert!(
        all.len() >= min_blobs,
        "only {} blobs in the store",
        all.len()
    );
    for (p, data) in &all {
        for n in needles {
            assert!(
                !contains(data, n),
                "blob {} holds host-only bytes {:?}",
                p.display(),
                String::from_utf8_lossy(&n[..n.len().min(60)])
            );
        }
    }
}

/// The end of a host-escape test: no blob of the store holds `mark` or the host's /etc/shadow
/// (at least `min_blobs` blobs scanned), the host-only directory and /etc/shadow are as they
/// were, and sbxd still answers.
async fn assert_host_untouched(
    d: &TestDaemon,
    mark: &str,
    host: &HostDir,
    before: &BTreeMap<PathBuf, FileState>,
    shadow: &Option<(Vec<u8>, u32, i64, i64)>,
    min_blobs: usize,
) {
    let mut needles: Vec<&[u8]> = vec![mark.as_bytes()];
    if let Some((bytes, ..)) = shadow {
        needles.push(bytes);
    }
    assert_no_blob_holds(d, &needles, min_blobs);
    assert_eq!(
        &fingerprint(&host.0),
        before,
        "the host-only directory changed"
    );
    assert_eq!(&host_shadow(), shadow, "the host's /etc/shadow changed");
    health(d).await;
}

async fn health(d: &TestDaemon) {
    let (st, body) = d.raw("GET", "/v1/health", b"").await;
    assert_eq!(st, 200, "health: {}", String::from_utf8_lossy(&body));
}

async fn snapshot(d: &TestDaemon, sb: &str) -> (u16, Value) {
    let (st, body) = d
        .raw("POST", &format!("/v1/sandboxes/{sb}/snapshot"), b"")
        .await;
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("snapshot {sb}: {e}: {}", String::from_utf8_lossy(&body)));
    (st, v)
}

/// A snapshot that must succeed: the new image's id.
async fn snapshot_ok(d: &TestDaemon, sb: &str) -> String {
    let (st, v) = snapshot(d, sb).await;
    assert_eq!(st, 201, "snapshot of {sb}: {v}");
    v["id"].as_str().expect("an image id").to_string()
}

async fn create(c: &Client, image: Option<&str>) -> Sandbox {
    Sandbox::create(
        c,
        CreateSandbox {
            image: image.map(str::to_string),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("create a sandbox of {image:?}: {e}"))
}

async fn sh_ok(sb: &Sandbox, script: &str) -> String {
    run_ok(sb, &["/bin/sh", "-c", script]).await
}

async fn py_ok(sb: &Sandbox, script: &str, args: &[&str]) -> String {
    let mut a = vec!["/usr/bin/python3", "-c", script];
    a.extend_from_slice(args);
    run_ok(sb, &a).await
}

async fn terminate(sb: &Sandbox) {
    sb.terminate(true).await.expect("terminate");
    sb.detach();
}

/// Plants the hostile entries under /home (argv: the host-only secret file, its directory, and
/// how many 205-byte directory names the deep path has).
/// Prints the outcome of each hardlink attempt.
const PLANT: &str = r##"
import errno, os, shutil, socket, sys
secret, secret_dir = sys.argv[1], sys.argv[2]
A = "/home/adv"
os.makedirs(A)
os.symlink("/etc", "/home/evil")
os.symlink("/etc/shadow", "/home/link")
os.symlink(secret_dir, A + "/host-dir")
os.symlink(secret, A + "/host-file")
os.symlink("../../../../../../../.." + secret, A + "/rel-escape")
os.symlink("/proc/1/root" + secret_dir, A + "/magic")
os.symlink("dangling/nowhere", A + "/dangling")
with open(A + "/own", "w") as f:
    f.write("own file\n")
os.link(A + "/own", A + "/own-link")
for src, dst in (("/etc/passwd", "hl-lower"), ("/usr/bin/env", "hl-usr"),
                 (secret, "hl-host"), ("/proc/1/root" + secret, "hl-magic")):
    try:
        os.link(src, A + "/" + dst)
        print(dst, "linked")
    except OSError as e:
        print(dst, errno.errorcode[e.errno])
os.mkfifo(A + "/fifo", 0o640)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(A + "/sock")
s.close()
os.chdir(A)
for i in range(int(sys.argv[3])):
    n = "d%02d_" % i + "x" * 200
    os.mkdir(n)
    os.chdir(n)
with open("deep", "w") as f:
    f.write("at the bottom\n")
os.chdir("/")
with open(A + "/locked", "w") as f:
    f.write("nobody may read me\n")
os.chown(A + "/locked", 1234, 1234)
os.chmod(A + "/locked", 0)
shutil.copy("/usr/bin/env", A + "/suid")
os.chmod(A + "/suid", 0o4755)
with open(A + "/sgid", "w") as f:
    f.write("#!/bin/sh\n")
os.chmod(A + "/sgid", 0o2755)
with open(A + "/suid-other", "w") as f:
    f.write("#!/bin/sh\n")
os.chown(A + "/suid-other", 1234, 4321)
os.chmod(A + "/suid-other", 0o6750)
os.setxattr(A + "/own", "user.note", b"a note")
os.setxattr(A, "user.dirnote", b"on a dir")
os.setxattr(A + "/locked", "user.empty", b"")
"##;

/// One line per entry below /home (walked by descriptors: the deep path is longer than
/// PATH_MAX): path, type, mode, uid:gid, link target or sha256 of the content, xattrs; and
/// which regular files share an inode.
const LIST: &str = r##"
import hashlib, os, stat
lines, inodes = [], {}
for root, dirs, files, rfd in os.fwalk("/home"):
    for name in sorted(dirs + files):
        st = os.stat(name, dir_fd=rfd, follow_symlinks=False)
        path = (root + "/" + name)[len("/home/"):]
        short = path if len(path) < 120 else path[:40] + "...(%d)...%s" % (len(path), path[-20:])
        m = st.st_mode
        kind, what, xa = "?", "", ""
        if stat.S_ISLNK(m):
            kind, what = "link", os.readlink(name, dir_fd=rfd)
        elif stat.S_ISSOCK(m):
            kind = "sock"
        else:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
            fd = os.open(name, flags, dir_fd=rfd)
            try:
                xa = ",".join("%s=%r" % (x, os.getxattr(fd, x)) for x in sorted(os.listxattr(fd)))
                if stat.S_ISREG(m):
                    kind = "file"
                    what = hashlib.sha256(os.read(fd, 1 << 24)).hexdigest()[:16]
                    inodes.setdefault(st.st_ino, []).append(short)
                elif stat.S_ISDIR(m):
                    kind = "dir"
                elif stat.S_ISFIFO(m):
                    kind = "fifo"
            finally:
                os.close(fd)
        lines.append("%s %s %o %d:%d %s [%s]" % (short, kind, stat.S_IMODE(m), st.st_uid, st.st_gid, what, xa))
for names in inodes.values():
    if len(names) > 1:
        lines.append("same-inode " + " ".join(sorted(names)))
print("\n".join(sorted(lines)))
"##;

/// 1. Symlinks to host paths, hardlink attempts, a fifo, a socket, a path far longer than
/// PATH_MAX, a locked file of another uid, setuid/setgid files and `user.*` xattrs survive a
/// snapshot exactly as the sandbox saw them (the socket, documented, is left out); no host-only
/// byte reaches a layer blob and the host's files are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_hostile_entries_keeps_them_as_the_sandbox_saw_them() {
    let mark = marker("plant");
    let host = HostDir::with_secret("plant", &mark);
    let before = fingerprint(&host.0);
    let shadow = host_shadow();
    let d = TestDaemon::start("adv-plant").await;
    let c = d.client().await;
    let sb = create(&c, None).await;
    let secret = host.secret();
    let links = py_ok(
        &sb,
        PLANT,
        &[secret.to_str().unwrap(), host.0.to_str().unwrap(), "14"],
    )
    .await;
    eprintln!("hardlink attempts inside the sandbox:\n{links}");
    // Nothing of the host's secret is reachable inside, by any of the planted names.
    for p in [
        "/home/adv/host-file",
        "/home/adv/rel-escape",
        "/home/adv/hl-host",
    ] {
        let (rc, out, _) = run(&sb, &["cat", p]).await;
        assert!(rc != 0 && !out.contains(&mark), "{p}: rc={rc} {out:?}");
    }
    let seen = py_ok(&sb, LIST, &[]).await;
    eprintln!("entries the first sandbox saw:\n{seen}");
    assert!(
        seen.contains("adv/sock sock"),
        "the socket was planted: {seen}"
    );
    assert!(seen.contains("/deep file"), "the deep file: {seen}");

    let t0 = Instant::now();
    let img = snapshot_ok(&d, sb.id()).await;
    eprintln!("snapshot took {:?}", t0.elapsed());
    terminate(&sb).await;

    let sb2 = create(&c, Some(&img)).await;
    let again = py_ok(&sb2, LIST, &[]).await;
    // The socket is skipped (it means nothing without the process that bound it).
    let want: Vec<&str> = seen
        .lines()
        .filter(|l| !l.starts_with("adv/sock "))
        .collect();
    let got: Vec<&str> = again.lines().collect();
    assert_eq!(
        got, want,
        "the snapshot's sandbox sees other entries than the first"
    );
    assert_eq!(
        run_ok(&sb2, &["readlink", "/home/link"]).await,
        "/etc/shadow\n"
    );
    assert_eq!(run_ok(&sb2, &["readlink", "/home/evil"]).await, "/etc\n");
    for p in [
        "/home/adv/host-file",
        "/home/adv/rel-escape",
        "/home/adv/magic",
    ] {
        let (rc, out, _) = run(&sb2, &["cat", p]).await;
        assert!(rc != 0 && !out.contains(&mark), "{p}: rc={rc} {out:?}");
    }
    terminate(&sb2).await;

    assert_host_untouched(&d, &mark, &host, &before, &shadow, 1).await;
    drop(c);
    d.finish().await;
}

/// Swaps, as fast as it can, `x` between a directory and a symlink to `/`, and `y` between a
/// directory and a symlink to the host-only directory (argv[1]); writes its pid to /home/race/pid.
const RACE: &str = r##"
import os, sys
os.makedirs("/home/race", exist_ok=True)
os.chdir("/home/race")
with open("pid", "w") as f:
    f.write(str(os.getpid()))
targets = (("x", "/"), ("y", sys.argv[1]), ("z", "/etc"))
while True:
    for n, _ in targets:
        try:
            os.unlink(n)
        except FileNotFoundError:
            pass
        os.mkdir(n)
        with open(n + "/f", "w") as f:
            f.write("inside\n")
    for n, t in targets:
        os.unlink(n + "/f")
        os.rmdir(n)
        os.symlink(t, n)
"##;

/// 2. Twenty snapshots of a sandbox that keeps swapping directories and symlinks to `/` and to
/// a host-only directory: each succeeds or fails with a message naming the sandbox; no layer
/// holds the host's bytes, no layer holds more than the sandbox's own few entries, the host
/// directory is unchanged and sbxd stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_symlink_swaps_during_snapshots_leak_nothing() {
    let mark = marker("race");
    let host = HostDir::with_secret("race", &mark);
    let before = fingerprint(&host.0);
    let shadow = host_shadow();
    let d = TestDaemon::start("adv-race").await;
    let c = d.client().await;
    let sb = create(&c, None).await;
    // In the background (its output to /dev/null so the exec ends at once).
    let script = RACE.replace('\'', "'\\''");
    sh_ok(
        &sb,
        &format!(
            "/usr/bin/python3 -c '{script}' '{}' </dev/null >/dev/null 2>&1 &",
            host.0.display()
        ),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while run(&sb, &["test", "-s", "/home/race/pid"]).await.0 != 0 {
        assert!(Instant::now() < deadline, "the swapping loop did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    for _ in 0..20 {
        let (st, v) = snapshot(&d, sb.id()).await;
        if st == 201 {
            ok.push(v["id"].as_str().unwrap().to_string());
        } else {
            let msg = v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(
                msg.contains(sb.id()) && msg.contains("/home/race"),
                "a failed snapshot says which sandbox and path: {st} {v}"
            );
            failed.push(msg);
        }
        health(&d).await;
    }
    eprintln!(
        "20 racing snapshots in {:?}: {} succeeded, {} failed {:?}",
        t0.elapsed(),
        ok.len(),
        failed.len(),
        failed.first()
    );
    // The loop was still swapping all along.
    run_ok(&sb, &["sh", "-c", "kill -0 $(cat /home/race/pid)"]).await;
    terminate(&sb).await;

    // Every successful snapshot starts; /home/race holds at most the loop's own names, each a
    // directory with its file or a symlink with the loop's target text.
    for img in ok.iter().take(5) {
        let sb2 = create(&c, Some(img)).await;
        let out = sh_ok(
            &sb2,
            "cd /home/race && for n in *; do if [ -L $n ]; then echo $n link $(readlink $n); \
             elif [ -d $n ]; then echo $n dir $(ls -A $n | tr '\\n' ' '); else echo $n file; fi; done",
        )
        .await;
        for l in out.lines() {
            let ok_line = l == "pid file"
                || l == "x link /"
                || l == format!("y link {}", host.0.display())
                || l == "z link /etc"
                || (l.len() > 2 && l[2..].starts_with("dir") && !l.contains(".."));
            assert!(ok_line, "unexpected entry in {img}: {l:?} (all: {out})");
        }
        terminate(&sb2).await;
    }
    // No layer walked the host: each is tiny (the host's / would be gigabytes).
    for (p, data) in blobs(&d) {
        assert!(
            data.len() < 1 << 20,
            "blob {} is {} bytes: more than the sandbox wrote",
            p.display(),
            data.len()
        );
    }
    assert_host_untouched(&d, &mark, &host, &before, &shadow, ok.len().min(1)).await;
    drop(c);
    d.finish().await;
}

/// POST a build and read its whole stream: (HTTP status, events or the error body text).
async fn build(d: &TestDaemon, req: &Value) -> (u16, Vec<BuildEvent>, String) {
    let body = serde_json::to_vec(req).expect("encode the build request");
    let (status, bytes) = d.raw("POST", "/v1/images/build", &body).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if status != 200 {
        return (status, Vec::new(), text);
    }
    let events = text
        .lines()
        .map(|l| {
            serde_json::from_str::<BuildEvent>(l)
                .unwrap_or_else(|e| panic!("a build event line {l:?}: {e}"))
        })
        .collect();
    (status, events, text)
}

async fn build_ok(d: &TestDaemon, req: &Value) -> ImageInfo {
    let (status, events, text) = build(d, req).await;
    assert_eq!(status, 200, "build refused: {text}");
    match events.last() {
        Some(BuildEvent::Done { image }) => image.clone(),
        other => panic!("the build did not end with done: {other:?}\n{text}"),
    }
}

fn sh_step(script: &str) -> Value {
    json!({"run": {"argv": ["/bin/sh", "-c", script]}})
}

/// Free bytes of the filesystem holding `p`.
fn free_bytes(p: &Path) -> u64 {
    let st =
        nix::sys::statvfs::statvfs(p).unwrap_or_else(|e| panic!("statvfs {}: {e}", p.display()));
    st.blocks_available() as u64 * st.fragment_size() as u64
}

/// The size of a sparse file a build test makes: `at_most` (a commit reads every byte of it:
/// about 16 MB/s in a debug build), or less when a quarter of the free
/// space of /tmp's filesystem (which holds the daemon's state) is less.
fn sparse_size(at_most: u64) -> u64 {
    at_most.min(free_bytes(Path::new("/tmp")) / 4) & !0xfffff
}

/// Disk blocks (bytes) and apparent size of every file named `name` below `dir`.
fn find_usage(dir: &Path, name: &str) -> Vec<(PathBuf, u64, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd.flatten() {
            let m = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            if m.is_dir() {
                todo.push(e.path());
            } else if e.file_name() == name {
                out.push((e.path(), m.blocks() * 512, m.size()));
            }
        }
    }
    out
}

/// 3. A RUN writing 50 000 small files and a big sparse file: the build ends (done or a clear
/// error) in bounded time, the next step and a sandbox see the files, sbxd stays healthy. The
/// time and what the sparse file costs on disk are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_with_many_files_and_a_sparse_file_ends_and_daemon_stays_healthy() {
    let size = sparse_size(128 << 20);
    assert!(size >= 32 << 20, "less than 128 MiB free on /tmp");
    let d = TestDaemon::start("adv-bigbuild").await;
    let t0 = Instant::now();
    let image = build_ok(
        &d,
        &json!({
            "base": "host",
            "steps": [
                sh_step(&format!(
                    "mkdir -p /home/many && cd /home/many && i=0; \
                     while [ $i -lt 50000 ]; do echo $i > f$i; i=$((i+1)); done; \
                     truncate -s {size} /home/sparse && echo end >> /home/sparse"
                )),
                sh_step("ls /home/many | wc -l > /home/count && stat -c '%s %b' /home/sparse > /home/sparse-stat"),
            ],
        }),
    )
    .await;
    let took = t0.elapsed();
    eprintln!("build of 50k files + a {size}-byte sparse file took {took:?}");
    // About 25 s on 2 cores in a debug build; a hang would be far longer.
    assert!(took < Duration::from_secs(90), "the build took {took:?}");
    health(&d).await;
    let c = d.client().await;
    let sb = create(&c, Some(&image.id)).await;
    assert_eq!(run_ok(&sb, &["cat", "/home/count"]).await, "50000\n");
    assert_eq!(run_ok(&sb, &["cat", "/home/many/f49999"]).await, "49999\n");
    assert_eq!(
        run_ok(&sb, &["tail", "-c", "4", "/home/sparse"]).await,
        "end\n"
    );
    let stat_in_step = run_ok(&sb, &["cat", "/home/sparse-stat"]).await;
    terminate(&sb).await;
    let layer_bytes: u64 = image.layers.iter().map(|l| l.size).sum();
    let unpacked = find_usage(&rootfs_fetch::layers_dir(&d.root().join("state")), "sparse");
    eprintln!(
        "sparse file: apparent {} bytes; compressed layers {layer_bytes} bytes; stat in the next \
         step (size, 512-byte blocks): {stat_in_step:?}; unpacked copies (path, disk bytes, \
         size): {unpacked:?}",
        size + 4
    );
    assert!(
        !unpacked.is_empty(),
        "the layer with the sparse file is unpacked"
    );
    health(&d).await;
    drop(c);
    d.finish().await;
}

/// 3b. A sparse file in a RUN step stays sparse once the layer is unpacked: a sandbox writing
/// `truncate -s 20G` must not cost 20 GB of the host's disk per unpacked layer (here 256 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_file_stays_sparse_through_a_build_layer() {
    let size = sparse_size(256 << 20);
    let d = TestDaemon::start("adv-sparse").await;
    let image = build_ok(
        &d,
        &json!({
            "base": "host",
            "steps": [
                sh_step(&format!("truncate -s {size} /home/sparse")),
                sh_step("true"),
            ],
        }),
    )
    .await;
    let unpacked = find_usage(&rootfs_fetch::layers_dir(&d.root().join("state")), "sparse");
    eprintln!("{image:?}\nunpacked: {unpacked:?}");
    assert!(
        !unpacked.is_empty(),
        "the layer is unpacked for the 2nd step"
    );
    for (p, disk, apparent) in &unpacked {
        assert_eq!(*apparent, size);
        assert!(
            *disk < size / 8,
            "{} uses {disk} bytes of disk for a {apparent}-byte sparse file",
            p.display()
        );
    }
    health(&d).await;
    d.finish().await;
}

/// 4. A build context with symlinks to /etc/shadow and to a host-only file (top level and in a
/// copied directory): the image holds the links as links with the same text, never the
/// content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_context_symlinks_are_copied_as_links() {
    let mark = marker("ctx");
    let host = HostDir::with_secret("ctx-secret", &mark);
    let before = fingerprint(&host.0);
    let shadow = host_shadow();
    let ctx = HostDir::new("ctx");
    let secret = host.secret();
    std::os::unix::fs::symlink("/etc/shadow", ctx.0.join("shadow-link")).unwrap();
    std::os::unix::fs::symlink(&secret, ctx.0.join("secret-link")).unwrap();
    std::fs::create_dir_all(ctx.0.join("tree/deeper")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", ctx.0.join("tree/shadow")).unwrap();
    std::os::unix::fs::symlink(&host.0, ctx.0.join("tree/host-dir")).unwrap();
    let up = format!("../../../../../../../..{}", secret.display());
    std::os::unix::fs::symlink(&up, ctx.0.join("tree/deeper/up")).unwrap();
    std::fs::write(ctx.0.join("tree/plain"), "plain\n").unwrap();

    let d = TestDaemon::start("adv-ctx").await;
    let image = build_ok(
        &d,
        &json!({
            "base": "host",
            "context": ctx.0.to_str().unwrap(),
            "steps": [
                {"copy": {"sources": ["shadow-link", "secret-link"], "dest": "/opt/top/"}},
                {"copy": {"sources": ["tree"], "dest": "/opt/tree/"}},
                {"copy": {"sources": ["."], "dest": "/opt/all/"}},
            ],
        }),
    )
    .await;
    let c = d.client().await;
    let sb = create(&c, Some(&image.id)).await;
    let links = [
        ("/opt/top/shadow-link", "/etc/shadow".to_string()),
        ("/opt/top/secret-link", secret.display().to_string()),
        ("/opt/tree/shadow", "/etc/shadow".to_string()),
        ("/opt/tree/host-dir", host.0.display().to_string()),
        ("/opt/tree/deeper/up", up.clone()),
        ("/opt/all/shadow-link", "/etc/shadow".to_string()),
        ("/opt/all/tree/deeper/up", up.clone()),
    ];
    for (p, target) in &links {
        run_ok(&sb, &["test", "-L", p]).await;
        assert_eq!(
            run_ok(&sb, &["readlink", p]).await,
            format!("{target}\n"),
            "{p}"
        );
        let (rc, out, _) = run(&sb, &["cat", p]).await;
        assert!(rc != 0 && !out.contains(&mark), "{p}: rc={rc} {out:?}");
    }
    assert_eq!(run_ok(&sb, &["cat", "/opt/tree/plain"]).await, "plain\n");
    terminate(&sb).await;
    assert_host_untouched(&d, &mark, &host, &before, &shadow, 3).await;
    drop(c);
    d.finish().await;
}

/// Appends numbered 16-byte lines to /home/app/log through one open descriptor until argv[1]
/// bytes are written; its pid in /home/app/pid, "done" in /home/app/done at the end.
const APPEND: &str = r##"
import os, sys
limit = int(sys.argv[1])
os.makedirs("/home/app", exist_ok=True)
with open("/home/app/pid", "w") as f:
    f.write(str(os.getpid()))
fd = os.open("/home/app/log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
n = 0
while n * 16 < limit:
    os.write(fd, b"".join(b"line %010d\n" % (n + k) for k in range(256)))
    n += 256
os.close(fd)
open("/home/app/done", "w").close()
"##;

/// 5. A snapshot taken while a process appends to a file it holds open succeeds, and the file
/// in the snapshot is a prefix of the file's final content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_a_file_being_appended_holds_a_prefix() {
    let d = TestDaemon::start("adv-append").await;
    let c = d.client().await;
    let sb = create(&c, None).await;
    let limit = 256u64 << 20;
    let script = APPEND.replace('\'', "'\\''");
    sh_ok(
        &sb,
        &format!("/usr/bin/python3 -c '{script}' {limit} </dev/null >/dev/null 2>&1 &"),
    )
    .await;
    // Snapshot once the file has some data, while the writer still runs.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = run_ok(
            &sb,
            &["sh", "-c", "stat -c %s /home/app/log 2>/dev/null || echo 0"],
        )
        .await;
        if out.trim().parse::<u64>().unwrap_or(0) > 1 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "the writer did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let img = snapshot_ok(&d, sb.id()).await;
    let (rc, _, _) = run(&sb, &["test", "-e", "/home/app/done"]).await;
    let overlapped = rc != 0;
    // The writer's end: wait for it (bounded), or stop it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while run(&sb, &["test", "-e", "/home/app/done"]).await.0 != 0 {
        if Instant::now() > deadline {
            sh_ok(&sb, "kill $(cat /home/app/pid); sleep 0.2").await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let final_size: u64 = sh_ok(&sb, "stat -c %s /home/app/log")
        .await
        .trim()
        .parse()
        .unwrap();

    let sb2 = create(&c, Some(&img)).await;
    let snap_size: u64 = sh_ok(&sb2, "stat -c %s /home/app/log")
        .await
        .trim()
        .parse()
        .unwrap();
    let snap_sum = sh_ok(&sb2, "sha256sum < /home/app/log").await;
    terminate(&sb2).await;
    eprintln!(
        "snapshot while appending (writer still running at the end: {overlapped}): \
         {snap_size} of {final_size} bytes"
    );
    assert!(
        snap_size > 0 && snap_size <= final_size,
        "{snap_size} vs {final_size}"
    );
    let prefix_sum = sh_ok(
        &sb,
        &format!("head -c {snap_size} /home/app/log | sha256sum"),
    )
    .await;
    assert_eq!(
        snap_sum, prefix_sum,
        "the snapshot's file is not a prefix of the final one"
    );
    terminate(&sb).await;
    health(&d).await;
    drop(c);
    d.finish().await;
}

/// 6. `user.overlay.opaque` set by the sandbox on a directory it got from its image (sbx mounts
/// the overlay with `trusted.*` xattrs, so to overlayfs this is an ordinary user xattr and the
/// sandbox still sees the directory's files): a sandbox of the snapshot sees them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_overlay_opaque_set_inside_does_not_hide_files_in_the_snapshot() {
    let d = TestDaemon::start("adv-ovl-opaque").await;
    let c = d.client().await;
    let sb = create(&c, None).await;
    sh_ok(
        &sb,
        "mkdir -p /home/kept && echo from-parent > /home/kept/file",
    )
    .await;
    let parent = snapshot_ok(&d, sb.id()).await;
    terminate(&sb).await;

    let sb = create(&c, Some(&parent)).await;
    py_ok(
        &sb,
        "import os; os.setxattr('/home/kept', 'user.overlay.opaque', b'y')",
        &[],
    )
    .await;
    assert_eq!(
        run_ok(&sb, &["cat", "/home/kept/file"]).await,
        "from-parent\n"
    );
    let child = snapshot_ok(&d, sb.id()).await;
    terminate(&sb).await;
    let sb2 = create(&c, Some(&child)).await;
    let (rc, out, err) = run(&sb2, &["cat", "/home/kept/file"]).await;
    terminate(&sb2).await;
    health(&d).await;
    drop(c);
    d.finish().await;
    assert_eq!(
        (rc, out.as_str()),
        (0, "from-parent\n"),
        "a user.overlay.opaque set inside hid the parent's files in the snapshot: {err}"
    );
}

/// 7. `user.overlay.metacopy` set by the sandbox on a file it wrote (an ordinary user xattr to
/// this overlay): the snapshot keeps the file's data, or fails with a message naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_overlay_metacopy_set_inside_keeps_data_or_fails_clearly() {
    let d = TestDaemon::start("adv-ovl-meta").await;
    let c = d.client().await;
    let sb = create(&c, None).await;
    py_ok(
        &sb,
        "import os; open('/home/meta', 'w').write('meta data\\n'); \
         os.setxattr('/home/meta', 'user.overlay.metacopy', b'')",
        &[],
    )
    .await;
    assert_eq!(run_ok(&sb, &["cat", "/home/meta"]).await, "meta data\n");
    let (st, v) = snapshot(&d, sb.id()).await;
    terminate(&sb).await;
    if st == 201 {
        let sb3 = create(&c, Some(v["id"].as_str().unwrap())).await;
        assert_eq!(run_ok(&sb3, &["cat", "/home/meta"]).await, "meta data\n");
        terminate(&sb3).await;
    } else {
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        eprintln!("snapshot with a user.overlay.metacopy file: {st} {msg}");
        assert!(msg.contains("home/meta") && msg.contains(sb.id()), "{v}");
    }
    health(&d).await;
    drop(c);
    d.finish().await;
}

/// Reads argv[2] at the end of argv[1] nested 205-byte directory names below /home/adv (by
/// relative chdir: the whole path is longer than PATH_MAX).
const READ_DEEP: &str = r##"
import os, sys
os.chdir("/home/adv")
for i in range(int(sys.argv[1])):
    os.chdir("d%02d_" % i + "x" * 200)
print(open(sys.argv[2]).read(), end="")
"##;

/// 8. A path longer than PATH_MAX (24 directories of 205 bytes: about 4.9 KB) in a sandbox: the
/// snapshot either is refused with a message naming the path, or a sandbox of it starts and
/// reads the deep file. It must not yield an image no sandbox can start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_with_a_path_longer_than_path_max_is_usable_or_refused() {
    let host = HostDir::with_secret("deep", &marker("deep"));
    let d = TestDaemon::start("adv-deep").await;
    let c = d.client().await;
    let sb = create(&c, None).await;
    let secret = host.secret();
    py_ok(
        &sb,
        PLANT,
        &[secret.to_str().unwrap(), host.0.to_str().unwrap(), "24"],
    )
    .await;
    assert_eq!(
        py_ok(&sb, READ_DEEP, &["24", "deep"]).await,
        "at the bottom\n"
    );
    let (st, v) = snapshot(&d, sb.id()).await;
    terminate(&sb).await;
    let outcome = if st == 201 {
        let img = v["id"].as_str().unwrap().to_string();
        let sb2 = create(&c, Some(&img)).await;
        let a = ["/usr/bin/python3", "-c", READ_DEEP, "24", "deep"];
        let res = match sb2.exec(a).await {
            Ok(p) => {
                let out = p.stdout().read_text().await.unwrap_or_default();
                let rc = p.wait().await.unwrap_or(-1);
                (rc == 0 && out == "at the bottom\n")
                    .then_some(())
                    .ok_or(format!("exec in a sandbox of {img}: rc={rc} {out:?}"))
            }
            Err(e) => Err(format!(
                "a sandbox of the snapshot {img} could not run: {e}"
            )),
        };
        terminate(&sb2).await;
        res
    } else {
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        eprintln!("snapshot with a deep path refused: {st} {msg}");
        (msg.contains("home/adv/d00_") && msg.contains(sb.id()))
            .then_some(())
            .ok_or(format!("the refusal names no path: {v}"))
    };
    health(&d).await;
    drop(c);
    d.finish().await;
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
