//! The world: hosts, the network between them, the operator, the clock, and the loop that
//! runs one step after another and checks the invariants after each.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mars_config::HostName;
use mars_engine::resource::{Op, OpId, OpReply};
use mars_meta::Store;

use crate::ghost::Ghost;
use crate::host::{Body, Ctx, Host, Msg};
use crate::rng::Rng;
use crate::{Outcome, SimConfig, Stats};

/// Simulated time per step (ms).
pub const STEP_MS: u64 = 250;
const HOSTS: [&str; 4] = ["a", "b", "c", "d"];
const BLOCKS: u64 = crate::host::SIZE;
/// Most anti-entropy entries per answer.
const META_LIMIT: usize = 64;

struct InFlight {
    at: u64,
    /// Tie-breaker among messages due at the same time: a random order (reordering).
    order: u64,
    msg: Msg,
}

/// What an operator request in flight was, for its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OpKind {
    /// `primary` (planned handover).
    Planned,
    /// `primary --force`; `take_back`: on a host acting as primary.
    Forced {
        take_back: bool,
    },
    Switch(String),
    Invalidate,
    Secondary,
    Leave,
    Cron,
}

pub struct World {
    pub cfg: SimConfig,
    rng: Rng,
    pub now: u64,
    clock: Arc<AtomicU64>,
    names: Vec<HostName>,
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
    /// Operator requests waiting for their reply.
    ops: BTreeMap<OpId, (usize, OpKind)>,
    next_op: OpId,
    /// The last reply: its request and whether it was a success.
    last_reply: Option<(OpId, bool)>,
}

fn h(s: &str) -> HostName {
    HostName::new(s).expect("valid")
}

impl World {
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        let mut rng = Rng::new(seed);
        let clock = Arc::new(AtomicU64::new(crate::host::BASE_MS));
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
            hosts.push(Host::new(h(name), store, skew));
        }
        let mut w = World {
            cfg,
            rng,
            now: 0,
            clock,
            names: HOSTS.iter().map(|n| h(n)).collect(),
            hosts,
            net: Vec::new(),
            cut: BTreeSet::new(),
            loss: 0.0,
            delay_max: 2,
            ghost: Ghost::default(),
            trace: Vec::new(),
            stats: Stats::default(),
            step_no: 0,
            ops: BTreeMap::new(),
            next_op: 1,
            last_reply: None,
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
        self.with_host(0, |a, cx| a.create_resource(cx));
        self.exchange_all_metadata();
        for i in [1, 2] {
            self.with_host(i, |x, cx| x.join(cx))
                .expect("fresh host joins");
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
                    self.hosts[i].heard.insert(peer.clone(), self.now);
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

    /// Runs `f` with a host and the context it may touch; queues what it sent and handles the
    /// operator replies its engine gave.
    fn with_host<R>(&mut self, i: usize, f: impl FnOnce(&mut Host, &mut Ctx) -> R) -> R {
        let mut out = Vec::new();
        let mut trace = Vec::new();
        let r = {
            let mut cx = Ctx {
                now: self.now,
                step: self.step_no,
                cluster: &self.names,
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
        let replies = std::mem::take(&mut self.hosts[i].replies);
        for (id, result) in replies {
            self.on_reply(id, result);
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

    // ------------------------------------------------------------ the operator

    /// Sends an operator request to host `i`'s engine; returns its id (still in `ops` while
    /// no reply came: the command runs).
    fn issue(&mut self, i: usize, op: Op, kind: OpKind) -> OpId {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(id, (i, kind));
        self.with_host(i, |host, cx| host.op(id, op, cx));
        id
    }

    /// Whether request `id` was answered at once, and with success.
    fn answered(&self, id: OpId) -> Option<bool> {
        match self.last_reply {
            Some((last, ok)) if last == id => Some(ok),
            _ if self.ops.contains_key(&id) => None,
            // Answered, and other replies came after it.
            _ => Some(true),
        }
    }

    /// A `primary` command runs on host `i`.
    fn role_op_running(&self, i: usize) -> bool {
        self.ops
            .values()
            .any(|(k, kind)| *k == i && matches!(kind, OpKind::Planned | OpKind::Forced { .. }))
    }

    fn on_reply(&mut self, id: OpId, result: OpReply) {
        let Some((i, kind)) = self.ops.remove(&id) else {
            return;
        };
        self.last_reply = Some((id, result.is_ok()));
        let name = self.hosts[i].name.clone();
        let what = match &kind {
            OpKind::Planned => "primary".to_string(),
            OpKind::Forced { .. } => "primary --force".to_string(),
            OpKind::Switch(s) => s.clone(),
            OpKind::Invalidate => "invalidate".into(),
            OpKind::Secondary => "secondary".into(),
            OpKind::Leave => "leave-resource".into(),
            OpKind::Cron => "cron".into(),
        };
        match &result {
            Ok(msg) if kind == OpKind::Cron && msg.is_empty() => {}
            Ok(msg) => self.note(format!("{name}: {what}: ok: {msg}")),
            Err(e) => self.note(format!("{name}: {what}: refused: {e}")),
        }
        if result.is_err() {
            return;
        }
        match kind {
            OpKind::Forced { take_back: true } => {
                // Every other history is given up (also that of a host down right now that
                // comes back acting as primary on stale metadata and leaving again: found at
                // seed 5564).
                self.ghost.last_step_down = None;
                let others = self.names.iter().filter(|x| **x != name).cloned();
                self.ghost.forced_out.extend(others);
                self.stats.failovers += 1;
            }
            OpKind::Invalidate => {
                // The operator discards this host's history: its writes need not survive.
                self.stats.invalidates += 1;
                self.hosts[i].mark = None;
                if self
                    .ghost
                    .last_step_down
                    .as_ref()
                    .is_some_and(|s| s.host == name)
                {
                    self.ghost.last_step_down = None;
                }
            }
            OpKind::Leave => self.stats.leaves += 1,
            _ => {}
        }
    }

    /// Host `i` can take an operator request.
    fn ready(&self, i: usize) -> bool {
        self.hosts[i].up && self.hosts[i].engine.is_some()
    }

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
                // Writes on whichever host acts as primary with the device open (a fenced one
                // fails them).
                let writers: Vec<usize> = (0..self.hosts.len())
                    .filter(|&k| self.hosts[k].up && self.hosts[k].open() && !self.hosts[k].fenced)
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
                if self.ready(i) {
                    self.issue(i, Op::Cron, OpKind::Cron);
                }
            }
            570..=599 => {
                let up = self.hosts.iter().filter(|x| x.up).count();
                if self.hosts[i].up && up > 2 {
                    self.stats.crashes += 1;
                    // The clients of its requests in flight lose their connection.
                    self.ops.retain(|_, (k, _)| *k != i);
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
                if self.ready(i) {
                    let switch = ["fetch", "replay"][self.rng.below(2) as usize];
                    let on = self.rng.chance(0.6);
                    let what = format!("{}-{switch}", if on { "resume" } else { "pause" });
                    self.note(format!("{name}: {what}"));
                    let op = Op::Switch {
                        switches: vec![switch.to_string()],
                        on,
                    };
                    self.issue(i, op, OpKind::Switch(what));
                }
            }
            820..=869 => self.handover(i),
            870..=894 => self.failover(i),
            895..=919 => {
                if self.ready(i) {
                    self.note(format!("{name}: invalidate"));
                    self.issue(i, Op::Invalidate, OpKind::Invalidate);
                }
            }
            920..=939 => {
                let host = &mut self.hosts[i];
                if host.up {
                    let designated = host.designated;
                    let open = match &mut host.vol {
                        // Only the designated primary's device takes new openers.
                        Some(v) if v.app_open || designated => {
                            v.app_open = !v.app_open;
                            Some(v.app_open)
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
                    if self.hosts[i].dir.is_none() {
                        if self.with_host(i, |host, cx| host.join(cx)).is_ok() {
                            self.stats.joins += 1;
                            self.note(format!("{name}: join-resource"));
                        }
                    } else if self.ready(i) && self.hosts[i].meta().members.len() > 2 {
                        self.note(format!("{name}: leave-resource --force"));
                        self.issue(i, Op::LeaveResource { force: true }, OpKind::Leave);
                    }
                }
            }
            960..=969 => {
                if self.ready(i) {
                    self.note(format!("{name}: secondary"));
                    self.issue(i, Op::Secondary, OpKind::Secondary);
                }
            }
            _ => {}
        }
    }

    /// `marsadm primary RES` on host `i`: the operator stops the application on the host
    /// acting as primary once the command runs (systemd there), the engine does the rest.
    fn handover(&mut self, i: usize) {
        if !self.ready(i) || self.role_op_running(i) {
            return;
        }
        let me = self.hosts[i].name.clone();
        let meta = self.hosts[i].meta();
        let acting: Vec<HostName> = mars_engine::roles::actual_primaries(&meta, &me)
            .cloned()
            .collect();
        self.note(format!("{me}: primary"));
        let op = Op::Primary {
            force: false,
            timeout: crate::COMMAND_TIMEOUT,
            confirmed: false,
        };
        // The operator's intent decides what the promotion may lose (the ghost's view), from
        // the moment the command runs: the engine may promote within the request itself.
        let intent = std::mem::replace(&mut self.hosts[i].ghost_force, false);
        let id = self.issue(i, op, OpKind::Planned);
        if self.answered(id).is_some() {
            // Refused, or nothing to do (primary already): no handover.
            self.hosts[i].ghost_force = intent;
            return;
        }
        self.stats.handovers += 1;
        for old in acting {
            self.send(Msg {
                from: me.clone(),
                to: old,
                body: Body::StopApp,
            });
        }
    }

    /// `marsadm primary --force RES` on host `i`: on a host acting as primary it takes the
    /// role back (or writes its designation anew); on a consistent replica after
    /// `pause-fetch` (and `resume-replay`), a failover.
    fn failover(&mut self, i: usize) {
        if !self.ready(i) || self.role_op_running(i) {
            return;
        }
        let me = self.hosts[i].name.clone();
        let op = Op::Primary {
            force: true,
            timeout: crate::COMMAND_TIMEOUT,
            // The simulated operator confirms (a split brain is what the run explores).
            confirmed: true,
        };
        if self.hosts[i].is_primary() {
            self.note(format!("{me}: primary --force (acting as primary)"));
            self.issue(i, op, OpKind::Forced { take_back: true });
            return;
        }
        let meta = self.hosts[i].meta();
        let Some(todo) = meta.members.get(&me).map(|m| m.todo) else {
            return;
        };
        let consistent = self.hosts[i]
            .engine
            .as_ref()
            .and_then(|e| e.replica())
            .is_some_and(|r| r.consistent());
        // The operator looks at `view` first: only a consistent, attached replica.
        if !consistent || !todo.attach {
            return;
        }
        self.note(format!("{me}: pause-fetch; primary --force"));
        let off = Op::Switch {
            switches: vec!["fetch".into()],
            on: false,
        };
        self.issue(i, off, OpKind::Switch("pause-fetch".into()));
        if !todo.replay {
            let on = Op::Switch {
                switches: vec!["replay".into()],
                on: true,
            };
            self.issue(i, on, OpKind::Switch("resume-replay".into()));
        }
        let intent = std::mem::replace(&mut self.hosts[i].ghost_force, true);
        let id = self.issue(i, op, OpKind::Forced { take_back: false });
        if self.answered(id) == Some(false) {
            self.hosts[i].ghost_force = intent;
        } else {
            self.stats.failovers += 1;
        }
    }

    // ------------------------------------------------------------ the step

    /// One step: maybe an event, the network, every host's round, then the checks.
    pub fn step(&mut self, chaos: bool) -> Result<(), String> {
        self.step_no += 1;
        self.now += STEP_MS;
        self.clock
            .store(crate::host::BASE_MS + self.now, Ordering::Relaxed);
        if chaos {
            let events = self.rng.below(3);
            for _ in 0..events {
                self.random_event();
            }
        }
        self.deliver();
        self.pull_metadata();
        for i in 0..self.hosts.len() {
            if !self.hosts[i].up {
                continue;
            }
            let wb = self.rng.chance(0.5);
            self.with_host(i, |host, cx| host.round(cx, wb));
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
                        if let Some(v) = &mut self.hosts[i].vol {
                            v.app_open = false;
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

    /// A replica that would report `UpToDate` now (its engine's report, judged by
    /// `member_state` with its engine's metadata) holds exactly the history of the host whose
    /// confirmation it took, up to its replay position, and its disk is that history's
    /// content.
    fn check_up_to_date(&mut self, i: usize) -> Result<(), String> {
        let host = &self.hosts[i];
        let Some(e) = &host.engine else {
            return Ok(());
        };
        let Some(r) = e.replica() else {
            return Ok(());
        };
        let Some(confirmer) = host.confirmed_by.clone() else {
            return Ok(());
        };
        let applied = r.applied;
        let me = host.name.clone();
        let mut meta = (**e.meta()).clone();
        let Some(m) = meta.members.get_mut(&me) else {
            return Ok(());
        };
        m.report = Some(e.report_now());
        let now = self.now;
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
        // Judged against the host that confirmed, and against the host it fetches from now:
        // "up to date" speaks of the current source, whoever said it.
        let mut judges = vec![("confirmer", confirmer)];
        if let Some(src) = r.source().filter(|s| **s != judges[0].1) {
            judges.push(("source", src.clone()));
        }
        for (what, judge) in judges {
            let p = &self.hosts[self.idx(&judge)];
            let Some(ptl) = &p.tl else {
                continue;
            };
            let n = self.ghost.count_before(ptl, applied);
            let theirs = &ptl[..n];
            if tl.as_slice() != theirs {
                return Err(format!(
                    "{me} reports UpToDate at {applied} with {} records, but the {what} \
                     {judge}'s history there has {} (last {:?} vs {:?})",
                    tl.len(),
                    n,
                    tl.last(),
                    theirs.last()
                ));
            }
            if host.disk != self.ghost.content(theirs) {
                return Err(format!(
                    "{me} reports UpToDate at {applied}, but its disk differs from the {what} \
                     {judge}'s state there"
                ));
            }
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
        let meta = self.hosts[0].store_meta();
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
        // Consistent replicas' disks are what their timelines say up to the replay position
        // (a restarted ex-primary replays its own log: its timeline holds the records of its
        // log not applied yet).
        for host in &self.hosts {
            let applied = host
                .engine
                .as_ref()
                .and_then(|e| e.replica())
                .filter(|r| r.consistent())
                .map(|r| r.applied);
            if let (Some(applied), Some(tl)) = (applied, &host.tl) {
                let n = self.ghost.count_before(tl, applied);
                if host.disk != self.ghost.content(&tl[..n]) {
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
                    "    its metadata: primary {:?} (designation {}), links {}",
                    meta.primary,
                    meta.designation,
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
    for host in &w.hosts {
        let meta = host.store_meta();
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
