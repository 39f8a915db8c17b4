//! Connection limits shared by the gRPC and HTTP ports: a cap on open connections per
//! port, an accept loop that backs off when accepting fails (EMFILE) and logs once per
//! interval, and a guard around each connection's socket that closes it when
//!
//! - its first bytes do not arrive within the header timeout (a peer that connects and
//!   says nothing),
//! - it sits idle longer than the idle timeout (gRPC: no open stream; HTTP: no bytes
//!   either way, so an SSE stream's keep-alives keep it open),
//! - a write stays blocked longer than the send timeout (a peer that stopped reading:
//!   without this, the kernel's send queue grows for as long as it is connected).
//!
//! Every connection holds a slot of its port's semaphore until it closes, so the
//! descriptors the ports can use are bounded and the journal keeps its reserve.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::now_ms;
use crate::ratelog::LogLimiter;

/// The limits of one port.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most connections open at once.
    pub(crate) max_connections: usize,
    /// The first bytes must arrive within this.
    pub(crate) header_timeout: Duration,
    /// An idle connection is closed after this.
    pub(crate) idle_timeout: Duration,
    /// A write blocked this long closes the connection.
    pub(crate) send_timeout: Duration,
    /// Idle means "no open stream" (gRPC) rather than "no bytes" (HTTP).
    pub(crate) count_streams: bool,
}

/// What a connection is doing, shared between its socket guard and the handlers of
/// the streams on it.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    streams: AtomicUsize,
    /// When it last had an open stream or moved a byte (Unix ms).
    last_ms: AtomicI64,
}

impl Activity {
    /// Marks a stream open until the returned guard is dropped.
    pub(crate) fn stream(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }
}

/// An open stream on a connection (see [`Activity::stream`]).
#[derive(Debug)]
pub(crate) struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.last_ms.store(now_ms(), Ordering::Relaxed);
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts the next connection on `listener`. A failed accept (out of descriptors,
/// above all) would repeat at once: it waits before the next try, doubling from 10 ms
/// up to 1 s, and is logged (as `kind`) once per interval.
pub(crate) async fn accept_with_backoff(
    listener: &TcpListener,
    logs: &LogLimiter,
    kind: &'static str,
    port: &'static str,
) -> (TcpStream, SocketAddr) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                if let Some(count) = logs.admit(kind, None, now_ms()) {
                    tracing::warn!(port, error = %e, count, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off (count: since the last such line)");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Accepts the next connection on `listener` that gets a slot ([`accept_with_backoff`]);
/// a connection over the cap is closed at once, logged once per interval.
pub(crate) async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    logs: &LogLimiter,
    port: &'static str,
    limit: usize,
) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    loop {
        let (stream, peer) = accept_with_backoff(listener, logs, "accept failed", port).await;
        match slots.clone().try_acquire_owned() {
            Ok(permit) => return (stream, peer, permit),
            Err(_) => {
                if let Some(count) = logs.admit(port, None, now_ms()) {
                    tracing::warn!(port, limit, count, %peer, "connection refused: too many open connections on this port (count: since the last such line)");
                }
                drop(stream);
            }
        }
    }
}

/// A connection's socket with its slot, its activity and the timers of [`Limits`].
pub(crate) struct Guarded<S> {
    inner: S,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    activity: Arc<Activity>,
    limits: Limits,
    /// Fires when the connection should be looked at again (header or idle deadline).
    check: Pin<Box<Sleep>>,
    /// Set while a write is blocked: when it fires the peer is not reading.
    write_stall: Option<Pin<Box<Sleep>>>,
    got_bytes: bool,
}

impl<S> Guarded<S> {
    pub(crate) fn new(inner: S, peer: SocketAddr, permit: OwnedSemaphorePermit, limits: Limits) -> Self {
        let activity = Arc::new(Activity::default());
        activity.last_ms.store(now_ms(), Ordering::Relaxed);
        Guarded {
            inner,
            peer,
            _permit: permit,
            activity,
            check: Box::pin(tokio::time::sleep(limits.header_timeout)),
            limits,
            write_stall: None,
            got_bytes: false,
        }
    }

    /// The activity the stream handlers on this connection report to.
    #[cfg(test)]
    pub(crate) fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    /// Whether the connection should be closed now; if not, rearms the check timer.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        while self.check.as_mut().poll(cx).is_ready() {
            if !self.got_bytes {
                return Some("no request within the header timeout");
            }
            let idle_ms = self.limits.idle_timeout.as_millis() as i64;
            let quiet_ms = now_ms() - self.activity.last_ms.load(Ordering::Relaxed);
            let streams = self.activity.streams.load(Ordering::Relaxed);
            if streams == 0 && quiet_ms >= idle_ms {
                return Some("idle");
            }
            let wait = if streams > 0 { idle_ms } else { (idle_ms - quiet_ms).max(1) };
            self.check.as_mut().reset(Instant::now() + Duration::from_millis(wait as u64));
        }
        None
    }

    fn touch(&self) {
        // With streams counted, bytes (keep-alive pings among them) do not make a
        // connection busy; only its streams do.
        if !self.limits.count_streams {
            self.activity.last_ms.store(now_ms(), Ordering::Relaxed);
        }
    }
}

fn timed_out(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, why)
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    if !self.got_bytes {
                        self.got_bytes = true;
                        let idle = self.limits.idle_timeout;
                        self.check.as_mut().reset(Instant::now() + idle);
                    }
                    self.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.expired(cx) {
                Some(why) => {
                    tracing::debug!(peer = %self.peer, why, "closing connection");
                    Poll::Ready(Err(timed_out(why)))
                }
                None => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> Guarded<S> {
    /// A write that made progress clears the stall timer; a blocked one starts it and
    /// fails once it fires.
    fn after_write<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => {
                let send_timeout = self.limits.send_timeout;
                let stall = self.write_stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(send_timeout)));
                if stall.as_mut().poll(cx).is_ready() {
                    tracing::debug!(peer = %self.peer, "closing connection: the peer stopped reading");
                    return Poll::Ready(Err(timed_out("the peer stopped reading (send timeout)")));
                }
                Poll::Pending
            }
            ready => {
                self.write_stall = None;
                self.touch();
                ready
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after_write(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.after_write(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What tonic hands each request on a guarded gRPC connection (`Request::extensions`):
/// the peer's address and the connection's activity.
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) activity: Arc<Activity>,
}

impl tonic::transport::server::Connected for Guarded<TcpStream> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo { peer: self.peer, activity: self.activity.clone() }
    }
}

/// Bounds the kernel's send queue of a socket whose peer may stop reading (the
/// dashboard's event streams): autotuning would let it grow to megabytes per socket.
pub(crate) fn small_send_buffer(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_send_buffer_size(256 << 10);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(count_streams: bool) -> Limits {
        Limits {
            max_connections: 2,
            header_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(400),
            send_timeout: Duration::from_millis(300),
            count_streams,
        }
    }

    async fn pair(limits: Limits) -> (Guarded<TcpStream>, TcpStream, Arc<Semaphore>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let (s, peer, permit) = accept(&l, &slots, &LogLimiter::default(), "test", 2).await;
        (Guarded::new(s, peer, permit, limits), client, slots)
    }

    #[tokio::test]
    async fn a_silent_peer_is_closed_after_the_header_timeout_and_frees_its_slot() {
        let (mut g, _client, slots) = pair(limits(false)).await;
        assert_eq!(slots.available_permits(), 1);
        let started = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let e = g.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(190), "{:?}", started.elapsed());
        drop(g);
        assert_eq!(slots.available_permits(), 2);
    }

    #[tokio::test]
    async fn an_open_stream_keeps_a_connection_that_is_otherwise_idle() {
        let (mut g, mut client, _slots) = pair(limits(true)).await;
        client.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(g.read(&mut buf).await.unwrap(), 1);
        let stream = g.activity().stream();
        let held = tokio::time::timeout(Duration::from_millis(900), g.read(&mut buf)).await;
        assert!(held.is_err(), "with a stream open the connection stays, however quiet");
        drop(stream);
        let e = tokio::time::timeout(Duration::from_secs(2), g.read(&mut buf)).await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "idle once its last stream ended");
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_is_cut_off_by_the_send_timeout() {
        let (mut g, _client, _slots) = pair(limits(false)).await;
        let chunk = vec![0u8; 1 << 20];
        let started = std::time::Instant::now();
        let e = loop {
            if let Err(e) = g.write_all(&chunk).await {
                break e;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the writes never blocked");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
