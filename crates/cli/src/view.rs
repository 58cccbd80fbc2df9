//! `view` and `view-MACRO`: MARS-style status text.

use mars_api::{
    ClusterView, DiskState, Progress, ReplicaView, ResourceView, Role, SpaceView, SwitchKind,
};
use mars_config::format_size;

/// Position of a switch's letter in MARS's six-letter flags field `DCASFR` (device/disk,
/// consistent, attach, sync, fetch, replay).
pub fn flag_index(k: SwitchKind) -> usize {
    match k {
        SwitchKind::Attach => 2,
        SwitchKind::Sync => 3,
        SwitchKind::Fetch => 4,
        SwitchKind::Replay => 5,
    }
}

/// The flag letter at `i`; a short or missing field reads as `-` (off), never a panic.
pub fn flag(flags: &str, i: usize) -> char {
    flags.chars().nth(i).unwrap_or('-')
}

/// The switch is on and its work is done (MARS `is-*`: uppercase letter).
/// The switch is wanted on (MARS's `todo-SWITCH`: any letter but `-` in its flag).
pub fn todo_on(r: &ResourceView, k: SwitchKind) -> bool {
    flag(&r.flags, flag_index(k)) != '-'
}

pub fn is_on(r: &ResourceView, k: SwitchKind) -> bool {
    flag(&r.flags, flag_index(k)).is_ascii_uppercase()
}

/// The local replica is up to date and replication is not stuck.
pub fn is_uptodate(r: &ResourceView) -> bool {
    r.disk_state == DiskState::UpToDate && r.stuck.is_none()
}

/// MARS's text of a disk state: the amount of a `WriteBack` and the reason of a
/// `DefectiveLog` in brackets (JSON keeps them in their own fields).
pub fn disk_text(d: DiskState, writeback_bytes: Option<u64>, stuck: Option<&str>) -> String {
    match (d, writeback_bytes, stuck) {
        (DiskState::WriteBack, Some(b), _) => format!("WriteBack[{}]", format_size(b)),
        (DiskState::DefectiveLog, _, Some(s)) => {
            format!("DefectiveLog[{}]", s.split(':').next().unwrap_or(s))
        }
        (d, _, _) => d.to_string(),
    }
}

/// The designated primary as MARS prints it.
pub fn primary_text(r: &ResourceView) -> &str {
    r.primary.as_deref().unwrap_or("(none)")
}

/// A member's role as the text view shows it: `?` when it is not alive (its last report
/// is stale).
pub fn member_role_text(m: &ReplicaView) -> &'static str {
    m.role.map_or("?", Role::as_str)
}

/// `(alive, all)` members for the `[N/M]` header. A daemon that reports no member list
/// still has this host as its one member.
pub fn member_counts(r: &ResourceView) -> (usize, usize) {
    if r.members.is_empty() {
        return (1, 1);
    }
    let alive = r.members.iter().filter(|m| m.alive).count();
    (alive, r.members.len())
}

const UNITS: [(u64, &str); 5] = [
    (1 << 40, "TiB"),
    (1 << 30, "GiB"),
    (1 << 20, "MiB"),
    (1 << 10, "KiB"),
    (1, "B"),
];

/// The largest unit of which `n` holds at least `min_count`.
fn unit(n: u64, min_count: u64) -> (u64, &'static str) {
    UNITS
        .into_iter()
        .find(|(div, _)| n >= div.saturating_mul(min_count))
        .unwrap_or((1, "B"))
}

/// `n` bytes in MARS style, without a space: `120.000MiB`, `512B`.
fn human(n: u64, decimals: usize) -> String {
    match unit(n, 1) {
        (1, u) => format!("{n}{u}"),
        (div, u) => format!("{:.decimals$}{u}", n as f64 / div as f64),
    }
}

/// `hh:mm:ss`, or `--:--:--` when the work is not moving.
fn hms(secs: Option<u64>) -> String {
    match secs {
        Some(s) => format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60),
        None => "--:--:--".into(),
    }
}

/// Percentage done; an empty job counts as complete.
fn percent(p: &Progress) -> f64 {
    if p.total == 0 {
        return 100.0;
    }
    (p.done.min(p.total) as f64 * 100.0 / p.total as f64).min(100.0)
}

/// A 20-character progress bar: `[=====>..............]`.
fn bar(pct: f64) -> String {
    const WIDTH: usize = 20;
    // Truncation is intended: a bar cell is filled only when reached.
    let filled = ((pct / 100.0 * WIDTH as f64) as usize).min(WIDTH);
    if filled == WIDTH {
        return format!("[{}]", "=".repeat(WIDTH));
    }
    format!(
        "[{}>{}]",
        "=".repeat(filled),
        ".".repeat(WIDTH - filled - 1)
    )
}

/// ` rate: R remaining: hh:mm:ss[ logs: [a..b]]`, shared by all progress lines.
fn rate_tail(p: &Progress) -> String {
    let mut s = format!(
        " rate: {}/s remaining: {}",
        human(p.rate, 2),
        hms(p.remaining_secs())
    );
    if let Some(l) = p.logs {
        s += &format!(" logs: [{}..{}]", l.first, l.last);
    }
    s
}

/// MARS's `sync-line`: `syncing: [=====>.....] 27.31% (280/1024)MiB rate: … remaining: …`.
pub fn sync_line(p: &Progress) -> String {
    let pct = percent(p);
    // One unit for both numbers, chosen by the total so that it reads as e.g. (280/1024)MiB.
    let (div, u) = unit(p.total, 10);
    format!(
        "syncing: {} {pct:.2}% ({}/{}){u}{}",
        bar(pct),
        p.done / div,
        p.total / div,
        rate_tail(p)
    )
}

/// MARS's `fetch-line` / `replay-line`: `> fetch: 120.000MiB rate: … remaining: …`, the amount
/// being what is still to do.
pub fn work_line(what: &str, p: &Progress) -> String {
    format!("> {what}: {}{}", human(p.rest(), 3), rate_tail(p))
}

fn fetch_line(r: &ResourceView) -> Option<String> {
    r.fetch.as_ref().map(|p| work_line("fetch", p))
}

fn replay_line(r: &ResourceView) -> Option<String> {
    r.replay.as_ref().map(|p| work_line("replay", p))
}

/// One line per member: `member HOST: diskstate replstate flags role [behind X] …`.
pub fn member_line(m: &ReplicaView) -> String {
    let mut s = format!(
        "member {}: {} {} {} {}",
        m.host,
        disk_text(m.disk_state, m.writeback_bytes, m.stuck.as_deref()),
        m.repl_state,
        m.flags,
        member_role_text(m)
    );
    if let Some(b) = m.behind.filter(|b| *b > 0) {
        s += &format!(" behind {}", format_size(b));
        if let Some(l) = m.lag_secs {
            s += &format!(" ({l:.1}s old)");
        }
    }
    if let Some(p) = &m.sync {
        s += &format!(" sync {:.2}%", percent(p));
    }
    if !m.alive {
        s += " NOT ALIVE";
    }
    if let Some(st) = &m.stuck {
        s += &format!(" stuck: {st}");
    }
    if let Some(sd) = &m.systemd {
        s += &format!(" systemd: {sd}");
    }
    s
}

/// `systemd: start app.service stop mnt.mount want beta`, when a stack is configured.
pub fn systemd_line(sd: &mars_api::SystemdView) -> String {
    format!(
        "systemd: start {} stop {} want {}",
        sd.start_unit,
        sd.stop_unit,
        sd.want.as_deref().unwrap_or("(unset)")
    )
}

/// Log, disk and NBD detail lines.
fn detail_text(r: &ResourceView) -> String {
    let mut s = String::new();
    if let Some(l) = &r.log {
        s += &format!(
            "    log: {} appended {} durable {} written-back {} dirty {} ({} logfiles, {})\n",
            l.current,
            l.appended,
            l.durable,
            l.written_back,
            format_size(l.dirty_bytes),
            l.logfiles,
            format_size(l.log_bytes)
        );
    }
    s += &format!(
        "    disk: {} size {} open {}\n",
        r.disk.display(),
        format_size(r.size),
        r.open_count
    );
    if let Some(dev) = &r.device {
        s += &format!("    device: {dev}\n");
    }
    if let Some(e) = &r.device_error {
        s += &format!("    DEVICE ERROR: {e}\n");
    }
    for u in [&r.nbd_unix_uri, &r.nbd_tcp_uri].into_iter().flatten() {
        s += &format!("    nbd: {u}\n");
    }
    s
}

/// The default view of one resource, after MARS's
/// `%{res} [members/peers] diskstate replstate flags role primarynode`, followed by the
/// progress lines of unfinished work, details, problems and one line per member.
pub fn resource_text(r: &ResourceView) -> String {
    let (alive, all) = member_counts(r);
    let mut s = format!(
        "{} [{alive}/{all}] {} {} {} {} {}\n",
        r.name,
        disk_text(r.disk_state, r.writeback_bytes, r.stuck.as_deref()),
        r.repl_state,
        r.flags,
        r.role,
        primary_text(r)
    );
    let progress = [
        r.sync.as_ref().map(sync_line),
        fetch_line(r),
        replay_line(r),
    ];
    for line in progress.into_iter().flatten() {
        s += &format!("    {line}\n");
    }
    s += &detail_text(r);
    if let Some(sb) = &r.split_brain {
        s += &format!("    {}\n", split_brain_text(&r.name, sb));
    }
    if let Some(st) = &r.stuck {
        s += &format!("    STUCK: {st}\n");
    }
    if let Some(e) = &r.error {
        s += &format!("    ERROR: {e}\n");
    }
    if let Some(sd) = &r.systemd {
        s += &format!("    {}\n", systemd_line(sd));
    }
    for m in &r.members {
        s += &format!("    {}\n", member_line(m));
    }
    s
}

/// MARS's split-brain warning with what each history would lose if discarded.
pub fn split_brain_text(res: &str, sb: &mars_api::SplitBrainView) -> String {
    let sides: Vec<String> = sb
        .sides
        .iter()
        .map(|side| {
            format!(
                "[{}] {} after the fork",
                side.hosts.join(" "),
                format_size(side.bytes)
            )
        })
        .collect();
    let at = if sb.logfile == 0 {
        "two hosts act as primary".to_string()
    } else {
        format!("histories differ from logfile {}", sb.logfile)
    };
    format!(
        "SPLIT BRAIN of resource '{res}': {at}; {}. Resolve: keep one side as primary, \
         `marsadm invalidate {res}` on each host of the other",
        sides.join(" vs ")
    )
}

/// A member's fetch or sync traffic: `fetch (lz4): received 10 MiB (31 MiB raw, 3.1x), sent …`.
pub fn stream_line(st: &mars_api::StreamView) -> String {
    let way = |what: &str, wire: u64, raw: u64| {
        if wire == 0 {
            None
        } else if raw > wire {
            Some(format!(
                "{what} {} ({} raw, {:.1}x)",
                format_size(wire),
                format_size(raw),
                raw as f64 / wire as f64
            ))
        } else {
            Some(format!("{what} {}", format_size(wire)))
        }
    };
    let parts: Vec<String> = [
        way("received", st.received_bytes, st.received_raw_bytes),
        way("sent", st.sent_bytes, st.sent_raw_bytes),
    ]
    .into_iter()
    .flatten()
    .collect();
    format!(
        "{} ({}): {}",
        st.stream,
        st.compression.as_deref().unwrap_or("uncompressed"),
        if parts.is_empty() {
            "nothing yet".to_string()
        } else {
            parts.join(", ")
        }
    )
}

pub fn cluster_text(v: &ClusterView, all: bool) -> String {
    let mut s = String::new();
    for r in &v.resources {
        s += &format!("--------- resource {}\n", r.name);
        s += &resource_text(r);
    }
    if all || v.resources.is_empty() {
        match &v.cluster {
            Some(c) => {
                s += &format!("--------- cluster {}\n", c.uuid);
                if c.security == "insecure" {
                    s += "  peers: INSECURE (--insecure: plaintext, nobody authenticated)\n";
                } else if !c.security.is_empty() {
                    s += &format!("  peers: mutual {}\n", c.security.replacen("tls", "TLS", 1));
                }
                for m in &v.members {
                    let state = if m.this_host {
                        "this host".to_string()
                    } else {
                        let age = m
                            .age_secs
                            .map_or("never heard from".into(), |a| format!("info {a:.1}s old"));
                        format!(
                            "{}, {}, {age}{}{}",
                            if m.alive { "alive" } else { "NOT ALIVE" },
                            if m.connected {
                                "connected"
                            } else {
                                "not connected"
                            },
                            skew_text(m.clock_skew_secs),
                            m.error
                                .as_ref()
                                .map(|e| format!(", last error: {e}"))
                                .unwrap_or_default()
                        )
                    };
                    s += &format!("    host {} at {} ({state})\n", m.host, m.address);
                    // The ratio of compressed streams (uncompressed ones: in the JSON).
                    for st in m.streams.iter().filter(|st| st.compression.is_some()) {
                        s += &format!("      {}\n", stream_line(st));
                    }
                }
            }
            None => s += &format!("host {} is not in a cluster yet\n", v.host),
        }
        if let Some(sp) = &v.space {
            s += &space_text(&v.host, sp);
        }
    }
    s
}

/// A member's clock skew when it is worth a word (beyond [`mars_api::CLOCK_SKEW_WARN_SECS`]).
pub fn skew_text(skew: Option<f64>) -> String {
    match skew {
        Some(d) if d.abs() > mars_api::CLOCK_SKEW_WARN_SECS => format!(
            ", CLOCK {:.1}s {}",
            d.abs(),
            if d > 0.0 { "AHEAD" } else { "BEHIND" }
        ),
        _ => String::new(),
    }
}

/// The host's root: free space, what the logfiles take, how soon it is full, and per resource
/// which members keep its logfiles.
pub fn space_text(host: &str, sp: &SpaceView) -> String {
    let mut s = format!("--------- host {host} root {}\n", sp.root);
    let disk = match (sp.free_bytes, sp.total_bytes) {
        (Some(f), Some(t)) => format!(
            "{} free of {} ({:.0}% used)",
            format_size(f),
            format_size(t),
            if t == 0 {
                0.0
            } else {
                t.saturating_sub(f) as f64 * 100.0 / t as f64
            }
        ),
        _ => "free space unknown".into(),
    };
    let growth = if sp.log_growth_bytes_per_sec > 0.0 {
        format!(
            "growing {}/s, full in {}",
            format_size(sp.log_growth_bytes_per_sec as u64),
            hms(sp.full_in_secs.map(|x| x as u64))
        )
    } else {
        "not growing".into()
    };
    s += &format!(
        "  space: {disk}, logs {} (preallocated {}), {growth}\n",
        format_size(sp.log_bytes),
        format_size(sp.preallocated_bytes)
    );
    for r in &sp.resources {
        s += &format!(
            "  {}: {} logfiles {}",
            r.name,
            r.logfiles,
            format_size(r.log_bytes)
        );
        if let Some(n) = r.reclaim_below {
            let by: Vec<&str> = r
                .pins
                .iter()
                .filter(|p| p.holds && p.logfile == Some(n))
                .map(|p| p.host.as_str())
                .collect();
            s += &format!(", kept from logfile {n} for {}", by.join(","));
        }
        let ignored: Vec<&str> = r
            .pins
            .iter()
            .filter(|p| !p.holds && p.logfile.is_some())
            .map(|p| p.host.as_str())
            .collect();
        if !ignored.is_empty() {
            s += &format!(" (not waiting for unreachable {})", ignored.join(","));
        }
        s += "\n";
    }
    s
}

/// Why a resource has no NBD export on host `me`: only its primary serves one.
pub fn not_served(r: &ResourceView, me: &str) -> String {
    match (r.role, &r.primary) {
        (Role::Primary, _) => format!(
            "resource {} is not served on this host: its device is not open",
            r.name
        ),
        (Role::Secondary, Some(p)) if p == me => format!(
            "resource {} is not served (not attached: `marsadm view {}` says why)",
            r.name, r.name
        ),
        (Role::Secondary, Some(p)) => format!(
            "resource {} is served by its primary {p} only; this host is a secondary",
            r.name
        ),
        (Role::Secondary, None) => format!(
            "resource {} is served by its primary only, and none is designated",
            r.name
        ),
    }
}

/// Hand-built views for the tests of this crate.
#[cfg(test)]
pub mod fixtures {
    use mars_api::{DiskState, Progress, ReplState, ReplicaView, ResourceView, Role};

    pub const MIB: u64 = 1 << 20;

    pub fn progress(done: u64, total: u64, rate: u64) -> Progress {
        Progress {
            done,
            total,
            rate,
            logs: None,
        }
    }

    /// A secondary `vm1` of 1 GiB, attached and consistent, all switches on and done.
    pub fn secondary() -> ResourceView {
        ResourceView {
            name: "vm1".into(),
            size: 1024 * MIB,
            disk: "/dev/vg/vm1".into(),
            role: Role::Secondary,
            primary: Some("alpha".into()),
            disk_state: DiskState::UpToDate,
            writeback_bytes: None,
            repl_state: ReplState::Replaying,
            flags: "dCASFR".into(),
            log: None,
            device: None,
            device_error: None,
            nbd_unix_uri: None,
            nbd_tcp_uri: None,
            nbd_tcp: false,
            open_count: 0,
            error: None,
            consistent: true,
            sync: None,
            fetch: None,
            replay: None,
            stuck: None,
            caught_up_ms: None,
            members: Vec::new(),
            split_brain: None,
            systemd: None,
        }
    }

    pub fn member(host: &str, alive: bool) -> ReplicaView {
        ReplicaView {
            host: host.into(),
            disk: format!("/dev/vg/{host}"),
            role: Some(Role::Secondary),
            disk_state: DiskState::UpToDate,
            writeback_bytes: None,
            repl_state: ReplState::Replaying,
            flags: "dCASFR".into(),
            alive,
            consistent: true,
            applied: None,
            behind: None,
            lag_secs: None,
            emergency: false,
            systemd_ok: None,
            disk_size_bytes: None,
            sync: None,
            stuck: None,
            systemd: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn header_counts_alive_members() {
        let mut r = secondary();
        assert!(
            resource_text(&r).starts_with("vm1 [1/1] UpToDate Replaying dCASFR Secondary alpha\n")
        );
        r.members = vec![
            member("alpha", true),
            member("beta", false),
            member("gamma", true),
        ];
        let text = resource_text(&r);
        assert!(text.starts_with("vm1 [2/3] "), "{text}");
        assert!(
            text.contains("    member beta: UpToDate Replaying dCASFR Secondary NOT ALIVE\n"),
            "{text}"
        );
        assert_eq!(crate::macros::test_value(&r, "members").unwrap(), "3");
    }

    #[test]
    fn systemd_want_and_member_status() {
        let mut r = secondary();
        assert_eq!(crate::macros::test_value(&r, "systemd-unit").unwrap(), "");
        r.systemd = Some(mars_api::SystemdView {
            start_unit: "app.service".into(),
            stop_unit: "mnt-vm1.mount".into(),
            want: Some("alpha".into()),
        });
        let mut a = member("alpha", true);
        a.systemd = Some("start app.service: ok".into());
        let mut b = member("beta", true);
        b.systemd = Some("stop mnt-vm1.mount: exit 1".into());
        r.members = vec![a, b];
        let text = resource_text(&r);
        assert!(
            text.contains("    systemd: start app.service stop mnt-vm1.mount want alpha\n"),
            "{text}"
        );
        assert!(
            text.contains("member alpha: UpToDate Replaying dCASFR Secondary systemd: start app.service: ok\n"),
            "{text}"
        );
        assert!(
            text.contains("systemd: stop mnt-vm1.mount: exit 1\n"),
            "{text}"
        );
        assert_eq!(
            crate::macros::test_value(&r, "systemd-unit").unwrap(),
            "app.service mnt-vm1.mount"
        );
        assert_eq!(
            crate::macros::test_value(&r, "systemd-want").unwrap(),
            "alpha"
        );
    }

    #[test]
    fn sync_line_in_mars_style() {
        let p = Progress {
            done: 280 * MIB,
            total: 1024 * MIB,
            rate: 95 * MIB + MIB / 5,
            logs: None,
        };
        // 280/1024 = 27.34%; rest 744 MiB at 95.2 MiB/s = 7.8 s.
        assert_eq!(
            sync_line(&p),
            "syncing: [=====>..............] 27.34% (280/1024)MiB rate: 95.20MiB/s remaining: 00:00:08"
        );
        assert_eq!(bar(100.0), format!("[{}]", "=".repeat(20)));
        assert_eq!(bar(0.0), format!("[>{}]", ".".repeat(19)));
        // Small totals pick a smaller unit; an empty sync is complete, not a division by zero.
        assert!(sync_line(&progress(512 << 10, MIB, 0)).contains("50.00% (512/1024)KiB"));
        assert!(sync_line(&progress(0, 0, 0)).contains("100.00% (0/0)B"));
    }

    #[test]
    fn work_lines_show_rest_rate_eta_and_logs() {
        let mut p = progress(0, 120 * MIB, 40 * MIB);
        assert_eq!(
            work_line("fetch", &p),
            "> fetch: 120.000MiB rate: 40.00MiB/s remaining: 00:00:03"
        );
        p.rate = 0;
        p.logs = Some(mars_api::LogRange { first: 2, last: 3 });
        assert_eq!(
            work_line("replay", &p),
            "> replay: 120.000MiB rate: 0B/s remaining: --:--:-- logs: [2..3]"
        );
        assert_eq!(hms(Some(100 * 3600 + 61)), "100:01:01");
    }

    #[test]
    fn resource_text_shows_progress_stuck_and_members() {
        let mut r = secondary();
        r.disk_state = DiskState::OutDatedFR;
        r.flags = "dCASfr".into();
        r.fetch = Some(progress(MIB, 3 * MIB, MIB));
        r.replay = Some(progress(0, 5 * MIB, 0));
        r.stuck = Some("version mismatch after log-000000003-alpha".into());
        let mut m = member("beta", true);
        m.behind = Some(3 * MIB);
        m.sync = Some(progress(MIB, 4 * MIB, 0));
        m.stuck = Some("logfiles gone".into());
        r.members = vec![m];
        let text = resource_text(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "vm1 [1/1] OutDated[FR] Replaying dCASfr Secondary alpha"
        );
        assert_eq!(
            lines[1],
            "    > fetch: 2.000MiB rate: 1.00MiB/s remaining: 00:00:02"
        );
        assert_eq!(
            lines[2],
            "    > replay: 5.000MiB rate: 0B/s remaining: --:--:--"
        );
        assert_eq!(lines[3], "    disk: /dev/vg/vm1 size 1.00 GiB open 0");
        assert_eq!(
            lines[4],
            "    STUCK: version mismatch after log-000000003-alpha"
        );
        assert_eq!(
            lines[5],
            "    member beta: UpToDate Replaying dCASFR Secondary behind 3.00 MiB sync 25.00% stuck: logfiles gone"
        );
        assert_eq!(lines.len(), 6);
    }

    #[test]
    fn host_space_line_and_pins() {
        let sp = SpaceView {
            root: "/var/lib/mars".into(),
            free_bytes: Some(30 << 30),
            used_bytes: Some(70 << 30),
            total_bytes: Some(100 << 30),
            log_bytes: 3 * MIB,
            preallocated_bytes: 1024 * MIB,
            log_growth_bytes_per_sec: 2.0 * MIB as f64,
            full_in_secs: Some(15360.0),
            min_free_bytes: 1 << 30,
            emergency_free_bytes: 512 * MIB,
            resources: vec![mars_api::ResourceSpace {
                name: "vm1".into(),
                logfiles: 3,
                log_bytes: 3 * MIB,
                preallocated_bytes: 1024 * MIB,
                reclaim_below: Some(41),
                pins: vec![
                    mars_api::LogPin {
                        host: "alpha".into(),
                        logfile: Some(43),
                        holds: true,
                    },
                    mars_api::LogPin {
                        host: "beta".into(),
                        logfile: Some(41),
                        holds: true,
                    },
                    mars_api::LogPin {
                        host: "gamma".into(),
                        logfile: Some(7),
                        holds: false,
                    },
                ],
            }],
        };
        assert_eq!(
            space_text("alpha", &sp),
            "--------- host alpha root /var/lib/mars\n\
             \x20 space: 30.00 GiB free of 100.00 GiB (70% used), logs 3.00 MiB (preallocated \
             1.00 GiB), growing 2.00 MiB/s, full in 04:16:00\n\
             \x20 vm1: 3 logfiles 3.00 MiB, kept from logfile 41 for beta (not waiting for \
             unreachable gamma)\n"
        );
        let mut still = sp.clone();
        still.log_growth_bytes_per_sec = 0.0;
        still.full_in_secs = None;
        still.free_bytes = None;
        assert!(space_text("alpha", &still).contains(
            "space: free space unknown, logs 3.00 MiB (preallocated 1.00 GiB), not growing\n"
        ));
        let mut m = member("beta", true);
        m.behind = Some(MIB);
        m.lag_secs = Some(2.5);
        assert!(
            member_line(&m).contains(" behind 1.00 MiB (2.5s old)"),
            "{}",
            member_line(&m)
        );
    }

    #[test]
    fn replication_macros() {
        let mut r = secondary();
        let v = |r: &ResourceView, m: &str| crate::macros::test_value(r, m).unwrap();
        assert_eq!(v(&r, "sync-rest"), "0");
        assert_eq!(v(&r, "sync-pos"), (1024 * MIB).to_string());
        assert_eq!(v(&r, "is-consistent"), "1");
        assert_eq!(v(&r, "is-uptodate"), "1");
        // MARS prints the sync line whether a sync runs or not.
        assert!(
            v(&r, "sync-line").starts_with("       > sync: 1024.000/1024.000 MiB rate: 0 B/sec")
        );
        assert_eq!(v(&r, "stuck"), "");
        r.sync = Some(progress(100, 1000, 10));
        r.fetch = Some(progress(5, 7, 0));
        r.replay = Some(progress(7, 7, 0));
        r.consistent = false;
        r.flags = "d-asf-".into();
        r.stuck = Some("damaged".into());
        assert_eq!(v(&r, "sync-rest"), "900");
        assert_eq!(v(&r, "syncstatus"), "100");
        assert_eq!(v(&r, "fetch-rest"), "2");
        assert_eq!(v(&r, "replay-rest"), "0");
        assert_eq!(v(&r, "is-consistent"), "0");
        assert_eq!(v(&r, "is-uptodate"), "0");
        assert_eq!(v(&r, "stuck"), "damaged");
        assert!(v(&r, "sync-line").starts_with("       > sync: 100/1000 B rate: 10 B/sec"));
        assert!(v(&r, "fetch-line").starts_with("       > fetch: 2 B "));
        assert!(v(&r, "replay-line").starts_with("       > replay: 0 B "));
        for (m, want) in [
            ("is-attach", "0"),
            ("todo-attach", "1"),
            // A sync runs (MARS's is-sync).
            ("is-sync", "1"),
            ("todo-sync", "1"),
            ("is-fetch", "0"),
            ("todo-fetch", "1"),
            ("is-replay", "0"),
            ("todo-replay", "0"),
        ] {
            assert_eq!(v(&r, m), want, "{m}");
        }
        // A malformed flags field reads as all off.
        r.flags = "D".into();
        assert_eq!(v(&r, "todo-replay"), "0");
    }

    #[test]
    fn every_listed_macro_is_answered() {
        let mut r = secondary();
        r.nbd_unix_uri = Some("nbd+unix:///vm1?socket=/x".into());
        r.nbd_tcp_uri = Some("nbd://h/vm1".into());
        r.device = Some("/dev/mars/vm1".into());
        for m in crate::macros::table() {
            if matches!(m.eval, crate::macros::Eval::Wait { .. }) || m.name == "errno-text" {
                continue;
            }
            assert!(crate::macros::test_value(&r, &m.name).is_ok(), "{}", m.name);
        }
        // No device here: empty output and an error exit, as MARS's view-device.
        r.device = None;
        assert!(crate::macros::test_value(&r, "device").is_err());
        assert!(crate::macros::test_value(&r, "bogus").is_err());
        assert!(crate::macros::test_value(&r, "is-bogus").is_err());
    }

    /// A compressed stream's line shows the ratio; an uncompressed one only its bytes.
    #[test]
    fn stream_lines_show_the_compression_ratio() {
        let st = mars_api::StreamView {
            stream: "fetch".into(),
            compression: Some("zstd".into()),
            received_bytes: 1 << 20,
            received_raw_bytes: 3 << 20,
            sent_bytes: 0,
            sent_raw_bytes: 0,
        };
        let l = stream_line(&st);
        assert!(l.starts_with("fetch (zstd): received "), "{l}");
        assert!(l.contains("3.0x"), "{l}");
        assert!(!l.contains("sent"), "{l}");
        let raw = mars_api::StreamView {
            compression: None,
            received_raw_bytes: 1 << 20,
            ..st
        };
        let l = stream_line(&raw);
        assert!(l.starts_with("fetch (uncompressed): received "), "{l}");
        assert!(!l.contains('x'), "{l}");
    }
}
