//! `sbx`: the command line for sbxd. Every command except `daemon` is a call (or a few) through
//! the client library [`sbx::client`]; when no daemon answers on the socket, the CLI starts one
//! in the background (unless `--no-autostart` or `SBX_NO_AUTOSTART=1`).
//!
//! Exit codes: 0 success; 1 an error the daemon reported (`error: <code>: <message>` on stderr)
//! or no daemon; 2 a usage error (clap's, and bad values found after parsing); `run` and `exec`
//! exit with the command's code (128+N on signal N, 124 when a timeout fired).

use clap::builder::FalseyValueParser;
use clap::{Args, Parser, Subcommand};
use sbx::api::{
    self, CreateSandbox, EndReason, ExecRequest, FileInfo, FileType, Probe, PtySize, SecretSource,
    VolumeMount,
};
use sbx::client::{
    self, BuildEvent, Client, Image, ImageInfo, PullEvent, Sandbox, StreamReader, StreamWriter,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const EXAMPLES: &str = "\
Examples:
  sbx run -- python3 -c \"print('hello')\"
  sbx create --name web --timeout 10m --probe-tcp 8000 -- python3 -m http.server 8000
  sbx wait-ready web && sbx exec web -- ls -l /tmp
  sbx ls --json
  sbx terminate --wait web
  sbx image build --tag app:dev . && sbx run --image app:dev -- ./test.sh

With no daemon on the socket, sbx starts one (log: <state-dir>/sbxd.log) unless --no-autostart.";

#[derive(Parser)]
#[command(
    name = "sbx",
    version,
    about = "Run untrusted code in fast, isolated Linux sandboxes (a client of sbxd)",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args)]
struct Global {
    /// The daemon's socket.
    #[arg(long, global = true, help_heading = "Global options", env = "SBX_SOCKET", default_value = api::DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
    /// Print JSON (output streamed from sandboxes stays raw bytes).
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    /// Fail instead of starting sbxd when no daemon answers on the socket.
    #[arg(long, global = true, help_heading = "Global options", env = "SBX_NO_AUTOSTART", value_parser = FalseyValueParser::new())]
    no_autostart: bool,
    /// The daemon's persistent state (images, layers, volumes, secrets, metadata).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SBX_STATE_DIR",
        default_value = "/var/lib/sbx",
        value_name = "DIR"
    )]
    state_dir: PathBuf,
    /// The daemon's runtime files (per-sandbox sockets and mounts).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SBX_RUN_DIR",
        default_value = "/run/sbx",
        value_name = "DIR"
    )]
    run_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run sbxd in the foreground (until SIGINT or SIGTERM).
    #[command(
        after_help = "Example:\n  sbx daemon --socket /run/sbx/sbxd.sock --state-dir /var/lib/sbx"
    )]
    Daemon,
    /// Run CMD in a new sandbox, stream its output, exit with its code, remove the sandbox.
    #[command(
        after_help = "Examples:\n  sbx run -- python3 -c \"print('hello')\"\n  \
        echo data | sbx run -i --image dir:/srv/rootfs -v cache:/cache -- sh -c 'cat > /cache/x'\n  \
        sbx run --image app:dev           # runs the image's ENTRYPOINT/CMD\n\n\
        Ctrl-C or SIGTERM removes the sandbox and exits 130 / 143; a fired --timeout exits 124."
    )]
    Run(Box<RunArgs>),
    /// Create a sandbox and print its id (it runs ENTRYPOINT, or stays up until its timeout).
    #[command(
        after_help = "Example:\n  sbx create --name web --tag team=ml --timeout 1h --probe-tcp 8000 -- python3 -m http.server 8000"
    )]
    Create(Box<CreateArgs>),
    /// Run CMD in a running sandbox, stream its output, exit with its code.
    #[command(
        after_help = "Examples:\n  sbx exec web -- ls -l /tmp\n  sbx exec -it web -- sh\n\n\
        Exit code: the command's; 128+N when signal N killed it; 124 when --timeout fired."
    )]
    Exec(Box<ExecArgs>),
    /// Wait until the sandbox's readiness probe succeeds (exit 1 with `timeout` if it does not).
    #[command(
        name = "wait-ready",
        after_help = "Example:\n  sbx wait-ready --timeout 30s web"
    )]
    WaitReady(WaitReadyArgs),
    /// Wait for the sandbox to finish and print its returncode (124 timeout, 137 terminated).
    #[command(after_help = "Example:\n  sbx wait web")]
    Wait(TargetArgs),
    /// Print the sandbox's returncode, or nothing while it runs.
    #[command(after_help = "Example:\n  [ -z \"$(sbx poll web)\" ] && echo still running")]
    Poll(TargetArgs),
    /// Stop the sandbox (idempotent); with --wait print its returncode (137).
    #[command(after_help = "Example:\n  sbx terminate --wait web")]
    Terminate(TerminateArgs),
    /// Print the entrypoint's output (stdout to stdout, stderr to stderr).
    #[command(after_help = "Examples:\n  sbx logs web\n  sbx logs -f web\n\n\
        Without -f: what the sandbox has written so far. With -f: follow until the output ends.")]
    Logs(LogsArgs),
    /// List sandboxes (running ones unless --all), newest first.
    #[command(
        after_help = "Examples:\n  sbx ls --app default --tag team=ml\n  sbx ls --all --json"
    )]
    Ls(LsArgs),
    /// Print a sandbox as JSON: config, status, events with timestamps, returncode, end reason.
    #[command(after_help = "Example:\n  sbx inspect web")]
    Inspect(TargetArgs),
    /// Replace the sandbox's tags (no K=V clears them).
    #[command(after_help = "Example:\n  sbx tag web team=ml stage=prod")]
    Tag(TagArgs),
    /// Remove sandboxes: stop them if running, forget their records and output.
    #[command(after_help = "Example:\n  sbx rm web sb-0123456789abcdefABCDEF")]
    Rm(RmArgs),
    /// Manage named secrets (environment variables given to sandboxes with --secret).
    #[command(
        subcommand,
        after_help = "Examples:\n  sbx secret create openai OPENAI_API_KEY=sk-...\n  sbx run --secret openai -- env"
    )]
    Secret(SecretCmd),
    /// Manage named volumes (created on first use with -v NAME:/PATH).
    #[command(
        subcommand,
        after_help = "Examples:\n  sbx volume ls\n  sbx volume rm cache"
    )]
    Volume(VolumeCmd),
    /// Read, write and list files inside a running sandbox.
    #[command(
        subcommand,
        after_help = "Examples:\n  echo hi | sbx fs write web /tmp/x\n  sbx fs read web /tmp/x"
    )]
    Fs(FsCmd),
    /// Build, pull, list, inspect, remove and export images in sbxd's store.
    #[command(subcommand, after_help = IMAGE_EXAMPLES)]
    Image(ImageCmd),
    /// Save a sandbox's whole filesystem as a new image and print its id (im-…).
    #[command(after_help = "Examples:\n  \
        sbx create --name dev --timeout 1h\n  \
        sbx exec dev -- sh -c 'echo tuned > /etc/app.conf'\n  \
        img=$(sbx snapshot dev)\n  \
        sbx run --image \"$img\" -- cat /etc/app.conf\n\n\
        The sandbox keeps running; the image holds its image layers plus everything written since.")]
    Snapshot(TargetArgs),
    /// Print the versions of sbx and (when one answers) sbxd.
    #[command(after_help = "Example:\n  sbx version --json")]
    Version,
}

const IMAGE_EXAMPLES: &str = "\
Examples:
  sbx image build --tag app:dev .                 # ./Dockerfile, context .
  sbx image build -f ci/Dockerfile --build-arg PY=3.12 --no-cache ci/
  sbx image pull 127.0.0.1:5000/team/busybox:1
  sbx image ls
  sbx run --image app:dev -- pytest -q              # or --image im-…
  sbx image export app:dev oci:/srv/layouts/app:dev
  sbx image rm app:dev

Images live in sbxd's store (<state-dir>/images). A build caches every step by its parent and
itself: rebuilding an unchanged Dockerfile reuses every step, and a change re-runs that step and
the ones after it.";

#[derive(Subcommand)]
enum ImageCmd {
    /// Pull an image from a registry (or import an OCI layout or docker-archive) into the
    /// store; print its id (im-…).
    #[command(after_help = "Examples:\n  \
        sbx image pull 127.0.0.1:5000/team/busybox:1\n  \
        sbx image pull oci:./layout:latest\n  \
        sbx image pull --json docker-archive:/tmp/app.tar   # one JSON event per line\n\n\
        Progress goes to stderr (bars on a terminal, else `layer sha256:… done|cached`); the id to stdout.")]
    Pull {
        /// `[REGISTRY/]REPO[:TAG|@sha256:…]`, `oci:PATH[:TAG]` or `docker-archive:PATH`.
        #[arg(value_name = "REF")]
        reference: String,
    },
    /// List the images in the store, newest first. A build's untagged intermediate steps (an
    /// untagged image another image was built from) are left out unless --all.
    #[command(after_help = "Examples:\n  sbx image ls\n  sbx image ls --json")]
    Ls {
        /// Also the untagged intermediate images of builds.
        #[arg(short, long)]
        all: bool,
    },
    /// Print an image as JSON: id, references, source, layers, config (env, entrypoint, cmd…).
    #[command(
        after_help = "Examples:\n  sbx image inspect app:dev\n  sbx image inspect im-0123456789abcdef01234567"
    )]
    Inspect {
        /// An `im-…` id or a reference the store has.
        #[arg(value_name = "REF")]
        reference: String,
    },
    /// Remove images: a reference removes that name (and the image when none is left), an id
    /// the image and all its names. Refused while a running sandbox uses the image.
    #[command(after_help = "Example:\n  sbx image rm app:dev im-0123456789abcdef01234567")]
    Rm {
        #[arg(required = true, value_name = "REF")]
        references: Vec<String>,
    },
    /// Build an image from a Dockerfile and a context directory; print its id (im-…).
    #[command(after_help = "Examples:\n  \
        sbx image build .\n  \
        sbx image build -f docker/Dockerfile.ci --tag app:ci --build-arg VERSION=1.2 .\n  \
        img=$(sbx image build -q .) && sbx run --image \"$img\" -- make test\n\n\
        Supported: FROM (one stage; `host` is the built-in host image), RUN, ENV, WORKDIR, COPY,\n\
        USER, CMD, ENTRYPOINT, ARG; EXPOSE is ignored (with a warning). Each step prints\n\
        `Step i/n: …` and ` ---> cached` or its RUN output; a failing step exits 1.")]
    Build(BuildArgs),
    /// Write an image into an OCI image layout (created, or added to); images built on `host`
    /// cannot be exported.
    #[command(after_help = "Examples:\n  \
        sbx image export app:dev oci:/srv/layouts/app:dev\n  \
        skopeo inspect oci:/srv/layouts/app:dev")]
    Export {
        /// An `im-…` id or a reference the store has.
        #[arg(value_name = "REF")]
        reference: String,
        /// `oci:PATH[:TAG]` (TAG defaults to `latest`).
        #[arg(value_name = "oci:PATH[:TAG]")]
        destination: String,
    },
}

#[derive(Args)]
struct BuildArgs {
    /// The Dockerfile [default: CONTEXT/Dockerfile].
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    file: Option<PathBuf>,
    /// Name the result in the store (`app:dev`); usable as --image.
    #[arg(long, value_name = "NAME")]
    tag: Option<String>,
    /// A value for an ARG (repeatable).
    #[arg(long = "build-arg", value_name = "K=V", value_parser = parse_env)]
    build_args: Vec<(String, String)>,
    /// Run every step, even the cached ones.
    #[arg(long)]
    no_cache: bool,
    /// Print only the image id (no step lines, no RUN output).
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The directory COPY sources are relative to.
    #[arg(value_name = "CONTEXT")]
    context: PathBuf,
}

/// Options shared by `run` and `create`.
#[derive(Args)]
struct CreateOpts {
    /// Image: `host` (the host's /usr read-only, a minimal /etc; the default), `dir:/abs/rootfs`,
    /// `oci:/abs/layout[:TAG]`, `docker-archive:/abs/file.tar`, `im-…`, or a registry reference
    /// such as `127.0.0.1:5000/team/app:1` or `python:3.13-slim` (pulled once into sbxd's store).
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// App the sandbox belongs to (names are unique per app) [default: default].
    #[arg(long, value_name = "APP", value_parser = parse_name)]
    app: Option<String>,
    /// Name, unique among the app's running sandboxes.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    name: Option<String>,
    /// A tag (repeatable).
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_kv)]
    tags: Vec<(String, String)>,
    /// Lifetime (`10`, `10s`, `5m`, `2h`; default 5m); reaching it ends the sandbox with 124.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    timeout: Option<u64>,
    /// End the sandbox after DUR with no exec running and no stdin written.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    idle_timeout: Option<u64>,
    /// Working directory inside the sandbox (absolute).
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Environment variable (repeatable; wins over secrets).
    #[arg(short = 'e', long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// A named secret's variables (repeatable; see `sbx secret create`).
    #[arg(long = "secret", value_name = "NAME", value_parser = parse_name)]
    secrets: Vec<String>,
    /// Mount a named volume (created on first use) at PATH; `:ro` for read-only (repeatable).
    #[arg(short = 'v', long = "volume", value_name = "NAME:/PATH[:ro]", value_parser = parse_volume)]
    volumes: Vec<VolumeMount>,
    /// CPU limit in cores, fractions allowed (0.5).
    #[arg(long, value_name = "CORES")]
    cpu: Option<f64>,
    /// Memory limit in MiB (no swap beyond it).
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// Most processes (and threads) at once.
    #[arg(long, value_name = "N")]
    pids: Option<u64>,
    /// Readiness probe: ready once a TCP connect to PORT inside the sandbox succeeds.
    #[arg(long, value_name = "PORT", conflicts_with = "probe_exec")]
    probe_tcp: Option<u16>,
    /// Readiness probe: ready once this command exits 0 (split like a shell: quotes, backslash).
    #[arg(long, value_name = "'CMD ARG...'", value_parser = parse_words)]
    probe_exec: Option<Words>,
    /// How often the probe tries, milliseconds [default: 100].
    #[arg(long, value_name = "MS")]
    probe_interval: Option<u64>,
    /// Seccomp profile: `default`, `unconfined` or a path to an OCI seccomp JSON file.
    #[arg(long, value_name = "PROFILE")]
    seccomp: Option<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    create: CreateOpts,
    /// Pass this process's stdin to CMD.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give CMD a terminal (stderr merged into stdout).
    #[arg(short = 't', long)]
    tty: bool,
    /// The command and its arguments; none with --image: the image's Entrypoint + Cmd.
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    create: CreateOpts,
    /// The entrypoint and its arguments; none: the sandbox idles until its timeout or terminate.
    #[arg(trailing_var_arg = true, value_name = "ENTRYPOINT")]
    entrypoint: Vec<String>,
}

/// Which sandbox: an id, or the name of a sandbox in `--app`.
#[derive(Args)]
struct TargetArgs {
    /// The app NAME is looked up in.
    #[arg(long, value_name = "APP", default_value = api::DEFAULT_APP, value_parser = parse_name)]
    app: String,
    /// A sandbox id (`sb-…`) or the name of a running sandbox in --app.
    #[arg(value_name = "ID|NAME", value_parser = parse_target)]
    target: Target,
}

#[derive(Args)]
struct ExecArgs {
    /// Pass this process's stdin to CMD.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give CMD a terminal (stderr merged into stdout).
    #[arg(short = 't', long)]
    tty: bool,
    /// Kill CMD after DUR (`10`, `10s`, `5m`, `2h`); the exit code is then 124.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    timeout: Option<u64>,
    /// Working directory (absolute) [default: the sandbox's].
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// A named secret's variables (repeatable).
    #[arg(long = "secret", value_name = "NAME", value_parser = parse_name)]
    secrets: Vec<String>,
    #[command(flatten)]
    target: TargetArgs,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Args)]
struct WaitReadyArgs {
    /// Give up after DUR (exit 1, `error: timeout: …`).
    #[arg(long, value_name = "DUR", default_value = "300", value_parser = parse_duration)]
    timeout: u64,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Args)]
struct TerminateArgs {
    /// Return once it has finished and print its returncode.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Args)]
struct LogsArgs {
    /// Follow the output until it ends (the sandbox finished).
    #[arg(short = 'f', long)]
    follow: bool,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Args)]
struct LsArgs {
    /// Only this app's sandboxes [default: every app].
    #[arg(long, value_name = "APP", value_parser = parse_name)]
    app: Option<String>,
    /// Only sandboxes with this tag (repeatable; all must match).
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_kv)]
    tags: Vec<(String, String)>,
    /// Finished sandboxes too.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct TagArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The new tags (replacing all of the old ones).
    #[arg(value_name = "K=V", value_parser = parse_kv)]
    tags: Vec<(String, String)>,
}

#[derive(Args)]
struct RmArgs {
    /// The app NAMEs are looked up in.
    #[arg(long, value_name = "APP", default_value = api::DEFAULT_APP, value_parser = parse_name)]
    app: String,
    /// Sandbox ids or names.
    #[arg(required = true, value_name = "ID|NAME", value_parser = parse_target)]
    targets: Vec<Target>,
}

#[derive(Subcommand)]
enum SecretCmd {
    /// Create a secret holding environment variables.
    #[command(after_help = "Example:\n  sbx secret create db PGUSER=app PGPASSWORD=hunter2")]
    Create {
        /// Replace a secret of that name instead of failing with `already_exists`.
        #[arg(long)]
        overwrite: bool,
        #[arg(value_name = "NAME", value_parser = parse_name)]
        name: String,
        #[arg(required = true, value_name = "K=V", value_parser = parse_env)]
        env: Vec<(String, String)>,
    },
    /// List secrets (names and keys, never the values).
    #[command(after_help = "Example:\n  sbx secret ls")]
    Ls,
    /// Delete a secret.
    #[command(after_help = "Example:\n  sbx secret rm db")]
    Rm {
        #[arg(value_name = "NAME", value_parser = parse_name)]
        name: String,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// List volumes and the running sandboxes that mount them.
    #[command(after_help = "Example:\n  sbx volume ls")]
    Ls,
    /// Delete a volume and its files (refused while a running sandbox mounts it).
    #[command(after_help = "Example:\n  sbx volume rm cache")]
    Rm {
        #[arg(value_name = "NAME", value_parser = parse_name)]
        name: String,
    },
}

#[derive(Args)]
struct FsPath {
    #[command(flatten)]
    target: TargetArgs,
    /// An absolute path inside the sandbox.
    #[arg(value_name = "PATH")]
    path: String,
}

#[derive(Subcommand)]
enum FsCmd {
    /// Write the file's bytes to stdout.
    #[command(after_help = "Example:\n  sbx fs read web /etc/os-release")]
    Read(FsPath),
    /// Replace the file with stdin (creates parent directories; mode 0644).
    #[command(after_help = "Example:\n  sbx fs write web /app/main.py < main.py")]
    Write(FsPath),
    /// List a directory.
    #[command(after_help = "Example:\n  sbx fs ls web /tmp")]
    Ls(FsPath),
    /// Describe a path (a final symlink itself, not its target).
    #[command(after_help = "Example:\n  sbx fs stat web /tmp/x")]
    Stat(FsPath),
    /// Create a directory.
    #[command(after_help = "Example:\n  sbx fs mkdir -p web /app/data")]
    Mkdir {
        /// Create missing parents; succeed if it exists.
        #[arg(short = 'p', long)]
        parents: bool,
        #[command(flatten)]
        path: FsPath,
    },
    /// Remove a file or an empty directory (-r: a directory and everything in it).
    #[command(after_help = "Example:\n  sbx fs rm -r web /app/data")]
    Rm {
        #[arg(short = 'r', long)]
        recursive: bool,
        #[command(flatten)]
        path: FsPath,
    },
}

/// A sandbox as the user named it.
#[derive(Clone, Debug, PartialEq)]
enum Target {
    Id(String),
    Name(String),
}

/// An argv given as one shell-like string.
#[derive(Clone, Debug, PartialEq)]
struct Words(Vec<String>);

// ---------------------------------------------------------------------------------------------
// Parsing values (errors here exit 2 through clap, naming the value)

/// `10`, `10s`, `5m`, `2h` (a bare number is seconds) → seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .filter(|_| num.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("invalid duration {s:?}: expected e.g. 10, 10s, 5m or 2h"))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("invalid {s:?}: expected KEY=VALUE")),
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = parse_kv(s)?;
    if !api::valid_env_key(&k) {
        return Err(format!(
            "invalid variable name {k:?} in {s:?}: must match [A-Za-z_][A-Za-z0-9_]*"
        ));
    }
    Ok((k, v))
}

fn parse_name(s: &str) -> Result<String, String> {
    if api::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid name {s:?}: use 1 to 63 of A-Z a-z 0-9 . _ - (not . or ..)"
        ))
    }
}

fn parse_target(s: &str) -> Result<Target, String> {
    if api::is_sandbox_id(s) {
        Ok(Target::Id(s.to_string()))
    } else if api::valid_name(s) {
        Ok(Target::Name(s.to_string()))
    } else {
        Err(format!(
            "invalid sandbox {s:?}: expected an id (sb- and 22 letters or digits) or a name \
             (1 to 63 of A-Z a-z 0-9 . _ -)"
        ))
    }
}

/// `NAME:/PATH` or `NAME:/PATH:ro` (`:rw` accepted too).
fn parse_volume(s: &str) -> Result<VolumeMount, String> {
    let bad = |why: &str| format!("invalid volume {s:?}: {why} (expected NAME:/PATH[:ro])");
    let (name, rest) = s.split_once(':').ok_or_else(|| bad("no ':'"))?;
    let (path, read_only) = if let Some(p) = rest.strip_suffix(":ro") {
        (p, true)
    } else if let Some(p) = rest.strip_suffix(":rw") {
        (p, false)
    } else {
        (rest, false)
    };
    if !api::valid_name(name) {
        return Err(bad(&format!(
            "name {name:?} must be 1 to 63 of A-Z a-z 0-9 . _ -"
        )));
    }
    if !path.starts_with('/') || path.trim_end_matches('/').is_empty() || path.contains(':') {
        return Err(bad(&format!("path {path:?} must be absolute and not /")));
    }
    Ok(VolumeMount {
        name: name.to_string(),
        path: path.to_string(),
        read_only,
    })
}

/// Split a command line as a shell would, without expansions: whitespace separates words;
/// '…' is literal; "…" is literal except \" \\ \$ \`; a backslash outside quotes escapes.
fn parse_words(s: &str) -> Result<Words, String> {
    let unterminated = || format!("invalid command {s:?}: unterminated quote or escape");
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(unterminated()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(unterminated()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(unterminated()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.push(chars.next().ok_or_else(unterminated)?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    if words.is_empty() {
        return Err(format!("invalid command {s:?}: empty"));
    }
    Ok(Words(words))
}

impl CreateOpts {
    /// The create request; a bad combination is a usage error (exit 2).
    fn request(
        self,
        entrypoint: Vec<String>,
        stdin: bool,
        pty: Option<PtySize>,
    ) -> Result<CreateSandbox, CliError> {
        let interval = self.probe_interval;
        let probe = match (self.probe_tcp, self.probe_exec) {
            (Some(port), _) => Some(Probe {
                tcp_port: Some(port),
                interval_ms: interval,
                ..Default::default()
            }),
            (None, Some(Words(argv))) => Some(Probe {
                exec_argv: Some(argv),
                interval_ms: interval,
                ..Default::default()
            }),
            (None, None) => {
                if let Some(ms) = interval {
                    return Err(CliError::Usage(format!(
                        "--probe-interval {ms} needs a probe: add --probe-tcp PORT or --probe-exec CMD"
                    )));
                }
                None
            }
        };
        // The daemon reads a seccomp profile file itself: a relative path means ours.
        let seccomp = match self.seccomp {
            Some(p) if p != "default" && p != "unconfined" && !p.starts_with('/') => {
                let cwd = std::env::current_dir().map_err(|e| CliError::Io {
                    what: "reading the current directory for --seccomp".into(),
                    source: e,
                })?;
                Some(cwd.join(p).to_string_lossy().into_owned())
            }
            other => other,
        };
        Ok(CreateSandbox {
            image: self.image,
            entrypoint,
            app: self.app,
            name: self.name,
            tags: self.tags.into_iter().collect(),
            timeout_secs: self.timeout,
            idle_timeout_secs: self.idle_timeout,
            workdir: self.workdir,
            env: self.env.into_iter().collect(),
            secrets: self.secrets.into_iter().map(SecretSource::Named).collect(),
            volumes: self.volumes,
            cpu: self.cpu,
            memory_mib: self.memory,
            pids: self.pids,
            readiness_probe: probe,
            seccomp,
            pty,
            stdin,
            image_command: false,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and exit codes

#[derive(Debug, thiserror::Error)]
enum CliError {
    /// What the daemon (or the connection to it) reported.
    #[error("{0}")]
    Client(#[from] client::Error),
    #[error(
        "no sbxd answers on {}: {source}; start one with `sbx daemon --socket {}`, or let sbx \
         start it (drop --no-autostart / SBX_NO_AUTOSTART)",
        path.display(),
        path.display()
    )]
    NoDaemon {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting sbxd: {0}")]
    Autostart(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A bad value found after parsing (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Our stdout or stderr was closed (as `| head`): exit as SIGPIPE would, silently.
    #[error("output closed")]
    BrokenPipe,
    /// The run error and the cleanup error together; the cleanup never hides the cause.
    #[error("{run}; and removing sandbox {id} failed: {cleanup}")]
    WithCleanup {
        run: Box<CliError>,
        id: String,
        cleanup: client::Error,
    },
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::BrokenPipe => 141,
            CliError::WithCleanup { run, .. } => run.exit_code(),
            _ => 1,
        }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
        let what = what.into();
        move |source| CliError::Io { what, source }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Daemon = cli.command {
        let cfg = sbx::daemon::DaemonConfig {
            socket: cli.global.socket,
            state_dir: cli.global.state_dir,
            run_dir: cli.global.run_dir,
            warm: match std::env::var("SBX_WARM") {
                Err(_) => sbx::daemon::DEFAULT_WARM,
                Ok(v) => match v.parse::<usize>() {
                    Ok(n) if n <= 64 => n,
                    _ => {
                        eprintln!("error: invalid: SBX_WARM={v:?}: must be a number from 0 to 64");
                        return ExitCode::from(2);
                    }
                },
            },
        };
        return match sbx::daemon::run(cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(dispatch(cli));
    drop(rt);
    let _ = std::io::stdout().flush();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(CliError::BrokenPipe) => ExitCode::from(141),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(cli: Cli) -> Result<u8, CliError> {
    let g = cli.global;
    // Everything that can be a usage error is checked before we talk to (or start) a daemon.
    match cli.command {
        Cmd::Daemon => unreachable!("handled in main before the runtime starts"),
        Cmd::Version => version(&g).await,
        Cmd::Run(a) => {
            let a = *a;
            let pty = a.tty.then(terminal_size);
            let image_command = a.cmd.is_empty();
            if image_command && a.create.image.is_none() {
                return Err(CliError::Usage(
                    "sbx run needs a command (`sbx run -- CMD ARGS…`), or --image IMAGE to run \
                     the image's ENTRYPOINT/CMD"
                        .into(),
                ));
            }
            let mut req = a.create.request(a.cmd, a.interactive, pty)?;
            req.image_command = image_command;
            let client = connect(&g).await?;
            run(&client, req, a.interactive, a.tty).await
        }
        Cmd::Create(a) => {
            let a = *a;
            let req = a.create.request(a.entrypoint, false, None)?;
            let client = connect(&g).await?;
            let sb = Sandbox::create(&client, req).await?;
            if g.json {
                print_json(&serde_json::json!({ "id": sb.id() }))?;
            } else {
                println!("{}", sb.id());
            }
            Ok(0)
        }
        Cmd::Exec(a) => {
            let client = connect(&g).await?;
            exec(&client, *a).await
        }
        Cmd::WaitReady(a) => {
            let client = connect(&g).await?;
            let sb = resolve(&client, &a.target, false).await?;
            let ready_at = sb.wait_until_ready(Duration::from_secs(a.timeout)).await?;
            if g.json {
                print_json(&serde_json::json!({ "id": sb.id(), "ready_at": ready_at }))?;
            }
            Ok(0)
        }
        Cmd::Wait(t) => {
            let client = connect(&g).await?;
            let sb = resolve(&client, &t, true).await?;
            let rc = sb.wait_returncode().await?;
            print_returncode(&g, sb.id(), Some(rc))?;
            Ok(0)
        }
        Cmd::Poll(t) => {
            let client = connect(&g).await?;
            let sb = resolve(&client, &t, true).await?;
            let rc = sb.poll().await?;
            print_returncode(&g, sb.id(), rc)?;
            Ok(0)
        }
        Cmd::Terminate(a) => {
            let client = connect(&g).await?;
            let sb = resolve(&client, &a.target, false).await?;
            let rc = sb.terminate(a.wait).await?;
            if a.wait || g.json {
                print_returncode(&g, sb.id(), rc)?;
            }
            Ok(0)
        }
        Cmd::Logs(a) => {
            let client = connect(&g).await?;
            let sb = resolve(&client, &a.target, true).await?;
            logs(&sb, a.follow).await?;
            Ok(0)
        }
        Cmd::Ls(a) => {
            let client = connect(&g).await?;
            let tags: BTreeMap<String, String> = a.tags.into_iter().collect();
            let list = Sandbox::list(&client, a.app.as_deref(), &tags, a.all).await?;
            if g.json {
                print_json(&list)?;
            } else {
                let rows = list.iter().map(|s| {
                    vec![
                        s.id.clone(),
                        s.name.clone().unwrap_or_else(|| "-".into()),
                        s.app.clone(),
                        s.status.as_str().to_string(),
                        utc(s.created_at),
                        s.returncode.map_or_else(|| "-".into(), |c| c.to_string()),
                        join_tags(&s.tags),
                    ]
                });
                print_table(
                    &[
                        "ID",
                        "NAME",
                        "APP",
                        "STATUS",
                        "CREATED",
                        "RETURNCODE",
                        "TAGS",
                    ],
                    rows,
                )?;
            }
            Ok(0)
        }
        Cmd::Inspect(t) => {
            let client = connect(&g).await?;
            let sb = resolve(&client, &t, true).await?;
            let info = sb.info().await?;
            let text = serde_json::to_string_pretty(&info).expect("SandboxInfo serializes");
            write_stdout(format!("{text}\n").as_bytes())?;
            Ok(0)
        }
        Cmd::Tag(a) => {
            let client = connect(&g).await?;
            let sb = resolve(&client, &a.target, false).await?;
            let tags: BTreeMap<String, String> = a.tags.into_iter().collect();
            sb.set_tags(tags.clone()).await?;
            if g.json {
                print_json(&serde_json::json!({ "id": sb.id(), "tags": tags }))?;
            }
            Ok(0)
        }
        Cmd::Rm(a) => {
            let client = connect(&g).await?;
            let mut removed = Vec::new();
            for t in a.targets {
                let t = TargetArgs {
                    app: a.app.clone(),
                    target: t,
                };
                let sb = resolve(&client, &t, true).await?;
                sb.delete().await?;
                removed.push(sb.id().to_string());
            }
            if g.json {
                print_json(&serde_json::json!({ "removed": removed }))?;
            }
            Ok(0)
        }
        Cmd::Secret(c) => {
            let client = connect(&g).await?;
            secret(&client, &g, c).await
        }
        Cmd::Volume(c) => {
            let client = connect(&g).await?;
            volume(&client, &g, c).await
        }
        Cmd::Fs(c) => {
            let client = connect(&g).await?;
            fs(&client, &g, c).await
        }
        Cmd::Image(c) => image(&g, c).await,
        Cmd::Snapshot(t) => {
            let client = connect(&g).await?;
            let sb = resolve(&client, &t, false).await?;
            let img = sb.snapshot_filesystem().await?;
            let id = img.object_id().expect("a snapshot is a stored image");
            if g.json {
                print_json(&serde_json::json!({ "id": sb.id(), "image": id }))?;
            } else {
                write_stdout(format!("{id}\n").as_bytes())?;
            }
            Ok(0)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connecting, and starting sbxd when nobody answers

/// Whether something accepts connections on the socket (a cheap check before the client).
fn probe_socket(path: &Path) -> std::io::Result<()> {
    std::os::unix::net::UnixStream::connect(path).map(drop)
}

async fn connect(g: &Global) -> Result<Client, CliError> {
    if let Err(e) = probe_socket(&g.socket) {
        if g.no_autostart {
            return Err(CliError::NoDaemon {
                path: g.socket.clone(),
                source: e,
            });
        }
        autostart(g).await?;
    }
    Ok(Client::connect_to(&g.socket).await?)
}

/// How long an autostarted sbxd gets to answer.
const AUTOSTART_WAIT: Duration = Duration::from_secs(10);

/// Start sbxd in the background (its own process group, stdin null, output to
/// `<state>/sbxd.log`) and wait until it answers. A lock file serializes concurrent CLIs, so
/// only one of them starts a daemon.
async fn autostart(g: &Global) -> Result<(), CliError> {
    std::fs::create_dir_all(&g.state_dir)
        .map_err(CliError::io(format!("creating {}", g.state_dir.display())))?;
    let lock_path = g.state_dir.join("sbxd.autostart.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(CliError::io(format!("opening {}", lock_path.display())))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(
        |(_, e)| CliError::Io {
            what: format!("locking {}", lock_path.display()),
            source: e.into(),
        },
    )?;
    // Another CLI may have started it while we waited for the lock.
    if probe_socket(&g.socket).is_ok() {
        return Ok(());
    }
    let log_path = g.state_dir.join("sbxd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(CliError::io(format!("opening {}", log_path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(CliError::io(format!("duplicating {}", log_path.display())))?;
    let exe = std::env::current_exe().map_err(CliError::io("finding our own executable"))?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("daemon")
        .arg("--socket")
        .arg(&g.socket)
        .arg("--state-dir")
        .arg(&g.state_dir)
        .arg("--run-dir")
        .arg(&g.run_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2);
    // Its own process group: Ctrl-C at our terminal does not reach it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .map_err(CliError::io(format!("running {} daemon", exe.display())))?;
    eprintln!(
        "sbx: started sbxd (pid {}, socket {}, log {})",
        child.id(),
        g.socket.display(),
        log_path.display()
    );
    let deadline = Instant::now() + AUTOSTART_WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(CliError::Autostart(format!(
                "sbxd exited at once ({status}); its log {} ends with:\n{}",
                log_path.display(),
                log_tail(&log_path)
            )));
        }
        if probe_socket(&g.socket).is_ok() {
            if let Ok(c) = Client::connect_to(&g.socket).await {
                if c.health().await.is_ok() {
                    return Ok(());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(CliError::Autostart(format!(
                "sbxd (pid {}) did not answer on {} within {} s; see {}",
                child.id(),
                g.socket.display(),
                AUTOSTART_WAIT.as_secs(),
                log_path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// The sandbox a user named: by id, or by name in the app (`finished_too`: fall back to the
/// most recent finished one, for commands that only read).
async fn resolve(client: &Client, t: &TargetArgs, finished_too: bool) -> Result<Sandbox, CliError> {
    Ok(match &t.target {
        Target::Id(id) => Sandbox::from_id(client, id).await?,
        Target::Name(name) => Sandbox::from_name(client, &t.app, name, finished_too).await?,
    })
}

// ---------------------------------------------------------------------------------------------
// run and exec: streaming output, stdin, signals, terminals

/// How a `run` ended.
enum Ended {
    Exited(i32),
    /// We got signal N and removed the sandbox.
    Signalled(i32),
}

async fn run(
    client: &Client,
    req: CreateSandbox,
    interactive: bool,
    tty: bool,
) -> Result<u8, CliError> {
    // Registered before the create, so a Ctrl-C during it is seen once the id is known.
    let mut sigs = Signals::new()?;
    let sb = Sandbox::create(client, req).await?;
    let raw = if tty && interactive {
        RawTerminal::enter()
    } else {
        None
    };
    let ended = drive_entrypoint(&sb, interactive, &mut sigs).await;
    drop(raw);
    // Explain an unusual end before the records go.
    if let Ok(Ended::Exited(rc)) = &ended {
        if *rc != 0 {
            if let Ok(info) = sb.info().await {
                match info.end_reason {
                    Some(EndReason::Error) => eprintln!(
                        "sbx: sandbox {} failed: {}",
                        sb.id(),
                        info.error.as_deref().unwrap_or("unknown error")
                    ),
                    Some(EndReason::Oom) => {
                        eprintln!("sbx: sandbox {} was killed: out of memory", sb.id())
                    }
                    _ => {}
                }
            }
        }
    }
    // DELETE terminates a sandbox still running (after a signal or an error) and forgets it.
    let removed = sb.delete().await;
    match (ended, removed) {
        (Ok(Ended::Exited(rc)), Ok(())) => Ok(exit_byte(rc)),
        (Ok(Ended::Signalled(n)), Ok(())) => Ok(exit_byte(128 + n)),
        (Err(e), Ok(())) => Err(e),
        (Ok(_), Err(cleanup)) => Err(cleanup.into()),
        (Err(e), Err(cleanup)) => Err(CliError::WithCleanup {
            run: Box::new(e),
            id: sb.id().to_string(),
            cleanup,
        }),
    }
}

/// Stream the entrypoint's output (and our stdin to it) until it finished and its output
/// ended, or until a signal asks us to stop.
async fn drive_entrypoint(
    sb: &Sandbox,
    interactive: bool,
    sigs: &mut Signals,
) -> Result<Ended, CliError> {
    let (out, err, stdin) = (sb.stdout(), sb.stderr(), sb.stdin());
    let finished = async {
        let (_, _, rc) = tokio::try_join!(
            copy_out(&out, Out::Stdout),
            copy_out(&err, Out::Stderr),
            async { Ok(sb.wait_returncode().await?) }
        )?;
        Ok::<i32, CliError>(rc)
    };
    tokio::pin!(finished);
    let pump = pump_stdin(&stdin, interactive);
    tokio::pin!(pump);
    let mut pumping = interactive;
    loop {
        tokio::select! {
            r = &mut finished => return r.map(Ended::Exited),
            () = &mut pump, if pumping => pumping = false,
            s = sigs.next() => {
                // The entrypoint's terminal has no resize call; only stops matter here.
                if let Sig::Stop(n) = s {
                    return Ok(Ended::Signalled(n));
                }
            }
        }
    }
}

async fn exec(client: &Client, a: ExecArgs) -> Result<u8, CliError> {
    let sb = resolve(client, &a.target, false).await?;
    let req = ExecRequest {
        argv: a.cmd,
        workdir: a.workdir,
        env: a.env.into_iter().collect(),
        secrets: a.secrets.into_iter().map(SecretSource::Named).collect(),
        timeout_secs: a.timeout,
        pty: a.tty.then(terminal_size),
        term: if a.tty {
            std::env::var("TERM").ok()
        } else {
            None
        },
        stdin: Some(a.interactive),
        ..Default::default()
    };
    let mut sigs = Signals::new()?;
    let raw = if a.tty && a.interactive {
        RawTerminal::enter()
    } else {
        None
    };
    let p = sb.exec_with(req).await?;
    let finished = async {
        let (_, _, rc) = tokio::try_join!(
            copy_out(p.stdout(), Out::Stdout),
            copy_out(p.stderr(), Out::Stderr),
            async { Ok(p.wait().await?) }
        )?;
        Ok::<i32, CliError>(rc)
    };
    tokio::pin!(finished);
    let pump = pump_stdin(p.stdin(), a.interactive);
    tokio::pin!(pump);
    let mut pumping = a.interactive;
    let mut stops = 0;
    let result = loop {
        tokio::select! {
            r = &mut finished => break r,
            () = &mut pump, if pumping => pumping = false,
            s = sigs.next() => match s {
                // Forwarded to the process group; the third one kills it.
                Sig::Stop(n) => {
                    stops += 1;
                    let n = if stops >= 3 { 9 } else { n };
                    if let Err(e) = p.signal(n).await {
                        eprintln!("sbx: forwarding signal {n}: {e}");
                    }
                }
                Sig::Winch => {
                    if a.tty {
                        let size = terminal_size();
                        let _ = p.resize(size.rows, size.cols).await;
                    }
                }
            }
        }
    };
    drop(raw);
    match result {
        Ok(rc) => {
            let info = p.info().await?;
            if info.timed_out {
                Ok(124)
            } else {
                if info.oom {
                    eprintln!("sbx: the command was killed: out of memory");
                }
                Ok(exit_byte(rc))
            }
        }
        Err(CliError::BrokenPipe) => {
            // Our reader left (as `| head`): the command gets what a pipe writer would.
            let _ = p.signal(13).await;
            Err(CliError::BrokenPipe)
        }
        Err(e) => Err(e),
    }
}

fn exit_byte(rc: i32) -> u8 {
    u8::try_from(rc.clamp(0, 255)).expect("clamped to 0..=255")
}

#[derive(Clone, Copy)]
enum Out {
    Stdout,
    Stderr,
}

/// Copy one output stream to ours as its chunks arrive.
async fn copy_out(r: &StreamReader, to: Out) -> Result<(), CliError> {
    while let Some(chunk) = r.next_chunk().await? {
        match to {
            Out::Stdout => write_stdout(&chunk)?,
            Out::Stderr => write_stderr(&chunk)?,
        }
    }
    Ok(())
}

fn write_stdout(data: &[u8]) -> Result<(), CliError> {
    let mut o = std::io::stdout().lock();
    o.write_all(data)
        .and_then(|()| o.flush())
        .map_err(|e| local_write_error(e, "stdout"))
}

fn write_stderr(data: &[u8]) -> Result<(), CliError> {
    let mut o = std::io::stderr().lock();
    o.write_all(data)
        .and_then(|()| o.flush())
        .map_err(|e| local_write_error(e, "stderr"))
}

fn local_write_error(e: std::io::Error, what: &str) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::BrokenPipe
    } else {
        CliError::Io {
            what: format!("writing to {what}"),
            source: e,
        }
    }
}

/// Our stdin into a process's stdin until EOF, then close it (only when `on`; otherwise
/// never ready). A write the process no longer takes (it exited) just ends the pumping.
async fn pump_stdin(w: &StreamWriter, on: bool) {
    if !on {
        return std::future::pending().await;
    }
    // Read on a plain thread: a blocking read cannot hold up the runtime or the exit.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    });
    while let Some(chunk) = rx.recv().await {
        if w.write_all(chunk).await.is_err() {
            return;
        }
    }
    let _ = w.close().await;
}

/// Signals `run` and `exec` handle themselves.
enum Sig {
    /// SIGINT, SIGTERM, SIGHUP or SIGQUIT (the number).
    Stop(i32),
    Winch,
}

struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    winch: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, CliError> {
        use tokio::signal::unix::{signal, SignalKind};
        let reg = |k: SignalKind| signal(k).map_err(CliError::io("installing signal handlers"));
        Ok(Signals {
            int: reg(SignalKind::interrupt())?,
            term: reg(SignalKind::terminate())?,
            hup: reg(SignalKind::hangup())?,
            quit: reg(SignalKind::quit())?,
            winch: reg(SignalKind::window_change())?,
        })
    }

    async fn next(&mut self) -> Sig {
        tokio::select! {
            Some(()) = self.int.recv() => Sig::Stop(2),
            Some(()) = self.term.recv() => Sig::Stop(15),
            Some(()) = self.hup.recv() => Sig::Stop(1),
            Some(()) = self.quit.recv() => Sig::Stop(3),
            Some(()) = self.winch.recv() => Sig::Winch,
            else => std::future::pending().await,
        }
    }
}

/// Our terminal in raw mode while a remote terminal takes the keys; restored on drop.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    /// None when stdin is not a terminal (then there is nothing to switch).
    fn enter() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// The size of our terminal (`stty size` on our stdin: no ioctl, so no unsafe), else 24x80.
fn terminal_size() -> PtySize {
    let fallback = PtySize { rows: 24, cols: 80 };
    if !std::io::stdin().is_terminal() {
        return fallback;
    }
    let Ok(out) = std::process::Command::new("stty")
        .arg("size")
        .stdin(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return fallback;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(rows)), Some(Ok(cols))) if rows > 0 && cols > 0 => PtySize { rows, cols },
        _ => fallback,
    }
}

// ---------------------------------------------------------------------------------------------
// logs, secrets, volumes, files, version

/// The entrypoint's output: all of it so far, or (`follow`) until it ends.
async fn logs(sb: &Sandbox, follow: bool) -> Result<(), CliError> {
    let (out, err) = (sb.stdout(), sb.stderr());
    if follow {
        tokio::try_join!(copy_out(&out, Out::Stdout), copy_out(&err, Out::Stderr))?;
        return Ok(());
    }
    let ((o, _), (e, _)) = tokio::try_join!(out.read_available(), err.read_available())?;
    write_stdout(&o)?;
    write_stderr(&e)?;
    Ok(())
}

async fn secret(client: &Client, g: &Global, c: SecretCmd) -> Result<u8, CliError> {
    match c {
        SecretCmd::Create {
            overwrite,
            name,
            env,
        } => {
            let info = client
                .create_secret(api::CreateSecret {
                    name,
                    env: env.into_iter().collect(),
                    overwrite,
                })
                .await?;
            if g.json {
                print_json(&info)?;
            }
        }
        SecretCmd::Ls => {
            let list = client.list_secrets().await?;
            if g.json {
                print_json(&list)?;
            } else {
                let rows = list
                    .iter()
                    .map(|s| vec![s.name.clone(), s.keys.join(","), utc(s.created_at)]);
                print_table(&["NAME", "KEYS", "CREATED"], rows)?;
            }
        }
        SecretCmd::Rm { name } => {
            client.delete_secret(&name).await?;
            if g.json {
                print_json(&serde_json::json!({ "removed": name }))?;
            }
        }
    }
    Ok(0)
}

async fn volume(client: &Client, g: &Global, c: VolumeCmd) -> Result<u8, CliError> {
    match c {
        VolumeCmd::Ls => {
            let list = client.list_volumes().await?;
            if g.json {
                print_json(&list)?;
            } else {
                let rows = list.iter().map(|v| {
                    let users = if v.in_use_by.is_empty() {
                        "-".to_string()
                    } else {
                        v.in_use_by.join(",")
                    };
                    vec![v.name.clone(), utc(v.created_at), users]
                });
                print_table(&["NAME", "CREATED", "IN_USE_BY"], rows)?;
            }
        }
        VolumeCmd::Rm { name } => {
            client.delete_volume(&name).await?;
            if g.json {
                print_json(&serde_json::json!({ "removed": name }))?;
            }
        }
    }
    Ok(0)
}

async fn fs(client: &Client, g: &Global, c: FsCmd) -> Result<u8, CliError> {
    let p = match &c {
        FsCmd::Read(p) | FsCmd::Write(p) | FsCmd::Ls(p) | FsCmd::Stat(p) => p,
        FsCmd::Mkdir { path, .. } | FsCmd::Rm { path, .. } => path,
    };
    let sb = resolve(client, &p.target, false).await?;
    let files = sb.filesystem();
    let path = p.path.as_str();
    match &c {
        FsCmd::Read(_) => {
            let data = files.read_bytes(path).await?;
            write_stdout(&data)?;
        }
        FsCmd::Write(_) => {
            let mut data = Vec::new();
            std::io::stdin()
                .read_to_end(&mut data)
                .map_err(CliError::io("reading stdin"))?;
            let len = data.len();
            files.write_bytes(path, data).await?;
            if g.json {
                print_json(&serde_json::json!({ "path": path, "size": len }))?;
            }
        }
        FsCmd::Ls(_) => {
            let list = files.list_files(path).await?;
            if g.json {
                print_json(&list)?;
            } else {
                let mut out = String::new();
                for f in &list {
                    out.push_str(&file_line(f));
                    out.push('\n');
                }
                write_stdout(out.as_bytes())?;
            }
        }
        FsCmd::Stat(_) => {
            let f = files.stat(path).await?;
            if g.json {
                print_json(&f)?;
            } else {
                let mut out = format!(
                    "path: {}\ntype: {}\nsize: {}\nmode: {:04o} ({})\nowner: {}\ngroup: {}\nmodified: {}\n",
                    f.path,
                    file_type(f.file_type),
                    f.size,
                    f.mode,
                    f.permissions,
                    f.owner,
                    f.group,
                    utc(f.modified_time)
                );
                if let Some(t) = &f.symlink_target {
                    out.push_str(&format!("target: {t}\n"));
                }
                write_stdout(out.as_bytes())?;
            }
        }
        FsCmd::Mkdir { parents, .. } => {
            files.make_directory(path, *parents).await?;
            if g.json {
                print_json(&serde_json::json!({ "path": path }))?;
            }
        }
        FsCmd::Rm { recursive, .. } => {
            files.remove(path, *recursive).await?;
            if g.json {
                print_json(&serde_json::json!({ "removed": path }))?;
            }
        }
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// images

/// `oci:`, `docker-archive:` and `dir:` references with a relative path made absolute (sbxd
/// reads them, from its own working directory).
fn absolute_ref(reference: &str) -> Result<String, CliError> {
    for scheme in ["oci:", "docker-archive:", "dir:"] {
        if let Some(rest) = reference.strip_prefix(scheme) {
            if rest.starts_with('/') {
                break;
            }
            if rest.is_empty() {
                return Err(CliError::Usage(format!("{reference:?} names no path")));
            }
            let cwd = std::env::current_dir().map_err(CliError::io(format!(
                "reading the current directory for {reference}"
            )))?;
            // `join` only prepends: a `:TAG` suffix stays at the end.
            return Ok(format!("{scheme}{}", cwd.join(rest).display()));
        }
    }
    Ok(reference.to_string())
}

async fn image(g: &Global, c: ImageCmd) -> Result<u8, CliError> {
    // Usage errors first, before a daemon is started.
    let c = match c {
        ImageCmd::Pull { reference } => ImageCmd::Pull {
            reference: absolute_ref(&reference)?,
        },
        ImageCmd::Export {
            reference,
            destination,
        } => {
            if !destination.starts_with("oci:") {
                return Err(CliError::Usage(format!(
                    "invalid export destination {destination:?}: expected oci:PATH[:TAG]"
                )));
            }
            ImageCmd::Export {
                reference,
                destination: absolute_ref(&destination)?,
            }
        }
        other => other,
    };
    let client = connect(g).await?;
    match c {
        ImageCmd::Pull { reference } => {
            let info = pull(&client, g, &reference).await?;
            if !g.json {
                write_stdout(format!("{}\n", info.id).as_bytes())?;
            }
        }
        ImageCmd::Ls { all } => {
            let mut list = Image::list(&client).await?;
            if !all {
                let parents: std::collections::HashSet<String> =
                    list.iter().filter_map(|i| i.parent.clone()).collect();
                list.retain(|i| !i.references.is_empty() || !parents.contains(&i.id));
            }
            if g.json {
                print_json(&list)?;
            } else {
                let rows = list.iter().map(|i| {
                    let refs = if i.references.is_empty() {
                        "-".to_string()
                    } else {
                        i.references.join(",")
                    };
                    vec![i.id.clone(), refs, human_size(i.size), utc(i.created_at)]
                });
                print_table(&["ID", "REFERENCES", "SIZE", "CREATED"], rows)?;
            }
        }
        ImageCmd::Inspect { reference } => {
            let info = Image::inspect(&client, &reference).await?;
            let text = serde_json::to_string_pretty(&info).expect("ImageInfo serializes");
            write_stdout(format!("{text}\n").as_bytes())?;
        }
        ImageCmd::Rm { references } => {
            for r in &references {
                Image::remove(&client, r).await?;
            }
            if g.json {
                print_json(&serde_json::json!({ "removed": references }))?;
            }
        }
        ImageCmd::Build(a) => {
            let id = build(&client, g, a).await?;
            if !g.json {
                write_stdout(format!("{id}\n").as_bytes())?;
            }
        }
        ImageCmd::Export {
            reference,
            destination,
        } => {
            let r = Image::from_registry(reference)
                .export(&client, &destination)
                .await?;
            if g.json {
                print_json(&r)?;
            } else {
                write_stdout(
                    format!("{} {} {}\n", r.image, r.destination, r.manifest_digest).as_bytes(),
                )?;
            }
        }
    }
    Ok(0)
}

/// Pull with progress on stderr: per-layer bars on a terminal, else a line per finished
/// layer; with --json every event as a line on stdout.
async fn pull(client: &Client, g: &Global, reference: &str) -> Result<ImageInfo, CliError> {
    use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget};
    let bars_on = !g.json && std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if bars_on {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = layer_style();
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let mut json_error = None;
    let result = Image::pull(client, reference, |ev| {
        if g.json {
            if let Err(e) = print_json(ev) {
                json_error.get_or_insert(e);
            }
            return;
        }
        match ev {
            PullEvent::LayerStarted { digest, size } if bars_on => {
                let bar = multi.add(ProgressBar::new(*size));
                bar.set_style(style.clone());
                bar.set_prefix(short_digest(digest));
                bars.insert(digest.clone(), bar);
            }
            PullEvent::LayerProgress { digest, done, .. } => {
                if let Some(bar) = bars.get(digest) {
                    bar.set_position(*done);
                }
            }
            PullEvent::LayerDone { digest, cached } => {
                let what = if *cached { "cached" } else { "done" };
                match bars.get(digest) {
                    Some(bar) => {
                        if let Some(len) = bar.length() {
                            bar.set_position(len);
                        }
                        bar.finish_with_message(what);
                    }
                    None if !bars_on => eprintln!("layer {digest} {what}"),
                    None => {}
                }
            }
            _ => {}
        }
    })
    .await;
    for bar in bars.values() {
        if !bar.is_finished() {
            bar.abandon();
        }
    }
    if let Some(e) = json_error {
        return Err(e);
    }
    Ok(result?)
}

/// A pull's per-layer bar: `0123456789ab [=====>    ]   1.2 MiB/4.0 MiB  done`.
fn layer_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}",
    )
    .expect("a valid progress template")
    .progress_chars("=> ")
}

fn short_digest(d: &str) -> String {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    hex[..hex.len().min(12)].to_string()
}

/// Build a Dockerfile: `Step i/n: TEXT`, ` ---> cached` and RUN output on stderr as they
/// come (or JSON events on stdout); returns the image id.
async fn build(client: &Client, g: &Global, a: BuildArgs) -> Result<String, CliError> {
    let file = a.file.unwrap_or_else(|| a.context.join("Dockerfile"));
    let recipe = Image::from_dockerfile(&file, &a.context)
        .build_args(a.build_args)
        .force_build(a.no_cache);
    let recipe = match a.tag {
        Some(t) => recipe.tag(t),
        None => recipe,
    };
    let (_, warnings) = recipe.build_request()?;
    for w in &warnings {
        eprintln!("warning: {}: {w}", file.display());
    }
    let quiet = a.quiet;
    let mut line_start = true;
    let mut json_error = None;
    let mut err = std::io::stderr();
    let built = recipe
        .build_with(client, |ev| {
            if g.json {
                if let Err(e) = print_json(ev) {
                    json_error.get_or_insert(e);
                }
                return;
            }
            if quiet {
                return;
            }
            // Progress lines start on a fresh line even after RUN output without a newline.
            let mut line = |text: String| {
                let nl = if line_start { "" } else { "\n" };
                let _ = writeln!(err, "{nl}{text}");
                line_start = true;
            };
            match ev {
                BuildEvent::Step {
                    index,
                    total,
                    text,
                    cached,
                } => {
                    line(format!("Step {}/{total}: {text}", index + 1));
                    if *cached {
                        line(" ---> cached".to_string());
                    }
                }
                BuildEvent::Output { data, .. } => {
                    if !data.is_empty() {
                        let _ = err.write_all(data.as_bytes());
                        line_start = data.ends_with('\n');
                    }
                }
                BuildEvent::StepDone { image, .. } => line(format!(" ---> {image}")),
                BuildEvent::Done { .. } | BuildEvent::Error(_) => {}
            }
        })
        .await;
    if let Some(e) = json_error {
        return Err(e);
    }
    Ok(built?.id)
}

/// Bytes as `512 B`, `4.0 KiB`, `12.3 MiB`, `1.5 GiB`.
fn human_size(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn file_type(t: FileType) -> &'static str {
    match t {
        FileType::File => "file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Other => "other",
    }
}

/// One `ls -l`-like line: `drwxr-xr-x  0 0       4096 2024-05-01T12:00:00Z name -> target`.
fn file_line(f: &FileInfo) -> String {
    let kind = match f.file_type {
        FileType::File => '-',
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::Other => '?',
    };
    let mut line = format!(
        "{kind}{} {:>5} {:>5} {:>10} {} {}",
        f.permissions,
        f.owner,
        f.group,
        f.size,
        utc(f.modified_time),
        f.name
    );
    if let Some(t) = &f.symlink_target {
        line.push_str(" -> ");
        line.push_str(t);
    }
    line
}

async fn version(g: &Global) -> Result<u8, CliError> {
    let cli = env!("CARGO_PKG_VERSION");
    // Never starts a daemon: it reports the one that answers, if any.
    let daemon = if probe_socket(&g.socket).is_ok() {
        match Client::connect_to(&g.socket).await {
            Ok(c) => c.version().await.ok(),
            Err(_) => None,
        }
    } else {
        None
    };
    if g.json {
        print_json(&serde_json::json!({ "cli": cli, "daemon": daemon }))?;
    } else {
        let mut out = format!("sbx {cli}\n");
        match daemon {
            Some(v) => out.push_str(&format!("sbxd {} (api {})\n", v.version, v.api)),
            None => out.push_str(&format!("sbxd: none answers on {}\n", g.socket.display())),
        }
        write_stdout(out.as_bytes())?;
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// Output helpers

fn print_json<T: Serialize + ?Sized>(v: &T) -> Result<(), CliError> {
    let text = serde_json::to_string(v).expect("API types serialize");
    write_stdout(format!("{text}\n").as_bytes())
}

fn print_returncode(g: &Global, id: &str, rc: Option<i32>) -> Result<(), CliError> {
    if g.json {
        print_json(&serde_json::json!({ "id": id, "returncode": rc }))
    } else if let Some(rc) = rc {
        write_stdout(format!("{rc}\n").as_bytes())
    } else {
        Ok(())
    }
}

fn join_tags(tags: &BTreeMap<String, String>) -> String {
    if tags.is_empty() {
        return "-".into();
    }
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Columns padded to their widest cell, two spaces apart.
fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> Result<(), CliError> {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let mut widths = vec![0; header.len()];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    write_stdout(out.as_bytes())
}

/// Unix seconds as `2024-05-01T12:34:56Z`.
fn utc(ts: f64) -> String {
    rootfs_fetch::commit::rfc3339(ts.max(0.0).floor() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(10));
        assert_eq!(parse_duration("10s"), Ok(10));
        assert_eq!(parse_duration("5m"), Ok(300));
        assert_eq!(parse_duration("2h"), Ok(7200));
        for bad in ["", "5x", "m", "-1", "+5", "1.5s", "s10"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn volumes_and_pairs() {
        let v = parse_volume("data:/data:ro").unwrap();
        assert_eq!(
            (v.name.as_str(), v.path.as_str(), v.read_only),
            ("data", "/data", true)
        );
        let v = parse_volume("data:/mnt/x").unwrap();
        assert_eq!((v.path.as_str(), v.read_only), ("/mnt/x", false));
        for bad in ["data", "data:rel", "data:/", "a/b:/x", ":/x"] {
            assert!(parse_volume(bad).unwrap_err().contains(bad), "{bad}");
        }
        assert_eq!(parse_kv("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_kv("NOEQUALS").unwrap_err().contains("NOEQUALS"));
        assert!(parse_kv("=v").is_err());
        assert!(parse_env("1X=y").unwrap_err().contains("1X"));
        assert_eq!(
            parse_target("sb-0123456789abcdefABCDEF"),
            Ok(Target::Id("sb-0123456789abcdefABCDEF".into()))
        );
        assert_eq!(parse_target("web"), Ok(Target::Name("web".into())));
        assert!(parse_target("a/b").unwrap_err().contains("a/b"));
    }

    #[test]
    fn words() {
        assert_eq!(
            parse_words(r#"sh -c 'test -f /tmp/x' "a \"b\"" c\ d"#)
                .unwrap()
                .0,
            vec!["sh", "-c", "test -f /tmp/x", "a \"b\"", "c d"]
        );
        assert!(parse_words("'open").is_err());
        assert!(parse_words("   ").is_err());
    }

    #[test]
    fn image_helpers() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(4096), "4.0 KiB");
        assert_eq!(human_size(5 * 1024 * 1024 + 300 * 1024), "5.3 MiB");
        assert_eq!(absolute_ref("busybox:1").unwrap(), "busybox:1");
        assert_eq!(absolute_ref("oci:/abs/l:t").unwrap(), "oci:/abs/l:t");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            absolute_ref("oci:rel/l:t").unwrap(),
            format!("oci:{}/rel/l:t", cwd.display())
        );
        assert!(matches!(absolute_ref("oci:"), Err(CliError::Usage(_))));
        assert_eq!(short_digest("sha256:0123456789abcdef"), "0123456789ab");
        let _ = layer_style();
    }

    #[test]
    fn times() {
        assert_eq!(utc(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400.5), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000.0), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn every_command_has_an_about_and_an_example() {
        fn walk(cmd: &clap::Command, path: &str) {
            for sub in cmd.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                assert!(sub.get_about().is_some(), "{path} has no about line");
                if sub.get_subcommands().next().is_none() {
                    let after = sub
                        .get_after_help()
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    assert!(after.contains("Example"), "{path} has no example");
                }
                walk(sub, &path);
            }
        }
        Cli::command().debug_assert();
        walk(&Cli::command(), "sbx");
    }
}
