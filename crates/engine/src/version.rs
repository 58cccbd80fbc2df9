//! The version chain: MARS's "version links", a git-like hash chain over the sequence of
//! logfile names and final lengths. Two hosts whose links for logfile N are equal have the same
//! history up to the end of N; a mismatch is a split brain (or a damaged log).
//!
//! ```text
//! link(N) = HASH "," "log-" N(9 digits) "-" ORIGIN "," LEN
//! HASH    = hex(xxh3-128(prev_hash "," N "," ORIGIN "," LEN))   prev_hash = "" for the first
//! ```
//!
//! The chain starts anew (empty previous hash) at the first logfile of a resource and wherever a
//! replica starts replaying after a full sync without knowing the earlier links; in the latter
//! case it takes the origin's link for N-1 as its previous link.

use mars_config::HostName;
use xxhash_rust::xxh3::xxh3_128;

/// The link of logfile `no` written by `origin` with final length `len`, following `prev`
/// (the link of logfile `no - 1`, or `""`).
pub fn link(prev: &str, no: u64, origin: &HostName, len: u64) -> String {
    let prev_hash = hash_of(prev).unwrap_or("");
    let h = xxh3_128(format!("{prev_hash},{no},{origin},{len}").as_bytes());
    format!("{h:032x},log-{no:09}-{origin},{len}")
}

/// The hash part of a link.
pub fn hash_of(link: &str) -> Option<&str> {
    link.split_once(',').map(|(h, _)| h)
}

/// The writer of the logfile a link is about (`HASH,log-N-ORIGIN,LEN`).
pub fn origin_of(link: &str) -> Option<HostName> {
    let name = link.split(',').nth(1)?;
    let (_, origin) = name.strip_prefix("log-")?.split_once('-')?;
    HostName::new(origin).ok()
}

/// The final length a link records.
pub fn len_of(link: &str) -> Option<u64> {
    link.rsplit_once(',').and_then(|(_, l)| l.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_of_a_link() {
        let a = HostName::new("node-a").unwrap();
        let l = link("", 7, &a, 99);
        assert_eq!(origin_of(&l), Some(a));
        assert_eq!(origin_of("garbage"), None);
    }

    #[test]
    fn chain() {
        let a = HostName::new("a").unwrap();
        let b = HostName::new("b").unwrap();
        let l1 = link("", 1, &a, 100);
        assert!(l1.ends_with(",log-000000001-a,100"));
        assert_eq!(len_of(&l1), Some(100));
        let l2 = link(&l1, 2, &a, 5);
        // Any difference in the past changes every later link.
        assert_ne!(l2, link(&link("", 1, &a, 101), 2, &a, 5));
        assert_ne!(l2, link(&l1, 2, &b, 5));
        assert_eq!(l2, link(&l1, 2, &a, 5));
    }
}
