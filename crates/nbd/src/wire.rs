//! Small helpers for reading protocol messages from an async stream.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Fills `buf` completely. Returns `Ok(false)` if the stream ended before the first byte (a
/// clean end at a message boundary) and an `UnexpectedEof` error if it ended in the middle.
pub(crate) async fn read_exact_or_eof<R>(r: &mut R, buf: &mut [u8]) -> io::Result<bool>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(true)
}

/// Reads and discards exactly `len` bytes without buffering them all.
pub(crate) async fn skip<R>(r: &mut R, len: u64) -> io::Result<()>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let copied = tokio::io::copy(
        &mut AsyncReadExt::take(&mut *r, len),
        &mut tokio::io::sink(),
    )
    .await?;
    if copied != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eof_at_boundary_is_clean() {
        let mut empty: &[u8] = &[];
        let mut buf = [0u8; 4];
        assert!(!read_exact_or_eof(&mut empty, &mut buf).await.unwrap());
        let mut short: &[u8] = &[1, 2];
        let err = read_exact_or_eof(&mut short, &mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut full: &[u8] = &[1, 2, 3, 4, 5];
        assert!(read_exact_or_eof(&mut full, &mut buf).await.unwrap());
        assert_eq!(buf, [1, 2, 3, 4]);
        assert_eq!(full, &[5]);
    }

    #[tokio::test]
    async fn skip_consumes_exactly() {
        let data = vec![7u8; 100_000];
        let mut r: &[u8] = &data;
        skip(&mut r, 99_999).await.unwrap();
        assert_eq!(r.len(), 1);
        let err = skip(&mut r, 2).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
