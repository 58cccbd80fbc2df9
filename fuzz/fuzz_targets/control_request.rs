//! One line on the control socket (`ROOT/marsd.sock`), as `marsd` decodes it: no input may
//! panic, an over-long line is refused before it is parsed, and a request that decodes encodes
//! back to one that decodes to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mars_api::{decode, encode, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode::<Request>(data) {
        let line = encode(&req);
        let again: Request = decode(&line[..line.len() - 1]).expect("our own encoding decodes");
        assert_eq!(again, req);
    }
});
