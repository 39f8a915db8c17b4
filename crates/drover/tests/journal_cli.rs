//! `drover journal verify|dump|state` against real journals: a healthy one, a torn
//! tail, a flipped bit in the middle, and controller inputs to recover.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use drover_journal::{FsStorage, Journal, JournalConfig, encode_entry};

fn drover(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_drover")).args(args).output().expect("run drover");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn write_journal(data_dir: &Path, records: u64) {
    let (j, _) = Journal::open(JournalConfig::new(data_dir.join("journal")), Arc::new(FsStorage)).unwrap();
    for v in 0..records {
        j.append_blocking(encode_entry(1, &v.to_le_bytes())).unwrap().wait().unwrap();
    }
    j.close_blocking();
}

fn segment(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("journal").join(drover_journal::segment_name(0))
}

#[test]
fn verify_and_dump_a_healthy_journal() {
    let tmp = tempfile::tempdir().unwrap();
    write_journal(tmp.path(), 5);
    let (ok, out) = drover(&["journal", "verify", tmp.path().to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("5 record(s)") && out.contains("journal OK"), "{out}");
    let (ok, out) = drover(&["journal", "dump", tmp.path().to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("seq        4") && out.contains("1x RPC"), "{out}");
    let (ok, out) = drover(&["journal", "dump", "--json", tmp.path().to_str().unwrap()]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["segments"][0]["records"].as_array().unwrap().len(), 5);
}

#[test]
fn verify_names_file_and_offset_of_damage() {
    let tmp = tempfile::tempdir().unwrap();
    write_journal(tmp.path(), 6);
    let seg = segment(tmp.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let record_len = bytes.len() / 6;
    bytes[2 * record_len + 30] ^= 1; // inside record 2's payload
    std::fs::write(&seg, &bytes).unwrap();
    let (ok, out) = drover(&["journal", "verify", tmp.path().to_str().unwrap()]);
    assert!(!ok, "damage must fail verify: {out}");
    let expected = format!("DAMAGED (corruption) {} at byte {}", seg.display(), 2 * record_len);
    assert!(out.contains(&expected), "wanted {expected:?} in:\n{out}");

    // A torn tail is reported as such, and verify changes nothing.
    let tmp = tempfile::tempdir().unwrap();
    write_journal(tmp.path(), 3);
    let seg = segment(tmp.path());
    let bytes = std::fs::read(&seg).unwrap();
    std::fs::write(&seg, &bytes[..bytes.len() - 3]).unwrap();
    let (ok, out) = drover(&["journal", "verify", tmp.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("DAMAGED (torn-tail)"), "{out}");
    assert_eq!(std::fs::read(&seg).unwrap().len(), bytes.len() - 3, "verify must not repair");
}

/// `journal state` recovers the controller's state from a copy: a node, its pair, the
/// latest price; a torn tail is repaired in the copy only.
#[test]
fn state_shows_what_a_restart_recovers_without_touching_the_journal() {
    use drover_core::{Config, Controller, Event, Input};
    use drover_proto::{Payload, v1};
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(JournalConfig::new(tmp.path().join("journal")), Arc::new(FsStorage)).unwrap();
    let msg = |at_ms: i64, p: Payload| Input { at_ms, event: Event::node_message("n1", 1, "", p) };
    let hello = v1::NodeKnownCurrenciesV1Notify {
        pairs: vec!["EURUSD".into()],
        name: "n1".into(),
        version: "0.1.0".into(),
        worker: false,
    };
    let price = v1::NodePriceUpdateV1Notify {
        pair: "EURUSD".into(),
        price: Some(v1::Decimal { mantissa: 108_123, scale: 5 }),
        upstream_time_ms: 20_500,
        seq: 1,
        epoch: 1,
    };
    let inputs = [
        Input { at_ms: 1_000, event: Event::ControllerStarted { config: Config::default() } },
        Input { at_ms: 20_000, event: Event::NodeConnected { node: "n1".into(), session: 1 } },
        msg(20_001, hello.into()),
        msg(20_600, price.into()),
    ];
    for input in &inputs {
        j.append_blocking(drover_journal::machine::encode_input::<Controller>(input).unwrap()).unwrap().wait().unwrap();
    }
    j.close_blocking();
    // A torn record after them.
    let seg = segment(tmp.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0x40, 0x00, 0x00]);
    std::fs::write(&seg, &bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["journal", "state", "--json", tmp.path().to_str().unwrap()])
        .output()
        .expect("run drover");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["pairs"][0]["pair"], "EURUSD", "{v}");
    assert_eq!(v["pairs"][0]["streamer"], "n1", "{v}");
    assert_eq!(v["pairs"][0]["price"], "1.08123", "{v}");
    assert_eq!(v["pairs"][0]["upstream_time_ms"], 20_500, "{v}");
    assert_eq!(v["nodes"][0]["id"], "n1", "{v}");
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "state must not repair the journal itself");
    let (ok, out) = drover(&["journal", "state", tmp.path().join("missing").to_str().unwrap()]);
    assert!(!ok && out.contains("is not a directory"), "{out}");
    // Said once (issue 19: a missing directory printed its error twice), by every tool.
    for tool in ["verify", "dump", "state"] {
        let (ok, out) = drover(&["journal", tool, tmp.path().join("missing").to_str().unwrap()]);
        assert!(!ok && out.matches("missing").count() == 1, "{tool}: {out}");
    }
}

/// The data directory layout of this release (issue 19: task and worker state, the
/// unplaceable setting), committed as `tests/golden/issue19/`: a checkpoint covering a
/// worker and a queued task, then records after it. Until the versioned format (issue
/// 14) every change to the state's encoding breaks this test, which is the point: it is
/// where such a change is seen, and where issue 14 starts reading old directories.
/// `DROVER_WRITE_GOLDEN=issue19` writes the directory anew (only for a deliberate
/// change: a release's golden directory is its bytes, never rewritten by a later one).
#[test]
fn the_golden_data_directory_of_this_release_recovers() {
    use drover_core::{Config, Event, Input};
    use drover_proto::{Payload, v1};
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/issue19");
    if write_golden("issue19") {
        let config = Config { unplaceable_after_ms: 90_000, ..Config::default() };
        let node = |at_ms: i64, rid: &str, p: Payload| Input { at_ms, event: Event::node_message("w1", 1, rid, p) };
        let hello = v1::NodeKnownCurrenciesV1Notify {
            pairs: vec!["EURUSD".into()],
            name: "w1".into(),
            version: "0.1.0".into(),
            worker: true,
        };
        let subscribe = v1::ManagerV1Req {
            cores: 2,
            memory_mb: 512,
            labels: Default::default(),
            manager_id: "controller".into(),
            allow_jobs: vec!["/bin/".into()],
        };
        let task = v1::ControllerTaskRunV1Req {
            job_addr: "/bin/true".into(),
            timeout_ms: 1_000,
            cores: 1,
            max_attempts: 1,
            ..Default::default()
        };
        let before = [
            Input { at_ms: 1_000, event: Event::ControllerStarted { config } },
            Input { at_ms: 20_000, event: Event::NodeConnected { node: "w1".into(), session: 1 } },
            node(20_001, "", hello.into()),
            node(20_002, "sub", subscribe.into()),
        ];
        let after = [
            Input { at_ms: 20_100, event: Event::CliConnected { session: 9, role: drover_core::OperatorRole::Admin } },
            Input { at_ms: 20_101, event: Event::cli_message(9, "s1", "cli", vec![], task) },
        ];
        write_golden_journal(&golden, &before, &after);
    }
    assert!(golden.join("journal").is_dir(), "the golden directory is committed: {}", golden.display());
    let (ok, out) = drover(&["journal", "state", "--json", golden.to_str().unwrap()]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["nodes"][0]["id"], "w1", "{v}");
    assert_eq!(v["nodes"][0]["cores"], 2, "the worker's resources come back from the checkpoint: {v}");
    assert_eq!(v["tasks"]["running"], 1, "the task submitted after the checkpoint replays, placed: {v}");
    assert_eq!(v["recent_tasks"][0]["job"], "/bin/true", "{v}");
    assert_eq!(v["recent_tasks"][0]["worker"], "w1", "{v}");
}

/// The data directory layout of the hardening release (issue 20): the node identities
/// are a section after the rest of the checkpoint, and the new inputs (admission with a
/// credential, a stream opened at a ticket generation, digests of undecodable messages,
/// an eviction that kills tickets) follow it. It must keep recovering with every later
/// release. `DROVER_WRITE_GOLDEN=issue20` writes it anew (only for a deliberate change).
#[test]
fn the_golden_data_directory_of_the_hardening_release_recovers() {
    use drover_core::{Config, Controller, Credential, Event, Input};
    use drover_proto::v1;
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/issue20");
    if write_golden("issue20") {
        let hello = |name: &str| v1::NodeKnownCurrenciesV1Notify {
            pairs: vec!["EURUSD".into()],
            name: name.into(),
            version: "0.1.0".into(),
            worker: false,
        };
        let join = |attempt: u64, node: &str| Event::Admission {
            attempt,
            node: node.into(),
            credential: Credential::Token { id: "0123456789ab".into(), secret_hash: [7; 32] },
        };
        let token = Event::TokenCreate {
            session: 0,
            stream_id: String::new(),
            id: "0123456789ab".into(),
            secret_hash: [7; 32],
            role: v1::TokenRole::Join as i32,
            ttl_ms: 0,
            uses: 0,
            description: "golden".into(),
        };
        let before = [
            Input { at_ms: 1_000, event: Event::ControllerStarted { config: Config::default() } },
            Input { at_ms: 1_001, event: token },
            Input { at_ms: 2_000, event: join(1, "n1") },
            Input { at_ms: 2_001, event: Event::NodeOpened { node: "n1".into(), session: 1, generation: 1 } },
            Input { at_ms: 2_002, event: Event::node_message("n1", 1, "", hello("n1")) },
            Input { at_ms: 2_003, event: join(2, "n2") },
            Input { at_ms: 2_004, event: Event::NodeOpened { node: "n2".into(), session: 2, generation: 2 } },
            Input { at_ms: 2_005, event: Event::node_message("n2", 2, "", hello("n2")) },
        ];
        let evict = v1::ControllerEvictNodesV1Req { node_uuids: vec!["n2".into()], reason: "golden".into() };
        let after = [
            Input { at_ms: 3_000, event: Event::CliConnected { session: 9, role: drover_core::OperatorRole::Admin } },
            Input { at_ms: 3_001, event: Event::cli_message(9, "s1", "cli", vec![], evict) },
            Input {
                at_ms: 3_002,
                event: Event::CliRefused {
                    session: 9,
                    stream_id: "s2".into(),
                    type_url: "type.googleapis.com/evil.Fill".into(),
                    reason: "unknown message type".into(),
                },
            },
            Input {
                at_ms: 3_003,
                event: Event::NodeRefused {
                    node: "n1".into(),
                    session: 1,
                    request_id: "r1".into(),
                    type_url: "type.googleapis.com/evil.Fill".into(),
                    reason: "unknown message type".into(),
                },
            },
            // A stale ticket (n2 was evicted) is refused on replay too.
            Input { at_ms: 3_004, event: Event::NodeOpened { node: "n2".into(), session: 3, generation: 2 } },
        ];
        write_golden_journal(&golden, &before, &after);
    }
    assert!(golden.join("journal").is_dir(), "the golden directory is committed: {}", golden.display());
    let (ok, out) = drover(&["journal", "verify", golden.join("journal").to_str().unwrap()]);
    assert!(ok, "{out}");
    // Recover it as a controller would (from a copy: recovery may narrow modes).
    let copy = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(golden.join("journal")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
    }
    let storage: Arc<dyn drover_journal::Storage> = Arc::new(FsStorage);
    let recovery = drover_journal::recovery::recover(&JournalConfig::new(copy.path()), &storage).unwrap();
    assert!(recovery.checkpoint.is_some(), "the golden directory has a checkpoint");
    let (core, stats) = drover_journal::replay(&recovery, || Controller::new(Config::default())).unwrap();
    assert_eq!(stats.inputs, 5, "the inputs after the checkpoint replay");
    assert_eq!(core.node_credential("n1"), Some("token 0123456789ab"), "bindings come back from the checkpoint");
    assert_eq!(core.identity_counters(), (0, 1), "the stale ticket after the eviction was refused on replay");
    let view = core.fleet_view();
    let n1 = view.nodes.iter().find(|n| n.id == "n1").expect("n1");
    assert_eq!(n1.state, "online", "{view:?}");
}

/// Whether `DROVER_WRITE_GOLDEN` asks for the golden directory `name` to be written.
fn write_golden(name: &str) -> bool {
    std::env::var("DROVER_WRITE_GOLDEN").is_ok_and(|v| v == name)
}

/// Writes `golden/journal`: `before` applied and checkpointed, then `after` journaled
/// behind the checkpoint (so recovery both restores and replays).
fn write_golden_journal(golden: &Path, before: &[drover_core::Input], after: &[drover_core::Input]) {
    use drover_core::{Config, Controller};
    use drover_journal::StateMachine;
    let _ = std::fs::remove_dir_all(golden);
    let (j, _) = Journal::open(JournalConfig::new(golden.join("journal")), Arc::new(FsStorage)).unwrap();
    let mut core = Controller::new(Config::default());
    let mut out = Vec::new();
    for input in before {
        j.append_blocking(drover_journal::machine::encode_input::<Controller>(input).unwrap()).unwrap().wait().unwrap();
        core.apply(input.clone(), &mut out);
    }
    j.checkpoint_blocking(core.checkpoint().unwrap()).unwrap();
    for input in after {
        j.append_blocking(drover_journal::machine::encode_input::<Controller>(input).unwrap()).unwrap().wait().unwrap();
    }
    j.close_blocking();
}
