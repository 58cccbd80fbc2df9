//! Helpers shared by the multi-host tests (`cluster`, `replication`, `replication_faults`):
//! waiting, disks of a resource, writes through NBD, comparing replicas, diagnostics.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{random_file, run, Host};

/// A temporary directory named after the test binary (`mars-replication-…`), removed when dropped.
pub fn tmp() -> tempfile::TempDir {
    let exe = std::env::current_exe().expect("current_exe");
    // Test executables are named `NAME-HASH`.
    let stem = exe.file_stem().and_then(|s| s.to_str()).unwrap_or("test");
    let name = stem.rsplit_once('-').map_or(stem, |(name, _)| name);
    crate::tempdir(&format!("mars-{name}-"))
}

/// Waits until `cond` holds, at most `secs`; returns how long it took.
pub fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// A fresh all-zero disk file `RES.img` of `size` bytes next to `h`'s root.
pub fn new_disk(h: &Host, res: &str, size: u64) -> PathBuf {
    let p = h.root.parent().expect("base").join(format!("{res}.img"));
    std::fs::File::create(&p)
        .expect("disk")
        .set_len(size)
        .expect("size");
    p
}

/// Joins `h` to resource `res` with a fresh disk of `size` bytes once `h` knows it; returns the disk.
pub fn join(h: &Host, res: &str, size: u64) -> PathBuf {
    let d = new_disk(h, res, size);
    // The resource may not have reached h's metadata yet.
    eventually(20, "resource visible", || {
        h.marsadm(&["join-resource", res, d.to_str().expect("utf8")])
            .status
            .success()
    });
    d
}

/// Writes `len` random bytes at `offset` through NBD at `uri` (qemu-io), staged in file `src`.
pub fn write_random_uri(uri: &str, src: &Path, offset: u64, len: usize) {
    random_file(src, len);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -s {} {offset} {len}", src.display()))
        .arg(uri));
    std::fs::remove_file(src).expect("remove source");
}

/// Writes `len` random bytes at `offset` of resource `res` through NBD on `h`.
pub fn write_random(h: &Host, res: &str, dir: &Path, offset: u64, len: usize) {
    write_random_uri(
        &h.unix_uri(res),
        &dir.join(format!("src-{offset}")),
        offset,
        len,
    );
}

/// A thread writing random chunks to a resource through NBD (qemu-io, one process per write)
/// until stopped: chunk `i` goes to slot `(7i + 1) mod (size / chunk)`, which strides over the
/// device so that regions are rewritten now and then.
pub struct Writer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// Writes of 1 MiB to `res` on `h`, one after the other without a pause; `dir` holds the
    /// staged source file.
    pub fn start(h: &Host, res: &str, dir: &Path, size: u64) -> Writer {
        Self::start_with(h, res, dir, size, 1 << 20, Duration::ZERO)
    }

    /// Writes of `chunk` bytes with `pause` after each (a pause limits the rate: a backlog
    /// piles up, not gigabytes of logs).
    pub fn start_with(
        h: &Host,
        res: &str,
        dir: &Path,
        size: u64,
        chunk: u64,
        pause: Duration,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let uri = h.unix_uri(res);
        let src = dir.join("writer-src");
        let (s, c) = (stop.clone(), count.clone());
        let slots = size / chunk;
        let handle = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::Acquire) {
                let off = ((i * 7 + 1) % slots) * chunk;
                write_random_uri(&uri, &src, off, chunk as usize);
                i += 1;
                c.store(i, Ordering::Release);
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
        });
        Writer {
            stop,
            count,
            handle: Some(handle),
        }
    }

    /// Writes done so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until at least `n` more writes were done (30 s at most: a deadlock guard).
    pub fn wait_more(&self, n: u64) {
        let want = self.count() + n;
        eventually(30, "background writes", || self.count() >= want);
    }

    /// Stops the thread; returns the number of writes done.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.handle
            .take()
            .expect("thread")
            .join()
            .expect("writer thread");
        self.count()
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

/// Copies a whole random image of `len` bytes onto `res` through NBD on `h` (nbdcopy, parallel).
pub fn fill_random(h: &Host, res: &str, dir: &Path, len: usize) {
    let src = dir.join("fill.img");
    random_file(&src, len);
    run(Command::new("nbdcopy").arg(&src).arg(h.unix_uri(res)));
    std::fs::remove_file(src).expect("remove source");
}

/// Offset of the first differing 4 KiB block of two disks within `size`; `None`: they are equal.
pub fn first_difference(a: &Path, b: &Path, size: u64) -> Option<u64> {
    let mut fa = std::fs::File::open(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let mut fb = std::fs::File::open(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            let blk = (0..n)
                .step_by(4096)
                .find(|&i| {
                    let e = (i + 4096).min(n);
                    ba[i..e] != bb[i..e]
                })
                .expect("a differing block");
            return Some(at + blk as u64);
        }
        at += n as u64;
    }
    None
}

/// `marsadm wait-resource RES uptodate` on `h` within `secs`; panics with its view and log tail.
pub fn wait_uptodate(h: &Host, res: &str, secs: u64) {
    let o = h.marsadm(&[
        "--timeout",
        &secs.to_string(),
        "wait-resource",
        res,
        "uptodate",
    ]);
    assert!(
        o.status.success(),
        "{} not up to date: {}{}\n{}",
        h.name,
        String::from_utf8_lossy(&o.stderr),
        h.ok(&["view", res]),
        tail(&h.log_text(), 60)
    );
}

/// The names of `h`'s logfiles (`log-…`) of resource `res`, sorted.
pub fn logfiles(h: &Host, res: &str) -> Vec<String> {
    let dir = h.root.join(format!("resource-{res}"));
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("log-"))
        .collect();
    v.sort();
    v
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
