//! Ghost state: what the simulation knows and the hosts do not. Every record ever written is
//! entered here with the record it followed in its writer's history, so the histories of all
//! primaries form one tree; a host's *timeline* (the records its disk is built from, in order)
//! must always be a path from the root of that tree. The checks in `check.rs` compare hosts
//! against this bookkeeping; no host decision ever reads it.

use std::collections::{BTreeMap, BTreeSet};

use mars_config::HostName;
use mars_txlog::LogPos;

#[derive(Debug, Clone)]
pub struct RecInfo {
    /// The block the record writes (its data is the record id itself).
    pub block: u32,
    /// The record before it in its writer's history (`None`: the first record of all).
    pub parent: Option<u64>,
    /// Its index in every timeline that contains it.
    pub depth: usize,
    /// Where its writer appended it.
    pub pos: LogPos,
}

/// The last primary that left its role without losing anything (planned step-down), and the
/// end of its timeline then: a planned promotion must include all of it.
#[derive(Debug, Clone)]
pub struct StepDown {
    pub host: HostName,
    pub len: usize,
    pub last: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Ghost {
    recs: Vec<RecInfo>,
    pub last_step_down: Option<StepDown>,
    /// Hosts that acted as primary when another took over by force.
    pub forced_out: BTreeSet<HostName>,
    /// Completed promotions (coverage figures).
    pub planned_promotions: u64,
    pub forced_promotions: u64,
    /// Violations found while the step ran (replay past a fork …); checked after the step.
    pub violations: Vec<String>,
}

impl Ghost {
    /// Registers a record appended by a primary whose timeline is `tl`; returns its id.
    pub fn new_record(&mut self, block: u32, tl: &[u64], pos: LogPos) -> u64 {
        self.recs.push(RecInfo {
            block,
            parent: tl.last().copied(),
            depth: tl.len(),
            pos,
        });
        self.recs.len() as u64
    }

    pub fn info(&self, id: u64) -> &RecInfo {
        &self.recs[(id - 1) as usize]
    }

    /// The disk a timeline produces: block → id of the last record writing it.
    pub fn content(&self, tl: &[u64]) -> BTreeMap<u32, u64> {
        let mut disk = BTreeMap::new();
        for &id in tl {
            disk.insert(self.info(id).block, id);
        }
        disk
    }

    /// How many records of `tl` lie before log position `pos`. Positions only grow along a
    /// history (a new primary continues in a logfile numbered above all it has), so this is a
    /// binary search.
    pub fn count_before(&self, tl: &[u64], pos: LogPos) -> usize {
        tl.partition_point(|id| self.info(*id).pos < pos)
    }

    /// A replica applied record `id` on top of `tl`. Applying a record again (replay after a
    /// full sync starts before the copy's end) must find it at its place; a new record must
    /// follow the timeline's last one. Anything else is a record from another history.
    pub fn applied(&mut self, host: &HostName, tl: &mut Vec<u64>, id: u64) {
        let info = self.info(id);
        let (depth, parent) = (info.depth, info.parent);
        let ok = if depth < tl.len() {
            tl[depth] == id
        } else if depth == tl.len() {
            parent == tl.last().copied()
        } else {
            false
        };
        if ok {
            if depth == tl.len() {
                tl.push(id);
            }
        } else {
            self.violations.push(format!(
                "{host} applied record {id} (depth {depth}, after {parent:?}) to a timeline of \
                 {} records ending in {:?}: a record past a fork",
                tl.len(),
                tl.last()
            ));
        }
    }

    /// Whether `tl` holds exactly `len` records up to `last` as its prefix.
    pub fn extends(tl: &[u64], len: usize, last: Option<u64>) -> bool {
        tl.len() >= len && (len == 0 || Some(tl[len - 1]) == last)
    }
}
