//! Fuzzes what the coordinator reads back from its own log: the checkpoint header in
//! front of an application checkpoint, and the records a recovery or a debug run
//! replays after it (tags, batches, impulses, record 0 in either form). Arbitrary bytes
//! never panic; a header that decodes re-encodes to the same header.
#![no_main]

use bytes::Bytes;
use drover_coordinator::session::{CheckpointHeader, Session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into the stored checkpoint and the records.
    let Some((&split, rest)) = data.split_first() else { return };
    let at = (split as usize).min(rest.len());
    let stored = Bytes::copy_from_slice(&rest[..at]);
    let records: Vec<(i64, Bytes)> =
        rest[at..].chunks(17).enumerate().map(|(i, c)| (i as i64, Bytes::copy_from_slice(c))).collect();
    if let Ok((header, app)) = CheckpointHeader::decode(&stored) {
        let again = CheckpointHeader::decode(&Bytes::from(header.encode(&app))).expect("a decoded header re-encodes");
        assert_eq!(again, (header, app));
    }
    let _ = Session::recovery(7, "app", &stored, records.clone(), false, 1 << 20);
    let _ = Session::replay_only(7, "app", &stored, records, true);
});
