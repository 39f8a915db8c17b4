//! The Raft type configuration drover uses: node ids are `u64`, nodes are addresses,
//! and a normal entry carries the journal messages of the inputs it commits.

use std::io::Cursor;

/// A normal entry's data: the encoded input messages (each `size · type · data`, as
/// the single-controller journal holds them), applied in order. On the Raft port it
/// travels as bytes (one length and a copy: the same postcard bytes as a sequence of
/// `u8`, which costs a call per byte).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Inputs(#[serde(with = "serde_bytes")] pub Vec<u8>);

openraft::declare_raft_types!(
    /// drover's Raft types.
    pub TypeConfig:
        D = Inputs,
        R = (),
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::runtime::DroverRuntime,
);

/// A log id of ours.
pub type LogId = openraft::LogId<u64>;
/// An entry of ours.
pub type Entry = openraft::Entry<TypeConfig>;
/// A vote of ours.
pub type Vote = openraft::Vote<u64>;
/// A storage error of ours.
pub type StorageError = openraft::StorageError<u64>;
/// A membership of ours.
pub type Membership = openraft::Membership<u64, openraft::BasicNode>;

/// Where the result of a proposal arrives (`Raft::client_write_ff`).
pub type WriteReceiver =
    <<TypeConfig as openraft::RaftTypeConfig>::Responder as openraft::raft::responder::Responder<TypeConfig>>::Receiver;

#[cfg(test)]
mod tests {
    use super::Inputs;

    /// What the previous release sent: the derived encoding (a sequence of `u8`).
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Sequence(Vec<u8>);

    #[test]
    fn inputs_on_the_wire_are_the_bytes_a_sequence_of_u8_was() {
        for len in [0usize, 1, 127, 128, 300, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let now = postcard::to_stdvec(&Inputs(data.clone())).unwrap();
            let before = postcard::to_stdvec(&Sequence(data.clone())).unwrap();
            assert_eq!(now, before, "length {len}");
            assert_eq!(postcard::from_bytes::<Inputs>(&before).unwrap(), Inputs(data.clone()));
            assert_eq!(postcard::from_bytes::<Sequence>(&now).unwrap(), Sequence(data));
        }
    }
}
