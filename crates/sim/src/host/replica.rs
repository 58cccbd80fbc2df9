//! The replica's side: fetch and sync requests (`fetch_loop`, `sync_loop` in
//! `daemon/src/replica.rs`), the serving side of both streams (`daemon/src/logserve.rs`), the
//! handling of their answers (`fetch_session`, `open_copy`) and replay (`replay_loop`).

use mars_config::HostName;
use mars_engine::{keys, plan, ChainCheck};
use mars_txlog::LogPos;

use super::*;

impl Host {
    // ------------------------------------------------------------ replica: fetch, sync, replay

    /// Sends the next fetch or sync request if one is due (`fetch_loop`, `sync_loop`).
    pub fn replica_requests(&mut self, cx: &mut Ctx) {
        let meta = self.meta();
        let Some(todo) = meta.members.get(&self.name).map(|m| m.todo) else {
            return;
        };
        // Always the end of the newest copy, complete or not: the server checks that copy
        // against its own logfile of that number (origin, length) before it goes on.
        let from_pos = match self.newest() {
            Some((no, f)) => LogPos::new(no, f.recs.len() as u64),
            None => {
                let Some(r) = self.rep() else { return };
                let base = r
                    .sync
                    .as_ref()
                    .and_then(|s| s.start)
                    .map_or(r.applied, |s| s.min(r.applied));
                LogPos::new(base.file.max(1), 0)
            }
        };
        let me = self.name.clone();
        let prev_link = from_pos
            .file
            .checked_sub(1)
            .and_then(|p| meta.version(p, &me))
            .filter(|_| !cx.cfg.fetch_request_without_history)
            .map(str::to_string);
        let Local::Replica(r) = &mut self.local else {
            return;
        };
        let Some(source) = r.source.clone() else {
            return;
        };
        if !todo.attach || r.needs_sync {
            return;
        }
        // Fetching waits for the sync's start position: it begins there.
        let ready = r.sync.as_ref().is_none_or(|s| s.start.is_some());
        if todo.fetch && ready && r.fetch_until <= cx.now {
            r.fetch_until = cx.now + REQUEST_TIMEOUT;
            cx.out.push(Msg {
                from: me.clone(),
                to: source.clone(),
                body: Body::FetchReq {
                    file: from_pos.file,
                    off: from_pos.offset,
                    prev_link,
                    gen: r.gen,
                },
            });
        }
        if let Some(s) = &r.sync {
            if todo.sync && s.end.is_none() && r.sync_until <= cx.now {
                r.sync_until = cx.now + REQUEST_TIMEOUT;
                cx.out.push(Msg {
                    from: me,
                    to: source,
                    body: Body::SyncReq {
                        want_copy: s.start.is_some(),
                        gen: r.gen,
                    },
                });
            }
        }
    }

    /// The serving side of a fetch request (`serve_fetch` / `ship_file`).
    pub fn serve_fetch(
        &mut self,
        file: u64,
        off: u64,
        gen: u64,
        now: u64,
        cx_cfg_lengths_only: bool,
    ) -> Option<Body> {
        let primary = match &self.local {
            Local::Primary(_) => true,
            Local::Replica(_) => false,
            _ => return None,
        };
        let (mut file, mut off) = (file, off);
        if !self.logs.contains_key(&file) {
            let oldest = self.logs.keys().next().copied().unwrap_or(0);
            let newest = self.logs.keys().next_back().copied().unwrap_or(0);
            if self.logs.is_empty() && !primary {
                // Nothing to serve, but nothing is lost either.
                return None;
            }
            let meta = self.meta();
            // `complete_by_link`: the daemon compares lengths only; the fix wants every link of
            // the logfile equal to this host's own (same length *and* same history).
            let lengths_only = cx_cfg_lengths_only;
            let by_link = meta.versions.get(&file).is_some_and(|links| {
                let mine = links.get(&self.name);
                !links.is_empty()
                    && links
                        .values()
                        .all(|l| mars_engine::version::len_of(l) == Some(off))
                    && (lengths_only || mine.is_some_and(|m| links.values().all(|l| l == m)))
            });
            if file + 1 == oldest && by_link {
                // The replica has all of a logfile deleted here since: go on with the next.
                file = oldest;
                off = 0;
            } else if file < oldest || self.logs.is_empty() {
                return Some(Body::FetchGone { file, gen });
            } else if file == newest + 1 && off == 0 {
                return None;
            } else {
                return Some(Body::FetchRefuse {
                    reason: format!(
                        "log {file} is beyond this host's newest log {newest}: different \
                         histories?"
                    ),
                    from: file,
                    gen,
                });
            }
        }
        let newest = self.logs.keys().next_back().copied().unwrap_or(0);
        let durable = self.durable_pos();
        let mut segs = Vec::new();
        let mut caught_up = false;
        let mut budget = FETCH_CHUNK;
        while let Some(f) = self.logs.get(&file) {
            let (limit, complete) = if primary {
                if durable.file > file {
                    (f.recs.len() as u64, true)
                } else if durable.file == file {
                    (durable.offset, false)
                } else {
                    (0, false)
                }
            } else {
                (f.recs.len() as u64, f.complete || file < newest)
            };
            if off > limit && (complete || limit > 0) {
                return Some(Body::FetchRefuse {
                    reason: format!(
                        "the replica's copy of log {file} has {off} records, this host only \
                         {limit}: different histories (split brain?)"
                    ),
                    from: file,
                    gen,
                });
            }
            if off > limit {
                break;
            }
            let to = limit.min(off + budget as u64);
            budget -= (to - off) as usize;
            let end = complete && to == limit;
            segs.push(Seg {
                file,
                origin: f.origin.clone(),
                off,
                recs: f.recs[off as usize..to as usize].to_vec(),
                end,
            });
            if !end {
                caught_up = primary && !complete && to == limit;
                break;
            }
            file += 1;
            off = 0;
        }
        if segs.is_empty() {
            return None;
        }
        Some(Body::FetchData {
            segs,
            caught_up,
            stamp: now,
            gen,
        })
    }

    /// The serving side of the sync stream (`serve_sync`): only an acting primary serves.
    pub fn serve_sync(
        &mut self,
        peer: &HostName,
        want_copy: bool,
        gen: u64,
        cx: &Ctx,
    ) -> Option<Body> {
        let Local::Primary(v) = &self.local else {
            return None;
        };
        let wb = v.wb;
        if !want_copy {
            let start = self.rotate_if_used();
            self.transient_pins
                .insert(peer.clone(), (start.file, cx.now + TRANSIENT_PIN));
            let prev = start.file - 1;
            let prev_link = if prev == 0 {
                None
            } else {
                let meta = self.meta();
                meta.version(prev, &self.name)
                    .map(str::to_string)
                    .or_else(|| {
                        let f = self.logs.get(&prev)?;
                        plan::my_link(&meta, &self.name, prev, &f.origin, f.recs.len() as u64)
                    })
            };
            return Some(Body::SyncInfo {
                start,
                prev_link,
                gen,
            });
        }
        // Chunks are read through the volume: the newest data, written back or not.
        let mut disk = self.disk.clone();
        let upto = if cx.cfg.sync_serves_unsynced_data {
            |f: &LogFile| f.recs.len()
        } else {
            |f: &LogFile| f.durable
        };
        for (no, f) in self.logs.range(wb.file..) {
            let skip = if *no == wb.file {
                wb.offset as usize
            } else {
                0
            };
            for id in f.recs.iter().take(upto(f)).skip(skip) {
                disk.insert(cx.ghost.info(*id).block, *id);
            }
        }
        let (end, tl) = if cx.cfg.sync_serves_unsynced_data {
            // The daemon answers the end request with the appended position.
            (self.appended_pos(), self.tl.clone())
        } else {
            let end = self.durable_pos();
            let tl = self.tl.as_ref().map(|tl| {
                let n = cx.ghost.count_before(tl, end);
                tl[..n].to_vec()
            });
            (end, tl)
        };
        Some(Body::SyncCopy { disk, tl, end, gen })
    }

    /// A message arrived for this host.
    pub fn receive(&mut self, from: &HostName, body: Body, cx: &mut Ctx) {
        self.heard.insert(from.clone(), cx.now);
        match body {
            Body::Meta(changes) => {
                self.pull_until.remove(from);
                if let Some(c) = changes {
                    self.store
                        .apply_remote(&c.entries)
                        .expect("in-memory store");
                    let seen = self.seen.entry(from.clone()).or_insert(0);
                    *seen = (*seen).max(c.up_to);
                }
            }
            Body::FetchReq {
                file,
                off,
                prev_link,
                gen,
            } => {
                let meta = self.meta();
                let ours = file
                    .checked_sub(1)
                    .and_then(|p| meta.version(p, &self.name));
                if let (Some(theirs), Some(ours)) = (&prev_link, ours) {
                    if theirs != ours {
                        cx.out.push(Msg {
                            from: self.name.clone(),
                            to: from.clone(),
                            body: Body::FetchRefuse {
                                reason: format!(
                                    "the asker's logfile {} is not ours: different histories",
                                    file - 1
                                ),
                                from: file,
                                gen,
                            },
                        });
                        return;
                    }
                }
                if let Some(b) =
                    self.serve_fetch(file, off, gen, cx.now, cx.cfg.complete_by_link_lengths_only)
                {
                    cx.out.push(Msg {
                        from: self.name.clone(),
                        to: from.clone(),
                        body: b,
                    });
                }
            }
            Body::SyncReq { want_copy, gen } => {
                if let Some(b) = self.serve_sync(from, want_copy, gen, cx) {
                    cx.out.push(Msg {
                        from: self.name.clone(),
                        to: from.clone(),
                        body: b,
                    });
                }
            }
            Body::StopApp => {
                if let Local::Primary(v) = &mut self.local {
                    if v.open {
                        v.open = false;
                        cx.note(format!("{}: application stopped for a handover", self.name));
                    }
                }
            }
            Body::FetchData { .. }
            | Body::FetchRefuse { .. }
            | Body::FetchGone { .. }
            | Body::SyncInfo { .. }
            | Body::SyncCopy { .. } => self.receive_replica(from, body, cx),
        }
    }

    fn receive_replica(&mut self, from: &HostName, body: Body, cx: &mut Ctx) {
        let meta = self.meta();
        let Some(todo) = meta.members.get(&self.name).map(|m| m.todo) else {
            return;
        };
        let me = self.name.clone();
        let Local::Replica(r) = &mut self.local else {
            return;
        };
        if r.source.as_ref() != Some(from) || !todo.attach || r.needs_sync {
            return;
        }
        match body {
            Body::FetchData {
                segs,
                caught_up,
                stamp,
                gen,
            } => {
                r.fetch_until = 0;
                if gen != r.gen || !todo.fetch {
                    return;
                }
                for seg in segs {
                    let file = seg.file;
                    // open_copy
                    // An empty copy carries no history (a logfile its writer never wrote
                    // to): replace it — unless replay has already moved past it, which took
                    // its (empty) history: another logfile of that number is then a fork.
                    let passed = r.applied.file > file;
                    if self.logs.get(&file).is_some_and(|l| {
                        l.origin != seg.origin
                            && l.recs.is_empty()
                            && (!passed || cx.cfg.replace_replayed_empty_copy)
                    }) {
                        self.logs.remove(&file);
                    }
                    if let Some(l) = self.logs.get(&file) {
                        if l.origin != seg.origin {
                            let msg = format!(
                                "the primary's log {file} is from {}, ours from {}: the \
                                 histories differ (split brain?)",
                                seg.origin, l.origin
                            );
                            if r.forked.is_none() {
                                cx.note(format!("{me}: {msg}"));
                            }
                            r.stuck = Some(msg);
                            r.forked = Some(file);
                            return;
                        }
                    } else {
                        if let Some((&last, _)) = self.logs.iter().next_back() {
                            if file != last + 1 {
                                return;
                            }
                            self.logs.get_mut(&last).expect("listed").complete = true;
                        }
                        self.logs.insert(
                            file,
                            LogFile {
                                origin: seg.origin.clone(),
                                recs: Vec::new(),
                                durable: 0,
                                complete: false,
                            },
                        );
                    }
                    let l = self.logs.get_mut(&file).expect("opened");
                    // Verified on arrival: the piece must continue the copy exactly.
                    if seg.off != l.recs.len() as u64 {
                        return;
                    }
                    l.recs.extend_from_slice(&seg.recs);
                    l.durable = l.recs.len();
                    if seg.end {
                        l.complete = true;
                    }
                    if caught_up {
                        r.caught_up =
                            Some((stamp, LogPos::new(file, l.recs.len() as u64), from.clone()));
                    }
                }
            }
            Body::FetchRefuse {
                reason,
                from: at,
                gen,
            } => {
                r.fetch_until = 0;
                if gen == r.gen && reason.contains("different histories") {
                    if r.forked.is_none() {
                        cx.note(format!("{me}: fetch refused by {from}: {reason}"));
                    }
                    r.forked = Some(at);
                }
            }
            Body::FetchGone { file, gen } if gen == r.gen => {
                r.needs_sync = true;
                cx.note(format!(
                    "{me}: log {file} is gone on {from}: needs a full sync"
                ));
            }
            Body::SyncInfo {
                start,
                prev_link,
                gen,
            } => {
                r.sync_until = 0;
                if gen != r.gen {
                    return;
                }
                let mut adopt = None;
                if let Some(s) = &mut r.sync {
                    if s.start.is_none() {
                        s.start = Some(start);
                        s.from = Some(from.clone());
                        r.applied = start;
                        cx.note(format!("{me}: full sync from {from} starts at {start}"));
                        adopt = prev_link.filter(|_| !cx.cfg.sync_adopts_primary_link_later);
                    }
                }
                // The copy continues the source's history after logfile start-1: that link is
                // ours from now on, so the chain checks compare against the right history.
                if let Some(link) = adopt {
                    self.set(&keys::version(&res(), start.file - 1, &me), &link);
                }
            }
            Body::SyncCopy { disk, tl, end, gen } => {
                r.sync_until = 0;
                if gen != r.gen {
                    return;
                }
                if let Some(s) = &mut r.sync {
                    if s.start.is_some() && s.end.is_none() {
                        s.end = Some(end);
                        s.copy_tl = tl.clone();
                        self.disk = disk;
                        self.tl = tl;
                        cx.note(format!("{me}: sync copy from {from} done, end {end}"));
                    }
                }
            }
            _ => {}
        }
    }

    /// Replay as far as allowed this round (`replay_loop`).
    pub fn replay(&mut self, cx: &mut Ctx) {
        let meta = self.meta();
        let Some(todo) = meta.members.get(&self.name).map(|m| m.todo) else {
            return;
        };
        let me = self.name.clone();
        let mut budget = REPLAY_CHUNK;
        loop {
            let Local::Replica(r) = &mut self.local else {
                return;
            };
            let copying = r.sync.as_ref().is_some_and(|s| s.end.is_none());
            if !todo.replay || !todo.attach || r.needs_sync || r.stuck.is_some() || copying {
                return;
            }
            let Some(f) = self.logs.get(&r.applied.file) else {
                return;
            };
            // Entering a logfile of another origin: its predecessor must be ours too.
            if r.applied.offset == 0 && !cx.cfg.skip_chain_check {
                match plan::entry_check(&meta, &me, r.applied.file, &f.origin) {
                    ChainCheck::Ok(_) => {}
                    ChainCheck::Wait(why) => {
                        r.waiting = Some(why);
                        return;
                    }
                    ChainCheck::Mismatch(why) => {
                        cx.note(format!("{me}: replay stopped: {why}"));
                        r.stuck = Some(format!("replay stopped: {why}"));
                        r.forked = Some(r.applied.file);
                        return;
                    }
                }
            }
            if (r.applied.offset as usize) < f.recs.len() {
                if budget == 0 {
                    return;
                }
                let id = f.recs[r.applied.offset as usize];
                self.disk.insert(cx.ghost.info(id).block, id);
                match &mut self.tl {
                    Some(tl) => cx.ghost.applied(&me, tl, id),
                    None => cx
                        .ghost
                        .violations
                        .push(format!("{me} replays without a known timeline")),
                }
                r.applied.offset += 1;
                budget -= 1;
                check_consistent(r, cx, &me);
            } else if f.complete {
                let (no, origin, len) = (r.applied.file, f.origin.clone(), f.recs.len() as u64);
                let mut check = plan::next_file_check(&meta, &me, no, &origin, len);
                if cx.cfg.skip_chain_check {
                    if let ChainCheck::Mismatch(_) = check {
                        check = ChainCheck::Ok(
                            plan::my_link(&meta, &me, no, &origin, len).expect("computed"),
                        );
                    }
                }
                match check {
                    ChainCheck::Ok(link) => {
                        r.applied = LogPos::new(no + 1, 0);
                        r.waiting = None;
                        check_consistent(r, cx, &me);
                        self.set(&keys::version(&res(), no, &me), &link);
                        // The link changes what the next check sees.
                        return;
                    }
                    ChainCheck::Wait(why) => {
                        r.waiting = Some(why);
                        return;
                    }
                    ChainCheck::Mismatch(why) => {
                        cx.note(format!("{me}: replay stopped: {why}"));
                        r.stuck = Some(format!("replay stopped: {why}"));
                        r.forked = Some(no);
                        return;
                    }
                }
            } else {
                return;
            }
        }
    }
}

/// After a sync copy, the replica is consistent once replay passed the copy's end.
fn check_consistent(r: &mut Rep, cx: &mut Ctx, me: &HostName) {
    if let Some(SyncState { end: Some(end), .. }) = &r.sync {
        if r.applied >= *end {
            r.sync = None;
            cx.note(format!("{me}: full sync complete at {}", r.applied));
        }
    }
}
