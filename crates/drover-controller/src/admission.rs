//! The admission server: seed 3's handshake on its own TCP port, in front of the node
//! stream. One task per connection drives a `drover_admission::server::ServerConn`
//! over real bytes; the credential verdict comes from the owner (join tokens are
//! journaled state, and a use is consumed durably), the ticket is signed here. After
//! the handshake the connection stays open as the control channel (`conn:alive` both
//! ways).
//!
//! In a cluster every member serves admission. A member that does not lead forwards
//! the credential's verdict to the leader ([`crate::forward`]) and tells the node to
//! reach the leader's gRPC (`auth:ack`'s `upstream`); whenever leadership moves, every
//! member sends each node whose control channel it holds a new `auth:ack` naming the
//! new leader, with a fresh ticket, and the node moves its stream there without
//! passing admission again (seed 3's upstream change).

use crate::now_ms;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use drover_admission::server::{Action, ServerConfig, ServerConn};
use drover_admission::ticket::TicketKey;
use drover_admission::version::VersionPolicy;
use drover_wire::admission::{Packet, PacketDecoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::cluster::Leader;
use crate::owner::{Inbox, ShellEvent};
use crate::ratelog::LogLimiter;

/// Keepalive interval on the control channel.
const ALIVE_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub(crate) struct Settings {
    /// What admitted nodes are told to reach gRPC at (`--upstream`, or the gRPC listen
    /// address when it names one host).
    pub(crate) upstream: String,
    /// When the gRPC port listens on every address (`0.0.0.0`, `::`): its port. Nodes
    /// are then told the address they reached admission at, with this port, since an
    /// unspecified address is no address to connect to.
    pub(crate) upstream_port_on_local_ip: Option<u16>,
    pub(crate) policy: VersionPolicy,
    pub(crate) handshake_deadline_ms: i64,
    pub(crate) ticket_ttl_ms: i64,
    /// Most admission connections open at once: every connected node holds one (its
    /// control channel), so this caps the fleet too.
    pub(crate) max_connections: usize,
    /// Who leads (always [`Leader::Me`] on one controller).
    pub(crate) leader: watch::Receiver<Leader>,
    /// How a member that does not lead reaches the leader (`None` on one controller).
    pub(crate) forwarder: Option<drover_raft::network::Forwarder>,
}

/// How long an admission may wait for a leader to be elected (or reached) before the
/// node is told to retry.
const LEADER_WAIT: Duration = Duration::from_secs(5);

/// What becomes of an admission attempt.
enum Decision {
    /// The leader's verdict: `Ok((upstream, generation))` or the refusal (`auth:dec`).
    Verdict(Result<(String, u64), String>),
    /// No leader could decide it now (an election): the node is told why with
    /// `conn:close` and retries, possibly at another member, with its usual backoff
    /// (a refusal would make it back off as from a bad credential).
    Retry(String),
}

/// The verdict on a credential. `None`: the controller is stopping.
async fn decide(
    node: &str,
    presented: Result<drover_core::Credential, String>,
    peer: SocketAddr,
    settings: &Settings,
    events: &Inbox,
) -> Option<Decision> {
    let give_up = tokio::time::Instant::now() + LEADER_WAIT;
    let mut leader = settings.leader.clone();
    loop {
        let current = leader.borrow_and_update().clone();
        let why_not = match (current, &settings.forwarder) {
            (Leader::Me, _) | (_, None) => {
                let (reply, verdict) = tokio::sync::oneshot::channel();
                let ask = ShellEvent::Admission { node: node.to_owned(), presented, peer: peer.ip(), reply };
                events.send(ask).await.ok()?;
                return Some(match verdict.await.ok()? {
                    Ok(generation) => Decision::Verdict(Ok((settings.upstream.clone(), generation))),
                    Err(drover_core::AdmissionRefusal::NotLeader(why)) => Decision::Retry(why),
                    Err(refusal) => Decision::Verdict(Err(refusal.to_string())),
                });
            }
            (Leader::Other { raft, .. }, Some(forwarder)) => {
                let ask = crate::forward::Forwarded::Admission {
                    node: node.to_owned(),
                    presented: presented.clone(),
                    peer: peer.ip(),
                };
                let ttl =
                    give_up.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_millis(500));
                match forwarder.call(&raft, crate::forward::encode(&ask), ttl).await {
                    Ok(bytes) => {
                        use crate::forward::{Answer, Refused};
                        return Some(match crate::forward::decode_answer(&bytes) {
                            Ok(Answer::Admission(Ok(a))) => Decision::Verdict(Ok((a.upstream, a.generation))),
                            Ok(Answer::Admission(Err(Refused { reason, retry: true }))) => Decision::Retry(reason),
                            Ok(Answer::Admission(Err(Refused { reason, retry: false }))) => {
                                Decision::Verdict(Err(reason))
                            }
                            Err(e) => Decision::Retry(format!("the leader's answer: {e}")),
                        });
                    }
                    Err(e) => e.to_string(),
                }
            }
            (Leader::Unknown, Some(_)) => "no leader is elected right now; retry shortly".to_owned(),
        };
        // No leader, or it did not answer: wait for the next one (or a short while).
        let now = tokio::time::Instant::now();
        if now >= give_up {
            tracing::info!(%node, %peer, reason = %why_not, "admission refused: no leader to decide it");
            return Some(Decision::Retry(format!("no leader could decide this admission: {why_not}")));
        }
        let _ = tokio::time::timeout(Duration::from_millis(250).min(give_up - now), leader.changed()).await;
    }
}

/// Where an admitted node should stream now: the leader's gRPC address, when known.
fn leader_upstream(leader: &Leader, settings: &Settings) -> Option<String> {
    match leader {
        Leader::Me => Some(settings.upstream.clone()),
        Leader::Other { grpc, .. } => grpc.clone(),
        Leader::Unknown => None,
    }
}

pub(crate) async fn serve(
    listener: TcpListener,
    settings: Settings,
    key: TicketKey,
    tls: Option<tokio_rustls::TlsAcceptor>,
    events: Inbox,
    mut stop: watch::Receiver<bool>,
    logs: Arc<LogLimiter>,
) {
    let settings = Arc::new(settings);
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = crate::conns::accept_with_backoff(&listener, &logs, "admission accept failed", "admission") => accepted,
            _ = stop.changed() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if let Some(count) = logs.admit("admission over capacity", None, now_ms()) {
                tracing::warn!(%peer, limit = settings.max_connections, count, "admission refused: too many connections (count: since the last such line)");
            }
            // Tell the peer why (best effort, without waiting: the socket buffer takes
            // it), over plain TCP only: a TLS peer cannot read it before its handshake.
            if tls.is_none() {
                let close = Packet::new(drover_wire::admission::Code::ConnClose)
                    .with("reason", format!("too many connections (limit {})", settings.max_connections));
                let _ = stream.try_write(&close.to_bytes());
            }
            continue;
        };
        let settings = match (settings.upstream_port_on_local_ip, stream.local_addr()) {
            (Some(port), Ok(local)) => {
                Arc::new(Settings { upstream: SocketAddr::new(local.ip(), port).to_string(), ..(*settings).clone() })
            }
            _ => settings.clone(),
        };
        let (key, events, stop, tls) = (key.clone(), events.clone(), stop.clone(), tls.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let result = match tls {
                Some(acceptor) => {
                    // The TLS handshake counts against the admission deadline too.
                    let deadline = Duration::from_millis(settings.handshake_deadline_ms.max(0) as u64);
                    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            // The end-entity certificate the client proved it holds the key of.
                            let client_cert =
                                tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
                            connection(tls, peer, &settings, &key, &events, stop, client_cert).await
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "admission TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => Ok(()),
                    }
                }
                None => connection(stream, peer, &settings, &key, &events, stop, None).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "admission connection ended");
            }
            drop(permit);
        });
    }
}

/// Closes our half, then reads and drops what the peer still sends (up to 1 MiB or
/// 1 s): closing with unread bytes would make the kernel reset the connection and the
/// peer could lose the `conn:close` that tells it why.
async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = stream.shutdown().await;
    let mut buf = vec![0u8; 16 * 1024];
    let mut left = 1usize << 20;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, p: &Packet) -> std::io::Result<()> {
    stream.write_all(&p.to_bytes()).await?;
    stream.flush().await
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    settings: &Settings,
    key: &TicketKey,
    events: &Inbox,
    mut stop: watch::Receiver<bool>,
    client_cert: Option<Vec<u8>>,
) -> std::io::Result<()> {
    let config = ServerConfig { policy: settings.policy, handshake_deadline_ms: settings.handshake_deadline_ms };
    let mut conn = ServerConn::new(config, now_ms());
    let mut decoder = PacketDecoder::new();
    let mut buf = vec![0u8; 8192];
    let mut alive = tokio::time::interval(ALIVE_EVERY);
    static CONTROL_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let control_id = CONTROL_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (evict_tx, mut evict_rx) = mpsc::channel::<String>(1);
    let mut evict_tx = Some(evict_tx);
    let mut admitted: Option<String> = None;
    let result = control_loop(
        &mut stream,
        peer,
        settings,
        key,
        events,
        &mut stop,
        &mut conn,
        &mut decoder,
        &mut buf,
        &mut alive,
        &mut evict_rx,
        &mut evict_tx,
        &mut admitted,
        control_id,
        client_cert.as_deref(),
    )
    .await;
    if let Some(node) = admitted {
        let _ = events.send(ShellEvent::ControlClosed { node, id: control_id }).await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn control_loop<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
    settings: &Settings,
    key: &TicketKey,
    events: &Inbox,
    stop: &mut watch::Receiver<bool>,
    conn: &mut ServerConn,
    decoder: &mut PacketDecoder,
    buf: &mut [u8],
    alive: &mut tokio::time::Interval,
    evict_rx: &mut mpsc::Receiver<String>,
    evict_tx: &mut Option<mpsc::Sender<String>>,
    admitted: &mut Option<String>,
    control_id: u64,
    client_cert: Option<&[u8]>,
) -> std::io::Result<()> {
    // After admission: the generation its tickets carry and the upstream it was told.
    let mut granted: Option<(u64, String)> = None;
    let mut leader = settings.leader.clone();
    let mut leader_watched = true;
    loop {
        let deadline = conn.deadline().map(|d| Duration::from_millis((d - now_ms()).max(0) as u64));
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let mut actions = Vec::new();
        tokio::select! {
            n = stream.read(buf) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                if admitted.is_none()
                    && let Some(kind) = drover_wire::admission::foreign_protocol(&buf[..n])
                {
                    // Say which port this is and which one the peer wants, instead of
                    // waiting for a packet end that never comes.
                    tracing::info!(%peer, kind, "admission port reached by another protocol");
                    let reason = format!(
                        "this is drover's admission port (seed 3 text packets, for nodes) and the peer spoke {kind}: the CLI and gRPC clients want the controller's gRPC port (--listen, default 7400), browsers its HTTP port (--http, default 7480)"
                    );
                    send(stream, &Packet::new(drover_wire::admission::Code::ConnClose).with("reason", reason)).await?;
                    linger_close(stream).await;
                    return Ok(());
                }
                if let Err(e) = decoder.feed(&buf[..n]) {
                    actions.extend(conn.on_packet(Err(e), now_ms()));
                }
                while let Some(p) = decoder.next_packet() {
                    actions.extend(conn.on_packet(p, now_ms()));
                }
            }
            _ = timer => actions.extend(conn.on_tick(now_ms())),
            _ = alive.tick() => {
                if let Some(p) = conn.alive() {
                    send(stream, &p).await?;
                }
            }
            _ = stop.changed() => return Ok(()),
            changed = leader.changed(), if leader_watched => {
                if changed.is_err() {
                    leader_watched = false;
                    continue;
                }
                let now_leads = leader.borrow_and_update().clone();
                if let (Some(node), Some((generation, told)), Some(upstream)) =
                    (admitted.as_ref(), granted.as_mut(), leader_upstream(&now_leads, settings))
                    && *told != upstream
                {
                    let ticket = key.issue(node, *generation, now_ms() + settings.ticket_ttl_ms);
                    if let Some(p) = conn.move_to(&upstream, &ticket) {
                        tracing::info!(%node, %peer, from = %told, to = %upstream, "leadership moved: node told to stream to the new leader");
                        send(stream, &p).await?;
                        *told = upstream;
                    }
                }
            }
            reason = evict_rx.recv() => {
                if let Some(reason) = reason {
                    tracing::warn!(%peer, %reason, "evicting over the control channel");
                    actions.extend(conn.evict(&reason));
                }
            }
        }
        // Verdicts produce more actions; run them to completion.
        while !actions.is_empty() {
            let mut next = Vec::new();
            for a in actions {
                match a {
                    Action::Send(p) => send(stream, &p).await?,
                    Action::Close { reason } => {
                        tracing::info!(%peer, %reason, "admission connection closed");
                        linger_close(stream).await;
                        return Ok(());
                    }
                    Action::Admitted { node } => {
                        tracing::info!(%node, %peer, "admission handshake complete");
                        *admitted = Some(node.clone());
                        if let Some(evict) = evict_tx.take() {
                            let _ = events.send(ShellEvent::ControlOpened { node, id: control_id, evict }).await;
                        }
                    }
                    Action::Verify { node, version: _, credential } => {
                        // A certificate is checked here (this task holds the TLS session
                        // it was proven in); the core then checks the id's binding, as
                        // it checks a token and the binding together.
                        // A certificate that does not hold goes to the owner as a
                        // malformed credential: counted, limited and logged there.
                        let presented = if credential.starts_with("-----BEGIN") {
                            certificate_verdict(&credential, &node, client_cert)
                                .map(|()| drover_core::Credential::Certificate)
                        } else {
                            drover_admission::token::parse(&credential)
                                .map(|p| drover_core::Credential::Token { id: p.id, secret_hash: p.secret_hash })
                                .map_err(|_| "credential is not a drover join token".to_owned())
                        };
                        let verdict = match decide(&node, presented, peer, settings, events).await {
                            None => return Ok(()),
                            Some(Decision::Verdict(v)) => v,
                            Some(Decision::Retry(why)) => {
                                next.extend(conn.evict(&format!("retry: {why}")));
                                continue;
                            }
                        };
                        let verdict = verdict.map(|(upstream, generation)| {
                            let ticket = key.issue(&node, generation, now_ms() + settings.ticket_ttl_ms);
                            granted = Some((generation, upstream.clone()));
                            (upstream, ticket)
                        });
                        next.extend(conn.on_verdict(verdict));
                    }
                }
            }
            actions = next;
        }
    }
}

/// Checks a PEM certificate credential: it must be the very certificate the TLS client
/// authenticated with (so the node holds its key, and rustls already checked it chains
/// to the cluster CA), and it must name the node id (as a DNS subject alternative name).
fn certificate_verdict(pem: &str, node: &str, client_cert: Option<&[u8]>) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    let Some(authenticated) = client_cert else {
        return Err("certificate credentials need a TLS client certificate (proof of key possession) verified against the cluster CA".into());
    };
    let presented = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or("no certificate in the PEM credential")?
        .map_err(|e| format!("bad PEM credential: {e}"))?;
    if presented.as_ref() != authenticated {
        return Err("the certificate is not the one the TLS client authenticated with".into());
    }
    let name =
        ServerName::try_from(node.to_owned()).map_err(|_| format!("node id {node:?} cannot be a certificate name"))?;
    let cert = webpki::EndEntityCert::try_from(&presented).map_err(|e| format!("bad certificate: {e}"))?;
    cert.verify_is_valid_for_subject_name(&name).map_err(|_| format!("the certificate does not name node {node}"))
}
