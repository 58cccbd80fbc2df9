//! Fixed-newstyle handshake and option haggling.
//!
//! The server sends its greeting, reads the client flags and then answers options until the
//! client picks an export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`), aborts, or misbehaves. Option
//! data is bounded by [`proto::MAX_OPTION_DATA`]; a malformed option gets an error reply and
//! haggling continues.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::error::NbdError;
use crate::export::{Export, Exports, ServerConfig};
use crate::proto;
use crate::wire::{read_exact_or_eof, skip};

/// The export chosen by the client; the connection continues with transmission.
pub(crate) struct Negotiated {
    pub(crate) name: String,
    pub(crate) export: Arc<dyn Export>,
}

/// What to do after one option was answered.
enum Step {
    Continue,
    Abort,
    Transmit(Negotiated),
    StartTls,
}

/// How option haggling ended.
pub(crate) enum Haggled {
    /// The client ended the session cleanly (`NBD_OPT_ABORT` or EOF between messages).
    Abort,
    Transmit(Negotiated),
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next, then haggling again.
    StartTls,
}

/// Sends the greeting and reads the client's flags; returns whether the client asked for no
/// zero padding, or `None` if it closed.
pub(crate) async fn greet<R, W>(r: &mut R, w: &mut W) -> Result<Option<bool>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting[16..]
        .copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting).await?;
    w.flush().await?;

    let mut flags = [0u8; 4];
    if !read_exact_or_eof(r, &mut flags).await? {
        debug!("NBD client closed before sending its flags");
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & !proto::KNOWN_CLIENT_FLAGS != 0 {
        warn!(
            client_flags,
            "NBD client sent unknown handshake flags; disconnecting"
        );
        return Err(NbdError::UnknownClientFlags(client_flags));
    }
    if client_flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
        debug!("NBD client did not set FIXED_NEWSTYLE; serving it anyway");
    }
    Ok(Some(client_flags & proto::FLAG_C_NO_ZEROES != 0))
}

/// Answers options until the client picks an export, aborts, starts TLS or misbehaves.
/// `in_tls`: the connection runs inside TLS already. Replies are flushed before this returns.
pub(crate) async fn haggle<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &dyn Exports,
    cfg: &ServerConfig,
    no_zeroes: bool,
    in_tls: bool,
) -> Result<Haggled, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut header = [0u8; 16];
        if !read_exact_or_eof(r, &mut header).await? {
            debug!("NBD client closed during option haggling");
            return Ok(Haggled::Abort);
        }
        let magic = u64::from_be_bytes(header[..8].try_into().unwrap_or_default());
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(header[12..].try_into().unwrap_or_default());
        if magic != proto::IHAVEOPT {
            warn!(magic, "bad NBD option magic; disconnecting");
            return Err(NbdError::BadMagic {
                what: "option",
                got: magic,
            });
        }
        if len > proto::MAX_OPTION_DATA {
            if option == proto::OPT_EXPORT_NAME {
                warn!(len, "NBD_OPT_EXPORT_NAME too long; disconnecting");
                return Err(NbdError::OptionTooLarge { option, len });
            }
            debug!(option, len, "NBD option data too long; skipping it");
            skip(r, u64::from(len)).await?;
            reply(w, option, proto::REP_ERR_TOO_BIG, b"option data too long").await?;
            w.flush().await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        let tls_first = cfg.tls.is_some() && !in_tls;
        let step = if tls_first && option != proto::OPT_STARTTLS && option != proto::OPT_ABORT {
            if option == proto::OPT_EXPORT_NAME {
                warn!("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server; disconnecting");
                return Err(NbdError::TlsRequired("NBD_OPT_EXPORT_NAME before STARTTLS"));
            }
            reply(
                w,
                option,
                proto::REP_ERR_TLS_REQD,
                b"this server requires TLS: send NBD_OPT_STARTTLS first",
            )
            .await?;
            Step::Continue
        } else {
            answer(w, option, &data, exports, cfg, no_zeroes, in_tls).await?
        };
        match step {
            Step::Continue => w.flush().await?,
            Step::Abort => {
                // The client may already be gone; it does not have to wait for the ACK.
                let _ = w.flush().await;
                return Ok(Haggled::Abort);
            }
            Step::Transmit(negotiated) => {
                w.flush().await?;
                return Ok(Haggled::Transmit(negotiated));
            }
            Step::StartTls => {
                w.flush().await?;
                return Ok(Haggled::StartTls);
            }
        }
    }
}

/// Answers one option whose data has been read.
async fn answer<W>(
    w: &mut W,
    option: u32,
    data: &[u8],
    exports: &dyn Exports,
    cfg: &ServerConfig,
    no_zeroes: bool,
    in_tls: bool,
) -> Result<Step, NbdError>
where
    W: AsyncWrite + Unpin,
{
    match option {
        proto::OPT_EXPORT_NAME => {
            let name = std::str::from_utf8(data).map_err(|_| {
                warn!("NBD_OPT_EXPORT_NAME with a non-UTF-8 name; disconnecting");
                NbdError::InvalidExportName
            })?;
            let Some(export) = exports.get(name) else {
                warn!(
                    name,
                    "NBD_OPT_EXPORT_NAME for an unknown export; disconnecting"
                );
                return Err(NbdError::UnknownExport(name.to_owned()));
            };
            let mut msg = Vec::with_capacity(10 + proto::EXPORT_NAME_PADDING);
            msg.extend_from_slice(&export.size().to_be_bytes());
            msg.extend_from_slice(&cfg.transmission_flags(&*export).to_be_bytes());
            if !no_zeroes {
                msg.resize(msg.len() + proto::EXPORT_NAME_PADDING, 0);
            }
            w.write_all(&msg).await?;
            Ok(Step::Transmit(Negotiated {
                name: name.to_owned(),
                export,
            }))
        }
        proto::OPT_ABORT => {
            let _ = reply(w, option, proto::REP_ACK, &[]).await;
            Ok(Step::Abort)
        }
        proto::OPT_LIST => {
            if !data.is_empty() {
                reply(
                    w,
                    option,
                    proto::REP_ERR_INVALID,
                    b"NBD_OPT_LIST takes no data",
                )
                .await?;
                return Ok(Step::Continue);
            }
            for name in exports.list() {
                let description = exports
                    .get(&name)
                    .map(|e| e.description())
                    .unwrap_or_default();
                let mut msg = Vec::with_capacity(4 + name.len() + description.len());
                msg.extend_from_slice(&len_u32(name.len()).to_be_bytes());
                msg.extend_from_slice(name.as_bytes());
                msg.extend_from_slice(description.as_bytes());
                reply(w, option, proto::REP_SERVER, &msg).await?;
            }
            reply(w, option, proto::REP_ACK, &[]).await?;
            Ok(Step::Continue)
        }
        proto::OPT_STARTTLS => {
            let (kind, why): (u32, &[u8]) = if cfg.tls.is_none() {
                (
                    proto::REP_ERR_POLICY,
                    b"TLS is not configured on this server",
                )
            } else if in_tls {
                (proto::REP_ERR_INVALID, b"TLS is already active")
            } else if !data.is_empty() {
                (proto::REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            } else {
                reply(w, option, proto::REP_ACK, &[]).await?;
                return Ok(Step::StartTls);
            };
            reply(w, option, kind, why).await?;
            Ok(Step::Continue)
        }
        proto::OPT_INFO | proto::OPT_GO => info_or_go(w, option, data, exports, cfg).await,
        _ => {
            debug!(option, "unsupported NBD option");
            reply(w, option, proto::REP_ERR_UNSUP, b"option not supported").await?;
            Ok(Step::Continue)
        }
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`.
async fn info_or_go<W>(
    w: &mut W,
    option: u32,
    data: &[u8],
    exports: &dyn Exports,
    cfg: &ServerConfig,
) -> Result<Step, NbdError>
where
    W: AsyncWrite + Unpin,
{
    let Some((name, requests)) = parse_info_request(data) else {
        reply(
            w,
            option,
            proto::REP_ERR_INVALID,
            b"malformed NBD_OPT_INFO/GO data",
        )
        .await?;
        return Ok(Step::Continue);
    };
    let Ok(name) = std::str::from_utf8(name) else {
        reply(
            w,
            option,
            proto::REP_ERR_INVALID,
            b"export name is not UTF-8",
        )
        .await?;
        return Ok(Step::Continue);
    };
    let Some(export) = exports.get(name) else {
        debug!(name, "NBD client asked for an unknown export");
        reply(w, option, proto::REP_ERR_UNKNOWN, b"unknown export").await?;
        return Ok(Step::Continue);
    };

    let mut info = Vec::with_capacity(14);
    info.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size().to_be_bytes());
    info.extend_from_slice(&cfg.transmission_flags(&*export).to_be_bytes());
    reply(w, option, proto::REP_INFO, &info).await?;

    if requests.contains(&proto::INFO_NAME) {
        let mut info = proto::INFO_NAME.to_be_bytes().to_vec();
        info.extend_from_slice(name.as_bytes());
        reply(w, option, proto::REP_INFO, &info).await?;
    }
    if requests.contains(&proto::INFO_DESCRIPTION) {
        let mut info = proto::INFO_DESCRIPTION.to_be_bytes().to_vec();
        info.extend_from_slice(export.description().as_bytes());
        reply(w, option, proto::REP_INFO, &info).await?;
    }
    let (min, preferred, max) = cfg.block_sizes();
    let mut info = Vec::with_capacity(14);
    info.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        info.extend_from_slice(&v.to_be_bytes());
    }
    reply(w, option, proto::REP_INFO, &info).await?;
    reply(w, option, proto::REP_ACK, &[]).await?;

    if option == proto::OPT_GO {
        Ok(Step::Transmit(Negotiated {
            name: name.to_owned(),
            export,
        }))
    } else {
        Ok(Step::Continue)
    }
}

/// Splits `NBD_OPT_INFO`/`NBD_OPT_GO` data into the export name and the information requests:
/// u32 name length, name, u16 count, count x u16. Any length mismatch gives `None`.
pub(crate) fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let (name_len, rest) = data.split_first_chunk::<4>()?;
    let name_len = usize::try_from(u32::from_be_bytes(*name_len)).ok()?;
    if name_len > rest.len() {
        return None;
    }
    let (name, rest) = rest.split_at(name_len);
    let (count, rest) = rest.split_first_chunk::<2>()?;
    let count = usize::from(u16::from_be_bytes(*count));
    if rest.len() != count * 2 {
        return None;
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, requests))
}

/// Sends one option reply: magic, option, reply type, length, data.
async fn reply<W>(w: &mut W, option: u32, reply_type: u32, data: &[u8]) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut header = [0u8; 20];
    header[..8].copy_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
    header[8..12].copy_from_slice(&option.to_be_bytes());
    header[12..16].copy_from_slice(&reply_type.to_be_bytes());
    header[16..].copy_from_slice(&len_u32(data.len()).to_be_bytes());
    w.write_all(&header).await?;
    w.write_all(data).await
}

/// Length of a reply field; every reply built here is far below 4 GiB (option data and export
/// names are bounded), so saturation never actually happens.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &[u8], requests: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn parses_valid_info_requests() {
        let d = info_data(b"disk", &[proto::INFO_NAME, proto::INFO_BLOCK_SIZE]);
        let (name, reqs) = parse_info_request(&d).unwrap();
        assert_eq!(name, b"disk");
        assert_eq!(reqs, vec![proto::INFO_NAME, proto::INFO_BLOCK_SIZE]);
        let d = info_data(b"", &[]);
        assert_eq!(parse_info_request(&d).unwrap(), (&b""[..], vec![]));
    }

    #[test]
    fn rejects_malformed_info_requests() {
        assert!(parse_info_request(&[]).is_none());
        assert!(parse_info_request(&[0, 0, 0, 0, 0]).is_none());
        // Name length beyond the data.
        assert!(parse_info_request(&[0, 0, 0, 9, b'a', 0, 0]).is_none());
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_none());
        // Count says 2 requests but only one is present, or trailing garbage.
        let mut d = info_data(b"x", &[1]);
        d[6] = 2;
        assert!(parse_info_request(&d).is_none());
        let mut d = info_data(b"x", &[1]);
        d.push(0);
        assert!(parse_info_request(&d).is_none());
    }
}
