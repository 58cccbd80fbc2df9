//! The world: hosts, the network between them, the operator, the clock, and the loop that
//! runs one step after another and checks the invariants after each.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mars_config::HostName;
use mars_engine::keys;
use mars_meta::Store;

use crate::ghost::Ghost;
use crate::host::{res, Body, Command, Ctx, Host, Local, Msg};
use crate::rng::Rng;
use crate::{Outcome, SimConfig, Stats};

/// Simulated time per step (ms): one reconcile round.
pub const STEP_MS: u64 = 250;
const HOSTS: [&str; 4] = ["a", "b", "c", "d"];
const BLOCKS: u64 = 16;
/// Most anti-entropy entries per answer.
const META_LIMIT: usize = 64;

struct InFlight {
    at: u64,
    /// Tie-breaker among messages due at the same time: a random order (reordering).
    order: u64,
    msg: Msg,
}

pub struct World {
    pub cfg: SimConfig,
    rng: Rng,
    pub now: u64,
    clock: Arc<AtomicU64>,
    pub hosts: Vec<Host>,
    net: Vec<InFlight>,
    /// Directed links that are cut: (from, to).
    cut: BTreeSet<(usize, usize)>,
    /// Per-message loss probability right now.
    loss: f64,
    /// Largest delay (steps) a message may take right now.
    delay_max: u64,
    pub ghost: Ghost,
    pub trace: Vec<String>,
    pub stats: Stats,
    step_no: u64,
}

fn h(s: &str) -> HostName {
    HostName::new(s).expect("valid")
}

impl World {
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        let mut rng = Rng::new(seed);
        let clock = Arc::new(AtomicU64::new(1_000_000));
        let mut hosts = Vec::new();
        for name in HOSTS {
            // Each host's clock is off by up to ±2 s: the Lamport stamps must not care.
            let skew = rng.below(4_000) as i64 - 2_000;
            let c = clock.clone();
            let now = move || {
                let ms = c.load(Ordering::Relaxed) as i64 + skew;
                ms as u64 * 1_000_000
            };
            let store = Store::in_memory(h(name), now).expect("in-memory store");
            hosts.push(Host::new(h(name), store));
        }
        let mut w = World {
            cfg,
            rng,
            now: 0,
            clock,
            hosts,
            net: Vec::new(),
            cut: BTreeSet::new(),
            loss: 0.0,
            delay_max: 2,
            ghost: Ghost::default(),
            trace: Vec::new(),
            stats: Stats::default(),
            step_no: 0,
        };
        w.setup();
        w
    }

    /// A cluster of four hosts; `a` creates the resource, `b` and `c` join it (full sync),
    /// `d` is a cluster member that may join later.
    fn setup(&mut self) {
        for host in &mut self.hosts {
            let me = host.name.clone();
            host.set(&format!("ips/ip-{me}"), "127.0.0.1");
        }
        self.exchange_all_metadata();
        let a = &mut self.hosts[0];
        a.set(&keys::size(&res()), "16");
        a.set(
            keys::UNREACHABLE_LIMIT,
            &crate::host::UNREACHABLE_LIMIT_SECS.to_string(),
        );
        a.set(&keys::data(&res(), &h("a")), "/dev/sim");
        a.set(&keys::primary(&res()), "a");
        a.create_primary();
        self.exchange_all_metadata();
        for i in [1, 2] {
            self.hosts[i].join().expect("fresh host joins");
        }
        self.exchange_all_metadata();
        self.trace
            .push("setup: a primary, b and c joined (full sync pending), d outside".into());
    }

    /// Anti-entropy to a fixpoint, as if every pull were answered at once.
    fn exchange_all_metadata(&mut self) -> usize {
        let mut rounds = 0;
        loop {
            let mut changed = false;
            for i in 0..self.hosts.len() {
                for j in 0..self.hosts.len() {
                    if i == j || !self.hosts[i].up || !self.hosts[j].up {
                        continue;
                    }
                    let peer = self.hosts[j].name.clone();
                    let seen = self.hosts[i].seen.get(&peer).copied().unwrap_or(0);
                    if self.hosts[j].store.local_seq() <= seen {
                        continue;
                    }
                    let c = self.hosts[j]
                        .store
                        .changes_since(seen, usize::MAX)
                        .expect("in-memory store");
                    let to = &mut self.hosts[i];
                    to.store.apply_remote(&c.entries).expect("in-memory store");
                    to.seen.insert(peer, c.up_to);
                    changed = true;
                }
            }
            rounds += 1;
            if !changed || rounds > 20 {
                return rounds;
            }
        }
    }

    fn idx(&self, name: &HostName) -> usize {
        self.hosts
            .iter()
            .position(|x| x.name == *name)
            .expect("known host")
    }

    fn note(&mut self, s: String) {
        self.trace.push(format!(
            "{:>8.2}s {:>4} {s}",
            self.now as f64 / 1000.0,
            self.step_no
        ));
    }

    /// Runs `f` with a host and the context it may touch; queues what it sent.
    fn with_host<R>(&mut self, i: usize, f: impl FnOnce(&mut Host, &mut Ctx) -> R) -> R {
        let mut out = Vec::new();
        let mut trace = Vec::new();
        let others = self
            .hosts
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != i)
            .map(|(_, x)| x.name.clone())
            .collect();
        let r = {
            let mut cx = Ctx {
                now: self.now,
                step: self.step_no,
                others,
                cfg: &self.cfg,
                ghost: &mut self.ghost,
                out: &mut out,
                trace: &mut trace,
            };
            f(&mut self.hosts[i], &mut cx)
        };
        self.trace.extend(trace);
        for m in out {
            self.send(m);
        }
        r
    }

    fn send(&mut self, msg: Msg) {
        let (from, to) = (self.idx(&msg.from), self.idx(&msg.to));
        if self.cut.contains(&(from, to)) || self.rng.chance(self.loss) {
            return;
        }
        let at = self.now + STEP_MS * self.rng.below(self.delay_max + 1);
        let order = self.rng.next_u64();
        self.net.push(InFlight { at, order, msg });
    }

    /// Delivers every message due by now, in random order among equals.
    fn deliver(&mut self) {
        let mut due: Vec<InFlight> = Vec::new();
        let mut rest = Vec::new();
        for m in self.net.drain(..) {
            if m.at <= self.now {
                due.push(m);
            } else {
                rest.push(m);
            }
        }
        self.net = rest;
        due.sort_by_key(|m| (m.at, m.order));
        for m in due {
            let (from, to) = (self.idx(&m.msg.from), self.idx(&m.msg.to));
            // A link cut while the message travelled loses it; a host that is down gets nothing.
            if self.cut.contains(&(from, to)) || !self.hosts[to].up {
                continue;
            }
            let sender = m.msg.from.clone();
            self.with_host(to, |host, cx| host.receive(&sender, m.msg.body, cx));
        }
    }

    /// Every host asks every peer for metadata changes (at most one question in flight per
    /// pair; a lost one times out).
    fn pull_metadata(&mut self) {
        for i in 0..self.hosts.len() {
            for j in 0..self.hosts.len() {
                if i == j || !self.hosts[i].up || !self.hosts[j].up {
                    continue;
                }
                let peer = self.hosts[j].name.clone();
                let asker = &self.hosts[i];
                if asker.pull_until.get(&peer).is_some_and(|t| *t > self.now)
                    || self.cut.contains(&(i, j))
                {
                    continue;
                }
                let seen = asker.seen.get(&peer).copied().unwrap_or(0);
                let answer = if self.hosts[j].store.local_seq() > seen {
                    Some(
                        self.hosts[j]
                            .store
                            .changes_since(seen, META_LIMIT)
                            .expect("in-memory store"),
                    )
                } else {
                    None
                };
                let until = self.now + 4 * STEP_MS;
                self.hosts[i].pull_until.insert(peer.clone(), until);
                let me = self.hosts[i].name.clone();
                self.send(Msg {
                    from: peer,
                    to: me,
                    body: Body::Meta(answer),
                });
            }
        }
    }

    // ------------------------------------------------------------ the operator and faults

    // The arms are event kinds weighted by their ranges; each checks its own preconditions
    // inside, so that a kind keeps its weight whatever the guards (clippy would move them out).
    #[allow(clippy::collapsible_match)]
    fn random_event(&mut self) {
        let n = self.hosts.len() as u64;
        let i = self.rng.below(n) as usize;
        let name = self.hosts[i].name.clone();
        let roll = self.rng.below(1000);
        match roll {
            0..=399 => {
                // Writes on whichever host acts as primary with the device open and is not
                // fenced (another acting designated primary).
                let writers: Vec<usize> = (0..self.hosts.len())
                    .filter(|&k| self.hosts[k].up && self.hosts[k].open() && !self.fenced(k))
                    .collect();
                if let Some(&k) = self.rng.pick(&writers) {
                    let count = 1 + self.rng.below(3);
                    let mut ids = Vec::new();
                    for _ in 0..count {
                        let block = self.rng.below(BLOCKS) as u32;
                        if let Some(id) = self.with_host(k, |host, cx| host.write(block, cx)) {
                            ids.push(format!("{block}:{id}"));
                        }
                    }
                    self.stats.writes += ids.len() as u64;
                    let who = self.hosts[k].name.clone();
                    self.note(format!("{who}: write {}", ids.join(" ")));
                }
            }
            400..=469 => {
                if self.hosts[i].up && self.hosts[i].flush() {
                    self.stats.flushes += 1;
                    self.note(format!("{name}: FLUSH"));
                }
            }
            470..=539 => {
                if self.hosts[i].up {
                    self.hosts[i].sync_log();
                }
            }
            540..=569 => {
                if self.hosts[i].up && self.hosts[i].is_primary() {
                    let p = self.hosts[i].rotate_if_used();
                    self.note(format!("{name}: cron: log rotation, current {p}"));
                }
            }
            570..=599 => {
                let up = self.hosts.iter().filter(|x| x.up).count();
                if self.hosts[i].up && up > 2 {
                    self.stats.crashes += 1;
                    self.with_host(i, |host, cx| host.crash(cx));
                }
            }
            600..=649 => {
                if !self.hosts[i].up {
                    self.with_host(i, |host, cx| host.restart(cx));
                }
            }
            650..=689 => {
                let j = self.rng.below(n) as usize;
                if i != j {
                    let both = self.rng.chance(0.7);
                    self.cut.insert((i, j));
                    if both {
                        self.cut.insert((j, i));
                    }
                    let other = self.hosts[j].name.clone();
                    self.note(format!(
                        "net: cut {name} {} {other}",
                        if both { "<->" } else { "->" }
                    ));
                }
            }
            690..=739 => {
                if !self.cut.is_empty() {
                    if self.rng.chance(0.5) {
                        self.cut.clear();
                        self.note("net: all links healed".into());
                    } else {
                        let links: Vec<(usize, usize)> = self.cut.iter().copied().collect();
                        let l = *self.rng.pick(&links).expect("non-empty");
                        self.cut.remove(&l);
                        self.note(format!(
                            "net: heal {} -> {}",
                            self.hosts[l.0].name, self.hosts[l.1].name
                        ));
                    }
                }
            }
            740..=759 => {
                self.loss = [0.0, 0.0, 0.1, 0.3][self.rng.below(4) as usize];
                self.delay_max = 1 + self.rng.below(6);
                self.note(format!(
                    "net: loss {} delay up to {} steps",
                    self.loss, self.delay_max
                ));
            }
            760..=819 => {
                if self.hosts[i].up && self.hosts[i].meta().is_member(&name) {
                    let switch = ["fetch", "replay"][self.rng.below(2) as usize];
                    let on = self.rng.chance(0.6);
                    self.hosts[i].set(
                        &keys::todo(&res(), &name, switch),
                        if on { "1" } else { "0" },
                    );
                    self.note(format!(
                        "{name}: {}-{switch}",
                        if on { "resume" } else { "pause" }
                    ));
                }
            }
            820..=869 => self.handover(i),
            870..=894 => self.failover(i),
            895..=919 => {
                if self.hosts[i].up {
                    let r = self.with_host(i, |host, cx| host.invalidate(cx));
                    if r.is_ok() {
                        self.stats.invalidates += 1;
                    }
                }
            }
            920..=939 => {
                if self.hosts[i].up {
                    let open = match &mut self.hosts[i].local {
                        Local::Primary(v) => {
                            v.open = !v.open;
                            Some(v.open)
                        }
                        _ => None,
                    };
                    if let Some(open) = open {
                        self.note(format!(
                            "{name}: application {}",
                            if open { "started" } else { "stopped" }
                        ));
                    }
                }
            }
            940..=959 => {
                if self.hosts[i].up {
                    let members = self.hosts[i].meta().members.len();
                    if matches!(self.hosts[i].local, Local::None) {
                        if self.hosts[i].join().is_ok() {
                            self.stats.joins += 1;
                            self.note(format!("{name}: join-resource"));
                        }
                    } else if members > 2 && self.with_host(i, |host, cx| host.leave(cx)).is_ok() {
                        self.stats.leaves += 1;
                        self.note(format!("{name}: leave-resource"));
                    }
                }
            }
            960..=969 => {
                // `secondary`: nobody designated (refused while the device is open here).
                if self.hosts[i].up && !self.hosts[i].open() && self.hosts[i].meta().exists() {
                    self.hosts[i].set(&keys::primary(&res()), keys::NO_PRIMARY);
                    self.note(format!("{name}: secondary (no designated primary)"));
                }
            }
            _ => {}
        }
    }

    /// Whether host `k`, acting as primary, is fenced: another host is designated and acts.
    fn fenced(&mut self, k: usize) -> bool {
        let meta = self.hosts[k].meta();
        let me = self.hosts[k].name.clone();
        meta.primary.as_ref().is_some_and(|p| {
            *p != me
                && meta
                    .members
                    .get(p)
                    .and_then(|m| m.report.as_ref())
                    .is_some_and(|r| r.role == mars_engine::Role::Primary)
        })
    }

    /// `marsadm primary RES` on host `i` (the checks of `roles::primary` and `planned`).
    fn handover(&mut self, i: usize) {
        let host = &mut self.hosts[i];
        if !host.up || host.cmd.is_some() {
            return;
        }
        let me = host.name.clone();
        let meta = host.meta();
        let Some(todo) = meta.members.get(&me).map(|m| m.todo) else {
            return;
        };
        let Local::Replica(r) = &host.local else {
            return;
        };
        let refused = if !r.consistent() {
            Some("inconsistent".to_string())
        } else if !todo.fetch || !todo.replay {
            Some("fetch and replay must be on".into())
        } else if let Some(sb) = mars_engine::split_brain(&meta, &|_| true) {
            Some(format!("split brain from logfile {}", sb.logfile))
        } else if r.stuck.as_ref().is_some_and(|s| {
            s.contains("mismatch") || s.contains("differ") || s.contains("damaged")
        }) {
            Some("replication stuck".into())
        } else {
            None
        };
        let acting: Vec<HostName> = mars_engine::roles::actual_primaries(&meta, &me)
            .cloned()
            .collect();
        let now = self.now;
        let unreachable = acting.iter().find(|a| !host.alive(now, a)).cloned();
        if let Some(why) = refused.or(unreachable.map(|a| format!("{a} is not reachable"))) {
            self.note(format!("{me}: primary refused: {why}"));
            return;
        }
        self.stats.handovers += 1;
        let deadline = self.now + crate::COMMAND_TIMEOUT;
        match acting.first().cloned() {
            Some(old) => {
                // The operator stops the application on the old primary (systemd there).
                self.send(Msg {
                    from: me.clone(),
                    to: old.clone(),
                    body: Body::StopApp,
                });
                self.note(format!("{me}: primary (planned handover from {old})"));
                self.hosts[i].cmd = Some(Command::WaitClosed { old, deadline });
            }
            None => {
                self.hosts[i].set(&keys::primary(&res()), me.as_str());
                self.note(format!("{me}: primary (planned, nobody acting)"));
                self.hosts[i].cmd = Some(Command::WaitPromoted {
                    forced: false,
                    deadline,
                });
            }
        }
    }

    /// `marsadm pause-fetch RES; marsadm primary --force RES` on host `i`.
    fn failover(&mut self, i: usize) {
        let host = &mut self.hosts[i];
        if !host.up || host.cmd.is_some() {
            return;
        }
        let me = host.name.clone();
        let meta = host.meta();
        let Some(todo) = meta.members.get(&me).map(|m| m.todo) else {
            return;
        };
        match &host.local {
            Local::Primary(_) if meta.primary.as_ref() != Some(&me) => {
                // Still acting: takes the role back by force. Every other history is given up
                // (also that of a host down right now that comes back acting as primary on
                // stale metadata and leaves the role again: found at seed 5564).
                host.set(&keys::primary(&res()), me.as_str());
                let others: Vec<HostName> = self
                    .hosts
                    .iter()
                    .filter(|h| h.name != me)
                    .map(|h| h.name.clone())
                    .collect();
                self.ghost.last_step_down = None;
                self.ghost.forced_out.extend(others);
                self.note(format!("{me}: primary --force (takes the role back)"));
                self.stats.failovers += 1;
            }
            Local::Replica(r) if r.consistent() && todo.attach => {
                host.set(&keys::todo(&res(), &me, "fetch"), "0");
                if !todo.replay {
                    host.set(&keys::todo(&res(), &me, "replay"), "1");
                }
                host.forced_marker = true;
                host.set(&keys::primary(&res()), me.as_str());
                host.cmd = Some(Command::WaitPromoted {
                    forced: true,
                    deadline: self.now + crate::COMMAND_TIMEOUT,
                });
                self.stats.failovers += 1;
                self.note(format!("{me}: pause-fetch; primary --force"));
            }
            _ => {}
        }
    }

    // ------------------------------------------------------------ the step

    /// One step: maybe an event, the network, every host's round, then the checks.
    pub fn step(&mut self, chaos: bool) -> Result<(), String> {
        self.step_no += 1;
        self.now += STEP_MS;
        self.clock.store(1_000_000 + self.now, Ordering::Relaxed);
        if chaos {
            let events = self.rng.below(3);
            for _ in 0..events {
                self.random_event();
            }
        }
        self.deliver();
        self.pull_metadata();
        let names: Vec<HostName> = self.hosts.iter().map(|x| x.name.clone()).collect();
        for i in 0..self.hosts.len() {
            if !self.hosts[i].up {
                continue;
            }
            let wb = self.rng.chance(0.5);
            self.with_host(i, |host, cx| {
                host.advance_command(cx);
                host.reconcile(cx, &names);
                host.replay(cx);
                host.replica_requests(cx);
                if wb {
                    host.writeback(cx);
                }
            });
        }
        self.check()
    }

    /// Heals the network, brings every host back, closes the application where another host
    /// is designated, and lets the hosts run without faults; then checks that the metadata
    /// converged and at most one host acts as primary.
    pub fn settle(&mut self, steps: u64) -> Result<(), String> {
        self.note("settle: heal everything, restart crashed hosts".into());
        self.cut.clear();
        self.loss = 0.0;
        self.delay_max = 1;
        for i in 0..self.hosts.len() {
            if !self.hosts[i].up {
                self.with_host(i, |host, cx| host.restart(cx));
            }
        }
        for s in 0..steps {
            // The operator closes devices left open on hosts that are no longer designated.
            if s % 8 == 0 {
                for i in 0..self.hosts.len() {
                    let meta = self.hosts[i].meta();
                    let me = self.hosts[i].name.clone();
                    if meta.primary.as_ref() != Some(&me) {
                        if let Local::Primary(v) = &mut self.hosts[i].local {
                            v.open = false;
                        }
                    }
                }
            }
            self.step(false)?;
        }
        // Everything in flight arrives; then anti-entropy runs to its fixpoint.
        self.now += 60_000;
        self.deliver();
        let rounds = self.exchange_all_metadata();
        self.check_converged(rounds)?;
        self.check_one_primary()?;
        self.stats.settles += 1;
        Ok(())
    }

    // ------------------------------------------------------------ invariants

    fn check(&mut self) -> Result<(), String> {
        if let Some(v) = self.ghost.violations.first() {
            return Err(v.clone());
        }
        for i in 0..self.hosts.len() {
            let host = &self.hosts[i];
            // Every write acknowledged before a completed FLUSH is still there (crashes lose
            // only what was never flushed).
            if let Some((len, last)) = host.mark {
                let ok = host
                    .tl
                    .as_ref()
                    .is_some_and(|tl| Ghost::extends(tl, len, last));
                if !ok {
                    return Err(format!(
                        "{}: lost flushed writes: {len} records up to {last:?} were flushed, \
                         the timeline now has {:?}",
                        host.name,
                        host.tl.as_ref().map(Vec::len)
                    ));
                }
            }
            if host.up {
                self.check_up_to_date(i)?;
            }
        }
        Ok(())
    }

    /// A replica that would report `UpToDate` holds exactly the state of the primary that
    /// confirmed it, at its replay position.
    fn check_up_to_date(&mut self, i: usize) -> Result<(), String> {
        let Local::Replica(r) = &self.hosts[i].local else {
            return Ok(());
        };
        let Some((_, _, confirmer)) = r.caught_up.clone() else {
            return Ok(());
        };
        let applied = r.applied;
        let me = self.hosts[i].name.clone();
        let mut meta = self.hosts[i].meta();
        let Some(todo) = meta.members.get(&me).map(|m| m.todo) else {
            return Ok(());
        };
        let report = self.hosts[i].report(&todo, self.now);
        meta.members.get_mut(&me).expect("member").report = Some(report);
        let now = self.now;
        let host = &self.hosts[i];
        let state = mars_engine::member_state(&meta, &me, &|x| host.alive(now, x));
        if state.disk_state != "UpToDate" {
            return Ok(());
        }
        self.stats.up_to_date_checks += 1;
        let Some(tl) = &host.tl else {
            return Err(format!(
                "{me} reports UpToDate without a consistent timeline"
            ));
        };
        let p = &self.hosts[self.idx(&confirmer)];
        let Some(ptl) = &p.tl else {
            return Ok(());
        };
        let n = self.ghost.count_before(ptl, applied);
        let theirs = &ptl[..n];
        if tl.as_slice() != theirs {
            return Err(format!(
                "{me} reports UpToDate at {applied} with {} records, but {confirmer}'s history \
                 there has {} (last {:?} vs {:?})",
                tl.len(),
                n,
                tl.last(),
                theirs.last()
            ));
        }
        if host.disk != self.ghost.content(theirs) {
            return Err(format!(
                "{me} reports UpToDate at {applied}, but its disk differs from {confirmer}'s \
                 state there"
            ));
        }
        Ok(())
    }

    fn check_converged(&mut self, rounds: usize) -> Result<(), String> {
        let all = |s: &Store| -> Vec<(String, Option<String>, u64, String)> {
            s.list_prefix_with_tombstones("")
                .expect("in-memory store")
                .into_iter()
                .map(|e| (e.key, e.value, e.stamp, e.origin.to_string()))
                .collect()
        };
        let first = all(&self.hosts[0].store);
        for host in &self.hosts[1..] {
            if all(&host.store) != first {
                return Err(format!(
                    "metadata did not converge after healing ({rounds} anti-entropy rounds): \
                     {} differs from {}",
                    host.name, self.hosts[0].name
                ));
            }
        }
        Ok(())
    }

    fn check_one_primary(&mut self) -> Result<(), String> {
        let meta = self.hosts[0].meta();
        let acting: Vec<HostName> = self
            .hosts
            .iter()
            .filter(|x| x.is_primary())
            .map(|x| x.name.clone())
            .collect();
        if acting.len() > 1 {
            return Err(format!(
                "after settling, {} act as primary ({:?} designated)",
                acting
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                meta.primary
            ));
        }
        if let Some(a) = acting.first() {
            if meta.primary.as_ref() != Some(a) {
                return Err(format!(
                    "after settling, {a} acts as primary but {:?} is designated",
                    meta.primary
                ));
            }
            self.stats.settled_with_primary += 1;
        }
        // Consistent replicas' disks are what their timelines say.
        for host in &self.hosts {
            if let (Local::Replica(r), Some(tl)) = (&host.local, &host.tl) {
                if r.consistent() && host.disk != self.ghost.content(tl) {
                    return Err(format!(
                        "{}: consistent replica whose disk is not its history",
                        host.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Runs one seed: `steps` steps of chaos with a settle phase every 100 steps and at the end.
pub fn run(seed: u64, steps: u64, cfg: SimConfig) -> Outcome {
    let mut w = World::new(seed, cfg);
    let mut error = None;
    let mut done = 0;
    while done < steps {
        let chunk = (steps - done).min(100);
        let mut r = Ok(());
        for _ in 0..chunk {
            r = w.step(true);
            if r.is_err() {
                break;
            }
        }
        if r.is_ok() {
            r = w.settle(40);
        }
        if let Err(e) = r {
            w.note(format!("VIOLATION: {e}"));
            for i in 0..w.hosts.len() {
                let line = format!("  state of {}", w.hosts[i].describe());
                w.trace.push(line);
                let meta = w.hosts[i].meta();
                let links: Vec<String> = meta
                    .versions
                    .iter()
                    .map(|(no, l)| {
                        let hosts: Vec<String> = l
                            .iter()
                            .map(|(h, v)| {
                                let hash = mars_engine::version::hash_of(v).unwrap_or(v);
                                format!("{h}={}", &hash[..6.min(hash.len())])
                            })
                            .collect();
                        format!("{no}:{}", hosts.join(","))
                    })
                    .collect();
                w.trace.push(format!(
                    "    its metadata: primary {:?}, links {}",
                    meta.primary,
                    links.join(" ")
                ));
            }
            error = Some(e);
            break;
        }
        done += chunk;
    }
    // Coverage: what state the replicas ended in.
    let mut end_states = BTreeMap::new();
    for host in &mut w.hosts {
        let meta = host.meta();
        let me = host.name.clone();
        if meta.is_member(&me) {
            let st = mars_engine::member_state(&meta, &me, &|_| true);
            *end_states.entry(st.disk_state).or_insert(0) += 1;
        }
    }
    w.stats.end_states = end_states;
    w.stats.planned_promotions = w.ghost.planned_promotions;
    w.stats.forced_promotions = w.ghost.forced_promotions;
    Outcome {
        seed,
        steps,
        error,
        trace: w.trace,
        stats: w.stats,
    }
}
