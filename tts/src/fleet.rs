//! Fleet mode: any number of replicas serving one trust domain from one
//! shared store ([`crate::store`]).
//!
//! At start a replica seeds the store with the configuration's workloads
//! (those the store does not know yet: the store wins, and a revoked
//! workload stays revoked) and, when the store has none, with its signing
//! key; then it copies the store's registry and signing keys into its own
//! [`Issuer`]. From then on it reloads the whole state on every change
//! notification (PostgreSQL LISTEN/NOTIFY, sent in the same statement as the
//! change) and at least every `poll_ms`, so a change made at one replica is
//! honoured by every other within one notification delivery (milliseconds),
//! and within `poll_ms` plus one reload if a notification is lost (the
//! listening connection dropped). The replica that made a change reloads
//! before it answers.
//!
//! Signing keys: a fleet-wide rotation stores a new key that starts signing
//! `key_activation_secs` later; every replica publishes it as soon as it
//! reloads, so every replica publishes a key before any signs with it. A key
//! stops signing when the next one starts, and stays published for the
//! token lifetime plus verifier leeway ([`crate::IssuerSettings::key_retention`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use elevate_core::keys::SigningKey;
use elevate_core::scope::Scope;
use jsonwebtoken::jwk::Jwk;
use txn_token_client::protocol::ClientAuthMethod;

use crate::config::{ConfigError, ServiceConfig};
use crate::issuer::Issuer;
use crate::keyring::{generate_key_of, key_from_pem_any};
use crate::registry::WorkloadEntry;
use crate::store::postgres::{PgStore, STORE_TIMEOUT};
use crate::store::{
    AuditRecord, SharedStore, SigningKeyRecord, Snapshot, StoreError, WorkloadRecord, now_ms,
};

/// A replica's link to the fleet's shared store.
#[derive(Debug)]
pub struct Fleet {
    store: Arc<dyn SharedStore>,
    poll: Duration,
    activation: Duration,
    replica: String,
    last_sync_ms: AtomicI64,
}

/// The store form of a registry entry.
pub fn record_of(e: &WorkloadEntry) -> WorkloadRecord {
    WorkloadRecord {
        id: e.id.clone(),
        jwks: e
            .jwks
            .iter()
            .filter_map(|j| serde_json::to_value(j).ok())
            .collect(),
        allowed_scopes: e.allowed.iter().map(str::to_string).collect(),
        auth_methods: e
            .auth_methods
            .as_ref()
            .map(|m| m.iter().map(|x| x.as_str().to_string()).collect()),
        suspended: e.suspended,
    }
}

/// The registry form of a store record.
///
/// # Errors
///
/// Returns a message if a JWK or an authentication method does not parse.
pub fn entry_of(r: &WorkloadRecord) -> Result<WorkloadEntry, String> {
    let jwks = r
        .jwks
        .iter()
        .map(|v| serde_json::from_value::<Jwk>(v.clone()).map_err(|e| format!("JWK: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let auth_methods = match &r.auth_methods {
        None => None,
        Some(m) => Some(
            m.iter()
                .map(|x| {
                    serde_json::from_value::<ClientAuthMethod>(serde_json::Value::String(x.clone()))
                        .map_err(|e| format!("auth method {x:?}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(WorkloadEntry {
        id: r.id.clone(),
        jwks,
        allowed: r.allowed_scopes.iter().collect::<Scope>(),
        auth_methods,
        suspended: r.suspended,
    })
}

fn store_err(e: StoreError) -> ConfigError {
    ConfigError::Invalid(format!(
        "[store]: {e} (is PostgreSQL running? scripts/services-up starts it)"
    ))
}

impl Fleet {
    /// Connects `issuer` (built from `cfg`) to the store `cfg.store` names:
    /// seeds it, loads it, and makes the issuer answer from it. Call
    /// [`spawn`](Self::spawn) next to keep it current.
    ///
    /// # Errors
    ///
    /// Returns [`ConfigError::Invalid`] if `cfg` has no `[store]`, or the
    /// store cannot be reached, seeded or read.
    pub async fn attach(
        issuer: &Arc<Issuer>,
        cfg: &ServiceConfig,
        _base: &Path,
    ) -> Result<Arc<Fleet>, ConfigError> {
        let st = cfg
            .store
            .as_ref()
            .ok_or_else(|| ConfigError::Invalid("no [store] table".into()))?;
        let store = PgStore::connect(&st.postgres, &st.schema)
            .await
            .map_err(store_err)?;
        let replica = st.replica.clone().unwrap_or_else(|| {
            format!(
                "{}:{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "tts".into()),
                std::process::id()
            )
        });
        let fleet = Arc::new(Fleet {
            store: Arc::new(store),
            poll: Duration::from_millis(st.poll_ms),
            activation: Duration::from_secs(st.key_activation_secs),
            replica,
            last_sync_ms: AtomicI64::new(0),
        });
        for e in issuer.workload_entries() {
            if fleet
                .store
                .seed_workload(&record_of(&e))
                .await
                .map_err(store_err)?
            {
                tracing::info!(workload = %e.id, "workload seeded into the shared store from the configuration");
            }
        }
        let key = issuer.signing_key();
        let seeded = fleet
            .store
            .seed_signing_key(&SigningKeyRecord {
                kid: key.kid().to_string(),
                pem: key.to_pkcs8_pem(),
                not_before_ms: 0,
            })
            .await
            .map_err(store_err)?;
        tracing::info!(kid = %key.kid(), seeded, "signing key offered to the shared store");
        fleet.refresh(issuer).await.map_err(store_err)?;
        issuer.attach_fleet(fleet.clone());
        tracing::info!(schema = %st.schema, replica = %fleet.replica, poll_ms = st.poll_ms, workloads = issuer.workload_entries().len(), kid = %issuer.current_kid(), "fleet mode: shared state in PostgreSQL");
        Ok(fleet)
    }

    /// The shared store.
    pub fn store(&self) -> &Arc<dyn SharedStore> {
        &self.store
    }

    /// This replica's name (audit log).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The poll interval (the bound when a notification is lost).
    pub fn poll(&self) -> Duration {
        self.poll
    }

    /// True when the last successful reload is recent (readiness): within
    /// three poll intervals plus two store timeouts.
    pub fn is_fresh(&self) -> bool {
        let last = self.last_sync_ms.load(Ordering::Relaxed);
        let limit = (self.poll * 3 + STORE_TIMEOUT * 2).as_millis() as i64;
        last > 0 && now_ms() - last <= limit
    }

    /// Reloads the shared state into `issuer`.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be read; the issuer keeps
    /// the state it had.
    pub async fn refresh(&self, issuer: &Issuer) -> Result<(), StoreError> {
        let start = Instant::now();
        let snap = self.store.snapshot().await;
        issuer.metrics().store_call(start.elapsed(), snap.is_ok());
        let snap = snap?;
        self.apply(issuer, snap);
        self.last_sync_ms.store(now_ms(), Ordering::Relaxed);
        issuer.metrics().synced();
        Ok(())
    }

    fn apply(&self, issuer: &Issuer, snap: Snapshot) {
        let mut entries = Vec::with_capacity(snap.workloads.len());
        for r in &snap.workloads {
            match entry_of(r) {
                Ok(e) => entries.push(e),
                Err(why) => {
                    tracing::error!(workload = %r.id, reason = %why, "shared store: workload left out")
                }
            }
        }
        for (id, why) in issuer.replace_registry(&entries) {
            tracing::error!(workload = %id, reason = %why, "shared store: workload keys refused, workload left out");
        }
        self.apply_keys(issuer, &snap.signing_keys);
    }

    fn apply_keys(&self, issuer: &Issuer, records: &[SigningKeyRecord]) {
        let parsed: Vec<(i64, SigningKey)> = records
            .iter()
            .filter_map(|r| match key_from_pem_any(&r.kid, &r.pem) {
                Ok(k) => Some((r.not_before_ms, k)),
                Err(e) => {
                    tracing::error!(kid = %r.kid, error = %e, "shared store: signing key refused");
                    None
                }
            })
            .collect();
        let now = now_ms();
        let Some(cur) = parsed
            .iter()
            .rposition(|(nb, _)| *nb <= now)
            .or(if parsed.is_empty() { None } else { Some(0) })
        else {
            tracing::error!("shared store holds no usable signing key; keeping the ring in use");
            return;
        };
        let retention = issuer.settings().key_retention().as_millis() as i64;
        let keep = issuer.settings().keep_previous_keys;
        let mut others: Vec<SigningKey> =
            parsed[cur + 1..].iter().map(|(_, k)| k.clone()).collect();
        for i in (0..cur).rev() {
            let retired_at = parsed[i + 1].0;
            if now - retired_at < retention || cur - i <= keep {
                others.push(parsed[i].1.clone());
            }
        }
        match issuer.install_signing_keys(parsed[cur].1.clone(), others) {
            Ok(true) => {
                tracing::info!(kid = %parsed[cur].1.kid(), published = ?issuer.published_kids(), "signing keys from the shared store")
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "shared signing keys cannot be published"),
        }
    }

    /// A fleet-wide rotation: a fresh key (of this replica's `signing_alg`), published by every replica at its
    /// next reload and signing from `key_activation_secs` from now; keys
    /// retired more than the retention ago are deleted. Returns the new key's
    /// `kid` and when it starts signing (ms since the epoch).
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if no key can be generated or the store cannot be written.
    pub async fn rotate(
        &self,
        issuer: &Issuer,
        audit: &AuditRecord,
    ) -> Result<(String, i64), StoreError> {
        let key = generate_key_of(issuer.settings().signing_alg)
            .map_err(|e| StoreError(format!("key generation: {e}")))?;
        let not_before_ms = now_ms() + self.activation.as_millis() as i64;
        let prune_before = now_ms() - issuer.settings().key_retention().as_millis() as i64;
        let mut audit = audit.clone();
        audit.target = key.kid().to_string();
        audit.detail = serde_json::json!({"not_before_ms": not_before_ms, "by": audit.detail});
        self.store
            .add_signing_key(
                &SigningKeyRecord {
                    kid: key.kid().to_string(),
                    pem: key.to_pkcs8_pem(),
                    not_before_ms,
                },
                prune_before,
                &audit,
            )
            .await?;
        self.refresh(issuer).await?;
        Ok((key.kid().to_string(), not_before_ms))
    }

    /// Keeps `issuer` current: reloads on each notification and every poll
    /// interval, re-subscribes when the listening connection drops, prunes
    /// expired `jti`s every minute. Runs until aborted.
    pub fn spawn(self: &Arc<Self>, issuer: Arc<Issuer>) -> tokio::task::JoinHandle<()> {
        let fleet = self.clone();
        tokio::spawn(async move {
            let mut rx: Option<tokio::sync::mpsc::Receiver<()>> = None;
            let mut last_prune = Instant::now();
            loop {
                if rx.is_none() {
                    match fleet.store.subscribe().await {
                        Ok(r) => rx = Some(r),
                        Err(e) => tracing::warn!(error = %e, "cannot LISTEN for changes; polling"),
                    }
                }
                if let Some(r) = rx.as_mut() {
                    let got = tokio::select! {
                        m = r.recv() => Some(m),
                        _ = tokio::time::sleep(fleet.poll) => None,
                    };
                    if matches!(got, Some(None)) {
                        rx = None;
                    }
                    if let Some(r) = rx.as_mut() {
                        while r.try_recv().is_ok() {}
                    }
                } else {
                    tokio::time::sleep(fleet.poll).await;
                }
                if let Err(e) = fleet.refresh(&issuer).await {
                    tracing::warn!(error = %e, "shared state not reloaded; keeping the last copy");
                }
                if last_prune.elapsed() > Duration::from_secs(60) {
                    last_prune = Instant::now();
                    match fleet.store.prune().await {
                        Ok(n) => tracing::debug!(pruned = n, "expired assertion jtis deleted"),
                        Err(e) => tracing::warn!(error = %e, "jti prune failed"),
                    }
                }
            }
        })
    }
}
