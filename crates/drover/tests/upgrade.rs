//! Upgrades: data directories written by earlier releases open in this one.
//!
//! `tests/golden/format1/` was written by a real session of the last release before the
//! versioned durable format (commit 3e3ad98's `drover`, driven by
//! `DROVER_TEST_BIN=<that binary> DROVER_WRITE_GOLDEN=format1 cargo test -p drover
//! --test upgrade`): a controller, two streaming nodes and a worker, tokens, prices and
//! a task, then SIGKILL, so the directory holds checkpoints and records after the last
//! one. Next to the data directory, `state.json` is that release's own
//! `drover journal state --json` of it and `facts.json` what the session knew (the
//! task's id, the tokens' ids). This binary must recover the same state, serve it, and
//! migrate the directory to the current format on its first start. `tests/golden/format2/`
//! is the same session written by the release that introduced checkpoint format 2
//! (`DROVER_WRITE_GOLDEN=format2`, this tree's binary).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Controller, text, wait_until};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

/// Copies a directory tree (the golden directories are never written in place).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else if e.file_name() != "LOCK" && e.file_name() != "drover.lock" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

fn drover(args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::drover_bin()).args(args).output().unwrap()
}

/// Drives the session that writes a golden directory (`golden/format1` was written by
/// the old release's binary through `DROVER_TEST_BIN`).
fn write_session(out: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Controller::new(tmp.path(), &["--checkpoint-every", "40", "--keep-checkpoints", "4"]);
    c.start();
    let join = c.join_token();
    let read = c.cli(&["token", "create", "--role", "read", "--description", "golden reader"]);
    assert!(read.status.success(), "{}", text(&read));
    let _n1 = c.node(tmp.path(), "n1", &join, &["--id", "n1", "--pairs", "EURUSD,GBPUSD"]);
    let _n2 = c.node(tmp.path(), "n2", &join, &["--id", "n2", "--pairs", "EURUSD,USDJPY"]);
    let cache = tmp.path().join("jobs");
    let _w1 = c.node(
        tmp.path(),
        "w1",
        &join,
        &["--id", "w1", "--pairs", "AUDUSD", "--worker", "--cores", "2", "--job-cache", cache.to_str().unwrap()],
    );
    let priced = |c: &Controller| {
        let out = c.cli(&["prices", "--json"]);
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD"].iter().all(|p| s.contains(p))
    };
    assert!(wait_until(Duration::from_secs(30), || priced(&c)), "prices for every pair");
    let task = c.task_run(&["--", "/bin/echo", "golden"]);
    assert!(
        wait_until(Duration::from_secs(30), || text(&c.cli(&["task", "status", &task])).contains("completed")),
        "the task completes"
    );
    // Pinned: GBPUSD stays on n1 until unpinned.
    let pin = c.cli(&["stream", "--pairs", "GBPUSD", "n1"]);
    assert!(pin.status.success(), "{}", text(&pin));
    let tokens = json(&c.cli(&["token", "list", "--json"]));
    // A few more seconds of prices, then the controller dies without a final checkpoint.
    std::thread::sleep(Duration::from_secs(2));
    c.kill();
    let _ = std::fs::remove_dir_all(out);
    copy_tree(&c.data, &out.join("data"));
    let state = drover(&["journal", "state", "--json", out.join("data").to_str().unwrap()]);
    std::fs::write(out.join("state.json"), &state.stdout).unwrap();
    json(&state);
    let facts = serde_json::json!({ "task": task, "tokens": tokens });
    std::fs::write(out.join("facts.json"), serde_json::to_string_pretty(&facts).unwrap()).unwrap();
}

/// Every key of `want` has the same value in `got` (a later release may add fields).
fn assert_subset(want: &serde_json::Value, got: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, v) in w {
                let g = g.get(k).unwrap_or_else(|| panic!("{at}.{k} is missing"));
                assert_subset(v, g, &format!("{at}.{k}"));
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            assert_eq!(w.len(), g.len(), "{at}: length");
            for (i, (w, g)) in w.iter().zip(g).enumerate() {
                assert_subset(w, g, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(want, got, "{at}"),
    }
}

#[test]
fn a_data_directory_of_the_last_unversioned_release_opens_and_migrates() {
    check_golden("format1", 1);
}

/// The same session written by the release that introduced checkpoint format 2 (issue
/// 14): kept so that every later format change is checked against it.
#[test]
fn a_data_directory_of_checkpoint_format_2_opens() {
    check_golden("format2", 2);
}

/// Opens the golden directory `name`, whose checkpoints are of `format`, and checks
/// what it recovers to, field by field, then serves it from a copy.
fn check_golden(name: &str, format: u32) {
    let dir = golden(name);
    if std::env::var("DROVER_WRITE_GOLDEN").is_ok_and(|v| v == name) {
        write_session(&dir);
    }
    let data = dir.join("data");
    assert!(data.join("journal").is_dir(), "the golden directory is committed: {}", dir.display());
    let want: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    let facts: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("facts.json")).unwrap()).unwrap();

    // The tools read it in place, and this binary recovers exactly what the old one did.
    for tool in ["verify", "dump"] {
        let out = drover(&["journal", tool, data.to_str().unwrap()]);
        assert!(out.status.success(), "journal {tool}: {}", text(&out));
    }
    // The old release's checkpoints are what this binary's rules compute from the same
    // inputs (the upgrade what-if an operator runs before swapping binaries).
    let whatif = json(&drover(&["journal", "what-if", "--json", data.to_str().unwrap()]));
    assert_eq!(whatif["diverged"], serde_json::Value::Null, "{whatif}");
    assert!(whatif["matched"].as_array().is_some_and(|m| !m.is_empty()), "a checkpoint compared: {whatif}");
    let got = json(&drover(&["journal", "state", "--json", data.to_str().unwrap()]));
    assert_subset(&want, &got, "state");
    assert_eq!(newest_checkpoint_format(&data), format, "the golden directory's own format");
    // Field by field, what the session did.
    let node = |id: &str| got["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).cloned().unwrap();
    assert_eq!(node("n1")["known"], serde_json::json!(["EURUSD", "GBPUSD"]));
    assert_eq!(node("n2")["known"], serde_json::json!(["EURUSD", "USDJPY"]));
    assert_eq!(node("w1")["worker"], true);
    assert_eq!(node("w1")["cores"], 2);
    let pair = |p: &str| got["pairs"].as_array().unwrap().iter().find(|x| x["pair"] == p).cloned().unwrap();
    assert_eq!(pair("GBPUSD")["streamer"], "n1", "the pinned pair");
    assert_eq!(pair("USDJPY")["streamer"], "n2");
    assert_eq!(pair("AUDUSD")["streamer"], "w1");
    assert!(["n1", "n2"].contains(&pair("EURUSD")["streamer"].as_str().unwrap()));
    for p in ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD"] {
        assert!(pair(p)["price"].is_string(), "{p} has its last price: {got}");
    }
    let task = facts["task"].as_str().unwrap();
    let row = got["recent_tasks"].as_array().unwrap().iter().find(|t| t["id"] == task).cloned().unwrap();
    assert_eq!(
        (row["state"].as_str(), row["worker"].as_str(), row["exit_code"].as_i64()),
        (Some("completed"), Some("w1"), Some(0))
    );

    // A controller of this release serves it (from a copy), with the old tokens.
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Controller::new(tmp.path(), &[]);
    copy_tree(&data, &c.data);
    c.start();
    let tokens = json(&c.cli(&["token", "list", "--json"]));
    for old in facts["tokens"].as_array().unwrap() {
        let id = &old["id"];
        let now =
            tokens.as_array().unwrap().iter().find(|t| &t["id"] == id).unwrap_or_else(|| panic!("{id}: {tokens}"));
        assert_subset(&old["role"], &now["role"], "role");
        assert_subset(&old["description"], &now["description"], "description");
    }
    assert!(tokens.to_string().contains("golden reader"), "{tokens}");
    let logs = c.cli(&["task", "logs", task]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "golden\n", "{}", text(&logs));
    let nodes = text(&c.cli(&["nodes"]));
    for id in ["n1", "n2", "w1"] {
        assert!(nodes.contains(id), "{nodes}");
    }
    // The first start migrated the directory (if it was older): its newest checkpoint
    // is the current format.
    assert_eq!(newest_checkpoint_format(&c.data), drover_core::CHECKPOINT_FORMAT);
    // And it opens again after a restart (a SIGKILL: no final checkpoint).
    c.kill();
    c.start();
    let again = text(&c.cli(&["task", "status", task]));
    assert!(again.contains("completed"), "{again}");
}

/// The format of the newest checkpoint in `data`'s journal.
fn newest_checkpoint_format(data: &Path) -> u32 {
    let journal = data.join("journal");
    let mut names: Vec<_> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("checkpoint-") && n.ends_with(".ckpt"))
        .collect();
    names.sort();
    let file = std::fs::read(journal.join(names.last().expect("a checkpoint"))).unwrap();
    let (_, state) =
        drover_journal::checkpoint::decode(&file, committer(&journal), &Default::default()).expect("checkpoint");
    drover_core::checkpoint_format(&state).expect("a known format")
}

fn committer(journal: &Path) -> i32 {
    std::fs::read_to_string(journal.join("committer-id")).unwrap().trim().parse().unwrap()
}
