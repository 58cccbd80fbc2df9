//! Which unit names `marsd` writes a file for or hands to `systemctl`.
//!
//! Unit names come from replicated metadata (`systemd-start-unit`, `systemd-stop-unit`) and
//! from what templates reference, so another host can choose them: a name is a file name in
//! the unit or scripts directory, an argument of `systemctl`, and for `.script` a program run
//! as root. Only systemd's own unit name syntax passes (`[A-Za-z0-9:_.\@-]`, at most 255
//! bytes, a suffix of the generator's [`SUFFIXES`]: systemd's unit types, see systemd.unit(5),
//! and `script`); besides, no name may start with `.` (hidden files, `..`) or `-`
//! (`systemctl` would read an option).
//! Without a `/` a name cannot leave its directory, so a generated file stays in the unit or
//! scripts directory and a `.script` is always one from the scripts directory.

use thiserror::Error;

use crate::generate::SUFFIXES;

/// systemd's limit on a unit name (`UNIT_NAME_MAX`).
pub const UNIT_NAME_MAX: usize = 255;

/// Why a name is not a unit name `marsd` uses.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BadUnitName {
    #[error("an empty unit name")]
    Empty,
    #[error("unit name {name:?} is longer than {UNIT_NAME_MAX} bytes")]
    TooLong { name: String },
    #[error("unit name {name:?} contains {c:?} (allowed: letters, digits and : _ . \\ @ -)")]
    Char { name: String, c: char },
    #[error("unit name {name:?} starts with {c:?}")]
    Leading { name: String, c: char },
    #[error(
        "unit name {name:?} has no unit type suffix (.service, .mount, .target, …, or .script)"
    )]
    Suffix { name: String },
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '\\' | '@' | '-')
}

/// Checks that `name` is a plain file name, as the generator wants of what it writes: no `/`,
/// no control character, not starting with `.`, at most [`UNIT_NAME_MAX`] bytes. Looser than
/// [`check_unit_name`] on purpose: MARS writes what its templates name (e.g. `^{x}-leaf.service`
/// from an unexpanded pattern), and so does this generator, but only inside its directory.
pub fn check_file_name(name: &str) -> Result<(), BadUnitName> {
    let Some(first) = name.chars().next() else {
        return Err(BadUnitName::Empty);
    };
    if name.len() > UNIT_NAME_MAX {
        return Err(BadUnitName::TooLong {
            name: name.to_string(),
        });
    }
    if let Some(c) = name.chars().find(|c| *c == '/' || c.is_control()) {
        return Err(BadUnitName::Char {
            name: name.to_string(),
            c,
        });
    }
    if first == '.' {
        return Err(BadUnitName::Leading {
            name: name.to_string(),
            c: first,
        });
    }
    Ok(())
}

/// Checks `name` (see the module docs).
pub fn check_unit_name(name: &str) -> Result<(), BadUnitName> {
    let bad = |f: fn(String) -> BadUnitName| Err(f(name.to_string()));
    let Some(first) = name.chars().next() else {
        return Err(BadUnitName::Empty);
    };
    if name.len() > UNIT_NAME_MAX {
        return bad(|name| BadUnitName::TooLong { name });
    }
    if let Some(c) = name.chars().find(|c| !allowed(*c)) {
        return Err(BadUnitName::Char {
            name: name.to_string(),
            c,
        });
    }
    if first == '.' || first == '-' {
        return Err(BadUnitName::Leading {
            name: name.to_string(),
            c: first,
        });
    }
    match name.rsplit_once('.') {
        Some((stem, ty)) if !stem.is_empty() && SUFFIXES.contains(&ty) => Ok(()),
        _ => bad(|name| BadUnitName::Suffix { name }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_names_pass() {
        for n in [
            "app.service",
            "mars-vm1-start.service",
            "mars@vm1.service",
            "mnt-mars-vm\\x2d1.mount",
            "vm1-start.script",
            "machines.target",
            "a:b_c.timer",
        ] {
            assert_eq!(check_unit_name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn names_that_leave_a_directory_or_read_as_options_fail() {
        type Want = fn(&BadUnitName) -> bool;
        let cases: &[(&str, Want)] = &[
            ("", |e| matches!(e, BadUnitName::Empty)),
            ("/bin/evil.script", |e| {
                matches!(e, BadUnitName::Char { c: '/', .. })
            }),
            ("../../etc/x.service", |e| {
                matches!(e, BadUnitName::Char { c: '/', .. })
            }),
            ("..script", |e| matches!(e, BadUnitName::Leading { .. })),
            (".hidden.service", |e| {
                matches!(e, BadUnitName::Leading { c: '.', .. })
            }),
            ("--now.service", |e| {
                matches!(e, BadUnitName::Leading { c: '-', .. })
            }),
            ("a b.service", |e| {
                matches!(e, BadUnitName::Char { c: ' ', .. })
            }),
            ("a\n.service", |e| {
                matches!(e, BadUnitName::Char { c: '\n', .. })
            }),
            ("app", |e| matches!(e, BadUnitName::Suffix { .. })),
            ("app.sh", |e| matches!(e, BadUnitName::Suffix { .. })),
            (".service", |e| matches!(e, BadUnitName::Leading { .. })),
        ];
        for (n, want) in cases {
            let e = check_unit_name(n).expect_err(n);
            assert!(want(&e), "{n:?}: {e}");
        }
        // Generated files: what MARS would write, but never outside the directory.
        assert_eq!(check_file_name("^{x}-leaf.service"), Ok(()));
        for n in [
            "",
            "../x.service",
            "a/b.service",
            ".x.service",
            "a\0.service",
        ] {
            assert!(check_file_name(n).is_err(), "{n:?}");
        }
        let long = format!("{}.service", "a".repeat(250));
        assert!(matches!(
            check_unit_name(&long),
            Err(BadUnitName::TooLong { .. })
        ));
    }
}
