//! The hello service: calls itself once at first start and prints what it received.
//!
//! ```sh
//! drover coordinator register --instance hello --log-dir /tmp/amb
//! drover coordinator --instance hello --log-dir /tmp/amb --receive-port 2000 --send-port 2001 &
//! cargo run -p drover-ambrosia --example hello -- 2000 2001
//! ```

use drover_ambrosia::{Connection, examples::Hello};

#[tokio::main]
async fn main() {
    let port = |i: usize, d: u16| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let connection = Connection::listening_coordinator(port(1, 2000), port(2, 2001));
    let mut hello = Hello::default();
    if let Err(e) = drover_ambrosia::run(&mut hello, connection, 0, b"").await {
        eprintln!("hello: {e}");
        std::process::exit(1);
    }
}
