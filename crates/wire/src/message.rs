//! Messages and their payload encodings.
//!
//! | type | message | payload |
//! |---|---|---|
//! | 1 | Refuse | kind: u8 ([`RefuseKind`]), reason: str |
//! | 2 | Ping | stamp: u64 |
//! | 3 | Pong | stamp: u64 |
//! | 4 | ChangesSince | since: u64, limit: u32 |
//! | 5 | Changes | upto: u64, count: u32, count × entry |
//! | 6 | Notify | seq: u64 |
//! | 10 | FetchFrom | res: str, file: u64, offset: u64, prev_link: str, tail: 16 bytes |
//! | 11 | LogFile | file: u64, origin: str |
//! | 12 | LogData | file: u64, offset: u64, data: bytes |
//! | 13 | LogEnd | file: u64, len: u64 |
//! | 14 | LogGone | file: u64, oldest: u64 |
//! | 15 | LogCaughtUp | file: u64, offset: u64, stamp: u64 |
//! | 20 | SyncStart | res: str |
//! | 21 | SyncInfo | size: u64, file: u64, offset: u64, prev_link: str |
//! | 22 | SyncCheck | offset: u64, len: u32 (≥ 1), digest: 16 bytes |
//! | 23 | SyncSame | offset: u64 |
//! | 24 | SyncData | offset: u64, data: bytes |
//! | 30 | JoinRequest | token: str (`ID.SECRET`), host_key: bytes (DER SubjectPublicKeyInfo) |
//! | 31 | JoinGrant | cluster: 16 bytes, cert: bytes (DER), ca: bytes (DER) |
//! | 32 | Renew | host_key: bytes (DER SubjectPublicKeyInfo) |
//! | 33 | MergeRequest | token: str (`ID.SECRET`), cluster: 16 bytes, ca: bytes (DER), names: str, proof: str |
//! | 34 | MergeGrant | cluster: 16 bytes, ca: bytes (DER), names: str |
//! | 35 | SplitRequest | hosts: u32 count (1..=[`MAX_SPLIT_NAMES`]) × str (a host name), resources: u32 count (0..=[`MAX_SPLIT_NAMES`]) × str (a resource name) |
//! | 36 | SplitGrant | cluster: 16 bytes, ca: bytes (DER) |
//!
//! str = length: u32, UTF-8 (at most 64 KiB)\
//! bytes = length: u32, raw bytes (at most [`MAX_DATA`], may be empty)\
//! entry = key: str, has_value: u8 (0/1), [value: str], stamp: u64, origin: str, sig_len: u8,
//! sig: sig_len bytes (the writer's signature; 0 bytes: none, see `mars_meta::auth`)
//!
//! Types 1–6 belong to the metadata stream (Refuse may end any stream), 10–14 to the log fetch
//! stream, 20–24 to the sync stream; see [`StreamKind`](crate::StreamKind). 30–31 open the
//! metadata stream of a joiner that has no certificate yet (TLS mode): its first frame is a
//! `JoinRequest`, the member answers `JoinGrant` or `Refuse`, and the stream goes on as a
//! metadata stream. A member renews its certificate with `Renew` on its own (authenticated)
//! metadata stream; the answer is a `JoinGrant` too. 33–34 open the metadata stream of a host
//! that merges its cluster into the member's (`merge-cluster`, TLS mode, no certificate of this
//! cluster): `MergeRequest` with an empty `proof` asks for the checks only and the stream ends
//! after the answer; with the proof (its CA's endorsement of this cluster's CA) the member
//! redeems the token, answers `MergeGrant`, and the stream goes on as a joiner's metadata
//! stream. `names` is one `host NAME` or `resource NAME` line per member and resource.
//! 35–36 travel on a member's authenticated metadata stream like `Renew`: the host that runs
//! `split-cluster` asks the issuer of a group that splits off (`SplitRequest`: the group's
//! hosts and resources, every name checked as a host or resource name on decoding) and the
//! issuer answers with the new cluster's id and CA (`SplitGrant`) or `Refuse`.

use mars_config::{HostName, ResourceName};

use crate::{WireError, MAX_DATA};

/// Most hosts, and most resources, a [`Message::SplitRequest`] names (each list): a group
/// cannot hold more members than a host keeps connections for.
pub const MAX_SPLIT_NAMES: u32 = 16_384;

/// How many bytes before a fetch's start position [`Message::FetchFrom`]'s `tail` digest covers.
pub const TAIL_LEN: u64 = 4096;

/// One metadata entry as it travels (the store's own type lives in `meta`; this one only carries
/// bytes, and the receiving store validates keys, hosts and stamps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<String>,
    pub stamp: u64,
    pub origin: String,
    /// The writer's signature (empty: none). At most 255 bytes.
    pub sig: Vec<u8>,
}

/// What a refusal is about, so that the other side acts on the kind and never on the text.
/// Unknown codes (from a newer peer) decode as [`RefuseKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RefuseKind {
    /// Anything else (the reason says what).
    Other = 0,
    /// The resource is not set up on the serving host (or not in the role asked for).
    NotHere = 1,
    /// The asker's history differs from the server's: a fork (split brain).
    History = 2,
    /// The server's primary is in emergency mode: replication has stopped.
    Emergency = 3,
    /// The server left the primary role during the session.
    Left = 4,
    /// The asker broke a limit of the protocol (too many requests in flight, a chunk outside
    /// the device).
    Limit = 5,
    /// The hello was refused (other cluster, version, not a member).
    Hello = 6,
    /// The asker is not a member of the resource (fetch and sync serve members only).
    NotMember = 7,
}

impl RefuseKind {
    pub fn from_code(c: u8) -> RefuseKind {
        match c {
            1 => RefuseKind::NotHere,
            2 => RefuseKind::History,
            3 => RefuseKind::Emergency,
            4 => RefuseKind::Left,
            5 => RefuseKind::Limit,
            6 => RefuseKind::Hello,
            7 => RefuseKind::NotMember,
            _ => RefuseKind::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The sender refuses the connection (or request); it closes after this frame.
    Refuse {
        kind: RefuseKind,
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

    // --- fetch stream: the replica asks once, the server then pushes without further requests ---
    /// 10, replica → server: stream resource `res`'s log from logfile number `file` at byte
    /// `offset`, and keep following it (older files first, then the current one as it grows).
    /// `prev_link` is the asker's version link of logfile `file - 1` (empty: it has none): the
    /// server refuses when its own link of that logfile differs, since the asker's copy then
    /// continues another history and "you have everything" would confirm a position there.
    /// `tail` is the xxh3-128 of the asker's last [`TAIL_LEN`] bytes of logfile `file` before
    /// `offset` (fewer near its start; all zero at offset 0): the server refuses when its own
    /// bytes there differ, since the asker's copy is then another incarnation of that logfile
    /// (the same number and writer, written again after a full sync).
    FetchFrom {
        res: String,
        file: u64,
        offset: u64,
        prev_link: String,
        tail: [u8; 16],
    },
    /// 11, server → replica: the data that follows belongs to logfile `file` written by `origin`
    /// (name `log-%09d-ORIGIN`).
    LogFile {
        file: u64,
        origin: String,
    },
    /// 12, server → replica: bytes of logfile `file` starting at `offset`; always whole log
    /// records. At most [`MAX_DATA`] bytes.
    LogData {
        file: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// 13, server → replica: logfile `file` is complete with `len` bytes; the next one follows.
    LogEnd {
        file: u64,
        len: u64,
    },
    /// 14, server → replica: logfile `file` is no longer present on the server; `oldest` is the
    /// oldest one it still has (0: none).
    LogGone {
        file: u64,
        oldest: u64,
    },
    /// 15, server → replica: everything durable here ends at `file`/`offset`, as of the
    /// server's wall clock `stamp` (ns since the epoch). A replica holding exactly that much is
    /// up to date as of `stamp`; the stamp (not the arrival time) tells whether a write
    /// finished before some moment is included.
    LogCaughtUp {
        file: u64,
        offset: u64,
        stamp: u64,
    },

    // --- sync stream (fast full sync): the replica compares chunk digests, only differing chunks
    // travel ---
    /// 20, replica → server: start or resume a full sync of `res`.
    SyncStart {
        res: String,
    },
    /// 21, server → replica: device size and the log position (file, offset) at sync start;
    /// replaying the log from there after the copy makes the replica consistent. `prev_link` is
    /// the server's version link of logfile `file - 1` (empty: none, or not known yet): the copy
    /// continues that history, so the replica takes the link as its own for its chain checks.
    SyncInfo {
        size: u64,
        file: u64,
        offset: u64,
        prev_link: String,
    },
    /// 22, replica → server: "my chunk at offset/len has this digest" (xxh3-128 of the bytes,
    /// 16 bytes little-endian of the u128). `len` is never 0.
    SyncCheck {
        offset: u64,
        len: u32,
        digest: [u8; 16],
    },
    /// 23, server → replica: the chunk is equal, nothing to copy.
    SyncSame {
        offset: u64,
    },
    /// 24, server → replica: the chunk differs; here are the server's bytes. At most
    /// [`MAX_DATA`] bytes.
    SyncData {
        offset: u64,
        data: Vec<u8>,
    },

    // --- joining (first frames of a joiner's metadata stream, TLS mode) ---
    /// 30, joiner → member: a join token (`ID.SECRET`, see mars-tls) and the public key the
    /// joiner's certificate is to certify.
    JoinRequest {
        token: String,
        host_key: Vec<u8>,
    },
    /// 31, member → joiner: the token was good; the cluster's id, the joiner's certificate
    /// and the CA's certificate.
    JoinGrant {
        cluster: [u8; 16],
        cert: Vec<u8>,
        ca: Vec<u8>,
    },
    /// 32, member → issuing member, on the asker's authenticated metadata stream: certify
    /// this new public key for me (the host my certificate names).
    Renew {
        host_key: Vec<u8>,
    },
    /// 33, merging host → member of the other cluster: a join token of the member's cluster,
    /// the merging cluster's id, CA, members and resources (`names`), and `proof`: the
    /// merging CA's endorsement of the member's CA into the member's cluster
    /// (`mars_tls::Endorse::Merge`) — empty to ask for the checks only.
    MergeRequest {
        token: String,
        cluster: [u8; 16],
        ca: Vec<u8>,
        names: String,
        proof: String,
    },
    /// 34, member → merging host: the checks passed (and, with a proof, the token is used
    /// and this cluster trusts the merging CA): this cluster's id, CA, members and resources.
    MergeGrant {
        cluster: [u8; 16],
        ca: Vec<u8>,
        names: String,
    },
    /// 35, host running `split-cluster` → the issuer of a group that splits off, on the
    /// asker's authenticated metadata stream: the group's hosts and resources as the asker
    /// computed them (sorted, at least one host).
    SplitRequest {
        hosts: Vec<HostName>,
        resources: Vec<ResourceName>,
    },
    /// 36, issuer → asker: the group is the same here; the new cluster's id and CA (its key
    /// stays on the issuer).
    SplitGrant {
        cluster: [u8; 16],
        ca: Vec<u8>,
    },
}

/// Longest string in a message (keys and values are small; a reason is a line).
const MAX_STR: u32 = 64 << 10;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The `u32` length of a binary payload, which follows it (sent apart: see
/// [`Message::encode_split`]). Callers keep `b` within [`MAX_DATA`]; a longer one would not fit
/// a frame and is refused by the decoder.
fn put_len(out: &mut Vec<u8>, b: &[u8]) {
    debug_assert!(b.len() <= MAX_DATA as usize, "payload of {} bytes", b.len());
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
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
    /// A binary payload; its length is checked against the rest of the frame before anything is
    /// allocated.
    fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.u32()?;
        if n > MAX_DATA {
            return Err(self.err(format!("payload of {n} bytes exceeds {MAX_DATA}")));
        }
        if n as usize > self.buf.len() {
            return Err(self.err(format!(
                "payload of {n} bytes, {} left in the frame",
                self.buf.len()
            )));
        }
        Ok(self.take(n as usize)?.to_vec())
    }
    /// A list of names (a `u32` count, then each as a `str`), each checked by `check`; the
    /// count is bounded by `max` and by what the rest of the frame can hold (a name takes at
    /// least 5 bytes) before anything is allocated.
    fn names<T>(
        &mut self,
        min: u32,
        max: u32,
        check: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, WireError> {
        let n = self.u32()?;
        if n < min || n > max {
            return Err(self.err(format!("{n} names (allowed {min}..={max})")));
        }
        if n as usize > self.buf.len() / 5 {
            return Err(self.err(format!("{n} names cannot fit the frame")));
        }
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let s = self.str()?;
            out.push(check(&s).map_err(|e| self.err(e))?);
        }
        Ok(out)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
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
            Message::FetchFrom { .. } => 10,
            Message::LogFile { .. } => 11,
            Message::LogData { .. } => 12,
            Message::LogEnd { .. } => 13,
            Message::LogGone { .. } => 14,
            Message::LogCaughtUp { .. } => 15,
            Message::SyncStart { .. } => 20,
            Message::SyncInfo { .. } => 21,
            Message::SyncCheck { .. } => 22,
            Message::SyncSame { .. } => 23,
            Message::SyncData { .. } => 24,
            Message::JoinRequest { .. } => 30,
            Message::JoinGrant { .. } => 31,
            Message::Renew { .. } => 32,
            Message::MergeRequest { .. } => 33,
            Message::MergeGrant { .. } => 34,
            Message::SplitRequest { .. } => 35,
            Message::SplitGrant { .. } => 36,
        }
    }

    /// Encodes the message into `out`, except that the binary payload of `LogData` and
    /// `SyncData` (always the last field) is left out after its length and returned: the
    /// frame writer sends it from where it lies.
    pub(crate) fn encode_split(&self, out: &mut Vec<u8>) -> &[u8] {
        out.push(self.type_byte());
        match self {
            Message::Refuse { kind, reason } => {
                out.push(*kind as u8);
                put_str(out, reason)
            }
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
                    // Signatures are at most 72 bytes; a longer one is not ours to send.
                    let sig = if e.sig.len() <= u8::MAX as usize {
                        &e.sig[..]
                    } else {
                        &[]
                    };
                    out.push(sig.len() as u8);
                    out.extend_from_slice(sig);
                }
            }
            Message::Notify { seq } => out.extend_from_slice(&seq.to_le_bytes()),
            Message::FetchFrom {
                res,
                file,
                offset,
                prev_link,
                tail,
            } => {
                put_str(out, res);
                put_u64(out, *file);
                put_u64(out, *offset);
                put_str(out, prev_link);
                out.extend_from_slice(tail);
            }
            Message::LogFile { file, origin } => {
                put_u64(out, *file);
                put_str(out, origin);
            }
            Message::LogData { file, offset, data } => {
                put_u64(out, *file);
                put_u64(out, *offset);
                put_len(out, data);
                return data;
            }
            Message::LogEnd { file, len } => {
                put_u64(out, *file);
                put_u64(out, *len);
            }
            Message::LogGone { file, oldest } => {
                put_u64(out, *file);
                put_u64(out, *oldest);
            }
            Message::LogCaughtUp {
                file,
                offset,
                stamp,
            } => {
                put_u64(out, *file);
                put_u64(out, *offset);
                put_u64(out, *stamp);
            }
            Message::SyncStart { res } => put_str(out, res),
            Message::SyncInfo {
                size,
                file,
                offset,
                prev_link,
            } => {
                put_u64(out, *size);
                put_u64(out, *file);
                put_u64(out, *offset);
                put_str(out, prev_link);
            }
            Message::SyncCheck {
                offset,
                len,
                digest,
            } => {
                put_u64(out, *offset);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(digest);
            }
            Message::SyncSame { offset } => put_u64(out, *offset),
            Message::SyncData { offset, data } => {
                put_u64(out, *offset);
                put_len(out, data);
                return data;
            }
            Message::JoinRequest { token, host_key } => {
                put_str(out, token);
                put_len(out, host_key);
                out.extend_from_slice(host_key);
            }
            Message::Renew { host_key } => {
                put_len(out, host_key);
                out.extend_from_slice(host_key);
            }
            Message::JoinGrant { cluster, cert, ca } => {
                out.extend_from_slice(cluster);
                put_len(out, cert);
                out.extend_from_slice(cert);
                put_len(out, ca);
                out.extend_from_slice(ca);
            }
            Message::MergeRequest {
                token,
                cluster,
                ca,
                names,
                proof,
            } => {
                put_str(out, token);
                out.extend_from_slice(cluster);
                put_len(out, ca);
                out.extend_from_slice(ca);
                put_str(out, names);
                put_str(out, proof);
            }
            Message::MergeGrant { cluster, ca, names } => {
                out.extend_from_slice(cluster);
                put_len(out, ca);
                out.extend_from_slice(ca);
                put_str(out, names);
            }
            Message::SplitRequest { hosts, resources } => {
                out.extend_from_slice(&(hosts.len() as u32).to_le_bytes());
                for h in hosts {
                    put_str(out, h.as_str());
                }
                out.extend_from_slice(&(resources.len() as u32).to_le_bytes());
                for r in resources {
                    put_str(out, r.as_str());
                }
            }
            Message::SplitGrant { cluster, ca } => {
                out.extend_from_slice(cluster);
                put_len(out, ca);
                out.extend_from_slice(ca);
            }
        }
        &[]
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
            10 => "FetchFrom",
            11 => "LogFile",
            12 => "LogData",
            13 => "LogEnd",
            14 => "LogGone",
            15 => "LogCaughtUp",
            20 => "SyncStart",
            21 => "SyncInfo",
            22 => "SyncCheck",
            23 => "SyncSame",
            24 => "SyncData",
            30 => "JoinRequest",
            31 => "JoinGrant",
            32 => "Renew",
            33 => "MergeRequest",
            34 => "MergeGrant",
            35 => "SplitRequest",
            36 => "SplitGrant",
            other => return Err(WireError::UnknownType(other)),
        };
        let mut r = Reader { buf: rest, what };
        let m = match t {
            1 => Message::Refuse {
                kind: RefuseKind::from_code(r.u8()?),
                reason: r.str()?,
            },
            2 => Message::Ping { stamp: r.u64()? },
            3 => Message::Pong { stamp: r.u64()? },
            4 => Message::ChangesSince {
                since: r.u64()?,
                limit: r.u32()?,
            },
            5 => {
                let upto = r.u64()?;
                let n = r.u32()?;
                // Each entry takes at least 22 bytes: refuse counts the frame cannot hold
                // before allocating for them.
                if n as usize > r.buf.len() / 22 {
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
                    let stamp = r.u64()?;
                    let origin = r.str()?;
                    let sig_len = r.u8()?;
                    entries.push(Entry {
                        key,
                        value,
                        stamp,
                        origin,
                        sig: r.take(sig_len as usize)?.to_vec(),
                    });
                }
                Message::Changes { upto, entries }
            }
            6 => Message::Notify { seq: r.u64()? },
            10 => Message::FetchFrom {
                res: r.str()?,
                file: r.u64()?,
                offset: r.u64()?,
                prev_link: r.str()?,
                tail: r.array()?,
            },
            11 => Message::LogFile {
                file: r.u64()?,
                origin: r.str()?,
            },
            12 => Message::LogData {
                file: r.u64()?,
                offset: r.u64()?,
                data: r.bytes()?,
            },
            13 => Message::LogEnd {
                file: r.u64()?,
                len: r.u64()?,
            },
            14 => Message::LogGone {
                file: r.u64()?,
                oldest: r.u64()?,
            },
            15 => Message::LogCaughtUp {
                file: r.u64()?,
                offset: r.u64()?,
                stamp: r.u64()?,
            },
            20 => Message::SyncStart { res: r.str()? },
            21 => Message::SyncInfo {
                size: r.u64()?,
                file: r.u64()?,
                offset: r.u64()?,
                prev_link: r.str()?,
            },
            22 => {
                let offset = r.u64()?;
                let len = r.u32()?;
                if len == 0 {
                    return Err(r.err("chunk length 0"));
                }
                Message::SyncCheck {
                    offset,
                    len,
                    digest: r.array()?,
                }
            }
            23 => Message::SyncSame { offset: r.u64()? },
            24 => Message::SyncData {
                offset: r.u64()?,
                data: r.bytes()?,
            },
            30 => Message::JoinRequest {
                token: r.str()?,
                host_key: r.bytes()?,
            },
            31 => Message::JoinGrant {
                cluster: r.array()?,
                cert: r.bytes()?,
                ca: r.bytes()?,
            },
            32 => Message::Renew {
                host_key: r.bytes()?,
            },
            33 => Message::MergeRequest {
                token: r.str()?,
                cluster: r.array()?,
                ca: r.bytes()?,
                names: r.str()?,
                proof: r.str()?,
            },
            34 => Message::MergeGrant {
                cluster: r.array()?,
                ca: r.bytes()?,
                names: r.str()?,
            },
            35 => Message::SplitRequest {
                hosts: r.names(1, MAX_SPLIT_NAMES, |s| {
                    HostName::new(s).map_err(|e| e.to_string())
                })?,
                resources: r.names(0, MAX_SPLIT_NAMES, |s| {
                    ResourceName::new(s).map_err(|e| e.to_string())
                })?,
            },
            36 => Message::SplitGrant {
                cluster: r.array()?,
                ca: r.bytes()?,
            },
            // Not reached: the type was checked above.
            other => return Err(WireError::UnknownType(other)),
        };
        r.end()?;
        Ok(m)
    }
}
