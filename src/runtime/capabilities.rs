//! Capabilities: the sandbox keeps Docker's default set (inside its user namespace), nothing more.

use caps::{CapSet, Capability, CapsHashSet};

/// Docker's default capability set. `CapEff` of a root process in a sandbox is exactly this.
pub const DEFAULT_CAPS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_MKNOD,
    Capability::CAP_AUDIT_WRITE,
    Capability::CAP_SETFCAP,
];

/// The bitmask of [`DEFAULT_CAPS`] as `/proc/<pid>/status` prints it (`CapEff`).
pub fn default_mask() -> u64 {
    DEFAULT_CAPS.iter().fold(0, |m, c| m | c.bitmask())
}

#[derive(Debug, thiserror::Error)]
#[error("failed to {step}: {source}")]
pub struct CapsError {
    step: &'static str,
    #[source]
    source: caps::errors::CapsError,
}

/// Cut this process to the default set: bounding set first (so no later execve can regain
/// anything), then effective/permitted, inheritable and ambient cleared.
pub fn restrict_to_default() -> Result<(), CapsError> {
    let keep: CapsHashSet = DEFAULT_CAPS.iter().copied().collect();
    // Dropping from the bounding set needs CAP_SETPCAP, which we hold until the end.
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|source| CapsError {
                step: "drop a capability from the bounding set",
                source,
            })?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|source| CapsError {
        step: "clear the ambient set",
        source,
    })?;
    caps::clear(None, CapSet::Inheritable).map_err(|source| CapsError {
        step: "clear the inheritable set",
        source,
    })?;
    // Effective must stay a subset of permitted at every step: shrink effective first.
    caps::set(None, CapSet::Effective, &keep).map_err(|source| CapsError {
        step: "set the effective set",
        source,
    })?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|source| CapsError {
        step: "set the permitted set",
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mask_matches_docker() {
        // Docker's documented default CapEff.
        assert_eq!(default_mask(), 0x0000_0000_a804_25fb);
    }
}
