//! Markers: comment lines that tell the generator and the trigger logic what to do with a unit
//! (MARS `_check_unit_marker`, `__systemd_commit`, `_get_default_unit`), and `# ALSO=` lines.
//!
//! # Grammar, as MARS matches it
//!
//! A marker `M` is present when the text matches Perl's `m/^[#]\s*M/m`: a `#` at the start of
//! a line, any whitespace (also line ends), then `M` as a *prefix* of what follows. So
//! `## KEEP_RUNNING` disables a marker (the second `#` is not whitespace; this is how the MARS
//! examples comment them out), `# ALWAYS_STARTED` counts as `ALWAYS_START`, and
//! `# ALWAYS_START` is also the start marker `ALWAYS_START` of `set-systemd-unit RES ALWAYS`.
//!
//! | marker | meaning |
//! |---|---|
//! | `ALWAYS_START` | enable and start whenever generated |
//! | `KEEP_RUNNING` | when no longer generated, only disable, never stop |
//! | `ALWAYS_DISABLED` | generate, never enable or start |
//! | `<NAME>_START` / `<NAME>_STOP` | `set-systemd-unit RES NAME` picks this template as start/stop unit |
//!
//! `# ALSO=<unit> …` names extra units to generate. It is one of MARS's dependency keys
//! (`$SYSTEMD_DEPENDENCIES`), matched like them ([`crate::generate::scan_refs`]): optional
//! whitespace at the start of the line, exactly `# ALSO` (one blank; `#ALSO=`, `#  ALSO=` and
//! `## ALSO=` are plain comments), optional whitespace, `=`, optional whitespace, then the
//! whitespace-separated names up to the end of the line.

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
    /// `NAME` of every `# NAME_START…` (every `_START` inside the leading word gives one).
    pub start: BTreeSet<String>,
    /// `NAME` of every `# NAME_STOP…`.
    pub stop: BTreeSet<String>,
    /// Units named by `# ALSO=…`, in order of appearance.
    pub also: Vec<String>,
    /// What follows `^#\s*` at each place, up to the end of that line: what [`Markers::has`]
    /// matches against.
    heads: Vec<String>,
}

/// `\s` of Perl (ASCII).
pub(crate) fn is_perl_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn heads(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let at_line_start = i == 0 || b[i - 1] == b'\n';
        if at_line_start && b[i] == b'#' {
            let mut j = i + 1;
            while j < b.len() && is_perl_space(b[j]) {
                j += 1;
            }
            let end = text[j..].find('\n').map_or(b.len(), |e| j + e);
            out.push(text[j..end].to_string());
        }
        i += 1;
    }
    out
}

impl Markers {
    /// Parses all markers of `text`.
    pub fn parse(text: &str) -> Markers {
        let heads = heads(text);
        let mut m = Markers {
            also: crate::generate::also_refs(text),
            ..Markers::default()
        };
        for h in &heads {
            let word_len = h
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(h.len());
            let word = &h[..word_len];
            for (suffix, set) in [("_START", &mut m.start), ("_STOP", &mut m.stop)] {
                for (at, _) in word.match_indices(suffix) {
                    if at > 0 {
                        set.insert(word[..at].to_string());
                    }
                }
            }
        }
        m.heads = heads;
        m.always_start = m.has("ALWAYS_START");
        m.keep_running = m.has("KEEP_RUNNING");
        m.always_disabled = m.has("ALWAYS_DISABLED");
        m
    }

    /// Whether the marker `marker` (`ALWAYS_START`, `DEFAULT_STOP`, …) is present, as MARS's
    /// `m/^[#]\s*$marker/m` decides it.
    pub fn has(&self, marker: &str) -> bool {
        !marker.is_empty() && self.heads.iter().any(|h| h.starts_with(marker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers() {
        let text = "#!/bin/bash\n# TST Nov 2020\n# Markers for the template processor\n\
                    # DEFAULT_START\n#\tDEFAULT_STOP\n#KEEP_RUNNING\n## ALWAYS_START\n \
                    # ALWAYS_DISABLED\n# ALSO=a.path b.service\n# ALSO = c.service\n\
                    #  ALSO=no.service\n## ALSO=d.service\n# MOUNTED_STOPPED\n# X_START-ish\n\
                    # _START\n";
        let m = Markers::parse(text);
        assert!(m.keep_running && !m.always_start && !m.always_disabled);
        assert_eq!(
            m.start,
            BTreeSet::from(["DEFAULT".to_string(), "X".to_string()])
        );
        assert_eq!(
            m.stop,
            BTreeSet::from(["DEFAULT".to_string(), "MOUNTED".to_string()])
        );
        assert_eq!(m.also, ["a.path", "b.service", "c.service"]);
        assert!(m.has("DEFAULT_START") && m.has("DEFAULT_STOP") && m.has("KEEP_RUNNING"));
        // Prefixes count, as in MARS.
        assert!(m.has("MOUNTED_STOP") && m.has("X_START") && m.has("DEFAULT_ST"));
        assert!(!m.has("ALWAYS_START") && !m.has("") && !m.has("ALWAYS_DISABLED"));
    }

    #[test]
    fn always_start() {
        let m = Markers::parse("[Unit]\n## Markers\n# ALWAYS_START\n");
        assert!(m.always_start && m.has("ALWAYS_START"));
        // `set-systemd-unit RES ALWAYS` picks it in MARS.
        assert_eq!(m.start, BTreeSet::from(["ALWAYS".to_string()]));
        // `\s*` crosses line ends.
        let m = Markers::parse("#\n\nKEEP_RUNNING\n# ALWAYS_STARTED\n");
        assert!(m.keep_running && m.always_start);
    }
}
