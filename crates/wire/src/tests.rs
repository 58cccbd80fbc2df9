use proptest::prelude::*;

use super::*;

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
    )
        .prop_map(|(key, value, stamp, origin)| message::Entry {
            key,
            value,
            stamp,
            origin,
        })
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        ".{0,80}".prop_map(|reason| Message::Refuse { reason }),
        any::<u64>().prop_map(|stamp| Message::Ping { stamp }),
        any::<u64>().prop_map(|stamp| Message::Pong { stamp }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(since, limit)| Message::ChangesSince { since, limit }),
        (any::<u64>(), proptest::collection::vec(arb_entry(), 0..20))
            .prop_map(|(upto, entries)| Message::Changes { upto, entries }),
        any::<u64>().prop_map(|seq| Message::Notify { seq }),
    ]
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
