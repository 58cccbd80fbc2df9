//! Errors that end a connection, and the mapping of export I/O errors to NBD error values.

use std::io;

use crate::proto;

/// Why [`serve`](crate::serve) ended a connection with an error.
///
/// Errors of single requests (a failed read, an out-of-range write, ...) are answered on the
/// wire and never end up here; these are the conditions after which the stream cannot be
/// trusted any more.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// TLS is required and the client asked for an export without it (`NBD_OPT_EXPORT_NAME`
    /// cannot be answered with an error), or sent bytes before the TLS handshake it asked for.
    #[error("NBD client without TLS: {0}")]
    TlsRequired(&'static str),
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed.
    #[error("NBD TLS handshake: {0}")]
    Tls(io::Error),
    /// Reading from or writing to the client failed, including an EOF in the middle of a
    /// message.
    #[error("NBD connection I/O error: {0}")]
    Io(#[from] io::Error),
    /// The client sent a wrong magic number (option or request header).
    #[error("bad {what} magic from client: {got:#x}")]
    BadMagic {
        /// Which magic was expected (`"option"` or `"request"`).
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// The client set handshake flags this server does not know.
    #[error("client sent unknown handshake flags {0:#010x}")]
    UnknownClientFlags(u32),
    /// `NBD_OPT_EXPORT_NAME` carried more data than [`proto::MAX_OPTION_DATA`]; that option
    /// cannot be answered with an error, so the connection is closed.
    #[error("option {option} carries {len} bytes of data, more than allowed")]
    OptionTooLarge {
        /// The option number.
        option: u32,
        /// The announced data length.
        len: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (the protocol requires
    /// closing the connection).
    #[error("client requested unknown export {0:?}")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` named an export with a name that is not UTF-8.
    #[error("client requested an export whose name is not valid UTF-8")]
    InvalidExportName,
    /// A `NBD_CMD_WRITE` announced a payload larger than the maximum payload size; the payload
    /// is not read, so the stream is out of sync and the connection is closed.
    #[error("write payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// The announced payload length.
        len: u32,
        /// The configured maximum.
        max: u32,
    },
    /// The client did not finish the handshake within
    /// [`ServerConfig::handshake_timeout`](crate::ServerConfig::handshake_timeout).
    #[error("NBD handshake timed out")]
    HandshakeTimeout,
}

/// Maps an error returned by an [`Export`](crate::Export) to the NBD error value sent to the
/// client.
///
/// The OS error number is used when it is one the protocol allows (`EPERM`, `EIO`, `ENOMEM`,
/// `EINVAL`, `ENOSPC`, `EOVERFLOW`, `ENOTSUP`, `ESHUTDOWN`); `EDQUOT` and `EFBIG` become
/// `ENOSPC` and `EROFS` becomes `EPERM` as the specification recommends. Errors without an OS
/// error number are mapped by [`io::ErrorKind`]. Everything else becomes `EIO`.
pub fn nbd_errno(err: &io::Error) -> u32 {
    if let Some(raw) = err.raw_os_error() {
        return match raw {
            libc::EPERM | libc::EROFS => proto::EPERM,
            libc::EIO => proto::EIO,
            libc::ENOMEM => proto::ENOMEM,
            libc::EINVAL => proto::EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => proto::ENOSPC,
            libc::EOVERFLOW => proto::EOVERFLOW,
            libc::ENOTSUP => proto::ENOTSUP,
            libc::ESHUTDOWN => proto::ESHUTDOWN,
            _ => proto::EIO,
        };
    }
    match err.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => proto::EPERM,
        io::ErrorKind::OutOfMemory => proto::ENOMEM,
        io::ErrorKind::InvalidInput => proto::EINVAL,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            proto::ENOSPC
        }
        io::ErrorKind::Unsupported => proto::ENOTSUP,
        _ => proto::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_map_to_nbd_values() {
        let cases = [
            (libc::EPERM, proto::EPERM),
            (libc::EIO, proto::EIO),
            (libc::ENOMEM, proto::ENOMEM),
            (libc::EINVAL, proto::EINVAL),
            (libc::ENOSPC, proto::ENOSPC),
            (libc::EOVERFLOW, proto::EOVERFLOW),
            (libc::ENOTSUP, proto::ENOTSUP),
            (libc::ESHUTDOWN, proto::ESHUTDOWN),
            (libc::EDQUOT, proto::ENOSPC),
            (libc::EFBIG, proto::ENOSPC),
            (libc::EROFS, proto::EPERM),
            (libc::EBADF, proto::EIO),
            (libc::ENOENT, proto::EIO),
        ];
        for (os, nbd) in cases {
            assert_eq!(
                nbd_errno(&io::Error::from_raw_os_error(os)),
                nbd,
                "errno {os}"
            );
        }
    }

    #[test]
    fn error_kinds_map_to_nbd_values() {
        assert_eq!(nbd_errno(&io::Error::other("x")), proto::EIO);
        assert_eq!(
            nbd_errno(&io::ErrorKind::InvalidInput.into()),
            proto::EINVAL
        );
        assert_eq!(
            nbd_errno(&io::ErrorKind::PermissionDenied.into()),
            proto::EPERM
        );
        assert_eq!(
            nbd_errno(&io::ErrorKind::Unsupported.into()),
            proto::ENOTSUP
        );
        assert_eq!(nbd_errno(&io::ErrorKind::StorageFull.into()), proto::ENOSPC);
        assert_eq!(nbd_errno(&io::ErrorKind::UnexpectedEof.into()), proto::EIO);
    }
}
