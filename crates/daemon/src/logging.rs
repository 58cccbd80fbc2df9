//! Where `marsd`'s log lines go and how they look (`logging.format`, `--log-format`), and the
//! rate limit on repeated warnings and errors.
//!
//! - `text`: human lines on stderr, coloured only on a terminal; span fields in the prefix
//!   (`resource{res=r0}: …`).
//! - `json`: one JSON object per line on stderr (tracing-subscriber's formatter) with the
//!   event's fields and the current span's (`"span":{"res":"r0",…}`).
//! - `journald`: the journal's native protocol (tracing-journald): `PRIORITY` from the level,
//!   `SYSLOG_IDENTIFIER=marsd`, every span and event field as `MARS_NAME` (`MARS_RES`,
//!   `MARS_PEER`: `journalctl MARS_RES=r0`).
//! - `auto`: `journald` when stderr is the journal's stream (systemd sets
//!   `JOURNAL_STREAM=DEV:INODE` of it; a child that inherits the variable but not the stream is
//!   not fooled), else `text`.
//!
//! The resource actors run inside a `resource` span with a `res` field, peer streams inside a
//! `peer` span with a `peer` field (the address); every line inside carries them.
//!
//! Repeated warnings and errors (same level, target, text, resource and peer) are let through
//! once per [`WINDOW`]; a background thread then logs "… (repeated N times in the last 60 s)"
//! for those that were held back ([`Limiter`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::{LogFormat, LogLevel};

/// The same warning at most once in this window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The target of the summaries (never limited themselves).
const REPEAT_TARGET: &str = "marsd::repeated";

/// At most this many distinct messages are tracked; beyond, lines pass unlimited (a flood of
/// distinct messages is no repetition, and the table must not grow without bound).
const MAX_TRACKED: usize = 4096;

/// `SYSLOG_IDENTIFIER` in the journal.
pub const SYSLOG_IDENTIFIER: &str = "marsd";

/// The journal field prefix: a span's or event's field `res` becomes `MARS_RES`.
pub const JOURNAL_FIELD_PREFIX: &str = "MARS";

/// Installs the global subscriber. The level is `MARS_LOG` if set, else `level`. Returns the
/// format actually used (`auto` resolved).
pub fn init(format: LogFormat, level: &LogLevel) -> Result<LogFormat> {
    let filter = match std::env::var("MARS_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::builder()
            .parse(&v)
            .with_context(|| format!("MARS_LOG={v:?} is not a log filter"))?,
        _ => EnvFilter::builder()
            .parse(&level.0)
            .context("logging.level")?,
    };
    // fuser logs every reply the kernel no longer takes as an error: a request interrupted,
    // or in flight while the device is unmounted at a handover. The kernel has failed that
    // request already and nothing is left to do, so it is no operator's business. (A filter
    // that names the target itself, e.g. `MARS_LOG=info,fuser::reply=debug`, still shows it.)
    let filter = if filter.to_string().contains("fuser::reply") {
        filter
    } else {
        filter.add_directive("fuser::reply=off".parse().expect("a valid directive"))
    };
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let limiter = Arc::new(Mutex::new(Limiter::new(WINDOW)));
    let output: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Journald => {
            Box::new(journald_layer().context("--log-format journald: cannot reach the journal")?)
        }
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::stderr),
        ),
        _ => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(RateLimit {
            limiter: limiter.clone(),
        })
        .with(output)
        .try_init()
        .context("installing the log subscriber")?;
    spawn_summaries(limiter);
    Ok(format)
}

/// tracing-journald's layer as marsd uses it.
pub fn journald_layer() -> std::io::Result<tracing_journald::Layer> {
    Ok(tracing_journald::layer()?
        .with_syslog_identifier(SYSLOG_IDENTIFIER.into())
        .with_field_prefix(Some(JOURNAL_FIELD_PREFIX.into())))
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` holds its
/// `DEV:INODE` (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on fd 2 into a valid struct.
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    journal_stream_matches(&v, st.st_dev, st.st_ino)
}

fn journal_stream_matches(var: &str, dev: u64, ino: u64) -> bool {
    var.split_once(':').is_some_and(|(d, i)| {
        d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
    })
}

/// Logs the summaries of held-back lines as their windows end.
fn spawn_summaries(limiter: Arc<Mutex<Limiter>>) {
    let _ = std::thread::Builder::new()
        .name("marsd-log".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let due = limiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .due(Instant::now());
            for s in due {
                emit_summary(&s);
            }
        });
}

fn emit_summary(s: &Summary) {
    let span = tracing::info_span!(
        "repeated",
        res = tracing::field::Empty,
        peer = tracing::field::Empty
    );
    if let Some(r) = &s.res {
        span.record("res", r.as_str());
    }
    if let Some(p) = &s.peer {
        span.record("peer", p.as_str());
    }
    let _g = span.enter();
    let secs = s.window.as_secs();
    if s.level == Level::ERROR {
        tracing::error!(target: REPEAT_TARGET, "{} (repeated {} times in the last {secs} s)", s.message, s.count);
    } else {
        tracing::warn!(target: REPEAT_TARGET, "{} (repeated {} times in the last {secs} s)", s.message, s.count);
    }
}

// ------------------------------------------------------------------------------ the limiter

/// What identifies "the same line".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub level: Level,
    pub target: String,
    /// The message and the event's other fields, rendered.
    pub text: String,
    pub res: Option<String>,
    pub peer: Option<String>,
}

#[derive(Debug)]
struct Entry {
    since: Instant,
    held: u64,
}

/// A line held back this many times in the window that just ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub level: Level,
    pub message: String,
    pub res: Option<String>,
    pub peer: Option<String>,
    pub count: u64,
    pub window: Duration,
}

/// Pure bookkeeping (the clock comes in), so it is tested without waiting a minute.
#[derive(Debug)]
pub struct Limiter {
    window: Duration,
    entries: HashMap<Key, Entry>,
}

impl Limiter {
    pub fn new(window: Duration) -> Limiter {
        Limiter {
            window,
            entries: HashMap::new(),
        }
    }

    /// Whether the line `key` goes out now: the first in a window does, the rest are counted.
    pub fn admit(&mut self, key: Key, now: Instant) -> bool {
        if let Some(e) = self.entries.get_mut(&key) {
            if now.duration_since(e.since) < self.window {
                e.held += 1;
                return false;
            }
            // A window without a summary pending (`due` removes the others): a new one.
            e.since = now;
            return true;
        }
        if self.entries.len() < MAX_TRACKED {
            self.entries.insert(
                key,
                Entry {
                    since: now,
                    held: 0,
                },
            );
        }
        true
    }

    /// The summaries of windows that ended by `now`; a line still repeating gets a new window
    /// (so it stays quiet and is summarised once per window), one that stopped is forgotten.
    pub fn due(&mut self, now: Instant) -> Vec<Summary> {
        let mut out = Vec::new();
        let window = self.window;
        self.entries.retain(|k, e| {
            if now.duration_since(e.since) < window {
                return true;
            }
            if e.held == 0 {
                return false;
            }
            out.push(Summary {
                level: k.level,
                message: k.text.clone(),
                res: k.res.clone(),
                peer: k.peer.clone(),
                count: e.held,
                window,
            });
            e.held = 0;
            e.since = now;
            true
        });
        out.sort_by(|a, b| a.message.cmp(&b.message));
        out
    }
}

// ------------------------------------------------------------------------------ the layer

/// Holds back repeated warnings and errors (for every output: it runs before them).
pub struct RateLimit {
    pub limiter: Arc<Mutex<Limiter>>,
}

/// The `res` and `peer` fields of a span, kept in its extensions.
#[derive(Debug, Default, Clone)]
struct Scope {
    res: Option<String>,
    peer: Option<String>,
}

impl Visit for Scope {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "res" => self.res = Some(value.to_string()),
            "peer" => self.peer = Some(value.to_string()),
            _ => {}
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "res" => self.res = Some(format!("{value:?}")),
            "peer" => self.peer = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

/// An event's fields as one line: the message, then `name=value` for the others.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S> Layer<S> for RateLimit
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut scope = Scope::default();
        attrs.record(&mut scope);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(scope);
        }
    }

    fn on_record(&self, id: &Id, values: &tracing::span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            if let Some(scope) = ext.get_mut::<Scope>() {
                values.record(scope);
            }
        }
    }

    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() > Level::WARN || meta.target() == REPEAT_TARGET {
            return true;
        }
        let mut scope = Scope::default();
        if let Some(leaf) = ctx.event_span(event) {
            for span in leaf.scope() {
                if let Some(s) = span.extensions().get::<Scope>() {
                    scope.res = scope.res.or_else(|| s.res.clone());
                    scope.peer = scope.peer.or_else(|| s.peer.clone());
                }
            }
        }
        let mut text = Text::default();
        event.record(&mut text);
        let key = Key {
            level: *meta.level(),
            target: meta.target().to_string(),
            text: text.0,
            res: scope.res,
            peer: scope.peer,
        };
        self.limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(key, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str, res: Option<&str>) -> Key {
        Key {
            level: Level::WARN,
            target: "t".into(),
            text: text.into(),
            res: res.map(Into::into),
            peer: None,
        }
    }

    #[test]
    fn limiter_lets_one_through_per_window_and_counts_the_rest() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = Limiter::new(s(60));
        assert!(l.admit(key("split brain", Some("r0")), t0));
        for i in 1..=20 {
            assert!(!l.admit(key("split brain", Some("r0")), t0 + s(2 * i)));
        }
        // Another resource, another text: their own windows.
        assert!(l.admit(key("split brain", Some("r1")), t0 + s(5)));
        assert!(l.admit(key("other", Some("r0")), t0 + s(5)));
        assert!(l.due(t0 + s(59)).is_empty());
        let d = l.due(t0 + s(60));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].count, 20);
        assert_eq!(d[0].message, "split brain");
        assert_eq!(d[0].res.as_deref(), Some("r0"));
        // Still repeating: quiet, summarised a window later.
        assert!(!l.admit(key("split brain", Some("r0")), t0 + s(61)));
        assert!(l.due(t0 + s(100)).is_empty());
        let d = l.due(t0 + s(120));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].count, 1);
        // Stopped: forgotten after a quiet window, then the next one goes out at once.
        assert!(l.due(t0 + s(180)).is_empty());
        assert!(l.admit(key("split brain", Some("r0")), t0 + s(181)));
        // Lines that were never repeated leave no summary.
        assert!(l.due(t0 + s(1000)).is_empty());
        assert!(l.entries.is_empty());
    }

    #[test]
    fn limiter_is_bounded() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Duration::from_secs(60));
        for i in 0..MAX_TRACKED + 10 {
            assert!(l.admit(key(&format!("m{i}"), None), t0));
        }
        assert_eq!(l.entries.len(), MAX_TRACKED);
        // Untracked lines are never held back.
        assert!(l.admit(key(&format!("m{}", MAX_TRACKED + 5), None), t0));
    }

    #[test]
    fn journal_stream_detection() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(!journal_stream_matches("8:12345", 8, 1));
        assert!(!journal_stream_matches("garbage", 8, 12345));
    }

    /// A writer for the fmt layer that collects lines.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn layer_holds_back_repeats_per_resource_and_summarises() {
        let out = Lines::default();
        let w = out.clone();
        let limiter = Arc::new(Mutex::new(Limiter::new(Duration::from_secs(60))));
        let sub = tracing_subscriber::registry()
            .with(RateLimit {
                limiter: limiter.clone(),
            })
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || w.clone()),
            );
        tracing::subscriber::with_default(sub, || {
            for res in ["r0", "r1"] {
                let span = tracing::info_span!("resource", res);
                let _g = span.enter();
                for _ in 0..5 {
                    tracing::warn!("split brain between a and b");
                    tracing::info!("info lines are never held back");
                }
            }
            let due = limiter
                .lock()
                .unwrap()
                .due(Instant::now() + Duration::from_secs(61));
            assert_eq!(due.len(), 2);
            for s in &due {
                emit_summary(s);
            }
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let warns = |res: &str| {
            lines
                .iter()
                .filter(|l| l.contains("WARN") && l.contains(&format!("res=\"{res}\"")))
                .count()
        };
        assert_eq!(warns("r0"), 2, "{text}");
        assert_eq!(warns("r1"), 2, "{text}");
        assert_eq!(
            lines.iter().filter(|l| l.contains("INFO")).count(),
            10,
            "{text}"
        );
        assert_eq!(
            lines
                .iter()
                .filter(|l| l
                    .contains("split brain between a and b (repeated 4 times in the last 60 s)"))
                .count(),
            2,
            "{text}"
        );
    }

    /// The journald layer as configured, against a journal socket of our own: the test runs
    /// in a thread with its own mount namespace and a tmpfs on /run (root only; the machine
    /// under test runs as root).
    #[test]
    fn journald_fields() {
        let handle = std::thread::spawn(|| -> Result<Vec<u8>, String> {
            // SAFETY: namespace and mount calls on this thread only; arguments are valid
            // C strings.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_FS) != 0 {
                    return Err(format!("unshare: {}", std::io::Error::last_os_error()));
                }
                let none = c"none".as_ptr();
                if libc::mount(
                    none,
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(format!(
                        "make-rprivate: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                if libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/run".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(format!("mount tmpfs: {}", std::io::Error::last_os_error()));
                }
            }
            std::fs::create_dir_all("/run/systemd/journal").map_err(|e| e.to_string())?;
            let sock = std::os::unix::net::UnixDatagram::bind("/run/systemd/journal/socket")
                .map_err(|e| e.to_string())?;
            let layer = journald_layer().map_err(|e| e.to_string())?;
            let sub = tracing_subscriber::registry().with(layer);
            tracing::subscriber::with_default(sub, || {
                let res = tracing::info_span!("resource", res = "r0");
                let _r = res.enter();
                let peer = tracing::info_span!("peer", peer = "127.0.0.2:7777");
                let _p = peer.enter();
                tracing::warn!(logfile = 42, "a warning");
            });
            let mut buf = vec![0u8; 65536];
            loop {
                let n = sock.recv(&mut buf).map_err(|e| e.to_string())?;
                // The layer's probe at construction is an empty datagram.
                if n > 0 {
                    return Ok(buf[..n].to_vec());
                }
            }
        });
        let payload = handle.join().expect("thread").expect("journal socket");
        let fields = parse_journal(&payload);
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PRIORITY"), Some("4"), "{fields:?}");
        assert_eq!(get("SYSLOG_IDENTIFIER"), Some("marsd"), "{fields:?}");
        assert_eq!(get("MESSAGE"), Some("a warning"), "{fields:?}");
        assert_eq!(get("MARS_RES"), Some("r0"), "{fields:?}");
        assert_eq!(get("MARS_PEER"), Some("127.0.0.2:7777"), "{fields:?}");
        assert_eq!(get("MARS_LOGFILE"), Some("42"), "{fields:?}");
    }

    /// The journal's native protocol: `NAME=value\n`, or `NAME\n` + 64-bit LE length + value +
    /// `\n` (systemd.io/JOURNAL_NATIVE_PROTOCOL).
    fn parse_journal(mut b: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let nl = b.iter().position(|&c| c == b'\n').expect("newline");
            let line = &b[..nl];
            if let Some(eq) = line.iter().position(|&c| c == b'=') {
                out.push((
                    String::from_utf8_lossy(&line[..eq]).into_owned(),
                    String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
                ));
                b = &b[nl + 1..];
            } else {
                let name = String::from_utf8_lossy(line).into_owned();
                let len = u64::from_le_bytes(b[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let v = &b[nl + 9..nl + 9 + len];
                out.push((name, String::from_utf8_lossy(v).into_owned()));
                b = &b[nl + 9 + len + 1..];
            }
        }
        out
    }
}
