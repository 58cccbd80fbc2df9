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
