//! Rate-limited log lines: at most one line per kind and peer address per interval,
//! carrying the count of the lines it stands for. A peer that can make the controller
//! log (refused streams, bad tokens, oversized messages, failed accepts) must not be
//! able to fill the disk or drown the lines that matter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// How often one kind of line may be written per peer address.
pub(crate) const LOG_EVERY_MS: i64 = 10_000;

/// Most (kind, address) keys remembered; past it the table starts over (a flood from
/// many addresses then logs one line per address, still bounded by the table size).
const MAX_KEYS: usize = 4096;

/// A kind of line and the peer it is about (`None`: not about one peer).
type Key = (&'static str, Option<IpAddr>);

/// The table of what was logged when, shared by every task that logs peer-caused lines.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    /// (kind, address) → (when the last line was written, events since it).
    seen: Mutex<HashMap<Key, (i64, u64)>>,
}

impl LogLimiter {
    /// Whether a line of `kind` about `peer` may be written now; if so, how many events
    /// it stands for (this one and those suppressed since the last line).
    pub(crate) fn admit(&self, kind: &'static str, peer: Option<IpAddr>, now_ms: i64) -> Option<u64> {
        let Ok(mut seen) = self.seen.lock() else { return Some(1) };
        if seen.len() >= MAX_KEYS && !seen.contains_key(&(kind, peer)) {
            seen.clear();
        }
        let entry = seen.entry((kind, peer)).or_insert((i64::MIN / 2, 0));
        entry.1 += 1;
        if now_ms - entry.0 >= LOG_EVERY_MS {
            let count = entry.1;
            *entry = (now_ms, 0);
            Some(count)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_per_kind_and_peer_with_the_count() {
        let l = LogLimiter::default();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(l.admit("refused", Some(a), 0), Some(1));
        for t in 1..100 {
            assert_eq!(l.admit("refused", Some(a), t), None);
        }
        assert_eq!(l.admit("refused", Some(b), 100), Some(1), "another peer has its own budget");
        assert_eq!(l.admit("oversize", Some(a), 100), Some(1), "another kind too");
        assert_eq!(l.admit("refused", Some(a), LOG_EVERY_MS), Some(100), "the next line counts the suppressed ones");
    }
}
