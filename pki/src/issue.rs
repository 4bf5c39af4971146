//! A cluster CA that issues certificates: for the sandbox and the test harness (and operators
//! who want a quick CA through `myhactl`), so that every test exercises the secure path.
//! Keys are ECDSA P-256: the cheapest handshake of the usual choices.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::{PkiError, TlsFiles};

/// A certificate authority: its certificate and its signing key.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub common_name: String,
    /// Subject alternative names: IP addresses or DNS names (a server's addresses).
    pub sans: Vec<String>,
    pub server: bool,
    pub client: bool,
    /// Valid from two days ago to yesterday (for negative tests).
    pub expired: bool,
}

impl Leaf {
    /// A certificate for a server at `sans` that is also a client of the cluster (an agent
    /// serves gRPC and is a client of etcd).
    pub fn server(common_name: &str, sans: &[&str]) -> Leaf {
        Leaf {
            common_name: common_name.into(),
            sans: sans.iter().map(|s| s.to_string()).collect(),
            server: true,
            client: true,
            expired: false,
        }
    }

    /// A client-only certificate.
    pub fn client(common_name: &str) -> Leaf {
        Leaf {
            common_name: common_name.into(),
            sans: Vec::new(),
            server: false,
            client: true,
            expired: false,
        }
    }

    pub fn expired(mut self) -> Leaf {
        self.expired = true;
        self
    }
}

/// An issued certificate and its key (PEM).
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Authority {
    /// A new CA named `name`, valid for ten years from yesterday (clock skew between hosts).
    pub fn new(name: &str) -> Result<Authority, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "myha");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An existing CA from its certificate and key (PEM), to issue more certificates.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Authority {
            issuer,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (PEM): whoever holds it can mint identities.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues `leaf` (valid one year from yesterday, or expired).
    pub fn issue(&self, leaf: &Leaf) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(leaf.sans.clone())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, leaf.common_name.as_str());
        dn.push(DnType::OrganizationName, "myha");
        params.distinguished_name = dn;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if leaf.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if leaf.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let now = OffsetDateTime::now_utc();
        if leaf.expired {
            params.not_before = now - Duration::days(2);
            params.not_after = now - Duration::days(1);
        } else {
            params.not_before = now - Duration::days(1);
            params.not_after = now + Duration::days(365);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the CA certificate to `dir/ca.pem` (readable by all: it is public) and returns
    /// its path.
    pub fn write_ca(&self, dir: &Path) -> Result<std::path::PathBuf, PkiError> {
        let path = dir.join("ca.pem");
        write_file(&path, self.cert_pem.as_bytes(), 0o644)?;
        Ok(path)
    }
}

impl Issued {
    /// Writes `dir/<stem>.pem` and `dir/<stem>-key.pem` (mode 0600) and `dir/ca.pem`, and
    /// returns the three as a [`TlsFiles`].
    pub fn write(&self, dir: &Path, stem: &str, ca: &Authority) -> Result<TlsFiles, PkiError> {
        let ca_file = ca.write_ca(dir)?;
        let cert_file = dir.join(format!("{stem}.pem"));
        let key_file = dir.join(format!("{stem}-key.pem"));
        write_file(&cert_file, self.cert_pem.as_bytes(), 0o644)?;
        write_file(&key_file, self.key_pem.as_bytes(), 0o600)?;
        Ok(TlsFiles {
            ca_file,
            cert_file,
            key_file,
        })
    }
}

/// Writes `path` with `mode` from its creation on (a key is never readable by others, not
/// even for an instant); an existing file is replaced.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
