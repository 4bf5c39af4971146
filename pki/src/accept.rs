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
    /// The client closed the connection without a word (a TCP port check, or a client
    /// that gave up): nothing refused, nothing to warn about.
    Closed,
}

impl Refusal {
    /// Whether the server refused something the client sent (worth a warning), rather
    /// than a client that went away.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Refusal::Closed)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Failed(why) => f.write_str(why),
            Refusal::TimedOut(d) => write!(f, "no complete handshake within {d:?}"),
            Refusal::Closed => f.write_str("closed by the client before the handshake ended"),
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
    /// passed to `on_refused` with the peer's address ([`Refusal::is_refusal`] tells a real
    /// refusal from a client that only closed).
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
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            on_refused(peer, Refusal::Closed)
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

#[cfg(all(test, feature = "issue"))]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    use super::*;
    use crate::issue::{Authority, Leaf};

    fn client_config(ca: &Authority, cert: Option<&crate::issue::Issued>) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match cert {
            Some(c) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                        .collect::<Result<Vec<_>, _>>()
                        .unwrap(),
                    PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    }

    #[tokio::test]
    async fn refusals_are_reported_with_their_reason_and_good_clients_come_out() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test cluster").unwrap();
        let server = ca
            .issue(&Leaf::server("agent", &["127.0.0.1"]))
            .unwrap()
            .write(dir.path(), "agent", &ca)
            .unwrap()
            .load(["ca", "cert", "key"])
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let seen: Arc<Mutex<Vec<Refusal>>> = Arc::default();
        let sink = seen.clone();
        let mut incoming = TlsIncoming::start(
            listener,
            server.server_config().unwrap(),
            Duration::from_secs(5),
            move |_, why| sink.lock().unwrap().push(why),
        );
        let addr = incoming.local_addr();
        let connect = |config: rustls::ClientConfig| async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await?;
            // TLS 1.3: the server judges our certificate after our side is done; a read
            // brings back its verdict.
            tls.write_all(b"ping").await?;
            let mut b = [0u8; 1];
            tls.read(&mut b).await.map(|_| ())
        };

        // A port check (connect, close) is not a refusal.
        drop(TcpStream::connect(addr).await.unwrap());
        // No client certificate, and one of another CA: refused, each with its reason.
        let _ = connect(client_config(&ca, None)).await;
        let other = Authority::new("other").unwrap();
        let forged = other.issue(&Leaf::client("orchestrator")).unwrap();
        let _ = connect(client_config(&ca, Some(&forged))).await;
        // A good client comes out of the stream.
        let good = ca.issue(&Leaf::client("orchestrator")).unwrap();
        let client = tokio::spawn(connect(client_config(&ca, Some(&good))));
        let (mut stream, _) = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("the good client within 5 s")
            .expect("a connection");
        let mut b = [0u8; 4];
        stream.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        stream.write_all(b"!").await.unwrap();
        client.await.unwrap().expect("the good client is served");

        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let got: Vec<String> = seen.lock().unwrap().iter().map(|r| r.to_string()).collect();
            let closed = seen.lock().unwrap().iter().any(|r| !r.is_refusal());
            if closed
                && got.iter().any(|r| r.contains("peer sent no certificates"))
                && got.iter().any(|r| r.contains("UnknownIssuer"))
            {
                assert_eq!(got.len(), 3, "{got:?}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "reported: {got:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
