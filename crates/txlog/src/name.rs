//! Logfile names: `log-<9-digit number>-<origin host>`, as in MARS. The number is contiguous per
//! resource; the origin host is the primary that wrote the file, so after a split brain two hosts
//! can hold different files with the same number.

use std::fmt;

use mars_config::HostName;

/// Highest logfile number that still has nine digits.
pub const MAX_LOG_NO: u64 = 999_999_999;
const PREFIX: &str = "log-";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogName {
    pub no: u64,
    pub host: HostName,
}

impl LogName {
    pub fn new(no: u64, host: HostName) -> Self {
        Self { no, host }
    }

    /// Parses a file name. `None` for names that are not logfiles at all; an error for names that
    /// look like logfiles but are malformed (those must not be silently ignored).
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        let Some(rest) = s.strip_prefix(PREFIX) else {
            return Ok(None);
        };
        if s.ends_with(".tmp") {
            return Ok(None);
        }
        let (num, host) = rest
            .split_once('-')
            .ok_or_else(|| format!("logfile name {s:?} lacks the origin host"))?;
        if num.len() != 9 || !num.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("logfile name {s:?}: number must have 9 digits"));
        }
        let no: u64 = num
            .parse()
            .map_err(|e| format!("logfile name {s:?}: {e}"))?;
        if no == 0 {
            return Err(format!("logfile name {s:?}: numbers start at 1"));
        }
        let host = HostName::new(host).map_err(|e| format!("logfile name {s:?}: {e}"))?;
        Ok(Some(Self { no, host }))
    }
}

impl fmt::Display for LogName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{:09}-{}", self.no, self.host)
    }
}

/// A byte position in the log of one resource: logfile number and offset inside it. Positions
/// order naturally; the end of logfile N comes before the start of logfile N+1.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct LogPos {
    pub file: u64,
    pub offset: u64,
}

impl LogPos {
    pub const ZERO: LogPos = LogPos { file: 0, offset: 0 };
    pub fn new(file: u64, offset: u64) -> Self {
        Self { file, offset }
    }
}

impl fmt::Display for LogPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:09}:{}", self.file, self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let h = HostName::new("alpha").unwrap();
        let n = LogName::new(42, h.clone());
        assert_eq!(n.to_string(), "log-000000042-alpha");
        assert_eq!(LogName::parse("log-000000042-alpha").unwrap(), Some(n));
        assert_eq!(LogName::parse("writeback").unwrap(), None);
        assert_eq!(LogName::parse("log-000000042-alpha.tmp").unwrap(), None);
        assert!(LogName::parse("log-42-alpha").is_err());
        assert!(LogName::parse("log-000000000-alpha").is_err());
        assert!(LogName::parse("log-000000001-Al.pha").is_err());
        assert!(LogName::parse("log-000000001").is_err());
        assert!(LogPos::new(1, 1000) < LogPos::new(2, 0));
    }
}
