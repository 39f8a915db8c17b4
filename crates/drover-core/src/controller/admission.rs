//! Tokens and admission verdicts: creating tokens, judging a node's credential at
//! admission (and binding its id), and the read-only checks the shell makes before
//! journaling (an operator token's role, a join credential's validity).

use super::*;

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn token_create(
        &mut self,
        session: u64,
        stream_id: &str,
        id: String,
        secret_hash: [u8; 32],
        role: i32,
        ttl_ms: u64,
        uses: u32,
        description: String,
        out: &mut Vec<Output>,
    ) {
        let reply = |out: &mut Vec<Output>, p: Payload| {
            if session != 0 {
                out.push(Self::count(session, stream_id, 1, Vec::new()));
                out.push(Self::to_cli(session, stream_id, None, p));
            }
        };
        // Revoked and expired tokens make room first.
        if self.tokens.len() >= MAX_TOKENS {
            let now = self.now_ms;
            self.tokens.retain(|_, t| t.usable(now).is_ok());
        }
        if session != 0 && !self.cli_is_admin(session) {
            self.counters.refused += 1;
            let type_url = drover_proto::type_url::<v1::ControllerTokenCreateV1Req>();
            return reply(
                out,
                v1::UnknownCommandV1Notify { type_url, reason: "creating tokens needs an admin token".into() }.into(),
            );
        }
        if uses != 0 && role != v1::TokenRole::Join as i32 {
            self.counters.refused += 1;
            let type_url = drover_proto::type_url::<v1::ControllerTokenCreateV1Req>();
            let reason = "--uses counts admissions, so it is for join tokens only; limit an operator token with --ttl";
            return reply(out, v1::UnknownCommandV1Notify { type_url, reason: reason.into() }.into());
        }
        let valid_role =
            [v1::TokenRole::Join, v1::TokenRole::Read, v1::TokenRole::Admin].iter().any(|r| *r as i32 == role);
        if !valid_role || self.tokens.len() >= MAX_TOKENS || self.tokens.contains_key(&id) {
            self.counters.refused += 1;
            let reason =
                if valid_role { "token table full or id taken" } else { "token role must be join, read or admin" };
            let type_url = drover_proto::type_url::<v1::ControllerTokenCreateV1Req>();
            return reply(out, v1::UnknownCommandV1Notify { type_url, reason: reason.into() }.into());
        }
        let expires_ms = if ttl_ms == 0 { 0 } else { self.now_ms.saturating_add(ttl_ms.min(i64::MAX as u64) as i64) };
        self.tokens.insert(
            id.clone(),
            Token {
                secret_hash,
                role,
                description: description.chars().take(256).collect(),
                created_ms: self.now_ms,
                expires_ms,
                uses_left: (uses != 0).then_some(uses),
                revoked: false,
            },
        );
        // The shell puts the secret into this reply before it leaves.
        reply(out, v1::ControllerTokenCreateV1Reply { id, token: String::new(), expires_at_ms: expires_ms }.into());
    }

    /// Whether a join credential would be admitted at `now_ms`, without using it up: the
    /// shell asks this (read-only, not journaled) before letting an attempt through a
    /// rate limit, so a valid credential is never locked out by someone else's failures.
    pub fn join_credential_valid(
        &self,
        token_id: &str,
        secret_hash: &[u8; 32],
        now_ms: i64,
    ) -> Result<(), AdmissionRefusal> {
        let t = self.tokens.get(token_id).ok_or(AdmissionRefusal::UnknownToken)?;
        // The secret is compared before anything about the token is revealed.
        if !bool::from(subtle_eq(&t.secret_hash, secret_hash)) {
            return Err(AdmissionRefusal::UnknownToken);
        }
        if t.role != v1::TokenRole::Join as i32 {
            return Err(AdmissionRefusal::NotJoinToken);
        }
        t.usable(now_ms)
    }

    /// Judges an admission: the credential (a token is checked here; a certificate was
    /// checked by the shell), then the node id's binding. A use of a token is consumed
    /// only by an admission that succeeds.
    pub(super) fn admission(&mut self, attempt: u64, node: &str, credential: Credential, out: &mut Vec<Output>) {
        let result = self.admit(node, credential);
        match &result {
            Ok(_) => self.counters.admissions += 1,
            Err(_) => self.counters.admission_refusals += 1,
        }
        out.push(Output::AdmissionVerdict { attempt, result });
    }

    pub(super) fn admit(&mut self, node: &str, credential: Credential) -> Result<u64, AdmissionRefusal> {
        if let Credential::Token { id, secret_hash } = &credential {
            self.join_credential_valid(id, secret_hash, self.now_ms)?;
        }
        let known = self.nodes.contains_key(node);
        let generation =
            self.ids.admit(node, credential.binding(), self.now_ms, known, self.config.gone_retention_ms)?;
        if let Credential::Token { id, .. } = &credential
            && let Some(u) = self.tokens.get_mut(id).and_then(|t| t.uses_left.as_mut())
        {
            *u -= 1;
        }
        Ok(generation)
    }

    /// What an operator token allows now, or why it is refused. Read-only (nothing is
    /// consumed), so it needs no journaling. Nothing about a token is revealed before
    /// its secret matches.
    pub fn operator_role(&self, id: &str, secret_hash: &[u8; 32], now_ms: i64) -> Result<OperatorRole, &'static str> {
        const UNKNOWN: &str = "unknown token (a wrong secret, or a token of another controller's data directory)";
        let t = self.tokens.get(id).ok_or(UNKNOWN)?;
        if !bool::from(subtle_eq(&t.secret_hash, secret_hash)) {
            return Err(UNKNOWN);
        }
        t.usable(now_ms).map_err(|r| r.text())?;
        match t.role {
            r if r == v1::TokenRole::Admin as i32 => Ok(OperatorRole::Admin),
            r if r == v1::TokenRole::Read as i32 => Ok(OperatorRole::Read),
            _ => Err(
                "this is a join token, for nodes; CLI commands need a read or admin token (drover token create --role read|admin)",
            ),
        }
    }

    /// Whether any admin token is usable now.
    pub fn has_admin_token(&self, now_ms: i64) -> bool {
        self.tokens.values().any(|t| t.role == v1::TokenRole::Admin as i32 && t.usable(now_ms).is_ok())
    }
}
