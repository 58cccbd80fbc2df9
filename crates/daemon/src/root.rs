//! The daemon's root directory and what is persisted in it.
//!
//! ```text
//! ROOT/                       mode 0700
//!   marsd.lock                flock'ed by the running daemon: one daemon per root
//!   marsd.sock                control socket (0600), marsadm talks here
//!   nbd.sock                  NBD Unix socket, export name = resource name
//!   cluster.toml              cluster identity (create-cluster)
//!   meta.redb                 replicated metadata (resources, members, roles: see mars-engine keys)
//!   tls/                      mode 0700: the cluster's PKI on this host (docs/security.md)
//!     ca.crt                  the cluster CA's certificate (trusted)
//!     ca.key                  the CA's private key, 0600: only on hosts that issue join tokens
//!                             (the one that ran create-cluster, and those it was copied to)
//!     ca-next.crt             during a CA rotation: the next CA (trusted too)
//!     ca-next.key             its key, on the host that started the rotation
//!     ca-merge.crt            during a merge into this cluster: the merging cluster's CA
//!     ca-split-ISSUER.crt     during a split (split-cluster): the CA of the new cluster whose
//!                             certificates ISSUER issues (trusted too, on every host)
//!     ca-split-ISSUER.key     its key, on ISSUER only
//!     split.toml              on ISSUER: the group it issues for (cluster id, hosts,
//!                             resources, when the CA was made)
//!     host.crt  host.key      this host's certificate (+ its issuing CA when that is the next
//!                             one) and private key (0600)
//!     tokens.toml             join tokens this host issued and nobody redeemed yet (hashes)
//!   resource-RES/
//!     resource.toml           name, local disk, size at create/join
//!     log-000000001-HOST ...  transaction log or fetched copies (see docs/log-format.md)
//!     writeback               writeback (primary) or replay (secondary) position
//!     sync.toml               a pending or running full sync (secondary)
//!     needs-sync              why only a full sync can help (secondary)
//!     chain-start             where this host's log continued after an emergency hole
//!     replica, force-primary, emergency    markers: present = on
//! ```
//!
//! The files of `resource-RES/` besides `resource.toml` are written and read only through
//! `mars_replica` (`control.rs` has their layouts).
//!
//! The cluster and resource files are small TOML documents replaced atomically.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mars_config::{HostName, ResourceName};
use mars_storage::real::RealDir;
use mars_storage::Dir;
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;

pub const CLUSTER_FILE: &str = "cluster.toml";
pub const TLS_DIR: &str = "tls";
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
/// The next cluster CA during a rotation (`rotate-ca start` until `rotate-ca finish`): trusted
/// like `ca.crt`; its key `ca-next.key` only on the host that started the rotation.
const CA_NEXT_CERT: &str = "ca-next.crt";
const CA_NEXT_KEY: &str = "ca-next.key";
/// During a merge of another cluster into this one (`merge-cluster`), on this cluster's hosts:
/// the merging cluster's CA, trusted like `ca.crt` until its hosts have certificates of ours
/// and it is retired. Nothing is ever issued from it (its key is not here).
const CA_MERGE_CERT: &str = "ca-merge.crt";
/// During a split (`split-cluster`), on every host: `ca-split-ISSUER.crt`, the CA of the new
/// cluster of ISSUER's group, trusted like `ca.crt` until the split ends; its key
/// `ca-split-ISSUER.key` on ISSUER only (it never leaves that host).
const CA_SPLIT_PREFIX: &str = "ca-split-";
/// On the issuer of a split-off group: which group it issues the new CA's certificates for.
const SPLIT_FILE: &str = "split.toml";
/// This host's certificate, followed by the CA that issued it when that is not `ca.crt` (a
/// certificate renewed during a CA rotation).
const HOST_CERT: &str = "host.crt";
const HOST_KEY: &str = "host.key";
pub const TOKENS_FILE: &str = "tokens.toml";
pub const RESOURCE_FILE: &str = "resource.toml";
const LOCK_FILE: &str = "marsd.lock";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClusterFile {
    pub uuid: String,
    pub host: HostName,
    pub address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ResourceFile {
    pub name: ResourceName,
    pub disk: PathBuf,
    /// Size when this host created or joined the resource (the replicated `size` key is the
    /// truth; it only grows).
    pub size: u64,
}

pub fn resource_dir(root: &Path, res: &ResourceName) -> PathBuf {
    root.join(format!("resource-{res}"))
}

/// Creates the root (0700) if needed, or takes group and other access away from one that
/// existed (it holds the metadata, the logs with every write, and the control socket), and
/// takes the daemon lock; the returned file holds it.
pub fn lock_root(root: &Path) -> Result<fs::File> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .with_context(|| format!("cannot create root directory {}", root.display()))?;
    private(root, true)?;
    let path = root.join(LOCK_FILE);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a valid descriptor that outlives the call.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let other = fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another marsd already runs on {} (pid {})",
            root.display(),
            other.trim()
        );
    }
    f.set_len(0)?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// Takes group and other access away from `path` (a file or directory of the root), saying
/// so when it had any and `say` (a file just created with the umask's mode is no news).
pub fn private(path: &Path, say: bool) -> Result<()> {
    let mode = fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        let tight = mode & 0o7700;
        fs::set_permissions(path, fs::Permissions::from_mode(tight))
            .with_context(|| format!("cannot restrict the permissions of {}", path.display()))?;
        if !say {
            return Ok(());
        }
        tracing::warn!(
            "{} was readable by others (mode {:o}): now {:o}",
            path.display(),
            mode & 0o7777,
            tight
        );
    }
    Ok(())
}

/// Writes a TOML file atomically (temporary file, fsync, rename, directory fsync).
pub fn write_toml<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<()> {
    let text = toml::to_string(value).context("serialize")?;
    RealDir::open(dir)
        .and_then(|d| d.write_atomic(name, text.as_bytes()))
        .with_context(|| format!("cannot write {}", dir.join(name).display()))
}

pub fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read_to_string(path) {
        Ok(s) => {
            Ok(Some(toml::from_str(&s).with_context(|| {
                format!("{} is malformed", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// `ROOT/tls`, created 0700 if needed.
pub fn tls_dir(root: &Path) -> Result<PathBuf> {
    let dir = root.join(TLS_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    private(&dir, true)?;
    Ok(dir)
}

/// Writes a file that only root may read, atomically.
fn write_private(dir: &Path, name: &str, text: &str) -> Result<()> {
    RealDir::open(dir)
        .and_then(|d| d.write_atomic(name, text.as_bytes()))
        .with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    private(&dir.join(name), false)
}

fn read_opt(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Stores this host's certificate, key and the CA's certificate (create-cluster, join).
pub fn save_credentials(root: &Path, ca: &str, cert: &str, key: &str) -> Result<()> {
    let dir = tls_dir(root)?;
    write_private(&dir, CA_CERT, ca)?;
    save_host_credentials(root, cert, key)
}

/// Stores this host's certificate (with its issuing CA after it when that is not `ca.crt`)
/// and key (renewal).
pub fn save_host_credentials(root: &Path, cert: &str, key: &str) -> Result<()> {
    let dir = tls_dir(root)?;
    write_private(&dir, HOST_KEY, key)?;
    write_private(&dir, HOST_CERT, cert)
}

/// This host's credentials, if it has any: its certificate, its key, and the CA that issued
/// the certificate (the one after it in `host.crt`, else `ca.crt`).
pub fn load_credentials(root: &Path) -> Result<Option<mars_tls::Credentials>> {
    let dir = root.join(TLS_DIR);
    let (Some(ca), Some(cert), Some(key)) = (
        read_opt(&dir.join(CA_CERT))?,
        read_opt(&dir.join(HOST_CERT))?,
        read_opt(&dir.join(HOST_KEY))?,
    ) else {
        return Ok(None);
    };
    let broken = || format!("the credentials in {} are broken", dir.display());
    let chain = pem::parse_many(cert.as_bytes()).with_context(broken)?;
    let issuer = match chain.get(1) {
        Some(p) => pem::encode(p),
        None => ca,
    };
    let creds = mars_tls::Credentials::from_pem(&issuer, &cert, &key).with_context(broken)?;
    Ok(Some(creds))
}

/// The CAs this host trusts: the cluster CA and, during a rotation, the next one (during a
/// merge the surviving cluster's CA on the merging side, the merging cluster's CA on the
/// surviving side).
pub fn load_trust(root: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let dir = root.join(TLS_DIR);
    let mut out = Vec::new();
    let mut names: Vec<String> = [CA_CERT, CA_NEXT_CERT, CA_MERGE_CERT]
        .iter()
        .map(|s| s.to_string())
        .collect();
    names.extend(
        load_split_cas(root)?
            .into_keys()
            .map(|i| split_cert_name(&i)),
    );
    for name in &names {
        if let Some(text) = read_opt(&dir.join(name))? {
            out.push(
                CertificateDer::from_pem_slice(text.as_bytes())
                    .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(name).display()))?,
            );
        }
    }
    Ok(out)
}

fn split_cert_name(issuer: &HostName) -> String {
    format!("{CA_SPLIT_PREFIX}{issuer}.crt")
}

fn split_key_name(issuer: &HostName) -> String {
    format!("{CA_SPLIT_PREFIX}{issuer}.key")
}

/// The group a split-off group's issuer issues the new CA's certificates for ([`SPLIT_FILE`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SplitFile {
    /// The new cluster's id.
    pub cluster: String,
    pub hosts: Vec<HostName>,
    pub resources: Vec<ResourceName>,
    /// When the new CA was made (seconds since the epoch): files of a split that was never
    /// announced are removed after a while.
    pub made: u64,
}

/// Trusts `ca`, the new CA of `issuer`'s group in a split; with its key (and the group) on
/// the issuer itself.
pub fn save_split_ca(
    root: &Path,
    issuer: &HostName,
    ca: &CertificateDer<'_>,
    key: Option<(&str, &SplitFile)>,
) -> Result<()> {
    let dir = tls_dir(root)?;
    if let Some((key, group)) = key {
        write_private(&dir, &split_key_name(issuer), key)?;
        let text = toml::to_string(group).context("encoding the split group")?;
        write_private(&dir, SPLIT_FILE, &text)?;
    }
    write_private(&dir, &split_cert_name(issuer), &mars_tls::pki::cert_pem(ca))
}

/// The split CAs this host trusts, by issuer.
pub fn load_split_cas(
    root: &Path,
) -> Result<std::collections::BTreeMap<HostName, CertificateDer<'static>>> {
    let dir = root.join(TLS_DIR);
    let mut out = std::collections::BTreeMap::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let name = entry?.file_name();
        let Some(issuer) = name
            .to_str()
            .and_then(|n| n.strip_prefix(CA_SPLIT_PREFIX))
            .and_then(|n| n.strip_suffix(".crt"))
            .and_then(|n| HostName::new(n).ok())
        else {
            continue;
        };
        let path = dir.join(&name);
        if let Some(text) = read_opt(&path)? {
            let ca = CertificateDer::from_pem_slice(text.as_bytes())
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            out.insert(issuer, ca);
        }
    }
    Ok(out)
}

/// On the issuer of a split-off group: the new CA with its key and the group it issues for.
pub fn load_split_issuer(
    root: &Path,
    issuer: &HostName,
) -> Result<Option<(mars_tls::Ca, SplitFile)>> {
    let path = root.join(TLS_DIR).join(SPLIT_FILE);
    let Some(text) = read_opt(&path)? else {
        return Ok(None);
    };
    let group: SplitFile =
        toml::from_str(&text).with_context(|| format!("{} is broken", path.display()))?;
    Ok(
        load_ca_files(root, &split_cert_name(issuer), &split_key_name(issuer))?
            .map(|ca| (ca, group)),
    )
}

/// Stops trusting the split CA of `issuer` (and removes its key and the group, on the issuer
/// of a split that was never announced).
pub fn remove_split_ca(root: &Path, issuer: &HostName, with_key: bool) -> Result<()> {
    let dir = root.join(TLS_DIR);
    let mut names = vec![split_cert_name(issuer)];
    if with_key {
        names.push(split_key_name(issuer));
        names.push(SPLIT_FILE.to_string());
    }
    for name in names {
        match fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The end of a split on a host of the group that left: the split CA of `issuer` becomes
/// the cluster CA (with its key on the issuer); every other CA file (the old cluster CA and
/// a copy of its key, a next, merged or other split CA) and the join tokens issued from the
/// old CA are removed. Returns whether a copy of the old CA's key was removed.
pub fn finish_split(root: &Path, issuer: &HostName) -> Result<bool> {
    let dir = tls_dir(root)?;
    let cert = read_opt(&dir.join(split_cert_name(issuer)))?
        .ok_or_else(|| anyhow::anyhow!("no split CA of {issuer} here"))?;
    let held_old = dir.join(CA_KEY).exists();
    match read_opt(&dir.join(split_key_name(issuer)))? {
        Some(key) => write_private(&dir, CA_KEY, &key)?,
        None if held_old => fs::remove_file(dir.join(CA_KEY))?,
        None => {}
    }
    write_private(&dir, CA_CERT, &cert)?;
    let mut doomed: Vec<String> = vec![
        CA_NEXT_CERT.into(),
        CA_NEXT_KEY.into(),
        CA_MERGE_CERT.into(),
        SPLIT_FILE.into(),
        TOKENS_FILE.into(),
    ];
    for entry in fs::read_dir(&dir)? {
        if let Some(n) = entry?.file_name().to_str() {
            if n.starts_with(CA_SPLIT_PREFIX) {
                doomed.push(n.to_string());
            }
        }
    }
    for name in doomed {
        match fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(held_old && !dir.join(CA_KEY).exists())
}

/// The cluster CA's certificate (`ca.crt`) alone: what may start or end a split (a CA trusted
/// only during a rotation, merge or split may not).
pub fn load_cluster_ca(root: &Path) -> Result<Option<CertificateDer<'static>>> {
    let path = root.join(TLS_DIR).join(CA_CERT);
    read_opt(&path)?
        .map(|text| {
            CertificateDer::from_pem_slice(text.as_bytes())
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        })
        .transpose()
}

/// Trusts `ca` as the next cluster CA; with its key on the host that starts the rotation.
pub fn save_next_ca(root: &Path, ca: &CertificateDer<'_>, key: Option<&str>) -> Result<()> {
    let dir = tls_dir(root)?;
    if let Some(key) = key {
        write_private(&dir, CA_NEXT_KEY, key)?;
    }
    write_private(&dir, CA_NEXT_CERT, &mars_tls::pki::cert_pem(ca))
}

/// Whether this host trusts a next CA whose key it does not hold (a rotation started
/// elsewhere, or a merge into another cluster): it must not issue certificates from its old
/// one then.
pub fn next_ca_elsewhere(root: &Path) -> bool {
    let dir = root.join(TLS_DIR);
    dir.join(CA_NEXT_CERT).exists() && !dir.join(CA_NEXT_KEY).exists()
}

/// Trusts `ca`, the CA of a cluster merging into this one (see [`CA_MERGE_CERT`]).
pub fn save_merge_ca(root: &Path, ca: &CertificateDer<'_>) -> Result<()> {
    let dir = tls_dir(root)?;
    write_private(&dir, CA_MERGE_CERT, &mars_tls::pki::cert_pem(ca))
}

/// The CA of a cluster merging into this one, while it is trusted.
pub fn load_merge_ca(root: &Path) -> Result<Option<CertificateDer<'static>>> {
    let path = root.join(TLS_DIR).join(CA_MERGE_CERT);
    read_opt(&path)?
        .map(|text| {
            CertificateDer::from_pem_slice(text.as_bytes())
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        })
        .transpose()
}

/// Stops trusting the merged cluster's CA (it was retired).
pub fn remove_merge_ca(root: &Path) -> Result<()> {
    match fs::remove_file(root.join(TLS_DIR).join(CA_MERGE_CERT)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The next CA with its key, on the host rotating the CA.
pub fn load_next_ca(root: &Path) -> Result<Option<mars_tls::Ca>> {
    load_ca_files(root, CA_NEXT_CERT, CA_NEXT_KEY)
}

/// The end of a rotation here: the next CA becomes the cluster CA (with its key where it is);
/// a copy of the old CA's key is removed, as it can issue nothing trusted any more. Returns
/// whether this host held that old key without the new one.
pub fn finish_rotation(root: &Path) -> Result<bool> {
    let dir = tls_dir(root)?;
    let next = read_opt(&dir.join(CA_NEXT_CERT))?
        .ok_or_else(|| anyhow::anyhow!("no CA rotation in progress here"))?;
    let held_old = dir.join(CA_KEY).exists();
    match read_opt(&dir.join(CA_NEXT_KEY))? {
        Some(key) => write_private(&dir, CA_KEY, &key)?,
        None if held_old => fs::remove_file(dir.join(CA_KEY))?,
        None => {}
    }
    write_private(&dir, CA_CERT, &next)?;
    for name in [CA_NEXT_KEY, CA_NEXT_CERT] {
        match fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(held_old && !dir.join(CA_KEY).exists())
}

pub fn save_ca(root: &Path, ca: &mars_tls::Ca) -> Result<()> {
    let dir = tls_dir(root)?;
    write_private(&dir, CA_KEY, &ca.key_pem())?;
    write_private(&dir, CA_CERT, &ca.cert_pem())
}

/// The cluster CA with its key, on a host that holds it.
pub fn load_ca(root: &Path) -> Result<Option<mars_tls::Ca>> {
    load_ca_files(root, CA_CERT, CA_KEY)
}

fn load_ca_files(root: &Path, cert: &str, key: &str) -> Result<Option<mars_tls::Ca>> {
    let dir = root.join(TLS_DIR);
    let (Some(cert), Some(key)) = (read_opt(&dir.join(cert))?, read_opt(&dir.join(key))?) else {
        return Ok(None);
    };
    let ca = mars_tls::Ca::from_pem(&cert, &key)
        .with_context(|| format!("the CA in {} is broken", dir.display()))?;
    Ok(Some(ca))
}

/// Removes this host's PKI files (leave-cluster): its certificate is revoked cluster-wide, a
/// CA key must not outlive the membership.
pub fn remove_tls(root: &Path) -> Result<()> {
    match fs::remove_dir_all(root.join(TLS_DIR)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context("cannot remove the tls directory"),
    }
}

/// Resource directories found under the root.
pub fn resource_dirs(root: &Path) -> Result<Vec<(ResourceName, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let e = e?;
        let name = e.file_name();
        let Some(n) = name.to_str().and_then(|n| n.strip_prefix("resource-")) else {
            continue;
        };
        if !e.file_type()?.is_dir() {
            continue;
        }
        match ResourceName::new(n) {
            Ok(r) => out.push((r, e.path())),
            Err(err) => tracing::warn!("ignoring {}: {err}", e.path().display()),
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod private_tests {
    use super::*;

    /// A root that existed with group or other access (as `mkdir /var/lib/mars` leaves it) is
    /// made private when the daemon takes it; its files are no one else's either.
    #[test]
    fn an_existing_open_root_is_made_private() {
        let root = std::env::temp_dir().join(format!("mars-root-mode-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let file = root.join("meta.redb");
        fs::write(&file, b"x").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let lock = lock_root(&root).unwrap();
        private(&file, true).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&root.join(LOCK_FILE)), 0o600);
        drop(lock);
        fs::remove_dir_all(&root).unwrap();
    }
}
