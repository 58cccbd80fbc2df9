//! Scraping a daemon's metrics endpoint (`marsd --metrics-listen`) and reading its values.

use std::io::{Read, Write};
use std::time::Duration;

use crate::Host;

/// A free `127.0.0.1:PORT` for `MARS_METRICS_LISTEN`.
pub fn listen_addr() -> String {
    format!("127.0.0.1:{}", crate::free_port())
}

/// `GET /metrics` at `addr` (HTTP/1.1, as Prometheus asks); returns the body, panics on a
/// status other than 200.
pub fn scrape(addr: &str) -> String {
    let (status, body) = get(addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    body
}

/// A request for `path`: the status line and the body.
pub fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// The value of the series `name{labels}` exactly as written (e.g.
/// `mars_resource_lag_seconds{resource="r",host="b"}`), if present.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
        match rest.trim() {
            "+Inf" => Some(f64::INFINITY),
            v => v.parse().ok(),
        }
    })
}

/// The value of `series` on `h`'s endpoint at `addr`.
pub fn of(addr: &str, series: &str) -> Option<f64> {
    value(&scrape(addr), series)
}

/// `marsadm check ARGS…` on `h`: the exit code and the output line.
pub fn check(h: &Host, args: &[&str]) -> (i32, String) {
    let mut a = vec!["check"];
    a.extend_from_slice(args);
    let o = h.marsadm(&a);
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}
