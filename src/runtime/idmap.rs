//! Host uid/gid ranges for sandboxes' user namespaces.
//!
//! Sandbox ids 0..65536 map to a host range of 65536 ids starting at
//! `RANGE_BASE + slot * RANGE_SIZE`, far above ordinary users (Debian's subuid ranges start at
//! 100000). A slot is taken by creating `<run_dir>/uids/<slot>` with `O_EXCL` (atomic across
//! processes, so two daemons or a daemon and a test cannot share a range) and released by
//! deleting it at teardown. The file holds the sandbox id, so a person (or, later, a restarted
//! daemon re-adopting its sandboxes) can tell whose a slot is; nothing reclaims slots on its own.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// First host id handed to sandboxes.
pub const RANGE_BASE: u32 = 0x4000_0000;
/// Ids per sandbox (a full 16-bit range: programs expect nobody=65534 to exist).
pub const RANGE_SIZE: u32 = 65536;
/// Slots available: RANGE_BASE + MAX_SLOTS * RANGE_SIZE stays below 2^31.
pub const MAX_SLOTS: u32 = 16384;

#[derive(Debug, thiserror::Error)]
pub enum IdMapError {
    #[error("failed to create the uid range directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to take uid range slot {path}: {source}")]
    Take {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("all {MAX_SLOTS} uid ranges are in use")]
    Exhausted,
}

/// A taken range; release it with [`IdRange::release`].
#[derive(Debug, Clone)]
pub struct IdRange {
    pub slot: u32,
    pub base: u32,
    pub count: u32,
    file: PathBuf,
}

impl IdRange {
    /// Take a free range for `sandbox_id`. Starts at a slot derived from the id so concurrent
    /// callers rarely collide.
    pub fn allocate(run_dir: &Path, sandbox_id: &str) -> Result<IdRange, IdMapError> {
        let dir = run_dir.join("uids");
        std::fs::create_dir_all(&dir).map_err(|source| IdMapError::Dir {
            path: dir.clone(),
            source,
        })?;
        let start = sandbox_id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
            % MAX_SLOTS;
        for i in 0..MAX_SLOTS {
            let slot = (start + i) % MAX_SLOTS;
            let file = dir.join(slot.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&file) {
                Ok(mut f) => {
                    let _ = f.write_all(sandbox_id.as_bytes());
                    return Ok(IdRange {
                        slot,
                        base: RANGE_BASE + slot * RANGE_SIZE,
                        count: RANGE_SIZE,
                        file,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(IdMapError::Take { path: file, source }),
            }
        }
        Err(IdMapError::Exhausted)
    }

    /// The range a sandbox already holds (re-adoption): slot file `<run_dir>/uids/<slot>`.
    pub fn adopt(run_dir: &Path, slot: u32, base: u32, count: u32) -> IdRange {
        IdRange {
            slot,
            base,
            count,
            file: run_dir.join("uids").join(slot.to_string()),
        }
    }

    /// The range held by `sandbox_id`, found by the id its slot file holds.
    pub fn find(run_dir: &Path, sandbox_id: &str) -> Option<IdRange> {
        let dir = run_dir.join("uids");
        std::fs::read_dir(&dir).ok()?.flatten().find_map(|e| {
            let slot: u32 = e.file_name().to_str()?.parse().ok()?;
            if slot >= MAX_SLOTS {
                return None;
            }
            let owner = std::fs::read_to_string(e.path()).ok()?;
            (owner == sandbox_id).then(|| IdRange {
                slot,
                base: RANGE_BASE + slot * RANGE_SIZE,
                count: RANGE_SIZE,
                file: e.path(),
            })
        })
    }

    /// Give the range back. Only after every process of the sandbox is gone.
    pub fn release(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_exclusive_and_reusable() {
        let dir = std::env::temp_dir().join(format!("sbx-idmap-{}", std::process::id()));
        let a = IdRange::allocate(&dir, "sb-same").unwrap();
        let b = IdRange::allocate(&dir, "sb-same").unwrap();
        assert_ne!(a.slot, b.slot);
        assert_ne!(a.base, b.base);
        assert!(a.base >= RANGE_BASE && a.base.checked_add(a.count).is_some());
        a.release().unwrap();
        let c = IdRange::allocate(&dir, "sb-same").unwrap();
        assert_eq!(c.slot, a.slot);
        b.release().unwrap();
        c.release().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
