//! The operator CLI's logic: [`client`] talks to the controller; [`commands`] turns
//! replies into tables or JSON and decides the exit status (success only when every
//! expected reply came).

pub mod client;
pub mod commands;
pub mod tasks;

pub use client::{CliError, Ctx, Outcome, Reply, Session, request};

/// `s` as it is safe to print on a terminal: control characters (ESC, CR, LF, BEL …)
/// that a node or a token's creator put into a name, a version, a reason or an id are
/// shown escaped (`\u{1b}`), so they cannot forge table rows, clear the screen or set
/// the terminal's title. JSON output needs no such care (serde escapes them).
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped_and_the_rest_is_left_alone() {
        assert_eq!(super::printable("node-1 ünï"), "node-1 ünï");
        let evil = "x\u{1b}]0;pwned\u{7}\r\nFAKE  online";
        let shown = super::printable(evil);
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert_eq!(shown, "x\\u{1b}]0;pwned\\u{7}\\r\\nFAKE  online");
    }
}
