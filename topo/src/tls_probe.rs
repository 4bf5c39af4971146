//! Why does etcd close our TLS connections? Asked directly, on a connection of our own.
//!
//! With TLS 1.3 a client's handshake is over before the server has checked the client's
//! certificate. When etcd refuses it (none, another CA's, expired) it sends an alert and
//! closes, but gRPC has already written its preface: the server's close then resets the
//! connection and the alert is usually lost, so a call sees only "connection closed". Here
//! the handshake is followed by a read, not a write: etcd's HTTP/2 server speaks first (its
//! SETTINGS frame) when it accepted us, and otherwise its alert arrives intact.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_rustls::rustls::{self, pki_types};

/// What etcd at `url` (`https://host:port` or `host:port`) says to a TLS connection with
/// `material`: `Some(reason)` when it refuses it (the handshake fails, or an alert comes in
/// place of HTTP/2), `None` when it accepts it or cannot be asked (unreachable, timeout).
pub(crate) async fn refusal(
    url: &str,
    material: &pki::Material,
    timeout: Duration,
) -> Option<String> {
    match tokio::time::timeout(timeout, ask(url, material)).await {
        Ok(Ok(())) | Err(_) => None,
        Ok(Err(Probe::Unreachable)) => None,
        Ok(Err(Probe::Refused(why))) => Some(why),
    }
}

enum Probe {
    Unreachable,
    Refused(String),
}

async fn ask(url: &str, material: &pki::Material) -> Result<(), Probe> {
    let addr = url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => return Err(Probe::Unreachable),
    };
    let config = client_config(material).map_err(|_| Probe::Unreachable)?;
    let name = pki_types::ServerName::try_from(host).map_err(|_| Probe::Unreachable)?;
    let tcp = tokio::net::TcpStream::connect(addr.as_str())
        .await
        .map_err(|_| Probe::Unreachable)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| Probe::Refused(e.to_string()))?;
    let mut first = [0u8; 16];
    match tls.read(&mut first).await {
        Ok(n) if n > 0 => Ok(()),
        // A close without an alert says nothing about our certificate.
        Ok(_) => Err(Probe::Unreachable),
        Err(e) => {
            let text = e.to_string();
            if text.to_ascii_lowercase().contains("alert") {
                Err(Probe::Refused(text))
            } else {
                Err(Probe::Unreachable)
            }
        }
    }
}

/// The rustls config tonic builds from the same material: the CA as the only root, this
/// client's certificate, HTTP/2.
fn client_config(material: &pki::Material) -> Result<rustls::ClientConfig, String> {
    use pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in pki_types::CertificateDer::pem_slice_iter(&material.ca_pem) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let chain = pki_types::CertificateDer::pem_slice_iter(&material.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key =
        pki_types::PrivateKeyDer::from_pem_slice(material.key_pem()).map_err(|e| e.to_string())?;
    // The provider tonic's `tls-ring` uses for the real connection (deprecated in rustls for
    // lacking post-quantum key exchange, which etcd's Go 1.19 does not offer either).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
