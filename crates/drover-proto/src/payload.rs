//! The dispatch table from a `google.protobuf.Any` type URL to a typed message.
//!
//! Every message that may travel inside an Any is listed once, in the `payloads!`
//! invocation below. Decoding an Any gives a [`Payload`]; a type URL that is not in the
//! table gives [`Payload::Unknown`], which the controller and the node answer with
//! `UnknownCommandV1Notify` while keeping the stream up. A known type URL whose bytes do
//! not decode is a [`PayloadError`].

use prost::{Message, Name};
use prost_types::Any;

use crate::v1;

/// The type URL of message `M`: `type.googleapis.com/drover.v1.<Name>`.
pub fn type_url<M: Name>() -> String {
    M::type_url()
}

/// A known type URL whose bytes are not a valid message of that type.
#[derive(Debug, thiserror::Error)]
#[error("malformed {type_url}: {source}")]
pub struct PayloadError {
    /// The type URL that was claimed.
    pub type_url: String,
    /// What prost said about the bytes.
    #[source]
    pub source: prost::DecodeError,
}

/// The full message name from a type URL: everything after the last `/`.
fn full_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

macro_rules! payloads {
    ($($variant:ident),* $(,)?) => {
        /// Every message drover sends inside an Any, plus `Unknown` for the rest.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Payload {
            $(
                #[allow(missing_docs)]
                $variant(v1::$variant),
            )*
            /// A type URL no table entry handles.
            Unknown {
                /// The type URL as received.
                type_url: String,
            },
        }

        impl Payload {
            /// Decodes an Any through the table.
            pub fn from_any(any: &Any) -> Result<Self, PayloadError> {
                let wrap = |source| PayloadError { type_url: any.type_url.clone(), source };
                Ok(match full_name(&any.type_url) {
                    $(
                        concat!("drover.v1.", stringify!($variant)) => {
                            Payload::$variant(v1::$variant::decode(any.value.as_slice()).map_err(wrap)?)
                        }
                    )*
                    _ => Payload::Unknown { type_url: any.type_url.clone() },
                })
            }

            /// Encodes the payload as an Any. `Unknown` becomes an empty Any with its
            /// type URL, so it can be relayed unchanged.
            pub fn to_any(&self) -> Any {
                match self {
                    $(
                        Payload::$variant(m) => Any {
                            type_url: <v1::$variant as Name>::type_url(),
                            value: m.encode_to_vec(),
                        },
                    )*
                    Payload::Unknown { type_url } => Any { type_url: type_url.clone(), value: Vec::new() },
                }
            }

            /// The short message name (`NodeStatusV1Req`), or the type URL if unknown.
            pub fn name(&self) -> &str {
                match self {
                    $( Payload::$variant(_) => stringify!($variant), )*
                    Payload::Unknown { type_url } => type_url,
                }
            }

            /// Whether the table has an entry for `type_url` (without decoding anything).
            pub fn knows(type_url: &str) -> bool {
                matches!(full_name(type_url), $( concat!("drover.v1.", stringify!($variant)) )|*)
            }
        }

        $(
            impl From<v1::$variant> for Payload {
                fn from(m: v1::$variant) -> Self {
                    Payload::$variant(m)
                }
            }
        )*

        /// Every table entry's full name, for tests and documentation.
        pub const TABLE: &[&str] = &[$(concat!("drover.v1.", stringify!($variant)),)*];
    };
}

payloads! {
    // seed 1: node commands, replies and notifications
    NodeStatusV1Req,
    NodeStatusV1Reply,
    NodeStreamModifyStateV1Req,
    NodeStreamModifyStateV1Reply,
    NodeShutdownV1Req,
    NodeShutdownV1Reply,
    NodeKnownCurrenciesV1Notify,
    NodePriceUpdateV1Notify,
    UnknownCommandV1Notify,
    NodeHeartbeatV1Notify,
    // seed 1: controller commands for the CLI
    ControllerListNodesV1Req,
    ControllerListNodesV1Reply,
    ControllerKickNodesV1Req,
    ControllerKickNodesV1Reply,
    ControllerAppVersionV1Req,
    ControllerAppVersionV1Reply,
    CliResponseCountV1Notify,
    ControllerDrainNodesV1Req,
    ControllerDrainNodesV1Reply,
    ControllerStreamPairsV1Req,
    ControllerStreamPairsV1Reply,
    ControllerPricesV1Req,
    ControllerPricesV1Reply,
    ControllerPriceV1Notify,
    ControllerTokenCreateV1Req,
    ControllerTokenCreateV1Reply,
    ControllerTokenListV1Req,
    ControllerTokenListV1Reply,
    ControllerTokenRevokeV1Req,
    ControllerTokenRevokeV1Reply,
    ControllerEvictNodesV1Req,
    ControllerEvictNodesV1Reply,
    ControllerForgetNodesV1Req,
    ControllerForgetNodesV1Reply,
    ControllerTaskRunV1Req,
    ControllerTaskRunV1Reply,
    ControllerTaskListV1Req,
    ControllerTaskListV1Reply,
    ControllerTaskStatusV1Req,
    ControllerTaskStatusV1Reply,
    ControllerTaskAbortV1Req,
    ControllerTaskAbortV1Reply,
    ControllerTaskLogsV1Req,
    ControllerTaskLogsV1Reply,
    // seed 2: manager/worker
    NodeTypeV1Req,
    NodeTypeV1Reply,
    ManagerV1Req,
    ManagerV1Reply,
    ManagerByeV1Req,
    ManagerPingV1Req,
    ManagerPongV1Reply,
    NotMineV1Reply,
    AckV1Reply,
    TasksExecuteV1Req,
    TasksRefusedV1Reply,
    TasksPingV1Req,
    TasksPongV1Reply,
    TasksAbortV1Req,
    TaskStartedV1Req,
    TaskErrorV1Req,
    TaskCompletedV1Req,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_url_has_the_google_prefix_and_version() {
        assert_eq!(type_url::<v1::NodeStatusV1Req>(), "type.googleapis.com/drover.v1.NodeStatusV1Req");
        for name in TABLE {
            assert!(name.contains("V1"), "{name} carries no version");
        }
    }

    #[test]
    fn round_trips_through_any() {
        let update = v1::NodePriceUpdateV1Notify {
            pair: "EURUSD".into(),
            price: Some(v1::Decimal { mantissa: 108_452, scale: 5 }),
            upstream_time_ms: 1_700_000_000_000,
            seq: 7,
            epoch: 3,
        };
        let any = Payload::from(update.clone()).to_any();
        assert_eq!(any.type_url, "type.googleapis.com/drover.v1.NodePriceUpdateV1Notify");
        assert_eq!(Payload::from_any(&any).unwrap(), Payload::NodePriceUpdateV1Notify(update));
    }

    #[test]
    fn unknown_type_url_is_a_value() {
        let any = Any { type_url: "type.googleapis.com/acme.Frobnicate".into(), value: vec![1, 2, 3] };
        assert_eq!(
            Payload::from_any(&any).unwrap(),
            Payload::Unknown { type_url: "type.googleapis.com/acme.Frobnicate".into() }
        );
    }

    #[test]
    fn known_type_url_with_garbage_is_an_error() {
        let any = Any { type_url: type_url::<v1::ControllerKickNodesV1Req>(), value: vec![0x0a, 0xff, 0xff] };
        let err = Payload::from_any(&any).unwrap_err();
        assert!(err.type_url.ends_with("ControllerKickNodesV1Req"));
    }

    #[test]
    fn every_table_entry_decodes_its_default() {
        for name in TABLE {
            let any = Any { type_url: format!("type.googleapis.com/{name}"), value: Vec::new() };
            let p = Payload::from_any(&any).unwrap();
            assert_eq!(format!("drover.v1.{}", p.name()), *name);
            assert_eq!(p.to_any().type_url, any.type_url);
        }
    }
}
