//! Join tokens: one-time, with an expiry, pinning the cluster's CA.
//!
//! ```text
//! mars1.<pin: 64 hex>.<id: 16 hex>.<secret: 32 hex>
//!   pin     SHA-256 of the CA's public key: the joiner trusts the member only if the CA it
//!           presents hashes to this (so a token cannot send it to an impostor)
//!   id      names the token in the issuing host's book (and in its log lines)
//!   secret  128 random bits; the book keeps only its SHA-256
//! ```
//!
//! The joiner sends `id.secret` (never the pin's preimage matters: it is public) inside TLS,
//! after it verified the member. The issuing host redeems it once.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pki::{hex, unhex, Pin};

const PREFIX: &str = "mars1";
/// Most tokens outstanding on one host (issuing more drops the oldest).
pub const MAX_OUTSTANDING: usize = 1_000;

#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub pin: Pin,
    pub id: [u8; 8],
    pub secret: [u8; 16],
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}",
            hex(&self.pin),
            hex(&self.id),
            hex(&self.secret)
        )
    }
}

/// Never print the secret by accident.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token {{ id: {} }}", hex(&self.id))
    }
}

impl FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Token, TokenError> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [prefix, pin, id, secret] = parts[..] else {
            return Err(TokenError::Malformed);
        };
        if prefix != PREFIX {
            return Err(TokenError::Malformed);
        }
        Ok(Token {
            pin: unhex(pin).ok_or(TokenError::Malformed)?,
            id: unhex(id).ok_or(TokenError::Malformed)?,
            secret: unhex(secret).ok_or(TokenError::Malformed)?,
        })
    }
}

impl Token {
    /// What the joiner presents to the member: `id.secret`.
    pub fn presented(&self) -> String {
        format!("{}.{}", hex(&self.id), hex(&self.secret))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a join token (expected mars1.PIN.ID.SECRET, as `marsadm join-token` prints it)")]
    Malformed,
    #[error("join token {0} is unknown here or was used already (tokens work once, on the host that made them)")]
    Unknown(String),
    #[error("join token {0} expired")]
    Expired(String),
}

/// One outstanding token as the issuing host keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Issued {
    pub id: String,
    pub secret_sha256: String,
    /// Seconds since the epoch.
    pub expires: u64,
}

/// The outstanding tokens of the issuing host (the daemon stores it as `tls/tokens.toml`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenBook {
    #[serde(default)]
    pub token: Vec<Issued>,
}

fn secret_hash(secret: &[u8]) -> String {
    hex(&Sha256::digest(secret))
}

impl TokenBook {
    /// A new token valid for `ttl_secs` from `now` (seconds since the epoch).
    pub fn issue(&mut self, pin: Pin, now: u64, ttl_secs: u64) -> Token {
        self.token.retain(|t| t.expires > now);
        if self.token.len() >= MAX_OUTSTANDING {
            self.token.remove(0);
        }
        let t = Token {
            pin,
            id: rand::random(),
            secret: rand::random(),
        };
        self.token.push(Issued {
            id: hex(&t.id),
            secret_sha256: secret_hash(&t.secret),
            expires: now.saturating_add(ttl_secs),
        });
        t
    }

    /// Redeems `id.secret` once at `now`: on success the token is gone from the book. A wrong
    /// secret for a known id does not use the token up (it says "unknown", like a wrong id).
    pub fn redeem(&mut self, presented: &str, now: u64) -> Result<(), TokenError> {
        let (id, secret) = presented.split_once('.').ok_or(TokenError::Malformed)?;
        let id_b: [u8; 8] = unhex(id).ok_or(TokenError::Malformed)?;
        let secret: [u8; 16] = unhex(secret).ok_or(TokenError::Malformed)?;
        let id = hex(&id_b);
        let want = secret_hash(&secret);
        let Some(i) = self
            .token
            .iter()
            .position(|t| t.id == id && t.secret_sha256 == want)
        else {
            return Err(TokenError::Unknown(id));
        };
        let t = self.token.remove(i);
        if t.expires <= now {
            return Err(TokenError::Expired(id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_prints_and_parses_and_works_once() {
        let mut book = TokenBook::default();
        let t = book.issue([7; 32], 1_000, 60);
        let text = t.to_string();
        assert!(text.starts_with("mars1."));
        let back: Token = text.parse().unwrap();
        assert_eq!(back, t);
        assert!(!format!("{t:?}").contains(&hex(&t.secret)));
        assert_eq!(book.redeem(&back.presented(), 1_010), Ok(()));
        assert!(matches!(
            book.redeem(&back.presented(), 1_011),
            Err(TokenError::Unknown(_))
        ));
    }

    #[test]
    fn expired_wrong_and_malformed_tokens_are_refused() {
        let mut book = TokenBook::default();
        let t = book.issue([1; 32], 1_000, 60);
        let mut wrong = t.clone();
        wrong.secret[0] ^= 1;
        assert!(matches!(
            book.redeem(&wrong.presented(), 1_001),
            Err(TokenError::Unknown(_))
        ));
        // A wrong guess did not use it up; time did.
        assert!(matches!(
            book.redeem(&t.presented(), 1_060),
            Err(TokenError::Expired(_))
        ));
        for bad in ["", "x", "a.b", "zz.zz", "mars1.00.11.22", "mars2.a.b.c"] {
            assert!(bad.parse::<Token>().is_err(), "{bad}");
            assert!(book.redeem(bad, 0).is_err());
        }
    }

    #[test]
    fn the_book_is_bounded() {
        let mut book = TokenBook::default();
        for _ in 0..MAX_OUTSTANDING + 10 {
            book.issue([0; 32], 5, 100);
        }
        assert_eq!(book.token.len(), MAX_OUTSTANDING);
        // Expired ones go first.
        book.issue([0; 32], 200, 100);
        assert_eq!(book.token.len(), 1);
    }
}
