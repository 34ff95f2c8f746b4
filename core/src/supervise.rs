//! Supervision, defined once for every broker: a guarded consumer that loses
//! its connection (a broker restart, a network cut, a consumer cancelled by
//! the broker) is rebuilt and run again with backoff, instead of returning
//! and leaving the restart to the user — together with a poison message
//! that used to make a crash loop of it.
//!
//! A binding passes a closure that connects and runs one round of its
//! consumer until the shutdown signal it is given fires; [`supervise`] runs
//! rounds until shutdown, restarting after each [`Restartable`] error (and
//! after a round that ends on its own), with exponential backoff and jitter
//! that starts over once a round has run for [`HEALTHY_AFTER`]. An error
//! that a restart cannot cure (a misconfigured consumer) is returned.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::retry::RetryPolicy;

/// A round that ran this long resets the backoff.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Whether an error that ended a consumer round is worth a restart.
pub trait Restartable {
    /// True for lost connections and broker-side interruptions; false for
    /// configuration errors a restart would only repeat.
    fn restartable(&self) -> bool;
}

/// The shutdown signal one round is given: completes when the supervisor's
/// shutdown does (every round gets its own, all fed by one source).
pub type RoundShutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The restart backoff: 200 ms doubling to 30 s, with jitter.
pub fn default_backoff() -> RetryPolicy {
    RetryPolicy {
        min_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(30),
        ..RetryPolicy::default()
    }
}

/// Runs `round` until `shutdown`, restarting it as the module docs say.
///
/// # Errors
/// The first error of a round that is not [`Restartable`].
pub async fn supervise<F, Fut, E>(
    what: &str,
    backoff: RetryPolicy,
    shutdown: impl Future<Output = ()>,
    mut round: F,
) -> Result<(), E>
where
    F: FnMut(RoundShutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Restartable + std::fmt::Display,
{
    let (fire, fired) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut stopping = false;
    let mut failures = 0u32;
    loop {
        let mut rx = fired.clone();
        let signal: RoundShutdown = Box::pin(async move {
            let _ = rx.wait_for(|v| *v).await;
        });
        let started = Instant::now();
        let run = round(signal);
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = &mut shutdown, if !stopping => {
                    stopping = true;
                    let _ = fire.send(true);
                }
            }
        };
        if stopping {
            return result;
        }
        if started.elapsed() >= HEALTHY_AFTER {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let wait = backoff.delay(failures, None);
        match result {
            Ok(()) => {
                tracing::warn!(
                    consumer = what,
                    ?wait,
                    "consumer ended without a shutdown: restarting"
                )
            }
            Err(e) if e.restartable() => {
                tracing::warn!(consumer = what, error = %e, ?wait, restarts = failures, "consumer stopped: reconnecting")
            }
            Err(e) => {
                tracing::error!(consumer = what, error = %e, "consumer stopped and cannot be restarted");
                return Err(e);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct E(bool);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "e({})", self.0)
        }
    }
    impl Restartable for E {
        fn restartable(&self) -> bool {
            self.0
        }
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            ..RetryPolicy::default()
        }
    }

    #[tokio::test]
    async fn restarts_until_shutdown_and_the_round_sees_the_signal() {
        let rounds = Arc::new(AtomicU32::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let r = rounds.clone();
        let sup = tokio::spawn(async move {
            supervise(
                "test",
                quick(),
                async {
                    let _ = stopped.await;
                },
                move |signal| {
                    let n = r.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n < 3 {
                            return Err(E(true));
                        }
                        signal.await;
                        Ok(())
                    }
                },
            )
            .await
        });
        while rounds.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        stop.send(()).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(2), sup).await;
        assert!(result.unwrap().unwrap().is_ok());
        assert_eq!(rounds.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_fatal_error_is_returned() {
        let r = supervise("test", quick(), std::future::pending(), |_| async {
            Err::<(), _>(E(false))
        })
        .await;
        assert!(matches!(r, Err(E(false))));
    }
}
