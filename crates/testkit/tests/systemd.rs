//! The systemd interface end to end under a real systemd (mars.md §4.3–4.5).
//!
//! Two hosts, each a systemd box of its own (`mars_testkit::sdbox`) with `marsd` running inside
//! as the service `marsd.service` derived from `dist/marsd.service` (Type=notify, watchdog).
//! One box per host rather than two daemons in one box: a stack's unit names are the same on
//! every host (`app-web\x2d1.service`), so two hosts sharing one systemd would share the units
//! and "runs on the primary only" could not be observed. The boxes share the host's network
//! namespace (daemons on 127.0.0.x) and the test's temporary directory (disks, roots, templates,
//! marker files), so `marsadm` runs outside and the markers are visible to the test.
//!
//! The test stack: `app-@escvar{res}.service` (a real service writing a marker file while it
//! runs) and `fence-@escvar{res}.script` (`DEFAULT_START`/`DEFAULT_STOP`, a `.script` that
//! starts and stops the app through systemctl and can be told to fail its stop).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mars_testkit::repl::{eventually, join, tail, tmp, wait_uptodate};
use mars_testkit::sdbox::{self, SdBox};
use mars_testkit::sdnode::marsd_unit;
use mars_testkit::{free_port, free_port_on, Host};

const RES: &str = "web-1";
const APP: &str = "app-web\\x2d1.service";
const SCRIPT: &str = "fence-web\\x2d1.script";
const SIZE: u64 = 16 << 20;

/// A host: its box (dropped last: killing it ends marsd) and the handle to its marsd.
struct Node {
    host: Host,
    sdbox: SdBox,
}

fn templates(dir: &Path, marks: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let m = marks.display();
    std::fs::write(
        dir.join("app-@escvar{res}.service"),
        format!(
            "[Unit]\nDescription=test application of @{{res}} on @{{host}}\n\n\
             [Service]\nType=simple\n\
             ExecStart=/bin/sh -c 'echo @{{host}} >> {m}/starts-@{{host}}; echo @{{host}} > {m}/app-@{{host}}; exec sleep infinity'\n\
             ExecStopPost=/bin/rm -f {m}/app-@{{host}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("fence-@escvar{res}.script"),
        format!(
            "#!/bin/sh\n# DEFAULT_START\n# DEFAULT_STOP\n# ALSO=app-@escvar{{res}}.service\n\
             M={m}\n\
             case \"$1\" in\n\
             start) echo @{{host}} > $M/script-@{{host}}; exec systemctl start 'app-@escvar{{res}}.service' ;;\n\
             stop) systemctl stop 'app-@escvar{{res}}.service' || exit 1\n\
             \x20     if [ -e $M/fail-stop-@{{host}} ]; then echo 'simulated: umount busy' >&2; exit 1; fi\n\
             \x20     rm -f $M/script-@{{host}} ;;\n\
             esac\n"
        ),
    )
    .unwrap();
}

fn start_node(t: &Path, name: &str, ip: &str, tpl: &Path) -> Node {
    start_node_with(t, name, ip, tpl, "")
}

fn start_node_with(t: &Path, name: &str, ip: &str, tpl: &Path, extra: &str) -> Node {
    let bins = mars_testkit::bin_dir();
    let sdbox = SdBox::boot(&t.join("boxes"), &[t, bins]);
    let base = t.join(name);
    std::fs::create_dir_all(&base).unwrap();
    let root = base.join("root");
    let log = base.join("marsd.log");
    let peer = format!("{ip}:{}", free_port_on(ip));
    let nbd_port = free_port();
    let exec = format!(
        "{} --root {} --host {name} --listen {peer} --nbd-listen 127.0.0.1:{nbd_port} \
         --systemd-templates {} --systemd-timeout 20 --device none --device-dir {}{extra}",
        bins.join("marsd").display(),
        root.display(),
        tpl.display(),
        base.join("dev").display()
    );
    std::fs::write(
        sdbox.path("/etc/systemd/system/marsd.service"),
        marsd_unit(&exec, &log),
    )
    .unwrap();
    sdbox.systemctl(&["daemon-reload"]);
    // Type=notify: this returns once marsd said READY=1.
    let o = sdbox.exec(&["systemctl", "start", "marsd.service"]);
    assert!(
        o.status.success(),
        "marsd.service did not start: {}\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        std::fs::read_to_string(&log).unwrap_or_default(),
        sdbox.journal(40)
    );
    let status = sdbox.systemctl(&["show", "-p", "StatusText", "--value", "marsd.service"]);
    assert!(status.starts_with(&format!("host {name}:")), "{status}");
    Node {
        host: Host::external(name, root, peer, nbd_port, log),
        sdbox,
    }
}

fn dump(nodes: &[&Node], marks: &Path) -> String {
    let mut s = format!("marks: {:?}\n", list(marks));
    for n in nodes {
        let o = n.sdbox.exec(&[
            "sh",
            "-c",
            "ls -laR /mars 2>&1; systemctl list-units 'mars*' 'app*' --all --no-pager 2>&1",
        ]);
        s += &format!(
            "--- {} tree and units:\n{}\n",
            n.host.name,
            String::from_utf8_lossy(&o.stdout)
        );
        s += &format!(
            "--- {}: {}--- marsd log:\n{}\n--- journal:\n{}\n",
            n.host.name,
            String::from_utf8_lossy(&n.host.marsadm(&["view", RES]).stdout),
            tail(&n.host.log_text(), 40),
            tail(&n.sdbox.journal(200), 40)
        );
    }
    s
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn wait(nodes: &[&Node], marks: &Path, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        if start.elapsed() > Duration::from_secs(secs) {
            panic!("timed out: {what}\n{}", dump(nodes, marks));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn starts(marks: &Path, host: &str) -> usize {
    std::fs::read_to_string(marks.join(format!("starts-{host}")))
        .unwrap_or_default()
        .lines()
        .count()
}

/// The member line of `host` in `view RES` on `n`.
fn member_line(n: &Node, host: &str) -> String {
    let v = n.host.ok(&["view", RES]);
    v.lines()
        .find(|l| l.trim_start().starts_with(&format!("member {host}:")))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn stack_follows_the_primary_and_a_failed_stop_compensates() {
    if !sdbox::available() {
        return;
    }
    let dir = tmp();
    let t = dir.path();
    let marks = t.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let tpl = t.join("templates");
    templates(&tpl, &marks);
    let a = start_node(t, "a", "127.0.0.1", &tpl);
    let b = start_node(t, "b", "127.0.0.2", &tpl);
    let all = [&a, &b];

    a.host.create_resource(RES, SIZE);
    b.host.join(&a.host);
    for n in all {
        n.host.ok(&["--timeout", "30", "wait-cluster"]);
    }
    join(&b.host, RES, SIZE);
    wait_uptodate(&b.host, RES, 60);

    // Exactly one host runs the application at any moment, through every step below.
    let overlap = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (overlap, stop, marks) = (overlap.clone(), stop.clone(), marks.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if marks.join("app-a").exists() && marks.join("app-b").exists() {
                    overlap.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // A native unit as start and stop unit; the bare resource name is escaped.
    let out = a.host.ok(&["set-systemd-unit", RES, "app-web-1.service"]);
    assert!(out.contains(APP), "{out}");
    wait(&all, &marks, 10, "b learns the units", || {
        b.host.ok(&["get-systemd-unit", RES]).trim() == format!("{APP} {APP}")
    });
    wait(&all, &marks, 30, "the app runs on the primary a", || {
        marks.join("app-a").exists() && a.sdbox.systemctl(&["is-active", APP]) == "active"
    });
    wait(&all, &marks, 30, "b reports its stop", || {
        member_line(&a, "b").contains(&format!("systemd: stop {APP}: ok"))
    });
    assert!(!marks.join("app-b").exists());
    assert_ne!(b.sdbox.systemctl(&["is-active", APP]), "active");
    assert_eq!(b.host.ok(&["get-systemd-want", RES]).trim(), "a");
    let view = a.host.ok(&["view", RES]);
    assert!(
        view.contains(&format!("systemd: start {APP} stop {APP} want a")),
        "{view}"
    );
    assert!(
        member_line(&a, "a").contains(&format!("systemd: start {APP}: ok")),
        "{view}"
    );

    // Planned handover: a stops first, then b starts.
    let out = b.host.ok(&["primary", RES]);
    assert!(out.contains("stack started"), "{out}");
    wait(&all, &marks, 30, "the app moved to b", || {
        marks.join("app-b").exists() && !marks.join("app-a").exists()
    });
    assert_ne!(a.sdbox.systemctl(&["is-active", APP]), "active");
    assert_eq!(a.host.view("systemd-want", RES), "b");

    // The .script stack chosen by its marker; b is the primary, so it is wanted there.
    let out = b.host.ok(&["set-systemd-unit", RES, "DEFAULT"]);
    assert!(out.contains(SCRIPT), "{out}");
    wait(
        &all,
        &marks,
        30,
        "the script started the stack on b",
        || marks.join("script-b").exists() && marks.join("app-b").exists(),
    );
    // The native app unit stays generated: the script names it in `# ALSO=`.
    assert!(a.sdbox.path(&format!("/run/systemd/system/{APP}")).exists());

    // A failing stop on the old primary: the handover is refused, b keeps the role and its
    // stack runs again (the script had stopped the app before failing).
    wait(&all, &marks, 30, "a sees b acting as primary", || {
        member_line(&a, "b").contains(" Primary")
    });
    let before = starts(&marks, "b");
    std::fs::write(marks.join("fail-stop-b"), "").unwrap();
    let err = a.host.refused(&["primary", RES]);
    assert!(err.contains("did not stop on b"), "{err}");
    assert!(err.contains("b stays primary"), "{err}");
    wait(
        &all,
        &marks,
        30,
        "b's stack restarted by compensation",
        || marks.join("app-b").exists() && starts(&marks, "b") > before,
    );
    assert_eq!(a.host.view("primarynode", RES), "b");
    assert_eq!(b.host.view("role", RES), "Primary");
    assert_eq!(a.host.view("role", RES), "Secondary");
    assert_eq!(b.host.view("systemd-want", RES), "b");
    assert!(!marks.join("app-a").exists());

    // Without the fault, the handover back to a works.
    std::fs::remove_file(marks.join("fail-stop-b")).unwrap();
    let out = a.host.ok(&["primary", RES]);
    assert!(out.contains("stack started"), "{out}");
    wait(&all, &marks, 30, "the stack moved back to a", || {
        marks.join("app-a").exists()
            && marks.join("script-a").exists()
            && !marks.join("app-b").exists()
            && !marks.join("script-b").exists()
    });

    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert!(
        !overlap.load(Ordering::Relaxed),
        "the application ran on both hosts at once\n{}",
        dump(&all, &marks)
    );

    // `systemd-trigger` regenerates (nothing changed) and reruns the want operations.
    let out = a.host.ok(&["systemd-trigger", RES]);
    assert!(out.contains("0 changed"), "{out}");

    // A start unit systemd does not know: reported once, not retried (MARS reports 0); once
    // the unit exists, `systemd-trigger` starts it.
    a.host.ok(&["set-systemd-unit", RES, "nosuch.service"]);
    wait(&all, &marks, 30, "a reports the unknown unit", || {
        member_line(&a, "a")
            .contains("systemd: start nosuch.service: systemd does not know this unit")
    });
    let tries = || {
        a.host
            .log_text()
            .lines()
            .filter(|l| l.contains("systemd start nosuch.service (want"))
            .count()
    };
    // Before, one try took 3 s of backoff inside, and the next came 1 s later.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(tries(), 1, "{}", dump(&all, &marks));
    std::fs::write(
        a.sdbox.path("/etc/systemd/system/nosuch.service"),
        "[Service]\nExecStart=/bin/sleep infinity\n",
    )
    .unwrap();
    a.sdbox.systemctl(&["daemon-reload"]);
    a.host.ok(&["systemd-trigger", RES]);
    wait(&all, &marks, 30, "the unit, now known, started", || {
        a.sdbox.systemctl(&["is-active", "nosuch.service"]) == "active"
            && member_line(&a, "a").contains("systemd: start nosuch.service: ok")
    });
    assert_eq!(tries(), 2);
    a.sdbox.systemctl(&["stop", "nosuch.service"]);

    // Removing the stack stops it and removes the generated files.
    a.host.ok(&["set-systemd-unit", RES, ""]);
    wait(&all, &marks, 30, "the stack is gone everywhere", || {
        !marks.join("app-a").exists()
            && !a.sdbox.path(&format!("/run/systemd/system/{APP}")).exists()
            && !b.sdbox.path(&format!("/run/systemd/system/{APP}")).exists()
    });
    assert_eq!(b.host.ok(&["get-systemd-unit", RES]).trim(), "");

    // `marsadm systemd-generate` writes what the generator library produces, and the same
    // bodies marsd wrote into the box.
    check_generate(&a, &tpl, t);
}

fn strip_header(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with("###"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn check_generate(a: &Node, tpl: &Path, t: &Path) {
    use mars_unitgen::{fs as ufs, Config, Generator, WantedUnit};
    let gen = t.join("generated");
    let out = a.host.ok(&[
        "systemd-generate",
        RES,
        "DEFAULT",
        "--templates",
        tpl.to_str().unwrap(),
        "--output",
        gen.to_str().unwrap(),
        "--host",
        "a",
    ]);
    let templates = ufs::load_templates(&[tpl.to_path_buf()]).unwrap();
    let system: Vec<PathBuf> = ufs::SYSTEM_UNIT_DIRS.iter().map(PathBuf::from).collect();
    let config = Config {
        unit_dir: gen.display().to_string(),
        scripts_dir: gen.display().to_string(),
        existing_units: ufs::existing_unit_names(&system, std::slice::from_ref(&gen)).unwrap(),
        ..Config::default()
    };
    let vars = mars_unitgen::host_vars("a", &a.host.root.display().to_string(), "");
    let g = Generator::new(&templates, &config, vars, vec![RES.into()]);
    let choice = g.choose_units(RES, "DEFAULT", None).unwrap();
    assert_eq!(choice.start, SCRIPT);
    let generation = g
        .generate(&[WantedUnit {
            res: RES.into(),
            unit: choice.start,
        }])
        .unwrap();
    let names: Vec<&str> = generation.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, [APP, SCRIPT]);
    for f in &generation.files {
        assert!(out.contains(&format!("written {}", f.path)), "{out}");
        assert_eq!(std::fs::read_to_string(&f.path).unwrap(), f.content);
    }
    // marsd wrote the same script for host a (its header names another output directory).
    let in_box = a
        .sdbox
        .path(&format!("/etc/marsadm/systemd-generated-scripts/{SCRIPT}"));
    // Removed with the stack above; regenerate it through marsd to compare.
    a.host.ok(&["set-systemd-unit", RES, "DEFAULT"]);
    eventually(20, "marsd generated the script", || in_box.exists());
    let by_marsd = std::fs::read_to_string(&in_box).unwrap();
    let by_cli = std::fs::read_to_string(gen.join(SCRIPT)).unwrap();
    assert_eq!(strip_header(&by_marsd), strip_header(&by_cli));
    a.host.ok(&["set-systemd-unit", RES, ""]);
}

/// The shipped default templates (`dist/systemd-templates`) generate units that systemd
/// accepts without a single complaint (checked inside a box: `systemd-analyze verify` leaves
/// files in /run).
#[test]
fn shipped_templates_generate_valid_units() {
    if !sdbox::available() {
        return;
    }
    let dir = tmp();
    let t = dir.path();
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist");
    let out = t.join("units");
    let o = std::process::Command::new(mars_testkit::bin("marsadm"))
        .args(["--root", "/nonexistent", "systemd-generate", RES, "DEFAULT"])
        .arg("--templates")
        .arg(&dist)
        .arg("--output")
        .arg(&out)
        .args(["--host", "alpha"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("vol-web\\x2d1.mount"), "{stdout}");
    assert!(stdout.contains("vol-web\\x2d1-app.service"), "{stdout}");
    let b = SdBox::boot(&t.join("boxes"), &[t]);
    let files = list(&out);
    let mut args = vec!["systemd-analyze".to_string(), "verify".to_string()];
    args.extend(files.iter().map(|f| out.join(f).display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = b.exec(&args);
    // Unknown keys only warn: any output is a failure.
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

// ------------------------------------------------------------------ MARS's templates at run time

/// Templates in the shape of MARS's `systemd-testing/` set, written for this test (MARS's
/// own files are not part of this repository; `crates/unitgen`'s `external_template_dir`
/// test takes a checkout of them through `MARS_TEMPLATES_DIR`): the global watcher
/// `mars-trigger.path` on `/mars/userspace/systemd-trigger`, the per-resource watcher
/// `mars-@escvar{res}-trigger.path` on `/mars/resource-RES/systemd-trigger` (both
/// `ALWAYS_START`, both with services running `/usr/bin/marsadm systemd-trigger-extern`),
/// `mars.path` on `/mars/uuid`, and an application unit that, as MARS's mount unit, only starts
/// where `/mars/resource-RES/systemd-want` is a symlink — and here also checks that it names
/// this host. One difference to MARS's watchers: no `PathExists=` on the trigger files.
/// Since systemd 246 `PathExists=` is level-triggered (the service is started again as soon
/// as it ends while the file exists), so MARS's watchers loop, and with a `marsadm` that
/// answers in milliseconds they hit systemd's trigger limit and fail (`trigger-limit-hit`);
/// `PathChanged=`/`PathModified=` fire once per write, which is what MARS meant.
fn mars_style_templates(dir: &Path, marks: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let m = marks.display();
    let files: [(&str, String); 8] = [
        (
            "mars.path",
            "[Unit]\nDescription=activation by /mars/uuid\n\n# ALWAYS_START\n\n\
             [Path]\nPathExists=/mars/uuid\nUnit=mars.service\n\n[Install]\nWantedBy=mars.service\n"
                .into(),
        ),
        (
            "mars-trigger.path",
            "[Unit]\nDescription=global watcher /mars/userspace/systemd-trigger\n\n# ALWAYS_START\n\n\
             BindsTo=mars.service\nAfter=mars.service\n\n\
             [Path]\nPathChanged=/mars/userspace/systemd-trigger\n\
             PathModified=/mars/userspace/systemd-trigger\nUnit=mars-trigger.service\n\n\
             [Install]\nWantedBy=mars.service\n"
                .into(),
        ),
        (
            "mars-trigger.service",
            "[Unit]\nDescription=global trigger\nAfter=daemon-reload.service\n\n\
             [Service]\nType=oneshot\nRemainAfterExit=no\nKillMode=none\n\
             ExecStart=/usr/bin/marsadm systemd-trigger-extern\n\n[Install]\nWantedBy=mars.service\n"
                .into(),
        ),
        (
            "mars-@escvar{res}-trigger.path",
            "[Unit]\nDescription=per-resource watcher for /mars/resource-@{res}/systemd-trigger\n\
             Requires=mars-trigger.path\nAfter=mars-trigger.path\n\n# ALWAYS_START\n\n\
             [Path]\nPathChanged=/mars/resource-@{res}/systemd-trigger\n\
             PathModified=/mars/resource-@{res}/systemd-trigger\n\
             Unit=mars-@escvar{res}-trigger.service\n\n[Install]\nWantedBy=mars.service\n"
                .into(),
        ),
        (
            "mars-@escvar{res}-trigger.service",
            "[Unit]\nDescription=per-resource trigger\nAfter=daemon-reload.service\n\
             After=mars-trigger.service\n\n\
             [Service]\nType=oneshot\nRemainAfterExit=no\nKillMode=none\n\
             ExecStart=/usr/bin/marsadm systemd-trigger-extern @{res}\n\n\
             [Install]\nWantedBy=mars.service\n"
                .into(),
        ),
        (
            "daemon-reload.service",
            "[Unit]\nDescription=single-threaded daemon-reload\nBefore=mars-trigger.service\n\n\
             [Service]\nType=oneshot\nRemainAfterExit=no\nKillMode=none\n\
             ExecStart=/usr/bin/env systemctl daemon-reload\n\n[Install]\nWantedBy=mars.service\n"
                .into(),
        ),
        (
            "app-@escvar{res}.service",
            format!(
                "[Unit]\nDescription=test application of @{{res}} on @{{host}}\n\
                 Requires=mars.service\nAfter=mars.service\nAfter=daemon-reload.service\n\
                 ConditionPathIsSymbolicLink=/mars/resource-@{{res}}/systemd-want\n\n\
                 [Service]\nType=simple\n\
                 ExecStartPre=/bin/sh -c 'test \"$(readlink /mars/resource-@{{res}}/systemd-want)\" = @{{host}}'\n\
                 ExecStart=/bin/sh -c 'echo @{{host}} >> {m}/starts-@{{host}}; echo @{{host}} > {m}/app-@{{host}}; exec sleep infinity'\n\
                 ExecStopPost=/bin/rm -f {m}/app-@{{host}}\n\n[Install]\nWantedBy=mars.service\n"
            ),
        ),
        (
            // MARS's own mars.service loads the kernel module; marsd needs none, so the
            // stand-in only marks "MARS is up" for the units that require it.
            "mars.service",
            "[Unit]\nDescription=MARS (stand-in: marsd runs as its own service)\n\
             StopWhenUnneeded=false\nIgnoreOnIsolate=true\n\n# ALWAYS_START\n\n\
             [Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
                .into(),
        ),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// In the box: `/usr/bin/marsadm` (the path MARS's templates run) as a wrapper around our
/// `marsadm` for this host's root, which also records each call in MARKS/calls-HOST.
fn install_marsadm(n: &Node, marks: &Path) {
    let wrapper = n.sdbox.path("/usr/bin/marsadm");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}/calls-{}\nexec {} --root {} \"$@\"\n",
            marks.display(),
            n.host.name,
            mars_testkit::bin("marsadm").display(),
            n.host.root.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// How often the watchers of `host` ran `systemd-trigger-extern RES`.
fn extern_calls(marks: &Path, host: &str) -> usize {
    std::fs::read_to_string(marks.join(format!("calls-{host}")))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == format!("systemd-trigger-extern {RES}"))
        .count()
}

fn want_link(n: &Node) -> Option<String> {
    std::fs::read_link(n.sdbox.path(&format!("/mars/resource-{RES}/systemd-want")))
        .ok()
        .map(|p| p.display().to_string())
}

const WATCHER: &str = "mars-web\\x2d1-trigger.path";

/// MARS's templates at run time (issue 17): marsd keeps a MARS-compatible `/mars` tree in each
/// box (`--mars-tree /mars`), the watcher units MARS generates are generated, enabled and
/// started, they fire on the trigger files, and the stack follows the want link through a
/// handover, a failover with the old primary's host gone, and `secondary` (want `(none)`).
#[test]
fn mars_templates_follow_the_stack() {
    if !sdbox::available() {
        return;
    }
    let dir = tmp();
    let t = dir.path();
    let marks = t.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let tpl = t.join("templates");
    mars_style_templates(&tpl, &marks);
    let extra = " --mars-tree /mars";
    let a = start_node_with(t, "a", "127.0.0.1", &tpl, extra);
    let b = start_node_with(t, "b", "127.0.0.2", &tpl, extra);
    install_marsadm(&a, &marks);
    install_marsadm(&b, &marks);
    let all = [&a, &b];

    a.host.create_resource(RES, SIZE);
    b.host.join(&a.host);
    for n in all {
        n.host.ok(&["--timeout", "30", "wait-cluster"]);
    }
    join(&b.host, RES, SIZE);
    wait_uptodate(&b.host, RES, 60);

    // The tree: ours (marker), the cluster's uuid, the trigger files (the systemd triggers
    // are taken — removed — by the watchers' `systemd-trigger-extern`: written, then gone).
    for n in all {
        let mars = n.sdbox.path("/mars");
        wait(&all, &marks, 10, "the tree is complete", || {
            mars.join(".marsd-tree").is_file()
                && std::fs::read_link(mars.join("uuid")).is_ok()
                && mars.join("userspace/emergency-trigger").is_file()
                && mars.join(format!("resource-{RES}/userspace")).is_dir()
        });
    }

    // The stack: the want follows the designated primary a. The watchers (generated for every
    // resource, as MARS does) are enabled and running on both hosts.
    a.host.ok(&["set-systemd-unit", RES, "app-web-1.service"]);
    wait(&all, &marks, 30, "the want link names a everywhere", || {
        want_link(&a).as_deref() == Some("a") && want_link(&b).as_deref() == Some("a")
    });
    wait(&all, &marks, 30, "the app runs on a", || {
        marks.join("app-a").exists() && a.sdbox.systemctl(&["is-active", APP]) == "active"
    });
    for n in all {
        wait(&all, &marks, 30, "the watcher runs", || {
            n.sdbox.systemctl(&["is-active", WATCHER]) == "active"
        });
        let enabled = n.sdbox.systemctl(&["is-enabled", WATCHER]);
        assert!(enabled.starts_with("enabled"), "{}: {enabled}", n.host.name);
        assert_eq!(
            n.sdbox.systemctl(&["is-active", "mars-trigger.path"]),
            "active"
        );
        wait(&all, &marks, 30, "the watcher fired", || {
            extern_calls(&marks, &n.host.name) > 0
        });
    }
    assert!(!marks.join("app-b").exists());

    // Planned handover: the want link moves to b on both hosts, the watchers fire again, the
    // app moves.
    let (ca, cb) = (extern_calls(&marks, "a"), extern_calls(&marks, "b"));
    b.host.ok(&["primary", RES]);
    wait(&all, &marks, 30, "the app moved to b", || {
        marks.join("app-b").exists() && !marks.join("app-a").exists()
    });
    wait(&all, &marks, 30, "the want link names b everywhere", || {
        want_link(&a).as_deref() == Some("b") && want_link(&b).as_deref() == Some("b")
    });
    wait(
        &all,
        &marks,
        30,
        "the watchers fired on the handover",
        || extern_calls(&marks, "a") > ca && extern_calls(&marks, "b") > cb,
    );
    // The watchers do not loop: a few calls per change, not hundreds.
    std::thread::sleep(Duration::from_secs(3));
    let calls = extern_calls(&marks, "a") + extern_calls(&marks, "b");
    assert!(calls < 60, "{calls} calls of systemd-trigger-extern");

    // Failover: b's host is gone; a takes over by force; the tree and the stack follow.
    wait_uptodate(&a.host, RES, 60);
    let starts_a = starts(&marks, "a");
    let ca = extern_calls(&marks, "a");
    let Node { host: bh, sdbox } = b;
    drop(sdbox);
    drop(bh);
    let all = [&a];
    a.host.ok(&["pause-fetch", RES]);
    a.host
        .ok(&["--timeout", "30", "primary", "--force", "--force", RES]);
    wait(&all, &marks, 30, "the app runs on a again", || {
        starts(&marks, "a") > starts_a && a.sdbox.systemctl(&["is-active", APP]) == "active"
    });
    assert_eq!(want_link(&a).as_deref(), Some("a"));
    wait(
        &all,
        &marks,
        30,
        "a's watcher fired on the failover",
        || extern_calls(&marks, "a") > ca,
    );

    // `secondary`: as MARS, the want becomes (none) first and the stack stops.
    let out = a.host.ok(&["secondary", RES]);
    assert!(out.contains("wanted nowhere"), "{out}");
    wait(&all, &marks, 30, "the app stopped", || {
        !marks.join("app-a").exists() && a.sdbox.systemctl(&["is-active", APP]) != "active"
    });
    // The tree follows the engine's state within a poll (0.2 s, longer under load): the stack
    // may stop before the link is rewritten.
    wait(&all, &marks, 30, "the want link says (none)", || {
        want_link(&a).as_deref() == Some("(none)")
    });
    assert_eq!(a.host.ok(&["get-systemd-want", RES]).trim(), "(none)");

    // Removing the stack: the generated watcher stays (it belongs to the resource), the app's
    // unit goes. Deleting the resource here removes its part of the tree.
    a.host.ok(&["set-systemd-unit", RES, ""]);
    wait(&all, &marks, 30, "the app's unit is gone", || {
        !a.sdbox.path(&format!("/run/systemd/system/{APP}")).exists()
    });
    assert!(a
        .sdbox
        .path(&format!("/run/systemd/system/{WATCHER}"))
        .exists());
}

/// A tree directory holding something marsd did not make (a real MARS `/mars`) is refused at
/// start-up, and nothing in it is touched.
#[test]
fn a_mars_tree_that_is_not_ours_is_refused() {
    let dir = tmp();
    let t = dir.path();
    let mars = t.join("mars");
    std::fs::create_dir_all(mars.join("resource-r")).unwrap();
    std::os::unix::fs::symlink("a", mars.join("resource-r/systemd-want")).unwrap();
    let o = std::process::Command::new(mars_testkit::bin("marsd"))
        .arg("--root")
        .arg(t.join("root"))
        .args(["--host", "a", "--listen", "127.0.0.1:0", "--device", "none"])
        .arg("--mars-tree")
        .arg(&mars)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("refusing to use"), "{err}");
    assert!(err.contains("resource-r"), "{err}");
    assert!(!mars.join(".marsd-tree").exists());
    assert_eq!(
        std::fs::read_link(mars.join("resource-r/systemd-want")).unwrap(),
        Path::new("a")
    );
}
