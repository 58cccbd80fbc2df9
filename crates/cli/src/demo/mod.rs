//! `marsadm demo`: replication on one machine. Starts three throw-away `marsd` (alpha, beta and
//! gamma on 127.0.0.1, .2 and .3) in one temporary directory, creates resource `demo` on alpha,
//! writes through NBD, lets beta and gamma join and sync while alpha keeps writing, waits until
//! they are up to date, and verifies that the device and both replicas are identical, byte for
//! byte. Then it serves until Ctrl-C (`--exit`: stops at once). Whatever ends it (success, an
//! error, a timeout, Ctrl-C), the daemons are stopped and the temporary directory is removed.
//!
//! Everything is done the way an operator would do it: `marsadm` commands (this very binary,
//! shown as `alpha$ marsadm …`) and a plain NBD client on the daemon's socket. Only the
//! replicas' backing files are read directly: they are the ground truth of replication.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mars_api::{Reply, Request};
use mars_config::{format_size, parse_size};
use xxhash_rust::xxh3::Xxh3;

use crate::{client, Cli};

mod roles;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo (default: a new temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the demo resource (a multiple of 1M, at least 8M).
    #[arg(long, default_value = "256M")]
    size: String,
    /// Stop and clean up after the walkthrough instead of serving until Ctrl-C.
    #[arg(long)]
    exit: bool,
}

/// The demo's hosts and their peer addresses: one loopback address each, as on a network.
const HOSTS: [(&str, &str); 3] = [
    ("alpha", "127.0.0.1"),
    ("beta", "127.0.0.2"),
    ("gamma", "127.0.0.3"),
];
const RES: &str = "demo";
/// Unit of the demo's writes and reads; the device size is a multiple of it.
const CHUNK: usize = 1 << 20;
/// The writes during the sync touch one chunk in this many per pass.
const STRIDE: usize = 8;
/// Pause between two writes during the sync: the writer plays an application writing some
/// 40 MiB/s, not a benchmark starving the sync.
const WRITE_PACE: Duration = Duration::from_millis(25);
/// How long a stopping marsd may take to sync its log and write back before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(60);

pub fn run(cli: &Cli, args: &DemoArgs) -> Result<()> {
    let started = Instant::now();
    let size = demo_size(&args.size)?;
    catch_interrupts()?;
    let dir = DemoDir::new(args.dir.as_deref())?;
    let mut cluster = Cluster::new(dir.path(), Duration::from_secs(cli.timeout))?;
    let result = walkthrough(&mut cluster, size, args.exit, &dir, started);
    if result.is_err() {
        if interrupted() {
            step("interrupted");
        } else {
            // The logs go away with the temporary directory: show what the daemons said.
            cluster.print_log_tails();
        }
    }
    step("stopping marsd on alpha, beta and gamma (each syncs its log and writes back first)");
    cluster.stop();
    let removed = dir.remove();
    result.and(removed)
}

/// The resource size: whole chunks, and enough of them for every pass of the writer.
fn demo_size(s: &str) -> Result<u64> {
    let size = parse_size(s).context("--size")?;
    let chunk = CHUNK as u64;
    if size % chunk != 0 || size < STRIDE as u64 * chunk {
        bail!("--size {s}: the demo needs a multiple of 1M, at least {STRIDE}M");
    }
    Ok(size)
}

/// The steps of the demo, in order; the caller cleans up whatever happens.
fn walkthrough(
    cl: &mut Cluster,
    size: u64,
    exit: bool,
    dir: &DemoDir,
    started: Instant,
) -> Result<()> {
    step(&format!(
        "starting marsd alpha, beta and gamma in {}",
        cl.dir.display()
    ));
    cl.start_all()?;
    println!(
        "(below, `alpha$ marsadm CMD` runs `marsadm --root alpha/root CMD`; paths are relative \
         to {})",
        cl.dir.display()
    );

    step("alpha creates the cluster, beta and gamma join it; alpha creates resource demo");
    create(cl, size)?;

    let mut image = Image::new(size);
    step("writing through NBD on alpha");
    let before = write_before_join(cl.alpha(), &mut image)?;

    step("beta and gamma join resource demo: each starts a full sync from alpha");
    let joined = Instant::now();
    let deadline = joined + cl.timeout;
    join_replicas(cl, size)?;

    step("alpha keeps writing while they sync");
    let during = write_while_syncing(cl, &mut image, joined, deadline)?;

    step("alpha has stopped writing: waiting until beta and gamma are up to date");
    wait_uptodate(cl, deadline)?;
    let times = SyncTimes {
        synced: during.synced,
        uptodate: joined.elapsed(),
    };
    println!(
        "beta and gamma are up to date, {} after join-resource",
        secs(times.uptodate)
    );
    cl.alpha().adm(&["view", RES])?;

    step("verifying alpha's device (read through NBD) and the replicas' disks, byte for byte");
    let verified = verify(cl, 0, &image)?;

    verified.result()?;

    let roles = roles::handover_and_failover(cl, &mut image)?;

    step("summary");
    print_summary(&before, &during.written, &times, size, &verified, started);
    roles.print();

    if exit {
        return Ok(());
    }
    print_usage(cl, dir);
    while !interrupted() {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn step(title: &str) {
    println!("\n==> {title}");
}

// ---------------------------------------------------------------------------------------------
// The walkthrough's steps.

/// alpha creates the cluster (and its CA), beta and gamma join it with one-time tokens from
/// alpha; alpha creates resource `demo` and shows it with its one member.
fn create(cl: &Cluster, size: u64) -> Result<()> {
    let alpha = cl.alpha();
    alpha.adm(&["create-cluster"])?;
    for h in cl.replicas() {
        let token = alpha.adm(&["join-token"])?;
        h.adm(&["join-cluster", &alpha.peer_addr, "--token", token.trim()])?;
    }
    let timeout = cl.timeout.as_secs().to_string();
    for h in &cl.hosts {
        h.adm(&["--timeout", &timeout, "wait-cluster"])?;
    }
    let disk = alpha.new_disk(size)?;
    alpha.adm(&["create-resource", RES, path_arg(&disk)?])?;
    alpha.adm(&["view", RES])?;
    Ok(())
}

/// What one writer wrote, for the summary.
#[derive(Debug, Default)]
struct Written {
    bytes: u64,
    passes: u32,
    elapsed: Duration,
}

/// Fills the first half of the device (round 1), then flushes.
fn write_before_join(alpha: &Host, image: &mut Image) -> Result<Written> {
    let start = Instant::now();
    let mut nbd = Nbd::connect(&alpha.nbd_socket(), RES)?;
    let chunks: Vec<usize> = (0..image.chunks() / 2).collect();
    let bytes = write_chunks(&mut nbd, image, 1, &chunks, Duration::ZERO)?;
    nbd.flush()?;
    let w = Written {
        bytes,
        passes: 1,
        elapsed: start.elapsed(),
    };
    println!(
        "wrote {} at offset 0 and flushed, in {} ({})",
        format_size(w.bytes),
        secs(w.elapsed),
        rate(w.bytes, w.elapsed)
    );
    Ok(w)
}

/// Writes `round`'s data into `chunks`, pausing `pace` after each write; returns the bytes.
fn write_chunks(
    nbd: &mut Nbd,
    image: &mut Image,
    round: u32,
    chunks: &[usize],
    pace: Duration,
) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    for &i in chunks {
        check_interrupted()?;
        fill(round, i, &mut buf);
        nbd.write(offset(i), &buf)?;
        image.record(i, round);
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
    }
    Ok((chunks.len() * CHUNK) as u64)
}

/// beta and gamma join the resource on fresh, all-zero disks.
fn join_replicas(cl: &Cluster, size: u64) -> Result<()> {
    for h in cl.replicas() {
        let disk = h.new_disk(size)?;
        // The resource reaches the replicas with the replicated metadata: fetch it now instead
        // of waiting for the next round.
        h.adm(&["update-cluster"])?;
        h.adm_retrying(&["join-resource", RES, path_arg(&disk)?], cl.timeout)?;
    }
    Ok(())
}

/// How long replication took, from the first join-resource.
struct SyncTimes {
    /// Until both replicas were consistent (full sync done).
    synced: Duration,
    /// Until both had also replayed every write (the writer stopped after the syncs).
    uptodate: Duration,
}

struct DuringSync {
    written: Written,
    /// From the first join-resource until both syncs were done.
    synced: Duration,
}

/// While beta and gamma sync, a second thread writes pass after pass on alpha; this thread shows
/// the progress and waits for the syncs to finish, then stops the writer.
fn write_while_syncing(
    cl: &Cluster,
    image: &mut Image,
    joined: Instant,
    deadline: Instant,
) -> Result<DuringSync> {
    let stop = AtomicBool::new(false);
    let socket = cl.alpha().nbd_socket();
    std::thread::scope(|s| {
        let writer = s.spawn(|| write_passes(&socket, image, &stop, deadline));
        let watched = watch_sync(cl, deadline);
        let synced = joined.elapsed();
        stop.store(true, Ordering::Relaxed);
        let written = writer
            .join()
            .map_err(|_| anyhow!("the writer thread panicked"))?;
        watched?;
        let w = written?;
        println!(
            "beta and gamma finished their full sync {} after join-resource; meanwhile alpha \
             wrote {} in {} (every {STRIDE}th MiB, a different one each pass)",
            secs(synced),
            format_size(w.bytes),
            match w.passes {
                1 => "1 pass".to_string(),
                n => format!("{n} passes"),
            },
        );
        Ok(DuringSync { written: w, synced })
    })
}

/// Writes a new round into one chunk in [`STRIDE`] per pass, a different one each pass (so that
/// the device is overwritten all over, ahead of and behind the syncs), until `stop` is set at
/// the end of a pass or the deadline passes; flushes after each pass.
fn write_passes(
    socket: &Path,
    image: &mut Image,
    stop: &AtomicBool,
    deadline: Instant,
) -> Result<Written> {
    let start = Instant::now();
    let mut nbd = Nbd::connect(socket, RES)?;
    let mut w = Written::default();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let class = (2 + 3 * w.passes as usize) % STRIDE;
        let chunks: Vec<usize> = (class..image.chunks()).step_by(STRIDE).collect();
        // Round 1 was the first half; the passes are rounds 2, 3, …
        w.bytes += write_chunks(&mut nbd, image, w.passes + 2, &chunks, WRITE_PACE)?;
        nbd.flush()?;
        w.passes += 1;
    }
    w.elapsed = start.elapsed();
    Ok(w)
}

/// Shows `view demo` on beta (its sync, fetch and replay lines) and then on alpha (every
/// member), then waits until both replicas have finished their full sync. The pauses before
/// the views end early once the syncs are done, so that they do not count as sync time.
fn watch_sync(cl: &Cluster, deadline: Instant) -> Result<()> {
    pause_while_syncing(cl, Duration::from_millis(300))?;
    cl.hosts[1].adm(&["view", RES])?;
    pause_while_syncing(cl, Duration::from_millis(700))?;
    cl.alpha().adm(&["view", RES])?;
    wait_for(cl, deadline, "sync")
}

/// Waits until beta and gamma have replayed everything alpha wrote.
fn wait_uptodate(cl: &Cluster, deadline: Instant) -> Result<()> {
    wait_for(cl, deadline, "uptodate")
}

/// `wait-resource demo COND` on beta and gamma at once (a sequential wait would add the
/// primary's confirmation interval once per replica), within the deadline.
fn wait_for(cl: &Cluster, deadline: Instant, cond: &str) -> Result<()> {
    wait_on(&cl.replicas(), deadline, cond)
}

/// `wait-resource demo COND` on `hosts` at once, within the deadline.
fn wait_on(hosts: &[&Host], deadline: Instant, cond: &str) -> Result<()> {
    let timeout = secs_left(deadline);
    let args = ["--timeout", &timeout, "wait-resource", RES, cond];
    for h in hosts {
        h.show(&args);
    }
    let outputs: Vec<Result<Output>> = std::thread::scope(|s| {
        let waits: Vec<_> = hosts
            .iter()
            .map(|h| s.spawn(move || h.adm_quiet(&args)))
            .collect();
        waits
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| bail!("a wait panicked")))
            .collect()
    });
    for (h, out) in hosts.iter().zip(outputs) {
        h.printed(&args, out?).with_context(|| {
            format!(
                "{} did not reach {cond} within the demo's --timeout (raise it for a large \
                 --size)",
                h.name
            )
        })?;
    }
    Ok(())
}

/// Sleeps up to `d`, less once no replica is syncing any more.
fn pause_while_syncing(cl: &Cluster, d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end && cl.replicas().iter().any(|h| h.syncing()) {
        pause(Duration::from_millis(50))?;
    }
    Ok(())
}

/// Whole seconds until `deadline`, at least 1, as a `--timeout` argument.
fn secs_left(deadline: Instant) -> String {
    let left = deadline.saturating_duration_since(Instant::now());
    left.as_secs().max(1).to_string()
}

// ---------------------------------------------------------------------------------------------
// Verification.

/// One copy of the device and how it compared.
struct Compared {
    host: &'static str,
    what: String,
    /// What it was compared against.
    against: &'static str,
    hash: Xxh3,
    differing_chunks: u64,
    first_difference: Option<u64>,
}

impl Compared {
    fn new(host: &'static str, what: String, against: &'static str) -> Compared {
        Compared {
            host,
            what,
            against,
            hash: Xxh3::new(),
            differing_chunks: 0,
            first_difference: None,
        }
    }

    /// Adds the chunk at `offset`, which should equal `want`.
    fn update(&mut self, offset: u64, have: &[u8], want: &[u8]) {
        self.hash.update(have);
        if have != want {
            self.differing_chunks += 1;
            if self.first_difference.is_none() {
                let i = have.iter().zip(want).position(|(a, b)| a != b);
                self.first_difference = Some(offset + i.unwrap_or(0) as u64);
            }
        }
    }

    fn verdict(&self) -> String {
        match self.first_difference {
            None => format!("identical to {}", self.against),
            Some(at) => format!(
                "DIFFERS from {} in {} of its MiB, the first at byte {at}",
                self.against, self.differing_chunks
            ),
        }
    }
}

struct Verification {
    size: u64,
    copies: Vec<Compared>,
    elapsed: Duration,
}

impl Verification {
    fn ok(&self) -> bool {
        self.copies.iter().all(|c| c.first_difference.is_none())
    }

    /// The demo's exit status: an error unless every copy is identical.
    fn result(&self) -> Result<()> {
        if !self.ok() {
            bail!("verification failed: the copies of resource demo differ (see above)");
        }
        Ok(())
    }
}

/// Reads alpha's device through NBD and the replicas' disks chunk by chunk: alpha's device must
/// hold what was written, each replica what alpha's device holds. Prints a checksum per copy.
fn verify(cl: &Cluster, primary: usize, image: &Image) -> Result<Verification> {
    let start = Instant::now();
    let p = &cl.hosts[primary];
    let mut nbd = Nbd::connect(&p.nbd_socket(), RES)?;
    if nbd.size != image.size() {
        bail!(
            "{} exports {} bytes, the demo created {}",
            p.name,
            nbd.size,
            image.size()
        );
    }
    let mut disks = Vec::new();
    let mut copies = vec![Compared::new(
        p.name,
        "device, read through NBD".into(),
        "what was written",
    )];
    for (i, h) in cl.hosts.iter().enumerate() {
        if i == primary {
            continue;
        }
        let disk = h.disk();
        disks.push(File::open(&disk).with_context(|| format!("open {}", disk.display()))?);
        copies.push(Compared::new(h.name, cl.relative(&disk), p.against()));
    }
    let (mut device, mut want, mut replica) =
        (vec![0u8; CHUNK], vec![0u8; CHUNK], vec![0u8; CHUNK]);
    for i in 0..image.chunks() {
        check_interrupted()?;
        nbd.read(offset(i), &mut device)?;
        image.expected(i, &mut want);
        copies[0].update(offset(i), &device, &want);
        for (f, copy) in disks.iter_mut().zip(&mut copies[1..]) {
            f.read_exact(&mut replica)
                .with_context(|| format!("read {}", copy.what))?;
            copy.update(offset(i), &replica, &device);
        }
    }
    for c in &copies {
        println!(
            "{:<6} {:<26} {}  xxh3 {:016x}  {}",
            c.host,
            c.what,
            format_size(image.size()),
            c.hash.digest(),
            c.verdict()
        );
    }
    Ok(Verification {
        size: image.size(),
        copies,
        elapsed: start.elapsed(),
    })
}

fn print_summary(
    before: &Written,
    during: &Written,
    times: &SyncTimes,
    size: u64,
    v: &Verification,
    started: Instant,
) {
    println!(
        "written through NBD on alpha: {} ({} before the joins at {}, {} during the sync)",
        format_size(before.bytes + during.bytes),
        format_size(before.bytes),
        rate(before.bytes, before.elapsed),
        format_size(during.bytes)
    );
    println!(
        "full sync of beta and gamma: {} ({} each, both at once: {} per replica)",
        secs(times.synced),
        format_size(size),
        rate(size, times.synced)
    );
    println!(
        "up to date, every write replayed: {} after join-resource",
        secs(times.uptodate)
    );
    let verdict = if v.ok() { "all identical" } else { "MISMATCH" };
    println!(
        "verified: {} × {} in {}: {verdict}",
        v.copies.len(),
        format_size(v.size),
        secs(v.elapsed)
    );
    println!("wall time so far: {}", secs(started.elapsed()));
}

/// How to use the running demo.
fn print_usage(cl: &Cluster, dir: &DemoDir) {
    step("use it");
    let alpha = cl.alpha();
    println!("resource demo, primary alpha:");
    println!("  {}", alpha.unix_uri());
    println!("  {}", alpha.tcp_uri());
    println!("  qemu-io -f raw -c 'read -v 0 64' '{}'", alpha.tcp_uri());
    println!("  nbdcopy /some/file '{}'", alpha.unix_uri());
    println!("each host's marsadm:");
    let me = cl.marsadm.display();
    for h in &cl.hosts {
        println!("  {me} --root {} view demo", h.root().display());
    }
    println!("  {me} --root {} log-rotate demo", alpha.root().display());
    let after = match dir {
        DemoDir::Temp(_) => format!("remove {}", cl.dir.display()),
        DemoDir::Kept(_) => format!("keep {}", cl.dir.display()),
    };
    println!("\nthe three marsd keep serving; press Ctrl-C to stop them and {after}");
}

// ---------------------------------------------------------------------------------------------
// What the device must hold.

/// Per chunk, the round of the last write to it (0: never written, all zeros). Each round
/// writes its own pseudo-random data, so a copy that missed a write, or applied two in the
/// wrong order, differs.
#[derive(Clone)]
struct Image {
    rounds: Vec<u32>,
}

impl Image {
    fn new(size: u64) -> Image {
        Image {
            rounds: vec![0; (size / CHUNK as u64) as usize],
        }
    }

    fn size(&self) -> u64 {
        offset(self.rounds.len())
    }

    fn chunks(&self) -> usize {
        self.rounds.len()
    }

    fn record(&mut self, chunk: usize, round: u32) {
        self.rounds[chunk] = round;
    }

    /// The data chunk `chunk` must hold.
    fn expected(&self, chunk: usize, buf: &mut [u8]) {
        match self.rounds[chunk] {
            0 => buf.fill(0),
            round => fill(round, chunk, buf),
        }
    }
}

fn offset(chunk: usize) -> u64 {
    (chunk * CHUNK) as u64
}

/// Round `round`'s data for chunk `chunk`: incompressible and different for every pair, cheap to
/// recompute for verification (splitmix64).
fn fill(round: u32, chunk: usize, buf: &mut [u8]) {
    let mut x = (u64::from(round) << 40) ^ chunk as u64;
    for word in buf.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        word.copy_from_slice(&z.to_le_bytes()[..word.len()]);
    }
}

// ---------------------------------------------------------------------------------------------
// The daemons.

/// The three hosts and where they live.
struct Cluster {
    dir: PathBuf,
    /// This marsadm, run for every command so that the demo shows the real ones.
    marsadm: PathBuf,
    marsd: PathBuf,
    /// `--timeout`: for a daemon to come up, for wait-cluster, and for the whole sync.
    timeout: Duration,
    hosts: Vec<Host>,
}

impl Cluster {
    fn new(dir: &Path, timeout: Duration) -> Result<Cluster> {
        let marsadm = std::env::current_exe().context("cannot find this marsadm")?;
        Ok(Cluster {
            dir: dir.to_path_buf(),
            marsd: marsd_path(),
            marsadm,
            timeout,
            hosts: Vec::new(),
        })
    }

    fn alpha(&self) -> &Host {
        &self.hosts[0]
    }

    fn replicas(&self) -> Vec<&Host> {
        self.hosts[1..].iter().collect()
    }

    /// Every host but `primary`.
    fn others(&self, primary: usize) -> Vec<&Host> {
        self.hosts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != primary)
            .map(|(_, h)| h)
            .collect()
    }

    /// `path` relative to the demo directory, for display.
    fn relative(&self, path: &Path) -> String {
        relative(&self.dir, path)
    }

    fn start_all(&mut self) -> Result<()> {
        if self.dir.join(HOSTS[0].0).exists() {
            bail!(
                "{} already holds a demo; remove it or choose another --dir",
                self.dir.display()
            );
        }
        let mut ports = Ports::new();
        for (name, ip) in HOSTS {
            let h = Host::start(self, name, ip, &mut ports)?;
            self.hosts.push(h);
        }
        Ok(())
    }

    /// SIGTERM to every daemon at once, then waits for each (killing it after [`STOP_GRACE`]).
    fn stop(&mut self) {
        let start = Instant::now();
        for h in &self.hosts {
            h.terminate();
        }
        let deadline = start + STOP_GRACE;
        let mut stopped = 0;
        for h in &mut self.hosts {
            stopped += u32::from(h.reap(deadline));
        }
        if stopped > 0 {
            println!("{stopped} marsd stopped in {}", secs(start.elapsed()));
        }
        unmount_below(&self.dir);
    }

    fn print_log_tails(&self) {
        for h in &self.hosts {
            let log = std::fs::read_to_string(h.log()).unwrap_or_default();
            eprintln!("--- last lines of {}:", self.relative(&h.log()));
            eprintln!("{}", tail(&log, 8));
        }
    }
}

/// Lazily unmounts whatever is still mounted below `dir`: a device's FUSE mount left by a
/// daemon that was killed (the demo kills one on purpose) must not keep the directory busy.
fn unmount_below(dir: &Path) {
    let base = dir.to_string_lossy().into_owned();
    let table = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<String> = table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&base))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: umount2(2) with a valid C string; MNT_DETACH never blocks.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Finds `marsd`: $MARSD, else next to this executable (`target/release/`), else on PATH.
fn marsd_path() -> PathBuf {
    if let Ok(p) = std::env::var("MARSD") {
        return p.into();
    }
    if let Ok(me) = std::env::current_exe() {
        let p = me.with_file_name("marsd");
        if p.exists() {
            return p;
        }
    }
    "marsd".into()
}

/// One host: a marsd with its own directory `DIR/NAME` (root, disk, log).
struct Host {
    name: &'static str,
    base: PathBuf,
    dir: PathBuf,
    marsadm: PathBuf,
    peer_addr: String,
    nbd_port: u16,
    child: Option<Child>,
}

/// How an attempt to start marsd ended.
enum Started {
    Ready,
    /// Another process took one of the ports between our check and marsd's bind.
    PortTaken,
}

impl Host {
    /// Starts marsd for `name` on fresh ports, retrying with new ones if a port is taken.
    fn start(cl: &Cluster, name: &'static str, ip: &str, ports: &mut Ports) -> Result<Host> {
        let base = cl.dir.join(name);
        std::fs::create_dir_all(&base)?;
        let mut h = Host {
            name,
            base,
            dir: cl.dir.clone(),
            marsadm: cl.marsadm.clone(),
            peer_addr: String::new(),
            nbd_port: 0,
            child: None,
        };
        for _ in 0..5 {
            h.peer_addr = format!("{ip}:{}", ports.pick(ip)?);
            h.nbd_port = ports.pick("127.0.0.1")?;
            if let Started::Ready = h.spawn(&cl.marsd, cl.timeout)? {
                return Ok(h);
            }
        }
        bail!("marsd on {name} found no free ports");
    }

    fn root(&self) -> PathBuf {
        self.base.join("root")
    }

    /// What a replica's disk is compared with when this host is primary.
    fn against(&self) -> &'static str {
        match self.name {
            "alpha" => "alpha's device",
            "beta" => "beta's device",
            _ => "gamma's device",
        }
    }

    /// SIGKILL: the machine dies; nothing is synced or written back.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts marsd again on the same ports (the host keeps its address).
    fn restart(&mut self, marsd: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Started::Ready = self.spawn(marsd, timeout)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("marsd on {} could not get its ports back", self.name);
            }
            pause(Duration::from_millis(100))?;
        }
    }

    fn disk(&self) -> PathBuf {
        self.base.join("demo.img")
    }

    fn log(&self) -> PathBuf {
        self.base.join("marsd.log")
    }

    fn nbd_socket(&self) -> PathBuf {
        self.root().join("nbd.sock")
    }

    fn unix_uri(&self) -> String {
        format!("nbd+unix:///{RES}?socket={}", self.nbd_socket().display())
    }

    fn tcp_uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{RES}", self.nbd_port)
    }

    /// A fresh all-zero (sparse) disk file of `size` bytes.
    fn new_disk(&self, size: u64) -> Result<PathBuf> {
        let disk = self.disk();
        File::create(&disk)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("create {}", disk.display()))?;
        Ok(disk)
    }

    /// Starts marsd on this host's ports and waits until it answers.
    fn spawn(&mut self, marsd: &Path, timeout: Duration) -> Result<Started> {
        let log_path = self.log();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        // Only this attempt's part of the log tells why it failed.
        let log_start = log.metadata()?.len() as usize;
        let nbd_listen = format!("127.0.0.1:{}", self.nbd_port);
        let root = self.root();
        let device_dir = self.base.join("dev");
        let args = [
            "--root",
            path_arg(&root)?,
            "--host",
            self.name,
            "--listen",
            &self.peer_addr,
            "--nbd-listen",
            &nbd_listen,
            // marsd keeps 1 GiB free by default and drops replicas' logs below that; the demo's
            // few hundred MiB must not fail on a small /tmp.
            "--min-free-space",
            "64M",
            // The primary's block device (as root: FUSE + loop) in this host's directory, so
            // that the demo never touches /dev/mars.
            "--device-dir",
            path_arg(&device_dir)?,
        ];
        let shown = display_args(&self.dir, &args);
        let mut cmd = Command::new(marsd);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        own_process_group(&mut cmd);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("cannot start {}", marsd.display()))?,
        );
        let started = self.wait_ready(timeout, log_start)?;
        if let Started::Ready = started {
            println!("{}: marsd {shown}", self.name);
        }
        Ok(started)
    }

    fn wait_ready(&mut self, timeout: Duration, log_start: usize) -> Result<Started> {
        let deadline = Instant::now() + timeout;
        loop {
            if client::call(&self.root(), &Request::Ping, Duration::from_secs(2)).is_ok() {
                return Ok(Started::Ready);
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    let log = std::fs::read_to_string(self.log()).unwrap_or_default();
                    let this_attempt = log.get(log_start..).unwrap_or(&log);
                    if this_attempt.contains("Address already in use") {
                        return Ok(Started::PortTaken);
                    }
                    bail!(
                        "marsd on {} exited with {status}:\n{}",
                        self.name,
                        tail(this_attempt, 10)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("marsd on {} did not come up within --timeout", self.name);
            }
            pause(Duration::from_millis(50))?;
        }
    }

    /// Is the local replica still being synced? Asked directly (not shown); `true` when the
    /// daemon does not say.
    fn syncing(&self) -> bool {
        let req = Request::View {
            res: RES.parse().ok(),
            window: None,
        };
        match client::call(&self.root(), &req, Duration::from_secs(2)) {
            Ok(Reply::View(v)) => v
                .resources
                .first()
                .is_none_or(|r| r.sync.is_some() || !r.consistent),
            _ => true,
        }
    }

    /// Runs `marsadm --root ROOT ARGS…` shown as `NAME$ marsadm ARGS…`, with its output.
    fn adm(&self, args: &[&str]) -> Result<String> {
        self.show(args);
        let out = self.adm_quiet(args)?;
        self.printed(args, out)
    }

    /// Like [`Host::adm`], retrying quietly for up to `timeout` while the command is refused
    /// (e.g. a resource not yet known here).
    fn adm_retrying(&self, args: &[&str], timeout: Duration) -> Result<String> {
        self.show(args);
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.adm_quiet(args)?;
            if out.status.success() || Instant::now() > deadline {
                return self.printed(args, out);
            }
            pause(Duration::from_millis(200))?;
        }
    }

    fn show(&self, args: &[&str]) {
        println!("{}$ marsadm {}", self.name, display_args(&self.dir, args));
    }

    /// Prints a command's output; its error on failure.
    fn printed(&self, args: &[&str], out: Output) -> Result<String> {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{text}");
        if !out.status.success() {
            bail!(
                "{}$ marsadm {} failed: {}",
                self.name,
                display_args(&self.dir, args),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(text)
    }

    fn adm_quiet(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(&self.marsadm);
        cmd.arg("--root").arg(self.root()).args(args);
        output(cmd)
    }

    /// SIGTERM: marsd syncs its log and writes everything back before it exits.
    fn terminate(&self) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child, which is not reaped yet (so the pid is ours).
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }

    /// Waits for the daemon to exit, killing it at `deadline`; `true` if there was one.
    fn reap(&mut self, deadline: Instant) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        while let Ok(None) = c.try_wait() {
            if Instant::now() > deadline {
                eprintln!("marsd on {} did not stop in time; killing it", self.name);
                let _ = c.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.wait();
        true
    }
}

impl Drop for Host {
    /// Only when the demo did not stop the daemon itself (a panic): do not leave it behind.
    fn drop(&mut self) {
        self.terminate();
        self.reap(Instant::now() + STOP_GRACE);
    }
}

/// Runs `cmd` to completion and returns its output; kills it if the demo is interrupted.
fn output(mut cmd: Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    own_process_group(&mut cmd);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Interrupted.into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Children run in their own process group, so that Ctrl-C in the terminal reaches only the
/// demo, which then stops them in order. They start with SIGINT, SIGTERM and SIGHUP unblocked
/// (std passes the demo's blocked mask on to children, and a marsd deaf to SIGTERM cannot be
/// stopped cleanly), and on Linux they get SIGTERM should the demo die without cleaning up.
fn own_process_group(cmd: &mut Command) {
    cmd.process_group(0);
    let set = interrupt_signals();
    // SAFETY: sigprocmask(2) and prctl(2) are async-signal-safe, and the closure neither
    // allocates nor locks (the set is copied in before the fork).
    unsafe {
        cmd.pre_exec(move || {
            if libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            #[cfg(target_os = "linux")]
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Free TCP ports for the daemons, below Linux's ephemeral range (32768–60999) so that no
/// outgoing connection takes one between our check and marsd's bind. The search starts at a
/// point derived from our pid, so that two demos side by side rarely race for the same ports,
/// and never hands out a port twice, not even on another address.
struct Ports {
    next: u16,
    given: HashSet<u16>,
}

const PORT_RANGE: Range<u16> = 20_000..32_000;

impl Ports {
    fn new() -> Ports {
        let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
        Ports {
            next: PORT_RANGE.start + (std::process::id() % span) as u16,
            given: HashSet::new(),
        }
    }

    fn pick(&mut self, ip: &str) -> Result<u16> {
        for _ in PORT_RANGE {
            let port = self.next;
            self.next = if port + 1 < PORT_RANGE.end {
                port + 1
            } else {
                PORT_RANGE.start
            };
            if self.given.insert(port) && TcpListener::bind((ip, port)).is_ok() {
                return Ok(port);
            }
        }
        bail!("no free TCP port on {ip} in {PORT_RANGE:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// The demo directory and display helpers.

enum DemoDir {
    /// Ours: removed at the end.
    Temp(tempfile::TempDir),
    /// Given with --dir: kept.
    Kept(PathBuf),
}

impl DemoDir {
    fn new(dir: Option<&Path>) -> Result<DemoDir> {
        Ok(match dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
                // Absolute, because marsd runs the paths it is given from its own directory.
                DemoDir::Kept(std::fs::canonicalize(d)?)
            }
            None => DemoDir::Temp(tempfile::Builder::new().prefix("mars-demo-").tempdir()?),
        })
    }

    fn path(&self) -> &Path {
        match self {
            DemoDir::Temp(t) => t.path(),
            DemoDir::Kept(p) => p,
        }
    }

    /// Removes a temporary directory (the daemons must be stopped).
    fn remove(self) -> Result<()> {
        if let DemoDir::Temp(t) = self {
            let path = t.path().display().to_string();
            t.close().with_context(|| format!("remove {path}"))?;
            println!("removed {path}");
        }
        Ok(())
    }
}

/// A path as a command argument (the demo's paths are UTF-8 unless --dir is not).
fn path_arg(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn relative(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir).unwrap_or(path).display().to_string()
}

/// Arguments for display: paths inside the demo directory relative to it, quoted if needed.
fn display_args(dir: &Path, args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            let a = relative(dir, Path::new(a));
            if a.contains([' ', '?', '&', '\'']) {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn rate(bytes: u64, d: Duration) -> String {
    let mib = bytes as f64 / (1 << 20) as f64;
    format!("{:.0} MiB/s", mib / d.as_secs_f64().max(1e-3))
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C.

/// Set by the first SIGINT, SIGTERM or SIGHUP; every wait in the demo polls it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Sleeps `d`, returning early with an error on Ctrl-C.
fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

fn interrupt_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset and sigaddset initialise a set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Turns Ctrl-C (and SIGTERM, SIGHUP) into [`INTERRUPTED`], so that every way out of the demo
/// runs its cleanup. The signals are blocked here, before any other thread exists (threads
/// inherit the mask; children get it unblocked, see [`own_process_group`]), and one thread
/// waits for them. A second signal exits at once, for a cleanup that hangs.
fn catch_interrupts() -> Result<()> {
    let set = interrupt_signals();
    // SAFETY: changes only this thread's signal mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        bail!(
            "cannot block SIGINT: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    std::thread::Builder::new()
        .name("demo-signals".into())
        .spawn(|| {
            let set = interrupt_signals();
            let mut sig = 0;
            // SAFETY: waits for one of the blocked signals; both pointers are valid.
            while unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                if INTERRUPTED.swap(true, Ordering::SeqCst) {
                    eprintln!("\nmarsadm demo: interrupted again; exiting without cleanup");
                    std::process::exit(130);
                }
                eprintln!("\nmarsadm demo: interrupted; cleaning up (again to exit at once)");
            }
        })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A minimal NBD client.

/// A synchronous NBD client on the daemon's Unix socket: fixed-newstyle handshake with
/// NBD_OPT_GO, simple replies, one request at a time. Enough for the demo, and no NBD tools
/// need to be installed.
struct Nbd {
    s: UnixStream,
    size: u64,
    cookie: u64,
}

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Client flags: FIXED_NEWSTYLE | NO_ZEROES.
const CLIENT_FLAGS: u32 = 3;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

impl Nbd {
    fn connect(socket: &Path, export: &str) -> Result<Nbd> {
        let s = UnixStream::connect(socket)
            .with_context(|| format!("cannot connect to {}", socket.display()))?;
        // A hanging daemon must not hang the demo.
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_write_timeout(Some(Duration::from_secs(60)))?;
        let mut nbd = Nbd {
            s,
            size: 0,
            cookie: 0,
        };
        nbd.handshake(export)
            .with_context(|| format!("NBD handshake on {}", socket.display()))?;
        Ok(nbd)
    }

    fn handshake(&mut self, export: &str) -> Result<()> {
        let mut hello = [0u8; 18];
        self.s.read_exact(&mut hello)?;
        if be64(&hello) != NBDMAGIC || be64(&hello[8..]) != IHAVEOPT {
            bail!("not a newstyle NBD server");
        }
        self.s.write_all(&CLIENT_FLAGS.to_be_bytes())?;
        let name = export.as_bytes();
        let mut opt = Vec::with_capacity(22 + name.len());
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32 + 6).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        opt.extend_from_slice(&0u16.to_be_bytes()); // no information requests
        self.s.write_all(&opt)?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h)?;
            let (typ, len) = (be32(&h[12..]), be32(&h[16..]));
            if be64(&h) != OPT_REPLY_MAGIC || len > 1 << 16 {
                bail!("bad option reply");
            }
            let mut payload = vec![0u8; len as usize];
            self.s.read_exact(&mut payload)?;
            match typ {
                REP_ACK => break,
                REP_INFO if payload.len() >= 10 && payload[..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(be64(&payload[2..]));
                }
                t if t & 0x8000_0000 != 0 => bail!(
                    "export {export} refused ({t:#x}): {}",
                    String::from_utf8_lossy(&payload)
                ),
                _ => {}
            }
        }
        self.size = size.context("the server sent no export size")?;
        Ok(())
    }

    fn send(&mut self, typ: u16, offset: u64, len: usize, data: &[u8]) -> Result<()> {
        self.cookie += 1;
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&typ.to_be_bytes());
        h[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&(len as u32).to_be_bytes());
        self.s.write_all(&h)?;
        self.s.write_all(data)?;
        Ok(())
    }

    /// Sends a request and reads its simple reply (without a read's data).
    fn request(&mut self, typ: u16, offset: u64, len: usize, data: &[u8]) -> Result<()> {
        self.send(typ, offset, len, data)?;
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        if be32(&r) != SIMPLE_REPLY_MAGIC || be64(&r[8..]) != self.cookie {
            bail!("bad NBD reply");
        }
        match be32(&r[4..]) {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(e as i32))
                .with_context(|| format!("NBD request {typ} at {offset}")),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.request(CMD_WRITE, offset, data.len(), data)
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.request(CMD_READ, offset, buf.len(), &[])?;
        self.s.read_exact(buf)?;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, &[])
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        // A polite goodbye; the server copes without one too.
        let _ = self.send(CMD_DISC, 0, 0, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(demo_size("256M").unwrap(), 256 << 20);
        assert_eq!(demo_size("8M").unwrap(), 8 << 20);
        for bad in ["4M", "10000K", "lots"] {
            assert!(demo_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_expects_the_last_round_written() {
        let mut img = Image::new(16 << 20);
        assert_eq!((img.chunks(), img.size()), (16, 16 << 20));
        let (mut got, mut want) = (vec![1u8; CHUNK], vec![0u8; CHUNK]);
        img.expected(3, &mut got);
        assert!(got.iter().all(|b| *b == 0), "never written: zeros");
        img.record(3, 1);
        img.record(3, 4);
        img.expected(3, &mut got);
        fill(4, 3, &mut want);
        assert_eq!(got, want);
        // Rounds and chunks all give different data.
        let mut other = vec![0u8; CHUNK];
        fill(1, 3, &mut other);
        assert_ne!(other, want);
        fill(4, 11, &mut other);
        assert_ne!(other, want);
    }

    #[test]
    fn copies_report_the_first_difference() {
        let mut c = Compared::new("beta", "beta/demo.img".into(), "alpha's device");
        c.update(0, b"abcd", b"abcd");
        assert_eq!(c.verdict(), "identical to alpha's device");
        c.update(4096, b"abXd", b"abcd");
        c.update(8192, b"Xbcd", b"abcd");
        assert_eq!(c.differing_chunks, 2);
        assert_eq!(c.first_difference, Some(4098));
    }

    #[test]
    fn ports_are_never_handed_out_twice() {
        let mut p = Ports::new();
        let a = p.pick("127.0.0.1").unwrap();
        let b = p.pick("127.0.0.1").unwrap();
        assert_ne!(a, b);
        assert!(PORT_RANGE.contains(&a) && PORT_RANGE.contains(&b));
        // The search wraps around at the end of the range.
        p.next = PORT_RANGE.end - 1;
        p.pick("127.0.0.1").unwrap();
        assert!(p.next < PORT_RANGE.end);
    }

    #[test]
    fn commands_are_shown_relative_to_the_demo_dir() {
        let dir = Path::new("/tmp/mars-demo-x");
        assert_eq!(
            display_args(
                dir,
                &["join-resource", "demo", "/tmp/mars-demo-x/beta/demo.img"]
            ),
            "join-resource demo beta/demo.img"
        );
        assert_eq!(display_args(dir, &["a b"]), "'a b'");
        assert_eq!(tail("1\n2\n3\n", 2), "2\n3");
    }
}
