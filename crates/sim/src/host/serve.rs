//! The serving side of the fetch and sync streams, as the daemon's server sessions: every
//! decision is a `mars_engine::serve` function's (`fetch_start`, `next_file`, `asker_ahead`,
//! `sync_start`, `own_link`), asked with this host's metadata and its own logfiles; what is
//! shipped comes from the simulated logfiles and disk.

use std::collections::BTreeMap;

use mars_config::HostName;
use mars_engine::resource::Event;
use mars_engine::serve::{self, Next, ServerRole};
use mars_txlog::{LogName, LogPos};
use mars_wire::RefuseKind;

use super::{Body, Ctx, Host, Msg, SIZE};

/// Records per fetch answer: small, so that catching up takes steps during which other things
/// happen.
const FETCH_CHUNK: u64 = 6;

/// A piece of logfile `file` from record `off` on (`LogFile` + `LogData` [+ `LogEnd`]).
#[derive(Debug, Clone)]
pub struct Seg {
    pub file: u64,
    pub origin: HostName,
    pub off: u64,
    pub recs: Vec<u64>,
    /// The logfile is complete here and this piece reaches its end.
    pub end: bool,
}

#[derive(Debug, Clone)]
pub enum FetchAnswer {
    /// Logfile pieces in order: the asked-for one and, once it is complete, the next ones.
    Data {
        segs: Vec<Seg>,
        /// "You have everything durable here" (`LogCaughtUp`), with the server's wall clock.
        caught_up: bool,
        stamp: u64,
    },
    /// Nothing to send yet (the session stays open).
    Idle,
    Gone {
        file: u64,
        oldest: u64,
    },
    Refused {
        kind: RefuseKind,
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub enum SyncAnswer {
    /// The start: the device size, the log position the copy starts at, the link of the
    /// logfile before it.
    Info {
        size: u64,
        start: LogPos,
        prev_link: String,
    },
    /// The copy of the device (block → record id) from the requested offset on, the log
    /// position it is consistent with once replayed to, and (ghost) the timeline it carries.
    Copy {
        disk: BTreeMap<u32, u64>,
        tl: Option<Vec<u64>>,
        end: LogPos,
    },
    Refused {
        reason: String,
    },
}

impl Host {
    /// What this host is for the resource, as its server sees it.
    fn server_role(&self) -> ServerRole {
        if self.vol.is_some() {
            ServerRole::Primary { passthrough: false }
        } else if self.engine.as_ref().is_some_and(|e| e.replica().is_some()) {
            ServerRole::Replica
        } else {
            ServerRole::None
        }
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
                sid,
                file,
                off,
                prev_link,
                tail,
            } => {
                let ans = self.serve_fetch(from, file, off, prev_link.as_deref(), tail, cx);
                self.answer(
                    from,
                    cx,
                    Body::FetchAns {
                        sid,
                        boot: self.boot(),
                        ans,
                    },
                );
            }
            Body::SyncReq { sid, copy } => {
                let ans = self.serve_sync(from, copy, cx);
                self.answer(
                    from,
                    cx,
                    Body::SyncAns {
                        sid,
                        boot: self.boot(),
                        ans,
                    },
                );
            }
            Body::FetchAns { sid, boot, ans } => self.on_fetch_answer(from, sid, boot, ans, cx),
            Body::SyncAns { sid, boot, ans } => self.on_sync_answer(from, sid, boot, ans, cx),
            Body::StopApp => {
                if let Some(v) = &mut self.vol {
                    if v.app_open {
                        v.app_open = false;
                        cx.note(format!("{}: application stopped for a handover", self.name));
                    }
                }
            }
        }
    }

    fn answer(&self, to: &HostName, cx: &mut Ctx, body: Body) {
        cx.out.push(Msg {
            from: self.name.clone(),
            to: to.clone(),
            body,
        });
    }

    /// This server's incarnation (a restart resets its connections).
    fn boot(&self) -> u64 {
        self.incarnation
    }

    /// The fetch server: the asker wants logfile `file` from record `off` on.
    fn serve_fetch(
        &mut self,
        peer: &HostName,
        file: u64,
        off: u64,
        prev_link: Option<&str>,
        tail: Option<u64>,
        cx: &mut Ctx,
    ) -> FetchAnswer {
        let asked = (file, off);
        let role = self.server_role();
        let meta = self.meta();
        let me = self.name.clone();
        // The old rule serves any host of the cluster: ask as if the asker were this member.
        let asker = if cx.cfg.serve_non_members { &me } else { peer };
        if let Err((kind, reason)) =
            serve::fetch_start(role, &meta, &me, asker, file, prev_link.unwrap_or(""))
        {
            return FetchAnswer::Refused { kind, reason };
        }
        let names: Vec<LogName> = self
            .logs
            .iter()
            .map(|(n, f)| LogName::new(*n, f.origin.clone()))
            .collect();
        let newest = self.logs.keys().next_back().copied().unwrap_or(0);
        let durable = self.durable_pos();
        let primary = matches!(role, ServerRole::Primary { .. });
        let lengths_only = cx.cfg.complete_by_link_lengths_only;
        let (mut file, mut off) = (file, off);
        let mut segs = Vec::new();
        let mut budget = FETCH_CHUNK;
        let mut caught_up = false;
        loop {
            match serve::next_file(&names, file, off, role, &meta, &me, lengths_only) {
                Next::Serve(name) => {
                    let f = &self.logs[&name.no];
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
                    if let Some(why) = serve::asker_ahead(&name, off, limit, complete) {
                        if segs.is_empty() {
                            return FetchAnswer::Refused {
                                kind: RefuseKind::History,
                                reason: why,
                            };
                        }
                        break;
                    }
                    if off > limit {
                        // Ahead in a logfile with nothing durable yet: wait.
                        break;
                    }
                    // The asker's copy before its position must be ours (every request is
                    // checked: each stands for a whole daemon session here).
                    if (file, off) == asked && !cx.cfg.fetch_without_tail {
                        let ours = off.checked_sub(1).map(|i| f.recs[i as usize]);
                        if tail.is_some() && tail != ours {
                            let (kind, reason) = serve::tail_differs(&name, off);
                            return FetchAnswer::Refused { kind, reason };
                        }
                    }
                    let to = limit.min(off + budget);
                    budget -= to - off;
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
                    if budget == 0 {
                        break;
                    }
                    file += 1;
                    off = 0;
                }
                Next::Skip { to } => {
                    file = to;
                    off = 0;
                }
                Next::Wait => break,
                Next::Gone { oldest } => {
                    if segs.is_empty() {
                        return FetchAnswer::Gone { file, oldest };
                    }
                    break;
                }
                Next::Refuse((kind, reason)) => {
                    if segs.is_empty() {
                        return FetchAnswer::Refused { kind, reason };
                    }
                    break;
                }
            }
        }
        if segs.is_empty() {
            return FetchAnswer::Idle;
        }
        FetchAnswer::Data {
            segs,
            caught_up,
            stamp: self.now(cx).wall_ns,
        }
    }

    /// The sync server: only an acting primary serves. The start rotates the log (the copy
    /// starts at a logfile boundary) and pins that logfile for the replica; the copy is read
    /// through the volume.
    fn serve_sync(
        &mut self,
        peer: &HostName,
        copy: Option<(u64, u64)>,
        cx: &mut Ctx,
    ) -> SyncAnswer {
        let role = self.server_role();
        let asker = if cx.cfg.serve_non_members {
            &self.name
        } else {
            peer
        };
        if let Err((_, reason)) = serve::sync_start(role, &self.meta(), &self.name, asker) {
            return SyncAnswer::Refused { reason };
        }
        let Some((done, _size)) = copy else {
            let start = match self.rotate(true) {
                Some(no) => LogPos::new(no, 0),
                None => LogPos::new(self.current(), 0),
            };
            self.feed(
                Event::ServingSync {
                    peer: peer.clone(),
                    start_file: start.file,
                },
                cx,
            );
            let prev = start.file - 1;
            let prev_link = if prev == 0 {
                String::new()
            } else {
                let local = self
                    .logs
                    .get(&prev)
                    .map(|f| (f.origin.clone(), f.recs.len() as u64));
                serve::own_link(
                    &self.meta(),
                    &self.name,
                    prev,
                    local.as_ref().map(|(o, l)| (o, *l)),
                )
                .unwrap_or_default()
            };
            return SyncAnswer::Info {
                size: SIZE,
                start,
                prev_link,
            };
        };
        // The device as the volume shows it: the disk plus the log not yet written back.
        // Fixed: only durable records, and the copy ends at the durable position. The old
        // daemon (executor switch `sync_serves_unsynced_data`, what it must NOT do): every
        // appended record, and the end at the appended position.
        let unsynced = cx.cfg.sync_serves_unsynced_data;
        let wb = self.position();
        let mut disk = self.disk.clone();
        for (no, f) in self.logs.range(wb.file..) {
            let skip = if *no == wb.file {
                wb.offset as usize
            } else {
                0
            };
            let upto = if unsynced { f.recs.len() } else { f.durable };
            for id in f.recs.iter().take(upto).skip(skip) {
                disk.insert(cx.ghost.info(*id).block, *id);
            }
        }
        disk.retain(|b, _| u64::from(*b) >= done);
        let (end, tl) = if unsynced {
            (self.appended_pos(), self.tl.clone())
        } else {
            let end = self.durable_pos();
            let tl = self.tl.as_ref().map(|tl| {
                let n = cx.ghost.count_before(tl, end);
                tl[..n].to_vec()
            });
            (end, tl)
        };
        SyncAnswer::Copy { disk, tl, end }
    }
}
