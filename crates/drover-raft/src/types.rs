//! The Raft type configuration drover uses: node ids are `u64`, nodes are addresses,
//! and a normal entry carries the journal messages of the inputs it commits.

use std::io::Cursor;

/// A normal entry's data: the encoded input messages (each `size · type · data`, as
/// the single-controller journal holds them), applied in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Inputs(pub Vec<u8>);

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
