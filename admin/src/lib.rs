//! ferryd's admin protocol: what `ferry` (and tests, and operators' tools)
//! may ask a running daemon over its admin socket, and what it answers.
//!
//! The admin socket is a `SOCK_STREAM` Unix socket beside the session
//! socket. A client sends one [`Request`] as a JSON object on one line
//! (at most [`MAX_REQUEST`] bytes), and ferryd answers with one
//! [`Response`] as a JSON object on one line, then closes. For example:
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"status":{"daemon":"ferryd 0.1.0", ...}}
//! -> {"cmd":"delete-group","stream":"batches","group":"train"}
//! <- {"error":"no stream named \"batches\""}
//! ```
//!
//! This crate holds the types and the client, and nothing of the daemon,
//! so that the CLI builds without rdma-core or CUDA bindings.
#![forbid(unsafe_code)]

mod client;
mod status;

pub use client::{admin_path_for, default_socket_path, request, AdminError, Client};
pub use status::*;

use serde::{Deserialize, Serialize};

/// Longest request line ferryd reads.
pub const MAX_REQUEST: usize = 4096;

/// What an admin client asks. Who asks is ferryd's business: it reads the
/// client's uid from the socket, never from the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every stream (partition rows capped at [`MAX_STATUS_ROWS`]), or one
    /// stream in full.
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<String>,
        /// Also every peer's summary ([`Status::cluster`]), gathered over
        /// the control plane (at most a second).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cluster: bool,
    },
    /// Deletes a consumer group without members.
    DeleteGroup { stream: String, group: String },
    /// Deletes a stream a producer created; `force` closes its sessions.
    DeleteStream {
        stream: String,
        #[serde(default)]
        force: bool,
    },
    /// For tests of the watchdog and `/live`: the data-plane loop sleeps
    /// `ms` (at most 60000) before it answers. Refused unless ferryd's
    /// `[admin] debug_requests = true`, and then to all but root and
    /// ferryd's own uid.
    DebugStall { ms: u64 },
}

/// ferryd's answer to one [`Request`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    /// Done; what was done, for people.
    Ok(String),
    /// Refused or failed; why, for people.
    Error(String),
}

impl Request {
    /// The request as the line a client sends (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("requests serialise")
    }

    /// A request line as a client sent it; the error says what a valid
    /// one looks like.
    pub fn parse(line: &str) -> Result<Request, String> {
        serde_json::from_str(line).map_err(|e| {
            format!(
                "not an admin request ({e}): send one JSON object per line, {{\"cmd\":\"status\"}} with an optional \"stream\" and \"cluster\":true, {{\"cmd\":\"delete-group\",\"stream\":S,\"group\":G}} or {{\"cmd\":\"delete-stream\",\"stream\":S,\"force\":false}}; got {:?}",
                line.chars().take(64).collect::<String>()
            )
        })
    }
}

impl Response {
    /// The answer as the line ferryd sends (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::to_string(&Response::Error(format!("encoding the answer: {e}")))
                .expect("a string serialises")
        })
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response::Error(message.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_read_as_documented() {
        for r in [
            Request::Status {
                stream: None,
                cluster: false,
            },
            Request::Status {
                stream: Some("s".into()),
                cluster: false,
            },
            Request::Status {
                stream: None,
                cluster: true,
            },
            Request::DeleteGroup {
                stream: "s".into(),
                group: "g".into(),
            },
            Request::DeleteStream {
                stream: "s".into(),
                force: true,
            },
        ] {
            assert_eq!(Request::parse(&r.to_line()).unwrap(), r);
        }
        assert_eq!(
            Request::Status {
                stream: None,
                cluster: false
            }
            .to_line(),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            Request::parse(r#"{"cmd":"delete-stream","stream":"x"}"#).unwrap(),
            Request::DeleteStream {
                stream: "x".into(),
                force: false
            }
        );
    }

    #[test]
    fn bad_requests_say_what_a_good_one_is() {
        for bad in [
            "status",
            "",
            "{}",
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"delete-group","stream":"s"}"#,
            r#"{"cmd":"status","uid":0}"#,
        ] {
            let e = Request::parse(bad).unwrap_err();
            assert!(e.contains(r#"{"cmd":"status"}"#), "{bad:?}: {e}");
        }
    }

    #[test]
    fn answers_are_tagged_objects() {
        assert_eq!(Response::Ok("done".into()).to_line(), r#"{"ok":"done"}"#);
        assert_eq!(Response::error("no").to_line(), r#"{"error":"no"}"#);
    }
}
