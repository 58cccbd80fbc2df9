//! Wire constants of the NBD protocol (NetworkBlockDevice/nbd, `doc/proto.md`).
//!
//! Every integer on the wire is big-endian. Only the parts this server speaks are listed:
//! the fixed-newstyle handshake, option haggling and simple (non-structured) replies.
//!
//! # Handshake (server first)
//!
//! ```text
//! S: u64 NBDMAGIC  S: u64 IHAVEOPT  S: u16 handshake flags
//! C: u32 client flags
//! ```
//!
//! # Option request / reply
//!
//! ```text
//! C: u64 IHAVEOPT  C: u32 option  C: u32 length  C: [u8; length] data
//! S: u64 OPT_REPLY_MAGIC  S: u32 option  S: u32 reply type  S: u32 length  S: [u8; length] data
//! ```
//!
//! # Transmission
//!
//! ```text
//! request (28 bytes): u32 REQUEST_MAGIC, u16 command flags, u16 type, u64 cookie,
//!                     u64 offset, u32 length, then `length` payload bytes for WRITE only
//! simple reply (16 bytes): u32 SIMPLE_REPLY_MAGIC, u32 error, u64 cookie,
//!                     then `length` data bytes for a successful READ only
//! ```

// ---------------------------------------------------------------------------------------------
// Handshake magics and flags
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC` (ASCII), first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT` (ASCII): second 8 bytes of the greeting, and prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic prefixing every option reply (fixed newstyle).
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag (server, u16) bit 0: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag (server, u16) bit 1: the server can omit the 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag (u32) bit 0: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag (u32) bit 1: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; any other bit closes the connection.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// Number of zero bytes padding the `NBD_OPT_EXPORT_NAME` reply without `NO_ZEROES`.
pub const EXPORT_NAME_PADDING: usize = 124;

// ---------------------------------------------------------------------------------------------
// Transmission flags (u16, sent in the EXPORT_NAME reply and in NBD_INFO_EXPORT)
// ---------------------------------------------------------------------------------------------

/// bit 0: MUST always be set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// bit 1: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// bit 2: `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// bit 3: `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// bit 4: the export behaves like a rotational medium (never sent by this server).
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// bit 5: `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// bit 6: `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) are supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// bit 7: `NBD_CMD_FLAG_DF` (needs structured replies; never sent by this server).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// bit 8: flush/FUA effects are visible across all connections to the export.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// bit 10: `NBD_CMD_CACHE` is supported (not advertised; CACHE is still accepted as a no-op).
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// bit 11: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Options (u32, client -> server)
// ---------------------------------------------------------------------------------------------

/// Data: export name (whole option data). Reply: u64 size, u16 transmission flags,
/// 124 zero bytes unless `NO_ZEROES`; then transmission. Unknown export: close.
pub const OPT_EXPORT_NAME: u32 = 1;
/// No data expected. Reply `NBD_REP_ACK`, then close.
pub const OPT_ABORT: u32 = 2;
/// No data allowed. One `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
pub const OPT_LIST: u32 = 3;
/// Withdrawn experimental extension.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Start TLS: with TLS configured, the only option (besides `ABORT`) answered before it;
/// without, refused with `NBD_REP_ERR_POLICY`.
pub const OPT_STARTTLS: u32 = 5;
/// Data: u32 name length, name, u16 n, n x u16 info requests. Replies `NBD_REP_INFO`s + ACK.
pub const OPT_INFO: u32 = 6;
/// Same as [`OPT_INFO`], then transmission on success.
pub const OPT_GO: u32 = 7;
/// Structured replies: answered with `NBD_REP_ERR_UNSUP` by this server.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Metadata contexts: answered with `NBD_REP_ERR_UNSUP` by this server.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Metadata contexts: answered with `NBD_REP_ERR_UNSUP` by this server.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Extended headers: answered with `NBD_REP_ERR_UNSUP` by this server.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Largest option data this server reads into memory; longer options are skipped and answered
/// with `NBD_REP_ERR_TOO_BIG` (or close the connection for `NBD_OPT_EXPORT_NAME`).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Option reply types (u32, server -> client)
// ---------------------------------------------------------------------------------------------

/// Option accepted / list finished. No data.
pub const REP_ACK: u32 = 1;
/// Data: u32 name length, name, then a human-readable description (rest of the data).
pub const REP_SERVER: u32 = 2;
/// Data: u16 info type, then the info payload (see `INFO_*`).
pub const REP_INFO: u32 = 3;
/// Bit 31 marks every error reply; error replies may carry a UTF-8 message as data.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Known option, forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Known option, syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Unsupported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// The requested export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// The client must request `NBD_INFO_BLOCK_SIZE` first.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// The request or the reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------------------------------------
// Information types (u16) inside NBD_OPT_INFO / NBD_OPT_GO requests and NBD_REP_INFO replies
// ---------------------------------------------------------------------------------------------

/// Reply payload (12 bytes with the type): u16 type, u64 size, u16 transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Reply payload: u16 type, canonical export name.
pub const INFO_NAME: u16 = 1;
/// Reply payload: u16 type, human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Reply payload (14 bytes with the type): u16 type, u32 minimum, u32 preferred,
/// u32 maximum payload size.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Transmission phase
// ---------------------------------------------------------------------------------------------

/// Magic of every request (u32).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of every simple reply (u32).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;

/// Read `length` bytes at `offset`; the reply carries the data.
pub const CMD_READ: u16 = 0;
/// Write the `length` payload bytes following the request header.
pub const CMD_WRITE: u16 = 1;
/// Disconnect: answer everything in flight, then close. No reply.
pub const CMD_DISC: u16 = 2;
/// Make every write whose reply was already sent durable.
pub const CMD_FLUSH: u16 = 3;
/// Discard hint.
pub const CMD_TRIM: u16 = 4;
/// Prefetch hint (accepted as a no-op).
pub const CMD_CACHE: u16 = 5;
/// Zero a range without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status (needs structured replies; rejected with `EINVAL`).
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag bit 0: force unit access; reply only once the data is durable.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag bit 1 (WRITE_ZEROES): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag bit 2 (READ, structured replies only): do not fragment.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag bit 3 (BLOCK_STATUS): one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag bit 4 (WRITE_ZEROES): fail with `ENOTSUP` unless zeroing is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------------------------
// Error values of the simple reply (u32); the only values allowed on the wire
// ---------------------------------------------------------------------------------------------

/// Operation not permitted (e.g. write to a read-only export).
pub const EPERM: u32 = 1;
/// Input/output error (the fallback for unknown errors).
pub const EIO: u32 = 5;
/// Cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument (bad range, unknown command or flag).
pub const EINVAL: u32 = 22;
/// No space left on device (write beyond the end of the export).
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Operation not supported (fast zero impossible).
pub const ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const ESHUTDOWN: u32 = 108;
