//! From a configuration to the running parts of one workload: its signing
//! key (rotating), its trusted producers (rotating), the TTS client, the
//! PDP, the decision sinks, the replay store, the consumer guard and the
//! producer guard — with the checks that can be made before the first
//! message: the signing key is this workload's, some producer is trusted,
//! the policy bundle loads. A TTS that does not answer at start is a
//! warning: the client retries and the guard answers Retry until it does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use elevate_bundle::{BundleSync, SyncConfig};
use elevate_cedar::CedarPdp;
use elevate_core::Guard;
use elevate_core::ctxbind::{AudienceKeys, ContextBinder, ContextOpener, KeyAgreementKey};
use elevate_core::ctxref::{ContextRefMinter, ContextRefVerifier, VerifyPolicy};
use elevate_core::decision::{
    DecisionSink, FileSink, ShipConfig, Spool, SpoolConfig, TeeSink, TracingSink,
};
use elevate_core::guard::ActionMapper;
use elevate_core::keys::{CurrentKey, KeySet, SigningAlg};
use elevate_core::pdp::PolicyDecisionPoint;
use elevate_core::pdp_cache::CachingPdp;
use elevate_core::producer::ProducerGuard;
use elevate_core::replay::{InMemoryReplayGuard, ReplayGuard};
use elevate_core::replay_redis::RedisReplayGuard;
use elevate_core::retry::RetryPolicy;
use elevate_core::settle::{Handler, Processor, UnboundDeadLetters};
use elevate_core::token::TokenSource;
use elevate_core::token_cache::CachingTokenSource;
use txn_token_client::breaker::BreakerConfig;
use txn_token_client::client::ClientBuildError;
use txn_token_client::key_directory::{KeyDirectory, KeyDirectoryConfig, workload_jwks_url};
use txn_token_client::{ClientAuthMethod, HttpDecisionShipper, TtsClient, TtsClientConfig};

use crate::actions::DestinationActions;
use crate::error::{ConfigError, ErrorKind};
use crate::keyfiles::{self, KeySources};
use crate::load::Loaded;

/// Txn-Tokens cached per origin context, at most.
const TOKEN_CACHE: usize = 10_000;
/// A cached Txn-Token is renewed this long before it expires.
const TOKEN_MIN_REMAINING: Duration = Duration::from_secs(10);

/// One workload, built from its configuration: everything a broker binding
/// needs to guard a consumer ([`Workload::processor`]) or a producer
/// ([`Workload::producer`]). Background tasks (key and bundle reloads, the
/// key directory's refresh) run as long as the Tokio runtime does.
pub struct Workload {
    id: String,
    key: CurrentKey,
    trusted: Arc<ArcSwap<KeySet>>,
    guard: Arc<Guard>,
    tts: Arc<TtsClient>,
    bundle: Option<Arc<BundleSync>>,
    producer: ProducerGuard,
    retry: RetryPolicy,
    handler_retry: RetryPolicy,
    dead_letter_suffix: String,
    replay: &'static str,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

impl Workload {
    /// Reads `path` (and `ELEVATE_…` overrides) and builds the workload.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, the key and what to do.
    pub async fn from_file(path: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        Self::build(&Loaded::read(path.into())?).await
    }

    /// A builder for the workload `id`, in code, without a file.
    pub fn builder(id: impl Into<String>) -> crate::WorkloadBuilder {
        crate::WorkloadBuilder::new(id)
    }

    /// Builds the workload from a configuration already read.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, the key and what to do.
    pub async fn build(l: &Loaded) -> Result<Self, ConfigError> {
        let c = &l.config;
        let id = c.workload.clone();
        let tts = c.tts.as_ref().ok_or_else(|| {
            l.error(
                ErrorKind::Missing,
                "tts",
                "no Transaction Token Service",
                "add a [tts] table",
            )
        })?;

        // Signing keys.
        let alg = c
            .keys
            .alg
            .as_deref()
            .and_then(SigningAlg::parse)
            .unwrap_or(SigningAlg::ES256);
        let sources = KeySources {
            files: c.keys.files.iter().map(|p| l.resolve(p)).collect(),
            dir: c.keys.dir.as_ref().map(|p| l.resolve(p)),
            alg,
        };
        let keys = sources.read().map_err(|e| {
            l.error(
                ErrorKind::Key,
                if c.keys.dir.is_some() {
                    "keys.dir"
                } else {
                    "keys.files"
                },
                e.to_string(),
                "give PKCS#8 PEM private keys (-----BEGIN PRIVATE KEY-----) of the configured algorithm",
            )
        })?;
        let signing = keyfiles::signing(&keys)
            .map(|k| k.key.clone())
            .ok_or_else(|| l.error(ErrorKind::Key, "keys", "no signing key", "add a key file"))?;
        let key = CurrentKey::new(signing);
        let reload = c.keys.reload_secs.unwrap_or(2);
        if reload > 0 {
            keyfiles::spawn_reloader(sources, key.clone(), Duration::from_secs(reload));
        }

        // Trusted producers.
        let trusted = trust(l, &tts.url).await?;
        let own_kid = key.get().kid().to_string();
        if let Some(k) = trusted.keys.load().get(&own_kid)
            && k.owner.as_deref() != Some(id.as_str())
        {
            return Err(l.error(
                ErrorKind::KeyOwner,
                "keys",
                format!(
                    "signing key `{own_kid}` is registered to {} , not to this workload",
                    k.owner.as_deref().unwrap_or("no workload")
                ),
                format!("use a key registered for {id} at the TTS, or fix `workload`"),
            ));
        }

        // The TTS client.
        let trust_domain = tts
            .trust_domain
            .clone()
            .or_else(|| l.spiffe_trust_domain())
            .unwrap_or_default();
        let mut tc = TtsClientConfig::new(&tts.url, trust_domain, &id);
        tc.jwks_url = tts.jwks_url.clone();
        tc.replica_endpoints = tts.replica_urls.clone().unwrap_or_default();
        if let Some(ms) = tts.request_timeout_ms {
            tc.request_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = tts.connect_timeout_ms {
            tc.connect_timeout = Duration::from_millis(ms);
        }
        if let Some(n) = tts.max_attempts {
            tc.max_attempts = n.max(1);
        }
        tc.breaker = BreakerConfig {
            threshold: tts.breaker_failures.unwrap_or(5).max(1),
            cool_down: Duration::from_secs(tts.breaker_open_secs.unwrap_or(5)),
        };
        if tts.auth.as_deref() == Some("mtls") {
            // RFC 8705 tls_client_auth: the certificate authenticates, no
            // client assertion is sent (the key still signs references).
            tc.auth = ClientAuthMethod::TlsClientAuth;
            tc.mtls_identity_pem = Some(mtls_identity(l)?);
        }
        if let Some(ca) = &tts.root_ca {
            tc.root_ca_pem = Some(read_file(l, "tts.root_ca", &l.resolve(ca))?);
        }
        let client = TtsClient::with_current_key(tc, key.clone()).map_err(|e| match e {
            ClientBuildError::Auth { .. } => l.error(
                ErrorKind::Invalid,
                "tts.auth",
                format!("the TTS client cannot be built: {e}"),
                "with `auth = \"mtls\"`, use an https `url` and the workload's certificate and key",
            ),
            e => l.error(
                ErrorKind::Dependency,
                "tts",
                format!("the TTS client cannot be built: {e}"),
                "check the URLs and the mTLS identity",
            ),
        })?;
        let client = Arc::new(client);
        let tokens: Arc<dyn TokenSource> = if tts.token_cache.unwrap_or(true) {
            Arc::new(CachingTokenSource::new(
                client.clone(),
                TOKEN_CACHE,
                TOKEN_MIN_REMAINING,
            ))
        } else {
            client.clone()
        };

        // PDP, sinks, actions, replay.
        let (pdp, bundle) = pdp(l).await?;
        let sink = sinks(l).await?;
        let actions: Arc<dyn ActionMapper> = Arc::new(DestinationActions::from_config(&c.actions));
        let mut verifier = trusted.verifier(VerifyPolicy::new(&id));
        if let Some(opener) = agreement_keys(l)? {
            verifier = verifier.with_context_opener(opener);
        }
        let (replay, replay_kind) = replay(l, &id).await?;
        let mut guard = Guard::new(&id, verifier, tokens, pdp.clone(), sink, actions);
        if let Some(r) = replay {
            guard = guard.with_replay_guard(r);
        }

        // The producer side.
        let lifetime = Duration::from_secs(c.producer.reference_lifetime_secs.unwrap_or(3600));
        let minter = ContextRefMinter::with_current_key(&id, key.clone(), lifetime)
            .with_max_depth(c.producer.max_depth.unwrap_or(3));
        let mut producer = ProducerGuard::new(minter, pdp);
        if let Some(binder) = context_binder(l, lifetime)? {
            producer = producer.with_context_binding(binder);
        }

        // Retries.
        let mut retry = RetryPolicy::default();
        if let Some(s) = c.retry.outage_budget_secs {
            retry.max_elapsed = Some(Duration::from_secs(s));
        }
        if let Some(ms) = c.retry.min_delay_ms {
            retry.min_delay = Duration::from_millis(ms);
        }
        if let Some(ms) = c.retry.max_delay_ms {
            retry.max_delay = Duration::from_millis(ms).max(retry.min_delay);
        }
        let mut handler_retry = RetryPolicy {
            min_delay: retry.min_delay,
            max_delay: retry.max_delay,
            ..RetryPolicy::handler_default()
        };
        if let Some(n) = c.retry.handler_attempts {
            handler_retry.max_attempts = n.max(1);
        }

        Ok(Workload {
            id,
            key,
            trusted: trusted.keys,
            guard: Arc::new(guard),
            tts: client,
            bundle,
            producer,
            retry,
            handler_retry,
            dead_letter_suffix: c
                .dead_letter
                .suffix
                .clone()
                .unwrap_or_else(|| elevate_core::settle::DEFAULT_DEAD_LETTER_SUFFIX.into()),
            replay: replay_kind,
        })
    }

    /// The workload id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The consumer guard.
    pub fn guard(&self) -> &Arc<Guard> {
        &self.guard
    }

    /// A processor running `handler` behind the guard, with the configured
    /// retries. Its dead-letter publisher is unbound: the broker binding's
    /// consumer binds its default (`<destination>` + [`Workload::dead_letter_suffix`]).
    pub fn processor(&self, handler: Arc<dyn Handler>) -> Arc<Processor> {
        Arc::new(
            Processor::new(self.guard.clone(), handler, Arc::new(UnboundDeadLetters))
                .with_dead_letter_suffix(self.dead_letter_suffix.clone())
                .with_retry(self.retry)
                .with_handler_retry(self.handler_retry),
        )
    }

    /// The workload's TTS client (signing its assertions with the current
    /// key): an entry service exchanges its users' access tokens with it
    /// ([`TtsClient::exchange_access_token`]).
    pub fn tts_client(&self) -> &Arc<TtsClient> {
        &self.tts
    }

    /// The signed bundle's sync (revision, staleness, last error), when
    /// the PDP runs a signed bundle.
    pub fn bundle(&self) -> Option<&Arc<BundleSync>> {
        self.bundle.as_ref()
    }

    /// The producer guard (strips credentials, signs references with the current key).
    pub fn producer(&self) -> &ProducerGuard {
        &self.producer
    }

    /// What dead-letter destinations are named by: `<destination><suffix>`.
    pub fn dead_letter_suffix(&self) -> &str {
        &self.dead_letter_suffix
    }

    /// The dead-letter destination of `destination`.
    pub fn dead_letter_for(&self, destination: &str) -> String {
        format!("{destination}{}", self.dead_letter_suffix)
    }

    /// The signing key in force (rotates when the key files change).
    pub fn signing_key(&self) -> &CurrentKey {
        &self.key
    }

    /// The trusted producer keys in force (rotate with the directory or file).
    pub fn trusted_keys(&self) -> &Arc<ArcSwap<KeySet>> {
        &self.trusted
    }

    /// Which replay store is in use: `memory`, `redis` or `off`.
    pub fn replay_store(&self) -> &'static str {
        self.replay
    }
}

/// Trusted producer keys and how to verify with them.
struct Trusted {
    keys: Arc<ArcSwap<KeySet>>,
    directory: Option<KeyDirectory>,
}

impl Trusted {
    fn verifier(&self, policy: VerifyPolicy) -> ContextRefVerifier {
        match &self.directory {
            Some(d) => d.verifier(policy),
            None => ContextRefVerifier::with_shared_keys(self.keys.clone(), policy),
        }
    }
}

async fn trust(l: &Loaded, tts_url: &str) -> Result<Trusted, ConfigError> {
    let t = &l.config.trust;
    if let Some(file) = &t.jwks_file {
        let path = l.resolve(file);
        let keys = read_jwks_file(l, &path)?;
        if keys.is_empty() {
            return Err(l.error(
                ErrorKind::NoTrust,
                "trust.jwks_file",
                format!("{} holds no key of a trusted producer", path.display()),
                "add the producers' public keys with their owners, or use the TTS key directory",
            ));
        }
        let shared = Arc::new(ArcSwap::from_pointee(keys));
        crate::trust_file::spawn_reloader(
            path,
            t.producers.clone(),
            shared.clone(),
            Duration::from_secs(t.refresh_secs.unwrap_or(2).max(1)),
        );
        return Ok(Trusted {
            keys: shared,
            directory: None,
        });
    }
    let url = match &t.jwks_url {
        Some(u) => u.clone(),
        None => workload_jwks_url(tts_url).map_err(|e| {
            l.error(
                ErrorKind::Invalid,
                "tts.url",
                format!("no key directory URL can be derived: {e}"),
                "set `trust.jwks_url`",
            )
        })?,
    };
    let mut dc = KeyDirectoryConfig::new(&url);
    if let Some(s) = t.min_refresh_secs {
        dc.min_refresh = Duration::from_secs(s);
    }
    if let Some(s) = t.refresh_secs {
        dc.refresh_interval = Duration::from_secs(s.max(1));
    }
    dc.trusted_owners = t.producers.clone();
    // An https TTS with a private CA serves its key directory with the same
    // certificate as its token endpoint.
    if let Some(ca) = l.config.tts.as_ref().and_then(|t| t.root_ca.as_ref()) {
        dc.root_ca_pem = Some(read_file(l, "tts.root_ca", &l.resolve(ca))?);
    }
    let directory = KeyDirectory::new(dc).map_err(|e| {
        l.error(
            ErrorKind::Invalid,
            "trust.jwks_url",
            e.to_string(),
            "use an absolute http(s) URL",
        )
    })?;
    match directory.fetch_now().await {
        Ok(0) => {
            tracing::warn!(%url, "the key directory lists no trusted producer yet: references are denied until one is registered")
        }
        Ok(n) => tracing::info!(%url, keys = n, "trusted producer keys loaded"),
        Err(e) if e.problem().is_some() => {
            return Err(l.error(
                ErrorKind::Jwks,
                "trust.jwks_url",
                format!("the key directory at {url} is malformed: {e}"),
                "fix the TTS's workload key files, or point `trust.jwks_url` at a workload JWKS",
            ));
        }
        Err(e) => {
            tracing::warn!(%url, error = %e, "the key directory is not reachable at start; retrying in the background (references wait as Retry)")
        }
    }
    directory.spawn_refresh();
    Ok(Trusted {
        keys: directory.keys().clone(),
        directory: Some(directory),
    })
}

/// A workload JWKS file as a key set (owners kept; `producers` filter).
pub(crate) fn parse_jwks(
    text: &str,
    producers: Option<&[String]>,
) -> Result<KeySet, elevate_core::keys::KeyError> {
    let mut keys = KeySet::from_workload_jwks_json(text)?;
    if let Some(p) = producers {
        keys.retain_owners(p);
    }
    Ok(keys)
}

fn read_jwks_file(l: &Loaded, path: &std::path::Path) -> Result<KeySet, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        l.error(
            ErrorKind::File,
            "trust.jwks_file",
            format!("cannot read {}: {e}", path.display()),
            "check the path (relative to the configuration file)",
        )
    })?;
    parse_jwks(&text, l.config.trust.producers.as_deref()).map_err(|e| {
        l.error(
            ErrorKind::Jwks,
            "trust.jwks_file",
            format!("{} is not a usable workload JWKS: {e}", path.display()),
            "every key needs kid, alg and its owner (see docs/CONFIGURATION.md)",
        )
    })
}

/// `[keys] agreement_keys`: the consumer's key-agreement keys, if any.
fn agreement_keys(l: &Loaded) -> Result<Option<ContextOpener>, ConfigError> {
    let files = &l.config.keys.agreement_keys;
    if files.is_empty() {
        return Ok(None);
    }
    let mut keys = Vec::new();
    for file in files {
        let path = l.resolve(file);
        let kid = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let key = KeyAgreementKey::from_pem(kid, &read_file(l, "keys.agreement_keys", &path)?)
            .map_err(|e| {
                l.error(
                    ErrorKind::Key,
                    "keys.agreement_keys",
                    format!("{}: {e}", path.display()),
                    "give a P-256 PKCS#8 PEM private key (`elevate-config key new --alg ECDH-ES+A256KW FILE`)",
                )
            })?;
        keys.push(key);
    }
    Ok(Some(ContextOpener::new(keys)))
}

/// `[producer] binding = "per-context"`: the binder over `audience_keys`.
fn context_binder(l: &Loaded, lifetime: Duration) -> Result<Option<ContextBinder>, ConfigError> {
    let p = &l.config.producer;
    match p.binding.as_deref().unwrap_or("per-message") {
        "per-message" => return Ok(None),
        "per-context" => {}
        other => {
            return Err(l.error(
                ErrorKind::Invalid,
                "producer.binding",
                format!("unknown binding {other:?}"),
                "use \"per-message\" or \"per-context\"",
            ));
        }
    }
    let file = p.audience_keys.as_ref().ok_or_else(|| {
        l.error(
            ErrorKind::Missing,
            "producer.audience_keys",
            "the per-context binding needs the audiences' key-agreement keys",
            "name a JWKS of them (`elevate-config key public --alg ECDH-ES+A256KW --workload ID FILE`)",
        )
    })?;
    let path = l.resolve(file);
    let audiences = AudienceKeys::from_jwks_json(&read_file(l, "producer.audience_keys", &path)?)
        .map_err(|e| {
        l.error(
            ErrorKind::Jwks,
            "producer.audience_keys",
            format!("{}: {e}", path.display()),
            "every key: a public P-256 JWK with kid, use \"enc\" and its workload in elevate_owner",
        )
    })?;
    let binder = match p.context_renew_secs {
        Some(s) => ContextBinder::with_shared_audiences(
            Arc::new(ArcSwap::from_pointee(audiences)),
            Duration::from_secs(s.max(1)),
        ),
        None => ContextBinder::new(audiences, lifetime),
    };
    let binder = match p.context_open_after {
        Some(n) => binder.with_open_after(n),
        None => binder,
    };
    Ok(Some(binder))
}

fn read_file(l: &Loaded, key: &str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        l.error(
            ErrorKind::File,
            key,
            format!("cannot read {}: {e}", path.display()),
            "check the path (relative to the configuration file)",
        )
    })
}

fn mtls_identity(l: &Loaded) -> Result<Vec<u8>, ConfigError> {
    let Some(t) = l.config.tts.as_ref() else {
        return Ok(Vec::new());
    };
    if let Some(p) = &t.mtls_identity {
        return read_file(l, "tts.mtls_identity", &l.resolve(p));
    }
    let (Some(cert), Some(key)) = (&t.mtls_cert, &t.mtls_key) else {
        return Err(l.error(
            ErrorKind::Missing,
            "tts.mtls_identity",
            "`auth = \"mtls\"` needs the workload's certificate",
            "set `mtls_identity`, or `mtls_cert` and `mtls_key`",
        ));
    };
    let mut pem = read_file(l, "tts.mtls_cert", &l.resolve(cert))?;
    pem.push(b'\n');
    pem.extend(read_file(l, "tts.mtls_key", &l.resolve(key))?);
    Ok(pem)
}

/// The PDP and, for a signed bundle, the sync that keeps it current.
type BuiltPdp = (Arc<dyn PolicyDecisionPoint>, Option<Arc<BundleSync>>);

async fn pdp(l: &Loaded) -> Result<BuiltPdp, ConfigError> {
    let p = &l.config.pdp;
    let cache = |cedar: Arc<dyn PolicyDecisionPoint>| -> Arc<dyn PolicyDecisionPoint> {
        match p.cache.unwrap_or(10_000) {
            0 => cedar,
            n => Arc::new(CachingPdp::new(cedar, n)),
        }
    };
    if let Some(location) = &p.bundle {
        let sync = bundle_sync(l, location).await?;
        sync.spawn();
        let expiring = sync.expiring(cache(sync.cedar().clone()));
        return Ok((Arc::new(expiring), Some(sync)));
    }
    let Some(dir) = &p.cedar_bundle else {
        return Err(l.error(
            ErrorKind::Missing,
            "pdp.bundle",
            "no policy decision point",
            "set `pdp.bundle` and `pdp.bundle_keys`",
        ));
    };
    let dir = l.resolve(dir);
    let cedar = Arc::new(CedarPdp::load_dir(&dir).map_err(|e| {
        l.error(
            ErrorKind::Policy,
            "pdp.cedar_bundle",
            format!("{}: {e}", dir.display()),
            "fix the bundle (policies and schema must validate)",
        )
    })?);
    tracing::warn!(dir = %dir.display(), "unsigned policy bundle directory (pdp.allow_unsigned): for development only");
    let watch = p.watch_secs.unwrap_or(5);
    if watch > 0 {
        cedar.spawn_watcher(Duration::from_secs(watch));
    }
    Ok((cache(cedar), None))
}

/// The signed bundle's sync: its source, trusted signers, cache and bounds.
async fn bundle_sync(l: &Loaded, location: &str) -> Result<Arc<BundleSync>, ConfigError> {
    let p = &l.config.pdp;
    let keys_path = p
        .bundle_keys
        .as_ref()
        .map(|k| l.resolve(k))
        .ok_or_else(|| {
            l.error(
                ErrorKind::Missing,
                "pdp.bundle_keys",
                "a signed bundle needs the keys that may sign it",
                "set `pdp.bundle_keys` to a JWKS file",
            )
        })?;
    let signers = elevate_bundle::signers_from_jwks_file(&keys_path).map_err(|e| {
        l.error(
            ErrorKind::Jwks,
            "pdp.bundle_keys",
            e,
            "give a JWKS of the bundle-signing public keys (`elevate-config key public`)",
        )
    })?;
    let is_url = location.contains("://");
    let location = if is_url {
        location.to_string()
    } else {
        l.resolve(std::path::Path::new(location))
            .display()
            .to_string()
    };
    let source = elevate_bundle::source_for(&location, Duration::from_secs(10))
        .await
        .map_err(|e| {
            l.error(
                ErrorKind::Invalid,
                "pdp.bundle",
                e.to_string(),
                "use an https:// URL, nats://host:port/<bucket>/<object>, or an archive path",
            )
        })?;
    let config = SyncConfig {
        poll: Duration::from_secs(p.poll_secs.unwrap_or(30).max(1)),
        cache_dir: Some(
            l.resolve(
                p.cache_dir
                    .as_deref()
                    .unwrap_or(std::path::Path::new(".elevate/bundle-cache")),
            ),
        ),
        stale_after: p.stale_after_secs.map(Duration::from_secs),
        expire_after: p.expire_after_secs.map(Duration::from_secs),
        allow_rollback: p.allow_rollback.unwrap_or(false),
    };
    BundleSync::start(source, signers, config).await.map_err(|e| {
        l.error(
            ErrorKind::Policy,
            "pdp.bundle",
            e.to_string(),
            "publish a bundle signed by a key in `pdp.bundle_keys` (`elevate-bundle build` / `publish`), or make the source reachable",
        )
    })
}

async fn sinks(l: &Loaded) -> Result<Arc<dyn DecisionSink>, ConfigError> {
    let d = &l.config.decisions;
    let mut sinks: Vec<Arc<dyn DecisionSink>> = Vec::new();
    if let Some(dir) = &d.spool {
        let dir = l.resolve(dir);
        let mut cfg = SpoolConfig::new(&dir).with_max_bytes(
            d.spool_max_mib
                .unwrap_or(elevate_core::decision::spool::DEFAULT_MAX_BYTES >> 20)
                .max(1)
                << 20,
        );
        cfg.fsync = d.spool_fsync.unwrap_or(true);
        if let Some(ms) = d.spool_flush_interval_ms {
            cfg.flush_interval = Duration::from_millis(ms);
        }
        let spool = Spool::open(cfg).map_err(|e| {
            l.error(
                ErrorKind::File,
                "decisions.spool",
                e.to_string(),
                "make the directory writable; a damaged spool must be inspected (`elevate-config decisions verify DIR`) and moved aside, never reused",
            )
        })?;
        if let Some(to) = d.ship_to.as_deref() {
            let ship = ShipConfig {
                max_records: d.ship_batch.unwrap_or(500).max(1),
                interval: Duration::from_millis(d.ship_interval_ms.unwrap_or(1000).max(1)),
                ..ShipConfig::default()
            };
            if to.starts_with("http://") || to.starts_with("https://") {
                let ca = match &d.ship_root_ca {
                    Some(p) => {
                        let p = l.resolve(p);
                        Some(std::fs::read(&p).map_err(|e| {
                            l.error(
                                ErrorKind::File,
                                "decisions.ship_root_ca",
                                format!("cannot read {}: {e}", p.display()),
                                "point it at a PEM CA certificate",
                            )
                        })?)
                    }
                    None => None,
                };
                let shipper = HttpDecisionShipper::new(to, ca.as_deref(), Duration::from_secs(10))
                    .map_err(|e| {
                        l.error(
                            ErrorKind::Invalid,
                            "decisions.ship_to",
                            e.to_string(),
                            "use https://host/path",
                        )
                    })?;
                let _ = spool.start_shipping(Arc::new(shipper), ship);
            } else if let Some(rest) = to.strip_prefix("kafka://") {
                let shipper = broker_ship::kafka(l, rest)?;
                let _ = spool.start_shipping(shipper, ship);
            } else if let Some(rest) = to.strip_prefix("nats://") {
                let shipper = broker_ship::nats(l, rest).await?;
                let _ = spool.start_shipping(shipper, ship);
            }
        }
        sinks.push(Arc::new(spool));
    }
    if let Some(f) = &d.file {
        let path = l.resolve(f);
        sinks.push(Arc::new(FileSink::open(&path).map_err(|e| {
            l.error(
                ErrorKind::File,
                "decisions.file",
                format!("cannot open {}: {e}", path.display()),
                "check that the directory exists and is writable",
            )
        })?));
    }
    if d.tracing.unwrap_or(true) || sinks.is_empty() {
        sinks.push(Arc::new(TracingSink));
    }
    Ok(if sinks.len() == 1 {
        sinks.remove(0)
    } else {
        Arc::new(TeeSink::new(sinks))
    })
}

async fn replay(
    l: &Loaded,
    id: &str,
) -> Result<(Option<Arc<dyn ReplayGuard>>, &'static str), ConfigError> {
    let r = &l.config.replay;
    match r.store.as_deref().unwrap_or("memory") {
        "off" => {
            tracing::warn!("replay protection is off (replay.store = \"off\")");
            Ok((None, "off"))
        }
        "memory" => Ok((Some(Arc::new(InMemoryReplayGuard::new())), "memory")),
        url => {
            let prefix = r
                .prefix
                .clone()
                .unwrap_or_else(|| format!("elevate:replay:{id}:"));
            let g = RedisReplayGuard::connect(url, prefix).await.map_err(|e| {
                l.error(
                    ErrorKind::Dependency,
                    "replay.store",
                    format!("the replay store is not usable: {e}"),
                    "start Redis at that URL, or use `memory` for one instance",
                )
            })?;
            Ok((Some(Arc::new(g)), "redis"))
        }
    }
}

/// Decision shippers to a broker, named in `decisions.ship_to`:
/// `kafka://host:port[,host:port]/<topic>` and
/// `nats://host:port/<subject>` (a JetStream stream must store it).
mod broker_ship {
    use std::sync::Arc;

    use elevate_core::decision::ship::Shipper;

    use crate::error::{ConfigError, ErrorKind};
    use crate::load::Loaded;

    /// `host:port/name` split, or an error naming the expected form.
    #[cfg(any(feature = "kafka", feature = "nats"))]
    fn split<'a>(l: &Loaded, rest: &'a str, form: &str) -> Result<(&'a str, &'a str), ConfigError> {
        rest.split_once('/')
            .filter(|(h, n)| !h.is_empty() && !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| {
                l.error(
                    ErrorKind::Invalid,
                    "decisions.ship_to",
                    format!("`{rest}` names no server and target"),
                    format!("use {form}"),
                )
            })
    }

    #[cfg(feature = "kafka")]
    pub(super) fn kafka(l: &Loaded, rest: &str) -> Result<Arc<dyn Shipper>, ConfigError> {
        let (servers, topic) = split(l, rest, "kafka://host:port/<topic>")?;
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", servers);
        let shipper = elevate_kafka::KafkaDecisionShipper::from_config(&c, topic).map_err(|e| {
            l.error(
                ErrorKind::Dependency,
                "decisions.ship_to",
                format!("the Kafka decision shipper cannot be built: {e}"),
                "check the bootstrap servers",
            )
        })?;
        Ok(Arc::new(shipper))
    }

    #[cfg(not(feature = "kafka"))]
    pub(super) fn kafka(l: &Loaded, _rest: &str) -> Result<Arc<dyn Shipper>, ConfigError> {
        Err(l.error(
            ErrorKind::Dependency,
            "decisions.ship_to",
            "this build of elevate-config has no Kafka shipper",
            "enable elevate-config's `kafka` feature, or leave `ship_to` unset and start an elevate_kafka::KafkaDecisionShipper on `DecisionSink::spool`",
        ))
    }

    #[cfg(feature = "nats")]
    pub(super) async fn nats(l: &Loaded, rest: &str) -> Result<Arc<dyn Shipper>, ConfigError> {
        let (server, subject) = split(l, rest, "nats://host:port/<subject>")?;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(format!("nats://{server}"))
            .await
            .map_err(|e| {
                l.error(
                    ErrorKind::Dependency,
                    "decisions.ship_to",
                    format!("NATS at {server}: {e}"),
                    "start the NATS server (with JetStream) or fix the address",
                )
            })?;
        Ok(Arc::new(elevate_nats::JetStreamDecisionShipper::new(
            async_nats::jetstream::new(client),
            subject,
        )))
    }

    #[cfg(not(feature = "nats"))]
    pub(super) async fn nats(l: &Loaded, _rest: &str) -> Result<Arc<dyn Shipper>, ConfigError> {
        Err(l.error(
            ErrorKind::Dependency,
            "decisions.ship_to",
            "this build of elevate-config has no NATS shipper",
            "enable elevate-config's `nats` feature, or leave `ship_to` unset and start an elevate_nats::JetStreamDecisionShipper on `DecisionSink::spool`",
        ))
    }
}
