//! The schema of `elevate.toml`: what each key means and its default.
//! `config/elevate.example.toml` teaches every key; `docs/CONFIGURATION.md`
//! is the reference. Every table refuses keys it does not know, so a typo is
//! an error that names it instead of a setting silently ignored.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One workload's whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The workload this process runs as (`spiffe://trust-domain/path`, or
    /// any non-empty id): the issuer of its references, the audience they
    /// must name, the TTS client id. Given once, used everywhere.
    pub workload: String,
    /// The workload's signing keys.
    #[serde(default)]
    pub keys: KeysConfig,
    /// Whose references this workload accepts.
    #[serde(default)]
    pub trust: TrustConfig,
    /// The Transaction Token Service.
    pub tts: Option<TtsConfig>,
    /// The Policy Decision Point.
    #[serde(default)]
    pub pdp: PdpConfig,
    /// Where decisions are recorded.
    #[serde(default)]
    pub decisions: DecisionsConfig,
    /// Replay protection (on by default).
    #[serde(default)]
    pub replay: ReplayConfig,
    /// How Retry verdicts and handler failures are retried.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Dead-letter naming.
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
    /// The action a message asks for, per destination (first match wins).
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
    /// The producer side.
    #[serde(default)]
    pub producer: ProducerConfig,
}

/// The workload's private signing keys (PKCS#8 PEM files, ES256 or EdDSA).
/// A key's `kid` is its file name without the extension, so that the file
/// an operator writes and the key the TTS registers are named alike.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// Key files. Several at once during a rollover: the one written last
    /// (newest modification time) signs.
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// Or a directory: every `*.pem` file in it (what spiffe-helper or
    /// cert-manager write and rotate).
    pub dir: Option<PathBuf>,
    /// The algorithm of the keys: `ES256` (default) or `EdDSA`.
    pub alg: Option<String>,
    /// How often the files are checked for changes, in seconds (default 2; 0: never).
    pub reload_secs: Option<u64>,
    /// Key-agreement keys (P-256, PKCS#8 PEM; `kid` = file name without
    /// `.pem`) that per-context producers wrap this consumer's binding keys
    /// to (`elevate-config key new --alg ECDH-ES+A256KW`). Several during a
    /// rotation: each is tried by the JWE's `kid`. None: per-context
    /// messages are refused as `binding-key-unavailable`.
    #[serde(default)]
    pub agreement_keys: Vec<PathBuf>,
}

/// Trusted producers: whose keys may sign the references this workload
/// accepts. By default the TTS's key directory
/// (`<tts origin>/.well-known/workload-jwks`) when a TTS is configured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// A workload JWKS URL (every key with its owner).
    pub jwks_url: Option<String>,
    /// Or a workload JWKS file, reloaded when it changes.
    pub jwks_file: Option<PathBuf>,
    /// Only keys owned by these workloads are trusted (default: every owner in the directory).
    pub producers: Option<Vec<String>>,
    /// Smallest interval between refetches caused by an unknown `kid`, in seconds (default 5).
    pub min_refresh_secs: Option<u64>,
    /// Background refresh interval, in seconds (default 60).
    pub refresh_secs: Option<u64>,
}

/// The Transaction Token Service this workload exchanges references at.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtsConfig {
    /// The token endpoint URL, e.g. `http://127.0.0.1:8400/token`.
    pub url: String,
    /// Further token endpoints of the same TTS fleet, for replicas reached
    /// without a load balancer: exchanges go round-robin over `url` and
    /// these, and an endpoint that cannot be connected to is skipped (the
    /// exchange goes on to the next at once). Each replica must accept its
    /// own URL as the client assertion's `aud` (its address, or `public_url`).
    pub replica_urls: Option<Vec<String>>,
    /// The trust domain (`audience` of requests); default: the workload
    /// id's SPIFFE trust domain.
    pub trust_domain: Option<String>,
    /// The TTS's own JWKS (Txn-Token signing keys); default
    /// `/.well-known/jwks.json` on the token endpoint's origin.
    pub jwks_url: Option<String>,
    /// Client authentication: `private_key_jwt` (default: an RFC 7523
    /// assertion signed with the workload's key) or `mtls` (RFC 8705
    /// `tls_client_auth`: the workload's X.509 certificate on the TLS
    /// connection, whose URI SAN is the workload id, and no assertion; needs
    /// an `https` `url` and a TTS that allows it for this workload). The
    /// signing key still signs the context references either way.
    pub auth: Option<String>,
    /// For `mtls`: a PEM file holding the certificate chain and its private
    /// key (an X.509-SVID file with its key appended works as it is; the
    /// file is read once, at build time).
    pub mtls_identity: Option<PathBuf>,
    /// For `mtls`: the certificate chain alone, when the key is in `mtls_key`.
    pub mtls_cert: Option<PathBuf>,
    /// For `mtls`: the private key of `mtls_cert`.
    pub mtls_key: Option<PathBuf>,
    /// An extra root CA (PEM) for an HTTPS token endpoint (the CA of the
    /// TTS's server certificate, when not a public one).
    pub root_ca: Option<PathBuf>,
    /// Timeout of one HTTP attempt, in milliseconds (default 2000).
    pub request_timeout_ms: Option<u64>,
    /// TCP connect timeout, in milliseconds (default 1000).
    pub connect_timeout_ms: Option<u64>,
    /// Attempts per exchange, the first included (default 3).
    pub max_attempts: Option<usize>,
    /// Consecutive failures that open the circuit breaker (default 5).
    pub breaker_failures: Option<u32>,
    /// How long the breaker stays open before one probe, in seconds (default 5).
    pub breaker_open_secs: Option<u64>,
    /// Cache one Txn-Token per origin context (default true).
    pub token_cache: Option<bool>,
}

/// The Policy Decision Point: a signed bundle from a source (production),
/// or an unsigned bundle directory (development, `allow_unsigned = true`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PdpConfig {
    /// Where the signed bundle archive comes from: an `https://` (or
    /// `http://`) URL polled with `If-None-Match`, a
    /// `nats://host:port/<bucket>/<object>` JetStream Object Store object,
    /// or a path to a `.tar.gz` archive (`elevate-bundle build`).
    pub bundle: Option<String>,
    /// The trusted bundle-signing keys (a JWKS file); required with `bundle`.
    pub bundle_keys: Option<PathBuf>,
    /// Where the bundle in force is persisted for an offline start
    /// (default `.elevate/bundle-cache` beside this file).
    pub cache_dir: Option<PathBuf>,
    /// Seconds between polls of `bundle` (default 30, jittered ±20 %).
    pub poll_secs: Option<u64>,
    /// Warn when the source has not confirmed the bundle for this many seconds.
    pub stale_after_secs: Option<u64>,
    /// Turn decisions into Retry (`pdp-unavailable`) when the source has
    /// not confirmed the bundle for this many seconds (fail closed, nothing lost).
    pub expire_after_secs: Option<u64>,
    /// Accept a bundle whose revision is lower than the one in force (default false).
    pub allow_rollback: Option<bool>,
    /// Development: an unsigned bundle directory (`*.cedar` policies,
    /// `*.cedarschema`, `entities.json`), reloaded when it changes.
    pub cedar_bundle: Option<PathBuf>,
    /// Development switch that `cedar_bundle` needs: nothing vouches for an
    /// unsigned directory's content (default false).
    pub allow_unsigned: Option<bool>,
    /// How often the bundle directory is checked for a new version, in seconds (default 5; 0: never).
    pub watch_secs: Option<u64>,
    /// Cached trust-elevation answers (default 10000; 0: no cache).
    pub cache: Option<usize>,
}

/// Where decision records go (every decision is recorded before a handler runs).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionsConfig {
    /// A JSON-lines file, appended to.
    pub file: Option<PathBuf>,
    /// Also as `tracing` events on target `elevate::decision` (default true).
    pub tracing: Option<bool>,
    /// The durable decision spool: a directory of hash-chained JSON Lines
    /// segments, group-committed (one write + fsync per batch) before any
    /// message is dispatched or dead-lettered, and shipped from there.
    pub spool: Option<PathBuf>,
    /// Bound of the spool on disk, MiB (default 256). When it is full, new
    /// decisions are Retry `decision-log-unavailable`.
    pub spool_max_mib: Option<u64>,
    /// `fdatasync` every group commit (default true; false survives a
    /// process crash, not a machine crash).
    pub spool_fsync: Option<bool>,
    /// Least time between two `fdatasync`s, milliseconds (default 2): a
    /// record written while the spool is quiet is flushed at once, under
    /// load each flush serves every record of the interval. 0 flushes as
    /// often as records come.
    pub spool_flush_interval_ms: Option<u64>,
    /// Where the spool is shipped: `https://…` / `http://…` (shipped by
    /// this crate), `kafka://<topic>` or `nats://<subject>` (the
    /// application starts `elevate_kafka::KafkaDecisionShipper` /
    /// `elevate_nats::JetStreamDecisionShipper` on the spool).
    pub ship_to: Option<String>,
    /// Most decisions per shipped batch (default 500).
    pub ship_batch: Option<usize>,
    /// Longest wait before a partial batch is shipped, ms (default 1000).
    pub ship_interval_ms: Option<u64>,
    /// PEM CA for an `https` `ship_to` not under a public CA.
    pub ship_root_ca: Option<PathBuf>,
}

/// Replay protection: one reference, one message position.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// `memory` (default: this process), `off`, or a Redis URL
    /// (`redis://127.0.0.1:6379`: shared by every instance of a group).
    pub store: Option<String>,
    /// Prefix of the Redis keys (default `elevate:replay:<workload>:`).
    pub prefix: Option<String>,
}

/// Retry bounds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// How long a message keeps being retried while a dependency (TTS, PDP)
    /// is down, in seconds (default 1800).
    pub outage_budget_secs: Option<u64>,
    /// Deliveries a message gets when its handler fails transiently (default 5).
    pub handler_attempts: Option<u32>,
    /// First retry delay, in milliseconds (default 200).
    pub min_delay_ms: Option<u64>,
    /// Largest retry delay, in milliseconds (default 30000).
    pub max_delay_ms: Option<u64>,
}

/// Dead-letter naming.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Dead letters of destination `d` go to `d` + this (default `.dlq`).
    pub suffix: Option<String>,
}

/// The action messages of some destinations ask for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// A destination name, or a prefix ending in `*` (`orders.*`).
    pub destination: String,
    /// The action (a scope token, e.g. `orders.process`).
    pub action: String,
    /// The Cedar type of the resource (default `Destination`).
    pub resource_type: Option<String>,
}

/// The producer side.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerConfig {
    /// How long a reference stays valid (the async horizon), in seconds (default 3600).
    pub reference_lifetime_secs: Option<u64>,
    /// Hops a reference may be derived across (default 3).
    pub max_depth: Option<u32>,
    /// `per-message` (default: a signed reference per message) or
    /// `per-context` (one signed reference per origin context and audience,
    /// a MAC per message; needs `audience_keys`).
    pub binding: Option<String>,
    /// The audiences' public key-agreement keys, a JWKS whose keys name
    /// their workload in `elevate_owner` (`elevate-config key public --alg
    /// ECDH-ES+A256KW --workload ID`). An audience not in it gets
    /// per-message references.
    pub audience_keys: Option<PathBuf>,
    /// Seconds one context reference is used before a new one is signed
    /// (default: a tenth of `reference_lifetime_secs`).
    pub context_renew_secs: Option<u64>,
    /// The message of an origin context on which its context reference is
    /// signed (default 2: a context's first message is signed per message,
    /// so a one-message context pays no key wrap; 1: every message bound).
    pub context_open_after: Option<u32>,
}
