//! A daemon under hostile or broken peers stays bounded and keeps serving (issue 15's
//! hostile-load cases grow here).

use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mars_testkit::{tempdir, Host};

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect(")") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A number field of `/proc/PID/status` (`VmRSS:` in KiB, `Threads:`).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("the field")
}

/// Out of file descriptors, the accept loops back off instead of spinning, log the failure
/// once, and serve again as soon as descriptors are free: a peer that opens more connections
/// than the daemon may hold costs it neither a core nor its log disk.
#[test]
fn out_of_descriptors_the_accept_loops_back_off_and_recover() {
    let dir = tempdir("mars-hostile");
    let mut a = Host::start(dir.path(), "a");
    // A hard limit marsd cannot raise: room for its own files and a few connections.
    a.wrap = ["prlimit", "--nofile=64:64"].map(String::from).to_vec();
    a.restart();
    let pid = a.pid().expect("running");

    let mut conns = Vec::new();
    for _ in 0..150 {
        // Connections beyond the limit wait in the listen backlog or are refused when it is
        // full; either is fine.
        if let Ok(c) =
            TcpStream::connect_timeout(&a.peer_addr.parse().unwrap(), Duration::from_millis(500))
        {
            conns.push(c);
        }
    }
    // The daemon is out of descriptors now; clients of its other listeners make those fail
    // too (NBD over TCP, NBD and control over unix sockets).
    let mut others = Vec::new();
    let mut unix = Vec::new();
    for _ in 0..5 {
        if let Ok(c) = TcpStream::connect_timeout(
            &format!("127.0.0.1:{}", a.nbd_port).parse().unwrap(),
            Duration::from_millis(500),
        ) {
            others.push(c);
        }
        for sock in [mars_api::CONTROL_SOCKET, mars_api::NBD_SOCKET] {
            if let Ok(c) = UnixStream::connect(a.root.join(sock)) {
                unix.push(c);
            }
        }
    }
    // Measure it for two seconds.
    std::thread::sleep(Duration::from_millis(500));
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu_ticks(pid) - c0;
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = ticks as f64 / hz / t0.elapsed().as_secs_f64();
    let log = a.log_text();
    // Which loops run out depends on how the descriptors come and go at the limit, so the
    // check is on the whole: at least one loop failed, and the failures of 2.5 s took a line
    // or two per loop (a loop that logged each failure wrote 25 lines here).
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("accept failed"))
        .collect();
    assert!(
        !lines.is_empty(),
        "the daemon never ran out of descriptors?\n{log}"
    );
    assert!(lines.len() <= 8, "accept failures flood the log\n{log}");
    for what in [
        "peer listener",
        "NBD listener (tcp)",
        "NBD listener (unix)",
        "control socket",
    ] {
        let n = lines.iter().filter(|l| l.contains(what)).count();
        assert!(n <= 2, "{what}: {n} lines for one run of failures\n{log}");
    }
    assert!(
        cpu < 0.3,
        "an accept loop spins: {:.0} % of a core",
        cpu * 100.0
    );

    // The peer gives up: its connections close (those accepted end at once, as no hello
    // came), and the daemon answers again.
    drop(conns);
    drop(others);
    drop(unix);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.ping() {
        assert!(
            Instant::now() < deadline,
            "marsd does not answer again\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.log_text().contains("accepting again after") {
        assert!(
            Instant::now() < deadline,
            "no recovery logged\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A member (authenticated: its certificate) opens 600 full-sync sessions at once and leaves
/// them waiting: the primary serves at most `MAX_SERVED_SYNCS` (256) and refuses the rest with
/// the reason; its control socket and NBD keep answering, and its memory stays bounded.
#[test]
fn six_hundred_sync_sessions_are_bounded_and_the_daemon_keeps_serving() {
    use std::io::{Read, Write};

    let dir = tempdir("mars-hostile-sync");
    let a = Host::start_at(dir.path(), "a", "127.0.0.1");
    let b = Host::start_at(dir.path(), "b", "127.0.0.2");
    a.create_resource("r", 16 << 20);
    b.join(&a);
    // Only members of r are served a sync of it: b replicates r (and is up to date, so its own
    // daemon holds no sync session).
    mars_testkit::repl::join(&b, "r", 16 << 20);
    mars_testkit::repl::wait_uptodate(&b, "r", 60);
    let pid = a.pid().expect("running");
    let tls = mars_tls::PeerTls::new(&b.credentials()).unwrap();
    let cluster = a.cluster_id();
    let hello = mars_wire::Hello::new(
        mars_wire::StreamKind::Sync,
        cluster,
        mars_config::HostName::new("b").unwrap(),
    );
    let mut start = hello.encode();
    mars_wire::encode_frame(
        &mars_wire::Message::SyncStart { res: "r".into() },
        &mut start,
    );
    let (mut served, mut refused) = (0, 0);
    let mut held = Vec::new();
    let t0 = Instant::now();
    for _ in 0..600 {
        let tcp = TcpStream::connect(&a.peer_addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let conn =
            rustls::ClientConnection::new(tls.client.clone(), mars_tls::server_name()).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        s.write_all(&start).unwrap();
        s.flush().unwrap();
        // a's hello, then SyncInfo (served) or a refusal.
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let answer = loop {
            let n = s.read(&mut chunk).expect("an answer");
            assert!(n > 0, "closed without an answer");
            got.extend_from_slice(&chunk[..n]);
            if let Ok(Some((_, h))) = mars_wire::Hello::decode(&got) {
                if let Ok(Some((m, _))) = mars_wire::decode_frame(&got[h..]) {
                    break m;
                }
            }
        };
        match answer {
            mars_wire::Message::SyncInfo { .. } => served += 1,
            mars_wire::Message::Refuse { kind, reason } => {
                assert_eq!(kind, mars_wire::RefuseKind::Limit, "{reason}");
                assert!(reason.contains("try again later"), "{reason}");
                refused += 1;
            }
            m => panic!("unexpected {m:?}"),
        }
        held.push(s);
    }
    eprintln!("600 sync sessions opened in {:?}", t0.elapsed());
    assert_eq!(served, 256, "{refused} refused");
    assert_eq!(refused, 344);
    // With 256 sessions open and waiting, the daemon answers its operator and NBD at once.
    let t = Instant::now();
    a.ok(&["view", "r"]);
    mars_testkit::run(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read 0 1M",
        &a.unix_uri("r"),
    ]));
    eprintln!(
        "view and a 1 MiB NBD read with 256 idle syncs open: {:?}",
        t.elapsed()
    );
    let rss_kib = proc_status(pid, "VmRSS:");
    eprintln!("marsd RSS with 600 sync connections: {} MiB", rss_kib >> 10);
    assert!(rss_kib < 1 << 20, "RSS {rss_kib} KiB exceeds 1 GiB");
    drop(held);
}

/// Raises this process's soft limit on open files to its hard limit.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a local.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// 2,000 connections to the peer port that never send a byte (no TLS handshake, no hello):
/// the daemon holds them without threads or much memory, keeps answering its operator, NBD
/// and its members, and closes every one of them after the 10 s handshake limit.
#[test]
fn two_thousand_idle_connections_are_held_cheaply_and_closed() {
    use std::io::Read;

    raise_nofile();
    let dir = tempdir("mars-hostile-idle");
    let a = Host::start_at(dir.path(), "a", "127.0.0.1");
    let b = Host::start_at(dir.path(), "b", "127.0.0.2");
    a.create_resource("r", 16 << 20);
    b.join(&a);
    let pid = a.pid().expect("running");
    let mut idle = Vec::new();
    for _ in 0..2000 {
        let c = TcpStream::connect(&a.peer_addr).expect("connect");
        idle.push(c);
    }
    let t = Instant::now();
    a.ok(&["view", "r"]);
    mars_testkit::run(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read 0 1M",
        &a.unix_uri("r"),
    ]));
    // A member still gets through (b asks a for changes every second).
    b.ok(&["--timeout", "30", "wait-cluster"]);
    eprintln!(
        "view, NBD read and wait-cluster with 2,000 idle connections: {:?}",
        t.elapsed()
    );
    let (rss_kib, threads) = (proc_status(pid, "VmRSS:"), proc_status(pid, "Threads:"));
    eprintln!(
        "marsd with 2,000 idle connections: RSS {} MiB, {threads} threads",
        rss_kib >> 10
    );
    assert!(rss_kib < 512 << 10, "RSS {rss_kib} KiB");
    assert!(threads < 200, "{threads} threads");
    // Each is closed once the handshake limit (10 s) passed.
    for c in &mut idle {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).unwrap_or(0), 0, "closed without a byte");
    }
}

/// A member (with its real certificate) that answers a metadata request with more entries than
/// were asked for: the puller drops the page and the connection, takes nothing from it, and
/// says why in `view`.
#[test]
fn an_oversized_metadata_page_is_refused() {
    let dir = tempdir("mars-hostile-page");
    let a = Host::start_at(dir.path(), "a", "127.0.0.1");
    let mut b = Host::start_at(dir.path(), "b", "127.0.0.2");
    a.ok(&["create-cluster"]);
    b.join(&a);
    for h in [&a, &b] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    let creds = b.credentials();
    let cluster = a.cluster_id();
    b.stop();
    // b's place, b's certificate, a hostile answer.
    mars_testkit::impostor::answer_one_pull(&b.peer_addr, &creds, cluster, "b", |since, limit| {
        mars_wire::Message::Changes {
            upto: since + 5000,
            entries: (0..=limit)
                .map(|i| mars_wire::Entry {
                    key: format!("junk/k{i}"),
                    value: Some("x".into()),
                    stamp: 1 << 60,
                    origin: "b".into(),
                    sig: Vec::new(),
                })
                .collect(),
        }
    });
    mars_testkit::repl::eventually(20, "a says why", || {
        a.member_error_contains("entries to a request for at most")
    });
    assert!(a.marsadm(&["get-link", "junk/k0"]).status.code() != Some(0));
    a.ok(&["view", "all"]);
}

/// Frame headers announcing the largest frame (33 MiB) on streams that never carry one — a
/// fetch server reads requests, a metadata stream pages of a few MiB — end the stream at once,
/// before anything of the frame is kept: 24 such connections from a member cost a's memory
/// nothing worth noting, and a keeps answering.
#[test]
fn oversized_frame_headers_end_the_stream_before_memory_is_taken() {
    use std::io::{Read, Write};

    let dir = tempdir("mars-hostile-frames");
    let a = Host::start_at(dir.path(), "a", "127.0.0.1");
    let b = Host::start_at(dir.path(), "b", "127.0.0.2");
    a.create_resource("r", 16 << 20);
    b.join(&a);
    b.ok(&["--timeout", "30", "wait-cluster"]);
    let pid = a.pid().expect("running");
    let before = proc_status(pid, "VmRSS:");
    let tls = mars_tls::PeerTls::new(&b.credentials()).unwrap();
    let cluster = a.cluster_id();
    let mut held = Vec::new();
    for i in 0..24 {
        let kind = if i % 2 == 0 {
            mars_wire::StreamKind::Fetch
        } else {
            mars_wire::StreamKind::Meta
        };
        let hello = mars_wire::Hello::new(kind, cluster, mars_config::HostName::new("b").unwrap());
        let tcp = TcpStream::connect(&a.peer_addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let conn =
            rustls::ClientConnection::new(tls.client.clone(), mars_tls::server_name()).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        s.write_all(&hello.encode()).unwrap();
        s.write_all(&mars_wire::MAX_FRAME.to_le_bytes()).unwrap();
        s.write_all(&[0u8; 4096]).unwrap();
        s.flush().unwrap();
        held.push(s);
    }
    let t = Instant::now();
    for s in &mut held {
        // a's hello, then the end of the stream (no refusal frame: the peer broke the protocol).
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    eprintln!(
        "24 oversized headers: every stream ended within {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(15));
    let grown = proc_status(pid, "VmRSS:").saturating_sub(before);
    eprintln!("marsd RSS grew by {} KiB", grown);
    assert!(
        grown < 64 << 10,
        "RSS grew by {grown} KiB for 24 × 4 KiB received"
    );
    mars_testkit::repl::eventually(10, "a says why", || {
        a.log_text()
            .contains("more than the 65536 this stream carries")
            && a.log_text()
                .contains("more than the 8388608 this stream carries")
    });
    a.ok(&["view", "r"]);
    b.ok(&["--timeout", "30", "wait-cluster"]);
}
