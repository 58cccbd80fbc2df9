//! The lab's long-distance link as a standalone tool for `bench/longdistance.sh`: TAP `wan0`
//! in two existing network namespaces, joined by the userspace forwarder of
//! [`mars_testkit::wan`] (every frame held for the one-way delay; this kernel has no `netem`),
//! with an optional `tbf` rate limit on each `wan0`. Runs until SIGTERM/SIGINT; the TAP
//! devices go with the process.
//!
//! ```text
//! mars-wan-wire NS_A NS_B ADDR_A/PREFIX ADDR_B/PREFIX DELAY_MS [MBIT] [MTU]
//! ```
//!
//! Prints `ready` on stdout once both ends are up, so that a script can wait for it.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mars_testkit::wan::{Shape, WanLink};

/// Frames the TAP queues for the forwarder (see main).
const TXQUEUELEN: u32 = 10_000;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn usage(why: &str) -> ExitCode {
    eprintln!(
        "mars-wan-wire: {why}\nusage: mars-wan-wire NS_A NS_B ADDR_A/PREFIX ADDR_B/PREFIX DELAY_MS [MBIT] [MTU]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(5..=7).contains(&args.len()) {
        return usage("wrong number of arguments");
    }
    let Ok(delay_ms) = args[4].parse::<u64>() else {
        return usage("DELAY_MS is not a number");
    };
    let mbit = match args.get(5).map(|m| m.parse::<u32>()) {
        None => None,
        Some(Ok(0)) => None,
        Some(Ok(m)) => Some(m),
        Some(Err(_)) => return usage("MBIT is not a number"),
    };
    // 68 is IPv4's minimum; 9000 is what the forwarder's 65,600-byte frame buffer and the
    // bench's jumbo option need at most.
    let mtu = match args.get(6).map(|m| m.parse::<u32>()) {
        None => None,
        Some(Ok(m)) if (68..=9000).contains(&m) => Some(m),
        Some(_) => return usage("MTU must be a number in 68..=9000"),
    };
    for ns in &args[..2] {
        if !std::path::Path::new(&format!("/run/netns/{ns}")).exists() {
            return usage(&format!("no network namespace {ns}"));
        }
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let shape = Shape {
        delay: Duration::from_millis(delay_ms),
        jitter: Duration::ZERO,
    };
    let link = WanLink::new(&args[0], &args[1], &args[2], &args[3], shape, mbit);
    // The TAP's queue towards the forwarder holds txqueuelen frames; at the default 1,000 a
    // reader thread descheduled for ~12 ms on a busy machine drops frames at 1 Gbit/s (seen:
    // 37k drops and 18k TCP retransmits in 8 s of iperf3), which a real wire would not. 10,000
    // frames is 120 ms at 1 Gbit/s of 1,514-byte frames.
    let mut settings = vec![("txqueuelen", TXQUEUELEN.to_string())];
    if let Some(mtu) = mtu {
        settings.push(("mtu", mtu.to_string()));
    }
    for ns in &args[..2] {
        for (key, value) in &settings {
            let st = std::process::Command::new("ip")
                .args(["-n", ns, "link", "set", "wan0", key, value])
                .status();
            if !st.is_ok_and(|s| s.success()) {
                eprintln!("mars-wan-wire: could not set {key} {value} on wan0 in {ns}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("ready");
    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(link);
    ExitCode::SUCCESS
}
