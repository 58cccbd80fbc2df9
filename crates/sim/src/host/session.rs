//! This host's own sessions, started and stopped by the engine: fetch (requests to the source,
//! its answers turned into [`FetchEvent`]s: the copy decision the engine takes for each
//! logfile the source names, durable lengths, ends, caught-up confirmations, refusals), full
//! sync ([`SyncEvent`]s: the start, the copy) and replay (records applied onto the disk in
//! batches, [`ReplayEvent`]s).
//!
//! A session that gets no answer for `MAX_MISSES` request timeouts ends with an error (the
//! daemon's connection times out), and the engine starts another after its backoff; so does
//! one whose server restarted meanwhile (a reset connection).

use std::collections::BTreeSet;

use mars_config::HostName;
use mars_engine::resource::{Event, FetchEvent, ReplayEnd, ReplayEvent, SessionId, SyncEvent};
use mars_txlog::LogPos;

use super::serve::{FetchAnswer, Seg, SyncAnswer};
use super::{Body, Ctx, Host, Msg, Sid};

/// A request without an answer is sent again after this long (ms).
const REQUEST_TIMEOUT: u64 = 1_000;
/// After this many unanswered requests in a row the session ends with an error.
const MAX_MISSES: u32 = 3;
/// Records applied per round of replay.
const REPLAY_CHUNK: u64 = 8;

#[derive(Debug, Clone)]
pub(super) struct FetchSession {
    pub id: SessionId,
    pub source: HostName,
    /// Where the next request asks from.
    pub ask: LogPos,
    pub prev_link: String,
    /// The source answered once (the hello and the history check passed).
    pub connected: bool,
    pub server_boot: Option<u64>,
    /// Logfiles the engine decided about in this session.
    pub decided: BTreeSet<u64>,
    /// The logfile offered to the engine, waiting for its decision.
    pub offered: Option<(u64, HostName)>,
    pub sent_at: Option<u64>,
    pub misses: u32,
}

impl FetchSession {
    pub fn new(id: SessionId, source: HostName, from: LogPos, prev_link: String) -> Self {
        FetchSession {
            id,
            source,
            ask: from,
            prev_link,
            connected: false,
            server_boot: None,
            decided: BTreeSet::new(),
            offered: None,
            sent_at: None,
            misses: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct ReplaySession {
    pub id: SessionId,
    pub file: u64,
    pub origin: HostName,
    /// The next record to apply.
    pub pos: u64,
    pub to: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SyncPhase {
    /// Waiting for the source's start position.
    Start,
    /// The engine said go: waiting for the copy.
    Copy { done: u64, size: u64 },
}

#[derive(Debug, Clone)]
pub(super) struct SyncSession {
    pub id: SessionId,
    pub source: HostName,
    pub phase: SyncPhase,
    pub server_boot: Option<u64>,
    pub sent_at: Option<u64>,
    pub misses: u32,
}

impl SyncSession {
    pub fn new(id: SessionId, source: HostName) -> Self {
        SyncSession {
            id,
            source,
            phase: SyncPhase::Start,
            server_boot: None,
            sent_at: None,
            misses: 0,
        }
    }
}

impl Host {
    fn sid(&self, id: SessionId) -> Sid {
        Sid {
            incarnation: self.incarnation,
            id,
        }
    }

    fn fetch_alive(&self, id: SessionId) -> bool {
        self.fetch.as_ref().is_some_and(|s| s.id == id)
    }

    // ------------------------------------------------------------ fetch

    pub(super) fn send_fetch_req(&mut self, cx: &mut Ctx) {
        let sid_of = |id| self.sid(id);
        let Some(s) = &self.fetch else { return };
        let sid = sid_of(s.id);
        let tail = s.ask.offset.checked_sub(1).and_then(|i| {
            let copy = self.logs.get(&s.ask.file)?;
            copy.recs.get(usize::try_from(i).ok()?).copied()
        });
        let body = Body::FetchReq {
            sid,
            file: s.ask.file,
            off: s.ask.offset,
            prev_link: (!s.connected).then(|| s.prev_link.clone()),
            tail,
        };
        let to = s.source.clone();
        if let Some(s) = &mut self.fetch {
            s.sent_at = Some(cx.now);
        }
        cx.out.push(Msg {
            from: self.name.clone(),
            to,
            body,
        });
    }

    /// Sends the next request when the last one was answered or timed out; ends the session
    /// after too many timeouts.
    pub(super) fn fetch_tick(&mut self, cx: &mut Ctx) {
        let now = cx.now;
        let Some(s) = &mut self.fetch else { return };
        if s.offered.is_some() || s.sent_at.is_some_and(|t| now < t + REQUEST_TIMEOUT) {
            return;
        }
        if s.sent_at.is_some() {
            s.misses += 1;
        }
        if s.misses >= MAX_MISSES {
            let (id, source) = (s.id, s.source.clone());
            self.fetch = None;
            let error = Some(format!("no answer from {source}"));
            self.feed(Event::Fetch(id, FetchEvent::Ended { error }), cx);
            return;
        }
        self.send_fetch_req(cx);
    }

    pub(super) fn on_fetch_answer(
        &mut self,
        from: &HostName,
        sid: Sid,
        boot: u64,
        ans: FetchAnswer,
        cx: &mut Ctx,
    ) {
        let me = self.sid(0).incarnation;
        let Some(s) = self
            .fetch
            .as_mut()
            .filter(|s| sid.incarnation == me && sid.id == s.id && s.source == *from)
        else {
            return;
        };
        let id = s.id;
        if s.server_boot.is_some_and(|b| b != boot) {
            self.fetch = None;
            let error = Some(format!("connection to {from} reset"));
            self.feed(Event::Fetch(id, FetchEvent::Ended { error }), cx);
            return;
        }
        s.server_boot = Some(boot);
        s.sent_at = None;
        s.misses = 0;
        if !s.connected {
            s.connected = true;
            self.feed(Event::Fetch(id, FetchEvent::Connected), cx);
            if !self.fetch_alive(id) {
                return;
            }
        }
        match ans {
            FetchAnswer::Idle => {}
            FetchAnswer::Gone { file, oldest } => {
                self.feed(Event::Fetch(id, FetchEvent::Gone { file, oldest }), cx);
            }
            FetchAnswer::Refused { kind, reason } => {
                self.fetch = None;
                self.feed(
                    Event::Fetch(
                        id,
                        FetchEvent::Refused {
                            kind,
                            reason: reason.clone(),
                        },
                    ),
                    cx,
                );
                let error = Some(format!("refused: {reason}"));
                self.feed(Event::Fetch(id, FetchEvent::Ended { error }), cx);
            }
            FetchAnswer::Data {
                segs,
                caught_up,
                stamp,
            } => self.fetch_data(id, from, segs, caught_up, stamp, cx),
        }
    }

    /// Pieces of logfiles arrived: each logfile the session has not decided about yet is
    /// offered to the engine first; a piece must continue the copy exactly (else it is a stale
    /// or repeated answer, dropped with everything after it).
    fn fetch_data(
        &mut self,
        id: SessionId,
        from: &HostName,
        segs: Vec<Seg>,
        caught_up: bool,
        stamp: u64,
        cx: &mut Ctx,
    ) {
        let mut last = None;
        let mut all = true;
        for seg in segs {
            let Some(s) = self.fetch.as_mut().filter(|s| s.id == id) else {
                return;
            };
            if !s.decided.contains(&seg.file) {
                s.offered = Some((seg.file, seg.origin.clone()));
                let offer = FetchEvent::Offer {
                    no: seg.file,
                    origin: seg.origin.clone(),
                };
                self.feed(Event::Fetch(id, offer), cx);
                let decided = self
                    .fetch
                    .as_ref()
                    .is_some_and(|s| s.id == id && s.decided.contains(&seg.file));
                if !decided {
                    return;
                }
            }
            let Some(f) = self
                .logs
                .get_mut(&seg.file)
                .filter(|f| f.origin == seg.origin && f.recs.len() as u64 == seg.off)
            else {
                all = false;
                break;
            };
            f.recs.extend_from_slice(&seg.recs);
            f.durable = f.recs.len();
            let len = f.recs.len() as u64;
            if seg.end {
                f.complete = true;
            }
            let mut evs = Vec::new();
            if !seg.recs.is_empty() {
                evs.push(FetchEvent::Durable { no: seg.file, len });
            }
            if seg.end {
                evs.push(FetchEvent::End { no: seg.file, len });
            }
            if let Some(s) = &mut self.fetch {
                s.ask = if seg.end {
                    LogPos::new(seg.file + 1, 0)
                } else {
                    LogPos::new(seg.file, len)
                };
            }
            last = Some(LogPos::new(seg.file, len));
            for e in evs {
                if !self.fetch_alive(id) {
                    return;
                }
                self.feed(Event::Fetch(id, e), cx);
            }
        }
        if let (true, true, Some(pos)) = (caught_up, all, last) {
            if self.fetch_alive(id) {
                self.confirmed_by = Some(from.clone());
                self.feed(Event::Fetch(id, FetchEvent::CaughtUp { pos, stamp }), cx);
            }
        }
    }

    // ------------------------------------------------------------ sync

    pub(super) fn send_sync_req(&mut self, cx: &mut Ctx) {
        let Some(s) = &self.sync else { return };
        let body = Body::SyncReq {
            sid: self.sid(s.id),
            copy: match s.phase {
                SyncPhase::Start => None,
                SyncPhase::Copy { done, size } => Some((done, size)),
            },
        };
        let to = s.source.clone();
        if let Some(s) = &mut self.sync {
            s.sent_at = Some(cx.now);
        }
        cx.out.push(Msg {
            from: self.name.clone(),
            to,
            body,
        });
    }

    pub(super) fn sync_tick(&mut self, cx: &mut Ctx) {
        let now = cx.now;
        let Some(s) = &mut self.sync else { return };
        if s.sent_at.is_some_and(|t| now < t + REQUEST_TIMEOUT) {
            return;
        }
        if s.sent_at.is_some() {
            s.misses += 1;
        }
        if s.misses >= MAX_MISSES {
            let (id, source) = (s.id, s.source.clone());
            self.sync = None;
            let error = Some(format!("no answer from {source}"));
            self.feed(Event::Sync(id, SyncEvent::Ended { error }), cx);
            return;
        }
        self.send_sync_req(cx);
    }

    pub(super) fn on_sync_answer(
        &mut self,
        from: &HostName,
        sid: Sid,
        boot: u64,
        ans: SyncAnswer,
        cx: &mut Ctx,
    ) {
        let me = self.sid(0).incarnation;
        let Some(s) = self
            .sync
            .as_mut()
            .filter(|s| sid.incarnation == me && sid.id == s.id && s.source == *from)
        else {
            return;
        };
        let id = s.id;
        if s.server_boot.is_some_and(|b| b != boot) {
            self.sync = None;
            let error = Some(format!("connection to {from} reset"));
            self.feed(Event::Sync(id, SyncEvent::Ended { error }), cx);
            return;
        }
        s.server_boot = Some(boot);
        match (s.phase, ans) {
            (
                SyncPhase::Start,
                SyncAnswer::Info {
                    size,
                    start,
                    prev_link,
                },
            ) => {
                s.sent_at = None;
                s.misses = 0;
                let info = SyncEvent::Info {
                    size,
                    start,
                    prev_link,
                };
                self.feed(Event::Sync(id, info), cx);
            }
            (SyncPhase::Copy { done, size }, SyncAnswer::Copy { disk, tl, end }) => {
                self.sync = None;
                self.disk.retain(|b, _| u64::from(*b) < done);
                self.disk.extend(disk);
                self.tl = tl;
                cx.note(format!(
                    "{}: sync copy from {from} done, end {end}",
                    self.name
                ));
                let copied = SyncEvent::Copied {
                    end,
                    transferred: size - done,
                };
                self.feed(Event::Sync(id, copied), cx);
                self.feed(Event::Sync(id, SyncEvent::Ended { error: None }), cx);
            }
            (_, SyncAnswer::Refused { reason }) => {
                self.sync = None;
                let error = Some(format!("refused: {reason}"));
                self.feed(Event::Sync(id, SyncEvent::Ended { error }), cx);
            }
            // A repeated answer of an earlier phase.
            _ => {}
        }
    }

    // ------------------------------------------------------------ replay

    /// Applies up to `REPLAY_CHUNK` records this round, over as many runs as the engine starts
    /// meanwhile; the position is persisted after each batch (the disk before the position).
    pub(super) fn replay_tick(&mut self, cx: &mut Ctx) {
        let mut budget = REPLAY_CHUNK;
        while budget > 0 {
            let Some(s) = self.replay.clone() else { return };
            let me = self.name.clone();
            let Some(f) = self.logs.get(&s.file).filter(|f| f.origin == s.origin) else {
                self.replay = None;
                let end = ReplayEnd::Failed {
                    detail: format!("log {}-{} is not here", s.file, s.origin),
                };
                let pos = LogPos::new(s.file, s.pos);
                self.feed(Event::Replay(s.id, ReplayEvent::Stopped { pos, end }), cx);
                return;
            };
            let end = s.to.min(s.pos + budget).min(f.recs.len() as u64);
            let ids: Vec<u64> = f.recs[s.pos as usize..end as usize].to_vec();
            for id in ids {
                self.disk.insert(cx.ghost.info(id).block, id);
                match &mut self.tl {
                    Some(tl) => cx.ghost.applied(&me, tl, id),
                    None => cx
                        .ghost
                        .violations
                        .push(format!("{me} replays without a known timeline")),
                }
            }
            budget -= end - s.pos;
            let pos = LogPos::new(s.file, end);
            if let Some(d) = &mut self.dir {
                d.position = pos;
            }
            if end >= s.to || end == s.pos {
                self.replay = None;
                let ev = ReplayEvent::Stopped {
                    pos,
                    end: ReplayEnd::Done,
                };
                self.feed(Event::Replay(s.id, ev), cx);
            } else {
                if let Some(r) = &mut self.replay {
                    r.pos = end;
                }
                self.feed(Event::Replay(s.id, ReplayEvent::Progress { pos }), cx);
            }
        }
    }
}
