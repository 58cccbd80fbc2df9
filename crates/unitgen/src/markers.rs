//! Markers: comment lines that tell the generator and the trigger logic what to do with a unit
//! (MARS `_check_unit_marker`, `__systemd_commit`, `_get_default_unit`).
//!
//! # Grammar (per line)
//!
//! `#` at the very start of the line, **not** followed by a second `#` (`## KEEP_RUNNING`
//! disables a marker, which is how the MARS examples comment them out), optional spaces/tabs,
//! then an upper-case word `[A-Z][A-Z0-9_]*` that ends at the end of the line or at whitespace:
//!
//! | word | meaning |
//! |---|---|
//! | `ALWAYS_START` | enable and start whenever generated |
//! | `KEEP_RUNNING` | when no longer generated, only disable, never stop |
//! | `ALWAYS_DISABLED` | generate, never enable or start |
//! | `<NAME>_START` / `<NAME>_STOP` | `set-systemd-unit RES NAME` picks this template as start/stop unit |
//! | `ALSO=<unit> …` | extra units to generate (whitespace-separated; `=` may be surrounded by blanks) |
//!
//! Other upper-case words (`# TST Nov 2020`) are not markers. MARS tests markers with an
//! unanchored regex (`^#\s*ALWAYS_START` also accepts `# ALWAYS_STARTED`); here a marker is a
//! whole word, and `ALWAYS_START` is not additionally a start marker named `ALWAYS`.

use std::collections::BTreeSet;

/// The markers of one template or generated unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Markers {
    /// `# ALWAYS_START`.
    pub always_start: bool,
    /// `# KEEP_RUNNING`.
    pub keep_running: bool,
    /// `# ALWAYS_DISABLED`.
    pub always_disabled: bool,
    /// `NAME` of every `# NAME_START`.
    pub start: BTreeSet<String>,
    /// `NAME` of every `# NAME_STOP`.
    pub stop: BTreeSet<String>,
    /// Units named by `# ALSO=…`, in order of appearance.
    pub also: Vec<String>,
}

/// If `line` is a marker line, its marker word and the rest of the line after the word.
fn marker_word(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('#')?;
    if rest.starts_with('#') {
        return None;
    }
    let rest = rest.trim_start_matches([' ', '\t']);
    let b = rest.as_bytes();
    if b.is_empty() || !b[0].is_ascii_uppercase() {
        return None;
    }
    let end = b
        .iter()
        .position(|c| !(c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_'))
        .unwrap_or(b.len());
    Some((&rest[..end], &rest[end..]))
}

/// The unit names of an `ALSO=` line (`None` if `line` is not one).
pub(crate) fn also_line(line: &str) -> Option<Vec<String>> {
    let (word, after) = marker_word(line)?;
    let value = after.trim_start_matches([' ', '\t']).strip_prefix('=')?;
    (word == "ALSO").then(|| value.split_ascii_whitespace().map(str::to_string).collect())
}

impl Markers {
    /// Parses all markers of `text`.
    pub fn parse(text: &str) -> Markers {
        let mut m = Markers::default();
        for line in text.lines() {
            if let Some(also) = also_line(line) {
                m.also.extend(also);
                continue;
            }
            let Some((word, after)) = marker_word(line) else {
                continue;
            };
            if !(after.is_empty() || after.starts_with(|c: char| c.is_ascii_whitespace())) {
                continue;
            }
            match word {
                "ALWAYS_START" => m.always_start = true,
                "KEEP_RUNNING" => m.keep_running = true,
                "ALWAYS_DISABLED" => m.always_disabled = true,
                _ => {
                    if let Some(name) = word.strip_suffix("_START").filter(|n| !n.is_empty()) {
                        m.start.insert(name.to_string());
                    } else if let Some(name) = word.strip_suffix("_STOP").filter(|n| !n.is_empty())
                    {
                        m.stop.insert(name.to_string());
                    }
                }
            }
        }
        m
    }

    /// Whether the marker word `marker` (`ALWAYS_START`, `DEFAULT_STOP`, …) is present.
    pub fn has(&self, marker: &str) -> bool {
        match marker {
            "ALWAYS_START" => self.always_start,
            "KEEP_RUNNING" => self.keep_running,
            "ALWAYS_DISABLED" => self.always_disabled,
            _ => {
                if let Some(name) = marker.strip_suffix("_START") {
                    self.start.contains(name)
                } else if let Some(name) = marker.strip_suffix("_STOP") {
                    self.stop.contains(name)
                } else {
                    false
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers() {
        let text = "#!/bin/bash\n# TST Nov 2020\n# Markers for the template processor\n\
                    # DEFAULT_START\n#\tDEFAULT_STOP\n#KEEP_RUNNING\n## ALWAYS_START\n \
                    # ALWAYS_DISABLED\n# ALSO=a.path b.service\n#  ALSO = c.service\n\
                    ## ALSO=d.service\n# MOUNTED_STOPPED\n# X_START-ish\n# _START\n";
        let m = Markers::parse(text);
        assert!(m.keep_running && !m.always_start && !m.always_disabled);
        assert_eq!(m.start, BTreeSet::from(["DEFAULT".to_string()]));
        assert_eq!(m.stop, BTreeSet::from(["DEFAULT".to_string()]));
        assert_eq!(m.also, ["a.path", "b.service", "c.service"]);
        assert!(m.has("DEFAULT_START") && m.has("DEFAULT_STOP") && m.has("KEEP_RUNNING"));
        assert!(!m.has("MOUNTED_STOP") && !m.has("ALWAYS_START") && !m.has("X_START"));
    }

    #[test]
    fn always_start() {
        let m = Markers::parse("[Unit]\n## Markers\n# ALWAYS_START\n");
        assert!(m.always_start && m.has("ALWAYS_START"));
        assert!(m.start.is_empty());
    }
}
