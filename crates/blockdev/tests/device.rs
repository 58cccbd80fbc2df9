//! End-to-end tests: real FUSE mounts and loop devices. They need root, `/dev/fuse` and
//! `/dev/loop-control`, and skip (with a printed reason) otherwise.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mars_blockdev::{cleanup_stale, BlockdevError, Device, DeviceOptions};
use mars_nbd::Export;
use rand::{Rng, RngCore, SeedableRng};

/// An export in memory that counts what happens to it.
struct MemExport {
    data: Mutex<Vec<u8>>,
    size: AtomicU64,
    flushes: AtomicU64,
    writes: AtomicU64,
    zeroes: AtomicU64,
    read_only: bool,
}

impl MemExport {
    fn new(size: u64) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; size as usize]),
            size: AtomicU64::new(size),
            flushes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            read_only: false,
        })
    }

    fn new_read_only(size: u64, fill: u8) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![fill; size as usize]),
            size: AtomicU64::new(size),
            flushes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            read_only: true,
        })
    }

    fn grow(&self, new_size: u64) {
        self.data.lock().unwrap().resize(new_size as usize, 0);
        self.size.store(new_size, Ordering::SeqCst);
    }

    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size.load(Ordering::SeqCst) => {
                Ok(offset as usize..end as usize)
            }
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> io::Result<()> {
        let r = self.range(offset, data.len() as u64)?;
        self.data.lock().unwrap()[r].copy_from_slice(&data);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, _fua: bool) -> io::Result<()> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A page-aligned buffer, as `O_DIRECT` wants.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: len > 0 in all uses.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

fn skip(test: &str) -> bool {
    match mars_blockdev::check_support() {
        Ok(()) => false,
        Err(reason) => {
            eprintln!("SKIP {test}: {reason}");
            true
        }
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mounted(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_str().unwrap();
    text.lines().any(|l| l.split(' ').nth(4) == Some(p))
}

fn backing_file(loop_path: &Path) -> Option<String> {
    let n = loop_path.file_name()?.to_str()?;
    std::fs::read_to_string(format!("/sys/block/{n}/loop/backing_file"))
        .ok()
        .filter(|s| !s.trim().is_empty())
}

fn sys_loop_attr(loop_path: &Path, attr: &str) -> String {
    let n = loop_path.file_name().unwrap().to_str().unwrap();
    std::fs::read_to_string(format!("/sys/block/{n}/loop/{attr}"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Asserts that everything `attach` created for `name` in `dev_dir` is gone.
fn assert_gone(dev_dir: &Path, name: &str, loop_path: &Path) {
    let dev_dir = dev_dir.canonicalize().unwrap();
    assert!(
        dev_dir.join(name).symlink_metadata().is_err(),
        "node left behind"
    );
    let mp = dev_dir.join(format!(".fuse-{name}"));
    assert!(!mounted(&mp), "FUSE mount left behind");
    assert!(!mp.exists(), "mount point left behind");
    let bf = backing_file(loop_path);
    assert!(
        bf.as_deref()
            .is_none_or(|f| !f.contains(&format!(".fuse-{name}"))),
        "loop device still bound: {bf:?}"
    );
}

fn attach(export: Arc<MemExport>, dev_dir: &Path, name: &str) -> Device {
    Device::attach(export, dev_dir, name, &DeviceOptions::default()).expect("attach")
}

#[test]
fn raw_direct_io_roundtrip() {
    if skip("raw_direct_io_roundtrip") {
        return;
    }
    const SIZE: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let export = MemExport::new(SIZE);
    let dev = attach(export.clone(), dir.path(), "raw0");
    assert!(dev.direct_io(), "loop direct I/O not active");
    assert_eq!(sys_loop_attr(&dev.loop_path(), "autoclear"), "1");
    assert_eq!(dev.size(), SIZE);
    assert_eq!(
        std::fs::read_link(dev.node_path()).unwrap(),
        dev.loop_path()
    );

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut expect = vec![0u8; SIZE as usize];
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dev.node_path())
            .unwrap();
        assert_eq!(dev.open_count(), 1, "our own descriptor is counted");
        for _ in 0..300 {
            let blocks = rng.gen_range(1..=64usize);
            let len = blocks * 4096;
            let off = rng.gen_range(0..(SIZE as usize - len) / 512) * 512;
            let mut buf = AlignedBuf::new(len);
            rng.fill_bytes(buf.as_mut());
            f.write_all_at(buf.as_mut(), off as u64).unwrap();
            expect[off..off + len].copy_from_slice(buf.as_mut());
        }
        let before = export.flushes();
        f.sync_all().unwrap();
        assert!(
            export.flushes() > before,
            "fsync of the device did not flush the export"
        );
        // Read back through the device and compare with what we wrote and with the export.
        let mut buf = AlignedBuf::new(1 << 20);
        for off in (0..SIZE).step_by(1 << 20) {
            f.read_exact_at(buf.as_mut(), off).unwrap();
            let r = off as usize..off as usize + (1 << 20);
            assert!(buf.as_mut() == &expect[r], "device read differs at {off}");
        }
    }
    assert!(
        *export.data.lock().unwrap() == expect,
        "export content differs"
    );
    assert_eq!(dev.open_count(), 0);

    // Discard / write-zeroes reach the export as zeroes.
    run(
        "blkdiscard",
        &[
            "-z",
            "-o",
            "1048576",
            "-l",
            "65536",
            dev.loop_path().to_str().unwrap(),
        ],
    );
    assert!(export.data.lock().unwrap()[1 << 20..(1 << 20) + 65536]
        .iter()
        .all(|&b| b == 0));
    assert!(export.zeroes.load(Ordering::SeqCst) > 0);

    let loop_path = dev.loop_path();
    dev.detach().map_err(|e| e.error).unwrap();
    assert_gone(dir.path(), "raw0", &loop_path);
}

#[test]
fn open_count_and_detach_refusal() {
    if skip("open_count_and_detach_refusal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let export = MemExport::new(8 << 20);
    let dev = attach(export, dir.path(), "cnt0");
    assert_eq!(dev.open_count(), 0);
    let a = File::open(dev.loop_path()).unwrap();
    let b = File::open(dev.node_path()).unwrap();
    assert_eq!(dev.open_count(), 2);
    // Another process holding it open counts too.
    let mut child = Command::new("sleep")
        .arg("30")
        .stdin(File::open(dev.loop_path()).unwrap())
        .spawn()
        .unwrap();
    assert_eq!(dev.open_count(), 3);
    let err = dev.detach().expect_err("detach while open must be refused");
    assert!(
        matches!(err.error, BlockdevError::InUse { users: 3, .. }),
        "{err}"
    );
    let dev = *err.device.expect("device handed back");
    // Still fully working.
    let mut buf = [0u8; 512];
    a.read_exact_at(&mut buf, 0).unwrap();
    drop((a, b));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(dev.open_count(), 0);
    let loop_path = dev.loop_path();
    // Dropping an unused device cleans up like detach.
    drop(dev);
    assert_gone(dir.path(), "cnt0", &loop_path);
}

/// mkfs, mount, write, sync (must flush the export), detach refused while mounted, umount,
/// fsck clean, detach.
fn filesystem_roundtrip(fstype: &str, mkfs_args: &[&str], fsck: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let export = MemExport::new(512 << 20);
    let name = format!("fs-{fstype}");
    let dev = attach(export.clone(), dir.path(), &name);
    let node = dev.node_path().to_str().unwrap().to_owned();

    let mut args = mkfs_args.to_vec();
    args.push(&node);
    run(&format!("mkfs.{fstype}"), &args);
    let mnt_path = mnt.path().to_str().unwrap();
    run("mount", &["-t", fstype, &node, mnt_path]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(dev.open_count() >= 1, "mounted filesystem not counted");
        assert!(dev.in_use());

        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut files = Vec::new();
        for i in 0..20 {
            let mut data = vec![0u8; rng.gen_range(1..2_000_000)];
            rng.fill_bytes(&mut data);
            let p = mnt.path().join(format!("file{i}"));
            std::fs::write(&p, &data).unwrap();
            files.push((p, data));
        }
        let before = export.flushes();
        run("sync", &[]);
        let after = export.flushes();
        assert!(
            after > before,
            "sync did not flush the export ({before} -> {after})"
        );
        println!("{fstype}: sync caused {} export flush(es)", after - before);
        for (p, data) in &files {
            assert!(&std::fs::read(p).unwrap() == data);
        }
    }));
    let refused = if result.is_ok() {
        Some(
            dev.detach()
                .expect_err("detach while mounted must be refused"),
        )
    } else {
        None
    };
    run("umount", &[mnt_path]);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    let err = refused.unwrap();
    assert!(matches!(err.error, BlockdevError::InUse { .. }), "{err}");
    let dev = *err.device.unwrap();
    assert_eq!(dev.open_count(), 0, "unmounted filesystem still counted");

    let mut args = fsck.to_vec();
    args.push(&node);
    run(args[0], &args[1..]);

    // Mount again and check the files survived (read from the export through a cold cache).
    run("mount", &["-t", fstype, &node, mnt_path]);
    let n = std::fs::read_dir(mnt.path()).unwrap().count();
    run("umount", &[mnt_path]);
    assert!(n >= 20, "files missing after remount: {n}");

    let loop_path = dev.loop_path();
    dev.detach().map_err(|e| e.error).unwrap();
    assert_gone(dir.path(), &name, &loop_path);
}

#[test]
fn ext4_mkfs_mount_sync_fsck() {
    if skip("ext4_mkfs_mount_sync_fsck") {
        return;
    }
    if !have("mkfs.ext4") {
        eprintln!("SKIP ext4_mkfs_mount_sync_fsck: mkfs.ext4 not installed");
        return;
    }
    filesystem_roundtrip("ext4", &["-F", "-q"], &["fsck.ext4", "-n", "-f"]);
}

#[test]
fn xfs_mkfs_mount_sync_fsck() {
    if skip("xfs_mkfs_mount_sync_fsck") {
        return;
    }
    if !have("mkfs.xfs") || !have("xfs_repair") {
        eprintln!("SKIP xfs_mkfs_mount_sync_fsck: mkfs.xfs / xfs_repair not installed");
        return;
    }
    filesystem_roundtrip("xfs", &["-f", "-q"], &["xfs_repair", "-n"]);
}

#[test]
fn grow_device() {
    if skip("grow_device") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let export = MemExport::new(16 << 20);
    let mut dev = attach(export.clone(), dir.path(), "grow0");
    assert!(dev.grow(8 << 20).is_err(), "shrinking must be refused");
    assert!(
        dev.grow((32 << 20) + 1).is_err(),
        "unaligned size must be refused"
    );
    export.grow(32 << 20);
    dev.grow(32 << 20).unwrap();
    assert_eq!(dev.size(), 32 << 20);
    let out = Command::new("blockdev")
        .args(["--getsize64", dev.loop_path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (32u64 << 20).to_string()
    );
    // The new space is usable.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev.loop_path())
        .unwrap();
    let mut buf = AlignedBuf::new(4096);
    buf.as_mut().fill(0xA5);
    f.write_all_at(buf.as_mut(), (32 << 20) - 4096).unwrap();
    drop(f);
    assert!(export.data.lock().unwrap()[(32 << 20) - 4096..]
        .iter()
        .all(|&b| b == 0xA5));
    let loop_path = dev.loop_path();
    dev.detach().map_err(|e| e.error).unwrap();
    assert_gone(dir.path(), "grow0", &loop_path);
}

#[test]
fn cleanup_after_leaked_device() {
    if skip("cleanup_after_leaked_device") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dev = attach(MemExport::new(8 << 20), dir.path(), "leak0");
    let loop_path = dev.loop_path();
    let node = dev.node_path().to_owned();
    std::mem::forget(dev);
    // A new attach under the same name is refused until cleaned up.
    let again = Device::attach(
        MemExport::new(8 << 20),
        dir.path(),
        "leak0",
        &DeviceOptions::default(),
    );
    assert!(matches!(again, Err(BlockdevError::AlreadyExists(_))));

    let report = cleanup_stale(dir.path()).unwrap();
    println!("{report:?}");
    assert_eq!(report.mounts.len(), 1);
    assert_eq!(report.nodes, vec![node]);
    let n: u32 = loop_path.to_str().unwrap()["/dev/loop".len()..]
        .parse()
        .unwrap();
    // The leaked Device still holds its descriptor of the loop device (a crashed process
    // would not), so the kernel can only mark it for unbinding on that last close.
    assert!(report.loops_unbound.contains(&n) || report.loops_busy.contains(&n));
    let dd = dir.path().canonicalize().unwrap();
    assert!(!mounted(&dd.join(".fuse-leak0")));
    assert!(!dd.join(".fuse-leak0").exists());
    assert_eq!(
        cleanup_stale(dir.path()).unwrap(),
        Default::default(),
        "second run finds nothing"
    );

    // The name is usable again.
    let dev = attach(MemExport::new(8 << 20), dir.path(), "leak0");
    let loop_path = dev.loop_path();
    dev.detach().map_err(|e| e.error).unwrap();
    assert_gone(dir.path(), "leak0", &loop_path);
}

const CRASH_ENV: &str = "MARS_BLOCKDEV_CRASH_CHILD_DIR";

/// Child half of `cleanup_after_crash`: attaches, reports the loop device, and waits to be
/// killed. Does nothing when run normally.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let dev = attach(MemExport::new(8 << 20), &dir, "crash0");
    std::fs::write(dir.join("ready"), dev.loop_path().to_str().unwrap()).unwrap();
    std::thread::sleep(Duration::from_secs(120));
    panic!("crash_child was not killed");
}

/// Runs `crash_child` in `dir`, SIGKILLs it and waits until its loop device auto-cleared;
/// returns that loop device. Left behind: a dead FUSE mount and the node.
fn crash_a_child(dir: &Path) -> PathBuf {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CRASH_ENV, dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let ready = dir.join("ready");
    let start = Instant::now();
    while !ready.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "child did not attach"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let loop_path = PathBuf::from(std::fs::read_to_string(&ready).unwrap());
    std::fs::remove_file(&ready).unwrap();
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();

    // The loop device unbinds itself (AUTOCLEAR, its last opener died).
    let start = Instant::now();
    while backing_file(&loop_path).is_some_and(|f| f.contains(".fuse-crash0")) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "loop device not auto-cleared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    loop_path
}

#[test]
fn cleanup_after_crash() {
    if skip("cleanup_after_crash") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let loop_path = crash_a_child(dir.path());
    let dd = dir.path().canonicalize().unwrap();
    assert!(
        mounted(&dd.join(".fuse-crash0")),
        "expected a stale FUSE mount"
    );
    let report = cleanup_stale(dir.path()).unwrap();
    println!("{report:?}");
    assert_eq!(report.mounts.len(), 1);
    assert_eq!(report.nodes.len(), 1);
    assert_gone(dir.path(), "crash0", &loop_path);
}

#[test]
fn fio_throughput() {
    if skip("fio_throughput") {
        return;
    }
    if !have("fio") {
        eprintln!("SKIP fio_throughput: fio not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let export = MemExport::new(256 << 20);
    // MARS_BLOCKDEV_FIO_THREADS compares FUSE thread counts by hand.
    let threads = std::env::var("MARS_BLOCKDEV_FIO_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(DeviceOptions::default().threads);
    let opts = DeviceOptions {
        threads,
        ..DeviceOptions::default()
    };
    let dev = Device::attach(export.clone(), dir.path(), "fio0", &opts).unwrap();
    println!("fio against /dev/loopN with {threads} FUSE thread(s), in-memory export");
    for (rw, bs) in [("randwrite", "4k"), ("randread", "4k"), ("write", "1M")] {
        let out = Command::new("fio")
            .args([
                "--name=bench",
                &format!("--filename={}", dev.loop_path().display()),
                "--direct=1",
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                "--iodepth=32",
                "--ioengine=libaio",
                "--runtime=5",
                "--time_based",
                "--size=256M",
                "--output-format=terse",
                "--terse-version=3",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Terse v3: field 7/8 = read bw KiB/s, iops; 48/49 = write bw KiB/s, iops.
        let text = String::from_utf8_lossy(&out.stdout);
        let f: Vec<&str> = text.trim().split(';').collect();
        let (bw, iops) = if rw.contains("read") {
            (f[6], f[7])
        } else {
            (f[47], f[48])
        };
        println!("fio {rw} bs={bs} iodepth=32: {iops} IOPS, {bw} KiB/s");
    }
    println!("export saw {} writes", export.writes.load(Ordering::SeqCst));
    dev.detach().map_err(|e| e.error).unwrap();
}

#[test]
fn attach_rejects_bad_input() {
    if skip("attach_rejects_bad_input") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (size, name) in [(1000, "ok"), (0, "ok"), (4096, "../x"), (4096, ".fuse-a")] {
        let r = Device::attach(
            MemExport::new(size),
            dir.path(),
            name,
            &DeviceOptions::default(),
        );
        assert!(r.is_err(), "{size} {name}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "attach left something behind"
    );
}

#[test]
fn read_only_export() {
    if skip("read_only_export") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let export = MemExport::new_read_only(4 << 20, 0x5A);
    let dev = Device::attach(export.clone(), dir.path(), "ro0", &DeviceOptions::default()).unwrap();
    assert!(dev.read_only());
    let mut buf = [0u8; 4096];
    File::open(dev.node_path())
        .unwrap()
        .read_exact_at(&mut buf, 8192)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0x5A));
    let out = Command::new("blockdev")
        .args(["--getro", dev.loop_path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "loop device not read-only"
    );
    // The kernel lets a read-only disk be opened for writing, but refuses the writes.
    if let Ok(f) = OpenOptions::new().write(true).open(dev.loop_path()) {
        assert!(f
            .write_all_at(&[1u8; 4096], 0)
            .and_then(|()| f.sync_all())
            .is_err());
    }
    assert_eq!(export.writes.load(Ordering::SeqCst), 0);
    let loop_path = dev.loop_path();
    dev.detach().map_err(|e| e.error).unwrap();
    assert_gone(dir.path(), "ro0", &loop_path);
}

/// Dropping a device that is still open cuts its user off (I/O errors, like a pulled disk)
/// instead of hanging, and everything disappears once the user lets go.
#[test]
fn drop_while_in_use_cuts_off() {
    if skip("drop_while_in_use_cuts_off") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let export = MemExport::new(4 << 20);
    let dev = attach(export.clone(), dir.path(), "cut0");
    let loop_path = dev.loop_path();
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&loop_path)
        .unwrap();
    let start = Instant::now();
    drop(dev);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "drop took {:?}",
        start.elapsed()
    );
    // The export is no longer referenced by the (stopped) FUSE server.
    assert_eq!(
        Arc::strong_count(&export),
        1,
        "FUSE server still holds the export"
    );
    let mut buf = AlignedBuf::new(4096);
    assert!(
        f.read_exact_at(buf.as_mut(), 0).is_err(),
        "I/O must fail after the cut-off"
    );
    drop(f);
    let start = Instant::now();
    while backing_file(&loop_path).is_some_and(|b| b.contains(".fuse-cut0")) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "loop device not auto-cleared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_gone(dir.path(), "cut0", &loop_path);
}

/// The pre-5.8 setup sequence (LOOP_SET_FD & co.) gives the same device.
#[test]
fn legacy_loop_setup() {
    if skip("legacy_loop_setup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let export = MemExport::new(4 << 20);
    let opts = DeviceOptions {
        legacy_loop_setup: true,
        block_size: 4096,
        ..DeviceOptions::default()
    };
    let dev = Device::attach(export.clone(), dir.path(), "old0", &opts).unwrap();
    assert!(dev.direct_io(), "LOOP_SET_DIRECT_IO did not take");
    assert_eq!(sys_loop_attr(&dev.loop_path(), "autoclear"), "1");
    let out = Command::new("blockdev")
        .args(["--getss", "--getro", dev.loop_path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["4096", "0"]
    );
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev.loop_path())
        .unwrap();
    let mut buf = AlignedBuf::new(8192);
    buf.as_mut().fill(0x3C);
    f.write_all_at(buf.as_mut(), 4096).unwrap();
    drop(f);
    assert!(export.data.lock().unwrap()[4096..12288]
        .iter()
        .all(|&b| b == 0x3C));
    // AUTOCLEAR was set through LOOP_SET_STATUS64: detach (and the crash case) rely on it.
    let loop_path = dev.loop_path();
    dev.detach().map_err(|e| e.error).unwrap();
    assert_gone(dir.path(), "old0", &loop_path);
}

/// What a crash left is replaced by the next attach itself (no `cleanup_stale` first), also
/// when the loop device its node pointed to was reused by somebody else meanwhile (that one is
/// left alone); what is not ours at a device's path is refused and left alone.
#[test]
fn attach_replaces_what_a_crash_left_and_refuses_what_is_not_ours() {
    if skip("attach_replaces_what_a_crash_left_and_refuses_what_is_not_ours") || !have("losetup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let loop_path = crash_a_child(dir.path());
    // The next loop device set up on the machine takes the number.
    let foreign = dir.path().join("foreign.img");
    std::fs::write(&foreign, vec![7u8; 1 << 20]).unwrap();
    // (A test running in parallel may have taken it first: the same case.)
    let took = Command::new("losetup")
        .arg(&loop_path)
        .arg(&foreign)
        .status()
        .is_ok_and(|s| s.success());
    let dd = dir.path().canonicalize().unwrap();
    assert_eq!(std::fs::read_link(dd.join("crash0")).unwrap(), loop_path);
    let dev = Device::attach(
        MemExport::new(8 << 20),
        dir.path(),
        "crash0",
        &DeviceOptions::default(),
    );
    let bound = backing_file(&loop_path);
    if took {
        let _ = Command::new("losetup").arg("-d").arg(&loop_path).status();
    }
    let dev = dev.expect("attach over the leftovers");
    assert_eq!(
        std::fs::read_link(dd.join("crash0")).unwrap(),
        dev.loop_path()
    );
    if took {
        assert_ne!(dev.loop_path(), loop_path);
        assert_eq!(
            bound.as_deref().map(str::trim),
            foreign.canonicalize().unwrap().to_str(),
            "the foreign loop device is left alone"
        );
    }
    let new_loop = dev.loop_path();
    dev.detach().map_err(|e| e.error).unwrap();
    assert_gone(dir.path(), "crash0", &new_loop);

    // Not ours: a file, a link elsewhere. Refused with what it is, left as it was.
    std::fs::write(dd.join("file0"), b"mine").unwrap();
    std::os::unix::fs::symlink("/dev/null", dd.join("link0")).unwrap();
    for (name, what) in [
        ("file0", "a regular file"),
        ("link0", "a symbolic link to /dev/null"),
    ] {
        let r = Device::attach(
            MemExport::new(8 << 20),
            dir.path(),
            name,
            &DeviceOptions::default(),
        );
        match r {
            Err(e @ BlockdevError::Foreign { .. }) => {
                assert!(e.to_string().contains(what), "{e}");
            }
            other => panic!("{name}: {other:?}"),
        }
        assert!(!mounted(&dd.join(format!(".fuse-{name}"))));
    }
    assert_eq!(std::fs::read(dd.join("file0")).unwrap(), b"mine");
    assert_eq!(
        std::fs::read_link(dd.join("link0")).unwrap(),
        Path::new("/dev/null")
    );
    // cleanup_stale leaves them alone too.
    assert_eq!(cleanup_stale(dir.path()).unwrap(), Default::default());
    assert!(dd.join("file0").exists() && dd.join("link0").symlink_metadata().is_ok());
}
