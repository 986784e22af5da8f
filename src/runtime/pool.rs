//! Helper processes: `sbx-init` started (posix_spawn) with its control socket as stdin, and a
//! small pool of helpers exec'd ahead of time, so a spawn does not wait for an exec, the dynamic
//! loader and the Rust runtime to start. An idle helper only waits for its config on the
//! socket; if this process exits, the socket closes and the helper exits with it.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// A started helper: the process and our end of its control socket.
pub struct Helper {
    pub child: Child,
    pub control: OwnedFd,
}

/// Start one helper. Its control socket is its stdin (the helper moves it to
/// [`super::helper::CONTROL_FD`] and puts /dev/null there); its stderr goes to `log` (it writes there
/// only if it panics; setup errors travel on the control socket).
///
/// Nothing runs between fork and exec, so std starts it with posix_spawn (clone with CLONE_VM
/// and CLONE_VFORK): a fork of this process would mark all its memory copy-on-write, and every
/// thread of a busy daemon would then fault on its next writes (measured: ~1 ms added to the
/// first exec into the sandbox created next).
pub fn spawn(init_binary: &Path, log: &Path) -> std::io::Result<Helper> {
    let (ours, theirs) = super::proto::seqpacket_pair().map_err(std::io::Error::from)?;
    let log: File = OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = Command::new(init_binary);
    cmd.stdin(std::process::Stdio::from(theirs))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .env_clear();
    let child = cmd.spawn()?;
    Ok(Helper {
        child,
        control: ours,
    })
}

/// Idle helpers for one (binary, log) pair, refilled by a background thread.
struct Pool {
    idle: Mutex<Vec<Helper>>,
    want: usize,
    wake: Condvar,
}

type Key = (PathBuf, PathBuf);

fn pools() -> &'static Mutex<HashMap<Key, Arc<Pool>>> {
    static POOLS: OnceLock<Mutex<HashMap<Key, Arc<Pool>>>> = OnceLock::new();
    POOLS.get_or_init(Default::default)
}

/// A helper: an idle one from the pool if there is one (and the pool is refilled in the
/// background), else a new one. `warm == 0` disables the pool.
pub fn take(init_binary: &Path, log: &Path, warm: usize) -> std::io::Result<Helper> {
    if warm == 0 {
        return spawn(init_binary, log);
    }
    let key = (init_binary.to_path_buf(), log.to_path_buf());
    let pool = {
        let mut all = pools().lock().unwrap_or_else(|p| p.into_inner());
        all.entry(key.clone())
            .or_insert_with(|| {
                let pool = Arc::new(Pool {
                    idle: Mutex::new(Vec::new()),
                    want: warm,
                    wake: Condvar::new(),
                });
                let p = pool.clone();
                let _ = std::thread::Builder::new()
                    .name("sbx-helper-pool".into())
                    .spawn(move || refill(&p, &key.0, &key.1));
                pool
            })
            .clone()
    };
    let taken = {
        let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        // A helper that died while idle (killed by someone) is useless: skip it.
        loop {
            let Some(mut h) = idle.pop() else {
                break None;
            };
            if matches!(h.child.try_wait(), Ok(None)) {
                break Some(h);
            }
            let _ = h.child.wait();
        }
    };
    pool.wake.notify_one();
    match taken {
        Some(h) => Ok(h),
        None => spawn(init_binary, log),
    }
}

fn refill(pool: &Pool, init_binary: &Path, log: &Path) {
    // Pre-forking (exec, dynamic loader, namespaces) is work ahead of time: it runs, and the
    // helpers start, at low priority; a helper takes normal priority when its config arrives.
    let _ = super::sys::set_thread_nice(super::BACKGROUND_NICE);
    loop {
        {
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            while idle.len() >= pool.want {
                idle = pool.wake.wait(idle).unwrap_or_else(|p| p.into_inner());
            }
        }
        match spawn(init_binary, log) {
            Ok(h) => pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(h),
            // The binary is missing or the system is out of processes: spawns will report it.
            Err(_) => std::thread::sleep(std::time::Duration::from_secs(1)),
        }
    }
}
