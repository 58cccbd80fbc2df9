//! `view` and `view-MACRO`: MARS-style status text.

use anyhow::{bail, Result};
use mars_api::{ClusterView, ResourceView};
use mars_config::format_size;

/// The default view of one resource, after MARS's
/// `%{res} [members/peers] diskstate replstate flags role primarynode`.
pub fn resource_text(r: &ResourceView) -> String {
    let mut s = format!(
        "{} [1/1] {} {} {} {} {}\n",
        r.name, r.disk_state, r.repl_state, r.flags, r.role, r.primary
    );
    if let Some(l) = &r.log {
        s += &format!(
            "    log: {} appended {} durable {} written-back {} dirty {} ({} logfiles, {})\n",
            l.current,
            l.appended,
            l.durable,
            l.written_back,
            format_size(l.dirty_bytes),
            l.logfiles,
            format_size(l.log_bytes)
        );
    }
    s += &format!(
        "    disk: {} size {} open {}\n",
        r.disk.display(),
        format_size(r.size),
        r.open_count
    );
    if let Some(u) = &r.nbd_unix_uri {
        s += &format!("    nbd: {u}\n");
    }
    if let Some(u) = &r.nbd_tcp_uri {
        s += &format!("    nbd: {u}\n");
    }
    if let Some(e) = &r.error {
        s += &format!("    ERROR: {e}\n");
    }
    s
}

pub fn cluster_text(v: &ClusterView, all: bool) -> String {
    let mut s = String::new();
    for r in &v.resources {
        s += &format!("--------- resource {}\n", r.name);
        s += &resource_text(r);
    }
    if all || v.resources.is_empty() {
        match &v.cluster {
            Some(c) => {
                s += &format!("--------- cluster {}\n", c.uuid);
                for m in &v.members {
                    let state = if m.this_host {
                        "this host".to_string()
                    } else {
                        let age = m
                            .age_secs
                            .map_or("never heard from".into(), |a| format!("info {a:.1}s old"));
                        format!(
                            "{}, {}, {age}{}",
                            if m.alive { "alive" } else { "NOT ALIVE" },
                            if m.connected {
                                "connected"
                            } else {
                                "not connected"
                            },
                            m.error
                                .as_ref()
                                .map(|e| format!(", last error: {e}"))
                                .unwrap_or_default()
                        )
                    };
                    s += &format!("    host {} at {} ({state})\n", m.host, m.address);
                }
            }
            None => s += &format!("host {} is not in a cluster yet\n", v.host),
        }
    }
    s
}

/// The MARS view macros we can answer so far.
pub const MACROS: &[&str] = &[
    "role",
    "primarynode",
    "get-primary",
    "diskstate",
    "replstate",
    "flags",
    "nbd-uri",
    "nbd-tcp-uri",
    "disk",
    "get-disk",
    "size",
    "resource-size",
    "device-opened",
    "is-primary",
    "writeback-rest",
    "error",
];

pub fn macro_value(r: &ResourceView, m: &str) -> Result<String> {
    Ok(match m {
        "role" => r.role.clone(),
        "primarynode" | "get-primary" => r.primary.clone(),
        "diskstate" => r.disk_state.clone(),
        "replstate" => r.repl_state.clone(),
        "flags" => r.flags.clone(),
        "nbd-uri" => match &r.nbd_unix_uri {
            Some(u) => u.clone(),
            None => bail!("resource {} is not served (not attached)", r.name),
        },
        "nbd-tcp-uri" => match &r.nbd_tcp_uri {
            Some(u) => u.clone(),
            None => bail!("marsd serves no NBD over TCP (start it with --nbd-listen)"),
        },
        "disk" | "get-disk" => r.disk.display().to_string(),
        "size" | "resource-size" => r.size.to_string(),
        "device-opened" => r.open_count.to_string(),
        "is-primary" => u8::from(r.role == "Primary").to_string(),
        "writeback-rest" => r.log.as_ref().map_or(0, |l| l.dirty_bytes).to_string(),
        "error" => r.error.clone().unwrap_or_default(),
        other => bail!("unknown view macro {other:?}; known: {}", MACROS.join(", ")),
    })
}
