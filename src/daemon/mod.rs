//! sbxd: the HTTP server over a Unix socket, the sandbox registry and supervisor. The next
//! milestone (issue 3) builds it on [`crate::runtime`].
