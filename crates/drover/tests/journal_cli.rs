//! `drover journal verify|dump` against real journals: a healthy one, a torn tail,
//! and a flipped bit in the middle.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use drover_journal::{FsStorage, Journal, JournalConfig, encode_entry};

fn drover(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_drover")).args(args).output().expect("run drover");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn write_journal(data_dir: &Path, records: u64) {
    let (j, _) = Journal::open(JournalConfig::new(data_dir.join("journal")), Arc::new(FsStorage)).unwrap();
    for v in 0..records {
        j.append_blocking(encode_entry(1, &v.to_le_bytes())).unwrap().wait().unwrap();
    }
    j.close_blocking();
}

fn segment(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("journal").join(drover_journal::segment_name(0))
}

#[test]
fn verify_and_dump_a_healthy_journal() {
    let tmp = tempfile::tempdir().unwrap();
    write_journal(tmp.path(), 5);
    let (ok, out) = drover(&["journal", "verify", tmp.path().to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("5 record(s)") && out.contains("journal OK"), "{out}");
    let (ok, out) = drover(&["journal", "dump", tmp.path().to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("seq        4") && out.contains("1x RPC"), "{out}");
    let (ok, out) = drover(&["journal", "dump", "--json", tmp.path().to_str().unwrap()]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["segments"][0]["records"].as_array().unwrap().len(), 5);
}

#[test]
fn verify_names_file_and_offset_of_damage() {
    let tmp = tempfile::tempdir().unwrap();
    write_journal(tmp.path(), 6);
    let seg = segment(tmp.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let record_len = bytes.len() / 6;
    bytes[2 * record_len + 30] ^= 1; // inside record 2's payload
    std::fs::write(&seg, &bytes).unwrap();
    let (ok, out) = drover(&["journal", "verify", tmp.path().to_str().unwrap()]);
    assert!(!ok, "damage must fail verify: {out}");
    let expected = format!("DAMAGED (corruption) {} at byte {}", seg.display(), 2 * record_len);
    assert!(out.contains(&expected), "wanted {expected:?} in:\n{out}");

    // A torn tail is reported as such, and verify changes nothing.
    let tmp = tempfile::tempdir().unwrap();
    write_journal(tmp.path(), 3);
    let seg = segment(tmp.path());
    let bytes = std::fs::read(&seg).unwrap();
    std::fs::write(&seg, &bytes[..bytes.len() - 3]).unwrap();
    let (ok, out) = drover(&["journal", "verify", tmp.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("DAMAGED (torn-tail)"), "{out}");
    assert_eq!(std::fs::read(&seg).unwrap().len(), bytes.len() - 3, "verify must not repair");
}
