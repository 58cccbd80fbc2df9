//! MARS's amount and role primitives as pure computations: `{sync,fetch,replay,work}-{size,
//! pos,rest,reached,almost-reached,threshold-reached,percent,permille,vector}`,
//! `summary-vector`, `-rate`/`-amount-rate`/`-remain`, and `is-primary`, `is-secondary`,
//! `nr-primary`, `nr-secondary`.
//!
//! One implementation for both places that answer them: `marsadm view-NAME` (the macro table
//! of `mars-cli`, which fills [`Amounts`] and [`Roles`] from marsd's view) and the templates'
//! `%NAME{}` ([`crate::view::StateView`], which marsd fills from its engine's state at
//! generation time). The formulas are MARS's `eval_fn` (marsadm, mars0.1astable177); where
//! our numbers come from a different source than MARS's links, the fields say so.

use std::collections::BTreeSet;

use crate::num::Num;

/// One job's progress: bytes done of a total, and bytes per second (0: not moving).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub rate: u64,
}

/// What a replica's amount macros read. MARS sums the bytes of its logfiles; ours are on one
/// scale from this replica's applied position to the primary's log end: `fetch` and `replay`
/// share that total (marsd's view shows the same two progresses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    /// The resource's size (`sync-size`).
    pub size: u64,
    /// A full sync that runs (`None`: none).
    pub sync: Option<Progress>,
    /// Fetching the primary's log (`None`: nothing to fetch, e.g. on a primary).
    pub fetch: Option<Progress>,
    /// Replaying it onto the disk.
    pub replay: Option<Progress>,
}

/// What an amount macro measures: MARS's `sync`, `fetch`, `replay` and `work` (fetch and
/// replay together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Sync,
    Fetch,
    Replay,
    Work,
}

impl Job {
    pub const ALL: [Job; 4] = [Job::Sync, Job::Fetch, Job::Replay, Job::Work];

    pub fn as_str(self) -> &'static str {
        match self {
            Job::Sync => "sync",
            Job::Fetch => "fetch",
            Job::Replay => "replay",
            Job::Work => "work",
        }
    }

    pub fn parse(s: &str) -> Option<Job> {
        Job::ALL.into_iter().find(|j| j.as_str() == s)
    }
}

/// MARS's default `--threshold`: 10 MiB.
pub const THRESHOLD: u64 = 10 << 20;

/// MARS's `almost-reached` limit when none (or none above 0) is given.
pub const ALMOST_LIMIT: f64 = 990.0;

impl Amounts {
    /// `(WHAT-size, WHAT-pos)`. As in MARS, `replay-size` is `fetch-pos`, `work-size` is
    /// `fetch-size` and `work-pos` is `replay-pos`; without a sync running `sync-pos` is the
    /// size; without anything to fetch everything is reached.
    pub fn amount(&self, w: Job) -> (u64, u64) {
        let fetch_size = self.fetch.or(self.replay).map_or(0, |p| p.total);
        let fetch_pos = self.fetch.map_or(fetch_size, |p| p.done);
        let replay_pos = self.replay.map_or(fetch_pos, |p| p.done);
        match w {
            Job::Sync => match self.sync {
                Some(p) => (p.total, p.done),
                None => (self.size, self.size),
            },
            Job::Fetch => (fetch_size, fetch_pos),
            Job::Replay => (fetch_pos, replay_pos),
            Job::Work => (fetch_size, replay_pos),
        }
    }

    /// `WHAT-rest`: size minus position, never negative.
    pub fn rest(&self, w: Job) -> u64 {
        let (size, pos) = self.amount(w);
        size.saturating_sub(pos)
    }

    /// `WHAT-reached`.
    pub fn reached(&self, w: Job) -> bool {
        let (size, pos) = self.amount(w);
        pos >= size
    }

    /// `WHAT-almost-reached [LIMIT]`: MARS's `int(pos / limit) >= int(size / 1000)`, the
    /// limit Perl's number of the argument, [`ALMOST_LIMIT`] when that is not above 0.
    pub fn almost_reached(&self, w: Job, limit: Option<&str>) -> bool {
        let (size, pos) = self.amount(w);
        let limit = limit
            .map(|l| Num::parse(l).as_f64())
            .filter(|l| *l > 0.0)
            .unwrap_or(ALMOST_LIMIT);
        (pos as f64 / limit).trunc() >= (size as f64 / 1000.0).trunc()
    }

    /// `WHAT-threshold-reached`: within `threshold` bytes of the end.
    pub fn threshold_reached(&self, w: Job, threshold: u64) -> bool {
        let (size, pos) = self.amount(w);
        pos.saturating_add(threshold) >= size
    }

    /// `WHAT-percent` (`full` 100) / `-permille` (1000): MARS's `(full + 0.5) * pos / size`,
    /// capped at `full`; an empty amount is complete.
    pub fn fraction(&self, w: Job, full: f64) -> f64 {
        let (size, pos) = self.amount(w);
        if size == 0 {
            return full;
        }
        let v = (full + 0.5) * pos as f64 / size as f64;
        if v >= full {
            full
        } else {
            v
        }
    }

    /// `WHAT-vector [DELIM]`: `POS:SIZE`; MARS takes `:` for an empty or false (`0`) delimiter.
    pub fn vector(&self, w: Job, delim: Option<&str>) -> String {
        let (size, pos) = self.amount(w);
        format!("{pos}{}{size}", perl_delim(delim))
    }

    /// `summary-vector [DELIM]`: `REPLAY-POS:FETCH-POS:FETCH-SIZE`.
    pub fn summary_vector(&self, delim: Option<&str>) -> String {
        let d = perl_delim(delim);
        let (fetch_size, fetch_pos) = self.amount(Job::Fetch);
        let (_, replay_pos) = self.amount(Job::Replay);
        format!("{replay_pos}{d}{fetch_pos}{d}{fetch_size}")
    }

    /// `WHAT-rate` / `WHAT-amount-rate` in bytes per second (0: not moving); `work` is the
    /// larger of fetch's and replay's, as MARS takes the maximum.
    pub fn rate(&self, w: Job) -> u64 {
        let p = match w {
            Job::Sync => self.sync,
            Job::Fetch => self.fetch,
            Job::Replay => self.replay,
            Job::Work => return self.rate(Job::Fetch).max(self.rate(Job::Replay)),
        };
        p.map_or(0, |p| p.rate)
    }

    /// `WHAT-remain`: seconds until done at the current rate; 0 when done, -1 when not
    /// moving; `work` is the sum of fetch's and replay's (MARS adds them, -1s included).
    pub fn remain(&self, w: Job) -> f64 {
        if w == Job::Work {
            return self.remain(Job::Fetch) + self.remain(Job::Replay);
        }
        let rest = self.rest(w);
        let rate = self.rate(w);
        if rest == 0 {
            0.0
        } else if rate == 0 {
            -1.0
        } else {
            rest as f64 / rate as f64
        }
    }

    /// The text of MARS's amount primitive `name` (canonical spelling) with its optional
    /// argument, as MARS's `eval_fn` prints it; `threshold` is the default of
    /// `-threshold-reached` (MARS: the `threshold` variable). `None`: not an amount macro.
    /// A threshold argument that is not one of MARS's sizes is an error (MARS dies).
    pub fn macro_value(
        &self,
        name: &str,
        arg: Option<&str>,
        threshold: u64,
    ) -> Option<Result<String, String>> {
        if name == "summary-vector" {
            return Some(Ok(self.summary_vector(arg)));
        }
        let (what, op) = name.split_once('-')?;
        let w = Job::parse(what)?;
        let bit = |b: bool| u8::from(b).to_string();
        Some(Ok(match op {
            "size" => self.amount(w).0.to_string(),
            "pos" => self.amount(w).1.to_string(),
            "rest" => self.rest(w).to_string(),
            "reached" => bit(self.reached(w)),
            "almost-reached" => bit(self.almost_reached(w, arg)),
            "threshold-reached" => {
                let t = match arg.filter(|a| !a.is_empty()) {
                    Some(a) => match mars_size(a) {
                        Some(t) => t,
                        None => {
                            return Some(Err(format!(
                                "size argument '{a}' must be a number, optionally followed \
                                 by a suffix [kKmMgGtTpP] (MARS's rule: lowercase = \
                                 multiples of 1000, uppercase = of 1024)"
                            )))
                        }
                    },
                    None => threshold,
                };
                bit(self.threshold_reached(w, t))
            }
            "percent" => perl_number(self.fraction(w, 100.0)),
            "permille" => perl_number(self.fraction(w, 1000.0)),
            "vector" => self.vector(w, arg),
            "rate" | "amount-rate" => self.rate(w).to_string(),
            "remain" => perl_number(self.remain(w)),
            _ => return None,
        }))
    }
}

/// Perl's truth of a delimiter: `""` and `"0"` are false, MARS then takes `:`.
fn perl_delim(delim: Option<&str>) -> &str {
    match delim {
        Some(d) if !d.is_empty() && d != "0" => d,
        _ => ":",
    }
}

/// A number as Perl prints it (`%.15g`: `100`, `27.4755859375`, `-1`).
pub fn perl_number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        return format!("{}", f as i64);
    }
    Num::Float(f).to_string()
}

/// MARS's `get_size` for a size argument: digits with an optional fraction and an optional
/// suffix, lowercase `kmgtp` powers of 1000, uppercase powers of 1024 (`10M` = 10485760,
/// `10m` = 10000000); `None` for anything else.
pub fn mars_size(s: &str) -> Option<u64> {
    let (num, suffix) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], Some(c)),
        _ => (s, None),
    };
    let mut parts = num.splitn(2, '.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next();
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || frac.is_some_and(|f| !f.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let factor: f64 = match suffix {
        None => 1.0,
        Some(c) => {
            let exp = match c.to_ascii_lowercase() {
                'k' => 1,
                'm' => 2,
                'g' => 3,
                't' => 4,
                'p' => 5,
                _ => return None,
            };
            let base: f64 = if c.is_ascii_lowercase() {
                1000.0
            } else {
                1024.0
            };
            base.powi(exp)
        }
    };
    let v = num.parse::<f64>().ok()? * factor;
    // MARS keeps Perl's number; a byte count is whole.
    (v.is_finite() && v < u64::MAX as f64).then_some(v as u64)
}

/// Who acts as primary of a resource, as this host sees it: this host when its device is
/// open, another member when its last report says so and it is alive (a dead member acts in
/// no role we can know of).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roles {
    /// The hosts acting as primary (more than one: split brain).
    pub acting: BTreeSet<String>,
    /// The resource's members (MARS's `get_member_peers`).
    pub members: Vec<String>,
}

impl Roles {
    /// `is-primary [HOST]`.
    pub fn is_primary(&self, host: &str) -> bool {
        self.acting.contains(host)
    }

    /// `nr-primary`: members acting as primary.
    pub fn nr_primary(&self) -> usize {
        self.members.iter().filter(|m| self.is_primary(m)).count()
    }

    /// `nr-secondary`: members not acting as primary.
    pub fn nr_secondary(&self) -> usize {
        self.members.len() - self.nr_primary()
    }

    /// The text of `is-primary`, `is-secondary`, `nr-primary`, `nr-secondary` for `host`
    /// (MARS's `%{host}` unless the argument names one); `None` for other names.
    pub fn macro_value(&self, name: &str, arg: Option<&str>, host: &str) -> Option<String> {
        let who = arg.filter(|a| !a.is_empty()).unwrap_or(host);
        let bit = |b: bool| u8::from(b).to_string();
        Some(match name {
            "is-primary" => bit(self.is_primary(who)),
            "is-secondary" => bit(!self.is_primary(who)),
            "nr-primary" => self.nr_primary().to_string(),
            "nr-secondary" => self.nr_secondary().to_string(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(done: u64, total: u64, rate: u64) -> Option<Progress> {
        Some(Progress { done, total, rate })
    }

    /// A replica 3 MiB behind the primary's log end, 1 MiB of it fetched, nothing replayed
    /// yet, syncing 1 of 4 GiB.
    fn behind() -> Amounts {
        Amounts {
            size: 4 << 30,
            sync: p(1 << 30, 4 << 30, 100 << 20),
            fetch: p(1 << 20, 3 << 20, 1 << 20),
            replay: p(0, 3 << 20, 0),
        }
    }

    fn v(a: &Amounts, name: &str, arg: Option<&str>) -> String {
        a.macro_value(name, arg, THRESHOLD).unwrap().unwrap()
    }

    /// MARS's formulas (its `eval_fn`), value by value.
    #[test]
    fn mars_formulas() {
        let a = behind();
        assert_eq!(v(&a, "fetch-size", None), "3145728");
        assert_eq!(v(&a, "fetch-pos", None), "1048576");
        assert_eq!(v(&a, "fetch-rest", None), "2097152");
        // replay-size = fetch-pos, work-size = fetch-size, work-pos = replay-pos.
        assert_eq!(v(&a, "replay-size", None), "1048576");
        assert_eq!(v(&a, "replay-vector", None), "0:1048576");
        assert_eq!(v(&a, "work-vector", Some("/")), "0/3145728");
        assert_eq!(v(&a, "work-vector", Some("0")), "0:3145728");
        assert_eq!(v(&a, "summary-vector", None), "0:1048576:3145728");
        assert_eq!(v(&a, "fetch-reached", None), "0");
        // 100.5 * 1/3.
        assert_eq!(v(&a, "fetch-percent", None), "33.5");
        assert_eq!(v(&a, "fetch-permille", None), "333.5");
        assert_eq!(v(&a, "sync-percent", None), "25.125");
        // Within 10 MiB (the default threshold) of the end; not within 1 MiB (MARS's `1M`),
        // 2 MB (`2m` is 2000000) neither, 2.5M is.
        assert_eq!(v(&a, "fetch-threshold-reached", None), "1");
        assert_eq!(v(&a, "fetch-threshold-reached", Some("1M")), "0");
        assert_eq!(v(&a, "fetch-threshold-reached", Some("2m")), "0");
        assert_eq!(v(&a, "fetch-threshold-reached", Some("2.5M")), "1");
        assert!(a
            .macro_value("fetch-threshold-reached", Some("lots"), THRESHOLD)
            .unwrap()
            .is_err());
        // int(1048576 / 990) = 1059 < int(3145728 / 1000) = 3145.
        assert_eq!(v(&a, "fetch-almost-reached", None), "0");
        assert_eq!(v(&a, "fetch-almost-reached", Some("330")), "1");
        // Rates in bytes per second, remain in seconds; replay does not move: -1, and
        // work-remain adds them (2 s + -1), as MARS.
        assert_eq!(v(&a, "fetch-rate", None), "1048576");
        assert_eq!(v(&a, "fetch-amount-rate", None), "1048576");
        assert_eq!(v(&a, "fetch-remain", None), "2");
        assert_eq!(v(&a, "replay-remain", None), "-1");
        assert_eq!(v(&a, "work-remain", None), "1");
        assert_eq!(v(&a, "work-rate", None), "1048576");
        assert_eq!(v(&a, "sync-remain", None), "30.72");
        assert!(a.macro_value("fetch-nosuch", None, THRESHOLD).is_none());
        assert!(a.macro_value("is-primary", None, THRESHOLD).is_none());
    }

    /// A primary (or a replica with nothing to do): everything reached, nothing moving.
    #[test]
    fn nothing_to_do_is_complete() {
        let a = Amounts {
            size: 1 << 30,
            ..Amounts::default()
        };
        for w in Job::ALL {
            let n = w.as_str();
            assert_eq!(v(&a, &format!("{n}-reached"), None), "1", "{n}");
            assert_eq!(v(&a, &format!("{n}-percent"), None), "100", "{n}");
            assert_eq!(v(&a, &format!("{n}-rest"), None), "0", "{n}");
            assert_eq!(v(&a, &format!("{n}-remain"), None), "0", "{n}");
        }
        assert_eq!(v(&a, "sync-vector", None), "1073741824:1073741824");
    }

    #[test]
    fn sizes_as_mars_reads_them() {
        assert_eq!(mars_size("10M"), Some(10 << 20));
        assert_eq!(mars_size("10m"), Some(10_000_000));
        assert_eq!(mars_size("1.5K"), Some(1536));
        assert_eq!(mars_size("7"), Some(7));
        for bad in ["", "M", "10MiB", "-1", "1x", "1.2.3"] {
            assert_eq!(mars_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn roles() {
        let r = Roles {
            acting: ["a".to_string()].into(),
            members: vec!["a".into(), "b".into(), "c".into()],
        };
        let m = |n: &str, arg: Option<&str>, host: &str| r.macro_value(n, arg, host).unwrap();
        assert_eq!(m("is-primary", None, "a"), "1");
        assert_eq!(m("is-primary", None, "b"), "0");
        assert_eq!(m("is-primary", Some("a"), "b"), "1");
        assert_eq!(m("is-secondary", Some(""), "b"), "1");
        assert_eq!(m("nr-primary", None, "b"), "1");
        assert_eq!(m("nr-secondary", None, "b"), "2");
        assert!(r.macro_value("is-attach", None, "a").is_none());
    }
}
