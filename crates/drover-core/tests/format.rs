//! The durable format, pinned byte for byte.
//!
//! One input of every `Event` variant, and the checkpoint of the state they build, are
//! encoded and compared with `tests/format/input-1.hex` and `checkpoint-2.hex`. A change
//! to any type the journal or a checkpoint holds (a field added to `Event`, `Config`,
//! a node, a task…) changes these bytes and fails here, before it can strand a data
//! directory. If the change is deliberate, follow "Durable format" in ARCHITECTURE.md:
//! bump `INPUT_FORMAT` or `CHECKPOINT_FORMAT`, keep a decoder for the old format (its
//! types frozen beside it), add a golden data directory written by the old release,
//! and only then pin the new bytes under the new format's file name
//! (`DROVER_WRITE_FORMAT=1 cargo test -p drover-core --test format`).

use std::path::PathBuf;

use drover_core::{CHECKPOINT_FORMAT, Config, Controller, Credential, Event, INPUT_FORMAT, Input, Policy};
use drover_machine::StateMachine;
use drover_proto::v1;

fn inputs() -> Vec<Input> {
    let config =
        Config { policy: Policy::Balanced, version: "1.2.3".into(), unplaceable_after_ms: 90_000, ..Config::default() };
    let hello = v1::NodeKnownCurrenciesV1Notify {
        pairs: vec!["EURUSD".into(), "GBPUSD".into()],
        name: "w1".into(),
        version: "1.2.3".into(),
        worker: true,
    };
    let task = v1::ControllerTaskRunV1Req {
        job_addr: "/bin/true".into(),
        timeout_ms: 1_000,
        cores: 1,
        max_attempts: 2,
        ..Default::default()
    };
    let events = vec![
        Event::ControllerStarted { config },
        Event::Tick,
        Event::NodeConnected { node: "old".into(), session: 1 },
        Event::NodeDisconnected { node: "old".into(), session: 1 },
        Event::TokenCreate {
            session: 0,
            stream_id: String::new(),
            id: "0123456789ab".into(),
            secret_hash: [7; 32],
            role: v1::TokenRole::Join as i32,
            ttl_ms: 60_000,
            uses: 3,
            description: "pinned".into(),
        },
        Event::AdmissionAttempt {
            attempt: 1,
            node: "w1".into(),
            token_id: "0123456789ab".into(),
            secret_hash: [7; 32],
        },
        Event::Admission {
            attempt: 2,
            node: "w1".into(),
            credential: Credential::Token { id: "0123456789ab".into(), secret_hash: [7; 32] },
        },
        Event::Admission { attempt: 3, node: "c1".into(), credential: Credential::Certificate },
        Event::NodeOpened { node: "w1".into(), session: 2, generation: 2 },
        Event::node_message("w1", 2, "", hello),
        Event::NodeRefused {
            node: "w1".into(),
            session: 2,
            request_id: "r1".into(),
            type_url: "type.googleapis.com/x.Y".into(),
            reason: "unknown message type".into(),
        },
        Event::CliConnected { session: 9, role: drover_core::OperatorRole::Admin },
        Event::cli_message(9, "s1", "cli", vec!["w1".into()], task),
        Event::CliRefused {
            session: 9,
            stream_id: "s2".into(),
            type_url: "type.googleapis.com/x.Y".into(),
            reason: "unknown message type".into(),
        },
        Event::CliDisconnected { session: 9 },
    ];
    events.into_iter().enumerate().map(|(i, event)| Input { at_ms: 1_000 + i as i64 * 250, event }).collect()
}

fn pinned(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/format").join(name)
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in bytes.chunks(32).enumerate() {
        if i > 0 {
            s.push('\n');
        }
        for b in chunk {
            s.push_str(&format!("{b:02x}"));
        }
    }
    s.push('\n');
    s
}

fn check(name: &str, got: String) {
    let path = pinned(name);
    if std::env::var("DROVER_WRITE_FORMAT").is_ok() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        want == got,
        "{name}: the durable format changed. Bump the format and keep reading the old one (see this file's \
         doc comment and ARCHITECTURE.md, \"Durable format\").\nwant:\n{want}\ngot:\n{got}"
    );
}

#[test]
fn every_input_variant_encodes_as_pinned() {
    let mut all = String::new();
    for input in inputs() {
        let mut buf = Vec::new();
        Controller::encode_input(&input, &mut buf).unwrap();
        assert_eq!(Controller::decode_logged_input(INPUT_FORMAT, &buf).unwrap(), input);
        all.push_str(&hex(&buf));
    }
    check(&format!("input-{INPUT_FORMAT}.hex"), all);
}

#[test]
fn the_checkpoint_of_a_state_encodes_as_pinned() {
    let mut c = Controller::new(Config::default());
    let mut out = Vec::new();
    for input in inputs() {
        c.apply(input, &mut out);
    }
    let bytes = c.checkpoint().unwrap();
    assert_eq!(Controller::restore(&bytes).unwrap(), c);
    check(&format!("checkpoint-{CHECKPOINT_FORMAT}.hex"), hex(&bytes));
}
