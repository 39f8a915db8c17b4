//! Fuzzes the controller's admission state machine: arbitrary bytes are decoded into
//! packets and fed to a `ServerConn`, with arbitrary verdicts and times. It must never
//! panic, and must never admit a node that did not get a positive verdict.
#![no_main]

use drover_admission::server::{Action, ServerConfig, ServerConn};
use drover_admission::version::{Version, VersionPolicy};
use drover_wire::admission::PacketDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let v = Version { major: 0, minor: 1, patch: 0 };
    let mut conn = ServerConn::new(ServerConfig { policy: VersionPolicy { controller: v, min_node: v }, handshake_deadline_ms: 10_000 }, 0);
    let mut decoder = PacketDecoder::new();
    let mut approved = false;
    let mut now = 0;
    for (i, piece) in rest.chunks(32).enumerate() {
        now += i64::from(piece[0]) * 50;
        if decoder.feed(piece).is_err() {
            return;
        }
        while let Some(p) = decoder.next_packet() {
            for a in conn.on_packet(p, now) {
                match a {
                    Action::Verify { .. } => {
                        let ok = flags & (1 << (i % 8)) != 0;
                        approved |= ok;
                        conn.on_verdict(if ok { Ok(("u".into(), "t".into())) } else { Err("no".into()) });
                    }
                    Action::Admitted { .. } => assert!(approved, "admitted without a positive verdict"),
                    _ => {}
                }
            }
        }
        conn.on_tick(now);
    }
});
