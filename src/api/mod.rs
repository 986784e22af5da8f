//! Wire types shared by sbxd and its clients: the stable error codes every failure maps to.

use serde::{Deserialize, Serialize};

/// One stable machine code per kind of failure (DESIGN.md, API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    AlreadyExists,
    Invalid,
    Conflict,
    Timeout,
    SandboxTimeout,
    SandboxTerminated,
    ResourceExhausted,
    Internal,
}
