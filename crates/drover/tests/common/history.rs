//! A linearizability checker for the one object the HA chaos scenarios drive through
//! the CLI while leaders die: the set of tokens (a grow-only set: `token create` adds
//! a description, `token list` reads the whole set). Every operation is recorded with
//! its invocation and response time (a failed or timed-out add has no response: it may
//! or may not have happened).
//!
//! A history of a grow-only set with whole-set reads is linearizable only if:
//! 1. a read contains every add acknowledged before the read was invoked (nothing
//!    acknowledged is lost, no read is stale);
//! 2. a read contains only adds invoked before the read returned (nothing appears
//!    from nowhere or from the future);
//! 3. a read that follows another in real time contains everything the first saw
//!    (nothing, acknowledged or not, disappears once seen);
//! 4. all reads form a chain under inclusion: two reads that each saw an add the other
//!    did not would need each add ordered before the other.
//!
//! Wing and Gong's search is unnecessary for this object: a violation of any rule is a
//! proof the history is not linearizable, and each is checked directly, in
//! O(reads² + reads × adds) set operations.

use std::collections::BTreeSet;

/// One recorded operation; times in microseconds since the run began.
#[derive(Clone, Debug)]
pub struct Op {
    pub invoked: u64,
    /// `None`: no answer (an error or a timeout): the add may or may not have happened.
    pub returned: Option<u64>,
    pub kind: Kind,
}

#[derive(Clone, Debug)]
pub enum Kind {
    /// An add of this element.
    Add(String),
    /// A read, and the elements it returned.
    Read(BTreeSet<String>),
}

/// Checks `history`; `Err` names the first rule broken and the operations involved.
pub fn check(history: &[Op]) -> Result<(), String> {
    let adds: Vec<(&Op, &String)> =
        history.iter().filter_map(|o| if let Kind::Add(e) = &o.kind { Some((o, e)) } else { None }).collect();
    let reads: Vec<(&Op, &BTreeSet<String>, u64)> = history
        .iter()
        .filter_map(|o| match (&o.kind, o.returned) {
            (Kind::Read(s), Some(r)) => Some((o, s, r)),
            _ => None,
        })
        .collect();
    for &(read, seen, returned) in &reads {
        for &(add, element) in &adds {
            if add.returned.is_some_and(|r| r < read.invoked) && !seen.contains(element) {
                return Err(format!(
                    "rule 1 (lost or stale): {element:?} was acknowledged at {} us, the read invoked at {} us does not have it",
                    add.returned.unwrap_or_default(),
                    read.invoked
                ));
            }
        }
        for element in seen {
            let invoked = adds.iter().filter(|(_, e)| *e == element).map(|(a, _)| a.invoked).min();
            match invoked {
                Some(i) if i < returned => {}
                Some(i) => {
                    return Err(format!(
                        "rule 2 (from the future): a read that returned at {returned} us saw {element:?}, added at {i} us"
                    ));
                }
                None => return Err(format!("rule 2 (from nowhere): a read saw {element:?}, which nobody added")),
            }
        }
    }
    for &(a, sa, ra) in &reads {
        for &(b, sb, _) in &reads {
            if ra < b.invoked && !sa.is_subset(sb) {
                let gone: Vec<&String> = sa.difference(sb).collect();
                return Err(format!(
                    "rule 3 (went back): the read at {}..{ra} us saw {gone:?}, a later read at {} us did not",
                    a.invoked, b.invoked
                ));
            }
            if !sa.is_subset(sb) && !sb.is_subset(sa) {
                let (x, y): (Vec<&String>, Vec<&String>) = (sa.difference(sb).collect(), sb.difference(sa).collect());
                return Err(format!("rule 4 (no order): one read saw {x:?} and not {y:?}, another the reverse"));
            }
        }
    }
    Ok(())
}
