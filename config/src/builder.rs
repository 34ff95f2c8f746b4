//! The workload built in code, without a file: the same schema, checks and
//! defaults as `elevate.toml` ([`crate::FileConfig`]), set through methods.

use std::path::PathBuf;

use crate::build::Workload;
use crate::error::ConfigError;
use crate::file::{ActionConfig, FileConfig, TtsConfig};
use crate::load::Loaded;

/// Builds a [`Workload`] in code. The workload id is given once; every
/// default is the file's (answer caches on, replay protection in memory,
/// trust from the TTS key directory, dead letters to `<destination>.dlq`).
///
/// ```no_run
/// # async fn run() -> Result<(), elevate_config::ConfigError> {
/// let workload = elevate_config::Workload::builder("spiffe://example.org/billing")
///     .tts("http://127.0.0.1:8080")
///     .signing_key_file("keys/billing-1.pem")
///     .bundle("https://bundles.example.org/orders.tar.gz", "bundle-signers.jwks.json")
///     .action("orders.*", "ProcessOrder", Some("Order"))
///     .build()
///     .await?;
/// # let _ = workload; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct WorkloadBuilder {
    config: FileConfig,
}

impl WorkloadBuilder {
    /// A builder for the workload `id` (a SPIFFE ID is checked as one).
    pub fn new(id: impl Into<String>) -> Self {
        WorkloadBuilder {
            config: FileConfig {
                workload: id.into(),
                keys: Default::default(),
                trust: Default::default(),
                tts: None,
                pdp: Default::default(),
                decisions: Default::default(),
                replay: Default::default(),
                retry: Default::default(),
                dead_letter: Default::default(),
                actions: Vec::new(),
                producer: Default::default(),
            },
        }
    }

    /// The Transaction Token Service at `url` (other `[tts]` settings at
    /// their defaults; change them with [`WorkloadBuilder::configure`]).
    pub fn tts(mut self, url: impl Into<String>) -> Self {
        let url = url.into();
        match &mut self.config.tts {
            Some(t) => t.url = url,
            None => {
                self.config.tts = Some(TtsConfig {
                    url,
                    ..TtsConfig::default()
                })
            }
        }
        self
    }

    /// Adds a signing key file (PKCS#8 PEM; several for a rollover: the
    /// newest signs).
    pub fn signing_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.keys.files.push(path.into());
        self
    }

    /// Signs with the `*.pem` keys of a directory (what spiffe-helper or
    /// cert-manager write and rotate).
    pub fn signing_key_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.keys.dir = Some(path.into());
        self
    }

    /// Trusts the producers of a workload JWKS file (reloaded on change)
    /// instead of the TTS key directory.
    pub fn trust_jwks_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.trust.jwks_file = Some(path.into());
        self
    }

    /// Trusts the producers of a workload JWKS URL instead of the TTS key directory.
    pub fn trust_jwks_url(mut self, url: impl Into<String>) -> Self {
        self.config.trust.jwks_url = Some(url.into());
        self
    }

    /// Trusts only keys owned by these workloads.
    pub fn trusted_producers<S: Into<String>>(mut self, ids: impl IntoIterator<Item = S>) -> Self {
        self.config.trust.producers = Some(ids.into_iter().map(Into::into).collect());
        self
    }

    /// A signed bundle from `location` (an `https://` URL,
    /// `nats://host:port/<bucket>/<object>`, or an archive path), signed by
    /// a key of the JWKS file `keys`.
    pub fn bundle(mut self, location: impl Into<String>, keys: impl Into<PathBuf>) -> Self {
        self.config.pdp.bundle = Some(location.into());
        self.config.pdp.bundle_keys = Some(keys.into());
        self
    }

    /// Development: an unsigned Cedar bundle directory (sets
    /// `allow_unsigned`: nothing vouches for its content).
    pub fn unsigned_cedar_bundle(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.pdp.cedar_bundle = Some(dir.into());
        self.config.pdp.allow_unsigned = Some(true);
        self
    }

    /// Records decisions to a JSON Lines file too.
    pub fn decisions_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.decisions.file = Some(path.into());
        self
    }

    /// The replay store: `memory` (default), `off`, or a `redis://` URL.
    pub fn replay_store(mut self, store: impl Into<String>) -> Self {
        self.config.replay.store = Some(store.into());
        self
    }

    /// Dead letters of `<destination>` go to `<destination><suffix>` (default `.dlq`).
    pub fn dead_letter_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.config.dead_letter.suffix = Some(suffix.into());
        self
    }

    /// Messages on `destination` (exact, or a `prefix*`) ask for `action`
    /// on a resource of `resource_type`; first match wins, anything
    /// unmatched is denied.
    pub fn action(
        mut self,
        destination: impl Into<String>,
        action: impl Into<String>,
        resource_type: Option<&str>,
    ) -> Self {
        self.config.actions.push(ActionConfig {
            destination: destination.into(),
            action: action.into(),
            resource_type: resource_type.map(str::to_string),
        });
        self
    }

    /// Any other setting, on the file's schema.
    pub fn configure(mut self, f: impl FnOnce(&mut FileConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// The configuration as built so far (what `elevate.toml` would say).
    pub fn config(&self) -> &FileConfig {
        &self.config
    }

    /// Checks the configuration as a file is checked and builds the workload.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key and what to do (origin `(in code)`).
    pub async fn build(self) -> Result<Workload, ConfigError> {
        Workload::build(&Loaded::from_config(self.config)?).await
    }
}
