//! Bytes a peer might send: a hello, then frames. Decoding must never panic, and whatever
//! decodes must re-encode to exactly the bytes it came from (no two encodings of one message).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mars_wire::{decode_frame, encode_frame, Hello};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    if let Ok(Some((hello, n))) = Hello::decode(rest) {
        assert_eq!(hello.encode(), &rest[..n]);
        rest = &rest[n..];
    }
    while let Ok(Some((msg, n))) = decode_frame(rest) {
        let mut again = Vec::new();
        encode_frame(&msg, &mut again);
        assert_eq!(again, &rest[..n]);
        rest = &rest[n..];
    }
});
