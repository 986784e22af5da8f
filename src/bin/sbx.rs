//! `sbx`: the command line. Today `sbx run` drives the runtime in-process (the daemon arrives
//! with the next milestone and takes over behind the same commands).

use clap::{Parser, Subcommand};
use sbx::runtime::{
    ExecSpec, ImageRef, Limits, RuntimeConfig, Sandbox, SandboxSpec, SeccompProfile, Stdio,
};
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "sbx",
    version,
    about = "Run untrusted code in fast, isolated Linux sandboxes"
)]
struct Cli {
    /// Directory for persistent state (image skeletons, writable layers).
    #[arg(
        long,
        global = true,
        env = "SBX_STATE_DIR",
        default_value = "/var/lib/sbx"
    )]
    state_dir: std::path::PathBuf,
    /// Directory for runtime files (control sockets, mount points).
    #[arg(long, global = true, env = "SBX_RUN_DIR", default_value = "/run/sbx")]
    run_dir: std::path::PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD in a new sandbox, stream its output, exit with its code, remove the sandbox.
    ///
    /// Example: sbx run -- python3 -c "print('hello')"
    Run(Box<RunArgs>),
    /// Print the version.
    Version,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Image: `host` (the host's /usr read-only, a minimal /etc) or `dir:/path/to/rootfs`.
    #[arg(long, default_value = "host")]
    image: String,
    /// Memory limit in MiB (no swap beyond it).
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// CPU limit in cores, fractions allowed (0.5).
    #[arg(long, value_name = "CORES")]
    cpu: Option<f64>,
    /// Most processes (and threads) at once.
    #[arg(long, value_name = "N")]
    pids: Option<u64>,
    /// Environment variable for CMD (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the sandbox (absolute).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// Kill the sandbox after DUR (`10`, `10s`, `5m`, `2h`); the exit code is then 124.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Hostname inside the sandbox.
    #[arg(long, default_value = "sandbox")]
    hostname: String,
    /// Seccomp profile: `default`, `unconfined` or a path to an OCI seccomp JSON file.
    #[arg(long, default_value = "default")]
    seccomp: String,
    /// Pass this process's stdin to CMD.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// `10`, `10s`, `5m`, `2h` (a bare number is seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, mul) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("invalid duration {s:?}: expected e.g. 10, 10s, 5m or 2h"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Version => {
            println!("sbx {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Cmd::Run(args) => {
            let mut cfg = RuntimeConfig::from_env();
            // One sandbox, then exit: no idle helpers, no background deletion.
            cfg.warm_helpers = 0;
            cfg.state_dir = cli.state_dir;
            cfg.run_dir = cli.run_dir;
            match run(&cfg, *args) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Signals `sbx run` passes on to the sandbox (as `docker run` does); a second one kills it.
const FORWARDED: &[nix::sys::signal::Signal] = &[
    nix::sys::signal::Signal::SIGINT,
    nix::sys::signal::Signal::SIGTERM,
    nix::sys::signal::Signal::SIGHUP,
    nix::sys::signal::Signal::SIGQUIT,
];

fn run(cfg: &RuntimeConfig, args: RunArgs) -> Result<i32, Box<dyn std::error::Error>> {
    // Block the forwarded signals in every thread (threads inherit the mask); one thread takes
    // them with sigwait, so Ctrl-C stops the command and the sandbox is still torn down.
    let mut mask = nix::sys::signal::SigSet::empty();
    for s in FORWARDED {
        mask.add(*s);
    }
    mask.thread_block()?;
    let image: ImageRef = args.image.parse()?;
    let seccomp = match args.seccomp.as_str() {
        "default" => SeccompProfile::Default,
        "unconfined" => SeccompProfile::Unconfined,
        path => SeccompProfile::File(path.into()),
    };
    let mut env = Vec::new();
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("invalid --env {kv:?}: expected K=V"))?;
        env.push((k.to_string(), v.to_string()));
    }
    if let Some(m) = args.memory {
        if m == 0 {
            return Err("invalid --memory 0: must be at least 1 MiB".into());
        }
    }
    if let Some(c) = args.cpu {
        if !(c > 0.0 && c.is_finite()) {
            return Err(format!("invalid --cpu {c}: must be a positive number of cores").into());
        }
    }
    let entry = ExecSpec {
        argv: args.cmd,
        env,
        cwd: args.workdir,
        stdin: if args.interactive {
            Stdio::Pipe
        } else {
            Stdio::Null
        },
        ..Default::default()
    };
    let spec = SandboxSpec {
        image,
        hostname: Some(args.hostname),
        limits: Limits {
            memory_bytes: args.memory.map(|m| m * 1024 * 1024),
            cpu_cores: args.cpu,
            pids_max: args.pids,
            ..Default::default()
        },
        seccomp,
        entrypoint: Some(entry),
        ..Default::default()
    };
    let sandbox = std::sync::Arc::new(Sandbox::spawn(cfg, spec)?);
    let mut proc = sandbox
        .take_entrypoint()
        .ok_or("the sandbox did not start its entrypoint")?;
    // Output is copied through pipes rather than handing our terminal to the sandbox (a tty
    // descriptor inside would allow TIOCSTI-style input injection into the host shell).
    let out = proc
        .stdout
        .take()
        .map(|f| copy_thread(f, std::io::stdout()));
    let err = proc
        .stderr
        .take()
        .map(|f| copy_thread(f, std::io::stderr()));
    if let Some(mut w) = proc.stdin.take() {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut w);
        });
    }
    {
        let sb = std::sync::Arc::downgrade(&sandbox);
        std::thread::spawn(move || {
            let mut count = 0;
            while let Ok(sig) = mask.wait() {
                let Some(sb) = sb.upgrade() else { return };
                count += 1;
                let _ = if count == 1 {
                    sb.signal(sig as i32)
                } else {
                    sb.kill()
                };
            }
        });
    }
    let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The timer waits on a channel: dropping `stop` ends it early, and it is joined before
    // teardown, so it never holds the sandbox while we destroy it.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let timer = args.timeout.map(|t| {
        let (sb, flag) = (std::sync::Arc::downgrade(&sandbox), timed_out.clone());
        std::thread::spawn(move || {
            if stopped.recv_timeout(t) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                if let Some(sb) = sb.upgrade() {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = sb.kill();
                }
            }
        })
    });
    let exit = proc.wait()?;
    for t in [out, err].into_iter().flatten() {
        let _ = t.join();
    }
    drop(proc);
    drop(stop);
    if let Some(t) = timer {
        let _ = t.join();
    }
    // Only weak handles remain elsewhere: the signal thread may hold a strong one for the
    // instant it forwards a signal, so retry briefly rather than leave teardown to it.
    let mut sandbox = sandbox;
    for _ in 0..1000 {
        match std::sync::Arc::try_unwrap(sandbox) {
            Ok(sb) => {
                sb.destroy()?;
                break;
            }
            Err(sb) => {
                sandbox = sb;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    if timed_out.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(124);
    }
    if exit.oom {
        eprintln!("sbx: the command was killed: out of memory");
    }
    Ok(exit.code())
}

fn copy_thread<W: Write + Send + 'static>(
    mut from: std::fs::File,
    mut to: W,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).and_then(|_| to.flush()).is_err() {
                        break;
                    }
                }
            }
        }
    })
}
