//! A Redis-backed replay seen-set, shared by every instance of a consumer
//! group: `SET key position NX EX ttl` records the first position a reference
//! id was seen at; entries expire when the reference does.

use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use crate::ctxref::unix_now;
use crate::replay::{ReplayGuard, ReplayStoreError, Seen};

/// Replay seen-set in Redis (one key per reference id, expiring with it).
#[derive(Clone)]
pub struct RedisReplayGuard {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisReplayGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisReplayGuard")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisReplayGuard {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`); keys are `<prefix><jti>`.
    ///
    /// # Errors
    ///
    /// Returns a [`ReplayStoreError`] if `url` is not a valid Redis URL or the first connection to
    /// the server fails.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, ReplayStoreError> {
        let client = redis::Client::open(url).map_err(|e| ReplayStoreError(e.to_string()))?;
        let conn = ConnectionManager::new(client)
            .await
            .map_err(|e| ReplayStoreError(format!("cannot connect to {url}: {e}")))?;
        Ok(RedisReplayGuard {
            conn,
            prefix: prefix.into(),
        })
    }
}

#[async_trait::async_trait]
impl ReplayGuard for RedisReplayGuard {
    async fn check(
        &self,
        jti: &str,
        position: &str,
        expires_at: i64,
    ) -> Result<Seen, ReplayStoreError> {
        let key = format!("{}{jti}", self.prefix);
        // keep a minute past expiry so a late replay within clock leeway is still caught
        let ttl = (expires_at - unix_now()).max(0) as u64 + 60;
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(position)
            .arg("NX")
            .arg("EX")
            .arg(ttl)
            .query_async(&mut conn)
            .await
            .map_err(|e| ReplayStoreError(e.to_string()))?;
        if set.is_some() {
            return Ok(Seen::New);
        }
        let first: Option<String> = conn
            .get(&key)
            .await
            .map_err(|e| ReplayStoreError(e.to_string()))?;
        Ok(match first {
            Some(p) if p == position => Seen::Redelivery,
            Some(p) => Seen::Replay { first_seen_at: p },
            // expired between the two calls: treat as first sight
            None => Seen::New,
        })
    }
}
