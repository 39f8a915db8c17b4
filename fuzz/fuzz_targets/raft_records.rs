//! Fuzzes what a replica reads from disk and from its peers: Raft entries in the
//! journal, the vote/purge state file, and request and response frames on the Raft
//! port. Arbitrary bytes never panic; an entry or a state file that decodes re-encodes
//! to bytes that decode to the same value.
#![no_main]

use drover_raft::network::{decode_request, decode_response};
use drover_raft::record::{SavedState, decode_entry, encode_entry};
use drover_wire::ambrosia::varint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(e)) = decode_entry(data) {
        let bytes = encode_entry(&e);
        let (_, n) = varint::get_int(&bytes).expect("a size").expect("whole");
        let back = decode_entry(&bytes[n..]).expect("re-encoded entry decodes").expect("is an entry");
        assert_eq!(back, e);
    }
    if let Ok(s) = SavedState::decode(data) {
        assert_eq!(SavedState::decode(&s.encode()).expect("re-encoded state decodes"), s);
    }
    let _ = decode_request(data);
    let _ = decode_response(data);
});
