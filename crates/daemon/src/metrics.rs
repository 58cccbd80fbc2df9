//! The metrics endpoint (`marsd --metrics-listen ADDR:PORT`): `GET /metrics` in the Prometheus
//! text format (0.0.4), or OpenMetrics when the scraper asks for it (`Accept:
//! application/openmetrics-text`). Off unless configured.
//!
//! Every scrape builds the metrics afresh from what `marsadm view` shows (`control::view`,
//! which reads the actors' snapshots and this host's live state) plus the peer port's counters
//! (`traffic.rs`): no second source of truth, and a resource that is gone leaves no stale series.
//! `docs/monitoring.md` lists every metric.
//!
//! The HTTP side is a small HTTP/1.1 responder, bounded like the other listeners: at most
//! [`MAX_CONNECTIONS`] at once (more are closed at once), the request head within
//! [`HEAD_TIMEOUT`] and [`MAX_HEAD`] bytes, one request per connection, only `GET /metrics`
//! (404 for any other path, 405 for another method, 400 for a malformed request).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use mars_api::{ClusterView, DiskState, ReplState, ResourceView};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::host::Host;
use crate::listen::AcceptErrors;
use crate::traffic::{self, PeerError};

/// Scrapes served at once; a scraper polls every few seconds, so a handful is plenty.
pub const MAX_CONNECTIONS: usize = 16;
/// The request line and headers must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read.
pub const MAX_HEAD: usize = 8 << 10;
/// The window `view` uses for "alive" (its default).
const WINDOW: Duration = Duration::from_secs(60);

/// The roles; one series each (and `Unknown` for a member whose report is missing).
pub const ROLES: &[&str] = &["Primary", "Secondary"];

/// Serves the endpoint until the task is dropped.
pub async fn serve(host: Arc<Host>, l: TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut errors = AcceptErrors::new("metrics listener");
    loop {
        match l.accept().await {
            Ok((s, from)) => {
                errors.accepted();
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::debug!("metrics: closed a connection from {from}: too many");
                    continue;
                };
                let h = host.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = connection(&h, s).await {
                        tracing::debug!("metrics connection from {from}: {e:#}");
                    }
                });
            }
            Err(e) => errors.failed(e).await,
        }
    }
}

/// What the scraper asked for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics { openmetrics: bool },
    NotFound,
    BadMethod,
}

/// Parses a request head (up to the empty line).
fn parse_head(head: &str) -> Option<Asked> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target, version) = (first.next()?, first.next()?, first.next()?);
    if !version.starts_with("HTTP/1.") || first.next().is_some() {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return Some(Asked::NotFound);
    }
    if method != "GET" {
        return Some(Asked::BadMethod);
    }
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    Some(Asked::Metrics { openmetrics })
}

async fn read_head(s: &mut TcpStream) -> Result<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() > MAX_HEAD {
            bail!("request head longer than {MAX_HEAD} bytes");
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the end of the request head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn connection(host: &Host, mut s: TcpStream) -> Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut s)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let _ = respond(&mut s, "400 Bad Request", "text/plain", "bad request\n").await;
            return Err(e);
        }
        Err(_) => bail!("no request within {HEAD_TIMEOUT:?}"),
    };
    match parse_head(&head) {
        None => respond(&mut s, "400 Bad Request", "text/plain", "bad request\n").await,
        Some(Asked::NotFound) => {
            respond(
                &mut s,
                "404 Not Found",
                "text/plain",
                "only /metrics here\n",
            )
            .await
        }
        Some(Asked::BadMethod) => {
            respond(&mut s, "405 Method Not Allowed", "text/plain", "GET only\n").await
        }
        Some(Asked::Metrics { openmetrics }) => {
            let view = crate::control::view(host, host.all(), true, WINDOW).await;
            let body = render(&view, &Counters::now(), openmetrics);
            let ctype = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            respond(&mut s, "200 OK", ctype, &body).await
        }
    }
}

async fn respond(s: &mut TcpStream, status: &str, ctype: &str, body: &str) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await?;
    Ok(())
}

/// The peer port's counters at one moment.
#[derive(Debug, Default)]
pub struct Counters {
    /// `(peer, stream kind, received, sent)`.
    pub traffic: Vec<traffic::Row>,
    /// `(kind, count)`.
    pub errors: Vec<(&'static str, u64)>,
}

impl Counters {
    fn now() -> Counters {
        Counters {
            traffic: traffic::all(),
            errors: PeerError::ALL
                .iter()
                .map(|e| (e.as_str(), traffic::errors(*e)))
                .collect(),
        }
    }
}

type Labels = Vec<(&'static str, String)>;
type G = Family<Labels, Gauge<f64, AtomicU64>>;
type C = Family<Labels, Counter>;

/// Registers gauges and counters by name as they are first used.
struct Out {
    reg: Registry,
    gauges: std::collections::BTreeMap<&'static str, G>,
    counters: std::collections::BTreeMap<&'static str, C>,
}

impl Out {
    fn gauge(&mut self, name: &'static str, help: &str, labels: Labels, v: f64) {
        let f = self.gauges.entry(name).or_insert_with(|| {
            let f = G::default();
            self.reg.register(name, help, f.clone());
            f
        });
        f.get_or_create(&labels).set(v);
    }
    fn counter(&mut self, name: &'static str, help: &str, labels: Labels, v: u64) {
        let f = self.counters.entry(name).or_insert_with(|| {
            let f = C::default();
            self.reg.register(name, help, f.clone());
            f
        });
        f.get_or_create(&labels).inc_by(v);
    }
    /// One series per possible state (and the state shown, if it is not among them): 1 for
    /// the one it is in.
    fn states(&mut self, name: &'static str, help: &str, labels: &Labels, all: &[&str], s: &str) {
        let base = s;
        for st in all
            .iter()
            .copied()
            .chain((!all.contains(&base)).then_some(base))
        {
            let mut l = labels.clone();
            l.push(("state", st.to_string()));
            self.gauge(name, help, l, if st == base { 1.0 } else { 0.0 });
        }
    }
}

fn b(x: bool) -> f64 {
    if x {
        1.0
    } else {
        0.0
    }
}

/// The metrics text for `view` (this host's `view` of every resource, with its members).
pub fn render(view: &ClusterView, c: &Counters, openmetrics: bool) -> String {
    let mut o = Out {
        reg: Registry::default(),
        gauges: Default::default(),
        counters: Default::default(),
    };
    let me = view.host.clone();
    let hl = || vec![("host", me.clone())];
    o.gauge(
        "mars_info",
        "This daemon: 1, with its version",
        vec![
            ("host", me.clone()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
        ],
        1.0,
    );
    if let Some(sp) = &view.space {
        for (name, help, v) in [
            (
                "mars_root_free_bytes",
                "Bytes available on the root's filesystem",
                sp.free_bytes,
            ),
            (
                "mars_root_used_bytes",
                "Bytes used on the root's filesystem (total minus available)",
                sp.used_bytes,
            ),
            (
                "mars_root_total_bytes",
                "Size of the root's filesystem",
                sp.total_bytes,
            ),
        ] {
            if let Some(v) = v {
                o.gauge(name, help, hl(), v as f64);
            }
        }
        o.gauge(
            "mars_root_log_bytes",
            "Bytes of logfiles on the root (every resource)",
            hl(),
            sp.log_bytes as f64,
        );
        o.gauge(
            "mars_root_preallocated_bytes",
            "Bytes allocated ahead for logfiles and not written yet",
            hl(),
            sp.preallocated_bytes as f64,
        );
        o.gauge(
            "mars_root_min_free_bytes",
            "Free space the root keeps (below it secondaries drop their logfiles)",
            hl(),
            sp.min_free_bytes as f64,
        );
        o.gauge(
            "mars_root_emergency_free_bytes",
            "Below this free space a primary enters emergency mode",
            hl(),
            sp.emergency_free_bytes as f64,
        );
        o.gauge(
            "mars_log_growth_bytes_per_second",
            "How fast the logfiles on the root grow (about the last minute)",
            hl(),
            sp.log_growth_bytes_per_sec,
        );
        o.gauge(
            "mars_root_full_in_seconds",
            "Seconds until the root's free space is used up at the current log growth; +Inf while the logs do not grow",
            hl(),
            sp.full_in_secs.unwrap_or(f64::INFINITY),
        );
        for r in &sp.resources {
            let rl = || vec![("resource", r.name.clone()), ("host", me.clone())];
            o.gauge(
                "mars_resource_logfiles",
                "Logfiles of the resource on this host",
                rl(),
                r.logfiles as f64,
            );
            o.gauge(
                "mars_resource_log_bytes",
                "Bytes of the resource's logfiles on this host",
                rl(),
                r.log_bytes as f64,
            );
            o.gauge(
                "mars_resource_preallocated_bytes",
                "Bytes preallocated for the resource's logfiles on this host",
                rl(),
                r.preallocated_bytes as f64,
            );
            if let Some(n) = r.reclaim_below {
                o.gauge(
                    "mars_resource_reclaim_below_logfile",
                    "Logfiles below this number may be deleted here (minimum pin of the members that hold)",
                    rl(),
                    n as f64,
                );
            }
            for p in &r.pins {
                let pl = || vec![("resource", r.name.clone()), ("host", p.host.clone())];
                if let Some(n) = p.logfile {
                    o.gauge(
                        "mars_resource_pin_logfile",
                        "The oldest logfile the member still needs",
                        pl(),
                        n as f64,
                    );
                }
                o.gauge(
                    "mars_resource_pin_holds",
                    "1: the member's pin holds back deletion on this host (heard from within unreachable-limit)",
                    pl(),
                    b(p.holds),
                );
            }
        }
    }
    for m in view.members.iter().filter(|m| !m.this_host) {
        let pl = || vec![("peer", m.host.clone())];
        o.gauge(
            "mars_peer_connected",
            "1: this host exchanged metadata with the peer within the last few seconds",
            pl(),
            b(m.connected),
        );
        o.gauge(
            "mars_peer_alive",
            "1: the peer's liveness stamp is younger than 60 s",
            pl(),
            b(m.alive),
        );
        if let Some(a) = m.age_secs {
            o.gauge(
                "mars_peer_age_seconds",
                "Seconds since this host last heard the peer's liveness stamp move",
                pl(),
                a,
            );
        }
        if let Some(d) = m.clock_skew_secs {
            o.gauge(
                "mars_peer_clock_skew_seconds",
                "The peer's wall clock minus this host's (positive: ahead), from its liveness stamps",
                pl(),
                d,
            );
        }
    }
    for t in &c.traffic {
        let l = || vec![("peer", t.peer.clone()), ("stream", t.kind.to_string())];
        o.counter(
            "mars_peer_received_bytes",
            "Bytes received from the peer (after the hellos; compressed frames as they travel)",
            l(),
            t.received,
        );
        o.counter(
            "mars_peer_sent_bytes",
            "Bytes sent to the peer (after the hellos; compressed frames as they travel)",
            l(),
            t.sent,
        );
        o.counter(
            "mars_peer_received_raw_bytes",
            "The received frames' size uncompressed (equals the received bytes without compression)",
            l(),
            t.received_raw,
        );
        o.counter(
            "mars_peer_sent_raw_bytes",
            "The sent frames' size uncompressed (raw/sent is the compression ratio)",
            l(),
            t.sent_raw,
        );
    }
    for (kind, n) in &c.errors {
        o.counter(
            "mars_peer_errors",
            "Errors on the peer port: refused peers, failed connects, served streams that failed",
            vec![("kind", kind.to_string())],
            *n,
        );
    }
    for r in &view.resources {
        resource(&mut o, &me, r);
    }
    let mut out = String::new();
    encode_registry(&mut out, &o.reg).expect("writing to a String");
    // The encoder writes infinity as `inf`; both formats spell it `+Inf`.
    let mut out = out
        .replace(" inf\n", " +Inf\n")
        .replace(" -inf\n", " -Inf\n");
    if openmetrics {
        encode_eof(&mut out).expect("writing to a String");
    }
    out
}

/// One resource: this host's own lines, then every member as this host sees it.
fn resource(o: &mut Out, me: &str, r: &ResourceView) {
    let l = |h: &str| vec![("resource", r.name.clone()), ("host", h.to_string())];
    o.gauge(
        "mars_resource_size_bytes",
        "Size of the resource",
        l(me),
        r.size as f64,
    );
    o.gauge(
        "mars_resource_split_brain",
        "1: the members' histories have forked (as this host sees it)",
        l(me),
        b(r.split_brain.is_some()),
    );
    o.gauge(
        "mars_resource_open_count",
        "Openers of the device on this host",
        l(me),
        r.open_count as f64,
    );
    if let Some(ms) = r.caught_up_ms {
        o.gauge(
            "mars_resource_caught_up_age_seconds",
            "Secondary: seconds since the primary confirmed this replica has everything durable",
            l(me),
            ms as f64 / 1000.0,
        );
    }
    if let Some(log) = &r.log {
        for (pos, v) in [
            ("appended", &log.appended),
            ("durable", &log.durable),
            ("written_back", &log.written_back),
        ] {
            {
                let (file, off) = (v.logfile, v.offset);
                let pl = || {
                    vec![
                        ("resource", r.name.clone()),
                        ("host", me.to_string()),
                        ("position", pos.to_string()),
                    ]
                };
                o.gauge(
                    "mars_log_position_logfile",
                    "Primary: the logfile number of a log position",
                    pl(),
                    file as f64,
                );
                o.gauge(
                    "mars_log_position_bytes",
                    "Primary: the byte offset of a log position within its logfile",
                    pl(),
                    off as f64,
                );
            }
        }
        o.gauge(
            "mars_log_dirty_bytes",
            "Primary: written data held in memory until writeback",
            l(me),
            log.dirty_bytes as f64,
        );
        o.counter(
            "mars_log_writes",
            "Primary: writes logged since the volume was opened",
            l(me),
            log.writes,
        );
    }
    for (name, help, p) in [
        (
            "fetch",
            "Secondary: log bytes fetched per second",
            r.fetch.as_ref(),
        ),
        (
            "replay",
            "Secondary: log bytes replayed per second",
            r.replay.as_ref(),
        ),
        (
            "sync",
            "Secondary: bytes of the full sync copied per second",
            r.sync.as_ref(),
        ),
    ] {
        let Some(p) = p else { continue };
        let (rate, rest): (&'static str, &'static str) = match name {
            "fetch" => (
                "mars_resource_fetch_rate_bytes_per_second",
                "mars_resource_fetch_rest_bytes",
            ),
            "replay" => (
                "mars_resource_replay_rate_bytes_per_second",
                "mars_resource_replay_rest_bytes",
            ),
            _ => (
                "mars_resource_sync_rate_bytes_per_second",
                "mars_resource_sync_rest_bytes",
            ),
        };
        o.gauge(rate, help, l(me), p.rate as f64);
        o.gauge(rest, "Bytes still to do", l(me), p.rest() as f64);
    }
    for m in &r.members {
        let ml = l(&m.host);
        o.states(
            "mars_resource_role",
            "1 for the member's role (as it reports it)",
            &ml,
            ROLES,
            m.role.map_or("Unknown", |r| r.as_str()),
        );
        o.gauge(
            "mars_resource_designated_primary",
            "1: the member is the designated primary",
            ml.clone(),
            b(r.primary.as_deref() == Some(m.host.as_str())),
        );
        o.states(
            "mars_resource_disk_state",
            "1 for the member's MARS disk state",
            &ml,
            &DiskState::ALL
                .iter()
                .map(|d| d.as_str())
                .collect::<Vec<_>>(),
            m.disk_state.as_str(),
        );
        o.states(
            "mars_resource_repl_state",
            "1 for the member's MARS replication state",
            &ml,
            &ReplState::ALL
                .iter()
                .map(|d| d.as_str())
                .collect::<Vec<_>>(),
            m.repl_state.as_str(),
        );
        o.gauge(
            "mars_resource_alive",
            "1: the member was heard from within 60 s",
            ml.clone(),
            b(m.alive),
        );
        o.gauge(
            "mars_resource_consistent",
            "1: the member's disk is consistent (no full sync pending or running)",
            ml.clone(),
            b(m.consistent),
        );
        o.gauge(
            "mars_resource_emergency",
            "1: the member is a primary in emergency mode (writes bypass the log)",
            ml.clone(),
            b(m.emergency),
        );
        o.gauge(
            "mars_resource_stuck",
            "1: the member reports its replication stuck (see `marsadm view`)",
            ml.clone(),
            b(m.stuck.is_some()),
        );
        if let Some(behind) = m.behind {
            o.gauge(
                "mars_resource_lag_bytes",
                "Bytes of the primary's log the member has not applied",
                ml.clone(),
                behind as f64,
            );
        }
        if let Some(s) = m.lag_secs {
            o.gauge(
                "mars_resource_lag_seconds",
                "Age of the oldest write the member has not applied (0: none)",
                ml.clone(),
                s,
            );
        }
        if let Some(mars_api::LogPos {
            logfile: file,
            offset: off,
        }) = m.applied
        {
            o.gauge(
                "mars_resource_applied_logfile",
                "Logfile of the member's applied position (replay or writeback)",
                ml.clone(),
                file as f64,
            );
            o.gauge(
                "mars_resource_applied_bytes",
                "Offset of the member's applied position within that logfile",
                ml.clone(),
                off as f64,
            );
        }
        if let Some(y) = &m.sync {
            o.gauge(
                "mars_resource_member_sync_rest_bytes",
                "Bytes of the member's full sync still to copy",
                ml.clone(),
                y.rest() as f64,
            );
            o.gauge(
                "mars_resource_member_sync_rate_bytes_per_second",
                "The member's full sync rate",
                ml.clone(),
                y.rate as f64,
            );
        }
        if let Some(ok) = m.systemd_ok {
            o.gauge(
                "mars_resource_systemd_ok",
                "The member's last systemd start/stop: 1 succeeded, 0 failed",
                ml.clone(),
                b(ok),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        assert_eq!(
            parse_head("GET /metrics HTTP/1.1\r\nHost: x"),
            Some(Asked::Metrics { openmetrics: false })
        );
        assert_eq!(
            parse_head(
                "GET /metrics?x=1 HTTP/1.0\r\naccept: application/openmetrics-text;version=1.0.0"
            ),
            Some(Asked::Metrics { openmetrics: true })
        );
        assert_eq!(parse_head("GET / HTTP/1.1"), Some(Asked::NotFound));
        assert_eq!(parse_head("POST /metrics HTTP/1.1"), Some(Asked::BadMethod));
        assert_eq!(parse_head("GET /metrics"), None);
        assert_eq!(parse_head("garbage"), None);
    }

    #[test]
    fn renders_states_and_units() {
        let view: ClusterView = serde_json::from_value(serde_json::json!({
            "host": "a", "cluster": null, "members": [],
            "resources": [{
                "name": "r", "size_bytes": 4096, "disk": "/d", "role": "Primary", "primary": "a",
                "disk_state": "WriteBack", "writeback_bytes": 1048576,
                "repl_state": "Replicating", "flags": "",
                "log": null, "nbd_unix_uri": null, "nbd_tcp_uri": null, "open_count": 1,
                "error": null,
                "members": [{"host": "b", "disk": "/d", "role": "Secondary",
                    "disk_state": "OutDated[FR]", "repl_state": "Replaying", "flags": "",
                    "alive": true, "consistent": true,
                    "applied": {"logfile": 3, "offset": 100}, "behind_bytes": 5,
                    "lag_secs": 1.5, "sync": null, "stuck": null}],
                "split_brain": {"logfile": 3, "sides": []}
            }],
            "space": {"root": "/r", "free_bytes": 10, "used_bytes": 5, "total_bytes": 15,
                "log_bytes": 1, "preallocated_bytes": 2, "log_growth_bytes_per_sec": 0.0,
                "full_in_secs": null, "min_free_bytes": 1, "emergency_free_bytes": 1,
                "resources": []}
        }))
        .unwrap();
        let c = Counters {
            traffic: vec![traffic::Row {
                peer: "b".into(),
                kind: "fetch",
                received: 7,
                sent: 9,
                received_raw: 21,
                sent_raw: 9,
                method: Some("lz4"),
            }],
            errors: vec![("refused", 2)],
        };
        let t = render(&view, &c, false);
        for want in [
            "mars_resource_disk_state{resource=\"r\",host=\"b\",state=\"OutDated[FR]\"} 1",
            "mars_resource_disk_state{resource=\"r\",host=\"b\",state=\"UpToDate\"} 0",
            "mars_resource_repl_state{resource=\"r\",host=\"b\",state=\"Replaying\"} 1",
            "mars_resource_lag_seconds{resource=\"r\",host=\"b\"} 1.5",
            "mars_resource_lag_bytes{resource=\"r\",host=\"b\"} 5.0",
            "mars_resource_applied_logfile{resource=\"r\",host=\"b\"} 3.0",
            "mars_resource_split_brain{resource=\"r\",host=\"a\"} 1",
            "mars_root_full_in_seconds{host=\"a\"} +Inf",
            "mars_peer_received_bytes_total{peer=\"b\",stream=\"fetch\"} 7",
            "mars_peer_received_raw_bytes_total{peer=\"b\",stream=\"fetch\"} 21",
            "mars_peer_sent_raw_bytes_total{peer=\"b\",stream=\"fetch\"} 9",
            "mars_peer_errors_total{kind=\"refused\"} 2",
            "# TYPE mars_peer_sent_bytes counter",
        ] {
            assert!(t.contains(want), "{want} missing in\n{t}");
        }
        assert!(!t.contains("# EOF"));
        assert!(render(&view, &c, true).ends_with("# EOF\n"));
    }
}
