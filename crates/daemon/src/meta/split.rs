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
//! The answers without a change (nothing to split, exit 0) and the refusals (not a CA
//! holder, a rotation, merge or split in progress, a member unreachable) come first;
//! `split-cluster --dry-run` stops there and shows the groups.
//!
//! The split itself (docs/security.md, "Splitting a cluster"), for every group Gi but the
//! runner's own:
//!
//! 1. the runner S asks Gi's issuer Ii ([`Group::issuer`]) with a `SplitRequest` on its
//!    authenticated metadata stream; Ii computes the groups as S does, refuses a list that
//!    differs, makes a new cluster id and CA (its key stays on Ii: `tls/ca-split-Ii.key`) and
//!    answers `SplitGrant` ([`serve_request`]);
//! 2. S endorses the new CA with the cluster CA (`Endorse::Split`, over the id and the
//!    [`group_digest`]) and publishes [`split_key`] = [`SplitRecord`];
//! 3. every host follows it ([`follow`]): trusts the new CA (`tls/ca-split-Ii.crt`); a host
//!    of Gi renews its certificate from Ii, who issues from the new CA for Gi's hosts only;
//! 4. a holder of the cluster CA's key outside Gi, once every host of Gi has a certificate of
//!    the new CA (or was deleted), publishes the end ([`done_key`], `Endorse::SplitDone`);
//! 5. on sight of the end a host of Gi forgets every other host and resource
//!    ([`mars_meta::Store::forget`]: no deletions written), takes the new id and makes the
//!    new CA its cluster CA (every other CA file and its tokens go); every other host stops
//!    trusting the new CA and forgets Gi's hosts and resources.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mars_config::{HostName, ResourceName};
use mars_engine::keys::{self, ResourceKey};
use mars_meta::{MetaError, Store};
use mars_wire::{ClusterId, Message};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_rustls::rustls::pki_types::CertificateDer;

use super::cluster::{Cluster, MEMBER_PREFIX, TRUST_MERGE_ADMIT, TRUST_MERGE_INTO};
use crate::identity::Identity;
use crate::root;

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
        let me = store.host().clone();
        SplitPlan::from_store_as(store, &me)
    }

    /// The plan as host `me` computes it from the same metadata (the issuer of a group checks
    /// the request of the host that runs the split this way: loose hosts and resources go
    /// with the runner's group).
    pub fn from_store_as(store: &Store, me: &HostName) -> Result<SplitPlan, MetaError> {
        let members: BTreeSet<HostName> = store
            .list_prefix(MEMBER_PREFIX)?
            .iter()
            .filter_map(|e| mars_meta::member_of_key(&e.key))
            .chain(std::iter::once(store.host().clone()))
            .chain(std::iter::once(me.clone()))
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
        Ok(SplitPlan::compute(me, &members, &resources, &data))
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

/// How long `split-cluster` waits for the split to end (every host of the groups that leave
/// renewed, the end published and followed here) before it answers that it goes on.
const SPLIT_WAIT: Duration = Duration::from_secs(120);
/// How long the issuer of a group keeps a new CA that no split record names (the runner
/// failed between the grant and the record): then its files go.
const UNANNOUNCED_TTL: Duration = Duration::from_secs(60);
/// How long a host outside a group that left keeps trusting its new CA and its hosts after
/// the end, unless it delivered the end to every one of them before: the group's hosts learn
/// of the end from this side (they trust nothing else yet), and one that has not cannot
/// finish once every host here forgot it. A connected host gets the end within a second (it
/// is notified of every change); one that got it from another host of this side stops asking
/// here, so this host cannot always tell — measured in the lab, the grace is what the
/// staying side then waits.
const END_GRACE: Duration = Duration::from_secs(10);
/// How long the runner waits for an issuer's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a split is recorded (shared keys: the id in hex has no `-HOST` suffix, so no host
/// owns them). `trust/split/ID` (ID = the new cluster's id, 32 hex digits) =
/// `ISSUER HOSTS RESOURCES ENDORSEMENT` ([`SplitRecord`]); `trust/split/ID/done` = the end,
/// `Endorse::SplitDone` of the new CA by the cluster CA.
pub const SPLIT_PREFIX: &str = "trust/split/";

/// The key of the split into cluster `id`.
pub fn split_key(id: ClusterId) -> String {
    let hex: String = id.0.iter().map(|b| format!("{b:02x}")).collect();
    format!("{SPLIT_PREFIX}{hex}")
}

/// The key of the end of the split into cluster `id`.
pub fn done_key(id: ClusterId) -> String {
    format!("{}/done", split_key(id))
}

/// SHA-256 over the group's names, what the endorsements bind (so no member can change which
/// hosts and resources go):
///
/// ```text
/// "mars split group v1\0" + for each host (sorted): name + "\n"
///                         + "\0" + for each resource (sorted): name + "\n"
/// ```
pub fn group_digest(g: &Group) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"mars split group v1\0");
    for host in &g.hosts {
        h.update(host.as_str().as_bytes());
        h.update(b"\n");
    }
    h.update(b"\0");
    for r in &g.resources {
        h.update(r.as_str().as_bytes());
        h.update(b"\n");
    }
    h.finalize().into()
}

/// The value of [`split_key`]: `ISSUER HOSTS RESOURCES ENDORSEMENT`, `HOSTS` and `RESOURCES`
/// comma-separated (`-` for none), `ENDORSEMENT` the cluster CA's `Endorse::Split` of the
/// new CA (`x509:CERT SIGNATURE`, one space inside). Bounded by the store's value length: a
/// group too large for it is refused when the record is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitRecord {
    pub issuer: HostName,
    pub group: Group,
    pub endorsement: String,
}

impl SplitRecord {
    pub fn encode(&self) -> String {
        let list = |v: Vec<&str>| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(",")
            }
        };
        format!(
            "{} {} {} {}",
            self.issuer,
            list(self.group.hosts.iter().map(|h| h.as_str()).collect()),
            list(self.group.resources.iter().map(|r| r.as_str()).collect()),
            self.endorsement
        )
    }

    /// `None` for anything malformed (a bad name, no hosts, the issuer not the group's).
    pub fn decode(text: &str) -> Option<SplitRecord> {
        let mut it = text.splitn(4, ' ');
        let issuer = HostName::new(it.next()?).ok()?;
        let hosts: BTreeSet<HostName> = it
            .next()?
            .split(',')
            .map(HostName::new)
            .collect::<Result<_, _>>()
            .ok()?;
        let resources: BTreeSet<ResourceName> = match it.next()? {
            "-" => BTreeSet::new(),
            list => list
                .split(',')
                .map(ResourceName::new)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        let endorsement = it.next()?.to_string();
        let group = Group { hosts, resources };
        (group.issuer() == Some(&issuer)).then_some(SplitRecord {
            issuer,
            group,
            endorsement,
        })
    }
}

/// A split this host trusts: its record was endorsed by a CA this host trusts.
#[derive(Debug, Clone)]
struct Split {
    id: ClusterId,
    record: SplitRecord,
    /// The new cluster's CA.
    ca: CertificateDer<'static>,
    /// The stamp of the end, once it was published (and endorsed).
    done: Option<u64>,
}

/// The splits recorded in `store` whose records a CA in `trust` endorsed — the cluster CA
/// only ([`cluster_ca`]): a split CA is trusted during its split, but its holder (the group's
/// issuer) must not be able to start or end another.
fn splits(store: &Store, trust: &[CertificateDer<'static>]) -> Result<Vec<Split>, MetaError> {
    let entries = store.list_prefix(SPLIT_PREFIX)?;
    let by_key: BTreeMap<&str, &mars_meta::Entry> =
        entries.iter().map(|e| (e.key.as_str(), e)).collect();
    let mut out = Vec::new();
    for e in &entries {
        let Some(hex) = e.key.strip_prefix(SPLIT_PREFIX) else {
            continue;
        };
        if hex.contains('/') {
            continue;
        }
        let (Ok(id), Some(record)) = (
            ClusterId::parse(hex),
            e.value.as_deref().and_then(SplitRecord::decode),
        ) else {
            continue;
        };
        let digest = group_digest(&record.group);
        let Ok(ca) = mars_tls::endorsed(
            &record.endorsement,
            mars_tls::Endorse::Split {
                cluster: id.0,
                group: digest,
            },
            trust,
        ) else {
            continue;
        };
        let done = by_key.get(done_key(id).as_str()).and_then(|d| {
            let text = d.value.as_deref()?;
            let ended = mars_tls::endorsed(
                text,
                mars_tls::Endorse::SplitDone {
                    cluster: id.0,
                    group: digest,
                },
                trust,
            )
            .ok()?;
            (ended == ca).then_some(d.stamp)
        });
        out.push(Split {
            id,
            record,
            ca,
            done,
        });
    }
    Ok(out)
}

/// The CAs a split record must be endorsed by: `ca.crt` only.
fn cluster_ca(root: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    Ok(root::load_cluster_ca(root)?.into_iter().collect())
}

/// What the split runs on this host besides the command.
#[derive(Debug, Default)]
pub struct SplitState {
    /// A renewal of this host's certificate from its group's issuer runs.
    renewing: AtomicBool,
    /// Ends seen here (by the new cluster's id): when, and this store's change number then
    /// (delivered to a host of the group, that host has the end).
    ended: std::sync::Mutex<BTreeMap<[u8; 16], (std::time::Instant, u64)>>,
}

/// Why `split-cluster` changes nothing, or stopped.
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
        "{issuer}, the issuer of group {group}, refused the split: {reason} (nothing changed \
         for that group{started})"
    )]
    IssuerRefused {
        issuer: HostName,
        group: String,
        reason: String,
        /// The groups that were split off before (their splits go on).
        started: String,
    },
    #[error("reading the metadata: {0}")]
    Meta(String),
}

/// `split-cluster [--dry-run]` on this host: the answer without a change when there is one
/// group only (`Ok`, exit 0); else the checks in order — a CA holder, no rotation, merge or
/// split in progress, every member reachable — and with `dry` the plan (`Ok`). Without `dry`
/// the split: every other group asked, its new CA endorsed and recorded; then it waits (up to
/// [`SPLIT_WAIT`]) until every split ended here.
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
    let root = &ident.root;
    let meta = |e: anyhow::Error| SplitRefusal::Meta(format!("{e:#}"));
    let trust = root::load_trust(root).map_err(meta)?;
    let t = cluster_ca(root).map_err(meta)?;
    let (plan, merge_keys, splitting) = cluster
        .store
        .call(move |s| -> Result<_, MetaError> {
            let merging =
                s.value(TRUST_MERGE_INTO)?.is_some() || s.value(TRUST_MERGE_ADMIT)?.is_some();
            let splitting = splits(s, &t)?.iter().any(|x| x.done.is_none());
            Ok((SplitPlan::from_store(s)?, merging, splitting))
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
    let Some(ca) = root::load_ca(root).map_err(meta)? else {
        return Err(SplitRefusal::NotCaHolder { plan: shown });
    };
    if splitting || !root::load_split_cas(root).map_err(meta)?.is_empty() {
        return Err(SplitRefusal::InProgress {
            what: "split",
            cluster: id,
            plan: shown,
        });
    }
    if merge_keys || root::load_merge_ca(root).map_err(meta)?.is_some() {
        return Err(SplitRefusal::InProgress {
            what: "merge",
            cluster: id,
            plan: shown,
        });
    }
    if trust.len() > 1 {
        return Err(SplitRefusal::InProgress {
            what: "CA rotation",
            cluster: id,
            plan: shown,
        });
    }
    let members = cluster.members().await;
    let down = cluster.unreachable_members(&members);
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
             rotation, merge or split in progress):\n{}",
            lines.join("\n")
        ));
    }
    let this = ident.cluster_id().ok_or(SplitRefusal::NoCluster)?;
    let mut started: Vec<(ClusterId, &Group)> = Vec::new();
    for g in &plan.groups[1..] {
        let shown_group = describe_group(g);
        let refused =
            |reason: String, started: &[(ClusterId, &Group)]| SplitRefusal::IssuerRefused {
                issuer: g.issuer().cloned().unwrap_or_else(|| ident.host.clone()),
                group: shown_group.clone(),
                reason,
                started: if started.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; going on: {}",
                        started
                            .iter()
                            .map(|(i, g)| format!("{} into cluster {i}", describe_group(g)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
            };
        let Some(issuer) = g.issuer() else {
            continue;
        };
        let Some(addr) = members.get(issuer) else {
            return Err(refused("no member of this cluster".into(), &started));
        };
        let (new_id, new_ca) = ask(cluster, issuer, addr, this, g)
            .await
            .map_err(|e| refused(format!("{e:#}"), &started))?;
        let endorsement = ca.endorse(
            mars_tls::Endorse::Split {
                cluster: new_id.0,
                group: group_digest(g),
            },
            &new_ca,
        );
        let record = SplitRecord {
            issuer: issuer.clone(),
            group: g.clone(),
            endorsement,
        };
        cluster
            .store
            .write(vec![(split_key(new_id), record.encode())], Vec::new())
            .await
            .map_err(|e| refused(format!("recording the split: {e}"), &started))?;
        tracing::info!(
            "split-cluster: {} becomes cluster {new_id} (certificates issued by {issuer}, \
             new CA sha256:{})",
            describe_group(g),
            mars_tls::fingerprint(&new_ca)
        );
        started.push((new_id, g));
    }
    cluster.poke.notify_waiters();
    // The end: every split ended and was followed here (the group's hosts forgotten).
    let deadline = tokio::time::Instant::now() + SPLIT_WAIT;
    let gone: BTreeSet<HostName> = started
        .iter()
        .flat_map(|(_, g)| g.hosts.iter().cloned())
        .collect();
    let ended = loop {
        let g = gone.clone();
        let all = cluster
            .store
            .call(move |s| g.iter().all(|h| s.forgotten().hosts.contains_key(h)))
            .await
            .map_err(|e| SplitRefusal::Meta(e.to_string()))?;
        if all {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let list = started
        .iter()
        .map(|(i, g)| format!("{} is cluster {i}", describe_group(g)))
        .collect::<Vec<_>>()
        .join("\n");
    if ended {
        Ok(format!(
            "cluster {id} split: {} (keeps cluster {id} and its CA)\n{list}",
            describe_group(&plan.groups[0])
        ))
    } else {
        Ok(format!(
            "cluster {id} splits (goes on: every host of a group that leaves renews its \
             certificate from the group's issuer; see `view all`):\n{list}"
        ))
    }
}

fn describe_group(g: &Group) -> String {
    let join = |v: Vec<&str>| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(",")
        }
    };
    format!(
        "{} resources {}",
        join(g.hosts.iter().map(|h| h.as_str()).collect()),
        join(g.resources.iter().map(|r| r.as_str()).collect())
    )
}

/// One `SplitRequest` to `issuer` at `addr` over this host's authenticated metadata stream:
/// the new cluster's id and CA.
async fn ask(
    cluster: &Cluster,
    issuer: &HostName,
    addr: &str,
    this: ClusterId,
    g: &Group,
) -> anyhow::Result<(ClusterId, CertificateDer<'static>)> {
    let mut s = cluster.connect_member(issuer, addr, this).await?;
    crate::peer::send(
        &mut s.w,
        &Message::SplitRequest {
            hosts: g.hosts.iter().cloned().collect(),
            resources: g.resources.iter().cloned().collect(),
        },
    )
    .await?;
    s.w.flush().await?;
    loop {
        match s.frames.next_within(ANSWER_TIMEOUT).await? {
            Message::SplitGrant { cluster: id, ca } => {
                let ca = CertificateDer::from(ca);
                // A CA certificate that does not parse is refused before it is endorsed.
                mars_tls::spki_pin(&ca).map_err(|e| anyhow::anyhow!("its CA: {e}"))?;
                if id == this.0 || id == ClusterId::UNKNOWN.0 {
                    anyhow::bail!("it answered with an unusable cluster id");
                }
                return Ok((ClusterId(id), ca));
            }
            Message::Notify { .. } => continue,
            Message::Refuse { reason, .. } => anyhow::bail!("{reason}"),
            other => anyhow::bail!("unexpected answer: {}", crate::peer::describe(&other)),
        }
    }
}

/// The issuer's side of `split-cluster` (a `SplitRequest` from member `asker`): the answer,
/// `SplitGrant` or `Refuse`.
pub async fn serve_request(
    cluster: &Cluster,
    asker: &HostName,
    hosts: Vec<HostName>,
    resources: Vec<ResourceName>,
) -> Message {
    match grant(cluster, asker, hosts, resources).await {
        Ok(m) => m,
        Err(reason) => {
            tracing::warn!("refused the split asked by {asker}: {reason}");
            Message::Refuse {
                kind: mars_wire::RefuseKind::Other,
                reason,
            }
        }
    }
}

async fn grant(
    cluster: &Cluster,
    asker: &HostName,
    hosts: Vec<HostName>,
    resources: Vec<ResourceName>,
) -> Result<Message, String> {
    let ident = &cluster.ident;
    let me = ident.host.clone();
    let this = ident.cluster_id().ok_or("this host is not in a cluster")?;
    let e = |e: anyhow::Error| format!("{e:#}");
    let _files = cluster.tls_files.lock().await;
    let want = Group {
        hosts: hosts.into_iter().collect(),
        resources: resources.into_iter().collect(),
    };
    let trust = cluster_ca(&ident.root).map_err(e)?;
    let a = asker.clone();
    let (plan, splitting) = cluster
        .store
        .call(move |s| -> Result<_, MetaError> {
            Ok((
                SplitPlan::from_store_as(s, &a)?,
                splits(s, &trust)?.iter().any(|x| x.done.is_none()),
            ))
        })
        .await
        .map_err(|x| x.to_string())?
        .map_err(|x| x.to_string())?;
    if splitting || !root::load_split_cas(&ident.root).map_err(e)?.is_empty() {
        return Err(format!("a split of cluster {this} is in progress on {me}"));
    }
    if root::load_trust(&ident.root).map_err(e)?.len() > 1 {
        return Err(format!(
            "a CA rotation or a merge is in progress in cluster {this} (seen on {me})"
        ));
    }
    let Some(mine) = plan.groups.iter().skip(1).find(|g| g.hosts.contains(&me)) else {
        return Err(format!(
            "{me} is in the group of {asker} here, it does not leave"
        ));
    };
    if mine.issuer() != Some(&me) {
        return Err(format!(
            "the issuer of this group is {}, not {me}",
            mine.issuer().map_or("-", |h| h.as_str())
        ));
    }
    if *mine != want {
        return Err(format!(
            "the group differs here: {} (asked: {}; the metadata of one of the two hosts is \
             behind, try again)",
            describe_group(mine),
            describe_group(&want)
        ));
    }
    let ca = mars_tls::Ca::create().map_err(|x| x.to_string())?;
    let id = ClusterId(rand::random());
    let made = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let file = root::SplitFile {
        cluster: id.to_string(),
        hosts: want.hosts.iter().cloned().collect(),
        resources: want.resources.iter().cloned().collect(),
        made,
    };
    root::save_split_ca(&ident.root, &me, ca.cert(), Some((&ca.key_pem(), &file))).map_err(e)?;
    cluster.reload_credentials().await.map_err(e)?;
    tracing::info!(
        "split: {asker} splits {} off into cluster {id}; its CA sha256:{} is here (this host \
         issues its certificates)",
        describe_group(&want),
        mars_tls::fingerprint(ca.cert())
    );
    Ok(Message::SplitGrant {
        cluster: id.0,
        ca: ca.cert().to_vec(),
    })
}

/// The supervisor's part of a split (called on every round): follows the records (see the
/// module documentation, steps 3 to 5).
pub async fn follow(cluster: &Arc<Cluster>) -> anyhow::Result<()> {
    let ident = cluster.ident.clone();
    if ident.insecure || ident.peer_tls().is_err() || ident.cluster_id().is_none() {
        return Ok(());
    }
    let me = ident.host.clone();
    let root = ident.root.clone();
    let _files = cluster.tls_files.lock().await;
    let trust = root::load_trust(&root)?;
    let t = cluster_ca(&root)?;
    let found = cluster.store.call(move |s| splits(s, &t)).await??;
    drop_unannounced(cluster, &found).await?;
    for split in found {
        let Split {
            id,
            record,
            ca,
            done,
        } = split;
        let mine = record.group.hosts.contains(&me);
        match done {
            None => {
                if !trust.contains(&ca) {
                    root::save_split_ca(&root, &record.issuer, &ca, None)?;
                    cluster.reload_credentials().await?;
                    tracing::info!(
                        "trusting the CA of cluster {id} too ({} splits off into it): sha256:{}",
                        describe_group(&record.group),
                        mars_tls::fingerprint(&ca)
                    );
                }
                if mine {
                    let creds = root::load_credentials(&root)?
                        .ok_or_else(|| anyhow::anyhow!("this host has no certificate"))?;
                    if !mars_tls::issued_by(&creds.cert, &ca)
                        && !cluster.split.renewing.swap(true, Ordering::SeqCst)
                    {
                        tokio::spawn(renew(cluster.clone(), record.issuer.clone(), ca.clone()));
                    }
                } else if let Some(holder) = root::load_ca(&root)? {
                    end_when_renewed(cluster, id, &record, &ca, &holder).await?;
                }
            }
            Some(stamp) if mine => {
                finish_here(cluster, id, &record, stamp).await?;
                // Every other record is of the cluster this host left.
                break;
            }
            Some(stamp) => {
                if !delivered(cluster, id, &record).await? {
                    continue;
                }
                let r = record.clone();
                let forgotten = cluster
                    .store
                    .call(move |s| {
                        r.group
                            .hosts
                            .iter()
                            .all(|h| s.forgotten().hosts.get(h).is_some_and(|&g| g >= stamp))
                    })
                    .await?;
                if root::load_split_cas(&root)?.contains_key(&record.issuer) {
                    root::remove_split_ca(&root, &record.issuer, false)?;
                    cluster.reload_credentials().await?;
                }
                if !forgotten {
                    let (h, r) = (record.group.hosts.clone(), record.group.resources.clone());
                    let report = cluster
                        .store
                        .call(move |s| s.forget(&h, &r, stamp))
                        .await??;
                    tracing::info!(
                        "the split of {} into cluster {id} is over: forgot its hosts and \
                         resources here ({} entries), its CA is no longer trusted",
                        describe_group(&record.group),
                        report.removed
                    );
                    cluster.poke.notify_waiters();
                }
            }
        }
    }
    Ok(())
}

/// Outside the group, after the end: whether this host delivered the end to every host of
/// the group, or [`END_GRACE`] passed since it saw the end.
async fn delivered(cluster: &Cluster, id: ClusterId, record: &SplitRecord) -> anyhow::Result<bool> {
    let seen = cluster
        .split
        .ended
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id.0)
        .copied();
    let (at, seq) = match seen {
        Some(s) => s,
        None => {
            let seq = cluster.store.call(|s| s.local_seq()).await?;
            let s = (std::time::Instant::now(), seq);
            cluster
                .split
                .ended
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.0, s);
            s
        }
    };
    Ok(at.elapsed() >= END_GRACE
        || record
            .group
            .hosts
            .iter()
            .all(|h| cluster.served_to(h) >= seq))
}

/// On a holder of the cluster CA's key outside the group: publishes the end once every host
/// of the group has a certificate of the new CA (or was deleted).
async fn end_when_renewed(
    cluster: &Cluster,
    id: ClusterId,
    record: &SplitRecord,
    ca: &CertificateDer<'static>,
    holder: &mars_tls::Ca,
) -> anyhow::Result<()> {
    let hosts = record.group.hosts.clone();
    let c = ca.clone();
    let renewed = cluster
        .store
        .call(move |s| -> Result<bool, MetaError> {
            let deleted: BTreeSet<HostName> = s
                .list_prefix_with_tombstones(MEMBER_PREFIX)?
                .into_iter()
                .filter(|e| e.value.is_none())
                .filter_map(|e| mars_meta::member_of_key(&e.key))
                .collect();
            for h in &hosts {
                if deleted.contains(h) {
                    continue;
                }
                let cert = s
                    .value(&format!("{}{h}", super::cluster::CERT_PREFIX))?
                    .and_then(|v| mars_tls::cert_from_text(&v).ok());
                if !cert.is_some_and(|c2| mars_tls::issued_by(&c2, &c)) {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await??;
    if !renewed {
        return Ok(());
    }
    let text = holder.endorse(
        mars_tls::Endorse::SplitDone {
            cluster: id.0,
            group: group_digest(&record.group),
        },
        ca,
    );
    cluster
        .store
        .write(vec![(done_key(id), text)], Vec::new())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!(
        "every host of {} has a certificate of cluster {id}'s CA: the split is over",
        describe_group(&record.group)
    );
    Ok(())
}

/// The end on a host of the group that left: forget the rest, take the new id, make the new
/// CA the cluster CA. Ordered so that a crash in between repeats it on the next round (the
/// files go last: until then the record still verifies here).
async fn finish_here(
    cluster: &Cluster,
    id: ClusterId,
    record: &SplitRecord,
    stamp: u64,
) -> anyhow::Result<()> {
    let ident = &cluster.ident;
    let g = record.group.clone();
    let report = cluster
        .store
        .call(move |s| -> Result<_, MetaError> {
            let all = SplitPlan::from_store(s)?;
            let hosts: BTreeSet<HostName> = all
                .groups
                .iter()
                .flat_map(|x| x.hosts.iter())
                .filter(|h| !g.hosts.contains(*h))
                .cloned()
                .collect();
            let resources: BTreeSet<ResourceName> = all
                .groups
                .iter()
                .flat_map(|x| x.resources.iter())
                .filter(|r| !g.resources.contains(*r))
                .cloned()
                .collect();
            s.forget(&hosts, &resources, stamp)
        })
        .await??;
    if let Some(mut c) = ident.cluster().filter(|c| c.uuid != id.to_string()) {
        let old = c.uuid.clone();
        c.uuid = id.to_string();
        ident.set_cluster(c)?;
        tracing::info!(
            "this host is in cluster {id} now (split off from {old} with {}; forgot {} \
             entries of the other hosts and resources)",
            describe_group(&record.group),
            report.removed
        );
    }
    let dropped_key = root::finish_split(&ident.root, &record.issuer)?;
    cluster.reload_credentials().await?;
    if dropped_key {
        tracing::warn!(
            "removed this host's copy of the old cluster's CA key (this host left that \
             cluster in a split)"
        );
    }
    cluster.poke.notify_waiters();
    Ok(())
}

/// On the issuer: a new CA that no record names after [`UNANNOUNCED_TTL`] goes (the runner
/// failed after the grant).
async fn drop_unannounced(cluster: &Cluster, found: &[Split]) -> anyhow::Result<()> {
    let ident = &cluster.ident;
    let Some((ca, file)) = root::load_split_issuer(&ident.root, &ident.host)? else {
        return Ok(());
    };
    if found.iter().any(|s| s.ca == *ca.cert()) {
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now.saturating_sub(file.made) < UNANNOUNCED_TTL.as_secs() {
        return Ok(());
    }
    root::remove_split_ca(&ident.root, &ident.host, true)?;
    cluster.reload_credentials().await?;
    tracing::warn!(
        "removed the CA made for cluster {} (a split that was never announced)",
        file.cluster
    );
    Ok(())
}

/// A host of a group that leaves: gets its certificate of the new CA from the group's
/// issuer (itself, for the issuer), retrying.
async fn renew(cluster: Arc<Cluster>, issuer: HostName, ca: CertificateDer<'static>) {
    let mut backoff = Duration::from_millis(300);
    let mut tries = 0u32;
    loop {
        let done = root::load_credentials(&cluster.ident.root)
            .ok()
            .flatten()
            .is_some_and(|c| mars_tls::issued_by(&c.cert, &ca));
        if done
            || !root::load_split_cas(&cluster.ident.root)
                .map(|c| c.values().any(|x| *x == ca))
                .unwrap_or(false)
        {
            break;
        }
        match cluster.renew(Some(issuer.clone()), false).await {
            Ok(msg) => {
                tracing::info!("split: {msg}");
                break;
            }
            Err(e) => {
                if tries.is_multiple_of(10) {
                    tracing::info!(
                        "split: this host's certificate from {issuer}: {e} (trying again)"
                    );
                }
            }
        }
        tries += 1;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
    cluster.split.renewing.store(false, Ordering::SeqCst);
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
    fn a_record_travels_and_binds_its_group() {
        let g = Group {
            hosts: [h("a1"), h("a2")].into(),
            resources: [r("ra")].into(),
        };
        let rec = SplitRecord {
            issuer: h("a1"),
            group: g.clone(),
            endorsement: "x509:AAAA c2ln".into(),
        };
        assert_eq!(rec.encode(), "a1 a1,a2 ra x509:AAAA c2ln");
        assert_eq!(SplitRecord::decode(&rec.encode()), Some(rec.clone()));
        let empty = SplitRecord {
            group: Group {
                hosts: g.hosts.clone(),
                resources: BTreeSet::new(),
            },
            ..rec.clone()
        };
        assert_eq!(empty.encode(), "a1 a1,a2 - x509:AAAA c2ln");
        assert_eq!(SplitRecord::decode(&empty.encode()), Some(empty.clone()));
        // The issuer must be the group's first host; names must be names.
        for bad in [
            "a2 a1,a2 ra x509:AAAA c2ln",
            "a1 a1,../x ra x509:AAAA c2ln",
            "a1 a1,a2 r/x x509:AAAA c2ln",
            "a1 a1,a2 ra",
            "",
        ] {
            assert_eq!(SplitRecord::decode(bad), None, "{bad}");
        }
        // The digest changes with any host or resource, and with a name moved between them.
        let d = group_digest(&g);
        assert_eq!(d, group_digest(&g.clone()));
        assert_ne!(d, group_digest(&empty.group));
        let mut more = g.clone();
        more.hosts.insert(h("b1"));
        assert_ne!(d, group_digest(&more));
        let moved = Group {
            hosts: [h("a1")].into(),
            resources: [r("a2"), r("ra")].into(),
        };
        assert_ne!(d, group_digest(&moved));
        assert_eq!(
            split_key(ClusterId([0xab; 16])),
            format!("trust/split/{}", "ab".repeat(16))
        );
        assert_eq!(
            done_key(ClusterId([1; 16])),
            format!("trust/split/{}/done", "01".repeat(16))
        );
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
