//! Upgrade what-if runs on the controller: a journal replayed by the same rules
//! matches every checkpoint; replayed by a build whose rule changed on purpose, it is
//! caught at the record where the change first shows, naming the part of the state.
//!
//! The changed rule is a test-only machine: the real controller, except that a
//! stream ending no longer makes node "n2" gone (as a release that broke the rule
//! would). Everything else, journal, checkpoints and comparison, is the real thing.

use std::sync::Arc;

use drover_core::{Config, Controller, Event, Input, Output};
use drover_journal::whatif::what_if;
use drover_journal::{Divergence, Journal, JournalConfig, MemStorage, Storage, machine::encode_input};
use drover_machine::{DecodeError, EncodeError, StateMachine};
use drover_proto::v1;

/// The controller with one rule changed.
#[derive(Debug)]
struct Changed(Controller);

impl StateMachine for Changed {
    type Input = Input;
    type Output = Output;
    const INPUT_FORMAT: u32 = Controller::INPUT_FORMAT;

    fn apply(&mut self, input: Input, out: &mut Vec<Output>) {
        if let Event::NodeDisconnected { node, .. } = &input.event
            && node == "n2"
        {
            return;
        }
        self.0.apply(input, out);
    }
    fn encode_input(input: &Input, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
        Controller::encode_input(input, buf)
    }
    fn decode_input(bytes: &[u8]) -> Result<Input, DecodeError> {
        Controller::decode_input(bytes)
    }
    fn checkpoint(&self) -> Result<Vec<u8>, EncodeError> {
        self.0.checkpoint()
    }
    fn restore(bytes: &[u8]) -> Result<Self, DecodeError> {
        Controller::restore(bytes).map(Changed)
    }
}

impl Divergence for Changed {
    fn first_difference(&self, other: &Self) -> Option<String> {
        self.0.first_difference(&other.0)
    }
}

/// A journal of a short session with a checkpoint after every `every` records; returns
/// the config and the sequence id of n2's disconnect.
fn session(storage: &Arc<dyn Storage>, every: usize) -> (JournalConfig, i64) {
    // Every checkpoint kept, so the run can start from the first one.
    let config = JournalConfig { keep_checkpoints: 1_000, ..JournalConfig::new("/whatif") };
    let (j, _) = Journal::open(config.clone(), storage.clone()).unwrap();
    let hello = |name: &str| v1::NodeKnownCurrenciesV1Notify {
        pairs: vec!["EURUSD".into()],
        name: name.into(),
        version: "1.0.0".into(),
        worker: false,
    };
    let mut events = vec![
        Event::ControllerStarted { config: Config::default() },
        Event::NodeConnected { node: "n1".into(), session: 1 },
        Event::node_message("n1", 1, "", hello("n1")),
        Event::NodeConnected { node: "n2".into(), session: 2 },
        Event::node_message("n2", 2, "", hello("n2")),
    ];
    events.extend((0..5).map(|_| Event::Tick));
    let disconnect_at = events.len();
    events.push(Event::NodeDisconnected { node: "n2".into(), session: 2 });
    events.extend((0..5).map(|_| Event::Tick));
    let mut core = Controller::new(Config::default());
    let mut out = Vec::new();
    let mut disconnect_seq = -1;
    for (i, event) in events.into_iter().enumerate() {
        let input = Input { at_ms: 1_000 + i as i64 * 100, event };
        let at = j.append_blocking(encode_input::<Controller>(&input).unwrap()).unwrap().wait().unwrap();
        if i == disconnect_at {
            disconnect_seq = at.seq;
        }
        core.apply(input, &mut out);
        if (i + 1) % every == 0 {
            j.checkpoint_blocking(core.checkpoint().unwrap()).unwrap();
        }
    }
    j.close_blocking();
    (config, disconnect_seq)
}

#[test]
fn the_same_rules_match_every_checkpoint() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let (config, _) = session(&storage, 1);
    let report = what_if(&config, &storage, || Controller::new(Config::default())).unwrap();
    assert_eq!(report.diverged, None, "{report:?}");
    assert_eq!(report.start_seq, 1, "from the first checkpoint: {report:?}");
    assert_eq!(report.matched.len(), 15, "every later checkpoint compared: {report:?}");
    assert!(report.matched.iter().all(|i| i.inputs == 1), "one input per stretch: {report:?}");
    assert_eq!(report.unchecked_inputs, 0);
}

#[test]
fn a_changed_rule_is_caught_at_the_record_it_first_shows_in() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let (config, disconnect_seq) = session(&storage, 1);
    let report = what_if(&config, &storage, || Changed(Controller::new(Config::default()))).unwrap();
    let d = report.diverged.expect("the changed rule diverges");
    assert_eq!(d.interval.first_seq, disconnect_seq, "{d:?}");
    assert_eq!(d.interval.checkpoint_seq, disconnect_seq + 1, "{d:?}");
    assert!(d.part.starts_with("node \"n2\""), "{}", d.part);
}
