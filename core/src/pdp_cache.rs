//! Reuse of PDP answers for identical requests under one policy version.
//!
//! The embedded Cedar PDP's (`elevate-cedar`) answer is a pure function of
//! the bundle (policies, schema, entities: all under one content-hash
//! version) and the request, so the answer to a request seen before under
//! the same version can be reused.
//! Trust elevation for the messages of one origin context asks the very same
//! two questions (same workload, subject, action, resource, scope, chain,
//! depth, txn), so a busy consumer mostly hits. A reload changes the version
//! and so every key. Only wrap a PDP whose answers depend on nothing else
//! (not a remote PDP that reads live data).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::pdp::{AccessDecision, AccessRequest, PdpError, PolicyDecisionPoint};

/// A [`PolicyDecisionPoint`] wrapper that reuses answers per policy version.
pub struct CachingPdp {
    inner: Arc<dyn PolicyDecisionPoint>,
    entries: Mutex<HashMap<Vec<u8>, Vec<AccessDecision>>>,
    capacity: usize,
}

impl CachingPdp {
    /// Caches the answers to up to `capacity` distinct request batches.
    pub fn new(inner: Arc<dyn PolicyDecisionPoint>, capacity: usize) -> Self {
        CachingPdp {
            inner,
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// Number of cached request batches.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The exact key: policy version, then every request in its canonical
    /// JSON form (no hashing, so two requests never share an answer by collision).
    fn key(version: &str, reqs: &[AccessRequest]) -> Option<Vec<u8>> {
        let mut key = Vec::with_capacity(64 + 320 * reqs.len());
        key.extend_from_slice(version.as_bytes());
        key.push(0);
        serde_json::to_writer(&mut key, reqs).ok()?;
        Some(key)
    }
}

#[async_trait::async_trait]
impl PolicyDecisionPoint for CachingPdp {
    async fn evaluate(&self, req: &AccessRequest) -> Result<AccessDecision, PdpError> {
        let mut out = self.evaluate_all(std::slice::from_ref(req)).await?;
        out.pop()
            .ok_or_else(|| PdpError::Unavailable("PDP returned no decision".into()))
    }

    async fn evaluate_all(&self, reqs: &[AccessRequest]) -> Result<Vec<AccessDecision>, PdpError> {
        // The version is read before evaluating: bundles only move forward, so
        // an answer is never filed under a version newer than the one it came from.
        let Some(key) = Self::key(&self.inner.policy_version(), reqs) else {
            return self.inner.evaluate_all(reqs).await;
        };
        if let Some(hit) = self.entries.lock().get(&key) {
            return Ok(hit.clone());
        }
        let answer = self.inner.evaluate_all(reqs).await?;
        if answer.len() == reqs.len() {
            let mut entries = self.entries.lock();
            if entries.len() >= self.capacity {
                entries.clear();
            }
            entries.insert(key, answer.clone());
        }
        Ok(answer)
    }

    fn policy_version(&self) -> String {
        self.inner.policy_version()
    }

    fn policy_revision(&self) -> Option<u64> {
        self.inner.policy_revision()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdp::EntityRef;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Allows `alice`, counts evaluations, version set by the test.
    struct Counting {
        calls: AtomicUsize,
        version: Mutex<String>,
        fail: Mutex<bool>,
    }

    #[async_trait::async_trait]
    impl PolicyDecisionPoint for Counting {
        async fn evaluate(&self, req: &AccessRequest) -> Result<AccessDecision, PdpError> {
            if *self.fail.lock() {
                return Err(PdpError::Unavailable("down".into()));
            }
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(AccessDecision {
                allowed: req.subject.id == "alice",
                policies: vec![self.version.lock().clone()],
                errors: vec![],
            })
        }

        fn policy_version(&self) -> String {
            self.version.lock().clone()
        }
    }

    fn req(who: &str, txn: &str) -> AccessRequest {
        AccessRequest {
            subject: EntityRef::new("User", who),
            action: "read".into(),
            resource: EntityRef::new("Destination", "d"),
            context: serde_json::json!({ "txn": txn }),
        }
    }

    fn setup() -> (Arc<Counting>, CachingPdp) {
        let inner = Arc::new(Counting {
            calls: AtomicUsize::new(0),
            version: Mutex::new("v1".into()),
            fail: Mutex::new(false),
        });
        let cache = CachingPdp::new(inner.clone(), 2);
        (inner, cache)
    }

    #[tokio::test]
    async fn identical_requests_hit_different_ones_do_not() {
        let (inner, cache) = setup();
        let a = [req("alice", "t1"), req("alice", "t1")];
        assert!(cache.evaluate_all(&a).await.unwrap()[0].allowed);
        assert!(cache.evaluate_all(&a).await.unwrap()[1].allowed);
        assert_eq!(
            inner.calls.load(Ordering::SeqCst),
            2,
            "second batch was a hit"
        );
        // Another subject, another context: evaluated, and answered for itself.
        assert!(!cache.evaluate(&req("bob", "t1")).await.unwrap().allowed);
        assert!(cache.evaluate(&req("alice", "t2")).await.unwrap().allowed);
        assert_eq!(inner.calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_new_policy_version_is_evaluated_afresh() {
        let (inner, cache) = setup();
        let r = req("alice", "t1");
        assert_eq!(cache.evaluate(&r).await.unwrap().policies, ["v1"]);
        *inner.version.lock() = "v2".into();
        assert_eq!(cache.evaluate(&r).await.unwrap().policies, ["v2"]);
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn failures_are_not_cached_and_capacity_is_bounded() {
        let (inner, cache) = setup();
        *inner.fail.lock() = true;
        assert!(cache.evaluate(&req("alice", "t1")).await.is_err());
        assert!(cache.is_empty());
        *inner.fail.lock() = false;
        for t in ["t1", "t2", "t3", "t4", "t5"] {
            cache.evaluate(&req("alice", t)).await.unwrap();
            assert!(cache.len() <= 2);
        }
    }
}
