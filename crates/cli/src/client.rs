//! Talking to the local marsd over its control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mars_api::{ErrorKind, Reply, Request, Response, CONTROL_SOCKET};

/// A refusal from the daemon, printed as one line and turned into the exit status.
#[derive(Debug)]
pub struct Refused {
    pub kind: ErrorKind,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

pub fn call(root: &Path, req: &Request, timeout: Duration) -> Result<Reply> {
    let path = root.join(CONTROL_SOCKET);
    let s = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach marsd at {} (is it running with --root {}?)",
            path.display(),
            root.display()
        )
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    (&s).write_all(&mars_api::encode(req))?;
    let mut line = Vec::new();
    BufReader::new(std::io::Read::take(&s, mars_api::MAX_REPLY as u64 + 1))
        .read_until(b'\n', &mut line)
        .with_context(|| format!("no answer from marsd within {}s", timeout.as_secs()))?;
    if line.is_empty() {
        bail!("marsd closed the connection without an answer");
    }
    match mars_api::decode_reply::<Response>(line.trim_ascii_end())
        .context("unintelligible answer from marsd")?
    {
        Response::Ok { reply } => Ok(reply),
        Response::Error { kind, message } => Err(Refused { kind, message }.into()),
    }
}
