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

pub async fn create(host: &Arc<Host>, ip: Option<String>) -> Outcome {
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
    let address = match ip {
        Some(ip) => {
            let bare = ip.rsplit_once(':').map_or(ip.as_str(), |(h, _)| h);
            if bare.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid(format!("--ip {ip:?} is not an IP address")));
            }
            ip
        }
        None => host.ident.listen.clone(),
    };
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

pub async fn join(host: &Arc<Host>, peer: &str, token: Option<&str>) -> Outcome {
    let _g = host.admin.lock().await;
    let msg = host.cluster.join(peer, token).await?;
    done(msg)
}

/// `renew-certificate [--via HOST]`.
pub async fn renew(host: &Arc<Host>, via: Option<String>) -> Outcome {
    let via = via
        .map(|v| HostName::new(&v).map_err(|e| invalid(e.to_string())))
        .transpose()?;
    let _g = host.admin.lock().await;
    let msg = host.cluster.renew(via).await.map_err(invalid)?;
    done(msg)
}

/// `rotate-ca start|finish`.
pub async fn rotate_ca(host: &Arc<Host>, finish: bool) -> Outcome {
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
        host.cluster.rotate_finish().await
    } else {
        host.cluster.rotate_start().await
    }
    .map_err(invalid)?;
    done(msg)
}

/// `join-token`: a one-time token for `join-cluster --token`.
pub async fn join_token(host: &Arc<Host>, ttl: u64) -> Outcome {
    if host.ident.cluster_id().is_none() {
        return Err(invalid("this host is not in a cluster"));
    }
    if host.ident.insecure {
        return Err(invalid(
            "this host runs --insecure: peers are not authenticated and join without a token",
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

pub async fn leave(host: &Arc<Host>, timeout: Duration) -> Outcome {
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

/// `lowlevel-delete-host`: removes a (dead) member.
pub async fn delete_host(host: &Arc<Host>, name: &str) -> Outcome {
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
    host.store.write(Vec::new(), gone).await.map_err(failed)?;
    done(format!(
        "removed host {h} from the cluster (its certificate is revoked)"
    ))
}

pub async fn set_links(host: &Arc<Host>, pairs: Vec<(String, String)>) -> Outcome {
    if host.ident.cluster_id().is_none() {
        return Err(invalid("this host is not in a cluster"));
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
