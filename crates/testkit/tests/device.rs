//! `/dev/mars/RES` end to end: the primary's local block device (FUSE file behind a direct-I/O
//! loop device), real filesystems on it through handover and failover, fio with verification,
//! and the refusal of a handover while a filesystem is mounted.
//!
//! Each daemon has its own device directory (`BASE/HOST/dev`), so that several daemons on one
//! machine never collide. Needs root, /dev/fuse and loop devices: in CI a missing capability
//! fails, elsewhere the tests are skipped with the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mars_testkit::foreign::{loop_bound, Foreign};
use mars_testkit::repl::{eventually, first_difference, join, tail, tmp, wait_uptodate};
use mars_testkit::{random_file, require, run, Host};

const MIB: u64 = 1 << 20;
/// Device size: mkfs.xfs wants at least 300 MB.
const SIZE: u64 = 320 * MIB;

/// Whether this machine can run the device tests (root, FUSE, loop devices).
fn supported() -> bool {
    let ok = unsafe { libc::geteuid() } == 0
        && Path::new("/dev/fuse").exists()
        && Path::new("/dev/loop-control").exists();
    if !ok {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI must run the device tests as root with /dev/fuse and loop devices"
        );
        eprintln!("SKIP: needs root, /dev/fuse and /dev/loop-control");
    }
    ok
}

/// Lazily unmounts everything still mounted below `base` when dropped (also after a panic),
/// so the temporary directory can go and no stale mount outlives the test.
struct Mounts(PathBuf);

impl Drop for Mounts {
    fn drop(&mut self) {
        let base = self.0.to_string_lossy().into_owned();
        let table = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut points: Vec<String> = table
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|p| p.replace("\\040", " "))
            .filter(|p| p.starts_with(&base))
            .collect();
        // Deepest first: a filesystem on the device before the device's FUSE mount.
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
    }
}

fn host(t: &Path, name: &str, ip: &str) -> Host {
    Host::start_with_env(t, name, ip, &[("MARS_DEVICE", "fuse-loop")])
}

/// Primary `a` and secondary `b` of resource `r`, in sync; `a` serves `/…/a/dev/r`.
fn pair(t: &Path) -> (Host, Host, PathBuf, PathBuf) {
    let a = host(t, "a", "127.0.0.1");
    let b = host(t, "b", "127.0.0.2");
    let da = a.create_resource("r", SIZE);
    b.join(&a);
    for h in [&a, &b] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    let db = join(&b, "r", SIZE);
    wait_uptodate(&b, "r", 60);
    (a, b, da, db)
}

fn device(h: &Host) -> PathBuf {
    let mut dev = None;
    eventually(30, "the device appears", || {
        dev = h.device("r");
        dev.as_ref().is_some_and(|d| d.exists())
    });
    dev.expect("device")
}

fn mkfs(fs: &str, dev: &Path) {
    let mut c = Command::new(format!("mkfs.{fs}"));
    match fs {
        // 4 KiB blocks, as on real volumes: with the 1 KiB blocks mkfs picks for small devices
        // the reserved group descriptors do not cover an online grow by half.
        "ext4" => c.args(["-q", "-F", "-b", "4096"]),
        _ => c.args(["-q", "-f"]),
    };
    run(c.arg(dev));
}

fn mount(dev: &Path, at: &Path) {
    std::fs::create_dir_all(at).expect("mountpoint");
    run(Command::new("mount").arg(dev).arg(at));
}

fn umount(at: &Path) {
    run(Command::new("umount").arg(at));
}

/// A tree of random files under `dir` (`n` files in a few subdirectories).
fn write_tree(dir: &Path, tag: &str, n: usize) {
    for i in 0..n {
        let sub = dir.join(format!("{tag}-{}", i % 4));
        std::fs::create_dir_all(&sub).expect("mkdir");
        random_file(&sub.join(format!("f{i}")), 4096 * (1 + i % 37));
    }
}

/// Path → xxh3 of the content, for every file below `dir`.
fn manifest(dir: &Path) -> BTreeMap<String, u128> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, u128>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                if e.file_name() != "lost+found" {
                    walk(base, &p, out);
                }
            } else {
                let data = std::fs::read(&p).expect("read");
                let rel = p.strip_prefix(base).expect("below").display().to_string();
                out.insert(rel, xxhash_rust::xxh3::xxh3_128(&data));
            }
        }
    }
    let mut m = BTreeMap::new();
    walk(dir, dir, &mut m);
    m
}

/// `fsck -n` of a filesystem image (a replica's disk file): clean.
fn fsck_clean(fs: &str, img: &Path) {
    let out = match fs {
        "ext4" => Command::new("e2fsck").args(["-n", "-f"]).arg(img).output(),
        _ => Command::new("xfs_repair")
            .args(["-n", "-f"])
            .arg(img)
            .output(),
    }
    .expect("fsck");
    assert!(
        out.status.success(),
        "fsck of {} ({fs}) not clean: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_equal(a: &Path, b: &Path, ha: &Host, hb: &Host) {
    if let Some(at) = first_difference(a, b, SIZE) {
        panic!(
            "disks differ at {at}\n{}\n{}\n{}",
            ha.ok(&["view", "r"]),
            hb.ok(&["view", "r"]),
            tail(&hb.log_text(), 30)
        );
    }
}

/// A filesystem made on a's device survives a planned handover to b and a failover back to a;
/// every replica is clean and equal after convergence.
fn filesystem_through_handover_and_failover(fs: &str) {
    if !supported() || !require(&format!("mkfs.{fs}")) {
        return;
    }
    let t = tmp();
    let _m = Mounts(t.path().to_path_buf());
    let (mut a, mut b, da, db) = pair(t.path());
    let mnt = t.path().join("mnt");

    // On a: filesystem, a file tree, sync, umount.
    let dev_a = device(&a);
    assert!(
        dev_a.starts_with(t.path().join("a").join("dev")),
        "{dev_a:?}"
    );
    mkfs(fs, &dev_a);
    mount(&dev_a, &mnt);
    write_tree(&mnt, "first", 40);
    run(&mut Command::new("sync"));
    let m1 = manifest(&mnt);
    umount(&mnt);

    // Planned handover: the tree is identical on b.
    b.ok(&["--timeout", "60", "primary", "r"]);
    eventually(30, "a's device gone", || {
        a.device("r").is_none() && !dev_a.exists()
    });
    let dev_b = device(&b);
    mount(&dev_b, &mnt);
    assert_eq!(manifest(&mnt), m1, "the tree after the handover");
    write_tree(&mnt, "second", 30);
    run(&mut Command::new("sync"));
    let m2 = manifest(&mnt);
    umount(&mnt);
    wait_uptodate(&a, "r", 60);
    eventually(30, "b written back", || {
        b.view("diskstate", "r") == "UpToDate"
    });
    assert_equal(&db, &da, &b, &a);
    fsck_clean(fs, &da);

    // Failover: b dies, a takes over with what it has (everything: it was up to date).
    b.kill9();
    a.ok(&["pause-fetch", "r"]);
    a.ok(&["--timeout", "30", "primary", "--force", "--force", "r"]);
    let dev_a = device(&a);
    mount(&dev_a, &mnt);
    assert_eq!(manifest(&mnt), m2, "the tree after the failover");
    write_tree(&mnt, "third", 10);
    run(&mut Command::new("sync"));
    umount(&mnt);
    // b comes back as a secondary of the same history and catches up.
    b.start_again();
    wait_uptodate(&b, "r", 60);
    eventually(30, "a written back", || {
        a.view("diskstate", "r") == "UpToDate"
    });
    assert_equal(&da, &db, &a, &b);
    fsck_clean(fs, &db);
    assert_eq!(b.view("is-split-brain", "r"), "0");
    a.stop();
    b.stop();
}

#[test]
fn ext4_through_handover_and_failover() {
    filesystem_through_handover_and_failover("ext4");
}

#[test]
fn xfs_through_handover_and_failover() {
    filesystem_through_handover_and_failover("xfs");
}

#[test]
fn handover_is_refused_while_a_filesystem_is_mounted() {
    if !supported() || !require("mkfs.ext4") {
        return;
    }
    let t = tmp();
    let _m = Mounts(t.path().to_path_buf());
    let (mut a, mut b, da, db) = pair(t.path());
    let mnt = t.path().join("mnt");
    let dev = device(&a);
    mkfs("ext4", &dev);
    mount(&dev, &mnt);
    // A writer keeps a file open on the mounted filesystem.
    let mut f = std::fs::File::create(mnt.join("open-file")).expect("create");
    std::io::Write::write_all(&mut f, &[1u8; 65536]).expect("write");
    f.sync_all().expect("fsync");
    eventually(10, "a reports the open device", || {
        a.view("device-opened", "r") != "0"
    });
    let msg = b.refused(&["--timeout", "3", "primary", "r"]);
    assert!(msg.contains("in use on a"), "{msg}");
    // b's copy of a's report may still predate the mount: then b designated itself, a
    // refused to leave, and b put the designation back before answering. a sees that
    // designation a moment later (RemainsPrimary until then).
    assert_eq!(b.view("primarynode", "r"), "a");
    eventually(10, "a is the designated primary again", || {
        a.view("role", "r") == "Primary"
    });
    // Nothing changed: the file still takes writes.
    std::io::Write::write_all(&mut f, &[2u8; 65536]).expect("write after the refusal");
    f.sync_all().expect("fsync");
    drop(f);
    let m = manifest(&mnt);
    umount(&mnt);
    b.ok(&["--timeout", "60", "primary", "r"]);
    let devb = device(&b);
    mount(&devb, &mnt);
    assert_eq!(manifest(&mnt), m);
    umount(&mnt);
    wait_uptodate(&a, "r", 60);
    eventually(30, "b written back", || {
        b.view("diskstate", "r") == "UpToDate"
    });
    assert_equal(&db, &da, &b, &a);
    a.stop();
    b.stop();
}

#[test]
fn fio_verify_on_the_device_then_replicas_equal() {
    if !supported() || !require("fio") {
        return;
    }
    let t = tmp();
    let _m = Mounts(t.path().to_path_buf());
    let (mut a, mut b, da, db) = pair(t.path());
    let dev = device(&a);
    for (name, rw, bs) in [("rand4k", "randwrite", "4k"), ("seq1m", "write", "1M")] {
        let out = Command::new("fio")
            .args([
                &format!("--name={name}"),
                &format!("--filename={}", dev.display()),
                "--direct=1",
                "--ioengine=libaio",
                "--iodepth=16",
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                "--size=32M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            ])
            // fio saves its verify state in the working directory: keep it out of the tree.
            .current_dir(t.path())
            .output()
            .expect("fio");
        assert!(
            out.status.success(),
            "fio {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_uptodate(&b, "r", 60);
    eventually(30, "a written back", || {
        a.view("diskstate", "r") == "UpToDate"
    });
    assert_equal(&da, &db, &a, &b);
    // The device's users are counted: none now.
    assert_eq!(a.view("device-opened", "r"), "0");
    std::thread::sleep(Duration::from_millis(10));
    a.stop();
    b.stop();
}

/// `resize` with a filesystem on the device: the disks grow, `marsadm resize` grows the
/// resource, the device follows, the filesystem is grown (xfs online, ext4 offline),
/// and after a handover the other host mounts the grown filesystem with every file.
fn resize_grow_with(fs: &str) {
    if !supported() || !require(&format!("mkfs.{fs}")) {
        return;
    }
    let grow_tool = if fs == "ext4" {
        "resize2fs"
    } else {
        "xfs_growfs"
    };
    if !require(grow_tool) {
        return;
    }
    let t = tmp();
    let _m = Mounts(t.path().to_path_buf());
    let (a, b, da, db) = pair(t.path());
    let mnt = t.path().join("mnt");
    let dev = device(&a);
    mkfs(fs, &dev);
    mount(&dev, &mnt);
    write_tree(&mnt, "before", 20);
    // Both disks grow by half; the resource follows the smallest.
    let bigger = SIZE + SIZE / 2;
    for d in [&da, &db] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(d)
            .unwrap()
            .set_len(bigger)
            .unwrap();
    }
    eventually(20, "b reports its grown disk", || {
        a.marsadm(&["resize", "r"]).status.success()
    });
    assert_eq!(a.view("size", "r"), bigger.to_string());
    eventually(20, "the device grew", || {
        let o = Command::new("blockdev")
            .arg("--getsize64")
            .arg(&dev)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim() == bigger.to_string()
    });
    match fs {
        // Offline: this machine's kernel refuses ext4 online resizing with EPERM even on a plain
        // loop device (checked by hand), so grow it unmounted, as on kernels without it.
        "ext4" => {
            umount(&mnt);
            run(Command::new("e2fsck").args(["-f", "-y"]).arg(&dev));
            run(Command::new("resize2fs").arg(&dev));
            mount(&dev, &mnt);
        }
        _ => {
            run(Command::new("xfs_growfs").arg(&mnt));
        }
    }
    write_tree(&mnt, "after", 20);
    run(&mut Command::new("sync"));
    let m = manifest(&mnt);
    umount(&mnt);
    // b syncs the new region first (once it learned the new size); a handover waits for a
    // consistent replica.
    eventually(30, "b knows the new size", || {
        b.view("size", "r") == bigger.to_string()
    });
    wait_uptodate(&b, "r", 60);
    b.ok(&["--timeout", "60", "primary", "r"]);
    let devb = device(&b);
    mount(&devb, &mnt);
    assert_eq!(manifest(&mnt), m, "the tree after resize and handover");
    let df = String::from_utf8_lossy(
        &Command::new("df")
            .args(["-B1", "--output=size"])
            .arg(&mnt)
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    let fs_size: u64 = df.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(
        fs_size > SIZE,
        "the filesystem on b is the grown one: {fs_size}"
    );
    umount(&mnt);
    let (mut a, mut b) = (a, b);
    a.stop();
    b.stop();
}

#[test]
fn resize_grow_with_ext4() {
    resize_grow_with("ext4");
}

#[test]
fn resize_grow_with_xfs_online() {
    resize_grow_with("xfs");
}

/// The loop device behind a host's `DEVICE_DIR/r` (the symlink's target), e.g. `/dev/loop3`.
fn loop_of(dev: &Path) -> PathBuf {
    std::fs::read_link(dev).unwrap_or_else(|e| panic!("{}: {e}", dev.display()))
}

/// What an operator does after `marsd` died under a mounted filesystem: a lazy unmount, then
/// the loop device detached (its autoclear releases it once the filesystem is gone). Returns
/// once the loop device is free, then hands its number to somebody else (the next loop device
/// set up on the machine).
fn operator_cleanup(mnt: &Path, lo: &Path, dir: &Path) -> Foreign {
    run(Command::new("umount").arg("-l").arg(mnt));
    eventually(30, "the crashed daemon's loop device is released", || {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(lo)
            .stderr(std::process::Stdio::null())
            .status();
        !loop_bound(lo)
    });
    Foreign::take(lo, dir)
}

/// `e2fsck -n -f` of the device: clean.
fn fsck_device(dev: &Path) {
    fsck_clean("ext4", dev);
}

/// Issue 17: `marsd` killed on the primary while ext4 on its device is mounted, the operator
/// cleans up (lazy umount, loop detached) and the loop number goes to somebody else. The
/// restarted daemon serves the device again (it replaces its stale link, leaves the foreign
/// loop device alone), both when it takes up the primary role again at once and when it
/// returns after a failover and gets the role back by a handover. Each time the filesystem
/// mounts with every file and is clean.
#[test]
fn device_comes_back_after_marsd_crash_with_a_mounted_filesystem() {
    if !supported() || !require("mkfs.ext4") || !require("losetup") {
        return;
    }
    let t = tmp();
    let _m = Mounts(t.path().to_path_buf());
    let start = std::time::Instant::now();
    let step = |what: &str| eprintln!("{:>6.1}s {what}", start.elapsed().as_secs_f64());
    let (mut a, mut b, _da, _db) = pair(t.path());
    let mnt = t.path().join("mnt");
    let dev_a = device(&a);
    step("pair up");
    mkfs("ext4", &dev_a);
    mount(&dev_a, &mnt);
    write_tree(&mnt, "first", 20);
    run(&mut Command::new("sync"));
    let m1 = manifest(&mnt);
    wait_uptodate(&b, "r", 60);

    // 1. Crash while mounted; a is still the designated primary and takes the role up again.
    let lo = loop_of(&dev_a);
    a.kill9();
    let foreign = operator_cleanup(&mnt, &lo, t.path());
    step("1: crashed, cleaned up, loop number reused");
    a.start_again();
    let dev_a = device(&a);
    assert_ne!(
        loop_of(&dev_a),
        lo,
        "the foreign loop device is not taken over"
    );
    assert!(loop_bound(&lo), "the foreign loop device is left alone");
    mount(&dev_a, &mnt);
    assert_eq!(manifest(&mnt), m1, "the tree after the crash");
    write_tree(&mnt, "second", 10);
    run(&mut Command::new("sync"));
    let m2 = manifest(&mnt);
    wait_uptodate(&b, "r", 60);
    drop(foreign);
    step("1: device back");

    // 2. Crash while mounted again; failover to b; a returns and gets the role back.
    let lo = loop_of(&dev_a);
    a.kill9();
    let _foreign = operator_cleanup(&mnt, &lo, t.path());
    step("2: crashed, cleaned up, loop number reused");
    b.ok(&["pause-fetch", "r"]);
    b.ok(&["--timeout", "30", "primary", "--force", "--force", "r"]);
    let dev_b = device(&b);
    mount(&dev_b, &mnt);
    assert_eq!(manifest(&mnt), m2, "the tree after the failover");
    write_tree(&mnt, "third", 10);
    run(&mut Command::new("sync"));
    let m3 = manifest(&mnt);
    umount(&mnt);
    step("2: failed over to b");
    a.start_again();
    eventually(30, "a back as secondary", || {
        a.view("role", "r") == "Secondary"
    });
    // Whatever a's ext4 wrote after b's last fetch (its journal) is a split brain: resolved
    // as an operator would.
    std::thread::sleep(Duration::from_secs(2));
    if a.view("is-split-brain", "r") == "1" {
        a.ok(&["invalidate", "r"]);
    }
    wait_uptodate(&a, "r", 120);
    step("2: a up to date");
    let out = a.ok(&["--timeout", "60", "primary", "r"]);
    assert!(out.contains("primary now"), "{out}");
    let dev_a = device(&a);
    mount(&dev_a, &mnt);
    assert_eq!(manifest(&mnt), m3, "the tree after the handover back");
    umount(&mnt);
    fsck_device(&dev_a);
    step("2: handed back to a");
    // And a planned round trip: b and back to a, the device each time.
    wait_uptodate(&b, "r", 60);
    b.ok(&["--timeout", "60", "primary", "r"]);
    device(&b);
    wait_uptodate(&a, "r", 60);
    a.ok(&["--timeout", "60", "primary", "r"]);
    let dev_a = device(&a);
    mount(&dev_a, &mnt);
    assert_eq!(manifest(&mnt), m3, "the tree after the round trip");
    umount(&mnt);
    step("round trip");
    a.stop();
    b.stop();
}

/// Something that is not marsd's at `DEVICE_DIR/RES`: a handover to that host fails with the
/// reason (the host holds the role and the data, `view` says what is missing), nothing of it is
/// touched, and once it is gone the device comes by itself.
#[test]
fn a_promotion_that_cannot_set_up_its_device_fails_with_the_reason() {
    if !supported() || !require("mkfs.ext4") {
        return;
    }
    let t = tmp();
    let _m = Mounts(t.path().to_path_buf());
    let (mut a, mut b, _da, _db) = pair(t.path());
    let mnt = t.path().join("mnt");
    let dev_a = device(&a);
    mkfs("ext4", &dev_a);
    mount(&dev_a, &mnt);
    write_tree(&mnt, "first", 10);
    run(&mut Command::new("sync"));
    let m = manifest(&mnt);
    umount(&mnt);
    wait_uptodate(&b, "r", 60);
    let blocker = t.path().join("b").join("dev").join("r");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"not marsd's").unwrap();
    let o = b.marsadm(&["--timeout", "60", "primary", "r"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "fails: {err}");
    assert!(
        err.contains("block device could not be set up") && err.contains("a regular file"),
        "{err}"
    );
    assert_eq!(b.view("role", "r"), "Primary");
    let view = b.ok(&["view", "r"]);
    assert!(view.contains("not a device of marsd"), "{view}");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"not marsd's");
    assert!(b.device("r").is_none());
    // `primary` again says the same.
    let o = b.marsadm(&["primary", "r"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("block device is missing"));
    // The operator removes it: the device comes.
    std::fs::remove_file(&blocker).unwrap();
    let dev_b = device(&b);
    mount(&dev_b, &mnt);
    assert_eq!(manifest(&mnt), m);
    umount(&mnt);
    let view = b.ok(&["view", "r"]);
    assert!(!view.contains("not a device of marsd"), "{view}");
    a.stop();
    b.stop();
}

/// Issue 17: the old primary crashes with writes its secondary never fetched (ext4 mounted),
/// b takes over by force and writes, then stays idle; a returns, sees the split brain, gives
/// up its history with `invalidate`, syncs fully and becomes up to date while b stays idle
/// (the issue once saw it not become `UpToDate` within 5 minutes); then it takes the role
/// back and serves b's filesystem.
#[test]
fn returning_primary_after_a_split_brain_syncs_and_is_up_to_date_while_idle() {
    if !supported() || !require("mkfs.ext4") || !require("losetup") {
        return;
    }
    let t = tmp();
    let _m = Mounts(t.path().to_path_buf());
    let start = std::time::Instant::now();
    let step = |what: &str| eprintln!("{:>6.1}s {what}", start.elapsed().as_secs_f64());
    let (mut a, mut b, da, db) = pair(t.path());
    let mnt = t.path().join("mnt");
    let dev_a = device(&a);
    mkfs("ext4", &dev_a);
    mount(&dev_a, &mnt);
    write_tree(&mnt, "first", 20);
    run(&mut Command::new("sync"));
    let m1 = manifest(&mnt);
    wait_uptodate(&b, "r", 60);
    // Writes b never sees, then a crash with the filesystem mounted.
    b.ok(&["pause-fetch", "r"]);
    write_tree(&mnt, "lost", 20);
    run(&mut Command::new("sync"));
    let lo = loop_of(&dev_a);
    a.kill9();
    let _foreign = operator_cleanup(&mnt, &lo, t.path());
    step("a crashed with unfetched writes");
    b.ok(&["--timeout", "30", "primary", "--force", "--force", "r"]);
    let dev_b = device(&b);
    mount(&dev_b, &mnt);
    assert_eq!(manifest(&mnt), m1, "b holds what it fetched");
    write_tree(&mnt, "second", 10);
    run(&mut Command::new("sync"));
    let m2 = manifest(&mnt);
    umount(&mnt);
    step("b primary, written, idle from now on");
    a.start_again();
    eventually(60, "a sees the split brain", || {
        a.view("is-split-brain", "r") == "1"
    });
    step("a back, split brain");
    let done = "full sync complete, the replica is consistent";
    let before = a.log_text().matches(done).count();
    a.ok(&["invalidate", "r"]);
    eventually(300, "a's full sync is done", || {
        a.log_text().matches(done).count() > before
    });
    step("a consistent");
    let o = a.marsadm(&["--timeout", "300", "wait-resource", "r", "uptodate"]);
    step("a waited for up to date");
    assert!(
        o.status.success(),
        "a not up to date within 5 minutes while b is idle: {}\n{}\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        a.ok(&["view", "r"]),
        b.ok(&["view", "r"]),
        tail(&a.log_text(), 60)
    );
    assert_eq!(a.view("is-split-brain", "r"), "0");
    eventually(30, "b written back", || {
        b.view("diskstate", "r") == "UpToDate"
    });
    assert_equal(&db, &da, &b, &a);
    a.ok(&["--timeout", "60", "primary", "r"]);
    let dev_a = device(&a);
    mount(&dev_a, &mnt);
    assert_eq!(manifest(&mnt), m2, "a serves b's filesystem");
    umount(&mnt);
    fsck_device(&dev_a);
    step("handed back to a");
    a.stop();
    b.stop();
}
