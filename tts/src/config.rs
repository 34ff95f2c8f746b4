//! The service configuration file (TOML): trust domain, listener, token
//! lifetime, signing key, the workload registry and the user-token issuer.
//!
//! Relative paths are resolved against the configuration file's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use elevate_core::keys::SigningAlg;
use serde::{Deserialize, Serialize};
use txn_token_client::protocol::ClientAuthMethod;

/// Default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8400";

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML (or an embedded JSON key) does not parse.
    #[error("invalid configuration {path}: {reason}")]
    Parse {
        /// The file or field.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A key could not be loaded.
    #[error("key for {what}: {source}")]
    Key {
        /// Which key.
        what: String,
        /// The error.
        source: elevate_core::keys::KeyError,
    },
    /// A value is missing or contradictory.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The `[tls]` files do not make a TLS configuration.
    #[error("[tls] ({files}): {reason}")]
    Tls {
        /// The files of the `[tls]` table.
        files: String,
        /// What is wrong.
        reason: String,
    },
}

/// TLS for the listener (`[tls]`): without it the service speaks plain HTTP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the server's certificate chain, leaf first (its SANs must
    /// name the host clients connect to).
    pub cert: PathBuf,
    /// PEM file of its private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM bundle of the CAs client certificates must chain to (e.g. the
    /// SPIFFE trust bundle). With it, clients are asked for a certificate
    /// (not required: `private_key_jwt` clients present none) and
    /// `tls_client_auth` is offered; a certificate that does not chain to
    /// it fails the handshake. Without it no certificate is asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

/// A registered workload: its public key and the scopes it may be granted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Workload id, e.g. `spiffe://example.org/billing`.
    pub id: String,
    /// The public JWK inline (EC P-256 or OKP Ed25519, with `kid`), or a
    /// JWKS (`{ keys = [...] }`) of several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_jwk: Option<serde_json::Value>,
    /// Or a file holding the workload's public key(s) as JSON: one JWK, or a
    /// JWKS (`{"keys": [...]}`) of several (a rollover keeps the old and the
    /// new key in it while both are in use). May be spelled `jwks_file`. The
    /// service re-reads it every `key_reload_secs` and the workload's keys
    /// become exactly the file's; a file that does not parse, or holds no
    /// usable key, is logged (with its path) and the previous keys are kept.
    #[serde(default, alias = "jwks_file", skip_serializing_if = "Option::is_none")]
    pub jwk_file: Option<PathBuf>,
    /// Scopes this workload may be granted.
    #[serde(default)]
    pub allowed_scopes: Vec<String>,
}

/// The OIDC/OAuth issuer whose access tokens start a transaction (entry flow).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserIssuerConfig {
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud` (must be among the token's audiences).
    pub audience: String,
    /// The issuer's JWKS inline (`{ keys = [...] }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
    /// Or a JWKS JSON file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
}

/// Fleet mode (`[store]`): the state replicas share, in PostgreSQL. Without
/// it the service keeps everything in its own memory (the embedded default).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// libpq connection string or URL, e.g. `host=127.0.0.1 user=postgres dbname=test`
    /// or `postgres://user@host/db`.
    pub postgres: String,
    /// Schema holding this trust domain's tables (created when missing;
    /// 1-48 of `a-z`, `0-9`, `_`). Default `elevate_tts`.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Every replica reloads the shared state on each change notification
    /// (LISTEN/NOTIFY) and at least every `poll_ms` milliseconds (default
    /// 1000): the bound on how long a change made at one replica may take to
    /// reach another when a notification is lost.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// How long after a fleet-wide rotation the new signing key starts
    /// signing, in seconds (default 5): it is published by every replica
    /// first. Keep it above `poll_ms`.
    #[serde(default = "default_activation")]
    pub key_activation_secs: u64,
    /// This replica's name in the audit log (default `HOSTNAME:pid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// An operator allowed to use the admin API: its id and public key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Operator id (`iss` and `sub` of its admin assertions), e.g. `ops:alice`.
    pub id: String,
    /// Its public JWK inline (EC P-256 or OKP Ed25519, with `kid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_jwk: Option<serde_json::Value>,
    /// Or a file holding it (one JWK or a JWKS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwk_file: Option<PathBuf>,
}

/// The authenticated admin API (`[admin]`): register, update, revoke,
/// suspend and reinstate workloads, rotate keys, list state and the audit
/// log, each call carrying an admin assertion signed by an operator key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The operators (at least one).
    pub operators: Vec<OperatorConfig>,
    /// Longest accepted admin assertion lifetime (`exp - iat`), seconds (default 60, at most 300).
    #[serde(default = "default_admin_lifetime")]
    pub max_assertion_secs: u64,
}

/// The whole service configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The trust domain: the only accepted `audience`, and the tokens' `aud`.
    pub trust_domain: String,
    /// Listen address (`127.0.0.1:8400` by default; port 0 for an ephemeral port).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Token endpoint path.
    #[serde(default = "default_token_path")]
    pub token_endpoint_path: String,
    /// Public base URL (e.g. `https://tts.example.org`) when behind a proxy;
    /// the client assertion `aud` is this plus the token path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Txn-Token lifetime in seconds (default 60).
    #[serde(default = "default_lifetime")]
    pub token_lifetime_secs: u64,
    /// The algorithm the service signs its Txn-Tokens with: `"ES256"`
    /// (ECDSA P-256, the default: what every JOSE verifier supports) or
    /// `"EdDSA"` (Ed25519: about 40 % less CPU than ES256 to sign and to
    /// verify on this project's machines, see docs/DESIGN-NOTES.md). Verifiers pin
    /// each published key to its algorithm, so tokens of the other
    /// algorithm never verify under it. Generated and rotated keys are of
    /// this algorithm; `signing_key_pem` must hold a key of it. The
    /// command line's `--signing-alg` overrides it.
    #[serde(default = "default_signing_alg")]
    pub signing_alg: SigningAlg,
    /// PKCS#8 PEM of the signing key (of `signing_alg`); generated at start when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_pem: Option<PathBuf>,
    /// `kid` of that key; default: derived from its public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_kid: Option<String>,
    /// How many previous signing keys stay published after rotation (default 1),
    /// on top of every key retired less than `token_lifetime_secs` + 30 s ago
    /// (those stay whatever this says, so tokens they signed keep verifying).
    #[serde(default = "default_keep_previous")]
    pub keep_previous_keys: usize,
    /// How often workload key files (`jwk_file` / `jwks_file`) are checked
    /// for changes, in seconds (default 2; 0: read at start only).
    #[serde(default = "default_key_reload")]
    pub key_reload_secs: u64,
    /// `Cache-Control: max-age` of the workload key directory
    /// (`/.well-known/workload-jwks`), in seconds (default 30).
    #[serde(default = "default_directory_max_age")]
    pub workload_jwks_max_age_secs: u64,
    /// Enables `POST /admin/rotate-keys` from loopback peers, unauthenticated
    /// (the development switch, kept for single-process use). With `[admin]`
    /// every admin route requires an operator's admin assertion instead and
    /// this switch is ignored.
    #[serde(default)]
    pub admin_endpoints: bool,
    /// The authenticated admin API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    /// Fleet mode: shared state in PostgreSQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreConfig>,
    /// Extra known scopes besides those allowed to some workload.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// TLS for the listener; plain HTTP when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// The client authentication methods a workload may use at the token
    /// endpoint, by workload id (`private_key_jwt`, `tls_client_auth`). A
    /// workload not listed uses `private_key_jwt` only; one listed uses
    /// exactly the methods listed. `tls_client_auth` needs `[tls]` with a
    /// `client_ca`. (A table beside `[[workloads]]`, not a key in it, so
    /// code that builds `WorkloadConfig` values keeps compiling.)
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub token_endpoint_auth_methods: BTreeMap<String, Vec<ClientAuthMethod>>,
    /// The workload registry.
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// The user-token issuer for the entry flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_issuer: Option<UserIssuerConfig>,
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}
fn default_token_path() -> String {
    txn_token_client::protocol::DEFAULT_TOKEN_PATH.to_string()
}
fn default_lifetime() -> u64 {
    60
}
fn default_signing_alg() -> SigningAlg {
    SigningAlg::ES256
}
fn default_keep_previous() -> usize {
    1
}
fn default_key_reload() -> u64 {
    2
}
fn default_directory_max_age() -> u64 {
    30
}
fn default_schema() -> String {
    "elevate_tts".to_string()
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_activation() -> u64 {
    5
}
fn default_admin_lifetime() -> u64 {
    60
}

impl StoreConfig {
    /// A store on `postgres` with the defaults.
    pub fn new(postgres: impl Into<String>) -> Self {
        StoreConfig {
            postgres: postgres.into(),
            schema: default_schema(),
            poll_ms: default_poll_ms(),
            key_activation_secs: default_activation(),
            replica: None,
        }
    }
}

impl ServiceConfig {
    /// A minimal configuration for `trust_domain` with defaults everywhere.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        ServiceConfig {
            trust_domain: trust_domain.into(),
            listen: default_listen(),
            token_endpoint_path: default_token_path(),
            public_url: None,
            token_lifetime_secs: default_lifetime(),
            signing_alg: default_signing_alg(),
            signing_key_pem: None,
            signing_key_kid: None,
            keep_previous_keys: default_keep_previous(),
            key_reload_secs: default_key_reload(),
            workload_jwks_max_age_secs: default_directory_max_age(),
            admin_endpoints: false,
            admin: None,
            store: None,
            scopes: Vec::new(),
            tls: None,
            token_endpoint_auth_methods: BTreeMap::new(),
            workloads: Vec::new(),
            user_issuer: None,
        }
    }

    /// Parses TOML text.
    ///
    /// # Errors
    ///
    /// Returns [`ConfigError::Parse`] if `text` is not valid TOML for this configuration, and
    /// [`ConfigError::Invalid`] if `trust_domain` is empty, `token_endpoint_path` does not start
    /// with `/`, `token_lifetime_secs` is not between 1 and 3600, or `token_endpoint_auth_methods`
    /// gives a workload no method or names one that is not registered, or names
    /// `tls_client_auth` without a `[tls]` `client_ca`.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: ServiceConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            reason: e.to_string(),
        })?;
        if cfg.trust_domain.is_empty() {
            return Err(ConfigError::Invalid("trust_domain is empty".into()));
        }
        if !cfg.token_endpoint_path.starts_with('/') {
            return Err(ConfigError::Invalid(
                "token_endpoint_path must start with '/'".into(),
            ));
        }
        if cfg.token_lifetime_secs == 0
            || cfg.token_lifetime_secs > txn_token_client::verify::MAX_TOKEN_LIFETIME.as_secs()
        {
            return Err(ConfigError::Invalid(
                "token_lifetime_secs must be between 1 and 3600".into(),
            ));
        }
        cfg.check_auth_methods()?;
        cfg.check_fleet(origin)?;
        Ok(cfg)
    }

    /// The checks on `token_endpoint_auth_methods`: deny by default, so a
    /// typo'd id or an empty list is an error, not a silent no-op.
    fn check_auth_methods(&self) -> Result<(), ConfigError> {
        let client_ca = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        for (id, methods) in &self.token_endpoint_auth_methods {
            if !self.workloads.iter().any(|w| &w.id == id) {
                return Err(ConfigError::Invalid(format!(
                    "token_endpoint_auth_methods names {id:?}, which is not among [[workloads]]"
                )));
            }
            if methods.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "token_endpoint_auth_methods gives {id:?} no method (to shut it out, remove it)"
                )));
            }
            if methods.contains(&ClientAuthMethod::TlsClientAuth) && !client_ca {
                return Err(ConfigError::Invalid(format!(
                    "token_endpoint_auth_methods allows tls_client_auth for {id:?}, \
                     but no client certificate is asked for: set [tls] cert, key and client_ca"
                )));
            }
        }
        Ok(())
    }

    /// The checks on `[store]` and `[admin]`, each naming the key and the fix.
    fn check_fleet(&self, origin: &str) -> Result<(), ConfigError> {
        if let Some(st) = &self.store {
            if !crate::store::postgres::valid_schema(&st.schema) {
                return Err(ConfigError::Invalid(format!(
                    "{origin}: [store] schema {:?}: use 1-48 of a-z, 0-9 and _, not starting with a digit",
                    st.schema
                )));
            }
            if st.poll_ms == 0 || st.poll_ms > 60_000 {
                return Err(ConfigError::Invalid(format!(
                    "{origin}: [store] poll_ms = {}: use 1..=60000 (milliseconds)",
                    st.poll_ms
                )));
            }
            if st.key_activation_secs.saturating_mul(1000) <= st.poll_ms {
                return Err(ConfigError::Invalid(format!(
                    "{origin}: [store] key_activation_secs = {} is not above poll_ms = {}: a new key \
                     must be published by every replica before one signs with it",
                    st.key_activation_secs, st.poll_ms
                )));
            }
        }
        if let Some(a) = &self.admin {
            if a.operators.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "{origin}: [admin] operators is empty: list at least one {{ id, public_jwk | jwk_file }}, or remove [admin]"
                )));
            }
            if a.max_assertion_secs == 0 || a.max_assertion_secs > 300 {
                return Err(ConfigError::Invalid(format!(
                    "{origin}: [admin] max_assertion_secs = {}: use 1..=300",
                    a.max_assertion_secs
                )));
            }
            for o in &a.operators {
                if o.public_jwk.is_some() == o.jwk_file.is_some() {
                    return Err(ConfigError::Invalid(format!(
                        "{origin}: [admin] operator {:?} needs exactly one of public_jwk or jwk_file",
                        o.id
                    )));
                }
            }
        }
        Ok(())
    }

    /// Reads and parses a TOML file.
    ///
    /// # Errors
    ///
    /// Returns [`ConfigError::Io`] if the file cannot be read, and the errors of
    /// [`from_toml`](Self::from_toml) for its contents.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Serializes to TOML (tests write configs this way).
    ///
    /// # Errors
    ///
    /// Returns [`ConfigError::Parse`] if the configuration cannot be represented as TOML.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            reason: e.to_string(),
        })
    }
}

/// Resolves `p` against `base` unless absolute.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Reads a JSON file.
///
/// # Errors
///
/// Returns [`ConfigError::Io`] if the file cannot be read, and [`ConfigError::Parse`] if it is not
/// JSON.
pub fn read_json(path: &Path) -> Result<serde_json::Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_config() {
        let cfg = ServiceConfig::from_toml(
            r#"
trust_domain = "example.org"
listen = "127.0.0.1:0"
token_lifetime_secs = 120

[[workloads]]
id = "spiffe://example.org/billing"
public_jwk = { kty = "EC", crv = "P-256", kid = "b1", x = "AAAA", y = "BBBB" }
allowed_scopes = ["orders.read"]

[[workloads]]
id = "spiffe://example.org/shipping"
jwk_file = "shipping.jwk.json"
allowed_scopes = ["orders.read", "orders.ship"]

[[workloads]]
id = "spiffe://example.org/orders"
jwks_file = "orders.jwks.json"

[user_issuer]
issuer = "https://idp.example.org"
audience = "elevate"
jwks = { keys = [] }
"#,
            "test",
        )
        .unwrap();
        assert_eq!(cfg.workloads.len(), 3);
        assert_eq!(
            cfg.workloads[2].jwk_file.as_deref(),
            Some(Path::new("orders.jwks.json"))
        );
        assert_eq!(cfg.token_endpoint_path, "/token");
        assert_eq!(cfg.keep_previous_keys, 1);
        assert_eq!(cfg.key_reload_secs, 2);
        assert_eq!(cfg.workload_jwks_max_age_secs, 30);
        assert_eq!(cfg.signing_alg, SigningAlg::ES256, "ES256 by default");
        let again = ServiceConfig::from_toml(&cfg.to_toml().unwrap(), "roundtrip").unwrap();
        assert_eq!(again.workloads[1].allowed_scopes.len(), 2);
        assert!(ServiceConfig::from_toml("trust_domain = 'x'\nbogus = 1", "t").is_err());
    }

    #[test]
    fn signing_alg_is_es256_or_eddsa_and_nothing_else() {
        let with = |alg: &str| {
            ServiceConfig::from_toml(&format!("trust_domain = 'x'\nsigning_alg = '{alg}'"), "t")
        };
        assert_eq!(with("EdDSA").unwrap().signing_alg, SigningAlg::EdDSA);
        assert_eq!(with("ES256").unwrap().signing_alg, SigningAlg::ES256);
        for bad in ["HS256", "none", "RS256", "eddsa", ""] {
            assert!(
                matches!(with(bad), Err(ConfigError::Parse { .. })),
                "{bad:?} accepted"
            );
        }
        let mut cfg = ServiceConfig::new("x");
        cfg.signing_alg = SigningAlg::EdDSA;
        let again = ServiceConfig::from_toml(&cfg.to_toml().unwrap(), "roundtrip").unwrap();
        assert_eq!(again.signing_alg, SigningAlg::EdDSA);
    }
}
