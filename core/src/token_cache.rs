//! Reuse of one Txn-Token for the messages of one origin context.
//!
//! A Txn-Token belongs to one origin transaction. Messages that carry
//! references to the same context — same signer, subject, transaction, scope
//! and chain — may share it while it is fresh; messages of different contexts
//! never do, because every one of those fields is part of the cache key.
//! Each reference is still verified on its own before the cache is consulted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::ctxref::unix_now;
use crate::token::{TokenError, TokenRequest, TokenSource, TxnToken};

/// A [`TokenSource`] wrapper that reuses a fresh Txn-Token per origin context.
///
/// Single flight: when several messages of one context miss at once (a
/// consumer with 32 in flight meets a new context), one of them exchanges and
/// the others wait for its token instead of each asking the TTS.
pub struct CachingTokenSource {
    inner: Arc<dyn TokenSource>,
    entries: Mutex<HashMap<[u8; 32], TxnToken>>,
    in_flight: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    capacity: usize,
    min_remaining: Duration,
}

impl CachingTokenSource {
    /// Caches up to `capacity` contexts; a token is reused only while it has
    /// at least `min_remaining` of its lifetime left.
    pub fn new(inner: Arc<dyn TokenSource>, capacity: usize, min_remaining: Duration) -> Self {
        CachingTokenSource {
            inner,
            entries: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            min_remaining,
        }
    }

    /// Number of cached contexts.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn key(req: &TokenRequest<'_>) -> [u8; 32] {
        let c = &req.reference.claims;
        let mut h = Sha256::new();
        for part in [
            c.iss.as_str(),
            c.sub.as_str(),
            c.sub_kind.as_str(),
            c.txn.as_str(),
            &req.scope.to_string(),
            &c.chain().join(" "),
            &c.depth.to_string(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().into()
    }

    /// The cached token of `key`, while it has `min_remaining` of its life left.
    fn fresh(&self, key: &[u8; 32]) -> Option<TxnToken> {
        let fresh_until = unix_now() + self.min_remaining.as_secs() as i64;
        self.entries
            .lock()
            .get(key)
            .filter(|t| t.claims.exp > fresh_until)
            .cloned()
    }
}

#[async_trait::async_trait]
impl TokenSource for CachingTokenSource {
    async fn acquire(&self, req: &TokenRequest<'_>) -> Result<TxnToken, TokenError> {
        let key = Self::key(req);
        if let Some(t) = self.fresh(&key) {
            return Ok(t);
        }
        // One exchange per context at a time; latecomers take its token.
        let gate = self.in_flight.lock().entry(key).or_default().clone();
        let _turn = gate.lock().await;
        if let Some(t) = self.fresh(&key) {
            return Ok(t);
        }
        let result = self.inner.acquire(req).await;
        if let Ok(token) = &result {
            let mut entries = self.entries.lock();
            if entries.len() >= self.capacity {
                let now = unix_now();
                entries.retain(|_, t| t.claims.exp > now);
                if entries.len() >= self.capacity {
                    entries.clear();
                }
            }
            entries.insert(key, token.clone());
        }
        // Cached before the gate goes: a newcomer finds the token, not an open gate.
        self.in_flight.lock().remove(&key);
        result
    }
}
