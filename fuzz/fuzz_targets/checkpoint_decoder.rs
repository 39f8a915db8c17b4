//! Fuzzes the checkpoint decoder: the journal's checkpoint file framing, then the
//! controller state inside it. Arbitrary bytes never panic; a state that decodes
//! re-encodes to a state that decodes to the same thing.
#![no_main]

use drover_core::Controller;
use drover_journal::{Limits, StateMachine};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_message: 1 << 16, max_record: 1 << 16, max_checkpoint: 1 << 20 };
    // As a checkpoint file (framing, check bytes), and as the state alone.
    // The committer id its header names, so seeds from real journals get through.
    let committer = data.get(..4).map_or(0, |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let framed = drover_journal::checkpoint::decode(data, committer, &limits).ok().map(|(_, state)| state.to_vec());
    for state in framed.iter().map(Vec::as_slice).chain([data]) {
        if let Ok(c) = Controller::restore(state) {
            let again = Controller::restore(&c.checkpoint().expect("a restored state encodes")).expect("a checkpoint of a restored state restores");
            assert!(again == c, "checkpoint round trip changed the state");
        }
    }
});
