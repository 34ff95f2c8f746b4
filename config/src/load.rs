//! Reading `elevate.toml` with its `ELEVATE_…` environment overrides, and
//! the checks that need nothing but the file itself.
//!
//! An override names the key path in upper case with `__` between tables:
//! `ELEVATE_WORKLOAD`, `ELEVATE_TTS__URL`, `ELEVATE_REPLAY__STORE`,
//! `ELEVATE_KEYS__FILES='["a.pem","b.pem"]'`. Only variables whose first
//! segment is a top-level key are read, so unrelated `ELEVATE_…` variables
//! are left alone.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

use crate::error::{ConfigError, ErrorKind};
use crate::file::FileConfig;

/// The top-level keys, which an environment override must start with.
/// The origin errors name for a configuration made in code.
const IN_CODE: &str = "(in code)";

const TOP_LEVEL: [&str; 11] = [
    "workload",
    "keys",
    "trust",
    "tts",
    "pdp",
    "decisions",
    "replay",
    "retry",
    "dead_letter",
    "actions",
    "producer",
];

/// A configuration as read: the values, where each came from, and the
/// directory relative paths are resolved against.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The values.
    pub config: FileConfig,
    /// The file it was read from.
    pub path: PathBuf,
    figment: Figment,
}

impl Loaded {
    /// Reads `path` and the environment's overrides, and checks what needs no
    /// other file: the workload id, URLs, enumerated values.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file (or variable), the key and the fix.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::read_with_env(path, Env::prefixed("ELEVATE_"))
    }

    /// As [`Loaded::read`], without environment overrides (tests, `config check --no-env`).
    ///
    /// # Errors
    /// As [`Loaded::read`].
    pub fn read_file_only(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::read_inner(path.as_ref(), None)
    }

    /// A configuration made in code ([`crate::WorkloadBuilder`]), checked
    /// like a file; relative paths are taken from the working directory and
    /// errors name the origin `(in code)`.
    ///
    /// # Errors
    /// As [`Loaded::read`].
    pub fn from_config(config: FileConfig) -> Result<Self, ConfigError> {
        let loaded = Loaded {
            figment: Figment::from(Serialized::defaults(&config)),
            config,
            path: PathBuf::from(IN_CODE),
        };
        loaded.check()?;
        Ok(loaded)
    }

    fn read_with_env(path: impl AsRef<Path>, env: Env) -> Result<Self, ConfigError> {
        Self::read_inner(path.as_ref(), Some(env))
    }

    fn read_inner(path: &Path, env: Option<Env>) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        // figment reads a missing file as empty: say so instead.
        std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                ErrorKind::File,
                &shown,
                "",
                format!("cannot read the configuration: {e}"),
                "check the path (a relative path is taken from the working directory)",
            )
        })?;
        let mut figment = Figment::new().merge(Toml::file_exact(path));
        if let Some(env) = env {
            let env = env.split("__").filter(|k| {
                let k = k.as_str().to_ascii_lowercase();
                TOP_LEVEL.iter().any(|t| k.starts_with(t))
            });
            figment = figment.merge(env);
        }
        let config: FileConfig = figment
            .extract()
            .map_err(|e| ConfigError::from_figment(e, &shown))?;
        let loaded = Loaded {
            config,
            path: path.to_path_buf(),
            figment,
        };
        loaded.check()?;
        Ok(loaded)
    }

    /// Where the value at `key` came from: the file, or the environment variable.
    pub fn origin(&self, key: &str) -> String {
        match self.figment.find_metadata(key) {
            Some(m) => match &m.source {
                Some(figment::Source::Custom(var)) => var.clone(),
                Some(figment::Source::Code(_)) | None if m.name.contains("environment") => {
                    format!(
                        "environment (ELEVATE_{})",
                        key.to_uppercase().replace('.', "__")
                    )
                }
                _ => self.path.display().to_string(),
            },
            None => self.path.display().to_string(),
        }
    }

    /// An error at `key`, with its origin.
    pub fn error(
        &self,
        kind: ErrorKind,
        key: &str,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        ConfigError::new(kind, self.origin(key), key, problem, fix)
    }

    /// `p` resolved against the configuration file's directory (the
    /// working directory for a configuration made in code).
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() || self.path == Path::new(IN_CODE) {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or_else(|| Path::new(".")).join(p)
        }
    }

    /// The SPIFFE trust domain of the workload id, when it is a SPIFFE ID.
    pub fn spiffe_trust_domain(&self) -> Option<String> {
        spiffe::SpiffeId::new(&self.config.workload)
            .ok()
            .map(|id| id.trust_domain().to_string())
    }

    fn check(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        if c.workload.trim().is_empty() {
            return Err(self.error(
                ErrorKind::Missing,
                "workload",
                "the workload id is empty",
                "set it to this workload's id, e.g. spiffe://example.org/billing",
            ));
        }
        if c.workload.starts_with("spiffe:")
            && let Err(e) = spiffe::SpiffeId::new(&c.workload)
        {
            return Err(self.error(
                ErrorKind::Invalid,
                "workload",
                format!("`{}` is not a valid SPIFFE ID: {e}", c.workload),
                "use spiffe://<trust domain>/<path>, lower-case trust domain, no query or fragment",
            ));
        }
        if c.keys.files.is_empty() && c.keys.dir.is_none() {
            return Err(self.error(
                ErrorKind::Missing,
                "keys",
                "no signing key: set `keys.files` or `keys.dir`",
                "point it at this workload's PKCS#8 PEM key file(s)",
            ));
        }
        if let Some(alg) = &c.keys.alg
            && elevate_core::keys::SigningAlg::parse(alg).is_none()
        {
            return Err(self.error(
                ErrorKind::Invalid,
                "keys.alg",
                format!("unknown algorithm `{alg}`"),
                "use ES256 or EdDSA",
            ));
        }
        match &c.tts {
            None => {
                return Err(self.error(
                    ErrorKind::Missing,
                    "tts",
                    "no Transaction Token Service: a consumer exchanges every reference at one",
                    "add a [tts] table with `url` = the token endpoint",
                ));
            }
            Some(t) => {
                check_url(self, "tts.url", &t.url)?;
                if let Some(u) = &t.jwks_url {
                    check_url(self, "tts.jwks_url", u)?;
                }
                match t.auth.as_deref() {
                    None | Some("private_key_jwt") => {}
                    Some("mtls") => {
                        if t.mtls_identity.is_none() && t.mtls_cert.is_none() {
                            return Err(self.error(
                                ErrorKind::Missing,
                                "tts.mtls_identity",
                                "`auth = \"mtls\"` needs the workload's certificate",
                                "set `mtls_identity` (certificate chain and key in one PEM, e.g. an X.509-SVID file with its key) or `mtls_cert` and `mtls_key`",
                            ));
                        }
                        if t.mtls_cert.is_some() != t.mtls_key.is_some() {
                            return Err(self.error(
                                ErrorKind::Missing,
                                "tts.mtls_key",
                                "`mtls_cert` and `mtls_key` go together",
                                "set both, or put both in `mtls_identity`",
                            ));
                        }
                    }
                    Some(other) => {
                        return Err(self.error(
                            ErrorKind::Invalid,
                            "tts.auth",
                            format!("unknown client authentication `{other}`"),
                            "use private_key_jwt or mtls",
                        ));
                    }
                }
                if t.trust_domain.is_none() && self.spiffe_trust_domain().is_none() {
                    return Err(self.error(
                        ErrorKind::Missing,
                        "tts.trust_domain",
                        "the workload id is not a SPIFFE ID, so the trust domain cannot be derived",
                        "set `tts.trust_domain`",
                    ));
                }
            }
        }
        if let Some(u) = &c.trust.jwks_url {
            check_url(self, "trust.jwks_url", u)?;
        }
        match (&c.pdp.bundle, &c.pdp.cedar_bundle) {
            (None, None) => {
                return Err(self.error(
                    ErrorKind::Missing,
                    "pdp.bundle",
                    "no policy decision point",
                    "set `pdp.bundle` (a signed bundle's URL or path) and `pdp.bundle_keys`",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(self.error(
                    ErrorKind::Invalid,
                    "pdp.cedar_bundle",
                    "both a signed bundle and an unsigned directory",
                    "keep one: `pdp.bundle` (signed) or `pdp.cedar_bundle` (development)",
                ));
            }
            (Some(_), None) if c.pdp.bundle_keys.is_none() => {
                return Err(self.error(
                    ErrorKind::Missing,
                    "pdp.bundle_keys",
                    "a signed bundle needs the keys that may sign it",
                    "set `pdp.bundle_keys` to a JWKS file of the bundle-signing keys",
                ));
            }
            (None, Some(_)) if !c.pdp.allow_unsigned.unwrap_or(false) => {
                return Err(self.error(
                    ErrorKind::Policy,
                    "pdp.cedar_bundle",
                    "an unsigned bundle directory: nothing vouches for its policies",
                    "use a signed bundle (`pdp.bundle`, `elevate-bundle build`), or for development set `pdp.allow_unsigned = true`",
                ));
            }
            _ => {}
        }
        if let Some(store) = &c.replay.store
            && !matches!(store.as_str(), "memory" | "off")
            && !store.starts_with("redis://")
            && !store.starts_with("rediss://")
        {
            return Err(self.error(
                ErrorKind::Invalid,
                "replay.store",
                format!("unknown replay store `{store}`"),
                "use memory, off, or a redis:// URL",
            ));
        }
        if let Some(to) = &c.decisions.ship_to {
            let known = ["https://", "http://", "kafka://", "nats://"]
                .iter()
                .any(|p| to.len() > p.len() && to.starts_with(p));
            if !known {
                return Err(self.error(
                    ErrorKind::Invalid,
                    "decisions.ship_to",
                    format!("`{to}` is not a shipping target"),
                    "use https://host/path, kafka://host:port/<topic> or nats://host:port/<subject>",
                ));
            }
            if c.decisions.spool.is_none() {
                return Err(self.error(
                    ErrorKind::Missing,
                    "decisions.spool",
                    "shipping needs the durable spool: a remote node written inline would stall the consumer during its outage",
                    "set `decisions.spool` to a directory, e.g. \".elevate/decision-spool\"",
                ));
            }
        }
        for (i, a) in c.actions.iter().enumerate() {
            if a.destination.is_empty() || a.action.is_empty() {
                return Err(self.error(
                    ErrorKind::Invalid,
                    &format!("actions.{i}"),
                    "an action needs a `destination` and an `action`",
                    "e.g. { destination = \"orders\", action = \"orders.process\" }",
                ));
            }
        }
        if let Some(s) = &c.dead_letter.suffix
            && s.is_empty()
        {
            return Err(self.error(
                ErrorKind::Invalid,
                "dead_letter.suffix",
                "an empty suffix would send dead letters back to the destination",
                "use e.g. .dlq",
            ));
        }
        Ok(())
    }
}

fn check_url(l: &Loaded, key: &str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(l.error(
            ErrorKind::Invalid,
            key,
            format!("`{url}` is not an http(s) URL"),
            "use e.g. http://127.0.0.1:8400/token",
        ))
    }
}
