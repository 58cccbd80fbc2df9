//! The host lab: N mars hosts as Linux network namespaces on one bridge, each running a real
//! `marsd`, with network faults to inject (link cut, one-way partition, random loss, bandwidth
//! limit). See `../shared/reference/test-environment.md` §2 for the recipes.
//!
//! Layout of a lab `mlab-PID-N` (PID: the test process, N: the lab's number in it):
//! - netns `mlab-PID-N-sw` holds the "switch": bridge `br0`, one port `pHOST` per host, and the
//!   nftables table `bridge mlab` whose forward chain carries the partition and loss rules;
//! - netns `mlab-PID-N-HOST` per host (`a`, `b`, …) holds `lo` and `eth0` (the other end of
//!   `pHOST`) with address `10.77.N.I/24`, and runs `ip netns exec NS marsd --listen IP:7777`.
//!   Its `eth0` sends one TCP segment per packet (no 64 KiB GSO packets: loss and shaping act
//!   per packet, as on a wire), and its route sets a minimum TCP retransmission timeout of
//!   5 ms (the lab's round trip is ~0.1 ms; see the comment in [`Lab::new`]).
//!
//! Nothing is created in the initial network namespace, so labs of parallel tests (and of
//! parallel test processes) never collide even though they reuse interface names and subnets.
//! The daemons' control and NBD sockets are files under their roots: `marsadm --root` and NBD
//! clients on the test's side work unchanged (`Host::ok`, `Host::unix_uri`; not `tcp_uri`, whose
//! 127.0.0.1 is the host namespace's own loopback).
//!
//! Everything is removed when the [`Lab`] is dropped (also while a panic unwinds): the daemons
//! are killed, then the namespaces deleted, which takes their interfaces, qdiscs and nftables
//! with them, then the temporary directory. Leftovers of a test process that died without
//! unwinding (SIGKILL, abort) are removed by the next [`Lab::new`]: the creator's pid is in every
//! name, and names whose process is gone are cleaned (processes in the namespace killed first).
//!
//! The lab needs root and `ip`, `nft`, `tc`: [`Lab::new`] returns `None` (skip, with a message)
//! where they are missing, and fails in CI (`CI=true`) instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::Host;

/// Prefix of every name the lab creates (namespaces, temporary directories).
const PREFIX: &str = "mlab-";
/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// The peer port of every lab host (each has its own address).
pub const PEER_PORT: u16 = 7777;
/// The switch's nftables table (family `bridge`) and its forward chain.
const TABLE: &str = "mlab";
const CHAIN: &str = "faults";

static LABS: AtomicU32 = AtomicU32::new(0);

/// N hosts with their own network namespace and `marsd` on one bridge. See the module docs.
pub struct Lab {
    /// The hosts in order: `a`, `b`, `c` …; index them like [`Lab::cut`] and friends do.
    pub hosts: Vec<Host>,
    /// `mlab-PID-N`.
    id: String,
    /// The switch namespace (created first, deleted last).
    sw: String,
    /// The hosts' namespaces, in host order.
    nets: Vec<String>,
    /// The hosts' addresses, in host order.
    ips: Vec<String>,
    /// The addresses the daemons listen on for peers (the bridge's, or the WAN link's).
    peer_ips: Vec<String>,
    /// A userspace long-distance link between hosts 0 and 1 ([`Lab::new_wan`]).
    wan: Option<crate::wan::WanLink>,
    /// Temporary directory with the hosts' roots and scratch files; removed on drop.
    dir: Option<tempfile::TempDir>,
}

/// Can a lab run here? Root and `ip`, `nft`, `tc` are needed; in CI their absence is a failure,
/// elsewhere the caller should skip (a message says why).
pub fn available() -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if ci {
            panic!("the host lab needs root in CI (network namespaces, nftables, tc)");
        }
        eprintln!("SKIPPED: the host lab needs root (network namespaces, nftables, tc)");
        return false;
    }
    ["ip", "nft", "tc"].iter().all(|t| crate::require(t))
}

impl Lab {
    /// Builds `n` hosts (`a`, `b`, …) on one bridge and starts `marsd` in each; `None` when the
    /// lab cannot run here (see [`available`]). The hosts are not in a cluster yet.
    pub fn new(n: usize) -> Option<Lab> {
        Self::build(n, None)
    }

    /// Two hosts whose peer traffic crosses a long-distance link made in userspace: TAP
    /// interfaces `wan0` (10.78.N.1 and .2) joined by a forwarder that delays every frame by
    /// `shape` in each direction, optionally limited to `mbit` (see [`crate::wan`]). The bridge
    /// stays for faults on `eth0`, but the daemons listen and connect on `wan0`.
    pub fn new_wan(shape: crate::wan::Shape, mbit: Option<u32>) -> Option<Lab> {
        Self::build(2, Some((shape, mbit)))
    }

    fn build(n: usize, wan: Option<(crate::wan::Shape, Option<u32>)>) -> Option<Lab> {
        assert!((1..=26).contains(&n), "1 to 26 hosts");
        if !available() {
            return None;
        }
        static STALE: Once = Once::new();
        STALE.call_once(remove_stale);
        let num = LABS.fetch_add(1, Ordering::Relaxed);
        let id = format!("{PREFIX}{}-{num}", std::process::id());
        // Kept when `MARS_KEEP_TMP` is set (the daemons' logs after a failure), as `tempdir`;
        // named `kept-mlab-…` then, which the stale cleanup leaves alone.
        let keep = std::env::var_os("MARS_KEEP_TMP").is_some();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}{id}-", if keep { "kept-" } else { "" }))
            .disable_cleanup(keep)
            .tempdir()
            .expect("lab tempdir");
        // Every namespace shares a subnet number with the lab; they are isolated anyway.
        let subnet = num % 250;
        let mut lab = Lab {
            hosts: Vec::new(),
            sw: format!("{id}-sw"),
            nets: Vec::new(),
            ips: Vec::new(),
            peer_ips: Vec::new(),
            wan: None,
            id,
            dir: Some(dir),
        };
        // From here on, a panic drops `lab`, which removes what exists so far.
        ip(&["netns", "add", &lab.sw]);
        ip(&["-n", &lab.sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lab.sw, "link", "set", "br0", "up"]);
        lab.nft_sw(&format!("add table bridge {TABLE}"));
        lab.nft_sw(&format!(
            "add chain bridge {TABLE} {CHAIN} {{ type filter hook forward priority 0; policy accept; }}"
        ));
        for i in 0..n {
            let name = host_name(i);
            let ns = format!("{}-{name}", lab.id);
            ip(&["netns", "add", &ns]);
            lab.nets.push(ns.clone());
            let port = format!("p{name}");
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &lab.sw,
            ]);
            ip(&["-n", &lab.sw, "link", "set", &port, "master", "br0", "up"]);
            let addr = format!("10.77.{subnet}.{}", i + 1);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            // One TCP segment per packet, as on a real wire: otherwise a veth carries 64 KiB
            // GSO packets, and the loss rules would drop 40-odd segments at once.
            ip(&["-n", &ns, "link", "set", "eth0", "gso_max_segs", "1"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            // The lab's round trip is ~0.1 ms: TCP's default minimum retransmission timeout of
            // 200 ms would be 2000 round trips (on a WAN it is a few) and make lossy links crawl
            // (30% loss towards a host: ~70 KiB/s; with 5 ms: ~1 MiB/s).
            let net = format!("10.77.{subnet}.0/24");
            ip(&[
                "-n", &ns, "route", "replace", &net, "dev", "eth0", "proto", "kernel", "scope",
                "link", "src", &addr, "rto_min", "5ms",
            ]);
            lab.ips.push(addr);
        }
        for i in 0..n {
            lab.wait_link(i);
        }
        lab.peer_ips = lab.ips.clone();
        if let Some((shape, mbit)) = wan {
            let (a, b) = (format!("10.78.{subnet}.1"), format!("10.78.{subnet}.2"));
            lab.wan = Some(crate::wan::WanLink::new(
                &lab.nets[0],
                &lab.nets[1],
                &format!("{a}/24"),
                &format!("{b}/24"),
                shape,
                mbit,
            ));
            lab.peer_ips = vec![a, b];
        }
        for i in 0..n {
            let h = lab.spawn_host(i);
            lab.hosts.push(h);
        }
        Some(lab)
    }

    fn spawn_host(&self, i: usize) -> Host {
        let name = host_name(i);
        let base = self.path().join(&name);
        std::fs::create_dir_all(&base).expect("mkdir");
        let mut h = Host {
            name: name.clone(),
            root: base.join("root"),
            // The namespace's own loopback: any port is free there.
            nbd_port: 10809,
            peer_addr: format!("{}:{PEER_PORT}", self.peer_ips[i]),
            log: base.join("marsd.log"),
            child: None,
            env: Vec::new(),
            wrap: ["ip", "netns", "exec", &self.nets[i]]
                .map(String::from)
                .to_vec(),
        };
        assert!(h.spawn(), "marsd in {}: {}", self.nets[i], h.log_text());
        h
    }

    /// The lab's temporary directory (hosts' roots live in `DIR/NAME/root`); scratch space too.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }

    /// `mlab-PID-N`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Host `i`'s address (no port).
    pub fn ip(&self, i: usize) -> &str {
        &self.ips[i]
    }

    /// Host `i`'s network namespace, for `ip netns exec`.
    pub fn netns(&self, i: usize) -> &str {
        &self.nets[i]
    }

    /// Runs `args` inside host `i`'s network namespace; asserts success, returns stdout.
    pub fn exec(&self, i: usize, args: &[&str]) -> String {
        crate::run(
            Command::new("ip")
                .args(["netns", "exec", &self.nets[i]])
                .args(args),
        )
    }

    // ------------------------------------------------------------------ faults

    /// Cuts host `i`'s link (its switch port goes down): nothing reaches it or leaves it, TCP
    /// connections stay open and retransmit.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.sw, "link", "set", &port(i), "down"]);
        // Both ends notice the carrier loss within linkwatch's delay.
        self.wait_state(&self.sw, &port(i), false);
        self.wait_state(&self.nets[i], "eth0", false);
    }

    /// Brings host `i`'s link back and waits until both ends pass traffic again.
    pub fn restore(&self, i: usize) {
        ip(&["-n", &self.sw, "link", "set", &port(i), "up"]);
        self.wait_link(i);
    }

    /// Drops every IPv4 packet from host `from` to host `to` in the switch; the other direction
    /// still passes.
    pub fn partition_one_way(&self, from: usize, to: usize) {
        self.nft_sw(&format!(
            "add rule bridge {TABLE} {CHAIN} ip saddr {} ip daddr {} drop",
            self.ips[from], self.ips[to]
        ));
    }

    /// Drops `percent` % of the IPv4 packets to and (independently) from host `i`, chosen at
    /// random in the switch.
    pub fn loss(&self, i: usize, percent: u32) {
        self.loss_to(i, percent);
        self.loss_from(i, percent);
    }

    /// Drops `percent` % of the IPv4 packets delivered to host `i` (its data, its peers' answers
    /// and acknowledgements); what it sends passes.
    pub fn loss_to(&self, i: usize, percent: u32) {
        self.loss_rule("oifname", i, percent);
    }

    /// Drops `percent` % of the IPv4 packets host `i` sends.
    pub fn loss_from(&self, i: usize, percent: u32) {
        self.loss_rule("iifname", i, percent);
    }

    fn loss_rule(&self, dir: &str, i: usize, percent: u32) {
        assert!(percent <= 100);
        self.nft_sw(&format!(
            "add rule bridge {TABLE} {CHAIN} {dir} \"{}\" meta protocol ip numgen random mod 100 < {percent} drop",
            port(i)
        ));
    }

    /// Limits host `i`'s link to `mbit` Mbit/s in each direction (tbf on both veth ends'
    /// egress: the switch port towards the host, the host's `eth0` towards the switch).
    pub fn limit(&self, i: usize, mbit: u32) {
        assert!(mbit > 0);
        // A burst of ~10 ms at the rate, at least 64 KiB.
        let burst = (u64::from(mbit) * 1_000_000 / 8 / 100).max(64 << 10);
        for (ns, dev) in [(&self.sw, port(i)), (&self.nets[i], "eth0".to_string())] {
            crate::run(Command::new("tc").args([
                "-n",
                ns,
                "qdisc",
                "replace",
                "dev",
                &dev,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                &burst.to_string(),
                "latency",
                "50ms",
            ]));
        }
    }

    /// Removes every fault: links up, nftables rules flushed, rate limits gone.
    pub fn heal(&self) {
        self.nft_sw(&format!("flush chain bridge {TABLE} {CHAIN}"));
        for i in 0..self.nets.len() {
            for (ns, dev) in [(&self.sw, port(i)), (&self.nets[i], "eth0".to_string())] {
                let out = Command::new("tc")
                    .args(["-n", ns, "qdisc", "show", "dev", &dev])
                    .output()
                    .expect("tc");
                if String::from_utf8_lossy(&out.stdout).contains("qdisc tbf") {
                    crate::run(
                        Command::new("tc").args(["-n", ns, "qdisc", "del", "dev", &dev, "root"]),
                    );
                }
            }
            ip(&["-n", &self.sw, "link", "set", &port(i), "up"]);
        }
        for i in 0..self.nets.len() {
            self.wait_link(i);
        }
    }

    // ------------------------------------------------------------------ internals

    fn nft_sw(&self, cmd: &str) {
        crate::run(
            Command::new("ip")
                .args(["netns", "exec", &self.sw, "nft"])
                .arg(cmd),
        );
    }

    /// Waits until host `i`'s link passes traffic: both veth ends operationally up (the kernel
    /// activates a device's qdisc only then; before, packets are dropped).
    fn wait_link(&self, i: usize) {
        self.wait_state(&self.sw, &port(i), true);
        self.wait_state(&self.nets[i], "eth0", true);
    }

    fn wait_state(&self, ns: &str, dev: &str, up: bool) {
        let start = Instant::now();
        loop {
            let out = crate::run(Command::new("ip").args(["-n", ns, "-o", "link", "show", dev]));
            if out.contains(" state UP ") == up {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{dev} in {ns} not {}: {out}",
                if up { "up" } else { "down" }
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The daemons first (their namespaces live on while they run), then the namespaces,
        // which take interfaces, qdiscs and nftables with them, then the files.
        for h in &mut self.hosts {
            h.kill9();
        }
        drop(self.wan.take());
        for ns in self.nets.iter().chain([&self.sw]) {
            remove_netns(ns);
        }
        if let Some(d) = self.dir.take() {
            // (Dropped, not closed, when kept: `close` removes it whatever the builder said.)
            if std::env::var_os("MARS_KEEP_TMP").is_none() {
                let _ = d.close();
            }
        }
    }
}

/// `a`, `b`, … for index 0, 1, …
fn host_name(i: usize) -> String {
    char::from(b'a' + u8::try_from(i).expect("host index")).to_string()
}

/// The switch's port towards host `i`.
fn port(i: usize) -> String {
    format!("p{}", host_name(i))
}

/// `ip ARGS`, asserting success.
fn ip(args: &[&str]) -> String {
    crate::run(Command::new("ip").args(args))
}

/// Kills every process in namespace `ns` and deletes it (errors ignored: best effort).
fn remove_netns(ns: &str) {
    if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) of a process inside the lab's own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(std::process::Stdio::null())
        .status();
}

/// The creator's pid in a name `mlab-PID-…`.
fn owner(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces (with their processes) and temporary directories of labs whose test
/// process no longer exists.
fn remove_stale() {
    let mut stale_dirs: Vec<PathBuf> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(NETNS_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner(&name).is_some_and(|pid| !process_exists(pid)) {
                eprintln!("lab: removing stale namespace {name}");
                remove_netns(&name);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner(&name).is_some_and(|pid| !process_exists(pid)) {
                stale_dirs.push(e.path());
            }
        }
    }
    for d in stale_dirs {
        eprintln!("lab: removing stale directory {}", d.display());
        let _ = std::fs::remove_dir_all(d);
    }
}
