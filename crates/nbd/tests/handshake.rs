//! Handshake and option haggling against scripted byte streams.

mod common;

use std::time::Duration;

use common::{default_exports, finish, info_data, spawn_server};
use mars_nbd::{proto, NbdError, ServerConfig};
use tokio::io::AsyncWriteExt;

const BOTH: u32 = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;

fn rw_flags() -> u16 {
    proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_FUA
        | proto::TFLAG_SEND_TRIM
        | proto::TFLAG_SEND_WRITE_ZEROES
        | proto::TFLAG_SEND_FAST_ZERO
        | proto::TFLAG_CAN_MULTI_CONN
}

/// Finds the NBD_REP_INFO of `info` type and returns its payload (after the type).
fn info(replies: &[common::OptReply], info: u16) -> Option<Vec<u8>> {
    replies
        .iter()
        .filter(|r| r.1 == proto::REP_INFO)
        .find(|r| u16::from_be_bytes([r.2[0], r.2[1]]) == info)
        .map(|r| r.2[2..].to_vec())
}

/// Checks a successful INFO/GO reply sequence for the 1 MiB "disk" export.
fn check_disk_info(replies: &[common::OptReply], option: u32) {
    assert!(replies.iter().all(|r| r.0 == option));
    assert_eq!(replies.last().unwrap().1, proto::REP_ACK);
    assert!(replies.last().unwrap().2.is_empty());
    let export = info(replies, proto::INFO_EXPORT).expect("NBD_INFO_EXPORT");
    assert_eq!(export.len(), 10);
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 1 << 20);
    assert_eq!(
        u16::from_be_bytes(export[8..].try_into().unwrap()),
        rw_flags()
    );
    let bs = info(replies, proto::INFO_BLOCK_SIZE).expect("NBD_INFO_BLOCK_SIZE");
    let words: Vec<u32> = bs
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(words, vec![1, 4096, 32 << 20]);
}

#[tokio::test]
async fn go_enters_transmission() {
    let (disk, _, exports) = default_exports();
    disk.data.lock().unwrap()[..4].copy_from_slice(b"abcd");
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    let replies = c
        .info_or_go(
            proto::OPT_GO,
            "disk",
            &[
                proto::INFO_NAME,
                proto::INFO_DESCRIPTION,
                proto::INFO_BLOCK_SIZE,
                0x7777,
            ],
        )
        .await;
    check_disk_info(&replies, proto::OPT_GO);
    assert_eq!(info(&replies, proto::INFO_NAME).unwrap(), b"disk");
    assert_eq!(
        info(&replies, proto::INFO_DESCRIPTION).unwrap(),
        b"test disk"
    );

    assert_eq!(c.read(7, 0, 4).await, (0, b"abcd".to_vec()));
    c.disconnect().await;
    assert!(c.read_to_end().await.is_empty());
    finish(server).await.unwrap();
}

#[tokio::test]
async fn go_without_requests_still_sends_export_and_block_size() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    let replies = c.info_or_go(proto::OPT_GO, "disk", &[]).await;
    check_disk_info(&replies, proto::OPT_GO);
    assert!(info(&replies, proto::INFO_NAME).is_none());
    drop(c);
    finish(server).await.unwrap();
}

#[tokio::test]
async fn info_then_go() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    let info_replies = c
        .info_or_go(proto::OPT_INFO, "disk", &[proto::INFO_BLOCK_SIZE])
        .await;
    check_disk_info(&info_replies, proto::OPT_INFO);
    // Still haggling: another option is answered.
    let replies = c
        .info_or_go(proto::OPT_GO, "disk", &[proto::INFO_BLOCK_SIZE])
        .await;
    check_disk_info(&replies, proto::OPT_GO);
    assert_eq!(c.command(0, proto::CMD_FLUSH, 1, 0, 0).await, 0);
    c.disconnect().await;
    finish(server).await.unwrap();
}

#[tokio::test]
async fn read_only_export_announces_read_only() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    let replies = c.info_or_go(proto::OPT_INFO, "ro", &[]).await;
    let export = info(&replies, proto::INFO_EXPORT).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().unwrap()),
        64 << 10
    );
    let flags = u16::from_be_bytes(export[8..].try_into().unwrap());
    assert_eq!(flags, rw_flags() | proto::TFLAG_READ_ONLY);
    drop(c);
    finish(server).await.unwrap();
}

#[tokio::test]
async fn multi_conn_follows_config() {
    let (_, _, exports) = default_exports();
    let cfg = ServerConfig {
        multi_conn: false,
        ..ServerConfig::default()
    };
    let (mut c, server) = spawn_server(exports, cfg);
    c.start(BOTH).await;
    let replies = c.info_or_go(proto::OPT_INFO, "disk", &[]).await;
    let export = info(&replies, proto::INFO_EXPORT).unwrap();
    let flags = u16::from_be_bytes(export[8..].try_into().unwrap());
    assert_eq!(flags, rw_flags() & !proto::TFLAG_CAN_MULTI_CONN);
    drop(c);
    finish(server).await.unwrap();
}

#[tokio::test]
async fn list_exports() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    c.send_option(proto::OPT_LIST, &[]).await;
    let replies = c.read_option_replies().await;
    assert_eq!(replies.len(), 3, "{replies:?}");
    let mut listed = Vec::new();
    for r in &replies[..2] {
        assert_eq!((r.0, r.1), (proto::OPT_LIST, proto::REP_SERVER));
        let len = u32::from_be_bytes(r.2[..4].try_into().unwrap()) as usize;
        let name = String::from_utf8(r.2[4..4 + len].to_vec()).unwrap();
        let description = String::from_utf8(r.2[4 + len..].to_vec()).unwrap();
        listed.push((name, description));
    }
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("disk".into(), "test disk".into()),
            ("ro".into(), String::new())
        ]
    );
    assert_eq!(replies[2], (proto::OPT_LIST, proto::REP_ACK, vec![]));

    // LIST with data is invalid, but haggling goes on.
    c.send_option(proto::OPT_LIST, b"x").await;
    let r = c.read_option_reply().await;
    assert_eq!((r.0, r.1), (proto::OPT_LIST, proto::REP_ERR_INVALID));
    c.send_option(proto::OPT_ABORT, &[]).await;
    assert_eq!(c.read_option_reply().await.1, proto::REP_ACK);
    finish(server).await.unwrap();
}

#[tokio::test]
async fn abort_acks_and_closes() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    c.send_option(proto::OPT_ABORT, &[]).await;
    assert_eq!(
        c.read_option_reply().await,
        (proto::OPT_ABORT, proto::REP_ACK, vec![])
    );
    assert!(c.read_to_end().await.is_empty());
    finish(server).await.unwrap();
}

#[tokio::test]
async fn abort_without_waiting_for_the_ack() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    c.send_option(proto::OPT_ABORT, b"ignored data").await;
    drop(c);
    finish(server).await.unwrap();
}

#[tokio::test]
async fn unknown_options_are_unsupported_then_go_works() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    for option in [
        proto::OPT_STRUCTURED_REPLY,
        proto::OPT_LIST_META_CONTEXT,
        proto::OPT_SET_META_CONTEXT,
        proto::OPT_EXTENDED_HEADERS,
        proto::OPT_PEEK_EXPORT,
        0,
        1234,
        u32::MAX,
    ] {
        c.send_option(option, b"some data").await;
        let r = c.read_option_reply().await;
        assert_eq!((r.0, r.1), (option, proto::REP_ERR_UNSUP));
    }
    c.send_option(proto::OPT_STARTTLS, &[]).await;
    let r = c.read_option_reply().await;
    assert_eq!((r.0, r.1), (proto::OPT_STARTTLS, proto::REP_ERR_POLICY));
    let replies = c.info_or_go(proto::OPT_GO, "disk", &[]).await;
    check_disk_info(&replies, proto::OPT_GO);
    c.disconnect().await;
    finish(server).await.unwrap();
}

#[tokio::test]
async fn unknown_export_then_known_export() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    for option in [proto::OPT_INFO, proto::OPT_GO] {
        let replies = c.info_or_go(option, "nope", &[proto::INFO_NAME]).await;
        assert_eq!(replies.len(), 1, "no NBD_REP_INFO before the error");
        assert_eq!(
            (replies[0].0, replies[0].1),
            (option, proto::REP_ERR_UNKNOWN)
        );
    }
    // The empty name is the default export; there is none here.
    let replies = c.info_or_go(proto::OPT_GO, "", &[]).await;
    assert_eq!(replies[0].1, proto::REP_ERR_UNKNOWN);
    let replies = c.info_or_go(proto::OPT_GO, "disk", &[]).await;
    check_disk_info(&replies, proto::OPT_GO);
    c.disconnect().await;
    finish(server).await.unwrap();
}

#[tokio::test]
async fn malformed_info_data_is_invalid_and_haggling_continues() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    let mut too_many_requests = info_data("disk", &[1]);
    too_many_requests[9] = 5;
    let mut trailing = info_data("disk", &[]);
    trailing.push(0);
    let non_utf8 = {
        let mut d = 2u32.to_be_bytes().to_vec();
        d.extend_from_slice(&[0xff, 0xfe, 0, 0]);
        d
    };
    let malformed: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0, 0],
        vec![0, 0, 0, 0, 0],
        vec![0xff, 0xff, 0xff, 0xff, 0, 0],
        vec![0, 0, 0, 4, b'd', b'i', b's', b'k'],
        too_many_requests,
        trailing,
        non_utf8,
    ];
    for data in malformed {
        for option in [proto::OPT_INFO, proto::OPT_GO] {
            c.send_option(option, &data).await;
            let r = c.read_option_reply().await;
            assert_eq!((r.0, r.1), (option, proto::REP_ERR_INVALID), "{data:?}");
        }
    }
    let replies = c.info_or_go(proto::OPT_GO, "disk", &[]).await;
    check_disk_info(&replies, proto::OPT_GO);
    c.disconnect().await;
    finish(server).await.unwrap();
}

#[tokio::test]
async fn unknown_client_flags_disconnect() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH | 1 << 7).await;
    assert!(c.read_to_end().await.is_empty());
    assert!(matches!(
        finish(server).await,
        Err(NbdError::UnknownClientFlags(0x83))
    ));
}

#[tokio::test]
async fn oversized_option_is_skipped_with_too_big() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    let len = proto::MAX_OPTION_DATA + 1;
    c.send_option_header(proto::OPT_GO, len).await;
    // The body is skipped without being buffered; it must be consumed exactly.
    c.s.write_all(&vec![0x5a; len as usize]).await.unwrap();
    let r = c.read_option_reply().await;
    assert_eq!((r.0, r.1), (proto::OPT_GO, proto::REP_ERR_TOO_BIG));
    let replies = c.info_or_go(proto::OPT_GO, "disk", &[]).await;
    check_disk_info(&replies, proto::OPT_GO);
    c.disconnect().await;
    finish(server).await.unwrap();
}

#[tokio::test]
async fn huge_option_length_does_not_allocate() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    // Announce 4 GiB of data, send a little, then hang up: the server must just end.
    c.send_option_header(proto::OPT_LIST, u32::MAX).await;
    c.s.write_all(&[0u8; 1000]).await.unwrap();
    drop(c);
    assert!(matches!(finish(server).await, Err(NbdError::Io(_))));
}

#[tokio::test]
async fn oversized_export_name_disconnects() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    c.send_option_header(proto::OPT_EXPORT_NAME, proto::MAX_OPTION_DATA + 1)
        .await;
    assert!(c.read_to_end().await.is_empty());
    assert!(matches!(
        finish(server).await,
        Err(NbdError::OptionTooLarge { option: 1, .. })
    ));
}

async fn export_name(no_zeroes: bool) {
    let (disk, _, exports) = default_exports();
    disk.data.lock().unwrap()[100..103].copy_from_slice(b"xyz");
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    let flags = if no_zeroes {
        BOTH
    } else {
        proto::FLAG_C_FIXED_NEWSTYLE
    };
    c.start(flags).await;
    c.send_option(proto::OPT_EXPORT_NAME, b"disk").await;
    let reply = c.read_data(10).await;
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 1 << 20);
    assert_eq!(
        u16::from_be_bytes(reply[8..].try_into().unwrap()),
        rw_flags()
    );
    if !no_zeroes {
        assert_eq!(c.read_data(124).await, vec![0u8; 124]);
    }
    // The next bytes are the reply to our first request, not padding.
    assert_eq!(c.read(1, 100, 3).await, (0, b"xyz".to_vec()));
    c.disconnect().await;
    assert!(c.read_to_end().await.is_empty());
    finish(server).await.unwrap();
}

#[tokio::test]
async fn export_name_with_no_zeroes() {
    export_name(true).await;
}

#[tokio::test]
async fn export_name_without_no_zeroes() {
    export_name(false).await;
}

#[tokio::test]
async fn export_name_from_plain_newstyle_client() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(0).await;
    c.send_option(proto::OPT_EXPORT_NAME, b"ro").await;
    assert_eq!(c.read_data(134).await.len(), 134);
    assert_eq!(c.read(1, 0, 512).await, (0, vec![0u8; 512]));
    c.disconnect().await;
    finish(server).await.unwrap();
}

#[tokio::test]
async fn export_name_unknown_disconnects() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    c.send_option(proto::OPT_EXPORT_NAME, b"missing").await;
    assert!(c.read_to_end().await.is_empty());
    assert!(matches!(
        finish(server).await,
        Err(NbdError::UnknownExport(name)) if name == "missing"
    ));
}

#[tokio::test]
async fn export_name_not_utf8_disconnects() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    c.send_option(proto::OPT_EXPORT_NAME, &[0xc3, 0x28]).await;
    assert!(c.read_to_end().await.is_empty());
    assert!(matches!(
        finish(server).await,
        Err(NbdError::InvalidExportName)
    ));
}

#[tokio::test]
async fn bad_option_magic_disconnects() {
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    c.s.write_all(&[0u8; 16]).await.unwrap();
    assert!(c.read_to_end().await.is_empty());
    assert!(matches!(
        finish(server).await,
        Err(NbdError::BadMagic {
            what: "option",
            got: 0
        })
    ));
}

#[tokio::test]
async fn eof_between_messages_is_clean() {
    let (_, _, exports) = default_exports();
    // Right after the greeting (a health check).
    let (mut c, server) = spawn_server(exports.clone(), ServerConfig::default());
    c.read_greeting().await;
    drop(c);
    finish(server).await.unwrap();
    // After an option.
    let (mut c, server) = spawn_server(exports.clone(), ServerConfig::default());
    c.start(BOTH).await;
    c.send_option(proto::OPT_LIST, &[]).await;
    c.read_option_replies().await;
    drop(c);
    finish(server).await.unwrap();
    // In the middle of an option header: an error.
    let (mut c, server) = spawn_server(exports, ServerConfig::default());
    c.start(BOTH).await;
    c.s.write_all(&proto::IHAVEOPT.to_be_bytes()).await.unwrap();
    drop(c);
    assert!(matches!(finish(server).await, Err(NbdError::Io(_))));
}

#[tokio::test]
async fn stalled_handshake_times_out() {
    let (_, _, exports) = default_exports();
    let cfg = ServerConfig {
        handshake_timeout: Some(Duration::from_millis(100)),
        ..ServerConfig::default()
    };
    let (mut c, server) = spawn_server(exports, cfg);
    c.start(BOTH).await;
    assert!(matches!(
        finish(server).await,
        Err(NbdError::HandshakeTimeout)
    ));
    assert!(c.read_to_end().await.is_empty());
}

/// A server that requires TLS: a client gets nothing but "TLS required" before STARTTLS (and
/// NBD_OPT_EXPORT_NAME, which cannot carry an error, ends the connection); STARTTLS with data
/// is invalid; a STARTTLS that is acknowledged is followed by the TLS handshake, which bytes
/// that are not TLS fail.
#[tokio::test]
async fn a_tls_server_answers_nothing_before_starttls() {
    let ca = mars_tls::Ca::create().unwrap();
    let key = mars_tls::HostKey::generate().unwrap();
    let cert = ca
        .issue(&mars_config::HostName::new("a").unwrap(), &key.public_der())
        .unwrap();
    let creds = mars_tls::Credentials::new(ca.cert().clone(), cert, &key);
    let cfg = || ServerConfig {
        tls: Some(mars_nbd::NbdTls(
            mars_tls::verify::nbd_server(&creds, &[]).unwrap(),
        )),
        ..ServerConfig::default()
    };
    let (_, _, exports) = default_exports();
    let (mut c, server) = spawn_server(exports.clone(), cfg());
    c.start(BOTH).await;
    for option in [proto::OPT_LIST, proto::OPT_INFO, proto::OPT_GO, 1234] {
        c.send_option(option, &[]).await;
        let r = c.read_option_reply().await;
        assert_eq!((r.0, r.1), (option, proto::REP_ERR_TLS_REQD));
    }
    c.send_option(proto::OPT_STARTTLS, b"data").await;
    let r = c.read_option_reply().await;
    assert_eq!((r.0, r.1), (proto::OPT_STARTTLS, proto::REP_ERR_INVALID));
    c.send_option(proto::OPT_STARTTLS, &[]).await;
    let r = c.read_option_reply().await;
    assert_eq!((r.0, r.1), (proto::OPT_STARTTLS, proto::REP_ACK));
    c.s.write_all(&[0x42; 64]).await.unwrap();
    assert!(matches!(finish(server).await, Err(NbdError::Tls(_))));

    let (mut c, server) = spawn_server(exports, cfg());
    c.start(BOTH).await;
    c.send_option(proto::OPT_EXPORT_NAME, b"disk").await;
    assert!(c.read_to_end().await.is_empty());
    assert!(matches!(
        finish(server).await,
        Err(NbdError::TlsRequired(_))
    ));
}
