//! The controller's durable format: how its inputs and checkpoints become bytes, which
//! versions this binary reads, and how two states are compared part by part.
//!
//! The encoding is postcard over the core's own types, with the version kept outside
//! the types (ARCHITECTURE.md, "Durable format", has the rule for changing it):
//!
//! - **Inputs** are format [`INPUT_FORMAT`], stored by the journal as each entry's
//!   method id. Format 1 is `Input` as every release so far wrote it: variants are only
//!   ever appended (postcard writes the variant's index, so older inputs keep their
//!   meaning). Any other change to `Input` makes a format 2: the format-1 type is then
//!   frozen in a module of its own and `decode_logged_input` converts it.
//! - **Checkpoints** of format 2 (this release) start with [`MAGIC`] and the format
//!   number (u32 LE), then the state and the node identities. A checkpoint without the
//!   magic is format 1 (releases before the versioned format): the state, then the
//!   identities as an optional trailing section (absent before the hardening release).
//!   The magic's first ten bytes, all 0xFF, are an overlong varint: a release of format
//!   1, which decodes the state from byte 0, fails on them at once instead of
//!   misreading a newer checkpoint.

use std::collections::BTreeMap;
use std::fmt::Debug;

use drover_machine::{DecodeError, Divergence, EncodeError, StateMachine};

use super::Controller;
use crate::input::{Input, Output};

/// The input format this binary writes (the journal entry's method id).
pub const INPUT_FORMAT: u32 = 1;
/// The checkpoint format this binary writes.
pub const CHECKPOINT_FORMAT: u32 = 2;
/// How a checkpoint of format 2 or later starts.
pub const MAGIC: [u8; 16] = *b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xffdrover";

/// The format of a checkpoint's bytes (1 for a checkpoint without the magic). Does not
/// say whether this binary reads it: `restore` does.
pub fn checkpoint_format(bytes: &[u8]) -> Result<u32, DecodeError> {
    match bytes.strip_prefix(&MAGIC) {
        None => Ok(1),
        Some(rest) => {
            let v = rest.get(..4).ok_or_else(|| DecodeError("checkpoint ends inside its format number".into()))?;
            Ok(u32::from_le_bytes(v.try_into().expect("4 bytes")))
        }
    }
}

impl StateMachine for Controller {
    type Input = Input;
    type Output = Output;
    const INPUT_FORMAT: u32 = INPUT_FORMAT;

    fn apply(&mut self, input: Input, out: &mut Vec<Output>) {
        self.handle(input, out);
    }

    fn encode_input(input: &Input, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
        let bytes = postcard::to_stdvec(input).map_err(|e| EncodeError(format!("input: {e}")))?;
        buf.extend_from_slice(&bytes);
        Ok(())
    }

    fn decode_input(bytes: &[u8]) -> Result<Input, DecodeError> {
        postcard::from_bytes(bytes).map_err(|e| DecodeError(e.to_string()))
    }

    fn checkpoint(&self) -> Result<Vec<u8>, EncodeError> {
        let mut bytes = Vec::with_capacity(4096);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&CHECKPOINT_FORMAT.to_le_bytes());
        let body = postcard::to_extend(&(self, &self.ids), bytes).map_err(|e| EncodeError(format!("state: {e}")))?;
        Ok(body)
    }

    fn restore(bytes: &[u8]) -> Result<Self, DecodeError> {
        match checkpoint_format(bytes)? {
            1 => restore_format1(bytes),
            2 => {
                let body = &bytes[MAGIC.len() + 4..];
                let (mut c, ids): (Controller, super::identity::Identities) =
                    postcard::from_bytes(body).map_err(|e| DecodeError(format!("checkpoint format 2: {e}")))?;
                c.ids = ids;
                c.config = c.config.bounded();
                Ok(c)
            }
            v => Err(DecodeError::unknown_format("checkpoint", v, CHECKPOINT_FORMAT)),
        }
    }
}

/// Format 1: the state from byte 0, then (since the hardening release) the node
/// identities. Its types are today's: nothing in them changed since format 1 was last
/// written. When one does, the format-1 shape moves here as types of its own.
fn restore_format1(bytes: &[u8]) -> Result<Controller, DecodeError> {
    let (mut c, rest): (Controller, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| DecodeError(format!("checkpoint format 1: {e}")))?;
    if !rest.is_empty() {
        c.ids = postcard::from_bytes(rest).map_err(|e| DecodeError(format!("checkpoint format 1, identities: {e}")))?;
    }
    c.config = c.config.bounded();
    Ok(c)
}

/// Longest value shown in a difference.
const SHOWN: usize = 400;

/// `what` when `a` and `b` differ, with both (shortened).
pub(crate) fn differs<T: PartialEq + Debug>(what: &str, a: &T, b: &T) -> Option<String> {
    (a != b).then(|| {
        let show = |v: &T| {
            let s = format!("{v:?}");
            if s.len() > SHOWN {
                let cut = (0..=SHOWN).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                format!("{}…", &s[..cut])
            } else {
                s
            }
        };
        format!("{what}: {} here, {} there", show(a), show(b))
    })
}

/// The first key of two maps whose entries differ, named `kind key`.
pub(crate) fn map_differs<K: Ord + Debug, V: PartialEq + Debug>(
    kind: &str,
    a: &BTreeMap<K, V>,
    b: &BTreeMap<K, V>,
) -> Option<String> {
    let keys: std::collections::BTreeSet<&K> = a.keys().chain(b.keys()).collect();
    keys.into_iter().find_map(|k| differs(&format!("{kind} {k:?}"), &a.get(k), &b.get(k)))
}

impl Divergence for Controller {
    fn first_difference(&self, other: &Self) -> Option<String> {
        let (a, b) = (self, other);
        None.or_else(|| differs("config", &a.config, &b.config))
            .or_else(|| map_differs("node", &a.nodes, &b.nodes))
            .or_else(|| map_differs("pair", &a.pairs, &b.pairs))
            .or_else(|| map_differs("token", &a.tokens, &b.tokens))
            .or_else(|| a.tasks.first_difference(&b.tasks))
            .or_else(|| a.ids.first_difference(&b.ids))
            .or_else(|| map_differs("CLI session", &a.clis, &b.clis))
            .or_else(|| map_differs("pending reply", &a.pending, &b.pending))
            .or_else(|| differs("counters", &a.counters, &b.counters))
            .or_else(|| differs("next request id", &a.next_request, &b.next_request))
            .or_else(|| differs("rejoin grace", &a.grace_until_ms, &b.grace_until_ms))
            .or_else(|| differs("clock", &a.now_ms, &b.now_ms))
            .or_else(|| differs("generator", &a.rng, &b.rng))
            .or_else(|| (a != b).then(|| "the state (in a part not named above)".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{Config, Event};

    fn some_state() -> Controller {
        let mut c = Controller::new(Config::default());
        let mut out = Vec::new();
        c.apply(Input { at_ms: 1_000, event: Event::ControllerStarted { config: Config::default() } }, &mut out);
        c.apply(Input { at_ms: 2_000, event: Event::NodeConnected { node: "n1".into(), session: 1 } }, &mut out);
        c
    }

    #[test]
    fn a_checkpoint_names_its_format_and_restores() {
        let c = some_state();
        let bytes = c.checkpoint().unwrap();
        assert_eq!(checkpoint_format(&bytes), Ok(CHECKPOINT_FORMAT));
        assert_eq!(Controller::restore(&bytes).unwrap(), c);
    }

    #[test]
    fn a_format_1_checkpoint_still_restores() {
        let c = some_state();
        for with_ids in [false, true] {
            let mut bytes = postcard::to_stdvec(&c).unwrap();
            if with_ids {
                bytes.extend_from_slice(&postcard::to_stdvec(&c.ids).unwrap());
            }
            assert_eq!(checkpoint_format(&bytes), Ok(1));
            assert_eq!(Controller::restore(&bytes).unwrap(), c);
        }
    }

    #[test]
    fn a_newer_checkpoint_is_refused_naming_both_formats() {
        let mut bytes = some_state().checkpoint().unwrap();
        bytes[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&3u32.to_le_bytes());
        let err = Controller::restore(&bytes).unwrap_err().to_string();
        assert!(err.contains("checkpoint format 3") && err.contains("writes format 2"), "{err}");
    }

    #[test]
    fn a_format_1_reader_fails_on_a_format_2_checkpoint_instead_of_misreading_it() {
        // What every release before the versioned format does with a checkpoint.
        let bytes = some_state().checkpoint().unwrap();
        let err = postcard::take_from_bytes::<Controller>(&bytes).unwrap_err();
        assert_eq!(err, postcard::Error::DeserializeBadVarint, "the overlong varint stops it at byte 0");
    }

    #[test]
    fn a_newer_input_format_is_refused_naming_both() {
        let err = Controller::decode_logged_input(2, &[]).unwrap_err().to_string();
        assert!(err.contains("input format 2") && err.contains("writes format 1"), "{err}");
    }

    #[test]
    fn differences_are_named_by_part() {
        let a = some_state();
        assert_eq!(a.first_difference(&a.clone()), None);
        let mut b = a.clone();
        b.nodes.get_mut("n1").unwrap().name = "renamed".into();
        let d = a.first_difference(&b).unwrap();
        assert!(d.starts_with("node \"n1\""), "{d}");
    }
}
