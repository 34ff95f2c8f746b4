//! Replay protection: a seen-set of reference ids that tells a legitimate
//! redelivery (same reference at the same message position) from a replay
//! (the same reference on another message or position).

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

/// What the seen-set says about a reference on a message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Seen {
    /// First time this reference id is seen.
    New,
    /// Seen before on the same message position: a redelivery.
    Redelivery,
    /// Seen before on a different position: a replay.
    Replay {
        /// Where it was first seen.
        first_seen_at: String,
    },
}

/// The seen-set could not be consulted (store down): the pipeline answers Retry.
#[derive(Debug, Clone, thiserror::Error)]
#[error("replay store unavailable: {0}")]
pub struct ReplayStoreError(pub String);

/// A seen-set of reference ids; shared by a consumer group when backed by a shared store.
#[async_trait::async_trait]
pub trait ReplayGuard: Send + Sync {
    /// Records `jti` at `position` (kept until `expires_at`, seconds since the epoch)
    /// and reports whether it is new, a redelivery or a replay.
    async fn check(
        &self,
        jti: &str,
        position: &str,
        expires_at: i64,
    ) -> Result<Seen, ReplayStoreError>;
}

/// In-process seen-set (one consumer instance); entries expire with their reference.
#[derive(Debug, Default)]
pub struct InMemoryReplayGuard {
    seen: Mutex<HashMap<String, (String, i64)>>,
    checks: Mutex<u64>,
}

impl InMemoryReplayGuard {
    /// An empty seen-set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.seen.lock().len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait::async_trait]
impl ReplayGuard for InMemoryReplayGuard {
    async fn check(
        &self,
        jti: &str,
        position: &str,
        expires_at: i64,
    ) -> Result<Seen, ReplayStoreError> {
        let now = crate::ctxref::unix_now();
        let mut seen = self.seen.lock();
        {
            let mut checks = self.checks.lock();
            *checks += 1;
            if (*checks).is_multiple_of(1024) {
                seen.retain(|_, (_, exp)| *exp > now);
            }
        }
        match seen.get(jti) {
            Some((pos, exp)) if *exp > now => Ok(if pos == position {
                Seen::Redelivery
            } else {
                Seen::Replay {
                    first_seen_at: pos.clone(),
                }
            }),
            _ => {
                // keep a little past expiry so a late replay within leeway is still caught
                let keep = expires_at + Duration::from_secs(60).as_secs() as i64;
                seen.insert(jti.to_string(), (position.to_string(), keep));
                Ok(Seen::New)
            }
        }
    }
}
