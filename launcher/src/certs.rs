//! The certificates of one cluster (sandbox or test): a CA made at start and one certificate
//! per process, written under `<cluster dir>/tls`. Every control-plane link of a launched
//! cluster uses them, so that every test exercises the secure path.
//!
//! Identities (the common names the agents' allow-lists and etcd's users refer to):
//! [`ORCHESTRATOR_IDENTITY`] for every orchestrator, [`GATEWAY_IDENTITY`], [`CTL_IDENTITY`]
//! (myhactl and the test code acting as an operator), and `agent-<alias>` per agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pki::issue::{Authority, Leaf};
use pki::{Material, TlsFiles};

use crate::error::{HarnessError, Result};

pub const ORCHESTRATOR_IDENTITY: &str = "myha-orchestrator";
pub const GATEWAY_IDENTITY: &str = "myha-gateway";
pub const CTL_IDENTITY: &str = "myhactl";

/// The TLS keys of a `[tls]` section, for load errors.
pub const TLS_KEYS: pki::TlsKeys = ["tls.ca_file", "tls.cert_file", "tls.key_file"];

/// A cluster's CA and the directory its certificates are written to. Cheap to clone.
#[derive(Clone)]
pub struct Certs {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    ca: Authority,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Certs {
    /// A new CA, its certificate written to `dir/ca.pem` (`dir` is created, mode 0700: it
    /// holds private keys).
    pub fn create(dir: &Path) -> Result<Certs> {
        std::fs::create_dir_all(dir)
            .map_err(HarnessError::io(format!("create {}", dir.display())))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(HarnessError::io(format!("chmod {}", dir.display())))?;
        let ca = Authority::new("myha test cluster CA")?;
        ca.write_ca(dir)?;
        let certs = Certs {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                ca,
            }),
        };
        // The identities every cluster has, issued once: any number of orchestrators and
        // gateways share them (agents allow the orchestrators' identity, not a host).
        certs.client("orchestrator", ORCHESTRATOR_IDENTITY)?;
        certs.client("gateway", GATEWAY_IDENTITY)?;
        Ok(certs)
    }

    fn files(&self, stem: &str) -> TlsFiles {
        stem_files(&self.ca_file(), stem)
    }

    /// The orchestrators' certificate files (identity [`ORCHESTRATOR_IDENTITY`]).
    pub fn orchestrator_files(&self) -> TlsFiles {
        self.files("orchestrator")
    }

    /// The gateways' certificate files (identity [`GATEWAY_IDENTITY`]).
    pub fn gateway_files(&self) -> TlsFiles {
        self.files("gateway")
    }

    /// Issues the certificate of the agent of tablet `alias` (identity `agent-<alias>`),
    /// a server at `addrs`.
    pub fn agent(&self, alias: &str, addrs: &[String]) -> Result<TlsFiles> {
        let name = format!("agent-{alias}");
        self.server(&name, &name, addrs)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn ca_file(&self) -> PathBuf {
        self.inner.dir.join("ca.pem")
    }

    /// The CA itself (a negative test issues an expired certificate with it).
    pub fn authority(&self) -> &Authority {
        &self.inner.ca
    }

    /// Issues `leaf` and writes it as `dir/<stem>.pem` and `dir/<stem>-key.pem`.
    pub fn issue(&self, stem: &str, leaf: &Leaf) -> Result<TlsFiles> {
        let issued = self.inner.ca.issue(leaf)?;
        Ok(issued.write(&self.inner.dir, stem, &self.inner.ca)?)
    }

    /// A server certificate (also good as a client) for `common_name` at `addrs` (IP
    /// addresses or host names; `127.0.0.1` and `localhost` are always added).
    pub fn server(&self, stem: &str, common_name: &str, addrs: &[String]) -> Result<TlsFiles> {
        let mut sans: Vec<&str> = vec!["127.0.0.1", "localhost"];
        sans.extend(
            addrs
                .iter()
                .map(String::as_str)
                .filter(|a| *a != "127.0.0.1"),
        );
        sans.sort_unstable();
        sans.dedup();
        self.issue(stem, &Leaf::server(common_name, &sans))
    }

    /// A client certificate for `common_name`.
    pub fn client(&self, stem: &str, common_name: &str) -> Result<TlsFiles> {
        self.issue(stem, &Leaf::client(common_name))
    }

    /// Loads the certificate files `stem` (see [`Certs::issue`]).
    pub fn load(&self, stem: &str) -> Result<Material> {
        Ok(self.files(stem).load(TLS_KEYS)?)
    }

    /// The operator's (myhactl's, or test code's) client certificate, loaded: issued on
    /// first use as `dir/myhactl.pem`.
    pub fn operator(&self) -> Result<Material> {
        let files = TlsFiles {
            ca_file: self.ca_file(),
            cert_file: self.inner.dir.join(format!("{CTL_IDENTITY}.pem")),
            key_file: self.inner.dir.join(format!("{CTL_IDENTITY}-key.pem")),
        };
        if !files.cert_file.exists() {
            self.client(CTL_IDENTITY, CTL_IDENTITY)?;
        }
        Ok(files.load(TLS_KEYS)?)
    }
}

/// The files of certificate `stem` in the directory of `ca_file` (the layout [`Certs`]
/// writes).
pub fn stem_files(ca_file: &Path, stem: &str) -> TlsFiles {
    let dir = ca_file.parent().unwrap_or(Path::new("."));
    TlsFiles {
        ca_file: ca_file.to_path_buf(),
        cert_file: dir.join(format!("{stem}.pem")),
        key_file: dir.join(format!("{stem}-key.pem")),
    }
}

/// The orchestrators' certificate of the cluster whose CA is `ca_file`, loaded: what the
/// harness calls an agent's reparent RPCs with (test code stands in for the orchestrator).
pub fn orchestrator_material(ca_file: &Path) -> Result<Material> {
    Ok(stem_files(ca_file, "orchestrator").load(TLS_KEYS)?)
}

/// `files` as a daemon's `[tls]` section (TOML text), for tests that write configs by hand.
pub fn tls_section_toml(files: &TlsFiles) -> String {
    format!(
        "[tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        files.ca_file, files.cert_file, files.key_file
    )
}
