//! Errors as they cross the wire: a stable code plus a sentence.

use serde::{Deserialize, Serialize};

/// A stable error class. Clients branch on the code, never on the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The named VM, image or request does not exist.
    NotFound,
    /// The request is malformed or names something invalid; retrying the
    /// same request cannot help.
    InvalidArgument,
    /// The request conflicts with the current state (a name in use, a VM
    /// that is not in a state the call needs).
    Conflict,
    /// A resource is temporarily unavailable (a limit reached, the agent
    /// shutting down, a guest that did not answer in time); retrying later
    /// may help.
    Unavailable,
    /// The agent failed in a way the caller cannot fix.
    Internal,
    /// The connection was closed because it said no hello in time or sat
    /// idle past the agent's idle timeout; a new connection (and the same
    /// request on it) can succeed. Appended: bincode encodes a variant by
    /// its index.
    TimedOut,
}

impl ErrorCode {
    /// Whether sending the same request again later can succeed.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorCode::Unavailable | ErrorCode::TimedOut)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorCode::NotFound => "not found",
            ErrorCode::InvalidArgument => "invalid argument",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::TimedOut => "timed out",
        })
    }
}

/// An error returned by the agent for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// The error class.
    pub code: ErrorCode,
    /// What went wrong, as a sentence for a person.
    pub message: String,
}

impl ApiError {
    /// Builds an error of class `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// Whether retrying the request later can help.
    pub fn retryable(&self) -> bool {
        self.code.retryable()
    }
}
