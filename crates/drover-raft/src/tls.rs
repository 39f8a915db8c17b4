//! Mutual TLS on the Raft port: every member presents a certificate signed by the
//! cluster CA (`drover cert init` / `drover cert issue`) and accepts only peers that do.
//! The cluster-secret handshake still runs inside it, so a member needs both the
//! secret and a certificate of the cluster's CA; without TLS the secret alone guards
//! the port (and the traffic is not encrypted).

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("raft TLS {what}: {why}")]
pub struct TlsError {
    what: &'static str,
    why: String,
}

fn bad(what: &'static str) -> impl Fn(String) -> TlsError {
    move |why| TlsError { what, why }
}

/// A member's TLS identity and the cluster CA, as a server and a client configuration.
#[derive(Clone)]
pub struct RaftTls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for RaftTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftTls(..)")
    }
}

/// A byte stream on the Raft port: plain TCP or TLS, either side.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync> Io for T {}

impl RaftTls {
    /// From this member's certificate chain and key and the cluster CA (all PEM).
    pub fn new(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<RaftTls, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate")(e.to_string()))?;
        let key = || PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad("key")(e.to_string()));
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(c.map_err(|e| bad("CA")(e.to_string()))?).map_err(|e| bad("CA")(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("CA")("no certificate in the CA file".into()));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Peers must present a certificate of the cluster CA: no unauthenticated clients.
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| bad("CA")(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("versions")(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key()?)
            .map_err(|e| bad("identity")(e.to_string()))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("versions")(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key()?)
            .map_err(|e| bad("identity")(e.to_string()))?;
        Ok(RaftTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }

    /// The server side of a connection a peer opened.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<Box<dyn Io>> {
        Ok(Box::new(self.acceptor.accept(tcp).await?))
    }

    /// The client side of a connection to `addr` (HOST:PORT; the host is checked
    /// against the peer certificate's names).
    pub async fn connect(&self, addr: &str, tcp: TcpStream) -> std::io::Result<Box<dyn Io>> {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        Ok(Box::new(self.connector.connect(name, tcp).await?))
    }
}

/// What a member needs to reach its peers: the cluster secret, and TLS when it is on.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The cluster secret (proved on every connection).
    pub secret: crate::secret::ClusterSecret,
    /// Mutual TLS under the cluster CA, when configured.
    pub tls: Option<RaftTls>,
}

impl Credentials {
    /// The secret alone (no TLS).
    pub fn plain(secret: crate::secret::ClusterSecret) -> Credentials {
        Credentials { secret, tls: None }
    }
}
