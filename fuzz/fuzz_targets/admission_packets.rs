//! Fuzzes the admission packet decoder: arbitrary bytes, fed in arbitrary pieces,
//! never panic, never buffer past the limit, and every packet that decodes re-encodes
//! to bytes that decode to the same packet.
#![no_main]

use drover_wire::admission::{MAX_PACKET, PacketDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so splits are explored too.
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let mut d = PacketDecoder::new();
    for piece in rest.chunks(chunk) {
        if d.feed(piece).is_err() {
            break;
        }
        assert!(d.buffered() <= MAX_PACKET);
        while let Some(p) = d.next_packet() {
            if let Ok(p) = p {
                let mut again = PacketDecoder::new();
                again.feed(&p.to_bytes()).expect("re-encoded packet fits");
                assert_eq!(again.next_packet(), Some(Ok(p)));
            }
        }
    }
});
