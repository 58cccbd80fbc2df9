//! Talking to the local marsd over its control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mars_api::{ErrorKind, Reply, Request, Response, CONTROL_SOCKET};

/// Why a call to the daemon did not bring a reply: each case has its own exit status
/// (`crate::error`), so scripts can tell a dead daemon from a slow one and from a refusal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the control socket (or we may not connect to it).
    #[error("cannot reach marsd at {} (is it running with --root {}?): {source}", .path.display(), .root.display())]
    Unreachable {
        path: PathBuf,
        root: PathBuf,
        source: std::io::Error,
    },
    /// The daemon accepted the request but did not answer in time.
    #[error("no answer from marsd within {0}s")]
    Timeout(u64),
    /// The daemon refused or failed the request and said why.
    #[error("{message}")]
    Refused { kind: ErrorKind, message: String },
    /// The conversation broke (closed early, unintelligible answer, I/O error).
    #[error("{0}")]
    Broken(String),
}

pub fn call(root: &Path, req: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let path = root.join(CONTROL_SOCKET);
    let s = UnixStream::connect(&path).map_err(|source| ClientError::Unreachable {
        path: path.clone(),
        root: root.to_path_buf(),
        source,
    })?;
    let broken = |what: &str, e: std::io::Error| ClientError::Broken(format!("{what}: {e}"));
    s.set_read_timeout(Some(timeout))
        .map_err(|e| broken("control socket", e))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| broken("control socket", e))?;
    (&s).write_all(&mars_api::encode(req))
        .map_err(|e| broken("cannot send the request to marsd", e))?;
    let mut line = Vec::new();
    if let Err(e) = BufReader::new(std::io::Read::take(&s, mars_api::MAX_REPLY as u64 + 1))
        .read_until(b'\n', &mut line)
    {
        return Err(match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ClientError::Timeout(timeout.as_secs())
            }
            _ => broken("no answer from marsd", e),
        });
    }
    if line.is_empty() {
        return Err(ClientError::Broken(
            "marsd closed the connection without an answer".into(),
        ));
    }
    match mars_api::decode_reply::<Response>(line.trim_ascii_end())
        .map_err(|e| ClientError::Broken(format!("unintelligible answer from marsd: {e}")))?
    {
        Response::Ok { reply } => Ok(reply),
        Response::Error { kind, message } => Err(ClientError::Refused { kind, message }),
    }
}
