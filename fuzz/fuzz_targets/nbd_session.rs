//! Arbitrary bytes from an NBD client. `mars_nbd::serve` runs on one end of an in-memory duplex
//! stream with a 1 MiB in-memory export; the input is written to the other end, followed by EOF,
//! while everything the server sends is read and discarded. Nothing may panic, and the export
//! checks that the server only ever passes it ranges inside the device (its documented contract);
//! a violation aborts, which libFuzzer reports as a crash.
//!
//! If the first input byte is even, the rest of the input follows a valid fixed-newstyle
//! handshake (client flags FIXED_NEWSTYLE|NO_ZEROES, then NBD_OPT_GO for export "x"), so that the
//! fuzzer spends half its time in the transmission phase; if it is odd, the rest is sent as is.
#![no_main]

use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mars_nbd::{proto, serve, Export, Exports, ServerConfig, StaticExports};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

const SIZE: usize = 1 << 20;
/// Generous: an in-memory session ends within microseconds once the client's EOF arrives.
const LIMIT: Duration = Duration::from_secs(10);

struct MemExport {
    data: Mutex<Vec<u8>>,
}

impl MemExport {
    /// The range the server passes must be non-empty and inside the device.
    fn range(&self, offset: u64, len: u64, what: &str) -> std::ops::Range<usize> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= SIZE as u64 => offset as usize..end as usize,
            _ => {
                eprintln!(
                    "contract violation: {what} of {len} bytes at {offset} on a {SIZE}-byte export"
                );
                std::process::abort();
            }
        }
    }
    fn zero(&self, offset: u64, len: u64, what: &str) {
        let r = self.range(offset, len, what);
        self.data.lock().unwrap()[r].fill(0);
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len() as u64, "read");
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> io::Result<()> {
        let r = self.range(offset, data.len() as u64, "write");
        self.data.lock().unwrap()[r].copy_from_slice(&data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, _fua: bool) -> io::Result<()> {
        self.zero(offset, len, "write_zeroes");
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.zero(offset, len, "trim");
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// One runtime for the whole process: building one per input would dominate the run time.
fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Client flags, then NBD_OPT_GO for export "x" with no information requests.
fn handshake_prefix() -> Vec<u8> {
    let name = b"x";
    let mut go = Vec::new();
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&0u16.to_be_bytes());

    let mut v = Vec::new();
    v.extend_from_slice(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes());
    v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    v.extend_from_slice(&(go.len() as u32).to_be_bytes());
    v.extend_from_slice(&go);
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let input = if mode % 2 == 0 {
        let mut v = handshake_prefix();
        v.extend_from_slice(rest);
        v
    } else {
        rest.to_vec()
    };

    let export: Arc<dyn Export> = Arc::new(MemExport {
        data: Mutex::new(vec![0; SIZE]),
    });
    let exports: Arc<dyn Exports> = Arc::new(StaticExports::new().with("x", export));
    let cfg = Arc::new(ServerConfig::default());

    let rt = runtime();
    let outcome = rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let session = async {
            let _ = serve(server, exports, cfg).await;
        };
        let send = async {
            // The server may hang up early; a failed write is part of the game.
            let _ = to_server.write_all(&input).await;
            let _ = to_server.shutdown().await;
        };
        let drain = async {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = from_server.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::time::timeout(LIMIT, async { tokio::join!(session, send, drain) }).await
    });
    if outcome.is_err() {
        // Not a crash by itself (a loaded machine can be slow), but worth a look.
        eprintln!("nbd_session: session did not end within {LIMIT:?}");
    }
});
