//! Real application stacks end to end (issue 17 item 4): two hosts, each a systemd box with
//! marsd as `marsd.service` and `/dev/mars/RES` (FUSE+loop), a filesystem on the device mounted
//! by the shipped `.mount` template and an application bound to it, moved by marsd:
//!
//! - a PostgreSQL server on ext4, a writer committing numbered rows over TCP;
//! - a `systemd-nspawn` container on ext4 (its root a small tree on the volume, the host's
//!   /usr read-only), counting in a file it fsyncs.
//!
//! Each stack goes through a planned handover a→b and back, a failover to b with a's machine
//! crashed (the whole box SIGKILLed: marsd, the application, the mount without an unmount),
//! a's return with the split brain shown in `view` and resolved with the documented commands
//! (`invalidate`, or `down` + `leave-resource` + `join-resource`), and a handover back to a. After each
//! step the application's own check runs: every acknowledged write is there (after the crash:
//! every write b had replayed when a died), the data is a consistent prefix, the database's
//! `pg_amcheck` passes, and the application goes on writing on its new host; at the end the
//! filesystem checks clean. The container stack also goes through a kill of `marsd` alone on
//! its primary (the operator's lazy unmount and loop detach, the loop number reused, marsd
//! restarted), then handover away and back. `STACKS_LOOPS=N` repeats each scenario N times
//! (default 1).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mars_testkit::foreign::{loop_bound, Foreign};
use mars_testkit::repl::{join, tail, tmp};
use mars_testkit::sdbox;
use mars_testkit::sdnode::{Node, NodeOptions};
use mars_testkit::{free_port, require};

const RES: &str = "app-1";
const MOUNT: &str = "vol-app\\x2d1.mount";
const VOL: &str = "/vol/app-1";
const MIB: u64 = 1 << 20;
const SIZE: u64 = 96 * MIB;

/// Can this machine run the stacks? Root, systemd, FUSE and loop devices, the tools.
fn supported(tools: &[&str]) -> bool {
    if !sdbox::available() {
        return false;
    }
    if !(Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists()) {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI must run the stacks with /dev/fuse and loop devices"
        );
        eprintln!("SKIPPED: needs /dev/fuse and /dev/loop-control");
        return false;
    }
    tools.iter().all(|t| require(t))
}

/// Runs a scenario `STACKS_LOOPS` times (default once), each with its own step clock.
fn each_loop(mut scenario: impl FnMut(&Clock)) {
    let loops = std::env::var("STACKS_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for i in 0..loops {
        let clock = Clock(Instant::now());
        clock.step(&format!("loop {}", i + 1));
        scenario(&clock);
    }
}

/// Seconds since the scenario started, for the step log.
struct Clock(Instant);

impl Clock {
    fn step(&self, what: &str) {
        eprintln!("{:>7.1}s {what}", self.0.elapsed().as_secs_f64());
    }
}

/// An application stack under test.
trait App {
    /// Writes the application's template into `dir` (the shipped mount template is added
    /// beside it); `shared` is the test's directory, visible in every box.
    fn template(&mut self, dir: &Path, shared: &Path);
    /// The start unit (the application), escaped.
    fn unit(&self) -> &'static str;
    /// Prepares the fresh filesystem mounted at `mnt` on `n` (the primary).
    fn prepare(&self, n: &Node, mnt: &str);
    /// Starts the load once the application runs for the first time.
    fn start_load(&mut self);
    /// Writes acknowledged so far (durable where they were acknowledged).
    fn acked(&self) -> u64;
    /// Stops or resumes writing (the primary idle).
    fn pause(&self, paused: bool);
    /// The application's check on `n`, where it runs now: every write up to `floor` is there,
    /// the data is consistent, and it goes on writing (unless paused).
    fn check(&self, n: &Node, floor: u64, nodes: &[&Node]);
    /// Stops the load for good.
    fn finish(&mut self);
}

fn dump(nodes: &[&Node]) -> String {
    let mut s = String::new();
    for n in nodes {
        let view = n.host.marsadm(&["view", RES]);
        s += &format!(
            "--- {}: {}{}--- marsd log:\n{}\n--- journal:\n{}\n",
            n.host.name,
            String::from_utf8_lossy(&view.stdout),
            String::from_utf8_lossy(&view.stderr),
            tail(&n.host.log_text(), 30),
            tail(&n.journal(300), 40)
        );
    }
    s
}

fn wait(nodes: &[&Node], secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out ({secs} s): {what}\n{}",
            dump(nodes)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `wait-resource RES uptodate` on `n`; on failure, every host's view, log and journal.
fn uptodate(n: &Node, nodes: &[&Node], secs: u64) {
    let o = n.host.marsadm(&[
        "--timeout",
        &secs.to_string(),
        "wait-resource",
        RES,
        "uptodate",
    ]);
    assert!(
        o.status.success(),
        "{} not up to date within {secs} s: {}\n{}",
        n.host.name,
        String::from_utf8_lossy(&o.stderr),
        dump(nodes)
    );
}

fn active(n: &Node, unit: &str) -> bool {
    n.is_up() && n.systemctl(&["is-active", unit]) == "active"
}

/// `(logfile, offset)` of a JSON log position.
fn pos(v: &serde_json::Value) -> Option<(u64, u64)> {
    Some((v["logfile"].as_u64()?, v["offset"].as_u64()?))
}

fn resource(n: &Node) -> serde_json::Value {
    let v = n.host.view_json();
    v["resources"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == RES).cloned())
        .unwrap_or_default()
}

/// The primary's durable log position now.
fn durable(n: &Node) -> (u64, u64) {
    pos(&resource(n)["log"]["durable"]).expect("the primary's durable position")
}

/// The position the secondary `n` has replayed up to, as it reports itself.
fn applied(n: &Node) -> Option<(u64, u64)> {
    let r = resource(n);
    r["members"]
        .as_array()?
        .iter()
        .find(|m| m["host"] == n.host.name.as_str())
        .and_then(|m| pos(&m["applied"]))
}

/// The application runs on `on` only, behind its mount.
fn runs_on(on: &Node, others: &[&Node], app: &dyn App, nodes: &[&Node]) {
    wait(
        nodes,
        90,
        &format!("the stack runs on {}", on.host.name),
        || active(on, app.unit()) && active(on, MOUNT),
    );
    for o in others {
        wait(
            nodes,
            30,
            &format!("the stack is stopped on {}", o.host.name),
            || !active(o, app.unit()) && !active(o, MOUNT),
        );
    }
}

/// `marsadm primary RES` on `n` (a planned handover); the stack is started there.
fn handover(n: &Node, nodes: &[&Node]) {
    let o = n.host.marsadm(&["--timeout", "90", "primary", RES]);
    assert!(
        o.status.success(),
        "handover to {}: {}{}\n{}",
        n.host.name,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        dump(nodes)
    );
}

/// How the returning host's split brain is resolved.
#[derive(Clone, Copy)]
enum Resolve {
    Invalidate,
    LeaveJoin,
}

/// One scenario at a time in this binary: each runs two boxes, a filesystem and an
/// application, and crashes a machine; two at once double the load on a small CI machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The test's directory; `STACKS_KEEP=1` keeps it (marsd logs, disks) for a failed run.
struct Dir {
    tmp: Option<tempfile::TempDir>,
    kept: Option<PathBuf>,
}

impl Dir {
    fn new() -> Dir {
        let tmp = tmp();
        if std::env::var_os("STACKS_KEEP").is_some() {
            let kept = tmp.keep();
            eprintln!("keeping {}", kept.display());
            return Dir {
                tmp: None,
                kept: Some(kept),
            };
        }
        Dir {
            tmp: Some(tmp),
            kept: None,
        }
    }

    fn path(&self) -> &Path {
        match (&self.tmp, &self.kept) {
            (Some(t), _) => t.path(),
            (None, Some(k)) => k,
            (None, None) => unreachable!("one of them is set"),
        }
    }
}

/// Two hosts a (primary) and b, `app`'s stack running on a with its load: a, b and b's disk.
fn stack_up(t: &Path, app: &mut dyn App, clock: &Clock) -> (Node, Node, PathBuf) {
    let tpl = t.join("templates");
    std::fs::create_dir_all(&tpl).unwrap();
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/systemd-templates");
    std::fs::copy(
        dist.join("vol-@escvar{res}.mount"),
        tpl.join("vol-@escvar{res}.mount"),
    )
    .unwrap();
    app.template(&tpl, t);
    let opt = NodeOptions {
        device: true,
        systemd_timeout: 90,
        ..NodeOptions::default()
    };
    let a = Node::start(t, "a", "127.0.0.1", &tpl, &opt);
    let b = Node::start(t, "b", "127.0.0.2", &tpl, &opt);
    a.host.create_resource(RES, SIZE);
    b.host.join(&a.host);
    for n in [&a, &b] {
        n.host.ok(&["--timeout", "30", "wait-cluster"]);
    }
    let disk_b = join(&b.host, RES, SIZE);
    uptodate(&b, &[&a, &b], 120);
    clock.step("pair up");

    // The filesystem and the application's data, made once on the primary by hand.
    wait(&[&a, &b], 30, "a's device", || {
        a.host
            .device(RES)
            .is_some_and(|d| a.sdbox().path(&d.to_string_lossy()).exists())
    });
    a.sh(&format!(
        "mkfs.ext4 -q -F /dev/mars/{RES} && mkdir -p /mnt/prep && mount /dev/mars/{RES} /mnt/prep"
    ));
    app.prepare(&a, "/mnt/prep");
    a.sh("umount /mnt/prep");
    let out = a.host.ok(&["set-systemd-unit", RES, "DEFAULT"]);
    assert!(out.contains(app.unit()), "{out}");
    runs_on(&a, &[&b], app, &[&a, &b]);
    app.start_load();
    app.check(&a, 0, &[&a, &b]);
    clock.step("stack up on a");
    (a, b, disk_b)
}

/// a's machine crashes with the stack running, and b takes over with `primary --force`.
/// Everything b had replayed by then must survive; what a acknowledged after b stopped
/// fetching is a's alone (its side of the split brain on its return). Returns the floor: what
/// a had acknowledged before b stopped fetching.
fn crash_a_then_force_b(a: &mut Node, b: &Node, app: &dyn App, clock: &Clock) -> u64 {
    let floor = app.acked();
    let at = durable(a);
    wait(&[a, b], 60, "b replayed what a had acknowledged", || {
        applied(b).is_some_and(|p| p >= at)
    });
    // A forced switch takes what the replica has: fetching stops first.
    b.host.ok(&["pause-fetch", RES]);
    let more = app.acked() + 10;
    wait(&[a, b], 60, "a acknowledges what b will never see", || {
        app.acked() >= more
    });
    a.crash();
    clock.step(&format!("a crashed, floor {floor}"));
    // As an operator makes sure: b no longer hears of a (NOT ALIVE after some seconds).
    wait(&[b], 60, "b sees a dead", || {
        b.host.view_json()["members"]
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m["host"] == "a" && m["alive"] == false))
    });
    // The forced switch counts a host as reachable by the same rule as `view`, but the
    // resource learns of a change at the host's next measurement: a forced switch in between
    // still asks for a confirmation, saying "a is reachable". Retried as an operator would
    // after reading the message again.
    let start = Instant::now();
    loop {
        let o = b
            .host
            .marsadm(&["--timeout", "60", "primary", "--force", RES]);
        if o.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            err.contains("a is reachable") && start.elapsed() < Duration::from_secs(30),
            "failover: {}{err}\n{}",
            String::from_utf8_lossy(&o.stdout),
            dump(&[b])
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    clock.step(&format!(
        "forced switch accepted {:.1}s after NOT ALIVE",
        start.elapsed().as_secs_f64()
    ));
    floor
}

fn scenario(app: &mut dyn App, resolve: Resolve, clock: &Clock) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Dir::new();
    let t = dir.path();
    let (mut a, b, disk_b) = stack_up(t, app, clock);

    // Planned handover a→b and back, writing all the time.
    handover(&b, &[&a, &b]);
    runs_on(&b, &[&a], app, &[&a, &b]);
    app.check(&b, app.acked(), &[&a, &b]);
    clock.step("handed over to b");
    uptodate(&a, &[&a, &b], 60);
    handover(&a, &[&a, &b]);
    runs_on(&a, &[&b], app, &[&a, &b]);
    app.check(&a, app.acked(), &[&a, &b]);
    clock.step("handed back to a");

    let floor = crash_a_then_force_b(&mut a, &b, app, clock);
    runs_on(&b, &[], app, &[&b]);
    app.check(&b, floor, &[&b]);
    clock.step("failed over to b");

    // A returns: it holds writes b never saw. `view` shows the split brain; the operator
    // resolves it on a, the loser. The primary stays idle meanwhile (the issue saw the
    // returning host not become up to date within 5 minutes while the primary was idle).
    a.boot();
    let nodes = [&a, &b];
    wait(&nodes, 60, "a sees the split brain", || {
        a.host.view("is-split-brain", RES) == "1"
    });
    let view = a.host.ok(&["view", RES]);
    assert!(view.to_lowercase().contains("split brain"), "{view}");
    assert!(!active(&a, app.unit()), "the stack must not run on a");
    clock.step("a back, split brain");
    app.pause(true);
    let quiet = app.acked();
    match resolve {
        Resolve::Invalidate => {
            a.host.ok(&["invalidate", RES]);
        }
        Resolve::LeaveJoin => {
            a.host.ok(&["down", RES]);
            a.host.ok(&["leave-resource", RES]);
            wait(&nodes, 30, "b sees a gone", || {
                !b.host.ok(&["view", RES]).contains("member a:")
            });
            let disk = a.host.root.parent().unwrap().join(format!("{RES}.img"));
            a.host.ok(&["join-resource", RES, disk.to_str().unwrap()]);
        }
    }
    let o = a
        .host
        .marsadm(&["--timeout", "300", "wait-resource", RES, "uptodate"]);
    assert!(
        o.status.success(),
        "a not up to date within 5 minutes while b is idle: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        dump(&nodes)
    );
    assert_eq!(a.host.view("is-split-brain", RES), "0", "{}", dump(&nodes));
    assert_eq!(app.acked(), quiet, "the primary stayed idle");
    clock.step("a resolved and up to date");
    app.pause(false);
    app.check(&b, app.acked(), &nodes);

    // Handover back to a.
    handover(&a, &nodes);
    runs_on(&a, &[&b], app, &nodes);
    app.check(&a, app.acked(), &nodes);
    clock.step("handed back to a");
    the_end(&a, &b, &disk_b, app, clock);
}

/// The end: the stack stopped on a, the filesystem clean, b's replica equal to a's device.
fn the_end(a: &Node, b: &Node, disk_b: &Path, app: &mut dyn App, clock: &Clock) {
    let nodes = [a, b];
    app.finish();
    let last = app.acked();
    a.host.ok(&["set-systemd-unit", RES, ""]);
    wait(&nodes, 60, "the stack stopped", || {
        !active(a, app.unit()) && !active(a, MOUNT)
    });
    a.sh(&format!("e2fsck -n -f /dev/mars/{RES} >/dev/null"));
    uptodate(b, &nodes, 60);
    let dev_a = a.host.device(RES).expect("a's device");
    let dev_a = a.sdbox().path(&dev_a.to_string_lossy());
    assert!(
        mars_testkit::repl::first_difference(&dev_a, disk_b, SIZE).is_none(),
        "b's replica differs from a's device"
    );
    clock.step(&format!("clean, {last} writes acknowledged"));
}

/// The FUSE mounts of marsd's device `RES` in `n`'s box (source `mars-blockdev:RES`), and
/// whether each is live (a dead one answers `stat` with ENOTCONN).
fn fuse_mounts(n: &Node) -> Vec<(String, bool)> {
    n.sh("cat /proc/self/mountinfo")
        .lines()
        .filter(|l| l.contains(&format!(" mars-blockdev:{RES} ")))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .map(|at| {
            let live = n.sdbox().exec(&["stat", "-c", "%s", &at]).status.success();
            (at, live)
        })
        .collect()
}

/// `/dev/loopN` that `n`'s device link `/dev/mars/RES` points to.
fn loop_of(n: &Node) -> String {
    n.sh(&format!("readlink /dev/mars/{RES}"))
        .trim()
        .to_string()
}

/// Issue 17: only `marsd` is killed on the primary (not the machine) while its stack runs;
/// the operator cleans up (the filesystem lazily unmounted, the loop device detached, its
/// number then taken by somebody else) and starts marsd again. The restarted marsd replaces
/// its dead FUSE mount and its stale device link (the foreign loop device is left alone), the
/// stack starts again on the same host with every acknowledged write, and handovers away and
/// back work, the device there each time.
fn marsd_killed_scenario(app: &mut dyn App, clock: &Clock) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Dir::new();
    let t = dir.path();
    let (a, b, disk_b) = stack_up(t, app, clock);
    let nodes = [&a, &b];
    uptodate(&b, &nodes, 60);

    // Only marsd dies. The operator keeps systemd from restarting it (Restart=on-failure)
    // until the leftovers are cleaned up, as the issue's operator did.
    let lo = loop_of(&a);
    a.sh("mkdir -p /run/systemd/system/marsd.service.d && \
         printf '[Service]\\nRestart=no\\n' > /run/systemd/system/marsd.service.d/hold.conf && \
         systemctl daemon-reload && systemctl kill -s KILL marsd.service");
    wait(&nodes, 30, "marsd dead on a", || {
        a.systemctl(&["is-active", "marsd.service"]) != "active"
    });
    // Writes fail from now on: whatever was acknowledged must come back.
    std::thread::sleep(Duration::from_millis(500));
    let floor = app.acked();
    clock.step(&format!(
        "marsd killed on a, floor {floor}, its device was {lo}"
    ));
    let dead = fuse_mounts(&a);
    assert!(
        dead.iter().any(|(_, live)| !live),
        "a dead FUSE mount stays behind: {dead:?}"
    );

    // The operator: the filesystem lazily unmounted (systemd then stops the application
    // bound to it), the loop device detached; the next loop device on the machine gets its
    // number.
    a.sh(&format!("umount -l {VOL}"));
    wait(&nodes, 60, "the application stopped with its mount", || {
        !active(&a, app.unit()) && !active(&a, MOUNT)
    });
    wait(
        &nodes,
        60,
        "the killed marsd's loop device released",
        || {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(&lo)
                .stderr(Stdio::null())
                .status();
            !loop_bound(Path::new(&lo))
        },
    );
    let foreign = Foreign::take(Path::new(&lo), t);
    clock.step("cleaned up, the loop number taken by somebody else");

    // marsd started again: it is still the designated primary and the stack's host.
    a.sh(
        "rm /run/systemd/system/marsd.service.d/hold.conf && systemctl daemon-reload && \
         systemctl start marsd.service",
    );
    runs_on(&a, &[&b], app, &nodes);
    let fuse = fuse_mounts(&a);
    assert!(
        fuse.len() == 1 && fuse[0].1,
        "one live FUSE mount of the device after the restart: {fuse:?}\n{}",
        dump(&nodes)
    );
    let lo2 = loop_of(&a);
    assert_ne!(lo2, lo, "the foreign loop device is not taken over");
    assert!(
        loop_bound(Path::new(&lo)),
        "the foreign loop device is left alone"
    );
    app.check(&a, floor, &nodes);
    clock.step(&format!("marsd restarted, the stack back on a ({lo2})"));
    drop(foreign);

    // Handover away and back: the device and the stack each time.
    uptodate(&b, &nodes, 60);
    handover(&b, &nodes);
    runs_on(&b, &[&a], app, &nodes);
    app.check(&b, app.acked(), &nodes);
    clock.step("handed over to b");
    uptodate(&a, &nodes, 60);
    handover(&a, &nodes);
    runs_on(&a, &[&b], app, &nodes);
    let fuse = fuse_mounts(&a);
    assert!(fuse.len() == 1 && fuse[0].1, "{fuse:?}");
    app.check(&a, app.acked(), &nodes);
    clock.step("handed back to a");
    the_end(&a, &b, &disk_b, app, clock);
}

// ----- Stack 1: PostgreSQL on ext4 --------------------------------------------------------

/// The PostgreSQL binaries (Debian's `postgresql` package: /usr/lib/postgresql/VERSION/bin).
fn pg_bin() -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("postgres").exists() && b.join("pg_amcheck").exists())
        .collect();
    v.sort();
    v.pop()
}

/// What the writer has seen; `error` records a violated promise.
#[derive(Default)]
struct DbState {
    acked: u64,
    error: Option<String>,
}

struct Db {
    bin: PathBuf,
    port: u16,
    state: Arc<Mutex<DbState>>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Db {
    fn new(bin: PathBuf) -> Db {
        Db {
            bin,
            port: free_port(),
            state: Arc::default(),
            paused: Arc::default(),
            stop: Arc::default(),
            writer: None,
        }
    }

    fn psql(bin: &Path, port: u16) -> Command {
        let mut c = Command::new(bin.join("psql"));
        c.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "postgres",
        ]);
        c
    }

    /// One query; `None` when the server is not there.
    fn query(&self, sql: &str) -> Option<String> {
        let o = Self::psql(&self.bin, self.port)
            .args(["-c", sql])
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    }
}

/// The writer: one session at a time, an INSERT per transaction, a row acknowledged when its
/// `RETURNING` line arrives (after the commit). A lost session is reconnected, to whichever
/// host serves the port now, continuing after the highest row there.
fn db_writer(
    bin: PathBuf,
    port: u16,
    st: Arc<Mutex<DbState>>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut child) = Db::psql(&bin, port)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        session(&mut child, &st, &paused, &stop);
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn session(child: &mut Child, st: &Mutex<DbState>, paused: &AtomicBool, stop: &AtomicBool) {
    let mut input = child.stdin.take().expect("stdin");
    let mut output = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let mut ask = |input: &mut std::process::ChildStdin, sql: &str| -> Option<String> {
        line.clear();
        writeln!(input, "{sql}").ok()?;
        input.flush().ok()?;
        match output.read_line(&mut line) {
            Ok(n) if n > 0 => Some(line.trim().to_string()),
            _ => None,
        }
    };
    let Some(have) = ask(&mut input, "SELECT coalesce(max(n), 0) FROM t;") else {
        return;
    };
    let Ok(mut n) = have.parse::<u64>() else {
        return;
    };
    while !stop.load(Ordering::Relaxed) {
        if paused.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let sql = format!(
            "INSERT INTO t VALUES ({}, repeat('x', 200)) RETURNING n;",
            n + 1
        );
        let Some(got) = ask(&mut input, &sql) else {
            return;
        };
        let mut s = st.lock().unwrap();
        if got != (n + 1).to_string() {
            s.error
                .get_or_insert(format!("insert {} answered {got:?}", n + 1));
            return;
        }
        n += 1;
        s.acked = s.acked.max(n);
        drop(s);
        // An application's pace, not a benchmark's: the secondary gets idle moments in
        // which the primary confirms that it has everything (UpToDate).
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl App for Db {
    fn template(&mut self, dir: &Path, _shared: &Path) {
        let bin = self.bin.display();
        let port = self.port;
        std::fs::write(
            dir.join("db-@escvar{res}.service"),
            format!(
                "# DEFAULT_START\n\
                 [Unit]\nDescription=PostgreSQL on {VOL}\n\
                 BindsTo=vol-@escvar{{res}}.mount\nAfter=vol-@escvar{{res}}.mount\n\
                 PartOf=vol-@escvar{{res}}.mount\n\n\
                 [Service]\nType=notify\nUser=postgres\n\
                 ExecStart={bin}/postgres -D /vol/@{{res}}/pg -c listen_addresses=127.0.0.1 \
                 -c port={port} -c unix_socket_directories= -c max_wal_size=32MB \
                 -c min_wal_size=4MB -c shared_buffers=16MB\n\
                 KillMode=mixed\nKillSignal=SIGINT\nTimeoutSec=90\n"
            ),
        )
        .unwrap();
    }

    fn unit(&self) -> &'static str {
        "db-app\\x2d1.service"
    }

    fn prepare(&self, n: &Node, mnt: &str) {
        let bin = self.bin.display();
        n.sh(&format!(
            "mkdir {mnt}/pg && chown postgres {mnt}/pg && \
             runuser -u postgres -- {bin}/initdb -N --auth=trust --wal-segsize=1 -D {mnt}/pg >/dev/null && \
             runuser -u postgres -- {bin}/postgres --single -D {mnt}/pg postgres >/dev/null <<'EOF'\n\
             CREATE TABLE t (n bigint PRIMARY KEY, pad text NOT NULL);\n\
             EOF"
        ));
    }

    fn start_load(&mut self) {
        let (bin, port) = (self.bin.clone(), self.port);
        let (st, paused, stop) = (self.state.clone(), self.paused.clone(), self.stop.clone());
        self.writer = Some(std::thread::spawn(move || {
            db_writer(bin, port, st, paused, stop)
        }));
    }

    fn acked(&self) -> u64 {
        self.state.lock().unwrap().acked
    }

    fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
        if paused {
            // Whatever is in flight is answered within a moment.
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn check(&self, n: &Node, floor: u64, nodes: &[&Node]) {
        if let Some(e) = &self.state.lock().unwrap().error {
            panic!("the writer: {e}");
        }
        let mut rows = String::new();
        wait(
            nodes,
            60,
            &format!("PostgreSQL answers on {}", n.host.name),
            || {
                rows = self
                .query("SELECT count(*) || ' ' || coalesce(min(n), 0) || ' ' || coalesce(max(n), 0) FROM t")
                .unwrap_or_default();
                !rows.is_empty()
            },
        );
        let v: Vec<u64> = rows.split(' ').map(|x| x.parse().unwrap()).collect();
        let (count, min, max) = (v[0], v[1], v[2]);
        assert!(
            count == max && (count == 0 || min == 1),
            "rows are not the prefix 1..{max}: {count} rows from {min} on {}",
            n.host.name
        );
        assert!(
            max >= floor,
            "acknowledged rows lost on {}: {max} there, {floor} acknowledged",
            n.host.name
        );
        let o = Command::new(self.bin.join("pg_amcheck"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["--install-missing", "--heapallindexed", "postgres"])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "pg_amcheck on {}: {}{}",
            n.host.name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if self.writer.is_some() && !self.paused.load(Ordering::Relaxed) {
            let goal = self.acked().max(max) + 20;
            wait(
                nodes,
                60,
                &format!("the writer commits on {}", n.host.name),
                || self.acked() >= goal,
            );
        }
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            w.join().unwrap();
        }
        if let Some(e) = &self.state.lock().unwrap().error {
            panic!("the writer: {e}");
        }
    }
}

/// PostgreSQL on ext4 on `/dev/mars/RES`, a writer committing numbered rows; the returning
/// host's split brain resolved with `invalidate`.
#[test]
fn postgres_on_ext4_through_handover_failover_and_return() {
    if !supported(&["mkfs.ext4", "e2fsck", "runuser"]) {
        return;
    }
    let Some(bin) = pg_bin() else {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI must have PostgreSQL (the postgresql package)"
        );
        eprintln!("SKIPPED: PostgreSQL is not installed");
        return;
    };
    each_loop(|clock| scenario(&mut Db::new(bin.clone()), Resolve::Invalidate, clock));
}

// ----- Stack 2: a systemd-nspawn container on ext4 ------------------------------------------

/// The container's program: counts, each value written to a new file, fsynced, renamed over
/// the counter and the directory fsynced; only then acknowledged in the shared `/ack`.
const COUNTER: &str = r#"#!/bin/sh
set -e
n=$(cat /data/counter 2>/dev/null || echo 0)
while :; do
  if [ -e /ack/pause ]; then sleep 0.1; continue; fi
  n=$((n + 1))
  echo "$n" > /data/counter.new
  sync /data/counter.new
  mv /data/counter.new /data/counter
  sync /data
  echo "$n" > /ack/acked.new
  mv /ack/acked.new /ack/acked
  sleep 0.02
done
"#;

struct Container {
    ack: PathBuf,
    started: bool,
}

impl Container {
    fn new() -> Self {
        Container {
            ack: PathBuf::new(),
            started: false,
        }
    }

    fn read(path: &Path) -> Option<u64> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }
}

impl App for Container {
    fn template(&mut self, dir: &Path, shared: &Path) {
        self.ack = shared.join("ack");
        std::fs::create_dir_all(&self.ack).unwrap();
        std::fs::write(
            dir.join("ct-@escvar{res}.service"),
            format!(
                "# DEFAULT_START\n\
                 [Unit]\nDescription=container on {VOL}\n\
                 BindsTo=vol-@escvar{{res}}.mount\nAfter=vol-@escvar{{res}}.mount\n\
                 PartOf=vol-@escvar{{res}}.mount\n\n\
                 [Service]\n\
                 ExecStart=/usr/bin/systemd-nspawn --quiet --register=no --keep-unit \
                 --as-pid2 --directory=/vol/@{{res}}/ct --bind-ro=/usr --bind={}:/ack \
                 /bin/sh /counter.sh\n\
                 Delegate=yes\nKillMode=mixed\nTimeoutSec=60\n",
                self.ack.display()
            ),
        )
        .unwrap();
    }

    fn unit(&self) -> &'static str {
        "ct-app\\x2d1.service"
    }

    fn prepare(&self, n: &Node, mnt: &str) {
        let ct = format!("{mnt}/ct");
        n.sh(&format!(
            "mkdir -p {ct}/usr {ct}/etc {ct}/data {ct}/ack {ct}/proc {ct}/sys {ct}/dev {ct}/run {ct}/tmp {ct}/var && \
             for d in bin sbin lib lib64; do ln -s usr/$d {ct}/$d; done && \
             cp /etc/os-release {ct}/etc/os-release && : > {ct}/etc/machine-id"
        ));
        std::fs::write(n.sdbox().path(&format!("{ct}/counter.sh")), COUNTER).unwrap();
    }

    fn start_load(&mut self) {
        // The container counts from its start on.
        self.started = true;
    }

    fn acked(&self) -> u64 {
        Self::read(&self.ack.join("acked")).unwrap_or(0)
    }

    fn pause(&self, paused: bool) {
        let p = self.ack.join("pause");
        if paused {
            std::fs::write(&p, "").unwrap();
            std::thread::sleep(Duration::from_millis(500));
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }

    fn check(&self, n: &Node, floor: u64, nodes: &[&Node]) {
        let counter = n.sdbox().path(&format!("{VOL}/ct/data/counter"));
        let mut have = None;
        wait(
            nodes,
            60,
            &format!("the counter on {}", n.host.name),
            || {
                have = Container::read(&counter);
                have.is_some()
            },
        );
        let have = have.unwrap();
        assert!(
            have >= floor,
            "acknowledged counts lost on {}: {have} there, {floor} acknowledged",
            n.host.name
        );
        if self.started && !self.ack.join("pause").exists() {
            let goal = have.max(self.acked()) + 20;
            wait(
                nodes,
                60,
                &format!("the container counts on {}", n.host.name),
                || Container::read(&counter).is_some_and(|c| c >= goal) && self.acked() >= goal,
            );
        }
    }

    fn finish(&mut self) {
        self.pause(true);
    }
}

/// A `systemd-nspawn` container whose root is on ext4 on `/dev/mars/RES`, counting with
/// fsync; the returning host's split brain resolved with `leave-resource` + `join-resource`.
#[test]
fn container_on_ext4_through_handover_failover_and_return() {
    if !supported(&["mkfs.ext4", "e2fsck", "systemd-nspawn"]) {
        return;
    }
    each_loop(|clock| scenario(&mut Container::new(), Resolve::LeaveJoin, clock));
}

/// The container stack with only marsd killed on its primary (not the machine), cleaned up by
/// the operator, marsd restarted, then handed over away and back.
#[test]
fn container_after_marsd_killed_under_its_mounted_filesystem() {
    if !supported(&["mkfs.ext4", "e2fsck", "systemd-nspawn", "losetup"]) {
        return;
    }
    each_loop(|clock| marsd_killed_scenario(&mut Container::new(), clock));
}

// ---------------------------------------------------------------- MARS's own templates

/// The drop-in that stands in for MARS's kernel module (docs/mars-compatibility.md, "MARS's
/// own templates"): MARS's `mars.service` runs `modprobe mars` / `rmmod mars`; with marsd the
/// module's work is `marsd.service`'s, so the unit stays what it is for the others — a
/// oneshot marking "MARS is up" — without loading anything.
const MARS_SERVICE_DROPIN: &str = "\
# marsd instead of the kernel module: mars.service only marks that MARS is up.
[Service]
ExecStart=
ExecStart=/bin/true
ExecStop=
ExecStop=/bin/true
";

const TESTING_MOUNT: &str = "mnt-test-app\\x2d1.mount";
const TESTING_LOAD: &str = "mnt-test-app\\x2d1-testload.service";
const TESTING_MNT: &str = "/mnt/test/app-1";

/// MARS's own template set at run time (issue 17 item 3): `tests/data/mars-systemd-testing/`
/// is MARS's `systemd-testing/` (mars0.1astable177) unedited, installed where MARS installs
/// templates (`/etc/marsadm/systemd-templates/`, its scripts call the load scripts there), in
/// two boxes whose marsd keeps the MARS tree on `/mars` (a tmpfs of its own: MARS's
/// `mars.service` binds to `mars.mount`), with `/usr/bin/marsadm` (which the watchers run)
/// and the one documented change: a drop-in that turns `mars.service`'s `modprobe`/`rmmod`
/// into nothing. `set-systemd-unit RES TESTING` (MARS's test stack: a mount of `/dev/mars/RES`
/// on `/mnt/test/RES` and a load writing into it, `BindsTo`/`PartOf` the mount) runs on the
/// primary; two planned handovers move it, what was written on one host is there on the
/// other, and MARS's watchers run `systemd-trigger-extern` without looping.
/// Two hosts as systemd boxes with MARS's `/mars` tree, MARS's templates among `files` and a
/// `/usr/bin/marsadm` that logs its calls to `calls-HOST` (plus `more(HOST)` files each), joined
/// into a cluster with the resource up to date on b and the device there on a.
fn mars_tree_pair(
    t: &Path,
    files: &[(String, Vec<u8>, u32)],
    more: impl Fn(&str) -> Vec<(String, Vec<u8>, u32)>,
) -> (Node, Node) {
    let opt = |name: &str| {
        let mut files = files.to_vec();
        files.push((
            "/usr/bin/marsadm".into(),
            format!(
                "#!/bin/sh\necho \"$*\" >> {}\nexec {} --root {} \"$@\"\n",
                t.join(format!("calls-{name}")).display(),
                mars_testkit::bin("marsadm").display(),
                t.join(name).join("root").display()
            )
            .into_bytes(),
            0o755,
        ));
        files.extend(more(name));
        NodeOptions {
            device: true,
            systemd_timeout: 90,
            mars_tree: true,
            files,
        }
    };
    let tpl = Path::new("/etc/marsadm");
    let a = Node::start(t, "a", "127.0.0.1", tpl, &opt("a"));
    let b = Node::start(t, "b", "127.0.0.2", tpl, &opt("b"));
    let all = [&a, &b];
    a.host.create_resource(RES, SIZE);
    b.host.join(&a.host);
    for n in all {
        n.host.ok(&["--timeout", "30", "wait-cluster"]);
    }
    join(&b.host, RES, SIZE);
    uptodate(&b, &all, 120);
    wait(&all, 30, "a's device", || {
        a.host
            .device(RES)
            .is_some_and(|d| a.sdbox().path(&d.to_string_lossy()).exists())
    });
    (a, b)
}

#[test]
fn mars_own_testing_templates_move_the_stack_on_handover() {
    if !supported(&["mkfs.ext4", "mountpoint"]) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clock = Clock(Instant::now());
    let dir = Dir::new();
    let t = dir.path();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mars-systemd-testing");
    let mut files = Vec::new();
    for e in std::fs::read_dir(&data).unwrap().flatten() {
        use std::os::unix::fs::PermissionsExt;
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        files.push((
            format!(
                "/etc/marsadm/systemd-templates/{}",
                e.file_name().to_string_lossy()
            ),
            std::fs::read(e.path()).unwrap(),
            mode,
        ));
    }
    assert!(files.len() >= 16, "{files:?}");
    files.push((
        "/etc/systemd/system/mars.service.d/marsd.conf".into(),
        MARS_SERVICE_DROPIN.into(),
        0o644,
    ));
    let (a, b) = mars_tree_pair(t, &files, |_| Vec::new());
    let all = [&a, &b];
    a.sh(&format!("mkfs.ext4 -q -F /dev/mars/{RES}"));
    clock.step("pair up, filesystem made");

    // MARS's global units, generated and started as MARS's global trigger does.
    for n in all {
        wait(&all, 60, "mars.service and its watchers run", || {
            active(n, "mars.service") && active(n, "mars.path")
        });
    }
    let out = a.host.ok(&["set-systemd-unit", RES, "TESTING"]);
    assert!(
        out.contains(TESTING_LOAD) && out.contains(TESTING_MOUNT),
        "{out}"
    );
    let runs_on = |on: &Node, off: &Node, what: &str| {
        wait(
            &all,
            120,
            &format!("{what}: the stack runs on {}", on.host.name),
            || {
                active(on, TESTING_MOUNT)
                    && on
                        .sdbox()
                        .exec(&["mountpoint", "-q", TESTING_MNT])
                        .status
                        .success()
            },
        );
        wait(
            &all,
            60,
            &format!("{what}: stopped on {}", off.host.name),
            || !active(off, TESTING_MOUNT) && !active(off, TESTING_LOAD),
        );
        // MARS's load ran there: its file is on the mounted device.
        wait(
            &all,
            60,
            &format!("{what}: the load wrote on {}", on.host.name),
            || {
                on.sdbox()
                    .path(&format!("{TESTING_MNT}/dummy-testfile.zero"))
                    .exists()
            },
        );
    };
    runs_on(&a, &b, "set-systemd-unit");
    clock.step("stack up on a");
    // A file of ours beside MARS's load (which rewrites its own file all the time): written
    // on a, it must be on b's copy after the handover, and b's on a's after the return.
    let mark = |n: &Node, text: &str| {
        n.sh(&format!("echo {text} > {TESTING_MNT}/mark-{text} && sync"));
    };
    let has_mark =
        |n: &Node, text: &str| n.sh(&format!("cat {TESTING_MNT}/mark-{text}")).trim() == text;
    mark(&a, "from-a");

    handover(&b, &all);
    runs_on(&b, &a, "handover to b");
    clock.step("stack on b");
    assert!(has_mark(&b, "from-a"));
    mark(&b, "from-b");
    handover(&a, &all);
    runs_on(&a, &b, "handover back to a");
    assert!(has_mark(&a, "from-a") && has_mark(&a, "from-b"));
    clock.step("stack back on a");
    // MARS's watchers (with their `PathExists=`) ran `systemd-trigger-extern` on the changes
    // and did not loop: marsd takes the trigger file (removes it) when it is called.
    let calls = |n: &Node| {
        std::fs::read_to_string(t.join(format!("calls-{}", n.host.name)))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == format!("systemd-trigger-extern {RES}"))
            .count()
    };
    std::thread::sleep(Duration::from_secs(3));
    for n in all {
        assert!(active(n, "mars.service"), "{}", dump(&all));
        for w in ["mars-trigger.path", "mars-app\\x2d1-trigger.path"] {
            assert_eq!(
                n.systemctl(&["show", "-p", "ActiveState", "--value", w]),
                "active",
                "{} {w}: {}\n{}",
                n.host.name,
                n.systemctl(&["show", "-p", "Result", w]),
                dump(&all)
            );
        }
        let c = calls(n);
        eprintln!("{}: {c} calls of systemd-trigger-extern {RES}", n.host.name);
        assert!((1..100).contains(&c), "{}: {c} calls", n.host.name);
    }
}

const ICPU_SCRIPT: &str = "nodeagent-app\\x2d1.script";
/// The stand-in's container unit (`tests/data/nodeagent-stand-in`).
const ICPU_VM: &str = "nodeagent-vm-app-1.service";

/// MARS's `systemd-icpu/` set at run time (issue 17 item 3): `tests/data/mars-systemd-icpu/`
/// is MARS's folder (mars0.1astable177) unedited, installed as the testing set above (the same
/// `/mars` tmpfs, `/usr/bin/marsadm` and `mars.service` drop-in), with a stand-in for 1&1's
/// `/usr/sbin/nodeagent` (`tests/data/nodeagent-stand-in`: mounts `/dev/mars/RES` on
/// `/vol/RES` and runs a counting `systemd-nspawn` container on it as a transient unit).
/// `set-systemd-unit RES DEFAULT` picks MARS's `nodeagent-RES.script` (its `DEFAULT_START`/
/// `DEFAULT_STOP` markers), which marsd runs directly as MARS does; the script acts only when
/// the want link's mtime differs from its copy in `userspace/`, so every trigger after the
/// first is a no-op. Checked: the stack starts on the primary; MARS's `modprobe-mars.sh`
/// finds the resource in `get-systemd-unit all` and stops it where it does not run; two
/// handovers move it (the counter and a file written on each host are on the other); after a
/// crash of the primary's machine `primary --force` starts it on the survivor with every count
/// the survivor had replayed; the crashed host returns with a split brain (shown, resolved
/// with `invalidate`) without starting the stack, and takes it back by a handover; nodeagent
/// is called once per move, not once per trigger (the stop of the old primary found the device
/// opened through `view-device-opened`); `set-systemd-want RES (none)` stops it and wanting it
/// on the same host again starts it again; and MARS's watchers stay active, their services
/// (`systemd-trigger-extern` without and with RES) succeeding, without looping.
#[test]
fn mars_own_icpu_templates_move_the_nodeagent_stack() {
    if !supported(&[
        "mkfs.ext4",
        "mountpoint",
        "systemd-nspawn",
        "systemd-run",
        "rsync",
    ]) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clock = Clock(Instant::now());
    let dir = Dir::new();
    let t = dir.path();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut files = Vec::new();
    for e in std::fs::read_dir(data.join("mars-systemd-icpu"))
        .unwrap()
        .flatten()
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        files.push((
            format!(
                "/etc/marsadm/systemd-templates/{}",
                e.file_name().to_string_lossy()
            ),
            std::fs::read(e.path()).unwrap(),
            mode,
        ));
    }
    assert_eq!(files.len(), 9, "MARS's systemd-icpu/ has nine files");
    files.push((
        "/etc/systemd/system/mars.service.d/marsd.conf".into(),
        MARS_SERVICE_DROPIN.into(),
        0o644,
    ));
    files.push((
        "/usr/sbin/nodeagent".into(),
        std::fs::read(data.join("nodeagent-stand-in")).unwrap(),
        0o755,
    ));
    let mut app = Container::new();
    app.ack = t.join("ack");
    std::fs::create_dir_all(&app.ack).unwrap();
    let log = |name: &str| t.join(format!("nodeagent-{name}"));
    let (mut a, b) = mars_tree_pair(t, &files, |name| {
        vec![(
            "/etc/nodeagent-stand-in.conf".into(),
            format!("ACK={}\nLOG={}\n", app.ack.display(), log(name).display()).into_bytes(),
            0o644,
        )]
    });
    // The container's tree on the volume, made once by hand (as 1&1 provisions a container).
    a.sh(&format!(
        "mkfs.ext4 -q -F /dev/mars/{RES} && mkdir -p /mnt/prep && mount /dev/mars/{RES} /mnt/prep"
    ));
    app.prepare(&a, "/mnt/prep");
    a.sh("umount /mnt/prep");
    clock.step("pair up, container made");
    for n in [&a, &b] {
        wait(&[&a, &b], 60, "mars.service and its watchers run", || {
            active(n, "mars.service") && active(n, "mars.path")
        });
    }

    let out = a.host.ok(&["set-systemd-unit", RES, "DEFAULT"]);
    assert!(out.contains(ICPU_SCRIPT), "{out}");
    let nodeagent = |n: &Node, op: &str| {
        std::fs::read_to_string(log(n.host.name.as_str()))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == format!("{op} {RES}"))
            .count()
    };
    // The stack runs on `on` (the container and its mount), not on `off`.
    let runs_on = |on: &Node, off: Option<&Node>, what: &str| {
        let all: Vec<&Node> = [Some(on), off].into_iter().flatten().collect();
        wait(
            &all,
            120,
            &format!("{what}: the stack runs on {}", on.host.name),
            || active(on, ICPU_VM) && on.sdbox().exec(&["mountpoint", "-q", VOL]).status.success(),
        );
        if let Some(off) = off {
            wait(
                &all,
                60,
                &format!("{what}: stopped on {}", off.host.name),
                || {
                    !active(off, ICPU_VM)
                        && !off
                            .sdbox()
                            .exec(&["mountpoint", "-q", VOL])
                            .status
                            .success()
                },
            );
        }
    };
    runs_on(&a, Some(&b), "set-systemd-unit");
    app.start_load();
    app.check(&a, 0, &[&a, &b]);
    clock.step("stack up on a");

    // MARS's modprobe-mars.sh (what 1&1 runs when MARS starts): every resource whose stack is
    // a nodeagent script, from `get-systemd-unit all`, gets `nodeagent stop` — on b, where the
    // stack does not run. Its `modprobe mars` has no module to load here; its exit status is
    // that of modprobe, so only what it did is checked.
    let before = nodeagent(&b, "stop");
    let o = b
        .sdbox()
        .exec(&["/etc/marsadm/systemd-templates/modprobe-mars.sh"]);
    assert_eq!(
        nodeagent(&b, "stop"),
        before + 1,
        "modprobe-mars.sh: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    runs_on(&a, Some(&b), "modprobe-mars.sh on b");

    let mark = |n: &Node, text: &str| {
        n.sh(&format!("echo {text} > {VOL}/mark-{text} && sync"));
    };
    let has_mark = |n: &Node, text: &str| n.sh(&format!("cat {VOL}/mark-{text}")).trim() == text;
    mark(&a, "from-a");
    handover(&b, &[&a, &b]);
    runs_on(&b, Some(&a), "handover to b");
    app.check(&b, app.acked(), &[&a, &b]);
    assert!(has_mark(&b, "from-a"));
    mark(&b, "from-b");
    clock.step("stack on b");
    uptodate(&a, &[&a, &b], 60);
    handover(&a, &[&a, &b]);
    runs_on(&a, Some(&b), "handover back to a");
    app.check(&a, app.acked(), &[&a, &b]);
    assert!(has_mark(&a, "from-a") && has_mark(&a, "from-b"));
    clock.step("stack back on a");

    // The script's own idempotence (the want link's mtime against its copy in `userspace/`):
    // nodeagent ran once per move on each host, however often marsd and MARS's watchers ran
    // the script meanwhile.
    let watchers_sane = |n: &Node| {
        assert!(active(n, "mars.service"), "{}", dump(&[n]));
        for w in ["mars-trigger.path", "mars-app\\x2d1-trigger.path"] {
            assert_eq!(
                n.systemctl(&["show", "-p", "ActiveState", "--value", w]),
                "active",
                "{} {w}: {}\n{}",
                n.host.name,
                n.systemctl(&["show", "-p", "Result", w]),
                dump(&[n])
            );
        }
        // Neither watcher ran into its service's start limit (`unit-start-limit-hit`), and
        // their services (`systemd-trigger-extern` without and with RES) succeeded.
        for w in [
            "mars-trigger.path",
            "mars-app\\x2d1-trigger.path",
            "mars-trigger.service",
            "mars-app\\x2d1-trigger.service",
        ] {
            assert_eq!(
                n.systemctl(&["show", "-p", "Result", "--value", w]),
                "success",
                "{} {w}\n{}",
                n.host.name,
                dump(&[n])
            );
        }
        let calls = std::fs::read_to_string(t.join(format!("calls-{}", n.host.name)))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == format!("systemd-trigger-extern {RES}"))
            .count();
        eprintln!(
            "{}: {calls} calls of systemd-trigger-extern {RES}",
            n.host.name
        );
        assert!((1..100).contains(&calls), "{}: {calls} calls", n.host.name);
    };
    std::thread::sleep(Duration::from_secs(3));
    let calls = |n: &Node| {
        (
            nodeagent(n, "start"),
            nodeagent(n, "vmstart"),
            nodeagent(n, "stop"),
        )
    };
    let logs = || {
        format!(
            "a: {}\nb: {}",
            std::fs::read_to_string(log("a")).unwrap_or_default(),
            std::fs::read_to_string(log("b")).unwrap_or_default()
        )
    };
    // a: started twice (each start mounts, then vmstart); stopped once, for the handover.
    assert_eq!(calls(&a), (2, 2, 1), "{}", logs());
    // b: started once; stopped by modprobe-mars.sh and for the handover back.
    assert_eq!(calls(&b), (1, 1, 2), "{}", logs());
    for n in [&a, &b] {
        watchers_sane(n);
    }

    // a's machine crashes with the stack running; b takes over with `primary --force`.
    let floor = crash_a_then_force_b(&mut a, &b, &app, &clock);
    runs_on(&b, None, "primary --force on b");
    app.check(&b, floor, &[&b]);
    assert!(has_mark(&b, "from-a") && has_mark(&b, "from-b"));
    clock.step("failed over to b");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(calls(&b), (2, 2, 2), "{}", logs());
    watchers_sane(&b);

    // a's machine returns with the split brain: its fresh `/mars` has no copy of the want, so
    // the script acts on its first run there — a `stop` (the want is b), never a start. The
    // split brain is shown and resolved with `invalidate` (b idle meanwhile); then the stack
    // goes back to a.
    let started_on_a = calls(&a).0;
    a.boot();
    let nodes = [&a, &b];
    wait(&nodes, 60, "a sees the split brain", || {
        a.host.view("is-split-brain", RES) == "1"
    });
    let view = a.host.ok(&["view", RES]);
    assert!(view.to_lowercase().contains("split brain"), "{view}");
    assert_eq!(a.host.view("get-primary", RES), "b");
    assert!(
        !active(&a, ICPU_VM),
        "the stack must not run on a\n{}",
        logs()
    );
    assert_eq!(calls(&a).0, started_on_a, "{}", logs());
    clock.step("a back, split brain");
    app.pause(true);
    a.host.ok(&["invalidate", RES]);
    uptodate(&a, &nodes, 120);
    assert_eq!(a.host.view("is-split-brain", RES), "0", "{}", dump(&nodes));
    clock.step("a resolved and up to date");
    app.pause(false);
    app.check(&b, app.acked(), &nodes);
    handover(&a, &nodes);
    runs_on(&a, Some(&b), "handover back to a after its return");
    app.check(&a, app.acked(), &nodes);
    assert!(has_mark(&a, "from-a") && has_mark(&a, "from-b"));
    clock.step("stack back on a");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(calls(&a).0, started_on_a + 1, "{}", logs());
    assert_eq!(calls(&b), (2, 2, 3), "{}", logs());
    for n in nodes {
        watchers_sane(n);
    }

    // MARS's `set-systemd-want RES (none)` stops the stack everywhere (e.g. for an fsck);
    // wanting it on a again — the value it had before — starts it again: every write of the
    // want is a new mtime for the script.
    let (_, _, stops_on_a) = calls(&a);
    a.host.ok(&["set-systemd-want", RES, "(none)"]);
    wait(&nodes, 60, "(none): the stack stops on a", || {
        !active(&a, ICPU_VM) && !a.sdbox().exec(&["mountpoint", "-q", VOL]).status.success()
    });
    assert_eq!(calls(&a).2, stops_on_a + 1, "{}", logs());
    a.host.ok(&["set-systemd-want", RES, "a"]);
    runs_on(&a, Some(&b), "wanted on a again");
    app.check(&a, app.acked(), &nodes);
    assert_eq!(calls(&a).0, started_on_a + 2, "{}", logs());
    clock.step("(none) and back");
    app.finish();
}
