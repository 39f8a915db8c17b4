//! Helpers shared by the coordinator's byte-level tests: reading exact byte counts
//! from an application's connection, and golden directories (used on copies).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Reads exactly `n` bytes within 10 s.
pub async fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf)).await.expect("in time").expect("read");
    buf
}

/// Copies a directory tree (golden data directories are used on copies).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// `tests/golden/NAME` of this crate.
pub fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

/// Stores `from` as `tests/golden/NAME` (replacing it), without `leftovers` (paths
/// relative to it: a directory lock, addresses of this run's ports).
pub fn store_golden(name: &str, from: &Path, leftovers: &[&str]) -> PathBuf {
    let target = golden(name);
    let _ = std::fs::remove_dir_all(&target);
    copy_dir(from, &target);
    for f in leftovers {
        std::fs::remove_file(target.join(f)).ok();
    }
    target
}

/// A second application's two connections (made at `started`) are closed without a
/// byte sent to it, within 2 s (a restarted application gets a 250 ms grace).
pub async fn assert_refused(to: &mut TcpStream, from: &mut TcpStream, started: std::time::Instant) {
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), from.read_to_end(&mut rest)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "nothing is sent to the second application");
    let n = tokio::time::timeout(Duration::from_secs(5), to.read(&mut [0u8; 8])).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "its receive connection is closed too");
    assert!(started.elapsed() < Duration::from_secs(2), "refused promptly: {:?}", started.elapsed());
}
