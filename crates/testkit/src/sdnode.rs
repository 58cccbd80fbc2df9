//! A mars host as a systemd box: `marsd` runs inside as `marsd.service` (derived from
//! `dist/marsd.service`), moves application stacks with the box's own systemd, and can be
//! crashed and rebooted like a machine.
//!
//! One box per host: a stack's unit names are the same on every host, so two hosts sharing one
//! systemd would share the units. The boxes share the host's network namespace (daemons on
//! 127.0.0.x, an application's TCP port reachable from the test) and the test's temporary
//! directory, so `marsadm` runs outside through the control socket in the host's root.
//!
//! With a block device ([`NodeOptions::device`]), each box mounts a tmpfs of its own on
//! `/dev/mars` before marsd starts, so every host has the real `/dev/mars/RES` path (as the
//! shipped templates expect) without the hosts seeing each other's nodes; the FUSE mount and the
//! loop device are marsd's, as on a real machine.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sdbox::SdBox;
use crate::{bin_dir, free_port, free_port_on, Host};

/// How [`Node::start`] runs marsd.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// `--device fuse-loop --device-dir /dev/mars` (else `--device none` in a private dir).
    pub device: bool,
    /// `--systemd-timeout`: seconds a start or stop of the stack may take.
    pub systemd_timeout: u32,
    /// A MARS-compatible tree at `/mars` (`--mars-tree /mars`), on a tmpfs of the box's own,
    /// as MARS keeps `/mars` on a filesystem of its own (MARS's `mars.service` binds to
    /// `mars.mount`).
    pub mars_tree: bool,
    /// Files written into the box at every boot before marsd starts: (path inside, content,
    /// mode).
    pub files: Vec<(String, Vec<u8>, u32)>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            device: false,
            systemd_timeout: 20,
            mars_tree: false,
            files: Vec::new(),
        }
    }
}

/// A host: its box (`None` while the host is down) and the handle to its marsd.
pub struct Node {
    pub host: Host,
    sdbox: Option<SdBox>,
    /// The test's directory, shared into the box (with the binaries).
    shared: PathBuf,
    device: bool,
    mars_tree: bool,
    files: Vec<(String, Vec<u8>, u32)>,
    unit: String,
}

/// `dist/marsd.service` with our ExecStart and log file, without the network-online ordering
/// (in a box sharing the host's network, that target could start the host's network setup).
pub fn marsd_unit(exec_start: &str, log: &Path) -> String {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/marsd.service");
    let text = std::fs::read_to_string(&dist).expect("dist/marsd.service");
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("Wants=") || line.starts_with("After=") {
            continue;
        }
        if line.starts_with("ExecStart=") {
            out += &format!("ExecStart={exec_start}\n");
            continue;
        }
        out += line;
        out.push('\n');
        if line == "[Service]" {
            out += &format!(
                "StandardOutput=append:{0}\nStandardError=append:{0}\n",
                log.display()
            );
        }
    }
    assert!(out.contains("Type=notify"), "dist/marsd.service: {text}");
    out
}

impl Node {
    /// Boots host `name`'s box (files below `t/name`) and starts marsd in it, listening for
    /// peers on `ip`, generating stacks from `templates`.
    pub fn start(t: &Path, name: &str, ip: &str, templates: &Path, opt: &NodeOptions) -> Node {
        let bins = bin_dir();
        let base = t.join(name);
        std::fs::create_dir_all(&base).expect("host dir");
        let root = base.join("root");
        let log = base.join("marsd.log");
        let peer = format!("{ip}:{}", free_port_on(ip));
        let nbd_port = free_port();
        let device = if opt.device {
            "--device fuse-loop --device-dir /dev/mars".to_string()
        } else {
            format!("--device none --device-dir {}", base.join("dev").display())
        };
        let tree = if opt.mars_tree {
            " --mars-tree /mars"
        } else {
            ""
        };
        let exec = format!(
            "{} --root {} --host {name} --listen {peer} --nbd-listen 127.0.0.1:{nbd_port} \
             --systemd-templates {} --systemd-timeout {} {device}{tree}",
            bins.join("marsd").display(),
            root.display(),
            templates.display(),
            opt.systemd_timeout,
        );
        let mut n = Node {
            host: Host::external(name, root, peer, nbd_port, log.clone()),
            sdbox: None,
            shared: t.to_path_buf(),
            device: opt.device,
            mars_tree: opt.mars_tree,
            files: opt.files.clone(),
            unit: marsd_unit(&exec, &log),
        };
        n.boot();
        n
    }

    /// The running box. Panics while the host is down.
    pub fn sdbox(&self) -> &SdBox {
        self.sdbox.as_ref().expect("the host is down")
    }

    pub fn is_up(&self) -> bool {
        self.sdbox.is_some()
    }

    /// Boots the box and starts marsd.service in it (returns once marsd said READY=1).
    pub fn boot(&mut self) {
        assert!(self.sdbox.is_none(), "already up");
        let b = SdBox::boot(&self.shared.join("boxes"), &[&self.shared, bin_dir()]);
        if self.device {
            let o = b.exec(&[
                "sh",
                "-c",
                "mkdir -p /dev/mars && mount -t tmpfs -o mode=0755 mars-dev /dev/mars",
            ]);
            assert!(
                o.status.success(),
                "/dev/mars in the box: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        if self.mars_tree {
            let o = b.exec(&[
                "sh",
                "-c",
                "mkdir -p /mars && mount -t tmpfs -o mode=0755 mars /mars",
            ]);
            assert!(
                o.status.success(),
                "/mars in the box: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        for (path, content, mode) in &self.files {
            use std::os::unix::fs::PermissionsExt;
            let p = b.path(path);
            std::fs::create_dir_all(p.parent().expect("a file in a directory")).expect("dir");
            std::fs::write(&p, content).expect("a file in the box");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).expect("mode");
        }
        std::fs::write(b.path("/etc/systemd/system/marsd.service"), &self.unit)
            .expect("marsd.service");
        b.systemctl(&["daemon-reload"]);
        let o = b.exec(&["systemctl", "start", "marsd.service"]);
        assert!(
            o.status.success(),
            "marsd.service did not start on {}: {}\n{}\n{}",
            self.host.name,
            String::from_utf8_lossy(&o.stderr),
            crate::repl::tail(&self.host.log_text(), 40),
            b.journal(40)
        );
        self.sdbox = Some(b);
    }

    /// A crash of the whole machine: every process of the box (marsd, the application) gets
    /// SIGKILL at once and its mount namespace goes, so mounted filesystems are not cleanly
    /// unmounted (their device is gone with marsd before anything is written back).
    ///
    /// Returns once the machine is really down: the killed marsd has let go of its root (its
    /// lock), as before a real reboot; panics naming the holders if that takes a minute.
    pub fn crash(&mut self) {
        self.power_off();
        let lock = self.host.root.join("marsd.lock");
        let start = Instant::now();
        while !lock_free(&lock) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} still locked a minute after the crash, held by {:?}",
                lock.display(),
                holders(&lock)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the box, then aborts its FUSE connections (marsd's devices): the I/O of a machine
    /// that lost power never completes. Without the abort, a filesystem on marsd's device that
    /// is still mounted deadlocks the box's end: marsd is the last process of the box's mount
    /// namespace, so its exit unmounts that filesystem, whose final writeback goes to marsd's
    /// own FUSE connection, which stays open until that very exit is done (marsd then hangs as
    /// a zombie in D state, holding its root's lock, the loop device and the FUSE mount).
    fn power_off(&mut self) {
        let Some(b) = self.sdbox.take() else {
            return;
        };
        let fuse = fuse_connections(b.pid);
        drop(b);
        for c in fuse {
            let _ = std::fs::write(format!("/sys/fs/fuse/connections/{c}/abort"), "1");
        }
    }

    /// `systemctl ARGS…` in the box (stdout, trimmed).
    pub fn systemctl(&self, args: &[&str]) -> String {
        self.sdbox().systemctl(args)
    }

    /// A shell command in the box; panics with its output when it fails.
    pub fn sh(&self, script: &str) -> String {
        let o = self.sdbox().exec(&["sh", "-c", script]);
        assert!(
            o.status.success(),
            "{} on {}: {}{}",
            script,
            self.host.name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The box's journal, or a note that the host is down.
    pub fn journal(&self, lines: usize) -> String {
        self.sdbox
            .as_ref()
            .map_or_else(|| "(host down)".into(), |b| b.journal(lines))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.power_off();
    }
}

/// The FUSE connections (`/sys/fs/fuse/connections/N`) of the mounts in process `pid`'s mount
/// namespace: N is the minor device number of a `fuse` mount (mountinfo field 3, `MAJOR:MINOR`).
fn fuse_connections(pid: u32) -> Vec<String> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    info.lines()
        .filter(|l| {
            l.split_once(" - ")
                .is_some_and(|(_, rest)| rest.starts_with("fuse ") || rest.starts_with("fuse."))
        })
        .filter_map(|l| {
            l.split_whitespace()
                .nth(2)?
                .split_once(':')
                .map(|(_, m)| m.to_string())
        })
        .collect()
}

/// Whether nobody holds the daemon lock `path` (marsd's flock on `ROOT/marsd.lock`).
fn lock_free(path: &Path) -> bool {
    let Ok(f) = std::fs::OpenOptions::new().read(true).open(path) else {
        return true;
    };
    // SAFETY: flock on a valid descriptor; the lock goes with `f`.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// The processes (pid and command line) with `path` open, for a failure message.
fn holders(path: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let fds = std::fs::read_dir(e.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten();
        if fds
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|l| l == path)
        {
            let cmd = std::fs::read_to_string(e.path().join("cmdline")).unwrap_or_default();
            let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            out.push(format!("{pid} {} [{}]", cmd.replace('\0', " "), state));
        }
    }
    out
}
