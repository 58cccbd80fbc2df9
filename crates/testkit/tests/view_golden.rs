//! Golden tests of plain `marsadm view` and `view all`: real `marsd` hosts are driven into the
//! states an operator meets (a fresh primary, two members in sync, a secondary behind with
//! replay or fetch paused, a sync, a dead primary, a forced failover and the split brain when
//! the old primary returns, emergency mode, a member that left), and each view is compared
//! with a file under `tests/golden/view/`, one file per scenario, each view headed by the
//! command that printed it (`== a# marsadm view r`).
//!
//! Only what is genuinely volatile is normalised (see [`normalise`]): the temporary directory,
//! ports, the cluster's id and the TLS fingerprint, rates and the time remaining at a rate,
//! ages, the root's free space and its growth rate. States, flags, roles, positions, sizes and amounts stay exact.
//! Other members' lines come from reports published about once a second, so a view is
//! compared until it matches (at most [`MATCH_SECS`]); a view that never matches fails with
//! the expected and the last seen text.
//!
//! After an intended change of the output, rewrite the files and review the diff:
//!
//! ```sh
//! MARS_BLESS=1 cargo test -p mars-testkit --test view_golden
//! git diff crates/testkit/tests/golden/view/
//! ```
//!
//! Blessing waits until each view is stable (the same text twice, [`SETTLE`] apart) and says
//! on stderr which files it wrote; without `MARS_BLESS` a missing file is a failure, never a
//! silent bless.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mars_testkit::repl::{eventually, join, tail, tmp, wait_uptodate};
use mars_testkit::smallfs::SmallFs;
use mars_testkit::{run, Host};
use regex::Regex;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
/// How long a view may take to reach its golden text (reports travel about once a second).
const MATCH_SECS: u64 = 20;
/// Blessing: a view counts as stable when it reads the same twice this far apart (longer than
/// the members' report interval).
const SETTLE: Duration = Duration::from_millis(2500);

fn blessing() -> bool {
    std::env::var_os("MARS_BLESS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// The normaliser: each pattern and what replaces it, applied in order. Everything not listed
/// here must be the same on every run.
fn patterns() -> &'static [(Regex, &'static str)] {
    static P: OnceLock<Vec<(Regex, &'static str)>> = OnceLock::new();
    P.get_or_init(|| {
        [
            // The cluster's id is random.
            (
                r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                "UUID",
            ),
            // Peer and NBD ports are picked free at random by the testkit.
            (r"(127\.0\.0\.\d+):\d+", "$1:PORT"),
            // Rates are measured; the time remaining follows from the rate, except when
            // nothing remains (`00:00:00`, kept: see `normalise`).
            (r"rate: [0-9.]+[KMGT]?i?B/s", "rate: RATE"),
            // Ages of reports and of the oldest unapplied write.
            (r"info [0-9.]+s old", "info AGE old"),
            (r"\([0-9.]+s old\)", "(AGE old)"),
            // The root's free space is whatever the test machine has.
            (
                r"space: [0-9.]+ [KMGT]?i?B free of [0-9.]+ [KMGT]?i?B \(\d+% used\)",
                "space: FREE free of TOTAL (USED% used)",
            ),
            // The log's growth rate is measured over the last seconds.
            (
                r"(not growing|growing [0-9.]+ [KMGT]?i?B/s, full in [0-9:-]+)",
                "GROWTH",
            ),
            // The CA of each test cluster is new.
            (r"sha256:[0-9a-f]{64}", "sha256:FINGERPRINT"),
        ]
        .into_iter()
        .map(|(re, to)| (Regex::new(re).expect("pattern"), to))
        .collect()
    })
}

/// `text` with the volatile parts replaced (see [`patterns`]) and the test's directory shown
/// as `$T`. A time remaining is kept only when it is `00:00:00` (nothing left: exact).
fn normalise(text: &str, dir: &Path) -> String {
    let mut s = text.replace(dir.to_str().expect("utf8 dir"), "$T");
    for (re, to) in patterns() {
        s = re.replace_all(&s, *to).into_owned();
    }
    static ETA: OnceLock<Regex> = OnceLock::new();
    let eta = ETA.get_or_init(|| Regex::new(r"remaining: (\d+:\d\d:\d\d|--:--:--)").unwrap());
    eta.replace_all(&s, |c: &regex::Captures| {
        if &c[1] == "00:00:00" {
            c[0].to_string()
        } else {
            "remaining: ETA".to_string()
        }
    })
    .into_owned()
}

/// The header of one view in a golden file.
fn header(h: &Host, args: &[&str]) -> String {
    format!("== {}# marsadm {}", h.name, args.join(" "))
}

/// The views of a golden file, `(header, output)`: each view is its header line, the output
/// and a blank line.
fn parse(text: &str) -> Vec<(String, String)> {
    let mut views: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with("== ") {
            views.push((line.to_string(), String::new()));
        } else if let Some((_, body)) = views.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    for (_, body) in &mut views {
        if body.ends_with("\n\n") {
            body.pop();
        }
    }
    views
}

/// One golden file: the views of a scenario in the order it shows them.
struct Golden {
    path: PathBuf,
    dir: PathBuf,
    /// Check mode: the file's views, `(header, text)`; `next` is the one to compare next.
    expected: Vec<(String, String)>,
    next: usize,
    /// Bless mode: what the file will hold.
    recorded: String,
}

impl Golden {
    fn new(name: &str, dir: &Path) -> Golden {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/view")
            .join(format!("{name}.txt"));
        let mut expected = Vec::new();
        if !blessing() {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; write it with MARS_BLESS=1 cargo test -p mars-testkit --test \
                     view_golden",
                    path.display()
                )
            });
            expected = parse(&text);
        }
        Golden {
            path,
            dir: dir.to_path_buf(),
            expected,
            next: 0,
            recorded: String::new(),
        }
    }

    fn shot(&self, h: &Host, args: &[&str]) -> String {
        normalise(&h.ok(args), &self.dir)
    }

    /// `marsadm ARGS` on `h` must print the next view of the file (within [`MATCH_SECS`]);
    /// blessing records it once it is stable.
    fn view(&mut self, h: &Host, args: &[&str]) {
        let head = header(h, args);
        if blessing() {
            let mut last = self.shot(h, args);
            loop {
                std::thread::sleep(SETTLE);
                let now = self.shot(h, args);
                if now == last {
                    break;
                }
                last = now;
            }
            self.recorded += &format!("{head}\n{last}\n");
            return;
        }
        let Some((want_head, want)) = self.expected.get(self.next).cloned() else {
            panic!(
                "{}: has {} views, the test shows more ({head}); bless it again",
                self.path.display(),
                self.next
            );
        };
        assert_eq!(
            want_head,
            head,
            "{}: view {} is of another command; bless it again",
            self.path.display(),
            self.next + 1
        );
        let start = Instant::now();
        let mut got = self.shot(h, args);
        while got != want && start.elapsed() < Duration::from_secs(MATCH_SECS) {
            std::thread::sleep(Duration::from_millis(200));
            got = self.shot(h, args);
        }
        eprintln!(
            "{head}: {} after {:.1} s",
            if got == want { "matched" } else { "DIFFERS" },
            start.elapsed().as_secs_f64()
        );
        assert!(
            got == want,
            "{} ({}): after {MATCH_SECS} s the view differs\n--- expected\n{want}--- got\n{got}\
             --- {}'s log\n{}",
            self.path.display(),
            head,
            h.name,
            tail(&h.log_text(), 30)
        );
        self.next += 1;
    }

    /// Blessing writes the file; checking asserts that every view of the file was shown.
    fn finish(self) {
        if blessing() {
            std::fs::create_dir_all(self.path.parent().expect("dir")).expect("mkdir");
            std::fs::write(&self.path, &self.recorded).expect("write golden file");
            eprintln!("MARS_BLESS: wrote {}", self.path.display());
        } else {
            assert_eq!(
                self.next,
                self.expected.len(),
                "{}: the test showed only {} of its views; bless it again",
                self.path.display(),
                self.next
            );
        }
    }
}

/// The normaliser replaces the volatile parts and nothing else: positions, amounts, states and
/// a time remaining of zero stay as they are.
#[test]
fn the_normaliser_hides_only_what_is_volatile() {
    let raw = "    > fetch: 1.000MiB rate: 9.74MiB/s remaining: 00:00:01 logs: [2..2]\n\
               \x20   > replay: 0B rate: 0B/s remaining: 00:00:00 logs: [2..2]\n\
               \x20   disk: /tmp/t1/b/r.img size 16.00 MiB open 0\n\
               \x20   member a: WriteBack[1.00 MiB] UnResponsive DCASFR ? behind 1.00 MiB (70.7s old) NOT ALIVE\n\
               --------- cluster d913c63d-bdbb-bdce-6fc1-0e85476e1cb8\n\
               \x20 peers: mutual TLS sha256:04ccbfcf506d056dc7a3233def5de0a0dee0c5e84b2da84cfff3869812696bc9\n\
               \x20   host a at 127.0.0.1:21492 (NOT ALIVE, not connected, info 8.2s old, last error: \
               connect to 127.0.0.1:21492: Connection refused (os error 111))\n\
               \x20 space: 15.85 GiB free of 251.97 GiB (94% used), logs 16.00 MiB (preallocated \
               1.00 GiB), growing 3.19 MiB/s, full in 01:24:39\n\
               \x20   > sync: 2B rate: 0B/s remaining: --:--:--\n";
    let want = "    > fetch: 1.000MiB rate: RATE remaining: ETA logs: [2..2]\n\
                \x20   > replay: 0B rate: RATE remaining: 00:00:00 logs: [2..2]\n\
                \x20   disk: $T/b/r.img size 16.00 MiB open 0\n\
                \x20   member a: WriteBack[1.00 MiB] UnResponsive DCASFR ? behind 1.00 MiB (AGE old) NOT ALIVE\n\
                --------- cluster UUID\n\
                \x20 peers: mutual TLS sha256:FINGERPRINT\n\
                \x20   host a at 127.0.0.1:PORT (NOT ALIVE, not connected, info AGE old, last error: \
                connect to 127.0.0.1:PORT: Connection refused (os error 111))\n\
                \x20 space: FREE free of TOTAL (USED% used), logs 16.00 MiB (preallocated 1.00 GiB), \
                GROWTH\n\
                \x20   > sync: 2B rate: RATE remaining: ETA\n";
    assert_eq!(normalise(raw, Path::new("/tmp/t1")), want);
    // A golden file round-trips through its parser.
    let file = "== a# marsadm view r\nline 1\nline 2\n\n== b# marsadm view all\nx\n\n";
    assert_eq!(
        parse(file),
        vec![
            (
                "== a# marsadm view r".to_string(),
                "line 1\nline 2\n".to_string()
            ),
            ("== b# marsadm view all".to_string(), "x\n".to_string()),
        ]
    );
}

/// `len` bytes of `byte` at `off` of `r` through `h`'s NBD socket (qemu-io): the same bytes
/// on every run, so the log positions are too.
fn write(h: &Host, off: u64, len: u64, byte: u8) {
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -P {byte} {off} {len}"))
        .arg(h.unix_uri("r")));
}

/// `a` primary of `r` with 1 MiB written, `b` its secondary, up to date.
fn pair(t: &Path) -> (Host, Host) {
    let a = Host::start_at(t, "a", "127.0.0.1");
    let b = Host::start_at(t, "b", "127.0.0.2");
    a.create_resource("r", SIZE);
    b.join(&a);
    for h in [&a, &b] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    write(&a, 0, MIB, 0x11);
    join(&b, "r", SIZE);
    wait_uptodate(&b, "r", 60);
    (a, b)
}

fn rest(h: &Host, what: &str) -> u64 {
    h.view(&format!("{what}-rest"), "r")
        .parse()
        .expect("a number")
}

/// The member `host` as `h` sees it in `view --json`.
fn member(h: &Host, host: &str) -> serde_json::Value {
    h.view_json()["resources"][0]["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["host"] == host)
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_fresh_single_primary() {
    if !mars_testkit::require("qemu-io") {
        return;
    }
    let t = tmp();
    let mut g = Golden::new("fresh_single_primary", t.path());
    let a = Host::start_at(t.path(), "a", "127.0.0.1");
    g.view(&a, &["view", "all"]);
    a.create_resource("r", SIZE);
    g.view(&a, &["view", "r"]);
    write(&a, 0, MIB, 0x11);
    g.view(&a, &["view", "all"]);
    g.finish();
}

#[test]
fn two_members_in_sync_behind_syncing_and_leaving() {
    if !mars_testkit::require("qemu-io") {
        return;
    }
    let t = tmp();
    let mut g = Golden::new("two_members", t.path());
    let (a, b) = pair(t.path());
    g.view(&a, &["view", "r"]);
    g.view(&b, &["view", "r"]);
    g.view(&b, &["view", "all"]);

    // Replay paused: b fetches the new MiB but does not apply it; a sees b behind, with the
    // age of the oldest write b has not applied.
    b.ok(&["pause-replay", "r"]);
    write(&a, MIB, MIB, 0x12);
    eventually(20, "b fetched, not replayed", || {
        rest(&b, "fetch") == 0 && rest(&b, "replay") > 0
    });
    eventually(20, "a sees b behind", || {
        member(&a, "b")["behind_bytes"].as_u64().unwrap_or(0) > 0
    });
    g.view(&b, &["view", "r"]);
    g.view(&a, &["view", "r"]);
    b.ok(&["resume-replay", "r"]);
    wait_uptodate(&b, "r", 60);

    // Fetch paused: the new MiB stays on a.
    b.ok(&["pause-fetch", "r"]);
    write(&a, 2 * MIB, MIB, 0x13);
    eventually(20, "a sees b behind", || {
        member(&a, "b")["behind_bytes"].as_u64().unwrap_or(0) > 0
    });
    g.view(&b, &["view", "r"]);
    g.view(&a, &["view", "r"]);
    b.ok(&["resume-fetch", "r"]);
    wait_uptodate(&b, "r", 60);

    // A full sync, held at its start by pause-sync: the copy stays at 0 %.
    b.ok(&["pause-sync", "r"]);
    b.ok(&["invalidate", "r"]);
    g.view(&b, &["view", "r"]);
    g.view(&a, &["view", "r"]);
    b.ok(&["resume-sync", "r"]);
    wait_uptodate(&b, "r", 60);
    g.view(&b, &["view", "r"]);

    // b detaches (`down`), then leaves the resource: a is its only member again.
    b.ok(&["down", "r"]);
    eventually(20, "a sees b detached", || {
        member(&a, "b")["disk_state"] == "Detached"
    });
    g.view(&b, &["view", "r"]);
    g.view(&a, &["view", "r"]);
    b.ok(&["leave-resource", "r"]);
    eventually(20, "b gone from a's view", || member(&a, "b").is_null());
    g.view(&a, &["view", "r"]);
    g.view(&b, &["view", "all"]);
    g.finish();
}

#[test]
fn a_dead_primary_a_forced_failover_and_the_split_brain_when_it_returns() {
    if !mars_testkit::require("qemu-io") {
        return;
    }
    let t = tmp();
    let mut g = Golden::new("failover_split_brain", t.path());
    let (mut a, b) = pair(t.path());
    // a writes what b never fetches, then dies.
    b.ok(&["pause-fetch", "r"]);
    write(&a, MIB, MIB, 0x21);
    // b's view of a must be a's report after the write and its writeback, whatever a's
    // last report before the crash is, is what b shows from then on.
    eventually(20, "b knows a's log is ahead and on its disk", || {
        rest(&b, "fetch") > 0 && member(&b, "a")["disk_state"] == "UpToDate"
    });
    a.kill9();
    let killed = Instant::now();
    eventually(30, "b sees a dead", || member(&b, "a")["alive"] == false);
    g.view(&b, &["view", "r"]);
    g.view(&b, &["view", "all"]);

    // The failover: b takes what it has. Within 10 s of a's last word `primary --force`
    // would ask for a confirmation (a might still be alive): wait that out, as the guide's
    // operator does.
    std::thread::sleep(Duration::from_secs(11).saturating_sub(killed.elapsed()));
    b.ok(&["--timeout", "30", "primary", "--force", "r"]);
    g.view(&b, &["view", "r"]);
    write(&b, 4 * MIB, 2 * MIB, 0x22);
    g.view(&b, &["view", "r"]);

    // a returns with its own history: both sides show the split brain.
    a.start_again();
    eventually(30, "both see the split brain", || {
        a.view("is-split-brain", "r") == "1" && b.view("is-split-brain", "r") == "1"
    });
    g.view(&a, &["view", "r"]);
    g.view(&b, &["view", "r"]);

    // Resolved as the guide says: invalidate on the side that loses.
    a.ok(&["invalidate", "r"]);
    wait_uptodate(&a, "r", 60);
    g.view(&a, &["view", "r"]);
    g.view(&b, &["view", "r"]);
    g.finish();
}

/// a's root (its whole directory, not its disk) is a 256 MiB filesystem with 70 MiB left by a
/// ballast file; b's fetch is paused so that a's log stays. Writes of 4 MiB, each followed by
/// a pause long enough for a's space measurement, fill it until a is in emergency mode (below
/// 40 MiB free): the write that crosses the threshold is the same on every run.
#[test]
fn emergency_mode_on_a_primary_whose_root_fills_up() {
    if !mars_testkit::require("qemu-io") || !mars_testkit::require("mkfs.ext4") {
        return;
    }
    let t = tmp();
    // Declared first: unmounted last, after the hosts are gone.
    let Some(small) = SmallFs::new(&t.path().join("a-root.img"), &t.path().join("a"), 256 * MIB)
    else {
        return;
    };
    let mut g = Golden::new("emergency", t.path());
    let a = Host::start_with_env(
        t.path(),
        "a",
        "127.0.0.1",
        &[
            ("MARS_MIN_FREE_SPACE", "56M"),
            ("MARS_EMERGENCY_FREE_SPACE", "40M"),
        ],
    );
    let b = Host::start_at(t.path(), "b", "127.0.0.2");
    let disk = t.path().join("a-disk.img");
    std::fs::File::create(&disk)
        .expect("disk")
        .set_len(SIZE)
        .expect("size");
    a.ok(&["create-cluster"]);
    a.ok(&["create-resource", "r", disk.to_str().expect("utf8")]);
    b.join(&a);
    for h in [&a, &b] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    join(&b, "r", SIZE);
    wait_uptodate(&b, "r", 60);
    let ballast = small.at.join("ballast");
    let keep = small.free().saturating_sub(70 * MIB);
    run(Command::new("fallocate")
        .args(["-l", &keep.to_string()])
        .arg(&ballast));
    b.ok(&["pause-fetch", "r"]);
    let mut i = 0u64;
    while a.view("diskstate", "r") != "EmergencyMode" {
        assert!(i < 30, "no emergency mode after {i} writes of 4 MiB");
        write(&a, (i * 4 * MIB) % SIZE, 4 * MIB, 0x40 + i as u8);
        i += 1;
        std::thread::sleep(Duration::from_millis(1500));
    }
    // Writes keep working, past the log.
    write(&a, 0, 4 * MIB, 0x60);
    g.view(&a, &["view", "r"]);
    g.view(&a, &["view", "all"]);
    b.ok(&["resume-fetch", "r"]);
    eventually(30, "b sees that replication stopped", || {
        b.view("stuck", "r").contains("emergency")
    });
    g.view(&b, &["view", "r"]);

    // Space comes back: a leaves emergency mode, b needs a full sync.
    std::fs::remove_file(&ballast).expect("remove the ballast");
    eventually(30, "a leaves emergency mode", || {
        a.view("diskstate", "r") != "EmergencyMode"
    });
    b.ok(&["invalidate", "r"]);
    wait_uptodate(&b, "r", 60);
    g.view(&a, &["view", "r"]);
    g.view(&b, &["view", "r"]);
    g.finish();
}
