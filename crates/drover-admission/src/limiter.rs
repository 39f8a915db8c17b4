//! A limit on failed authentications per address *and* presented credential: after
//! `max_failures` failures within `window_ms`, that pair is refused at once until the
//! oldest failure ages out. Keying on what was presented (a join token's public id, or
//! "malformed") as well as the address means one node with a bad token cannot lock
//! out good nodes behind the same address (a host, a NAT). The table is bounded; when
//! full, the key whose newest failure is oldest is forgotten.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// What failures are counted against: the peer's address and what it presented.
pub type Key = (IpAddr, String);

/// The limiter's table.
#[derive(Debug)]
pub struct FailureLimiter {
    window_ms: i64,
    max_failures: usize,
    max_addrs: usize,
    failures: HashMap<Key, VecDeque<i64>>,
}

impl FailureLimiter {
    /// At most `max_failures` failures per `window_ms` per address.
    pub fn new(max_failures: usize, window_ms: i64) -> Self {
        FailureLimiter { window_ms, max_failures: max_failures.max(1), max_addrs: 10_000, failures: HashMap::new() }
    }

    fn prune(&mut self, key: &Key, now_ms: i64) {
        if let Some(q) = self.failures.get_mut(key) {
            while q.front().is_some_and(|&t| now_ms - t >= self.window_ms) {
                q.pop_front();
            }
            if q.is_empty() {
                self.failures.remove(key);
            }
        }
    }

    /// Whether `key` may try now.
    pub fn allowed(&mut self, key: &Key, now_ms: i64) -> bool {
        self.prune(key, now_ms);
        self.failures.get(key).is_none_or(|q| q.len() < self.max_failures)
    }

    /// Records a failed attempt by `key`.
    pub fn failed(&mut self, key: Key, now_ms: i64) {
        self.prune(&key, now_ms);
        if !self.failures.contains_key(&key) && self.failures.len() >= self.max_addrs {
            let stalest = self.failures.iter().min_by_key(|(_, q)| q.back().copied()).map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                self.failures.remove(&k);
            }
        }
        let q = self.failures.entry(key).or_default();
        q.push_back(now_ms);
        while q.len() > self.max_failures {
            q.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_address_and_credential_and_recovers() {
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let bad = (a, "0123456789ab".to_owned());
        let mut l = FailureLimiter::new(3, 10_000);
        for t in 0..3 {
            assert!(l.allowed(&bad, t));
            l.failed(bad.clone(), t);
        }
        assert!(!l.allowed(&bad, 100), "fourth try within the window is refused");
        assert!(l.allowed(&(a, "ba9876543210".to_owned()), 100), "another credential from the same address is not");
        assert!(l.allowed(&(b, bad.1.clone()), 100), "nor the same credential from another address");
        assert!(l.allowed(&bad, 10_001), "the oldest failure aged out");
    }
}
