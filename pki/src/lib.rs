//! The cluster's certificates.
//!
//! Every control-plane link (agent gRPC, etcd, the orchestrator API) uses certificates of one
//! cluster CA. A [`TlsFiles`] section names a daemon's CA, certificate and key; [`TlsFiles::load`]
//! reads and checks them at start (an error names the key), and [`Material`] turns them into
//! tonic's server config (client certificates of the CA required) or client config.
//!
//! A peer's identity is the common name (CN) of its certificate's subject
//! ([`peer_identity`]): the agents' allow-lists name the orchestrators by it.
//!
//! With the `issue` feature, [`issue::Authority`] makes a CA and issues certificates: the
//! sandbox and the test harness use it so that every test runs the secure path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

pub mod accept;
#[cfg(feature = "issue")]
pub mod issue;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("`{key}`: {message}")]
    File { key: &'static str, message: String },
    #[error("certificate: {0}")]
    Certificate(String),
    #[cfg(feature = "issue")]
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A daemon's certificate files: the cluster CA that peers' certificates must chain to, and
/// its own certificate (PEM, the leaf first; intermediates may follow) and private key (PEM).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The config keys of a [`TlsFiles`], for errors (`["tls.ca_file", "tls.cert_file",
/// "tls.key_file"]` for a `[tls]` section).
pub type TlsKeys = [&'static str; 3];

impl TlsFiles {
    /// Reads and checks the three files: the CA and the certificate parse as X.509, the
    /// certificate is within its validity period, and the key is a PEM private key. Errors
    /// name the key of the file at fault.
    pub fn load(&self, keys: TlsKeys) -> Result<Material, PkiError> {
        let [ca_key, cert_key, key_key] = keys;
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| PkiError::File {
                key,
                message: format!("cannot read {}: {e}", path.display()),
            })
        };
        let ca_pem = read(ca_key, &self.ca_file)?;
        let cert_pem = read(cert_key, &self.cert_file)?;
        let key_pem = read(key_key, &self.key_file)?;
        let ca = first_certificate(&ca_pem).map_err(|message| PkiError::File {
            key: ca_key,
            message: format!("{}: {message}", self.ca_file.display()),
        })?;
        if !ca.is_ca {
            return Err(PkiError::File {
                key: ca_key,
                message: format!("{}: not a CA certificate", self.ca_file.display()),
            });
        }
        let own = first_certificate(&cert_pem).map_err(|message| PkiError::File {
            key: cert_key,
            message: format!("{}: {message}", self.cert_file.display()),
        })?;
        if !own.valid_now {
            return Err(PkiError::File {
                key: cert_key,
                message: format!(
                    "{}: not valid now (valid {} to {})",
                    self.cert_file.display(),
                    own.not_before,
                    own.not_after
                ),
            });
        }
        let key_text = String::from_utf8_lossy(&key_pem);
        if !key_text.contains("PRIVATE KEY-----") {
            return Err(PkiError::File {
                key: key_key,
                message: format!("{}: no PEM private key", self.key_file.display()),
            });
        }
        Ok(Material {
            ca_pem,
            cert_pem,
            key_pem,
            identity: own.common_name,
        })
    }
}

/// Installs ring as the process's default rustls crypto provider (idempotent). Needed before
/// building any `reqwest` client: the workspace builds reqwest with `rustls-no-provider` (its
/// default provider, aws-lc, is a slow C build on small machines), and reqwest then panics at
/// `build()` when no default provider is installed, whether or not the client uses HTTPS.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[allow(deprecated)]
        let provider = tokio_rustls::rustls::crypto::ring::default_provider();
        // Err: another provider was installed first, which serves as well.
        let _ = provider.install_default();
    });
}

/// A server's own certificate and key, without client certificates (the orchestrator's
/// HTTPS API: its callers authenticate with tokens).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl ServerFiles {
    /// Reads the certificate chain and key into a rustls server config (TLS 1.2 and 1.3,
    /// HTTP/1.1). Errors name `keys` (`[cert_file key, key_file key]`).
    pub fn server_config(
        &self,
        keys: [&'static str; 2],
    ) -> Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>, PkiError> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let [cert_key, key_key] = keys;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| PkiError::File {
                key: cert_key,
                message: format!("{}: {e}", self.cert_file.display()),
            })?;
        if certs.is_empty() {
            return Err(PkiError::File {
                key: cert_key,
                message: format!("{}: no certificate", self.cert_file.display()),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&self.key_file).map_err(|e| PkiError::File {
            key: key_key,
            message: format!("{}: {e}", self.key_file.display()),
        })?;
        // ring, as tonic's TLS uses here (aws-lc's C build is slow on small machines); its
        // lack of post-quantum key exchange is rustls's reason for the deprecation.
        #[allow(deprecated)]
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PkiError::Certificate(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| PkiError::File {
                key: key_key,
                message: format!(
                    "{} does not match {}: {e}",
                    self.key_file.display(),
                    self.cert_file.display()
                ),
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(std::sync::Arc::new(config))
    }
}

/// A daemon's loaded certificates.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// The common name of this daemon's own certificate.
    pub identity: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Material {
    /// The private key (PEM), for the one place that hands it to a TLS stack.
    pub fn key_pem(&self) -> &[u8] {
        &self.key_pem
    }

    /// A server that requires a client certificate chaining to the cluster CA (no
    /// certificate, another CA's, or an expired one: the handshake fails), speaking HTTP/2
    /// (gRPC). Served through [`accept::TlsIncoming`], which reports each refusal.
    pub fn server_config(
        &self,
    ) -> Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>, PkiError> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let pem = |e: rustls::pki_types::pem::Error| PkiError::Certificate(e.to_string());
        let tls = |e: rustls::Error| PkiError::Certificate(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            roots.add(cert.map_err(pem)?).map_err(tls)?;
        }
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(pem)?;
        // ring, as tonic's TLS uses (aws-lc's C build is slow on small machines); its lack of
        // post-quantum key exchange is rustls's reason for the deprecation.
        #[allow(deprecated)]
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(tls)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(std::sync::Arc::new(config))
    }

    /// A client that trusts only the cluster CA and presents this daemon's certificate.
    pub fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

/// The URI of a gRPC server registered as `addr` (`host:port`, or a full URI kept as is):
/// `https://` when the caller has certificates, `http://` otherwise.
pub fn grpc_uri(addr: &str, tls: Option<&Material>) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_string()
    } else if tls.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// An endpoint for the gRPC server at `addr` (see [`grpc_uri`]), with TLS when `tls` is
/// given. The server's certificate must name the host of `addr` (an IP address SAN for an IP).
pub fn grpc_endpoint(
    addr: &str,
    tls: Option<&Material>,
) -> Result<tonic::transport::Endpoint, String> {
    let uri = grpc_uri(addr, tls);
    let ep = tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|e| format!("invalid gRPC address {addr:?}: {e}"))?;
    match tls {
        Some(m) => ep
            .tls_config(m.client_tls())
            .map_err(|e| format!("TLS for {uri}: {e}")),
        None => Ok(ep),
    }
}

/// What [`first_certificate`] reads off a certificate.
struct CertFacts {
    common_name: String,
    is_ca: bool,
    valid_now: bool,
    not_before: String,
    not_after: String,
}

fn first_certificate(pem: &[u8]) -> Result<CertFacts, String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("not a PEM certificate: {e}"))?;
    if pem.label != "CERTIFICATE" {
        return Err(format!("a PEM {:?}, not a CERTIFICATE", pem.label));
    }
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let validity = cert.validity();
    Ok(CertFacts {
        common_name: common_name(&cert).unwrap_or_default(),
        is_ca: cert.is_ca(),
        valid_now: validity.is_valid(),
        not_before: validity.not_before.to_string(),
        not_after: validity.not_after.to_string(),
    })
}

fn common_name(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// The identity of a peer: the common name of its certificate (DER, as tonic's
/// `Request::peer_certs` gives it, the leaf first). The TLS handshake has already checked
/// the chain to the cluster CA and the validity period; this only names the peer.
pub fn peer_identity(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Certificate(format!("peer certificate does not parse: {e}")))?;
    common_name(&cert)
        .filter(|cn| !cn.is_empty())
        .ok_or_else(|| PkiError::Certificate("peer certificate has no common name".into()))
}

#[cfg(all(test, feature = "issue"))]
mod tests {
    use super::issue::{Authority, Leaf};
    use super::*;

    const KEYS: TlsKeys = ["tls.ca_file", "tls.cert_file", "tls.key_file"];

    #[test]
    fn issued_files_load_and_name_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test cluster").unwrap();
        let files = ca
            .issue(&Leaf::client("orchestrator-1"))
            .unwrap()
            .write(dir.path(), "orch", &ca)
            .unwrap();
        let m = files.load(KEYS).unwrap();
        assert_eq!(m.identity, "orchestrator-1");
        let der = x509_parser::pem::parse_x509_pem(&m.cert_pem)
            .unwrap()
            .1
            .contents;
        assert_eq!(peer_identity(&der).unwrap(), "orchestrator-1");
        // The key file is the daemon's alone.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn load_errors_name_the_key_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test cluster").unwrap();
        let good = ca
            .issue(&Leaf::server("agent", &["127.0.0.1"]))
            .unwrap()
            .write(dir.path(), "agent", &ca)
            .unwrap();
        let expired = ca
            .issue(&Leaf::client("old").expired())
            .unwrap()
            .write(dir.path(), "old", &ca)
            .unwrap();
        let missing = TlsFiles {
            ca_file: dir.path().join("nope.pem"),
            ..good.clone()
        };
        let leaf_as_ca = TlsFiles {
            ca_file: good.cert_file.clone(),
            ..good.clone()
        };
        let key_as_cert = TlsFiles {
            cert_file: good.key_file.clone(),
            ..good.clone()
        };
        let cert_as_key = TlsFiles {
            key_file: good.cert_file.clone(),
            ..good.clone()
        };
        for (files, key, words) in [
            (&missing, "tls.ca_file", "cannot read"),
            (&leaf_as_ca, "tls.ca_file", "not a CA"),
            (&key_as_cert, "tls.cert_file", "CERTIFICATE"),
            (&cert_as_key, "tls.key_file", "no PEM private key"),
            (&expired, "tls.cert_file", "not valid now"),
        ] {
            let e = files.load(KEYS).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(words), "{e}");
        }
    }

    #[test]
    fn peer_identity_refuses_garbage() {
        assert!(peer_identity(b"not a certificate").is_err());
    }
}
