//! The sockets: control (marsadm), NBD over Unix and, optionally, NBD over TCP.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::{Context, Result};
use mars_api::{Request, Response, CONTROL_SOCKET, MAX_REQUEST, NBD_SOCKET};
use mars_nbd::{Exports, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};

use crate::state::{Daemon, DaemonExports};

fn bind_unix(path: &std::path::Path, mode: u32) -> Result<UnixListener> {
    // We hold the root lock, so a socket file here is a leftover of a dead daemon.
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// Serves until SIGTERM/SIGINT. Readiness has one meaning: every resource was recovered (in
/// `Daemon::load`, before this runs: the exports of this host's primaries exist) and every
/// listener — NBD over Unix and TCP, the peer port — is bound and accepting. The control socket
/// is bound only after all of them, and READY=1 is sent after that, so a `marsadm` answer (or a
/// successful connect) implies the daemon serves everything. Until then the socket files of a
/// killed predecessor refuse connections (ECONNREFUSED), which a client can tell from "up".
pub async fn run(daemon: Arc<Daemon>) -> Result<()> {
    let nbd_unix = bind_unix(&daemon.root.join(NBD_SOCKET), 0o600)?;
    let nbd_tcp = match daemon.nbd_tcp {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen for NBD on {a}"))?,
        ),
        None => None,
    };
    let peers = TcpListener::bind(&daemon.listen)
        .await
        .with_context(|| format!("cannot listen for peers on {}", daemon.listen))?;
    tracing::info!("listening for peers on {}", daemon.listen);
    tokio::spawn(crate::cluster::listen(daemon.clone(), peers));
    tokio::spawn(crate::cluster::supervise(daemon.clone()));
    let exports: Arc<dyn Exports> = Arc::new(DaemonExports(daemon.clone()));
    let cfg = Arc::new(ServerConfig::default());

    {
        let (exports, cfg) = (exports.clone(), cfg.clone());
        tokio::spawn(async move {
            loop {
                match nbd_unix.accept().await {
                    Ok((s, _)) => {
                        let (e, c) = (exports.clone(), cfg.clone());
                        tokio::spawn(async move {
                            if let Err(err) = mars_nbd::serve(s, e, c).await {
                                tracing::warn!("NBD connection (unix): {err}");
                            }
                        });
                    }
                    Err(e) => tracing::error!("NBD accept (unix): {e}"),
                }
            }
        });
    }
    if let Some(l) = nbd_tcp {
        let (exports, cfg) = (exports.clone(), cfg.clone());
        tracing::info!("serving NBD on tcp {}", l.local_addr()?);
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, peer)) => {
                        let _ = s.set_nodelay(true);
                        let (e, c) = (exports.clone(), cfg.clone());
                        tokio::spawn(async move {
                            if let Err(err) = mars_nbd::serve(s, e, c).await {
                                tracing::warn!("NBD connection from {peer}: {err}");
                            }
                        });
                    }
                    Err(e) => tracing::error!("NBD accept (tcp): {e}"),
                }
            }
        });
    }
    // Last: accepting here is the daemon's "ready" (see above).
    let control = bind_unix(&daemon.root.join(CONTROL_SOCKET), 0o600)?;
    {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            loop {
                match control.accept().await {
                    Ok((s, _)) => {
                        let d = daemon.clone();
                        tokio::spawn(async move {
                            if let Err(e) = control_conn(d, s).await {
                                tracing::warn!("control connection: {e:#}");
                            }
                        });
                    }
                    Err(e) => tracing::error!("control accept: {e}"),
                }
            }
        });
    }

    tokio::spawn(crate::lifecycle::reconcile_loop(daemon.clone()));

    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status_text(&daemon)),
        ],
    );
    tokio::spawn(watchdog(daemon.clone()));
    tracing::info!(
        "ready: control {}",
        daemon.root.join(CONTROL_SOCKET).display()
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("stopping");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    Ok(())
}

/// `STATUS=` for `systemctl status marsd`: how many resources, and which this host serves.
fn status_text(d: &Daemon) -> String {
    let all = d.all();
    let primary: Vec<String> = all
        .iter()
        .filter(|r| r.volume().is_some())
        .map(|r| r.cfg.name.to_string())
        .collect();
    format!(
        "host {}: {} resource(s), primary of {}",
        d.host,
        all.len(),
        if primary.is_empty() {
            "none".to_string()
        } else {
            primary.join(" ")
        }
    )
}

/// Under `WatchdogSec=`, pings systemd at half the interval, but only while the reconcile loop
/// keeps finishing rounds: a loop stuck on a lock or in I/O stops the pings, and systemd
/// restarts us (the loop is what fails over stacks and publishes our state). Also refreshes
/// `STATUS=` every few seconds.
async fn watchdog(d: Arc<Daemon>) {
    let mut usec = 0u64;
    let enabled = sd_notify::watchdog_enabled(false, &mut usec);
    let interval = if enabled {
        std::time::Duration::from_micros(usec / 2).max(std::time::Duration::from_millis(100))
    } else {
        std::time::Duration::from_secs(5)
    };
    // A round normally takes well below a second; allow for a slow one before giving up.
    let stuck_after = std::time::Duration::from_micros(usec)
        .max(std::time::Duration::from_secs(10))
        .min(std::time::Duration::from_secs(120));
    if enabled {
        tracing::info!("systemd watchdog: pinging every {interval:?}");
    }
    loop {
        tokio::time::sleep(interval).await;
        let last = *d.last_round.lock().unwrap_or_else(|e| e.into_inner());
        let d2 = d.clone();
        let status = tokio::task::spawn_blocking(move || status_text(&d2))
            .await
            .unwrap_or_default();
        let mut states = vec![sd_notify::NotifyState::Status(&status)];
        if enabled {
            if last.elapsed() < stuck_after {
                states.push(sd_notify::NotifyState::Watchdog);
            } else {
                tracing::error!(
                    "the reconcile loop has not finished a round for {:?}: no watchdog ping",
                    last.elapsed()
                );
            }
        }
        let _ = sd_notify::notify(false, &states);
    }
}

async fn control_conn(daemon: Arc<Daemon>, s: UnixStream) -> Result<()> {
    // The socket is 0600, and we check the peer too: only root or our own user may command us.
    let cred = s.peer_cred()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let (r, mut w) = s.into_split();
    if cred.uid() != 0 && cred.uid() != me {
        tracing::warn!("refused control connection from uid {}", cred.uid());
        let resp = Response::Error {
            kind: mars_api::ErrorKind::Invalid,
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
            kind: mars_api::ErrorKind::Invalid,
            message: format!("bad request: {e}"),
        },
        Ok(req) => {
            tracing::debug!("control request: {req:?}");
            let d = daemon.clone();
            let secs = std::time::Duration::from_secs;
            let outcome = match req {
                Request::JoinCluster { peer } => Ok(crate::cluster::join(d, &peer).await),
                Request::LeaveCluster { timeout } => {
                    Ok(crate::cluster::leave(d, secs(timeout)).await)
                }
                Request::WaitCluster { timeout } => {
                    Ok(crate::cluster::wait(d, secs(timeout)).await)
                }
                Request::UpdateCluster { timeout } => {
                    Ok(crate::cluster::update(d, secs(timeout)).await)
                }
                Request::Primary {
                    res,
                    force,
                    timeout,
                } => Ok(crate::roles::primary(d, res, force, secs(timeout)).await),
                req => tokio::task::spawn_blocking(move || d.handle(req)).await,
            };
            match outcome {
                Ok(Ok(reply)) => Response::Ok { reply },
                Ok(Err(refusal)) => Response::Error {
                    kind: refusal.0,
                    message: refusal.1,
                },
                Err(e) => Response::Error {
                    kind: mars_api::ErrorKind::Failed,
                    message: format!("internal error: {e}"),
                },
            }
        }
    };
    w.write_all(&mars_api::encode(&resp)).await?;
    w.shutdown().await?;
    Ok(())
}
