//! Cleanup off the caller's path. Once every process of a sandbox is dead, what is left — reaping
//! its helper, removing its cgroup, deleting its directories, releasing its uid range — runs on a
//! background thread, so `destroy` returns as soon as nothing of the sandbox runs any more.
//! Directories are first renamed into a `trash/` directory on the same filesystem, so their
//! names are free at once and a crash mid-delete leaves them only there; whatever a crashed
//! process left in `trash/` is deleted the first time this process uses it.
//! [`flush`] waits until every job is done and returns their errors.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, OnceLock};

type Job = Box<dyn FnOnce() -> Vec<String> + Send>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Jobs queued or running.
    pending: usize,
    errors: Vec<String>,
}

struct Queue {
    state: Mutex<State>,
    changed: Condvar,
}

fn queue() -> &'static Queue {
    static Q: OnceLock<Queue> = OnceLock::new();
    Q.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("sbx-janitor".into())
            .spawn(work);
        Queue {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    })
}

fn work() {
    // Teardown is nobody's wait: it yields the CPU to sandboxes starting and running.
    let _ = super::sys::set_thread_nice(super::BACKGROUND_NICE);
    let q = queue();
    loop {
        let job = {
            let mut g = q.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = g.jobs.pop_front() {
                    break j;
                }
                g = q.changed.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        };
        let errors = job();
        let mut g = q.state.lock().unwrap_or_else(|p| p.into_inner());
        g.errors.extend(errors);
        g.pending -= 1;
        q.changed.notify_all();
    }
}

/// Run `job` on the janitor thread; its errors are collected for [`flush`].
pub fn submit(job: impl FnOnce() -> Vec<String> + Send + 'static) {
    let q = queue();
    let mut g = q.state.lock().unwrap_or_else(|p| p.into_inner());
    g.jobs.push_back(Box::new(job));
    g.pending += 1;
    q.changed.notify_all();
}

/// Jobs submitted and not yet done (queued or running).
pub fn pending() -> usize {
    queue()
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pending
}

/// Wait until every submitted job is done; returns the errors they reported since the last
/// flush. Call it before the process exits.
pub fn flush() -> Vec<String> {
    let q = queue();
    let mut g = q.state.lock().unwrap_or_else(|p| p.into_inner());
    while g.pending > 0 {
        g = q.changed.wait(g).unwrap_or_else(|p| p.into_inner());
    }
    std::mem::take(&mut g.errors)
}

/// Remove a directory tree; a missing one is fine. The tree was written by untrusted code: a
/// nesting deeper than our descriptor limit (std's remove_dir_all holds one per level) or than
/// PATH_MAX falls back to [`remove_flat`].
pub fn remove(p: &Path) -> std::io::Result<()> {
    // A helper we do not wait for (a leftover's) may still drop its exit record into the run
    // directory while we delete it: retry for a moment when a directory refills.
    for _ in 0..50 {
        match std::fs::remove_dir_all(p) {
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => return finish_remove(p, other),
        }
    }
    finish_remove(p, std::fs::remove_dir_all(p))
}

fn finish_remove(p: &Path, result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENAMETOOLONG)
            ) =>
        {
            remove_flat(p)
        }
        Err(e) => Err(e),
    }
}

/// Remove a tree of any depth with paths at most two levels below `root` and no descriptor
/// held across calls: each pass deletes the top-level entries, first hoisting their
/// subdirectories up to `root` (a rename), so every pass makes the tree one level shallower.
/// Nothing is followed: entries are inspected with lstat.
pub fn remove_flat(root: &Path) -> std::io::Result<()> {
    let mut hoisted: u64 = 0;
    loop {
        let entries: Vec<PathBuf> = match std::fs::read_dir(root) {
            Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if entries.is_empty() {
            return std::fs::remove_dir(root);
        }
        for e in entries {
            if !std::fs::symlink_metadata(&e)?.is_dir() {
                std::fs::remove_file(&e)?;
                continue;
            }
            for c in std::fs::read_dir(&e)?.flatten() {
                let c = c.path();
                if std::fs::symlink_metadata(&c)?.is_dir() {
                    hoisted += 1;
                    std::fs::rename(&c, root.join(format!(".sbx-hoisted-{hoisted}")))?;
                } else {
                    std::fs::remove_file(&c)?;
                }
            }
            std::fs::remove_dir(&e)?;
        }
    }
}

/// Move `dir` into `<its grandparent>/trash/` and return the new path (the old name is free at
/// once). Falls back to the original path when it cannot be moved.
pub fn to_trash(dir: &Path) -> PathBuf {
    let (Some(root), Some(name)) = (dir.parent().and_then(Path::parent), dir.file_name()) else {
        return dir.to_path_buf();
    };
    let trash = root.join("trash");
    if std::fs::create_dir_all(&trash).is_err() {
        return dir.to_path_buf();
    }
    sweep_once(&trash);
    let target = trash.join(name);
    match std::fs::rename(dir, &target) {
        Ok(()) => target,
        Err(_) => dir.to_path_buf(),
    }
}

/// Delete what a crashed process left in `trash`, once per trash dir and process.
fn sweep_once(trash: &Path) {
    static SWEPT: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    let mut swept = SWEPT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if swept.iter().any(|t| t == trash) {
        return;
    }
    swept.push(trash.to_path_buf());
    let left: Vec<PathBuf> = std::fs::read_dir(trash)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    if !left.is_empty() {
        submit(move || {
            left.iter()
                .filter_map(|p| {
                    remove(p)
                        .err()
                        .map(|e| format!("remove {}: {e}", p.display()))
                })
                .collect()
        });
    }
}
