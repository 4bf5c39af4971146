//! What myhactl presents to the cluster, shared by every command: the operator's certificate
//! (`--ca`, `--cert`, `--key` or `$MYHA_CA`, `$MYHA_CERT`, `$MYHA_KEY`) for TLS to etcd, to the
//! agents' gRPC and to the orchestrator's API, and the etcd user (`--etcd-user` or
//! `$MYHA_ETCD_USER`, its password in `--etcd-password-file` / `$MYHA_ETCD_PASSWORD_FILE` or in
//! `$MYHA_ETCD_PASSWORD`; never a flag, so that it stays out of `ps`). With none of them
//! given, a sandbox's own (its state file names them) when there is a sandbox.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use launcher::SandboxState;
use pki::{Material, TlsFiles};
use topo::{EtcdAccess, EtcdUser};

/// The environment variable holding the etcd password itself.
pub const PASSWORD_ENV: &str = "MYHA_ETCD_PASSWORD";

#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// The cluster CA (PEM) that etcd's, the agents' and the orchestrator's certificates
    /// chain to; with --cert and --key. Default: the sandbox's, when none of these is given.
    #[arg(long, env = "MYHA_CA", global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The operator's certificate (PEM), presented to etcd and to the agents.
    #[arg(long, env = "MYHA_CERT", global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "MYHA_KEY", global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The etcd user (etcd with authentication on); its password from --etcd-password-file
    /// or $MYHA_ETCD_PASSWORD.
    #[arg(long, env = "MYHA_ETCD_USER", global = true, value_name = "USER")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password (trailing newline ignored).
    #[arg(
        long,
        env = "MYHA_ETCD_PASSWORD_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub etcd_password_file: Option<PathBuf>,
}

impl SecurityArgs {
    fn is_empty(&self) -> bool {
        self.ca.is_none()
            && self.cert.is_none()
            && self.key.is_none()
            && self.etcd_user.is_none()
            && self.etcd_password_file.is_none()
    }
}

static ARGS: OnceLock<SecurityArgs> = OnceLock::new();

/// Keeps the parsed flags for [`resolve`] (called once, from `main`).
pub fn init(args: SecurityArgs) {
    let _ = ARGS.set(args);
}

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(
        "--ca, --cert and --key (or MYHA_CA, MYHA_CERT, MYHA_KEY) go together: {missing} \
         missing (etcd and the agents require a client certificate)"
    )]
    Incomplete { missing: String },
    #[error("{0}")]
    Tls(#[source] pki::PkiError),
    #[error(
        "--etcd-user {user:?} needs its password: --etcd-password-file FILE, or \
         ${PASSWORD_ENV}"
    )]
    NoPassword { user: String },
    #[error(
        "an etcd password is given (--etcd-password-file or ${PASSWORD_ENV}) but no \
         --etcd-user"
    )]
    NoUser,
    #[error("give the etcd password once: --etcd-password-file or ${PASSWORD_ENV}, not both")]
    TwoPasswords,
    #[error("cannot read the etcd password file {path}")]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the etcd password file {path} is empty")]
    EmptyPassword { path: PathBuf },
}

/// What myhactl presents: its certificate and its etcd user. The default is nothing
/// (plaintext, no user).
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub tls: Option<Material>,
    pub etcd_user: Option<EtcdUser>,
}

impl Security {
    /// How to connect to etcd.
    pub fn etcd_access(&self) -> EtcdAccess {
        EtcdAccess {
            tls: self.tls.clone(),
            user: self.etcd_user.clone(),
        }
    }

    /// A gRPC endpoint for the agent at `addr` (`host:port`): TLS with the operator's
    /// certificate when there is one (the agents require a client certificate), else
    /// plaintext.
    pub fn agent_endpoint(
        &self,
        addr: &str,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<tonic::transport::Endpoint, String> {
        Ok(pki::grpc_endpoint(addr, self.tls.as_ref())?
            .connect_timeout(connect_timeout)
            .timeout(timeout))
    }
}

/// The flags' (and environment's) certificate and user; with none given, those of the sandbox
/// in `dir` (or the default sandbox dir) when there is one, else none.
pub fn resolve(dir: Option<&Path>) -> Result<Security, SecurityError> {
    let args = ARGS.get().cloned().unwrap_or_default();
    let env_password = std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty());
    if args.is_empty() && env_password.is_none() {
        return match SandboxState::read(&crate::api::sandbox_dir(dir)) {
            Ok(Some(state)) => from_sandbox(&state),
            // No sandbox (or an unreadable state file, reported by whatever needs the
            // sandbox): nothing to present.
            _ => Ok(Security::default()),
        };
    }
    from_args(&args, env_password)
}

fn from_args(args: &SecurityArgs, env_password: Option<String>) -> Result<Security, SecurityError> {
    let tls = match (&args.ca, &args.cert, &args.key) {
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => {
            let files = TlsFiles {
                ca_file: ca.clone(),
                cert_file: cert.clone(),
                key_file: key.clone(),
            };
            Some(
                files
                    .load(["--ca", "--cert", "--key"])
                    .map_err(SecurityError::Tls)?,
            )
        }
        (ca, cert, key) => {
            let missing: Vec<&str> = [(ca.is_none(), "--ca"), (cert.is_none(), "--cert")]
                .into_iter()
                .chain([(key.is_none(), "--key")])
                .filter_map(|(m, name)| m.then_some(name))
                .collect();
            return Err(SecurityError::Incomplete {
                missing: missing.join(", "),
            });
        }
    };
    let password = match (&args.etcd_password_file, env_password) {
        (Some(_), Some(_)) => return Err(SecurityError::TwoPasswords),
        (Some(path), None) => Some(read_password(path)?),
        (None, from_env) => from_env,
    };
    let etcd_user = match (&args.etcd_user, password) {
        (Some(user), Some(pw)) => Some(EtcdUser::new(user, pw)),
        (Some(user), None) => return Err(SecurityError::NoPassword { user: user.clone() }),
        (None, Some(_)) => return Err(SecurityError::NoUser),
        (None, None) => None,
    };
    Ok(Security { tls, etcd_user })
}

/// The sandbox's own certificate and etcd user (its state file names them; a plaintext
/// sandbox, or one made before they existed, has none).
pub fn from_sandbox(state: &SandboxState) -> Result<Security, SecurityError> {
    let tls = match &state.operator_tls {
        Some(files) => Some(
            files
                .load([
                    "the sandbox's CA (operator_tls.ca_file in sandbox.json)",
                    "the sandbox's operator certificate (operator_tls.cert_file in sandbox.json)",
                    "the sandbox's operator key (operator_tls.key_file in sandbox.json)",
                ])
                .map_err(SecurityError::Tls)?,
        ),
        None => None,
    };
    let etcd_user = match (&state.etcd_user, &state.etcd_password_file) {
        (Some(user), Some(path)) => Some(EtcdUser::new(user, read_password(path)?)),
        _ => None,
    };
    Ok(Security { tls, etcd_user })
}

fn read_password(path: &Path) -> Result<String, SecurityError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecurityError::PasswordFile {
        path: path.to_path_buf(),
        source,
    })?;
    let pw = text.trim_end_matches(['\n', '\r']).to_string();
    if pw.is_empty() {
        return Err(SecurityError::EmptyPassword {
            path: path.to_path_buf(),
        });
    }
    Ok(pw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> SecurityArgs {
        SecurityArgs::default()
    }

    #[test]
    fn flags_must_come_together_and_name_what_is_missing() {
        let a = SecurityArgs {
            ca: Some("/x/ca.pem".into()),
            ..args()
        };
        let e = from_args(&a, None).unwrap_err().to_string();
        assert!(e.contains("--cert, --key missing"), "{e}");

        let a = SecurityArgs {
            ca: Some("/nonexistent/ca.pem".into()),
            cert: Some("/nonexistent/c.pem".into()),
            key: Some("/nonexistent/k.pem".into()),
            ..args()
        };
        let e = from_args(&a, None).unwrap_err().to_string();
        assert!(e.contains("`--ca`") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn the_etcd_user_needs_exactly_one_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let user = SecurityArgs {
            etcd_user: Some("myha".into()),
            ..args()
        };
        let e = from_args(&user, None).unwrap_err().to_string();
        assert!(e.contains("needs its password"), "{e}");
        let e = from_args(&args(), Some("pw".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no --etcd-user"), "{e}");
        let both = SecurityArgs {
            etcd_password_file: Some(file.clone()),
            ..user.clone()
        };
        let e = from_args(&both, Some("pw".into())).unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        let s = from_args(&both, None).unwrap();
        assert_eq!(s.etcd_user.unwrap().name(), "myha");
        let s = from_args(&user, Some("env-pw".into())).unwrap();
        // The password never shows in Debug output.
        let d = format!("{s:?}");
        assert!(d.contains("myha") && !d.contains("env-pw"), "{d}");
        std::fs::write(&file, "\n").unwrap();
        let e = from_args(&both, None).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
    }
}
