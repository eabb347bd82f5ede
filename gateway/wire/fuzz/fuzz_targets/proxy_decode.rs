//! Fuzzes the PROXY protocol decoder: no input may panic it; a header it accepts lies
//! within the input, and every prefix of that header is "need more", never an error or a
//! different header (the gateway decodes it as bytes arrive).
#![no_main]

use holdfast_wire::proxy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = proxy::decode(data) {
        assert!(h.len <= data.len());
        assert!(h.version == 1 || h.version == 2);
        for cut in 0..h.len {
            assert_eq!(proxy::decode(&data[..cut]), Ok(None));
        }
        assert_eq!(proxy::decode(&data[..h.len]), Ok(Some(h)));
    }
});
