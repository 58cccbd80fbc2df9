//! MARS's `merge-cluster` family and `split-cluster`.
//!
//! `merge-cluster-list` prints what MARS prints: the cluster's id, its members with their
//! addresses and every resource the metadata knows (to compare two clusters' resource names
//! by hand). `merge-cluster`, `merge-cluster-check` and `split-cluster` are commands of
//! `main.rs` (the daemon merges, `meta/cluster.rs`, and computes a split's groups and checks,
//! `meta/split.rs`).

use anyhow::Result;
use mars_api::{ErrorKind, Reply, Request};

use crate::client::ClientError;
use crate::Cli;

/// The names of the resources in `links` (`KEY VALUE` lines of `lowlevel-get-links
/// resource-`): those with a size key, sorted.
pub fn resources_of(links: &str) -> Vec<String> {
    let mut v: Vec<String> = links
        .lines()
        .filter_map(|l| {
            let key = l.split(' ').next()?;
            let name = key.strip_prefix("resource-")?.strip_suffix("/size")?;
            (!name.contains('/')).then(|| name.to_string())
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// `merge-cluster-list`.
pub fn list(cli: &Cli) -> Result<()> {
    let v = cli.host_view()?;
    let Some(cluster) = &v.cluster else {
        return Err(ClientError::Refused {
            kind: ErrorKind::Invalid,
            message: "this host is in no cluster (create-cluster or join-cluster first)".into(),
        }
        .into());
    };
    let Reply::Value { value } = cli.call(&Request::ListLinks {
        prefix: "resource-".into(),
    })?
    else {
        anyhow::bail!("unexpected answer from marsd");
    };
    let resources = resources_of(&value.unwrap_or_default());
    if cli.json {
        let members: Vec<_> = v
            .members
            .iter()
            .map(|m| serde_json::json!({ "host": m.host, "address": m.address }))
            .collect();
        return cli.emit(&serde_json::json!({
            "uuid": cluster.uuid,
            "members": members,
            "resources": resources,
        }));
    }
    println!("UUID: {}", cluster.uuid);
    println!("IPs:");
    for m in &v.members {
        println!("ips/ip-{} {}", m.host, m.address);
    }
    println!("RESOURCEs:");
    for r in &resources {
        println!("resource-{r}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_the_names_with_a_size() {
        let links = "resource-vm1/data-a /dev/x\nresource-vm1/size 1048576\n\
                     resource-b.2/size 5\nresource-x/sub/size 1\nips/ip-a 1.2.3.4\n\
                     resource-gone/primary a\n";
        assert_eq!(resources_of(links), vec!["b.2", "vm1"]);
    }
}
