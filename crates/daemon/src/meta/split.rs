//! `split-cluster`: which groups a cluster falls into and whether it may be split now.
//!
//! A **group** is a connected component of the graph "hosts that share a resource" (from the
//! membership keys `resource-RES/data-HOST`), so every host and every resource is in exactly
//! one group. MARS computes one hop from each host in turn, which puts B into two groups when
//! A and B share one resource and B and C another; here A, B and C are one group. A member
//! without a resource, and a resource without a member, go with the group of the host that
//! runs the command (a cluster of its own for a host that holds nothing is not what one
//! wants); `--dry-run` names them.
//!
//! What is built: the groups, the answers without a change (nothing to split, exit 0) and the
//! refusals (not a CA holder, a rotation/merge in progress, a member unreachable), shown by
//! `split-cluster --dry-run`. The split itself — a new id and CA per other group, and each side
//! forgetting the other ([`mars_meta::Store::forget`]) — is designed in docs/security.md
//! ("Splitting a cluster") but not built: without `--dry-run` the command answers with the
//! plan and refuses ([`SplitRefusal::NotBuilt`]).

use std::collections::{BTreeMap, BTreeSet};

use mars_config::{HostName, ResourceName};
use mars_engine::keys::{self, ResourceKey};
use mars_meta::{MetaError, Store};

use super::cluster::{Cluster, MEMBER_PREFIX, TRUST_MERGE_ADMIT, TRUST_MERGE_INTO};
use crate::identity::Identity;

/// One group of a split: hosts connected by shared resources, and those resources.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Group {
    pub hosts: BTreeSet<HostName>,
    pub resources: BTreeSet<ResourceName>,
}

impl Group {
    /// The host that would issue the certificates of this group's new cluster: its first
    /// member by name (every host computes the same one).
    pub fn issuer(&self) -> Option<&HostName> {
        self.hosts.first()
    }
}

/// The groups a cluster would split into, seen from the host `me` that runs the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPlan {
    /// `groups[0]` is the group of `me`: it keeps the cluster id and CA. The others follow in
    /// the order of their first host's name.
    pub groups: Vec<Group>,
    /// Members without a resource (put into `groups[0]`).
    pub loose_hosts: BTreeSet<HostName>,
    /// Resources without a member (put into `groups[0]`).
    pub loose_resources: BTreeSet<ResourceName>,
}

impl SplitPlan {
    /// The groups of `members` (this host `me` among them) connected by `data` (resource,
    /// member) pairs; `resources` are all resources (a pair naming a host that is no member
    /// counts for neither). Deterministic: the same input gives the same plan on every host.
    pub fn compute(
        me: &HostName,
        members: &BTreeSet<HostName>,
        resources: &BTreeSet<ResourceName>,
        data: &BTreeSet<(ResourceName, HostName)>,
    ) -> SplitPlan {
        // Union-find over the members, by index; the hosts of one resource are united.
        let hosts: Vec<&HostName> = members.iter().collect();
        let index: BTreeMap<&HostName, usize> =
            hosts.iter().enumerate().map(|(i, h)| (*h, i)).collect();
        let mut parent: Vec<usize> = (0..hosts.len()).collect();
        fn find(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        let mut of_resource: BTreeMap<&ResourceName, Vec<usize>> = BTreeMap::new();
        for (r, h) in data {
            if let Some(&i) = index.get(h) {
                of_resource.entry(r).or_default().push(i);
            }
        }
        for idx in of_resource.values() {
            for w in idx.windows(2) {
                let (a, b) = (find(&mut parent, w[0]), find(&mut parent, w[1]));
                parent[a.max(b)] = a.min(b);
            }
        }
        let with_resource: BTreeSet<usize> = of_resource.values().flatten().copied().collect();
        let mut by_root: BTreeMap<usize, Group> = BTreeMap::new();
        for (i, h) in hosts.iter().enumerate() {
            if with_resource.contains(&i) {
                let root = find(&mut parent, i);
                by_root.entry(root).or_default().hosts.insert((*h).clone());
            }
        }
        for (r, idx) in &of_resource {
            let root = find(&mut parent, idx[0]);
            by_root
                .entry(root)
                .or_default()
                .resources
                .insert((*r).clone());
        }
        let loose_hosts: BTreeSet<HostName> = hosts
            .iter()
            .enumerate()
            .filter(|(i, _)| !with_resource.contains(i))
            .map(|(_, h)| (*h).clone())
            .collect();
        let loose_resources: BTreeSet<ResourceName> = resources
            .iter()
            .filter(|r| !of_resource.contains_key(r))
            .cloned()
            .collect();
        // Roots are the smallest index of their component: groups come in the order of their
        // first host's name.
        let mut groups: Vec<Group> = by_root.into_values().collect();
        let mine = groups
            .iter()
            .position(|g| g.hosts.contains(me))
            .map(|i| groups.remove(i))
            .unwrap_or_default();
        let mut first = mine;
        first.hosts.insert(me.clone());
        first.hosts.extend(loose_hosts.iter().cloned());
        first.resources.extend(loose_resources.iter().cloned());
        groups.insert(0, first);
        SplitPlan {
            groups,
            loose_hosts,
            loose_resources,
        }
    }

    /// The plan from this host's metadata: its members (`ips/ip-HOST`), its resources (a
    /// `size` or any `data-HOST` key) and their members.
    pub fn from_store(store: &Store) -> Result<SplitPlan, MetaError> {
        let members: BTreeSet<HostName> = store
            .list_prefix(MEMBER_PREFIX)?
            .iter()
            .filter_map(|e| mars_meta::member_of_key(&e.key))
            .chain(std::iter::once(store.host().clone()))
            .collect();
        let mut resources = BTreeSet::new();
        let mut data = BTreeSet::new();
        for e in store.list_prefix("resource-")? {
            match keys::parse(&e.key) {
                Some((r, ResourceKey::Size)) => {
                    resources.insert(r);
                }
                Some((r, ResourceKey::Data(h))) => {
                    resources.insert(r.clone());
                    data.insert((r, h));
                }
                _ => {}
            }
        }
        Ok(SplitPlan::compute(
            store.host(),
            &members,
            &resources,
            &data,
        ))
    }

    /// Whether there is anything to split.
    pub fn splits(&self) -> bool {
        self.groups.len() > 1
    }

    /// The groups as `--dry-run` shows them, one per line: `#1: HOST,HOST resources R,R`,
    /// which group keeps the id, the issuer of every other one, and the loose hosts and
    /// resources (a refusal, one line, joins them with `; `).
    pub fn describe(&self, cluster: &str) -> Vec<String> {
        let join = |v: Vec<&str>| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(",")
            }
        };
        let mut out = Vec::new();
        for (i, g) in self.groups.iter().enumerate() {
            let role = if i == 0 {
                format!("keeps cluster {cluster} and its CA")
            } else {
                format!(
                    "a new cluster, certificates issued by {}",
                    g.issuer().map_or("-", |h| h.as_str())
                )
            };
            out.push(format!(
                "#{}: {} resources {} ({role})",
                i + 1,
                join(g.hosts.iter().map(|h| h.as_str()).collect()),
                join(g.resources.iter().map(|r| r.as_str()).collect()),
            ));
        }
        if !self.loose_hosts.is_empty() {
            out.push(format!(
                "hosts without a resource stay with #1: {}",
                join(self.loose_hosts.iter().map(|h| h.as_str()).collect())
            ));
        }
        if !self.loose_resources.is_empty() {
            out.push(format!(
                "resources without a member stay with #1: {}",
                join(self.loose_resources.iter().map(|r| r.as_str()).collect())
            ));
        }
        out
    }
}

/// Why `split-cluster` changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitRefusal {
    #[error("split-cluster needs TLS: this host runs --insecure")]
    Insecure,
    #[error("this host is not in a cluster")]
    NoCluster,
    #[error(
        "split-cluster runs on a host that holds this cluster's CA key (tls/ca.key); the \
         groups: {plan}"
    )]
    NotCaHolder { plan: String },
    #[error(
        "a {what} is in progress in cluster {cluster}: let it finish first; the groups: {plan}"
    )]
    InProgress {
        what: &'static str,
        cluster: String,
        plan: String,
    },
    #[error(
        "not every member of cluster {cluster} is reachable from {host} (every member takes \
         part in a split): {}; the groups: {plan}",
        down.join(", ")
    )]
    Unreachable {
        cluster: String,
        host: HostName,
        down: Vec<String>,
        plan: String,
    },
    #[error(
        "cluster {cluster} would split into these groups: {plan}; but the split itself is \
         not built in this version (designed in docs/security.md, \"Splitting a cluster\"): \
         nothing changed. To move a group of hosts to a cluster of its own by hand: leave and \
         delete its resources (the disks are kept), leave-cluster on its hosts, create-cluster \
         and create-resource on the primary's disk there (its data is kept), join-cluster and \
         join-resource on the others (docs/operations.md, \"Merging and splitting clusters\")"
    )]
    NotBuilt { cluster: String, plan: String },
    #[error("reading the metadata: {0}")]
    Meta(String),
}

/// `split-cluster [--dry-run]` on this host: the answer without a change when there is one
/// group only (`Ok`, exit 0); else the checks in order — a CA holder, no rotation or merge
/// in progress, every member reachable — and with `dry` the plan (`Ok`). Without `dry` a plan
/// that passed every check is refused as [`SplitRefusal::NotBuilt`].
pub async fn split_cluster(
    cluster: &Cluster,
    ident: &Identity,
    dry: bool,
) -> Result<String, SplitRefusal> {
    if ident.insecure {
        return Err(SplitRefusal::Insecure);
    }
    let id = ident
        .cluster_id()
        .ok_or(SplitRefusal::NoCluster)?
        .to_string();
    let (plan, merge_keys) = cluster
        .store
        .call(|s| -> Result<_, MetaError> {
            let merging =
                s.value(TRUST_MERGE_INTO)?.is_some() || s.value(TRUST_MERGE_ADMIT)?.is_some();
            Ok((SplitPlan::from_store(s)?, merging))
        })
        .await
        .map_err(|e| SplitRefusal::Meta(e.to_string()))?
        .map_err(|e| SplitRefusal::Meta(e.to_string()))?;
    let lines = plan.describe(&id);
    if !plan.splits() {
        return Ok(format!(
            "nothing to split: every host shares a resource with this group (there is only 1 \
             group)\n{}",
            lines.join("\n")
        ));
    }
    let shown = lines.join("; ");
    let root = &ident.root;
    let meta = |e: anyhow::Error| SplitRefusal::Meta(format!("{e:#}"));
    if crate::root::load_ca(root).map_err(meta)?.is_none() {
        return Err(SplitRefusal::NotCaHolder { plan: shown });
    }
    let trusted = crate::root::load_trust(root).map_err(meta)?.len();
    if merge_keys || crate::root::load_merge_ca(root).map_err(meta)?.is_some() {
        return Err(SplitRefusal::InProgress {
            what: "merge",
            cluster: id,
            plan: shown,
        });
    }
    if trusted > 1 {
        return Err(SplitRefusal::InProgress {
            what: "CA rotation",
            cluster: id,
            plan: shown,
        });
    }
    let down = cluster.unreachable_members(&cluster.members().await);
    if !down.is_empty() {
        return Err(SplitRefusal::Unreachable {
            cluster: id,
            host: ident.host.clone(),
            down,
            plan: shown,
        });
    }
    if dry {
        return Ok(format!(
            "cluster {id} would split into these groups (every member reachable, no CA \
             rotation or merge in progress):\n{}\nnot built in this version: \
             split-cluster without --dry-run refuses",
            lines.join("\n")
        ));
    }
    Err(SplitRefusal::NotBuilt {
        cluster: id,
        plan: shown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: &str) -> HostName {
        HostName::new(n).unwrap()
    }
    fn r(n: &str) -> ResourceName {
        ResourceName::new(n).unwrap()
    }
    fn plan(me: &str, members: &[&str], res: &[&str], data: &[(&str, &str)]) -> SplitPlan {
        SplitPlan::compute(
            &h(me),
            &members.iter().map(|m| h(m)).collect(),
            &res.iter().map(|x| r(x)).collect(),
            &data.iter().map(|(x, m)| (r(x), h(m))).collect(),
        )
    }
    fn names(g: &Group) -> (Vec<&str>, Vec<&str>) {
        (
            g.hosts.iter().map(|h| h.as_str()).collect(),
            g.resources.iter().map(|r| r.as_str()).collect(),
        )
    }

    #[test]
    fn groups_are_connected_components_and_the_runners_comes_first() {
        let members = ["a1", "a2", "b1", "b2", "c1", "c2", "c3"];
        // b1-b2 share rb; c1-c2 share rc1 and c2-c3 share rc2: one group (MARS would put c2
        // into two).
        let data = [
            ("ra", "a1"),
            ("ra", "a2"),
            ("rb", "b1"),
            ("rb", "b2"),
            ("rc1", "c1"),
            ("rc1", "c2"),
            ("rc2", "c2"),
            ("rc2", "c3"),
        ];
        let p = plan("b2", &members, &["ra", "rb", "rc1", "rc2"], &data);
        assert_eq!(p.groups.len(), 3);
        assert_eq!(names(&p.groups[0]), (vec!["b1", "b2"], vec!["rb"]));
        assert_eq!(names(&p.groups[1]), (vec!["a1", "a2"], vec!["ra"]));
        assert_eq!(
            names(&p.groups[2]),
            (vec!["c1", "c2", "c3"], vec!["rc1", "rc2"])
        );
        assert_eq!(p.groups[2].issuer(), Some(&h("c1")));
        assert!(p.splits());
        let text = p.describe("ID").join("\n");
        assert!(
            text.starts_with("#1: b1,b2 resources rb (keeps cluster ID"),
            "{text}"
        );
        assert!(
            text.contains(
                "#3: c1,c2,c3 resources rc1,rc2 (a new cluster, certificates issued by c1)"
            ),
            "{text}"
        );
    }

    #[test]
    fn loose_hosts_and_resources_stay_with_the_runner() {
        // x holds nothing; rz has no member; a data key of a host that is no member counts
        // for nothing.
        let p = plan(
            "x",
            &["a1", "a2", "b1", "x"],
            &["ra", "rb", "rz"],
            &[("ra", "a1"), ("ra", "a2"), ("rb", "b1"), ("rb", "gone")],
        );
        assert_eq!(p.groups.len(), 3);
        assert_eq!(names(&p.groups[0]), (vec!["x"], vec!["rz"]));
        assert_eq!(names(&p.groups[1]), (vec!["a1", "a2"], vec!["ra"]));
        assert_eq!(names(&p.groups[2]), (vec!["b1"], vec!["rb"]));
        let text = p.describe("ID").join("\n");
        assert!(
            text.contains("hosts without a resource stay with #1: x"),
            "{text}"
        );
        assert!(
            text.contains("resources without a member stay with #1: rz"),
            "{text}"
        );
    }

    #[test]
    fn one_group_is_nothing_to_split() {
        let p = plan("a", &["a", "b"], &["r"], &[("r", "a"), ("r", "b")]);
        assert!(!p.splits());
        let p = plan("a", &["a", "b"], &["r"], &[("r", "a")]);
        assert!(!p.splits(), "b holds nothing: it stays with a");
        let p = plan("a", &["a"], &[], &[]);
        assert_eq!(names(&p.groups[0]), (vec!["a"], vec![]));
        assert!(!p.splits());
    }

    #[test]
    fn every_host_computes_the_same_groups() {
        let members = ["a1", "a2", "b1", "b2"];
        let data = [("ra", "a1"), ("ra", "a2"), ("rb", "b1"), ("rb", "b2")];
        fn sets(p: &SplitPlan) -> Vec<(Vec<&str>, Vec<&str>)> {
            let mut v: Vec<_> = p.groups.iter().map(names).collect();
            v.sort();
            v
        }
        let from_a = plan("a2", &members, &["ra", "rb"], &data);
        let from_b = plan("b1", &members, &["ra", "rb"], &data);
        assert_eq!(sets(&from_a), sets(&from_b));
        assert_eq!(names(&from_a.groups[0]).0, vec!["a1", "a2"]);
    }
}
