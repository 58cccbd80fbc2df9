//! Operator commands on one host: `invalidate`, `leave-resource`, `join-resource`, and the
//! waits of a role command in progress (`daemon/src/roles.rs`).

use mars_engine::keys;
use mars_engine::model::Role as ReportRole;

use super::*;

impl Host {
    // ------------------------------------------------------------ operator commands

    /// `invalidate` on a secondary: forget local state, full sync from the designated primary.
    pub fn invalidate(&mut self, cx: &mut Ctx) -> Result<(), String> {
        let meta = self.meta();
        if !matches!(self.local, Local::Replica(_)) || meta.primary.as_ref() == Some(&self.name) {
            return Err("invalidate runs on a secondary".into());
        }
        if let Some(p) = meta.primary.clone() {
            for (no, links) in &meta.versions {
                let Some(mine) = links.get(&self.name) else {
                    continue;
                };
                if links.get(&p) != Some(mine) {
                    self.store
                        .delete(&keys::version(&res(), *no, &self.name))
                        .expect("own key");
                }
            }
        }
        let gen = self.rep().map_or(0, |r| r.gen) + 1;
        // The operator discards this host's history: its writes need not survive elsewhere.
        if cx
            .ghost
            .last_step_down
            .as_ref()
            .is_some_and(|s| s.host == self.name)
        {
            cx.ghost.last_step_down = None;
        }
        self.start_as_new_replica();
        self.rep_mut().gen = gen;
        cx.note(format!("{}: invalidated, full sync follows", self.name));
        Ok(())
    }

    /// `leave-resource`: only a secondary that is not designated.
    pub fn leave(&mut self, cx: &mut Ctx) -> Result<(), String> {
        let meta = self.meta();
        if !matches!(self.local, Local::Replica(_)) || meta.primary.as_ref() == Some(&self.name) {
            return Err("only a secondary may leave".into());
        }
        let prefix = keys::prefix(&res());
        let own: Vec<String> = self
            .store
            .list_prefix(&prefix)
            .expect("in-memory store")
            .into_iter()
            .map(|e| e.key)
            .filter(|k| {
                let me = self.name.as_str();
                k.ends_with(&format!("-{me}")) || k.contains(&format!("/todo-{me}/"))
            })
            .collect();
        for k in own {
            self.store.delete(&k).expect("own key");
        }
        if cx
            .ghost
            .last_step_down
            .as_ref()
            .is_some_and(|s| s.host == self.name)
        {
            cx.ghost.last_step_down = None;
        }
        self.teardown();
        Ok(())
    }

    /// `join-resource`.
    pub fn join(&mut self) -> Result<(), String> {
        let meta = self.meta();
        if !meta.exists() || !matches!(self.local, Local::None) {
            return Err("cannot join".into());
        }
        self.set(&keys::data(&res(), &self.name), "/dev/sim");
        self.start_as_new_replica();
        Ok(())
    }

    /// Advances a role command in progress (`roles.rs`: the client's waits, with the daemon's
    /// timeouts and the compensation of phase 2).
    pub fn advance_command(&mut self, cx: &mut Ctx) {
        let Some(cmd) = self.cmd.clone() else {
            return;
        };
        let meta = self.meta();
        let me = self.name.clone();
        let report_of = |h: &HostName| meta.members.get(h).and_then(|m| m.report.clone());
        match cmd {
            Command::WaitClosed { old, deadline } => {
                if report_of(&old).is_none_or(|r| r.open_count == 0) {
                    self.set(&keys::primary(&res()), me.as_str());
                    cx.note(format!("{me}: handover from {old}: primary := {me}"));
                    self.cmd = Some(Command::WaitLeft {
                        old,
                        deadline: cx.now + crate::COMMAND_TIMEOUT,
                    });
                } else if cx.now >= deadline {
                    cx.note(format!("{me}: handover refused: {old}'s device stays open"));
                    self.cmd = None;
                }
            }
            Command::WaitLeft { old, deadline } => {
                let left = report_of(&old).is_none_or(|r| r.role != ReportRole::Primary);
                if meta.primary.as_ref() != Some(&me) {
                    cx.note(format!("{me}: handover: another primary command won"));
                    self.cmd = None;
                } else if left {
                    self.cmd = Some(Command::WaitPromoted {
                        forced: false,
                        deadline: cx.now + crate::COMMAND_TIMEOUT,
                    });
                } else if cx.now >= deadline {
                    self.set(&keys::primary(&res()), old.as_str());
                    cx.note(format!(
                        "{me}: handover failed: {old} did not leave in time; primary := {old}"
                    ));
                    self.cmd = None;
                }
            }
            Command::WaitPromoted { forced, deadline } => {
                if self.is_primary() {
                    if forced {
                        // Fetching resumes by itself, for when this host is a secondary again.
                        self.set(&keys::todo(&res(), &me, "fetch"), "1");
                    }
                    cx.note(format!("{me}: primary command done"));
                    self.cmd = None;
                } else if meta.primary.as_ref() != Some(&me) || cx.now >= deadline {
                    let why = self
                        .rep()
                        .and_then(|r| r.role_wait.clone().or_else(|| r.stuck.clone()))
                        .unwrap_or_else(|| "another host is designated".into());
                    cx.note(format!("{me}: primary command gave up waiting: {why}"));
                    self.cmd = None;
                }
            }
        }
    }
}
