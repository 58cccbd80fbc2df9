use proptest::prelude::*;

use super::*;
use mars_config::ResourceName;

fn host(s: &str) -> HostName {
    HostName::new(s).unwrap()
}

#[test]
fn hello_roundtrip_and_checks() {
    let id = ClusterId::parse("0123456789abcdef0123456789abcdef").unwrap();
    assert_eq!(id.to_string(), "01234567-89ab-cdef-0123-456789abcdef");
    assert_eq!(ClusterId::parse(&id.to_string()).unwrap(), id);
    assert!(ClusterId::parse("xyz").is_err());
    let a = Hello::new(StreamKind::Meta, id, host("alpha"));
    let bytes = a.encode();
    for cut in 0..bytes.len() {
        assert_eq!(Hello::decode(&bytes[..cut]).unwrap(), None, "cut {cut}");
    }
    assert_eq!(
        Hello::decode(&bytes).unwrap(),
        Some((a.clone(), bytes.len()))
    );
    let mut other = Hello::new(StreamKind::Meta, ClusterId([7; 16]), host("beta"));
    assert!(matches!(
        a.check_peer(&other),
        Err(Refusal::OtherCluster { .. })
    ));
    other.cluster = ClusterId::UNKNOWN;
    assert!(
        a.check_peer(&other).is_ok(),
        "a joining host passes the hello"
    );
    other.cluster = id;
    other.version = 99;
    let r = a.check_peer(&other).unwrap_err();
    assert!(r.to_string().contains("version 99"), "{r}");
    assert!(matches!(
        Hello::decode(b"GET / HTTP/1.1\r\n"),
        Err(WireError::BadMagic(_))
    ));
    let mut bad = bytes.clone();
    bad[10] = 9;
    assert_eq!(Hello::decode(&bad), Err(WireError::BadStreamKind(9)));
    let mut bad = bytes;
    bad[28] = b'A';
    assert!(matches!(Hello::decode(&bad), Err(WireError::BadHost(_))));
}

#[test]
fn frame_limits() {
    assert_eq!(decode_frame(&[0, 0]).unwrap(), None);
    assert_eq!(decode_frame(&[0, 0, 0, 0]), Err(WireError::EmptyFrame));
    let huge = (MAX_FRAME + 1).to_le_bytes();
    assert_eq!(
        decode_frame(&huge),
        Err(WireError::FrameTooLarge(MAX_FRAME + 1))
    );
    let mut f = Vec::new();
    encode_frame(&Message::Notify { seq: 5 }, &mut f);
    f[5] ^= 1;
    assert_eq!(decode_frame(&f), Err(WireError::BadChecksum));
    // A count that cannot fit is refused before allocating.
    let mut body = vec![5u8];
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&body);
    f.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    assert!(matches!(decode_frame(&f), Err(WireError::Malformed { .. })));
}

fn arb_entry() -> impl Strategy<Value = message::Entry> {
    (
        "[a-z/0-9-]{1,40}",
        proptest::option::of(".{0,40}"),
        any::<u64>(),
        "[a-z]{1,10}",
        proptest::collection::vec(any::<u8>(), 0..80),
    )
        .prop_map(|(key, value, stamp, origin, sig)| message::Entry {
            key,
            value,
            stamp,
            origin,
            sig,
        })
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (0u8..8, ".{0,80}").prop_map(|(k, reason)| Message::Refuse {
            kind: crate::RefuseKind::from_code(k),
            reason
        }),
        any::<u64>().prop_map(|stamp| Message::Ping { stamp }),
        any::<u64>().prop_map(|stamp| Message::Pong { stamp }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(since, limit)| Message::ChangesSince { since, limit }),
        (any::<u64>(), proptest::collection::vec(arb_entry(), 0..20))
            .prop_map(|(upto, entries)| Message::Changes { upto, entries }),
        any::<u64>().prop_map(|seq| Message::Notify { seq }),
        (
            ".{0,40}",
            any::<u64>(),
            any::<u64>(),
            "[0-9a-f,]{0,60}",
            any::<[u8; 16]>()
        )
            .prop_map(|(res, file, offset, prev_link, tail)| Message::FetchFrom {
                res,
                file,
                offset,
                prev_link,
                tail,
            }),
        (any::<u64>(), "[a-z]{0,10}").prop_map(|(file, origin)| Message::LogFile { file, origin }),
        (any::<u64>(), any::<u64>(), arb_data())
            .prop_map(|(file, offset, data)| Message::LogData { file, offset, data }),
        (any::<u64>(), any::<u64>()).prop_map(|(file, len)| Message::LogEnd { file, len }),
        (any::<u64>(), any::<u64>()).prop_map(|(file, oldest)| Message::LogGone { file, oldest }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(file, offset, stamp)| {
            Message::LogCaughtUp {
                file,
                offset,
                stamp,
            }
        }),
        ".{0,40}".prop_map(|res| Message::SyncStart { res }),
        (any::<u64>(), any::<u64>(), any::<u64>(), "[0-9a-f,]{0,60}").prop_map(
            |(size, file, offset, prev_link)| Message::SyncInfo {
                size,
                file,
                offset,
                prev_link
            }
        ),
        (any::<u64>(), 1..=u32::MAX, any::<[u8; 16]>()).prop_map(|(offset, len, digest)| {
            Message::SyncCheck {
                offset,
                len,
                digest,
            }
        }),
        any::<u64>().prop_map(|offset| Message::SyncSame { offset }),
        (any::<u64>(), arb_data()).prop_map(|(offset, data)| Message::SyncData { offset, data }),
        (".{0,40}", arb_data())
            .prop_map(|(token, host_key)| Message::JoinRequest { token, host_key }),
        (any::<[u8; 16]>(), arb_data(), arb_data())
            .prop_map(|(cluster, cert, ca)| Message::JoinGrant { cluster, cert, ca }),
        arb_data().prop_map(|host_key| Message::Renew { host_key }),
        (
            ".{0,40}",
            any::<[u8; 16]>(),
            arb_data(),
            ".{0,80}",
            ".{0,80}"
        )
            .prop_map(|(token, cluster, ca, names, proof)| Message::MergeRequest {
                token,
                cluster,
                ca,
                names,
                proof
            }),
        (any::<[u8; 16]>(), arb_data(), ".{0,80}")
            .prop_map(|(cluster, ca, names)| Message::MergeGrant { cluster, ca, names }),
        (
            proptest::collection::vec("[a-z][a-z0-9-]{0,20}", 1..8),
            proptest::collection::vec("[a-z][a-z0-9_-]{0,20}", 0..8)
        )
            .prop_map(|(hosts, resources)| Message::SplitRequest {
                hosts: hosts.iter().map(|h| host(h)).collect(),
                resources: resources
                    .iter()
                    .map(|r| ResourceName::new(r).unwrap())
                    .collect(),
            }),
        (any::<[u8; 16]>(), arb_data())
            .prop_map(|(cluster, ca)| Message::SplitGrant { cluster, ca }),
    ]
}

fn arb_data() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300)
}

/// One of each fetch and sync message, with edge values.
fn stream_messages() -> Vec<Message> {
    vec![
        Message::FetchFrom {
            res: "vol0".into(),
            file: 1,
            offset: 0,
            prev_link: String::new(),
            tail: [0; 16],
        },
        Message::FetchFrom {
            res: String::new(),
            file: u64::MAX,
            offset: u64::MAX,
            prev_link: "0123456789abcdef,4096,alpha".into(),
            tail: [0xff; 16],
        },
        Message::LogFile {
            file: 7,
            origin: "alpha".into(),
        },
        Message::LogData {
            file: 7,
            offset: 4096,
            data: (0..=255).collect(),
        },
        Message::LogData {
            file: 7,
            offset: 8192,
            data: Vec::new(),
        },
        Message::LogEnd { file: 7, len: 8192 },
        Message::LogGone { file: 3, oldest: 0 },
        Message::LogGone { file: 3, oldest: 5 },
        Message::LogCaughtUp {
            file: 3,
            offset: 96,
            stamp: 1_700_000_000_000_000_000,
        },
        Message::SyncStart { res: "vol0".into() },
        Message::SyncInfo {
            size: 1 << 40,
            file: 9,
            offset: 123,
            prev_link: String::new(),
        },
        Message::SyncInfo {
            size: 0,
            file: 2,
            offset: 0,
            prev_link: "0123456789abcdef,4096,alpha".into(),
        },
        Message::SyncCheck {
            offset: 0,
            len: 1,
            digest: [0xa5; 16],
        },
        Message::SyncCheck {
            offset: u64::MAX,
            len: u32::MAX,
            digest: *b"0123456789abcdef",
        },
        Message::SyncSame { offset: 1 << 20 },
        Message::SyncData {
            offset: 1 << 20,
            data: vec![1, 2, 3],
        },
        Message::SyncData {
            offset: 0,
            data: Vec::new(),
        },
    ]
}

fn body_of(m: &Message) -> Vec<u8> {
    let mut b = Vec::new();
    let payload = m.encode_split(&mut b).to_vec();
    b.extend_from_slice(&payload);
    b
}

fn frame_of_body(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    f
}

fn is_malformed(r: Result<Message, WireError>) -> bool {
    matches!(r, Err(WireError::Malformed { .. }))
}

#[test]
fn fetch_and_sync_messages_roundtrip() {
    let msgs = stream_messages();
    let mut stream = Vec::new();
    for m in &msgs {
        encode_frame(m, &mut stream);
    }
    let mut got = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let (m, n) = decode_frame(&stream[at..]).unwrap().unwrap();
        got.push(m);
        at += n;
    }
    assert_eq!(got, msgs);
    // The type bytes are part of the protocol.
    let types: Vec<u8> = msgs.iter().map(|m| body_of(m)[0]).collect();
    assert_eq!(
        types,
        [10, 10, 11, 12, 12, 13, 14, 14, 15, 20, 21, 21, 22, 22, 23, 24, 24]
    );
}

#[test]
fn fetch_and_sync_layouts() {
    let b = body_of(&Message::LogData {
        file: 2,
        offset: 3,
        data: vec![9, 8],
    });
    let mut want = vec![12];
    want.extend_from_slice(&2u64.to_le_bytes());
    want.extend_from_slice(&3u64.to_le_bytes());
    want.extend_from_slice(&2u32.to_le_bytes());
    want.extend_from_slice(&[9, 8]);
    assert_eq!(b, want);
    let digest = u128::to_le_bytes(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff);
    let b = body_of(&Message::SyncCheck {
        offset: 5,
        len: 4096,
        digest,
    });
    let mut want = vec![22];
    want.extend_from_slice(&5u64.to_le_bytes());
    want.extend_from_slice(&4096u32.to_le_bytes());
    want.extend_from_slice(&digest);
    assert_eq!(b, want);
    let b = body_of(&Message::FetchFrom {
        res: "r".into(),
        file: 1,
        offset: 2,
        prev_link: "ab".into(),
        tail: [7; 16],
    });
    let mut want = vec![10, 1, 0, 0, 0, b'r'];
    want.extend_from_slice(&1u64.to_le_bytes());
    want.extend_from_slice(&2u64.to_le_bytes());
    want.extend_from_slice(&[2, 0, 0, 0, b'a', b'b']);
    want.extend_from_slice(&[7; 16]);
    assert_eq!(b, want);
}

#[test]
fn truncated_and_trailing_payloads_are_malformed() {
    for m in stream_messages() {
        let body = body_of(&m);
        for cut in 1..body.len() {
            assert!(
                is_malformed(Message::decode(&body[..cut])),
                "{m:?} cut at {cut}"
            );
        }
        let mut long = body.clone();
        long.push(0);
        assert!(is_malformed(Message::decode(&long)), "{m:?} + 1 byte");
        // Through a frame, too: a valid checksum does not make it valid.
        assert!(matches!(
            decode_frame(&frame_of_body(&long)),
            Err(WireError::Malformed { .. })
        ));
    }
}

#[test]
fn unknown_types_are_rejected() {
    for t in [0u8, 7, 9, 16, 19, 25, 100, 255] {
        let mut body = vec![t];
        body.extend_from_slice(&[0; 32]);
        assert_eq!(Message::decode(&body), Err(WireError::UnknownType(t)));
        if t != 0 {
            assert_eq!(
                decode_frame(&frame_of_body(&body)),
                Err(WireError::UnknownType(t))
            );
        }
    }
}

#[test]
fn payload_lengths_are_checked_before_allocating() {
    for claimed in [1u32, 3, 1 << 20, MAX_DATA, MAX_DATA + 1, u32::MAX] {
        // LogData claiming more bytes than the frame holds (it holds 2).
        let mut body = vec![12];
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&claimed.to_le_bytes());
        body.extend_from_slice(&[0xee, 0xee][..2.min(claimed as usize - 1)]);
        assert!(is_malformed(Message::decode(&body)), "claimed {claimed}");
        assert!(matches!(
            decode_frame(&frame_of_body(&body)),
            Err(WireError::Malformed { .. })
        ));
        // SyncData, same.
        let mut body = vec![24];
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&claimed.to_le_bytes());
        assert!(is_malformed(Message::decode(&body)), "claimed {claimed}");
    }
    // A string length beyond the frame in the new messages, too.
    let mut body = vec![20];
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(is_malformed(Message::decode(&body)));
    let mut body = vec![11];
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&100u32.to_le_bytes());
    body.extend_from_slice(b"abc");
    assert!(is_malformed(Message::decode(&body)));
    // Not UTF-8.
    let mut body = vec![20];
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&[0xff, 0xfe]);
    assert!(is_malformed(Message::decode(&body)));
}

#[test]
fn sync_check_of_zero_bytes_is_malformed() {
    let mut body = body_of(&Message::SyncCheck {
        offset: 0,
        len: 1,
        digest: [0; 16],
    });
    body[9..13].copy_from_slice(&0u32.to_le_bytes());
    assert!(is_malformed(Message::decode(&body)));
    assert!(matches!(
        decode_frame(&frame_of_body(&body)),
        Err(WireError::Malformed { .. })
    ));
}

#[test]
fn largest_chunk_fits_a_frame() {
    let data = vec![0x5a; MAX_DATA as usize];
    for m in [
        Message::LogData {
            file: u64::MAX,
            offset: u64::MAX,
            data: data.clone(),
        },
        Message::SyncData {
            offset: u64::MAX,
            data,
        },
    ] {
        let mut f = Vec::new();
        encode_frame(&m, &mut f);
        let (got, n) = decode_frame(&f).unwrap().unwrap();
        assert_eq!(n, f.len());
        assert!(got == m);
    }
    // One byte more is refused by the message decoder, whatever the frame limit.
    let mut body = vec![24];
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&(MAX_DATA + 1).to_le_bytes());
    body.resize(body.len() + MAX_DATA as usize + 1, 0);
    assert!(is_malformed(Message::decode(&body)));
}

proptest! {
    #[test]
    fn frames_roundtrip(msgs in proptest::collection::vec(arb_message(), 1..5)) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut stream);
        }
        let mut got = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            // Partial input is "not yet", never an error.
            prop_assert_eq!(decode_frame(&stream[at..at + 3.min(stream.len() - at)]).unwrap(), None);
            let (m, n) = decode_frame(&stream[at..]).unwrap().unwrap();
            got.push(m);
            at += n;
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn corrupted_frames_are_rejected(m in arb_message(), idx in any::<prop::sample::Index>(), x in 1u8..=255) {
        let mut f = Vec::new();
        encode_frame(&m, &mut f);
        let i = idx.index(f.len());
        f[i] ^= x;
        if let Ok(Some((d, _))) = decode_frame(&f) {
            prop_assert!(false, "corrupt frame decoded as {:?}", d);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_frame(&b);
        let _ = Hello::decode(&b);
        let _ = Message::decode(&b);
    }
}

#[test]
fn frame_parts_leave_the_payload_where_it_lies() {
    let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    for m in [
        Message::LogData {
            file: 42,
            offset: 4096,
            data: data.clone(),
        },
        Message::SyncData {
            offset: 1 << 20,
            data: data.clone(),
        },
        Message::SyncSame { offset: 7 },
    ] {
        let f = frame_parts(&m);
        let payload_here = !f.payload.is_empty();
        assert_eq!(payload_here, !matches!(m, Message::SyncSame { .. }));
        if payload_here {
            assert_eq!(f.payload.as_ptr(), data_of(&m).as_ptr(), "not copied");
        }
        let mut joined = f.head.clone();
        joined.extend_from_slice(f.payload);
        joined.extend_from_slice(&f.crc);
        let mut whole = Vec::new();
        encode_frame(&m, &mut whole);
        assert_eq!(joined, whole);
        assert_eq!(frame_len(&joined), Some(joined.len()));
        assert_eq!(frame_len(&joined[..3]), None);
        assert_eq!(
            decode_frame(&joined).unwrap(),
            Some((m.clone(), joined.len()))
        );
    }
}

fn data_of(m: &Message) -> &[u8] {
    match m {
        Message::LogData { data, .. } | Message::SyncData { data, .. } => data,
        _ => &[],
    }
}

// --- compression (compress.rs) ---

/// A hello exactly as a version-4 peer (before compression) encodes it.
fn v4_hello_bytes(kind: StreamKind, cluster: ClusterId, name: &str) -> Vec<u8> {
    let mut v = b"MARSPEER".to_vec();
    v.extend_from_slice(&4u16.to_le_bytes());
    v.push(kind as u8);
    v.push(name.len() as u8);
    v.extend_from_slice(&cluster.0);
    v.extend_from_slice(name.as_bytes());
    v
}

/// Old and new hellos: a version-4 peer's bytes decode as before (no methods) and pass; a
/// version-5 hello carries its method byte and round-trips; the answer to a version-4 hello is
/// byte for byte a version-4 hello, so an old replica reads it and the session stays raw.
#[test]
fn hello_negotiation_with_old_and_new_peers() {
    let id = ClusterId([3; 16]);
    let server = Hello::new(StreamKind::Fetch, id, host("alpha"));
    assert_eq!(
        server.encode(),
        v4_hello_bytes(StreamKind::Fetch, id, "alpha")
    );

    // An old replica: version 4, nothing offered; the answer is version 4, raw.
    let old = v4_hello_bytes(StreamKind::Fetch, id, "beta");
    let (peer, n) = Hello::decode(&old).unwrap().unwrap();
    assert_eq!(
        (peer.version, peer.methods, n),
        (4, Methods::NONE, old.len())
    );
    assert!(server.check_peer(&peer).is_ok());
    let answer = server.clone().answering(&peer, Methods::ALL);
    assert_eq!(
        answer.encode(),
        v4_hello_bytes(StreamKind::Fetch, id, "alpha")
    );
    assert_eq!(peer.agreed(&answer), Ok(None));

    // A new replica offering both; the cut hello waits for its method byte.
    let ours = Hello::new(StreamKind::Fetch, id, host("beta")).offering(Methods::ALL);
    let bytes = ours.encode();
    assert_eq!(bytes.len(), old.len() + 1);
    for cut in 0..bytes.len() {
        assert_eq!(Hello::decode(&bytes[..cut]).unwrap(), None, "cut {cut}");
    }
    let (peer, n) = Hello::decode(&bytes).unwrap().unwrap();
    assert_eq!((&peer, n), (&ours, bytes.len()));
    // The server picks the fastest both enable, or none.
    let a = server.clone().answering(&peer, Methods::ALL);
    assert_eq!((a.version, ours.agreed(&a)), (5, Ok(Some(Method::Lz4))));
    let a = server
        .clone()
        .answering(&peer, Methods::of(&[Method::Zstd]));
    assert_eq!(ours.agreed(&a), Ok(Some(Method::Zstd)));
    let a = server.clone().answering(&peer, Methods::NONE);
    assert_eq!((a.version, ours.agreed(&a)), (5, Ok(None)));
    let (dec, _) = Hello::decode(&a.encode()).unwrap().unwrap();
    assert_eq!(dec, a);
    // An old server answers a version-5 hello in version 4 (and refuses it): no method.
    assert_eq!(ours.agreed(&server), Ok(None));
    // Nothing offered means a version-4 hello, exactly as before.
    let plain = Hello::new(StreamKind::Fetch, id, host("beta")).offering(Methods::NONE);
    assert_eq!(plain.encode(), old);

    // A server choosing what was not offered, or two methods, breaks the protocol.
    let lz4_only =
        Hello::new(StreamKind::Fetch, id, host("beta")).offering(Methods::of(&[Method::Lz4]));
    let mut bad = server.clone().answering(&ours, Methods::ALL);
    bad.methods = Methods::of(&[Method::Zstd]);
    assert!(matches!(
        lz4_only.agreed(&bad),
        Err(Refusal::Methods { .. })
    ));
    bad.methods = Methods::ALL;
    assert!(matches!(ours.agreed(&bad), Err(Refusal::Methods { .. })));
    // Versions outside 4..=5 are refused.
    let mut future = ours.clone();
    future.version = 6;
    assert!(matches!(
        server.check_peer(&future),
        Err(Refusal::Version { theirs: 6 })
    ));
}

/// The cluster setting in MARS's names: what this build implements counts, the rest is
/// ignored.
#[test]
fn methods_from_the_setting() {
    assert_eq!(Methods::from_setting(""), Methods::NONE);
    assert_eq!(
        Methods::from_setting("COMPRESS_LZ4|COMPRESS_ZLIB"),
        Methods::of(&[Method::Lz4])
    );
    assert_eq!(
        Methods::from_setting("COMPRESS_ZSTD | COMPRESS_LZ4"),
        Methods::ALL
    );
    assert_eq!(Methods::from_setting("COMPRESS_LZO"), Methods::NONE);
    assert_eq!(Methods::ALL.preferred(), Some(Method::Lz4));
    // A peer's unknown bits are kept (the hello re-encodes as sent) but never used.
    assert_eq!(Methods::from_bits(0xff).bits(), 0xff);
    assert_eq!(
        Methods::from_bits(0xfc).intersect(Methods::ALL),
        Methods::NONE
    );
    assert_eq!(Methods::from_bits(0xfc).preferred(), None);
}

/// Found by the `wire_frame` fuzz target: a hello of a later version with bits this build does
/// not know must decode to itself (it used to drop them), and an answer carrying only such bits
/// is a protocol breach, not a panic.
#[test]
fn unknown_method_bits_round_trip_and_are_refused_as_an_answer() {
    let host = HostName::new("a").unwrap();
    let mut bytes = Hello::new(StreamKind::Fetch, ClusterId([7; 16]), host.clone())
        .offering(Methods::ALL)
        .encode();
    *bytes.last_mut().unwrap() = 0xfc;
    let (h, n) = Hello::decode(&bytes).unwrap().unwrap();
    assert_eq!(n, bytes.len());
    assert_eq!(h.encode(), bytes);
    let ours = Hello::new(StreamKind::Fetch, ClusterId([7; 16]), host).offering(Methods::ALL);
    assert!(ours.agreed(&h).is_err());
    assert_eq!(
        Hello::new(
            StreamKind::Fetch,
            ClusterId([7; 16]),
            HostName::new("b").unwrap()
        )
        .answering(&h, Methods::ALL)
        .methods,
        Methods::NONE
    );
}

/// Text and zeros, as a log of a filesystem might hold.
fn compressible(len: usize) -> Vec<u8> {
    let text = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod \
                 tempor incididunt ut labore et dolore magna aliqua. 0123456789\n";
    let mut v = Vec::with_capacity(len);
    let mut i = 0u64;
    while v.len() < len {
        if i % 3 == 2 {
            v.extend(std::iter::repeat_n(0u8, 4096));
        } else {
            v.extend_from_slice(format!("{i:08} ").as_bytes());
            v.extend_from_slice(text);
        }
        i += 1;
    }
    v.truncate(len);
    v
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sent(parts: &FrameParts<'_>) -> Vec<u8> {
    [&parts.head[..], parts.payload, &parts.crc[..]].concat()
}

#[test]
fn packed_frames_round_trip_and_shrink() {
    for method in [Method::Lz4, Method::Zstd] {
        for data in [compressible(1 << 20), compressible(5000), vec![0; 1 << 20]] {
            let m = Message::LogData {
                file: 7,
                offset: 4096,
                data,
            };
            let mut p = Packer::new(Some(method));
            let (parts, st) = p.frame(&m);
            let bytes = sent(&parts);
            assert!(st.packed, "{method}");
            assert_eq!(st.wire, bytes.len() as u64);
            let mut raw = Vec::new();
            encode_frame(&m, &mut raw);
            assert_eq!(st.raw, raw.len() as u64);
            assert!(st.raw > 2 * st.wire, "{method}: {} -> {}", st.raw, st.wire);
            let mut u = Unpacker::new(Some(method), MAX_FRAME);
            let (back, n, raw_len) = decode_frame_unpacking(&bytes, &mut u).unwrap().unwrap();
            assert_eq!((back, n, raw_len), (m.clone(), bytes.len(), raw.len()));
            // A stream that agreed on nothing (or another method) refuses it.
            assert_eq!(
                decode_frame(&bytes),
                Err(WireError::Packed(PackError::NotAgreed(method as u8)))
            );
        }
    }
}

/// Random data, small messages and sessions without a method go raw: the frame is the plain
/// frame, readable by any peer.
#[test]
fn what_does_not_pay_goes_raw() {
    let cases = [
        (Some(Method::Lz4), random(1 << 20, 1)),
        (Some(Method::Zstd), random(1 << 20, 2)),
        (Some(Method::Zstd), random(20_000, 3)),
        (Some(Method::Lz4), compressible(100)),
        (None, compressible(1 << 20)),
    ];
    for (method, data) in cases {
        let m = Message::SyncData { offset: 0, data };
        let mut p = Packer::new(method);
        let (parts, st) = p.frame(&m);
        let bytes = sent(&parts);
        let mut raw = Vec::new();
        encode_frame(&m, &mut raw);
        assert!(!st.packed);
        assert_eq!((st.raw, st.wire), (raw.len() as u64, raw.len() as u64));
        assert_eq!(bytes, raw);
    }
}

/// A packed frame built by hand (checksum right, contents as given).
fn packed_frame(method: u8, declared: u32, packed: &[u8]) -> Vec<u8> {
    let mut body = vec![PACKED_TYPE, method];
    body.extend_from_slice(&declared.to_le_bytes());
    body.extend_from_slice(packed);
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&body);
    f.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    f
}

/// Decompression bombs, lies about the size, garbage and nesting end the session with a
/// typed error, and no more than the declared size (≤ the limit) is ever produced.
#[test]
fn bombs_and_corrupt_packed_frames_are_refused() {
    let limit = 1 << 20;
    let zeros = vec![0u8; 64 << 20];
    let zbomb = zstd::bulk::compress(&zeros, 19).unwrap();
    let mut lbomb = Vec::new();
    {
        let mut e = lz4_flex::frame::FrameEncoder::new(&mut lbomb);
        std::io::Write::write_all(&mut e, &zeros).unwrap();
        e.finish().unwrap();
    }
    assert!(zbomb.len() < 1 << 20 && lbomb.len() < 1 << 20);
    for (m, bomb) in [(Method::Zstd, &zbomb), (Method::Lz4, &lbomb)] {
        let mut u = Unpacker::new(Some(m), limit);
        // Declared within the limit, but it decompresses to more: stopped one byte past.
        let f = packed_frame(m as u8, 1000, bomb);
        assert!(matches!(
            decode_frame_unpacking(&f, &mut u),
            Err(WireError::Packed(PackError::SizeMismatch {
                declared: 1000,
                more: true,
                ..
            }))
        ));
        // Declared beyond the limit: refused before decompressing.
        let f = packed_frame(m as u8, 64 << 20, bomb);
        assert_eq!(
            decode_frame_unpacking(&f, &mut u),
            Err(WireError::Packed(PackError::TooLarge {
                declared: 64 << 20,
                limit
            }))
        );
        // Garbage with a good checksum.
        let f = packed_frame(m as u8, 500, &random(300, 9));
        assert!(matches!(
            decode_frame_unpacking(&f, &mut u),
            Err(WireError::Packed(
                PackError::Corrupt(_) | PackError::SizeMismatch { .. }
            ))
        ));
        // A truncated stream: less than declared.
        let mut small = Packer::new(Some(m));
        let msg = Message::SyncData {
            offset: 0,
            data: compressible(100_000),
        };
        let good = sent(&small.frame(&msg).0);
        let packed = &good[4 + PACKED_HEAD..good.len() - 4];
        let declared = u32::from_le_bytes(good[6..10].try_into().unwrap());
        let f = packed_frame(m as u8, declared, &packed[..packed.len() / 2]);
        assert!(decode_frame_unpacking(&f, &mut u).is_err());
        // An unknown method, a short head, a packed frame inside a packed frame.
        let f = packed_frame(9, 10, b"x");
        assert_eq!(
            decode_frame_unpacking(&f, &mut u),
            Err(WireError::Packed(PackError::UnknownMethod(9)))
        );
        let mut short = vec![PACKED_TYPE, m as u8];
        let mut f = (short.len() as u32).to_le_bytes().to_vec();
        f.append(&mut short.clone());
        f.extend_from_slice(&crc32c::crc32c(&short).to_le_bytes());
        short.clear();
        assert_eq!(
            decode_frame_unpacking(&f, &mut u),
            Err(WireError::Packed(PackError::Short))
        );
        let inner = packed_frame(m as u8, 5, b"abc");
        let inner_body = &inner[4..inner.len() - 4];
        let nested = match m {
            Method::Zstd => zstd::bulk::compress(inner_body, 3).unwrap(),
            Method::Lz4 => {
                let mut v = Vec::new();
                let mut e = lz4_flex::frame::FrameEncoder::new(&mut v);
                std::io::Write::write_all(&mut e, inner_body).unwrap();
                e.finish().unwrap();
                v
            }
        };
        let f = packed_frame(m as u8, inner_body.len() as u32, &nested);
        assert_eq!(
            decode_frame_unpacking(&f, &mut u),
            Err(WireError::Packed(PackError::Nested))
        );
        // The unpacker's buffer never grew beyond the limit and a byte.
        assert!(u.capacity() <= 2 * (limit as usize + 1), "{}", u.capacity());
    }
}

proptest! {
    /// A raw LogData frame's head parses to the message's fields, and the data checksum it
    /// derives from the frame's checksum is the data's own exactly when the frame is intact.
    #[test]
    fn log_data_head_and_data_crc(file in any::<u64>(), offset in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..5000), flip in any::<prop::sample::Index>()) {
        let mut f = Vec::new();
        encode_frame(&Message::LogData { file, offset, data: data.clone() }, &mut f);
        for cut in 0..LOG_DATA_HEAD {
            prop_assert_eq!(log_data_head(&f[..cut]).unwrap(), None);
        }
        let h = log_data_head(&f).unwrap().unwrap();
        prop_assert_eq!((h.file, h.offset, h.len, h.frame_len()), (file, offset, data.len(), f.len()));
        let trailer: [u8; 4] = f[f.len() - 4..].try_into().unwrap();
        prop_assert_eq!(h.data_crc(trailer), crc32c::crc32c(&data));
        prop_assert_eq!(shift(offset as u32, data.len()), crc32c::crc32c_combine(offset as u32, 0, data.len()));
        // Damage anywhere (head, data or trailer) makes the derived checksum disagree.
        let i = flip.index(f.len());
        let mut bad = f.clone();
        bad[i] ^= 0x41;
        if let Ok(Some(hb)) = log_data_head(&bad) {
            let tb: [u8; 4] = bad[bad.len() - 4..].try_into().unwrap();
            let db = &bad[LOG_DATA_HEAD..bad.len() - 4];
            prop_assert_ne!(hb.data_crc(tb), crc32c::crc32c(db));
        }
    }
}

#[test]
fn log_data_head_refuses_inconsistent_lengths_and_ignores_other_frames() {
    let mut f = Vec::new();
    encode_frame(&Message::LogEnd { file: 1, len: 2 }, &mut f);
    assert_eq!(log_data_head(&f).unwrap(), None);
    let mut f = Vec::new();
    encode_frame(
        &Message::LogData {
            file: 1,
            offset: 2,
            data: vec![3; 100],
        },
        &mut f,
    );
    let mut bad = f.clone();
    bad[21..25].copy_from_slice(&101u32.to_le_bytes());
    assert!(matches!(
        log_data_head(&bad),
        Err(WireError::Malformed { .. })
    ));
    bad[..4].copy_from_slice(&(MAX_FRAME + 1).to_le_bytes());
    assert!(matches!(
        log_data_head(&bad),
        Err(WireError::FrameTooLarge(_))
    ));
}

#[test]
fn split_messages_have_their_layout_and_refuse_bad_names_and_counts() {
    let req = Message::SplitRequest {
        hosts: vec![host("b1"), host("b2")],
        resources: vec![ResourceName::new("rb").unwrap()],
    };
    let b = body_of(&req);
    let mut want = vec![35];
    want.extend_from_slice(&2u32.to_le_bytes());
    for n in ["b1", "b2"] {
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(n.as_bytes());
    }
    want.extend_from_slice(&1u32.to_le_bytes());
    want.extend_from_slice(&2u32.to_le_bytes());
    want.extend_from_slice(b"rb");
    assert_eq!(b, want);
    assert_eq!(Message::decode(&b).unwrap(), req);
    let grant = Message::SplitGrant {
        cluster: [3; 16],
        ca: vec![1, 2],
    };
    let b = body_of(&grant);
    assert_eq!(b[0], 36);
    assert_eq!(Message::decode(&b).unwrap(), grant);

    // A name that is no host name (a path, empty), or no resource name, is malformed.
    let body = |hosts: &[&str], res: &[&str]| {
        let mut b = vec![35];
        for list in [hosts, res] {
            b.extend_from_slice(&(list.len() as u32).to_le_bytes());
            for n in list {
                b.extend_from_slice(&(n.len() as u32).to_le_bytes());
                b.extend_from_slice(n.as_bytes());
            }
        }
        b
    };
    assert!(Message::decode(&body(&["a"], &["r"])).is_ok());
    for (hosts, res) in [
        (&["../x"][..], &["r"][..]),
        (&[""][..], &[][..]),
        (&["a"][..], &["r/size"][..]),
        (&[][..], &["r"][..]),
        (&["a", "b c"][..], &[][..]),
    ] {
        assert!(
            is_malformed(Message::decode(&body(hosts, res))),
            "{hosts:?} {res:?}"
        );
    }
    // Counts beyond the cap, or beyond what the frame holds, are refused before allocating.
    for n in [MAX_SPLIT_NAMES + 1, u32::MAX, 1000] {
        let mut b = vec![35];
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&[0; 40]);
        assert!(is_malformed(Message::decode(&b)), "{n}");
    }
}
