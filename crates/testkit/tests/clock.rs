//! Clock skew end to end, with real clocks made wrong by libfaketime (`LD_PRELOAD`; the
//! monotonic clock left alone): a member whose clock runs 300 s ahead is measured, warned
//! about and reported (`view all`, JSON, `check`, metrics), every member's liveness is judged by
//! when its entries *arrive* (the one ahead drags every metadata stamp 300 s ahead), and after
//! it is killed it is `NOT ALIVE` within seconds, not after 300 s more; a host that ran once
//! with its clock 40 days ahead is accepted again after its clock is fixed.

use std::time::{Duration, Instant};

use mars_testkit::metrics::{check, listen_addr, scrape, value};
use mars_testkit::repl::{eventually, tmp};
use mars_testkit::Host;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// Space thresholds no test root reaches: only the rule under test decides.
const LAX: [&str; 4] = ["--space-warn", "100%", "--space-crit", "0"];

/// The environment that runs marsd with its wall clock `offset` off (e.g. `+300s`, `+40d`).
fn skewed(offset: &str) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", LIBFAKETIME.into()),
        ("FAKETIME", offset.into()),
        // Timers and `Instant` keep real time: only the wall clock is wrong, as with a bad
        // hardware clock.
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
    ]
}

fn have_faketime() -> bool {
    if std::path::Path::new(LIBFAKETIME).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "libfaketime is missing (apt-get install faketime)"
    );
    eprintln!("skipped: {LIBFAKETIME} missing (apt-get install faketime)");
    false
}

fn member(h: &Host, name: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["--json", "view", "all"])).expect("json");
    v["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["host"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in {v}"))
}

#[test]
fn a_clock_ahead_is_measured_and_does_not_hide_a_dead_member() {
    if !have_faketime() {
        return;
    }
    let t = tmp();
    let ma = listen_addr();
    let a = Host::start_with_env(t.path(), "a", "127.0.0.1", &[("MARS_METRICS_LISTEN", &ma)]);
    let b = Host::start_at(t.path(), "b", "127.0.0.2");
    let env = skewed("+300s");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut g = Host::start_with_env(t.path(), "g", "127.0.0.3", &env);
    a.ok(&["create-cluster"]);
    b.join(&a);
    g.join(&a);
    for h in [&a, &b, &g] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    // a measures g's clock 300 s ahead (minus a stamp's travel time) and b's as right.
    eventually(30, "a measures g's skew", || {
        member(&a, "g")["clock_skew_secs"]
            .as_f64()
            .is_some_and(|s| (295.0..=301.0).contains(&s))
    });
    eventually(30, "a measures b's clock", || {
        member(&a, "b")["clock_skew_secs"].as_f64().is_some()
    });
    let sb = member(&a, "b")["clock_skew_secs"]
        .as_f64()
        .expect("b's skew");
    assert!(sb.abs() < 2.0, "b's clock is right: {sb}");
    // g measures everybody 300 s behind.
    eventually(30, "g measures a's skew", || {
        member(&g, "a")["clock_skew_secs"]
            .as_f64()
            .is_some_and(|s| (-305.0..=-299.0).contains(&s))
    });
    // Said once in the log, naming the host and the skew; shown in `view all`.
    eventually(10, "a's warning", || {
        a.log_text()
            .lines()
            .any(|l| l.contains("the clock of g is ") && l.contains(" s ahead of this host's"))
    });
    let warnings = a
        .log_text()
        .lines()
        .filter(|l| l.contains("the clock of g is"))
        .count();
    let text = a.ok(&["view", "all"]);
    let line = text
        .lines()
        .find(|l| l.contains("host g at"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains(", CLOCK ") && line.contains("s AHEAD"),
        "{line}"
    );
    assert!(line.contains("alive, connected, info "), "{line}");
    let bline = text.lines().find(|l| l.contains("host b at")).expect("b");
    assert!(!bline.contains("CLOCK"), "{bline}");
    // Every member's information is fresh by a's clock, although every stamp in the
    // cluster now runs 300 s ahead of a's wall clock.
    for h in ["b", "g"] {
        let age = member(&a, h)["age_secs"].as_f64().expect("age");
        assert!(age < 5.0, "{h}: {age}");
    }
    // `check all` warns about g's clock; perfdata carries the worst skew.
    let mut args = vec!["all"];
    args.extend_from_slice(&LAX);
    let (code, out) = check(&a, &args);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("MARS WARNING: clock of g "), "{out}");
    assert!(
        out.contains(" s ahead | ") && out.contains(" clock_skew="),
        "{out}"
    );
    // The metric.
    let m = scrape(&ma);
    let v = value(&m, "mars_peer_clock_skew_seconds{peer=\"g\"}").expect(&m);
    assert!((295.0..=301.0).contains(&v), "{v}");
    assert!(
        value(&m, "mars_peer_age_seconds{peer=\"g\"}").is_some(),
        "{m}"
    );

    // g crashes: a and b see it NOT ALIVE within seconds (the stale rule: it neither answers
    // nor moves its stamp), although its last stamp is 300 s in their future.
    g.kill9();
    let killed = Instant::now();
    for h in [&a, &b] {
        eventually(30, "g NOT ALIVE", || member(h, "g")["alive"] == false);
    }
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(20), "{took:?}");
    let age = member(&a, "g")["age_secs"].as_f64().expect("age");
    assert!(
        (5.0..60.0).contains(&age),
        "g's age counts from its last entry: {age}"
    );
    let text = a.ok(&["view", "all"]);
    assert!(
        text.lines()
            .any(|l| l.contains("host g at") && l.contains("NOT ALIVE")),
        "{text}"
    );
    // b stays alive and fresh.
    let mb = member(&a, "b");
    assert_eq!(mb["alive"], true, "{mb}");
    assert!(mb["age_secs"].as_f64().expect("age") < 5.0, "{mb}");
    assert_eq!(
        a.log_text()
            .lines()
            .filter(|l| l.contains("the clock of g is"))
            .count(),
        warnings,
        "warned once"
    );
}

#[test]
fn a_host_that_ran_40_days_ahead_is_accepted_after_its_clock_is_fixed() {
    if !have_faketime() {
        return;
    }
    let t = tmp();
    let env = skewed("+40d");
    // a creates the cluster with a correct clock (its certificate is valid from an hour
    // before now), then runs with its clock 40 days ahead: what it writes then is stamped so.
    let mut a = Host::start_at(t.path(), "a", "127.0.0.1");
    a.ok(&["create-cluster"]);
    a.stop();
    a.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    a.start_again();
    a.ok(&["set-global-sync-limit-value", "2"]);
    // A few liveness stamps, 40 days ahead.
    std::thread::sleep(Duration::from_secs(3));
    a.stop();
    // Its clock is fixed.
    a.env.clear();
    a.start_again();
    eventually(10, "the repair's warning", || {
        a.log_text().contains("the metadata clock was 345")
    });
    let log = a.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("the metadata clock was"))
        .expect("warned");
    assert!(line.contains("entries of this host anew"), "{line}");
    // A host with a correct clock joins it and takes its metadata: nothing is refused.
    let b = Host::start_at(t.path(), "b", "127.0.0.2");
    b.join(&a);
    for h in [&a, &b] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    eventually(20, "b sees a alive", || member(&b, "a")["alive"] == true);
    assert!(
        !b.log_text().contains("refused metadata"),
        "{}",
        b.log_text()
    );
    eventually(20, "b reads a's setting", || {
        b.ok(&["get-global-sync-limit-value"]).trim() == "2"
    });
    // And takes what a writes now.
    a.ok(&["set-global-sync-limit-value", "4"]);
    eventually(20, "b reads a's new setting", || {
        b.ok(&["get-global-sync-limit-value"]).trim() == "4"
    });
    // A second restart changes nothing more.
    a.restart();
    assert_eq!(
        a.log_text().matches("the metadata clock was").count(),
        1,
        "{}",
        a.log_text()
    );
}
