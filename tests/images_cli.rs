//! `sbx image …` and `sbx snapshot` as a user runs them against a real sbxd: a Dockerfile with
//! ARG/ENV/WORKDIR/COPY/RUN/CMD built from a temp context on the `host` base and run; a rebuild
//! that reuses every step and gives the same id; a changed RUN that re-runs only itself and
//! the steps after it; `image ls/inspect/rm`; a snapshot run from; an OCI layout pulled,
//! built on, exported and checked with `skopeo inspect` and `umoci unpack`. Runs as root; each
//! test starts its own daemon in its own directories and removes what it made.

#[path = "support/registry.rs"]
mod registry;

use registry::{busybox, push, run_tool, skopeo, write_layout_with, Registry, Tar, TempDir};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SBX: &str = env!("CARGO_BIN_EXE_sbx");

/// A sbxd of this test's own (`sbx daemon`), stopped by pid and removed on drop.
struct Daemon {
    root: TempDir,
    child: Child,
}

impl Daemon {
    fn start(name: &str) -> Daemon {
        let root = TempDir::new(&format!("cli-{name}"));
        let log = std::fs::File::create(root.0.join("sbxd.log")).expect("create daemon log");
        let child = Command::new(SBX)
            .arg("daemon")
            .arg("--socket")
            .arg(root.0.join("sbxd.sock"))
            .arg("--state-dir")
            .arg(root.0.join("state"))
            .arg("--run-dir")
            .arg(root.0.join("run"))
            .env("SBX_INIT", env!("CARGO_BIN_EXE_sbx-init"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn sbx daemon");
        let mut d = Daemon { root, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("sbx daemon exited with {st}; log:\n{}", d.log());
            }
            if d.out(&["ls"]).status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "no daemon; log:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.0.join("sbxd.log")).unwrap_or_default()
    }

    fn sbx(&self) -> Command {
        let mut c = Command::new(SBX);
        c.env("SBX_SOCKET", self.root.0.join("sbxd.sock"))
            .env("SBX_STATE_DIR", self.root.0.join("state"))
            .env("SBX_RUN_DIR", self.root.0.join("run"))
            .env("SBX_NO_AUTOSTART", "1")
            .stdin(Stdio::null());
        c
    }

    fn out(&self, args: &[&str]) -> Output {
        self.sbx().args(args).output().expect("run sbx")
    }

    /// `sbx ARGS`, exit 0 asserted; (stdout, stderr).
    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.out(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "sbx {args:?}: stdout={:?} stderr={:?}\ndaemon log tail:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            tail(&self.log())
        );
        (text(&out.stdout), text(&out.stderr))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(out) = self.sbx().args(["ls", "--all", "--json"]).output() {
            if let Ok(serde_json::Value::Array(list)) = serde_json::from_slice(&out.stdout) {
                for s in list {
                    if let Some(id) = s["id"].as_str() {
                        let _ = self.sbx().args(["rm", id]).output();
                    }
                }
            }
        }
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(pid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
}

/// The last line of stdout: the id a command printed.
fn image_id(stdout: &str) -> String {
    let id = stdout.lines().last().unwrap_or_default().trim().to_string();
    assert!(
        id.starts_with("im-") && id.len() == 27,
        "expected an im- id last: {stdout:?}"
    );
    id
}

/// The steps of a build's stderr: (`Step i/n: TEXT`, cached?).
fn steps(stderr: &str) -> Vec<(String, bool)> {
    let lines: Vec<&str> = stderr.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("Step ") {
            let cached = lines.get(i + 1) == Some(&" ---> cached");
            out.push((l.to_string(), cached));
        }
    }
    out
}

fn write(path: &Path, content: &str) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    std::fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

const DOCKERFILE: &str = r#"# a test image on the built-in host base
FROM host
ARG FLAVOR=plain
ENV APP_MODE=test GREETING="two words"
WORKDIR /opt/app
COPY hello.txt /opt/app/hello.txt
COPY src /opt/app/src
RUN echo "built $APP_MODE" > built.txt && \
    echo run-output-$((40 + 2))
RUN echo LAST > last.txt
EXPOSE 8000
CMD ["cat", "/opt/app/built.txt"]
"#;

#[test]
fn build_run_rebuild_and_the_cache() {
    let d = Daemon::start("build");
    let ctx = TempDir::new("build-ctx");
    write(&ctx.0.join("Dockerfile"), DOCKERFILE);
    write(&ctx.0.join("hello.txt"), "hello from the context\n");
    write(&ctx.0.join("src/a.txt"), "file a\n");
    let ctx_s = ctx.0.to_str().expect("utf-8 path");

    // First build: every step runs, RUN output streams, EXPOSE warns, the id comes last.
    let (out, err) = d.ok(&["image", "build", "--tag", "cli-test:1", ctx_s]);
    let id = image_id(&out);
    assert_eq!(out.lines().count(), 1, "only the id on stdout: {out:?}");
    assert!(err.contains("run-output-42"), "RUN output shown: {err}");
    assert!(err.contains("EXPOSE 8000 ignored"), "{err}");
    let first = steps(&err);
    assert!(first.len() >= 8, "a Step line per step: {err}");
    let n = first.len();
    for (i, (line, _)) in first.iter().enumerate() {
        assert!(line.starts_with(&format!("Step {}/{n}: ", i + 1)), "{line}");
    }
    assert!(
        first.iter().any(|(l, c)| l.contains("RUN echo LAST") && !c),
        "{err}"
    );

    // The image runs: COPY (file and directory contents), ENV, WORKDIR, RUN results.
    let (out, _) = d.ok(&[
        "run",
        "--image",
        &id,
        "--",
        "sh",
        "-c",
        "cat hello.txt src/a.txt built.txt last.txt; echo \"$APP_MODE|$GREETING|$(pwd)\"",
    ]);
    assert_eq!(
        out,
        "hello from the context\nfile a\nbuilt test\nLAST\ntest|two words|/opt/app\n"
    );
    // By tag too, and with no CMD the image's CMD runs.
    let (out, _) = d.ok(&["run", "--image", "cli-test:1"]);
    assert_eq!(out, "built test\n");

    // Rebuild: every step cached, the same id.
    let (out, err) = d.ok(&["image", "build", "--tag", "cli-test:1", ctx_s]);
    assert_eq!(image_id(&out), id);
    let again = steps(&err);
    assert_eq!(again.len(), n, "{err}");
    assert!(again.iter().all(|(_, c)| *c), "all cached: {err}");
    assert!(
        !err.contains("run-output-42"),
        "a cached RUN does not run: {err}"
    );

    // Change the last RUN: only it (and the steps after it) run again.
    write(
        &ctx.0.join("Dockerfile"),
        &DOCKERFILE.replace("echo LAST", "echo CHANGED"),
    );
    let (out, err) = d.ok(&["image", "build", ctx_s]);
    let changed_id = image_id(&out);
    assert_ne!(changed_id, id);
    let changed = steps(&err);
    let at = changed
        .iter()
        .position(|(l, _)| l.contains("RUN echo CHANGED"))
        .unwrap_or_else(|| panic!("no changed step: {err}"));
    assert!(
        changed[..at].iter().all(|(_, c)| *c),
        "before: cached: {err}"
    );
    assert!(
        changed[at..].iter().all(|(_, c)| !*c),
        "from it on: run: {err}"
    );
    let (out, _) = d.ok(&["run", "--image", &changed_id, "--", "cat", "last.txt"]);
    assert_eq!(out, "CHANGED\n");

    // A changed COPY source re-runs that COPY and what follows.
    write(&ctx.0.join("hello.txt"), "changed context\n");
    let (_, err) = d.ok(&["image", "build", ctx_s]);
    let s = steps(&err);
    let copy = s
        .iter()
        .position(|(l, _)| l.contains("COPY hello.txt"))
        .unwrap_or_else(|| panic!("no COPY step: {err}"));
    assert!(s[..copy].iter().all(|(_, c)| *c), "{err}");
    assert!(!s[copy].1, "the COPY re-runs: {err}");

    // --json: one BuildEvent per line on stdout, `done` last with the id.
    let (out, _) = d.ok(&["image", "build", "--json", ctx_s]);
    let events: Vec<serde_json::Value> = out.lines().map(json).collect();
    assert!(events.iter().any(|e| e.get("step").is_some()), "{out}");
    let last = events.last().expect("events");
    assert!(
        last["done"]["image"]["id"]
            .as_str()
            .unwrap_or("")
            .starts_with("im-"),
        "{out}"
    );

    // ls / inspect / rm.
    let (out, _) = d.ok(&["image", "ls"]);
    let header = out.lines().next().unwrap_or_default();
    for col in ["ID", "REFERENCES", "SIZE", "CREATED"] {
        assert!(header.contains(col), "{out}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with(&id) && l.contains("cli-test:1")),
        "{out}"
    );
    let (out, _) = d.ok(&["image", "ls", "--json"]);
    let list = json(&out);
    let shown: Vec<&serde_json::Value> = list.as_array().expect("array").iter().collect();
    assert!(shown.iter().any(|i| i["id"] == id.as_str()));
    // A build's untagged intermediate steps are left out (as `docker images` does) unless
    // --all; the final image names its parent.
    let (out, _) = d.ok(&["image", "ls", "--all", "--json"]);
    let all = json(&out);
    let all: Vec<&serde_json::Value> = all.as_array().expect("array").iter().collect();
    assert!(
        all.len() > shown.len(),
        "--all {} vs {}",
        all.len(),
        shown.len()
    );
    let fin = all
        .iter()
        .find(|i| i["id"] == id.as_str())
        .expect("final image");
    let parent = fin["parent"].as_str().expect("a built image has a parent");
    assert!(all.iter().any(|i| i["id"] == parent), "{parent} in --all");
    assert!(!shown.iter().any(|i| i["id"] == parent), "{parent} hidden");
    let (out, _) = d.ok(&["image", "inspect", "cli-test:1"]);
    let info = json(&out);
    assert_eq!(info["id"], id.as_str());
    assert_eq!(info["config"]["working_dir"], "/opt/app");
    assert_eq!(
        info["config"]["cmd"],
        serde_json::json!(["cat", "/opt/app/built.txt"])
    );
    assert!(
        info["config"]["env"]
            .as_array()
            .expect("env")
            .iter()
            .any(|e| e == "GREETING=two words"),
        "{out}"
    );
    d.ok(&["image", "rm", "cli-test:1"]);
    let gone = d.out(&["image", "inspect", "cli-test:1"]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        text(&gone.stderr).contains("not_found"),
        "{}",
        text(&gone.stderr)
    );
    d.ok(&["image", "rm", &changed_id]);
    let gone = d.out(&["image", "inspect", &changed_id]);
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone.stderr));
}

#[test]
fn build_failures_exit_1_and_name_the_cause() {
    let d = Daemon::start("build-errors");
    let ctx = TempDir::new("build-errors-ctx");
    let ctx_s = ctx.0.to_str().expect("utf-8 path");

    // A RUN that fails: its output was shown, the error names the code.
    write(
        &ctx.0.join("Dockerfile"),
        "FROM host\nRUN echo before-failing; exit 3\n",
    );
    let out = d.out(&["image", "build", ctx_s]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("before-failing"), "{err}");
    assert!(err.contains("error: ") && err.contains('3'), "{err}");
    assert!(text(&out.stdout).is_empty(), "no id on failure");

    // An unsupported instruction: refused before anything runs, naming line and text.
    write(&ctx.0.join("Dockerfile"), "FROM host\nLABEL a=b\n");
    let out = d.out(&["image", "build", ctx_s]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("line 2") && err.contains("LABEL a=b"), "{err}");

    // -f names a missing file.
    let out = d.out(&["image", "build", "-f", "/nonexistent/Dockerfile", ctx_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/Dockerfile"));

    // A COPY source missing from the context.
    write(
        &ctx.0.join("Dockerfile"),
        "FROM host\nCOPY missing.txt /x\n",
    );
    let out = d.out(&["image", "build", ctx_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("missing.txt"),
        "{}",
        text(&out.stderr)
    );

    // Usage errors (exit 2): a bad export destination, `run` with neither CMD nor --image.
    let out = d.out(&["image", "export", "host", "/tmp/x"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = d.out(&["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--image"));
    let out = d.out(&["image", "inspect", "im-000000000000000000000000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not_found"));
}

#[test]
fn snapshot_then_run_from_it() {
    let d = Daemon::start("snapshot");
    let (out, _) = d.ok(&["create", "--name", "snap", "--timeout", "2m"]);
    let sb = out.trim().to_string();
    d.ok(&[
        "exec",
        "snap",
        "--",
        "sh",
        "-c",
        "mkdir -p /home/snap && echo snapped > /home/snap/f",
    ]);
    let (out, _) = d.ok(&["snapshot", "snap"]);
    let id = image_id(&out);
    let (out, _) = d.ok(&["run", "--image", &id, "--", "cat", "/home/snap/f"]);
    assert_eq!(out, "snapped\n");
    // The sandbox kept running; a second snapshot by id works too.
    let (out, _) = d.ok(&["snapshot", "--json", &sb]);
    let v = json(&out);
    assert_eq!(v["id"], sb.as_str());
    assert!(
        v["image"].as_str().unwrap_or("").starts_with("im-"),
        "{out}"
    );
    let (out, _) = d.ok(&["image", "inspect", &id]);
    assert!(
        json(&out)["source"].as_str().unwrap_or("").contains(&sb),
        "{out}"
    );
}

/// A busybox image as an OCI layout (tag `1`), with `/etc/base-file`.
fn busybox_layout(dir: &Path) {
    let mut t = Tar::default();
    t.dir("bin/", 0o755).file("bin/busybox", &busybox(), 0o755);
    for applet in ["sh", "cat", "echo", "mkdir", "ls"] {
        t.symlink(&format!("bin/{applet}"), "busybox");
    }
    let layer = t
        .dir("etc/", 0o755)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
        .file("etc/base-file", b"from the base\n", 0o644)
        .dir("tmp/", 0o1777)
        .dir("proc/", 0o555)
        .dir("sys/", 0o555)
        .dir("dev/", 0o755)
        .finish();
    write_layout_with(
        dir,
        "1",
        &[layer],
        serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["sh"]}),
    );
}

#[test]
fn pull_build_on_it_and_export() {
    let d = Daemon::start("export");
    let src = TempDir::new("export-src");
    busybox_layout(&src.0);
    let registry = Registry::start("cli-pull");
    let reference = push(&registry, &src.0, "1", "test/busybox:1");

    // Without a terminal: a plain line per layer, the id last on stdout.
    let (out, err) = d.ok(&["image", "pull", &reference]);
    let base = image_id(&out);
    assert!(
        err.lines()
            .any(|l| l.starts_with("layer sha256:") && l.ends_with(" done")),
        "{err}"
    );
    // Again, as JSON events: the layer is cached, `done` is last.
    let (out, _) = d.ok(&["image", "pull", "--json", &reference]);
    let events: Vec<serde_json::Value> = out.lines().map(json).collect();
    assert!(
        events.iter().any(|e| e["layer_done"]["cached"] == true),
        "{out}"
    );
    assert_eq!(
        events.last().expect("events")["done"]["image"]["id"],
        base.as_str()
    );
    // An OCI layout is imported the same way (a relative path is made absolute).
    let out = d
        .sbx()
        .current_dir(&src.0)
        .args(["image", "pull", "oci:.:1"])
        .output()
        .expect("run sbx");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let imported = image_id(&text(&out.stdout));
    let (out, _) = d.ok(&["image", "inspect", &imported]);
    assert!(
        json(&out)["references"].to_string().contains("oci:"),
        "{out}"
    );

    // Build on it.
    let ctx = TempDir::new("export-ctx");
    write(
        &ctx.0.join("Dockerfile"),
        &format!(
            "FROM {base}\nCOPY data /data\nRUN echo from-run > /etc/run-file\nENV MODE=exported\n\
             CMD [\"cat\", \"/etc/run-file\"]\n"
        ),
    );
    write(&ctx.0.join("data/d.txt"), "copied data\n");
    let (out, _) = d.ok(&["image", "build", "--tag", "exp:1", ctx.0.to_str().unwrap()]);
    let built = image_id(&out);
    let (out, _) = d.ok(&[
        "run",
        "--image",
        &built,
        "--",
        "sh",
        "-c",
        "cat /etc/base-file /data/d.txt /etc/run-file",
    ]);
    assert_eq!(out, "from the base\ncopied data\nfrom-run\n");

    // Export, then read it back with skopeo and umoci.
    let dest = TempDir::new("export-dest");
    let layout = dest.0.join("layout");
    let (out, _) = d.ok(&[
        "image",
        "export",
        "exp:1",
        &format!("oci:{}:v1", layout.display()),
    ]);
    assert!(out.contains("sha256:"), "{out}");
    let inspect = json(&skopeo(&[
        "inspect",
        &format!("oci:{}:v1", layout.display()),
    ]));
    assert_eq!(
        inspect["Layers"].as_array().map(Vec::len),
        Some(3),
        "base + COPY + RUN: {inspect}"
    );
    assert!(
        inspect["Env"]
            .as_array()
            .expect("Env")
            .iter()
            .any(|e| e == "MODE=exported"),
        "{inspect}"
    );
    let bundle: PathBuf = dest.0.join("bundle");
    run_tool(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:v1", layout.display()))
            .arg(&bundle),
    );
    let rootfs = bundle.join("rootfs");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/run-file")).expect("run-file"),
        "from-run\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("data/d.txt")).expect("d.txt"),
        "copied data\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/base-file")).expect("base-file"),
        "from the base\n"
    );

    // An image built on `host` cannot be exported, and says so.
    write(&ctx.0.join("Dockerfile"), "FROM host\nRUN true\n");
    let (out, _) = d.ok(&["image", "build", ctx.0.to_str().unwrap()]);
    let host_built = image_id(&out);
    let out = d.out(&[
        "image",
        "export",
        &host_built,
        &format!("oci:{}:h", layout.display()),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("host"), "{}", text(&out.stderr));
}
