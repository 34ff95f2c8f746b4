//! Keeping a PDP's signed bundle current, and deciding when the source is
//! gone. Each poll: fetch (with the etag held) → verify the signature and
//! every file's digest → refuse a lower revision than the one in force
//! (rollback) or another bundle under the same revision (equivocation) →
//! validate against the schema → persist to the cache directory → swap in
//! atomically. Any failure keeps the bundle in force and says why (log and
//! [`BundleStatus`]).
//!
//! Offline start: when the source cannot be read at start, the bundle last
//! persisted in the cache directory is verified again and used, with the
//! time it was last confirmed by the source. `stale_after` warns;
//! `expire_after` makes every decision a Retry (`pdp-unavailable`): fail
//! closed, nothing lost, and decisions resume when the source answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use elevate_cedar::{Bundle, BundleError, CedarPdp};
use elevate_core::keys::KeySet;
use elevate_core::pdp::{AccessDecision, AccessRequest, PdpError, PolicyDecisionPoint};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::archive::{self, ArchiveError, Opened};
use crate::source::{BundleSource, Fetched, SourceError};

/// Name of the cached archive in the cache directory.
pub const CACHE_ARCHIVE: &str = "bundle.tar.gz";
/// Name of the cached archive's metadata.
pub const CACHE_META: &str = "bundle.json";

/// How a [`BundleSync`] polls and when its bundle goes stale or expires.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Time between polls (default 30 s), each jittered by ±20 %.
    pub poll: Duration,
    /// Where the bundle in force is persisted for an offline start (none: not persisted).
    pub cache_dir: Option<PathBuf>,
    /// Warn when the source has not confirmed the bundle for this long.
    pub stale_after: Option<Duration>,
    /// Turn every decision into Retry (`pdp-unavailable`) when the source
    /// has not confirmed the bundle for this long.
    pub expire_after: Option<Duration>,
    /// Accept a bundle with a lower revision than the one in force.
    pub allow_rollback: bool,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            poll: Duration::from_secs(30),
            cache_dir: None,
            stale_after: None,
            expire_after: None,
            allow_rollback: false,
        }
    }
}

/// Why a bundle was not activated (the one in force stays).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The source could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The archive is not signed, badly signed, tampered with or malformed.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The files are not a valid Cedar bundle (schema, policies, entities).
    #[error("bundle does not validate: {0}")]
    Bundle(#[from] BundleError),
    /// A lower revision than the one in force.
    #[error(
        "bundle revision {offered} is older than revision {active} in force (rollback refused)"
    )]
    Rollback {
        /// Revision in force.
        active: u64,
        /// Revision offered.
        offered: u64,
    },
    /// Another bundle under the revision in force.
    #[error(
        "a different bundle under revision {revision} (in force {active}, offered {offered}): equivocation refused"
    )]
    Equivocation {
        /// The revision.
        revision: u64,
        /// Version in force.
        active: String,
        /// Version offered.
        offered: String,
    },
    /// No bundle at start: the source is unreachable and nothing is cached.
    #[error("no policy bundle: {source_error}; and no usable cached bundle ({cache})")]
    NoBundle {
        /// Why the source failed.
        source_error: String,
        /// Why the cache could not be used.
        cache: String,
    },
}

/// What one poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// The source confirmed the bundle in force.
    Unchanged,
    /// A new bundle is in force.
    Activated {
        /// Its revision.
        revision: u64,
        /// Its version (16 hex characters of the manifest hash).
        version: String,
    },
}

/// What an operator (and a status endpoint) can see of the sync.
#[derive(Debug, Clone, Serialize)]
pub struct BundleStatus {
    /// The source.
    pub source: String,
    /// Revision in force.
    pub revision: u64,
    /// Version in force.
    pub version: String,
    /// When the source last confirmed the bundle (Unix seconds).
    pub last_synced: u64,
    /// The last refusal or failure, if the last poll failed.
    pub last_error: Option<String>,
    /// Past `stale_after`.
    pub stale: bool,
    /// Past `expire_after`: decisions are Retry.
    pub expired: bool,
}

/// The cached archive's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheMeta {
    etag: Option<String>,
    revision: u64,
    manifest_sha256: String,
    /// When the source last confirmed it (Unix seconds).
    synced_at: u64,
}

struct State {
    etag: Option<String>,
    revision: u64,
    manifest_sha256: String,
    last_error: Option<String>,
    stale_warned: bool,
}

/// Keeps one [`CedarPdp`] on the newest verified bundle of a source.
pub struct BundleSync {
    source: Arc<dyn BundleSource>,
    signers: KeySet,
    config: SyncConfig,
    pdp: Arc<CedarPdp>,
    state: Mutex<State>,
    /// When the source last confirmed the bundle (Unix seconds): read by
    /// the expiry check in front of every decision, so not behind the lock.
    synced_at: AtomicU64,
    /// Serializes polls: an older fetch can never replace a newer bundle.
    polling: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for BundleSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleSync")
            .field("source", &self.source.describe())
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Verifies an archive and validates its files as a Cedar bundle.
fn verified(origin: &str, bytes: &[u8], signers: &KeySet) -> Result<(Opened, Bundle), SyncError> {
    let opened = archive::open(bytes, signers)?;
    let bundle = Bundle::from_files(origin, &opened.files)?
        .with_manifest(opened.manifest.revision, opened.manifest_sha256.clone());
    Ok((opened, bundle))
}

/// Writes `bytes` to `path` whole: a temporary file, synced, renamed into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl BundleSync {
    /// Fetches and activates the source's bundle; when the source cannot
    /// be read, starts from the cached bundle (verified again) instead.
    ///
    /// # Errors
    /// [`SyncError::NoBundle`] when neither gives a bundle; the refusal of
    /// an archive the source served (a bad bundle at start is not replaced
    /// by an older cached one silently).
    pub async fn start(
        source: Arc<dyn BundleSource>,
        signers: KeySet,
        config: SyncConfig,
    ) -> Result<Arc<Self>, SyncError> {
        let origin = source.describe();
        let (bytes, etag, synced_at) = match source.fetch(None).await {
            Ok(Fetched::Archive { bytes, etag }) => (bytes, etag, now_secs()),
            Ok(Fetched::NotModified) => {
                return Err(SyncError::NoBundle {
                    source_error: format!("{origin} answered \"not modified\" to a first fetch"),
                    cache: "not read".into(),
                });
            }
            Err(e) => {
                let cached = Self::read_cache(&config, &signers, &origin);
                match cached {
                    Ok((bytes, meta)) => {
                        tracing::warn!(source = %origin, error = %e, revision = meta.revision,
                            "bundle source unreachable at start: deciding with the cached bundle");
                        (bytes, meta.etag, meta.synced_at)
                    }
                    Err(cache) => {
                        return Err(SyncError::NoBundle {
                            source_error: e.to_string(),
                            cache,
                        });
                    }
                }
            }
        };
        let (opened, bundle) = verified(&origin, &bytes, &signers)?;
        tracing::info!(source = %origin, revision = opened.manifest.revision, version = bundle.version(),
            signed_by = %opened.signed_by, "signed policy bundle in force");
        let sync = Arc::new(BundleSync {
            state: Mutex::new(State {
                etag,
                revision: opened.manifest.revision,
                manifest_sha256: opened.manifest_sha256.clone(),
                last_error: None,
                stale_warned: false,
            }),
            pdp: Arc::new(CedarPdp::from_bundle(bundle)),
            synced_at: AtomicU64::new(synced_at),
            source,
            signers,
            config,
            polling: tokio::sync::Mutex::new(()),
        });
        sync.persist(Some(&bytes));
        Ok(sync)
    }

    fn read_cache(
        config: &SyncConfig,
        signers: &KeySet,
        origin: &str,
    ) -> Result<(Vec<u8>, CacheMeta), String> {
        let dir = config
            .cache_dir
            .as_ref()
            .ok_or("no cache directory configured")?;
        let meta = std::fs::read(dir.join(CACHE_META))
            .map_err(|e| format!("{}: {e}", dir.join(CACHE_META).display()))?;
        let meta: CacheMeta = serde_json::from_slice(&meta)
            .map_err(|e| format!("{}: {e}", dir.join(CACHE_META).display()))?;
        let bytes = std::fs::read(dir.join(CACHE_ARCHIVE))
            .map_err(|e| format!("{}: {e}", dir.join(CACHE_ARCHIVE).display()))?;
        // The cache is verified like a download: a file edited on disk is refused.
        let (opened, _) = verified(origin, &bytes, signers)
            .map_err(|e| format!("{}: {e}", dir.join(CACHE_ARCHIVE).display()))?;
        if opened.manifest_sha256 != meta.manifest_sha256 {
            return Err(format!("{}: does not match its metadata", dir.display()));
        }
        Ok((bytes, meta))
    }

    /// Writes the archive in force (when given) and its metadata to the
    /// cache directory; a failure is logged, the bundle stays in force.
    fn persist(&self, archive: Option<&[u8]>) {
        let Some(dir) = &self.config.cache_dir else {
            return;
        };
        let meta = {
            let s = self.state.lock();
            CacheMeta {
                etag: s.etag.clone(),
                revision: s.revision,
                manifest_sha256: s.manifest_sha256.clone(),
                synced_at: self.synced_at.load(Ordering::Acquire),
            }
        };
        let result = std::fs::create_dir_all(dir)
            .and_then(|()| match archive {
                Some(bytes) => write_atomically(&dir.join(CACHE_ARCHIVE), bytes),
                None => Ok(()),
            })
            .and_then(|()| {
                let json = serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?;
                write_atomically(&dir.join(CACHE_META), &json)
            });
        if let Err(e) = result {
            tracing::warn!(dir = %dir.display(), error = %e,
                "cannot persist the policy bundle: an offline start would use an older one");
        }
    }

    /// The PDP answering from the bundle in force (no expiry check: see
    /// [`BundleSync::expiring`]).
    pub fn cedar(&self) -> &Arc<CedarPdp> {
        &self.pdp
    }

    /// `inner` (the bundle's PDP, or a cache over it) behind the expiry
    /// check: past `expire_after`, every decision is Retry.
    pub fn expiring(self: &Arc<Self>, inner: Arc<dyn PolicyDecisionPoint>) -> ExpiringPdp {
        ExpiringPdp {
            sync: self.clone(),
            inner,
        }
    }

    /// One poll of the source.
    ///
    /// # Errors
    /// Why nothing new was activated; the bundle in force stays.
    pub async fn poll_once(&self) -> Result<Polled, SyncError> {
        let _one = self.polling.lock().await;
        let etag = self.state.lock().etag.clone();
        let result = self.poll_inner(etag.as_deref()).await;
        let mut s = self.state.lock();
        match &result {
            Ok(_) => s.last_error = None,
            Err(e) => s.last_error = Some(e.to_string()),
        }
        result
    }

    async fn poll_inner(&self, etag: Option<&str>) -> Result<Polled, SyncError> {
        let (bytes, tag) = match self.source.fetch(etag).await? {
            Fetched::NotModified => {
                self.confirmed();
                self.persist(None);
                return Ok(Polled::Unchanged);
            }
            Fetched::Archive { bytes, etag } => (bytes, etag),
        };
        let (opened, bundle) = verified(&self.source.describe(), &bytes, &self.signers)?;
        let offered = opened.manifest.revision;
        {
            let mut s = self.state.lock();
            if opened.manifest_sha256 == s.manifest_sha256 {
                s.etag = tag;
                drop(s);
                self.confirmed();
                self.persist(None);
                return Ok(Polled::Unchanged);
            }
            if offered < s.revision && !self.config.allow_rollback {
                return Err(SyncError::Rollback {
                    active: s.revision,
                    offered,
                });
            }
            if offered == s.revision {
                return Err(SyncError::Equivocation {
                    revision: offered,
                    active: s.manifest_sha256.clone(),
                    offered: opened.manifest_sha256.clone(),
                });
            }
            s.etag = tag;
            s.revision = offered;
            s.manifest_sha256 = opened.manifest_sha256.clone();
        }
        self.confirmed();
        let version = bundle.version().to_string();
        let replaced = self.pdp.install(bundle);
        self.persist(Some(&bytes));
        tracing::info!(source = %self.source.describe(), revision = offered, %version, %replaced,
            signed_by = %opened.signed_by, "signed policy bundle activated");
        Ok(Polled::Activated {
            revision: offered,
            version,
        })
    }

    /// Polls every `poll` (±20 %) until the sync is dropped, logging each
    /// activation, each new failure, and staleness as it starts and ends.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let poll = self.config.poll.max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut last_error: Option<String> = None;
            loop {
                let jitter = rand::random_range(0.8..1.2);
                tokio::time::sleep(poll.mul_f64(jitter)).await;
                let Some(sync) = weak.upgrade() else {
                    return;
                };
                match sync.poll_once().await {
                    Ok(_) => last_error = None,
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(msg.as_str()) {
                            tracing::error!(source = %sync.source.describe(), error = %msg,
                                "policy bundle not updated; keeping the bundle in force");
                            last_error = Some(msg);
                        }
                    }
                }
                sync.check_staleness();
            }
        })
    }

    /// The source confirmed the bundle in force just now.
    fn confirmed(&self) {
        self.synced_at.store(now_secs(), Ordering::Release);
    }

    fn since_synced(&self) -> Duration {
        let at = self.synced_at.load(Ordering::Acquire);
        Duration::from_secs(now_secs().saturating_sub(at))
    }

    fn check_staleness(&self) {
        let Some(after) = self.config.stale_after else {
            return;
        };
        let age = self.since_synced();
        let mut s = self.state.lock();
        if age > after && !s.stale_warned {
            s.stale_warned = true;
            tracing::warn!(source = %self.source.describe(), age_secs = age.as_secs(), revision = s.revision,
                "policy bundle is stale: the source has not confirmed it within stale_after");
        } else if age <= after && s.stale_warned {
            s.stale_warned = false;
            tracing::info!(source = %self.source.describe(), revision = s.revision, "policy bundle confirmed again");
        }
    }

    /// Past `expire_after` since the source last confirmed the bundle.
    pub fn expired(&self) -> bool {
        self.config
            .expire_after
            .is_some_and(|after| self.since_synced() > after)
    }

    /// The sync as an operator sees it.
    pub fn status(&self) -> BundleStatus {
        let age = self.since_synced();
        let s = self.state.lock();
        BundleStatus {
            source: self.source.describe(),
            revision: s.revision,
            version: s.manifest_sha256.chars().take(16).collect(),
            last_synced: self.synced_at.load(Ordering::Acquire),
            last_error: s.last_error.clone(),
            stale: self.config.stale_after.is_some_and(|a| age > a),
            expired: self.config.expire_after.is_some_and(|a| age > a),
        }
    }
}

/// A PDP that refuses to answer (Retry, `pdp-unavailable`) once its
/// bundle has expired ([`SyncConfig::expire_after`]).
pub struct ExpiringPdp {
    sync: Arc<BundleSync>,
    inner: Arc<dyn PolicyDecisionPoint>,
}

impl ExpiringPdp {
    fn fresh(&self) -> Result<(), PdpError> {
        if self.sync.expired() {
            let s = self.sync.status();
            return Err(PdpError::Unavailable(format!(
                "policy bundle revision {} expired: not confirmed by {} since {} (expire_after)",
                s.revision, s.source, s.last_synced
            )));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl PolicyDecisionPoint for ExpiringPdp {
    async fn evaluate(&self, req: &AccessRequest) -> Result<AccessDecision, PdpError> {
        self.fresh()?;
        self.inner.evaluate(req).await
    }

    async fn evaluate_all(&self, reqs: &[AccessRequest]) -> Result<Vec<AccessDecision>, PdpError> {
        self.fresh()?;
        self.inner.evaluate_all(reqs).await
    }

    fn policy_version(&self) -> String {
        self.inner.policy_version()
    }

    fn policy_revision(&self) -> Option<u64> {
        self.inner.policy_revision()
    }
}
