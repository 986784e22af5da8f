//! The Unix-socket client library for sbxd. The daemon and its HTTP API are the next milestone
//! (issue 3); until then programs use [`crate::runtime`] directly, as the `sbx run` command does.
