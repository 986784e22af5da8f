//! sbx: run untrusted code in Linux sandboxes that start in milliseconds.
//!
//! - [`runtime`]: the isolation core (namespaces, overlay rootfs, cgroups, seccomp, capabilities).
//! - [`api`]: wire types shared by the daemon and its clients.
//! - [`client`] and [`daemon`]: the Unix-socket API (next milestone; see their module docs).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod api;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "runtime")]
pub mod daemon;
#[cfg(feature = "runtime")]
pub mod runtime;
