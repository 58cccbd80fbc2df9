//! Feedback while `marsadm` waits (`wait-resource`, `wait-cluster`, `primary`, `invalidate`):
//! a spinner saying what it waits for, or a bar with the sync's percentage, drawn on stderr.
//!
//! Only for a person at a terminal: when stdout or stderr is not a terminal, or with `--json`,
//! nothing extra is printed, so that scripts and logs see exactly the command's output.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mars_api::{Progress, ResourceView};

/// Should feedback be shown: a terminal on both stdout and stderr, and no `--json`.
pub fn wanted(json: bool) -> bool {
    !json && std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// A spinner that turns into a bar while a percentage is known; hidden when not wanted.
pub struct Feedback {
    bar: ProgressBar,
    percent_shown: bool,
}

impl Feedback {
    pub fn new(wanted: bool, message: String) -> Feedback {
        let bar = if wanted {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(spinner_style());
        bar.set_message(message);
        if wanted {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        Feedback {
            bar,
            percent_shown: false,
        }
    }

    /// What is being waited for now.
    pub fn say(&self, message: String) {
        self.bar.set_message(message);
    }

    /// A known percentage (0..=100): show a bar; `None` goes back to the spinner.
    pub fn percent(&mut self, pct: Option<u64>) {
        match (pct, self.percent_shown) {
            (Some(p), _) => {
                if !self.percent_shown {
                    self.bar.set_length(100);
                    self.bar.set_style(bar_style());
                    self.percent_shown = true;
                }
                self.bar.set_position(p.min(100));
            }
            (None, true) => {
                self.bar.unset_length();
                self.bar.set_style(spinner_style());
                self.percent_shown = false;
            }
            (None, false) => {}
        }
    }

    /// Removes the feedback from the terminal (the command prints its result after).
    pub fn done(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Feedback {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template")
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("[{bar:30}] {pos:>3}% {msg} ({elapsed})")
        .expect("valid template")
        .progress_chars("=> ")
}

/// Percentage done of a job (an empty one is complete).
pub fn percent_of(p: &Progress) -> u64 {
    if p.total == 0 {
        100
    } else {
        (u128::from(p.done.min(p.total)) * 100 / u128::from(p.total)) as u64
    }
}

/// What a resource is busy with, for the message: the sync's percentage if one runs, else
/// what fetch and replay still have to do.
pub fn activity(r: &ResourceView) -> (String, Option<u64>) {
    if let Some(s) = &r.sync {
        return (
            format!("syncing {} from {}", r.name, crate::view::primary_text(r)),
            Some(percent_of(s)),
        );
    }
    let mut parts = Vec::new();
    for (what, p) in [("fetch", &r.fetch), ("replay", &r.replay)] {
        if let Some(p) = p.as_ref().filter(|p| p.rest() > 0) {
            parts.push(format!(
                "{what} {} left",
                mars_config::format_size(p.rest())
            ));
        }
    }
    (parts.join(", "), None)
}

/// Who `primary` waits for during a handover: the member that still acts as primary.
pub fn handover_message(r: &ResourceView, me: &str) -> String {
    let old = r
        .members
        .iter()
        .find(|m| m.host != me && m.role == Some(mars_api::Role::Primary));
    match old {
        Some(m) => format!(
            "waiting for {} to close /dev/mars/{} and leave the primary role",
            m.host, r.name
        ),
        None if r.role == mars_api::Role::Primary => {
            format!("{} is primary here; finishing", r.name)
        }
        None => format!("taking over {}: catching up", r.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::fixtures::*;

    #[test]
    fn messages_say_what_is_waited_for() {
        let mut r = secondary();
        assert_eq!(activity(&r), (String::new(), None));
        r.sync = Some(progress(MIB, 4 * MIB, 0));
        assert_eq!(activity(&r), ("syncing vm1 from alpha".into(), Some(25)));
        r.sync = None;
        r.fetch = Some(progress(0, 2 * MIB, 0));
        assert_eq!(activity(&r).0, "fetch 2.00 MiB left");
        let mut a = member("alpha", true);
        a.role = Some(mars_api::Role::Primary);
        r.members = vec![a, member("beta", true)];
        assert_eq!(
            handover_message(&r, "beta"),
            "waiting for alpha to close /dev/mars/vm1 and leave the primary role"
        );
        r.members[0].role = None;
        assert_eq!(handover_message(&r, "beta"), "taking over vm1: catching up");
        // Piped (as under `cargo test`): no feedback at all.
        assert!(!wanted(true));
        let f = Feedback::new(false, "x".into());
        assert!(f.bar.is_hidden());
    }
}
