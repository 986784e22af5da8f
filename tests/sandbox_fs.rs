//! Host-side access into a running sandbox: the filesystem calls (`Sandbox::fs`) resolve every
//! path inside the sandbox — symlinks and `..` included — and act as the sandbox's root; and
//! `Sandbox::tcp_connect` reaches listeners in the sandbox's network namespace, not the host's.
//! Runs as root; starts real sandboxes on the busybox rootfs and the `host` image.

mod support;

use sbx::runtime::{ExecSpec, FileType, FsErrorKind, ImageRef, Sandbox, SandboxFs, Stdio};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::*;

fn write(fs: &SandboxFs, path: &str, data: &[u8]) -> sbx::runtime::FileStat {
    fs.write_file(path, &mut &data[..])
        .unwrap_or_else(|e| panic!("write {path}: {e}"))
}

fn read(fs: &SandboxFs, path: &str) -> Vec<u8> {
    let mut v = Vec::new();
    fs.read_file(path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .read_to_end(&mut v)
        .expect("read the opened file");
    v
}

fn read_kind(fs: &SandboxFs, path: &str) -> FsErrorKind {
    match fs.read_file(path) {
        Ok(mut f) => {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            panic!("read of {path} succeeded: {s:?}")
        }
        Err(e) => {
            assert!(e.message.contains(path), "{path}: message {:?}", e.message);
            assert_eq!(e.path, path);
            e.kind
        }
    }
}

/// A host file whose content no sandbox can know, removed on drop.
struct HostMarker {
    path: PathBuf,
    content: String,
}

impl HostMarker {
    fn new(path: String) -> HostMarker {
        let content = format!("host secret {} {:?}", std::process::id(), Instant::now());
        std::fs::write(&path, &content).expect("write the host marker");
        HostMarker {
            path: path.into(),
            content,
        }
    }

    fn assert_intact(&self) {
        assert_eq!(
            std::fs::read_to_string(&self.path).expect("the host marker still exists"),
            self.content,
            "host file {} was touched",
            self.path.display()
        );
    }
}

impl Drop for HostMarker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn write_and_read_round_trip_with_parents_and_sandbox_ownership() {
    for (name, image) in images() {
        let sb = spawn(image);
        let fs = sb.fs();
        let st = write(&fs, "/tmp/a/b/c.txt", b"hello\n");
        assert_eq!(st.name, "c.txt", "{name}");
        assert_eq!(st.path, "/tmp/a/b/c.txt", "{name}");
        assert_eq!(st.file_type, FileType::File, "{name}");
        assert_eq!(
            (st.size, st.mode, st.owner, st.group),
            (6, 0o644, 0, 0),
            "{name}"
        );
        assert_eq!(read(&fs, "/tmp/a/b/c.txt"), b"hello\n", "{name}");
        // As the sandbox sees them: owned by its root, the asked-for modes.
        assert_eq!(
            sh_ok(&sb, "stat -c '%u %g %a' /tmp/a/b/c.txt /tmp/a/b /tmp/a"),
            "0 0 644\n0 0 755\n0 0 755\n",
            "{name}"
        );
        assert_eq!(sh_ok(&sb, "cat /tmp/a/b/c.txt"), "hello\n", "{name}");
        // Replacing keeps nothing of the old content, and leaves no temporary file behind.
        write(&fs, "/tmp/a/b/c.txt", b"x");
        assert_eq!(sh_ok(&sb, "cat /tmp/a/b/c.txt"), "x", "{name}");
        assert_eq!(sh_ok(&sb, "ls -A /tmp/a/b"), "c.txt\n", "{name}");
        // `..` resolves physically, inside.
        write(&fs, "/tmp/a/../a/./d.txt", b"dots");
        assert_eq!(sh_ok(&sb, "cat /tmp/a/d.txt"), "dots", "{name}");
        // 10 MB, not all one byte.
        let big: Vec<u8> = (0..10u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let st = write(&fs, "/root/big.bin", &big);
        assert_eq!(st.size, big.len() as u64, "{name}");
        assert!(
            read(&fs, "/root/big.bin") == big,
            "{name}: 10 MB round trip differs"
        );
        assert_eq!(
            sh_ok(&sb, "wc -c < /root/big.bin").trim(),
            "10485760",
            "{name}"
        );
    }
}

#[test]
fn a_failing_reader_leaves_the_target_untouched() {
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ECONNRESET));
            }
            self.0 -= 1;
            buf[0] = b'z';
            Ok(1)
        }
    }
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let fs = sb.fs();
    write(&fs, "/tmp/keep", b"old");
    let e = fs.write_file("/tmp/keep", &mut Failing(3)).unwrap_err();
    assert_eq!(e.kind, FsErrorKind::Io(libc::ECONNRESET), "{e}");
    assert!(e.message.contains("/tmp/keep"), "{e}");
    assert_eq!(read(&fs, "/tmp/keep"), b"old");
    assert_eq!(
        sh_ok(&sb, "ls -A /tmp"),
        "keep\n",
        "temporary file left behind"
    );
}

#[test]
fn write_replaces_a_symlink_instead_of_following_it() {
    let marker = HostMarker::new(format!("/root/.sbx-fs-write-{}", std::process::id()));
    for (name, image) in images() {
        let sb = spawn(image);
        let fs = sb.fs();
        sh_ok(
            &sb,
            &format!(
                "echo keep > /root/target && ln -s /root/target /tmp/link && \
                 ln -s {} /tmp/hostlink",
                marker.path.display()
            ),
        );
        let st = write(&fs, "/tmp/link", b"new");
        assert_eq!(st.file_type, FileType::File, "{name}");
        assert_eq!(fs.stat("/tmp/link").unwrap().file_type, FileType::File);
        assert_eq!(sh_ok(&sb, "cat /root/target"), "keep\n", "{name}");
        assert_eq!(sh_ok(&sb, "cat /tmp/link"), "new", "{name}");
        write(&fs, "/tmp/hostlink", b"overwritten?");
        assert_eq!(sh_ok(&sb, "cat /tmp/hostlink"), "overwritten?", "{name}");
        marker.assert_intact();
    }
}

#[test]
fn symlinks_and_dotdot_resolve_inside_the_sandbox() {
    let pid = std::process::id();
    let marker = HostMarker::new(format!("/root/.sbx-fs-marker-{pid}"));
    let marker_path = marker.path.display().to_string();
    assert!(std::path::Path::new("/etc/hostname").exists());
    assert!(std::path::Path::new("/etc/shadow").exists());
    let host_passwd = std::fs::read("/etc/passwd").unwrap();
    for (name, image) in images() {
        let sb = spawn(image);
        let fs = sb.fs();
        let sandbox_passwd = sh_ok(&sb, "cat /etc/passwd").into_bytes();
        assert_ne!(sandbox_passwd, host_passwd, "{name}: test premise");
        sh_ok(
            &sb,
            &format!(
                "cd /tmp && ln -s /etc/hostname l1 && ln -s ../../../../etc/shadow l2 && \
                 ln -s {marker_path} l3 && ln -s ../../../../../etc/passwd l4 && \
                 ln -s /proc/1/root/etc/passwd l5 && ln -s ../../../../root up && \
                 mkdir -p d && ln -s ../../.. d/loop"
            ),
        );
        // The sandbox has no /etc/hostname, /etc/shadow or host marker: NotFound, never the
        // host's file.
        for p in [
            "/tmp/l1",
            "/tmp/l2",
            "/tmp/l3",
            "/../../../etc/shadow",
            &marker_path,
        ] {
            assert_eq!(read_kind(&fs, p), FsErrorKind::NotFound, "{name}: {p}");
        }
        assert_eq!(read(&fs, "/tmp/l4"), sandbox_passwd, "{name}");
        assert_eq!(read(&fs, "/tmp/d/loop/../../etc/passwd"), sandbox_passwd);
        // /proc magic links are refused even where they would lead back inside: the thread
        // holds no CAP_SYS_PTRACE over the sandbox's user namespace (PermissionDenied), and
        // RESOLVE_NO_MAGICLINKS would refuse them anyway (Invalid). /proc/self names no
        // process of the sandbox's pid namespace for a host thread (NotFound).
        for p in ["/tmp/l5", "/proc/1/root/etc/passwd", "/proc/1/cwd"] {
            let kind = read_kind(&fs, p);
            assert!(
                matches!(kind, FsErrorKind::Invalid | FsErrorKind::PermissionDenied),
                "{name}: {p}: {kind:?}"
            );
        }
        assert_eq!(
            read_kind(&fs, "/proc/self/root/etc/passwd"),
            FsErrorKind::NotFound
        );
        let st = fs.stat("/tmp/l1").unwrap();
        assert_eq!(st.file_type, FileType::Symlink, "{name}");
        assert_eq!(
            st.symlink_target.as_deref(),
            Some("/etc/hostname"),
            "{name}"
        );
        assert_eq!(st.size, "/etc/hostname".len() as u64, "{name}");

        // A write through a symlinked directory lands in the sandbox's /root.
        let inside = format!("/tmp/up/.sbx-fs-marker-{pid}");
        write(&fs, &inside, b"sandbox");
        assert_eq!(
            sh_ok(&sb, &format!("cat /root/.sbx-fs-marker-{pid}")),
            "sandbox",
            "{name}"
        );
        marker.assert_intact();
        let listed: Vec<String> = fs
            .list_dir("/tmp/up")
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(listed, [format!(".sbx-fs-marker-{pid}")], "{name}");
        // A write to a path through `..` stays inside too.
        write(&fs, &format!("/../../root/.sbx-fs-marker-{pid}"), b"again");
        marker.assert_intact();
        assert_eq!(read(&fs, &inside), b"again", "{name}");
    }
}

#[test]
fn list_stat_and_mkdir() {
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let fs = sb.fs();
    fs.mkdir("/tmp/m/n/o", true).unwrap();
    fs.mkdir("/tmp/m/n/o", true)
        .expect("mkdir -p is idempotent");
    fs.mkdir("/tmp/m/n/o/", true).unwrap();
    let st = fs.stat("/tmp/m/n/o").unwrap();
    assert_eq!(
        (st.file_type, st.mode, st.owner, st.group, st.name.as_str()),
        (FileType::Directory, 0o755, 0, 0, "o")
    );
    assert_eq!(sh_ok(&sb, "stat -c '%u %a' /tmp/m/n/o"), "0 755\n");

    let e = fs.mkdir("/tmp/x/y", false).unwrap_err();
    assert_eq!(e.kind, FsErrorKind::NotFound, "{e}");
    assert!(e.message.contains("/tmp/x/y"), "{e}");
    assert_eq!(
        fs.mkdir("/tmp/m", false).unwrap_err().kind,
        FsErrorKind::AlreadyExists
    );
    fs.mkdir("/tmp/m/z", false).unwrap();
    write(&fs, "/tmp/m/file", b"12345");
    sh_ok(
        &sb,
        "ln -s ../elsewhere /tmp/m/link && mkfifo /tmp/m/fifo && touch -d @1700000000 /tmp/m/file",
    );
    let entries = fs.list_dir("/tmp/m/").unwrap();
    let summary: Vec<(&str, FileType, Option<&str>)> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.file_type, e.symlink_target.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            ("fifo", FileType::Other, None),
            ("file", FileType::File, None),
            ("link", FileType::Symlink, Some("../elsewhere")),
            ("n", FileType::Directory, None),
            ("z", FileType::Directory, None),
        ]
    );
    let file = &entries[1];
    assert_eq!((file.path.as_str(), file.size), ("/tmp/m/file", 5));
    assert_eq!(file.modified_time, 1_700_000_000.0);
    // Image files owned by host root are nobody's inside, as the sandbox sees them.
    let passwd = fs.stat("/etc/passwd").unwrap();
    assert_eq!((passwd.owner, passwd.group), (65534, 65534));
    assert_eq!(sh_ok(&sb, "stat -c '%u %g' /etc/passwd"), "65534 65534\n");
    let root = fs.stat("/").unwrap();
    assert_eq!(
        (root.name.as_str(), root.file_type),
        ("/", FileType::Directory)
    );
    // list of a file, stat of nothing.
    assert_eq!(
        fs.list_dir("/tmp/m/file").unwrap_err().kind,
        FsErrorKind::NotADirectory
    );
    assert_eq!(
        fs.stat("/tmp/m/none").unwrap_err().kind,
        FsErrorKind::NotFound
    );
    // A FIFO is not read (that would block): Invalid, at once.
    assert_eq!(read_kind(&fs, "/tmp/m/fifo"), FsErrorKind::Invalid);
}

#[test]
fn remove_files_dirs_and_trees_without_following_symlinks() {
    let pid = std::process::id();
    let host_dir = PathBuf::from(format!("/tmp/sbx-fs-keep-{pid}"));
    std::fs::create_dir_all(&host_dir).unwrap();
    /// Removes the host directory also when an assertion fails.
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = RemoveOnDrop(host_dir.clone());
    let host_file = HostMarker::new(host_dir.join("file").display().to_string());
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let fs = sb.fs();
    sh_ok(
        &sb,
        &format!(
            "mkdir -p /tmp/t/a/b /root/keep {hd} && echo k > /root/keep/file && \
             echo k > {hd}/file && echo x > /tmp/t/a/b/f && \
             ln -s {hd} /tmp/t/a/hostlink && ln -s /root/keep /tmp/t/a/b/keeplink && \
             ln -s /root/keep/file /tmp/t/filelink && mkfifo /tmp/t/fifo",
            hd = host_dir.display()
        ),
    );
    let e = fs.remove("/tmp/t", false).unwrap_err();
    assert_eq!(e.kind, FsErrorKind::DirectoryNotEmpty, "{e}");
    assert!(e.message.contains("/tmp/t"), "{e}");
    // A symlink is removed, not its target.
    fs.remove("/tmp/t/filelink", false).unwrap();
    assert_eq!(sh_ok(&sb, "cat /root/keep/file"), "k\n");
    fs.remove("/tmp/t", true).unwrap();
    assert_eq!(fs.stat("/tmp/t").unwrap_err().kind, FsErrorKind::NotFound);
    assert_eq!(sh_ok(&sb, "cat /root/keep/file"), "k\n");
    assert_eq!(
        sh_ok(&sb, &format!("cat {}/file", host_dir.display())),
        "k\n"
    );
    host_file.assert_intact();

    // Deep and wide trees.
    sh_ok(
        &sb,
        "cd /tmp && mkdir -p deep && cd deep && i=0; while [ $i -lt 300 ]; do mkdir d && cd d; \
         i=$((i+1)); done; touch leaf; cd /tmp && mkdir wide && cd wide && i=0; \
         while [ $i -lt 500 ]; do echo $i > f$i; mkdir g$i; i=$((i+1)); done",
    );
    fs.remove("/tmp/deep", true).unwrap();
    fs.remove("/tmp/wide/", true).unwrap();
    assert_eq!(
        sh_ok(&sb, "ls -A /tmp"),
        format!("{}\n", host_dir.file_name().unwrap().to_str().unwrap())
    );

    // Single files and empty directories; errors.
    write(&fs, "/tmp/f", b"1");
    fs.remove("/tmp/f", false).unwrap();
    fs.mkdir("/tmp/e", false).unwrap();
    fs.remove("/tmp/e", false).unwrap();
    assert_eq!(
        fs.remove("/tmp/f", false).unwrap_err().kind,
        FsErrorKind::NotFound
    );
    assert_eq!(fs.remove("/", true).unwrap_err().kind, FsErrorKind::Invalid);
    assert_eq!(
        fs.remove("/tmp/..", true).unwrap_err().kind,
        FsErrorKind::Invalid
    );
    // Host-owned image files cannot be removed by the sandbox's root.
    assert_eq!(
        fs.remove("/etc/passwd", false).unwrap_err().kind,
        FsErrorKind::PermissionDenied
    );
    assert!(std::path::Path::new(&busybox_rootfs().join("etc/passwd")).exists());
}

#[test]
fn errors_are_typed_and_name_the_path() {
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let fs = sb.fs();
    assert_eq!(read_kind(&fs, "/tmp"), FsErrorKind::IsADirectory);
    assert_eq!(read_kind(&fs, "/etc/passwd/x"), FsErrorKind::NotADirectory);
    assert_eq!(read_kind(&fs, "/nonexistent"), FsErrorKind::NotFound);
    assert_eq!(read_kind(&fs, "tmp/x"), FsErrorKind::Invalid);
    let e = fs.read_file("/tmp/a\0b").unwrap_err();
    assert_eq!(e.kind, FsErrorKind::Invalid, "{e}");
    assert!(e.message.contains(r#""/tmp/a\0b""#), "{e}");
    let kind = |p: &str| fs.write_file(p, &mut &b"data"[..]).unwrap_err().kind;
    assert_eq!(kind("/etc/passwd/x"), FsErrorKind::NotADirectory);
    assert_eq!(kind("/tmp"), FsErrorKind::IsADirectory);
    assert_eq!(kind("/"), FsErrorKind::Invalid);
    assert_eq!(kind("/tmp/dir/"), FsErrorKind::Invalid);
    // Read-only places: a read-only mount, a host-owned image directory and file.
    assert_eq!(
        kind("/proc/sys/kernel/hostname"),
        FsErrorKind::PermissionDenied
    );
    assert_eq!(kind("/etc/passwd"), FsErrorKind::PermissionDenied);
    assert_eq!(kind("/etc/new"), FsErrorKind::PermissionDenied);
    // procfs takes no new files (it answers ENOENT; the API says PermissionDenied).
    assert_eq!(kind("/proc/new"), FsErrorKind::PermissionDenied);
    assert_eq!(
        fs.mkdir("/proc/new/dir", true).unwrap_err().kind,
        FsErrorKind::PermissionDenied
    );
    let e = fs
        .write_file("/proc/sys/kernel/x", &mut &b"1"[..])
        .unwrap_err();
    assert!(e.message.contains("Read-only file system"), "{e}");
    assert_eq!(
        fs.mkdir("/etc/new", true).unwrap_err().kind,
        FsErrorKind::PermissionDenied
    );
    assert_eq!(sh_ok(&sb, "cat /proc/sys/kernel/hostname"), "sandbox\n");
    // No DAC override: a 0600 file of another sandbox user is not readable by sandbox root
    // through this API (it is from inside, with CAP_DAC_OVERRIDE in its user namespace).
    sh_ok(
        &sb,
        "echo s > /tmp/priv && chown 1000:1000 /tmp/priv && chmod 600 /tmp/priv",
    );
    assert_eq!(read_kind(&fs, "/tmp/priv"), FsErrorKind::PermissionDenied);
    let st = fs.stat("/tmp/priv").unwrap();
    assert_eq!((st.owner, st.group, st.mode), (1000, 1000, 0o600));

    let host = spawn(ImageRef::Host);
    let hfs = host.fs();
    for p in ["/usr/sbx-test", "/usr/bin/env", "/usr/lib/sbx/x"] {
        let e = hfs.write_file(p, &mut &b"x"[..]).unwrap_err();
        assert_eq!(e.kind, FsErrorKind::PermissionDenied, "{p}: {e}");
        // The path named is the one that failed: the file, or the parent being created.
        assert!(
            p.starts_with(&e.path) && e.message.contains(&e.path),
            "{p}: {e}"
        );
    }
    assert!(!std::path::Path::new("/usr/sbx-test").exists());
    assert_eq!(
        hfs.remove("/usr/bin/env", false).unwrap_err().kind,
        FsErrorKind::PermissionDenied
    );
    assert!(std::path::Path::new("/usr/bin/env").exists());
}

#[test]
fn reads_show_no_more_than_the_sandbox_itself_sees() {
    // /proc/kallsyms shows real addresses only to openers with CAP_SYSLOG (kernel.kptr_restrict
    // 0 or 1): host root sees them, the sandbox does not, and neither does this API.
    let host_first = std::fs::read_to_string("/proc/kallsyms").unwrap();
    let host_first = host_first.lines().next().unwrap();
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let fs = sb.fs();
    let mut api = String::new();
    fs.read_file("/proc/kallsyms")
        .unwrap()
        .take(4096)
        .read_to_string(&mut api)
        .unwrap();
    let api_first = api.lines().next().unwrap();
    let inside_first = sh_ok(&sb, "head -n 1 /proc/kallsyms");
    assert_eq!(api_first, inside_first.trim_end(), "host: {host_first}");
    assert!(api_first.starts_with("0000000000000000 "), "{api_first}");
    // Root-only files of the kernel stay closed (host root's DAC override does not apply).
    assert_eq!(read_kind(&fs, "/proc/kmsg"), FsErrorKind::PermissionDenied);
}

#[test]
fn a_finished_sandbox_gives_typed_errors() {
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let fs = sb.fs();
    write(&fs, "/tmp/x", b"1");
    sb.kill().unwrap();
    let e = fs.stat("/tmp/x").unwrap_err();
    assert_eq!(e.kind, FsErrorKind::Finished, "{e}");
    assert!(e.message.contains(sb.id()), "{e}");
    assert_eq!(
        fs.write_file("/tmp/y", &mut &b"1"[..]).unwrap_err().kind,
        FsErrorKind::Finished
    );
    let e = sb.tcp_connect(80, Duration::from_millis(100)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    // A handle that outlives the sandbox.
    drop(sb);
    assert_eq!(fs.list_dir("/").unwrap_err().kind, FsErrorKind::Finished);
}

/// Poll `tcp_connect` as a readiness probe does, until it succeeds (at most 10 s).
fn wait_for_port(sb: &Sandbox, port: u16) -> std::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sb.tcp_connect(port, Duration::from_millis(500)) {
            Ok(s) => return s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                assert!(Instant::now() < deadline, "port {port} never opened");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("tcp_connect {port}: {e}"),
        }
    }
}

#[test]
fn tcp_connect_reaches_the_sandbox_and_not_the_host() {
    // A host listener: never reachable from the sandbox's namespace.
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    host.set_nonblocking(true).unwrap();
    let host_port = host.local_addr().unwrap().port();

    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let e = sb.tcp_connect(8080, Duration::from_secs(1)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    // An echo server on 8080 inside.
    let mut spec = ExecSpec::new(["nc", "-l", "-p", "8080", "-e", "cat"]);
    spec.stdin = Stdio::Null;
    let server = sb.exec(spec).unwrap();
    let mut conn = wait_for_port(&sb, 8080);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"ping\n").unwrap();
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping\n");
    drop(conn);
    drop(server);

    let e = sb
        .tcp_connect(host_port, Duration::from_secs(1))
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    match host.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the host listener got a connection: {other:?}"),
    }
    // A zero timeout is refused, not a hang.
    assert_eq!(
        sb.tcp_connect(8080, Duration::ZERO).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
}

#[test]
fn tcp_connect_to_an_http_server_in_the_host_image() {
    let sb = spawn(ImageRef::Host);
    let mut spec = ExecSpec::new([
        "python3",
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        "--directory",
        "/tmp",
        "8081",
    ]);
    spec.stdout = Stdio::Null;
    spec.stderr = Stdio::Null;
    let _server = sb.exec(spec).unwrap();
    sb.fs()
        .write_file("/tmp/hello.txt", &mut &b"from the sandbox"[..])
        .unwrap();
    let mut conn = wait_for_port(&sb, 8081);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET /hello.txt HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
    assert!(reply.ends_with("from the sandbox"), "{reply}");
}
