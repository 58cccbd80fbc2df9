//! A long-distance link between two network namespaces, in userspace: the kernel here has no
//! `netem`, so latency is made by a "TAP wire" (test-environment.md §2 (b)). A TAP interface
//! `wan0` in each namespace; two forwarding threads read Ethernet frames from one and write
//! them to the other once their delay (plus optional jitter) has passed. A bandwidth limit is a
//! kernel `tbf` qdisc on each `wan0`.
//!
//! ```text
//!  netns A: wan0 (10.78.N.1) ─fd─► [reader] ─(frame, due)─► [writer: sleep until due] ─fd─► wan0 (10.78.N.2) :netns B
//!                            ◄──────────────────── the same the other way ◄──────────────
//! ```
//!
//! The TAP devices live as long as their file descriptors: dropping the [`WanLink`] (or the
//! test process dying) removes them; deleting the namespaces does too.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as far as `TUNSETIFF` reads it: the name (16 bytes, NUL-terminated) and the
/// flags; the kernel copies 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Frames held per direction at most: 1 Gbit/s × 25 ms of 1,514-byte frames is ~2,100, so
/// this covers a gigabit path with a delay of up to ~190 ms.
const IN_FLIGHT: usize = 16_384;

/// One direction's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay, uniformly random in `[0, jitter)` per frame (frames may overtake each
    /// other, as on a real path).
    pub jitter: Duration,
}

pub struct WanLink {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Creates TAP `name` in the named network namespace `ns` (a thread enters the namespace; the
/// device belongs to the namespace it was created in, whoever uses the descriptor later).
fn tap_in(ns: &str, name: &str) -> File {
    let ns = ns.to_string();
    let name = name.to_string();
    std::thread::spawn(move || {
        let nsf = File::open(format!("/run/netns/{ns}")).expect("netns file");
        // SAFETY: setns on this (short-lived) thread only, with a valid namespace fd.
        let r = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("/dev/net/tun");
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a struct ifreq, which `req` is laid out as.
        let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) };
        assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        tun
    })
    .join()
    .expect("tap thread")
}

fn ip(args: &[&str]) {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl WanLink {
    /// Connects namespaces `a` and `b` by `wan0` with addresses `addr_a`/`addr_b` (CIDR), each
    /// direction shaped by `shape`, and optionally limited to `mbit` per direction.
    pub fn new(
        a: &str,
        b: &str,
        addr_a: &str,
        addr_b: &str,
        shape: Shape,
        mbit: Option<u32>,
    ) -> WanLink {
        let ta = tap_in(a, "wan0");
        let tb = tap_in(b, "wan0");
        for (ns, addr) in [(a, addr_a), (b, addr_b)] {
            ip(&["-n", ns, "addr", "add", addr, "dev", "wan0"]);
            ip(&["-n", ns, "link", "set", "wan0", "up"]);
            if let Some(m) = mbit {
                // Burst of a few ms at the rate; queueing bounded to ~the delay.
                let rate = format!("{m}mbit");
                let burst = format!("{}kb", (m / 8).max(32));
                let o = std::process::Command::new("tc")
                    .args(["-n", ns, "qdisc", "add", "dev", "wan0", "root", "tbf"])
                    .args(["rate", &rate, "burst", &burst, "latency", "100ms"])
                    .output()
                    .expect("tc");
                assert!(
                    o.status.success(),
                    "tc: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ra, rb) = (ta.try_clone().expect("dup"), tb.try_clone().expect("dup"));
        threads.extend(direction(ta, tb, shape, stop.clone(), 1));
        threads.extend(direction(rb, ra, shape, stop.clone(), 2));
        WanLink { stop, threads }
    }
}

/// Frames from `from` are written to `to` after the shape's delay: a reader and a writer
/// thread joined by a channel ordered by arrival (the writer holds frames until they are due).
fn direction(
    mut from: File,
    mut to: File,
    shape: Shape,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> [JoinHandle<()>; 2] {
    // Bounded: at most IN_FLIGHT frames wait for their delay (a full queue blocks the reader,
    // the TAP queue behind it then drops, as a congested wire would).
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let s1 = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut buf = vec![0u8; 65_600];
        while !s1.load(Ordering::Relaxed) {
            // Wait for a frame at most 50 ms, so that a stop is noticed.
            let mut pfd = libc::pollfd {
                fd: from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                continue;
            }
            let n = match from.read(&mut buf) {
                Ok(n) => n,
                Err(_) => return,
            };
            let extra = if shape.jitter.is_zero() {
                Duration::ZERO
            } else {
                // xorshift: enough randomness for jitter, and no dependency.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                shape.jitter.mul_f64((rng % 1_000_000) as f64 / 1e6)
            };
            if tx
                .send((Instant::now() + shape.delay + extra, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    });
    let writer = std::thread::spawn(move || {
        let mut held: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            // Take everything that arrived; wait for the next frame at most until the first held
            // one is due.
            let wait = held.front().map_or(Duration::from_millis(50), |(due, _)| {
                due.saturating_duration_since(Instant::now())
            });
            match rx.recv_timeout(wait) {
                Ok(f) => {
                    // With jitter a later frame can be due earlier: keep `held` sorted.
                    let at = held.partition_point(|(d, _)| *d <= f.0);
                    held.insert(at, f);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            while held.front().is_some_and(|(due, _)| *due <= now) {
                let (_, frame) = held.pop_front().expect("front");
                // A full TAP queue drops the frame, as a congested wire would.
                let _ = to.write(&frame);
            }
        }
    });
    [reader, writer]
}

impl Drop for WanLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
