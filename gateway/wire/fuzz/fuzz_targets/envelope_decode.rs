//! Fuzzes the worker envelope decoder: no input may panic it, and every envelope it
//! accepts must re-encode to exactly the bytes it consumed (one encoding per message).
#![no_main]

use holdfast_wire::envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    while let Ok(Some((msg, used))) = envelope::decode(buf, 4096) {
        assert!(used >= envelope::HEADER_LEN && used <= buf.len());
        assert_eq!(envelope::peek_len(buf), Some(used));
        let mut out = Vec::new();
        envelope::encode(&msg, &mut out);
        assert_eq!(&out[..], &buf[..used]);
        buf = &buf[used..];
    }
});
