//! The control socket (`ROOT/marsd.sock`, 0600, root or our own user only): one JSON request
//! per connection, one dispatch. Cluster commands (`cluster.rs`) go to the metadata layer;
//! resource commands (`resources.rs`) create or join resources here and hand everything else
//! to the resource's actor as an engine operation; `global.rs` writes the `*-global` commands'
//! switch requests and waits for the members; `view.rs` reads the actors' snapshots.

mod cluster;
mod global;
mod resources;
mod view;

pub use view::view;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use mars_api::{ErrorKind, Reply, Request, Response, MAX_REQUEST};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::host::Host;
use crate::listen::AcceptErrors;

/// A refusal: what kind, and the one line the operator reads.
pub type Outcome = Result<Reply, (ErrorKind, String)>;

pub fn invalid(msg: impl Into<String>) -> (ErrorKind, String) {
    (ErrorKind::Invalid, msg.into())
}

pub fn failed(msg: impl Into<String>) -> (ErrorKind, String) {
    (ErrorKind::Failed, msg.into())
}

pub fn not_found(res: &mars_config::ResourceName) -> (ErrorKind, String) {
    (
        ErrorKind::NotFound,
        format!("resource {res} does not exist"),
    )
}

/// Why a resource has no local state here: it does not exist, or this host is not among
/// its members (which "does not exist" would hide).
pub async fn not_here(host: &Host, res: &mars_config::ResourceName) -> (ErrorKind, String) {
    match host.store.resource_meta(res).await {
        Ok(m) if m.exists() => {
            let members: Vec<String> = m.members.keys().map(ToString::to_string).collect();
            (
                ErrorKind::Invalid,
                format!(
                    "this host is not a member of resource {res} (its members: {}); \
                     `marsadm join-resource {res} DISK` makes it one",
                    members.join(", ")
                ),
            )
        }
        _ => not_found(res),
    }
}

pub fn done(message: impl Into<String>) -> Outcome {
    Ok(Reply::Done {
        message: message.into(),
    })
}

/// Serves the control socket until the task is dropped.
pub async fn serve(host: Arc<Host>, l: UnixListener) {
    let mut errors = AcceptErrors::new("control socket");
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                errors.accepted();
                let h = host.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(h, s).await {
                        tracing::warn!("control connection: {e:#}");
                    }
                });
            }
            Err(e) => errors.failed(e).await,
        }
    }
}

async fn connection(host: Arc<Host>, s: UnixStream) -> Result<()> {
    // The socket is 0600, and we check the peer too: only root or our own user may command us.
    let cred = s.peer_cred()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let (r, mut w) = s.into_split();
    if cred.uid() != 0 && cred.uid() != me {
        tracing::warn!("refused control connection from uid {}", cred.uid());
        let resp = Response::Error {
            kind: ErrorKind::Invalid,
            message: "permission denied: marsd takes commands from root only".into(),
        };
        w.write_all(&mars_api::encode(&resp)).await?;
        return Ok(());
    }
    let mut line = Vec::new();
    let mut reader = BufReader::new(r).take(MAX_REQUEST as u64 + 1);
    reader.read_until(b'\n', &mut line).await?;
    let resp = match mars_api::decode::<Request>(line.trim_ascii_end()) {
        Err(e) => Response::Error {
            kind: ErrorKind::Invalid,
            message: format!("bad request: {e}"),
        },
        Ok(req) => {
            tracing::debug!("control request: {req:?}");
            match dispatch(&host, req).await {
                Ok(reply) => Response::Ok { reply },
                Err((kind, message)) => Response::Error { kind, message },
            }
        }
    };
    w.write_all(&mars_api::encode(&resp)).await?;
    w.shutdown().await?;
    Ok(())
}

async fn dispatch(host: &Arc<Host>, req: Request) -> Outcome {
    match req {
        Request::DryRun { request } => match *request {
            Request::DryRun { .. } => Err(invalid("a dry run of a dry run is not a request")),
            r => run(host, r, true).await,
        },
        r => run(host, r, false).await,
    }
}

/// Runs one request; with `dry` (`--dry-run`) every command checks what it would check and
/// answers with what it would do, changing nothing. Requests that change nothing anyway
/// (view, get-link, wait-cluster …) run as they are.
async fn run(host: &Arc<Host>, req: Request, dry: bool) -> Outcome {
    let secs = Duration::from_secs;
    match req {
        Request::Ping => Ok(Reply::Pong {
            host: host.ident.host.to_string(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
        }),
        Request::View { res, window } => {
            let window = secs(window.unwrap_or(60));
            let list = match &res {
                Some(r) => match host.get(r) {
                    Some(h) => vec![h],
                    None => return Err(not_here(host, r).await),
                },
                None => host.all(),
            };
            Ok(Reply::View(
                view::view(host, list, res.is_none(), window).await,
            ))
        }
        Request::CreateCluster { ip } => cluster::create(host, ip, dry).await,
        Request::JoinCluster {
            peer,
            token,
            ip,
            rejoin,
        } => cluster::join(host, &peer, token.as_deref(), ip, rejoin, dry).await,
        Request::JoinToken { ttl } => cluster::join_token(host, ttl, dry).await,
        Request::RenewCertificate { via } => cluster::renew(host, via, dry).await,
        Request::RotateCa { finish } => cluster::rotate_ca(host, finish, dry).await,
        Request::MergeCluster {
            peer,
            name,
            token,
            check,
        } => cluster::merge(host, &peer, name, &token, check || dry).await,
        Request::SplitCluster => cluster::split(host, dry).await,
        Request::LeaveCluster { timeout } => cluster::leave(host, secs(timeout), dry).await,
        Request::WaitCluster { timeout } | Request::UpdateCluster { timeout } => {
            cluster::wait(host, secs(timeout)).await
        }
        Request::DeleteHost {
            host: h,
            force,
            window,
        } => cluster::delete_host(host, &h, force, secs(window.unwrap_or(60)), dry).await,
        Request::SetLinks { pairs } => cluster::set_links(host, pairs, dry).await,
        Request::GetLink { key } => cluster::get_link(host, &key).await,
        Request::ListLinks { prefix } => cluster::list_links(host, prefix).await,
        Request::CreateResource { res, disk, size } => {
            resources::create(host, res, &disk, size, dry).await
        }
        Request::JoinResource { res, disk } => resources::join(host, res, &disk, dry).await,
        Request::SwitchGlobal {
            res,
            switch,
            on,
            timeout,
        } => global::switch(host, res, switch, on, timeout, dry).await,
        other => resources::op(host, other, dry).await,
    }
}
