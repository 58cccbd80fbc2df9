//! Property tests: arbitrary client input never panics the server or makes it hang.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{info_data, request, MemExport};
use mars_nbd::{proto, serve, Exports, NbdError, ServerConfig, StaticExports};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn exports() -> (Vec<Arc<MemExport>>, Arc<dyn Exports>) {
    let disk = Arc::new(MemExport::new(256 << 10));
    let mut ro = MemExport::new(4096);
    ro.read_only = true;
    let ro = Arc::new(ro);
    let exports = StaticExports::new()
        .with("disk", disk.clone())
        .with("ro", ro.clone());
    (vec![disk, ro], Arc::new(exports))
}

/// Feeds `input` to a fresh server, closes the client's sending side, drains everything the
/// server says, and returns the server's result. Panics if the server panicked or took longer
/// than 10 s, or passed the export a request it should have refused.
fn run(input: Vec<u8>) -> Result<(), NbdError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 << 10);
        let cfg = ServerConfig {
            max_payload: 128 << 10,
            max_in_flight: 4,
            ..ServerConfig::default()
        };
        let (mems, exports) = exports();
        let handle = tokio::spawn(serve(server, exports, Arc::new(cfg)));
        let (mut rd, mut wr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        });
        // The server may stop reading early (protocol violation): ignore write errors.
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
        let result = tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("serve did not return in time")
            .expect("serve panicked");
        drop(wr);
        tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .expect("stream not closed")
            .unwrap();
        for m in mems {
            assert_eq!(
                m.violations(),
                0,
                "the export got a request it should not have"
            );
        }
        result
    })
}

/// Client flags plus NBD_OPT_GO for "disk".
fn go_prefix(export: &str) -> Vec<u8> {
    let mut v = (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let data = info_data(export, &[proto::INFO_BLOCK_SIZE]);
    v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(&data);
    v
}

/// A well-framed option with arbitrary number and data.
fn option_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![0u32..12, any::<u32>()],
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
    )
        .prop_map(|(option, data, valid_len)| {
            let mut v = proto::IHAVEOPT.to_be_bytes().to_vec();
            v.extend_from_slice(&option.to_be_bytes());
            let len = if valid_len {
                data.len() as u32
            } else {
                data.len() as u32 * 7 + 1
            };
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(&data);
            v
        })
}

/// A request with a valid magic and arbitrary fields, plus an arbitrary tail (payload).
fn request_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(0u16), Just(proto::CMD_FLAG_FUA), any::<u16>()],
        prop_oneof![0u16..9, any::<u16>()],
        any::<u64>(),
        prop_oneof![0u64..(300 << 10), any::<u64>()],
        prop_oneof![0u32..8192, any::<u32>()],
        proptest::collection::vec(any::<u8>(), 0..256),
        any::<bool>(),
    )
        .prop_filter("DISC ends the stream early", |r| r.1 != proto::CMD_DISC)
        .prop_map(|(flags, kind, cookie, offset, len, tail, framed)| {
            let mut v = request(flags, kind, cookie, offset, len);
            if framed && len <= 8192 {
                // A correctly framed payload for WRITE, so later requests are parsed too.
                if kind == proto::CMD_WRITE {
                    v.resize(v.len() + len as usize, 0xab);
                }
            } else {
                v.extend_from_slice(&tail);
            }
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_during_handshake(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = run(input);
    }

    #[test]
    fn arbitrary_options(flags in prop_oneof![Just(3u32), any::<u32>()],
                         options in proptest::collection::vec(option_strategy(), 0..8)) {
        let mut input = flags.to_be_bytes().to_vec();
        for o in options {
            input.extend_from_slice(&o);
        }
        let _ = run(input);
    }

    #[test]
    fn arbitrary_bytes_after_go(export in prop_oneof![Just("disk"), Just("ro")],
                                tail in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut input = go_prefix(export);
        input.extend_from_slice(&tail);
        let _ = run(input);
    }

    #[test]
    fn arbitrary_requests_after_go(export in prop_oneof![Just("disk"), Just("ro")],
                                   requests in proptest::collection::vec(request_strategy(), 0..16)) {
        let mut input = go_prefix(export);
        for r in requests {
            input.extend_from_slice(&r);
        }
        let _ = run(input);
    }
}

#[test]
fn valid_session_ends_cleanly() {
    let mut input = go_prefix("disk");
    input.extend_from_slice(&request(0, proto::CMD_WRITE, 1, 0, 4));
    input.extend_from_slice(b"abcd");
    input.extend_from_slice(&request(0, proto::CMD_READ, 2, 0, 4));
    input.extend_from_slice(&request(0, proto::CMD_DISC, 3, 0, 0));
    run(input).unwrap();
}

/// A client that sends READs and never reads the replies: the server holds at most the
/// connection's byte budget of reply data (not one buffer per request), stops reading further
/// requests meanwhile, and ends the connection once a reply could not be written within the
/// reply timeout, giving the budget back.
#[test]
fn a_client_that_never_reads_replies_holds_only_its_budget() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A tiny pipe: the replies do not fit it.
        let (client, server) = tokio::io::duplex(64 << 10);
        let cfg = ServerConfig {
            max_payload: 128 << 10,
            max_in_flight: 64,
            max_in_flight_bytes: 512 << 10,
            reply_timeout: Duration::from_millis(500),
            ..ServerConfig::default()
        };
        let total = cfg.total_in_flight.clone();
        let (_mems, exports) = exports();
        let handle = tokio::spawn(serve(server, exports, Arc::new(cfg)));
        let (mut rd, mut wr) = tokio::io::split(client);
        // Only the handshake's answer is read, then nothing.
        let mut input = go_prefix("disk");
        for cookie in 0..64u64 {
            input.extend(request(0, proto::CMD_READ, cookie, 0, 128 << 10));
        }
        let mut hs = vec![0u8; 512];
        let n = rd.read(&mut hs).await.unwrap();
        assert!(n > 0);
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            wr
        });
        // While the client does not read, no more than its budget is taken.
        let mut lowest = total.size();
        for _ in 0..20 {
            lowest = lowest.min(total.available());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            total.size() - lowest <= 512 << 10,
            "{} bytes in flight for one connection",
            total.size() - lowest
        );
        // The stalled writer ends the connection; the budget comes back.
        let r = tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("the server ended the connection")
            .expect("no panic");
        assert!(r.is_err(), "a stalled client is an error: {r:?}");
        assert_eq!(total.available(), total.size());
        drop(writer);
    });
}
