//! `contrib/`: the Prometheus alert rules and the Grafana dashboard refer only to metrics that
//! marsd exports (`src/metrics.rs`), and the rules pass `promtool check rules` where Prometheus
//! is installed (Debian: `apt-get install prometheus`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `mars_…` name in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("mars_") {
        // Only at the start of an identifier.
        let before = rest[..i].chars().last();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// The series names marsd writes: every registered name, counters with `_total`.
fn exported() -> BTreeSet<String> {
    let src = std::fs::read_to_string(repo().join("crates/daemon/src/metrics.rs")).unwrap();
    let code = src.split("#[cfg(test)]").next().unwrap();
    let mut out = BTreeSet::new();
    for n in names(code) {
        out.insert(format!("{n}_total"));
        out.insert(n);
    }
    out
}

/// The `expr:` values of the rules file (one line, or a folded block below `expr: >-`).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = yaml.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim_start();
        if let Some(v) = l.strip_prefix("expr:") {
            let v = v.trim();
            if v == ">-" || v == "|" || v == ">" {
                let indent = lines[i].len() - l.len();
                let mut e = String::new();
                i += 1;
                while i < lines.len()
                    && (lines[i].trim().is_empty()
                        || lines[i].len() - lines[i].trim_start().len() > indent)
                {
                    e += lines[i].trim();
                    e += " ";
                    i += 1;
                }
                out.push(e);
                continue;
            }
            out.push(v.to_string());
        }
        i += 1;
    }
    out
}

#[test]
fn alert_rules_use_exported_metrics_only() {
    let yaml = std::fs::read_to_string(repo().join("contrib/prometheus/mars-alerts.yml")).unwrap();
    let exprs = rule_exprs(&yaml);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let have = exported();
    for e in &exprs {
        let used = names(e);
        assert!(
            !used.is_empty() || e.contains("up{"),
            "no mars metric in {e}"
        );
        for n in used {
            assert!(have.contains(&n), "{n} (in `{e}`) is not exported");
        }
    }
    // What the rules must cover (issue 16).
    for needed in [
        "mars_resource_lag_seconds",
        "mars_resource_sync_rest_bytes",
        "mars_resource_split_brain",
        "mars_resource_emergency",
        "mars_peer_connected",
        "mars_resource_designated_primary",
        "mars_root_free_bytes",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(needed)),
            "no rule on {needed}"
        );
    }
    if Path::new("/usr/bin/promtool").exists() {
        let o = std::process::Command::new("promtool")
            .args(["check", "rules"])
            .arg(repo().join("contrib/prometheus/mars-alerts.yml"))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    } else {
        // CI installs it (.ci/run), so there a missing promtool is a failure, not a skip.
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "promtool is missing (apt-get install prometheus)"
        );
        eprintln!("SKIPPED: promtool check rules (apt-get install prometheus)");
    }
}

#[test]
fn dashboard_uses_exported_metrics_only() {
    let text = std::fs::read_to_string(repo().join("contrib/grafana/mars.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let have = exported();
    let mut exprs = Vec::new();
    for p in v["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 10);
    for e in &exprs {
        for n in names(e) {
            assert!(have.contains(&n), "{n} (in `{e}`) is not exported");
        }
    }
    for needed in [
        "mars_resource_lag_seconds",
        "mars_resource_lag_bytes",
        "mars_resource_split_brain",
        "mars_resource_emergency",
        "mars_root_free_bytes",
        "mars_peer_connected",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(needed)),
            "no panel on {needed}"
        );
    }
}
