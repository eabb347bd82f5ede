//! Fuzzes the client frame decoder: no input may panic it, and every frame it accepts
//! must re-encode to exactly the bytes it consumed. The first input byte picks the
//! payload limit, so the size check is exercised on both sides.
#![no_main]

use holdfast_wire::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&limit, mut buf)) = data.split_first() else {
        return;
    };
    let max = usize::from(limit) * 16;
    // Walk a stream of frames the way a connection would.
    while let Ok(Some((f, used))) = frame::decode(buf, max) {
        assert!(used >= frame::HEADER_LEN && used <= buf.len());
        assert_eq!(frame::peek_len(buf), Some(used));
        let mut out = Vec::new();
        f.encode(&mut out);
        assert_eq!(&out[..], &buf[..used]);
        buf = &buf[used..];
    }
    // The owning buffer must agree with the borrowed decoder on any split.
    let mut fb = frame::FrameBuf::new();
    for chunk in data.chunks(usize::from(limit % 7) + 1) {
        fb.push(chunk);
        while let Ok(Some(_)) = fb.next(max) {}
    }
});
