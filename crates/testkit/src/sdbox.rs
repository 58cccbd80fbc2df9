//! A real systemd as PID 1 in a box of its own, for tests of the systemd interface (see
//! `../shared/reference/test-environment.md` §1, recipe A).
//!
//! The box gets new pid, mount, uts, ipc and cgroup namespaces; its root is an overlay of the
//! machine's `/` with a tmpfs upper layer, so nothing it writes touches the host's files, except
//! in the directories shared into it (bind mounts at the same path: the test's temporary
//! directory, the binaries). It shares the host's network namespace, so a `marsd` inside listens
//! on 127.0.0.x like the other tests' daemons, and `marsadm` outside reaches it through the
//! control socket in its (shared) root.
//!
//! Cleanup, also after a panic or a SIGKILL of the test: the box is started as
//! `unshare --kill-child` under `PR_SET_PDEATHSIG=SIGKILL`, so when the test process dies, the
//! `unshare` process dies, which SIGKILLs the box's PID 1, which takes every process in the box
//! and its private mount namespace (overlay, tmpfs, bind mounts) with it. [`SdBox`]'s `Drop` does
//! the same on purpose and removes the box's cgroup directories; cgroup directories of boxes
//! whose test process is gone are removed by the next [`SdBox::boot`].

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Prefix of the boxes' cgroup directories (and names): `mars-sdbox-PID-N`.
const PREFIX: &str = "mars-sdbox-";
/// The cgroup hierarchies of this machine kind (hybrid: the named systemd v1 one and v2).
const CGROUP_ROOTS: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"];
const SYSTEMD: &str = "/lib/systemd/systemd";

static BOXES: AtomicU32 = AtomicU32::new(0);

/// The box script: outer part (cgroups, then `unshare`), inner part (mounts, pivot_root, exec
/// systemd). Arguments: NAME DIR SHARED… (DIR holds the box's files on the host).
const SCRIPT: &str = r#"#!/bin/sh
set -e
NAME=$1; B=$2; shift 2
if [ "$INNER" != 1 ]; then
  for h in unified systemd; do
    [ -d /sys/fs/cgroup/$h ] || continue
    mkdir -p /sys/fs/cgroup/$h/$NAME; echo $$ > /sys/fs/cgroup/$h/$NAME/cgroup.procs
  done
  INNER=1 exec unshare --pid --fork --kill-child=SIGKILL --mount --uts --ipc --cgroup --propagation private sh "$0" "$NAME" "$B" "$@"
fi
R=$B/root; mkdir -p $B/ovl $R
mount -t tmpfs tmpfs $B/ovl; mkdir -p $B/ovl/u $B/ovl/w
mount -t overlay overlay -o lowerdir=/,upperdir=$B/ovl/u,workdir=$B/ovl/w $R
mount -t proc proc $R/proc
mount --rbind /sys $R/sys; umount -R $R/sys/fs/cgroup; mount -o remount,bind,ro $R/sys; mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
mount --rbind /dev $R/dev
touch $B/console.log; mount --bind $B/console.log $R/dev/console
mount -t tmpfs tmpfs $R/run; mount -t tmpfs tmpfs $R/tmp
for p in "$@"; do mkdir -p "$R$p"; mount --bind "$p" "$R$p"; done
echo $NAME > $R/etc/hostname
S=$R/etc/systemd/system
for u in systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount postgresql.service getty@tty1.service networking.service systemd-networkd.service NetworkManager.service; do ln -sf /dev/null $S/$u; done
printf '[Unit]\nDescription=sdbox target\nRequires=basic.target\nAfter=basic.target\nAllowIsolate=yes\n' > $S/sdbox.target
cd $R; mkdir -p .oldroot; pivot_root . .oldroot; umount -l /.oldroot; rmdir /.oldroot
export container=sdbox
exec /lib/systemd/systemd --system --unit=sdbox.target --show-status=no --log-target=journal
"#;

/// Can a box run here? Needs root, systemd and util-linux's `unshare`/`nsenter`. Prints why not
/// (the caller skips).
pub fn available() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("a systemd box needs root in CI (namespaces, mounts, cgroups)");
        }
        eprintln!("SKIPPED: a systemd box needs root (namespaces, mounts, cgroups)");
        return false;
    }
    if !Path::new(SYSTEMD).exists() || !crate::require("systemctl") {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("systemd is required in CI but not installed ({SYSTEMD})");
        }
        eprintln!("SKIPPED: systemd is not installed ({SYSTEMD})");
        return false;
    }
    crate::require("unshare") && crate::require("nsenter")
}

/// One booted box. See the module docs.
pub struct SdBox {
    pub name: String,
    /// The box's systemd, as a pid of the host.
    pub pid: u32,
    unshare: Option<Child>,
    dir: PathBuf,
}

impl SdBox {
    /// Boots a box and waits until `systemctl is-system-running` says so; `dir` keeps the box's
    /// files on the host (console log, mount points), `shared` are host directories bind-mounted
    /// at the same path inside.
    pub fn boot(dir: &Path, shared: &[&Path]) -> SdBox {
        remove_stale();
        let n = BOXES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}", std::process::id());
        let dir = dir.join(&name);
        std::fs::create_dir_all(&dir).expect("box dir");
        let script = dir.join("sdbox.sh");
        std::fs::write(&script, SCRIPT).expect("box script");
        let log = std::fs::File::create(dir.join("boot.log")).expect("boot log");
        let mut cmd = Command::new("sh");
        cmd.arg(&script)
            .arg(&name)
            .arg(&dir)
            .args(shared)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        // SAFETY: prctl and setsid are async-signal-safe; nothing else runs between fork and
        // exec. PDEATHSIG ends the box with this process (see the module docs); its own
        // session keeps terminal signals away from it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn the box");
        let mut b = SdBox {
            name,
            pid: 0,
            unshare: Some(child),
            dir,
        };
        // From here on, a panic drops `b`, which kills whatever started.
        let upid = b.unshare.as_ref().map_or(0, Child::id);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let children = std::fs::read_to_string(format!("/proc/{upid}/task/{upid}/children"))
                .unwrap_or_default();
            if let Some(c) = children.split_whitespace().next() {
                let c: u32 = c.parse().unwrap_or(0);
                let comm = std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
                if comm.trim() == "systemd"
                    && Path::new(&format!("/proc/{c}/root/run/systemd/private")).exists()
                {
                    b.pid = c;
                    break;
                }
            }
            if let Some(Ok(Some(st))) = b.unshare.as_mut().map(Child::try_wait) {
                panic!("the box exited with {st}: {}", b.boot_log());
            }
            assert!(
                Instant::now() < deadline,
                "the box did not boot: {}",
                b.boot_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = b.exec(&["systemctl", "is-system-running", "--wait"]);
        let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
        // "degraded" only means some unit of the host's configuration failed in the box.
        assert!(
            state == "running" || state == "degraded",
            "box state {state:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        b
    }

    fn boot_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("boot.log")).unwrap_or_default()
    }

    /// A command run inside the box (its mount, pid and uts namespaces).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-m", "-p", "-u", "--"])
            .args(args);
        c
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run nsenter")
    }

    /// `systemctl ARGS…` in the box; stdout, trimmed (the exit status is not checked).
    pub fn systemctl(&self, args: &[&str]) -> String {
        let o = self.exec(&[&["systemctl"], args].concat());
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// A path inside the box as the host sees it (through `/proc/PID/root`).
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/{}",
            self.pid,
            inside.trim_start_matches('/')
        ))
    }

    /// The box's journal (for failure messages).
    pub fn journal(&self, lines: usize) -> String {
        let o = self.exec(&["journalctl", "--no-pager", "-n", &lines.to_string()]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for SdBox {
    fn drop(&mut self) {
        if self.pid != 0 {
            // SAFETY: kill(2) of the box's PID 1 from the parent namespace: the whole box ends.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        if let Some(mut c) = self.unshare.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_cgroups(&self.name, Duration::from_secs(10));
    }
}

/// Removes a box's cgroup directories once their processes are gone (deepest first).
fn remove_cgroups(name: &str, wait: Duration) {
    let deadline = Instant::now() + wait;
    for root in CGROUP_ROOTS {
        let top = Path::new(root).join(name);
        while top.exists() {
            let mut dirs = Vec::new();
            collect_dirs(&top, &mut dirs);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in &dirs {
                let _ = std::fs::remove_dir(d);
            }
            if !top.exists() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Boxes of test processes that are gone: kill what is left in their cgroups, remove them.
fn remove_stale() {
    for root in CGROUP_ROOTS {
        let Ok(rd) = std::fs::read_dir(root) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let mut dirs = Vec::new();
            collect_dirs(&e.path(), &mut dirs);
            for d in &dirs {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                for p in procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: kill(2) of a leftover process of a dead test's box.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
            remove_cgroups(&name, Duration::from_secs(5));
        }
    }
}
