//! Messages and their payload encodings.
//!
//! | type | message | payload |
//! |---|---|---|
//! | 1 | Refuse | reason: str |
//! | 2 | Ping | stamp: u64 |
//! | 3 | Pong | stamp: u64 |
//! | 4 | ChangesSince | since: u64, limit: u32 |
//! | 5 | Changes | upto: u64, count: u32, count × entry |
//! | 6 | Notify | seq: u64 |
//!
//! entry = key: str, has_value: u8 (0/1), [value: str], stamp: u64, origin: str

use crate::WireError;

/// One metadata entry as it travels (the store's own type lives in `meta`; this one only carries
/// bytes, and the receiving store validates keys, hosts and stamps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<String>,
    pub stamp: u64,
    pub origin: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The sender refuses the connection; it closes after this frame.
    Refuse {
        reason: String,
    },
    /// Liveness and Lamport clock exchange.
    Ping {
        stamp: u64,
    },
    Pong {
        stamp: u64,
    },
    /// "Send me your changes with a local sequence number above `since`, at most `limit`."
    ChangesSince {
        since: u64,
        limit: u32,
    },
    /// Changes in sequence order; `upto` is the sender's sequence number they bring the
    /// receiver to.
    Changes {
        upto: u64,
        entries: Vec<Entry>,
    },
    /// "I have changes up to `seq`": lets a peer ask at once instead of at its next poll.
    Notify {
        seq: u64,
    },
}

/// Longest string in a message (keys and values are small; a reason is a line).
const MAX_STR: u32 = 64 << 10;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, why: impl Into<String>) -> WireError {
        WireError::Malformed {
            what: self.what,
            why: why.into(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(self.err(format!("{n} more bytes needed, {} left", self.buf.len())));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u32()?;
        if n > MAX_STR {
            return Err(self.err(format!("string of {n} bytes")));
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn end(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

impl Message {
    fn type_byte(&self) -> u8 {
        match self {
            Message::Refuse { .. } => 1,
            Message::Ping { .. } => 2,
            Message::Pong { .. } => 3,
            Message::ChangesSince { .. } => 4,
            Message::Changes { .. } => 5,
            Message::Notify { .. } => 6,
        }
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.type_byte());
        match self {
            Message::Refuse { reason } => put_str(out, reason),
            Message::Ping { stamp } | Message::Pong { stamp } => {
                out.extend_from_slice(&stamp.to_le_bytes())
            }
            Message::ChangesSince { since, limit } => {
                out.extend_from_slice(&since.to_le_bytes());
                out.extend_from_slice(&limit.to_le_bytes());
            }
            Message::Changes { upto, entries } => {
                out.extend_from_slice(&upto.to_le_bytes());
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for e in entries {
                    put_str(out, &e.key);
                    match &e.value {
                        Some(v) => {
                            out.push(1);
                            put_str(out, v);
                        }
                        None => out.push(0),
                    }
                    out.extend_from_slice(&e.stamp.to_le_bytes());
                    put_str(out, &e.origin);
                }
            }
            Message::Notify { seq } => out.extend_from_slice(&seq.to_le_bytes()),
        }
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Message, WireError> {
        let (&t, rest) = body.split_first().ok_or(WireError::EmptyFrame)?;
        let what = match t {
            1 => "Refuse",
            2 => "Ping",
            3 => "Pong",
            4 => "ChangesSince",
            5 => "Changes",
            6 => "Notify",
            other => return Err(WireError::UnknownType(other)),
        };
        let mut r = Reader { buf: rest, what };
        let m = match t {
            1 => Message::Refuse { reason: r.str()? },
            2 => Message::Ping { stamp: r.u64()? },
            3 => Message::Pong { stamp: r.u64()? },
            4 => Message::ChangesSince {
                since: r.u64()?,
                limit: r.u32()?,
            },
            5 => {
                let upto = r.u64()?;
                let n = r.u32()?;
                // Each entry takes at least 21 bytes: refuse counts the frame cannot hold
                // before allocating for them.
                if n as usize > r.buf.len() / 21 {
                    return Err(r.err(format!("{n} entries cannot fit the frame")));
                }
                let mut entries = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let key = r.str()?;
                    let value = match r.u8()? {
                        0 => None,
                        1 => Some(r.str()?),
                        b => return Err(r.err(format!("value flag {b}"))),
                    };
                    entries.push(Entry {
                        key,
                        value,
                        stamp: r.u64()?,
                        origin: r.str()?,
                    });
                }
                Message::Changes { upto, entries }
            }
            _ => Message::Notify { seq: r.u64()? },
        };
        r.end()?;
        Ok(m)
    }
}
