//! `systemd-escape` and `systemd-escape --path`, byte for byte (checked against systemd 252).
//!
//! Rules (systemd `src/basic/unit-name.c`, `do_escape`):
//! * allowed verbatim: ASCII letters, digits, `:`, `_`, `.` (a *leading* `.` is escaped so that
//!   `/.dotdir` does not become a hidden unit name);
//! * `/` becomes `-`;
//! * every other byte, including `-`, `\` and each byte of a multi-byte UTF-8 character, becomes
//!   `\xNN` (lower-case hex).
//!
//! `--path` first simplifies the path (`unit_name_path_escape`): duplicate slashes and `.`
//! components vanish, leading and trailing slashes are dropped, the empty path and `/` become
//! `-`, and `..` components or a relative path that simplifies to nothing (`.`) are refused
//! (systemd prints "failed to escape" and exits 1). MARS (`_systemd_escape`) always uses
//! `--path`, for `@esc{}`, `@escvar{}` and path references alike.

use crate::error::EscapeError;

/// `systemd-escape STRING` (no `--path`).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let verbatim = b.is_ascii_alphanumeric() || b == b':' || b == b'_' || (b == b'.' && i > 0);
        if b == b'/' {
            out.push('-');
        } else if verbatim {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `systemd-escape --path STRING`.
pub fn escape_path(s: &str) -> Result<String, EscapeError> {
    // path_is_valid(): PATH_MAX and NAME_MAX limits.
    if s.len() >= 4096 || s.split('/').any(|c| c.len() > 255) {
        return Err(EscapeError::TooLong(s.to_string()));
    }
    let components: Vec<&str> = s
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if components.is_empty() {
        // empty_or_root(): "" and "/" (and "//", "/./") are the root; a relative "." is not.
        if s.is_empty() || s.starts_with('/') {
            return Ok("-".to_string());
        }
        return Err(EscapeError::Empty(s.to_string()));
    }
    if components.contains(&"..") {
        return Err(EscapeError::DotDot(s.to_string()));
    }
    Ok(escape(&components.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_escape() {
        assert_eq!(escape("a-b"), "a\\x2db");
        assert_eq!(escape("a b"), "a\\x20b");
        assert_eq!(escape("ä"), "\\xc3\\xa4");
        assert_eq!(escape(".hidden"), "\\x2ehidden");
        assert_eq!(escape("/x//y/"), "-x--y-");
        assert_eq!(escape("a\\b"), "a\\x5cb");
        assert_eq!(escape("-lead"), "\\x2dlead");
        assert_eq!(escape(""), "");
        assert_eq!(escape("a:b_c.d"), "a:b_c.d");
    }

    #[test]
    fn path_escape() {
        assert_eq!(escape_path("a-b").unwrap(), "a\\x2db");
        assert_eq!(escape_path("/x//y/").unwrap(), "x-y");
        assert_eq!(escape_path("").unwrap(), "-");
        assert_eq!(escape_path("/").unwrap(), "-");
        assert_eq!(escape_path("/./").unwrap(), "-");
        assert_eq!(escape_path("./a").unwrap(), "a");
        assert_eq!(escape_path("/.a").unwrap(), "\\x2ea");
        assert_eq!(escape_path("a/...").unwrap(), "a-...");
        assert_eq!(escape_path("/mars/uuid").unwrap(), "mars-uuid");
        assert!(matches!(escape_path("."), Err(EscapeError::Empty(_))));
        assert!(matches!(escape_path("/a/../"), Err(EscapeError::DotDot(_))));
        assert!(matches!(
            escape_path(&"x".repeat(256)),
            Err(EscapeError::TooLong(_))
        ));
    }

    /// Compares with the real binary when it exists (it does on any systemd host).
    #[test]
    fn matches_real_systemd_escape() {
        let bin = "/usr/bin/systemd-escape";
        if !std::path::Path::new(bin).exists() {
            eprintln!("skipping: {bin} not found");
            return;
        }
        let inputs = [
            "a-b",
            "a b",
            "ä",
            ".hidden",
            "/x//y/",
            "a\\b",
            "-lead",
            "",
            "/",
            "a/./b",
            "a/../b",
            "..",
            ".",
            "x/.y",
            "a:b_c.d",
            "~",
            "a.",
            "/.a",
            "./a",
            "a/.",
            "/./",
            "//",
            "a/..b",
            "./",
            ".a/b",
            "a//.//b",
            "/..",
            "a/...",
            "a\nb",
            "*",
            "$x",
            "my-res",
            "res@1",
            "mnt/test/my-res",
            "€uro",
            "tab\there",
        ];
        for input in inputs {
            for path in [false, true] {
                let mut cmd = std::process::Command::new(bin);
                if path {
                    cmd.arg("--path");
                }
                let out = cmd.arg("--").arg(input).output().unwrap();
                let real = String::from_utf8(out.stdout).unwrap();
                let real = real.strip_suffix('\n').unwrap_or(&real).to_string();
                let ours = if path {
                    escape_path(input).ok()
                } else {
                    Some(escape(input))
                };
                if out.status.success() {
                    assert_eq!(
                        ours.as_deref(),
                        Some(real.as_str()),
                        "input {input:?} path={path}"
                    );
                } else {
                    assert_eq!(ours, None, "input {input:?} path={path}: systemd refuses");
                }
            }
        }
    }
}
