//! The table test: every command and global option of MARS's `marsadm` (from its source,
//! `crates/cli/tests/data/`) is accepted, answered as MARS answers it, or a documented
//! difference.

use clap::Parser;

use super::*;
use crate::{Cli, Cmd};

const MARS_COMMANDS: &str = include_str!("../../tests/data/mars-commands.txt");
const MARS_OPTIONS: &str = include_str!("../../tests/data/mars-options.txt");
const COMPAT_DOC: &str = include_str!("../../../../docs/mars-compatibility.md");

/// MARS commands that are not (yet) commands here, each with the reason. Every one must be
/// explained in docs/mars-compatibility.md (checked below).
const DIFFERENCES: &[(&str, &str)] = &[
    (
        "create-uuid",
        "MARS's pre-2014 layouts only; create-cluster makes the identity",
    ),
    (
        "set-connect-pref-list",
        "deprecated in MARS; the engine picks the fetch source",
    ),
    (
        "get-connect-pref-list",
        "deprecated in MARS; the engine picks the fetch source",
    ),
    (
        "set-disabled-digests",
        "hidden in MARS; set-global-disabled-*-digests replace it",
    ),
    (
        "delete-file",
        "no /mars file tree to delete files in cluster-wide",
    ),
    (
        "set-replay",
        "experts: the replay position is the engine's; invalidate restarts it",
    ),
    (
        "show",
        "dumps MARS's symlink tree; lowlevel-get-links dumps the metadata",
    ),
    (
        "show-errors",
        "dumps MARS's symlink tree; view shows the errors",
    ),
    (
        "show-state",
        "dumps MARS's symlink tree; view shows the state",
    ),
    (
        "show-info",
        "dumps MARS's symlink tree; view shows the state",
    ),
    (
        "mars-state",
        "dumps MARS's symlink tree; view shows the state",
    ),
    (
        "mars-info",
        "prints MARS's logstatus file; view shows the state",
    ),
    ("role", "deprecated in MARS: use view-role"),
    ("state", "deprecated in MARS: use view-role"),
];

/// The command lines tried for a command: no argument, a resource, a resource and a value,
/// a resource, a disk and more (the argument shapes MARS's usage lines show).
fn shapes(cmd: &str) -> Vec<Vec<String>> {
    let s = |v: &[&str]| -> Vec<String> {
        std::iter::once("marsadm")
            .chain(std::iter::once(cmd))
            .chain(v.iter().copied())
            .map(String::from)
            .collect()
    };
    vec![
        s(&[]),
        s(&["5"]),
        s(&["vm1"]),
        s(&["vm1", "5"]),
        s(&["vm1", "/dev/vg/vm1"]),
        s(&["vm1", "/dev/vg/vm1", "vm1", "1G"]),
        s(&["CHKSUM_MD5|CHKSUM_SHA1"]),
    ]
}

/// Parses as one of our commands (not as the catch-all of view macros).
fn parses(cmd: &str) -> bool {
    shapes(cmd).into_iter().any(|line| {
        Cli::try_parse_from(normalize(line)).is_ok_and(|c| !matches!(c.cmd, Cmd::Other(_)))
    })
}

fn mars_commands() -> Vec<(&'static str, &'static str)> {
    MARS_COMMANDS
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_once(' ').expect("NAME KIND"))
        .collect()
}

#[test]
fn every_mars_command_is_accepted_or_answered_or_a_documented_difference() {
    let all = mars_commands();
    assert!(all.len() > 100, "the table has {} commands", all.len());
    let mut missing = Vec::new();
    for (name, kind) in &all {
        if let Some(handler) = kind.strip_prefix("handler:") {
            // A plain handler: either one of the legacy answers (as MARS's) or a command.
            let want = match handler {
                "ignore_cmd" => Some(Legacy::Ignored),
                "senseless_cmd" => Some(Legacy::Senseless),
                "nyi_cmd" => Some(Legacy::NotYetImplemented),
                "forbidden_cmd" => Some(Legacy::Forbidden),
                _ => None,
            };
            if let Some(want) = want {
                assert_eq!(legacy(name).map(|l| l.0), Some(want), "{name}");
                continue;
            }
        }
        assert!(
            legacy(name).is_none(),
            "{name} is a MARS command, not legacy"
        );
        if parses(name) {
            assert!(
                !DIFFERENCES.iter().any(|(d, _)| d == name),
                "{name} is accepted now: remove it from DIFFERENCES"
            );
            continue;
        }
        if !DIFFERENCES.iter().any(|(d, _)| d == name) {
            missing.push(*name);
        }
    }
    assert!(
        missing.is_empty(),
        "MARS commands neither accepted nor documented as a difference: {missing:?}"
    );
}

#[test]
fn differences_are_mars_commands_and_documented() {
    let all = mars_commands();
    for (name, reason) in DIFFERENCES {
        assert!(
            all.iter().any(|(n, _)| n == name),
            "{name} is no MARS command"
        );
        assert!(!reason.is_empty());
        assert!(
            COMPAT_DOC.contains(&format!("`{name}`")),
            "docs/mars-compatibility.md does not mention `{name}`"
        );
    }
    // Every base command is in the document too.
    for (name, kind) in all {
        if kind == "base" {
            assert!(
                COMPAT_DOC.contains(&format!("`{name}")),
                "docs/mars-compatibility.md does not mention `{name}`"
            );
        }
    }
}

#[test]
fn merge_and_split_cluster_are_commands() {
    // merge-cluster and merge-cluster-check are commands (MARS's `HOST [IP]`, plus a token),
    // and split-cluster (MARS: no arguments; `--dry-run` shows the groups).
    for name in [
        "merge-cluster-list",
        "merge-cluster",
        "merge-cluster-check",
        "split-cluster",
    ] {
        assert!(parses(name), "{name}");
    }
    assert!(!DIFFERENCES.iter().any(|(d, _)| *d == "split-cluster"));
    let c = Cli::try_parse_from(["marsadm", "merge-cluster", "b1", "10.0.0.2", "--token", "t"])
        .unwrap();
    let Cmd::MergeCluster {
        peer,
        peer_address,
        token,
    } = &c.cmd
    else {
        panic!("{:?}", c.cmd)
    };
    assert_eq!(
        (peer.as_str(), peer_address.as_deref(), token.as_deref()),
        ("b1", Some("10.0.0.2"), Some("t"))
    );
}

#[test]
fn the_table_test_fails_for_a_missing_command() {
    assert!(!parses("no-such-command"));
    assert!(parses("wait-connect"));
    assert!(parses("pause-fetch"));
}

#[test]
fn every_mars_global_option_is_accepted() {
    let opts: Vec<&str> = MARS_OPTIONS
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert!(opts.len() > 30);
    for opt in opts {
        for line in [
            vec!["marsadm", opt, "view"],
            vec!["marsadm", "view", opt],
            vec!["marsadm", "pause-fetch", opt, "all"],
        ] {
            let line = normalize(line.into_iter().map(String::from));
            let cli = Cli::try_parse_from(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert!(!matches!(cli.cmd, Cmd::Other(_)), "{line:?}");
        }
    }
}

#[test]
fn mars_option_spellings_mean_what_they_mean_in_mars() {
    let p = |s: &str| {
        Cli::try_parse_from(normalize(s.split(' ').map(String::from))).unwrap_or_else(|e| {
            panic!("{s}: {e}");
        })
    };
    assert_eq!(p("marsadm --timeout=-1 view").timeout, FOREVER_SECS);
    assert_eq!(p("marsadm --timeout -1 view").timeout, FOREVER_SECS);
    assert_eq!(p("marsadm --timeout=7 view").timeout, 7);
    assert_eq!(p("marsadm --parallel pause-fetch all").parallel, 0);
    assert_eq!(p("marsadm --parallel 3 pause-fetch all").parallel, 3);
    assert_eq!(p("marsadm --parallel=-1 pause-fetch all").parallel, 1);
    assert_eq!(p("marsadm --verbose=3 view").verbose, 3);
    assert_eq!(p("marsadm -v -v view").verbose, 2);
    assert_eq!(p("marsadm -f -d view").force, 1);
    assert!(p("marsadm -d view").dry_run);
    assert_eq!(p("marsadm --threshold=1M view").threshold, 1 << 20);
    assert_eq!(p("marsadm view").threshold, 10 << 20);
    assert_eq!(p("marsadm --stuck-seconds=5 view").stuck_seconds, 5);
    let c = p("marsadm force-primary vm1");
    assert_eq!(c.force, 1);
    assert!(matches!(c.cmd, Cmd::Primary { .. }));
    let c = p("marsadm --ip-beta=10.0.0.2 --ip=10.0.0.1 lowlevel-set-host-ip beta");
    assert_eq!(c.peer_ip(Some("beta")).as_deref(), Some("10.0.0.2"));
    assert_eq!(c.peer_ip(None).as_deref(), Some("10.0.0.1"));
    assert_eq!(c.peer_ip(Some("gamma")), None);
    // create-cluster and join-cluster keep their own --ip.
    let c = p("marsadm join-cluster alpha --ip=10.0.0.9");
    let Cmd::JoinCluster { ip, .. } = &c.cmd else {
        panic!()
    };
    assert_eq!(ip.as_deref(), Some("10.0.0.9"));
    assert_eq!(c.as_host, None);
    assert_eq!(
        p("marsadm --host=alpha view").as_host.as_deref(),
        Some("alpha")
    );
    // A command's own HOST argument is not --host.
    assert_eq!(
        p("marsadm lowlevel-set-host-ip beta 10.0.0.1").as_host,
        None
    );
    assert_eq!(p("marsadm lowlevel-delete-host beta").as_host, None);
    // systemd-generate keeps its own --host (the same meaning).
    let line = normalize(
        "marsadm --host=h1 systemd-generate vm1"
            .split(' ')
            .map(String::from),
    );
    assert_eq!(line, ["marsadm", "systemd-generate", "--host=h1", "vm1"]);
}

#[test]
fn legacy_words_are_answered_as_mars_answers_them() {
    let a = |cmd: &str| {
        let (l, hint) = legacy(cmd).unwrap();
        legacy_answer(cmd, "vm1", l, hint)
    };
    assert_eq!(
        a("adjust"),
        Ok("ignoring command 'adjust' on resource 'vm1'".into())
    );
    assert_eq!(
        a("create-md"),
        Ok("command 'create-md' makes no sense with MARS (ignoring on resource 'vm1')".into())
    );
    let e = a("verify").unwrap_err();
    assert!(e.starts_with("command 'verify' on resource 'vm1' cannot be used with MARS"));
    assert!(e.contains("use `marsadm invalidate"), "{e}");
    assert!(a("invalidate-remote").is_err());
    assert!(a("cstate").unwrap_err().contains("view-cstate"));
    let line = normalize(["marsadm", "--json", "verify", "vm1"].map(String::from));
    assert_eq!(command_and_arg(&line), Some(("verify", "vm1")));
    let line = normalize(["marsadm", "--root", "/r", "adjust"].map(String::from));
    assert_eq!(command_and_arg(&line), Some(("adjust", "")));
}

#[test]
fn features_are_mars_names() {
    assert_eq!(
        parse_features("COMPRESS_LZ4 | COMPRESS_ZLIB|COMPRESS_LZ4", COMPRESSIONS),
        Ok("COMPRESS_LZ4|COMPRESS_ZLIB".into())
    );
    assert_eq!(parse_features("", DIGESTS), Ok(String::new()));
    assert!(parse_features("CHKSUM_MD5", COMPRESSIONS).is_err());
    assert!(parse_features("lz4", COMPRESSIONS).is_err());
}

#[test]
fn mars_argument_forms() {
    let p = |s: &[&str]| {
        Cli::try_parse_from(normalize(
            std::iter::once("marsadm")
                .chain(s.iter().copied())
                .map(String::from),
        ))
        .unwrap_or_else(|e| panic!("{s:?}: {e}"))
    };
    let Cmd::CreateResource { extra, .. } = p(&["create-resource", "vm1", "/d", "vm1", "2G"]).cmd
    else {
        panic!()
    };
    assert_eq!(crate::create_extra("vm1", &extra).unwrap(), Some(2 << 30));
    assert_eq!(
        crate::create_extra("vm1", &["1G".into()]).unwrap(),
        Some(1 << 30)
    );
    assert_eq!(crate::create_extra("vm1", &["vm1".into()]).unwrap(), None);
    assert!(crate::create_extra("vm1", &["other".into()]).is_err());
    assert!(crate::create_extra("vm1", &["vm1".into(), "lots".into()]).is_err());
    let Cmd::JoinCluster {
        peer, peer_address, ..
    } = p(&["join-cluster", "alpha", "10.0.0.1"]).cmd
    else {
        panic!()
    };
    assert_eq!(
        (peer.as_str(), peer_address.as_deref()),
        ("alpha", Some("10.0.0.1"))
    );
    assert!(matches!(
        p(&["wait-cluster", "vm1"]).cmd,
        Cmd::WaitCluster { res: Some(_) }
    ));
    assert!(matches!(
        p(&["wait-connect"]).cmd,
        Cmd::WaitCluster { res: None }
    ));
    assert!(matches!(
        p(&["update-cluster", "vm1"]).cmd,
        Cmd::UpdateCluster { res: Some(_) }
    ));
    assert!(matches!(
        p(&["--force", "log-purge-all", "vm1"]).cmd,
        Cmd::LogPurgeAll { .. }
    ));
    assert_eq!(
        crate::with_default_port("10.0.0.1").as_deref(),
        Ok("10.0.0.1:7777")
    );
    assert_eq!(
        crate::with_default_port("h.example:9").as_deref(),
        Ok("h.example:9")
    );
    assert_eq!(
        crate::with_default_port("fd00::1").as_deref(),
        Ok("[fd00::1]:7777")
    );
    assert_eq!(
        crate::with_default_port("[fd00::1]:8").as_deref(),
        Ok("[fd00::1]:8")
    );
    assert!(crate::with_default_port("a:b").is_err());
    assert!(crate::with_default_port("").is_err());
}
