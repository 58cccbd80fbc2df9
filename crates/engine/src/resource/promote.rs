//! Taking over: the designated primary holds a replica and opens its volume once the rules of
//! [`crate::roles::promotion`] allow it.
//!
//! A planned promotion waits (after a start, first until every member answered, at most
//! `Timing::stale_primary_wait`) until no other member acts as primary, every reachable member
//! has reported under this designation (none under a newer one), this replica has applied the
//! newest log end any member reports, and every such end lies in our history. A forced one
//! (`primary --force`, the force marker) first replays what was fetched (unless replay waits
//! for a version link that may never come) and then goes after a short settle time, taking
//! what was replayed; everything fetched beyond is cut.

use super::{Busy, Command, Level, Local, ResourceEngine};
use crate::reason::RoleWait;
use crate::roles::{promotion_from, Promotion};

impl ResourceEngine {
    /// Returns whether the promotion started.
    pub(super) fn try_promote(&mut self) -> bool {
        let now = self.now.ms;
        let since = *self.designated_since.get_or_insert(now);
        let todo = self.todo();
        let forced = self.facts.force_marker;
        let settle = self.cfg.timing.promote_settle;
        let ignore = self.cfg.bugs.planned_promotion_ignores_others();
        let meta = self.meta.clone();
        let me = self.me.clone();
        let live = self.live.clone();
        let alive = |h: &mars_config::HostName| *h == me || live.reachable.contains(h);
        // A planned promotion decides on every member's last report: after a start, those are
        // the reports from before it, and a member may have been primary since (found by
        // mars-sim, seed 3164: a host designated before its crash promoted at once when it
        // started again, nobody being reachable yet, and lost the writes of a forced primary
        // period since). As a primary role found on disk (`reconcile_idle`), it waits for every
        // member's answer since the start, at most `stale_primary_wait`.
        let stale_until = self.started_ms + self.cfg.timing.stale_primary_wait;
        let stale = !forced && !live.fresh && now < stale_until;
        if stale {
            self.wake_at(stale_until);
        }
        let Local::Replica(r) = &mut self.local else {
            return false;
        };
        if !r.consistent() {
            let why = r
                .needs_sync
                .as_ref()
                .map_or("full sync not finished".to_string(), ToString::to_string);
            r.role_wait = Some(RoleWait::Inconsistent(why));
            return false;
        }
        if stale {
            r.role_wait = Some(RoleWait::StaleMetadata);
            return false;
        }
        if forced && r.replay_pending(todo, &me) {
            r.role_wait = Some(RoleWait::ReplayingFirst);
            return false;
        }
        let decision = if ignore && !forced {
            // Broken on purpose (simulation): no waiting for the old primary or its last byte.
            Promotion::Go
        } else {
            let current = r.copies.get(&r.applied.file).map(|c| &c.origin);
            promotion_from(&meta, &me, r.applied, current, forced, &alive)
        };
        match decision {
            Promotion::Wait(why) => {
                r.role_wait = Some(RoleWait::Promotion(why));
                false
            }
            // Concurrent forced commands for different hosts settle meanwhile (last writer
            // wins). A planned promotion needs no settle: it waits for every reachable
            // member's report under its designation instead.
            Promotion::Go if forced && now < since + settle => {
                self.wake_at(since + settle);
                false
            }
            Promotion::Go => {
                r.role_wait = None;
                let at = r.applied;
                let mut cmds = r.stop_all();
                let size = self.size;
                cmds.push(Command::Promote { cut_at: at, size });
                self.out.extend(cmds);
                self.local = Local::Busy(Busy::Promoting { forced });
                self.log(
                    Level::Info,
                    format!(
                        "taking over{}: continuing after {at}",
                        if forced { " (forced)" } else { "" }
                    ),
                );
                true
            }
        }
    }
}
