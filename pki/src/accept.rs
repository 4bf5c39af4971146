//! Accepting TLS connections with each refusal reported: the agents' gRPC port and the
//! orchestrator's HTTPS API.
//!
//! Under TLS 1.3 the client's side of a refused handshake (no certificate, another CA's, an
//! expired one) usually sees only "connection closed": the server's alert is lost behind the
//! close. The server is the side that knows why, so it says so, with the peer's address,
//! through the caller's `on_refused` (a log line and a counter in the daemons).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

/// How a handshake failed, for the caller's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The handshake failed: rustls's reason ("peer sent no certificates", "invalid peer
    /// certificate: UnknownIssuer", ...).
    Failed(String),
    /// The client did not finish its handshake within the bound.
    TimedOut(Duration),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Failed(why) => f.write_str(why),
            Refusal::TimedOut(d) => write!(f, "no complete handshake within {d:?}"),
        }
    }
}

/// TLS connections accepted from a listener: a task accepts TCP connections (Nagle's
/// algorithm off) and runs each handshake in a task of its own, bounded by a timeout, so that
/// a slow or silent client never holds up the others. Completed connections come out in
/// order of completion, as a [`futures_core::Stream`] (what tonic's `serve_with_incoming`
/// takes) or through [`TlsIncoming::next`]. Dropping it stops accepting.
pub struct TlsIncoming {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsIncoming {
    /// Starts accepting on `listener` with `config`; every refused or unfinished handshake is
    /// passed to `on_refused` with the peer's address.
    pub fn start(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        handshake_timeout: Duration,
        on_refused: impl Fn(SocketAddr, Refusal) + Send + Sync + 'static,
    ) -> TlsIncoming {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = mpsc::channel(64);
        let tls = tokio_rustls::TlsAcceptor::from(config);
        let on_refused = Arc::new(on_refused);
        let acceptor = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, as axum does.
                        tracing::warn!(error = %e, "accepting a TLS connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Without it, a response written in pieces waits for the client's delayed ACK
                // (about 40 ms on Linux): in the middle of a reparent on the agents' port.
                let _ = tcp.set_nodelay(true);
                let (tls, tx, on_refused) = (tls.clone(), tx.clone(), on_refused.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => on_refused(peer, Refusal::Failed(e.to_string())),
                        Err(_) => on_refused(peer, Refusal::TimedOut(handshake_timeout)),
                    }
                });
            }
        });
        TlsIncoming {
            ready,
            local,
            acceptor,
        }
    }

    /// The listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next completed connection with its peer's address.
    pub async fn next(&mut self) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
        self.ready.recv().await
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl futures_core::Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .ready
            .poll_recv(cx)
            .map(|c| c.map(|(stream, _)| Ok(stream)))
    }
}
