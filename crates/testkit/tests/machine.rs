//! The machine interface of `marsadm` end to end: exit codes, one error per failure, the
//! versioned JSON (validated against `docs/json/*.schema.json`), messages that say what is
//! true, no progress output when piped, `view --watch`. Real `marsd` on 127.0.0.x.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use mars_testkit::repl::{eventually, join, tmp, wait_uptodate, write_random};
use mars_testkit::{bin, Host};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/json")
}

/// The validator of `docs/json/NAME.schema.json`.
fn validator(name: &str) -> jsonschema::Validator {
    let path = schema_dir().join(format!("{name}.schema.json"));
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("schema file"))
        .expect("schema is JSON");
    jsonschema::validator_for(&s).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts that `v` is valid against schema `name`.
fn check(name: &str, v: &Value) {
    let val = validator(name);
    let errors: Vec<String> = val
        .iter_errors(v)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "not a valid {name}: {errors:#?}\n{}",
        serde_json::to_string_pretty(v).unwrap()
    );
}

/// `marsadm --json ARGS` on `h`: asserts the exit status and an empty stderr; returns the
/// one JSON object on stdout, validated against schema `name`.
fn json(h: &Host, args: &[&str], status: i32, name: &str) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let o = h.marsadm(&all);
    assert_eq!(
        code(&o),
        status,
        "marsadm {all:?}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert_eq!(text(&o.stderr), "", "marsadm {all:?} wrote to stderr");
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("marsadm {all:?}: {e}: {}", text(&o.stdout)));
    assert_eq!(v["schema"], 1, "{v}");
    check(name, &v);
    v
}

/// `marsadm ARGS` failing with `status` and exactly one line on stderr, nothing on stdout.
fn fails(h: &Host, args: &[&str], status: i32) -> String {
    let o = h.marsadm(args);
    let err = text(&o.stderr);
    assert_eq!(code(&o), status, "marsadm {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert_eq!(text(&o.stdout), "", "marsadm {args:?} printed on stdout");
    err
}

/// A marsadm for a root where no daemon runs.
fn marsadm_at(root: &Path, args: &[&str]) -> Output {
    Command::new(bin("marsadm"))
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run marsadm")
}

#[test]
fn schema_enums_match_the_api() {
    let s: Value = serde_json::from_str(
        &std::fs::read_to_string(schema_dir().join("view.schema.json")).unwrap(),
    )
    .unwrap();
    let names = |def: &str| -> Vec<String> {
        s["$defs"][def]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("{def}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let disk: Vec<String> = mars_api::DiskState::ALL
        .iter()
        .map(|d| d.to_string())
        .collect();
    let repl: Vec<String> = mars_api::ReplState::ALL
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(names("DiskState"), disk);
    assert_eq!(names("ReplState"), repl);
    for d in mars_api::DiskState::ALL {
        assert_eq!(
            serde_json::to_value(d).unwrap(),
            Value::String(d.to_string())
        );
    }
}

/// Serde round trips of the view types, with every optional part filled.
#[test]
fn view_types_round_trip() {
    use mars_api::*;
    let p = Progress {
        done: 1,
        total: 2,
        rate: 3,
        logs: Some(LogRange { first: 4, last: 5 }),
    };
    let pos = LogPos {
        logfile: 3,
        offset: 4096,
    };
    let r = ResourceView {
        name: "vm1".into(),
        size: 1 << 30,
        disk: "/dev/vg/vm1".into(),
        role: Role::Primary,
        primary: Some("a".into()),
        disk_state: DiskState::WriteBack,
        writeback_bytes: Some(76_021_760),
        repl_state: ReplState::Replicating,
        flags: "DCASFR".into(),
        log: Some(LogView {
            current: "log-000000003-a".into(),
            appended: pos,
            durable: pos,
            written_back: LogPos::default(),
            dirty_bytes: 5,
            pending_records: 6,
            writes: 7,
            logfiles: 1,
            log_bytes: 4096,
        }),
        device: Some("/dev/mars/vm1".into()),
        device_error: None,
        nbd_unix_uri: Some("nbd+unix:///vm1?socket=/x".into()),
        nbd_tcp_uri: None,
        nbd_tcp: true,
        open_count: 1,
        error: None,
        consistent: true,
        sync: Some(p.clone()),
        fetch: Some(p.clone()),
        replay: None,
        stuck: Some("x".into()),
        caught_up_ms: Some(12),
        members: vec![ReplicaView {
            host: "b".into(),
            disk: "/dev/vg/vm1".into(),
            role: None,
            disk_state: DiskState::OutDatedFR,
            writeback_bytes: None,
            repl_state: ReplState::UnResponsive,
            flags: "dCASfr".into(),
            alive: false,
            consistent: true,
            applied: Some(pos),
            behind: Some(9),
            lag_secs: Some(2.5),
            emergency: false,
            systemd_ok: Some(true),
            disk_size_bytes: Some(1 << 30),
            sync: Some(p),
            stuck: None,
            systemd: Some("start app.service: ok".into()),
        }],
        split_brain: Some(SplitBrainView {
            logfile: 3,
            sides: vec![SplitSide {
                hosts: vec!["a".into()],
                bytes: 10,
            }],
        }),
        systemd: Some(SystemdView {
            start_unit: "a.service".into(),
            stop_unit: "a.service".into(),
            want: None,
        }),
    };
    let v = ClusterView {
        host: "a".into(),
        cluster: None,
        members: Vec::new(),
        resources: vec![r],
        space: None,
    };
    let s = serde_json::to_string(&v).unwrap();
    assert_eq!(serde_json::from_str::<ClusterView>(&s).unwrap(), v);
    let mut j: Value = serde_json::from_str(&s).unwrap();
    assert_eq!(j["resources"][0]["disk_state"], "WriteBack");
    assert_eq!(j["resources"][0]["writeback_bytes"], 76_021_760);
    assert_eq!(j["resources"][0]["log"]["appended"]["logfile"], 3);
    assert_eq!(
        j["resources"][0]["members"][0]["disk_state"],
        "OutDated[FR]"
    );
    assert_eq!(j["resources"][0]["members"][0]["role"], Value::Null);
    j["schema"] = 1.into();
    check("view", &j);
    for k in [
        ErrorKind::Invalid,
        ErrorKind::NotFound,
        ErrorKind::Exists,
        ErrorKind::Failed,
        ErrorKind::Timeout,
    ] {
        let r = Response::Error {
            kind: k,
            message: "m".into(),
        };
        let line = encode(&r);
        assert_eq!(decode_reply::<Response>(line.trim_ascii_end()).unwrap(), r);
        assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
    }
}

#[test]
fn exit_codes_errors_and_json_on_one_host() {
    let t = tmp();
    // No daemon: 5, unreachable.
    let nowhere = t.path().join("nowhere");
    let o = marsadm_at(&nowhere, &["view"]);
    assert_eq!(code(&o), 5, "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr).trim_end().lines().count(), 1);
    assert!(text(&o.stderr).contains("cannot reach marsd"));
    let o = marsadm_at(&nowhere, &["--json", "view"]);
    assert_eq!(code(&o), 5);
    assert_eq!(text(&o.stderr), "");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    check("error", &v);
    assert_eq!(v["error"]["kind"], "unreachable");

    // systemd-generate needs no daemon; its JSON follows the schema too.
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist");
    let o = marsadm_at(
        &nowhere,
        &[
            "--json",
            "systemd-generate",
            "r",
            "DEFAULT",
            "--templates",
            dist.to_str().unwrap(),
            "--output",
            t.path().join("units").to_str().unwrap(),
            "--host",
            "a",
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    check("systemd-generate", &v);
    assert!(!v["files"].as_array().unwrap().is_empty(), "{v}");
    // MARS's view primitives read marsd's state: without a daemon, a template using one is
    // left out with that reason (the others are generated); with one, see below.
    let tpl = t.path().join("tpl");
    std::fs::create_dir_all(&tpl).unwrap();
    std::fs::write(
        tpl.join("app-@escvar{res}.service"),
        "# DEFAULT_START\n[Unit]\nDescription=@eval{primary %is-primary{} of %nr-primary{} \
         designated %get-primary{} member %is-member{} rest %fetch-rest{}}\n\
         [Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    let generate = |root: &Path| {
        marsadm_at(
            root,
            &[
                "systemd-generate",
                "r",
                "DEFAULT",
                "--templates",
                tpl.to_str().unwrap(),
                "--output",
                t.path().join("units-tpl").to_str().unwrap(),
                "--host",
                "a",
            ],
        )
    };
    let o = generate(&nowhere);
    assert!(
        text(&o.stderr).contains("%is-primary{…}: MARS's view macro is not available")
            && text(&o.stderr).contains("none answers at"),
        "{}",
        text(&o.stderr)
    );
    assert!(!t.path().join("units-tpl/app-r.service").exists());

    // `check` without a daemon: UNKNOWN (3), as a Nagios plugin, in its own schema.
    let o = marsadm_at(&nowhere, &["--json", "check"]);
    assert_eq!(code(&o), 3, "{}", text(&o.stdout));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["schema"], 1, "{v}");
    check("check", &v);
    assert_eq!(v["status"], "unknown", "{v}");

    let a = Host::start(t.path(), "a");
    let disk = a.create_resource("r", SIZE);
    // With marsd running, the primitives are answered from its view.
    let o = generate(&a.root);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let unit = std::fs::read_to_string(t.path().join("units-tpl/app-r.service")).unwrap();
    assert!(
        unit.contains("Description=primary 1 of 1 designated a member 1 rest 0\n"),
        "{unit}"
    );
    // A healthy resource: OK (0). The space limits are lifted because the test's root shares
    // the machine's filesystem, whose usage is not this test's business.
    let v = json(
        &a,
        &["check", "--space-warn", "100%", "--space-crit", "100%"],
        0,
        "check",
    );
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(v["resources"], 1, "{v}");
    assert!(v["line"].as_str().unwrap().starts_with("MARS OK: "), "{v}");
    // Usage errors: 2, before anything is sent.
    fails(&a, &["attach", "a/b"], 2);
    fails(&a, &["resize", "r", "lots"], 2);
    fails(&a, &["wait-resource", "r", "sideways"], 2);
    fails(&a, &["view-nonsense", "r"], 2);
    fails(&a, &["frobnicate"], 2);
    let o = a.marsadm(&["view", "--no-such-flag"]);
    assert_eq!(code(&o), 2);
    for args in [
        &["attach", "a/b"][..],
        &["view-nonsense", "r"],
        &["view", "--no-such-flag"],
        &["wait-resource", "r"],
    ] {
        let v = json(&a, args, 2, "error");
        assert_eq!(v["error"]["kind"], "usage", "{args:?}");
    }
    // Help is no error.
    assert_eq!(code(&a.marsadm(&["--json", "--help"])), 0);

    // Refusals: 3.
    let err = fails(&a, &["view", "nosuch"], 3);
    assert!(err.contains("does not exist"), "{err}");
    let v = json(&a, &["view", "nosuch"], 3, "error");
    assert_eq!(v["error"]["kind"], "not-found");
    let v = json(
        &a,
        &["create-resource", "r", disk.to_str().unwrap()],
        3,
        "error",
    );
    assert!(
        ["exists", "invalid"].contains(&v["error"]["kind"].as_str().unwrap()),
        "{v}"
    );
    let v = json(&a, &["get-link", "no/such/key"], 3, "error");
    assert_eq!(v["error"]["kind"], "not-found");

    // Timeout: 4 (the primary stays attached).
    let start = Instant::now();
    let err = fails(
        &a,
        &["--timeout", "1", "wait-resource", "r", "attach-off"],
        4,
    );
    assert!(err.contains("did not reach attach-off within 1s"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
    let v = json(
        &a,
        &["--timeout", "1", "wait-resource", "r", "attach-off"],
        4,
        "error",
    );
    assert_eq!(v["error"]["kind"], "timeout");

    // On a terminal (a pty from script(1)) the wait shows what it waits for; piped (above)
    // only the error line.
    let cmd = format!(
        "{} --root {} --timeout 2 wait-resource r attach-off",
        bin("marsadm").display(),
        a.root.display()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script(1)");
    let tty = text(&o.stdout);
    assert!(
        tty.contains("waiting for r to reach attach-off"),
        "no feedback on a terminal: {tty:?}"
    );
    assert!(tty.contains("did not reach attach-off"), "{tty:?}");

    // Every output validates against its schema.
    let v = json(&a, &["view"], 0, "view");
    let r = &v["resources"][0];
    assert_eq!(r["role"], "Primary");
    assert_eq!(r["primary"], "a");
    assert_eq!(r["size_bytes"], SIZE);
    assert!(r["log"]["durable"]["logfile"].is_u64(), "{r}");
    json(&a, &["view", "r"], 0, "view");
    json(&a, &["view", "all"], 0, "view");
    let v = json(&a, &["view-size", "r"], 0, "macro");
    assert_eq!(v["value"], SIZE);
    // `all` and a comma list: one document, one entry per resource.
    for res in ["all", "r,r"] {
        let v = json(&a, &["view-size", res], 0, "macro");
        assert_eq!(v["macro"], "size", "{v}");
        assert_eq!(
            v["values"],
            serde_json::json!([{"resource": "r", "value": SIZE}]),
            "{v}"
        );
    }
    fails(&a, &["view-size", "r,nosuch"], 1);
    assert_eq!(
        json(&a, &["view-is-primary", "r"], 0, "macro")["value"],
        true
    );
    assert_eq!(
        json(&a, &["view-todo-fetch", "r"], 0, "macro")["value"],
        true
    );
    assert_eq!(
        json(&a, &["view-role", "r"], 0, "macro")["value"],
        "Primary"
    );
    assert_eq!(
        json(&a, &["view-stuck", "r"], 0, "macro")["value"],
        Value::Null
    );
    assert_eq!(
        json(&a, &["view-diskstate", "r"], 0, "macro")["value"],
        "UpToDate"
    );
    let v = json(&a, &["log-rotate", "r"], 0, "action");
    assert_eq!(v["ok"], true);
    json(&a, &["set-global-sync-limit-value", "3"], 0, "action");
    assert_eq!(
        json(&a, &["get-global-sync-limit-value"], 0, "value")["value"],
        3
    );
    assert_eq!(
        json(&a, &["get-global-unreachable-limit-value"], 0, "value")["value"],
        86_400
    );
    assert_eq!(
        json(&a, &["get-emergency-limit", "r"], 0, "value")["value"],
        0
    );
    let v = json(&a, &["get-link", "defaults/sync-limit"], 0, "link");
    assert_eq!(v["value"], "3");
    json(&a, &["lowlevel-ls-host-ips"], 0, "members");
    assert!(json(&a, &["join-token"], 0, "token")["token"].is_string());
    let v = json(&a, &["get-systemd-unit", "r"], 0, "systemd-unit");
    assert_eq!(v["start_unit"], Value::Null);
    json(&a, &["get-systemd-want", "r"], 0, "systemd-want");
    // MARS's `all` and lists: an entry per resource (MARS's modprobe-mars.sh reads the text).
    let v = json(&a, &["get-systemd-unit", "all"], 0, "systemd-unit");
    assert_eq!(v["values"][0]["resource"], "r", "{v}");
    let v = json(&a, &["get-systemd-want", "r"], 0, "systemd-want");
    assert_eq!(v["resource"], "r", "{v}");
    let listed = a.ok(&["get-systemd-unit", "all"]);
    assert!(listed.starts_with("--------- resource r "), "{listed}");
    let v = json(&a, &["wait-resource", "r", "attach"], 0, "wait");
    assert_eq!(v["condition"], "attach-on");
    json(&a, &["wait-cluster"], 0, "action");
    let v = json(&a, &["log-rotate", "all"], 0, "results");
    assert_eq!(v["results"][0]["resource"], "r");
    // A list with a resource that does not exist: one entry each, the status of the failure.
    let v = json(&a, &["log-rotate", "r,nosuch"], 3, "results");
    assert_eq!(v["ok"], false);
    assert_eq!(v["results"][1]["error"]["kind"], "not-found");
    let o = a.marsadm(&["log-rotate", "r,nosuch"]);
    assert_eq!(code(&o), 3);
    assert_eq!(text(&o.stderr).lines().count(), 2, "{}", text(&o.stderr));

    // `view --watch`, piped: N views, a blank line between two; JSON: N objects.
    let out = a.ok(&["view", "r", "--watch", "0.2", "--count", "3"]);
    assert_eq!(out.matches("--------- resource r\n").count(), 3, "{out}");
    assert_eq!(out.matches("\n\n---------").count(), 2, "{out}");
    assert!(
        !out.contains('\x1b'),
        "no terminal codes when piped: {out:?}"
    );
    let out = a.ok(&["--json", "view", "r", "--watch", "0.1", "--count", "2"]);
    let docs: Vec<Value> = serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .map(Result::unwrap)
        .collect();
    assert_eq!(docs.len(), 2);
    for d in &docs {
        check("view", d);
    }
    fails(&a, &["view", "--watch", "0", "--count", "1"], 2);
}

#[test]
fn two_hosts_json_messages_and_no_progress_when_piped() {
    let t = tmp();
    let a = Host::start_at(t.path(), "a", "127.0.0.1");
    let b = Host::start_at(t.path(), "b", "127.0.0.2");
    let c = Host::start_at(t.path(), "c", "127.0.0.3");
    a.create_resource("r", SIZE);
    b.join(&a);
    c.join(&a);
    write_random(&a, "r", t.path(), 0, MIB as usize);
    join(&b, "r", SIZE);
    // Piped: the wait prints nothing at all while it waits or when done.
    let o = b.marsadm(&["--timeout", "60", "wait-resource", "r", "uptodate"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "");
    assert_eq!(text(&o.stderr), "", "no progress output when piped");

    let v = json(&b, &["view", "r"], 0, "view");
    let r = &v["resources"][0];
    assert_eq!(r["role"], "Secondary");
    assert_eq!(r["disk_state"], "UpToDate");
    assert_eq!(r["repl_state"], "Replaying");
    let members = r["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    assert!(members.iter().any(|m| m["role"] == "Primary"), "{r}");
    assert!(members
        .iter()
        .all(|m| m["applied"].is_null() || m["applied"]["offset"].is_u64()));
    json(&a, &["view", "all"], 0, "view");

    // view-nbd-tcp-uri on a secondary of a daemon that serves NBD over TCP: the primary
    // serves it, not "start it with --nbd-listen".
    let err = fails(&b, &["view-nbd-tcp-uri", "r"], 1);
    assert!(!err.contains("--nbd-listen"), "{err}");
    assert!(err.contains("primary a"), "{err}");
    let err = fails(&b, &["view-nbd-uri", "r"], 1);
    assert!(err.contains("primary a"), "{err}");
    assert!(a.view("nbd-tcp-uri", "r").starts_with("nbd://"));
    // log-rotate on a secondary: not "not attached" (it is attached).
    let err = fails(&b, &["log-rotate", "r"], 3);
    assert!(!err.contains("not attached"), "{err}");
    assert!(err.contains("primary"), "{err}");
    // view RES on a cluster member that is not a member of the resource.
    let err = fails(&c, &["view", "r"], 3);
    assert!(!err.contains("does not exist"), "{err}");
    assert!(err.contains("not a member"), "{err}");
    fails(&c, &["view", "nosuch"], 3);
    // fake-sync with no sync to declare.
    let out = b.ok(&["fake-sync", "r"]);
    assert!(!out.contains("declared in sync"), "{out}");
    assert!(out.contains("nothing to declare"), "{out}");
    // Handover, piped: just the result line.
    let o = b.marsadm(&["--timeout", "30", "primary", "r"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr), "");
    assert_eq!(text(&o.stdout).lines().count(), 1, "{}", text(&o.stdout));
    // Invalidate on the old primary, piped: its message only, no progress.
    eventually(30, "a is secondary", || a.view("role", "r") == "Secondary");
    let o = a.marsadm(&["invalidate", "r"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr), "");
    assert_eq!(text(&o.stdout).lines().count(), 1, "{}", text(&o.stdout));
    wait_uptodate(&a, "r", 60);
}

#[test]
fn view_after_a_failover_from_a_dead_primary_says_what_is_true() {
    let t = tmp();
    let mut a = Host::start_at(t.path(), "a", "127.0.0.1");
    let b = Host::start_at(t.path(), "b", "127.0.0.2");
    a.create_resource("r", SIZE);
    b.join(&a);
    write_random(&a, "r", t.path(), 0, MIB as usize);
    join(&b, "r", SIZE);
    wait_uptodate(&b, "r", 60);
    a.kill9();
    let killed = Instant::now();
    b.ok(&["pause-fetch", "r"]);
    let out = b.ok(&["--timeout", "30", "primary", "--force", "r"]);
    assert!(out.contains("primary now"), "{out}");
    // Within seconds, not the 60 s window: a is not alive, its role unknown, no split brain.
    let took = eventually(20, "a shown dead", || {
        let v = json(&b, &["view", "all"], 0, "view");
        let r = &v["resources"][0];
        let ma = r["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["host"] == "a")
            .cloned()
            .unwrap();
        let member_a = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["host"] == "a")
            .cloned()
            .unwrap();
        r["split_brain"].is_null()
            && ma["alive"] == false
            && ma["role"].is_null()
            && member_a["alive"] == false
    });
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "took {took:?} after the kill"
    );
    let text_view = b.ok(&["view", "r"]);
    assert!(!text_view.contains("SPLIT BRAIN"), "{text_view}");
    assert!(text_view.contains("member a:"), "{text_view}");
    // Its role is unknown (`?`): its last report (Primary) is stale.
    assert!(text_view.contains("member a: "), "{text_view}");
    assert!(text_view.contains(" ? NOT ALIVE"), "{text_view}");
    assert!(
        text_view.contains("\nr [1/2] UpToDate Replicating DCASFR Primary b\n"),
        "{text_view}"
    );
    // And it stays so (the dead host does not come back as primary within the window).
    std::thread::sleep(Duration::from_secs(2));
    let v = json(&b, &["view", "r"], 0, "view");
    assert!(v["resources"][0]["split_brain"].is_null(), "{v}");
    assert_eq!(b.view("role", "r"), "Primary");
}
