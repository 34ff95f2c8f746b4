//! Shared state of a TTS fleet: what every replica of one trust domain must
//! agree on — the workload registry (keys, allowed scopes, client
//! authentication methods), revocations and suspensions, the client-assertion
//! `jti` seen-set, the signing keys and the audit log of admin changes.
//!
//! Without a store (the embedded default) all of it lives in the process, as
//! before. With `[store]` it lives in PostgreSQL ([`postgres::PgStore`]): each
//! replica keeps a local copy of the registry and keys for the exchange path
//! (no store round trip but the `jti` claim), and refreshes it when a change
//! is notified (LISTEN/NOTIFY) and every `poll_ms` in any case (see
//! [`crate::fleet`]).

pub mod postgres;

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why the shared store could not be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("shared store: {0}")]
pub struct StoreError(pub String);

/// One workload as the store holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    /// Workload id.
    pub id: String,
    /// Its public JWKs (JSON objects).
    pub jwks: Vec<serde_json::Value>,
    /// Scopes it may be granted.
    pub allowed_scopes: Vec<String>,
    /// Client authentication methods (`None`: `private_key_jwt` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_methods: Option<Vec<String>>,
    /// Trust withdrawn, keys kept.
    #[serde(default)]
    pub suspended: bool,
}

/// A signing key as the store holds it: its private PEM, and from when it
/// may sign (it is published as soon as it is stored).
#[derive(Clone, Serialize, Deserialize)]
pub struct SigningKeyRecord {
    /// The key id.
    pub kid: String,
    /// PKCS#8 PEM of the ES256 private key.
    pub pem: String,
    /// Milliseconds since the epoch from which it signs.
    pub not_before_ms: i64,
}

impl std::fmt::Debug for SigningKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyRecord")
            .field("kid", &self.kid)
            .field("not_before_ms", &self.not_before_ms)
            .finish_non_exhaustive()
    }
}

/// Everything a replica copies from the store.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Registered (not revoked) workloads.
    pub workloads: Vec<WorkloadRecord>,
    /// Signing keys, oldest `not_before` first.
    pub signing_keys: Vec<SigningKeyRecord>,
}

/// One accepted admin change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number (store order).
    pub seq: i64,
    /// When, milliseconds since the epoch.
    pub at_ms: i64,
    /// The operator id that made it.
    pub operator: String,
    /// The replica that took it.
    pub replica: String,
    /// `register`, `revoke`, `suspend`, `reinstate`, `rotate-keys`.
    pub action: String,
    /// The workload id or key id concerned.
    pub target: String,
    /// Details (never a credential: SHA-256 of the admin assertion).
    pub detail: serde_json::Value,
}

/// A change for the audit log (the store assigns `seq` and `at_ms`).
#[derive(Debug, Clone)]
pub struct AuditRecord {
    /// The operator id.
    pub operator: String,
    /// The replica.
    pub replica: String,
    /// The action.
    pub action: String,
    /// The target.
    pub target: String,
    /// Details.
    pub detail: serde_json::Value,
}

/// The store a fleet shares.
#[async_trait::async_trait]
pub trait SharedStore: Send + Sync + std::fmt::Debug {
    /// Records `(namespace, iss, jti)` until `expires_at` (seconds since the
    /// epoch); true if it was not there (first use), false for a replay.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be reached (the caller refuses).
    async fn claim_jti(
        &self,
        namespace: &str,
        iss: &str,
        jti: &str,
        expires_at: i64,
    ) -> Result<bool, StoreError>;

    /// Reads the registry and the signing keys.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be read.
    async fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// Adds a workload from the configuration unless the store already knows
    /// it (registered, suspended or revoked): the store wins over files.
    /// Returns true when it was added.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be written.
    async fn seed_workload(&self, w: &WorkloadRecord) -> Result<bool, StoreError>;

    /// Registers or updates a workload (clearing a revocation), with its audit entry, at once.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be written (nothing changed).
    async fn put_workload(&self, w: &WorkloadRecord, audit: &AuditRecord)
    -> Result<(), StoreError>;

    /// Revokes a workload (kept as a tombstone so a configuration seed does
    /// not bring it back). Returns false, auditing nothing, when it was not registered.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be written.
    async fn revoke_workload(&self, id: &str, audit: &AuditRecord) -> Result<bool, StoreError>;

    /// Suspends (`true`) or reinstates (`false`) a registered workload.
    /// Returns false, auditing nothing, when it is not registered or already so.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be written.
    async fn set_suspended(
        &self,
        id: &str,
        suspended: bool,
        audit: &AuditRecord,
    ) -> Result<bool, StoreError>;

    /// Adds the first signing key if the store has none. Returns true when added.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be written.
    async fn seed_signing_key(&self, key: &SigningKeyRecord) -> Result<bool, StoreError>;

    /// Adds a signing key (a fleet-wide rotation), deletes keys retired
    /// before `prune_before_ms`, and audits it, at once.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be written (nothing changed).
    async fn add_signing_key(
        &self,
        key: &SigningKeyRecord,
        prune_before_ms: i64,
        audit: &AuditRecord,
    ) -> Result<(), StoreError>;

    /// The latest `limit` audit entries, oldest first.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be read.
    async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError>;

    /// Deletes `jti` entries that expired; how many.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be written.
    async fn prune(&self) -> Result<u64, StoreError>;

    /// A round trip to the store (readiness); how long it took.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store does not answer.
    async fn ping(&self) -> Result<Duration, StoreError>;

    /// A stream of change notifications: one item per change some replica
    /// made (the subscriber reloads on each). Reconnects are the caller's
    /// (the stream ends when the connection does).
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the subscription cannot be set up.
    async fn subscribe(&self) -> Result<tokio::sync::mpsc::Receiver<()>, StoreError>;
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
