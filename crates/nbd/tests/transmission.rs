//! Transmission phase against scripted byte streams: commands, range checks, flags, error
//! mapping, concurrency and disconnects.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{default_exports, finish, request, spawn_server, MemExport, Op};
use mars_nbd::{proto, Exports, NbdError, ServerConfig, StaticExports};
use tokio::io::AsyncWriteExt;

const MIB: u64 = 1 << 20;

fn single(export: MemExport) -> (Arc<MemExport>, Arc<dyn Exports>) {
    let export = Arc::new(export);
    (
        export.clone(),
        Arc::new(StaticExports::new().with("disk", export)),
    )
}

#[tokio::test]
async fn write_read_flush_roundtrip() {
    let (disk, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.write(0, 11, 4096, &data).await, (0, 11));
    assert_eq!(c.write(proto::CMD_FLAG_FUA, 12, 0, b"fua!").await, (0, 12));
    assert_eq!(c.read(13, 4096, 8192).await, (0, data.clone()));
    assert_eq!(c.command(0, proto::CMD_FLUSH, 14, 0, 0).await, 0);
    // FUA on FLUSH is allowed (and ignored).
    assert_eq!(
        c.command(proto::CMD_FLAG_FUA, proto::CMD_FLUSH, 15, 0, 0)
            .await,
        0
    );
    c.disconnect().await;
    finish(server).await.unwrap();

    let mem = disk.snapshot();
    assert_eq!(&mem[4096..4096 + 8192], &data[..]);
    assert_eq!(&mem[..4], b"fua!");
    assert_eq!(
        disk.ops(),
        vec![
            Op::Write {
                offset: 4096,
                len: 8192,
                fua: false
            },
            Op::Write {
                offset: 0,
                len: 4,
                fua: true
            },
            Op::Flush,
            Op::Flush,
        ]
    );
}

#[tokio::test]
async fn write_zeroes_and_trim_pass_flags() {
    let (disk, _, exports) = default_exports();
    disk.data.lock().unwrap().fill(0xee);
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    let wz = proto::CMD_WRITE_ZEROES;
    assert_eq!(c.command(0, wz, 1, 0, 100).await, 0);
    assert_eq!(c.command(proto::CMD_FLAG_NO_HOLE, wz, 2, 100, 100).await, 0);
    let all = proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FUA | proto::CMD_FLAG_FAST_ZERO;
    assert_eq!(c.command(all, wz, 3, 200, 100).await, 0);
    assert_eq!(
        c.command(proto::CMD_FLAG_FAST_ZERO, wz, 4, 300, 100).await,
        0
    );
    assert_eq!(c.command(0, proto::CMD_TRIM, 5, 4096, 4096).await, 0);
    assert_eq!(
        c.command(proto::CMD_FLAG_FUA, proto::CMD_TRIM, 6, 8192, 4096)
            .await,
        0
    );
    assert_eq!(c.command(0, proto::CMD_CACHE, 7, 0, 4096).await, 0);
    c.disconnect().await;
    finish(server).await.unwrap();

    let mem = disk.snapshot();
    assert!(mem[..400].iter().all(|&b| b == 0));
    assert_eq!(mem[400], 0xee);
    assert_eq!(
        disk.ops(),
        vec![
            Op::WriteZeroes {
                offset: 0,
                len: 100,
                may_trim: true,
                fua: false
            },
            Op::WriteZeroes {
                offset: 100,
                len: 100,
                may_trim: false,
                fua: false
            },
            Op::WriteZeroes {
                offset: 200,
                len: 100,
                may_trim: false,
                fua: true
            },
            Op::WriteZeroes {
                offset: 300,
                len: 100,
                may_trim: true,
                fua: false
            },
            Op::Trim {
                offset: 4096,
                len: 4096,
                fua: false
            },
            Op::Trim {
                offset: 8192,
                len: 4096,
                fua: true
            },
        ]
    );
}

#[tokio::test]
async fn out_of_range_requests() {
    let (disk, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    // Reads and trims beyond the end: EINVAL; writes: ENOSPC.
    assert_eq!(c.read(1, MIB - 1, 2).await.0, proto::EINVAL);
    assert_eq!(c.read(2, MIB, 1).await.0, proto::EINVAL);
    assert_eq!(c.read(3, u64::MAX, 1).await.0, proto::EINVAL);
    assert_eq!(c.read(4, u64::MAX - 10, 4096).await.0, proto::EINVAL);
    assert_eq!(
        c.command(0, proto::CMD_TRIM, 5, MIB, 1).await,
        proto::EINVAL
    );
    assert_eq!(
        c.command(0, proto::CMD_CACHE, 6, u64::MAX, 2).await,
        proto::EINVAL
    );
    let wz = proto::CMD_WRITE_ZEROES;
    assert_eq!(c.command(0, wz, 7, MIB - 10, 11).await, proto::ENOSPC);
    assert_eq!(c.command(0, wz, 8, u64::MAX, u32::MAX).await, proto::ENOSPC);
    // The refused payload is consumed: the next request parses fine.
    assert_eq!(c.write(0, 9, MIB - 2, b"abc").await, (proto::ENOSPC, 9));
    assert_eq!(
        c.write(0, 10, u64::MAX - 1, b"abc").await,
        (proto::ENOSPC, 10)
    );
    // Exactly up to the end is fine.
    assert_eq!(c.write(0, 11, MIB - 3, b"end").await, (0, 11));
    assert_eq!(c.read(12, MIB - 3, 3).await, (0, b"end".to_vec()));
    c.disconnect().await;
    finish(server).await.unwrap();
    assert_eq!(disk.ops().len(), 1);
}

#[tokio::test]
async fn zero_length_requests_succeed() {
    let (disk, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    assert_eq!(c.read(1, 0, 0).await, (0, vec![]));
    assert_eq!(c.read(2, MIB, 0).await, (0, vec![]));
    assert_eq!(c.write(0, 3, 512, &[]).await, (0, 3));
    assert_eq!(c.command(0, proto::CMD_TRIM, 4, 0, 0).await, 0);
    assert_eq!(c.command(0, proto::CMD_WRITE_ZEROES, 5, MIB, 0).await, 0);
    assert_eq!(c.read(6, 0, 1).await, (0, vec![0]));
    c.disconnect().await;
    finish(server).await.unwrap();
    assert!(
        disk.ops().is_empty(),
        "zero-length requests never reach the export"
    );
}

#[tokio::test]
async fn read_only_export_refuses_writes() {
    let (ro, exports) = {
        let (_, ro, exports) = default_exports();
        (ro, exports)
    };
    ro.data.lock().unwrap()[..2].copy_from_slice(b"ro");
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("ro").await;
    assert_eq!(c.write(0, 1, 0, &[1; 4096]).await, (proto::EPERM, 1));
    assert_eq!(
        c.write(proto::CMD_FLAG_FUA, 2, 0, &[1; 10]).await,
        (proto::EPERM, 2)
    );
    assert_eq!(
        c.command(0, proto::CMD_TRIM, 3, 0, 4096).await,
        proto::EPERM
    );
    assert_eq!(
        c.command(0, proto::CMD_WRITE_ZEROES, 4, 0, 4096).await,
        proto::EPERM
    );
    assert_eq!(c.read(5, 0, 2).await, (0, b"ro".to_vec()));
    assert_eq!(c.command(0, proto::CMD_FLUSH, 6, 0, 0).await, 0);
    c.disconnect().await;
    finish(server).await.unwrap();
    assert_eq!(ro.ops(), vec![Op::Flush]);
}

#[tokio::test]
async fn unknown_commands_and_flags_are_einval() {
    let (disk, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    for kind in [proto::CMD_BLOCK_STATUS, 8, 100, u16::MAX] {
        assert_eq!(
            c.command(0, kind, u64::from(kind), 0, 4096).await,
            proto::EINVAL
        );
    }
    // DF without structured replies, NO_HOLE/FAST_ZERO outside WRITE_ZEROES, unknown bits.
    let bad_flags = [
        (proto::CMD_FLAG_DF, proto::CMD_READ, 20, 10),
        (proto::CMD_FLAG_NO_HOLE, proto::CMD_TRIM, 21, 10),
        (proto::CMD_FLAG_FAST_ZERO, proto::CMD_FLUSH, 22, 0),
        (1 << 9, proto::CMD_WRITE_ZEROES, 23, 10),
        (1 << 15, proto::CMD_CACHE, 24, 10),
    ];
    for (flags, kind, cookie, len) in bad_flags {
        assert_eq!(
            c.command(flags, kind, cookie, 0, len).await,
            proto::EINVAL,
            "flags {flags:#x} on command {kind}"
        );
    }
    // A WRITE with a bad flag: refused, payload consumed.
    assert_eq!(
        c.write(proto::CMD_FLAG_NO_HOLE, 25, 0, &[9; 100]).await,
        (proto::EINVAL, 25)
    );
    assert_eq!(c.read(26, 0, 100).await, (0, vec![0; 100]));
    c.disconnect().await;
    finish(server).await.unwrap();
    assert!(disk.ops().is_empty());
}

#[tokio::test]
async fn payload_limits() {
    let (_, _, exports) = default_exports();
    let cfg = ServerConfig {
        max_payload: 64 << 10,
        ..ServerConfig::default()
    };
    let (mut c, server) = spawn_server(exports, cfg);
    c.handshake_go("disk").await;
    assert_eq!(c.read(1, 0, 64 << 10).await.1.len(), 64 << 10);
    assert_eq!(c.read(2, 0, (64 << 10) + 1).await.0, proto::EINVAL);
    assert_eq!(c.read(3, 0, u32::MAX).await.0, proto::EINVAL);
    // Payload-less commands may exceed the maximum payload.
    assert_eq!(
        c.command(0, proto::CMD_WRITE_ZEROES, 4, 0, 1 << 20).await,
        0
    );
    assert_eq!(c.command(0, proto::CMD_TRIM, 5, 0, 1 << 20).await, 0);
    // An oversized WRITE cannot be skipped safely: disconnect without reading it.
    c.send_request(0, proto::CMD_WRITE, 6, 0, u32::MAX).await;
    assert!(c.read_to_end().await.is_empty());
    assert!(matches!(
        finish(server).await,
        Err(NbdError::PayloadTooLarge {
            len: u32::MAX,
            max: 65536
        })
    ));
}

#[tokio::test]
async fn export_errors_are_mapped() {
    let mut export = MemExport::new(1 << 20);
    export.fail_offset = Some((4096, libc::ENOSPC));
    let (_, exports) = single(export);
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    assert_eq!(c.read(1, 4096, 10).await.0, proto::ENOSPC);
    assert_eq!(c.write(0, 2, 4096, b"x").await, (proto::ENOSPC, 2));
    assert_eq!(
        c.write(proto::CMD_FLAG_FUA, 3, 4096, b"x").await,
        (proto::ENOSPC, 3)
    );
    assert_eq!(
        c.command(0, proto::CMD_TRIM, 4, 4096, 1).await,
        proto::ENOSPC
    );
    c.disconnect().await;
    finish(server).await.unwrap();

    let mut export = MemExport::new(1 << 20);
    export.fail_offset = Some((0, libc::EBADF));
    let (_, exports) = single(export);
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    assert_eq!(c.read(1, 0, 10).await.0, proto::EIO);
    c.disconnect().await;
    finish(server).await.unwrap();
}

#[tokio::test]
async fn panicking_export_gives_eio_and_the_connection_survives() {
    let mut export = MemExport::new(1 << 20);
    export.panic_offset = Some(512);
    let (_, exports) = single(export);
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    assert_eq!(c.read(1, 512, 10).await.0, proto::EIO);
    assert_eq!(c.write(0, 2, 512, b"inline").await, (proto::EIO, 2));
    assert_eq!(
        c.write(proto::CMD_FLAG_FUA, 3, 512, b"blocking").await,
        (proto::EIO, 3)
    );
    assert_eq!(c.read(4, 0, 10).await, (0, vec![0; 10]));
    c.disconnect().await;
    finish(server).await.unwrap();
}

/// Sends a slow READ (cookie 100, offset 0) and a fast one (cookie 200) and returns the cookies
/// in the order the replies came.
async fn reply_order_of_slow_then_fast_read(
    delay: Option<Duration>,
    cfg: ServerConfig,
) -> Vec<u64> {
    let mut export = MemExport::new(1 << 20);
    export.slow_offset = Some(0);
    if let Some(d) = delay {
        export.slow_delay = d;
    }
    let (_, exports) = single(export);
    let (mut c, server) = spawn_server(exports, cfg);
    c.handshake_go("disk").await;
    c.send_request(0, proto::CMD_READ, 100, 0, 512).await;
    c.send_request(0, proto::CMD_READ, 200, 4096, 512).await;
    let mut order = Vec::new();
    for _ in 0..2 {
        let (err, cookie) = c.read_reply().await;
        assert_eq!(err, 0);
        c.read_data(512).await;
        order.push(cookie);
    }
    c.disconnect().await;
    finish(server).await.unwrap();
    order
}

#[tokio::test]
async fn replies_complete_out_of_order() {
    let order = reply_order_of_slow_then_fast_read(None, ServerConfig::default()).await;
    assert_eq!(order, vec![200, 100]);
}

#[tokio::test]
async fn max_in_flight_one_serialises() {
    let cfg = ServerConfig {
        max_in_flight: 1,
        ..ServerConfig::default()
    };
    let order = reply_order_of_slow_then_fast_read(Some(Duration::from_millis(100)), cfg).await;
    assert_eq!(order, vec![100, 200]);
}

#[tokio::test]
async fn disc_waits_for_requests_in_flight() {
    let mut export = MemExport::new(1 << 20);
    export.slow_offset = Some(0);
    let (_, exports) = single(export);
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    let start = Instant::now();
    c.send_request(0, proto::CMD_READ, 100, 0, 512).await;
    c.disconnect().await;
    // Anything after DISC is not read.
    c.s.write_all(b"garbage after DISC").await.unwrap();
    let rest = c.read_to_end().await;
    assert_eq!(rest.len(), 16 + 512, "the slow read is still answered");
    assert!(start.elapsed() >= Duration::from_millis(250));
    finish(server).await.unwrap();
}

#[tokio::test]
async fn eof_waits_for_requests_in_flight() {
    let mut export = MemExport::new(1 << 20);
    export.slow_offset = Some(0);
    let (_, exports) = single(export);
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    c.send_request(0, proto::CMD_READ, 100, 0, 512).await;
    c.s.shutdown().await.unwrap();
    assert_eq!(c.read_to_end().await.len(), 16 + 512);
    finish(server).await.unwrap();
}

#[tokio::test]
async fn client_gone_mid_request_ends_with_error() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    // Header of a 4 KiB write, then only part of the payload.
    c.send_request(0, proto::CMD_WRITE, 1, 0, 4096).await;
    c.s.write_all(&[1; 100]).await.unwrap();
    drop(c);
    assert!(matches!(finish(server).await, Err(NbdError::Io(_))));

    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    c.s.write_all(&request(0, proto::CMD_READ, 1, 0, 1)[..20])
        .await
        .unwrap();
    drop(c);
    assert!(matches!(finish(server).await, Err(NbdError::Io(_))));
}

#[tokio::test]
async fn bad_request_magic_disconnects_after_answering_in_flight() {
    let mut export = MemExport::new(1 << 20);
    export.slow_offset = Some(0);
    let (_, exports) = single(export);
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.handshake_go("disk").await;
    c.send_request(0, proto::CMD_READ, 100, 0, 512).await;
    let mut bad = request(0, proto::CMD_READ, 1, 0, 1);
    bad[0] ^= 0xff;
    c.s.write_all(&bad).await.unwrap();
    assert_eq!(c.read_to_end().await.len(), 16 + 512);
    assert!(matches!(
        finish(server).await,
        Err(NbdError::BadMagic {
            what: "request",
            ..
        })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests() {
    let (disk, _, exports) = default_exports();
    let cfg = ServerConfig {
        max_in_flight: 8,
        ..ServerConfig::default()
    };
    let (c, server) = spawn_server(exports, cfg);
    let mut c = c;
    c.handshake_go("disk").await;
    let (mut rd, mut wr) = tokio::io::split(c.s);
    let sender = tokio::spawn(async move {
        for i in 0..256u64 {
            let block = vec![i as u8; 4096];
            let flags = if i % 3 == 0 { proto::CMD_FLAG_FUA } else { 0 };
            wr.write_all(&request(flags, proto::CMD_WRITE, i, i * 4096, 4096))
                .await
                .unwrap();
            wr.write_all(&block).await.unwrap();
        }
        wr.write_all(&request(0, proto::CMD_FLUSH, 1000, 0, 0))
            .await
            .unwrap();
        wr
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..257 {
        let mut h = [0u8; 16];
        tokio::io::AsyncReadExt::read_exact(&mut rd, &mut h)
            .await
            .unwrap();
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
        assert!(seen.insert(u64::from_be_bytes(h[8..].try_into().unwrap())));
    }
    let mut wr = sender.await.unwrap();
    wr.write_all(&request(0, proto::CMD_DISC, 0, 0, 0))
        .await
        .unwrap();
    finish(server).await.unwrap();
    let mem = disk.snapshot();
    for i in 0..256usize {
        assert!(mem[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8));
    }
}
