//! Secret task environments (`drover task run --secret-env K=V`): sealed before the
//! task is journaled, opened only to dispatch it.
//!
//! The shell seals each secret value with ChaCha20-Poly1305 under a 32-byte key kept in
//! the data directory (`secret.key`, mode 0600, made at first start like `ticket.key`),
//! with the variable's name as associated data (a sealed value cannot be moved to
//! another name), and puts it into the request's `env` as
//! `drover-sealed:v1:<base64url(nonce ‖ ciphertext ‖ tag)>`. The core keeps that string
//! as it is and shows the name only. When the releaser sends a `TasksExecuteV1Req` to a
//! worker, it opens every sealed value in place, so the worker gets the clear value in
//! `TaskSpec.env` over its (TLS, when configured) stream, and nothing written to disk
//! holds it in clear.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use drover_core::SEALED_PREFIX;
use drover_proto::{Payload, v1};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

/// File in the data directory holding the sealing key.
pub const SECRET_KEY_FILE: &str = "secret.key";

/// The sealing key.
pub(crate) struct Sealer(LessSafeKey);

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SecretError {
    /// No secure randomness for a nonce.
    #[error("no secure randomness: {0}")]
    Random(String),
    /// A plain value that looks sealed (only the controller seals).
    #[error("the value of {0} starts with {SEALED_PREFIX:?}, which only the controller writes")]
    LooksSealed(String),
    /// A sealed value that does not open under this key.
    #[error("the sealed value of {0} does not open with this data directory's secret.key")]
    Open(String),
}

impl Sealer {
    pub(crate) fn new(key: [u8; 32]) -> Self {
        // A 32-byte key is what ChaCha20-Poly1305 takes, so this cannot fail.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key).expect("a 32-byte ChaCha20-Poly1305 key");
        Sealer(LessSafeKey::new(unbound))
    }

    fn seal(&self, name: &str, value: &str) -> Result<String, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| SecretError::Random(e.to_string()))?;
        let mut bytes = value.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(name.as_bytes()), &mut bytes)
            .map_err(|_| SecretError::Random("sealing failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&bytes);
        Ok(format!("{SEALED_PREFIX}{}", URL_SAFE_NO_PAD.encode(out)))
    }

    fn open(&self, name: &str, sealed: &str) -> Result<String, SecretError> {
        let bad = || SecretError::Open(name.to_owned());
        let body = sealed.strip_prefix(SEALED_PREFIX).ok_or_else(bad)?;
        let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| bad())?;
        if bytes.len() < NONCE_LEN {
            return Err(bad());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut buf = sealed.to_vec();
        let clear = self.0.open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf).map_err(|_| bad())?;
        String::from_utf8(clear.to_vec()).map_err(|_| bad())
    }

    /// Seals a task request's `secret_env` into its `env` (before it is journaled).
    /// Refuses a plain value that looks sealed.
    pub(crate) fn seal_request(&self, req: &mut v1::ControllerTaskRunV1Req) -> Result<(), SecretError> {
        if let Some((k, _)) = req.env.iter().find(|(_, v)| v.starts_with(SEALED_PREFIX)) {
            return Err(SecretError::LooksSealed(k.clone()));
        }
        for (k, v) in std::mem::take(&mut req.secret_env) {
            let sealed = self.seal(&k, &v)?;
            req.env.insert(k, sealed);
        }
        Ok(())
    }

    /// Opens the sealed values of a dispatch to a worker, in place. A value that does
    /// not open (another data directory's key) is removed and named in the error.
    pub(crate) fn open_dispatch(&self, msg: &mut v1::StreamToNode) -> Result<(), SecretError> {
        let Some(any) = &msg.command else { return Ok(()) };
        if !any.type_url.ends_with(".TasksExecuteV1Req") || !contains(&any.value, SEALED_PREFIX.as_bytes()) {
            return Ok(());
        }
        let Ok(Payload::TasksExecuteV1Req(mut req)) = Payload::from_any(any) else { return Ok(()) };
        let mut failed = None;
        for spec in &mut req.tasks {
            let sealed: Vec<String> =
                spec.env.iter().filter(|(_, v)| v.starts_with(SEALED_PREFIX)).map(|(k, _)| k.clone()).collect();
            for k in sealed {
                let opened = spec.env.get(&k).map(|v| self.open(&k, v));
                match opened {
                    Some(Ok(clear)) => {
                        spec.env.insert(k, clear);
                    }
                    Some(Err(e)) => {
                        spec.env.remove(&k);
                        failed = Some(e);
                    }
                    None => {}
                }
            }
        }
        msg.command = Some(Payload::from(req).to_any());
        failed.map_or(Ok(()), Err)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_is_not_in_the_request_and_opens_only_for_its_name_and_key() {
        let s = Sealer::new([9; 32]);
        let mut req = v1::ControllerTaskRunV1Req::default();
        req.env.insert("PLAIN".into(), "visible".into());
        req.secret_env.insert("API_KEY".into(), "hunter2".into());
        s.seal_request(&mut req).unwrap();
        assert!(req.secret_env.is_empty());
        let sealed = req.env["API_KEY"].clone();
        assert!(sealed.starts_with(SEALED_PREFIX) && !sealed.contains("hunter2"));
        assert_eq!(s.open("API_KEY", &sealed).unwrap(), "hunter2");
        assert!(s.open("OTHER", &sealed).is_err(), "bound to its name");
        assert!(Sealer::new([8; 32]).open("API_KEY", &sealed).is_err(), "and to its key");
        // Two seals of one value differ (fresh nonces).
        let mut again = v1::ControllerTaskRunV1Req::default();
        again.secret_env.insert("API_KEY".into(), "hunter2".into());
        s.seal_request(&mut again).unwrap();
        assert_ne!(again.env["API_KEY"], sealed);
        // Only the controller writes sealed values.
        let mut forged = v1::ControllerTaskRunV1Req::default();
        forged.env.insert("X".into(), format!("{SEALED_PREFIX}AAAA"));
        assert!(matches!(s.seal_request(&mut forged), Err(SecretError::LooksSealed(_))));
    }

    #[test]
    fn a_dispatch_carries_the_clear_value_to_the_worker() {
        let s = Sealer::new([9; 32]);
        let mut req = v1::ControllerTaskRunV1Req::default();
        req.secret_env.insert("API_KEY".into(), "hunter2".into());
        s.seal_request(&mut req).unwrap();
        let spec = v1::TaskSpec { env: req.env.clone(), ..Default::default() };
        let exec = v1::TasksExecuteV1Req { tasks: vec![spec] };
        let mut msg = v1::StreamToNode { command: Some(Payload::from(exec).to_any()), ..Default::default() };
        s.open_dispatch(&mut msg).unwrap();
        let Ok(Payload::TasksExecuteV1Req(opened)) = Payload::from_any(msg.command.as_ref().unwrap()) else {
            panic!("not a dispatch")
        };
        assert_eq!(opened.tasks[0].env["API_KEY"], "hunter2");
    }
}
