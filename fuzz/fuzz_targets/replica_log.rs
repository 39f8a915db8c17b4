//! Fuzzes what a coordinator replica reads from its Raft log, its snapshots and its
//! peers: the instance log's inputs and snapshots (`InstanceLog`), a secondary's
//! session fed arbitrary committed records, and the admin requests on the Raft port.
//! Arbitrary bytes never panic; what decodes re-encodes to the same bytes' meaning.
#![no_main]

use bytes::Bytes;
use drover_coordinator::admin::Request;
use drover_coordinator::replicated::InstanceLog;
use drover_coordinator::session::Session;
use drover_machine::StateMachine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(input) = InstanceLog::decode_input(data) {
        let mut buf = Vec::new();
        InstanceLog::encode_input(&input, &mut buf).expect("encodes");
        assert_eq!(InstanceLog::decode_input(&buf).expect("decodes again"), input);
        let mut m = InstanceLog::default();
        let mut out = Vec::new();
        m.apply(input, &mut out);
        let back = InstanceLog::restore(&m.checkpoint().expect("checkpoint")).expect("restores");
        assert_eq!(back, m);
    }
    if let Ok(m) = InstanceLog::restore(data) {
        assert_eq!(InstanceLog::restore(&m.checkpoint().expect("checkpoint")).expect("restores"), m);
    }
    let _ = postcard::from_bytes::<Request>(data);
    // A secondary's session: the first byte splits a stored checkpoint from records.
    let Some((&split, rest)) = data.split_first() else { return };
    let at = (split as usize).min(rest.len());
    let stored = Bytes::copy_from_slice(&rest[..at]);
    if let Ok((mut s, _)) = Session::secondary(7, "app", &stored, Vec::new(), 1 << 20) {
        for (i, c) in rest[at..].chunks(13).enumerate() {
            let _ = s.on_committed(i as i64, &Bytes::copy_from_slice(c));
        }
        let _ = s.become_primary(split % 2 == 0);
    }
});
