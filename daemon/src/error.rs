//! The daemon's errors: a request refused (what the client is told), and
//! why ferryd could not start or had to stop.

use ferry_shm::proto::{ErrorCode, Response};

use crate::config::ConfigError;

/// A client's request refused: the code its library maps to an error
/// kind, and why, for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Refusal {
        Refusal::new(ErrorCode::InvalidArgument, message)
    }

    pub fn limit(message: impl Into<String>) -> Refusal {
        Refusal::new(ErrorCode::Limit, message)
    }

    /// The answer that carries it to the client.
    pub fn response(self) -> Response {
        Response::Error {
            code: self.code,
            message: self.message,
        }
    }
}

/// Why ferryd could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A system call failed; `what` says what ferryd was doing. (The
    /// error is in the message, not also chained as a source, which would
    /// print it twice.)
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    /// Anything else, said in full.
    #[error("{0}")]
    Other(String),
}

/// `.doing(|| "what")` on an I/O result: the error says what failed.
pub trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, DaemonError>;
}

impl<T> Doing<T> for std::io::Result<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, DaemonError> {
        self.map_err(|err| DaemonError::Io { what: what(), err })
    }
}
