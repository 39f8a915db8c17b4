//! Fuzzes `decode_input` (every journal entry recovery replays) and the core behind it:
//! arbitrary bytes never panic; an input that decodes re-encodes to bytes that decode
//! to the same input; and applying the decoded inputs in order to a controller never
//! panics (replay of a journal is exactly that).
#![no_main]

use drover_core::{Config, Controller};
use drover_journal::StateMachine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut core = Controller::new(Config::default());
    let mut out = Vec::new();
    // Inputs separated by 0xFF 0xFE (so one run replays several).
    let mut rest = data;
    while !rest.is_empty() {
        let end = rest.windows(2).position(|w| w == [0xFF, 0xFE]).unwrap_or(rest.len());
        let (bytes, tail) = rest.split_at(end);
        rest = tail.get(2..).unwrap_or(&[]);
        let Ok(input) = Controller::decode_input(bytes) else { continue };
        let mut encoded = Vec::new();
        Controller::encode_input(&input, &mut encoded).expect("a decoded input encodes");
        let again = Controller::decode_input(&encoded).expect("an encoded input decodes");
        assert_eq!(again, input);
        core.apply(input, &mut out);
        out.clear();
    }
});
