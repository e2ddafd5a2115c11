//! The client side: one request, one answer, over ferryd's admin socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_shm::{proto, sys};

use crate::{Request, Response, Status};

pub use ferry_shm::proto::default_socket_path;

/// The admin socket beside session socket `socket`.
pub fn admin_path_for(socket: &Path) -> PathBuf {
    socket.with_file_name("ferryd-admin.sock")
}

/// Why an admin request got no answer, or what ferryd refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("connecting to ferryd's admin socket {path}: {source}{hint}")]
    Connect {
        path: String,
        source: std::io::Error,
        hint: &'static str,
    },
    /// The process listening there is not one this client trusts as
    /// ferryd (see `FERRY_DAEMON_UID`); nothing was sent to it.
    #[error("the process listening at {path} (pid {pid}): {why}")]
    Untrusted { path: String, pid: i32, why: String },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("decoding ferryd's answer: {0}")]
    Decode(String),
    /// ferryd answered with an error.
    #[error("ferryd: {0}")]
    Refused(String),
}

/// Sends `req` to the ferryd whose admin socket is `admin` and returns its
/// answer; an error answer is [`AdminError::Refused`].
pub fn request(admin: &Path, req: &Request) -> Result<Response, AdminError> {
    let mut conn = UnixStream::connect(admin).map_err(|e| AdminError::Connect {
        path: admin.display().to_string(),
        hint: proto::connect_hint(e.kind()),
        source: e,
    })?;
    // Like libferry: say nothing to a process we do not trust as ferryd.
    let cred = sys::peer_cred(&conn).map_err(|e| AdminError::Io {
        what: "reading the admin socket's peer credentials",
        source: e,
    })?;
    proto::check_daemon_uid(cred.uid, sys::geteuid(), admin).map_err(|why| {
        AdminError::Untrusted {
            path: admin.display().to_string(),
            pid: cred.pid,
            why,
        }
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| AdminError::Io {
            what: "setting a read timeout",
            source: e,
        })?;
    // ferryd may answer (a refusal) and close before reading our line: a
    // failed write or a reset after the answer still leaves the answer.
    let mut line = req.to_line();
    line.push('\n');
    let sent = conn.write_all(line.as_bytes());
    let mut text = Vec::new();
    let mut buf = [0u8; 8192];
    let read_err = loop {
        match conn.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    if text.is_empty() {
        if let Err(e) = sent {
            return Err(AdminError::Io {
                what: "sending the request to ferryd",
                source: e,
            });
        }
        if let Some(e) = read_err {
            return Err(AdminError::Io {
                what: "reading ferryd's answer",
                source: e,
            });
        }
    }
    let text = String::from_utf8_lossy(&text);
    match serde_json::from_str::<Response>(text.trim()) {
        Ok(Response::Error(m)) => Err(AdminError::Refused(m)),
        Ok(r) => Ok(r),
        Err(e) => Err(AdminError::Decode(format!(
            "{e} (got {:?})",
            text.chars().take(200).collect::<String>()
        ))),
    }
}

/// A daemon's admin socket, with one method per request.
#[derive(Debug, Clone)]
pub struct Client {
    pub path: PathBuf,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Client {
        Client { path: path.into() }
    }

    /// The status of every stream (partition rows capped), or of `stream`
    /// in full.
    pub fn status(&self, stream: Option<&str>) -> Result<Status, AdminError> {
        let req = Request::Status {
            stream: stream.map(String::from),
            cluster: false,
        };
        match request(&self.path, &req)? {
            Response::Status(st) => Ok(*st),
            other => Err(unexpected(&other)),
        }
    }

    /// The status of every stream, with every peer's summary in
    /// [`Status::cluster`] (gathered over the control plane).
    pub fn cluster_status(&self) -> Result<Status, AdminError> {
        let req = Request::Status {
            stream: None,
            cluster: true,
        };
        match request(&self.path, &req)? {
            Response::Status(st) => Ok(*st),
            other => Err(unexpected(&other)),
        }
    }

    /// Deletes a group without members; returns what was done.
    pub fn delete_group(&self, stream: &str, group: &str) -> Result<String, AdminError> {
        self.done(&Request::DeleteGroup {
            stream: stream.into(),
            group: group.into(),
        })
    }

    /// Deletes a stream a producer created; returns what was done.
    pub fn delete_stream(&self, stream: &str, force: bool) -> Result<String, AdminError> {
        self.done(&Request::DeleteStream {
            stream: stream.into(),
            force,
        })
    }

    fn done(&self, req: &Request) -> Result<String, AdminError> {
        match request(&self.path, req)? {
            Response::Ok(m) => Ok(m),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(r: &Response) -> AdminError {
    AdminError::Decode(format!(
        "an answer of the wrong kind: {}",
        r.to_line().chars().take(200).collect::<String>()
    ))
}
