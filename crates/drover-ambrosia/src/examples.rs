//! Two small services, shipped so the coordinator can be tried without writing code
//! (`drover coordinator example hello|counter`) and read as examples of [`Service`].

use crate::{Outbox, Service};

/// Method ids of the examples.
pub mod methods {
    /// The initial call at first start.
    pub const INITIAL: i32 = 0;
    /// A greeting (hello) or one increment (counter).
    pub const STEP: i32 = 1;
}

/// Calls itself once at first start and prints what it received.
#[derive(Debug, Default)]
pub struct Hello {
    /// Messages received so far.
    pub received: Vec<String>,
}

impl Service for Hello {
    fn on_call(&mut self, method: i32, args: &[u8], out: &mut Outbox) {
        match method {
            methods::INITIAL => out.call_self(methods::STEP, b"hello from drover-ambrosia"),
            methods::STEP => {
                let text = String::from_utf8_lossy(args).into_owned();
                println!("received: {text}");
                self.received.push(text);
            }
            _ => {}
        }
    }

    fn checkpoint(&self) -> Vec<u8> {
        self.received.join("\n").into_bytes()
    }

    fn restore(&mut self, bytes: &[u8]) {
        self.received = if bytes.is_empty() {
            Vec::new()
        } else {
            String::from_utf8_lossy(bytes).split('\n').map(str::to_owned).collect()
        };
    }
}

/// Counts to a target by calling itself once per step: a call lost or repeated
/// anywhere shows up as a final count other than the target.
#[derive(Debug, Default)]
pub struct Counter {
    /// Calls handled.
    pub count: u64,
    /// Where it stops.
    pub target: u64,
}

impl Service for Counter {
    fn on_call(&mut self, method: i32, args: &[u8], out: &mut Outbox) {
        match method {
            methods::INITIAL => {
                self.target = args.try_into().map(u64::from_le_bytes).unwrap_or(0);
                if self.target > 0 {
                    out.call_self(methods::STEP, &[]);
                }
            }
            methods::STEP => {
                self.count += 1;
                println!("count {}", self.count);
                if self.count < self.target {
                    out.call_self(methods::STEP, &[]);
                } else if self.count == self.target {
                    println!("done {}", self.count);
                }
            }
            _ => {}
        }
    }

    fn checkpoint(&self) -> Vec<u8> {
        progress_bytes(self.count, self.target)
    }

    fn restore(&mut self, bytes: &[u8]) {
        (self.count, self.target) = progress_from(bytes);
        println!("restored {}", self.count);
    }

    /// The state's layout is the same in every version: an upgrade only says so.
    fn upgrade(&mut self) {
        println!("upgraded at {}", self.count);
    }
}

/// The service side of a pair across two coordinators: counts the `add` calls it gets
/// and acknowledges each to the caller's instance with the new count.
#[derive(Debug, Default)]
pub struct PairServer {
    /// `add` calls handled.
    pub count: u64,
}

/// Method ids of the pair.
pub mod pair {
    /// client → server: add one (args: the caller's instance name).
    pub const ADD: i32 = 1;
    /// server → client: the server's count after the add (8 bytes, little-endian).
    pub const ACK: i32 = 2;
}

impl Service for PairServer {
    fn on_call(&mut self, method: i32, args: &[u8], out: &mut Outbox) {
        if method == pair::ADD {
            self.count += 1;
            println!("count {}", self.count);
            let caller = String::from_utf8_lossy(args).into_owned();
            out.call(&caller, pair::ACK, &self.count.to_le_bytes());
        }
    }

    fn checkpoint(&self) -> Vec<u8> {
        self.count.to_le_bytes().to_vec()
    }

    fn restore(&mut self, bytes: &[u8]) {
        self.count = bytes.try_into().map(u64::from_le_bytes).unwrap_or(0);
        println!("restored {}", self.count);
    }
}

/// The client side: sends `add` to the server instance, one at a time, until `target`
/// acknowledgements came back.
#[derive(Debug, Default)]
pub struct PairClient {
    /// This instance's name (where acknowledgements go).
    pub own: String,
    /// The server instance.
    pub server: String,
    /// Acknowledgements received.
    pub acks: u64,
    /// Where it stops.
    pub target: u64,
}

impl Service for PairClient {
    fn on_call(&mut self, method: i32, args: &[u8], out: &mut Outbox) {
        match method {
            methods::INITIAL => {
                self.target = args.try_into().map(u64::from_le_bytes).unwrap_or(0);
                if self.target > 0 {
                    out.call(&self.server, pair::ADD, self.own.as_bytes());
                }
            }
            pair::ACK => {
                self.acks += 1;
                let server_count = args.try_into().map(u64::from_le_bytes).unwrap_or(0);
                println!("ack {} server {server_count}", self.acks);
                if self.acks < self.target {
                    out.call(&self.server, pair::ADD, self.own.as_bytes());
                } else if self.acks == self.target {
                    println!("done {}", self.acks);
                }
            }
            _ => {}
        }
    }

    fn checkpoint(&self) -> Vec<u8> {
        progress_bytes(self.acks, self.target)
    }

    fn restore(&mut self, bytes: &[u8]) {
        (self.acks, self.target) = progress_from(bytes);
        println!("restored {}", self.acks);
    }
}

/// A checkpoint of progress towards a target: two little-endian u64s.
fn progress_bytes(done: u64, target: u64) -> Vec<u8> {
    let mut out = done.to_le_bytes().to_vec();
    out.extend_from_slice(&target.to_le_bytes());
    out
}

/// Reads `progress_bytes` (a missing word reads as 0).
fn progress_from(bytes: &[u8]) -> (u64, u64) {
    let word = |i: usize| bytes.get(i..i + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
    (word(0), word(8))
}
