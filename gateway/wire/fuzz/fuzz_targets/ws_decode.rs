//! Fuzzes the WebSocket receive side: no input may panic the handshake parser, the frame
//! decoder or the message assembler. The first input byte picks the message limit, so
//! the size checks are exercised on both sides. Every frame decoded must decode again to
//! the same frame from the same (now unmasked) bytes, and every message the assembler
//! yields must be within the limit, and UTF-8 when it is text.
#![no_main]

use holdfast_wire::ws::{self, Event, MessageAssembler};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ws::parse_upgrade(data, &ws::HandshakeConfig::default());

    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let max = usize::from(limit) * 64;
    let mut buf = rest.to_vec();
    let mut asm = MessageAssembler::new();
    let mut partial = Vec::new();
    let mut pos = 0;
    loop {
        let frame_limit = asm.frame_limit(&partial, max);
        let Ok(Some((frame, used))) = ws::decode_frame(&mut buf[pos..], frame_limit) else {
            break;
        };
        assert!(used >= 6 && used <= rest.len() - pos);
        let first = (frame.fin, frame.opcode, frame.payload.to_vec());
        // The masking key is zeroed once the payload is unmasked.
        let (again, used_again) = ws::decode_frame(&mut buf[pos..], frame_limit)
            .expect("a decoded frame decodes again")
            .expect("and is still complete");
        assert_eq!(
            (again.fin, again.opcode, again.payload, used_again),
            (first.0, first.1, &first.2[..], used)
        );
        match asm.push(again, &mut partial, max) {
            Ok(Some(Event::Message { text, data })) => {
                assert!(data.len() <= max);
                assert!(!text || std::str::from_utf8(data).is_ok());
            }
            Ok(_) => {}
            Err(_) => break,
        }
        pos += used;
    }
});
