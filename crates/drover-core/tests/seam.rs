//! The core stays sans-IO (ARCHITECTURE.md, "The core does no I/O"): its dependency
//! closure holds no async runtime, no network stack and not the journal, and its
//! source names no file system, network or clock. These tests fail the build the day
//! someone adds one (tried: adding `tokio` to drover-core's dependencies fails the
//! first test).

use std::collections::BTreeSet;
use std::path::Path;

/// Crates the core must never link (directly or through another crate).
const FORBIDDEN_CRATES: &[&str] = &["tokio", "tonic", "hyper", "axum", "mio", "drover-journal"];

/// What the core's source must never name.
const FORBIDDEN_NAMES: &[&str] = &["std::fs", "std::net", "SystemTime", "Instant"];

#[test]
fn the_cores_dependency_closure_links_no_io_crate() {
    // `cargo tree -p drover-core` resolves features for drover-core alone, as a build
    // of it alone would (`cargo metadata` unifies features across the workspace, where
    // the shell turns on drover-proto's gRPC side). Normal edges only: dev-dependencies
    // are for tests, build dependencies run at build time and are not linked.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["tree", "-p", "drover-core", "-e", "normal", "--prefix", "none", "--format", "{p}", "--offline"])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let closure: BTreeSet<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    let bad: Vec<&&str> = closure.iter().filter(|n| FORBIDDEN_CRATES.contains(n)).collect();
    assert!(bad.is_empty(), "drover-core links {bad:?} (its closure: {closure:?})");
    assert!(
        closure.contains("drover-machine") && closure.contains("drover-proto"),
        "the closure was read: {closure:?}"
    );
}

#[test]
fn the_cores_source_names_no_file_system_network_or_clock() {
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    let mut files = 0;
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            files += 1;
            for name in FORBIDDEN_NAMES {
                assert!(!text.contains(name), "{} names {name}", path.display());
            }
        }
    }
    assert!(files >= 5, "the source was read ({files} files)");
}
