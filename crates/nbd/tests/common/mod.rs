//! Shared test helpers: an in-memory [`Export`] and a scripted raw-protocol client.

#![allow(dead_code)]

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mars_nbd::{proto, serve, Export, Exports, NbdError, ServerConfig, StaticExports};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

/// One call the server made into a [`MemExport`] (reads are not logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Flush,
}

/// A RAM disk. Reads at `slow_offset` take `slow_delay`; any call touching `fail_offset` fails
/// with `fail_errno`; any call touching `panic_offset` panics.
pub struct MemExport {
    pub data: Mutex<Vec<u8>>,
    pub read_only: bool,
    pub description: String,
    pub ops: Mutex<Vec<Op>>,
    pub flushes: AtomicUsize,
    pub violations: AtomicUsize,
    pub slow_offset: Option<u64>,
    pub slow_delay: Duration,
    pub fail_offset: Option<(u64, i32)>,
    pub panic_offset: Option<u64>,
}

impl MemExport {
    pub fn new(size: usize) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            read_only: false,
            description: String::new(),
            ops: Mutex::new(Vec::new()),
            flushes: AtomicUsize::new(0),
            violations: AtomicUsize::new(0),
            slow_offset: None,
            slow_delay: Duration::from_millis(300),
            fail_offset: None,
            panic_offset: None,
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    fn check(&self, offset: u64) -> io::Result<()> {
        if self.panic_offset == Some(offset) {
            panic!("MemExport: injected panic at {offset}");
        }
        match self.fail_offset {
            Some((o, errno)) if o == offset => Err(io::Error::from_raw_os_error(errno)),
            _ => Ok(()),
        }
    }

    /// The byte range of a request; counts a violation (instead of panicking, which the
    /// server would turn into EIO) if the server passed a range it should have refused.
    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let size = self.data.lock().unwrap().len() as u64;
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            self.violations.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::other("server passed a bad range"));
        }
        Ok(offset as usize..(offset + len) as usize)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            self.violations.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::other("server wrote to a read-only export"));
        }
        Ok(())
    }

    pub fn violations(&self) -> usize {
        self.violations.load(Ordering::SeqCst)
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset)?;
        if self.slow_offset == Some(offset) {
            std::thread::sleep(self.slow_delay);
        }
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.check(offset)?;
        self.check_writable()?;
        let r = self.range(offset, data.len() as u64)?;
        self.data.lock().unwrap()[r].copy_from_slice(&data);
        self.ops.lock().unwrap().push(Op::Write {
            offset,
            len: data.len() as u64,
            fua,
        });
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.check(offset)?;
        self.check_writable()?;
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        self.ops.lock().unwrap().push(Op::WriteZeroes {
            offset,
            len,
            may_trim,
            fua,
        });
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check(offset)?;
        self.check_writable()?;
        let r = self.range(offset, len)?;
        // A trimmed range reads back as zeroes here (allowed: contents are unspecified).
        self.data.lock().unwrap()[r].fill(0);
        self.ops.lock().unwrap().push(Op::Trim { offset, len, fua });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.ops.lock().unwrap().push(Op::Flush);
        Ok(())
    }
}

/// Exports "disk" (1 MiB, read-write, described) and "ro" (64 KiB, read-only).
pub fn default_exports() -> (Arc<MemExport>, Arc<MemExport>, Arc<dyn Exports>) {
    let mut disk = MemExport::new(1 << 20);
    disk.description = "test disk".into();
    let disk = Arc::new(disk);
    let mut ro = MemExport::new(64 << 10);
    ro.read_only = true;
    let ro = Arc::new(ro);
    let exports = StaticExports::new()
        .with("disk", disk.clone())
        .with("ro", ro.clone());
    (disk, ro, Arc::new(exports))
}

/// Starts `serve` on one end of an in-memory pipe; returns the client end.
pub fn spawn_server(
    exports: Arc<dyn Exports>,
    cfg: ServerConfig,
) -> (Client, JoinHandle<Result<(), NbdError>>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let handle = tokio::spawn(serve(server, exports, Arc::new(cfg)));
    (Client { s: client }, handle)
}

/// Waits (bounded) for the server task and returns its result.
pub async fn finish(handle: JoinHandle<Result<(), NbdError>>) -> Result<(), NbdError> {
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("server did not finish in time")
        .expect("server task panicked")
}

/// An option reply: (option, reply type, data).
pub type OptReply = (u32, u32, Vec<u8>);

/// A simple reply header: (error, cookie).
pub type SimpleReply = (u32, u64);

/// A raw NBD client speaking bytes over the pipe.
pub struct Client {
    pub s: DuplexStream,
}

impl Client {
    pub async fn read_greeting(&mut self) {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).await.unwrap();
        assert_eq!(
            u64::from_be_bytes(g[..8].try_into().unwrap()),
            proto::NBDMAGIC
        );
        assert_eq!(
            u64::from_be_bytes(g[8..16].try_into().unwrap()),
            proto::IHAVEOPT
        );
        assert_eq!(
            u16::from_be_bytes(g[16..].try_into().unwrap()),
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
        );
    }

    /// Greeting plus client flags.
    pub async fn start(&mut self, flags: u32) {
        self.read_greeting().await;
        self.s.write_all(&flags.to_be_bytes()).await.unwrap();
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        self.send_option_header(option, data.len() as u32).await;
        self.s.write_all(data).await.unwrap();
    }

    pub async fn send_option_header(&mut self, option: u32, len: u32) {
        let mut h = proto::IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&option.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&h).await.unwrap();
    }

    pub async fn read_option_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            proto::OPT_REPLY_MAGIC
        );
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (option, kind, data)
    }

    /// Reads option replies up to and including the final (non-INFO, non-SERVER) one.
    pub async fn read_option_replies(&mut self) -> Vec<OptReply> {
        let mut all = Vec::new();
        loop {
            let r = self.read_option_reply().await;
            let last = r.1 != proto::REP_INFO && r.1 != proto::REP_SERVER;
            all.push(r);
            if last {
                return all;
            }
        }
    }

    /// Sends NBD_OPT_GO/INFO for `name` with the given info requests and returns the replies.
    pub async fn info_or_go(&mut self, option: u32, name: &str, requests: &[u16]) -> Vec<OptReply> {
        self.send_option(option, &info_data(name, requests)).await;
        self.read_option_replies().await
    }

    /// Complete handshake with GO for `name`; panics unless it succeeds.
    pub async fn handshake_go(&mut self, name: &str) {
        self.start(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
            .await;
        let replies = self.info_or_go(proto::OPT_GO, name, &[]).await;
        assert_eq!(replies.last().unwrap().1, proto::REP_ACK, "{replies:?}");
    }

    pub async fn send_request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) {
        self.s
            .write_all(&request(flags, kind, cookie, offset, len))
            .await
            .unwrap();
    }

    pub async fn read_reply(&mut self) -> SimpleReply {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            proto::SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..].try_into().unwrap()),
        )
    }

    pub async fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).await.unwrap();
        d
    }

    pub async fn write(
        &mut self,
        flags: u16,
        cookie: u64,
        offset: u64,
        data: &[u8],
    ) -> SimpleReply {
        self.send_request(flags, proto::CMD_WRITE, cookie, offset, data.len() as u32)
            .await;
        self.s.write_all(data).await.unwrap();
        self.read_reply().await
    }

    /// READ; returns (error, data) where data is empty on error.
    pub async fn read(&mut self, cookie: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.send_request(0, proto::CMD_READ, cookie, offset, len)
            .await;
        let (err, c) = self.read_reply().await;
        assert_eq!(c, cookie);
        if err != 0 {
            return (err, Vec::new());
        }
        (0, self.read_data(len as usize).await)
    }

    /// Any payload-less command; returns the error value.
    pub async fn command(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> u32 {
        self.send_request(flags, kind, cookie, offset, len).await;
        let (err, c) = self.read_reply().await;
        assert_eq!(c, cookie);
        err
    }

    pub async fn disconnect(&mut self) {
        self.send_request(0, proto::CMD_DISC, 0, 0, 0).await;
    }

    /// Reads until EOF and returns what was left.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), self.s.read_to_end(&mut rest))
            .await
            .expect("server did not close the stream")
            .unwrap();
        rest
    }
}

/// NBD_OPT_INFO/GO data.
pub fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// A 28-byte request header.
pub fn request(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut h = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}
