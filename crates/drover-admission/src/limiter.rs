//! A per-address limit on failed authentications: after `max_failures` failures
//! within `window_ms`, an address is refused at once until the oldest failure ages
//! out. The table is bounded; when full, the address whose newest failure is oldest
//! is forgotten.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// The limiter's table.
#[derive(Debug)]
pub struct FailureLimiter {
    window_ms: i64,
    max_failures: usize,
    max_addrs: usize,
    failures: HashMap<IpAddr, VecDeque<i64>>,
}

impl FailureLimiter {
    /// At most `max_failures` failures per `window_ms` per address.
    pub fn new(max_failures: usize, window_ms: i64) -> Self {
        FailureLimiter { window_ms, max_failures: max_failures.max(1), max_addrs: 10_000, failures: HashMap::new() }
    }

    fn prune(&mut self, addr: IpAddr, now_ms: i64) {
        if let Some(q) = self.failures.get_mut(&addr) {
            while q.front().is_some_and(|&t| now_ms - t >= self.window_ms) {
                q.pop_front();
            }
            if q.is_empty() {
                self.failures.remove(&addr);
            }
        }
    }

    /// Whether `addr` may try now.
    pub fn allowed(&mut self, addr: IpAddr, now_ms: i64) -> bool {
        self.prune(addr, now_ms);
        self.failures.get(&addr).is_none_or(|q| q.len() < self.max_failures)
    }

    /// Records a failed attempt from `addr`.
    pub fn failed(&mut self, addr: IpAddr, now_ms: i64) {
        self.prune(addr, now_ms);
        if !self.failures.contains_key(&addr) && self.failures.len() >= self.max_addrs {
            let stalest = self.failures.iter().min_by_key(|(_, q)| q.back().copied()).map(|(a, _)| *a);
            if let Some(a) = stalest {
                self.failures.remove(&a);
            }
        }
        let q = self.failures.entry(addr).or_default();
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
    fn limits_per_address_and_recovers() {
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let mut l = FailureLimiter::new(3, 10_000);
        for t in 0..3 {
            assert!(l.allowed(a, t));
            l.failed(a, t);
        }
        assert!(!l.allowed(a, 100), "fourth try within the window is refused");
        assert!(l.allowed(b, 100), "other addresses are unaffected");
        assert!(l.allowed(a, 10_001), "the oldest failure aged out");
    }
}
