//! The table against MARS's macro names, and golden outputs of the complex macros on
//! hand-built views in several states.

use anyhow::Result;
use mars_api::{
    ClusterInfo, ClusterView, DiskState, LogRange, MemberView, ReplState, ResourceView, Role,
};

use super::*;
use crate::view::fixtures::{member, progress, secondary, MIB};

/// MARS's names (`tests/data/mars-macros.txt`): `(kind, name)`.
fn mars_names() -> Vec<(String, String)> {
    include_str!("../../tests/data/mars-macros.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, n) = l.split_once(' ').expect("KIND NAME");
            (k.to_string(), n.to_string())
        })
        .collect()
}

#[test]
fn every_mars_macro_is_in_the_table_or_excluded_with_a_reason() {
    let names = mars_names();
    assert_eq!(names.len(), 275, "the data file is MARS's whole list");
    let mut missing = Vec::new();
    for (kind, n) in &names {
        match (find(n), excluded(n)) {
            (Some(m), None) => {
                let want = if kind == "complex" {
                    Kind::Complex
                } else {
                    Kind::Primitive
                };
                assert_eq!(m.kind, want, "{n}: MARS calls it {kind}");
                assert!(!m.help.is_empty(), "{n} has no help");
            }
            (None, Some(why)) => assert!(!why.is_empty()),
            (Some(_), Some(_)) => panic!("{n} is answered and excluded"),
            (None, None) => missing.push(n.clone()),
        }
    }
    assert!(missing.is_empty(), "not in the table: {missing:?}");
    // The exclusions are MARS names, and few.
    for (n, _) in EXCLUDED {
        assert!(names.iter().any(|(_, m)| m == n), "{n} is not MARS's");
    }
    assert!(EXCLUDED.len() <= 15);
    // Nothing of ours claims to be MARS's.
    for m in table().iter().filter(|m| m.kind != Kind::Mars) {
        assert!(
            names.iter().any(|(_, n)| *n == m.name),
            "{} is not MARS's",
            m.name
        );
    }
}

/// The tests' source: a sync limit, a version and one mount.
struct Fake;

impl Source for Fake {
    fn link(&self, key: &str) -> Result<Option<String>> {
        Ok((key == SYNC_LIMIT_KEY).then(|| "2".to_string()))
    }
    fn version(&self) -> Result<String> {
        Ok("0.1.0".into())
    }
    fn mount_of(&self, device: &str) -> Option<(String, String, String)> {
        (device == "/dev/mars/vm1").then(|| ("/srv/vm1".into(), "ext4".into(), "rw,noatime".into()))
    }
}

const NOW: f64 = 1_700_000_000.0;

fn host(h: &str, alive: bool, age: f64) -> MemberView {
    MemberView {
        host: h.into(),
        address: format!("10.0.0.{}", h.len()),
        this_host: false,
        alive,
        age_secs: Some(age),
        connected: alive,
        error: None,
        streams: Vec::new(),
        clock_skew_secs: None,
    }
}

/// A cluster alpha, beta, gamma seen from `me`.
fn cluster(me: &str, r: ResourceView) -> ClusterView {
    let mut members = vec![
        host("alpha", true, 1.0),
        host("beta", true, 2.0),
        host("gamma", true, 3.0),
    ];
    for m in &mut members {
        m.this_host = m.host == me;
    }
    ClusterView {
        host: me.into(),
        cluster: Some(ClusterInfo {
            uuid: "c0ffee".into(),
            host: me.into(),
            address: "10.0.0.1".into(),
            security: "tls".into(),
        }),
        members,
        resources: vec![r],
        space: None,
    }
}

fn ctx<'a>(v: &'a ClusterView, name: &'a str, arg: Option<&'a str>) -> Ctx<'a> {
    Ctx {
        view: v,
        res: v.resources.first(),
        host: &v.host,
        name,
        arg,
        window: 60,
        now: NOW,
        src: &Fake,
        stuck_seconds: 3600,
        threshold: prim::THRESHOLD,
        warnings: Default::default(),
    }
}

fn val(v: &ClusterView, name: &str) -> String {
    value(name, &ctx(v, name, None)).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

fn val_arg(v: &ClusterView, name: &str, arg: &str) -> String {
    value(name, &ctx(v, name, Some(arg))).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

/// Secondary beta of vm1 (primary alpha), up to date.
fn steady() -> ClusterView {
    let mut r = secondary();
    let mut a = member("alpha", true);
    a.role = Some(Role::Primary);
    a.flags = "DCASFR".into();
    a.disk_size_bytes = Some(1024 * MIB);
    let mut b = member("beta", true);
    b.disk_size_bytes = Some(1024 * MIB);
    r.members = vec![a, b];
    cluster("beta", r)
}

/// beta in a full sync: 280 of 1024 MiB at 95.2 MiB/s.
fn syncing() -> ClusterView {
    let mut v = steady();
    let r = &mut v.resources[0];
    r.disk_state = DiskState::InConsistent;
    r.repl_state = ReplState::Syncing;
    r.flags = "dcAsFR".into();
    r.consistent = false;
    r.sync = Some(progress(280 * MIB, 1024 * MIB, 95 * MIB + MIB / 5));
    v
}

/// beta behind: 1 of 3 MiB fetched, nothing replayed, its oldest unapplied write 75 s old,
/// replay stuck.
fn behind() -> ClusterView {
    let mut v = steady();
    let r = &mut v.resources[0];
    r.disk_state = DiskState::OutDatedFR;
    r.flags = "dCASfr".into();
    let logs = Some(LogRange { first: 2, last: 3 });
    r.fetch = Some(mars_api::Progress {
        logs,
        ..progress(MIB, 3 * MIB, MIB)
    });
    r.replay = Some(mars_api::Progress {
        logs,
        ..progress(0, 3 * MIB, 0)
    });
    r.stuck = Some("version mismatch after log-000000002-alpha".into());
    let b = &mut r.members[1];
    b.applied = Some(mars_api::LogPos {
        logfile: 2,
        offset: 4096,
    });
    b.lag_secs = Some(75.4);
    b.behind = Some(3 * MIB);
    v
}

/// alpha, the primary, writing back 72.5 MiB, its device mounted; its disk 64 MiB larger
/// than the resource, beta's larger still.
fn primary() -> ClusterView {
    let mut v = steady();
    let r = &mut v.resources[0];
    r.role = Role::Primary;
    r.disk_state = DiskState::WriteBack;
    r.writeback_bytes = Some(72 * MIB + MIB / 2);
    r.repl_state = ReplState::Replicating;
    r.flags = "DCASFR".into();
    r.device = Some("/dev/mars/vm1".into());
    r.open_count = 1;
    r.members[0].disk_size_bytes = Some(1088 * MIB);
    r.members[1].disk_size_bytes = Some(1536 * MIB);
    let mut v = cluster("alpha", v.resources.remove(0));
    v.members[0].this_host = true;
    v
}

#[test]
fn default_of_a_steady_secondary() {
    let v = steady();
    assert_eq!(
        val(&v, "default"),
        "  vm1 [2/3] UpToDate Replaying dCASFR Secondary alpha \n"
    );
    assert_eq!(
        val(&v, "1and1"),
        "  vm1 Uptodate Replaying -SFR- Secondary alpha\n"
    );
    assert_eq!(val(&v, "default-resource"), "vm1 1024.000 MiB [2/3]");
    assert_eq!(val(&v, "role"), "Secondary");
    assert_eq!(val(&v, "todo-role"), "Secondary");
    assert_eq!(val(&v, "primarynode"), "alpha");
    assert_eq!(val(&v, "commstate"), "");
    assert_eq!(val(&v, "device-info"), "");
    assert_eq!(val(&v, "device-stats"), "Closed");
    assert_eq!(val(&v, "resource-errors"), "");
    assert_eq!(val(&v, "comminfo"), "");
    assert_eq!(val(&v, "outdated-flags"), "");
    assert_eq!(val(&v, "state"), "NYI Please override macro %state{}");
    assert_eq!(val(&v, "count-resource-peers"), "2");
    assert_eq!(val(&v, "count-cluster-peers"), "3");
    assert_eq!(val(&v, "resource-peers"), "alpha\nbeta\n");
    assert_eq!(val(&v, "is-alive"), "1");
    assert_eq!(val(&v, "nr-primary"), "1");
    assert_eq!(val(&v, "nr-replay"), "2");
    assert_eq!(val(&v, "work-reached"), "1");
    assert_eq!(val(&v, "sync-percent"), "100");
    assert_eq!(val(&v, "uuid"), "c0ffee");
    assert_eq!(val(&v, "default-header"), "used-log-digest=\"CHKSUM_CRC32C\"\nused-net-digest=\"CHKSUM_CRC32C\"\n   HINT: the global-sync-limit-value is set to \"2\"\n");
}

#[test]
fn default_of_a_syncing_secondary() {
    let v = syncing();
    let want = "  vm1 [2/3] InConsistent Syncing dcAsFR Secondary alpha \n\
                \x20    syncing: [====>..............]  27.48%  (280/1024)MiB  rate: 95.20 MiB/sec  remaining: 00:00:07 hrs\n\
                \x20      > sync: 280.000/1024.000 MiB rate: 95.200 MiB/sec  remaining: 00:00:07 hrs\n";
    assert_eq!(val(&v, "default"), want);
    assert_eq!(val(&v, "sync-percent"), "27.48046875");
    assert_eq!(val(&v, "sync-permille"), "273.57421875");
    assert_eq!(val(&v, "sync-rest"), (744 * MIB).to_string());
    assert_eq!(
        val(&v, "sync-vector"),
        format!("{}:{}", 280 * MIB, 1024 * MIB)
    );
    assert_eq!(
        val_arg(&v, "sync-vector", "/"),
        format!("{}/{}", 280 * MIB, 1024 * MIB)
    );
    assert_eq!(val(&v, "sync-reached"), "0");
    assert_eq!(val(&v, "sync-threshold-reached"), "0");
    assert_eq!(val_arg(&v, "sync-threshold-reached", "1G"), "1");
    assert_eq!(val(&v, "sync-remain"), "7.81512606607791");
    assert_eq!(val(&v, "diskstate-1and1"), "Inconsistent");
    assert_eq!(val(&v, "replstate-1and1"), "Syncing");
    assert!(val(&v, "1and1").ends_with(&want[want.find("     syncing").unwrap()..]));
}

/// `--stuck-seconds` (MARS's `fetch-line`): a fetch with something left that has not caught
/// up for longer than `--window` and `--stuck-seconds` is warned about (MARS's text, stderr);
/// the value printed is the same either way.
#[test]
fn a_fetch_silent_beyond_stuck_seconds_is_warned_about() {
    let mut v = behind();
    // Caught up last 5000 s ago (the view gives the age).
    v.resources[0].caught_up_ms = Some(5_000_000);
    let c = ctx(&v, "fetch-line", None);
    let line = value("fetch-line", &c).unwrap();
    assert!(line.contains(" age: 01:23:20"), "{line}");
    assert_eq!(
        c.warnings.borrow().as_slice(),
        ["replay of vm1 appears to be stuck for ~01:23:20\n"]
    );
    for stuck in [5000, 86_400] {
        let c = Ctx {
            stuck_seconds: stuck,
            threshold: prim::THRESHOLD,
            ..ctx(&v, "fetch-line", None)
        };
        assert_eq!(value("fetch-line", &c).unwrap(), line);
        assert!(c.warnings.borrow().is_empty(), "{stuck}");
    }
    // The complex macros that show the fetch line warn too.
    let c = ctx(&v, "default", None);
    value("default", &c).unwrap();
    assert_eq!(c.warnings.borrow().len(), 1);
}

#[test]
fn default_of_a_secondary_behind() {
    let v = behind();
    let want = "  vm1 [2/3] OutDated[FR] Replaying dCASfr Secondary alpha \n\
                \x20    replaying: [>:::::.............]  0.00%  (0/3)MiB  logs: [2::3]\n\
                \x20      > fetch: 2.000 MiB lag: 00:01:15 rate: 1.000 MiB/s remaining: 00:00:02\n\
                \x20      > replay: 1.000 MiB age: 00:01:15 rate: 0 B/s remaining: --:--:--\n\
                WARNINGS LNK  (1):\n\
                wrn-replication: version mismatch after log-000000002-alpha\n";
    assert_eq!(val(&v, "default"), want);
    assert_eq!(val(&v, "outdated-flags"), "FR");
    assert_eq!(val(&v, "diskstate-1and1"), "Outdated[FR]");
    assert_eq!(
        val(&v, "replinfo-1and1"),
        "     replaying: [>:::::.............]  0.00%  (0/3)MiB  logs: [2..3]\n\
         \x20      > fetch: 2.000 MiB rate: 1.000 MiB/sec  remaining: 00:00:02 hrs\n\
         \x20      > replay: 1.000 MiB rate: 0 B/sec  remaining: --:--:-- hrs\n"
    );
    assert_eq!(val(&v, "summary-vector"), format!("0:{}:{}", MIB, 3 * MIB));
    assert_eq!(val(&v, "fetch-rest"), (2 * MIB).to_string());
    assert_eq!(val(&v, "replay-rest"), MIB.to_string());
    assert_eq!(val(&v, "work-rest"), (3 * MIB).to_string());
    assert_eq!(val(&v, "replay-remain"), "-1");
    assert_eq!(val(&v, "replay-lognr"), "2");
    assert_eq!(val(&v, "fetch-lognr"), "3");
    assert_eq!(val(&v, "fetch-logcount"), "1");
    assert_eq!(val(&v, "replay-lag"), "75");
    assert_eq!(val(&v, "replay-age"), "75");
    assert_eq!(val(&v, "fetch-age"), "-1");
    assert_eq!(
        val(&v, "the-wrn-msg"),
        "wrn-replication: version mismatch after log-000000002-alpha\n"
    );
    assert_eq!(val(&v, "the-err-msg"), "");
    assert_eq!(val(&v, "is-fetch"), "0");
    assert_eq!(val(&v, "todo-fetch"), "1");
    assert_eq!(val_arg(&v, "is-fetch", "alpha"), "1");
}

#[test]
fn default_of_the_primary() {
    let v = primary();
    let want = "  LocalDevice /dev/mars/vm1 [Opened, /srv/vm1]\n\
                \x20 vm1 [2/3] WriteBack[72.500 MiB] Replicating DCASFR Primary alpha \n\
                \x20    Hint: you are wasting 64.000 MiB on disk /dev/vg/vm1\n\
                \x20    Hint: marsadm resize would increase resource vm1 by 64.000 MiB\n";
    assert_eq!(val(&v, "default"), want);
    assert_eq!(
        val(&v, "1and1"),
        "  vm1 Uptodate Replicating -SFR- Primary alpha\n"
    );
    assert_eq!(val(&v, "known-device-mountpoint"), "/srv/vm1");
    assert_eq!(val(&v, "known-device-fstype"), "ext4");
    assert_eq!(val(&v, "known-device-mounted"), "1");
    assert_eq!(val(&v, "disk-size"), (1088 * MIB).to_string());
    assert_eq!(val_arg(&v, "disk-size", "beta"), (1536 * MIB).to_string());
    assert_eq!(val(&v, "resource-possible-size"), (1088 * MIB).to_string());
    assert_eq!(val(&v, "todo-primary"), "1");
    assert_eq!(val(&v, "is-primary"), "1");
    assert_eq!(val_arg(&v, "is-primary", "beta"), "0");
    assert_eq!(val(&v, "device-opened"), "1");
    assert_eq!(val(&v, "tree-version"), "0.1.0");
    // Two members act as primary: MARS calls this host's role ForcedPrimary.
    let mut two = v.clone();
    two.resources[0].members[1].role = Some(Role::Primary);
    assert_eq!(val(&two, "role"), "ForcedPrimary");
    assert_eq!(val(&two, "nr-primary"), "2");
    // Designation gone, device still open.
    let mut rem = v.clone();
    rem.resources[0].primary = None;
    assert_eq!(val(&rem, "role"), "RemainsPrimary");
    assert_eq!(val(&rem, "primarynode"), "");
    assert_eq!(val(&rem, "get-primary"), "");
    assert_eq!(val(&rem, "todo-secondary"), "1");
    assert_eq!(val(&rem, "commstate"), "");
    // Designated elsewhere... here: a secondary designated to become primary.
    let mut nyp = steady();
    nyp.resources[0].primary = Some("beta".into());
    assert_eq!(val(&nyp, "role"), "NotYetPrimary");
    assert_eq!(val(&nyp, "primarynode"), "beta");
}

#[test]
fn primary_unreachable() {
    let mut v = steady();
    v.members[0].alive = false;
    v.members[0].connected = false;
    v.members[0].age_secs = Some(125.0);
    v.members[2].error = Some("connection refused".into());
    assert_eq!(val(&v, "commstate"), "00:02:05");
    assert!(val(&v, "default")
        .starts_with("  vm1 [2/3] UpToDate Replaying dCASFR Secondary alpha 00:02:05\n"));
    assert_eq!(val(&v, "is-alive"), "0");
    assert_eq!(val_arg(&v, "is-alive", "gamma"), "1");
    assert_eq!(val(&v, "alive-age"), "125");
    assert_eq!(val(&v, "alive-lag"), "125");
    assert_eq!(val(&v, "replstate-1and1"), "PrimaryUnreachable");
    assert_eq!(
        val(&v, "comminfo"),
        "++++++++++++ Global / Communication Status ++++++++++++\n\
         wrn-alive-alpha: NOT ALIVE, info 125.0s old\n\
         err-peer-gamma: connection refused\n"
    );
    assert_eq!(val(&v, "the-global-inf-msg"), "inf-peer-gamma: CONNECTED\n");
}

#[test]
fn every_macro_answers_without_panicking() {
    for v in [steady(), syncing(), behind(), primary()] {
        for m in table() {
            if matches!(m.eval, Eval::Wait { .. }) || m.name == "errno-text" {
                continue;
            }
            let r = eval(m, &ctx(&v, &m.name, None));
            // Our own NBD and device macros refuse where there is nothing to show.
            if m.kind != Kind::Mars {
                assert!(r.is_ok(), "{}: {:?}", m.name, r.err());
            }
        }
    }
    let v = steady();
    assert_eq!(val_arg(&v, "errno-text", "-5"), "Input/output_error");
    assert!(value("errno-text", &ctx(&v, "errno-text", None)).is_err());
}

#[test]
fn typos_get_suggestions_and_json_types() {
    assert_eq!(suggest("rol"), Some("role"));
    assert_eq!(suggest("primarynod"), Some("primarynode"));
    assert_eq!(
        unknown("diskstat"),
        "unknown macro view-diskstat; did you mean view-diskstate?"
    );
    assert!(unknown("zzzzzzzz").contains("marsadm --help"));
    let j = |n: &str, v: &str| json(find(n).unwrap(), v);
    assert_eq!(j("sync-rest", "42"), serde_json::json!(42));
    assert_eq!(
        j("sync-percent", "27.48046875"),
        serde_json::json!(27.48046875)
    );
    assert_eq!(j("replay-remain", "-1"), serde_json::json!(-1));
    assert_eq!(j("is-primary", "1"), serde_json::json!(true));
    assert_eq!(j("role", "Primary"), serde_json::json!("Primary"));
    assert_eq!(j("get-primary", ""), serde_json::Value::Null);
}

#[test]
fn help_and_completions_list_every_macro() {
    let h = help_text();
    for m in table() {
        assert!(
            h.contains(&format!("  {}", m.name)),
            "{} not in the help",
            m.name
        );
    }
    let cmd = add_subcommands(clap::Command::new("marsadm"));
    let sub = cmd
        .find_subcommand("view-is-alive")
        .expect("completion entry");
    assert!(sub.get_arguments().any(|a| a.get_id() == "arg"));
    assert_eq!(cmd.get_subcommands().count(), table().len());
}

#[test]
fn mounts_are_found_by_device() {
    let mounts = "/dev/sda1 / ext4 rw 0 0\n/dev/mars/vm1 /srv/my\\040vm xfs rw,noatime 0 0\n";
    assert_eq!(
        run::mount_of("/dev/mars/vm1", mounts),
        Some(("/srv/my vm".into(), "xfs".into(), "rw,noatime".into()))
    );
    assert_eq!(run::mount_of("/dev/mars/vm2", mounts), None);
}
