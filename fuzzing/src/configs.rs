//! The daemons' config files as text: `agent.toml`, `orchestrator.toml` and `gateway.toml`
//! through the same parse-and-validate entry points the daemons load them with
//! (`daemon::parse_toml`, then each config's validation), every input through all three.
//!
//! A config the fuzzer writes may name a file the validation reads (a secret's `password_file`
//! or `token_file`, a certificate's `ca_file`...: every such key ends in `_file`): such an input
//! is parsed but never validated, so that the fuzzer reads no file it names (`/dev/zero` would
//! never end). Environment variables it names are read, which is harmless.

use myha_agent::config::AgentConfig;
use myha_gateway::config::GatewayConfig;
use myha_orchestrator::config::OrchestratorConfig;

/// A secret at least this long that occurs once in the text is distinctive enough to check
/// that no error message quotes it.
const MIN_CHECKED_SECRET: usize = 8;

pub fn configs(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    // Not short-circuiting: every input goes through all three.
    let accepted = [agent(&text), orchestrator(&text), gateway(&text)];
    accepted.contains(&true)
}

/// The input is schema-valid for the agent: then, unless it names a file, the full load
/// (validation, secrets) either refuses it without quoting a secret, or accepts it and its
/// `to_toml` text (what the harness writes) loads back to the same config.
fn agent(text: &str) -> bool {
    let raw = match daemon::parse_toml::<AgentConfig>(text) {
        Ok(raw) => raw,
        Err(e) => {
            assert!(AgentConfig::parse(text).is_err());
            assert!(!e.to_string().is_empty());
            return false;
        }
    };
    if names_a_file(&raw) {
        return true;
    }
    match AgentConfig::parse(text) {
        Ok(cfg) => {
            written_back("agent", text, &cfg, cfg.to_toml(), AgentConfig::parse);
        }
        Err(e) => {
            let secrets = [
                raw.mysql.password.expose(),
                raw.mysql.repl_password.expose(),
            ];
            no_secret_in(text, &e.to_string(), &secrets);
        }
    }
    true
}

fn orchestrator(text: &str) -> bool {
    let raw = match daemon::parse_toml::<OrchestratorConfig>(text) {
        Ok(raw) => raw,
        Err(e) => {
            assert!(OrchestratorConfig::parse(text).is_err());
            assert!(!e.to_string().is_empty());
            return false;
        }
    };
    if names_a_file(&raw) {
        return true;
    }
    let o = &raw.orchestrator;
    match OrchestratorConfig::parse(text) {
        Ok(cfg) => {
            written_back(
                "orchestrator",
                text,
                &cfg,
                cfg.to_toml(),
                OrchestratorConfig::parse,
            );
            let tokens = cfg.api_tokens().expect("validated");
            let _ = (cfg.client_token(), cfg.analysis(), cfg.recovery_config());
            assert_eq!(
                tokens.len(),
                o.api_tokens.len() + usize::from(o.api_token.is_some())
            );
        }
        Err(e) => {
            let secrets: Vec<&str> = o
                .api_token
                .iter()
                .chain(o.api_tokens.iter().filter_map(|t| t.token.as_ref()))
                .map(|s| s.expose())
                .collect();
            no_secret_in(text, &e.to_string(), &secrets);
        }
    }
    true
}

fn gateway(text: &str) -> bool {
    match daemon::parse_toml::<GatewayConfig>(text) {
        Ok(raw) if names_a_file(&raw) => return true,
        Ok(_) => {}
        Err(e) => {
            assert!(GatewayConfig::parse(text).is_err());
            assert!(!e.to_string().is_empty());
            return false;
        }
    }
    match GatewayConfig::parse(text) {
        Ok(cfg) => {
            written_back("gateway", text, &cfg, cfg.to_toml(), GatewayConfig::parse);
            let _ = (cfg.rw(), cfg.ro(), cfg.routing.policy());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    true
}

/// Whether the config sets a key ending in `_file` (a path the validation reads), at any depth;
/// a config that cannot be looked at counts as naming one.
fn names_a_file(raw: &impl serde::Serialize) -> bool {
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(map) => map
                .iter()
                .any(|(k, v)| (k.ends_with("_file") && !v.is_null()) || walk(v)),
            serde_json::Value::Array(items) => items.iter().any(walk),
            _ => false,
        }
    }
    serde_json::to_value(raw).map_or(true, |v| walk(&v))
}

/// `written` (the config's `to_toml`, what the harness and the launcher write) loads back to
/// the same config.
fn written_back<C, E>(
    what: &str,
    text: &str,
    cfg: &C,
    written: String,
    parse: fn(&str) -> Result<C, E>,
) where
    C: PartialEq + std::fmt::Debug,
    E: std::fmt::Display,
{
    match parse(&written) {
        Ok(again) => assert_eq!(
            &again, cfg,
            "{what} config {text:?} written as {written:?} loads back different"
        ),
        Err(e) => panic!("{what} config {text:?} written as {written:?} does not load: {e}"),
    }
}

/// A validation error never quotes a secret of the config. Checked for secrets distinctive
/// enough to tell (long, and written once in the text: a secret that is also the cell name may
/// rightly appear as the cell).
fn no_secret_in(text: &str, message: &str, secrets: &[&str]) {
    assert!(!message.is_empty());
    for s in secrets {
        if s.len() >= MIN_CHECKED_SECRET && text.matches(s).count() == 1 {
            assert!(
                !message.contains(s),
                "the error {message:?} quotes the secret {s:?}"
            );
        }
    }
}
