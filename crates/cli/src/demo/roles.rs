//! The demo's second half: the roles. A planned handover from alpha to beta, then a failover
//! that ends in a split brain, resolved the way an operator would (MARS's recommended recipe):
//!
//! ```text
//! beta$  marsadm primary demo            planned: alpha's last write is replayed first
//! gamma$ marsadm pause-fetch demo        gamma stops following …
//!        (beta writes; alpha gets it)    … so beta's next writes reach only alpha
//!        (beta's machine dies)
//! gamma$ marsadm primary --force demo    failover with what gamma has
//!        (gamma writes; beta comes back) beta+alpha vs gamma: SPLIT BRAIN
//! alpha$ marsadm invalidate demo         keep gamma's version: the others resync from it
//! beta$  marsadm invalidate demo
//! ```
//!
//! Writes go through the primary's block device when the daemon has one (as root: FUSE +
//! loop), otherwise through NBD; every copy is then verified against the demo's model.

use std::os::unix::fs::FileExt;

use super::*;

/// Rounds (see [`Image`]) of this half's writes: distinct from the first half's.
const ROUND_HANDOVER: u32 = 1_000;
const ROUND_LOST: u32 = 1_001;
const ROUND_FAILOVER: u32 = 1_002;

/// What the second half measured, for the summary.
pub(super) struct RoleTimes {
    handover: Duration,
    failover: Duration,
    detected: Duration,
    resolved: Duration,
    via: &'static str,
    verified: Verification,
    lost: u64,
}

impl RoleTimes {
    pub(super) fn print(&self) {
        println!(
            "planned handover alpha → beta: {} (writes through {})",
            secs(self.handover),
            self.via
        );
        println!(
            "failover to gamma (primary --force): {}; split brain seen {} after beta returned; \
             resolved by invalidate in {} ({} of beta's last writes discarded, as chosen)",
            secs(self.failover),
            secs(self.detected),
            secs(self.resolved),
            format_size(self.lost)
        );
        let verdict = if self.verified.ok() {
            "all identical"
        } else {
            "MISMATCH"
        };
        println!(
            "verified after the resolution: {} × {}: {verdict}",
            self.verified.copies.len(),
            format_size(self.verified.size)
        );
    }
}

/// Where a primary's writes go: its block device when there is one, else NBD.
enum Sink {
    Device(File),
    Nbd(Nbd),
}

impl Sink {
    fn open(h: &Host) -> Result<(Sink, &'static str)> {
        let out = h.adm_quiet(&["view-device", RES])?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !dev.is_empty() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev)
                .with_context(|| format!("open {dev}"))?;
            println!("({} writes through its block device {dev})", h.name);
            return Ok((Sink::Device(f), "the block device"));
        }
        Ok((Sink::Nbd(Nbd::connect(&h.nbd_socket(), RES)?), "NBD"))
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        match self {
            Sink::Device(f) => Ok(f.write_all_at(data, off)?),
            Sink::Nbd(n) => n.write(off, data),
        }
    }

    /// Makes the writes durable (fsync of the device is a FLUSH to the log).
    fn flush(&mut self) -> Result<()> {
        match self {
            Sink::Device(f) => Ok(f.sync_all()?),
            Sink::Nbd(n) => n.flush(),
        }
    }
}

/// Writes `round` into every chunk `≡ class (mod STRIDE)` on host `h` and flushes; returns
/// the bytes and how they travelled.
fn write_round(
    h: &Host,
    image: &mut Image,
    round: u32,
    class: usize,
) -> Result<(u64, &'static str)> {
    let (mut sink, via) = Sink::open(h)?;
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    for i in (class..image.chunks()).step_by(STRIDE) {
        check_interrupted()?;
        fill(round, i, &mut buf);
        sink.write(offset(i), &buf)?;
        image.record(i, round);
        n += CHUNK as u64;
    }
    sink.flush()?;
    println!(
        "{} wrote {} (every {STRIDE}th MiB) and flushed",
        h.name,
        format_size(n)
    );
    Ok((n, via))
}

/// Waits until `cond()` holds, at most the demo's timeout.
fn wait_until(cl: &Cluster, what: &str, mut cond: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > cl.timeout {
            bail!("timed out waiting until {what}");
        }
        pause(Duration::from_millis(100))?;
    }
    Ok(start.elapsed())
}

fn view_value(h: &Host, mac: &str) -> String {
    h.adm_quiet(&[&format!("view-{mac}"), RES])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(super) fn handover_and_failover(cl: &mut Cluster, image: &mut Image) -> Result<RoleTimes> {
    let timeout = cl.timeout.as_secs().to_string();
    let deadline = || Instant::now() + cl.timeout;

    step("planned handover: beta becomes primary (it replays alpha's last write first)");
    let t = Instant::now();
    cl.hosts[1].adm(&["--timeout", &timeout, "primary", RES])?;
    let handover = t.elapsed();
    let (_, via) = write_round(&cl.hosts[1], image, ROUND_HANDOVER, 1)?;
    wait_on(&cl.others(1), deadline(), "uptodate")?;
    cl.hosts[1].adm(&["view", RES])?;
    let v = verify(cl, 1, image)?;
    v.result()?;

    step("failover: gamma stops fetching, beta writes more that only alpha gets, beta dies");
    cl.hosts[2].adm(&["pause-fetch", RES])?;
    let mut lost_image = image.clone();
    let (lost, _) = write_round(&cl.hosts[1], &mut lost_image, ROUND_LOST, 3)?;
    wait_on(&[&cl.hosts[0]], deadline(), "uptodate")?;
    println!("(beta's machine dies: kill -9)");
    cl.hosts[1].kill9();

    step("gamma takes over by force with what it has replayed");
    let t = Instant::now();
    // beta died a moment ago: gamma cannot yet tell it from a silent primary that is ahead,
    // so the demo confirms up front (`--force --force`) instead of waiting for the window.
    cl.hosts[2].adm(&["--timeout", &timeout, "primary", "--force", "--force", RES])?;
    let failover = t.elapsed();
    write_round(&cl.hosts[2], image, ROUND_FAILOVER, 5)?;

    step("beta comes back: its last writes (also on alpha) and gamma's are a split brain");
    let marsd = cl.marsd.clone();
    cl.hosts[1].restart(&marsd, cl.timeout)?;
    // beta finds gamma's history different from its own (and alpha, which followed beta).
    let detected = wait_until(cl, "gamma reports the split brain with beta", || {
        let sb = view_value(&cl.hosts[2], "split-brain");
        sb.contains("[alpha beta]")
    })?;
    cl.hosts[2].adm(&["view", RES])?;

    step("resolution: keep gamma's version; alpha and beta discard theirs and resync");
    let t = Instant::now();
    for h in [0, 1] {
        cl.hosts[h].adm_retrying(&["invalidate", RES], cl.timeout)?;
    }
    wait_on(&cl.others(2), deadline(), "uptodate")?;
    wait_until(cl, "no host reports a split brain", || {
        cl.hosts
            .iter()
            .all(|h| view_value(h, "is-split-brain") == "0")
    })?;
    let resolved = t.elapsed();
    cl.hosts[2].adm(&["view", RES])?;

    step("verifying gamma's device and the other disks, byte for byte");
    let verified = verify(cl, 2, image)?;
    verified.result()?;
    Ok(RoleTimes {
        handover,
        failover,
        detected,
        resolved,
        via,
        verified,
        lost,
    })
}
