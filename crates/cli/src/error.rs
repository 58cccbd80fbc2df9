//! What went wrong, as the one line (or JSON object) `marsadm` prints and its exit status.
//!
//! | exit | kind (JSON `error.kind`)              | meaning                                      |
//! |------|---------------------------------------|----------------------------------------------|
//! | 0    | –                                     | done                                         |
//! | 1    | `failed`                              | I/O or internal failure                      |
//! | 2    | `usage`                               | bad command line; nothing was sent           |
//! | 3    | `invalid`, `not-found`, `exists`,     | refused by the daemon; nothing was changed   |
//! |      | `needs-confirmation`                  | (the last: `primary --force` loses writes)   |
//! | 4    | `timeout`                             | gave up waiting (condition, peer, daemon)    |
//! | 5    | `unreachable`                         | no daemon on the control socket              |
//!
//! `docs/json.md` and the EXIT STATUS section of `marsadm(8)` document the same table.

use mars_api::ErrorKind;
use serde::Serialize;

use crate::client::ClientError;

/// A bad command line (argument, name, size, condition): exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// A wait that gave up: exit 4.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TimedOut(pub String);

/// The failures were reported already (one line or JSON entry per resource of `all`): print
/// nothing more, exit with this kind's status.
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} resources failed")]
pub struct Reported {
    pub kind: Kind,
    pub failed: usize,
    pub total: usize,
}

/// The kinds of failure, as JSON names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Failed,
    Usage,
    Invalid,
    NotFound,
    Exists,
    NeedsConfirmation,
    Timeout,
    Unreachable,
}

impl Kind {
    /// The exit status of this kind (the table above).
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Failed => 1,
            Kind::Usage => 2,
            Kind::Invalid | Kind::NotFound | Kind::Exists | Kind::NeedsConfirmation => 3,
            Kind::Timeout => 4,
            Kind::Unreachable => 5,
        }
    }

    fn of_daemon(k: ErrorKind) -> Kind {
        match k {
            ErrorKind::Invalid => Kind::Invalid,
            ErrorKind::NotFound => Kind::NotFound,
            ErrorKind::Exists => Kind::Exists,
            ErrorKind::Failed => Kind::Failed,
            ErrorKind::Timeout => Kind::Timeout,
            ErrorKind::NeedsConfirmation => Kind::NeedsConfirmation,
        }
    }

    /// The kind of an error: the first typed cause in its chain decides; anything untyped is
    /// a failure.
    pub fn of(e: &anyhow::Error) -> Kind {
        for cause in e.chain() {
            if let Some(c) = cause.downcast_ref::<ClientError>() {
                return match c {
                    ClientError::Unreachable { .. } => Kind::Unreachable,
                    ClientError::Timeout(_) => Kind::Timeout,
                    ClientError::Refused { kind, .. } => Kind::of_daemon(*kind),
                    ClientError::Broken(_) => Kind::Failed,
                };
            }
            if cause.is::<Usage>()
                || cause.is::<mars_config::NameError>()
                || cause.is::<mars_config::SizeError>()
            {
                return Kind::Usage;
            }
            if cause.is::<TimedOut>() {
                return Kind::Timeout;
            }
            if let Some(r) = cause.downcast_ref::<Reported>() {
                return r.kind;
            }
        }
        Kind::Failed
    }
}

/// `bail!` for a bad command line.
macro_rules! usage {
    ($($t:tt)*) => {
        return Err(anyhow::Error::new($crate::error::Usage(format!($($t)*))))
    };
}
pub(crate) use usage;

/// The JSON of an error: `{"schema":1,"error":{"kind":…,"message":…}}`.
pub fn json(kind: Kind, message: &str) -> serde_json::Value {
    serde_json::json!({
        "schema": mars_api::SCHEMA_VERSION,
        "error": { "kind": kind, "message": message },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_exit_codes() {
        let refused = |k| {
            anyhow::Error::new(ClientError::Refused {
                kind: k,
                message: "no".into(),
            })
        };
        assert_eq!(Kind::of(&refused(ErrorKind::Invalid)).exit_code(), 3);
        assert_eq!(Kind::of(&refused(ErrorKind::NotFound)).exit_code(), 3);
        assert_eq!(Kind::of(&refused(ErrorKind::Exists)).exit_code(), 3);
        assert_eq!(Kind::of(&refused(ErrorKind::Failed)).exit_code(), 1);
        assert_eq!(Kind::of(&refused(ErrorKind::Timeout)).exit_code(), 4);
        let e = anyhow::Error::new(ClientError::Timeout(3)).context("view");
        assert_eq!(Kind::of(&e), Kind::Timeout);
        let e = anyhow::Error::new(ClientError::Unreachable {
            path: "/x/marsd.sock".into(),
            root: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(Kind::of(&e).exit_code(), 5);
        assert_eq!(
            Kind::of(&anyhow::Error::new(Usage("bad".into()))).exit_code(),
            2
        );
        let name = mars_config::ResourceName::new("a/b").unwrap_err();
        assert_eq!(Kind::of(&anyhow::Error::new(name)), Kind::Usage);
        assert_eq!(Kind::of(&anyhow::anyhow!("disk full")).exit_code(), 1);
        let v = json(Kind::NotFound, "resource r does not exist");
        assert_eq!(v["schema"], 1);
        assert_eq!(v["error"]["kind"], "not-found");
    }
}
