//! Cluster commands: create, join, leave, wait/update, delete a member, and the experts' raw
//! key access.

use std::sync::Arc;
use std::time::Duration;

use mars_api::{ErrorKind, Reply};
use mars_config::HostName;

use super::{done, failed, invalid, Outcome};
use crate::host::Host;
use crate::meta::cluster::{CERT_PREFIX, MEMBER_PREFIX};
use crate::root::ClusterFile;

pub async fn create(host: &Arc<Host>, ip: Option<String>, dry: bool) -> Outcome {
    let _g = host.admin.lock().await;
    if let Some(c) = host.ident.cluster() {
        return Err((
            ErrorKind::Exists,
            format!(
                "this host already belongs to cluster {}; create-cluster runs once per cluster",
                c.uuid
            ),
        ));
    }
    let address = advertised_address(host, ip)?;
    if dry {
        return done(format!(
            "would create a new cluster with host {} at {address}: its CA, this host's \
             certificate and key under {}, and the keys {CERT_PREFIX}{0} and {MEMBER_PREFIX}{0}",
            host.ident.host,
            host.ident.root.join("tls").display()
        ));
    }
    let c = ClusterFile {
        uuid: mars_wire::ClusterId(rand::random()).to_string(),
        host: host.ident.host.clone(),
        address,
    };
    // The cluster's CA and this host's certificate (also with --insecure: it costs nothing,
    // and the files are there should the cluster be rebuilt with TLS).
    let ident = host.ident.clone();
    let (cert, authority) = tokio::task::spawn_blocking(move || {
        let ca = mars_tls::Ca::create()?;
        let key = mars_tls::HostKey::generate()?;
        let cert = ca.issue(&ident.host, &key.public_der())?;
        crate::root::save_ca(&ident.root, &ca)?;
        crate::root::save_credentials(
            &ident.root,
            &ca.cert_pem(),
            &mars_tls::pki::cert_pem(&cert),
            &key.pem(),
        )?;
        let creds = mars_tls::Credentials::new(ca.cert().clone(), cert, &key);
        ident.install_credentials(&creds)?;
        let authority = crate::meta::authority::PkiAuthority::new(&creds, &[])?;
        anyhow::Ok((mars_tls::cert_text(&creds.cert), authority))
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(|e| failed(format!("cannot make the cluster's certificates: {e:#}")))?;
    let authority: Option<Arc<dyn mars_meta::Authority>> =
        (!host.ident.insecure).then_some(authority);
    host.store
        .announce(
            authority,
            vec![
                (format!("{CERT_PREFIX}{}", c.host), cert),
                (format!("{MEMBER_PREFIX}{}", c.host), c.address.clone()),
            ],
        )
        .await
        .map_err(failed)?;
    let msg = format!(
        "created cluster {} with host {} at {}",
        c.uuid, c.host, c.address
    );
    host.ident
        .set_cluster(c)
        .map_err(|e| failed(format!("{e:#}")))?;
    done(msg)
}

pub async fn join(
    host: &Arc<Host>,
    peer: &str,
    token: Option<&str>,
    ip: Option<String>,
    rejoin: bool,
    dry: bool,
) -> Outcome {
    let _g = host.admin.lock().await;
    let address = advertised_address(host, ip)?;
    if dry {
        // Checked without contacting the peer: contacting it would use the one-time token up.
        host.cluster.join_check(peer, token, rejoin)?;
        return done(format!(
            "would contact {peer}, {}learn its cluster, copy its metadata and announce {} at \
             {address}",
            if token.is_some() {
                "verify it against the token's pin, get this host's certificate, "
            } else {
                ""
            },
            host.ident.host,
        ));
    }
    let msg = host.cluster.join(peer, token, address, rejoin).await?;
    done(msg)
}

/// The address create-cluster and join-cluster publish for this host: `--ip` (an IP address
/// with an optional port), else the configured `advertise`, else `listen`; never an
/// unspecified one (`0.0.0.0`, `::`), which the peers could not reach.
fn advertised_address(host: &Host, ip: Option<String>) -> Result<String, (ErrorKind, String)> {
    let address = match ip {
        Some(ip) => {
            let ok = ip.parse::<std::net::SocketAddr>().is_ok()
                || ip
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok();
            if !ok {
                return Err(invalid(format!(
                    "--ip {ip:?} is not an IP address with an optional port"
                )));
            }
            ip
        }
        None => host.ident.configured_address(),
    };
    crate::identity::advertisable(&address).map_err(invalid)?;
    Ok(address)
}

/// `renew-certificate [--via HOST]`.
pub async fn renew(host: &Arc<Host>, via: Option<String>, dry: bool) -> Outcome {
    let via = via
        .map(|v| HostName::new(&v).map_err(|e| invalid(e.to_string())))
        .transpose()?;
    let _g = host.admin.lock().await;
    let msg = host.cluster.renew(via, dry).await.map_err(invalid)?;
    done(msg)
}

/// `rotate-ca start|finish`.
pub async fn rotate_ca(host: &Arc<Host>, finish: bool, dry: bool) -> Outcome {
    if host.ident.insecure {
        return Err(invalid(
            "this host runs --insecure: it uses no certificates",
        ));
    }
    if host.ident.cluster_id().is_none() {
        return Err(invalid("this host is not in a cluster"));
    }
    let _g = host.admin.lock().await;
    let msg = if finish {
        host.cluster.rotate_finish(dry).await
    } else {
        host.cluster.rotate_start(dry).await
    }
    .map_err(invalid)?;
    done(msg)
}

/// `merge-cluster [NAME] PEER --token T` and `merge-cluster-check` (`check`).
pub async fn merge(
    host: &Arc<Host>,
    peer: &str,
    name: Option<String>,
    token: &str,
    check: bool,
) -> Outcome {
    let name = name
        .map(|v| HostName::new(&v).map_err(|e| invalid(e.to_string())))
        .transpose()?;
    let _g = host.admin.lock().await;
    let msg = host.cluster.merge(name, peer, token, check).await?;
    done(msg)
}

/// `split-cluster [--dry-run]` (see `meta/split.rs`).
pub async fn split(host: &Arc<Host>, dry: bool) -> Outcome {
    let _g = host.admin.lock().await;
    let msg = crate::meta::split::split_cluster(&host.cluster, &host.ident, dry)
        .await
        .map_err(|e| match e {
            crate::meta::split::SplitRefusal::Meta(_)
            | crate::meta::split::SplitRefusal::IssuerRefused { .. } => failed(e.to_string()),
            _ => invalid(e.to_string()),
        })?;
    done(msg)
}

/// `join-token`: a one-time token for `join-cluster --token`.
pub async fn join_token(host: &Arc<Host>, ttl: u64, dry: bool) -> Outcome {
    if host.ident.cluster_id().is_none() {
        return Err(invalid("this host is not in a cluster"));
    }
    if host.ident.insecure {
        return Err(invalid(
            "this host runs --insecure: peers are not authenticated and join without a token",
        ));
    }
    if dry {
        if crate::root::load_ca(&host.ident.root)
            .ok()
            .flatten()
            .is_none()
        {
            return Err(invalid(
                "this host cannot issue join tokens: it does not hold the cluster CA's key (run \
                 join-token on the host that created the cluster, or copy its tls/ca.key here: \
                 docs/security.md)",
            ));
        }
        return done(format!(
            "would issue a one-time join token valid for {ttl} s (recorded in this host's token book)"
        ));
    }
    let ident = host.ident.clone();
    let token = tokio::task::spawn_blocking(move || ident.issue_token(ttl))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| invalid(format!("{e:#}")))?;
    tracing::info!("issued join token {token:?}, valid for {ttl} s");
    Ok(Reply::Value {
        value: Some(token.to_string()),
    })
}

pub async fn leave(host: &Arc<Host>, timeout: Duration, dry: bool) -> Outcome {
    let _g = host.admin.lock().await;
    if host.ident.cluster_id().is_none() {
        return Err(invalid("this host is not in a cluster"));
    }
    let held = host.names();
    if !held.is_empty() {
        return Err(invalid(format!(
            "this host still holds resources ({}); leave or delete them first",
            held.join(", ")
        )));
    }
    if dry {
        return done(format!(
            "would announce that {} leaves (its membership and certificate keys deleted), wait \
             up to {} s until the other members have it, and forget the cluster here",
            host.ident.host,
            timeout.as_secs()
        ));
    }
    let msg = host.cluster.leave(timeout).await.map_err(failed)?;
    done(msg)
}

pub async fn wait(host: &Arc<Host>, timeout: Duration) -> Outcome {
    if host.ident.cluster_id().is_none() {
        return Err(invalid("this host is not in a cluster"));
    }
    // The only way waiting fails is that members did not answer in time.
    let msg = host
        .cluster
        .wait(timeout)
        .await
        .map_err(|m| (mars_api::ErrorKind::Timeout, m))?;
    done(msg)
}

/// `lowlevel-delete-host`: removes a dead member. A live one (heard from within `window`, as
/// `view --window` shows it alive, or connected to this host now) only with `force`.
pub async fn delete_host(
    host: &Arc<Host>,
    name: &str,
    force: bool,
    window: Duration,
    dry: bool,
) -> Outcome {
    let h = HostName::new(name).map_err(|e| invalid(e.to_string()))?;
    if h == host.ident.host {
        return Err(invalid("cannot delete this host; use leave-cluster"));
    }
    if !host.cluster.members().await.contains_key(&h) {
        return Err((
            ErrorKind::NotFound,
            format!("host {h} is not a member of this cluster"),
        ));
    }
    let view = host
        .cluster
        .member_views(window)
        .await
        .into_iter()
        .find(|m| m.host == h.as_str());
    let (alive, connected, age) =
        view.map_or((false, false, None), |m| (m.alive, m.connected, m.age_secs));
    let heard = age.map_or("never heard from".to_string(), |a| {
        format!("last heard from {a:.0} s ago")
    });
    if (alive || connected) && !force {
        return Err(invalid(format!(
            "host {h} is alive ({heard}, within the {} s window{}): deleting it revokes its \
             certificate and cuts it off while it runs. Make it leave with `marsadm \
             leave-cluster` on {h}, or stop it first; `lowlevel-delete-host --force {h}` \
             removes it anyway",
            window.as_secs(),
            if connected {
                "; connected to this host"
            } else {
                ""
            }
        )));
    }
    // Its certificate goes with it: no member serves it any more.
    let mut gone = vec![format!("{MEMBER_PREFIX}{h}")];
    if host
        .store
        .value(&format!("{CERT_PREFIX}{h}"))
        .await
        .map_err(failed)?
        .is_some()
    {
        gone.push(format!("{CERT_PREFIX}{h}"));
    }
    if dry {
        return done(format!(
            "would remove host {h} from the cluster ({heard}): delete {}",
            gone.join(", ")
        ));
    }
    host.store.write(Vec::new(), gone).await.map_err(failed)?;
    done(format!(
        "removed host {h} from the cluster ({heard}; its certificate is revoked)"
    ))
}

pub async fn set_links(host: &Arc<Host>, pairs: Vec<(String, String)>, dry: bool) -> Outcome {
    if host.ident.cluster_id().is_none() {
        return Err(invalid("this host is not in a cluster"));
    }
    if dry {
        for (k, _) in &pairs {
            mars_meta::validate_key(k).map_err(|e| invalid(e.to_string()))?;
        }
        let what: Vec<String> = pairs.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        return done(format!("would set {}", what.join(", ")));
    }
    let n = host
        .store
        .write(pairs, Vec::new())
        .await
        .map_err(invalid)?
        .len();
    done(format!("set {n} keys"))
}

pub async fn get_link(host: &Arc<Host>, key: &str) -> Outcome {
    mars_meta::validate_key(key).map_err(|e| invalid(e.to_string()))?;
    let value = host.store.value(key).await.map_err(failed)?;
    Ok(Reply::Value { value })
}

/// `lowlevel-get-links [PREFIX]`: every live key under `prefix` as `KEY VALUE` lines.
pub async fn list_links(host: &Arc<Host>, prefix: String) -> Outcome {
    let entries = host
        .store
        .call(move |s| s.list_prefix(&prefix))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))?;
    let mut lines = String::new();
    for e in entries {
        if let Some(v) = e.value {
            lines.push_str(&format!("{} {v}\n", e.key));
        }
    }
    Ok(Reply::Value { value: Some(lines) })
}
