//! Cluster commands: create, join, leave, wait/update, delete a member, and the experts' raw
//! key access.

use std::sync::Arc;
use std::time::Duration;

use mars_api::{ErrorKind, Reply};
use mars_config::HostName;

use super::{done, failed, invalid, Outcome};
use crate::host::Host;
use crate::meta::cluster::MEMBER_PREFIX;
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
    host.store
        .write(
            vec![(format!("{MEMBER_PREFIX}{}", c.host), c.address.clone())],
            Vec::new(),
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

pub async fn join(host: &Arc<Host>, peer: &str) -> Outcome {
    let _g = host.admin.lock().await;
    let msg = host.cluster.join(peer).await?;
    done(msg)
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
    let msg = host.cluster.wait(timeout).await.map_err(failed)?;
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
    host.store
        .write(Vec::new(), vec![format!("{MEMBER_PREFIX}{h}")])
        .await
        .map_err(failed)?;
    done(format!("removed host {h} from the cluster"))
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
