//! Shell completions and the man page are generated from the real command tree.

use std::process::Command;

fn drover(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_drover")).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_for_every_shell_know_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let script = drover(&["completions", shell]);
        for sub in ["controller", "node", "nodes", "token", "evict", "journal"] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
}

#[test]
fn man_page_is_roff_with_the_commands() {
    let man = drover(&["man"]);
    assert!(man.contains(".TH drover 1"), "{man}");
    assert!(man.contains("controller") && man.contains("completions"));
}

#[test]
fn cluster_secret_prints_64_fresh_hex_digits() {
    let a = drover(&["cluster", "secret"]);
    let b = drover(&["cluster", "secret"]);
    for s in [&a, &b] {
        let t = s.trim();
        assert!(t.len() == 64 && t.bytes().all(|c| c.is_ascii_hexdigit()), "{s}");
    }
    assert_ne!(a, b, "a new secret each time");
}
