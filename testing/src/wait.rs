//! Waiting in tests: polling a condition until it holds or time runs out, and
//! reaching the Redis server the replay tests share a seen-set through.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::replay::ReplayGuard;
use elevate_core::replay_redis::RedisReplayGuard;

/// Checks `done` every `every` until it holds or `timeout` passed; returns whether it held.
pub async fn poll_until(
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// A Redis seen-set under a fresh key prefix (`REDIS_URL`, default the local server);
/// panics with how to start Redis when it is not reachable.
pub async fn redis_seen_set() -> Arc<dyn ReplayGuard> {
    let url = crate::fixture::address(crate::fixture::Service::Redis);
    let prefix = format!("elevate-test:{}:", uuid::Uuid::new_v4().simple());
    match tokio::time::timeout(
        Duration::from_secs(5),
        RedisReplayGuard::connect(&url, prefix),
    )
    .await
    {
        Ok(Ok(g)) => Arc::new(g),
        other => panic!(
            "Redis is not reachable at {url} ({other:?}); start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no"
        ),
    }
}
