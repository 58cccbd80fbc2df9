//! Test harness for end-to-end tests: real `marsd` processes with their own roots, driven only
//! through the real `marsadm` binary and real NBD clients.
//!
//! The binaries are built on first use (`cargo build -p mars-daemon -p mars-cli`), so that
//! `cargo test` alone is enough. Tools a test needs (`qemu-img`, `nbdinfo`, `fio` …) are checked
//! with [`require`]: missing in CI (`CI=true`) is a failure, elsewhere the test is skipped with a
//! message.

pub mod foreign;
pub mod impostor;
pub mod lab;
pub mod metrics;
pub mod nbd;
pub mod repl;
pub mod sdbox;
pub mod sdnode;
pub mod smallfs;
pub mod wan;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mars_api::{Reply, Request, Response, CONTROL_SOCKET};

/// Directory holding the workspace's binaries (`target/debug`).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--quiet", "-p", "mars-daemon", "-p", "mars-cli"])
            .current_dir(manifest);
        // Cargo runs a test with the variables it describes the test's package by; some build
        // scripts (ring's) watch `CARGO_MANIFEST_DIR`, so passing them on made this build
        // and the next `cargo test` rebuild ring, rustls and everything above in turn.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k == "OUT_DIR"
                || k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .contains(&k.as_ref())
            {
                build.env_remove(k.as_ref());
            }
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building marsd and marsadm failed");
        // The test executable lives in target/<profile>/deps/.
        let exe = std::env::current_exe().expect("current_exe");
        exe.parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf()
    })
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} missing", p.display());
    p
}

/// Is `tool` installed? In CI a missing tool fails the test; elsewhere it is skipped.
pub fn require(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{tool} is required in CI but not installed (see .ci/run)");
        }
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// A temporary directory for one test, removed when dropped (kept when `MARS_KEEP_TMP` is set,
/// for looking at the daemons' logs after a failure).
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .disable_cleanup(std::env::var_os("MARS_KEEP_TMP").is_some())
        .tempdir()
        .expect("tempdir")
}

/// A free TCP port on 127.0.0.1 (racy but fine for tests).
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A free TCP port on a loopback address such as 127.0.0.2. Chosen below Linux's ephemeral
/// range (32768–60999), so that outgoing connections of other tests cannot take it between now
/// and the daemon's bind; [`Host`] still retries if another test picked the same one.
pub fn free_port_on(ip: &str) -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    loop {
        let port = rng.gen_range(20_000..32_000);
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

/// One mars host: a `marsd` process with its own root directory.
pub struct Host {
    pub name: String,
    pub root: PathBuf,
    pub nbd_port: u16,
    /// Where peers reach this host (`--listen`).
    pub peer_addr: String,
    log: PathBuf,
    child: Option<Child>,
    /// Extra environment for marsd (e.g. `MARS_MIN_FREE_SPACE`); applies to later restarts.
    pub env: Vec<(String, String)>,
    /// Command prefix marsd runs under, e.g. `ip netns exec NS` (it must exec marsd in place).
    pub wrap: Vec<String>,
}

impl Host {
    /// Starts `marsd --root DIR/NAME/root --host NAME` with NBD also on a TCP port.
    pub fn start(dir: &Path, name: &str) -> Host {
        Self::start_at(dir, name, "127.0.0.1")
    }

    /// Like [`Host::start`], listening for peers on `ip` (e.g. 127.0.0.2), a free port.
    pub fn start_at(dir: &Path, name: &str, ip: &str) -> Host {
        Self::start_with_env(dir, name, ip, &[])
    }

    /// Like [`Host::start_at`], with extra environment variables for marsd.
    pub fn start_with_env(dir: &Path, name: &str, ip: &str, env: &[(&str, &str)]) -> Host {
        let base = dir.join(name);
        std::fs::create_dir_all(&base).expect("mkdir");
        let mut h = Host {
            name: name.into(),
            root: base.join("root"),
            nbd_port: free_port(),
            peer_addr: format!("{ip}:{}", free_port_on(ip)),
            log: base.join("marsd.log"),
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrap: Vec::new(),
        };
        // Another test may grab a port between our check and the daemon's bind: new ports.
        for _ in 0..5 {
            if h.spawn() {
                return h;
            }
            h.nbd_port = free_port();
            h.peer_addr = format!("{ip}:{}", free_port_on(ip));
        }
        panic!("marsd could not bind free ports: {}", h.log_text());
    }

    /// A host whose `marsd` runs elsewhere (e.g. as a service in a systemd box): the handle
    /// talks to it through the control socket in `root` and reads its log file, but neither
    /// starts nor stops it.
    pub fn external(
        name: &str,
        root: PathBuf,
        peer_addr: String,
        nbd_port: u16,
        log: PathBuf,
    ) -> Host {
        Host {
            name: name.into(),
            root,
            nbd_port,
            peer_addr,
            log,
            child: None,
            env: Vec::new(),
            wrap: Vec::new(),
        }
    }

    /// (Re)starts the daemon on this host's ports, retrying briefly while one is still taken
    /// (a restarted host must keep its address).
    fn spawn_same_ports(&mut self) {
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("marsd could not bind its ports: {}", self.log_text());
    }

    /// Starts marsd and waits until it serves; `false` if it exited because a port was taken.
    fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("marsd"));
                c
            }
            None => Command::new(bin("marsd")),
        };
        let child = cmd
            .arg("--root")
            .arg(&self.root)
            .args(["--host", &self.name, "--listen", &self.peer_addr])
            .args(["--nbd-listen", &format!("127.0.0.1:{}", self.nbd_port)])
            // `MARS_TEST_LOG=debug` when chasing a race in a test's host logs.
            .env(
                "MARS_LOG",
                std::env::var("MARS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // No local block devices unless a test asks for them (env MARS_DEVICE), and then
            // in this host's own directory: daemons on one machine must never collide.
            .env("MARS_DEVICE", "none")
            .env(
                "MARS_DEVICE_DIR",
                self.root.parent().expect("base").join("dev"),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn marsd");
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // marsd binds its control socket after every other listener and only once its
            // resources are recovered, so an answer means it serves NBD and peers. A connect
            // alone is not enough: it may reach the socket file of a killed predecessor (refused)
            // or queue in a backlog.
            if self.ping() {
                return true;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    let log = self.log_text();
                    let last = log.lines().last().unwrap_or_default();
                    if last.contains("Address already in use") {
                        return false;
                    }
                    panic!("marsd exited with {st}: {log}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "marsd did not come up: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Does the daemon answer a `Ping` on its control socket (one request line, one reply line)?
    pub fn ping(&self) -> bool {
        use std::io::{BufRead, Write};
        let Ok(s) = std::os::unix::net::UnixStream::connect(self.root.join(CONTROL_SOCKET)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        if (&s).write_all(&mars_api::encode(&Request::Ping)).is_err() {
            return false;
        }
        let mut line = Vec::new();
        if std::io::BufReader::new(&s)
            .read_until(b'\n', &mut line)
            .is_err()
        {
            return false;
        }
        matches!(
            mars_api::decode::<Response>(line.trim_ascii_end()),
            Ok(Response::Ok {
                reply: Reply::Pong { .. }
            })
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `marsadm --root ROOT ARGS…`.
    pub fn marsadm(&self, args: &[&str]) -> Output {
        Command::new(bin("marsadm"))
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .output()
            .expect("run marsadm")
    }

    /// Runs marsadm and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.marsadm(args);
        assert!(
            o.status.success(),
            "marsadm {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).expect("utf8")
    }

    /// A one-time join token from this host (`marsadm join-token`).
    pub fn join_token(&self) -> String {
        self.ok(&["join-token"]).trim().to_string()
    }

    /// Joins the cluster of `member` with a token it issued (`join-token` there, then
    /// `join-cluster ADDR --token T` here), as an operator does.
    pub fn join(&self, member: &Host) -> String {
        let token = member.join_token();
        self.ok(&["join-cluster", &member.peer_addr, "--token", &token])
    }

    /// Makes this member an issuer of join tokens too, by the documented procedure: copy the
    /// CA's key from a host that has it into `ROOT/tls/` (mode 0600).
    pub fn copy_ca_key_from(&self, issuer: &Host) {
        use std::os::unix::fs::PermissionsExt;
        let to = self.root.join("tls/ca.key");
        std::fs::copy(issuer.root.join("tls/ca.key"), &to).expect("copy ca.key");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    /// This host's certificate, key and CA as marsd stores them (`ROOT/tls/`).
    pub fn credentials(&self) -> mars_tls::Credentials {
        let read = |f: &str| {
            std::fs::read_to_string(self.root.join("tls").join(f)).expect("a file of ROOT/tls")
        };
        // host.crt holds the CA that issued it after it when that is not ca.crt (a rotation).
        let cert = read("host.crt");
        let issuer = match cert.match_indices("-----BEGIN CERTIFICATE-----").nth(1) {
            Some((at, _)) => cert[at..].to_string(),
            None => read("ca.crt"),
        };
        mars_tls::Credentials::from_pem(&issuer, &cert, &read("host.key"))
            .expect("valid credentials")
    }

    /// The id of the cluster this host is in (from `view --json`).
    pub fn cluster_id(&self) -> mars_wire::ClusterId {
        let v = self.view_json();
        mars_wire::ClusterId::parse(v["cluster"]["uuid"].as_str().expect("in a cluster"))
            .expect("a cluster id")
    }

    /// Whether `view` here shows a member whose last error contains `text`.
    pub fn member_error_contains(&self, text: &str) -> bool {
        self.view_json()["members"]
            .as_array()
            .expect("members")
            .iter()
            .any(|m| m["error"].as_str().is_some_and(|e| e.contains(text)))
    }

    /// Runs marsadm and asserts it is refused with exactly one line on stderr; returns it.
    pub fn refused(&self, args: &[&str]) -> String {
        let o = self.marsadm(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            !o.status.success(),
            "marsadm {args:?} unexpectedly succeeded"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
        err
    }

    /// `marsadm view-MACRO RES`.
    pub fn view(&self, mac: &str, res: &str) -> String {
        self.ok(&[&format!("view-{mac}"), res]).trim().to_string()
    }

    /// The local block device of `res` on this host (`view-device`), if there is one.
    pub fn device(&self, res: &str) -> Option<PathBuf> {
        let o = self.marsadm(&["view-device", res]);
        o.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    }

    /// `marsadm view --json`.
    pub fn view_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["--json", "view"])).expect("json")
    }

    pub fn unix_uri(&self, res: &str) -> String {
        format!(
            "nbd+unix:///{res}?socket={}",
            self.root.join("nbd.sock").display()
        )
    }

    pub fn tcp_uri(&self, res: &str) -> String {
        format!("nbd://127.0.0.1:{}/{res}", self.nbd_port)
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.root.join("nbd.sock")
    }

    /// Creates a cluster and a file-backed resource of `size` bytes; returns the disk path.
    pub fn create_resource(&self, res: &str, size: u64) -> PathBuf {
        let disk = self.root.parent().expect("base").join(format!("{res}.img"));
        let f = std::fs::File::create(&disk).expect("disk");
        f.set_len(size).expect("size");
        if self.view_json()["cluster"].is_null() {
            self.ok(&["create-cluster"]);
        }
        self.ok(&["create-resource", res, disk.to_str().expect("utf8")]);
        disk
    }

    /// SIGKILL: a crash of the daemon at this moment.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// The process id of the running marsd (through a `wrap` that execs in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn_same_ports();
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn_same_ports();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill9();
        // A killed daemon leaves its FUSE mounts (the `/dev/mars` frontend) behind, and the
        // test's directory could not be removed under them: detach what is mounted below
        // this host's directory.
        if let Some(base) = self.root.parent() {
            detach_mounts_below(base);
        }
    }
}

/// Lazily unmounts every mount point below `dir` (deepest first).
fn detach_mounts_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    // Field 5 is the mount point, with spaces and other bytes octal-escaped.
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Runs a command and asserts success; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A file of `len` random bytes.
pub fn random_file(path: &Path, len: usize) {
    use rand::RngCore;
    let mut buf = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut buf);
    std::fs::write(path, &buf).expect("write");
}
