//! Volumes: host directories mounted into sandboxes with id-mapped mounts, so that sandboxes
//! with different uid ranges share files with canonical owners. Runs as root; starts real
//! sandboxes on the busybox rootfs.

mod support;

use sbx::runtime::{BindMount, ExecSpec, ImageRef, RuntimeError, Sandbox, SandboxSpec};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use support::*;

/// A fresh host directory for one test (mode 0755, owned by host root = canonical root).
fn host_dir(name: &str) -> PathBuf {
    let p = test_root().join(format!("vol-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn mount(source: &Path, target: &str, read_only: bool) -> BindMount {
    BindMount {
        source: source.to_path_buf(),
        target: target.into(),
        read_only,
    }
}

fn spawn_with(image: ImageRef, mounts: Vec<BindMount>) -> Sandbox {
    spawn_spec(SandboxSpec {
        image,
        mounts,
        ..Default::default()
    })
}

fn busybox() -> ImageRef {
    ImageRef::Dir(busybox_rootfs())
}

/// Run `sh -c script` as sandbox uid/gid `id`; returns (exit code, stdout, stderr).
fn sh_as(sb: &Sandbox, id: u32, script: &str) -> (i32, String, String) {
    let mut spec = ExecSpec::new(["/bin/sh", "-c", script]);
    spec.uid = id;
    spec.gid = id;
    let (exit, out, err) = sb.exec(spec).expect("exec").output().expect("output");
    (
        exit.code(),
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

fn sh_as_ok(sb: &Sandbox, id: u32, script: &str) -> String {
    let (code, out, err) = sh_as(sb, id, script);
    assert_eq!(code, 0, "{script:?} as {id}: stdout={out:?} stderr={err:?}");
    out
}

/// The host uid sandbox root maps to (first line of init's uid_map).
fn host_root_of(sb: &Sandbox) -> u64 {
    let map = std::fs::read_to_string(format!("/proc/{}/uid_map", sb.init_pid())).unwrap();
    map.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Processes on the host whose mount table mentions `needle` (any mount namespace).
fn processes_mounting(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().into_string().unwrap_or_default();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(mi) = std::fs::read_to_string(e.path().join("mountinfo")) {
            if mi.contains(needle) {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn two_sandboxes_share_a_volume_with_canonical_owners() {
    let src = host_dir("shared");
    let needle = src.to_str().unwrap().to_string();
    let a = spawn_with(busybox(), vec![mount(&src, "/data", false)]);
    let b = spawn_with(busybox(), vec![mount(&src, "/srv/shared/data", false)]);
    assert_ne!(host_root_of(&a), host_root_of(&b), "the two uid ranges");

    // The volume is an id-mapped mount inside; the host's own table never shows it.
    let mi = sh_ok(&a, "grep ' /data ' /proc/self/mountinfo");
    assert!(mi.contains("idmapped"), "{mi}");
    assert!(mi.contains("nosuid") && mi.contains("nodev"), "{mi}");
    assert!(host_mounts_with(&needle).is_empty());
    assert!(!processes_mounting(&needle).is_empty(), "check sees mounts");

    // A writes as its root and as uid 1000.
    sh_ok(
        &a,
        "echo root-a > /data/by-root && mkdir /data/u && chown 1000:1000 /data/u",
    );
    sh_as_ok(&a, 1000, "echo user-a > /data/u/by-user");

    // B, with another uid range, sees the same owners and can append as each of them.
    assert_eq!(
        sh_ok(&b, "stat -c %u:%g /srv/shared/data/by-root").trim(),
        "0:0"
    );
    assert_eq!(
        sh_ok(&b, "stat -c %u:%g /srv/shared/data/u/by-user").trim(),
        "1000:1000"
    );
    sh_ok(&b, "echo root-b >> /srv/shared/data/by-root");
    sh_as_ok(&b, 1000, "echo user-b >> /srv/shared/data/u/by-user");
    // uid 1000 of B may not write root's file (DAC works on the mapped owners).
    let (code, _, err) = sh_as(&b, 1000, "echo no >> /srv/shared/data/by-root");
    assert_ne!(code, 0);
    assert!(err.contains("Permission denied"), "{err}");
    assert_eq!(
        sh_ok(&a, "cat /data/by-root /data/u/by-user"),
        "root-a\nroot-b\nuser-a\nuser-b\n"
    );

    // On the host the owners are canonical: 0 and 1000, not either sandbox's range.
    let f = std::fs::metadata(src.join("by-root")).unwrap();
    assert_eq!((f.uid(), f.gid()), (0, 0));
    let f = std::fs::metadata(src.join("u/by-user")).unwrap();
    assert_eq!((f.uid(), f.gid()), (1000, 1000));
    let d = std::fs::metadata(src.join("u")).unwrap();
    assert_eq!((d.uid(), d.gid()), (1000, 1000));
    assert_eq!(
        std::fs::read_to_string(src.join("u/by-user")).unwrap(),
        "user-a\nuser-b\n"
    );

    // The mount point made in B's writable layer belongs to B's root.
    assert_eq!(
        sh_ok(&b, "stat -c %u /srv/shared && stat -c %u /srv").trim(),
        "0\n0"
    );

    let pids = [a.init_pid(), b.init_pid()];
    a.destroy().unwrap();
    b.destroy().unwrap();
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "init {pid}");
    }
    assert!(host_mounts_with(&needle).is_empty());
    let left = processes_mounting(&needle);
    assert!(left.is_empty(), "processes still mounting it: {left:?}");
    std::fs::remove_dir_all(&src).unwrap();
}

#[test]
fn a_read_only_volume_refuses_writes() {
    let src = host_dir("ro");
    std::fs::write(src.join("existing"), "keep\n").unwrap();
    let rw = host_dir("rw-beside-ro");
    let sb = spawn_with(
        busybox(),
        vec![mount(&src, "/ro", true), mount(&rw, "/rw", false)],
    );
    assert_eq!(sh_ok(&sb, "cat /ro/existing"), "keep\n");
    for script in ["echo x > /ro/new", "echo x >> /ro/existing", "mkdir /ro/d"] {
        let (code, _, err) = sh(&sb, script);
        assert_ne!(code, 0, "{script}");
        assert!(err.contains("Read-only file system"), "{script}: {err}");
    }
    // Sandbox root cannot lift it (no CAP_SYS_ADMIN, and seccomp denies mount).
    let (code, _, _) = sh(&sb, "mount -o remount,rw /ro");
    assert_ne!(code, 0);
    let (code, _, err) = sh(&sb, "echo x > /ro/new");
    assert_ne!(code, 0, "{err}");
    // The other volume stays writable.
    sh_ok(&sb, "echo y > /rw/new");
    sb.destroy().unwrap();
    assert!(!src.join("new").exists());
    assert_eq!(
        std::fs::read_to_string(src.join("existing")).unwrap(),
        "keep\n"
    );
    assert_eq!(std::fs::read_to_string(rw.join("new")).unwrap(), "y\n");
    std::fs::remove_dir_all(&src).unwrap();
    std::fs::remove_dir_all(&rw).unwrap();
}

#[test]
fn image_symlinks_cannot_lead_a_mount_point_to_the_host() {
    // An image whose /link points at /etc and /up climbs with '..' towards the host's /etc:
    // the mount points must land in the sandbox's own /etc, never in the host's.
    let root = test_root().join(format!("vol-evil-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(busybox_rootfs())
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success());
    std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc", root.join("up")).unwrap();
    std::os::unix::fs::symlink("/proc", root.join("p")).unwrap();
    std::os::unix::fs::symlink("/", root.join("top")).unwrap();
    let src = host_dir("evil");
    std::fs::write(src.join("marker"), "vol\n").unwrap();
    let name_a = format!("sbx-vol-a-{}", std::process::id());
    let name_b = format!("sbx-vol-b-{}", std::process::id());
    let sb = spawn_with(
        ImageRef::Dir(root.clone()),
        vec![
            mount(&src, &format!("/link/{name_a}"), false),
            mount(&src, &format!("/up/{name_b}/deeper"), true),
        ],
    );
    assert_eq!(sh_ok(&sb, &format!("cat /etc/{name_a}/marker")), "vol\n");
    assert_eq!(
        sh_ok(&sb, &format!("cat /etc/{name_b}/deeper/marker")),
        "vol\n"
    );
    for n in [&name_a, &name_b] {
        assert!(!Path::new("/etc").join(n).exists(), "host /etc/{n} created");
        // Made in the writable layer, not in the image directory.
        assert!(!root.join("etc").join(n).exists(), "image etc/{n} created");
    }
    let etc_mounts = host_mounts_with(&name_a);
    assert!(etc_mounts.is_empty(), "{etc_mounts:?}");
    sb.destroy().unwrap();

    // Targets that a symlink leads to /proc, or to the root itself, are refused at setup.
    for (target, want) in [
        ("/p/vol".to_string(), "under /proc, /sys or /dev"),
        ("/top".to_string(), "resolves to the sandbox's /"),
    ] {
        let err = Sandbox::spawn(
            &config(),
            SandboxSpec {
                image: ImageRef::Dir(root.clone()),
                mounts: vec![mount(&src, &target, false)],
                ..Default::default()
            },
        )
        .err()
        .unwrap_or_else(|| panic!("{target}: spawn succeeded"));
        let msg = err.to_string();
        assert!(matches!(err, RuntimeError::Setup { .. }), "{target}: {msg}");
        assert!(
            msg.contains(&target) && msg.contains(want),
            "{target}: {msg}"
        );
    }
    assert!(!Path::new("/proc/vol").exists());
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&src).unwrap();
}

#[test]
fn bad_mounts_are_refused_before_anything_starts() {
    let src = host_dir("bad");
    let file = src.join("a-file");
    std::fs::write(&file, "").unwrap();
    let missing = src.join("missing");
    let cases: Vec<(Vec<BindMount>, &str)> = vec![
        (vec![mount(&src, "data", false)], "data"),
        (vec![mount(&src, "/", false)], "/"),
        (vec![mount(&src, "//.", false)], "//."),
        (vec![mount(&src, "/proc/x", false)], "/proc/x"),
        (vec![mount(&src, "/sys", false)], "/sys"),
        (vec![mount(&src, "/./dev/shm", false)], "/./dev/shm"),
        (vec![mount(&src, "/a/../etc", false)], "/a/../etc"),
        (
            vec![mount(&src, "/a", false), mount(&src, "/a/b", false)],
            "/a/b",
        ),
        (
            vec![mount(&src, "/x/y", false), mount(&src, "/x//y/", false)],
            "/x//y/",
        ),
        (vec![mount(Path::new("rel"), "/a", false)], "rel"),
        (
            vec![mount(&missing, "/a", false)],
            missing.to_str().unwrap(),
        ),
        (vec![mount(&file, "/a", false)], file.to_str().unwrap()),
    ];
    for (i, (mounts, value)) in cases.into_iter().enumerate() {
        let id = format!("vol-bad-{}-{i}", std::process::id());
        let err = Sandbox::spawn(
            &config(),
            SandboxSpec {
                id: Some(id.clone()),
                image: busybox(),
                mounts,
                ..Default::default()
            },
        )
        .err()
        .unwrap_or_else(|| panic!("case {i} ({value}) was accepted"));
        match &err {
            RuntimeError::Invalid {
                field, value: v, ..
            } => {
                assert_eq!(*field, "mounts", "case {i}: {err}");
                assert_eq!(v, value, "case {i}: {err}");
            }
            other => panic!("case {i}: not Invalid: {other}"),
        }
        assert!(!Sandbox::list(&config()).contains(&id), "case {i}");
        assert!(!config().state_dir.join("sandboxes").join(&id).exists());
    }
    std::fs::remove_dir_all(&src).unwrap();
}

#[test]
fn a_filesystem_without_idmapped_mounts_fails_the_spawn_naming_it() {
    // ramfs has no id-mapped mount support: no silent fallback to a plain bind.
    let src = host_dir("ramfs");
    let s = src.to_str().unwrap();
    run(&["mount", "-t", "ramfs", "sbx-vol-test", s]);
    let ramfs = HostMount(s.to_string());
    let id = format!("vol-ramfs-{}", std::process::id());
    let res = Sandbox::spawn(
        &config(),
        SandboxSpec {
            id: Some(id.clone()),
            image: busybox(),
            mounts: vec![mount(&src, "/data", false)],
            ..Default::default()
        },
    );
    drop(ramfs);
    assert!(host_mounts_with(s).is_empty(), "ramfs unmounted");
    let err = res.err().expect("spawn on ramfs succeeded");
    let msg = err.to_string();
    assert!(matches!(err, RuntimeError::Setup { .. }), "{msg}");
    assert!(msg.contains(src.to_str().unwrap()), "{msg}");
    assert!(msg.contains("ramfs"), "{msg}");
    assert!(msg.contains("id-mapped"), "{msg}");
    // The failed spawn left nothing behind.
    assert!(!Sandbox::list(&config()).contains(&id));
    assert!(!config().state_dir.join("sandboxes").join(&id).exists());
    assert!(cgroup_dirs(&id).is_empty());
    std::fs::remove_dir_all(&src).unwrap();
}

/// Runs a command that must succeed (mount, umount).
fn run(args: &[&str]) {
    let st = std::process::Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap();
    assert!(st.success(), "{args:?}");
}

/// Unmounts a host mount made by a test, also when the test panics.
struct HostMount(String);

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn host_mount_events_do_not_reach_a_volume() {
    // A volume whose source is a shared mount (systemd makes / shared): a mount the host makes
    // below it later must not show up in the sandbox (the clone is made private).
    let src = host_dir("shared-mount");
    std::fs::create_dir(src.join("sub")).unwrap();
    let s = src.to_str().unwrap().to_string();
    let sub = format!("{s}/sub");
    run(&["mount", "--bind", &s, &s]);
    let outer = HostMount(s.clone());
    run(&["mount", "--make-shared", &s]);
    let sb = spawn_with(busybox(), vec![mount(&src, "/data", false)]);
    run(&["mount", "-t", "tmpfs", "sbx-vol-late", &sub]);
    let inner = HostMount(sub.clone());
    std::fs::write(src.join("sub/late"), "x").unwrap();
    assert!(
        host_mounts_with("sbx-vol-late").len() == 1,
        "the host has it"
    );
    assert_eq!(sh_ok(&sb, "ls -A /data/sub"), "");
    assert_eq!(sh(&sb, "grep sbx-vol-late /proc/self/mountinfo").1, "");
    drop(inner);
    drop(outer);
    sb.destroy().unwrap();
    assert!(host_mounts_with(&s).is_empty());
    std::fs::remove_dir_all(&src).unwrap();
}

#[test]
fn the_host_image_takes_volumes_and_its_read_only_binds_stay_read_only() {
    let src = host_dir("host-image");
    let sb = spawn_with(ImageRef::Host, vec![mount(&src, "/mnt/work", false)]);
    sh_ok(&sb, "python3 -c \"open('/mnt/work/py', 'w').write('ok')\"");
    let f = std::fs::metadata(src.join("py")).unwrap();
    assert_eq!((f.uid(), f.gid()), (0, 0));
    sb.destroy().unwrap();

    // A missing target in the host's /usr (a read-only bind) cannot be created: the spawn
    // fails naming it, and the host's /usr is untouched.
    let name = format!("sbx-vol-{}", std::process::id());
    let target = format!("/usr/{name}");
    let err = Sandbox::spawn(
        &config(),
        SandboxSpec {
            mounts: vec![mount(&src, &target, false)],
            ..Default::default()
        },
    )
    .err()
    .expect("a mount point in /usr was created");
    let msg = err.to_string();
    assert!(msg.contains(&target) && msg.contains("EROFS"), "{msg}");
    assert!(!Path::new("/usr").join(&name).exists());
    std::fs::remove_dir_all(&src).unwrap();
}
