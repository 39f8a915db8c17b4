//! Fuzzes the AMBROSIA message stream reader in both directions: arbitrary bytes in
//! arbitrary pieces never panic, and every decoded message re-encodes and decodes to
//! itself.
#![no_main]

use drover_wire::ambrosia::{Direction, Frame, Limits, Message, MessageReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let limits = Limits { max_message: 1 << 16, max_record: 1 << 16, max_checkpoint: 1 << 20 };
    for dir in [Direction::ToCoordinator, Direction::ToApplication] {
        let mut r = MessageReader::new(dir, limits);
        'feed: for piece in rest.chunks(chunk) {
            r.feed(piece);
            loop {
                match r.next_frame() {
                    Ok(Some(Frame::Message(m))) => {
                        let bytes = m.to_bytes();
                        let back = Message::decode(&bytes, dir, &limits).expect("re-encoded message decodes");
                        assert_eq!(back, Some((m, bytes.len())));
                    }
                    Ok(Some(Frame::CheckpointData { .. })) => {}
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    }
});
