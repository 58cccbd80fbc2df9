use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Words that `marsadm` gives a meaning of their own (`all`, `(none)` …); they can name neither a
/// host nor a resource. The list is MARS's, plus `cluster`, which we use in paths.
pub const RESERVED_NAMES: &[&str] = &[
    "none",
    "all",
    "any",
    "full",
    "empty",
    "undefined",
    "remote",
    "local",
    "localhost",
    "cluster",
];

/// Longest name we accept; names end up in file names together with a prefix and a sequence
/// number, so keep them well below NAME_MAX (255).
const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} name is empty")]
    Empty { what: &'static str },
    #[error("{what} name {name:?} is longer than {MAX_NAME_LEN} characters")]
    TooLong { what: &'static str, name: String },
    #[error("{what} name {name:?} is a reserved word")]
    Reserved { what: &'static str, name: String },
    #[error("{what} name {name:?} contains {bad:?}; allowed are {allowed}")]
    BadChar {
        what: &'static str,
        name: String,
        bad: char,
        allowed: &'static str,
    },
    #[error("{what} name {name:?} must start with a letter or digit")]
    BadStart { what: &'static str, name: String },
}

fn check(
    what: &'static str,
    name: &str,
    ok: fn(char) -> bool,
    allowed: &'static str,
) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what,
            name: name.to_owned(),
        });
    }
    if let Some(bad) = name.chars().find(|&c| !ok(c)) {
        return Err(NameError::BadChar {
            what,
            name: name.to_owned(),
            bad,
            allowed,
        });
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(NameError::BadStart {
            what,
            name: name.to_owned(),
        });
    }
    if RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err(NameError::Reserved {
            what,
            name: name.to_owned(),
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal, $ok:expr, $allowed:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            pub fn new(name: &str) -> Result<Self, NameError> {
                check($what, name, $ok, $allowed)?;
                Ok(Self(name.to_owned()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(&s)
            }
        }
        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A host's name: MARS's rules — plain, dot-free, lowercase (`[a-z0-9_-]`). Host names are
    /// immutable identities: they appear in logfile names and metadata keys.
    HostName,
    "host",
    |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_',
    "a-z 0-9 - _"
);

name_type!(
    /// A resource's name (`[A-Za-z0-9_.-]`, starting with a letter or digit); it becomes a directory
    /// `resource-RES`, a device `/dev/mars/RES` and an NBD export name.
    ResourceName,
    "resource",
    |c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.',
    "A-Z a-z 0-9 - _ ."
);

impl HostName {
    /// The machine's short host name (up to the first dot), lowercased, if it is a valid name.
    pub fn from_system(raw: &str) -> Result<Self, NameError> {
        let short = raw.trim().split('.').next().unwrap_or("");
        Self::new(&short.to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert!(HostName::new("istore-test-bap1").is_ok());
        assert!(HostName::new("a").is_ok());
        assert!(matches!(HostName::new(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            HostName::new("Host"),
            Err(NameError::BadChar { bad: 'H', .. })
        ));
        assert!(matches!(
            HostName::new("a.b"),
            Err(NameError::BadChar { bad: '.', .. })
        ));
        assert!(matches!(
            HostName::new("localhost"),
            Err(NameError::Reserved { .. })
        ));
        assert!(matches!(
            HostName::new("-x"),
            Err(NameError::BadStart { .. })
        ));
        assert_eq!(
            HostName::from_system("Node1.example.com\n")
                .unwrap()
                .as_str(),
            "node1"
        );
    }

    #[test]
    fn resources() {
        assert!(ResourceName::new("vm-01.data").is_ok());
        for bad in ["", "all", "ALL", "none", "a/b", "..", ".x", "a b", "(none)"] {
            assert!(ResourceName::new(bad).is_err(), "{bad:?} accepted");
        }
        let long = "x".repeat(65);
        assert!(matches!(
            ResourceName::new(&long),
            Err(NameError::TooLong { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn valid_names_are_path_safe(s in "\\PC{0,80}") {
            if let Ok(n) = ResourceName::new(&s) {
                proptest::prop_assert!(!n.as_str().contains('/'));
                proptest::prop_assert!(n.as_str() != "." && n.as_str() != "..");
            }
        }
    }
}
