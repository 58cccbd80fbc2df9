//! MARS's forced-switch matrix (mars.md §5, `admin/switch2primary_force/**`) end to end, one
//! test per meaningful combination, each named after its scenario:
//!
//! - **connected / not_connected / crashed**: how the old primary `a` stands when the secondary
//!   `b` takes over with `pause-fetch` + `primary --force`. `connected`: the network is up, `a`
//!   hears of the switch at once (MARS's `connected`). `not_connected`: `a`'s link is cut
//!   before the switch, `a` keeps running in its partition (MARS's `not_connected`).
//!   `crashed`: `a`'s daemon is killed before the switch and started again for the
//!   resolution (a variant MARS's tree lacks; the kill-based basics are in `roles.rs`).
//! - **writing / idle**: `a`'s device in use and written during the split, or closed (MARS's
//!   `data_dev_in_use` / `not_in_use`). Writing and crashed mean nothing together.
//! - **old_primary_wins / new_primary_wins**: the final primary (`orig_prim_becomes_prim` /
//!   `secon_becomes_prim`).
//! - **rotation**: none; on the old primary just before the switch (`logrot_orig_prim`:
//!   `log-rotate` + `cron`, which deletes what is reclaimable); on the old or on the new primary
//!   during the split (`logrot_spl_brain_orig_{prim,secon}`). The old primary rotates during
//!   the split only where it runs then: not_connected.
//! - **reconnect_before / reconnect_after** the resolution's `primary --force` (MARS's
//!   `reconnect_{before,after}_new_prim`): the link comes back (or the crashed daemon starts
//!   with its link up) before the winner runs `primary --force`, or after it; meaningless for
//!   connected.
//! - the loser gives up its history with `invalidate`, in some cells with `leave-resource` +
//!   `join-resource` on its old disk.
//!
//! Every step checks `view-diskstate`, `view-replstate`, `view-flags` and the roles. Writes are
//! distinct random blocks in separate regions of the device (the old primary's, the new
//! primary's during the split, the winner's after the resolution), recorded when acknowledged,
//! so every disk can be compared with a model of the history it should hold: the new primary
//! at the switch holds a prefix of the old primary's writes; a loser whose history forked holds
//! exactly its own history until it is resolved (nothing of the other side applied); at the
//! end, every member's backing file equals the winner's, which holds exactly the winner's
//! history: everything it acknowledged, nothing the loser wrote after the fork.
//!
//! Runs in the host lab (network namespaces): needs root, `ip`, `nft`, `tc`; skipped elsewhere.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mars_testkit::lab::Lab;
use mars_testkit::nbd::Client;
use mars_testkit::repl::{first_difference, logfiles, tail};
use mars_testkit::Host;
use rand::RngCore;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
/// The old primary's writes (its writer's or the idle case's few) start here, one block after
/// the other; the first 4 MiB hold the data written before `b` joined.
const OLD_FROM: u64 = 4 * MIB;
const OLD_TO: u64 = 24 * MIB;
/// The new primary's writes during the split.
const NEW_FROM: u64 = 24 * MIB;
/// The winner's writes after the resolution.
const FINAL_FROM: u64 = 28 * MIB;
/// The old primary's writer: blocks of 16 KiB with FUA, a short pause after each.
const BLOCK: usize = 16 << 10;
const PACE: Duration = Duration::from_millis(20);
/// Liveness window for the views that tell an unreachable primary (see `tests/lab.rs`).
const WINDOW: &str = "3";

// ------------------------------------------------------------------ the matrix

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    /// The link stays up: `a` hears of the forced switch at once.
    Connected,
    /// `a`'s link is cut before the switch; `a` runs on in its partition.
    NotConnected,
    /// `a`'s daemon is killed before the switch.
    Crashed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Load {
    /// `a`'s device is open and written, before and during the split.
    Writing,
    /// `a`'s device is closed: a few writes before the split, all of them replicated.
    Idle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Winner {
    Old,
    New,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rotation {
    None,
    OldBeforeSwitch,
    OldDuringSplit,
    NewDuringSplit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reconnect {
    /// The link is back (the daemon started with its link up) before the resolution's
    /// `primary --force`.
    Before,
    /// After it: the winner forces while the other side cannot hear it yet.
    After,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolve {
    Invalidate,
    LeaveJoin,
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    net: Net,
    load: Load,
    winner: Winner,
    rotation: Rotation,
    reconnect: Reconnect,
    resolve: Resolve,
}

impl Scenario {
    fn new(net: Net, load: Load, winner: Winner, rotation: Rotation, reconnect: Reconnect) -> Self {
        Scenario {
            net,
            load,
            winner,
            rotation,
            reconnect,
            resolve: Resolve::Invalidate,
        }
    }

    fn leave_join(mut self) -> Self {
        self.resolve = Resolve::LeaveJoin;
        self
    }
}

// ------------------------------------------------------------------ the tests

use Load::{Idle, Writing};
use Net::{Connected, Crashed, NotConnected};
use Reconnect::{After, Before};
use Rotation::{NewDuringSplit, OldBeforeSwitch, OldDuringSplit};
use Winner::{New, Old};

// not connected, writing: every rotation with both winners, reconnect alternating.

#[test]
fn not_connected_writing_old_primary_wins_no_rotation_reconnect_before_resolution() {
    run(Scenario::new(
        NotConnected,
        Writing,
        Old,
        Rotation::None,
        Before,
    ));
}

#[test]
fn not_connected_writing_old_primary_wins_rotation_on_old_before_switch_reconnect_after_resolution()
{
    run(Scenario::new(
        NotConnected,
        Writing,
        Old,
        OldBeforeSwitch,
        After,
    ));
}

#[test]
fn not_connected_writing_old_primary_wins_rotation_on_old_during_split_reconnect_before_resolution()
{
    run(Scenario::new(
        NotConnected,
        Writing,
        Old,
        OldDuringSplit,
        Before,
    ));
}

#[test]
fn not_connected_writing_old_primary_wins_rotation_on_new_during_split_reconnect_after_resolution()
{
    run(Scenario::new(
        NotConnected,
        Writing,
        Old,
        NewDuringSplit,
        After,
    ));
}

#[test]
fn not_connected_writing_new_primary_wins_no_rotation_reconnect_after_resolution() {
    run(Scenario::new(
        NotConnected,
        Writing,
        New,
        Rotation::None,
        After,
    ));
}

#[test]
fn not_connected_writing_new_primary_wins_rotation_on_old_before_switch_reconnect_before_resolution_leave_join(
) {
    run(Scenario::new(NotConnected, Writing, New, OldBeforeSwitch, Before).leave_join());
}

#[test]
fn not_connected_writing_new_primary_wins_rotation_on_old_during_split_reconnect_after_resolution()
{
    run(Scenario::new(
        NotConnected,
        Writing,
        New,
        OldDuringSplit,
        After,
    ));
}

#[test]
fn not_connected_writing_new_primary_wins_rotation_on_new_during_split_reconnect_before_resolution()
{
    run(Scenario::new(
        NotConnected,
        Writing,
        New,
        NewDuringSplit,
        Before,
    ));
}

// not connected, idle: nothing of a's is missing on b; only an operator's choice for a forks.

#[test]
fn not_connected_idle_old_primary_wins_rotation_on_old_during_split_reconnect_after_resolution() {
    run(Scenario::new(
        NotConnected,
        Idle,
        Old,
        OldDuringSplit,
        After,
    ));
}

#[test]
fn not_connected_idle_old_primary_wins_rotation_on_new_during_split_reconnect_before_resolution() {
    run(Scenario::new(
        NotConnected,
        Idle,
        Old,
        NewDuringSplit,
        Before,
    ));
}

#[test]
fn not_connected_idle_new_primary_wins_rotation_on_old_during_split_reconnect_before_resolution() {
    run(Scenario::new(
        NotConnected,
        Idle,
        New,
        OldDuringSplit,
        Before,
    ));
}

#[test]
fn not_connected_idle_new_primary_wins_no_rotation_reconnect_after_resolution() {
    run(Scenario::new(
        NotConnected,
        Idle,
        New,
        Rotation::None,
        After,
    ));
}

// connected: the old primary hears of the switch at once (no reconnect).

#[test]
fn connected_writing_new_primary_wins_no_rotation() {
    run(Scenario::new(
        Connected,
        Writing,
        New,
        Rotation::None,
        Before,
    ));
}

#[test]
fn connected_writing_old_primary_wins_rotation_on_new_during_split() {
    run(Scenario::new(
        Connected,
        Writing,
        Old,
        NewDuringSplit,
        Before,
    ));
}

#[test]
fn connected_writing_new_primary_wins_rotation_on_old_before_switch_leave_join() {
    run(Scenario::new(Connected, Writing, New, OldBeforeSwitch, Before).leave_join());
}

#[test]
fn connected_idle_old_primary_wins_rotation_on_old_before_switch() {
    run(Scenario::new(Connected, Idle, Old, OldBeforeSwitch, Before));
}

// crashed: the old primary's daemon was killed (idle only: a dead host writes nothing).

#[test]
fn crashed_idle_new_primary_wins_rotation_on_old_before_switch_reconnect_before_resolution() {
    run(Scenario::new(Crashed, Idle, New, OldBeforeSwitch, Before));
}

#[test]
fn crashed_idle_old_primary_wins_rotation_on_new_during_split_reconnect_after_resolution() {
    run(Scenario::new(Crashed, Idle, Old, NewDuringSplit, After));
}

// daemon bugs found by the matrix

/// The new primary's first logfile is its own: it joined by a full sync that started at
/// logfile 2, the old primary wrote nothing into logfile 2 before the link was cut, and the
/// forced switch opens `log-000000002-b`. Its version link needs a predecessor, the link of
/// logfile 1, which `b` never replayed. Before the sync start carried the source's link of
/// that logfile (`SyncInfo::prev_link`, adopted as `b`'s own), `engine::plan::my_link` found
/// none at `b`, the designated primary or the origin (all `b`), `b` never published a version
/// link, and after the heal `a` replayed `2-b` and waited forever for "the version link of
/// log-000000002-b" (`OutDated[FR]`, `Replaying`, `dCASfr`). The same happened when `b` held a
/// copy of `a`'s logfile 2 but had not received `a`'s link of logfile 1 before the cut, and `a`
/// reclaimed that link after the heal.
#[test]
fn not_connected_idle_new_primary_wins_when_its_first_logfile_is_its_own() {
    if !mars_testkit::lab::available() {
        return;
    }
    let Some(mut lab) = Lab::new(2) else { return };
    for h in &mut lab.hosts {
        h.env.push(("MARS_MIN_FREE_SPACE".into(), "64M".into()));
        h.env
            .push(("MARS_EMERGENCY_FREE_SPACE".into(), "48M".into()));
        h.restart();
    }
    let disk_a = lab.hosts[0].create_resource("r", SIZE);
    let r = Run {
        disks: [disk_a, lab.path().join("b").join("r.img")],
        lab,
        start: Instant::now(),
    };
    let (a, b) = (r.a(), r.b());
    let token = r.ok(a, &["join-token"]);
    r.ok(b, &["join-cluster", &a.peer_addr, "--token", token.trim()]);
    for h in [a, b] {
        r.ok(h, &["--timeout", "30", "wait-cluster"]);
    }
    write_blocks(a, 0, 4, MIB as usize);
    std::fs::File::create(&r.disks[1])
        .and_then(|f| f.set_len(SIZE))
        .expect("b's disk");
    let disk_b = r.disks[1].to_str().expect("utf8").to_string();
    r.wait(20, "b joined", || {
        b.marsadm(&["join-resource", "r", &disk_b]).status.success()
    });
    r.wait_uptodate(b);
    r.lab.cut(0);
    r.step("a's link cut; a wrote nothing since b joined");
    r.wait(15, "b reports the primary unreachable", || {
        replstate_now(b) == "PrimaryUnreachable"
    });
    r.ok(b, &["pause-fetch", "r"]);
    r.ok(
        b,
        &["--timeout", "30", "primary", "--force", "--force", "r"],
    );
    write_blocks(b, NEW_FROM, 4, 64 << 10);
    r.ok(b, &["log-rotate", "r"]);
    write_blocks(b, NEW_FROM + 4 * (64 << 10), 4, 64 << 10);
    r.lab.restore(0);
    r.wait_role(a, "Secondary");
    r.step("a follows b");
    r.wait(30, "b published the link of its first logfile", || {
        knows_link(a, 2, "b")
    });
    // b's history is a's plus b's writes: a follows it to the end.
    r.wait_uptodate(a);
    r.wait_states(a, SECONDARY_OK);
}

// ------------------------------------------------------------------ the runner

/// One write as acknowledged (or, for the writer's last one, refused: it may or may not have
/// landed).
#[derive(Clone)]
struct Block {
    off: u64,
    data: Vec<u8>,
}

fn random_block(off: u64, len: usize) -> Block {
    let mut data = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut data);
    Block { off, data }
}

/// The device image a history produces: zeros with the writes applied in order.
fn image<'a>(writes: impl IntoIterator<Item = &'a Block>) -> Vec<u8> {
    let mut img = vec![0u8; SIZE as usize];
    for w in writes {
        img[w.off as usize..w.off as usize + w.data.len()].copy_from_slice(&w.data);
    }
    img
}

/// Does `actual` equal `expected`, where each block of `maybe` may also hold its new data?
/// Returns the first differing offset.
fn compare(actual: &[u8], expected: &[u8], maybe: &[Block]) -> Option<u64> {
    let mut want = expected.to_vec();
    for b in maybe {
        let r = b.off as usize..b.off as usize + b.data.len();
        if actual[r.clone()] == b.data[..] {
            want[r].copy_from_slice(&b.data);
        }
    }
    (0..actual.len())
        .step_by(4096)
        .find(|&i| actual[i..i + 4096] != want[i..i + 4096])
        .map(|i| i as u64)
}

/// A writer on the old primary's device: one NBD connection (the device stays open), blocks
/// of `BLOCK` bytes one after the other from `OLD_FROM`, each with FUA, recorded once
/// acknowledged. It stops at the first error (fenced), recording what it tried.
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Block>>>,
    failed: Arc<Mutex<Option<(Block, String)>>>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(h: &Host) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(None));
        let mut conn = Client::connect(&h.nbd_socket(), "r").expect("nbd connect");
        let (s, d, f) = (stop.clone(), done.clone(), failed.clone());
        let handle = std::thread::spawn(move || {
            let mut off = OLD_FROM;
            while !s.load(Ordering::Acquire) {
                if off + BLOCK as u64 > OLD_TO {
                    // The region is full: the device stays open, idle.
                    std::thread::sleep(PACE);
                    continue;
                }
                let b = random_block(off, BLOCK);
                match conn.write(off, &b.data, true) {
                    Ok(()) => d.lock().unwrap().push(b),
                    Err(e) => {
                        *f.lock().unwrap() = Some((b, e.to_string()));
                        break;
                    }
                }
                off += BLOCK as u64;
                std::thread::sleep(PACE);
            }
            let _ = conn.disconnect();
        });
        Writer {
            stop,
            done,
            failed,
            handle: Some(handle),
        }
    }

    fn count(&self) -> usize {
        self.done.lock().unwrap().len()
    }

    fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap().as_ref().map(|(_, e)| e.clone())
    }

    /// Waits until `n` more writes were acknowledged; they must not fail meanwhile.
    fn wait_more(&self, n: usize) {
        let want = self.count() + n;
        let start = Instant::now();
        while self.count() < want {
            if let Some(e) = self.failure() {
                panic!("a write of the old primary failed: {e}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the old primary's writes stalled"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the writer (its connection is closed on return): (acknowledged writes, the
    /// refused one if it was stopped by an error).
    fn finish(mut self) -> (Vec<Block>, Option<Block>) {
        self.stop.store(true, Ordering::Release);
        self.handle.take().expect("thread").join().expect("writer");
        let done = std::mem::take(&mut *self.done.lock().unwrap());
        let failed = self.failed.lock().unwrap().take().map(|(b, _)| b);
        (done, failed)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Writes `n` blocks of `len` bytes from `from` on `h`'s device over one short connection
/// (closed on return), each with FUA; returns them.
fn write_blocks(h: &Host, from: u64, n: usize, len: usize) -> Vec<Block> {
    let mut c = Client::connect(&h.nbd_socket(), "r")
        .unwrap_or_else(|e| panic!("nbd connect to {}: {e}", h.name));
    let blocks: Vec<Block> = (0..n)
        .map(|i| random_block(from + (i * len) as u64, len))
        .collect();
    for b in &blocks {
        c.write(b.off, &b.data, true)
            .unwrap_or_else(|e| panic!("write on {} at {}: {e}", h.name, b.off));
    }
    c.disconnect().expect("disconnect");
    blocks
}

/// The whole device of `h` as its NBD export serves it.
fn read_device(h: &Host) -> Vec<u8> {
    let mut c = Client::connect(&h.nbd_socket(), "r").expect("nbd connect");
    let mut img = vec![0u8; SIZE as usize];
    for (i, chunk) in img.chunks_mut(MIB as usize).enumerate() {
        c.read(i as u64 * MIB, chunk).expect("nbd read");
    }
    c.disconnect().expect("disconnect");
    img
}

fn read_disk(path: &std::path::Path) -> Vec<u8> {
    let f = std::fs::File::open(path).expect("disk");
    let mut img = vec![0u8; SIZE as usize];
    f.read_exact_at(&mut img, 0).expect("read disk");
    img
}

/// The two hosts, their disks and the scenario's trace.
struct Run {
    lab: Lab,
    disks: [std::path::PathBuf; 2],
    start: Instant,
}

impl Run {
    fn a(&self) -> &Host {
        &self.lab.hosts[0]
    }

    fn b(&self) -> &Host {
        &self.lab.hosts[1]
    }

    fn step(&self, what: &str) {
        println!("[{:6.2}s] {what}", self.start.elapsed().as_secs_f64());
        if std::env::var_os("TRACE_LINKS").is_some() {
            for h in &self.lab.hosts {
                let mut l = Vec::new();
                for no in 1..10 {
                    for of in ["a", "b"] {
                        let key = format!("resource-r/version-{no:09}-{of}");
                        let o = h.marsadm(&["get-link", &key]);
                        if o.status.success() {
                            l.push(format!("{no}-{of}"));
                        }
                    }
                }
                println!("    {} links {l:?} logs {:?}", h.name, logfiles(h, "r"));
            }
        }
    }

    fn dump(&self) -> String {
        let mut s = String::new();
        // The version links as each host sees them: where the histories fork.
        for h in &self.lab.hosts {
            for no in 1..10 {
                for of in ["a", "b"] {
                    let key = format!("resource-r/version-{no:09}-{of}");
                    let o = h.marsadm(&["get-link", &key]);
                    if o.status.success() {
                        s += &format!(
                            "{} sees {key} = {}",
                            h.name,
                            String::from_utf8_lossy(&o.stdout)
                        );
                    }
                }
            }
            s += &format!("{}'s logfiles: {:?}\n", h.name, logfiles(h, "r"));
        }
        for h in &self.lab.hosts {
            let v = h.marsadm(&["--window", WINDOW, "view", "r"]);
            s += &format!(
                "--- {}: {}{}--- its log:\n{}\n",
                h.name,
                String::from_utf8_lossy(&v.stdout),
                String::from_utf8_lossy(&v.stderr),
                tail(&h.log_text(), 40)
            );
        }
        s
    }

    fn wait(&self, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            if start.elapsed() > Duration::from_secs(secs) {
                panic!("timed out after {secs} s: {what}\n{}", self.dump());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `marsadm ARGS` on `h`, which must succeed.
    fn ok(&self, h: &Host, args: &[&str]) -> String {
        let o = h.marsadm(args);
        if !o.status.success() {
            panic!(
                "marsadm {args:?} on {} failed: {}{}\n{}",
                h.name,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                self.dump()
            );
        }
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Waits until `h` shows (diskstate, replstate, flags) = `want`.
    fn wait_states(&self, h: &Host, want: (&str, &str, &str)) {
        self.wait(30, &format!("{} in state {want:?}", h.name), || {
            let s = states(h);
            (s.0.as_str(), s.1.as_str(), s.2.as_str()) == want
        });
    }

    fn wait_role(&self, h: &Host, role: &str) {
        self.wait(30, &format!("{} {role}", h.name), || {
            view(h, "role") == role
        });
    }

    /// Every host names `p` as the designated primary.
    fn wait_designated(&self, p: &Host) {
        self.wait(30, &format!("{} designated everywhere", p.name), || {
            self.lab
                .hosts
                .iter()
                .all(|h| view(h, "primarynode") == p.name)
        });
    }

    fn wait_split_brain(&self, want: &str) {
        self.wait(30, &format!("is-split-brain {want} on both"), || {
            self.lab
                .hosts
                .iter()
                .all(|h| view(h, "is-split-brain") == want)
        });
    }

    fn wait_uptodate(&self, h: &Host) {
        let o = h.marsadm(&["--timeout", "60", "wait-resource", "r", "uptodate"]);
        if !o.status.success() {
            panic!(
                "{} not up to date: {}\n{}",
                h.name,
                String::from_utf8_lossy(&o.stderr),
                self.dump()
            );
        }
    }
}

/// Does `h` know `of`'s version link of logfile `no`?
fn knows_link(h: &Host, no: u64, of: &str) -> bool {
    h.marsadm(&["get-link", &format!("resource-r/version-{no:09}-{of}")])
        .status
        .success()
}

fn view(h: &Host, mac: &str) -> String {
    h.view(mac, "r")
}

fn states(h: &Host) -> (String, String, String) {
    (view(h, "diskstate"), view(h, "replstate"), view(h, "flags"))
}

/// `h`'s replication state with the short liveness window (`view-replstate` uses the default
/// window of 60 s whatever `--window` says).
fn replstate_now(h: &Host) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["--json", "--window", WINDOW, "view", "r"])).expect("json");
    v["resources"][0]["repl_state"]
        .as_str()
        .expect("repl_state")
        .to_string()
}

/// The newest logfile of `r` on `h` and its length.
fn newest_log(h: &Host) -> (String, u64) {
    let name = logfiles(h, "r").pop().expect("a logfile");
    let len = std::fs::metadata(h.root.join("resource-r").join(&name)).map_or(0, |m| m.len());
    (name, len)
}

const PRIMARY_OK: (&str, &str, &str) = ("UpToDate", "Replicating", "DCASFR");
const SECONDARY_OK: (&str, &str, &str) = ("UpToDate", "Replaying", "dCASFR");

/// Runs one scenario end to end; see the module docs.
fn run(s: Scenario) {
    assert!(
        !(s.net == Crashed && s.load == Writing),
        "a crashed host writes nothing"
    );
    assert!(
        !(s.rotation == OldDuringSplit && s.net != NotConnected),
        "the old primary rotates during the split only where it runs on"
    );
    if !mars_testkit::lab::available() {
        return;
    }
    let Some(mut lab) = Lab::new(2) else { return };
    // Low-space handling is not under test here: the thresholds (1 GiB free by default) are
    // lowered so that a machine crowded by other tests' files does not drop logs mid-scenario.
    for h in &mut lab.hosts {
        h.env.push(("MARS_MIN_FREE_SPACE".into(), "64M".into()));
        h.env
            .push(("MARS_EMERGENCY_FREE_SPACE".into(), "48M".into()));
        h.restart();
    }
    let disk_a = lab.hosts[0].create_resource("r", SIZE);
    let mut r = Run {
        disks: [disk_a, lab.path().join("b").join("r.img")],
        lab,
        start: Instant::now(),
    };
    println!("scenario: {s:?}");

    // ---------------------------------------------------------------- a primary, b in sync
    let (a, b) = (r.a(), r.b());
    let token = r.ok(a, &["join-token"]);
    r.ok(b, &["join-cluster", &a.peer_addr, "--token", token.trim()]);
    for h in [a, b] {
        r.ok(h, &["--timeout", "30", "wait-cluster"]);
    }
    let base = write_blocks(a, 0, 4, MIB as usize);
    std::fs::File::create(&r.disks[1])
        .and_then(|f| f.set_len(SIZE))
        .expect("b's disk");
    let disk_b = r.disks[1].to_str().expect("utf8").to_string();
    r.wait(20, "b joined", || {
        b.marsadm(&["join-resource", "r", &disk_b]).status.success()
    });
    r.wait_uptodate(b);
    r.wait_states(b, SECONDARY_OK);
    r.wait_states(a, PRIMARY_OK);
    // b's chain starts from a's link of the logfile before b's first (b joined by a full
    // sync): a forced switch before that link reached b can leave b's history without links
    // for good (a daemon bug, the race described at
    // `not_connected_idle_new_primary_wins_when_its_first_logfile_is_its_own`). The matrix
    // switches after the link arrived.
    let first = logfiles(b, "r")
        .first()
        .and_then(|n| n[4..13].parse::<u64>().ok())
        .expect("b's first logfile");
    r.wait(10, "b knows the link before its first logfile", || {
        knows_link(b, first - 1, "a")
    });
    r.step("a primary, b joined and up to date");

    // ---------------------------------------------------------------- before the switch
    let mut old_writes: Vec<Block> = Vec::new();
    let writer = match s.load {
        Writing => {
            let w = Writer::start(a);
            w.wait_more(10);
            r.wait(10, "a's device open", || view(a, "device-opened") == "1");
            Some(w)
        }
        Idle => {
            old_writes.extend(write_blocks(a, OLD_FROM, 8, BLOCK));
            None
        }
    };
    if s.rotation == OldBeforeSwitch {
        let before = newest_log(a).0;
        r.ok(a, &["log-rotate", "r"]);
        match &writer {
            Some(w) => w.wait_more(5),
            None => {
                let from = OLD_FROM + (old_writes.len() * BLOCK) as u64;
                old_writes.extend(write_blocks(a, from, 4, BLOCK));
            }
        }
        r.ok(a, &["cron"]);
        assert_ne!(newest_log(a).0, before, "a rotated");
        r.step("a rotated its log (log-rotate, cron)");
    }
    if s.load == Idle {
        // Everything a wrote reached b.
        r.wait_uptodate(b);
        r.wait(10, "a's device closed", || view(a, "device-opened") == "0");
    }
    r.wait_states(a, PRIMARY_OK);

    // ---------------------------------------------------------------- the split
    match s.net {
        Connected => {}
        NotConnected => {
            r.lab.cut(0);
            r.step("a's link cut");
        }
        Crashed => {
            r.lab.hosts[0].kill9();
            r.step("a's daemon killed");
        }
    }
    let (a, b) = (r.a(), r.b());
    if s.net != Connected {
        r.wait(15, "b reports the primary unreachable", || {
            replstate_now(b) == "PrimaryUnreachable"
        });
        r.wait(10, "b outdated", || {
            view(b, "diskstate").starts_with("OutDated[F")
        });
    }
    if s.net == NotConnected {
        // a does not know: it still replicates, as far as it can tell.
        assert_eq!(view(a, "role"), "Primary");
        assert_eq!(view(a, "primarynode"), "a");
    }

    // ---------------------------------------------------------------- the forced switch
    r.ok(b, &["pause-fetch", "r"]);
    // Replay may still be behind (`r`, `OutDated[FR]`): it waits for the version link of a
    // logfile a rotated away from just before the split.
    r.wait(10, "b's fetch paused", || {
        let (ds, rs, fl) = states(b);
        ds.starts_with("OutDated[F") && rs == "PausedFetch" && fl.starts_with("dCAS-")
    });
    if let Some(w) = &writer {
        // What a writes from here on, b never sees.
        w.wait_more(10);
    }
    let out = r.ok(
        b,
        &["--timeout", "30", "primary", "--force", "--force", "r"],
    );
    r.step(&format!("b: primary --force: {}", out.trim()));
    // MARS's `ForcedPrimary` while a (connected, or crashed moments ago) still counts as
    // acting primary too.
    let role = view(b, "role");
    assert!(role == "Primary" || role == "ForcedPrimary", "{role}");
    assert_eq!(view(b, "primarynode"), "b");
    r.wait_states(b, PRIMARY_OK);
    let b_at_switch = read_device(b);
    r.step("b acts as primary");

    let mut writer = writer;
    let mut maybe: Vec<Block> = Vec::new();
    if s.net == Connected {
        // a hears of it at once: its writes fail (fenced), and with its device closed it
        // leaves the role and finds its history forked (if it wrote what b lacks).
        if let Some(w) = writer.take() {
            r.wait(30, "a's writes fenced", || w.failure().is_some());
            r.step(&format!("a's writer fenced: {}", w.failure().unwrap()));
            let (done, failed) = w.finish();
            old_writes.extend(done);
            maybe.extend(failed);
        }
        r.wait_role(a, "Secondary");
        assert_eq!(view(a, "primarynode"), "b");
        r.step("a left the primary role");
    }

    // ---------------------------------------------------------------- during the split
    let mut new_writes = write_blocks(b, NEW_FROM, 4, 64 << 10);
    if s.rotation == NewDuringSplit {
        let before = newest_log(b).0;
        r.ok(b, &["log-rotate", "r"]);
        new_writes.extend(write_blocks(b, NEW_FROM + 4 * (64 << 10), 4, 64 << 10));
        r.ok(b, &["cron"]);
        assert_ne!(newest_log(b).0, before, "b rotated");
        r.step("b rotated its log during the split");
    }
    if s.rotation == OldDuringSplit {
        let before = newest_log(a).0;
        r.ok(a, &["log-rotate", "r"]);
        if let Some(w) = &writer {
            w.wait_more(5);
        }
        r.ok(a, &["cron"]);
        assert_ne!(newest_log(a).0, before, "a rotated");
        r.step("a rotated its log during the split");
    }
    if let Some(w) = &writer {
        // Both sides' logs grow: a real split brain.
        let grown = newest_log(a);
        w.wait_more(5);
        assert_ne!(newest_log(a), grown, "a's log grows in its partition");
        assert_eq!(view(a, "role"), "Primary");
    }
    r.wait_states(b, PRIMARY_OK);
    r.step(&format!(
        "split: b wrote {} blocks, a {}",
        new_writes.len(),
        writer.as_ref().map_or(0, Writer::count)
    ));

    // ---------------------------------------------------------------- resolution
    let reconnect = if s.net == Connected {
        Before
    } else {
        s.reconnect
    };
    // The crashed daemon comes back: with its link up, or cut until the reconnect.
    if s.net == Crashed {
        if reconnect == After {
            r.lab.cut(0);
        }
        r.lab.hosts[0].start_again();
        r.step("a's daemon started again");
    }
    let (a, b) = (r.a(), r.b());
    let reconnect_now = |r: &Run| match (s.net, reconnect) {
        (Connected, _) | (Crashed, Before) => {}
        (NotConnected, _) | (Crashed, After) => {
            r.lab.restore(0);
            r.step("a's link restored");
        }
    };
    // The operator stops the application on a losing ex-primary before the link comes back;
    // where it still writes when the link comes back, it is fenced.
    let stop_writer = |w: Writer, old: &mut Vec<Block>, maybe: &mut Vec<Block>| {
        let (done, failed) = w.finish();
        old.extend(done);
        maybe.extend(failed);
    };
    let fenced = |r: &Run, w: Writer, old: &mut Vec<Block>, maybe: &mut Vec<Block>| {
        r.wait(30, "a's writes fenced", || w.failure().is_some());
        r.step(&format!("a's writer fenced: {}", w.failure().unwrap()));
        stop_writer(w, old, maybe);
    };
    // Does a hold writes b never saw? (Checked against b's device at the switch below.)
    let a_diverged = s.load == Writing;
    match (s.winner, reconnect) {
        (New, Before) => {
            reconnect_now(&r);
            if let Some(w) = writer.take() {
                fenced(&r, w, &mut old_writes, &mut maybe);
            }
            force(&r, b);
        }
        (New, After) => {
            if let Some(w) = writer.take() {
                stop_writer(w, &mut old_writes, &mut maybe);
            }
            force(&r, b);
            reconnect_now(&r);
        }
        (Old, Before) => {
            reconnect_now(&r);
            if let Some(w) = writer.take() {
                fenced(&r, w, &mut old_writes, &mut maybe);
            }
            r.wait_role(a, "Secondary");
            r.wait_designated(b);
            r.step("a left the primary role");
            if !a_diverged {
                // a's history is a prefix of b's: it follows b and catches up first.
                r.wait_uptodate(a);
                r.wait_states(a, SECONDARY_OK);
            }
            force(&r, a);
        }
        (Old, After) => {
            if s.net == Crashed {
                // Restarted alone, it takes up its primary role on disk after a while.
                r.wait(30, "a primary again", || view(a, "role") == "Primary");
            }
            force(&r, a);
            reconnect_now(&r);
        }
    }
    let (winner, loser) = match s.winner {
        Old => (a, b),
        New => (b, a),
    };
    r.wait_designated(winner);
    r.wait_role(winner, "Primary");
    r.wait_role(loser, "Secondary");
    r.step(&format!(
        "{} primary, {} secondary",
        winner.name, loser.name
    ));
    if let Some(w) = writer.take() {
        // Old primary won while its writer ran on: never fenced.
        w.wait_more(5);
        stop_writer(w, &mut old_writes, &mut maybe);
        assert!(maybe.is_empty(), "a's writes failed though it won");
    }

    // ---------------------------------------------------------------- what each side holds
    let base_img = image(&base);
    assert_eq!(
        compare(
            &b_at_switch[..OLD_FROM as usize],
            &base_img[..OLD_FROM as usize],
            &[]
        ),
        None
    );
    // b took over a prefix of a's writes: those it holds are the first k, the rest untouched.
    let k = old_writes
        .iter()
        .take_while(|w| b_at_switch[w.off as usize..w.off as usize + w.data.len()] == w.data[..])
        .count();
    let common: Vec<Block> = base.iter().chain(&old_writes[..k]).cloned().collect();
    if let Some(at) = compare(&b_at_switch, &image(&common), &[]) {
        panic!(
            "b's device at the switch is not a prefix of a's writes: differs at {at} (it holds \
             the first {k} of {} writes)",
            old_writes.len()
        );
    }
    println!(
        "b took over with {k} of a's {} writes; a wrote {} more",
        old_writes.len(),
        old_writes.len() - k
    );
    if s.load == Writing {
        assert!(k < old_writes.len(), "a wrote nothing b lacks");
    } else {
        assert_eq!(k, old_writes.len(), "b lacked some of idle a's writes");
    }
    let a_history: Vec<Block> = base.iter().chain(&old_writes).cloned().collect();
    let b_history: Vec<Block> = common.iter().chain(&new_writes).cloned().collect();
    // A fork: the loser holds writes the winner does not.
    let diverged = match s.winner {
        New => a_diverged,
        Old => a_diverged || reconnect == After,
    };
    let (winner_history, loser_history) = match (s.winner, diverged) {
        (New, _) => (b_history, a_history),
        (Old, true) => (a_history, b_history),
        // a caught up with b before it took the role back: one history.
        (Old, false) => (b_history.clone(), b_history),
    };

    if diverged {
        r.wait_split_brain("1");
        let v = r.ok(winner, &["view", "r"]);
        assert!(v.contains("SPLIT BRAIN"), "{v}");
        r.step("split brain seen on both");
        // The loser keeps its own history: nothing of the winner's was applied over the fork.
        let disk = &r.disks[usize::from(loser.name == "b")];
        r.wait(30, "the loser's disk holds its own history", || {
            compare(&read_disk(disk), &image(&loser_history), &maybe).is_none()
        });
        assert_eq!(view(loser, "role"), "Secondary");
        assert!(
            !view(loser, "diskstate").starts_with("UpToDate"),
            "a forked loser is not UpToDate"
        );
        match s.resolve {
            Resolve::Invalidate => {
                r.ok(loser, &["invalidate", "r"]);
                r.step(&format!("{}: invalidate", loser.name));
            }
            Resolve::LeaveJoin => {
                r.ok(loser, &["down", "r"]);
                r.ok(loser, &["leave-resource", "r"]);
                let disk = disk.to_str().expect("utf8").to_string();
                r.wait(30, "the loser joins again", || {
                    loser
                        .marsadm(&["join-resource", "r", &disk])
                        .status
                        .success()
                });
                r.step(&format!("{}: leave-resource, join-resource", loser.name));
            }
        }
    } else {
        r.step("no fork: the loser follows the winner by itself");
    }

    // ---------------------------------------------------------------- converged
    r.wait_uptodate(loser);
    r.wait_split_brain("0");
    // A replication check after the resolution, as MARS's tree ends: writes, a rotation, more
    // writes, and everybody up to date.
    let mut final_writes = write_blocks(winner, FINAL_FROM, 4, 64 << 10);
    r.ok(winner, &["log-rotate", "r"]);
    final_writes.extend(write_blocks(
        winner,
        FINAL_FROM + 4 * (64 << 10),
        4,
        64 << 10,
    ));
    r.wait_uptodate(loser);
    r.wait_states(winner, PRIMARY_OK);
    r.wait_states(loser, SECONDARY_OK);
    r.wait_split_brain("0");
    for h in [a, b] {
        assert_eq!(view(h, "primarynode"), winner.name);
        assert_eq!(view(h, "stuck"), "", "{}", h.name);
    }
    let wi = usize::from(winner.name == "b");
    let expected = image(winner_history.iter().chain(&final_writes));
    let win_disk = read_disk(&r.disks[wi]);
    if let Some(at) = compare(&win_disk, &expected, &maybe) {
        panic!(
            "the winner {}'s disk differs from its history at {at}\n{}",
            winner.name,
            r.dump()
        );
    }
    r.wait(30, "the loser's disk equal to the winner's", || {
        first_difference(&r.disks[wi], &r.disks[1 - wi], SIZE).is_none()
    });
    assert_eq!(
        compare(&read_device(winner), &win_disk, &[]),
        None,
        "the winner's device and disk differ"
    );
    r.step("converged: both UpToDate, disks equal to the winner's history");
}

/// The resolution's forced switch on `h`, as MARS's recipe does it (`disconnect`,
/// `primary --force`, `connect`).
fn force(r: &Run, h: &Host) {
    r.ok(h, &["pause-fetch", "r"]);
    let out = r.ok(
        h,
        &["--timeout", "30", "primary", "--force", "--force", "r"],
    );
    r.ok(h, &["resume-fetch", "r"]);
    r.step(&format!("{}: primary --force: {}", h.name, out.trim()));
}
