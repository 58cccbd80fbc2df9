//! `marsd`'s settings: the configuration file (`/etc/mars/marsd.toml`, `--config PATH`, env
//! `MARS_CONFIG`), the command-line flags (and their environment variables) and the defaults,
//! merged in that order of precedence: flag > file > default.
//!
//! The file's layout is the [`Config`] struct: top-level keys `host`, `root`, `listen`,
//! `advertise`, `insecure`; sections `[nbd]`, `[device]`, `[txlog]`, `[space]`, `[metrics]`,
//! `[systemd]`, `[logging]`. Unknown keys are errors (`deny_unknown_fields`) that name the key,
//! its section and its line; every value is checked when the file is read, so a wrong type or a
//! bad size is refused before anything starts. `dist/marsd.toml` documents every key with its
//! default; a test below keeps it complete.
//!
//! This module only reads and checks; `main.rs` turns the settings into the daemon's parts.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use clap::Parser;
use mars_config::{parse_size, HostName};
use serde::{Deserialize, Serialize};

/// Where the configuration file is looked for when neither `--config` nor `MARS_CONFIG` names
/// one. A missing default file is no error (every key has a default).
pub const DEFAULT_CONFIG: &str = "/etc/mars/marsd.toml";

/// The peer port when an address has none (as MARS: 7777).
pub const DEFAULT_PORT: u16 = 7777;

// ------------------------------------------------------------------------------ value types

/// A peer address `ADDR[:PORT]` (IPv6 in brackets when with a port), normalised with the
/// default port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeerAddr(pub SocketAddr);

impl FromStr for PeerAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(PeerAddr(a));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(PeerAddr(SocketAddr::new(ip, DEFAULT_PORT)));
        }
        if let Ok(ip) = s
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(PeerAddr(SocketAddr::new(ip, DEFAULT_PORT)));
        }
        Err(format!(
            "{s:?} is not an IP address with an optional port (ADDR[:PORT], IPv6 as [ADDR]:PORT)"
        ))
    }
}

impl TryFrom<String> for PeerAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<PeerAddr> for String {
    fn from(a: PeerAddr) -> String {
        a.0.to_string()
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The advertised address: an IP with an optional port; without one, the listen port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Advertise {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl FromStr for Advertise {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, port) = if let Ok(a) = s.parse::<SocketAddr>() {
            (a.ip(), Some(a.port()))
        } else if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse() {
            (ip, None)
        } else {
            return Err(format!(
                "{s:?} is not an IP address with an optional port (ADDR[:PORT], IPv6 as \
                 [ADDR]:PORT)"
            ));
        };
        if ip.is_unspecified() {
            return Err(format!(
                "{s:?} is an unspecified address: peers cannot reach this host there; \
                 advertise an address they can reach"
            ));
        }
        Ok(Advertise { ip, port })
    }
}

impl TryFrom<String> for Advertise {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Advertise> for String {
    fn from(a: Advertise) -> String {
        match a.port {
            Some(p) => SocketAddr::new(a.ip, p).to_string(),
            None => a.ip.to_string(),
        }
    }
}

/// A byte amount: in the file a number of bytes or a string with a K/M/G/T/P suffix (powers of
/// 1024, as on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_size(s).map(Size).map_err(|e| e.to_string())
    }
}

impl fmt::Display for Size {
    /// The shortest exact form: `1G`, `256M`, `4K`, or the plain number.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if self.0 != 0 && self.0.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: a number of bytes or a string such as \"256M\" or \"1G\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// How a primary's resource appears as a local block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceMode {
    /// The FUSE+loop device where FUSE and loop devices work, else none.
    Auto,
    FuseLoop,
    /// NBD sockets only.
    None,
}

impl FromStr for DeviceMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceMode::Auto),
            "fuse-loop" => Ok(DeviceMode::FuseLoop),
            "none" => Ok(DeviceMode::None),
            "nbd" => Err(
                "\"nbd\": attaching the kernel NBD driver is not supported by this \
                          build; use fuse-loop, auto or none"
                    .into(),
            ),
            other => Err(format!("{other:?}: expected auto, fuse-loop or none")),
        }
    }
}

impl TryFrom<String> for DeviceMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceMode> for String {
    fn from(m: DeviceMode) -> String {
        match m {
            DeviceMode::Auto => "auto",
            DeviceMode::FuseLoop => "fuse-loop",
            DeviceMode::None => "none",
        }
        .into()
    }
}

/// Where log lines go and how they look (`logging.format`, `--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum LogFormat {
    /// The journal's native protocol when stderr is connected to the journal (systemd sets
    /// `JOURNAL_STREAM`), else `text`.
    Auto,
    /// Human text on stderr, coloured only on a terminal.
    Text,
    /// One JSON object per line on stderr, with the span fields (`res`, `peer`).
    Json,
    /// The journal's native protocol: priority by level, `SYSLOG_IDENTIFIER=marsd`, the
    /// resource and peer as fields.
    Journald,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(LogFormat::Auto),
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            "journald" => Ok(LogFormat::Journald),
            other => Err(format!("{other:?}: expected auto, text, json or journald")),
        }
    }
}

impl TryFrom<String> for LogFormat {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<LogFormat> for String {
    fn from(m: LogFormat) -> String {
        match m {
            LogFormat::Auto => "auto",
            LogFormat::Text => "text",
            LogFormat::Json => "json",
            LogFormat::Journald => "journald",
        }
        .into()
    }
}

/// A tracing filter directive (`info`, `warn,mars_daemon=debug`), checked when read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LogLevel(pub String);

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        tracing_subscriber::EnvFilter::builder()
            .parse(s)
            .map(|_| LogLevel(s.to_string()))
            .map_err(|e| {
                format!(
                    "{s:?} is not a log filter (e.g. \"info\", \"warn,mars_daemon=debug\"): {e}"
                )
            })
    }
}

impl TryFrom<String> for LogLevel {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<LogLevel> for String {
    fn from(l: LogLevel) -> String {
        l.0
    }
}

// ------------------------------------------------------------------------------ the file

/// Every setting of `marsd`, as the configuration file spells it. `None` is "not set": the
/// documented fallback applies (for `host` the machine's short host name, for `advertise` the
/// listen address, for `space.emergency_free` half of `space.min_free`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub host: Option<HostName>,
    pub root: PathBuf,
    pub listen: PeerAddr,
    pub advertise: Option<Advertise>,
    pub insecure: bool,
    pub nbd: NbdSettings,
    pub device: DeviceSettings,
    pub txlog: TxlogSettings,
    pub space: SpaceSettings,
    pub metrics: MetricsSettings,
    pub systemd: SystemdSettings,
    pub logging: LoggingSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct NbdSettings {
    pub listen: Option<SocketAddr>,
    pub tls: bool,
    pub tls_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceSettings {
    pub mode: DeviceMode,
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TxlogSettings {
    pub rotate_size: Size,
    pub max_dirty: Size,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpaceSettings {
    pub min_free: Size,
    pub emergency_free: Option<Size>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemdSettings {
    pub templates: Option<String>,
    pub unit_dir: PathBuf,
    pub scripts_dir: PathBuf,
    pub systemctl: PathBuf,
    /// Seconds.
    pub timeout: u64,
    /// Where marsd keeps a MARS-compatible `/mars` tree for MARS's own templates (`None`:
    /// none).
    pub mars_tree: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingSettings {
    pub format: LogFormat,
    pub level: LogLevel,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: None,
            root: "/var/lib/mars".into(),
            listen: PeerAddr(SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))),
            advertise: None,
            insecure: false,
            nbd: NbdSettings::default(),
            device: DeviceSettings::default(),
            txlog: TxlogSettings::default(),
            space: SpaceSettings::default(),
            metrics: MetricsSettings::default(),
            systemd: SystemdSettings::default(),
            logging: LoggingSettings::default(),
        }
    }
}

impl Default for DeviceSettings {
    fn default() -> Self {
        DeviceSettings {
            mode: DeviceMode::Auto,
            dir: "/dev/mars".into(),
        }
    }
}

impl Default for TxlogSettings {
    fn default() -> Self {
        TxlogSettings {
            rotate_size: Size(1 << 30),
            max_dirty: Size(256 << 20),
        }
    }
}

impl Default for SpaceSettings {
    fn default() -> Self {
        SpaceSettings {
            min_free: Size(1 << 30),
            emergency_free: None,
        }
    }
}

impl Default for SystemdSettings {
    fn default() -> Self {
        SystemdSettings {
            templates: None,
            unit_dir: "/run/systemd/system".into(),
            scripts_dir: "/etc/marsadm/systemd-generated-scripts".into(),
            systemctl: "systemctl".into(),
            timeout: 300,
            mars_tree: None,
        }
    }
}

impl Default for LoggingSettings {
    fn default() -> Self {
        LoggingSettings {
            format: LogFormat::Auto,
            level: LogLevel("info".into()),
        }
    }
}

// ------------------------------------------------------------------------------ the flags

/// The command line. Every setting has a flag (most also an environment variable); a flag
/// that is given wins over the file, the file over the default. No flag has a clap default:
/// an absent flag must not hide the file's value.
#[derive(Debug, Parser, Default)]
#[command(
    name = "marsd",
    version,
    about = "mars daemon: geo-redundant block device replication",
    after_help = "Config come from the flags, then the configuration file (default \
                  /etc/mars/marsd.toml), then the defaults shown; `marsd --print-config` \
                  prints the result."
)]
pub struct Flags {
    /// Configuration file (TOML; keys in dist/marsd.toml and marsd(8)). A missing default file
    /// is no error; a missing or unreadable one named here is.
    #[arg(long, env = "MARS_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the effective settings as TOML (valid input for --config) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Write the man page marsd.8 into DIR and exit (for packaging: `scripts/build-deb`).
    #[arg(long, hide = true, value_name = "DIR")]
    pub generate_man: Option<PathBuf>,
    /// Directory holding all state of this host (logs, metadata, sockets) [config: root;
    /// default: /var/lib/mars].
    #[arg(long, env = "MARS_ROOT")]
    pub root: Option<PathBuf>,
    /// This host's name in the cluster [config: host; default: the short hostname].
    #[arg(long)]
    pub host: Option<HostName>,
    /// Peer address ADDR[:PORT] (default port 7777): metadata, log fetch and full sync streams
    /// of the other members arrive here [config: listen; default: 0.0.0.0:7777].
    #[arg(long)]
    pub listen: Option<PeerAddr>,
    /// The address ADDR[:PORT] peers are told to reach this host at (create-cluster,
    /// join-cluster); without a port the listen port [config: advertise; default: the listen
    /// address, which must then not be 0.0.0.0 or ::].
    #[arg(long, env = "MARS_ADVERTISE", value_name = "ADDR[:PORT]")]
    pub advertise: Option<Advertise>,
    /// Peer streams in plaintext, nobody authenticated: only for benchmarks and closed labs.
    /// Every host of the cluster must run with it (a TLS host refuses a plaintext peer, and
    /// the other way round); `view` shows it [config: insecure].
    #[arg(
        long,
        env = "MARS_INSECURE",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub insecure: bool,
    /// Also serve NBD over TCP on ADDR:PORT (the Unix socket ROOT/nbd.sock is always served)
    /// [config: nbd.listen].
    #[arg(long)]
    pub nbd_listen: Option<SocketAddr>,
    /// NBD over TCP only inside TLS (NBD_OPT_STARTTLS): this host presents its cluster
    /// certificate, and a client must present a certificate of the cluster's CA [config:
    /// nbd.tls].
    #[arg(
        long,
        env = "MARS_NBD_TLS",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub nbd_tls: bool,
    /// NBD over TCP only inside TLS with the certificate in DIR instead of the cluster's: the
    /// layout of qemu's tls-creds-x509 (server-cert.pem, server-key.pem, and ca-cert.pem, the
    /// CA whose certificates clients must present) [config: nbd.tls_dir].
    #[arg(long, env = "MARS_NBD_TLS_DIR", value_name = "DIR")]
    pub nbd_tls_dir: Option<PathBuf>,
    /// Where the primary's block devices appear (DIR/RES). Several daemons on one machine need
    /// different directories [config: device.dir; default: /dev/mars].
    #[arg(long, env = "MARS_DEVICE_DIR")]
    pub device_dir: Option<PathBuf>,
    /// How a primary's resource appears as a local block device: `auto` (the FUSE+loop device
    /// where FUSE and loop devices work, else none), `fuse-loop`, or `none` (NBD sockets only)
    /// [config: device.mode; default: auto].
    #[arg(long, env = "MARS_DEVICE")]
    pub device: Option<DeviceMode>,
    /// Memory per resource for written data not yet on the backing disk (K/M/G suffixes)
    /// [config: txlog.max_dirty; default: 256M].
    #[arg(long)]
    pub max_dirty: Option<Size>,
    /// Rotate a logfile once it reaches this size [config: txlog.rotate_size; default: 1G].
    #[arg(long)]
    pub logrotate_size: Option<Size>,
    /// Free space the root must keep. Below it, secondaries drop their logfiles and stop
    /// fetching (they no longer hold logs for the others and need a full sync later) [config:
    /// space.min_free; default: 1G].
    #[arg(long, env = "MARS_MIN_FREE_SPACE")]
    pub min_free_space: Option<Size>,
    /// Free space below which primaries enter emergency mode: writes go straight to the disk,
    /// replication stops at a hole in the log. They leave it when --min-free-space is free
    /// again [config: space.emergency_free; default: half of --min-free-space].
    #[arg(long, env = "MARS_EMERGENCY_FREE_SPACE")]
    pub emergency_free_space: Option<Size>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics [config: metrics.listen; default:
    /// off].
    #[arg(long, env = "MARS_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Template search path, colon-separated; each entry's `systemd-templates/` subdirectory is
    /// used if it exists [config: systemd.templates; default as MARS: ., ~/.marsadm,
    /// /etc/marsadm, /usr/lib/marsadm, /usr/local/lib/marsadm].
    #[arg(long, env = "MARS_PATH")]
    pub systemd_templates: Option<String>,
    /// Where generated units go [config: systemd.unit_dir; default: /run/systemd/system].
    #[arg(long, env = "MARS_SYSTEMD_UNIT_DIR")]
    pub systemd_unit_dir: Option<PathBuf>,
    /// Where generated `.script` pseudo-units go (/run is often mounted noexec) [config:
    /// systemd.scripts_dir; default: /etc/marsadm/systemd-generated-scripts].
    #[arg(long, env = "MARS_SYSTEMD_SCRIPTS_DIR")]
    pub systemd_scripts_dir: Option<PathBuf>,
    /// The systemctl to run (tests point this at a wrapper that enters a container) [config:
    /// systemd.systemctl; default: systemctl].
    #[arg(long, env = "MARS_SYSTEMCTL")]
    pub systemctl: Option<PathBuf>,
    /// Seconds one systemctl call or script may take before it is killed [config:
    /// systemd.timeout; default: 300].
    #[arg(long)]
    pub systemd_timeout: Option<u64>,
    /// Keep a MARS-compatible tree here (`/mars` for MARS's own templates): the want link,
    /// the trigger files their watcher units observe, `uuid`. A directory that holds anything
    /// marsd did not make is refused [config: systemd.mars_tree; default: none].
    #[arg(long, env = "MARS_TREE", value_name = "DIR")]
    pub mars_tree: Option<PathBuf>,
    /// Log output: `auto` (the journal when stderr is connected to it, else text), `text`,
    /// `json` (one object per line) or `journald` [config: logging.format; default: auto]. The
    /// level comes from MARS_LOG, else logging.level.
    #[arg(long, env = "MARS_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

// ------------------------------------------------------------------------------ loading

/// Reads the configuration file `flags` (or the environment) names, else the default one if it
/// exists, and lays the flags over it.
pub fn load(flags: &Flags) -> Result<Config> {
    let file = match &flags.config {
        Some(path) => Some(read_file(path)?),
        None => {
            let path = Path::new(DEFAULT_CONFIG);
            match std::fs::metadata(path) {
                Ok(_) => Some(read_file(path)?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("cannot read {DEFAULT_CONFIG}")),
            }
        }
    };
    let mut s = file.unwrap_or_default();
    s.apply(flags);
    s.check()?;
    Ok(s)
}

fn read_file(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Parses a configuration file's text. The error names the section and line of the culprit
/// (toml's own message names the key: "unknown field `x`", "invalid type: …").
pub fn parse(text: &str) -> Result<Config, String> {
    toml::from_str::<Config>(text).map_err(|e| {
        let what = e.message().trim().to_string();
        match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let section = before
                    .lines()
                    .rev()
                    .map(str::trim)
                    .find(|l| l.starts_with('[') && l.ends_with(']'))
                    .unwrap_or("top level");
                let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
                format!("line {line} ({section}: `{snippet}`): {what}")
            }
            None => what,
        }
    })
}

impl Config {
    /// Lays the flags that were given over these settings.
    pub fn apply(&mut self, f: &Flags) {
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        fn set_opt<T: Clone>(dst: &mut Option<T>, v: &Option<T>) {
            if v.is_some() {
                dst.clone_from(v);
            }
        }
        set(&mut self.root, &f.root);
        set_opt(&mut self.host, &f.host);
        set(&mut self.listen, &f.listen);
        set_opt(&mut self.advertise, &f.advertise);
        // A boolean flag can only switch on: its absence cannot be told from `false`.
        self.insecure |= f.insecure;
        set_opt(&mut self.nbd.listen, &f.nbd_listen);
        self.nbd.tls |= f.nbd_tls;
        set_opt(&mut self.nbd.tls_dir, &f.nbd_tls_dir);
        set(&mut self.device.dir, &f.device_dir);
        set(&mut self.device.mode, &f.device);
        set(&mut self.txlog.max_dirty, &f.max_dirty);
        set(&mut self.txlog.rotate_size, &f.logrotate_size);
        set(&mut self.space.min_free, &f.min_free_space);
        set_opt(&mut self.space.emergency_free, &f.emergency_free_space);
        set_opt(&mut self.metrics.listen, &f.metrics_listen);
        set_opt(&mut self.systemd.templates, &f.systemd_templates);
        set(&mut self.systemd.unit_dir, &f.systemd_unit_dir);
        set(&mut self.systemd.scripts_dir, &f.systemd_scripts_dir);
        set(&mut self.systemd.systemctl, &f.systemctl);
        set(&mut self.systemd.timeout, &f.systemd_timeout);
        set_opt(&mut self.systemd.mars_tree, &f.mars_tree);
        set(&mut self.logging.format, &f.log_format);
    }

    /// The checks between keys (each value alone was checked when parsed).
    pub fn check(&self) -> Result<()> {
        if self.txlog.rotate_size.0 < 1 << 20 {
            bail!("txlog.rotate_size (--logrotate-size) must be at least 1M");
        }
        if usize::try_from(self.txlog.max_dirty.0).is_err() {
            bail!("txlog.max_dirty (--max-dirty) is too large for this machine");
        }
        if self.emergency_free() > self.space.min_free.0 {
            bail!(
                "space.emergency_free (--emergency-free-space) must not exceed space.min_free \
                 (--min-free-space)"
            );
        }
        if !self.device.dir.is_absolute() {
            bail!("device.dir (--device-dir) must be an absolute path");
        }
        if self.nbd.tls_dir.is_some() && self.nbd.listen.is_none() {
            bail!("nbd.tls_dir (--nbd-tls-dir) is for NBD over TCP: set nbd.listen (--nbd-listen) too");
        }
        if self.nbd.tls && self.nbd.tls_dir.is_none() {
            if self.insecure {
                bail!(
                    "nbd.tls (--nbd-tls) uses this host's cluster certificate, which insecure \
                     (--insecure) does not"
                );
            }
            if self.nbd.listen.is_none() {
                bail!("nbd.tls (--nbd-tls) is for NBD over TCP: set nbd.listen (--nbd-listen) too");
            }
        }
        if self.systemd.timeout == 0 {
            bail!("systemd.timeout (--systemd-timeout) must be at least 1 second");
        }
        if let Some(p) = &self.systemd.mars_tree {
            if !p.is_absolute() {
                bail!("systemd.mars_tree (--mars-tree) must be an absolute path");
            }
        }
        Ok(())
    }

    /// `space.emergency_free`, or half of `space.min_free`.
    pub fn emergency_free(&self) -> u64 {
        self.space
            .emergency_free
            .map_or(self.space.min_free.0 / 2, |s| s.0)
    }

    /// What peers are told: `advertise` (its port, else the listen port), else the listen
    /// address. May be unspecified (`0.0.0.0:7777`) when neither is set: whoever publishes it
    /// must refuse that (`identity::advertisable`).
    pub fn advertised(&self) -> String {
        match &self.advertise {
            Some(a) => SocketAddr::new(a.ip, a.port.unwrap_or(self.listen.0.port())).to_string(),
            None => self.listen.to_string(),
        }
    }

    /// The effective settings as a configuration file: every key in the order of the struct,
    /// the unset ones as comments.
    pub fn to_toml(&self) -> String {
        let set = toml::Table::try_from(self).expect("settings serialize to a table");
        let mut out = String::from(
            "# marsd's effective settings (marsd --print-config): flags > configuration file > \
             defaults.\n",
        );
        let mut section: Option<&toml::Table> = None;
        for (sec, key) in Config::keys() {
            match (sec, key) {
                (Some(sec), None) => {
                    out.push_str(&format!("\n[{sec}]\n"));
                    section = set.get(&sec).and_then(|v| v.as_table());
                }
                (sec, Some(key)) => {
                    let table = if sec.is_some() { section } else { Some(&set) };
                    match table.and_then(|t| t.get(&key)) {
                        Some(v) => out.push_str(&format!("{key} = {v}\n")),
                        None => out.push_str(&format!("# {key} is not set\n")),
                    }
                }
                (None, None) => {}
            }
        }
        out
    }

    /// Every section header `(Some(section), None)` and key `(section, Some(key))` in the
    /// order of the struct (from the serialization of [`Config::full_example`]).
    pub fn keys() -> Vec<(Option<String>, Option<String>)> {
        let text = toml::to_string(&Config::full_example()).expect("serializes");
        let mut sec = None;
        let mut out = Vec::new();
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                sec = Some(name.to_string());
                out.push((sec.clone(), None));
            } else if let Some((k, _)) = line.split_once(" = ") {
                out.push((sec.clone(), Some(k.to_string())));
            }
        }
        out
    }

    /// Config with every optional key set: the complete list of keys (for `to_toml` and the
    /// test that `dist/marsd.toml` documents them all).
    pub fn full_example() -> Config {
        let mut s = Config {
            host: Some(HostName::new("alpha").expect("valid")),
            advertise: Some("192.0.2.10".parse().expect("valid")),
            ..Config::default()
        };
        s.nbd.listen = Some(SocketAddr::from(([127, 0, 0, 1], 10809)));
        s.nbd.tls_dir = Some("/etc/mars/nbd-tls".into());
        s.space.emergency_free = Some(Size(512 << 20));
        s.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], 9777)));
        s.systemd.templates = Some("/etc/marsadm".into());
        s.systemd.mars_tree = Some("/mars".into());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::advertisable;

    fn flags(args: &[&str]) -> Flags {
        let mut v = vec!["marsd"];
        v.extend_from_slice(args);
        Flags::try_parse_from(v).expect("flags parse")
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_named_with_section_and_line() {
        let e = parse("host = \"alpha\"\n\n[txlog]\nrotate_size = \"2G\"\nrotate_sise = \"1G\"\n")
            .unwrap_err();
        assert!(e.contains("rotate_sise"), "{e}");
        assert!(e.contains("line 5"), "{e}");
        assert!(e.contains("[txlog]"), "{e}");
        let e = parse("lissten = \"1.2.3.4\"\n").unwrap_err();
        assert!(e.contains("lissten") && e.contains("line 1"), "{e}");
        let e = parse("[nope]\nx = 1\n").unwrap_err();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        for (text, needle) in [
            ("[txlog]\nmax_dirty = \"lots\"\n", "max_dirty"),
            ("[txlog]\nmax_dirty = -1\n", "max_dirty"),
            ("listen = \"example.org:7777\"\n", "listen"),
            ("advertise = \"0.0.0.0\"\n", "unspecified"),
            ("advertise = \"[::]:7777\"\n", "unspecified"),
            ("insecure = \"yes\"\n", "insecure"),
            ("[device]\nmode = \"nbd\"\n", "not supported"),
            ("[device]\nmode = \"floppy\"\n", "mode"),
            ("[logging]\nformat = \"xml\"\n", "format"),
            ("[logging]\nlevel = \"mars_daemon=loud\"\n", "level"),
            ("[systemd]\ntimeout = \"5m\"\n", "timeout"),
            ("[metrics]\nlisten = \"localhost\"\n", "listen"),
            ("host = \"-bad\"\n", "host"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(
                e.contains(needle) || text.lines().any(|l| e.contains(l.trim())),
                "{text:?}: {e}"
            );
            assert!(e.contains("line"), "{text:?}: {e}");
        }
        // Checks between keys.
        let mut s = parse("[space]\nmin_free = \"1G\"\nemergency_free = \"2G\"\n").unwrap();
        assert!(s
            .check()
            .unwrap_err()
            .to_string()
            .contains("emergency_free"));
        s = parse("[txlog]\nrotate_size = 4096\n").unwrap();
        assert!(s.check().unwrap_err().to_string().contains("rotate_size"));
        s = parse("[device]\ndir = \"dev/mars\"\n").unwrap();
        assert!(s.check().unwrap_err().to_string().contains("device.dir"));
        s = parse("[nbd]\ntls = true\n").unwrap();
        assert!(s.check().unwrap_err().to_string().contains("nbd.listen"));
        // Flags are checked the same way.
        assert!(Flags::try_parse_from(["marsd", "--advertise", "0.0.0.0"]).is_err());
        assert!(Flags::try_parse_from(["marsd", "--max-dirty", "lots"]).is_err());
        assert!(Flags::try_parse_from(["marsd", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn sizes_accept_numbers_and_suffixes() {
        let s = parse("[txlog]\nrotate_size = 1073741824\nmax_dirty = \"64M\"\n").unwrap();
        assert_eq!(s.txlog.rotate_size, Size(1 << 30));
        assert_eq!(s.txlog.max_dirty, Size(64 << 20));
        assert_eq!(Size(1 << 30).to_string(), "1G");
        assert_eq!(Size(3 << 20).to_string(), "3M");
        assert_eq!(Size(1000).to_string(), "1000");
        assert_eq!(Size(0).to_string(), "0");
    }

    #[test]
    fn flag_overrides_file_and_file_overrides_default() {
        let mut s = parse(
            "listen = \"10.0.0.1\"\nroot = \"/srv/mars\"\n[txlog]\nmax_dirty = \"64M\"\n\
             [logging]\nformat = \"json\"\n",
        )
        .unwrap();
        s.apply(&flags(&[
            "--listen",
            "10.0.0.2:7000",
            "--log-format",
            "text",
        ]));
        assert_eq!(s.listen.to_string(), "10.0.0.2:7000");
        assert_eq!(s.logging.format, LogFormat::Text);
        // Not given on the command line: the file's value stays.
        assert_eq!(s.root, PathBuf::from("/srv/mars"));
        assert_eq!(s.txlog.max_dirty, Size(64 << 20));
        // Neither: the default.
        assert_eq!(s.space.min_free, Size(1 << 30));
        assert_eq!(s.emergency_free(), 512 << 20);
    }

    #[test]
    fn advertised_address() {
        let mut s = parse("listen = \"10.0.0.1:7000\"\n").unwrap();
        assert_eq!(s.advertised(), "10.0.0.1:7000");
        s.advertise = Some("192.0.2.1".parse().unwrap());
        assert_eq!(s.advertised(), "192.0.2.1:7000");
        s.advertise = Some("192.0.2.1:8000".parse().unwrap());
        assert_eq!(s.advertised(), "192.0.2.1:8000");
        assert!(advertisable(&Config::default().advertised()).is_err());
        assert!(advertisable("[::]:7777").is_err());
        assert!(advertisable("::").is_err());
        assert!(advertisable("192.0.2.1:7777").is_ok());
    }

    #[test]
    fn print_config_round_trips() {
        for s in [Config::default(), Config::full_example()] {
            let text = s.to_toml();
            assert_eq!(parse(&text).unwrap(), s, "{text}");
        }
        let mut s = parse("[logging]\nlevel = \"warn,mars_daemon=debug\"\n").unwrap();
        s.apply(&flags(&[
            "--max-dirty",
            "3M",
            "--metrics-listen",
            "127.0.0.1:9100",
        ]));
        assert_eq!(parse(&s.to_toml()).unwrap(), s);
        // Unset keys appear as comments, so every key is in the output.
        let text = Config::default().to_toml();
        assert!(text.contains("# advertise is not set"), "{text}");
        assert!(text.contains("# listen is not set"), "{text}");
    }

    /// The keys of the settings, as `section.key` (top-level keys bare).
    fn all_keys() -> Vec<String> {
        let keys: Vec<String> = Config::keys()
            .into_iter()
            .filter_map(|(s, k)| match s {
                Some(s) => k.map(|k| format!("{s}.{k}")),
                None => k,
            })
            .collect();
        // Every key of the struct, none missing from the list.
        assert_eq!(keys.len(), 23, "{keys:?}");
        keys
    }

    /// `dist/marsd.toml` with the `# key = value` lines uncommented.
    fn dist_uncommented() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/marsd.toml");
        let text = std::fs::read_to_string(&path).expect("dist/marsd.toml");
        text.lines()
            .map(|l| {
                let rest = l.strip_prefix("# ").unwrap_or(l);
                let is_key = rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
                if is_key {
                    rest.to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn dist_file_documents_every_key_with_its_default() {
        let dist_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/marsd.toml");
        // As shipped (all commented out) it is the defaults.
        let shipped = std::fs::read_to_string(&dist_path).unwrap();
        assert_eq!(parse(&shipped).unwrap(), Config::default());
        let text = dist_uncommented();
        let parsed = parse(&text).unwrap_or_else(|e| panic!("dist/marsd.toml uncommented: {e}"));
        let got = toml::Table::try_from(&parsed).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for key in all_keys() {
            let (sec, k) = key
                .split_once('.')
                .map_or((None, key.as_str()), |(s, k)| (Some(s), k));
            let look = |t: &toml::Table| -> Option<toml::Value> {
                match sec {
                    Some(s) => t.get(s)?.as_table()?.get(k).cloned(),
                    None => t.get(k).cloned(),
                }
            };
            let value = look(&got);
            assert!(value.is_some(), "dist/marsd.toml does not document {key}");
            // Keys with a default show it; optional keys show an example.
            if let Some(d) = look(&defaults) {
                assert_eq!(
                    value.unwrap(),
                    d,
                    "dist/marsd.toml: {key} is not its default"
                );
            }
        }
    }

    #[test]
    fn env_overrides_file() {
        // Environment variables are flags to clap: they win over the file the same way. (One
        // variable only, set and removed inside this test.)
        std::env::set_var("MARS_EMERGENCY_FREE_SPACE", "100M");
        let f = Flags::try_parse_from(["marsd"]).unwrap();
        std::env::remove_var("MARS_EMERGENCY_FREE_SPACE");
        let mut s = parse("[space]\nemergency_free = \"200M\"\n").unwrap();
        s.apply(&f);
        assert_eq!(s.space.emergency_free, Some(Size(100 << 20)));
    }
}
