//! `--dry-run`: an operator command is checked by the very code that runs it for real, and
//! nothing happens.
//!
//! The engine runs the command on its state as usual ([`ResourceEngine::run_op`]: the same
//! guards, the same refusals), keeps what the command emitted, and then puts its whole state
//! back as it was before. Out of the engine comes only the [`Command::Reply`]: the refusal the
//! real command gets, or "would …" with the commands it would have emitted, in words. No key
//! is published, no control file written, no session started or stopped, no saga runs.

use mars_config::format_size;

use super::command::{Control, Marker};
use super::event::{Op, OpId};
use super::{Command, ResourceEngine};

impl ResourceEngine {
    /// Runs `op` as a dry run: see the module.
    pub(super) fn run_dry(&mut self, id: OpId, op: Op) {
        let before = self.clone();
        let mark = self.out.len();
        let had_saga = self.saga.is_some();
        self.run_op(id, op.clone());
        let emitted = self.out.split_off(mark);
        // A saga this command started: its first phase says what it would do.
        let saga = if had_saga { None } else { self.describe_saga() };
        *self = before;
        let replied = emitted.iter().find_map(|c| match c {
            Command::Reply { id: r, result } if *r == id => Some(result.clone()),
            _ => None,
        });
        let result = match replied {
            Some(Err(e)) => Err(e),
            Some(Ok(msg)) => Ok(self.would(&op, &emitted, saga, Some(msg))),
            None => Ok(self.would(&op, &emitted, saga, None)),
        };
        self.reply(id, result);
    }

    /// The dry run's answer: what the command would do, from what it emitted.
    fn would(
        &self,
        op: &Op,
        emitted: &[Command],
        saga: Option<String>,
        real_reply: Option<String>,
    ) -> String {
        let res = &self.res;
        if let Some(s) = saga {
            return format!("{res}: {s}");
        }
        let effects: Vec<String> = emitted.iter().filter_map(|c| self.describe(c)).collect();
        let what = op_name(op);
        if effects.is_empty() {
            // Nothing would change; the real command's answer says why (e.g. "already …").
            let why = real_reply.filter(|m| !m.is_empty());
            return match why {
                Some(m) => format!("{res}: {what} would change nothing here ({m})"),
                None => format!("{res}: {what} would change nothing here"),
            };
        }
        format!("{res}: {what} would {}", effects.join("; "))
    }

    /// One emitted command in words (`None`: nothing an operator needs to read).
    fn describe(&self, c: &Command) -> Option<String> {
        let res = &self.res;
        Some(match c {
            Command::Publish { set, delete, .. } => {
                let mut parts: Vec<String> =
                    set.iter().map(|(k, v)| format!("set {k} = {v}")).collect();
                let versions = delete.iter().filter(|k| k.contains("/version-")).count();
                parts.extend(
                    delete
                        .iter()
                        .filter(|k| !k.contains("/version-"))
                        .map(|k| format!("delete {k}")),
                );
                if versions > 0 {
                    parts.push(format!("delete {versions} version link(s) of this host"));
                }
                if parts.is_empty() {
                    return None;
                }
                parts.join(", ")
            }
            Command::Persist(ctl) => match ctl {
                Control::Position(p) => format!("persist the replay position {p}"),
                Control::Sync(Some(s)) if s.done >= s.size => {
                    "record the replica as consistent (sync.toml: copy done)".to_string()
                }
                Control::Sync(Some(s)) => format!(
                    "record a full sync of {} (sync.toml)",
                    format_size(s.size.saturating_sub(s.done))
                ),
                Control::Sync(None) => "remove sync.toml".to_string(),
                Control::NeedsSync(Some(w)) => format!("record that only a full sync helps ({w})"),
                Control::NeedsSync(None) => "remove needs-sync".to_string(),
                Control::Marker(m, on) => format!(
                    "{} the {} marker",
                    if *on { "set" } else { "remove" },
                    match m {
                        Marker::Replica => "replica",
                        Marker::Force => "force-primary",
                        Marker::Emergency => "emergency",
                    }
                ),
                Control::ChainStart(n) => format!("record the chain start at logfile {n}"),
            },
            Command::ResetCopies => "delete every local log copy".to_string(),
            Command::StopFetch { .. } => "stop fetching".to_string(),
            Command::StopReplay { .. } => "stop replaying".to_string(),
            Command::StopSync { .. } => "stop the full sync".to_string(),
            Command::Rotate { only_if_used, .. } => if *only_if_used {
                "start a new logfile if the current one has data"
            } else {
                "close the current logfile and start a new one"
            }
            .to_string(),
            Command::Grow { size, .. } => format!(
                "grow the volume and device of {res} to {} ({size} bytes); secondaries sync the \
                 new region",
                format_size(*size)
            ),
            Command::Teardown { .. } => {
                format!("close {res} here and delete its directory, logfiles and this host's keys")
            }
            Command::AttachDevice => "set up the block device again".to_string(),
            Command::Reply { .. } | Command::Log { .. } => return None,
            other => format!("{other:?}"),
        })
    }
}

/// The command as the operator typed it.
fn op_name(op: &Op) -> String {
    match op {
        Op::Primary { force: true, .. } => "primary --force".into(),
        Op::Primary { .. } => "primary".into(),
        Op::Secondary => "secondary".into(),
        Op::Invalidate => "invalidate".into(),
        Op::LogPurgeAll => "log-purge-all".into(),
        Op::FakeSync => "fake-sync".into(),
        Op::Switch { switches, on } => {
            format!("{} {}", switches.join("+"), if *on { "on" } else { "off" })
        }
        Op::Resize { .. } => "resize".into(),
        Op::LeaveResource { .. } => "leave-resource".into(),
        Op::DeleteResource { .. } => "delete-resource".into(),
        Op::Cron => "cron".into(),
        Op::LogRotate => "log-rotate".into(),
        Op::SetEmergencyLimit { .. } => "set-emergency-limit".into(),
        Op::SystemdTrigger => "systemd-trigger".into(),
    }
}
