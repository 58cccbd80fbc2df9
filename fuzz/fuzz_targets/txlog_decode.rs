//! Arbitrary bytes into the record decoder. Whatever decodes must re-encode to exactly the bytes
//! it was decoded from (the format has one encoding per record, and the CRC covers everything).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mars_txlog::format::{decode, encode, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = decode(data) else {
        return;
    };
    let n = header.record_len();
    assert!(
        n <= data.len(),
        "decode accepted a record longer than its input"
    );
    let mut out = Vec::with_capacity(n);
    encode(&header, &data[HEADER_LEN..n], &mut out).expect("a decoded record must re-encode");
    assert_eq!(
        out,
        &data[..n],
        "re-encoding differs from the decoded bytes"
    );
});
