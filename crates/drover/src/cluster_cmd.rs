//! `drover cluster status|add|remove|transfer-leader`: the cluster's membership and leadership, through any member's
//! HTTP port (`GET /api/cluster`; changes go to the leader's, which the status names).

use std::time::Duration;

use anyhow::{Context, bail};
use drover_raft::status::ClusterStatus;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

/// How long one HTTP exchange may take (adding a member waits for it to catch up).
const TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `method path` to `addr` (HOST:PORT, HTTP/1.1; HTTPS verified against `ca` when
/// given) with an optional bearer token; the status code and body.
async fn request(
    addr: &str,
    ca: Option<&[u8]>,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
        let io: Box<dyn Io> = match ca {
            None => Box::new(tcp),
            Some(ca) => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                    .with_context(|| format!("{host} is not a host name or address"))?;
                Box::new(tls_connector(ca)?.connect(name, tcp).await.with_context(|| format!("TLS with {addr}"))?)
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder().method(method).uri(path).header("host", addr);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let response = sender.send_request(req.body(Empty::<Bytes>::new())?).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .with_context(|| format!("{addr} did not answer within {TIMEOUT:?}"))?
}

/// A byte stream: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A TLS client trusting the CA certificates in `ca` (PEM).
fn tls_connector(ca: &[u8]) -> anyhow::Result<tokio_rustls::TlsConnector> {
    drover_node::tls_client(ca, None).map_err(|e| anyhow::anyhow!("the CA file ({e})"))
}

/// The cluster view, asked of the member whose HTTP port is `http`.
pub async fn status(http: &str, ca: Option<&[u8]>) -> anyhow::Result<ClusterStatus> {
    let (code, body) = request(http, ca, "GET", "/api/cluster", None).await?;
    if code != 200 {
        bail!("{http} answered {code}: {}", body.trim());
    }
    serde_json::from_str(&body).with_context(|| format!("{http} sent a cluster status that does not parse"))
}

/// Prints the view as a table.
pub fn print(s: &ClusterStatus) {
    let leader = s.leader.map_or("none".to_owned(), |l| l.to_string());
    println!("leader {leader}   term {}", s.term);
    println!(
        "{:<6} {:<12} {:<6} {:<22} {:<22} {:>12} {:>8}",
        "MEMBER", "ROLE", "VOTER", "RAFT", "GRPC", "COMMIT", "LAG"
    );
    for m in &s.members {
        let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        println!(
            "{:<6} {:<12} {:<6} {:<22} {:<22} {:>12} {:>8}",
            m.id,
            m.role,
            if m.voter { "yes" } else { "no" },
            m.raft,
            m.addresses.get("grpc").map_or("-", String::as_str),
            opt(m.commit_index),
            opt(m.lag),
        );
    }
}

/// A change to the cluster, made on its leader.
pub enum Change<'a> {
    /// Add member `id` at this Raft address.
    Add(&'a str),
    /// Remove member `id`.
    Remove,
    /// Hand leadership to member `id`.
    Transfer,
}

/// Makes `change` about member `id` on the leader found through `http`.
pub async fn change(
    http: &str,
    ca: Option<&[u8]>,
    token: &str,
    id: u64,
    change: Change<'_>,
) -> anyhow::Result<ClusterStatus> {
    let view = status(http, ca).await?;
    let leader_http = view
        .leader_addresses()
        .and_then(|a| a.get("http").cloned())
        .context("no leader with an HTTP address answered; retry once one is elected")?;
    let path = match change {
        Change::Add(addr) => format!("/api/cluster/add?id={id}&raft={addr}"),
        Change::Remove => format!("/api/cluster/remove?id={id}"),
        Change::Transfer => format!("/api/cluster/transfer?id={id}"),
    };
    let (code, body) = request(&leader_http, ca, "POST", &path, Some(token)).await?;
    if code != 200 {
        bail!("the leader ({leader_http}) answered {code}: {}", body.trim());
    }
    serde_json::from_str(&body).context("the leader sent a cluster status that does not parse")
}
