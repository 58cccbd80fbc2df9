//! Interoperability with real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) over TCP on
//! 127.0.0.1 and over a Unix socket, against an in-memory export.
//!
//! A missing client binary skips the test with a message, unless `CI=true`, where it fails.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{MemExport, Op};
use mars_nbd::{serve, Exports, ServerConfig, StaticExports};
use rand::RngCore;
use tokio::net::{TcpListener, UnixListener};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Whether `bin` is on PATH. Without it the test is skipped, or fails when `CI=true`.
fn have(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(bin).is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("NBD client `{bin}` is not installed (required when CI=true)");
        }
        eprintln!("skipping: NBD client `{bin}` is not installed");
    }
    found
}

/// Runs a client to completion (at most 120 s) and returns its stdout; panics on failure.
fn run(cmd: &mut Command) -> String {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap();
    let err = err_reader.join().unwrap();
    assert!(
        status.success(),
        "{cmd:?} failed with {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    out
}

/// A server for the exports "disk" (1 MiB, read-write, pre-filled with 0x11), "ro" (64 KiB,
/// read-only) and "big" (8 MiB, zeroed), listening on TCP and on a Unix socket.
struct Server {
    rt: tokio::runtime::Runtime,
    port: u16,
    socket: PathBuf,
    dir: tempfile::TempDir,
    disk: Arc<MemExport>,
    ro: Arc<MemExport>,
    big: Arc<MemExport>,
    active: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut disk = MemExport::new(MIB);
        disk.data.lock().unwrap().fill(0x11);
        disk.description = "mars test disk".into();
        let disk = Arc::new(disk);
        let mut ro = MemExport::new(64 * KIB);
        ro.read_only = true;
        let ro = Arc::new(ro);
        let big = Arc::new(MemExport::new(8 * MIB));
        let exports: Arc<dyn Exports> = Arc::new(
            StaticExports::new()
                .with("disk", disk.clone())
                .with("ro", ro.clone())
                .with("big", big.clone()),
        );
        let cfg = Arc::new(ServerConfig::default());
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let active = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));

        let tcp = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = tcp.local_addr().unwrap().port();
        let unix = {
            let _guard = rt.enter();
            UnixListener::bind(&socket).unwrap()
        };
        let conn = Conn {
            exports,
            cfg,
            active: active.clone(),
            accepted: accepted.clone(),
            errors: errors.clone(),
        };
        let c = conn.clone();
        rt.spawn(async move {
            while let Ok((stream, _)) = tcp.accept().await {
                stream.set_nodelay(true).unwrap();
                c.spawn(stream);
            }
        });
        rt.spawn(async move {
            while let Ok((stream, _)) = unix.accept().await {
                conn.spawn(stream);
            }
        });
        Self {
            rt,
            port,
            socket,
            dir,
            disk,
            ro,
            big,
            active,
            accepted,
            errors,
        }
    }

    fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for all connections to end and checks that every one ended cleanly.
    fn finish(self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.active.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "connections did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            self.accepted.load(Ordering::SeqCst) > 0,
            "no client connected"
        );
        let errors = self.errors.lock().unwrap().clone();
        assert!(
            errors.is_empty(),
            "connections ended with errors: {errors:?}"
        );
        for e in [&self.disk, &self.ro, &self.big] {
            assert_eq!(e.violations(), 0);
        }
        self.rt.shutdown_timeout(Duration::from_secs(5));
    }
}

#[derive(Clone)]
struct Conn {
    exports: Arc<dyn Exports>,
    cfg: Arc<ServerConfig>,
    active: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Conn {
    fn spawn<S>(&self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let c = self.clone();
        c.active.fetch_add(1, Ordering::SeqCst);
        c.accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            if let Err(e) = serve(stream, c.exports.clone(), c.cfg.clone()).await {
                c.errors.lock().unwrap().push(e.to_string());
            }
            c.active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}

#[test]
fn qemu_img_info_over_tcp_and_unix() {
    if !have("qemu-img") {
        return;
    }
    let server = Server::start();
    for uri in [server.tcp_uri("disk"), server.unix_uri("disk")] {
        let info = json(&run(Command::new("qemu-img").args([
            "info",
            "--output=json",
            &uri,
        ])));
        assert_eq!(info["virtual-size"], MIB as u64, "{info}");
    }
    let info = json(&run(Command::new("qemu-img").args([
        "info",
        "--output=json",
        &server.tcp_uri("big"),
    ])));
    assert_eq!(info["virtual-size"], 8 * MIB as u64, "{info}");
    server.finish();
}

#[test]
fn nbdinfo_reports_flags_and_block_sizes() {
    if !have("nbdinfo") {
        return;
    }
    let server = Server::start();
    for uri in [server.tcp_uri("disk"), server.unix_uri("disk")] {
        let info = json(&run(Command::new("nbdinfo").args(["--json", &uri])));
        assert_eq!(info["protocol"], "newstyle-fixed", "{info}");
        assert_eq!(info["structured"], false, "{info}");
        let export = &info["exports"][0];
        assert_eq!(export["export-name"], "disk", "{info}");
        assert_eq!(export["export-size"], MIB as u64, "{info}");
        for flag in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_multi_conn",
        ] {
            assert_eq!(export[flag], true, "{flag}: {info}");
        }
        for flag in ["is_read_only", "is_rotational", "can_df"] {
            assert_eq!(export[flag], false, "{flag}: {info}");
        }
        assert_eq!(export["block_size_minimum"], 1, "{info}");
        assert_eq!(export["block_size_preferred"], 4096, "{info}");
        assert_eq!(export["block_size_maximum"], 32 * MIB as u64, "{info}");
        assert_eq!(export["description"], "mars test disk", "{info}");
    }
    let info = json(&run(
        Command::new("nbdinfo").args(["--json", &server.tcp_uri("ro")])
    ));
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info}");
    assert_eq!(info["exports"][0]["export-size"], 64 * KIB as u64, "{info}");
    server.finish();
}

#[test]
fn nbdinfo_lists_exports() {
    if !have("nbdinfo") {
        return;
    }
    let server = Server::start();
    let info = json(&run(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &server.tcp_uri(""),
    ])));
    let mut names: Vec<String> = info["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("{info}"))
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["big", "disk", "ro"], "{info}");
    server.finish();
}

/// The qemu-io script from the brief (plus an unmapping zero write); returns its output.
/// `writeback`: without it qemu-io writes through, so every write carries FUA.
fn qemu_io_script(uri: &str, writeback: bool) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    if writeback {
        cmd.args(["-t", "writeback"]);
    }
    for c in [
        "write -P 0xab 0 64k",
        "write -f -P 0xcd 64k 4k",
        "write -z 128k 64k",
        "discard 192k 4k",
        "write -z -u 256k 64k",
        "flush",
        "read -P 0xab 0 64k",
        "read -P 0xcd 64k 4k",
        "read -P 0 128k 64k",
        "read -P 0x11 196k 60k",
        "read -P 0 256k 64k",
        "read -P 0x11 320k 704k",
    ] {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(uri))
}

fn check_qemu_io_result(out: &str, disk: &MemExport, writeback: bool) {
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(out.matches("wrote ").count(), 4, "{out}");
    assert_eq!(out.matches("read ").count(), 6, "{out}");
    let mem = disk.snapshot();
    let expect = |range: std::ops::Range<usize>, byte: u8| {
        assert!(
            mem[range.clone()].iter().all(|&b| b == byte),
            "{range:?} should be {byte:#x}"
        );
    };
    expect(0..64 * KIB, 0xab);
    expect(64 * KIB..68 * KIB, 0xcd);
    expect(68 * KIB..128 * KIB, 0x11);
    expect(128 * KIB..192 * KIB, 0);
    expect(196 * KIB..256 * KIB, 0x11);
    expect(256 * KIB..320 * KIB, 0);
    expect(320 * KIB..MIB, 0x11);
    let ops = disk.ops();
    let fua = !writeback;
    let k = |n: usize| (n * KIB) as u64;
    let expected = [
        Op::Write {
            offset: 0,
            len: k(64),
            fua,
        },
        Op::Write {
            offset: k(64),
            len: k(4),
            fua: true,
        },
        Op::WriteZeroes {
            offset: k(128),
            len: k(64),
            may_trim: false,
            fua,
        },
        Op::Trim {
            offset: k(192),
            len: k(4),
            fua: false,
        },
        Op::WriteZeroes {
            offset: k(256),
            len: k(64),
            may_trim: true,
            fua,
        },
    ];
    assert_eq!(ops[..5], expected, "{ops:?}");
    assert!(
        ops[5..].iter().all(|op| *op == Op::Flush) && ops.len() > 5,
        "{ops:?}"
    );
}

#[test]
fn qemu_io_write_zero_discard_flush_read_over_tcp() {
    if !have("qemu-io") {
        return;
    }
    let server = Server::start();
    let out = qemu_io_script(&server.tcp_uri("disk"), true);
    check_qemu_io_result(&out, &server.disk, true);
    server.finish();
}

#[test]
fn qemu_io_over_unix_socket() {
    if !have("qemu-io") {
        return;
    }
    let server = Server::start();
    let out = qemu_io_script(&server.unix_uri("disk"), false);
    check_qemu_io_result(&out, &server.disk, false);
    server.finish();
}

#[test]
fn qemu_io_read_only_export() {
    if !have("qemu-io") {
        return;
    }
    let server = Server::start();
    server.ro.data.lock().unwrap()[..4 * KIB].fill(0x42);
    let out = run(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x42 0 4k",
        "-c",
        "read -P 0 4k 60k",
        &server.tcp_uri("ro"),
    ]));
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 2, "{out}");
    server.finish();
}

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn nbdcopy_roundtrip_8mib() {
    if !have("nbdcopy") {
        return;
    }
    let server = Server::start();
    let input = server.path("in.img");
    let output = server.path("out.img");
    let data = random_file(&input, 8 * MIB);
    // Four connections in parallel: the server announces CAN_MULTI_CONN.
    run(Command::new("nbdcopy").args([
        "--flush",
        "--connections=4",
        "--threads=4",
        input.to_str().unwrap(),
        &server.tcp_uri("big"),
    ]));
    assert!(
        server.accepted.load(Ordering::SeqCst) >= 4,
        "nbdcopy used multi-conn"
    );
    assert!(
        server.big.snapshot() == data,
        "export content differs after nbdcopy in"
    );
    assert!(
        server.big.ops().contains(&Op::Flush),
        "nbdcopy --flush flushes at the end"
    );
    std::fs::write(&output, b"").unwrap();
    run(Command::new("nbdcopy").args([&server.unix_uri("big"), output.to_str().unwrap()]));
    assert!(
        std::fs::read(&output).unwrap() == data,
        "copied-out file differs"
    );
    server.finish();
}

#[test]
fn fio_random_writes_verified_at_queue_depth_16() {
    if !have("fio") {
        return;
    }
    let server = Server::start();
    // Run in the temporary directory: fio may leave verify state files in its working directory.
    let out = run(Command::new("fio").current_dir(server.dir.path()).args([
        "--name=verify",
        "--verify_state_save=0",
        "--ioengine=nbd",
        &format!("--uri={}", server.tcp_uri("big")),
        "--rw=randwrite",
        "--bs=4k",
        "--size=8M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--output-format=json",
    ]));
    // fio prints a line about the connection before the JSON document.
    let start = out
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio:\n{out}"));
    let report = json(&out[start..]);
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{report}");
    assert_eq!(job["write"]["io_bytes"], 8 * MIB as u64, "{report}");
    assert_eq!(
        job["read"]["io_bytes"],
        8 * MIB as u64,
        "verify read everything back"
    );
    server.finish();
}
