//! The `*-global` commands' switch requests (`crate::request`): this member applies a
//! request newer than the one it applied last to its own switch, once.

use super::{Level, ResourceEngine};
use crate::keys;

impl ResourceEngine {
    /// Applies every request newer than this member's record of the last one it applied (and
    /// made after it became a member), writing the switch and the record in one publish.
    pub(super) fn apply_switch_requests(&mut self) {
        let Some(m) = self.meta.members.get(&self.me) else {
            return;
        };
        let mut set = Vec::new();
        let mut done = Vec::new();
        for (sw, req) in &self.meta.requests {
            // Stamp 0: the store's order is unknown. Older than the membership: not meant for
            // this member (it joined later, or joined again).
            if req.id.stamp == 0 || req.id.stamp <= m.since {
                continue;
            }
            if m.applied.get(sw).is_some_and(|a| *a >= req.id) {
                continue;
            }
            let on = if req.on { "1" } else { "0" };
            set.push((keys::todo(&self.res, &self.me, sw), on.to_string()));
            set.push((keys::applied(&self.res, &self.me, sw), req.id.to_json()));
            done.push(format!(
                "{sw} {} (requested by {})",
                if req.on { "on" } else { "off" },
                req.id.by
            ));
        }
        if set.is_empty() {
            return;
        }
        self.log(Level::Info, done.join(", "));
        self.publish(set, Vec::new());
    }
}
