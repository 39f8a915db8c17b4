//! Fencing: a node obeys no command from a leader older than one it has obeyed.
//!
//! A cluster's leader stamps every command it sends with its leader id, the pair
//! (term, member id) that openraft orders term first (`docs/protocol.md`, "Fencing").
//! A deposed leader cannot commit anything new, but commands it committed before it
//! was deposed may still be in flight when the node already follows the next leader:
//! those are refused here. A command without a fence (a controller on its own) is
//! always obeyed; the highest fence seen is kept for the node process's life, across
//! reconnections.

use drover_proto::v1;

/// The highest leader id a node has obeyed.
#[derive(Debug, Default)]
pub struct Fence {
    highest: Option<(u64, u64)>,
}

/// A command from a leader older than one already obeyed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("command from leader (term {term}, member {member}) refused: leader (term {}, member {}) was already obeyed", .obeyed.0, .obeyed.1)]
pub struct Stale {
    /// The command's term.
    pub term: u64,
    /// The command's leader.
    pub member: u64,
    /// The highest (term, member) obeyed so far.
    pub obeyed: (u64, u64),
}

impl Fence {
    /// Whether a command carrying `fence` may be obeyed; if so, it is remembered.
    pub fn admit(&mut self, fence: Option<&v1::LeaderFence>) -> Result<(), Stale> {
        let Some(f) = fence else { return Ok(()) };
        let id = (f.term, f.member);
        match self.highest {
            Some(h) if id < h => Err(Stale { term: f.term, member: f.member, obeyed: h }),
            _ => {
                self.highest = Some(id);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(term: u64, member: u64) -> v1::LeaderFence {
        v1::LeaderFence { term, member }
    }

    #[test]
    fn older_leaders_are_refused_newer_and_equal_obeyed_unfenced_always() {
        let mut fence = Fence::default();
        assert_eq!(fence.admit(Some(&f(3, 2))), Ok(()));
        assert_eq!(fence.admit(Some(&f(3, 2))), Ok(()), "the same leader again");
        // Term first: a later term wins whatever the member.
        assert_eq!(fence.admit(Some(&f(4, 1))), Ok(()));
        assert_eq!(fence.admit(Some(&f(3, 3))), Err(Stale { term: 3, member: 3, obeyed: (4, 1) }));
        // Two leaders of one term (openraft's default mode): the greater member wins.
        assert_eq!(fence.admit(Some(&f(4, 0))), Err(Stale { term: 4, member: 0, obeyed: (4, 1) }));
        assert_eq!(fence.admit(Some(&f(4, 2))), Ok(()));
        assert_eq!(fence.admit(Some(&f(4, 1))), Err(Stale { term: 4, member: 1, obeyed: (4, 2) }));
        // A controller on its own sends no fence.
        assert_eq!(fence.admit(None), Ok(()));
        assert!(Fence::default().admit(None).is_ok());
    }
}
