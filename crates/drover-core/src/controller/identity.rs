//! Node identities: which credential a node id belongs to, and the admission
//! generation its tickets must carry.
//!
//! A node id, once admitted, is bound to the credential that admitted it (a join
//! token's id, or "certificate" for a client certificate naming the id). Another
//! credential asking for that id is refused while the binding is held: while the node
//! is known to the controller (online, or gone but not yet forgotten), or, for an id
//! admitted but never connected, until `gone_retention` after its admission. The first
//! credential wins until the node is forgotten (`drover forget`, or gone retention);
//! that is how a node legitimately moves to a new token.
//!
//! Every admission, eviction and revocation of the bound token gives the id a fresh
//! generation (from one counter that never goes back, so a forgotten and re-admitted id
//! never reuses one). A ticket carries the generation it was issued at; a stream
//! opened with any other generation is refused, so a ticket dies with its node's
//! standing and its lifetime is only a ceiling.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::input::AdmissionRefusal;

/// Most bindings kept; past it, expired ones are pruned first.
pub const MAX_IDENTITIES: usize = 100_000;

/// One node id's binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    /// What the id is bound to (`Credential::binding`).
    credential: String,
    /// The generation a ticket must carry.
    generation: u64,
    /// When it was last admitted.
    admitted_ms: i64,
}

/// The bindings and their counters. Checkpointed after the rest of the state (see
/// `Controller::checkpoint`), so checkpoints of releases before it still load.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identities {
    /// The last generation handed out.
    last_generation: u64,
    by_node: BTreeMap<String, Identity>,
    /// Admissions refused because the id belongs to another credential.
    pub(crate) refused: u64,
    /// Streams refused because their ticket's generation is no longer current.
    pub(crate) stale_tickets: u64,
}

impl Identities {
    /// The first binding or counter that differs from `other`'s.
    pub(crate) fn first_difference(&self, other: &Identities) -> Option<String> {
        use super::durable::{differs, map_differs};
        map_differs("node identity", &self.by_node, &other.by_node)
            .or_else(|| differs("last ticket generation", &self.last_generation, &other.last_generation))
            .or_else(|| differs("identity refusals", &self.refused, &other.refused))
            .or_else(|| differs("stale tickets", &self.stale_tickets, &other.stale_tickets))
    }

    fn next(&mut self) -> u64 {
        self.last_generation += 1;
        self.last_generation
    }

    /// Admits `node` under `credential` at `now_ms` and returns its new generation, or
    /// refuses because another credential holds the id. `known` says whether the node
    /// is in the controller's node table (online or gone within retention).
    pub(crate) fn admit(
        &mut self,
        node: &str,
        credential: String,
        now_ms: i64,
        known: bool,
        retention_ms: i64,
    ) -> Result<u64, AdmissionRefusal> {
        if let Some(id) = self.by_node.get(node)
            && id.credential != credential
            && (known || now_ms - id.admitted_ms <= retention_ms)
        {
            self.refused += 1;
            return Err(AdmissionRefusal::IdTaken { node: node.to_owned(), holder: id.credential.clone() });
        }
        if self.by_node.len() >= MAX_IDENTITIES && !self.by_node.contains_key(node) {
            self.by_node.retain(|_, id| now_ms - id.admitted_ms <= retention_ms);
            if self.by_node.len() >= MAX_IDENTITIES {
                self.refused += 1;
                return Err(AdmissionRefusal::TooManyIdentities);
            }
        }
        let generation = self.next();
        self.by_node.insert(node.to_owned(), Identity { credential, generation, admitted_ms: now_ms });
        Ok(generation)
    }

    /// Whether a ticket of `generation` is current for `node`.
    pub(crate) fn current(&self, node: &str, generation: u64) -> bool {
        self.by_node.get(node).is_some_and(|id| id.generation == generation)
    }

    /// Invalidates `node`'s outstanding tickets (eviction); the binding stays.
    pub(crate) fn invalidate(&mut self, node: &str) {
        if self.by_node.contains_key(node) {
            let generation = self.next();
            if let Some(id) = self.by_node.get_mut(node) {
                id.generation = generation;
            }
        }
    }

    /// Invalidates the tickets of every node bound to `credential` (its token was
    /// revoked). Returns those nodes.
    pub(crate) fn invalidate_credential(&mut self, credential: &str) -> Vec<String> {
        let nodes: Vec<String> =
            self.by_node.iter().filter(|(_, id)| id.credential == credential).map(|(n, _)| n.clone()).collect();
        for n in &nodes {
            self.invalidate(n);
        }
        nodes
    }

    /// Drops `node`'s binding (the node was forgotten): its id is free again and its
    /// tickets are dead.
    pub(crate) fn forget(&mut self, node: &str) {
        self.by_node.remove(node);
    }

    /// What `node` is bound to, for operators.
    pub(crate) fn credential_of(&self, node: &str) -> Option<&str> {
        self.by_node.get(node).map(|id| id.credential.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_credential_holds_the_id_until_it_is_forgotten() {
        let mut ids = Identities::default();
        let g1 = ids.admit("n1", "token a".into(), 0, false, 1000).unwrap();
        assert!(ids.admit("n1", "token b".into(), 10, true, 1000).unwrap_err().to_string().contains("token a"));
        assert_eq!(ids.refused, 1);
        // The same credential may admit it again; the old ticket's generation dies.
        let g2 = ids.admit("n1", "token a".into(), 20, true, 1000).unwrap();
        assert!(g2 > g1 && ids.current("n1", g2) && !ids.current("n1", g1));
        // Never connected and past retention: the binding lapses.
        assert!(ids.admit("n1", "token b".into(), 2000, false, 1000).is_ok());
        ids.forget("n1");
        let g3 = ids.admit("n1", "certificate".into(), 2001, false, 1000).unwrap();
        assert!(g3 > g2, "generations never repeat, even for a forgotten id");
    }

    #[test]
    fn eviction_and_revocation_kill_outstanding_tickets() {
        let mut ids = Identities::default();
        let a = ids.admit("n1", "token a".into(), 0, false, 1000).unwrap();
        let b = ids.admit("n2", "token a".into(), 0, false, 1000).unwrap();
        let c = ids.admit("n3", "token c".into(), 0, false, 1000).unwrap();
        ids.invalidate("n1");
        assert!(!ids.current("n1", a) && ids.current("n2", b));
        assert_eq!(ids.invalidate_credential("token a"), vec!["n1".to_owned(), "n2".to_owned()]);
        assert!(!ids.current("n2", b) && ids.current("n3", c));
        assert!(!ids.current("unknown", 1));
    }
}
